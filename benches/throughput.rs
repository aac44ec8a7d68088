//! Scoring throughput on this machine, as a table: the encoder alone (preprocessed
//! tensors in), the LFDN scoring alone (feature vectors in, t0 = 3 DDIM calls, with and
//! without the first-epoch model for LR), and the two together. Batch 64, f32.
//! Run: `cargo bench --bench throughput` (add `-- cuda` to run on the GPU;
//! `-- encoder PX BATCH` measures only the encoder and prints one JSON line).

use std::time::Instant;

use dlsr::model::efficientnet::{EfficientNetLite, LiteVariant};
use dlsr::model::encoder::{Encoder, Precision};
use dlsr::model::features::{pool_and_standardise, LayerOffsets};
use dlsr::model::lfdn::Preset;
use dlsr::model::schedule::Schedule;
use dlsr::model::score::{ScoreSettings, Scorer};
use dlsr::model::train::new_lfdn;
use tch::{Device, Kind, Tensor};

fn rate(batch: i64, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed().as_secs_f64() < 3.0 || n < 3 {
        f();
        n += 1;
    }
    (n as i64 * batch) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    dlsr::device::init_backends();
    if let Ok(n) = std::env::var("BENCH_SET_THREADS") {
        tch::set_num_threads(n.parse().unwrap());
    }
    let args: Vec<String> = std::env::args().collect();
    let device = if args.iter().any(|a| a == "cuda") { Device::Cuda(0) } else { Device::Cpu };
    let weights = LiteVariant::Lite0.default_weights();
    let encoder = EfficientNetLite::load(LiteVariant::Lite0, &weights, device, Precision::F32)
        .expect("Lite0 weights (run scripts/fetch-assets.sh)");
    // `encoder PX BATCH`: only the encoder, one JSON line (for scripts/benchmark.sh peer).
    if let Some(i) = args.iter().position(|a| a == "encoder") {
        let px: i64 = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(64);
        let batch: i64 = args.get(i + 2).and_then(|v| v.parse().ok()).unwrap_or(64);
        let images = Tensor::randn([batch, 3, px, px], (Kind::Float, device));
        let r = rate(batch, || {
            let maps = encoder.feature_maps(&images).unwrap();
            let _ = pool_and_standardise("lite0", &maps).unwrap();
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
        });
        println!("{{\"items_per_s\": {r:.1}}}");
        return;
    }
    let batch = 64;
    let offsets = LayerOffsets(vec![0, 16, 40, 80, 192, 512]);
    let schedule = Schedule::dlsr();
    let settings = ScoreSettings::default();
    let (_vs, small) = new_lfdn(Preset::Small.config(512), device);
    let (_vs2, first) = new_lfdn(Preset::Small.config(512), device);
    let (_vs3, paper) = new_lfdn(Preset::Paper.config(512), device);
    let seeds: Vec<u64> = (0..batch as u64).collect();
    let features = Tensor::randn([batch, 512], (Kind::Float, Device::Cpu));
    let sync = || {
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
    };

    println!(
        "device: {}, threads: {}, batch {batch}",
        dlsr::device::describe(device),
        tch::get_num_threads()
    );
    println!("| stage | input px | images/s |");
    println!("|---|---|---|");
    let mut enc_rate = std::collections::BTreeMap::new();
    for px in [32i64, 64, 224] {
        let images = Tensor::randn([batch, 3, px, px], (Kind::Float, device));
        let r = rate(batch, || {
            let maps = encoder.feature_maps(&images).unwrap();
            let _ = pool_and_standardise("lite0", &maps).unwrap();
            sync();
        });
        enc_rate.insert(px, r);
        println!("| encoder (Lite0) + pooling | {px} | {r:.0} |");
        let unfolded = rate(batch, || {
            let maps = encoder.feature_maps_unfolded(&images).unwrap();
            let _ = pool_and_standardise("lite0", &maps).unwrap();
            sync();
        });
        println!("| the same, BatchNorm not folded, NCHW (before issue #10) | {px} | {unfolded:.0} |");
        if !device.is_cuda() {
            let workers = tch::get_num_threads().max(1);
            let per_worker: f64 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..workers)
                    .map(|_| {
                        s.spawn(move || {
                            tch::set_num_threads(1);
                            let enc = EfficientNetLite::load(
                                LiteVariant::Lite0,
                                &LiteVariant::Lite0.default_weights(),
                                device,
                                Precision::F32,
                            )
                            .unwrap();
                            let images = Tensor::randn([batch, 3, px, px], (Kind::Float, device));
                            rate(batch, || {
                                let maps = enc.feature_maps(&images).unwrap();
                                let _ = pool_and_standardise("lite0", &maps).unwrap();
                            })
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            tch::set_num_threads(workers);
            println!("| encoder, {workers} workers of 1 thread | {px} | {per_worker:.0} |");
        }
    }
    let lfdn_rate = |model, first_model| {
        let scorer = Scorer {
            final_model: model,
            first_epoch_model: first_model,
            schedule: &schedule,
            settings: &settings,
            offsets: &offsets,
            device,
        };
        rate(batch, || {
            scorer.score(&features, &seeds).unwrap();
            sync();
        })
    };
    let small_rate = lfdn_rate(&small, None);
    let small_lr_rate = lfdn_rate(&small, Some(&first));
    let paper_rate = lfdn_rate(&paper, None);
    println!("| LFDN small (W 512, N 4), MSE + MFsim | - | {small_rate:.0} |");
    println!("| LFDN small + first-epoch model (LR too) | - | {small_lr_rate:.0} |");
    println!("| LFDN paper (W 1024, N 16), MSE + MFsim | - | {paper_rate:.0} |");
    for px in [64i64, 224] {
        let e = enc_rate[&px];
        let both = 1.0 / (1.0 / e + 1.0 / small_lr_rate);
        println!("| encoder + LFDN small with LR (tensors in) | {px} | {both:.0} |");
    }
}
