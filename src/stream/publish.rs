//! Publishing images into a topic (`dlsr publish`; the demo; load tests; backfills).
//! Encoded files go as they are (the daemon judges them, bad ones included); IDX/CSV
//! records are encoded as PNG. The key is the item id. Delivery is confirmed before
//! returning.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::data::{DataSet, ItemContent, RawItem};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("{0} (check --brokers and that the broker runs; --timeout sets how long to wait)")]
    Unreachable(crate::kafka::topics::TopicError),
    #[error(
        "topic {0:?} does not exist on the brokers, and they did not create it on first use: \
         create it, or pass --partitions N and publish creates it"
    )]
    NoTopic(String),
    #[error("{0}")]
    Topic(crate::kafka::topics::TopicError),
    #[error("{id}: cannot encode as PNG: {reason}")]
    Encode { id: String, reason: String },
}

#[derive(Default)]
pub struct DeliveryCounts {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

impl ClientContext for &'static DeliveryCounts {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::client_log::error("publisher", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::client_log::log("publisher", level, facility, message);
    }
}
impl ProducerContext for &'static DeliveryCounts {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                tracing::warn!("publish delivery failed: {e}");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PublishReport {
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
    pub unreadable: u64,
    pub seconds: f64,
}

/// The bytes to publish for an item.
pub fn item_bytes(item: &RawItem) -> Result<Vec<u8>, PublishError> {
    match &item.content {
        ItemContent::Encoded(bytes) => Ok(bytes.clone()),
        ItemContent::Grey { width, height, pixels } => {
            let img = image::GrayImage::from_raw(*width, *height, pixels.clone()).ok_or_else(|| {
                PublishError::Encode { id: item.id.clone(), reason: "pixel count mismatch".into() }
            })?;
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| PublishError::Encode { id: item.id.clone(), reason: e.to_string() })?;
            Ok(out.into_inner())
        }
    }
}

/// A producer for publishing; `extra` are librdkafka properties.
pub struct Publisher {
    producer: BaseProducer<&'static DeliveryCounts>,
    counts: &'static DeliveryCounts,
    sent: u64,
}

impl Publisher {
    pub fn new(brokers: &str, extra: &[(String, String)]) -> Result<Self, PublishError> {
        // Leaked once per publisher: the delivery callback needs a 'static context.
        let counts: &'static DeliveryCounts = Box::leak(Box::default());
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers).set("enable.idempotence", "true").set("linger.ms", "5");
        for (k, v) in extra {
            cfg.set(k, v);
        }
        let producer = cfg.create_with_context(counts).map_err(|e| PublishError::Kafka(e.to_string()))?;
        Ok(Self { producer, counts, sent: 0 })
    }

    /// Fails within `timeout` unless the brokers answer and `topic` exists (or is being
    /// created by a broker that creates topics on first use). Without this check a wrong
    /// address would leave librdkafka retrying each message for minutes.
    pub fn check(&self, brokers: &str, topic: &str, timeout: Duration) -> Result<(), PublishError> {
        use crate::kafka::topics::{partitions, TopicError};
        let found = partitions(self.producer.client(), brokers, topic, timeout);
        // librdkafka's own account of the failure (e.g. "Connection refused") waits in
        // the event queue: serve it, so the gated log says it once before the error.
        self.producer.poll(Duration::ZERO);
        match found {
            Ok(_) => Ok(()),
            // A broker that creates topics on first use answers this while it does.
            Err(TopicError::Metadata {
                code: rdkafka::types::RDKafkaErrorCode::LeaderNotAvailable, ..
            }) => Ok(()),
            Err(TopicError::NoTopic(t)) => Err(PublishError::NoTopic(t)),
            Err(e @ TopicError::Unreachable { .. }) => Err(PublishError::Unreachable(e)),
            Err(e) => Err(PublishError::Topic(e)),
        }
    }

    /// Fails within `timeout` unless the brokers answer.
    pub fn check_reachable(&self, brokers: &str, timeout: Duration) -> Result<(), PublishError> {
        let answer = self.producer.client().fetch_metadata(None, timeout);
        self.producer.poll(Duration::ZERO);
        answer.map(drop).map_err(|e| {
            PublishError::Unreachable(crate::kafka::topics::TopicError::unreachable(brokers, timeout, e))
        })
    }

    /// Queues one message (waits while the local queue is full).
    pub fn send(&mut self, topic: &str, key: &str, payload: &[u8]) -> Result<(), PublishError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(PublishError::Kafka(e.to_string())),
            }
        }
        self.sent += 1;
        self.producer.poll(Duration::ZERO);
        Ok(())
    }

    /// Waits for every queued message's delivery report.
    pub fn finish(self, started: Instant, unreadable: u64) -> Result<PublishReport, PublishError> {
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(|e| PublishError::Kafka(format!("flush: {e}")))?;
        Ok(PublishReport {
            sent: self.sent,
            delivered: self.counts.delivered.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            unreadable,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// How `publish` writes an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishAs {
    /// The image's bytes as the value.
    Bytes,
    /// A JSON event `{"id": ..., "uri": ...}` referring to where the image already is
    /// (the claim-check pattern); nothing is read.
    Reference,
}

/// Publishes every item of `set` to `topic`, at most `rate` messages per second.
pub fn publish_set(
    publisher: &mut Publisher,
    set: &DataSet,
    topic: &str,
    rate: Option<f64>,
    how: PublishAs,
) -> Result<u64, PublishError> {
    let started = Instant::now();
    let mut unreadable = 0;
    for i in 0..set.len() {
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(i as f64 / r);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let sent = match how {
            PublishAs::Bytes => set.get(i).map(|item| (item.id.clone(), item_bytes(&item))),
            PublishAs::Reference => set.item_uri(i).map(|(id, uri)| {
                let event = serde_json::json!({ "id": id, "uri": uri });
                (id, Ok(event.to_string().into_bytes()))
            }),
        };
        match sent {
            Ok((id, value)) => publisher.send(topic, &id, &value?)?,
            Err(e) => {
                tracing::warn!("not published: {e}");
                unreadable += 1;
            }
        }
    }
    Ok(unreadable)
}

/// Creates `topic` with `partitions` partitions unless it exists (Kafka admin API; the
/// mock cluster does not support it, use `MockCluster::create_topic` there).
///
/// `properties` are the publisher's (security settings above all: without them the
/// admin client spoke plaintext to a TLS listener and waited for ever, found in issue
/// #21's secured-broker test).
pub fn ensure_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    properties: &[(String, String)],
) -> Result<(), PublishError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        config.set(k, v);
    }
    let admin: AdminClient<crate::kafka::client_log::GatedContext> = config
        .create_with_context(crate::kafka::client_log::GatedContext("admin"))
        .map_err(|e| PublishError::Kafka(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PublishError::Kafka(e.to_string()))?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = rt
        .block_on(admin.create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &opts))
        .map_err(|e| PublishError::Kafka(format!("create topic {topic}: {e}")))?;
    for r in results {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(PublishError::Kafka(format!("create topic {t}: {e}"))),
        }
    }
    Ok(())
}
