//! Pooling (ONNX MaxPool, AveragePool, GlobalAveragePool; opsets 1-22) over
//! `[N, C, H, W]`.

use rayon::prelude::*;

/// A 2-D pooling window resolved for one input shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool2d {
    /// Input height and width.
    pub ih: usize,
    /// Input width.
    pub iw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Kernel (h, w).
    pub k: (usize, usize),
    /// Strides (h, w).
    pub stride: (usize, usize),
    /// Dilations (h, w).
    pub dilation: (usize, usize),
    /// Padding at the top and left.
    pub pad: (usize, usize),
    /// Padding at the bottom and right (average pooling's divisor counts it).
    pub pad_end: (usize, usize),
    /// Average pooling: include padded positions in the divisor.
    pub count_include_pad: bool,
}

impl Pool2d {
    /// Max pooling of every `[H, W]` plane (`x` holds `planes` planes).
    pub fn max(&self, x: &[f32], y: &mut [f32]) {
        self.each(x, y, |s, taps| {
            taps.fold(f32::NEG_INFINITY, |m, (iy, ix)| {
                let v = s[iy * self.iw + ix];
                // NaN wins, as in ONNX Runtime.
                if v > m || v.is_nan() {
                    v
                } else {
                    m
                }
            })
        });
    }

    /// Average pooling of every plane.
    pub fn average(&self, x: &[f32], y: &mut [f32]) {
        self.each_avg(x, y);
    }

    fn each(
        &self,
        x: &[f32],
        y: &mut [f32],
        f: impl Fn(&[f32], &mut dyn Iterator<Item = (usize, usize)>) -> f32 + Sync,
    ) {
        let (ih, iw, oh, ow) = (self.ih, self.iw, self.oh, self.ow);
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out)| {
            let s = &x[p * ih * iw..(p + 1) * ih * iw];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut taps = self.taps(oy, ox);
                    out[oy * ow + ox] = f(s, &mut taps);
                }
            }
        });
    }

    fn taps(&self, oy: usize, ox: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let y0 = (oy * self.stride.0) as isize - self.pad.0 as isize;
        let x0 = (ox * self.stride.1) as isize - self.pad.1 as isize;
        (0..self.k.0).flat_map(move |ki| {
            (0..self.k.1).filter_map(move |kj| {
                let iy = y0 + (ki * self.dilation.0) as isize;
                let ix = x0 + (kj * self.dilation.1) as isize;
                (iy >= 0 && ix >= 0 && (iy as usize) < self.ih && (ix as usize) < self.iw)
                    .then_some((iy as usize, ix as usize))
            })
        })
    }

    fn each_avg(&self, x: &[f32], y: &mut [f32]) {
        let (ih, iw, oh, ow) = (self.ih, self.iw, self.oh, self.ow);
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out)| {
            let s = &x[p * ih * iw..(p + 1) * ih * iw];
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut sum, mut n) = (0.0f32, 0usize);
                    for (iy, ix) in self.taps(oy, ox) {
                        sum += s[iy * iw + ix];
                        n += 1;
                    }
                    let div = if self.count_include_pad {
                        // Window clipped to the padded extent (ONNX semantics).
                        let y0 = (oy * self.stride.0) as isize - self.pad.0 as isize;
                        let x0 = (ox * self.stride.1) as isize - self.pad.1 as isize;
                        let hy = (y0 + self.k.0 as isize).min((ih + self.pad_end.0) as isize)
                            - y0.max(-(self.pad.0 as isize));
                        let hx = (x0 + self.k.1 as isize).min((iw + self.pad_end.1) as isize)
                            - x0.max(-(self.pad.1 as isize));
                        (hy.max(1) * hx.max(1)) as usize
                    } else {
                        n.max(1)
                    };
                    out[oy * ow + ox] = sum / div as f32;
                }
            }
        });
    }
}

/// Mean of each plane of `plane` elements (GlobalAveragePool).
pub fn global_average(x: &[f32], y: &mut [f32], plane: usize) {
    y.par_iter_mut().enumerate().for_each(|(p, o)| {
        let s: f32 = x[p * plane..(p + 1) * plane].iter().sum();
        *o = s / plane as f32;
    });
}
