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
            let first = t * per_task;
            let planes = chunk.len() / (oh * ow).max(1);
            max_planes(self, &x[first * ih * iw..(first + planes) * ih * iw], chunk);
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
        let at = t * per_task * plane;
        plane_means(&x[at..at + out.len() * plane], out, plane);
    });
}

/// Lanes of [`plane_means`]' partial sums.
const SUM_LANES: usize = 64;

multiversion! {
    /// `out[i]` = the mean of plane `i` of `x`. Planes of at least
    /// [`SUM_LANES`] values are summed in that many partial sums (element
    /// `j` into sum `j % SUM_LANES`, then the sums halved pairwise): the
    /// adds vectorize and run as independent chains, where one running sum
    /// waits on each add (EfficientNet-B0's squeeze-and-excitation pools
    /// over 112x112 planes took 6% of its INT8 run). The order is fixed by
    /// the lanes, so every instruction set gives the same bits. Smaller
    /// planes are summed in order.
    fn plane_means(x: &[f32], out: &mut [f32], plane: usize) {
        if plane == 1 {
            // The sum of one value is the value, and dividing by 1 keeps it.
            let n = out.len();
            out.copy_from_slice(&x[..n]);
            return;
        }
        // Dividing by a power of two and multiplying by its inverse round
        // the same exact value: the same bits, without a division per plane.
        let inv = plane.is_power_of_two().then(|| 1.0 / plane as f32);
        for (o, p) in out.iter_mut().zip(x.chunks_exact(plane.max(1))) {
            let s = if plane < SUM_LANES {
                p.iter().sum()
            } else {
                let mut acc = [0f32; SUM_LANES];
                let mut runs = p.chunks_exact(SUM_LANES);
                for run in &mut runs {
                    for (a, &v) in acc.iter_mut().zip(run) {
                        *a += v;
                    }
                }
                for (a, &v) in acc.iter_mut().zip(runs.remainder()) {
                    *a += v;
                }
                let mut w = SUM_LANES;
                while w > 1 {
                    w /= 2;
                    for j in 0..w {
                        acc[j] += acc[j + w];
                    }
                }
                acc[0]
            };
            *o = match inv {
                Some(inv) => s * inv,
                None => s / plane as f32,
            };
        }
    }
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
    /// Max pooling of a run of whole planes (`out` holds `src`'s planes'
    /// outputs), dispatched once per run: on the fixtures' small planes a
    /// call per plane cost more than its windows (26 ns per output of a
    /// 2x2 plane). A 2x2 stride-2 window that tiles the plane exactly
    /// (VGG's) takes every output row of the run in one loop, each from
    /// the next four input rows' worth of floats; ResNet's 3x3 stride-2
    /// window with padding 1 folds its three rows, then each output's
    /// three columns; other windows go
    /// separably, plane by plane: per output row, the window's input rows
    /// are folded into one row placed in a `-inf`-padded buffer, then the
    /// horizontal window is folded at every column and sampled at the
    /// stride. The folds run over contiguous memory and vectorize. With
    /// NaN propagating and `-inf` as the identity, the result equals
    /// folding the window's valid taps in any order.
    fn max_planes(p: &Pool2d, src: &[f32], out: &mut [f32]) {
        let (ih, iw, oh, ow) = (p.ih, p.iw, p.oh, p.ow);
        if ow == 0 || oh == 0 {
            return;
        }
        let pair = (p.k, p.stride, p.dilation, p.pad) == ((2, 2), (2, 2), (1, 1), (0, 0));
        if pair && 2 * oh == ih && 2 * ow == iw {
            // Output row r reads input rows 2r and 2r + 1, which follow
            // each other in memory across planes too.
            pair_runs(src, out, ow);
            return;
        }
        if pair && 2 * oh <= ih && 2 * ow <= iw {
            for (plane, o) in src.chunks_exact(ih * iw).zip(out.chunks_exact_mut(oh * ow)) {
                for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                    let r0 = &plane[2 * oy * iw..][..2 * ow];
                    let r1 = &plane[(2 * oy + 1) * iw..][..2 * ow];
                    pair_row(r0, r1, orow);
                }
            }
            return;
        }
        if (p.k, p.stride, p.dilation, p.pad) == ((3, 3), (2, 2), (1, 1), (1, 1))
            && 2 * oh <= ih + 1
            && 2 * ow <= iw + 1
        {
            // ResNet's stem pool: the vertical fold starts from the first
            // valid row (no fill), and each output folds its three columns.
            let mut v = vec![f32::NEG_INFINITY; 2 * ow + 1];
            let n = iw.min(2 * ow);
            for (plane, o) in src.chunks_exact(ih * iw).zip(out.chunks_exact_mut(oh * ow)) {
                for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                    // Input rows 2oy - 1 ..= 2oy + 1, clipped to the plane;
                    // column c lands at v[c + 1].
                    let (lo, hi) = ((2 * oy).saturating_sub(1), (2 * oy + 2).min(ih));
                    v[1..=n].copy_from_slice(&plane[lo * iw..][..n]);
                    for iy in lo + 1..hi {
                        for (m, &x) in v[1..=n].iter_mut().zip(&plane[iy * iw..][..n]) {
                            *m = fold(*m, x);
                        }
                    }
                    for (ox, o) in orow.iter_mut().enumerate() {
                        *o = fold(fold(v[2 * ox], v[2 * ox + 1]), v[2 * ox + 2]);
                    }
                }
            }
            return;
        }
        let (sw, dw, pl) = (p.stride.1, p.dilation.1, p.pad.1);
        let span = dw * (p.k.1 - 1);
        // Columns of the padded row the windows read, and window starts.
        let starts = (ow - 1) * sw + 1;
        let width = starts + span;
        let mut vrow = vec![f32::NEG_INFINITY; width.max(pl + iw)];
        let mut hrow = vec![f32::NEG_INFINITY; starts];
        for (plane, o) in src.chunks_exact(ih * iw).zip(out.chunks_exact_mut(oh * ow)) {
            for (oy, orow) in o.chunks_mut(ow).enumerate() {
                let inner = &mut vrow[pl..pl + iw];
                inner.fill(f32::NEG_INFINITY);
                for ki in 0..p.k.0 {
                    let iy = (oy * p.stride.0 + ki * p.dilation.0) as isize - p.pad.0 as isize;
                    if iy < 0 || iy >= ih as isize {
                        continue;
                    }
                    let row = &plane[iy as usize * iw..(iy as usize + 1) * iw];
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
}

/// One output row of a 2x2 stride-2 window from its two input rows.
#[inline(always)]
fn pair_row(r0: &[f32], r1: &[f32], orow: &mut [f32]) {
    for ((o, a), b) in orow
        .iter_mut()
        .zip(r0.chunks_exact(2))
        .zip(r1.chunks_exact(2))
    {
        *o = fold(fold(fold(f32::NEG_INFINITY, a[0]), a[1]), fold(b[0], b[1]));
    }
}

multiversion! {
    /// 2x2 stride-2 pooling over a run of output rows `ow` wide, each from
    /// the next `4 * ow` floats (planes that the window tiles exactly), in
    /// its own function: compiled inside [`max_planes`], the narrow cases
    /// lost their vector code (the 4-wide rows of 8x8 planes ran 4x slower).
    fn pair_runs(src: &[f32], out: &mut [f32], ow: usize) {
        match ow {
            1 => pair_rows::<1>(src, out),
            2 => pair_rows::<2>(src, out),
            4 => pair_rows::<4>(src, out),
            8 => pair_rows::<8>(src, out),
            _ => {
                for (orow, rows) in out.chunks_exact_mut(ow).zip(src.chunks_exact(4 * ow)) {
                    let (r0, r1) = rows.split_at(2 * ow);
                    pair_row(r0, r1, orow);
                }
            }
        }
    }
}

/// [`pair_row`] over a run of output rows `OW` wide, each from the next
/// `4 * OW` floats: a fixed-size body instead of a short loop per row.
#[inline(always)]
fn pair_rows<const OW: usize>(src: &[f32], out: &mut [f32]) {
    for (orow, rows) in out.chunks_exact_mut(OW).zip(src.chunks_exact(4 * OW)) {
        let (r0, r1) = rows.split_at(2 * OW);
        pair_row(r0, r1, orow);
    }
}
