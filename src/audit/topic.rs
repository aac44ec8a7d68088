//! Reading a stretch of a Kafka topic for an audit: every partition from a start (the
//! beginning, an offset, or the first message at or after a time) to an end (where the
//! reader catches up with the partition, or the first message at or after `--until`), by
//! explicit assignment. No consumer group joins and nothing is committed, so an audit
//! never moves a daemon's offsets.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka::client_log::GatedContext;
use crate::kafka::topics;
pub use crate::kafka::topics::TopicError;

/// Where each partition's reading starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    Beginning,
    /// The same offset in every partition (clamped to what the partition still holds).
    Offset(i64),
    /// Milliseconds since the Unix epoch.
    Time(i64),
}

#[derive(Debug, Clone)]
pub struct TopicRange {
    pub brokers: String,
    pub topic: String,
    pub start: Start,
    /// Milliseconds since the Unix epoch (exclusive).
    pub until: Option<i64>,
    /// Extra librdkafka properties (security settings), `key=value`.
    pub properties: Vec<(String, String)>,
    /// How long the brokers may stay silent before the audit gives up.
    pub timeout: Duration,
}

/// What was read from one partition: offsets `start..end` (end exclusive).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartitionRange {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
    pub read: u64,
}

/// A message as the audit reads it: the one owned record type.
pub use crate::kafka::message::Record as TopicMessage;

pub struct TopicReader {
    consumer: BaseConsumer<GatedContext>,
    pub topic: String,
    pub ranges: Vec<PartitionRange>,
    timeout: Duration,
    /// Whether the ends are fixed offsets (`--until`) rather than where reading catches up.
    strict_end: bool,
}

impl TopicReader {
    /// Connects, finds the partitions and their offset ranges, and assigns them.
    pub fn open(range: &TopicRange) -> Result<Self, TopicError> {
        let consumer: BaseConsumer<GatedContext> = topics::reader_config(&range.brokers, &range.properties)
            .create_with_context(GatedContext("reader"))
            .map_err(TopicError::Client)?;
        let partitions = topics::reader_partitions(&consumer, &range.brokers, &range.topic, range.timeout)?;
        let unreachable = |e: KafkaError| TopicError::unreachable(&range.brokers, range.timeout, e);
        let mut ranges = Vec::new();
        for &p in &partitions {
            let (low, high) =
                consumer.fetch_watermarks(&range.topic, p, range.timeout).map_err(unreachable)?;
            ranges.push(PartitionRange { partition: p, start: low, end: high, read: 0 });
        }
        let at_time = |ms: i64| {
            topics::offsets_at_time(&consumer, &range.brokers, &range.topic, &partitions, ms, range.timeout)
        };
        match range.start {
            Start::Beginning => {}
            Start::Offset(o) => ranges.iter_mut().for_each(|r| r.start = o.clamp(r.start, r.end)),
            Start::Time(ms) => {
                for (r, o) in ranges.iter_mut().zip(at_time(ms)?) {
                    r.start = o.map_or(r.end, |o| o.clamp(r.start, r.end));
                }
            }
        }
        if let Some(ms) = range.until {
            for (r, o) in ranges.iter_mut().zip(at_time(ms)?) {
                r.end = o.map_or(r.end, |o| o.clamp(r.start, r.end));
            }
        }
        let strict_end = range.until.is_some();
        let mut tpl = TopicPartitionList::new();
        for r in ranges.iter().filter(|r| !strict_end || r.start < r.end) {
            tpl.add_partition_offset(&range.topic, r.partition, Offset::Offset(r.start))
                .map_err(TopicError::Client)?;
        }
        consumer.assign(&tpl).map_err(TopicError::Client)?;
        Ok(Self { consumer, topic: range.topic.clone(), ranges, timeout: range.timeout, strict_end })
    }

