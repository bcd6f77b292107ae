//! Elementwise and data-movement kernels: ONNX Add/Sub/Mul/Div/Equal/Where
//! with numpy broadcasting, Relu/Clip/Sigmoid/HardSigmoid/HardSwish,
//! BatchNormalization (inference), Softmax, ReduceMean, Transpose, Concat,
//! Gather (opsets 7-22).

use super::{multiversion, sigmoid, Activation};

/// Elements per parallel task for elementwise work.
const GRAIN: usize = 1 << 14;

/// A binary arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
    /// 1.0 where a == b, else 0.0
    Equal,
    /// a to the power b
    Pow,
    /// Remainder: C's `fmod` (`true`), or with the divisor's sign.
    Mod(bool),
}

impl BinOp {
    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Equal => (a == b) as u8 as f32,
            BinOp::Pow => a.powf(b),
            BinOp::Mod(fmod) => modulo(a, b, fmod),
        }
    }
}

/// ONNX Mod: `a % b` (C `fmod`), or with the divisor's sign (Python's `%`,
/// ONNX's default for integers).
#[inline(always)]
fn modulo(a: f32, b: f32, fmod: bool) -> f32 {
    let r = a % b;
    if fmod || r == 0.0 || (r < 0.0) == (b < 0.0) {
        r
    } else {
        r + b
    }
}

/// Gauss error function (single precision).
#[inline(always)]
pub fn erf(v: f32) -> f32 {
    libm::erff(v)
}

/// GELU, `x * Phi(x)`.
#[inline(always)]
pub fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's tanh approximation.
#[inline(always)]
pub fn gelu_tanh(v: f32) -> f32 {
    // sqrt(2 / pi)
    const K: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (K * (v + 0.044_715 * v * v * v)).tanh())
}

/// Strides of `shape` broadcast to `out` (0 on broadcast axes), aligned to `out`'s rank.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut strides = vec![0; r];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        let o = r - shape.len() + i;
        strides[o] = if shape[i] == 1 && out[o] != 1 { 0 } else { acc };
        acc *= shape[i];
    }
    strides
}

/// A broadcast iteration plan over `out`, with dimensions merged where every
/// operand is either contiguous across them or broadcast across both.
#[derive(Debug, Clone)]
pub struct Broadcast {
    dims: Vec<usize>,
    strides: Vec<Vec<usize>>,
}

