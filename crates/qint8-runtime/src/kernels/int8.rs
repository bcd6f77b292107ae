//! Integer convolution (ONNX Conv between DequantizeLinear nodes, the QDQ
//! pattern of <https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html>):
//! an input quantized per tensor times int8 weights quantized per output
//! channel, summed exactly in i32 and scaled to float once per output, as
//! TensorRT and onnxruntime's integer kernels compute it.
//!
//! The product is `u8 x i8 -> i32` (AVX-512 VNNI `vpdpbusd`, four products
//! per 32-bit lane): inputs are shifted to unsigned bytes (`u = q + 128`
//! for int8) and the shift is taken back out with each channel's weight
//! sum. The kernel quantizes its input itself (QuantizeLinear's rounding),
//! so it reads either the fake-quantized tensor or, with the plan's fusion,
//! the float tensor before QuantizeLinear. The input is quantized once into
//! a zero-padded copy that keeps four channels side by side
//! (`[c / 4, h, w, 4]`), so each term of a window is a 4-byte group that the
//! kernel broadcasts straight from it: no im2col. [`tile_reference`] is the
//! scalar reference of the one SIMD kernel, [`tile`]; the plan compiler uses
//! this path only where the CPU has VNNI ([`available`]).
//!
//! Sums stay exact while the reduction is at most [`MAX_REDUCTION`] terms.

use std::sync::Arc;

use rayon::prelude::*;

use super::conv::Conv2d;

mod depthwise;

pub use depthwise::fits as depthwise_fits;

/// Output channels per tile: two 16-lane i32 registers.
pub const MC: usize = 32;
/// Output positions per tile: with the two weight vectors, 8 broadcasts
/// and 16 accumulators use 26 of the 32 vector registers (12 positions
/// made the compiler spill accumulators, at half the speed).
pub const PT: usize = 8;
/// Longest reduction (input channels x kernel taps) whose i32 sums cannot
/// overflow: `255 * 128` per term.
pub const MAX_REDUCTION: usize = (i32::MAX / (255 * 128)) as usize;
/// Multiply-adds under which a convolution runs on the calling thread
/// alone.
const PARALLEL_MACS: usize = 1 << 20;
/// Tiles of output positions per task.
const TILES_PER_TASK: usize = 8;

/// How a convolution's input is quantized (per tensor), as by ONNX
/// QuantizeLinear: `q = clamp(round(x / scale) + zero, qmin, qmax)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputQuant {
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero: i32,
    /// Smallest integer (-128 for int8, 0 for uint8, or narrower).
    pub qmin: i32,
    /// Largest integer.
    pub qmax: i32,
}

/// A convolution's int8 weights and the scales that turn its integer sums
/// back into real values.
#[derive(Debug, Clone)]
pub struct Int8Weights {
    /// `[cout / MC (rounded up)][kq][MC][4]`: the reduction runs over
    /// (kernel row, kernel column, input channel), channels fastest and
    /// padded to a multiple of 4, so that each 4-byte group is four
    /// channels of one tap (contiguous in the quantized input's layout).
    packed: Arc<Vec<i8>>,
    /// Reduction length in groups of four: `kh * kw * cin4 / 4`.
    kq: usize,
    /// Input channels rounded up to a multiple of 4.
    cin4: usize,
    /// Per output channel: the sum of its integer weights.
    row_sum: Vec<i32>,
    /// Per output channel: input scale times weight scale.
    scale: Vec<f32>,
    /// Input scale.
    in_scale: f32,
    /// Bounds of `round(x / scale)` (the integer range less the zero point).
    in_lo: f32,
    in_hi: f32,
    /// The unsigned byte that stands for a real 0 (zero point plus the shift).
    zero: i32,
    /// Set for a depthwise convolution ([`depthwise`]), which leaves
    /// `packed`, `kq` and `cin4` unused.
    depthwise: Option<Arc<depthwise::DwWeights>>,
    /// A fused residual's quantization (scale and the bounds of
    /// `round(r / scale)`): the residual is fake-quantized as it is added.
    residual: Option<(f32, f32, f32)>,
}

impl Int8Weights {
    /// Packs integer weights `q` (`[cout, cin, kh, kw]` as `dims`, values
    /// in `-128..=127` given as f32) with weight scales `w_scale` (one per
    /// output channel, or one for the whole tensor) for an input quantized
    /// as `input`.
    pub fn new(q: &[f32], dims: [usize; 4], w_scale: &[f32], input: InputQuant) -> Self {
        let [cout, cin, kh, kw] = dims;
        let cin4 = cin.div_ceil(4) * 4;
        let kq = kh * kw * cin4 / 4;
        let blocks = cout.div_ceil(MC);
        let mut packed = vec![0i8; blocks * kq * MC * 4];
        let mut row_sum = vec![0i32; cout];
        for co in 0..cout {
            let (b, r) = (co / MC, co % MC);
            for ci in 0..cin {
                for t in 0..kh * kw {
                    let v = q[(co * cin + ci) * kh * kw + t] as i8;
                    let k = t * cin4 + ci;
                    packed[((b * kq + k / 4) * MC + r) * 4 + k % 4] = v;
                    row_sum[co] += v as i32;
                }
            }
        }
        let scale = (0..cout)
            .map(|co| input.scale * w_scale[if w_scale.len() == 1 { 0 } else { co }])
            .collect();
        Self {
            packed: Arc::new(packed),
            kq,
            cin4,
            row_sum,
            scale,
            in_scale: input.scale,
            in_lo: (input.qmin - input.zero) as f32,
            in_hi: (input.qmax - input.zero) as f32,
            // int8 values are shifted by 128 to unsigned bytes.
            zero: input.zero + if input.qmin < 0 { 128 } else { 0 },
            depthwise: None,
            residual: None,
        }
    }

