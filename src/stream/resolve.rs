//! The resolve stage, between the consumer and the decode workers: each message's
//! envelope is unpacked (its format per topic) and a reference is fetched, off the
//! consumer's thread, up to `input.fetch_concurrency` at once on a small I/O runtime.
//!
//! Nothing is lost on the way: a message that cannot be resolved for a reason of its own
//! (a bad envelope, a missing object, a host not allowed) is dead-lettered with its code
//! and the original value; one whose store cannot be reached waits with the store
//! ([`FetchHealth`] makes that loud: `/readyz` 503 with the reason, a gauge, errors
//! counted) and is scored when the store answers. Fetched bytes count against the
//! in-flight byte budget, so the consumer pauses rather than buffering a store's worth.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::budget::PayloadBytes;
use super::consumer::Work;
use super::producer::Output;
use crate::config::InputConfig;
use crate::data::chain::{self, InputError};
use crate::data::envelope::EnvelopeSpec;
use crate::data::reference::{FetchObserver, Fetcher, Persistence};
use crate::telemetry::metrics::Metrics;

/// Stores that cannot be reached right now, for `/readyz` and the log.
#[derive(Default)]
pub struct FetchHealth {
    down: Mutex<HashMap<String, Outage>>,
}

struct Outage {
    since: Instant,
    last_seen: Instant,
    reason: String,
    logged: Option<Instant>,
}

/// An outage not confirmed for this long is taken as over (its fetches may have been
/// abandoned at a rebalance, so no success will clear it).
const OUTAGE_STALE: Duration = Duration::from_secs(30);

impl FetchHealth {
    fn unreachable(&self, store: &str, reason: &str) {
        let Ok(mut down) = self.down.lock() else { return };
        let now = Instant::now();
        let outage = down.entry(store.to_string()).or_insert_with(|| Outage {
            since: now,
            last_seen: now,
            reason: String::new(),
            logged: None,
        });
        outage.last_seen = now;
        outage.reason = reason.to_string();
        if outage.logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            outage.logged = Some(now);
            tracing::warn!(
                store,
                "object store cannot be reached for {:.0?}; its references wait and are retried: {reason}",
                outage.since.elapsed()
            );
        }
    }

    fn reachable(&self, store: &str) {
        let Ok(mut down) = self.down.lock() else { return };
        if let Some(outage) = down.remove(store) {
            tracing::info!(store, "object store answers again after {:.0?}", outage.since.elapsed());
        }
    }

    /// Stores down now, and why the daemon is not ready because of them.
    pub fn describe(&self) -> (usize, Option<String>) {
        let Ok(mut down) = self.down.lock() else { return (0, None) };
        down.retain(|_, o| o.last_seen.elapsed() < OUTAGE_STALE);
        let worst = down.iter().min_by_key(|(_, o)| o.since);
        let text = worst.map(|(store, o)| {
            let others =
                if down.len() > 1 { format!(" (and {} more)", down.len() - 1) } else { String::new() };
            format!(
                "object store {store} cannot be reached for {:.0?}{others}: {}; its references are retried",
                o.since.elapsed(),
                o.reason
            )
        });
        (down.len(), text)
    }
}

/// Metrics and readiness for the fetcher.
struct Observer {
    metrics: Arc<Metrics>,
    health: Arc<FetchHealth>,
}

impl FetchObserver for Observer {
    fn attempt_failed(&self, scheme: &'static str, code: &'static str) {
        self.metrics.fetch_errors.with_label_values(&[scheme, code]).inc();
    }
    fn unreachable(&self, store: &str, reason: &str) {
        self.health.unreachable(store, reason);
    }
    fn reachable(&self, store: &str) {
        self.health.reachable(store);
    }
    fn fetched(&self, scheme: &'static str, bytes: u64, seconds: f64) {
        self.metrics.fetch_bytes.with_label_values(&[scheme]).inc_by(bytes);
        self.metrics.fetch_seconds.with_label_values(&[scheme]).observe(seconds);
    }
}

/// Everything the stage needs.
pub struct ResolveStage {
    pub input: InputConfig,
    /// Where events carry the window audit's source (`audit.group_by = "json:..."`; "" for
    /// none): read while the envelope is parsed, not again on the scorer's thread.
    pub group_pointer: String,
    pub limits: crate::data::DecodeLimits,
    pub output: Arc<Output>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<FetchHealth>,
    pub payloads: Arc<PayloadBytes>,
}

impl ResolveStage {
    /// Resolves until `rx` closes, then waits for the fetches in flight.
    pub fn run(self, rx: Receiver<Work>, tx: SyncSender<Work>) -> Result<(), String> {
        let runtime = chain::io_runtime().map_err(|e| format!("cannot start the fetch runtime: {e}"))?;
        let concurrency = self.input.fetch_concurrency.max(1);
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let fetcher =
            Arc::new(Fetcher::new(self.input.fetch_policy(&self.limits, Persistence::UntilReachable)));
        let observer = Arc::new(Observer { metrics: self.metrics.clone(), health: self.health.clone() });
        let mut specs: BTreeMap<String, EnvelopeSpec> = BTreeMap::new();
        for mut work in rx {
            if work.skipped.is_some() {
                if tx.send(work).is_err() {
                    break;
                }
                continue;
            }
            let topic = &work.record.source.topic;
            let spec = match specs.get(topic) {
                Some(s) => s,
                None => specs.entry(topic.clone()).or_insert_with(|| EnvelopeSpec {
                    group_pointer: self.group_pointer.clone(),
                    ..self.input.envelope_for(topic)
                }),
            };
            let unpacked = match chain::unpack(&work.record.value, spec) {
                Ok(u) => u,
                Err(e) => {
                    self.output.dead_letter(work, e.code(), &e.to_string());
                    continue;
                }
            };
            work.resolved.id = unpacked.id;
            work.resolved.input = unpacked.input;
            work.resolved.group = unpacked.group;
            work.resolved.uri = unpacked.uri;
            if let Some(image) = unpacked.image {
                work.resolved.set_image(image, &self.payloads);
            }
            let Some(uri) = work.resolved.uri.clone() else {
                if tx.send(work).is_err() {
                    break;
                }
                continue;
            };
            let Ok(permit) = runtime.block_on(permits.clone().acquire_owned()) else { break };
            let (fetcher, observer, tx) = (fetcher.clone(), observer.clone(), tx.clone());
            let (output, metrics, payloads) =
                (self.output.clone(), self.metrics.clone(), self.payloads.clone());
            metrics.fetches_in_flight.inc();
            runtime.spawn(async move {
                let fetched = chain::fetch(&uri, &fetcher, observer.as_ref()).await;
                metrics.fetches_in_flight.dec();
                drop(permit);
                match fetched {
                    Ok(image) => {
                        work.resolved.set_image(image, &payloads);
                        // The decode channel is bounded: wait on it without stalling the runtime.
                        let _ = tokio::task::block_in_place(|| tx.send(work));
                    }
                    Err(e) => dead_letter(&output, work, &e),
                }
            });
        }
        // Wait for the fetches in flight (an outage keeps them waiting: the daemon's drain
        // deadline decides how long that may take, this thread is then left behind).
        let _ = runtime.block_on(permits.acquire_many(concurrency as u32));
        runtime.shutdown_timeout(Duration::from_millis(100));
        Ok(())
    }
}

fn dead_letter(output: &Output, work: Work, error: &InputError) {
    output.dead_letter(work, error.code(), &error.to_string());
}
