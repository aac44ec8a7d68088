//! Compute devices: loading the CUDA backend at start-up and resolving `--device`.
//!
//! The binary links only libtorch_cpu/libc10 (the CPU recipe in TOOLCHAIN.md), so one
//! build serves CPU and GPU machines. On a machine whose LD_LIBRARY_PATH holds a CUDA
//! libtorch 2.11, [`init_backends`] dlopens `libtorch_cuda.so` with RTLD_GLOBAL before any
//! tensor is created; its static initialisers register the CUDA backend with the
//! dispatcher. Nothing here may silently fall back to CPU when CUDA was asked for.

use std::ffi::{CStr, CString};
use std::str::FromStr;
use std::sync::OnceLock;

use tch::Device;

/// What happened when the CUDA backend was looked for.
#[derive(Debug, Clone)]
pub struct BackendReport {
    /// `Ok(path)` when libtorch_cuda.so was loaded, `Err(reason)` otherwise.
    pub cuda_library: Result<String, String>,
}

static BACKENDS: OnceLock<BackendReport> = OnceLock::new();

/// Loads libtorch_cuda.so if the dynamic loader can find it. Call first thing in
/// `main`, before any tch call; later calls return the first report.
pub fn init_backends() -> &'static BackendReport {
    BACKENDS.get_or_init(|| {
        let cuda_library = if std::env::var_os("DLSR_NO_CUDA").is_some() {
            Err("DLSR_NO_CUDA is set".to_string())
        } else {
            dlopen_global("libtorch_cuda.so")
        };
        match &cuda_library {
            Ok(path) => tracing::debug!(%path, "loaded the CUDA backend"),
            Err(why) => tracing::debug!(%why, "CUDA backend not loaded"),
        }
        BackendReport { cuda_library }
    })
}

fn dlopen_global(name: &str) -> Result<String, String> {
    let c_name = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: dlopen/dlerror are thread-safe in glibc; the handle is deliberately leaked
    // because the library must stay loaded for the life of the process.
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let err = libc::dlerror();
            let reason = if err.is_null() {
                "unknown dlopen error".to_string()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            };
            return Err(format!("{name} not loadable: {reason}"));
        }
    }
    Ok(loaded_library_path(name).unwrap_or_else(|| name.to_string()))
}

/// The path of a loaded shared library, read from /proc/self/maps.
pub fn loaded_library_path(name: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next() == Some(name))
        .map(str::to_string)
}

/// Why CUDA cannot be used, or `None` when it can.
pub fn cuda_unavailable_reason() -> Option<String> {
    let report = init_backends();
    if let Err(why) = &report.cuda_library {
        return Some(format!(
            "the CUDA backend is not loaded ({why}); put a CUDA libtorch 2.11 (e.g. a CUDA \
             `torch==2.11.0` wheel's torch/lib) on LD_LIBRARY_PATH"
        ));
    }
    if !tch::Cuda::is_available() {
        return Some(
            "libtorch_cuda.so loaded but no CUDA device is visible (driver or \
                     CUDA_VISIBLE_DEVICES)"
                .to_string(),
        );
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device {0:?}: expected auto, cpu, cuda or cuda:N")]
    Invalid(String),
    #[error("device {requested} requested but CUDA is not available: {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("device cuda:{index} requested but only {count} CUDA device(s) are visible")]
    NoSuchCudaDevice { index: usize, count: usize },
}

/// A device as the user asks for it; [`DeviceSpec::resolve`] checks it against the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    /// CUDA device 0 when available, CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Invalid(s.to_string())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(match cuda_unavailable_reason() {
                None => Device::Cuda(0),
                Some(_) => Device::Cpu,
            }),
            Self::Cuda(index) => {
                if let Some(reason) = cuda_unavailable_reason() {
                    return Err(DeviceError::CudaUnavailable { requested: self.to_string(), reason });
                }
                let count = tch::Cuda::device_count().max(0) as usize;
                if index >= count {
                    return Err(DeviceError::NoSuchCudaDevice { index, count });
                }
                Ok(Device::Cuda(index))
            }
        }
    }
}

/// Human-readable name of a resolved device.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }
}

/// The automatic number of CPU scoring workers: one per libtorch thread, at most 4
/// (each holds its own model; beyond a few, larger workers are the better use of cores).
pub const MAX_AUTO_WORKERS: usize = 4;

/// Workers for `requested` (0: automatic) on `device`, and the libtorch threads each
/// should use: on CUDA one worker; on the CPU the cores split between the workers.
pub fn scoring_workers(requested: usize, device: tch::Device) -> (usize, i32) {
    let cores = tch::get_num_threads().max(1);
    let workers = match requested {
        0 if device.is_cuda() => 1,
        0 => (cores as usize).min(MAX_AUTO_WORKERS),
        n => n,
    };
    (workers, (cores / workers as i32).max(1))
}

#[cfg(test)]
mod worker_tests {
    use super::*;

    #[test]
    fn automatic_workers_are_bounded_and_share_the_cores() {
        let cores = tch::get_num_threads().max(1);
        let (auto, threads) = scoring_workers(0, tch::Device::Cpu);
        assert_eq!(auto, (cores as usize).min(MAX_AUTO_WORKERS));
        assert_eq!(threads, (cores / auto as i32).max(1));
        assert_eq!(scoring_workers(0, tch::Device::Cuda(0)).0, 1);
        assert_eq!(scoring_workers(3, tch::Device::Cpu).0, 3);
        assert!(scoring_workers(3 * cores as usize, tch::Device::Cpu).1 >= 1);
    }
}