    /// Packs the integer weights `q` of a depthwise convolution (`[c, 1,
    /// kh, kw]`, `dims` = `[c, kh, kw]`), as [`Int8Weights::new`].
    pub fn new_depthwise(q: &[f32], dims: [usize; 3], w_scale: &[f32], input: InputQuant) -> Self {
        let [c, kh, kw] = dims;
        let (dw, row_sum) = depthwise::DwWeights::new(q, c, kh, kw);
        Self {
            row_sum,
            depthwise: Some(Arc::new(dw)),
            // The same input and per-channel scales as a dense convolution
            // of `c` outputs (its empty packing is not used).
            ..Self::new(&[], [c, 0, 0, 0], w_scale, input)
        }
    }

    /// Whether these are a depthwise convolution's weights.
    pub fn is_depthwise(&self) -> bool {
        self.depthwise.is_some()
    }

    /// Fake-quantizes a fused residual with `q` (QuantizeLinear, then
    /// DequantizeLinear, per tensor) as it is added, so that a residual
    /// that passes a quantize-dequantize pair needs no pass of its own.
    pub fn with_residual_quant(mut self, q: InputQuant) -> Self {
        self.residual = Some((q.scale, (q.qmin - q.zero) as f32, (q.qmax - q.zero) as f32));
        self
    }

    /// A residual value as it is added: fake-quantized as ONNX
    /// QuantizeLinear and DequantizeLinear compute it (NaN goes to the
    /// lower bound), or as it is.
    #[inline(always)]
    fn residual(&self, r: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0;
        match self.residual {
            Some((s, lo, hi)) => {
                let v = r / s;
                let v = if v > lo { v } else { lo };
                let v = if v < hi { v } else { hi };
                ((v + MAGIC) - MAGIC) * s
            }
            None => r,
        }
    }

    /// Bytes of constant data held.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + 8 * self.row_sum.len()
            + self.depthwise.as_ref().map_or(0, |d| d.bytes())
    }
}

/// Whether this CPU runs the integer kernel natively (AVX-512 VNNI, and
/// `QINT8_SIMD` not capping the runtime below AVX-512).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd_level() >= qint8_math::kernels::SimdLevel::Avx512
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs the depthwise integer kernel natively: it also
/// needs AVX-512 VBMI's byte permutes. (Where it does not, the plan keeps
/// depthwise convolutions in float, faster than the scalar reference.)
pub fn depthwise_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The zero-padded input plane the columns are gathered from.
struct Padded {
    /// Rows and columns.
    ph: usize,
    pw: usize,
}

fn padded(c: &Conv2d) -> Padded {
    let (pt, pl) = c.pad;
    let need_h = (c.oh.max(1) - 1) * c.stride.0 + (c.kh - 1) * c.dilation.0 + 1;
    let need_w = (c.ow.max(1) - 1) * c.stride.1 + (c.kw - 1) * c.dilation.1 + 1;
    Padded {
        ph: need_h.max(pt + c.ih),
        pw: need_w.max(pl + c.iw),
    }
}

/// Scratch words [`run`] needs for `c`: the quantized input, four bytes
/// (channels) to a word.
pub fn scratch_len(c: &Conv2d, w: &Int8Weights) -> usize {
    if w.is_depthwise() {
        // Its planes use per-thread buffers.
        return 0;
    }
    let pd = padded(c);
    c.n * pd.ph * pd.pw * w.cin4 / 4
}

/// Which kernels [`run`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The VNNI kernels where [`available`], else the references.
    Best,
    /// The scalar references ([`tile_reference`] and a scalar epilogue),
    /// for tests: the same bits as the VNNI kernels.
    Reference,
}

