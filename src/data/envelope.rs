//! Message formats: where a message's image is. A value is the image's bytes (`raw`), a
//! JSON event that carries the image as base64 or a reference to it (`json`), or either,
//! decided per value (`auto`). A value that claims to be JSON and is not usable is an
//! error of its own (`bad_envelope`), never decoded as an image: a JSON event scored as
//! garbage pixels would be a wrong verdict, a dead letter says what is wrong with it.
//!
//! Fields are named by JSON Pointers (RFC 6901, `/image`, `/meta/uri`). `passthrough`
//! fields are copied into the verdict under `input`, keyed by the pointer without its
//! leading `/`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a topic's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The value is the encoded image.
    Raw,
    /// The value is a JSON object carrying the image or a reference to it.
    Json,
    /// JSON when the value starts with `{`, a reference when it is one URI on its own
    /// (`s3://bucket/key`), else the image's bytes (no image format starts with either).
    #[default]
    Auto,
}

/// Where the parts of a JSON event are, for one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvelopeSpec {
    pub format: Format,
    /// JSON Pointer to a base64 image (standard or URL-safe alphabet, padding optional,
    /// a `data:image/...;base64,` prefix allowed). Empty: none.
    pub image_pointer: String,
    /// JSON Pointer to a reference (`s3://`, `gs://`, `az://`, `abfs://`, `http(s)://`,
    /// `file://`). Empty: none. Used when the event has no image at `image_pointer`.
    pub uri_pointer: String,
    /// JSON Pointer to the item id (a string or a number); it overrides the message key.
    /// Empty, or absent from an event: the key, as for raw values.
    pub id_pointer: String,
    /// Fields copied into the verdict under `input` (absent fields are left out).
    pub passthrough_pointers: Vec<String>,
    /// JSON Pointer to the source the window audit groups by (`audit.group_by =
    /// "json:/pointer"`), read while the event is parsed anyway. Not a config key: set
    /// from `[audit]`.
    #[serde(skip)]
    pub group_pointer: String,
}

impl Default for EnvelopeSpec {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            image_pointer: "/image".into(),
            uri_pointer: "/uri".into(),
            id_pointer: String::new(),
            passthrough_pointers: Vec::new(),
            group_pointer: String::new(),
        }
    }
}

/// A per-topic override of [`EnvelopeSpec`]: each field set replaces the default's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EnvelopeOverride {
    pub format: Option<Format>,
    pub image_pointer: Option<String>,
    pub uri_pointer: Option<String>,
    pub id_pointer: Option<String>,
    pub passthrough_pointers: Option<Vec<String>>,
}

impl EnvelopeOverride {
    pub fn apply(&self, base: &EnvelopeSpec) -> EnvelopeSpec {
        EnvelopeSpec {
            format: self.format.unwrap_or(base.format),
            image_pointer: self.image_pointer.clone().unwrap_or_else(|| base.image_pointer.clone()),
            uri_pointer: self.uri_pointer.clone().unwrap_or_else(|| base.uri_pointer.clone()),
            id_pointer: self.id_pointer.clone().unwrap_or_else(|| base.id_pointer.clone()),
            passthrough_pointers: self
                .passthrough_pointers
                .clone()
                .unwrap_or_else(|| base.passthrough_pointers.clone()),
            group_pointer: base.group_pointer.clone(),
        }
    }
}

/// Why a value could not be unpacked (dead-letter code `bad_envelope`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the value is not valid JSON ({0})")]
    NotJson(String),
    #[error("the value is JSON but not an object (a {0})")]
    NotObject(&'static str),
    #[error("the event has no image at {image:?} and no reference at {uri:?}")]
    NoImage { image: String, uri: String },
    #[error("{pointer} is a {found}, not a string")]
    NotString { pointer: String, found: &'static str },
    #[error("{pointer} is not valid base64: {reason}")]
    BadBase64 { pointer: String, reason: String },
    #[error("{pointer} is empty")]
    Empty { pointer: String },
}

impl EnvelopeError {
    pub const CODE: &'static str = "bad_envelope";
}

/// What a value says about its image.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// The value itself is the encoded image.
    Value,
    /// The encoded image, decoded from base64.
    Bytes(Vec<u8>),
    /// A reference to fetch ([`super::reference`]).
    Reference(String),
}

