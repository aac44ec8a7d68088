//! Reading the daemon's output topics back (`dlsr tail`): verdicts and dead letters as one
//! line a person can read, or as JSON.
//!
//! Topics are read by explicit assignment, like `audit --from-topic`: no consumer group
//! joins and nothing is committed, so tailing never moves anyone's offsets. Each topic
//! gets its own consumer, because librdkafka reports a partition's end by partition
//! number alone, and "caught up" must be known per topic and partition.
//!
//! A record is recognised by what it carries, not by the topic it came from: a
//! `dlsr-error-code` header makes a dead letter, a JSON value with the verdict fields a
//! verdict, anything else is shown as a record dlsr did not write (with its size). Keys,
//! ids and error texts are printed with control characters escaped, since a topic can
//! carry any bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::json;

use crate::kafka::client_log::GatedContext;
use crate::kafka::headers::{self, Header};
use crate::kafka::message::{item_id, rfc3339, Source};
use crate::kafka::topics::{self, TopicError};

/// Where reading starts in every partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TailStart {
    Beginning,
    End,
    /// The first record at or after this time, milliseconds since the Unix epoch.
    Time(i64),
}

pub struct TailOptions {
    /// A connection (brokers, security); reader settings are added.
    pub connection: ClientConfig,
    /// For messages.
    pub brokers: String,
    pub topics: Vec<String>,
    pub from: TailStart,
    /// Keep reading new records until stopped; otherwise stop once caught up.
    pub follow: bool,
    /// How long the brokers may stay silent (at the start, and before catching up).
    pub timeout: Duration,
}

pub use crate::kafka::message::Record;

/// The fields of a verdict a reader needs (`docs/verdict.schema.json` has them all).
#[derive(Debug, Clone, Deserialize)]
pub struct VerdictView {
    pub id: String,
    pub source: SourceView,
    pub score: f64,
    pub score_kind: String,
    pub threshold: f64,
    pub is_ood: bool,
    pub id_percentile: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SourceView {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone)]
pub struct DeadLetterView {
    pub code: String,
    pub error: String,
    /// The input message's coordinates, when the headers carry them.
    pub source: Option<Source>,
    /// The original value's length when the value was cut to fit.
    pub original_length: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Verdict(VerdictView),
    DeadLetter(DeadLetterView),
    /// A window audit record (`audit.summary_topic`, header `dlsr-record: window`).
    Window(Box<crate::audit::window::WindowRecord>),
    /// Not written by dlsr (or damaged): why it is not a verdict.
    Other(String),
}

fn header_text(headers: &[Header], key: &str) -> Option<String> {
    headers::find(headers, key).map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn classify(record: &Record) -> Kind {
    if let Some(code) = header_text(&record.headers, "dlsr-error-code") {
        let source = match (
            header_text(&record.headers, "dlsr-source-topic"),
            header_text(&record.headers, "dlsr-source-partition").and_then(|p| p.parse().ok()),
            header_text(&record.headers, "dlsr-source-offset").and_then(|o| o.parse().ok()),
        ) {
            (Some(topic), Some(partition), Some(offset)) => {
                Some(Source { topic, partition, offset, timestamp: None })
            }
            _ => None,
        };
        return Kind::DeadLetter(DeadLetterView {
            code,
            error: header_text(&record.headers, "dlsr-error").unwrap_or_default(),
            source,
            original_length: header_text(&record.headers, "dlsr-original-length"),
        });
    }
    if header_text(&record.headers, "dlsr-record").as_deref() == Some("window") {
        return match serde_json::from_slice::<crate::audit::window::WindowRecord>(&record.value) {
            Ok(w) => Kind::Window(Box::new(w)),
            Err(e) => Kind::Other(format!("marked as a window record, but not one: {e}")),
        };
    }
    match serde_json::from_slice::<VerdictView>(&record.value) {
        Ok(v) => Kind::Verdict(v),
        Err(e) if record.value.first() == Some(&b'{') => Kind::Other(format!("JSON, but not a verdict: {e}")),
        Err(_) => Kind::Other("not a dlsr verdict or dead letter".into()),
    }
}

/// Text with control characters (newlines, escapes, NULs) and Unicode's invisible
/// formatting characters shown as escapes, so one record stays one line, cannot drive
/// the terminal, and cannot reorder what a person reads: bidirectional overrides and
/// isolates (U+202A..U+202E, U+2066..U+2069, the "Trojan Source" characters), marks,
/// zero-width characters and the BOM.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_invisible_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{061C}' | '\u{FEFF}')
}

