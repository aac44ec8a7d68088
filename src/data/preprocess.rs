//! Preprocessing: RGB pixels -> resized, normalised float tensor `[3, S, S]` for an
//! encoder. Runs on the CPU, per item (items differ in size), with libtorch's bilinear
//! resize (`align_corners = false`).
//!
//! Enlarging is always plain bilinear: what TensorFlow's resize did when the Lite weights
//! were trained and what `F.interpolate` does (on the 20 foolbox ImageNet photos, which
//! the ImageNet check enlarges to 256 before its centre crop, Lite0 gets 18/20 top-1 this
//! way and 17/20 with the anti-aliased filter). Shrinking is anti-aliased (libtorch's
//! `_upsample_bilinear2d_aa`, what `F.interpolate(..., antialias=True)` calls): plain
//! bilinear shrinking samples 4 pixels of a 1000-px photo's every 16 x 16 block at 64 px,
//! so fine texture aliases into patterns that are not in the image. Bundles written
//! before this choice carry `antialias = false` and keep their behaviour.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::decode::Image;

/// How an image is brought to the encoder's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resize straight to S x S (DLSR's setting: every image becomes 224x224).
    #[default]
    Stretch,
    /// ImageNet evaluation style: shorter side to S / 0.875, centre crop S x S.
    CenterCrop,
}

/// Per-channel normalisation applied to pixel values in 0..255: (x - mean) / std.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalisation {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Normalisation {
    /// EfficientNet-Lite's native preprocessing: (x - 127) / 128.
    pub const LITE: Self = Self { mean: [127.0; 3], std: [128.0; 3] };
    /// torchvision's ImageNet statistics, on the 0..255 scale.
    pub const IMAGENET: Self = Self { mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };

    /// Parses `lite`, `imagenet`, or `M,M,M/S,S,S` (0..255 scale).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lite" => Some(Self::LITE),
            "imagenet" => Some(Self::IMAGENET),
            custom => {
                let (m, sd) = custom.split_once('/')?;
                let triple = |t: &str| -> Option<[f64; 3]> {
                    let v: Vec<f64> = t.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
                    <[f64; 3]>::try_from(v).ok()
                };
                let std = triple(sd)?;
                std.iter().all(|s| *s > 0.0).then_some(Self { mean: triple(m)?, std })
            }
        }
    }
}

/// Everything that turns pixels into encoder input; part of a model's identity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square input in pixels.
    pub size: i64,
    pub resize: ResizeMode,
    pub normalisation: Normalisation,
    /// Anti-alias when shrinking (enlarging is plain bilinear either way). Absent, hence
    /// false, in bundles made before it existed.
    #[serde(default)]
    pub antialias: bool,
}

impl Preprocess {
    /// Turns an RGB image into a normalised `[3, size, size]` float tensor (CPU).
    pub fn apply(&self, image: &Image) -> Result<Tensor, tch::TchError> {
        let (w, h) = (i64::from(image.width), i64::from(image.height));
        let (nh, nw) = self.resized_dims(h, w);
        let resized = if h * w * 3 * 4 > BANDED_ABOVE_BYTES {
            resize_banded(image, nh, nw, self.antialias)?
        } else {
            let pixels = Tensor::f_from_slice(&image.rgb)?
                .f_view([1, h, w, 3])?
                .f_permute([0, 3, 1, 2])?
                .f_to_kind(Kind::Float)?;
            resize(&pixels, h, w, nh, nw, self.antialias, None)?
        };
        let resized = match self.resize {
            ResizeMode::Stretch => resized,
            ResizeMode::CenterCrop => {
                let top = (nh - self.size) / 2;
                let left = (nw - self.size) / 2;
                resized.f_narrow(2, top, self.size)?.f_narrow(3, left, self.size)?
            }
        };
        let mean =
            Tensor::f_from_slice(&self.normalisation.mean)?.f_view([1, 3, 1, 1])?.f_to_kind(Kind::Float)?;
        let std =
            Tensor::f_from_slice(&self.normalisation.std)?.f_view([1, 3, 1, 1])?.f_to_kind(Kind::Float)?;
        resized.f_sub(&mean)?.f_div(&std)?.f_squeeze_dim(0)
    }