    /// Messages to read in all.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| (r.end - r.start).max(0) as u64).sum()
    }

    /// Calls `f` on every message of the range (partitions interleaved, each in offset
    /// order) until all are read or `f` returns false.
    ///
    /// With `--until`, a partition ends at its looked-up offset. Without, it ends where
    /// the reader catches up with it (librdkafka's partition EOF), and the recorded end is
    /// the offset after the last message read: the high watermark listed at the start is
    /// only the progress estimate, since a broker may report it inside a record batch
    /// (tansu 0.6 gives the batch's first offset + 1 for the last batch).
    pub fn read<E: From<TopicError>>(
        &mut self,
        mut f: impl FnMut(TopicMessage) -> Result<bool, E>,
    ) -> Result<(), E> {
        let strict = self.strict_end;
        let mut last_message = Instant::now();
        let mut next: Vec<i64> = self.ranges.iter().map(|r| r.start).collect();
        let mut done: Vec<bool> = self.ranges.iter().map(|r| strict && r.start >= r.end).collect();
        let result = loop {
            let pending: Vec<i32> =
                self.ranges.iter().zip(&done).filter(|(_, &d)| !d).map(|(r, _)| r.partition).collect();
            if pending.is_empty() {
                break Ok(());
            }
            if last_message.elapsed() > self.timeout {
                break Err(TopicError::Stalled { secs: self.timeout.as_secs(), pending }.into());
            }
            let message = match self.consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    last_message = Instant::now();
                    if let Some(i) = self.ranges.iter().position(|r| r.partition == p) {
                        done[i] = true;
                    }
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!("reading {}: {e}", self.topic);
                    continue;
                }
                Some(Ok(m)) => m,
            };
            last_message = Instant::now();
            let Some(i) = self.ranges.iter().position(|r| r.partition == message.partition()) else {
                continue;
            };
            let offset = message.offset();
            if done[i] || offset < next[i] {
                continue;
            }
            if strict && offset >= self.ranges[i].end {
                done[i] = true;
                continue;
            }
            next[i] = offset + 1;
            self.ranges[i].read += 1;
            if strict && next[i] >= self.ranges[i].end {
                done[i] = true;
            }
            let m = TopicMessage::from_message(&message);
            match f(m) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if !strict {
            for (r, &n) in self.ranges.iter_mut().zip(&next) {
                r.end = n;
            }
        }
        result
    }
}

/// Parses a point in time: RFC 3339 (`2026-12-01T08:00:00Z`, `...+01:00`), milliseconds
/// since the Unix epoch, or a duration before `now_ms` (`90s`, `30m`, `6h`, `7d`).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    let bad = || {
        format!("{s:?} is not a time: use RFC 3339 (2026-12-01T08:00:00Z), milliseconds since the epoch, or a duration ago (90s, 30m, 6h, 7d)")
    };
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<u64>() {
            let unit_secs: u64 = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86_400,
            };
            // Checked: `99999999999999999d` overflowed (a panic in debug builds, a wrapped
            // time in release ones).
            let ago = n
                .checked_mul(unit_secs)
                .and_then(|secs| secs.checked_mul(1000))
                .and_then(|ms| i64::try_from(ms).ok())
                .and_then(|ms| now_ms.checked_sub(ms))
                .filter(|t| *t >= 0);
            return ago.ok_or_else(|| format!("{s:?} reaches back before 1970"));
        }
    }
    rfc3339_millis(s).ok_or_else(bad)
}

/// RFC 3339 to milliseconds since the epoch (days from civil, Howard Hinnant).
fn rfc3339_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // `get`, not slicing: a multi-byte character where the time zone should be made
    // byte-index slicing panic (issue #21).
    let mut rest = s.get(19..)?;
    let mut millis = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return None;
        }
        let padded = format!("{:0<3}", &digits[..digits.len().min(3)]);
        millis = padded.parse().ok()?;
        rest = &frac[digits.len()..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.get(3..4) == Some(":") => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let (hours, minutes) = (tz.get(1..3)?.parse::<i64>().ok()?, tz.get(4..6)?.parse::<i64>().ok()?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 60 + minutes)
        }
        _ => return None,
    };
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset_min * 60) * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_documented_form() {
        assert_eq!(parse_time("2026-11-26T22:00:00.123Z", 0), Ok(1_795_730_400_123));
        assert_eq!(parse_time("2026-11-26T23:00:00+01:00", 0), Ok(1_795_730_400_000));
        assert_eq!(parse_time("2000-02-29T00:00:00Z", 0), Ok(951_782_400_000));
        assert_eq!(parse_time("1795730400123", 0), Ok(1_795_730_400_123));
        assert_eq!(parse_time("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert_eq!(parse_time("30m", 10_000_000), Ok(10_000_000 - 1_800_000));
        for bad in ["yesterday", "2026-13-01T00:00:00Z", "2026-11-26 22:00", "5w", ""] {
            assert!(parse_time(bad, 0).is_err(), "{bad}");
        }
    }

    /// Issue #21: a multi-byte character in the time zone and a duration too long for
    /// the clock panicked; both are errors now.
    #[test]
    fn strange_times_are_errors_not_panics() {
        for bad in [
            "2026-11-26T22:00:00+€00",
            "2026-11-26T22:00:0€Z",
            "2026-11-26T22:00:00€",
            "2026-11-26T22:00:00+99:00",
        ] {
            assert!(parse_time(bad, 0).is_err(), "{bad}");
        }
        let err = parse_time("99999999999999999d", 1_795_730_400_000).unwrap_err();
        assert!(err.contains("before 1970"), "{err}");
        assert!(parse_time("18446744073709551615s", 1_795_730_400_000).is_err());
    }
}
