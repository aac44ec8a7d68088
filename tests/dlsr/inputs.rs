//! Bad and unusual input: every supported format decodes; truncated, empty, mislabelled
//! and bomb files each give their typed error, without panicking and without allocating
//! what a header claims.

use std::cell::Cell;
use std::io::Cursor;

use dlsr::data::{decode, DataSet, DecodeError, DecodeLimits};

/// Records the largest single allocation made by each thread, so a test can prove that
/// refusing a decompression bomb never asked for the claimed buffer.
struct TrackingAllocator;

thread_local! {
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

unsafe impl std::alloc::GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = LARGEST_ALLOCATION.try_with(|l| l.set(l.get().max(layout.size())));
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 100]));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn every_supported_format_decodes_to_rgb() {
    use image::ImageFormat::*;
    for format in [Png, Jpeg, WebP, Gif, Bmp, Tiff] {
        let img = decode::decode(&encoded(format), &DecodeLimits::default())
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!((img.width, img.height, img.rgb.len()), (40, 30, 40 * 30 * 3), "{format:?}");
    }
}

#[test]
fn grey_png_is_replicated_to_three_channels() {
    let img = image::GrayImage::from_fn(4, 4, |x, _| image::Luma([x as u8 * 50]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    let rgb = decode::decode(&out.into_inner(), &DecodeLimits::default()).unwrap();
    assert_eq!(&rgb.rgb[3..6], &[50, 50, 50]);
}

#[test]
fn truncated_png_is_undecodable() {
    let png = encoded(image::ImageFormat::Png);
    let err = decode::decode(&png[..png.len() / 2], &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Undecodable { format: "PNG", .. }), "{err:?}");
    assert_eq!(err.code(), "undecodable");
}

#[test]
fn zero_bytes_are_empty() {
    let err = decode::decode(&[], &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Empty));
    assert_eq!(err.code(), "empty");
}

#[test]
fn text_named_jpg_is_unsupported_format() {
    let err = decode::decode(b"hello, I am not a JPEG\n", &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedFormat(_)), "{err:?}");
    assert_eq!(err.code(), "unsupported_format");
}

use dlsr::cli::demo::png_claiming;

#[test]
fn decompression_bomb_is_refused_before_allocation() {
    let bomb = png_claiming(100_000, 100_000);
    LARGEST_ALLOCATION.with(|l| l.set(0));
    let err = decode::decode(&bomb, &DecodeLimits::default()).unwrap_err();
    let largest = LARGEST_ALLOCATION.with(|l| l.get());
    assert!(matches!(err, DecodeError::TooLarge { width: 100_000, height: 100_000, .. }), "{err:?}");
    assert_eq!(err.code(), "too_large");
    // The claimed image is 30 GB; refusing it must not come near that.
    assert!(largest < 4 << 20, "largest allocation while refusing the bomb: {largest} bytes");
}

#[test]
fn pixel_limit_applies_even_within_width_and_height_limits() {
    let limits = DecodeLimits { max_pixels: 1000, ..Default::default() };
    let err = decode::decode(&png_claiming(100, 100), &limits).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }), "{err:?}");
}

#[test]
fn bad_files_in_a_folder_are_item_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let png = encoded(image::ImageFormat::Png);
    std::fs::write(dir.path().join("good.png"), &png).unwrap();
    std::fs::write(dir.path().join("truncated.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(dir.path().join("empty.png"), b"").unwrap();
    std::fs::write(dir.path().join("text.jpg"), b"plain text").unwrap();
    std::fs::write(dir.path().join("bomb.png"), png_claiming(100_000, 100_000)).unwrap();
    let set = DataSet::open(dir.path().to_str().unwrap()).unwrap();
    let limits = DecodeLimits::default();
    let mut outcomes: Vec<(String, &str)> = set
        .iter()
        .map(|item| {
            let item = item.unwrap();
            let id = item.id.clone();
            match dlsr::data::source::decode_item(&item, &limits) {
                Ok(_) => (id, "ok"),
                Err(e) => {
                    assert!(e.to_string().starts_with(&id), "error must name the file: {e}");
                    (id, e.code())
                }
            }
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            ("bomb.png".to_string(), "too_large"),
            ("empty.png".to_string(), "empty"),
            ("good.png".to_string(), "ok"),
            ("text.jpg".to_string(), "unsupported_format"),
            ("truncated.png".to_string(), "undecodable"),
        ]
    );
}