impl Broadcast {
    /// Plans iteration of `out` over operands of `shapes`.
    pub fn new(shapes: &[&[usize]], out: &[usize]) -> Self {
        let all: Vec<Vec<usize>> = shapes.iter().map(|s| broadcast_strides(s, out)).collect();
        let mut dims: Vec<usize> = Vec::new();
        let mut strides: Vec<Vec<usize>> = vec![Vec::new(); shapes.len()];
        for (i, &d) in out.iter().enumerate() {
            if d == 1 {
                continue;
            }
            let mergeable = !dims.is_empty()
                && all.iter().zip(&strides).all(|(s, cur)| {
                    let last = *cur.last().unwrap_or(&0);
                    (last == 0 && s[i] == 0) || (s[i] != 0 && last == s[i] * d)
                });
            if mergeable {
                let l = dims.len() - 1;
                dims[l] *= d;
                for (cur, s) in strides.iter_mut().zip(&all) {
                    let last = cur.len() - 1;
                    cur[last] = s[i];
                }
            } else {
                dims.push(d);
                for (cur, s) in strides.iter_mut().zip(&all) {
                    cur.push(s[i]);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            for cur in &mut strides {
                cur.push(0);
            }
        }
        Self { dims, strides }
    }

    fn inner(&self) -> usize {
        *self.dims.last().unwrap_or(&1)
    }

    /// Offset of row `r`'s first element in operand `k`.
    fn offset(&self, k: usize, mut r: usize) -> usize {
        let s = &self.strides[k];
        let mut off = 0;
        for d in (0..self.dims.len() - 1).rev() {
            off += (r % self.dims[d]) * s[d];
            r /= self.dims[d];
        }
        off
    }

    /// For two operands over `[rows, inner]`: `Some(f)` where operand `f`
    /// runs over every element in order and the other holds one value per
    /// row, in order (`x[N, C, H, W] * s[N, C, 1, 1]`).
    fn row_scalars(&self) -> Option<usize> {
        if self.dims.len() != 2 || self.strides.len() != 2 {
            return None;
        }
        let inner = self.dims[1];
        (0..2).find(|&f| self.strides[f] == [inner, 1] && self.strides[1 - f] == [1, 0])
    }

    fn inner_stride(&self, k: usize) -> usize {
        *self.strides[k].last().unwrap_or(&0)
    }
}

/// `out = a op b` with broadcasting; `plan` from [`Broadcast::new`] on `[a, b]`.
pub fn binary(op: BinOp, plan: &Broadcast, a: &[f32], b: &[f32], out: &mut [f32]) {
    let inner = plan.inner();
    let (sa, sb) = (plan.inner_stride(0), plan.inner_stride(1));
    let rows_per_task = (GRAIN / inner.max(1)).max(1);
    if let Some(full) = plan.row_scalars() {
        // One value per row (a channel gate or scale): whole chunks of rows
        // in one loop, where short rows (squeeze-and-excitation gates on
        // small maps) made the per-row offsets and calls the main cost.
        let (x, s) = if full == 0 { (a, b) } else { (b, a) };
        super::for_chunks(out, inner * rows_per_task, |t, chunk| {
            let (r0, rows) = (t * rows_per_task, chunk.len() / inner);
            let x = &x[r0 * inner..][..chunk.len()];
            rows_op_scalar(op, chunk, x, &s[r0..r0 + rows], inner, full == 1);
        });
        return;
    }
    super::for_chunks(out, inner * rows_per_task, |t, chunk| {
        for (i, row) in chunk.chunks_mut(inner).enumerate() {
            let r = t * rows_per_task + i;
            let (oa, ob) = (plan.offset(0, r), plan.offset(1, r));
            match (sa, sb) {
                (1, 1) => row_op(op, row, &a[oa..oa + inner], &b[ob..ob + inner]),
                (1, 0) => rows_op_scalar(op, row, &a[oa..oa + inner], &[b[ob]], inner, false),
                (0, 1) => rows_op_scalar(op, row, &b[ob..ob + inner], &[a[oa]], inner, true),
                _ => {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = op.apply(a[oa + j * sa], b[ob + j * sb]);
                    }
                }
            }
        }
    });
}

multiversion! {
    /// One row of `a op b` for equal-length rows.
    fn row_op(op: BinOp, out: &mut [f32], a: &[f32], b: &[f32]) {
        // One monomorphic loop per op so each vectorizes.
        macro_rules! lp {
            ($f:expr) => {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = $f(x, y);
                }
            };
        }
        match op {
            BinOp::Add => lp!(|x: f32, y: f32| x + y),
            BinOp::Sub => lp!(|x: f32, y: f32| x - y),
            BinOp::Mul => lp!(|x: f32, y: f32| x * y),
            BinOp::Div => lp!(|x: f32, y: f32| x / y),
            BinOp::Equal => lp!(|x: f32, y: f32| (x == y) as u8 as f32),
            BinOp::Pow => lp!(|x: f32, y: f32| x.powf(y)),
            BinOp::Mod(f) => lp!(|x: f32, y: f32| modulo(x, y, f)),
        }
    }
}

