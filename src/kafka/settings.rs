//! librdkafka client configuration from [`KafkaConfig`]: the settings at-least-once
//! needs (manual commits, cooperative-sticky assignment, idempotent producer), security
//! with secrets read at start, and the pass-through properties.

use rdkafka::ClientConfig;

use crate::config::{Config, ConfigError, KafkaConfig, SecurityProtocol};

/// The connection: brokers and security (secrets read now). Readers of the daemon's
/// topics (`dlsr tail`) use this alone; the user's pass-through properties are for the
/// daemon's own clients.
pub fn connection_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    let s = &k.security;
    if s.protocol != SecurityProtocol::Unset {
        c.set("security.protocol", s.protocol.to_string());
    }
    if s.protocol.is_sasl() {
        c.set("sasl.mechanism", &s.sasl_mechanism).set("sasl.username", &s.sasl_username);
        if let Some(pw) =
            Config::secret("kafka.security.sasl_password_env", &s.sasl_password_env, &s.sasl_password_file)?
        {
            c.set("sasl.password", pw);
        }
    }
    for (key, value) in [
        ("ssl.ca.location", &s.ssl_ca_location),
        ("ssl.certificate.location", &s.ssl_certificate_location),
        ("ssl.key.location", &s.ssl_key_location),
    ] {
        if !value.is_empty() {
            c.set(key, value);
        }
    }
    if let Some(pw) = Config::secret("kafka.security.ssl_key_password_env", &s.ssl_key_password_env, "")? {
        c.set("ssl.key.password", pw);
    }
    Ok(c)
}

/// The user's pass-through properties go last, so they override dlsr's defaults.
fn with_properties(mut c: ClientConfig, k: &KafkaConfig) -> ClientConfig {
    for (key, value) in k.properties.iter() {
        c.set(key, value);
    }
    c
}

pub fn consumer_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = connection_config(k)?;
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", k.auto_offset_reset.as_str())
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("enable.partition.eof", "false")
        // Only committed records are judged: an aborted transaction's records never
        // were part of the stream (and librdkafka's default, stated here on purpose).
        .set("isolation.level", "read_committed")
        // Lag and broker reachability come from these statistics, so the consumer thread
        // makes no blocking request of its own (issue #21: per-partition watermark
        // requests stalled the poll loop with hundreds of partitions).
        .set("statistics.interval.ms", "5000")
        // A subscribed topic that does not exist yet is picked up at the next metadata
        // refresh: librdkafka's default of 5 minutes would leave a created topic unread
        // that long (the topic watcher reports it missing meanwhile).
        .set("topic.metadata.refresh.interval.ms", "10000")
        // Brokers that do not answer a fetch before its maximum wait (tansu) would add up
        // to 500 ms (the default) to every message's latency at low rates.
        .set("fetch.wait.max.ms", "50")
        // librdkafka prefetches up to 100k messages per partition by default: with a
        // backlog that is hundreds of MB of images in memory. Bound it; the pipeline's
        // own bound is in_flight_limit.
        .set("queued.min.messages", "1000")
        .set("queued.max.messages.kbytes", "16384");
    if !k.group_instance_id.trim().is_empty() {
        c.set("group.instance.id", k.group_instance_id.trim());
    }
    Ok(with_properties(c, k))
}

pub fn producer_config(k: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = connection_config(k)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", k.message_max_bytes.to_string())
        .set("message.timeout.ms", k.delivery_timeout_ms.to_string())
        .set("linger.ms", "5")
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "5000");
    Ok(with_properties(c, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_membership_only_when_named() {
        let mut k = KafkaConfig::default();
        assert_eq!(consumer_config(&k).unwrap().get("group.instance.id"), None);
        k.group_instance_id = " dlsr-0 ".into();
        assert_eq!(consumer_config(&k).unwrap().get("group.instance.id"), Some("dlsr-0"));
        // A reader of the outputs gets the connection, not the daemon's group settings.
        let reader = connection_config(&k).unwrap();
        assert_eq!(reader.get("group.instance.id"), None);
        assert_eq!(reader.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }
}