/// The record's key as an item id: UTF-8 text, or `topic/partition/offset` of `source`.
fn id_of(key: Option<&[u8]>, source: &Source) -> String {
    printable(&item_id(key, source))
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// One line per record: time, verdict (OOD, ID, DEAD, ?), id, and the reason.
pub fn human_line(record: &Record, kind: &Kind, colour: bool) -> String {
    let paint = |code: &'static str, text: &str| {
        if colour {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    };
    let time = record.source.timestamp.map_or_else(|| "-".repeat(24), rfc3339);
    let here = Source {
        topic: record.source.topic.clone(),
        partition: record.source.partition,
        offset: record.source.offset,
        timestamp: None,
    };
    let mut line = format!("{} ", paint(DIM, &time));
    match kind {
        Kind::Verdict(v) => {
            let (label, relation) =
                if v.is_ood { (paint(RED, "OOD "), ">") } else { ("ID  ".to_string(), "<=") };
            let _ = write!(
                line,
                "{label} {}  {} {:.4} {relation} {:.4}, above {:.1}% of ID  from {}/{}@{}",
                printable(&v.id),
                printable(&v.score_kind),
                v.score,
                v.threshold,
                v.id_percentile,
                printable(&v.source.topic),
                v.source.partition,
                v.source.offset
            );
        }
        Kind::DeadLetter(d) => {
            let source = d.source.clone().unwrap_or_else(|| here.clone());
            let _ = write!(
                line,
                "{} {}  {}: {}  from {}/{}@{}",
                paint(YELLOW, "DEAD"),
                id_of(record.key.as_deref(), &source),
                printable(&d.code),
                printable(&d.error),
                printable(&source.topic),
                source.partition,
                source.offset
            );
            if let Some(n) = &d.original_length {
                let _ = write!(line, " (value cut to {} of {} bytes)", record.value.len(), printable(n));
            }
        }
        Kind::Window(w) => {
            let text = printable(&w.line());
            let _ = write!(line, "WIN  {}", if w.shifted() { paint(RED, &text) } else { text });
        }
        Kind::Other(why) => {
            let _ = write!(
                line,
                "?    {}  {} bytes, {why}",
                id_of(record.key.as_deref(), &here),
                record.value.len()
            );
        }
    }
    let _ = write!(
        line,
        "  {}",
        paint(
            DIM,
            &format!("[{}/{}@{}]", record.source.topic, record.source.partition, record.source.offset)
        )
    );
    line
}

/// The record as JSON: coordinates, key and headers (as text, invalid UTF-8 replaced),
/// the verdict's own JSON value, or for a dead letter its reason and the value's length
/// and sha256 (the image itself stays in the topic).
pub fn json_record(record: &Record, kind: &Kind) -> serde_json::Value {
    use sha2::Digest;
    let headers: Vec<serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            json!({"key": String::from_utf8_lossy(k), "value": v.as_ref().map(|v| String::from_utf8_lossy(v))})
        })
        .collect();
    let mut out = json!({
        "topic": record.source.topic,
        "partition": record.source.partition,
        "offset": record.source.offset,
        "timestamp": record.source.timestamp,
        "key": record.key.as_ref().map(|k| String::from_utf8_lossy(k)),
        "headers": headers,
    });
    let verdict = || serde_json::from_slice::<serde_json::Value>(&record.value).unwrap_or_default();
    let extra = match kind {
        Kind::Verdict(_) => json!({"kind": "verdict", "verdict": verdict()}),
        Kind::Window(_) => json!({"kind": "window", "window": verdict()}),
        Kind::DeadLetter(d) => json!({
            "kind": "dead_letter",
            "error_code": d.code,
            "error": d.error,
            "value_length": record.value.len(),
            "value_sha256": hex::encode(sha2::Sha256::digest(&record.value)),
        }),
        Kind::Other(why) => json!({
            "kind": "other",
            "why": why,
            "value_length": record.value.len(),
            "value_sha256": hex::encode(sha2::Sha256::digest(&record.value)),
        }),
    };
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    out
}