    /// The size the image is resized to before any crop: (height, width).
    fn resized_dims(&self, h: i64, w: i64) -> (i64, i64) {
        match self.resize {
            ResizeMode::Stretch => (self.size, self.size),
            ResizeMode::CenterCrop => {
                let short = (self.size as f64 / 0.875).round() as i64;
                if h <= w {
                    (short, ((w * short) as f64 / h as f64).round() as i64)
                } else {
                    (((h * short) as f64 / w as f64).round() as i64, short)
                }
            }
        }
    }
}

/// Images whose full-resolution float copy would exceed this are resized in bands
/// ([`resize_banded`]); smaller ones in one step, exactly as before.
const BANDED_ABOVE_BYTES: i64 = 16 << 20;
/// Rows of the original converted to float at a time in [`resize_banded`].
const BAND_ROWS: i64 = 128;

/// Resizes a large image without ever holding it in float at full resolution (issue #21:
/// one 6000x6000 PNG raised `dlsr score --workers 1` from 213 MB to 828 MB peak, mostly
/// its 432 MB float copy). Bilinear resizing, anti-aliased or not, is separable: the
/// width is resized first, band of rows by band of rows (each row on its own, so bands
/// change nothing), into a `[1, 3, h, new_w]` float tensor (6000 x 224: 16 MB), then the
/// height. libtorch's anti-aliased kernel itself runs the width pass first, so the
/// result is its own up to float rounding (checked in the tests against the one-step
/// path). Peak extra memory: one band (6000 x 128 px: 9 MB) plus the half-resized image.
fn resize_banded(image: &Image, nh: i64, nw: i64, antialias: bool) -> Result<Tensor, tch::TchError> {
    let (w, h) = (i64::from(image.width), i64::from(image.height));
    // The filter is chosen for the whole resize, as the one-step path does.
    let filter = antialias && (nh < h || nw < w);
    let row_bytes = (w * 3) as usize;
    let mut bands = Vec::new();
    let mut top = 0;
    while top < h {
        let rows = BAND_ROWS.min(h - top);
        let bytes = &image.rgb[top as usize * row_bytes..(top + rows) as usize * row_bytes];
        let band = Tensor::f_from_slice(bytes)?
            .f_view([1, rows, w, 3])?
            .f_permute([0, 3, 1, 2])?
            .f_to_kind(Kind::Float)?;
        bands.push(resize(&band, rows, w, rows, nw, antialias, Some(filter))?);
        top += rows;
    }
    let half = Tensor::f_cat(&bands, 2)?;
    drop(bands);
    resize(&half, h, nw, nh, nw, antialias, Some(filter))
}