/// Runs `c` (ungrouped) on its integer weights `w`: `x` is the input
/// `[n, cin, ih, iw]`, float or already fake-quantized (each value
/// `scale * (q - zero)`), which the kernel quantizes as QuantizeLinear
/// does; `y = act(conv(x) + bias + res)`. `scratch` holds at least
/// [`scratch_len`] words.
pub fn run(
    c: &Conv2d,
    w: &Int8Weights,
    x: &[f32],
    res: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [u32],
    kernels: Kernels,
) {
    if let Some(dw) = &w.depthwise {
        // Depthwise convolutions fuse no residual (`Conv2d::can_fuse_residual`).
        let fast = kernels == Kernels::Best && depthwise_available();
        return depthwise::run(c, w, dw, x, y, fast);
    }
    let fast = kernels == Kernels::Best && available();
    let p = c.oh * c.ow;
    let len = c.n * c.cout * p;
    assert!(
        y.len() >= len
            && res.is_none_or(|r| r.len() >= len)
            && x.len() >= c.n * c.cin * c.ih * c.iw
            && scratch.len() >= scratch_len(c, w),
        "int8 convolution called with short buffers"
    );
    if p == 0 || c.n == 0 {
        return;
    }
    if c.n * p * c.cout * w.kq * 4 < PARALLEL_MACS && !super::is_sequential() {
        // Too small to gain from more threads: handing out the tasks and
        // joining them costs microseconds, as long as the product itself.
        return super::sequential(|| run(c, w, x, res, y, scratch, kernels));
    }
    let pd = padded(c);
    let words = pd.ph * pd.pw * w.cin4 / 4;
    let xq = &mut scratch[..c.n * words];
    // One task per plane of four channels, so that one image spreads over
    // the threads too.
    let quads = w.cin4 / 4;
    let image = c.cin * c.ih * c.iw;
    if pd.ph * pd.pw == 1 {
        // One pixel, no padding: an image's words are its channels in
        // order, four to a word; one task per image, not per word.
        super::for_chunks(xq, quads, |img, dst| {
            quantize_channels(dst, &x[img * image..(img + 1) * image], w)
        });
    } else if let Some(table) = fast.then(|| SmallPlanes::new(c, &pd)).flatten() {
        // Small planes: one task per image, each four-channel plane
        // quantized and placed in a few vector instructions.
        super::for_chunks(xq, quads * pd.ph * pd.pw, |img, dst| {
            // SAFETY: `SmallPlanes::new` checked the CPU and the sizes.
            unsafe { table.quantize(&x[img * image..(img + 1) * image], dst, c.cin, w) }
        });
    } else {
        super::for_chunks(xq, pd.ph * pd.pw, |i, dst| {
            let img = i / quads;
            quantize_quad(
                &x[img * image..(img + 1) * image],
                i % quads,
                dst,
                c,
                &pd,
                w,
            )
        });
    }
    // SAFETY: a u32 slice viewed as its bytes (any alignment, same memory).
    let xq: &[u8] = unsafe { std::slice::from_raw_parts(xq.as_ptr() as *const u8, xq.len() * 4) };
    let img_len = words * 4;
    // Offset of each 4-byte group from its window's first byte.
    let tap: Vec<usize> = (0..w.kq)
        .map(|g| {
            let (t, cq) = (g / quads, g % quads);
            let (ki, kj) = (t / c.kw, t % c.kw);
            ((cq * pd.ph + ki * c.dilation.0) * pd.pw + kj * c.dilation.1) * 4
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(lanes) = fast.then(|| Lanes::new(c, &pd)).flatten() {
        let blocks = c.cout.div_ceil(MC);
        // Segments run on across images, so a tile's two may come from
        // two images (planes of one segment fill whole tiles).
        let per_task = (LANES_TASK / 16).div_ceil(2) * 2;
        let all = c.n * lanes.segments;
        let spans = all.div_ceil(per_task);
        let out = OutPtr(y.as_mut_ptr());
        let task = |t: usize| {
            let (b, s) = (t / spans, t % spans);
            let segs = s * per_task..((s + 1) * per_task).min(all);
            // SAFETY: `fast` only where `available()`; every segment's
            // windows lie in its image's quantized planes (as the general
            // tile's do), its output and residual channels within the
            // buffers checked above, and this task alone writes channels
            // of block `b` at these segments' positions.
            unsafe {
                match lanes.rows {
                    1 => lanes_vnni::<1>(c, w, xq, &tap, res, out, b, &lanes, segs),
                    2 => lanes_vnni::<2>(c, w, xq, &tap, res, out, b, &lanes, segs),
                    _ => lanes_vnni::<4>(c, w, xq, &tap, res, out, b, &lanes, segs),
                }
            }
        };
        let tasks = blocks * spans;
        if super::is_sequential() || tasks == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
        return;
    }
    let np = c.n * p;
    let tiles = np.div_ceil(PT);
    let blocks = c.cout.div_ceil(MC);
    let chunks = tiles.div_ceil(TILES_PER_TASK);
    let dest = Dest {
        p,
        w,
        c,
        res,
        out: OutPtr(y.as_mut_ptr()),
    };
    let block_len = w.kq * MC * 4;
    // First byte of an output position's window in `xq`.
    let window = |(img, oy, ox): (usize, usize, usize)| {
        img * img_len + (oy * c.stride.0 * pd.pw + ox * c.stride.1) * 4
    };
    // Windows grow with the position, so the last one bounds every read
    // the kernel makes: checked once here, not per tile.
    let last = window(positions(c, np - 1, np)[0]);
    let tap_max = tap.iter().max().copied().unwrap_or(0);
    assert!(
        w.kq == 0 || last + tap_max + 4 <= xq.len(),
        "int8 convolution windows pass the quantized input"
    );
    // A task is a run of tiles for one block of channels: that block's
    // weights stay in cache across its tiles.
    let task = |t: usize| {
        let (chunk, b) = (t / blocks, t % blocks);
        let wb = &w.packed[b * block_len..(b + 1) * block_len];
        let channels = b * MC..(b * MC + MC).min(c.cout);
        for ti in chunk * TILES_PER_TASK..((chunk + 1) * TILES_PER_TASK).min(tiles) {
            let at = positions(c, ti * PT, np);
            let base = at.map(window);
            let place = TileAt {
                channels: channels.clone(),
                cols: PT.min(np - ti * PT),
                col_at: at.map(|(img, oy, ox)| img * c.cout * p + oy * c.ow + ox),
            };
            let mut acc = [0i32; PT * MC];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: `fast` only where `available()`; the asserts
                // above bound every window read, `wb` is a whole block, `y`
                // and `res` are long enough, and this task alone writes
                // these positions.
                unsafe {
                    // Only the tile's real positions are summed: batch-1
                    // products on 1x1 planes have one.
                    match place.cols {
                        1 => tile_vnni::<1>(w.kq, wb, xq, &base, &tap, &mut acc),
                        2 => tile_vnni::<2>(w.kq, wb, xq, &base, &tap, &mut acc),
                        3 | 4 => tile_vnni::<4>(w.kq, wb, xq, &base, &tap, &mut acc),
                        _ => tile_vnni::<PT>(w.kq, wb, xq, &base, &tap, &mut acc),
                    }
                    store_vnni(&acc, &place, dest);
                }
                continue;
            }
            tile_reference(w.kq, wb, xq, &base, &tap, &mut acc);
            store_tile(&acc, &place, dest);
        }
    };
    let tasks = chunks * blocks;
    if super::is_sequential() || tasks == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Transposes 16 rows of 16 floats in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    // Interleave 32-bit pairs of rows, then 64-bit pairs: u[4k + m] holds
    // column 4L + m of rows 4k..4k+4 in 128-bit lane L.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (k, m) = (i / 4, i % 4);
        let (a, b) = (pd(t[4 * k + m / 2]), pd(t[4 * k + 2 + m / 2]));
        ps(if m % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Gather lane L of u[m], u[4 + m], u[8 + m], u[12 + m] into row 4L + m.
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[m], u[4 + m]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
        let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + m], u[12 + m]);
        out[m] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[8 + m] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
        out[4 + m] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[12 + m] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
    }
    out
}

