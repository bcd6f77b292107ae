//! Depthwise convolution on the integer path (one input channel per output
//! channel, `group == cin == cout`), as the dense kernel computes it: the
//! input quantized per tensor, int8 weights per channel, sums exact in i32
//! and scaled to float once per output.
//!
//! Each task quantizes one input plane at a time into a byte plane padded
//! with the zero point, then puts output positions in the vector lanes. For one
//! kernel row and one group of four taps, a 64-byte load and `vpermb`
//! (AVX-512 VBMI) give every lane the four input bytes under those taps of
//! its window, and `vpdpbusd` multiplies them by the channel's four weights
//! into the lane's sum: a 3x3 window is three instructions of each kind per
//! 16 outputs, against nine multiply-adds per tap in float, and the input is
//! read as bytes. A vector covers 16 positions of one output row, or, on
//! rows under 16 positions, as many whole rows as one load reaches. Taps
//! past the kernel width carry weight 0, so a window may read past its row.
//! [`plane_reference`] is the scalar reference of [`plane_vnni`].

use std::cell::RefCell;

use super::{quantize_byte, Int8Weights};
use crate::kernels::conv::{Conv2d, ConvGeom};
use crate::kernels::Activation;

/// Multiply-adds per task (planes are not split).
const TASK_MACS: usize = 1 << 16;
/// Multiply-adds under which the whole convolution runs on the calling
/// thread.
const PARALLEL_MACS: usize = 1 << 20;

thread_local! {
    /// This thread's padded byte plane.
    static PLANE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A depthwise convolution's weights: per channel, per kernel row, groups
/// of four taps as the four bytes of a word (`[c][kh][groups]`).
#[derive(Debug, Clone)]
pub(super) struct DwWeights {
    words: Vec<u32>,
    groups: usize,
}

impl DwWeights {
    /// Packs `q` (`[c, 1, kh, kw]`, integers as f32) and returns the
    /// weights with each channel's integer sum.
    pub(super) fn new(q: &[f32], c: usize, kh: usize, kw: usize) -> (Self, Vec<i32>) {
        let groups = kw.div_ceil(4);
        let mut words = vec![0u32; c * kh * groups];
        let mut sums = vec![0i32; c];
        for ch in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let v = q[(ch * kh + ki) * kw + kj] as i8;
                    sums[ch] += v as i32;
                    words[(ch * kh + ki) * groups + kj / 4] |= (v as u8 as u32) << (8 * (kj % 4));
                }
            }
        }
        (Self { words, groups }, sums)
    }

    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        4 * self.words.len()
    }
}

/// Whether the kernel takes a convolution of this geometry: depthwise,
/// horizontal stride 1 to 4 (a lane's window then starts within the 64
/// bytes of its load), no horizontal dilation, and output planes of at
/// least 32 positions: a vector holds positions of one plane, and on
/// smaller ones the float kernel, which puts channels in the lanes, is
/// faster (one thread, EfficientNet-B0's 5x5 layer on 4x4 planes: float
/// 344 us, integer 422 us; on 7x7 planes 268 against 236 us).
pub fn fits(g: &ConvGeom) -> bool {
    g.oh * g.ow >= 32
        && g.group > 1
        && g.group == g.cin
        && g.cout == g.cin
        && g.dilation.1 == 1
        && (1..=4).contains(&g.stride.1)
        && g.kh * g.kw > 0
        && g.kh * g.kw.div_ceil(4) * 4 <= super::MAX_REDUCTION
}

/// Where the lanes read from in the padded byte plane.
struct Layout {
    /// Padded columns (the row stride).
    pw: usize,
    /// Output rows per vector (1 where rows are 16 or more wide: then a
    /// vector is 16 positions of one row).
    rows: usize,
    /// `vpermb` indices: lane `j`'s four bytes, relative to the vector's
    /// first window.
    idx: [u8; 64],
    /// Bytes of the plane buffer: the padded plane and room for the last
    /// load.
    len: usize,
}

fn layout(c: &Conv2d, groups: usize) -> Layout {
    let (sh, sw) = c.stride;
    let (pt, pl) = c.pad;
    let ph = ((c.oh.max(1) - 1) * sh + (c.kh - 1) * c.dilation.0 + 1).max(pt + c.ih);
    let pw = ((c.ow.max(1) - 1) * sw + c.kw).max(pl + c.iw);
    let reach = |r: usize| (r - 1) * sh * pw + (c.ow.max(1) - 1) * sw + 3;
    let rows = if c.ow >= 16 {
        1
    } else {
        let mut r = (16 / c.ow.max(1)).max(1);
        while r > 1 && reach(r) > 63 {
            r -= 1;
        }
        r
    };
    let mut idx = [0u8; 64];
    let lanes = if rows == 1 { 16 } else { rows * c.ow };
    for j in 0..lanes {
        let (r, col) = if rows == 1 {
            (0, j)
        } else {
            (j / c.ow, j % c.ow)
        };
        for t in 0..4 {
            idx[4 * j + t] = (r * sh * pw + col * sw + t) as u8;
        }
    }
    // A window starts inside the padded plane; its tap groups and its
    // 64-byte load may reach past the end.
    let len = ph * pw + 4 * groups + 64;
    Layout { pw, rows, idx, len }
}