/// What was read, for the closing line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    pub records: u64,
    pub ood: u64,
    pub in_distribution: u64,
    pub dead_letters: BTreeMap<String, u64>,
    pub other: u64,
    /// Window records by verdict.
    pub windows: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, kind: &Kind) {
        self.records += 1;
        match kind {
            Kind::Verdict(v) if v.is_ood => self.ood += 1,
            Kind::Verdict(_) => self.in_distribution += 1,
            Kind::DeadLetter(d) => *self.dead_letters.entry(printable(&d.code)).or_default() += 1,
            Kind::Window(w) => *self.windows.entry(printable(&w.verdict)).or_default() += 1,
            Kind::Other(_) => self.other += 1,
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dead: u64 = self.dead_letters.values().sum();
        let windows: u64 = self.windows.values().sum();
        let plural = |n: u64, one: &str| if n == 1 { format!("1 {one}") } else { format!("{n} {one}s") };
        write!(f, "{}", plural(self.records, "record"))?;
        let mut sep = ":";
        // Window records alone (`tail --audit`) are not followed by "0 verdicts, 0 dead letters".
        if windows == 0 || self.ood + self.in_distribution + dead > 0 {
            write!(
                f,
                ": {} ({} OOD, {} ID), {}",
                plural(self.ood + self.in_distribution, "verdict"),
                self.ood,
                self.in_distribution,
                plural(dead, "dead letter")
            )?;
            sep = ",";
        }
        if dead > 0 {
            let codes: Vec<String> = self.dead_letters.iter().map(|(c, n)| format!("{c} {n}")).collect();
            write!(f, " ({})", codes.join(", "))?;
        }
        if windows > 0 {
            let verdicts: Vec<String> = self.windows.iter().map(|(v, n)| format!("{v} {n}")).collect();
            write!(f, "{sep} {} ({})", plural(windows, "window"), verdicts.join(", "))?;
        }
        if self.other > 0 {
            write!(f, ", {} not written by dlsr", self.other)?;
        }
        Ok(())
    }
}

struct TopicTail {
    topic: String,
    consumer: BaseConsumer<GatedContext>,
    /// Partitions not yet caught up with (only without --follow).
    pending: Vec<i32>,
    /// Partitions that reached their end at least once.
    caught_up: Vec<i32>,
}

pub struct Tail {
    topics: Vec<TopicTail>,
    follow: bool,
    timeout: Duration,
    from: TailStart,
    opened_ms: i64,
    /// Records the brokers returned from before the start point (see [`Tail::keeps`]).
    pub skipped_before_start: u64,
    /// Topics asked for that do not exist (yet); the others are read.
    pub missing: Vec<String>,
}