/// [`store_tile`] with AVX-512: each half of the channels is scaled as
/// vectors across channels, transposed in registers, and written as runs
/// of consecutive positions (one masked store per channel and run).
///
/// # Safety
/// The CPU has AVX-512F; `out` holds every position written and no other
/// thread writes them; `res`, when given, is as long as the output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn store_vnni(acc: &[i32; PT * MC], place: &TileAt, dest: Dest<'_>) {
    let (
        TileAt {
            channels,
            cols,
            col_at,
        },
        Dest { p, w, c, res, out },
    ) = (place, dest);
    let cols = *cols;
    use std::arch::x86_64::*;
    // Runs of positions that are consecutive in the output.
    let mut runs = [(0usize, 0usize); PT];
    let mut n_runs = 0;
    let mut a = 0;
    for j in 1..=cols {
        if j == cols || col_at[j] != col_at[j - 1] + 1 {
            runs[n_runs] = (a, j);
            n_runs += 1;
            a = j;
        }
    }
    let (lo, hi) = c.act.bounds();
    let act = |v: __m512| super::act_zmm(v, c.act, lo, hi);
    let n = channels.len();
    for h in 0..n.div_ceil(16) {
        let c0 = channels.start + 16 * h;
        let lanes = (n - 16 * h).min(16);
        let m: __mmask16 = if lanes == 16 { !0 } else { (1 << lanes) - 1 };
        // SAFETY: masked loads read only channels < c0 + lanes <= cout.
        let (corr, scale, bias) = unsafe {
            (
                _mm512_mullo_epi32(
                    _mm512_maskz_loadu_epi32(m, w.row_sum.as_ptr().add(c0)),
                    _mm512_set1_epi32(w.zero),
                ),
                _mm512_maskz_loadu_ps(m, w.scale.as_ptr().add(c0)),
                _mm512_maskz_loadu_ps(m, c.bias.as_ptr().add(c0)),
            )
        };
        if p == 1 {
            // One pixel per plane: a position's channels lie side by side
            // in the output, so each row is stored as it is (a transpose
            // would leave one-lane runs: a store per channel and position).
            for (j, &at) in col_at.iter().enumerate().take(cols) {
                let at = at + c0;
                // SAFETY: 16 lanes at acc[j * MC + 16h ..] lie within
                // PT * MC; output and residual lanes are masked to
                // channels < cout of this position, which only this task
                // writes.
                unsafe {
                    let a = _mm512_loadu_epi32(acc.as_ptr().add(j * MC + 16 * h));
                    let f =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, corr)), scale, bias);
                    let v = match res {
                        Some(r) => act(_mm512_add_ps(
                            f,
                            residual_vec(w, _mm512_maskz_loadu_ps(m, r.as_ptr().add(at))),
                        )),
                        None => act(f),
                    };
                    _mm512_mask_storeu_ps(out.0.add(at), m, v);
                }
            }
            continue;
        }
        let rows: [__m512; 16] = std::array::from_fn(|j| {
            if j >= PT {
                return _mm512_setzero_ps();
            }
            // SAFETY: 16 lanes at acc[j * MC + 16h ..] lie within PT * MC.
            let a = unsafe { _mm512_loadu_epi32(acc.as_ptr().add(j * MC + 16 * h)) };
            let f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, corr)), scale, bias);
            if res.is_some() {
                f
            } else {
                act(f)
            }
        });
        let cols_t = transpose16(rows);
        for (i, &v) in cols_t.iter().enumerate().take(lanes) {
            let co = c0 + i;
            for &(a, b) in &runs[..n_runs] {
                let mask: __mmask16 = (((1u32 << b) - 1) & !((1u32 << a) - 1)) as u16;
                // Lane j goes to col_at[j] + co * p for j in a..b; the
                // base is col_at[a] - a >= 0 (positions never run ahead of
                // their output offsets), and masked lanes touch nothing.
                let at = col_at[a] - a + co * p;
                // SAFETY: see above and the function's contract.
                unsafe {
                    let v = match res {
                        Some(r) => act(_mm512_add_ps(
                            v,
                            residual_vec(w, _mm512_maskz_loadu_ps(mask, r.as_ptr().add(at))),
                        )),
                        None => v,
                    };
                    _mm512_mask_storeu_ps(out.0.add(at), mask, v);
                }
            }
        }
    }
}

/// [`Int8Weights::residual`] on a vector, operation for operation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn residual_vec(w: &Int8Weights, r: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let Some((s, lo, hi)) = w.residual else {
        return r;
    };
    let (s, lo, hi) = (_mm512_set1_ps(s), _mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let magic = _mm512_set1_ps(12_582_912.0);
    let v = _mm512_div_ps(r, s);
    let v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, lo), lo, v);
    let v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, hi), hi, v);
    _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(v, magic), magic), s)
}

/// Output channels of a lanes tile: a quarter of a weight block.
const LANES_MR: usize = 8;
/// Output positions per lanes task (per block of channels).
const LANES_TASK: usize = 256;

/// The path that puts output positions in the vector lanes, for
/// stride-1 convolutions: 16 output positions that are consecutive in the
/// output plane fill a vector, each weight group is broadcast, and a
/// lane's result goes straight to its place in the output: no transpose.
/// (The general tile keeps channels in the lanes and suits the rest:
/// strided convolutions and planes under 16 positions.)
///
/// The positions are cut into segments of at most 16 lanes; a tile takes
/// two. A segment's input words are one run where rows are at least 16
/// wide (a row's last segment may be shorter), or where a 1x1 convolution
/// without padding reads planes without gaps (runs cross rows). On rows
/// 4 or 8 wide a segment is 4 or 2 whole rows, consecutive in the output
/// but apart in the padded input: two loads and a permute gather them.
struct Lanes {
    /// Segments per image.
    segments: usize,
    /// Segments per output row (0: the plane as one run).
    per_row: usize,
    /// Output rows per segment (1 unless rows are 4 or 8 wide).
    rows: usize,
    /// Words per padded input row.
    pw: usize,
    /// Bytes of an image's quantized input, and floats of its output.
    image: (usize, usize),
    /// For segments of several rows: the word (from the segment's first)
    /// that each lane reads. The rows' words span at most 32, so two
    /// loads and one permute gather them.
    gather: [u32; 16],
}

