//! What the brokers say about a topic, for the clients that read by explicit assignment
//! (`audit`, `tail`) and for `publish`'s check before it sends: reachable or not within a
//! timeout, the topic's partitions, the offsets at a time. Every failure is a sentence a
//! user can act on.

use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("Kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("cannot reach the brokers {brokers} within {secs} s: {reason}")]
    Unreachable { brokers: String, secs: u64, reason: String },
    #[error("topic {0:?} does not exist on the brokers")]
    NoTopic(String),
    #[error("topic {topic:?}: {code}")]
    Metadata { topic: String, code: RDKafkaErrorCode },
    #[error("no message for {secs} s while partitions {pending:?} still had offsets to read")]
    Stalled { secs: u64, pending: Vec<i32> },
}

impl TopicError {
    /// The brokers did not answer a request within `timeout`.
    pub fn unreachable(brokers: &str, timeout: Duration, error: KafkaError) -> Self {
        Self::Unreachable { brokers: brokers.to_string(), secs: timeout.as_secs(), reason: error.to_string() }
    }
}

/// A consumer that only ever reads by assignment: librdkafka needs a group id for a
/// consumer, but an assignment never joins the group and nothing is committed. Partition
/// ends are reported, so a reader knows when it has caught up. `properties` (security
/// settings, `key=value`) go last.
pub fn reader_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    reader_settings(&mut config);
    for (k, v) in properties {
        config.set(k, v);
    }
    config
}

/// The settings of [`reader_config`], on top of a connection's (e.g. the daemon's
/// brokers and security from its configuration).
pub fn reader_settings(config: &mut ClientConfig) {
    config
        .set("group.id", "dlsr-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("queued.max.messages.kbytes", "16384");
}

/// [`partitions`] for a reader. When the brokers cannot be reached, librdkafka's log
/// events that say why (a refused connection, a TLS handshake that fails) wait in the
/// reader's queue until it is polled: they are served first, so the cause is said
/// before the error (issue #21: `tail` and `audit --from-topic` failed on a TLS broker
/// without naming the certificate problem, depending on timing).
pub fn reader_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, TopicError> {
    let result = partitions(consumer.client(), brokers, topic, timeout);
    if matches!(result, Err(TopicError::Unreachable { .. })) {
        let until = std::time::Instant::now() + Duration::from_millis(300);
        while std::time::Instant::now() < until {
            let _ = consumer.poll(Duration::from_millis(50));
        }
    }
    result
}

/// The topic's partitions, sorted; the brokers must answer within `timeout`.
pub fn partitions<C: ClientContext>(
    client: &Client<C>,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, TopicError> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| TopicError::unreachable(brokers, timeout, e))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| TopicError::NoTopic(topic.to_string()))?;
    if let Some(e) = found.error() {
        let code = RDKafkaErrorCode::from(e);
        if code == RDKafkaErrorCode::UnknownTopicOrPartition {
            return Err(TopicError::NoTopic(topic.to_string()));
        }
        return Err(TopicError::Metadata { topic: topic.to_string(), code });
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        return Err(TopicError::NoTopic(topic.to_string()));
    }
    Ok(partitions)
}

/// For each partition, the offset of its first message at or after `ms` (milliseconds
/// since the epoch), or None when it has none.
pub fn offsets_at_time<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    brokers: &str,
    topic: &str,
    partitions: &[i32],
    ms: i64,
    timeout: Duration,
) -> Result<Vec<Option<i64>>, TopicError> {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(ms)).map_err(TopicError::Client)?;
    }
    let found =
        consumer.offsets_for_times(tpl, timeout).map_err(|e| TopicError::unreachable(brokers, timeout, e))?;
    Ok(partitions
        .iter()
        .map(|&p| match found.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}
