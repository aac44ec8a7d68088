//! The window auditor's cost and the online detector's detection delay, as tables.
//! Run: `cargo bench --bench window_audit` (`scripts/benchmark.sh windows`).
//!
//! Cost: items through the auditor per second with 100 groups and windows of 1000 (each
//! item built and sent over a bounded channel to the auditor thread, as the daemon's
//! scorer does), so the share of the daemon's rate it would take is
//! `daemon rate / auditor rate` (the daemon's rate is in the README's table). Memory per
//! group: the open window's scores plus the group's state, counted from the sizes the
//! auditor keeps. Delays: items from a shift of every score by d ID standard deviations
//! to the detector's alarm, median and 90th percentile over 200 runs, beside the run length
//! between false alarms measured on fresh in-distribution scores.

use std::time::Instant;

use dlsr::audit::window::{calibrate_cusum, GroupBy, Item, Reference, WindowAuditor, WindowSettings};
use dlsr::model::score::{splitmix64, ScoreKind};
use dlsr::stream::window_stage::WindowFeedItem;

fn normal(state: &mut u64) -> f64 {
    let u1 = ((splitmix64(state) >> 11) as f64 + 1.0) / ((1u64 << 53) as f64 + 1.0);
    let u2 = (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn settings(window: usize, run_time: u64) -> WindowSettings {
    WindowSettings {
        window_items: window,
        window_max: Some(std::time::Duration::from_secs(600)),
        min_items: 100,
        alpha: 0.001,
        max_groups: 100,
        group_idle: std::time::Duration::from_secs(3600),
        expected_run_time_items: run_time,
        detector_shift: 0.5,
    }
}

/// One ungrouped item of `topic` at position `k` into the auditor.
fn observe(
    a: &mut WindowAuditor,
    topic: &str,
    k: u64,
    score: f64,
    threshold: f64,
) -> Vec<dlsr::audit::window::WindowRecord> {
    a.observe(&Item {
        topic,
        group: None,
        partition: 0,
        offset: k as i64,
        timestamp: None,
        id: "x",
        kind: ScoreKind::Mfsim,
        score,
        threshold,
        flagged: score > threshold,
        layer_cos: &[],
    })
}

fn main() {
    let mut state = 7u64;
    // Held-out scores shaped like real ones (log-normal), 2000 items as a default fit keeps.
    let heldout: Vec<f64> = (0..2000).map(|_| (0.4 * normal(&mut state)).exp()).collect();
    let reference = Reference::new(ScoreKind::Mfsim, heldout.clone(), true, Vec::new());
    let threshold = reference.sorted[(0.95 * reference.len() as f64) as usize];
    let sd = reference.scale;

    // --- cost ---------------------------------------------------------------------------
    let groups: Vec<String> = (0..100).map(|g| format!("cam-{g}")).collect();
    let n = 1_000_000usize;
    let scores: Vec<f64> = (0..n).map(|_| (0.4 * normal(&mut state)).exp()).collect();
    let mut auditor = WindowAuditor::new(
        settings(1000, 100_000),
        GroupBy::Header("camera_id".into()),
        vec![reference.clone()],
        "b".into(),
    )
    .unwrap();
    auditor.calibrate(ScoreKind::Mfsim);
    let (tx, rx) = std::sync::mpsc::sync_channel::<WindowFeedItem>(4096);
    let started = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut windows = 0usize;
        while let Ok(item) = rx.recv() {
            windows += auditor.observe(&item.as_item()).len();
        }
        windows + auditor.close_all("end").len()
    });
    for (i, &score) in scores.iter().enumerate() {
        let item = WindowFeedItem {
            topic: "images".into(),
            group: Some(groups[i % groups.len()].clone().into_bytes()),
            partition: (i % 3) as i32,
            offset: i as i64,
            timestamp: Some(i as i64),
            id: format!("item-{i}"),
            kind: ScoreKind::Mfsim,
            score,
            threshold,
            flagged: score > threshold,
            layer_cos: vec![0.9; 5],
        };
        tx.send(item).unwrap();
    }
    drop(tx);
    let windows = consumer.join().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let rate = n as f64 / seconds;
    // Per group: the open window's scores (8 bytes each) plus the top items, bounds and
    // detector (a few hundred bytes).
    let per_group_kb = (1000.0 * 8.0 + 600.0) / 1024.0;

    println!("| window auditor (100 groups, windows of 1000) | value |");
    println!("|---|---|");
    println!("| items through the auditor (build, send, observe, tests at close) | {rate:.0} items/s |");
    println!("| windows judged | {windows} in {seconds:.2} s |");
    println!(
        "| share of a daemon scoring 535 msg/s (README, 64 px, AMD EPYC 2 cores) | {:.2}% |",
        100.0 * 535.0 / rate
    );
    println!("| memory per group (open window of 1000 scores + state) | about {per_group_kb:.1} KiB |");

    // --- detection delay -----------------------------------------------------------------
    println!();
    println!(
        "| expected run time (items) | run time on fresh ID data (10 held-out draws, 40x as many items) | shift (ID sd) | delay median | delay p90 |"
    );
    println!("|---|---|---|---|---|");
    for run_time in [10_000u64, 100_000] {
        let started = Instant::now();
        let design = calibrate_cusum(&reference, 0.5, run_time);
        let calibration_s = started.elapsed().as_secs_f64();
        // One auditor: each run is a topic of its own, so it starts with a fresh detector.
        let mut a =
            WindowAuditor::new(settings(1000, run_time), GroupBy::None, vec![reference.clone()], "d".into())
                .unwrap();
        a.calibrate(ScoreKind::Mfsim);
        // False alarms on fresh in-distribution scores, each against a held-out sample
        // of its own (ten draws of 2000, 4 x the run time each): what a daemon sees.
        let steps = 40 * run_time;
        let mut alarms = 0u64;
        for draw in 0..10 {
            let own: Vec<f64> = (0..2000).map(|_| (0.4 * normal(&mut state)).exp()).collect();
            let mut fresh = WindowAuditor::new(
                settings(1000, run_time),
                GroupBy::None,
                vec![Reference::new(ScoreKind::Mfsim, own, true, Vec::new())],
                "f".into(),
            )
            .unwrap();
            let topic = format!("fresh-{draw}");
            for k in 0..steps / 10 {
                let score = (0.4 * normal(&mut state)).exp();
                let closed = observe(&mut fresh, &topic, k, score, threshold);
                alarms += closed.iter().map(|w| w.tests.cusum.alarms).sum::<u64>();
            }
            alarms += fresh.close_all("end").iter().map(|w| w.tests.cusum.alarms).sum::<u64>();
        }
        let fresh_run = steps as f64 / alarms.max(1) as f64;
        for shift in [0.25, 0.5, 1.0, 2.0] {
            let mut delays = Vec::new();
            for run in 0..200u64 {
                let topic = format!("{shift}-{run}");
                let mut s = 0xD1_u64 ^ run;
                let mut k = 0u64;
                loop {
                    k += 1;
                    let score = heldout[(splitmix64(&mut s) % heldout.len() as u64) as usize] + shift * sd;
                    observe(&mut a, &topic, k, score, threshold);
                    if a.in_alarm(&topic, "all") || k > 20 * run_time {
                        break;
                    }
                }
                delays.push(k);
            }
            delays.sort_unstable();
            println!(
                "| {run_time} (h = {:.2}, calibrated in {calibration_s:.1} s) | {fresh_run:.0} ({alarms} alarms) | {shift} | {} | {} |",
                design.h,
                delays[delays.len() / 2],
                delays[delays.len() * 9 / 10]
            );
        }
    }
}