/// `filter`: the anti-aliasing decision when it was made for a larger resize (banded);
/// None: decided here.
fn resize(
    x: &Tensor,
    h: i64,
    w: i64,
    nh: i64,
    nw: i64,
    antialias: bool,
    filter: Option<bool>,
) -> Result<Tensor, tch::TchError> {
    if (h, w) == (nh, nw) {
        return Ok(x.shallow_clone());
    }
    let shrinks = nh < h || nw < w;
    if filter.unwrap_or(antialias && shrinks) {
        x.f_internal_upsample_bilinear2d_aa([nh, nw], false, None, None)
    } else {
        x.f_upsample_bilinear2d([nh, nw], false, None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_resizes() {
        let image = Image { width: 2, height: 2, rgb: vec![127; 12] };
        let p = Preprocess {
            size: 4,
            resize: ResizeMode::Stretch,
            normalisation: Normalisation::LITE,
            antialias: true,
        };
        let t = p.apply(&image).unwrap();
        assert_eq!(t.size(), [3, 4, 4]);
        assert!(t.abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // 2 rows x 8 columns, left half black, right half white: the crop of a wide image
        // is square and taken from the centre, so it holds both halves.
        let rgb: Vec<u8> = (0..16).flat_map(|i| if i % 8 < 4 { [0; 3] } else { [255; 3] }).collect();
        let image = Image { width: 8, height: 2, rgb };
        let norm = Normalisation { mean: [0.0; 3], std: [1.0; 3] };
        let p = Preprocess { size: 7, resize: ResizeMode::CenterCrop, normalisation: norm, antialias: true };
        let t = p.apply(&image).unwrap();
        assert_eq!(t.size(), [3, 7, 7]);
        assert!(t.double_value(&[0, 3, 0]) < 10.0);
        assert!(t.double_value(&[0, 3, 6]) > 245.0);
    }

    /// A one-pixel black-and-white checkerboard, 60 px square.
    fn checkerboard() -> Image {
        let rgb =
            (0..60 * 60).flat_map(|i| if (i % 60 + i / 60) % 2 == 0 { [0; 3] } else { [255; 3] }).collect();
        Image { width: 60, height: 60, rgb }
    }

    fn grey(antialias: bool, size: i64) -> Preprocess {
        let norm = Normalisation { mean: [0.0; 3], std: [1.0; 3] };
        Preprocess { size, resize: ResizeMode::Stretch, normalisation: norm, antialias }
    }

    #[test]
    fn shrinking_is_anti_aliased_and_enlarging_is_plain_bilinear() {
        // Shrunk to 16 px, the checkerboard is a flat mid-grey; plain bilinear samples a
        // few pixels per output pixel and makes up a coarse pattern.
        let std = |p: Preprocess| p.apply(&checkerboard()).unwrap().std(false).double_value(&[]);
        let (smooth, aliased) = (std(grey(true, 16)), std(grey(false, 16)));
        assert!(smooth < 10.0, "anti-aliased shrink: std {smooth}");
        assert!(aliased > 25.0, "plain shrink: std {aliased}");
        // Enlarging gives exactly plain bilinear whatever the setting.
        let small = Image { width: 5, height: 3, rgb: (0..45).map(|i| (i * 37 % 256) as u8).collect() };
        let (a, b) = (grey(true, 64).apply(&small).unwrap(), grey(false, 64).apply(&small).unwrap());
        assert_eq!(a.size(), [3, 64, 64]);
        assert!(a.equal(&b), "enlarging must not change with anti-aliasing");
    }

    /// The banded resize of a large image gives what the one-step resize gives (up to
    /// float rounding), for both filters and both resize modes.
    #[test]
    fn a_large_image_resized_in_bands_matches_the_one_step_resize() {
        let (w, h) = (2400i64, 1900i64);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919 + i / 3001 * 13) % 256) as u8).collect();
        let image = Image { width: w as u32, height: h as u32, rgb };
        assert!(w * h * 3 * 4 > BANDED_ABOVE_BYTES, "the test image takes the banded path");
        for antialias in [true, false] {
            for mode in [ResizeMode::Stretch, ResizeMode::CenterCrop] {
                let p = Preprocess { size: 224, resize: mode, normalisation: Normalisation::LITE, antialias };
                let banded = p.apply(&image).unwrap();
                let (nh, nw) = p.resized_dims(h, w);
                let pixels = Tensor::from_slice(&image.rgb)
                    .view([1, h, w, 3])
                    .permute([0, 3, 1, 2])
                    .to_kind(Kind::Float);
                let mut one_step = resize(&pixels, h, w, nh, nw, antialias, None).unwrap();
                if mode == ResizeMode::CenterCrop {
                    one_step = one_step.narrow(2, (nh - 224) / 2, 224).narrow(3, (nw - 224) / 2, 224);
                }
                let one_step = ((one_step - 127.0) / 128.0).squeeze_dim(0);
                let diff = (&banded - &one_step).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "antialias {antialias}, {mode:?}: max difference {diff}");
            }
        }
    }

    #[test]
    fn parses_normalisations() {
        assert_eq!(Normalisation::parse("lite"), Some(Normalisation::LITE));
        let n = Normalisation::parse("1,2,3/4,5,6").unwrap();
        assert_eq!((n.mean, n.std), ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]));
        assert!(Normalisation::parse("1,2/3,4").is_none());
        assert!(Normalisation::parse("1,2,3/0,1,1").is_none());
    }
}