multiversion! {
    /// Rows of `inner` values `x op s[r]` (`s[r] op x` when `swap`); with
    /// one value in `s`, one row of `x op s`.
    fn rows_op_scalar(op: BinOp, out: &mut [f32], x: &[f32], s: &[f32], inner: usize, swap: bool) {
        // (An empty row only comes with an empty output.)
        let inner = inner.max(1);
        // Rows of `$n` values: `$chunks` is `chunks_exact` for a constant
        // `$n` dividing the output, so that a short row is one vector
        // operation, not a loop.
        macro_rules! rows {
            ($f:expr, $n:expr, $chunks:ident, $chunks_mut:ident) => {{
                let rows = out.$chunks_mut($n).zip(x.$chunks($n)).zip(s);
                if swap {
                    for ((o, x), &s) in rows {
                        for (o, &v) in o.iter_mut().zip(x) {
                            *o = $f(s, v);
                        }
                    }
                } else {
                    for ((o, x), &s) in rows {
                        for (o, &v) in o.iter_mut().zip(x) {
                            *o = $f(v, s);
                        }
                    }
                }
            }};
        }
        // Squeeze-and-excitation gates on 2x2 and 4x4 maps.
        macro_rules! lp {
            ($f:expr) => {{
                match inner {
                    4 if out.len() % 4 == 0 => rows!($f, 4, chunks_exact, chunks_exact_mut),
                    16 if out.len() % 16 == 0 => rows!($f, 16, chunks_exact, chunks_exact_mut),
                    _ => rows!($f, inner, chunks, chunks_mut),
                }
            }};
        }
        match op {
            BinOp::Add => lp!(|p: f32, q: f32| p + q),
            BinOp::Sub => lp!(|p: f32, q: f32| p - q),
            BinOp::Mul => lp!(|p: f32, q: f32| p * q),
            BinOp::Div => lp!(|p: f32, q: f32| p / q),
            BinOp::Equal => lp!(|p: f32, q: f32| (p == q) as u8 as f32),
            BinOp::Pow => lp!(|p: f32, q: f32| p.powf(q)),
            BinOp::Mod(f) => lp!(|p: f32, q: f32| modulo(p, q, f)),
        }
    }
}

/// `out = cond != 0 ? x : y` with broadcasting (plan over `[cond, x, y]`).
pub fn where_(plan: &Broadcast, c: &[f32], x: &[f32], y: &[f32], out: &mut [f32]) {
    let inner = plan.inner();
    for (r, row) in out.chunks_mut(inner).enumerate() {
        let (oc, ox, oy) = (plan.offset(0, r), plan.offset(1, r), plan.offset(2, r));
        let (sc, sx, sy) = (
            plan.inner_stride(0),
            plan.inner_stride(1),
            plan.inner_stride(2),
        );
        for (j, o) in row.iter_mut().enumerate() {
            *o = if c[oc + j * sc] != 0.0 {
                x[ox + j * sx]
            } else {
                y[oy + j * sy]
            };
        }
    }
}

/// Broadcasts `x` to `out` (Expand).
pub fn expand(plan: &Broadcast, x: &[f32], out: &mut [f32]) {
    let inner = plan.inner();
    let s = plan.inner_stride(0);
    for (r, row) in out.chunks_mut(inner).enumerate() {
        let o = plan.offset(0, r);
        match s {
            // A value repeated along the row (a 1x1 map expanded to 7x7
            // before VGG's classifier): a fill, not a load per value.
            0 => row.fill(x[o]),
            1 => row.copy_from_slice(&x[o..o + row.len()]),
            _ => {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = x[o + j * s];
                }
            }
        }
    }
}

/// A unary operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// Relu or Clip.
    Act(Activation),
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// x * sigmoid(x) (SiLU, fused from Sigmoid + Mul).
    Silu,
    /// max(0, min(1, alpha x + beta)).
    HardSigmoid(f32, f32),
    /// x * max(0, min(1, x / 6 + 0.5)).
    HardSwish,
    /// Gauss error function.
    Erf,
    /// GELU, exact (`false`) or its tanh approximation.
    Gelu(bool),
    /// Square root.
    Sqrt,
    /// Logical not of a 0/1 value.
    Not,
}

impl Unary {
    /// Applies the operator to one value.
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Unary::Act(a) => a.apply(v),
            Unary::Sigmoid => sigmoid(v),
            Unary::Silu => v * sigmoid(v),
            Unary::HardSigmoid(a, b) => (a * v + b).clamp(0.0, 1.0),
            Unary::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            Unary::Erf => erf(v),
            Unary::Gelu(false) => gelu(v),
            Unary::Gelu(true) => gelu_tanh(v),
            Unary::Sqrt => v.sqrt(),
            Unary::Not => (v == 0.0) as u8 as f32,
        }
    }
}

/// `out = f(x)` elementwise, in parallel.
pub fn unary(f: Unary, x: &[f32], out: &mut [f32]) {
    super::for_chunks(out, GRAIN, |t, o| {
        let n = o.len();
        unary_chunk(f, &x[t * GRAIN..t * GRAIN + n], o)
    });
}

