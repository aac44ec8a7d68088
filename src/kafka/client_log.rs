//! librdkafka's own log lines and error events, said once per distinct problem.
//!
//! Left to itself, librdkafka reports an unreachable broker on every reconnect attempt
//! (several a second), and each attempt twice: a `FAIL` log line and a global error event
//! with the same text. Issue #13 measured 130 lines in 15 s from `publish` and 270 in 10 s
//! from `serve`. Every client context in dlsr routes both callbacks here: the text is
//! reduced to its problem (librdkafka's "(after 0ms in state CONNECT, 3 identical error(s)
//! suppressed)" tail is dropped), and each problem is logged at most once per
//! [`REPEAT_INTERVAL`]; a repeat says how many were held back meanwhile.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// How often one problem may be logged again while it persists.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Distinct problems remembered at most (a client with ever-changing texts, e.g. one
/// per partition, must not grow memory): past this the memory starts afresh.
const MAX_REMEMBERED: usize = 512;

#[derive(Debug, Default)]
pub struct LogGate {
    seen: HashMap<String, (Instant, u64)>,
}

impl LogGate {
    /// Whether a line about `problem` may be logged at `now`: `Some(n)` with the number of
    /// lines about it held back since it was last logged, or `None` to hold this one back.
    pub fn admit(&mut self, problem: &str, now: Instant, interval: Duration) -> Option<u64> {
        if self.seen.len() >= MAX_REMEMBERED && !self.seen.contains_key(problem) {
            self.seen.clear();
        }
        match self.seen.get_mut(problem) {
            Some((last, held)) if now.duration_since(*last) < interval => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let n = *held;
                *last = now;
                *held = 0;
                Some(n)
            }
            None => {
                // librdkafka often says one thing twice in different words: "host:
                // SSL handshake failed: error:0A000086:...: certificate verify failed: ..."
                // and then "host: error:0A000086:...: certificate verify failed". A line
                // whose text after its "host: " prefix is already inside a recent line
                // adds nothing.
                let echo = problem
                    .split_once(": ")
                    .map(|(_, rest)| rest)
                    .filter(|rest| rest.len() >= 16)
                    .is_some_and(|rest| {
                        self.seen
                            .iter()
                            .any(|(p, (t, _))| now.duration_since(*t) < interval && p.contains(rest))
                    });
                if echo {
                    return None;
                }
                self.seen.insert(problem.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

static GATE: LazyLock<Mutex<LogGate>> = LazyLock::new(Default::default);

/// librdkafka's text without the attempt-specific tail it appends to repeated errors.
pub fn problem_of(text: &str) -> &str {
    let mut text = text.trim();
    // The log line's thread tag; the error event with the same text has none.
    if let Some(rest) = text.strip_prefix("[thrd:").and_then(|t| t.split_once("]: ")) {
        text = rest.1;
    }
    match text.find(" (after ") {
        Some(i) => &text[..i],
        None => text,
    }
}

fn held_note(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like this in the last {} s)", REPEAT_INTERVAL.as_secs())
    }
}

fn admit(problem: &str) -> Option<u64> {
    let mut gate = GATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    gate.admit(problem, Instant::now(), REPEAT_INTERVAL)
}

/// For `ClientContext::log`: `role` names the client ("consumer", "producer", ...).
pub fn log(role: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    let problem = problem_of(message);
    // Debug lines are only seen when asked for; they are not gated.
    if matches!(level, RDKafkaLogLevel::Debug) {
        tracing::debug!(target: "librdkafka", "kafka {role}: {facility} {message}");
        return;
    }
    let Some(held) = admit(problem) else { return };
    let note = held_note(held);
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", "kafka {role}: {problem}{note}")
        }
        // librdkafka's "errors" here are the client's own retried attempts (a refused
        // connection, a timed-out request): a warning, the fault handling is ours.
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "kafka {role}: {problem}{note}")
        }
        _ => tracing::info!(target: "librdkafka", "kafka {role}: {problem}{note}"),
    }
}

/// For `ClientContext::error`: the same gate as [`log`], so the error event that repeats
/// a `FAIL` line is not printed a second time.
pub fn error(role: &str, error: &KafkaError, reason: &str) {
    let problem = problem_of(reason);
    if let Some(held) = admit(problem) {
        let code = error.rdkafka_error_code().map_or_else(|| error.to_string(), |c| format!("{c:?}"));
        tracing::warn!(target: "librdkafka", "kafka {role}: {problem} [{code}]{}", held_note(held));
    }
}

/// The client context of dlsr's plain clients (readers, admin, `tail`): librdkafka's logs
/// and errors through the gate; nothing else. The string names the client in log lines.
///
/// A reader that asks for partition ends (`enable.partition.eof`) also gets each one as
/// a global error event: that is how it knows it is done, not a fault, so it is not logged.
pub struct GatedContext(pub &'static str);

impl rdkafka::ClientContext for GatedContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            self::error(self.0, &error, reason);
        }
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self::log(self.0, level, facility, message);
    }
}

impl rdkafka::consumer::ConsumerContext for GatedContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_that_repeats_part_of_a_recent_one_is_an_echo() {
        let mut gate = LogGate::default();
        let now = Instant::now();
        let first = "ssl://localhost:9/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified";
        let echo = "ssl://localhost:9/bootstrap: error:0A000086:SSL routines::certificate verify failed";
        assert_eq!(gate.admit(first, now, REPEAT_INTERVAL), Some(0));
        assert_eq!(gate.admit(echo, now, REPEAT_INTERVAL), None);
        assert_eq!(gate.admit("1/1 brokers are down", now, REPEAT_INTERVAL), Some(0), "a different problem");
    }

    #[test]
    fn attempt_tails_are_dropped_so_repeats_and_echoes_match() {
        let first = "127.0.0.1:19999/bootstrap: Connect to ipv4#127.0.0.1:19999 failed: Connection refused (after 0ms in state CONNECT)";
        let later = "127.0.0.1:19999/bootstrap: Connect to ipv4#127.0.0.1:19999 failed: Connection refused (after 1ms in state CONNECT, 1 identical error(s) suppressed)";
        assert_eq!(problem_of(first), problem_of(later));
        assert!(problem_of(first).ends_with("Connection refused"));
        let log_line = format!("[thrd:127.0.0.1:19999/bootstrap]: {first}");
        assert_eq!(problem_of(&log_line), problem_of(first));
        assert_eq!(problem_of("1/1 brokers are down"), "1/1 brokers are down");
    }

    #[test]
    fn one_line_per_problem_per_interval_and_the_repeat_counts_what_was_held() {
        let mut gate = LogGate::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        assert_eq!(gate.admit("a", t0, every), Some(0));
        // 8 attempts a second for 10 s: all held back.
        let held = (1..80).filter(|i| gate.admit("a", t0 + Duration::from_millis(125 * i), every).is_some());
        assert_eq!(held.count(), 0);
        // Another problem is not held back by the first.
        assert_eq!(gate.admit("b", t0 + Duration::from_secs(1), every), Some(0));
        assert_eq!(gate.admit("a", t0 + Duration::from_secs(31), every), Some(79));
        assert_eq!(gate.admit("a", t0 + Duration::from_secs(32), every), None);
    }
}
