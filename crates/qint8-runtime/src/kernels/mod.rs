//! CPU kernels. Each module opens with the ONNX operators it implements.
//! Fast paths sit beside straightforward references that tests compare them to.

pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod int8;
pub mod packed;
pub mod pool;
pub mod winograd;

use std::cell::Cell;

use qint8_math::kernels::SimdLevel;
use rayon::prelude::*;

thread_local! {
    /// Set while a thread runs a whole sub-batch on its own: kernels then
    /// stay on the calling thread instead of splitting work.
    static SEQUENTIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel on this thread executing sequentially.
pub fn sequential<R>(f: impl FnOnce() -> R) -> R {
    let prev = SEQUENTIAL.with(|s| s.replace(true));
    let r = f();
    SEQUENTIAL.with(|s| s.set(prev));
    r
}

/// Whether kernels on this thread run sequentially.
pub fn is_sequential() -> bool {
    SEQUENTIAL.with(Cell::get)
}

/// `dst = src` (equal lengths) in fixed-size pieces, each a few vector
/// moves: for the short rows and planes of small feature maps, where a
/// `memcpy` call costs more than the copy. (A plain element loop is no
/// substitute: the compiler turns it back into a `memcpy` call.) Meant
/// for up to a few hundred floats.
#[inline(always)]
pub(crate) fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (mut d, mut s) = (&mut dst[..n], &src[..n]);
    while d.len() >= 16 {
        let (dh, dt) = d.split_at_mut(16);
        dh.copy_from_slice(&s[..16]);
        (d, s) = (dt, &s[16..]);
        // Keeps the compiler from fusing the pieces into one `memcpy`
        // call; it emits no instruction.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
    for w in [8, 4, 2, 1] {
        if d.len() >= w {
            let (dh, dt) = d.split_at_mut(w);
            dh.copy_from_slice(&s[..w]);
            (d, s) = (dt, &s[w..]);
        }
    }
}

/// Calls `f(index, chunk)` for every `chunk`-sized piece of `data`, on the
/// rayon pool unless there is only one piece or this thread is sequential.
pub(crate) fn for_chunks<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    if is_sequential() || data.len() <= chunk {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The instruction-set tier the runtime's own loops use (shared with
/// qint8-math, so `QINT8_SIMD` caps both).
pub fn simd_level() -> SimdLevel {
    SimdLevel::active()
}

/// `n` values in [-1, 1] on a grid of 0.001 from a xorshift seeded with
/// `seed`, for the crate's unit tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// Runs `f` with AVX-512 (or AVX2) enabled where [`simd_level`] allows it,
/// so that the loops `f` inlines run on wide vectors: the baseline build
/// has 4-lane SSE2 only. The arithmetic per element is the same (Rust does
/// not contract into fused multiply-adds), so are the results. A loop
/// behind a call that does not inline stays at the baseline: this serves
/// closures of this crate (one from the analysis crate did not inline).
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match simd_level() {
            // SAFETY: simd_level() never exceeds what the CPU supports.
            SimdLevel::Avx512 => return unsafe { avx512(f) },
            // SAFETY: as above.
            SimdLevel::Avx2 => return unsafe { avx2(f) },
            _ => {}
        }
    }
    f()
}

/// Defines a function whose body is compiled for the baseline target and
/// inside `#[target_feature]` wrappers for AVX2 and AVX-512, dispatching on
/// [`simd_level`] at run time. Bodies must not rely on closures for their
/// hot loops (closures called through other crates are compiled separately).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) {
                body($($arg),*)
            }
            match $crate::kernels::simd_level() {
                // SAFETY: simd_level() never exceeds what the CPU supports.
                #[cfg(target_arch = "x86_64")]
                qint8_math::kernels::SimdLevel::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                qint8_math::kernels::SimdLevel::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// An activation applied elementwise, on its own or fused into a
/// convolution's epilogue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// Identity.
    None,
    /// max(x, 0).
    Relu,
    /// clamp(x, lo, hi).
    Clip(f32, f32),
    /// x * sigmoid(x) (SiLU), with [`sigmoid`]: the same values as the
    /// unfused Sigmoid and Mul.
    Silu,
}