multiversion! {
    /// `out = f(x)` on one chunk.
    fn unary_chunk(f: Unary, x: &[f32], out: &mut [f32]) {
        macro_rules! lp {
            ($g:expr) => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = $g(v);
                }
            };
        }
        // Monomorphic loops so each vectorizes.
        match f {
            Unary::Act(Activation::Relu) => lp!(|v: f32| Activation::Relu.apply(v)),
            Unary::Act(Activation::Clip(lo, hi)) => lp!(|v: f32| Activation::Clip(lo, hi).apply(v)),
            Unary::Act(Activation::Silu) => lp!(|v: f32| Activation::Silu.apply(v)),
            Unary::Act(Activation::None) => out.copy_from_slice(&x[..out.len()]),
            Unary::Sigmoid => lp!(sigmoid),
            Unary::Silu => lp!(|v: f32| v * sigmoid(v)),
            Unary::HardSigmoid(a, b) => lp!(|v: f32| (a * v + b).clamp(0.0, 1.0)),
            Unary::HardSwish => lp!(|v: f32| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
            Unary::Erf => lp!(erf),
            Unary::Gelu(false) => lp!(gelu),
            Unary::Gelu(true) => lp!(gelu_tanh),
            Unary::Sqrt => lp!(f32::sqrt),
            Unary::Not => lp!(|v: f32| (v == 0.0) as u8 as f32),
        }
    }
}

/// Inference BatchNormalization: `y = x * a[c] + b[c]` over `[N, C, inner]`.
pub fn channel_affine(x: &[f32], out: &mut [f32], a: &[f32], b: &[f32], inner: usize) {
    let c = a.len();
    super::for_chunks(out, inner.max(1), |p, o| {
        let ch = p % c;
        for (o, &v) in o.iter_mut().zip(&x[p * inner..(p + 1) * inner]) {
            *o = v * a[ch] + b[ch];
        }
    });
}

/// Softmax over the middle axis of `[outer, n, inner]`.
pub fn softmax(x: &[f32], out: &mut [f32], n: usize, inner: usize) {
    let block = n * inner;
    let block = block.max(1);
    super::for_chunks(out, block, |t, o| {
        let xb = &x[t * block..(t + 1) * block];
        for j in 0..inner {
            let mut m = f32::NEG_INFINITY;
            for i in 0..n {
                m = m.max(xb[i * inner + j]);
            }
            let mut s = 0.0f32;
            for i in 0..n {
                let e = super::fast_exp(xb[i * inner + j] - m);
                o[i * inner + j] = e;
                s += e;
            }
            for i in 0..n {
                o[i * inner + j] /= s;
            }
        }
    });
}

/// Mean over the middle axis of `[outer, n, inner]` into `[outer, inner]`.
pub fn mean_axis(x: &[f32], out: &mut [f32], n: usize, inner: usize) {
    let inner = inner.max(1);
    // Whole output rows per task, enough of them to be worth a task (with
    // `inner = 1`, one row per task would be one task per output value).
    let rows_per_task = (GRAIN / (n * inner).max(1)).max(1);
    super::for_chunks(out, rows_per_task * inner, |t, rows| {
        for (k, row) in rows.chunks_mut(inner).enumerate() {
            let o = t * rows_per_task + k;
            if inner == 1 {
                // A contiguous block (global pooling): one sum.
                row[0] = x[o * n..(o + 1) * n].iter().sum::<f32>() / n as f32;
                continue;
            }
            row.fill(0.0);
            for i in 0..n {
                let src = &x[(o * n + i) * inner..(o * n + i + 1) * inner];
                for (r, &v) in row.iter_mut().zip(src) {
                    *r += v;
                }
            }
            for r in row.iter_mut() {
                *r /= n as f32;
            }
        }
    });
}

