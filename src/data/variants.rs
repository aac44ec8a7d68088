//! Variants of a record set (IDX or CSV), asked for in the SPEC after a `?`:
//! `t10k-images-idx3-ubyte.gz?classes=5,7,9&rotate=30`. They make the near-OOD
//! benchmark's rows from data that installs offline: held-out classes (the labels come
//! from the IDX labels file beside the images, or the CSV's last column) and ID images
//! changed by a transform at a given strength, so that a user sees at which strength a
//! change becomes detectable.
//!
//! Options, applied in this order: `from=N` (skip the first N records), `classes=a,b,..`
//! (keep these labels), then the transforms `rotate=DEGREES`, `crop=FRACTION` (the
//! centre crop of that fraction of the side, resized back: a zoom), `blur=SIGMA`
//! (Gaussian, in pixels), `contrast=FACTOR` (around each image's mean), `brightness=DELTA`
//! (added, 0..255 scale), `flip=v|h`. Items keep their record number in their id
//! (`file#N`), so the same image under two transforms has the same id.

/// What a SPEC's options ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Variant {
    pub from: usize,
    pub classes: Option<Vec<u8>>,
    pub transforms: Vec<Transform>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Rotate(f64),
    Crop(f64),
    Blur(f64),
    Contrast(f64),
    Brightness(f64),
    FlipVertical,
    FlipHorizontal,
}

/// Splits `spec` into its path and options: the part after the last `?` when it reads as
/// `key=value` pairs joined by `&` (a path with a `?` of its own stays whole).
pub fn split_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once('?') {
        Some((path, options)) if !options.is_empty() && options.split('&').all(|kv| kv.contains('=')) => {
            (path, Some(options))
        }
        _ => (spec, None),
    }
}

impl Variant {
    /// Parses `key=value&...`; the error names the option and what it takes.
    pub fn parse(options: &str) -> Result<Self, String> {
        let mut v = Variant::default();
        for kv in options.split('&') {
            let (key, value) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not key=value"))?;
            let number = |lo: f64, hi: f64| -> Result<f64, String> {
                let x: f64 = value.parse().map_err(|_| format!("{key}={value:?}: not a number"))?;
                if !(lo..=hi).contains(&x) {
                    return Err(format!("{key}={value}: must be in {lo}..={hi}"));
                }
                Ok(x)
            };
            match key {
                "from" => v.from = value.parse().map_err(|_| format!("from={value:?}: not a count"))?,
                "classes" => {
                    let classes = value
                        .split(',')
                        .map(|c| c.trim().parse::<u8>().map_err(|_| format!("classes: {c:?} is not a label (0..255)")))
                        .collect::<Result<Vec<u8>, String>>()?;
                    v.classes = Some(classes);
                }
                "rotate" => v.transforms.push(Transform::Rotate(number(-360.0, 360.0)?)),
                "crop" => v.transforms.push(Transform::Crop(number(0.1, 1.0)?)),
                "blur" => v.transforms.push(Transform::Blur(number(0.0, 20.0)?)),
                "contrast" => v.transforms.push(Transform::Contrast(number(0.0, 10.0)?)),
                "brightness" => v.transforms.push(Transform::Brightness(number(-255.0, 255.0)?)),
                "flip" => v.transforms.push(match value {
                    "v" => Transform::FlipVertical,
                    "h" => Transform::FlipHorizontal,
                    other => return Err(format!("flip={other:?}: expected v or h")),
                }),
                other => {
                    return Err(format!(
                        "unknown option {other:?} (from, classes, rotate, crop, blur, contrast, brightness, flip)"
                    ))
                }
            }
        }
        Ok(v)
    }

    /// Applies the transforms to one grey image of `w` x `h` pixels.
    pub fn apply(&self, pixels: &mut [u8], w: usize, h: usize) {
        for t in &self.transforms {
            let out = transform(pixels, w, h, *t);
            pixels.copy_from_slice(&out);
        }
    }
}

/// Bilinear sample of `img` at (x, y), 0 outside.
fn sample(img: &[u8], w: usize, h: usize, x: f64, y: f64) -> f64 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: f64, yi: f64| -> f64 {
        if xi < 0.0 || yi < 0.0 || xi >= w as f64 || yi >= h as f64 {
            0.0
        } else {
            f64::from(img[yi as usize * w + xi as usize])
        }
    };
    at(x0, y0) * (1.0 - fx) * (1.0 - fy)
        + at(x0 + 1.0, y0) * fx * (1.0 - fy)
        + at(x0, y0 + 1.0) * (1.0 - fx) * fy
        + at(x0 + 1.0, y0 + 1.0) * fx * fy
}

