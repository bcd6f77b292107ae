//! Turning `u8` images into normalized `f32` NCHW tensors.
//!
//! The steps, in order, as torchvision's `Resize`, `CenterCrop`, `Pad`,
//! `ToTensor` and `Normalize` apply them:
//!
//! 1. `resize`: the shorter side becomes `resize` pixels, the aspect ratio
//!    kept, with Pillow's antialiased bilinear filter (bit-identical to
//!    Pillow for 8-bit images; see [`transform`](super::transform)).
//! 2. `crop`: the centred `crop x crop` window.
//! 3. `pad`: zero pixels added on every side, in pixel space *before*
//!    normalizing, so padded pixels become `(0 * scale - mean[c]) / std[c]`
//!    — what a model trained on `transforms.Pad(p)` followed by
//!    `transforms.Normalize` saw.
//! 4. For each pixel value `x` of channel `c`:
//!    `y = (x * scale - mean[c]) / std[c]`.
//!
//! Conversion goes through a 256-entry lookup table per channel (built once
//! per dataset), so a batch costs one table read per output pixel and no
//! allocation beyond the output buffer (plus, with `resize` or `crop`, one
//! image-sized buffer per image).

use serde::{Deserialize, Serialize};

use crate::error::{CalibError, Result};

/// Preprocessing from `u8` pixels to the model's `f32` input.
///
/// `mean` and `std` hold one value per channel, or a single value used for
/// every channel.
///
/// ```
/// use qint8_calibration::dataset::Preprocess;
///
/// // MNIST as torchvision normalizes it.
/// let p = Preprocess { mean: vec![0.1307], std: vec![0.3081], ..Preprocess::default() };
/// let lut = p.lookup_tables(1)?;
/// assert!((lut[0][255] - (1.0 - 0.1307) / 0.3081).abs() < 1e-6);
/// # Ok::<(), qint8_calibration::CalibError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preprocess {
    /// Zero pixels added on each side (top, bottom, left, right).
    pub pad: usize,
    /// Per-channel mean subtracted after scaling (length 1 or C).
    pub mean: Vec<f32>,
    /// Per-channel divisor applied after subtracting the mean (length 1 or
    /// C; nonzero and finite).
    pub std: Vec<f32>,
    /// Factor applied to the raw pixel value first (default `1/255`).
    pub scale: f32,
    /// Size the shorter side is resized to, keeping the aspect ratio
    /// (torchvision `Resize(resize)`); `None` keeps the size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// Side of the centred square kept after resizing (torchvision
    /// `CenterCrop(crop)`); `None` keeps the whole image. At most
    /// `resize` when both are set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<usize>,
}

impl Default for Preprocess {
    /// No resizing, cropping or padding, pixels scaled to `[0, 1]`: `pad 0,
    /// mean [0], std [1], scale 1/255, resize None, crop None`.
    fn default() -> Self {
        Self {
            pad: 0,
            mean: vec![0.0],
            std: vec![1.0],
            scale: 1.0 / 255.0,
            resize: None,
            crop: None,
        }
    }
}

impl Preprocess {
    /// Default preprocessing with the given per-channel mean and std.
    pub fn normalize(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self {
            mean,
            std,
            ..Self::default()
        }
    }

