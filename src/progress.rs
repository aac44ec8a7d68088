//! Progress on long work: a bar (items/s, ETA, a message such as the loss) on a terminal,
//! a log line every few seconds otherwise (CI logs, pipes), nothing under `--quiet`.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    log_every: Duration,
    quiet: bool,
}

impl Progress {
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (tty && !quiet).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            label: label.into(),
            total,
            done: 0,
            started: now,
            last_log: now,
            log_every: Duration::from_secs(10),
            quiet,
        }
    }

    pub fn inc(&mut self, n: u64, message: Option<&str>) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            if let Some(m) = message {
                bar.set_message(m.to_string());
            }
        } else if !self.quiet && self.last_log.elapsed() >= self.log_every {
            self.last_log = Instant::now();
            let rate = self.rate();
            let eta = if rate > 0.0 { (self.total.saturating_sub(self.done)) as f64 / rate } else { 0.0 };
            eprintln!(
                "{}: {}/{} ({rate:.1}/s, ETA {eta:.0}s){}",
                self.label,
                self.done,
                self.total,
                message.map(|m| format!(" {m}")).unwrap_or_default()
            );
        }
    }

    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(self) -> Duration {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}