impl Lanes {
    fn new(c: &Conv2d, pd: &Padded) -> Option<Self> {
        if c.stride != (1, 1) {
            return None;
        }
        let p = c.oh * c.ow;
        let flat = c.kh == 1
            && c.kw == 1
            && c.pad == (0, 0)
            && (c.oh, c.ow) == (c.ih, c.iw)
            && (pd.ph, pd.pw) == (c.ih, c.iw);
        let pw = pd.pw;
        let image = (pd.ph * pw * c.cin.div_ceil(4) * 4, c.cout * p);
        if flat && p >= 16 {
            return Some(Self {
                segments: p.div_ceil(16),
                per_row: 0,
                rows: 1,
                pw,
                image,
                gather: [0; 16],
            });
        }
        let lanes = if c.ow >= 16 {
            Self {
                segments: c.oh * c.ow.div_ceil(16),
                per_row: c.ow.div_ceil(16),
                rows: 1,
                pw,
                image,
                gather: [0; 16],
            }
        } else if p >= 16 && matches!(c.ow, 4 | 8) && (c.oh.min(16 / c.ow) - 1) * pw + c.ow <= 32 {
            // Rows of 4 or 8 on planes of at least 16 positions.
            let rows = 16 / c.ow;
            Self {
                segments: c.oh.div_ceil(rows),
                per_row: 1,
                rows,
                pw,
                image,
                gather: std::array::from_fn(|l| ((l / c.ow) * pw + l % c.ow) as u32),
            }
        } else {
            return None;
        };
        // Off 1x1 products, the windows' vector loads mostly cross cache
        // lines (a tap one word on is four bytes off), so a tile costs
        // about a quarter more than the general one's (`cargo bench
        // --bench conv`): these runs take the lanes path only where the
        // general tile would waste more, on channels past `cout` in its
        // 32-channel blocks (the lanes path pads to 8, and its positions
        // to whole segments).
        let used = |n: usize, unit: usize| n as f64 / (n.div_ceil(unit) * unit) as f64;
        let lanes_used = used(c.cout, LANES_MR) * p as f64 / (16 * lanes.segments) as f64;
        (lanes_used > 1.25 * used(c.cout, MC)).then_some(lanes)
    }

    /// Segment `s` (counted on across images): the byte offset of its
    /// first window in the quantized input, the offset of its first
    /// position in the output at channel 0, and its number of positions.
    fn segment(&self, c: &Conv2d, s: usize) -> (usize, usize, usize) {
        let (img, s) = (s / self.segments, s % self.segments);
        let (x0, y0) = (img * self.image.0, img * self.image.1);
        if self.per_row == 0 {
            let j = 16 * s;
            return (x0 + 4 * j, y0 + j, (c.oh * c.ow - j).min(16));
        }
        if self.rows > 1 {
            let oy = s * self.rows;
            return (
                x0 + 4 * oy * self.pw,
                y0 + oy * c.ow,
                (c.oh - oy).min(self.rows) * c.ow,
            );
        }
        let (oy, ox) = (s / self.per_row, 16 * (s % self.per_row));
        (
            x0 + 4 * (oy * self.pw + ox),
            y0 + oy * c.ow + ox,
            (c.ow - ox).min(16),
        )
    }
}

/// The lanes path for one block `b` of [`MC`] output channels and
/// segments `segs` (counted on across images) of the quantized input `x`,
/// each segment `PARTS` rows (the value of [`Lanes::rows`]).
/// Sums and epilogue are those of [`tile_reference`] and [`store_tile`]
/// (the same bits).
///
/// # Safety
/// The CPU has AVX-512 VNNI; every window of the segments' positions
/// (offset plus `tap`) lies in `x`; `out` (and `res`) hold the whole
/// output; no other thread writes these channels at these positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn lanes_vnni<const PARTS: usize>(
    c: &Conv2d,
    w: &Int8Weights,
    x: &[u8],
    tap: &[usize],
    res: Option<&[f32]>,
    out: OutPtr,
    b: usize,
    lanes: &Lanes,
    segs: std::ops::Range<usize>,
) {
    use std::arch::x86_64::*;
    let (p, kq) = (c.oh * c.ow, w.kq);
    let block = &w.packed[b * kq * MC * 4..(b + 1) * kq * MC * 4];
    let (lo, hi) = c.act.bounds();
    // SAFETY: 16 u32 lanes.
    let gather = unsafe { _mm512_loadu_si512(lanes.gather.as_ptr() as *const __m512i) };
    for r0 in (0..MC).step_by(LANES_MR) {
        let co0 = b * MC + r0;
        if co0 >= c.cout {
            break;
        }
        let rows = (c.cout - co0).min(LANES_MR);
        for s in segs.clone().step_by(2) {
            // The tile's two segments (the second empty past the end).
            let seg: [(usize, usize, usize); 2] = std::array::from_fn(|v| {
                if s + v < segs.end {
                    lanes.segment(c, s + v)
                } else {
                    (0, 0, 0)
                }
            });
            let masks = seg.map(|(_, _, n)| ((1u32 << n) - 1) as u16);
            // A segment of several rows reads the words from its first
            // window to its last one (at most 32) and permutes its lanes
            // out of them (`gather`).
            let spans = seg.map(|(_, _, n)| {
                if n == 0 || PARTS == 1 {
                    0
                } else {
                    (n / c.ow - 1) * lanes.pw + c.ow
                }
            });
            let word_masks: [[__mmask16; 2]; 2] = std::array::from_fn(|v| {
                let n = if PARTS > 1 { spans[v] } else { seg[v].2 };
                [
                    ((1u32 << n.min(16)) - 1) as u16,
                    ((1u32 << n.saturating_sub(16)) - 1) as u16,
                ]
            });
            let mut acc = [[_mm512_setzero_si512(); 2]; LANES_MR];
            for (g, &off) in tap.iter().enumerate().take(kq) {
                // SAFETY: masked loads read only the segments' windows
                // (see the function's contract); the weight group lies in
                // the block.
                unsafe {
                    let xs: [__m512i; 2] = std::array::from_fn(|v| {
                        let at = x.as_ptr().wrapping_add(seg[v].0 + off) as *const i32;
                        let first = _mm512_maskz_loadu_epi32(word_masks[v][0], at);
                        if PARTS == 1 {
                            return first;
                        }
                        let second =
                            _mm512_maskz_loadu_epi32(word_masks[v][1], at.wrapping_add(16));
                        _mm512_permutex2var_epi32(first, gather, second)
                    });
                    let wq = block.as_ptr().add((g * MC + r0) * 4) as *const i32;
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let wb = _mm512_set1_epi32(wq.add(r).read_unaligned());
                        for (a, &xv) in acc.iter_mut().zip(&xs) {
                            *a = _mm512_dpbusd_epi32(*a, xv, wb);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let co = co0 + r;
                let corr = _mm512_set1_epi32(w.row_sum[co].wrapping_mul(w.zero));
                let (scale, bias) = (_mm512_set1_ps(w.scale[co]), _mm512_set1_ps(c.bias[co]));
                for (v, &a) in acc.iter().enumerate() {
                    if masks[v] == 0 {
                        continue;
                    }
                    let at = seg[v].1 + co * p;
                    let f =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a, corr)), scale, bias);
                    // SAFETY: masked lanes are positions of channel co of
                    // this image (see the function's contract).
                    unsafe {
                        let val = match res {
                            Some(r) => super::act_zmm(
                                _mm512_add_ps(
                                    f,
                                    residual_vec(
                                        w,
                                        _mm512_maskz_loadu_ps(masks[v], r.as_ptr().add(at)),
                                    ),
                                ),
                                c.act,
                                lo,
                                hi,
                            ),
                            None => super::act_zmm(f, c.act, lo, hi),
                        };
                        _mm512_mask_storeu_ps(out.0.add(at), masks[v], val);
                    }
                }
            }
        }
    }
}