impl Activation {
    /// The bounds the activation clamps to (infinite where it does not
    /// clamp; SiLU clamps nothing).
    pub(crate) fn bounds(self) -> (f32, f32) {
        match self {
            Activation::None | Activation::Silu => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Clip(lo, hi) => (lo, hi),
        }
    }

    /// Applies the activation to every value of `v`, one loop per
    /// activation so that each vectorizes; inlined, so it runs with the
    /// caller's instruction set (`multiversion!` bodies, AVX-512 kernels).
    #[inline(always)]
    pub fn apply_all(self, v: &mut [f32]) {
        match self {
            Activation::None => {}
            Activation::Relu => v.iter_mut().for_each(|x| *x = Activation::Relu.apply(*x)),
            Activation::Clip(lo, hi) => v
                .iter_mut()
                .for_each(|x| *x = Activation::Clip(lo, hi).apply(*x)),
            Activation::Silu => v.iter_mut().for_each(|x| *x = Activation::Silu.apply(*x)),
        }
    }

    /// Applies the activation to one value.
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            // Written as a select so NaN propagates as in ONNX Runtime.
            Activation::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            Activation::Clip(lo, hi) => {
                let v = if v < lo { lo } else { v };
                if v > hi {
                    hi
                } else {
                    v
                }
            }
            Activation::Silu => v * sigmoid(v),
        }
    }
}

/// `e^x` for f32, branch-free so loops over it vectorize (the libm call
/// does not). Cody-Waite range reduction and a degree-6 polynomial: relative
/// error below 2 ulp over the whole range; overflows to infinity and
/// underflows to 0 like `f32::exp`.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
    // without a libm call, so the loop vectorizes on every tier.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-104.0, 88.72284);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // exp(r) on |r| <= ln2/2: Taylor to degree 6 (Horner).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // Scale by 2^n in two steps so n down to -150 still lands in subnormals.
    // SAFETY: |n| <= 151 after the clamp above, so it fits i32.
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let n1 = n >> 1;
    let n2 = n - n1;
    p * f32::from_bits(((n1 + 127).max(0) as u32) << 23)
        * f32::from_bits(((n2 + 127).max(0) as u32) << 23)
}

/// Logistic sigmoid `1 / (1 + e^-x)` on top of [`fast_exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `v` after `act` on 16 lanes, where `(lo, hi)` is [`Activation::bounds`]:
/// clamped (compare and select, as [`Activation::apply`] does, which keeps
/// NaN), or [`silu_zmm`]. Every lane equals [`Activation::apply`] bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn act_zmm(
    v: std::arch::x86_64::__m512,
    act: Activation,
    lo: f32,
    hi: f32,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if act == Activation::Silu {
        return silu_zmm(v);
    }
    let v = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(lo)),
        v,
        _mm512_set1_ps(lo),
    );
    _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(hi)),
        v,
        _mm512_set1_ps(hi),
    )
}

/// [`Activation::Silu`] on 16 lanes, for epilogues that hold values in
/// registers: [`fast_exp`]'s and [`sigmoid`]'s operations, each rounded
/// the same way in the same order, so every lane equals the scalar form
/// bit for bit (tested against it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn silu_zmm(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    // fast_exp(-v). The clamp as f32::clamp: max and min take the value
    // as the second operand, which they return for NaN.
    let x = _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(v),
        _mm512_set1_epi32(i32::MIN),
    ));
    let x = _mm512_min_ps(set(88.72284), _mm512_max_ps(set(-104.0), x));
    let n = _mm512_sub_ps(
        _mm512_add_ps(
            _mm512_mul_ps(x, set(std::f32::consts::LOG2_E)),
            set(12_582_912.0),
        ),
        set(12_582_912.0),
    );
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, set(0.693_359_4))),
        _mm512_mul_ps(n, set(-2.121_944_4e-4)),
    );
    let mut p = _mm512_mul_ps(r, set(1.0 / 5040.0));
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0] {
        p = _mm512_mul_ps(r, _mm512_add_ps(set(c), p));
    }
    let p = _mm512_add_ps(set(1.0), p);
    let n = _mm512_cvttps_epi32(n);
    let n1 = _mm512_srai_epi32::<1>(n);
    let n2 = _mm512_sub_epi32(n, n1);
    let pow2 = |k: __m512i| {
        let e = _mm512_max_epi32(
            _mm512_add_epi32(k, _mm512_set1_epi32(127)),
            _mm512_setzero_si512(),
        );
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    };
    let e = _mm512_mul_ps(_mm512_mul_ps(p, pow2(n1)), pow2(n2));
    // v * sigmoid(v)
    _mm512_mul_ps(v, _mm512_div_ps(set(1.0), _mm512_add_ps(set(1.0), e)))
}

