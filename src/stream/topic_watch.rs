//! Watches that every input the daemon subscribes to exists: a topic name that the
//! brokers do not know (a typo, a topic not created yet) or a pattern (`^img.*`) that
//! matches no topic is an input fault like an unreadable batch, not "ready and idle":
//! `dlsr_input_blocked{topic,partition="-"}`, `/readyz` 503 naming it, a log line a
//! minute. Consuming starts by itself once the topic appears (librdkafka's subscription
//! picks it up at its next metadata refresh); the fault clears at the watcher's next look.
//!
//! It runs on its own thread with its own metadata client, so the consumer thread never
//! waits for the brokers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use super::input::InputFaults;
use crate::telemetry::metrics::Metrics;

/// How often the brokers' topic list is read.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// An input as configured: a topic name, or a pattern (librdkafka: a leading `^`).
#[derive(Debug, Clone)]
pub enum InputSpec {
    Topic(String),
    Pattern { text: String, regex: regex::Regex },
}

impl InputSpec {
    /// `None`: a pattern that is not a valid regular expression (with the reason).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('^') {
            let regex = regex::Regex::new(text).map_err(|e| e.to_string())?;
            Ok(Self::Pattern { text: text.to_string(), regex })
        } else {
            Ok(Self::Topic(text.to_string()))
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Topic(t) => t == topic,
            Self::Pattern { regex, .. } => regex.is_match(topic),
        }
    }
}

/// The inputs missing from `topics` (the brokers' list), with the fault code for each.
pub fn missing<'a>(
    inputs: &'a [InputSpec],
    topics: &[String],
    excluded: &[String],
) -> Vec<(&'a str, &'static str)> {
    inputs
        .iter()
        .filter(|spec| !topics.iter().any(|t| !excluded.contains(t) && spec.matches(t)))
        .map(|spec| match spec {
            InputSpec::Topic(t) => (t.as_str(), "topic_not_found"),
            InputSpec::Pattern { text, .. } => (text.as_str(), "pattern_matches_nothing"),
        })
        .collect()
}

/// Starts the watcher thread; it stops when `stop` is set.
pub fn spawn(
    config: ClientConfig,
    inputs: Vec<InputSpec>,
    excluded: Vec<String>,
    faults: Arc<Mutex<InputFaults>>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("dlsr-topic-watch".into()).spawn(move || {
        let client: BaseConsumer = match config.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("topic watcher: cannot create its client ({e}); missing topics are not reported");
                return;
            }
        };
        let mut reported: Vec<(String, &'static str)> = Vec::new();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            next = Instant::now() + WATCH_INTERVAL;
            // Brokers that do not answer are the consumer's business (broker_up).
            let Ok(md) = client.fetch_metadata(None, Duration::from_secs(5)) else { continue };
            let topics: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).collect();
            let now_missing: Vec<(String, &'static str)> =
                missing(&inputs, &topics, &excluded).into_iter().map(|(t, c)| (t.to_string(), c)).collect();
            let Ok(mut f) = faults.lock() else { return };
            for (topic, code) in &reported {
                if !now_missing.iter().any(|(t, _)| t == topic) {
                    f.clear_topic(topic);
                    metrics.set_input_blocked(topic, None, code, false);
                    tracing::info!(%topic, "input topic found: consuming starts");
                }
            }
            for (topic, code) in &now_missing {
                let why = match *code {
                    "topic_not_found" => "the brokers have no such topic (a typo, or not created yet); consuming \
                                          starts by itself once it exists",
                    _ => "the pattern matches no topic but the daemon's own outputs; consuming starts by itself \
                          once one exists",
                };
                f.report((topic.clone(), -1), code, -1, why);
                metrics.set_input_blocked(topic, None, code, true);
            }
            reported = now_missing;
        }
        drop(client);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_topic_and_a_pattern_matching_only_outputs_are_reported() {
        let inputs = vec![
            InputSpec::parse("images").unwrap(),
            InputSpec::parse("imgaes").unwrap(),
            InputSpec::parse("^cam-.*").unwrap(),
            InputSpec::parse("^img-.*").unwrap(),
        ];
        let topics: Vec<String> = ["images", "img-verdicts", "cam-7"].map(String::from).to_vec();
        let excluded = vec!["img-verdicts".to_string()];
        assert_eq!(
            missing(&inputs, &topics, &excluded),
            [("imgaes", "topic_not_found"), ("^img-.*", "pattern_matches_nothing")]
        );
        assert!(InputSpec::parse("^img(").is_err());
    }
}