/// A value unpacked: its image (or reference), and from a JSON event the id and the
/// passthrough fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpacked {
    pub payload: Payload,
    pub id: Option<String>,
    pub input: Option<Map<String, Value>>,
    /// The value at `group_pointer`: a string as is, any other JSON value as its text.
    pub group: Option<String>,
}

/// URI schemes a bare reference value may use.
const REFERENCE_SCHEMES: [&str; 8] =
    ["s3://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://", "file://"];

/// Whether `value` is one URI of a known scheme and nothing else.
fn bare_reference(value: &[u8]) -> Option<String> {
    if value.len() > 8192 {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim();
    let known = REFERENCE_SCHEMES
        .iter()
        .any(|s| text.len() > s.len() && text.as_bytes()[..s.len()].eq_ignore_ascii_case(s.as_bytes()));
    (known && !text.chars().any(char::is_whitespace)).then(|| text.to_string())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Reads a value as `spec` says; a raw value is not copied ([`Payload::Value`]).
pub fn unpack(value: &[u8], spec: &EnvelopeSpec) -> Result<Unpacked, EnvelopeError> {
    let raw = Ok(Unpacked { payload: Payload::Value, id: None, input: None, group: None });
    match spec.format {
        Format::Raw => raw,
        Format::Json => unpack_json(value, spec),
        Format::Auto => {
            let first = value.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'{') {
                unpack_json(value, spec)
            } else if let Some(uri) = bare_reference(value) {
                Ok(Unpacked { payload: Payload::Reference(uri), id: None, input: None, group: None })
            } else {
                raw
            }
        }
    }
}

fn unpack_json(value: &[u8], spec: &EnvelopeSpec) -> Result<Unpacked, EnvelopeError> {
    let parsed: Value = serde_json::from_slice(value).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let Value::Object(_) = &parsed else { return Err(EnvelopeError::NotObject(kind_of(&parsed))) };
    let field = |pointer: &str| (!pointer.is_empty()).then(|| parsed.pointer(pointer)).flatten();
    let string_at = |pointer: &str| -> Result<Option<&str>, EnvelopeError> {
        match field(pointer) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(EnvelopeError::Empty { pointer: pointer.into() })
            }
            Some(Value::String(s)) => Ok(Some(s.trim())),
            Some(other) => Err(EnvelopeError::NotString { pointer: pointer.into(), found: kind_of(other) }),
        }
    };
    let payload = if let Some(b64) = string_at(&spec.image_pointer)? {
        Payload::Bytes(
            decode_base64(b64)
                .map_err(|reason| EnvelopeError::BadBase64 { pointer: spec.image_pointer.clone(), reason })?,
        )
    } else if let Some(uri) = string_at(&spec.uri_pointer)? {
        Payload::Reference(uri.to_string())
    } else {
        return Err(EnvelopeError::NoImage {
            image: spec.image_pointer.clone(),
            uri: spec.uri_pointer.clone(),
        });
    };
    let id = match field(&spec.id_pointer) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let input = (!spec.passthrough_pointers.is_empty()).then(|| {
        spec.passthrough_pointers
            .iter()
            .filter_map(|p| field(p).map(|v| (p.trim_start_matches('/').to_string(), v.clone())))
            .collect()
    });
    let group = field(&spec.group_pointer).filter(|v| !v.is_null()).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    Ok(Unpacked { payload, id, input, group })
}

