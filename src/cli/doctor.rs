//! `dlsr doctor`: what this machine offers dlsr (libtorch, devices, threads, assets).

use clap::Args;

use crate::device::{self, DeviceSpec};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Also check that this device works (allocates and multiplies on it).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Also classify the 20 ImageNet photos of the foolbox samples with Lite0 on the
    /// device (`--device`, else auto) in `--precision`: checks weights, padding and the
    /// forward pass end to end (expect 18/20 top-1).
    #[arg(long)]
    pub imagenet: bool,
    /// Also measure the bare Lite0 encoder (random images of this many pixels a side,
    /// features pooled) on the device: images/s over about 3 s.
    #[arg(long, value_name = "PX")]
    pub encoder_rate: Option<i64>,
    /// Batch size for --encoder-rate.
    #[arg(long, default_value_t = 64)]
    pub batch_size: i64,
    /// Precision for --imagenet and --encoder-rate: f32, f16 (CUDA autocast) or bf16.
    #[arg(long, default_value = "f32")]
    pub precision: crate::model::encoder::Precision,
}

/// Images/s of the bare Lite0 encoder (features pooled) on random input.
fn encoder_rate(
    device: tch::Device,
    precision: crate::model::encoder::Precision,
    px: i64,
    batch: i64,
) -> anyhow::Result<f64> {
    use crate::model::efficientnet::{EfficientNetLite, LiteVariant};
    use crate::model::encoder::Encoder;
    anyhow::ensure!(px >= 8 && batch >= 1, "--encoder-rate needs at least 8 px and --batch-size at least 1");
    let net =
        EfficientNetLite::load(LiteVariant::Lite0, &LiteVariant::Lite0.default_weights(), device, precision)?;
    let images = tch::Tensor::f_randn([batch, 3, px, px], (tch::Kind::Float, device))?;
    let sync = || {
        if let tch::Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    let run = || -> anyhow::Result<()> {
        let maps = net.feature_maps(&images)?;
        let _pooled = crate::model::features::pool_and_standardise("lite0", &maps)?;
        Ok(())
    };
    run()?;
    sync();
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed().as_secs_f64() < 3.0 || n < 3 {
        run()?;
        n += 1;
    }
    sync();
    Ok((n * batch) as f64 / started.elapsed().as_secs_f64())
}

/// Top-1 predictions of `net` (a `variant` network) on labelled ImageNet photos, with
/// ImageNet evaluation preprocessing (centre crop at the native size): how many are
/// right, and every prediction. `dlsr doctor --imagenet` and the encoder tests use it.
pub fn imagenet_top1(
    net: &crate::model::efficientnet::EfficientNetLite,
    variant: crate::model::efficientnet::LiteVariant,
    photos: &[(std::path::PathBuf, i64)],
) -> anyhow::Result<(usize, Vec<i64>)> {
    use crate::data::{decode, DecodeLimits, Normalisation, Preprocess, ResizeMode};
    let pre = Preprocess {
        size: variant.native_size(),
        resize: ResizeMode::CenterCrop,
        normalisation: Normalisation::LITE,
        antialias: true,
    };
    let mut batch = Vec::new();
    for (path, _) in photos {
        let image = decode::decode(&std::fs::read(path)?, &DecodeLimits::default())?;
        batch.push(pre.apply(&image)?);
    }
    let logits = net.logits(&tch::Tensor::f_stack(&batch, 0)?)?;
    let predicted: Vec<i64> = Vec::try_from(logits.f_argmax(1, false)?.f_to_device(tch::Device::Cpu)?)?;
    let correct = photos.iter().zip(&predicted).filter(|((_, label), p)| label == *p).count();
    Ok((correct, predicted))
}

/// Top-1 of Lite0 on the foolbox ImageNet photos.
fn imagenet_check(
    device: tch::Device,
    precision: crate::model::encoder::Precision,
) -> anyhow::Result<String> {
    use crate::model::efficientnet::{EfficientNetLite, LiteVariant};
    let variant = LiteVariant::Lite0;
    let net = EfficientNetLite::load(variant, &variant.default_weights(), device, precision)?;
    let dir = crate::assets::foolbox_dir();
    let photos = crate::assets::imagenet_photos()
        .map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/fetch-assets.sh)", dir.display()))?;
    anyhow::ensure!(!photos.is_empty(), "no imagenet_* photos in {}", dir.display());
    let (correct, _) = imagenet_top1(&net, variant, &photos)?;
    Ok(format!("{correct}/{} top-1", photos.len()))
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
    let dev = args.device.unwrap_or(DeviceSpec::Auto).resolve()?;
    let precision = args.precision;
    if args.imagenet {
        println!(
            "imagenet check: {} on {} ({precision})",
            imagenet_check(dev, precision)?,
            device::describe(dev)
        );
    }
    if let Some(px) = args.encoder_rate {
        let rate = encoder_rate(dev, precision, px, args.batch_size)?;
        println!(
            "encoder rate: {rate:.1} images/s (Lite0, {px} px, batch {}, {precision}, {})",
            args.batch_size,
            device::describe(dev)
        );
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