    /// torchvision's ImageNet evaluation transform: `Resize(256)`,
    /// `CenterCrop(224)`, `ToTensor()`, `Normalize(mean=[0.485, 0.456,
    /// 0.406], std=[0.229, 0.224, 0.225])`.
    ///
    /// ```
    /// use qint8_calibration::dataset::Preprocess;
    ///
    /// let p = Preprocess::imagenet();
    /// assert_eq!((p.resize, p.crop, p.pad), (Some(256), Some(224), 0));
    /// assert_eq!(p.output_hw(375, 500), (224, 224));
    /// ```
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            resize: Some(256),
            crop: Some(224),
            ..Self::default()
        }
    }

    /// This preprocessing with `pad` pixels of zero padding on each side.
    pub fn with_pad(mut self, pad: usize) -> Self {
        self.pad = pad;
        self
    }

    /// This preprocessing with the shorter side resized to `resize` pixels.
    pub fn with_resize(mut self, resize: usize) -> Self {
        self.resize = Some(resize);
        self
    }

    /// This preprocessing with a centred `crop x crop` crop.
    pub fn with_crop(mut self, crop: usize) -> Self {
        self.crop = Some(crop);
        self
    }

    /// Whether images are resized or cropped (their size changes before
    /// padding).
    pub fn changes_size(&self) -> bool {
        self.resize.is_some() || self.crop.is_some()
    }

    /// Checks `resize` and `crop`: neither may be zero, and `crop` may not
    /// exceed `resize` (the crop would reach outside every resized image).
    ///
    /// Errors with [`CalibError::BadPreprocess`] naming the field.
    pub fn check_geometry(&self) -> Result<()> {
        if self.resize == Some(0) {
            return Err(CalibError::BadPreprocess {
                field: "resize",
                reason: "must be at least 1".into(),
            });
        }
        if self.crop == Some(0) {
            return Err(CalibError::BadPreprocess {
                field: "crop",
                reason: "must be at least 1".into(),
            });
        }
        if let (Some(r), Some(c)) = (self.resize, self.crop) {
            if c > r {
                return Err(CalibError::BadPreprocess {
                    field: "crop",
                    reason: format!(
                        "crop {c} is larger than resize {r}: the shorter side of a resized \
                         image is {r} pixels"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks the parameters against images with `channels` channels.
    ///
    /// Errors with [`CalibError::BadPreprocess`] when `mean`/`std` have a
    /// length other than 1 or `channels`, a `std` is zero or non-finite, a
    /// `mean` or `scale` is non-finite, a normalized value would not be
    /// finite, or `resize`/`crop` fail [`check_geometry`](Self::check_geometry).
    pub fn validate(&self, channels: usize) -> Result<()> {
        self.check_geometry()?;
        self.lookup_tables(channels).map(|_| ())
    }

    /// Height and width after `resize` and `crop` (before padding) of an
    /// image of `height x width`; `None` when a side is zero or a size
    /// overflows.
    pub fn resized_cropped_hw(&self, height: usize, width: usize) -> Option<(usize, usize)> {
        let (h, w) = match self.resize {
            Some(r) => super::transform::resized_hw(height, width, r)?,
            None => (height, width),
        };
        Some(match self.crop {
            Some(c) => (c, c),
            None => (h, w),
        })
    }

    /// Output height and width for input `height` x `width`: after
    /// `resize`, `crop` and `pad`.
    ///
    /// Saturates instead of overflowing (such sizes fail later anyway); a
    /// zero side stays zero.
    pub fn output_hw(&self, height: usize, width: usize) -> (usize, usize) {
        let (h, w) = if height == 0 || width == 0 {
            (height, width)
        } else {
            self.resized_cropped_hw(height, width)
                .unwrap_or((usize::MAX, usize::MAX))
        };
        let extra = self.pad.saturating_mul(2);
        (h.saturating_add(extra), w.saturating_add(extra))
    }

    /// One 256-entry table per channel: `table[c][x]` is the normalized
    /// value of pixel value `x` in channel `c` (`table[c][0]` is also the
    /// value of padded pixels).
    pub fn lookup_tables(&self, channels: usize) -> Result<Vec<[f32; 256]>> {
        if channels == 0 {
            return Err(CalibError::BadPreprocess {
                field: "channels",
                reason: "images have zero channels".into(),
            });
        }
        let per_channel = |field: &'static str, v: &[f32]| -> Result<()> {
            if v.len() == 1 || v.len() == channels {
                Ok(())
            } else {
                Err(CalibError::BadPreprocess {
                    field,
                    reason: format!(
                        "has {} values; expected 1 or {channels} (one per channel)",
                        v.len()
                    ),
                })
            }
        };
        per_channel("mean", &self.mean)?;
        per_channel("std", &self.std)?;
        if !self.scale.is_finite() {
            return Err(CalibError::BadPreprocess {
                field: "scale",
                reason: format!("must be finite, got {}", self.scale),
            });
        }
        if let Some((i, m)) = self.mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(CalibError::BadPreprocess {
                field: "mean",
                reason: format!("value {m} at channel {i} is not finite"),
            });
        }
        if let Some((i, s)) = self
            .std
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_finite() || **s == 0.0)
        {
            return Err(CalibError::BadPreprocess {
                field: "std",
                reason: format!("value {s} at channel {i} must be nonzero and finite"),
            });
        }
        let mut tables = Vec::with_capacity(channels);
        for c in 0..channels {
            let mean = self.mean[if self.mean.len() == 1 { 0 } else { c }];
            let std = self.std[if self.std.len() == 1 { 0 } else { c }];
            let mut t = [0f32; 256];
            for (x, y) in t.iter_mut().enumerate() {
                *y = (x as f32 * self.scale - mean) / std;
            }
            if let Some(bad) = t.iter().find(|y| !y.is_finite()) {
                return Err(CalibError::BadPreprocess {
                    field: "std",
                    reason: format!(
                        "normalizing channel {c} (mean {mean}, std {std}, scale {}) \
                         gives the non-finite value {bad}",
                        self.scale
                    ),
                });
            }
            tables.push(t);
        }
        Ok(tables)
    }
}

/// Writes `n` images, NHWC `u8` in `src`, as padded, normalized NCHW `f32`
/// into `out` using the per-channel tables from
/// [`Preprocess::lookup_tables`].
///
/// `src` must hold `n * h * w * c` bytes and `out`
/// `n * c * (h + 2 pad) * (w + 2 pad)` floats, else
/// [`CalibError::LengthMismatch`].
#[allow(clippy::too_many_arguments)]
pub fn convert_nhwc_u8(
    src: &[u8],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    pad: usize,
    tables: &[[f32; 256]],
    out: &mut [f32],
) -> Result<()> {
    let overflow = || CalibError::BadPreprocess {
        field: "pad",
        reason: format!("output size of {n} images {c}x{h}x{w} with pad {pad} overflows"),
    };
    let hp = pad
        .checked_mul(2)
        .and_then(|p2| p2.checked_add(h))
        .ok_or_else(overflow)?;
    let wp = pad
        .checked_mul(2)
        .and_then(|p2| p2.checked_add(w))
        .ok_or_else(overflow)?;
    let plane = hp.checked_mul(wp).ok_or_else(overflow)?;
    let out_image = plane.checked_mul(c).ok_or_else(overflow)?;
    let out_len = out_image.checked_mul(n).ok_or_else(overflow)?;
    let img_len = h
        .checked_mul(w)
        .and_then(|x| x.checked_mul(c))
        .ok_or_else(overflow)?;
    let src_len = img_len.checked_mul(n).ok_or_else(overflow)?;
    if src.len() != src_len {
        return Err(CalibError::LengthMismatch {
            what: "source pixels (n*h*w*c)",
            expected: src_len,
            got: src.len(),
        });
    }
    if out.len() != out_len {
        return Err(CalibError::LengthMismatch {
            what: "output buffer (n*c*(h+2pad)*(w+2pad))",
            expected: out_len,
            got: out.len(),
        });
    }
    if tables.len() != c {
        return Err(CalibError::LengthMismatch {
            what: "lookup tables vs. channels",
            expected: c,
            got: tables.len(),
        });
    }
    if out_len == 0 {
        return Ok(());
    }
    for (i, dst_img) in out.chunks_exact_mut(out_image).enumerate() {
        let img = &src[i * img_len..(i + 1) * img_len];
        for (ch, (dst, lut)) in dst_img.chunks_exact_mut(plane).zip(tables).enumerate() {
            let pad_value = lut[0];
            dst[..pad * wp].fill(pad_value);
            dst[(pad + h) * wp..].fill(pad_value);
            for y in 0..h {
                let row = &mut dst[(pad + y) * wp..(pad + y + 1) * wp];
                row[..pad].fill(pad_value);
                row[pad + w..].fill(pad_value);
                let row = &mut row[pad..pad + w];
                if c == 1 {
                    let s = &img[y * w..(y + 1) * w];
                    for (d, &x) in row.iter_mut().zip(s) {
                        *d = lut[usize::from(x)];
                    }
                } else {
                    let s = &img[y * w * c..(y + 1) * w * c];
                    for (d, px) in row.iter_mut().zip(s.chunks_exact(c)) {
                        *d = lut[usize::from(px[ch])];
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_unit_scale() {
        let t = Preprocess::default().lookup_tables(3).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[2][0], 0.0);
        assert_eq!(t[2][255], 1.0);
    }

    #[test]
    fn rejects_bad_parameters() {
        let p = Preprocess::normalize(vec![0.1, 0.2], vec![1.0]);
        assert!(p.validate(3).is_err());
        assert!(p.validate(2).is_ok());
        assert!(Preprocess::normalize(vec![0.0], vec![0.0])
            .validate(1)
            .is_err());
        assert!(Preprocess::normalize(vec![0.0], vec![f32::NAN])
            .validate(1)
            .is_err());
        assert!(Preprocess::normalize(vec![f32::INFINITY], vec![1.0])
            .validate(1)
            .is_err());
        let p = Preprocess {
            scale: f32::INFINITY,
            ..Preprocess::default()
        };
        assert!(p.validate(1).is_err());
        // Finite parameters whose result overflows.
        let p = Preprocess {
            scale: 1.0,
            std: vec![1e-40],
            ..Preprocess::default()
        };
        assert!(p.validate(1).is_err());
        assert!(Preprocess::default().validate(0).is_err());
        assert!(Preprocess::default().with_resize(0).validate(1).is_err());
        assert!(Preprocess::default().with_crop(0).validate(1).is_err());
        let p = Preprocess::default().with_resize(32).with_crop(33);
        assert!(matches!(
            p.validate(1),
            Err(CalibError::BadPreprocess { field: "crop", .. })
        ));
        assert!(Preprocess::imagenet().validate(3).is_ok());
        assert!(Preprocess::imagenet().validate(2).is_err());
    }

    #[test]
    fn output_sizes_follow_resize_crop_pad() {
        let p = Preprocess::default().with_resize(8).with_pad(1);
        assert_eq!(p.output_hw(20, 40), (10, 18));
        assert_eq!(p.clone().with_crop(6).output_hw(20, 40), (8, 8));
        assert_eq!(Preprocess::default().with_crop(5).output_hw(3, 9), (5, 5));
        assert_eq!(Preprocess::default().with_pad(2).output_hw(0, 3), (4, 7));
    }

    #[test]
    fn serde_defaults_and_unknown_fields() {
        let p: Preprocess = serde_json::from_str(r#"{"pad": 2}"#).unwrap();
        assert_eq!((p.pad, p.resize, p.crop), (2, None, None));
        let p: Preprocess = serde_json::from_str(r#"{"resize": 256, "crop": 224}"#).unwrap();
        assert_eq!((p.resize, p.crop), (Some(256), Some(224)));
        assert!(serde_json::from_str::<Preprocess>(r#"{"resise": 256}"#).is_err());
        // Unset sizes are not written, so older readers still accept the JSON.
        let json = serde_json::to_string(&Preprocess::default()).unwrap();
        assert!(!json.contains("resize") && !json.contains("crop"), "{json}");
    }

    #[test]
    fn convert_checks_lengths() {
        let t = Preprocess::default().lookup_tables(1).unwrap();
        let mut out = vec![0.0; 4];
        assert!(convert_nhwc_u8(&[0; 3], 1, 2, 2, 1, 0, &t, &mut out).is_err());
        assert!(convert_nhwc_u8(&[0; 4], 1, 2, 2, 1, 1, &t, &mut out).is_err());
        assert!(convert_nhwc_u8(&[0; 4], 1, 2, 2, 1, 0, &t, &mut out).is_ok());
    }

    #[test]
    fn multi_channel_planes() {
        // One 1x2 image, 3 channels: pixels (1,2,3) and (4,5,6).
        let p = Preprocess {
            scale: 1.0,
            mean: vec![0.0, 1.0, 2.0],
            std: vec![1.0, 1.0, 2.0],
            ..Preprocess::default()
        };
        let t = p.lookup_tables(3).unwrap();
        let mut out = vec![0.0; 6];
        convert_nhwc_u8(&[1, 2, 3, 4, 5, 6], 1, 1, 2, 3, 0, &t, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 4.0, 1.0, 4.0, 0.5, 2.0]);
    }
}