/// Quantizes input plane `src` (`[ih, iw]`) as QuantizeLinear does into
/// the interior of the padded byte plane `buf` (row stride `pw`, first
/// row `pt`, first column `pl`), one value at a time ([`quantize_byte`]).
fn fill_plane(
    buf: &mut [u8],
    src: &[f32],
    iw: usize,
    pw: usize,
    pt: usize,
    pl: usize,
    w: &Int8Weights,
) {
    for (iy, s) in src.chunks_exact(iw).enumerate() {
        let at = (pt + iy) * pw + pl;
        for (d, &v) in buf[at..at + iw].iter_mut().zip(s) {
            *d = quantize_byte(v, w) as u8;
        }
    }
}

/// [`fill_plane`] 16 values at a time, rows of any width in masked
/// vectors (short rows have no scalar tail): the same bytes.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fill_plane_avx512(
    buf: &mut [u8],
    src: &[f32],
    iw: usize,
    pw: usize,
    pt: usize,
    pl: usize,
    w: &Int8Weights,
) {
    use std::arch::x86_64::*;
    let ih = src.len() / iw;
    assert!(buf.len() >= (pt + ih) * pw && pl + iw <= pw);
    let magic = _mm512_set1_ps(12_582_912.0);
    let (scale, lo, hi) = (
        _mm512_set1_ps(w.in_scale),
        _mm512_set1_ps(w.in_lo),
        _mm512_set1_ps(w.in_hi),
    );
    let shift = _mm512_set1_ps(w.zero as f32 + 8_388_608.0);
    for iy in 0..ih {
        for x0 in (0..iw).step_by(16) {
            let n = (iw - x0).min(16);
            let m: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
            // SAFETY: lanes below `n` lie within row `iy` of `src` and of
            // the plane's interior (asserted above).
            unsafe {
                let v = _mm512_div_ps(
                    _mm512_maskz_loadu_ps(m, src.as_ptr().add(iy * iw + x0)),
                    scale,
                );
                // As `quantize_byte`: NaN goes to the lower bound.
                let v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, lo), lo, v);
                let v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, hi), hi, v);
                let r = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(v, magic), magic), shift);
                let b = _mm512_cvtepi32_epi8(_mm512_castps_si512(r));
                _mm_mask_storeu_epi8(
                    buf.as_mut_ptr().add((pt + iy) * pw + pl + x0) as *mut i8,
                    m,
                    b,
                );
            }
        }
    }
}

/// Output plane `out` of channel `ch` from its padded byte plane `buf`,
/// before the activation, one position at a time: the arithmetic of
/// [`plane_vnni`], bit for bit.
fn plane_reference(
    c: &Conv2d,
    w: &Int8Weights,
    dw: &DwWeights,
    lay: &Layout,
    buf: &[u8],
    ch: usize,
    out: &mut [f32],
) {
    let (sh, sw) = c.stride;
    let g = dw.groups;
    let words = &dw.words[ch * c.kh * g..(ch + 1) * c.kh * g];
    for oy in 0..c.oh {
        for ox in 0..c.ow {
            let mut acc = 0i32;
            for ki in 0..c.kh {
                let base = (oy * sh + ki * c.dilation.0) * lay.pw + ox * sw;
                for (gi, &word) in words[ki * g..(ki + 1) * g].iter().enumerate() {
                    for t in 0..4 {
                        let wv = (word >> (8 * t)) as u8 as i8 as i32;
                        acc += wv * buf[base + 4 * gi + t] as i32;
                    }
                }
            }
            out[oy * c.ow + ox] =
                ((acc - w.zero * w.row_sum[ch]) as f32).mul_add(w.scale[ch], c.bias[ch]);
        }
    }
}