/// Base64 in either alphabet, padding optional, after an optional `data:...;base64,`.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::alphabet;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::{DecodePaddingMode, Engine};
    let body = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((media, data)) if media.ends_with(";base64") => data,
            Some((media, _)) => return Err(format!("a data: URL that is not base64 (data:{media},...)")),
            None => return Err("a data: URL without a comma".into()),
        },
        None => text,
    };
    // Line breaks are allowed (MIME base64 wraps at 76); nothing else is skipped.
    let compact: String = body.chars().filter(|c| !matches!(c, '\n' | '\r')).collect();
    if compact.is_empty() {
        return Err("no data".into());
    }
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url_safe = compact.contains(['-', '_']);
    let engine =
        GeneralPurpose::new(if url_safe { &alphabet::URL_SAFE } else { &alphabet::STANDARD }, config);
    engine.decode(compact.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(spec: &EnvelopeSpec, v: &str) -> Result<Unpacked, EnvelopeError> {
        unpack(v.as_bytes(), spec)
    }

    #[test]
    fn auto_tells_json_references_and_images_apart() {
        let spec = EnvelopeSpec::default();
        let png = b"\x89PNG\r\n\x1a\nrest".to_vec();
        assert_eq!(unpack(&png, &spec).unwrap().payload, Payload::Value);
        assert_eq!(
            json(&spec, " s3://bucket/a b").unwrap().payload,
            Payload::Value,
            "a value with a space is not one URI"
        );
        assert_eq!(
            json(&spec, "s3://bucket/k.png\n").unwrap().payload,
            Payload::Reference("s3://bucket/k.png".into())
        );
        assert_eq!(
            json(&spec, r#" {"uri": "https://h/x.png"}"#).unwrap().payload,
            Payload::Reference("https://h/x.png".into())
        );
        assert!(matches!(json(&spec, "{not json"), Err(EnvelopeError::NotJson(_))));
        let raw = EnvelopeSpec { format: Format::Raw, ..spec.clone() };
        assert_eq!(json(&raw, r#"{"uri":"s3://b/k"}"#).unwrap().payload, Payload::Value);
    }

    #[test]
    fn base64_in_every_common_spelling_gives_the_same_bytes() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        use base64::Engine;
        let std = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        for text in
            [std.clone(), url, format!("data:image/png;base64,{std}"), std.trim_end_matches('=').to_string()]
        {
            assert_eq!(decode_base64(&text).unwrap(), bytes, "{text}");
        }
        let wrapped: String =
            std.as_bytes().chunks(76).map(|c| String::from_utf8_lossy(c) + "\r\n").collect();
        assert_eq!(decode_base64(&wrapped).unwrap(), bytes);
        assert!(decode_base64("abc$").is_err());
        assert!(decode_base64("data:image/png,rawdata").is_err());
    }

    #[test]
    fn json_events_give_image_id_and_passthrough_or_a_reason() {
        let spec = EnvelopeSpec {
            format: Format::Json,
            id_pointer: "/id".into(),
            passthrough_pointers: vec!["/camera".into(), "/meta/site".into(), "/absent".into()],
            ..EnvelopeSpec::default()
        };
        let u =
            json(&spec, r#"{"id": 42, "image": "AAEC", "camera": "c7", "meta": {"site": "north"}}"#).unwrap();
        assert_eq!(u.payload, Payload::Bytes(vec![0, 1, 2]));
        assert_eq!(u.id.as_deref(), Some("42"));
        let input = u.input.unwrap();
        assert_eq!(input.get("camera"), Some(&Value::from("c7")));
        assert_eq!(input.get("meta/site"), Some(&Value::from("north")));
        assert_eq!(input.len(), 2);
        // The image wins over the reference when both are there.
        let both = json(&spec, r#"{"image": "AAEC", "uri": "s3://b/k"}"#).unwrap();
        assert_eq!(both.payload, Payload::Bytes(vec![0, 1, 2]));
        for (value, want) in [
            (r#"[1, 2]"#, "not an object (a array)"),
            (r#"{"id": "x"}"#, "no image at \"/image\" and no reference at \"/uri\""),
            (r#"{"image": 7}"#, "/image is a number, not a string"),
            (r#"{"image": "@@@@"}"#, "/image is not valid base64"),
            (r#"{"image": "  "}"#, "/image is empty"),
            ("\u{feff}{}", "not valid JSON"),
        ] {
            let err = json(&spec, value).unwrap_err().to_string();
            assert!(err.contains(want), "{value}: {err}");
        }
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = EnvelopeSpec::default();
        let o = EnvelopeOverride {
            format: Some(Format::Json),
            uri_pointer: Some("/ref".into()),
            ..Default::default()
        };
        let s = o.apply(&base);
        assert_eq!(
            (s.format, s.uri_pointer.as_str(), s.image_pointer.as_str()),
            (Format::Json, "/ref", "/image")
        );
    }
}
