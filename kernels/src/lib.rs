//! culprit-kernels: reserved for GPU kernels.
