//! A packed SGEMM for convolution weights: `C[m x n] = A[m x k] * B[k x n]`
//! where A (the weights) is packed once at plan time into panels of
//! [`MR`] rows, and B (im2col columns or a 1x1 convolution's input) is packed
//! per call into panels of [`NR`] columns. The AVX-512VL microkernel keeps an
//! 8 x 24 tile of C in 24 registers and runs the whole reduction without
//! blocking K (a panel of B is at most a few hundred KB, inside L2). Bias and
//! activation are applied when a tile is written, saving a pass over C.
//!
//! On CPUs without AVX-512 the `gemm` crate's kernels are used instead.
//! [`super::gemm::sgemm_reference`] is the reference both are tested against.

use std::sync::Arc;

use super::gemm::{sgemm, Mat};
use super::Activation;
use qint8_math::kernels::SimdLevel;

/// Rows of A per panel (and of the C tile).
pub const MR: usize = 8;
/// Reduction block: a `KC x NR` block of B (24 KB) stays in L1.
const KC: usize = 256;
/// Columns of B per panel (and of the C tile): three 8-float vectors.
pub const NR: usize = 24;

/// A matrix packed for [`gemm_packed`]: panels of [`MR`] rows, each stored
/// `k`-major (`panel[p * MR + i] = A[row0 + i, p]`), zero-padded at the end.
#[derive(Debug, Clone)]
pub struct PackedA {
    /// Rows.
    pub m: usize,
    /// Columns (the reduction length).
    pub k: usize,
    data: Arc<Vec<f32>>,
    /// The unpacked matrix, kept for the fallback path.
    plain: Arc<Vec<f32>>,
}

impl PackedA {
    /// Packs a row-major `m x k` matrix.
    pub fn new(a: Arc<Vec<f32>>, m: usize, k: usize) -> Self {
        let panels = m.div_ceil(MR);
        let mut data = vec![0.0f32; panels * MR * k];
        for panel in 0..panels {
            let dst = &mut data[panel * MR * k..(panel + 1) * MR * k];
            for i in 0..MR.min(m - panel * MR) {
                let row = &a[(panel * MR + i) * k..(panel * MR + i + 1) * k];
                for (p, &v) in row.iter().enumerate() {
                    dst[p * MR + i] = v;
                }
            }
        }
        Self {
            m,
            k,
            data: Arc::new(data),
            plain: a,
        }
    }

    fn panel(&self, i: usize) -> &[f32] {
        &self.data[i * MR * self.k..(i + 1) * MR * self.k]
    }
}

/// What to do with each output row (channel) when a tile is written.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added per row.
    pub bias: &'a [f32],
    /// Applied after the bias.
    pub act: Activation,
}