impl Tail {
    /// Connects, finds every topic's partitions and assigns them at the start point.
    pub fn open(options: &TailOptions) -> Result<Self, TopicError> {
        let mut topics = Vec::new();
        let mut missing = Vec::new();
        for topic in &options.topics {
            let mut config = options.connection.clone();
            topics::reader_settings(&mut config);
            let consumer: BaseConsumer<GatedContext> =
                config.create_with_context(GatedContext("tail")).map_err(TopicError::Client)?;
            let partitions =
                match topics::reader_partitions(&consumer, &options.brokers, topic, options.timeout) {
                    // The dead-letter topic often does not exist until the first dead letter:
                    // read the others and say so; only no topic at all is an error.
                    Err(TopicError::NoTopic(t)) => {
                        missing.push(t);
                        continue;
                    }
                    other => other?,
                };
            let starts: Vec<Offset> = match options.from {
                TailStart::Beginning => vec![Offset::Beginning; partitions.len()],
                TailStart::End => vec![Offset::End; partitions.len()],
                TailStart::Time(ms) => topics::offsets_at_time(
                    &consumer,
                    &options.brokers,
                    topic,
                    &partitions,
                    ms,
                    options.timeout,
                )?
                .into_iter()
                .map(|o| o.map_or(Offset::End, Offset::Offset))
                .collect(),
            };
            let mut tpl = TopicPartitionList::new();
            for (&p, start) in partitions.iter().zip(starts) {
                tpl.add_partition_offset(topic, p, start).map_err(TopicError::Client)?;
            }
            consumer.assign(&tpl).map_err(TopicError::Client)?;
            let pending = if options.follow { Vec::new() } else { partitions };
            topics.push(TopicTail { topic: topic.clone(), consumer, pending, caught_up: Vec::new() });
        }
        if topics.is_empty() {
            return Err(TopicError::NoTopic(missing.join(", ")));
        }
        let opened_ms = crate::kafka::message::now_millis();
        Ok(Self {
            topics,
            follow: options.follow,
            timeout: options.timeout,
            from: options.from,
            opened_ms,
            skipped_before_start: 0,
            missing,
        })
    }

    /// Whether a record belongs after the start point. Brokers resolve a time or the end
    /// to an offset, and not all exactly: tansu 0.6 answers inside the last record batch,
    /// so "the end" replays the rest of that batch and a time lands up to a batch early.
    /// So with a time, records stamped before it are left out; with the end, records
    /// stamped more than a second before tail started and read before the partition's
    /// first end are (after that first end every record is new, whatever its clock
    /// says). What is left out is counted, not hidden.
    fn keeps(&self, timestamp: Option<i64>, caught_up: bool) -> bool {
        match (self.from, timestamp) {
            (_, None) | (TailStart::Beginning, _) => true,
            (TailStart::Time(ms), Some(t)) => t >= ms,
            (TailStart::End, Some(t)) => caught_up || t >= self.opened_ms - 1000,
        }
    }