fn transform(img: &[u8], w: usize, h: usize, t: Transform) -> Vec<u8> {
    let clip = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let mut out = vec![0u8; w * h];
    match t {
        Transform::Rotate(degrees) => {
            let (s, c) = degrees.to_radians().sin_cos();
            for y in 0..h {
                for x in 0..w {
                    // The source of each output pixel: the inverse rotation about the centre.
                    let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                    out[y * w + x] = clip(sample(img, w, h, c * dx + s * dy + cx, -s * dx + c * dy + cy));
                }
            }
        }
        Transform::Crop(fraction) => {
            for y in 0..h {
                for x in 0..w {
                    let sx = (x as f64 - cx) * fraction + cx;
                    let sy = (y as f64 - cy) * fraction + cy;
                    out[y * w + x] = clip(sample(img, w, h, sx, sy));
                }
            }
        }
        Transform::Blur(sigma) if sigma > 0.0 => {
            let radius = (3.0 * sigma).ceil() as isize;
            let kernel: Vec<f64> =
                (-radius..=radius).map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp()).collect();
            let total: f64 = kernel.iter().sum();
            let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
                let mut dst = vec![0.0; w * h];
                for y in 0..h {
                    for x in 0..w {
                        let mut acc = 0.0;
                        for (k, weight) in kernel.iter().enumerate() {
                            let d = k as isize - radius;
                            // Edges clamp (repeat the border pixel).
                            let (sx, sy) = if horizontal {
                                ((x as isize + d).clamp(0, w as isize - 1) as usize, y)
                            } else {
                                (x, (y as isize + d).clamp(0, h as isize - 1) as usize)
                            };
                            acc += weight * src[sy * w + sx];
                        }
                        dst[y * w + x] = acc / total;
                    }
                }
                dst
            };
            let src: Vec<f64> = img.iter().map(|&p| f64::from(p)).collect();
            let blurred = pass(&pass(&src, true), false);
            for (o, v) in out.iter_mut().zip(blurred) {
                *o = clip(v);
            }
        }
        Transform::Blur(_) => out.copy_from_slice(img),
        Transform::Contrast(factor) => {
            let mean = img.iter().map(|&p| f64::from(p)).sum::<f64>() / img.len().max(1) as f64;
            for (o, &p) in out.iter_mut().zip(img) {
                *o = clip(mean + factor * (f64::from(p) - mean));
            }
        }
        Transform::Brightness(delta) => {
            for (o, &p) in out.iter_mut().zip(img) {
                *o = clip(f64::from(p) + delta);
            }
        }
        Transform::FlipVertical => {
            for y in 0..h {
                out[y * w..(y + 1) * w].copy_from_slice(&img[(h - 1 - y) * w..(h - y) * w]);
            }
        }
        Transform::FlipHorizontal => {
            for y in 0..h {
                for x in 0..w {
                    out[y * w + x] = img[y * w + (w - 1 - x)];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        assert_eq!(split_spec("a/b.gz?classes=1,2&rotate=30"), ("a/b.gz", Some("classes=1,2&rotate=30")));
        assert_eq!(split_spec("a/what?.png"), ("a/what?.png", None));
        let v = Variant::parse("from=100&classes=5,7&rotate=30&blur=1.5").unwrap();
        assert_eq!(v.from, 100);
        assert_eq!(v.classes, Some(vec![5, 7]));
        assert_eq!(v.transforms, [Transform::Rotate(30.0), Transform::Blur(1.5)]);
        assert!(Variant::parse("spin=3").unwrap_err().contains("unknown option \"spin\""));
        assert!(Variant::parse("crop=0").unwrap_err().contains("crop=0"));
        assert!(Variant::parse("classes=1,x").unwrap_err().contains("\"x\""));
        assert!(Variant::parse("flip=d").is_err());
    }

    #[test]
    fn transforms_do_what_they_say() {
        // A 4x4 image with one bright pixel top-left of the centre.
        let (w, h) = (4, 4);
        let mut img = vec![0u8; 16];
        img[w + 1] = 200;
        let turned = transform(&img, w, h, Transform::Rotate(180.0));
        assert_eq!(turned[2 * w + 2], 200, "{turned:?}");
        let quarter = transform(&img, w, h, Transform::Rotate(90.0));
        assert_eq!(quarter.iter().map(|&p| u32::from(p)).sum::<u32>(), 200);
        assert_eq!(transform(&img, w, h, Transform::FlipVertical)[2 * w + 1], 200);
        assert_eq!(transform(&img, w, h, Transform::FlipHorizontal)[w + 2], 200);
        let blurred = transform(&img, w, h, Transform::Blur(1.0));
        assert!(blurred[w + 1] < 200 && blurred[w + 2] > 0, "{blurred:?}");
        let flat = transform(&img, w, h, Transform::Contrast(0.0));
        assert!(flat.iter().all(|&p| p == flat[0]), "contrast 0 leaves the mean only");
        assert_eq!(transform(&img, w, h, Transform::Brightness(100.0))[0], 100);
        assert_eq!(transform(&img, w, h, Transform::Brightness(100.0))[w + 1], 255);
        assert_eq!(transform(&img, w, h, Transform::Crop(1.0)), img, "crop 1 is the identity");
        let zoomed = transform(&img, w, h, Transform::Crop(0.5));
        assert!(zoomed.iter().filter(|&&p| p > 0).count() > 1, "a zoom spreads the pixel: {zoomed:?}");
    }
}
