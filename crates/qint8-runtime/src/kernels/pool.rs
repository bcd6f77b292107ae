//! Pooling (ONNX MaxPool, AveragePool, GlobalAveragePool; opsets 1-22) over
//! `[N, C, H, W]`.

use qint8_graph::{shape, GraphError, Node, PoolAttrs};

use super::multiversion;

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

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
    /// The window of pooling `node` (attributes `attrs`) over input shape
    /// `x`, which must be `[N, C, H, W]`.
    pub fn resolve(node: &Node, attrs: &PoolAttrs, x: &[usize]) -> Result<Self, GraphError> {
        if x.len() != 4 {
            return Err(GraphError::Shape {
                node: node.name.clone(),
                op: node.op.op_type().to_string(),
                detail: format!("only 2-D pooling is supported, input is {x:?}"),
            });
        }
        let win = shape::pool_window(node, attrs, x)?;
        Ok(Self {
            ih: x[2],
            iw: x[3],
            oh: win.out[0],
            ow: win.out[1],
            k: (win.kernel[0], win.kernel[1]),
            stride: (win.strides[0], win.strides[1]),
            dilation: (win.dilations[0], win.dilations[1]),
            pad: (win.pad_begin[0], win.pad_begin[1]),
            pad_end: (win.pad_end[0], win.pad_end[1]),
            count_include_pad: attrs.count_include_pad,
        })
    }

    /// Max pooling of every `[H, W]` plane (`x` holds `planes` planes).
    pub fn max(&self, x: &[f32], y: &mut [f32]) {
        let (ih, iw, oh, ow) = (self.ih, self.iw, self.oh, self.ow);
        let per_task = (GRAIN / (oh * ow).max(1)).max(1);
        super::for_chunks(y, oh * ow * per_task, |t, chunk| {
            for (i, out) in chunk.chunks_mut(oh * ow).enumerate() {
                let p = t * per_task + i;
                max_plane(self, &x[p * ih * iw..(p + 1) * ih * iw], out);
            }
        });
    }

    /// Average pooling of every plane.
    pub fn average(&self, x: &[f32], y: &mut [f32]) {
        self.each_avg(x, y);
    }

    /// Max pooling written straight from the definition, the reference
    /// [`Pool2d::max`] is tested against.
    pub fn max_reference(&self, x: &[f32], y: &mut [f32]) {
        let plane = self.ih * self.iw;
        for (p, out) in y.chunks_mut(self.oh * self.ow).enumerate() {
            let src = &x[p * plane..(p + 1) * plane];
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    let mut m = f32::NEG_INFINITY;
                    for (iy, ix) in self.taps(oy, ox) {
                        let v = src[iy * self.iw + ix];
                        if v > m || v.is_nan() {
                            m = v;
                        }
                    }
                    out[oy * self.ow + ox] = m;
                }
            }
        }
    }

    /// The input positions `(iy, ix)` output `(oy, ox)` reads (padding
    /// left out).
    pub(crate) fn taps(&self, oy: usize, ox: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
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
        super::for_chunks(y, oh * ow, |p, out| {
            let s = &x[p * ih * iw..(p + 1) * ih * iw];
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut sum, mut n) = (0.0f32, 0usize);
                    for (iy, ix) in self.taps(oy, ox) {
                        sum += s[iy * iw + ix];
                        n += 1;
                    }
                    out[oy * ow + ox] = sum / self.divisor(oy, ox, n) as f32;
                }
            }
        });
    }
}

impl Pool2d {
    /// Average pooling's divisor for output `(oy, ox)`, whose window holds
    /// `inside` input positions.
    pub(crate) fn divisor(&self, oy: usize, ox: usize, inside: usize) -> usize {
        if self.count_include_pad {
            // Window clipped to the padded extent (ONNX semantics).
            let y0 = (oy * self.stride.0) as isize - self.pad.0 as isize;
            let x0 = (ox * self.stride.1) as isize - self.pad.1 as isize;
            let hy = (y0 + self.k.0 as isize).min((self.ih + self.pad_end.0) as isize)
                - y0.max(-(self.pad.0 as isize));
            let hx = (x0 + self.k.1 as isize).min((self.iw + self.pad_end.1) as isize)
                - x0.max(-(self.pad.1 as isize));
            (hy.max(1) * hx.max(1)) as usize
        } else {
            inside.max(1)
        }
    }
}

/// Mean of each plane of `plane` elements (GlobalAveragePool).
pub fn global_average(x: &[f32], y: &mut [f32], plane: usize) {
    let per_task = (GRAIN / plane.max(1)).max(1);
    super::for_chunks(y, per_task, |t, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let p = t * per_task + i;
            let s: f32 = x[p * plane..(p + 1) * plane].iter().sum();
            *o = s / plane as f32;
        }
    });
}

/// The max of `m` and `v` where NaN wins, as in ONNX Runtime.
#[inline(always)]
fn fold(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

multiversion! {
    /// Max pooling of one plane, separably: per output row, the window's
    /// input rows are folded into one row placed in a `-inf`-padded buffer,
    /// then the horizontal window is folded at every column and sampled at
    /// the stride. Both folds run over contiguous memory and vectorize.
    /// With NaN propagating and `-inf` as the identity, the result equals
    /// folding the window's valid taps in any order.
    fn max_plane(p: &Pool2d, src: &[f32], out: &mut [f32]) {
        let (ih, iw, ow) = (p.ih, p.iw, p.ow);
        if (p.k, p.stride, p.dilation, p.pad) == ((2, 2), (2, 2), (1, 1), (0, 0))
            && 2 * p.oh <= ih
            && 2 * ow <= iw
        {
            // The 2x2/2 window of VGG-style networks: pairs of two rows,
            // one pass that vectorizes.
            for (oy, orow) in out.chunks_exact_mut(ow).enumerate() {
                let r0 = &src[2 * oy * iw..][..2 * ow];
                let r1 = &src[(2 * oy + 1) * iw..][..2 * ow];
                for ((o, a), b) in orow.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                    *o = fold(fold(fold(f32::NEG_INFINITY, a[0]), a[1]), fold(b[0], b[1]));
                }
            }
            return;
        }
        let (sw, dw, pl) = (p.stride.1, p.dilation.1, p.pad.1);
        let span = dw * (p.k.1 - 1);
        // Columns of the padded row the windows read, and window starts.
        let starts = (ow.max(1) - 1) * sw + 1;
        let width = starts + span;
        let mut vrow = vec![f32::NEG_INFINITY; width.max(pl + iw)];
        let mut hrow = vec![f32::NEG_INFINITY; starts];
        for (oy, orow) in out.chunks_mut(ow).enumerate() {
            let inner = &mut vrow[pl..pl + iw];
            inner.fill(f32::NEG_INFINITY);
            for ki in 0..p.k.0 {
                let iy = (oy * p.stride.0 + ki * p.dilation.0) as isize - p.pad.0 as isize;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let row = &src[iy as usize * iw..(iy as usize + 1) * iw];
                for (m, &v) in inner.iter_mut().zip(row) {
                    *m = fold(*m, v);
                }
            }
            hrow.fill(f32::NEG_INFINITY);
            for kj in 0..p.k.1 {
                let shifted = &vrow[kj * dw..kj * dw + starts];
                for (m, &v) in hrow.iter_mut().zip(shifted) {
                    *m = fold(*m, v);
                }
            }
            for (ox, o) in orow.iter_mut().enumerate() {
                *o = hrow[ox * sw];
            }
        }
    }
}