    /// Calls `f` on every record until caught up with every partition (or, with follow,
    /// until `stop` is set), or until `f` returns false.
    pub fn run(&mut self, stop: &AtomicBool, mut f: impl FnMut(Record) -> bool) -> Result<(), TopicError> {
        let mut last_event = Instant::now();
        let slice = Duration::from_millis((200 / self.topics.len().max(1)) as u64);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if !self.follow {
                if self.topics.iter().all(|t| t.pending.is_empty()) {
                    return Ok(());
                }
                if last_event.elapsed() > self.timeout {
                    let pending = self.topics.iter().flat_map(|t| t.pending.iter().copied()).collect();
                    return Err(TopicError::Stalled { secs: self.timeout.as_secs(), pending });
                }
            }
            for i in 0..self.topics.len() {
                let t = &mut self.topics[i];
                let Some(event) = t.consumer.poll(slice) else { continue };
                last_event = Instant::now();
                let m = match event {
                    Err(KafkaError::PartitionEOF(p)) => {
                        t.pending.retain(|&q| q != p);
                        if !t.caught_up.contains(&p) {
                            t.caught_up.push(p);
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("reading {}: {e}", t.topic);
                        continue;
                    }
                    Ok(m) => m,
                };
                let record = Record::from_message(&m);
                let caught_up = t.caught_up.contains(&record.source.partition);
                if !self.keeps(record.source.timestamp, caught_up) {
                    self.skipped_before_start += 1;
                    continue;
                }
                if !f(record) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: Vec<Header>, value: &[u8]) -> Record {
        Record {
            source: crate::kafka::message::Source {
                topic: "dlsr-dead-letters".into(),
                partition: 0,
                offset: 7,
                timestamp: Some(1_795_730_400_123),
            },
            key: Some(b"cam1/\x1b[2Jframe\n9.png".to_vec()),
            headers,
            value: value.to_vec(),
        }
    }

    #[test]
    fn dead_letters_show_code_reason_and_the_input_coordinates_with_control_bytes_escaped() {
        let r = record(
            vec![
                headers::text("dlsr-error-code", "undecodable"),
                headers::text("dlsr-error", "PNG: unexpected end"),
                headers::text("dlsr-source-topic", "images"),
                headers::text("dlsr-source-partition", "2"),
                headers::text("dlsr-source-offset", "41"),
            ],
            b"\x89PNG",
        );
        let kind = classify(&r);
        let line = human_line(&r, &kind, false);
        assert_eq!(
            line,
            "2026-11-26T22:00:00.123Z DEAD cam1/\\u{1b}[2Jframe\\n9.png  undecodable: PNG: unexpected end  \
             from images/2@41  [dlsr-dead-letters/0@7]"
        );
        let j = json_record(&r, &kind);
        assert_eq!(j["kind"], "dead_letter");
        assert_eq!(j["error_code"], "undecodable");
        assert_eq!(j["value_length"], 4);
        let mut tally = Tally::default();
        tally.add(&kind);
        assert_eq!(tally.to_string(), "1 record: 0 verdicts (0 OOD, 0 ID), 1 dead letter (undecodable 1)");
    }

    #[test]
    fn verdicts_show_score_against_threshold_and_other_records_say_what_they_are() {
        let value = br#"{"id":"mnist/00012.png","source":{"topic":"images","partition":1,"offset":17,"timestamp":null},
            "score":-0.991,"score_kind":"mfsim","threshold":-0.9948,"is_ood":true,"id_percentile":99.8}"#;
        let r = record(vec![headers::text("dlsr-verdict", "ood")], value);
        let kind = classify(&r);
        let line = human_line(&r, &kind, false);
        assert!(
            line.contains(
                "OOD  mnist/00012.png  mfsim -0.9910 > -0.9948, above 99.8% of ID  from images/1@17"
            ),
            "{line}"
        );
        assert!(human_line(&r, &kind, true).contains("\x1b[31mOOD \x1b[0m"));
        assert_eq!(json_record(&r, &kind)["verdict"]["score_kind"], "mfsim");

        let other = record(vec![], b"{\"hello\":1}");
        let kind = classify(&other);
        assert!(matches!(&kind, Kind::Other(why) if why.starts_with("JSON, but not a verdict")));
        assert!(
            human_line(&other, &kind, false).contains("?    cam1/"),
            "{}",
            human_line(&other, &kind, false)
        );
        let mut tally = Tally::default();
        tally.add(&kind);
        assert!(tally.to_string().ends_with(", 1 not written by dlsr"));
    }

    /// Issue #21: `score_kind` went to the terminal unescaped, and bidirectional controls
    /// in keys passed through (they reorder what a person reads).
    #[test]
    fn a_verdict_from_someone_else_cannot_drive_or_reorder_the_terminal() {
        let value = "{\"id\":\"a\u{202E}gnp.exe\",\"source\":{\"topic\":\"images\",\"partition\":1,\"offset\":17,\"timestamp\":null},\
            \"score\":1.0,\"score_kind\":\"mfsim\\u001b[2J\",\"threshold\":0.5,\"is_ood\":true,\"id_percentile\":99.8}";
        let r = record(vec![headers::text("dlsr-verdict", "ood")], value.as_bytes());
        let kind = classify(&r);
        let line = human_line(&r, &kind, false);
        assert!(!line.contains('\u{1b}') && !line.contains('\u{202E}'), "{line:?}");
        assert!(line.contains("a\\u{202e}gnp.exe") && line.contains("mfsim\\u{1b}[2J"), "{line}");
        assert_eq!(printable("cam\u{2066}1\u{200B}"), "cam\\u{2066}1\\u{200b}");
    }
}