/// [`plane_reference`] with AVX-512 VNNI and VBMI.
///
/// # Safety
/// The CPU has AVX-512 VNNI and VBMI; `buf` holds `lay.len` bytes and
/// `out` the output plane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn plane_vnni(
    c: &Conv2d,
    w: &Int8Weights,
    dw: &DwWeights,
    lay: &Layout,
    buf: &[u8],
    ch: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (sh, sw) = c.stride;
    let (dh, pw, g) = (c.dilation.0, lay.pw, dw.groups);
    let words = &dw.words[ch * c.kh * g..(ch + 1) * c.kh * g];
    // SAFETY: `idx` is 64 bytes.
    let idx = unsafe { _mm512_loadu_si512(lay.idx.as_ptr() as *const __m512i) };
    let corr = _mm512_set1_epi32(w.zero * w.row_sum[ch]);
    let (scale, bias) = (_mm512_set1_ps(w.scale[ch]), _mm512_set1_ps(c.bias[ch]));
    assert!(buf.len() >= lay.len && out.len() >= c.oh * c.ow);
    // The sum of one vector whose first window starts at byte `at`, in two
    // accumulators (even and odd kernel rows) so that consecutive
    // `vpdpbusd` do not wait on each other; integer sums, so the split
    // changes nothing.
    let sum = |at: usize| {
        let mut acc = [_mm512_setzero_si512(); 2];
        for ki in 0..c.kh {
            let row = at + ki * dh * pw;
            let a = &mut acc[ki % 2];
            for (gi, &word) in words[ki * g..(ki + 1) * g].iter().enumerate() {
                // SAFETY: `row + 4 gi` is at most the last vector's start
                // plus its row group and tap groups, and `lay.len` leaves
                // 64 bytes past that.
                let v =
                    unsafe { _mm512_loadu_si512(buf.as_ptr().add(row + 4 * gi) as *const __m512i) };
                *a = _mm512_dpbusd_epi32(
                    *a,
                    _mm512_permutexvar_epi8(idx, v),
                    _mm512_set1_epi32(word as i32),
                );
            }
        }
        _mm512_add_epi32(acc[0], acc[1])
    };
    let emit = |acc: __m512i, at: usize, n: usize, out: &mut [f32]| {
        let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr)), scale, bias);
        let m: __mmask16 = if n >= 16 { !0 } else { (1u16 << n) - 1 };
        // SAFETY: lanes `at..at + n` lie within the output plane.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), m, v) };
    };
    if lay.rows == 1 {
        for oy in 0..c.oh {
            for ox0 in (0..c.ow).step_by(16) {
                let acc = sum(oy * sh * pw + ox0 * sw);
                emit(acc, oy * c.ow + ox0, c.ow - ox0, out);
            }
        }
    } else {
        for oy0 in (0..c.oh).step_by(lay.rows) {
            let acc = sum(oy0 * sh * pw);
            emit(acc, oy0 * c.ow, (c.oh - oy0).min(lay.rows) * c.ow, out);
        }
    }
}

crate::kernels::multiversion! {
    /// The activation over a task's outputs, in one pass after its planes:
    /// on small planes, applying it per plane left each plane's few vectors
    /// waiting on SiLU's long chain of dependent operations.
    fn activate(v: &mut [f32], act: Activation) {
        act.apply_all(v);
    }
}

/// Runs depthwise convolution `c` on its integer weights: `x` is the input
/// `[n, c, ih, iw]` (float or fake-quantized), `y` the output; `fast`
/// picks the VNNI kernel, which the caller checked the CPU has.
pub(super) fn run(
    c: &Conv2d,
    w: &Int8Weights,
    dw: &DwWeights,
    x: &[f32],
    y: &mut [f32],
    fast: bool,
) {
    let (p, q) = (c.oh * c.ow, c.ih * c.iw);
    let planes = c.n * c.cout;
    assert!(
        x.len() >= planes * q && y.len() >= planes * p,
        "int8 depthwise convolution called with short buffers"
    );
    if p == 0 || planes == 0 {
        return;
    }
    let lay = layout(c, dw.groups);
    let plane_macs = p * c.kh * dw.groups * 4;
    let per_task = (TASK_MACS / plane_macs).max(1);
    let body = |t: usize, chunk: &mut [f32]| {
        let mut go = |buf: &mut Vec<u8>| {
            let len = lay.len;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            // Every position outside the image holds the zero point's byte;
            // the planes of this task overwrite only the interior.
            buf.fill(w.zero.clamp(0, 255) as u8);
            let (pt, pl) = c.pad;
            for (i, out) in chunk.chunks_mut(p).enumerate() {
                let plane = t * per_task + i;
                let (src, ch) = (&x[plane * q..(plane + 1) * q], plane % c.cout);
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the caller checked the CPU features; `buf`
                    // holds `lay.len` bytes and `out` one plane.
                    unsafe {
                        fill_plane_avx512(buf, src, c.iw, lay.pw, pt, pl, w);
                        plane_vnni(c, w, dw, &lay, buf, ch, out);
                    }
                    continue;
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = fast;
                fill_plane(buf, src, c.iw, lay.pw, pt, pl, w);
                plane_reference(c, w, dw, &lay, buf, ch, out);
            }
            activate(chunk, c.act);
        };
        PLANE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => go(&mut buf),
            Err(_) => go(&mut Vec::new()),
        })
    };
    let y = &mut y[..planes * p];
    if planes * plane_macs < PARALLEL_MACS {
        crate::kernels::sequential(|| crate::kernels::for_chunks(y, per_task * p, body));
    } else {
        crate::kernels::for_chunks(y, per_task * p, body);
    }
}
