//! The Kafka client helpers that the daemon shares with `dlsr tail`, `dlsr publish` and
//! the offline topic audit: librdkafka settings ([`settings`]), what the brokers say
//! about a topic ([`topics`]), headers byte for byte ([`headers`]), librdkafka's logs
//! said once per problem ([`client_log`]) and the one owned record and the output
//! record formats ([`message`]). The daemon's stages are in [`crate::stream`].

pub mod client_log;
pub mod headers;
pub mod message;
pub mod settings;
pub mod topics;
