//! `dlsr demo`: the whole daemon on one machine with nothing started by hand. An
//! in-process Kafka (librdkafka's mock cluster), a model (fitted on first use on
//! Fashion-MNIST), a stream of Fashion-MNIST (ID), MNIST (OOD) and a few corrupt
//! messages, the real daemon code with `/metrics` served, a live summary, the flagged
//! items, and a stop once every message has its verdict or dead letter.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;

use crate::config::{Config, Publish};
use crate::data::DataSet;
use crate::stream::daemon::{self, Control};
use crate::stream::publish::{item_bytes, Publisher};
use crate::telemetry::metrics::{score_buckets, Metrics};

pub struct DemoOptions {
    pub bundle: PathBuf,
    pub id_images: usize,
    pub ood_images: usize,
    pub metrics_listen: String,
    pub timeout: Duration,
    pub device: String,
    pub quiet: bool,
}

#[derive(Debug, Default)]
pub struct DemoReport {
    pub sent: usize,
    pub verdicts: usize,
    pub dead_letters: usize,
    /// Flagged counts by source set (fmnist, mnist, corrupt).
    pub flagged: BTreeMap<String, usize>,
    pub complete: bool,
    /// Window records the window audit published, and how many of them are shifted.
    pub windows: usize,
    pub shifted_windows: usize,
}

/// A valid PNG whose header claims `width` x `height` RGB pixels, with one tiny IDAT:
/// a decompression bomb in miniature.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Corrupt messages: each must end up as a dead letter with its code.
pub fn corrupt_messages() -> Vec<(&'static str, Vec<u8>)> {
    let mut png = Vec::new();
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9]));
    let _ = img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png);
    let truncated = png[..png.len() / 2].to_vec();
    let bomb = png_claiming(100_000, 100_000);
    vec![
        ("corrupt/empty", Vec::new()),
        ("corrupt/truncated.png", truncated),
        ("corrupt/text.jpg", b"this is not an image".to_vec()),
        ("corrupt/bomb.png", bomb),
    ]
}

fn ensure_bundle(opts: &DemoOptions) -> anyhow::Result<()> {
    if opts.bundle.is_file() {
        return Ok(());
    }
    if let Some(dir) = opts.bundle.parent() {
        std::fs::create_dir_all(dir)?;
    }
    println!("fitting the demo model on 5000 Fashion-MNIST images (once; ~1 minute)...");
    let device = opts.device.parse::<crate::device::DeviceSpec>()?.resolve()?;
    let encoder = crate::model::encoder::load(
        &crate::model::encoder::EncoderSpec::Lite(crate::model::efficientnet::LiteVariant::Lite0),
        None,
        device,
        crate::model::encoder::Precision::F32,
    )?;
    let pre = crate::data::Preprocess {
        size: crate::cli::DEFAULT_INPUT_SIZE,
        resize: crate::data::ResizeMode::Stretch,
        normalisation: crate::data::Normalisation::LITE,
        antialias: true,
    };
    let extractor = crate::model::features::FeatureExtractor::new(encoder, pre);
    let fit = crate::fit::FitOptions {
        data: crate::assets::fashion_mnist("train-images-idx3-ubyte.gz").to_string_lossy().into_owned(),
        limit: Some(5000),
        out: opts.bundle.clone(),
        encoder_source: crate::model::encoder::EncoderSpec::Lite(
            crate::model::efficientnet::LiteVariant::Lite0,
        ),
        width: Some(512),
        depth: 4,
        train: crate::model::train::TrainConfig { epochs: 20, ..Default::default() },
        holdout_fraction: 0.1,
        layer_norm: false,
        target_fpr: 0.05,
        scoring: Default::default(),
        default_score: crate::model::score::ScoreKind::Mfsim,
        encode: crate::encode::EncodeOptions {
            batch_size: 64,
            limits: Default::default(),
            quiet: opts.quiet,
        },
        cache: Some(crate::encode::cache_dir()),
        device,
    };
    crate::fit::fit(&extractor, &fit, crate::shutdown::interrupt_flag())?;
    Ok(())
}

