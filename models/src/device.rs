//! The one place a compute backend is chosen.
//!
//! burn 0.22 selects the backend at run time through [`Device`]. Two CPU backends are built in:
//! `flex` (pure Rust, burn's successor to ndarray) and `ndarray` (deprecated in burn 0.22, gone in
//! 0.23). With the `gpu` cargo feature, `wgpu` is a third. Everything else in culprit takes a
//! [`Device`] and never names a backend.

use burn::tensor::Device;

use crate::ModelError;

/// A compute backend (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (the default: the faster CPU backend, see benches/).
    #[default]
    Flex,
    /// burn-ndarray (deprecated upstream; kept selectable for comparison).
    NdArray,
    /// burn-wgpu (GPU, or a Vulkan CPU device such as llvmpipe).
    #[cfg(feature = "gpu")]
    Wgpu,
}

impl std::str::FromStr for Backend {
    type Err = ModelError;

    /// Parses the CLI name (`flex`, `ndarray`, `wgpu`).
    fn from_str(name: &str) -> Result<Self, ModelError> {
        match name {
            "flex" => Ok(Self::Flex),
            "ndarray" => Ok(Self::NdArray),
            #[cfg(feature = "gpu")]
            "wgpu" => Ok(Self::Wgpu),
            #[cfg(not(feature = "gpu"))]
            "wgpu" => Err(ModelError::Config("backend wgpu needs a build with `--features gpu`".into())),
            other => Err(ModelError::Config(format!("unknown backend `{other}` (expected flex, ndarray or wgpu)"))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::NdArray => "ndarray",
            #[cfg(feature = "gpu")]
            Self::Wgpu => "wgpu",
        }
    }

    /// A device of this backend without autodiff (inference).
    pub fn device(self) -> Device {
        match self {
            Self::Flex => Device::flex(),
            #[allow(deprecated)]
            Self::NdArray => Device::ndarray(),
            #[cfg(feature = "gpu")]
            Self::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        }
    }

    /// A device of this backend with autodiff (training, gradients).
    pub fn autodiff_device(self) -> Device {
        self.device().autodiff()
    }
}