/// `dst[j * rows + i] = src[i * cols + j]`: the transpose of a row-major
/// `rows x cols` matrix (`src` and `dst` hold at least `rows * cols`
/// floats). With AVX2, 8 x 8 blocks go through registers (eight loads,
/// 24 shuffles, eight stores), where an element loop does a strided load
/// or store per value; [`transpose_reference`] is the plain loop.
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    transpose_on(simd_level(), src, rows, cols, dst)
}

/// [`transpose`] on a given tier.
fn transpose_on(level: SimdLevel, src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    if rows == 1 || cols == 1 {
        // A vector: the same order either way.
        dst.copy_from_slice(src);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && rows.min(cols) >= 4 && rows.max(cols) >= 8 {
        // SAFETY: AVX2 is available (level <= the detected tier); both
        // slices hold rows * cols floats.
        unsafe {
            match (rows, cols) {
                // 2x2 maps' channels (the depthwise reorderings).
                (_, 4) => transpose_cols4(src, rows, dst),
                (4, _) => transpose_rows4(src, cols, dst),
                _ if rows >= 8 && cols >= 8 => transpose_avx2(src, rows, cols, dst),
                _ => transpose_reference(src, rows, cols, dst),
            }
        };
        return;
    }
    let _ = level;
    transpose_reference(src, rows, cols, dst);
}

/// [`transpose`]'s 8 x 8 blocks, then its edges.
///
/// # Safety
/// AVX2 is available; `src` and `dst` hold `rows * cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_avx2(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    for i in (0..r8).step_by(8) {
        for j in (0..c8).step_by(8) {
            // SAFETY: rows i..i+8 and columns j..j+8 lie inside both
            // matrices (the caller's contract).
            unsafe {
                transpose8x8(
                    src.as_ptr().add(i * cols + j),
                    cols,
                    dst.as_mut_ptr().add(j * rows + i),
                    rows,
                )
            };
        }
    }
    // The edges: columns past the last block, then rows past it.
    transpose_part(src, rows, cols, dst, 0..r8, c8..cols);
    transpose_part(src, rows, cols, dst, r8..rows, 0..cols);
}

/// The plain transpose [`transpose`] is tested against.
pub fn transpose_reference(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    transpose_part(src, rows, cols, dst, 0..rows, 0..cols);
}

/// Rows `ri` x columns `ci` of the transpose.
fn transpose_part(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    ri: std::ops::Range<usize>,
    ci: std::ops::Range<usize>,
) {
    if ci.is_empty() {
        return;
    }
    for i in ri {
        let row = &src[i * cols + ci.start..i * cols + ci.end];
        // Column j of the row goes to dst[j * rows + i].
        let col = dst[ci.start * rows + i..].iter_mut().step_by(rows);
        for (d, &v) in col.zip(row) {
            *d = v;
        }
    }
}

