//! Decoding image bytes (PNG, JPEG, WebP, GIF, BMP, TIFF) into 8-bit RGB, with limits.
//!
//! The format is sniffed from the bytes, never trusted from a file name. The header is
//! read first and its dimensions checked against [`DecodeLimits`] before any pixel buffer
//! is allocated, so a decompression bomb (a tiny file claiming 100000x100000 pixels) is
//! refused cheaply. The decoder's own allocation limit is set as a second guard.

use std::io::Cursor;

use image::{ImageFormat, ImageReader};
use serde::{Deserialize, Serialize};

/// Upper bounds applied before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: u64,
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest accepted width x height.
    pub max_pixels: u64,
    /// Largest accepted ratio of the longer side to the shorter (a 1 x 16384 strip
    /// stretched to the encoder's square is nothing it has seen); over it the item is
    /// dead-lettered with code `aspect_ratio`.
    pub max_aspect_ratio: f64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 20,
            max_width: 16_384,
            max_height: 16_384,
            max_pixels: 40_000_000,
            max_aspect_ratio: 32.0,
        }
    }
}

/// A decoded image: 8-bit RGB, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty input (0 bytes)")]
    Empty,
    #[error("{len} bytes is over the {max}-byte limit")]
    TooManyBytes { len: u64, max: u64 },
    #[error("{width}x{height} pixels is over the limits ({limits})")]
    TooLarge { width: u32, height: u32, limits: String },
    #[error("{width}x{height} pixels has an aspect ratio of {ratio:.1}, over max_aspect_ratio = {max}")]
    AspectRatio { width: u32, height: u32, ratio: f64, max: f64 },
    #[error("unsupported or unrecognised image format{0}")]
    UnsupportedFormat(String),
    #[error("undecodable {format} data: {reason}")]
    Undecodable { format: &'static str, reason: String },
}

impl DecodeError {
    /// A bounded code for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooManyBytes { .. } | Self::TooLarge { .. } => "too_large",
            Self::AspectRatio { .. } => "aspect_ratio",
            Self::UnsupportedFormat(_) => "unsupported_format",
            Self::Undecodable { .. } => "undecodable",
        }
    }
}

const SUPPORTED: [ImageFormat; 6] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

/// Sniffs the format from magic bytes; `None` for anything not supported.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    image::guess_format(bytes).ok().filter(|f| SUPPORTED.contains(f))
}

impl DecodeLimits {
    fn check_dimensions(&self, width: u32, height: u32) -> Result<(), DecodeError> {
        let pixels = u64::from(width) * u64::from(height);
        if width == 0 || height == 0 {
            return Err(DecodeError::Undecodable {
                format: "image",
                reason: format!("zero-sized image {width}x{height}"),
            });
        }
        if width > self.max_width || height > self.max_height || pixels > self.max_pixels {
            return Err(DecodeError::TooLarge {
                width,
                height,
                limits: format!("max {}x{}, {} pixels", self.max_width, self.max_height, self.max_pixels),
            });
        }
        let ratio = f64::from(width.max(height)) / f64::from(width.min(height));
        if ratio > self.max_aspect_ratio {
            return Err(DecodeError::AspectRatio { width, height, ratio, max: self.max_aspect_ratio });
        }
        Ok(())
    }

    fn reader_limits(&self) -> image::Limits {
        // Width and height are checked by `check_dimensions` with a better message; the
        // decoder only gets an allocation cap. Decoders may hold a 16-bit RGBA copy plus the output: 8 bytes per pixel is a
        // generous bound that still stops a bomb.
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).max(1 << 20));
        limits
    }
}

/// Bytes a decode of a `width x height` image may hold at its peak: the decoder's own
/// buffer (up to 4 bytes a pixel for 8-bit RGBA) and the RGB copy (3), plus the banded
/// resize's float buffers (small beside them). What the daemon's decode budget counts.
pub fn decode_bytes(width: u32, height: u32) -> u64 {
    u64::from(width) * u64::from(height) * 7 + (1 << 20)
}

/// The dimensions from the header alone, checked against the limits: no pixel is
/// decoded. (A format not recognised or a header that cannot be read gives the same
/// error [`decode`] would.)
pub fn dimensions(bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), DecodeError> {
    header(bytes, limits).map(|(_, width, height)| (width, height))
}

fn header(bytes: &[u8], limits: &DecodeLimits) -> Result<(ImageFormat, u32, u32), DecodeError> {
    let format = check_bytes(bytes, limits)?;
    let mut header = ImageReader::with_format(Cursor::new(bytes), format);
    header.limits(limits.reader_limits());
    let (width, height) = header.into_dimensions().map_err(|e| undecodable(format, e))?;
    limits.check_dimensions(width, height)?;
    Ok((format, width, height))
}

fn undecodable(format: ImageFormat, e: image::ImageError) -> DecodeError {
    match e {
        image::ImageError::Limits(l) => {
            DecodeError::TooLarge { width: 0, height: 0, limits: format!("decoder limit: {l}") }
        }
        other => DecodeError::Undecodable { format: format_name(format), reason: other.to_string() },
    }
}

fn check_bytes(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageFormat, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(DecodeError::TooManyBytes { len, max: limits.max_bytes });
    }
    sniff_format(bytes).ok_or_else(|| {
        let hint = match image::guess_format(bytes) {
            Ok(other) => format!(" ({other:?} is not accepted)"),
            Err(_) => String::new(),
        };
        DecodeError::UnsupportedFormat(hint)
    })
}

/// Decodes `bytes` to RGB under `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Image, DecodeError> {
    let (format, _, _) = header(bytes, limits)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.reader_limits());
    let decoded = reader.decode().map_err(|e| undecodable(format, e))?;
    let rgb = decoded.into_rgb8();
    Ok(Image { width: rgb.width(), height: rgb.height(), rgb: rgb.into_raw() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_a_png() {
        let img = decode(&png(5, 3), &DecodeLimits::default()).unwrap();
        assert_eq!((img.width, img.height, img.rgb.len()), (5, 3, 45));
        assert_eq!(&img.rgb[3..6], &[1, 0, 7]);
    }

    #[test]
    fn byte_limit_is_checked_before_sniffing() {
        let limits = DecodeLimits { max_bytes: 10, ..Default::default() };
        assert!(matches!(decode(&png(5, 3), &limits), Err(DecodeError::TooManyBytes { .. })));
    }

    #[test]
    fn a_strip_over_the_aspect_ratio_limit_has_its_own_code() {
        let err = decode(&png(200, 2), &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.code(), "aspect_ratio");
        assert!(err.to_string().contains("200x2") && err.to_string().contains("100.0"), "{err}");
        assert_eq!(dimensions(&png(64, 2), &DecodeLimits::default()).unwrap(), (64, 2));
        assert_eq!(
            dimensions(b"not an image", &DecodeLimits::default()).unwrap_err().code(),
            "unsupported_format"
        );
    }

    #[test]
    fn width_limit_names_the_dimensions() {
        let limits = DecodeLimits { max_width: 4, ..Default::default() };
        let err = decode(&png(5, 3), &limits).unwrap_err();
        assert_eq!(err.code(), "too_large");
        assert!(err.to_string().contains("5x3"), "{err}");
    }
}
