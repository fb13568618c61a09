//! The one place a compute backend is chosen.
//!
//! burn 0.22 selects the backend at run time through [`Device`]. Two CPU backends are built in:
//! `flex` (pure Rust, burn's successor to ndarray) and `ndarray` (deprecated in burn 0.22, gone in
//! 0.23). With the `gpu` cargo feature, `wgpu` is a third. Everything else in culprit takes a
//! [`Device`] and never names a backend.
//!
//! The wgpu backend runs on one adapter, chosen once per process with [`init_wgpu`] (the CLI's
//! `--device`): a discrete or integrated GPU, or a Vulkan CPU device such as Mesa's lavapipe
//! (`--device cpu`), which wgpu never picks by itself. The CPU device is for correctness checks of
//! the GPU path (tests/gpu), not for speed.

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
            Self::Wgpu => wgpu_device(),
        }
    }

    /// A device of this backend with autodiff (training, gradients).
    pub fn autodiff_device(self) -> Device {
        self.device().autodiff()
    }
}

/// Which wgpu adapter the `wgpu` backend runs on (`--device`): `default` (the best GPU wgpu finds;
/// the `CUBECL_WGPU_DEFAULT_DEVICE` variable can override it), `cpu` (a Vulkan CPU device such as
/// lavapipe), `discrete[:N]`, `integrated[:N]` or `virtual[:N]` (the N-th adapter of that kind, from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GpuAdapter {
    /// The best adapter wgpu finds.
    #[default]
    Default,
    /// A CPU Vulkan device (lavapipe, SwiftShader).
    Cpu,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// The N-th integrated GPU.
    Integrated(usize),
    /// The N-th virtual GPU.
    Virtual(usize),
}

impl std::str::FromStr for GpuAdapter {
    type Err = ModelError;

    /// Parses `default`, `cpu`, `discrete[:N]`, `integrated[:N]`, `virtual[:N]`.
    fn from_str(text: &str) -> Result<Self, ModelError> {
        let (kind, index) = match text.split_once(':') {
            Some((kind, n)) => {
                let n = n.parse::<usize>().map_err(|_| {
                    ModelError::Config(format!("device `{text}`: `{n}` is not an adapter index (0, 1, ...)"))
                })?;
                (kind, Some(n))
            }
            None => (text, None),
        };
        match (kind, index) {
            ("default", None) => Ok(Self::Default),
            ("cpu", None) => Ok(Self::Cpu),
            ("discrete", n) => Ok(Self::Discrete(n.unwrap_or(0))),
            ("integrated", n) => Ok(Self::Integrated(n.unwrap_or(0))),
            ("virtual", n) => Ok(Self::Virtual(n.unwrap_or(0))),
            _ => Err(ModelError::Config(format!(
                "unknown device `{text}` (expected default, cpu, discrete[:N], integrated[:N] or virtual[:N])"
            ))),
        }
    }
}

impl std::fmt::Display for GpuAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::Cpu => f.write_str("cpu"),
            Self::Discrete(n) => write!(f, "discrete:{n}"),
            Self::Integrated(n) => write!(f, "integrated:{n}"),
            Self::Virtual(n) => write!(f, "virtual:{n}"),
        }
    }
}

#[cfg(feature = "gpu")]
static WGPU: std::sync::OnceLock<(GpuAdapter, Device)> = std::sync::OnceLock::new();

/// Starts the wgpu runtime on `adapter`, once per process; every later [`Backend::Wgpu`] device
/// is that one. Fails with a clear error when no such adapter exists, or when the runtime was
/// already started on another adapter.
#[cfg(feature = "gpu")]
pub fn init_wgpu(adapter: GpuAdapter) -> Result<Device, ModelError> {
    use burn::tensor::DeviceKind;
    // One starter at a time: two threads that both found WGPU empty would both start the
    // runtime, and the second start fails ("Service already initialized").
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _starting = STARTING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((started, device)) = WGPU.get() {
        if *started == adapter {
            return Ok(device.clone());
        }
        return Err(ModelError::Config(format!(
            "the wgpu backend already runs on device `{started}`; it cannot move to `{adapter}` in one process"
        )));
    }
    let kind = match adapter {
        GpuAdapter::Default => DeviceKind::DefaultDevice,
        GpuAdapter::Cpu => DeviceKind::Cpu,
        GpuAdapter::Discrete(n) => DeviceKind::DiscreteGpu(n),
        GpuAdapter::Integrated(n) => DeviceKind::IntegratedGpu(n),
        GpuAdapter::Virtual(n) => DeviceKind::VirtualGpu(n),
    };
    let device = Device::wgpu_options().device_kind(kind).init().map_err(|e| {
        let hint = if adapter == GpuAdapter::Cpu {
            " (a Vulkan CPU device needs Mesa's lavapipe: Debian's mesa-vulkan-drivers and libvulkan1)"
        } else {
            " (try --device cpu for a Vulkan CPU device, or check the GPU driver's Vulkan support)"
        };
        ModelError::Config(format!("no wgpu adapter for device `{adapter}`: {e}{hint}"))
    })?;
    Ok(WGPU.get_or_init(|| (adapter, device)).1.clone())
}

/// The adapter [`init_wgpu`] started the wgpu runtime on, if it did.
#[cfg(feature = "gpu")]
pub fn wgpu_adapter() -> Option<GpuAdapter> {
    WGPU.get().map(|(adapter, _)| *adapter)
}

/// Whether `device` is a device of the wgpu backend (with or without autodiff).
pub fn is_wgpu(device: &Device) -> bool {
    crate::elementary::is_cube(device)
}

/// The wgpu device [`init_wgpu`] started, or the default adapter's (panics if there is none: the
/// CLI calls [`init_wgpu`] first and reports the error).
#[cfg(feature = "gpu")]
fn wgpu_device() -> Device {
    match WGPU.get() {
        Some((_, device)) => device.clone(),
        None => init_wgpu(GpuAdapter::Default).unwrap_or_else(|e| panic!("{e}")),
    }
}