super::multiversion! {
    /// Writes channels `channels` of a tile: `act(sum * scale + bias (+ res))`
    /// at `col_at[j] + channel * p` for its first `cols` positions.
    fn store_tile(acc: &[i32; PT * MC], place: &TileAt, dest: Dest<'_>) {
        let (TileAt { channels, cols, col_at }, Dest { p, w, c, res, out }) = (place, dest);
        let cols = *cols;
        let n = channels.len();
        let (corr, scale, bias) = (
            &w.row_sum[channels.clone()],
            &w.scale[channels.clone()],
            &c.bias[channels.clone()],
        );
        // Scale and bias across channels (vectorized), then write each
        // channel's positions.
        let mut v = [0f32; PT * MC];
        for (v, a) in v.chunks_exact_mut(MC).zip(acc.chunks_exact(MC)).take(cols) {
            for i in 0..n {
                // Fused multiply-add, as the AVX-512 path: the same bits.
                let f = ((a[i] - w.zero * corr[i]) as f32).mul_add(scale[i], bias[i]);
                v[i] = if res.is_some() { f } else { c.act.apply(f) };
            }
        }
        for (i, co) in channels.clone().enumerate() {
            for (j, &at) in col_at[..cols].iter().enumerate() {
                let at = at + co * p;
                let f = v[j * MC + i];
                let f = match res {
                    Some(res) => c.act.apply(f + w.residual(res[at])),
                    None => f,
                };
                // SAFETY: each (channel, position) pair belongs to exactly
                // one task of `run`, so `at` is written once; `at < y.len()`.
                unsafe { out.write(at, f) };
            }
        }
    }
}

/// One tile's place in the output: its channels, how many of its positions
/// are real, and each position's output offset at channel 0.
struct TileAt {
    channels: std::ops::Range<usize>,
    cols: usize,
    col_at: [usize; PT],
}

/// Where tiles are written, and what their epilogue adds.
#[derive(Clone, Copy)]
struct Dest<'a> {
    /// Output positions per channel plane.
    p: usize,
    w: &'a Int8Weights,
    c: &'a Conv2d,
    /// A fused residual, shaped like the output.
    res: Option<&'a [f32]>,
    out: OutPtr,
}

/// The output, written from several tasks at disjoint positions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `run`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `at` is in bounds and no other thread touches it.
    #[inline(always)]
    unsafe fn write(self, at: usize, v: f32) {
        unsafe { *self.0.add(at) = v }
    }
}

/// (image, output row, output column) of the `PT` output positions from
/// flat position `j0` (of `np`); positions past the end repeat the last
/// one (their results are dropped). Stepped, not divided, per position.
fn positions(c: &Conv2d, j0: usize, np: usize) -> [(usize, usize, usize); PT] {
    let p = c.oh * c.ow;
    let j = j0.min(np - 1);
    let (mut img, q) = (j / p, j % p);
    let (mut oy, mut ox) = (q / c.ow, q % c.ow);
    let mut out = [(img, oy, ox); PT];
    for (jj, o) in out.iter_mut().enumerate().skip(1) {
        if j0 + jj < np {
            ox += 1;
            if ox == c.ow {
                ox = 0;
                oy += 1;
                if oy == c.oh {
                    oy = 0;
                    img += 1;
                }
            }
        }
        *o = (img, oy, ox);
    }
    out
}

