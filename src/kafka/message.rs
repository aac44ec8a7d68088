//! What goes out: verdict records (JSON value, input key, input headers plus
//! `dlsr-verdict`) and dead letters (original key, value and headers plus
//! `dlsr-error-code`, `dlsr-error` and the source coordinates). The JSON Schema of the
//! verdict value is `docs/verdict.schema.json`.

use serde::Serialize;

use crate::model::score::LayerScore;
use crate::verdict::{Scores, Verdict};

/// A Kafka record, owned: what the daemon consumes, `dlsr tail` shows and the topic
/// audit reads. One type, so a record is copied out of librdkafka the same way everywhere
/// (headers byte for byte, a missing timestamp as None).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<super::headers::Header>,
}

impl Record {
    /// Copies a message read through rust-rdkafka.
    pub fn from_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        use rdkafka::Message;
        Record {
            source: Source {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
            },
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: super::headers::read(m),
        }
    }

    /// The item id: the key as UTF-8, else `topic/partition/offset`.
    pub fn id(&self) -> String {
        item_id(self.key.as_deref(), &self.source)
    }

    /// Key, value and header bytes.
    pub fn byte_len(&self) -> usize {
        self.value.len() + self.key.as_ref().map_or(0, Vec::len) + super::headers::payload_len(&self.headers)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Message timestamp, milliseconds since the Unix epoch (None if the broker gave none).
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelRef {
    pub name: String,
    pub sha256: String,
}

/// The verdict's `source`: the message's coordinates and, for a reference, its URI.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictSource<'a> {
    #[serde(flatten)]
    pub message: &'a Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<&'a str>,
}

/// The verdict value published to the output topic.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictRecord<'a> {
    pub id: &'a str,
    pub source: VerdictSource<'a>,
    pub score: f64,
    pub score_kind: crate::model::score::ScoreKind,
    pub threshold: f64,
    pub is_ood: bool,
    pub id_percentile: f64,
    pub scores: &'a Scores,
    pub layers: &'a [LayerScore],
    pub model: &'a ModelRef,
    pub scored_at: String,
    /// The JSON event's passthrough fields (`passthrough_pointers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl<'a> VerdictRecord<'a> {
    pub fn new(v: &'a Verdict, source: &'a Source, model: &'a ModelRef) -> Self {
        Self {
            id: &v.id,
            source: VerdictSource { message: source, uri: None },
            score: v.score,
            score_kind: v.score_kind,
            threshold: v.threshold,
            is_ood: v.is_ood,
            id_percentile: v.id_percentile,
            scores: &v.scores,
            layers: &v.layers,
            model,
            scored_at: rfc3339_now(),
            input: None,
        }
    }

    /// Adds a reference's URI and an event's passthrough fields.
    pub fn with_input(
        mut self,
        uri: Option<&'a str>,
        input: Option<&'a serde_json::Map<String, serde_json::Value>>,
    ) -> Self {
        self.source.uri = uri;
        self.input = input;
        self
    }
}

/// Milliseconds since the Unix epoch now (0 on a clock set before 1970).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The current UTC time as RFC 3339 with milliseconds.
pub fn rfc3339_now() -> String {
    rfc3339(now_millis())
}

/// Milliseconds since the epoch as RFC 3339 UTC (civil-from-days, Howard Hinnant).
pub fn rfc3339(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// The item id of a message: its key as UTF-8, else `topic/partition/offset`.
pub fn item_id(key: Option<&[u8]>, source: &Source) -> String {
    match key.and_then(|k| std::str::from_utf8(k).ok()).filter(|k| !k.is_empty()) {
        Some(k) => k.to_string(),
        None => format!("{}/{}/{}", source.topic, source.partition, source.offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_730_400_123), "2026-11-26T22:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn ids_come_from_keys_or_coordinates() {
        let s = Source { topic: "t".into(), partition: 2, offset: 9, timestamp: None };
        assert_eq!(item_id(Some(b"cat.png"), &s), "cat.png");
        assert_eq!(item_id(None, &s), "t/2/9");
        assert_eq!(item_id(Some(&[0xff, 0xfe]), &s), "t/2/9");
    }
}