/// Permutes axes: `out[j] = x[i]` where `out` has shape `shape[perm[k]]`.
pub fn transpose(x: &[f32], shape: &[usize], perm: &[usize], out: &mut [f32]) {
    let rank = shape.len();
    let mut in_strides = vec![1; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let inner = *out_shape.last().unwrap_or(&1);
    let s_last = *strides.last().unwrap_or(&1);
    for (r, row) in out.chunks_mut(inner.max(1)).enumerate() {
        let mut rem = r;
        let mut off = 0;
        for d in (0..rank.saturating_sub(1)).rev() {
            off += (rem % out_shape[d]) * strides[d];
            rem /= out_shape[d];
        }
        for (j, v) in row.iter_mut().enumerate() {
            *v = x[off + j * s_last];
        }
    }
}

/// Concatenation: each input is `[outer, len_k]` (its axis-and-inner block
/// length); `out` is `[outer, sum len_k]`.
pub fn concat(inputs: &[(&[f32], usize)], out: &mut [f32], outer: usize) {
    let total: usize = inputs.iter().map(|(_, l)| l).sum();
    for o in 0..outer {
        let mut pos = o * total;
        for (x, l) in inputs {
            out[pos..pos + l].copy_from_slice(&x[o * l..(o + 1) * l]);
            pos += l;
        }
    }
}

/// Gather along the middle axis of `[outer, n, inner]` with normalized indices.
pub fn gather(x: &[f32], out: &mut [f32], n: usize, inner: usize, idx: &[usize]) {
    let per = idx.len() * inner;
    for (o, block) in out.chunks_mut(per.max(1)).enumerate() {
        for (k, &i) in idx.iter().enumerate() {
            block[k * inner..(k + 1) * inner]
                .copy_from_slice(&x[(o * n + i) * inner..(o * n + i + 1) * inner]);
        }
    }
}

/// Slice: `out` takes, on every axis of `shape`, the indices `start`,
/// `start + step`, ... that `axes` gives.
pub fn slice(x: &[f32], shape: &[usize], axes: &[qint8_graph::shape::SliceAxis], out: &mut [f32]) {
    let rank = shape.len();
    if rank == 0 || out.is_empty() {
        out.copy_from_slice(&x[..out.len()]);
        return;
    }
    let mut strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let last = axes[rank - 1];
    let rows = out.len() / last.len.max(1);
    let mut idx = vec![0usize; rank - 1];
    for r in 0..rows {
        // Offset of this output row's first element in the input.
        let mut off = (last.start * strides[rank - 1]) as i64;
        for a in 0..rank - 1 {
            off += (axes[a].start as i64 + idx[a] as i64 * axes[a].step) * strides[a] as i64;
        }
        let row = &mut out[r * last.len..(r + 1) * last.len];
        if last.step == 1 {
            let o = off as usize;
            row.copy_from_slice(&x[o..o + last.len]);
        } else {
            for (k, v) in row.iter_mut().enumerate() {
                *v = x[(off + k as i64 * last.step) as usize];
            }
        }
        for a in (0..rank - 1).rev() {
            idx[a] += 1;
            if idx[a] < axes[a].len {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// The mean of `xs` and `1 / sqrt(var + eps)`, in double precision; two
/// passes: the variance of the centred values, not `E[x^2] - mean^2`.
pub fn mean_inv_std(xs: &[f32], eps: f32) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + f64::from(eps)).sqrt())
}

/// Layer normalization over rows of `scale.len()` values:
/// `(x - mean) / sqrt(var + eps) * scale + bias`.
pub fn layer_norm(x: &[f32], out: &mut [f32], scale: &[f32], bias: &[f32], eps: f32) {
    let n = scale.len().max(1);
    super::for_chunks(out, n * (GRAIN / n).max(1), |t, chunk| {
        let base = t * n * (GRAIN / n).max(1);
        for (r, o) in chunk.chunks_mut(n).enumerate() {
            let xs = &x[base + r * n..base + (r + 1) * n];
            let (mean, inv) = mean_inv_std(xs, eps);
            let (mean, inv) = (mean as f32, inv as f32);
            for (((o, &v), &s), &b) in o.iter_mut().zip(xs).zip(scale).zip(bias) {
                *o = (v - mean) * inv * s + b;
            }
        }
    });
}

/// Pad in constant, reflect, edge or wrap mode; `begin` and `end` per axis
/// (negative values crop).
pub fn pad(
    x: &[f32],
    shape: &[usize],
    spec: &qint8_graph::shape::PadSpec,
    mode: qint8_graph::PadMode,
    out: &mut [f32],
) {
    for_each_pad_source(shape, spec, mode, |k, src| {
        out[k] = src.map_or(spec.value, |o| x[o]);
    });
}

/// Calls `f(k, source)` for every element `k` of a Pad's output: the input
/// offset it copies, or `None` where it takes the fill value.
pub fn for_each_pad_source(
    shape: &[usize],
    spec: &qint8_graph::shape::PadSpec,
    mode: qint8_graph::PadMode,
    mut f: impl FnMut(usize, Option<usize>),
) {
    use qint8_graph::PadMode;
    let rank = shape.len();
    let os = &spec.out_shape;
    let total: usize = os.iter().product();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let mut idx = vec![0usize; rank];
    for k in 0..total {
        let mut off = Some(0usize);
        for a in 0..rank {
            let d = shape[a] as i64;
            let mut i = idx[a] as i64 - spec.begin[a];
            if i < 0 || i >= d {
                match mode {
                    PadMode::Constant => i = -1,
                    _ if d == 0 => i = -1,
                    PadMode::Edge => i = i.clamp(0, d - 1),
                    PadMode::Wrap => i = i.rem_euclid(d),
                    PadMode::Reflect => {
                        if d == 1 {
                            i = 0;
                        } else {
                            let p = 2 * (d - 1);
                            i = i.rem_euclid(p);
                            if i >= d {
                                i = p - i;
                            }
                        }
                    }
                }
            }
            if i < 0 {
                off = None;
                break;
            }
            off = off.map(|o| o + i as usize * strides[a]);
        }
        f(k, off);
        for a in (0..rank).rev() {
            idx[a] += 1;
            if idx[a] < os[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// The input offset of every output element of a Slice (for its gradient).
pub fn slice_offsets(shape: &[usize], axes: &[qint8_graph::shape::SliceAxis]) -> Vec<usize> {
    let rank = shape.len();
    let total: usize = axes.iter().map(|a| a.len).product();
    let mut strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let mut idx = vec![0usize; rank];
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        let off: i64 = (0..rank)
            .map(|a| (axes[a].start as i64 + idx[a] as i64 * axes[a].step) * strides[a] as i64)
            .sum();
        out.push(off as usize);
        for a in (0..rank).rev() {
            idx[a] += 1;
            if idx[a] < axes[a].len {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

/// ScatterND: `out = data` with `slice` values of `updates` written at each
/// of `offsets` in turn.
pub fn scatter_nd(data: &[f32], updates: &[f32], offsets: &[usize], slice: usize, out: &mut [f32]) {
    out.copy_from_slice(&data[..out.len()]);
    for (i, &o) in offsets.iter().enumerate() {
        out[o..o + slice].copy_from_slice(&updates[i * slice..(i + 1) * slice]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_matches_naive() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 4, 5], &[2, 3, 4, 5]),
            (&[2, 3, 4, 5], &[2, 3, 1, 1]),
            (&[2, 3, 4, 5], &[1]),
            (&[1, 3, 1, 5], &[2, 1, 4, 1]),
            (&[5], &[2, 3, 4, 5]),
            (&[2, 1, 4, 5], &[3, 1, 5]),
            // Short rows (a gate times a 2x2 plane), and plans of three
            // and four dimensions.
            (&[2, 3, 2, 2], &[2, 3, 1, 1]),
            (&[2, 3, 4, 5], &[2, 1, 4, 1]),
            (&[3, 1, 2], &[1, 4, 1]),
            (&[2, 7, 1, 1], &[2, 7, 1, 1]),
            // One value per row, on either side, over several tasks.
            (&[2, 3, 1, 1], &[2, 3, 2, 2]),
            (&[8, 64, 8, 8], &[8, 64, 1, 1]),
            (&[8, 64, 1, 1], &[8, 64, 8, 8]),
            // Rows of 4 and 16 values take loops of constant length.
            (&[2, 5, 4, 4], &[2, 5, 1, 1]),
            (&[2, 5, 1, 1], &[2, 5, 4, 4]),
            (&[64, 48, 2, 2], &[64, 48, 1, 1]),
        ];
        for (sa, sb) in cases {
            let out_shape: Vec<usize> = {
                let r = sa.len().max(sb.len());
                (0..r)
                    .map(|i| {
                        let da = if i + sa.len() >= r {
                            sa[i + sa.len() - r]
                        } else {
                            1
                        };
                        let db = if i + sb.len() >= r {
                            sb[i + sb.len() - r]
                        } else {
                            1
                        };
                        da.max(db)
                    })
                    .collect()
            };
            let a: Vec<f32> = (0..sa.iter().product::<usize>())
                .map(|i| i as f32 * 0.5 - 3.0)
                .collect();
            let b: Vec<f32> = (0..sb.iter().product::<usize>())
                .map(|i| i as f32 + 1.0)
                .collect();
            let plan = Broadcast::new(&[sa, sb], &out_shape);
            let mut out = vec![0.0; out_shape.iter().product()];
            binary(BinOp::Div, &plan, &a, &b, &mut out);
            let av = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(sa), a.clone()).unwrap();
            let bv = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(sb), b.clone()).unwrap();
            let expect = &av / &bv;
            assert_eq!(expect.shape(), &out_shape[..]);
            assert_eq!(
                expect.iter().copied().collect::<Vec<_>>(),
                out,
                "{sa:?} / {sb:?}"
            );
        }
    }

    /// Expand against ndarray's broadcast: rows of one repeated value
    /// (VGG's 1x1 map to 7x7), copied rows, and strided ones.
    #[test]
    fn expand_matches_ndarray() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 64, 1, 1], &[2, 64, 7, 7]),
            (&[2, 3, 1, 5], &[2, 3, 4, 5]),
            (&[3, 1], &[2, 3, 4]),
            (&[1, 4], &[3, 4]),
            (&[2, 1, 3, 1], &[2, 5, 3, 2]),
        ];
        for (sx, so) in cases {
            let x: Vec<f32> = (0..sx.iter().product::<usize>())
                .map(|i| i as f32 * 0.25 - 1.0)
                .collect();
            let plan = Broadcast::new(&[sx], so);
            let mut out = vec![f32::NAN; so.iter().product()];
            expand(&plan, &x, &mut out);
            let xv = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(sx), x).unwrap();
            let expect = xv.broadcast(ndarray::IxDyn(so)).unwrap();
            assert_eq!(
                expect.iter().copied().collect::<Vec<_>>(),
                out,
                "{sx:?} -> {so:?}"
            );
        }
    }

    #[test]
    fn transpose_and_softmax() {
        let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let mut out = vec![0.0; 24];
        transpose(&x, &[2, 3, 4], &[2, 0, 1], &mut out);
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3, 4]), x.clone()).unwrap();
        let t = a.permuted_axes(ndarray::IxDyn(&[2, 0, 1]));
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), out);
        let mut s = vec![0.0; 6];
        softmax(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &mut s, 3, 1);
        let e: f32 = (1f32.exp() + 2f32.exp() + 3f32.exp()).recip();
        assert!((s[2] - 3f32.exp() * e).abs() < 1e-6);
        assert!((s[3] - 1.0 / 3.0).abs() < 1e-6);
    }

    /// The vectorized loops (one per operator, compiled for each SIMD
    /// level and chosen at run time) against the scalar `apply`, bit for bit.
    #[test]
    fn vector_loops_match_scalar_apply() {
        use proptest::prelude::*;
        let unaries = [
            Unary::Sigmoid,
            Unary::Silu,
            Unary::HardSigmoid(0.2, 0.5),
            Unary::HardSwish,
            Unary::Erf,
            Unary::Gelu(false),
            Unary::Gelu(true),
            Unary::Sqrt,
            Unary::Not,
        ];
        let binaries = [BinOp::Pow, BinOp::Mod(true), BinOp::Mod(false), BinOp::Div];
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        proptest!(|(x in proptest::collection::vec(-8.0f32..8.0, 1..200),
                    y in proptest::collection::vec(0.1f32..3.0, 1..200))| {
            for f in unaries {
                let mut out = vec![0.0; x.len()];
                unary(f, &x, &mut out);
                for (v, o) in x.iter().zip(&out) {
                    prop_assert!(same(f.apply(*v), *o), "{f:?}({v}) = {o}");
                }
            }
            let n = x.len().min(y.len());
            let plan = Broadcast::new(&[&[n], &[n]], &[n]);
            for op in binaries {
                let mut out = vec![0.0; n];
                binary(op, &plan, &x[..n], &y[..n], &mut out);
                for k in 0..n {
                    prop_assert!(same(op.apply(x[k], y[k]), out[k]), "{op:?}({}, {})", x[k], y[k]);
                }
            }
        });
    }

    /// erf and GELU against values computed in double precision.
    #[test]
    fn erf_and_gelu_values() {
        for (x, e) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-2.0, -0.995_322_265_018_952_7),
            (3.5, 0.999_999_256_901_627_7),
        ] {
            assert!((f64::from(erf(x)) - e).abs() < 2e-7, "erf({x})");
            // gelu(x) = x (1 + erf(x / sqrt 2)) / 2, so at x sqrt 2 it
            // reads erf(x).
            let xs = x * std::f32::consts::SQRT_2;
            let want = f64::from(xs) * (1.0 + e) / 2.0;
            assert!((f64::from(gelu(xs)) - want).abs() < 1e-6, "gelu({xs})");
        }
        // The tanh form stays within 1e-3 of the exact one.
        for i in -40..40 {
            let v = i as f32 * 0.2;
            assert!((gelu(v) - gelu_tanh(v)).abs() < 1e-3, "{v}");
        }
    }

    /// Slice and Pad against index-by-index references.
    #[test]
    fn slice_and_pad_match_naive() {
        use qint8_graph::shape::{PadSpec, SliceAxis};
        let shape = [3usize, 5, 4];
        let x: Vec<f32> = (0..60).map(|i| i as f32).collect();
        let at = |i: usize, j: usize, k: usize| x[(i * 5 + j) * 4 + k];
        let axes = [
            SliceAxis {
                start: 2,
                step: -1,
                len: 2,
            },
            SliceAxis {
                start: 0,
                step: 2,
                len: 3,
            },
            SliceAxis {
                start: 1,
                step: 1,
                len: 3,
            },
        ];
        let mut out = vec![0.0; 18];
        slice(&x, &shape, &axes, &mut out);
        let mut want = Vec::new();
        for i in [2, 1] {
            for j in [0, 2, 4] {
                for k in 1..4 {
                    want.push(at(i, j, k));
                }
            }
        }
        assert_eq!(out, want);
        for mode in [
            qint8_graph::PadMode::Constant,
            qint8_graph::PadMode::Reflect,
            qint8_graph::PadMode::Edge,
            qint8_graph::PadMode::Wrap,
        ] {
            let spec = PadSpec {
                begin: vec![0, 2, -1],
                end: vec![1, 1, 3],
                value: -7.0,
                out_shape: vec![4, 8, 6],
            };
            let mut out = vec![0.0; 4 * 8 * 6];
            pad(&x, &shape, &spec, mode, &mut out);
            let src = |i: i64, d: i64| -> Option<i64> {
                if (0..d).contains(&i) {
                    return Some(i);
                }
                match mode {
                    qint8_graph::PadMode::Constant => None,
                    qint8_graph::PadMode::Edge => Some(i.clamp(0, d - 1)),
                    qint8_graph::PadMode::Wrap => Some(i.rem_euclid(d)),
                    qint8_graph::PadMode::Reflect => {
                        let mut i = i;
                        while !(0..d).contains(&i) {
                            i = if i < 0 { -i } else { 2 * (d - 1) - i };
                        }
                        Some(i)
                    }
                }
            };
            for i in 0..4 {
                for j in 0..8 {
                    for k in 0..6 {
                        let v = match (src(i, 3), src(j - 2, 5), src(k + 1, 4)) {
                            (Some(a), Some(b), Some(c)) => at(a as usize, b as usize, c as usize),
                            _ => -7.0,
                        };
                        let got = out[((i * 8 + j) * 6 + k) as usize];
                        assert_eq!(got, v, "{mode:?} at {i},{j},{k}");
                    }
                }
            }
        }
    }

    /// Layer normalization against a double-precision reference.
    #[test]
    fn layer_norm_matches_f64() {
        let n = 24;
        let x: Vec<f32> = (0..5 * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3 + 1000.0)
            .collect();
        let scale: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.1).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * -0.2).collect();
        let mut out = vec![0.0; x.len()];
        layer_norm(&x, &mut out, &scale, &bias, 1e-5);
        for (r, row) in x.chunks(n).enumerate() {
            let m = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = row.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / n as f64;
            for k in 0..n {
                let e = (f64::from(row[k]) - m) / (var + 1e-5).sqrt() * f64::from(scale[k])
                    + f64::from(bias[k]);
                assert!((f64::from(out[r * n + k]) - e).abs() < 1e-4, "{r},{k}");
            }
        }
    }
}