/// Quantizes channels `4 * cq ..= 4 * cq + 3` of one image (`src` is the
/// image, `[cin, ih, iw]`) as QuantizeLinear does, into their zero-padded
/// plane of 4-byte groups (`dst`, `[ph, pw]` words). On an already
/// fake-quantized input (exact multiples of the scale) this recovers the
/// integers.
fn quantize_quad(
    src: &[f32],
    cq: usize,
    dst: &mut [u32],
    c: &Conv2d,
    pd: &Padded,
    w: &Int8Weights,
) {
    let (pt, pl, plane) = (c.pad.0, c.pad.1, c.ih * c.iw);
    let fill = w.zero.clamp(0, 255) as u32 * 0x0101_0101;
    // Four channel planes, or the zero point past the last channel.
    let chan = |k: usize| src.get((4 * cq + k) * plane..(4 * cq + k + 1) * plane);
    let planes = [chan(0), chan(1), chan(2), chan(3)];
    dst[..pt * pd.pw].fill(fill);
    dst[(pt + c.ih) * pd.pw..].fill(fill);
    let body = &mut dst[pt * pd.pw..(pt + c.ih) * pd.pw];
    if pl == 0 && pd.pw == c.iw {
        // No padding on the sides: the rows are one run (long vectors on
        // small planes).
        quantize_run(body, planes, w);
        return;
    }
    if c.iw < 32 {
        // Short rows would run the vector loop's tail: quantize the plane
        // as one run at the end of the body, then move each row forward
        // to its place (row iy's place ends no later than row iy + 1's
        // run starts, because every padded row is at least as long as the
        // left padding plus a row).
        let (len, run) = (body.len(), plane);
        quantize_run(&mut body[len - run..], planes, w);
        for iy in 0..c.ih {
            let from = len - run + iy * c.iw;
            body.copy_within(from..from + c.iw, iy * pd.pw + pl);
            let row = &mut body[iy * pd.pw..(iy + 1) * pd.pw];
            row[..pl].fill(fill);
            row[pl + c.iw..].fill(fill);
        }
        return;
    }
    for (iy, row) in body.chunks_exact_mut(pd.pw).enumerate() {
        row[..pl].fill(fill);
        row[pl + c.iw..].fill(fill);
        let rows = planes.map(|p| p.map(|p| &p[iy * c.iw..(iy + 1) * c.iw]));
        quantize_run(&mut row[pl..pl + c.iw], rows, w);
    }
}

/// Quantization of planes so small that four channels' values fit one
/// vector (at most 16 pixels) and the zero-padded plane is at most 16
/// words: the four planes are quantized as one vector of 64 values, and
/// one byte permute (AVX-512 VBMI) turns their bytes, channel by channel,
/// into the padded plane of 4-byte groups, padding included. The general
/// path would spend a call and a short vector tail on each plane.
struct SmallPlanes {
    /// Byte `o` of the padded plane comes from byte `index[o]` of the
    /// quantized values (channel-major), or from the zero point (64).
    index: [u8; 64],
    /// Pixels per plane.
    plane: usize,
    /// Words of a padded plane.
    words: usize,
}

impl SmallPlanes {
    /// The table for `c`, or `None` where the planes are too large or the
    /// CPU lacks VNNI or VBMI.
    fn new(c: &Conv2d, pd: &Padded) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let (plane, words) = (c.ih * c.iw, pd.ph * pd.pw);
            if plane > 16
                || words > 16
                || !available()
                || !std::arch::is_x86_feature_detected!("avx512vbmi")
            {
                return None;
            }
            let (pt, pl) = c.pad;
            let mut index = [64u8; 64];
            for (o, i) in index.iter_mut().enumerate().take(4 * words) {
                let (py, px, k) = (o / 4 / pd.pw, o / 4 % pd.pw, o % 4);
                if (pt..pt + c.ih).contains(&py) && (pl..pl + c.iw).contains(&px) {
                    *i = (k * plane + (py - pt) * c.iw + px - pl) as u8;
                }
            }
            Some(Self {
                index,
                plane,
                words,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (c, pd);
            None
        }
    }

    /// Quantizes one image `src` (`[cin, plane]`) into its padded planes
    /// of 4-byte groups `dst` (`[cin4 / 4][words]`), with the bits of
    /// [`quantize_byte`]; channels past `cin` hold the zero point.
    ///
    /// # Safety
    /// Only from a table [`SmallPlanes::new`] returned; `src` holds the
    /// image and `dst` its padded planes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn quantize(&self, src: &[f32], dst: &mut [u32], cin: usize, w: &Int8Weights) {
        use std::arch::x86_64::*;
        let index = unsafe { _mm512_loadu_si512(self.index.as_ptr() as *const __m512i) };
        let fill = _mm512_set1_epi8(w.zero.clamp(0, 255) as u8 as i8);
        let (scale, lo, hi) = (
            _mm512_set1_ps(w.in_scale),
            _mm512_set1_ps(w.in_lo),
            _mm512_set1_ps(w.in_hi),
        );
        let (magic, zero) = (_mm512_set1_ps(12_582_912.0), _mm512_set1_ps(w.zero as f32));
        let mantissa = _mm512_set1_ps(8_388_608.0);
        let store: __mmask16 = ((1u32 << self.words) - 1) as u16;
        for (cq, out) in dst.chunks_exact_mut(self.words).enumerate() {
            // Channel-major values of this quad: masked loads give 0.0
            // (the zero point's byte) for channels past `cin`.
            let valid = cin.saturating_sub(4 * cq).min(4) * self.plane;
            // Each 16 values' bytes are built into their 128-bit lane in
            // registers (a stack copy read back as one vector stalled on
            // store forwarding).
            let mut a = _mm512_setzero_si512();
            for v in 0..(4 * self.plane).div_ceil(16) {
                let left = valid.saturating_sub(16 * v).min(16);
                // SAFETY: the mask keeps the load within the quad's
                // valid values, which `src` holds.
                let x = unsafe {
                    _mm512_maskz_loadu_ps(
                        ((1u32 << left) - 1) as u16,
                        src.as_ptr().wrapping_add(4 * cq * self.plane + 16 * v),
                    )
                };
                // As `quantize_byte`, operation for operation.
                let x = _mm512_div_ps(x, scale);
                let x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, lo), lo, x);
                let x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, hi), hi, x);
                let x = _mm512_add_ps(
                    _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(x, magic), magic), zero),
                    mantissa,
                );
                let b = _mm512_cvtepi32_epi8(_mm512_castps_si512(x));
                a = match v {
                    0 => _mm512_inserti32x4::<0>(a, b),
                    1 => _mm512_inserti32x4::<1>(a, b),
                    2 => _mm512_inserti32x4::<2>(a, b),
                    _ => _mm512_inserti32x4::<3>(a, b),
                };
            }
            // SAFETY: `out` holds `words` words.
            unsafe {
                let plane = _mm512_permutex2var_epi8(a, index, fill);
                _mm512_mask_storeu_epi32(out.as_mut_ptr() as *mut i32, store, plane);
            }
        }
    }

    /// Never called: [`SmallPlanes::new`] gives no table off x86-64.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn quantize(&self, _: &[f32], _: &mut [u32], _: usize, _: &Int8Weights) {}
}

