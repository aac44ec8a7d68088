//! The one input chain: bytes from any source (a message value, a file, an object) ->
//! envelope ([`super::envelope`]) -> reference ([`super::reference`]) -> decoded image
//! under limits -> preprocessed tensor and noise seed. `serve`, `score`, `audit` and
//! `eval` all go through it, so one image gets one score whichever way it came, and every
//! failure is one [`InputError`] with its dead-letter code.

use std::sync::Arc;

use serde_json::{Map, Value};
use tch::Tensor;

use super::decode::{self, DecodeError, DecodeLimits, Image};
use super::envelope::{self, EnvelopeError, EnvelopeSpec, Payload};
use super::reference::{FetchError, FetchObserver, Fetcher};
use super::Preprocess;
use crate::model::score::pixel_seed;

/// Why an input gave no tensor.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the image decoder panicked: {0}")]
    DecoderPanic(String),
    #[error("preprocessing failed: {0}")]
    Preprocess(String),
}

/// The dead-letter code of an input whose decoding panicked.
pub const DECODER_PANIC: &str = "decoder_panic";

impl InputError {
    /// The bounded code for dead letters, metrics and reports.
    pub fn code(&self) -> &'static str {
        match self {
            InputError::Envelope(_) => EnvelopeError::CODE,
            InputError::Fetch(e) => e.code(),
            InputError::Decode(e) => e.code(),
            InputError::DecoderPanic(_) => DECODER_PANIC,
            InputError::Preprocess(_) => "preprocess",
        }
    }
}

/// What a value unpacked to, before any fetch.
#[derive(Debug)]
pub struct Unpacked {
    /// The image's bytes when they are not the value itself (base64, a fetched
    /// reference); None for a raw value, and while a reference waits to be fetched.
    pub image: Option<Vec<u8>>,
    /// The reference, for references (it goes into the verdict as `source.uri`).
    pub uri: Option<String>,
    /// The id from the event (`id_pointer`), overriding the key.
    pub id: Option<String>,
    /// Passthrough fields, for the verdict's `input`.
    pub input: Option<Map<String, Value>>,
    /// The window audit's source, from the event (`EnvelopeSpec::group_pointer`).
    pub group: Option<String>,
}

/// Unpacks a value as `spec` says. A raw value is not copied.
pub fn unpack(value: &[u8], spec: &EnvelopeSpec) -> Result<Unpacked, InputError> {
    let u = envelope::unpack(value, spec)?;
    let (image, uri) = match u.payload {
        Payload::Value => (None, None),
        Payload::Bytes(b) => (Some(b), None),
        Payload::Reference(r) => (None, Some(r)),
    };
    Ok(Unpacked { image, uri, id: u.id, input: u.input, group: u.group })
}

/// Fetches what `unpacked` refers to, if anything, so that its image is there.
pub async fn fetch_into(
    unpacked: &mut Unpacked,
    fetcher: &Fetcher,
    observer: &dyn FetchObserver,
) -> Result<(), InputError> {
    if unpacked.image.is_some() {
        return Ok(());
    }
    let Some(uri) = &unpacked.uri else { return Ok(()) };
    unpacked.image = Some(fetch(uri, fetcher, observer).await?);
    Ok(())
}

/// The bytes `uri` refers to, under the fetcher's policy.
pub async fn fetch(
    uri: &str,
    fetcher: &Fetcher,
    observer: &dyn FetchObserver,
) -> Result<Vec<u8>, InputError> {
    let reference = fetcher.policy().parse(uri)?;
    Ok(fetcher.fetch(&reference, observer).await?.bytes)
}

/// Bytes in, RGB image out, under limits: the pure-Rust part of the chain. A seam, so a
/// test can put a decoder that panics in the daemon.
pub type Decoder = Arc<dyn Fn(&[u8], &DecodeLimits) -> Result<Image, DecodeError> + Send + Sync>;

/// The image crate's decoders ([`decode::decode`]).
pub fn default_decoder() -> Decoder {
    Arc::new(decode::decode)
}

/// Decodes with `decoder`, catching a panic inside it (a bug in a decoding library, all
/// pure Rust) as [`InputError::DecoderPanic`]: left alone it would kill the process, and
/// a restarted daemon would read the same message and die again, a crash loop from one
/// message. Only the decoder is guarded, never libtorch (a panic there says the process
/// state is suspect: it is a fault).
pub fn decode_guarded(decoder: &Decoder, bytes: &[u8], limits: &DecodeLimits) -> Result<Image, InputError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoder(bytes, limits))) {
        Ok(result) => Ok(result?),
        Err(panic) => Err(InputError::DecoderPanic(panic_message(&panic))),
    }
}

/// The message a caught panic carried.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// An image preprocessed for the encoder, with the noise seed of its pixels.
pub fn to_tensor(image: &Image, pre: &Preprocess) -> Result<(Tensor, u64), InputError> {
    let tensor = pre.apply(image).map_err(|e| InputError::Preprocess(e.to_string()))?;
    Ok((tensor, pixel_seed(image.width, image.height, &image.rgb)))
}

/// Encoded bytes to tensor and seed: [`decode_guarded`] then [`to_tensor`].
pub fn decode_to_tensor(
    decoder: &Decoder,
    bytes: &[u8],
    limits: &DecodeLimits,
    pre: &Preprocess,
) -> Result<(Tensor, u64), InputError> {
    to_tensor(&decode_guarded(decoder, bytes, limits)?, pre)
}

/// A small runtime for the synchronous callers (offline commands, the topic audit):
/// fetches run on it, two worker threads are plenty for I/O.
pub fn io_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dlsr-fetch")
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_its_code() {
        let spec = EnvelopeSpec { format: envelope::Format::Json, ..EnvelopeSpec::default() };
        assert_eq!(unpack(b"{}", &spec).unwrap_err().code(), "bad_envelope");
        let panicking: Decoder = Arc::new(|_, _| panic!("boom"));
        let err = decode_guarded(&panicking, b"x", &DecodeLimits::default()).unwrap_err();
        assert_eq!((err.code(), err.to_string().contains("boom")), (DECODER_PANIC, true));
        let err = decode_guarded(&default_decoder(), b"not an image", &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.code(), "unsupported_format");
        let policy = super::super::reference::FetchPolicy::default();
        let fetcher = Fetcher::new(policy);
        let mut u = unpack(b"https://nowhere.example/a.png", &EnvelopeSpec::default()).unwrap();
        let rt = io_runtime().unwrap();
        let err =
            rt.block_on(fetch_into(&mut u, &fetcher, &super::super::reference::Unobserved)).unwrap_err();
        assert_eq!(err.code(), "bad_reference", "{err}");
    }
}
