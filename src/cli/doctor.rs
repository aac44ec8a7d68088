//! `dlsr doctor`: what this machine offers dlsr (libtorch, devices, threads, assets).

use clap::Args;

use crate::device::{self, DeviceSpec};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Also check that this device works (allocates and multiplies on it).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// The libtorch version at run time: `build-version` (our install) or `version.py`
/// (a python torch's lib dir) next to the loaded libtorch_cpu.so.
pub fn libtorch_version() -> (String, Option<String>) {
    let path = device::loaded_library_path("libtorch_cpu.so");
    let version = path.as_deref().and_then(|p| {
        let lib = std::path::Path::new(p).parent()?;
        let root = lib.parent()?;
        if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
            return Some(v.trim().to_string());
        }
        let py = std::fs::read_to_string(root.join("version.py")).ok()?;
        py.lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
    });
    (version.unwrap_or_else(|| "unknown (built for 2.11.0)".into()), path)
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let report = device::init_backends();
    // Touch libtorch so that it is loaded and its path can be read.
    let _ = tch::Tensor::from(0f32);
    let (version, path) = libtorch_version();
    println!("dlsr {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch: {version} ({})", path.unwrap_or_else(|| "path unknown".into()));
    println!(
        "threads: {} intra-op, {} inter-op (OpenMP {}, MKL {}, oneDNN {})",
        tch::get_num_threads(),
        tch::get_num_interop_threads(),
        yes(tch::utils::has_openmp()),
        yes(tch::utils::has_mkl()),
        yes(tch::utils::has_mkldnn())
    );
    let mut devices = vec!["cpu".to_string()];
    match device::cuda_unavailable_reason() {
        None => {
            let n = tch::Cuda::device_count();
            devices.extend((0..n).map(|i| format!("cuda:{i}")));
            println!(
                "cuda: available, {n} device(s), cuDNN {}; backend {}",
                yes(tch::Cuda::cudnn_is_available()),
                report.cuda_library.as_deref().unwrap_or("?")
            );
        }
        Some(reason) => println!("cuda: not available: {reason}"),
    }
    println!("devices: {}", devices.join(", "));
    println!("auto device: {}", device::describe(DeviceSpec::Auto.resolve()?));
    println!("assets ({}):", crate::assets::root().display());
    for (name, path) in crate::assets::inventory() {
        let state = if path.exists() { "ok     " } else { "missing" };
        println!("  [{state}] {name}: {}", path.display());
    }
    if let Some(spec) = args.device {
        let dev = spec.resolve()?;
        let a = tch::Tensor::f_ones([64, 64], (tch::Kind::Float, dev))?;
        let sum = a.f_matmul(&a)?.f_sum(tch::Kind::Double)?.f_double_value(&[])?;
        anyhow::ensure!(sum == 64.0 * 64.0 * 64.0, "matmul check on {spec} gave {sum}");
        println!("device check: {} ok (64x64 matmul)", device::describe(dev));
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