/// One value quantized as QuantizeLinear does, as its byte. Adding 1.5 *
/// 2^23 rounds to the nearest integer (ties to even); adding the zero
/// point after that is exact, and 2^23 leaves the byte in the low mantissa
/// bits: no float-to-int conversion, which would not vectorize. The
/// selects send NaN to the lower bound.
#[inline(always)]
fn quantize_byte(v: f32, w: &Int8Weights) -> u32 {
    const MAGIC: f32 = 12_582_912.0;
    let v = v / w.in_scale;
    let v = if v > w.in_lo { v } else { w.in_lo };
    let v = if v < w.in_hi { v } else { w.in_hi };
    (((v + MAGIC) - MAGIC) + w.zero as f32 + 8_388_608.0).to_bits() & 0xff
}

super::multiversion! {
    /// One image's channel vector (a 1x1 plane) into words of four
    /// channels, the zero point past the last channel.
    fn quantize_channels(d: &mut [u32], xs: &[f32], w: &Int8Weights) {
        let q = |v: f32| quantize_byte(v, w);
        let full = (xs.len() / 4).min(d.len());
        for (d, v) in d.iter_mut().zip(xs.chunks_exact(4)) {
            *d = q(v[0]) | q(v[1]) << 8 | q(v[2]) << 16 | q(v[3]) << 24;
        }
        let z = w.zero.clamp(0, 255) as u32;
        for (k, d) in d.iter_mut().enumerate().skip(full) {
            let mut v = 0;
            for b in 0..4 {
                v |= xs.get(4 * k + b).map_or(z, |&x| q(x)) << (8 * b);
            }
            *d = v;
        }
    }
}

super::multiversion! {
    /// One run of positions: four channels' bytes into each word (`None`:
    /// a channel past the last one, holding the zero point).
    fn quantize_run(d: &mut [u32], rows: [Option<&[f32]>; 4], w: &Int8Weights) {
        let q = |v: f32| quantize_byte(v, w);
        match rows {
            [Some(r0), Some(r1), Some(r2), Some(r3)] => {
                for ((((d, &a), &b), &e), &f) in d.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
                    *d = q(a) | q(b) << 8 | q(e) << 16 | q(f) << 24;
                }
            }
            _ => {
                let z = w.zero.clamp(0, 255) as u32;
                for (ix, d) in d.iter_mut().enumerate() {
                    let mut v = 0;
                    for (k, r) in rows.iter().enumerate() {
                        v |= r.map_or(z, |r| q(r[ix])) << (8 * k);
                    }
                    *d = v;
                }
            }
        }
    }
}

/// `acc[j * MC + i] = sum over q of w[q][i] . xq[base[j] + tap[q]]` (four
/// byte products per term) for one tile: `w` is a block of packed weights
/// (`[kq][MC][4]` i8), `xq` the quantized input.
pub fn tile(
    kq: usize,
    w: &[i8],
    xq: &[u8],
    base: &[usize; PT],
    tap: &[usize],
    acc: &mut [i32; PT * MC],
) {
    check_tile(kq, w, xq, base, tap);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available` checked the CPU features; bounds checked above.
        unsafe { tile_vnni::<PT>(kq, w, xq, base, tap, acc) };
        return;
    }
    tile_reference(kq, w, xq, base, tap, acc);
}

/// The bounds [`tile_vnni`] relies on.
fn check_tile(kq: usize, w: &[i8], xq: &[u8], base: &[usize; PT], tap: &[usize]) {
    let hi = base.iter().max().copied().unwrap_or(0) + tap.iter().max().copied().unwrap_or(0);
    assert!(w.len() >= kq * MC * 4 && tap.len() >= kq && (kq == 0 || hi + 4 <= xq.len()));
}

/// Scalar reference of [`tile`].
pub fn tile_reference(
    kq: usize,
    w: &[i8],
    xq: &[u8],
    base: &[usize; PT],
    tap: &[usize],
    acc: &mut [i32; PT * MC],
) {
    acc.fill(0);
    for (q, &off) in tap.iter().enumerate().take(kq) {
        for (j, &b) in base.iter().enumerate() {
            for i in 0..MC {
                for t in 0..4 {
                    acc[j * MC + i] += w[(q * MC + i) * 4 + t] as i32 * xq[b + off + t] as i32;
                }
            }
        }
    }
}

/// [`tile`] with AVX-512 VNNI for the first `P` positions (`acc` keeps
/// zeros for the rest).
///
/// # Safety
/// The CPU has AVX-512 VNNI; [`check_tile`]'s bounds hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const P: usize>(
    kq: usize,
    w: &[i8],
    xq: &[u8],
    base: &[usize; PT],
    tap: &[usize],
    acc: &mut [i32; PT * MC],
) {
    use std::arch::x86_64::*;
    let mut c = [[_mm512_setzero_si512(); 2]; PT];
    let src: [*const u8; PT] = base.map(|b| xq.as_ptr().wrapping_add(b));
    for (q, &off) in tap.iter().enumerate().take(kq) {
        // SAFETY (loads): the caller checked w.len() >= kq * MC * 4 and
        // base + tap + 4 <= xq.len(); all loads are unaligned.
        unsafe {
            let wq = w.as_ptr().add(q * MC * 4) as *const __m512i;
            let w0 = _mm512_loadu_si512(wq);
            let w1 = _mm512_loadu_si512(wq.add(1));
            for (c, s) in c.iter_mut().zip(&src).take(P) {
                let a = _mm512_set1_epi32((s.add(off) as *const i32).read_unaligned());
                c[0] = _mm512_dpbusd_epi32(c[0], a, w0);
                c[1] = _mm512_dpbusd_epi32(c[1], a, w1);
            }
        }
    }
    for (j, c) in c.iter().enumerate() {
        for (h, v) in c.iter().enumerate() {
            // SAFETY: 16 lanes at acc[j * MC + 16h ..], within PT * MC.
            unsafe {
                _mm512_storeu_si512(acc.as_mut_ptr().add(j * MC + 16 * h) as *mut __m512i, *v)
            };
        }
    }
}