fn scrape(addr: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The window records on the in-process broker: its one partition read by assignment
/// from the beginning to its end.
fn read_windows(brokers: &str) -> anyhow::Result<Vec<crate::audit::window::WindowRecord>> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "dlsr-demo-windows")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("dlsr-windows", 0, rdkafka::Offset::Beginning)?;
    reader.assign(&tpl)?;
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                if let Ok(w) = serde_json::from_slice(msg.payload().unwrap_or_default()) {
                    out.push(w);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    Ok(out)
}

pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoReport> {
    ensure_bundle(opts)?;
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("images", 3, 1)?;
    cluster.create_topic("dlsr-verdicts", 1, 1)?;
    cluster.create_topic("dlsr-dead-letters", 1, 1)?;
    cluster.create_topic("dlsr-windows", 1, 1)?;

    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.clone();
    cfg.kafka.group_id = "dlsr-demo".into();
    cfg.kafka.publish = Publish::All;
    cfg.kafka.commit_interval_ms = 500;
    cfg.model.bundle = opts.bundle.clone();
    cfg.model.device = opts.device.parse()?;
    cfg.metrics.listen = opts.metrics_listen.clone();
    cfg.log.level = "warn".into();
    // Windows of 100 items, so that the demo's 400 images make four of them.
    cfg.audit.window_items = 100;
    cfg.audit.min_items = 50;
    cfg.validate()?;
    let meta = crate::model::bundle::read_meta(&opts.bundle)?;
    let metrics = Arc::new(Metrics::new(score_buckets(&meta.calibration, &[])));
    let control = Control::default();
    crate::shutdown::forward_signals(control.shutdown.clone(), control.reload.clone());
    let daemon_thread = {
        let (cfg, control, metrics) = (cfg.clone(), control.clone(), metrics.clone());
        std::thread::spawn(move || daemon::run(cfg, None, control, metrics))
    };

    // The stream: ID and OOD images interleaved, corrupt messages among them.
    let started = Instant::now();
    let mut publisher = Publisher::new(&brokers, &[])?;
    let fm = DataSet::open(&crate::assets::fashion_mnist("t10k-images-idx3-ubyte.gz").to_string_lossy())?
        .with_limit(Some(opts.id_images));
    let mn = DataSet::open(&crate::assets::mnist_5k().to_string_lossy())?.with_limit(Some(opts.ood_images));
    let mut sent = 0;
    let corrupt = corrupt_messages();
    let total = fm.len() + mn.len() + corrupt.len();
    for i in 0..fm.len().max(mn.len()) {
        for set in [&fm, &mn] {
            if i < set.len() {
                let item = set.get(i)?;
                publisher.send("images", &item.id, &item_bytes(&item)?)?;
                sent += 1;
            }
        }
        if i % 50 == 25 {
            if let Some((id, bytes)) = corrupt.get(i / 50) {
                publisher.send("images", id, bytes)?;
                sent += 1;
            }
        }
    }
    for (id, bytes) in corrupt.iter().skip(fm.len().max(mn.len()).div_ceil(50)) {
        publisher.send("images", id, bytes)?;
        sent += 1;
    }
    let published = publisher.finish(started, 0)?;
    println!(
        "published {sent} messages ({} Fashion-MNIST, {} MNIST, {} corrupt) to the in-process broker {brokers}",
        fm.len(),
        mn.len(),
        corrupt.len()
    );
    // The daemon binds its listener after loading the model; wait for it (or its failure).
    let bound_by = Instant::now() + Duration::from_secs(60);
    let http = loop {
        if let Some(a) = control.http_addr.lock().ok().and_then(|a| *a) {
            break a.to_string();
        }
        if daemon_thread.is_finished() || Instant::now() > bound_by {
            break opts.metrics_listen.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("metrics: http://{http}/metrics  (also /healthz, /readyz)");
    debug_assert_eq!(published.sent as usize, total);

    // Read what the daemon produced.
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "dlsr-demo-reader")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    reader.subscribe(&["dlsr-verdicts", "dlsr-dead-letters"])?;
    let mut report = DemoReport { sent, ..Default::default() };
    let mut flagged_lines = Vec::new();
    let mut dead_lines = Vec::new();
    let mut last_print = Instant::now();
    while report.verdicts + report.dead_letters < sent && started.elapsed() < opts.timeout {
        if control.shutdown.load(Ordering::Relaxed) {
            break;
        }
        if let Some(Ok(msg)) = reader.poll(Duration::from_millis(100)) {
            let id = msg.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            let source = if id.starts_with("corrupt/") {
                "corrupt"
            } else if id.starts_with("mnist") {
                "mnist"
            } else {
                "fmnist"
            };
            if msg.topic() == "dlsr-dead-letters" {
                report.dead_letters += 1;
                // Dead letters carry the input's headers, whose keys may be any bytes.
                let headers = crate::kafka::headers::read(&msg);
                let code = crate::kafka::headers::find(&headers, "dlsr-error-code")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                dead_lines.push(format!("  {id:<32} {code}"));
            } else {
                report.verdicts += 1;
                let v: serde_json::Value =
                    serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or_default();
                if v["is_ood"] == true {
                    *report.flagged.entry(source.to_string()).or_default() += 1;
                    flagged_lines.push(format!(
                        "  {id:<32} {} {:+.4} (threshold {:+.4}, ID percentile {:.1})",
                        v["score_kind"].as_str().unwrap_or(""),
                        v["score"].as_f64().unwrap_or(f64::NAN),
                        v["threshold"].as_f64().unwrap_or(f64::NAN),
                        v["id_percentile"].as_f64().unwrap_or(f64::NAN)
                    ));
                }
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "[{:5.1}s] verdicts {:>4}  flagged {:>4}  dead letters {:>2}  of {sent} sent",
                started.elapsed().as_secs_f64(),
                report.verdicts,
                report.flagged.values().sum::<usize>(),
                report.dead_letters
            );
        }
    }
    report.complete = report.verdicts + report.dead_letters == sent;
    let metrics_text = scrape(&http).unwrap_or_default();
    control.shutdown.store(true, Ordering::Relaxed);
    let summary = daemon_thread.join().map_err(|_| anyhow::anyhow!("the daemon thread panicked"))??;
    drop(reader);

    let n_fm = fm.len().max(1) as f64;
    let n_mn = mn.len().max(1) as f64;
    println!("\nflagged (first 15 of {}):", flagged_lines.len());
    for l in flagged_lines.iter().take(15) {
        println!("{l}");
    }
    println!("dead letters:");
    for l in &dead_lines {
        println!("{l}");
    }
    println!(
        "\nflagged: {:.1}% of Fashion-MNIST (ID; calibrated rate {:.0}%), {:.1}% of MNIST (OOD)",
        100.0 * *report.flagged.get("fmnist").unwrap_or(&0) as f64 / n_fm,
        100.0 * meta.calibration.target_fpr,
        100.0 * *report.flagged.get("mnist").unwrap_or(&0) as f64 / n_mn
    );
    println!(
        "daemon: consumed {}, scored {}, dead-lettered {}, drained {}; {} in {:.1}s",
        summary.consumed,
        summary.verdicts,
        summary.dead_letters,
        summary.drained,
        if report.complete { "every message accounted for" } else { "MISSING OUTPUTS" },
        started.elapsed().as_secs_f64()
    );
    let excerpt: Vec<&str> = metrics_text
        .lines()
        .filter(|l| {
            l.starts_with("dlsr_verdicts_total")
                || l.starts_with("dlsr_dead_letters_total")
                || l.starts_with("dlsr_model_info")
        })
        .collect();
    println!("metrics excerpt:\n  {}", excerpt.join("\n  "));
    let windows = read_windows(&brokers)?;
    println!("\nwindow audit (windows of 100 items; `dlsr tail --audit` prints them from a broker):");
    for w in &windows {
        println!("  {}", w.line());
    }
    report.windows = windows.len();
    report.shifted_windows = windows.iter().filter(|w| w.shifted()).count();
    drop(cluster);
    Ok(report)
}