/// Whether the AVX-512 path is available.
fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd_level() >= SimdLevel::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m x n] (row stride ldc) = epilogue(a * b)` where `b` is a strided
/// `k x n` view. Returns `false` (computing nothing) if a buffer is too short.
pub fn gemm_packed(
    a: &PackedA,
    b: Mat<'_>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    threads: usize,
) -> bool {
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return true;
    }
    let b_fits = k == 0 || (k - 1) * b.rs + (n - 1) * b.cs < b.data.len();
    if !b_fits || (m - 1) * ldc + n > c.len() || epi.bias.len() < m {
        return false;
    }
    if !use_avx512() {
        if !sgemm(
            m,
            n,
            k,
            Mat::row_major(&a.plain, k),
            b,
            c,
            ldc,
            false,
            threads,
        ) {
            return false;
        }
        for (r, row) in c.chunks_mut(ldc).take(m).enumerate() {
            for v in &mut row[..n] {
                *v = epi.act.apply(*v + epi.bias[r]);
            }
        }
        return true;
    }
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    // Enough tasks to balance threads; split M when N has few panels.
    let want = if threads > 1 && !super::is_sequential() {
        4 * threads
    } else {
        1
    };
    let m_split = want.div_ceil(n_panels).clamp(1, m_panels);
    let m_per = m_panels.div_ceil(m_split);
    let tasks = n_panels * m_split;
    let c_ptr = SendPtr(c.as_mut_ptr());
    let c_len = c.len();
    let parallel = threads > 1 && !super::is_sequential();
    PACKED_B.with(|cell| {
        let mut packed = cell.borrow_mut();
        let need = n_panels * k * NR;
        if packed.len() < need {
            packed.resize(need, 0.0);
        }
        pack_b_all(b, k, n, &mut packed[..need], parallel);
        let packed: &[f32] = &packed[..need];
        let run = |t: usize| {
            let (jp, ms) = (t / m_split, t % m_split);
            let j0 = jp * NR;
            let nc = NR.min(n - j0);
            let bp = &packed[jp * k * NR..(jp + 1) * k * NR];
            let ips = ms * m_per..((ms + 1) * m_per).min(m_panels);
            let mut tiles = vec![[0.0f32; MR * NR]; ips.len()];
            // Block the reduction so a block of the B panel stays in L1
            // while every A panel of the task streams past it.
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let b_blk = &bp[k0 * NR..(k0 + kc) * NR];
                for (t, ip) in ips.clone().enumerate() {
                    let a_blk = &a.panel(ip)[k0 * MR..(k0 + kc) * MR];
                    // SAFETY: AVX-512F/VL are available (checked by
                    // use_avx512); the blocks hold kc * MR and kc * NR floats.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        kernel(kc, a_blk, b_blk, &mut tiles[t], k0 > 0)
                    };
                }
                k0 += kc;
            }
            for (t, ip) in ips.clone().enumerate() {
                let tile = &tiles[t];
                let i0 = ip * MR;
                let mc = MR.min(m - i0);
                for i in 0..mc {
                    let row = i0 + i;
                    let (bias, act) = (epi.bias[row], epi.act);
                    let off = row * ldc + j0;
                    debug_assert!(off + nc <= c_len);
                    // SAFETY: tasks write disjoint tiles (distinct (row, column)
                    // ranges), all inside `c` by the bounds check above.
                    let dst = unsafe { std::slice::from_raw_parts_mut(c_ptr.get().add(off), nc) };
                    for (d, &v) in dst.iter_mut().zip(&tile[i * NR..i * NR + nc]) {
                        *d = act.apply(v + bias);
                    }
                }
            }
        };
        if tasks > 1 && parallel {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    });
    true
}

thread_local! {
    /// Packed B panels, reused across calls on this thread (a fresh
    /// multi-megabyte buffer per convolution would fault in every page).
    static PACKED_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs all of the `k x n` view `b` into panels of [`NR`] columns
/// (`out[panel][p * NR + j]`), reading B row by row so reads stream.
fn pack_b_all(b: Mat<'_>, k: usize, n: usize, out: &mut [f32], parallel: bool) {
    let n_panels = n.div_ceil(NR);
    let row = |p: usize, out: &mut [f32]| {
        for jp in 0..n_panels {
            let j0 = jp * NR;
            let nc = NR.min(n - j0);
            let dst = &mut out[jp * k * NR + p * NR..jp * k * NR + (p + 1) * NR];
            if b.cs == 1 {
                dst[..nc].copy_from_slice(&b.data[p * b.rs + j0..p * b.rs + j0 + nc]);
            } else {
                for (j, d) in dst[..nc].iter_mut().enumerate() {
                    *d = b.data[p * b.rs + (j0 + j) * b.cs];
                }
            }
            dst[nc..].fill(0.0);
        }
    };
    if parallel && k > 1 && n_panels * k * NR > 1 << 16 {
        // A row touches every panel, so parallel tasks pack whole panels.
        use rayon::prelude::*;
        out.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(jp, panel)| {
                let j0 = jp * NR;
                let nc = NR.min(n - j0);
                pack_b(b, k, j0, nc, panel);
            });
    } else {
        for p in 0..k {
            row(p, out);
        }
    }
}

/// A raw pointer that may cross threads: tasks write disjoint parts of C.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes coordinated by `gemm_packed`.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Packs columns `j0..j0 + nc` of the `k x n` view `b` into `out[p * NR + j]`,
/// zero-padding to [`NR`] columns.
fn pack_b(b: Mat<'_>, k: usize, j0: usize, nc: usize, out: &mut [f32]) {
    if b.cs == 1 && nc == NR {
        for p in 0..k {
            let src = &b.data[p * b.rs + j0..p * b.rs + j0 + NR];
            out[p * NR..(p + 1) * NR].copy_from_slice(src);
        }
    } else {
        for p in 0..k {
            let dst = &mut out[p * NR..(p + 1) * NR];
            for (j, d) in dst.iter_mut().enumerate() {
                *d = if j < nc {
                    b.data[p * b.rs + (j0 + j) * b.cs]
                } else {
                    0.0
                };
            }
        }
    }
}

/// The 8 x 24 microkernel: `tile = A_panel (8 x k) * B_panel (k x 24)`,
/// with 256-bit vectors. Zen 4 splits 512-bit operations in two; 256-bit
/// FMAs issue two per cycle from the 32 registers AVX-512VL provides,
/// which measured faster here than 16 x 16 or 8 x 32 tiles of 512-bit
/// vectors: 24 accumulators, three loads of B and eight broadcasts of A
/// per step.
///
/// # Safety
/// The CPU must support AVX-512F/VL; `a` holds `k * 8` and `b` `k * 24` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn kernel(k: usize, a: &[f32], b: &[f32], tile: &mut [f32; MR * NR], accumulate: bool) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k * MR && b.len() >= k * NR);
    let mut acc = [[_mm256_setzero_ps(); 3]; MR];
    if accumulate {
        let t = tile.as_ptr();
        for (i, c) in acc.iter_mut().enumerate() {
            // SAFETY: the tile holds MR * NR floats.
            unsafe {
                c[0] = _mm256_loadu_ps(t.add(i * NR));
                c[1] = _mm256_loadu_ps(t.add(i * NR + 8));
                c[2] = _mm256_loadu_ps(t.add(i * NR + 16));
            }
        }
    }
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for p in 0..k {
        // SAFETY: p < k, so every read is inside the panels (see above).
        unsafe {
            let b0 = _mm256_loadu_ps(bp.add(p * NR));
            let b1 = _mm256_loadu_ps(bp.add(p * NR + 8));
            let b2 = _mm256_loadu_ps(bp.add(p * NR + 16));
            let a_row = ap.add(p * MR);
            for (i, c) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*a_row.add(i));
                c[0] = _mm256_fmadd_ps(x, b0, c[0]);
                c[1] = _mm256_fmadd_ps(x, b1, c[1]);
                c[2] = _mm256_fmadd_ps(x, b2, c[2]);
            }
        }
    }
    let t = tile.as_mut_ptr();
    for (i, c) in acc.into_iter().enumerate() {
        // SAFETY: the tile holds MR * NR floats.
        unsafe {
            _mm256_storeu_ps(t.add(i * NR), c[0]);
            _mm256_storeu_ps(t.add(i * NR + 8), c[1]);
            _mm256_storeu_ps(t.add(i * NR + 16), c[2]);
        }
    }
}