/// [`transpose`] of `rows x 4`: 8 rows at a time become 8 floats of each
/// of the 4 output rows.
///
/// # Safety
/// AVX2 is available; `src` and `dst` hold `rows * 4` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_cols4(src: &[f32], rows: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let r8 = rows / 8 * 8;
    for i in (0..r8).step_by(8) {
        // SAFETY: rows i..i+8 of src and columns i..i+8 of each of dst's 4
        // rows are inside the slices (the caller's contract).
        unsafe {
            let s = src.as_ptr().add(i * 4);
            // Row r beside row r + 4, then 4 x 4 transposes in each half.
            let a: [__m256; 4] = std::array::from_fn(|r| {
                let lo = _mm256_castps128_ps256(_mm_loadu_ps(s.add(r * 4)));
                _mm256_insertf128_ps::<1>(lo, _mm_loadu_ps(s.add((r + 4) * 4)))
            });
            let t0 = _mm256_unpacklo_ps(a[0], a[1]);
            let t1 = _mm256_unpackhi_ps(a[0], a[1]);
            let t2 = _mm256_unpacklo_ps(a[2], a[3]);
            let t3 = _mm256_unpackhi_ps(a[2], a[3]);
            let d = dst.as_mut_ptr().add(i);
            _mm256_storeu_ps(d, _mm256_shuffle_ps::<0x44>(t0, t2));
            _mm256_storeu_ps(d.add(rows), _mm256_shuffle_ps::<0xEE>(t0, t2));
            _mm256_storeu_ps(d.add(2 * rows), _mm256_shuffle_ps::<0x44>(t1, t3));
            _mm256_storeu_ps(d.add(3 * rows), _mm256_shuffle_ps::<0xEE>(t1, t3));
        }
    }
    transpose_part(src, rows, 4, dst, r8..rows, 0..4);
}

/// [`transpose`] of `4 x cols`: 8 columns at a time become 8 output rows
/// of 4.
///
/// # Safety
/// AVX2 is available; `src` and `dst` hold `4 * cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_rows4(src: &[f32], cols: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let c8 = cols / 8 * 8;
    for j in (0..c8).step_by(8) {
        // SAFETY: columns j..j+8 of src's 4 rows and rows j..j+8 of dst
        // are inside the slices (the caller's contract).
        unsafe {
            let b: [__m256; 4] =
                std::array::from_fn(|r| _mm256_loadu_ps(src.as_ptr().add(r * cols + j)));
            let t0 = _mm256_unpacklo_ps(b[0], b[1]);
            let t1 = _mm256_unpackhi_ps(b[0], b[1]);
            let t2 = _mm256_unpacklo_ps(b[2], b[3]);
            let t3 = _mm256_unpackhi_ps(b[2], b[3]);
            // u[k]: output rows k (low half) and k + 4 (high half).
            let u = [
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
            ];
            let d = dst.as_mut_ptr().add(j * 4);
            for (k, v) in u.into_iter().enumerate() {
                _mm_storeu_ps(d.add(k * 4), _mm256_castps256_ps128(v));
                _mm_storeu_ps(d.add((k + 4) * 4), _mm256_extractf128_ps::<1>(v));
            }
        }
    }
    transpose_part(src, 4, cols, dst, 0..4, c8..cols);
}

/// One 8 x 8 block: rows `ls` floats apart at `s`, written as columns at
/// `d` (rows `ld` apart).
///
/// # Safety
/// AVX2 is available; the 8 rows of 8 floats at `s` and at `d` are valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose8x8(s: *const f32, ls: usize, d: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add(k * ls)));
        // Pairs of rows interleaved, then pairs of pairs, then halves.
        let t: [__m256; 8] = std::array::from_fn(|k| {
            let (a, b) = (r[k / 2 * 2], r[k / 2 * 2 + 1]);
            if k % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        let u: [__m256; 8] = std::array::from_fn(|k| {
            let (q, half) = (k / 4 * 4, k % 4);
            let (a, b) = (t[q + half % 2], t[q + 2 + half % 2]);
            if half < 2 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for k in 0..8 {
            // Output row k: lane half k / 4 of u[order[k % 4]] and u[4 + ..].
            let order = [0, 2, 1, 3];
            let (a, b) = (u[order[k % 4]], u[4 + order[k % 4]]);
            let o = if k < 4 {
                _mm256_permute2f128_ps::<0x20>(a, b)
            } else {
                _mm256_permute2f128_ps::<0x31>(a, b)
            };
            _mm256_storeu_ps(d.add(k * ld), o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`silu_zmm`] on 16 values against [`Activation::Silu`], bit for bit
    /// (NaN for NaN).
    #[cfg(target_arch = "x86_64")]
    fn silu_lanes_match(v: [f32; 16]) -> Result<(), String> {
        use std::arch::x86_64::*;
        let mut out = [0f32; 16];
        // SAFETY: callers checked AVX-512F; both arrays hold 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), silu_zmm(_mm512_loadu_ps(v.as_ptr()))) };
        for (x, y) in v.iter().zip(out) {
            let want = Activation::Silu.apply(*x);
            if !(want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan())) {
                return Err(format!("silu({x:e}): lanes {y:e}, scalar {want:e}"));
            }
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn silu_lanes_equal_the_scalar_form_at_the_edges() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // The clamp's ends, over- and underflow, subnormal results, zeros
        // of both signs, infinities and NaN.
        let edges = [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            87.3,
            88.72284,
            90.0,
            103.9,
            104.0,
            110.0,
            -87.3,
            -88.8,
            -104.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ];
        silu_lanes_match(edges).unwrap();
        silu_lanes_match(edges.map(|v| -v)).unwrap();
    }

    #[cfg(target_arch = "x86_64")]
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, .. Default::default() })]

        /// Any finite or infinite input, as the raw bits give it.
        #[test]
        fn silu_lanes_equal_the_scalar_form(bits in proptest::array::uniform16(proptest::prelude::any::<u32>()),
                                            small in proptest::array::uniform16(-30.0f32..30.0)) {
            if std::arch::is_x86_feature_detected!("avx512f") {
                silu_lanes_match(bits.map(f32::from_bits)).map_err(proptest::test_runner::TestCaseError::fail)?;
                silu_lanes_match(small).map_err(proptest::test_runner::TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn transpose_matches_reference_on_every_tier() {
        // Whole blocks, edges in either direction, and fewer than 8.
        for (rows, cols) in [
            (8, 8),
            (16, 64),
            (13, 21),
            (7, 40),
            (40, 3),
            (1, 1),
            (0, 5),
            (96, 256),
            // Vectors, and 4-wide either way (2x2 maps' channels).
            (9, 1),
            (1, 9),
            (40, 4),
            (4, 40),
            (13, 4),
            (4, 13),
            (4, 4),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32 * 0.5 - 7.0).collect();
            let mut want = vec![0.0; rows * cols];
            transpose_reference(&src, rows, cols, &mut want);
            for (i, j) in [(0, 0), (rows.saturating_sub(1), cols.saturating_sub(1))] {
                if rows * cols > 0 {
                    assert_eq!(want[j * rows + i], src[i * cols + j]);
                }
            }
            for level in SimdLevel::available() {
                let mut got = vec![f32::NAN; rows * cols];
                transpose_on(level, &src, rows, cols, &mut got);
                assert_eq!(got, want, "{rows}x{cols} {level:?}");
            }
        }
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut x = -110.0f32;
        while x < 88.7 {
            let (a, b) = (fast_exp(x), x.exp());
            if b.is_normal() {
                assert!(((a - b) / b).abs() < 4e-7, "exp({x}) = {a} vs {b}");
            } else {
                assert!((a - b).abs() <= f32::MIN_POSITIVE, "exp({x}) = {a} vs {b}");
            }
            x += 0.0137;
        }
        assert_eq!(fast_exp(100.0), f32::INFINITY);
        assert_eq!(fast_exp(-200.0), 0.0);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(200.0) == 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn activations() {
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert!(Activation::Relu.apply(f32::NAN).is_nan());
        assert_eq!(Activation::Clip(0.0, 6.0).apply(7.0), 6.0);
    }
}
