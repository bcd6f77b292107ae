//! A packed SGEMM for convolution weights: `C[m x n] = A[m x k] * B[k x n]`
//! where A (the weights) is packed once at plan time into panels of
//! [`MR`] rows, and B (im2col columns or a 1x1 convolution's input) is packed
//! per call into panels of [`NR`] columns, except where a full panel can be
//! read where it lies (a row-major B; stride-1 windows over small maps, see
//! `Windows`). The AVX-512 microkernel keeps an
//! 8 x 48 tile of C in 24 registers; the reduction is blocked by `KC` (256 rows) so an
//! A block stays in L1 while B panels stream from L2. Bias and activation
//! are applied when a tile is written, saving a pass over C.
//!
//! On CPUs without AVX-512 the `gemm` crate's kernels are used instead.
//! [`super::gemm::sgemm_reference`] is the reference both are tested against.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

use super::conv::Conv2d;
use super::gemm::{sgemm, Mat};
use super::{multiversion, Activation};
use qint8_math::kernels::SimdLevel;

/// Rows of A per panel (and of the C tile).
pub const MR: usize = 8;
/// Reduction block: a `KC x MR` block of A (8 KB) stays in L1 while the
/// `KC x NR` blocks of B (48 KB) stream past it from L2.
const KC: usize = 256;
/// Packed B floats per L2-resident chunk (512 KB).
const L2_FLOATS: usize = 1 << 17;
/// Columns of B per panel (and of the C tile): three 16-float vectors.
pub const NR: usize = 48;

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

    /// Packs a row-major `m x k` matrix that nothing else holds, keeping
    /// the unpacked copy only where the fallback path needs it (no
    /// AVX-512): half the memory for matrices made just to be packed.
    pub fn new_owned(a: Vec<f32>, m: usize, k: usize) -> Self {
        let mut p = Self::new(Arc::new(a), m, k);
        if use_avx512() {
            p.plain = Arc::new(Vec::new());
        }
        p
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
    /// Added elementwise after the bias (a fused residual `Add`), laid out
    /// like C (element `(r, j)` at `r * ldc + j`).
    pub res: Option<&'a [f32]>,
    /// Applied last.
    pub act: Activation,
}

impl Epilogue<'_> {
    /// The epilogue of one value at row `r`, flat index `i` into C.
    #[inline(always)]
    pub fn apply(&self, v: f32, r: usize, i: usize) -> f32 {
        let v = v + self.bias[r];
        let v = match self.res {
            Some(res) => v + res[i],
            None => v,
        };
        self.act.apply(v)
    }
}

thread_local! {
    /// Reused per-thread buffers: packed B panels of one task, B packed for
    /// all tasks, and a direct convolution's padded input. Reuse keeps large
    /// per-call allocations (page faults, zeroing) off the hot path.
    static TASK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SHARED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A small-plane depthwise convolution's channels-last input and output.
    pub(super) static DEPTHWISE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's buffer `key` (stale
/// contents: `f` must write before it reads), or on a fresh zeroed buffer
/// if that one is in use.
pub(crate) fn with_reused<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
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
    if !b_fits || (m - 1) * ldc + n > c.len() || !epi_fits(&epi, m, n, ldc) {
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
            for (j, v) in row[..n].iter_mut().enumerate() {
                *v = epi.apply(*v, r, r * ldc + j);
            }
        }
        return true;
    }
    // A row-major B needs no packing for full tiles: rows are read in place.
    let direct = (b.cs == 1).then_some(InPlace::Rows(SendConst(b.data.as_ptr()), b.rs));
    tiled(a, n, c, ldc, epi, threads, direct, |j0, nc, k0, kc, out| {
        pack_b(b, j0, nc, k0, kc, out)
    });
    true
}

/// Whether a 1x1 stride-1 convolution reads its input's planes unchanged.
fn is_pointwise(conv: &Conv2d, phase_width: Option<usize>) -> bool {
    (conv.kh, conv.kw, conv.stride, conv.pad) == (1, 1, (1, 1), (0, 0))
        && (conv.oh, conv.ow) == (conv.ih, conv.iw)
        && phase_width.is_none()
}

/// Whether [`gemm_packed_conv`] can write `conv`'s batched product straight
/// into the output's images (its `images` argument): on the AVX-512
/// kernel, for the products whose 16-pixel vectors it reads in place
/// (stride 1 and planes a multiple of 16 pixels: pointwise convolutions,
/// and windows over maps 2, 4 or 8 pixels wide).
pub fn writes_images(conv: &Conv2d, phase_width: Option<usize>) -> bool {
    if !use_avx512() || conv.oh * conv.ow == 0 {
        return false;
    }
    if is_pointwise(conv, phase_width) {
        return Windows::fits(conv.oh * conv.ow, conv.ow, conv.ow);
    }
    if phase_width.is_some() || conv.ow >= GATHER_BELOW || conv.stride != (1, 1) {
        return false;
    }
    // The padded copy's row pitch, as `gemm_packed_conv` lays it out.
    let pw = (conv.ow - 1 + conv.dilation.1 * (conv.kw - 1) + 1).max(conv.iw + conv.pad.1);
    Windows::fits(conv.oh * conv.ow, conv.ow, pw)
}

/// Whether the epilogue's bias and residual cover an `m x n` output.
fn epi_fits(epi: &Epilogue<'_>, m: usize, n: usize, ldc: usize) -> bool {
    epi.bias.len() >= m && epi.res.is_none_or(|r| r.len() >= (m - 1) * ldc + n)
}

/// Whether [`gemm_packed_conv`] can run on this CPU (it needs the AVX-512
/// microkernel; elsewhere callers materialize im2col and use [`gemm_packed`]).
pub fn conv_source_available() -> bool {
    use_avx512()
}

/// The input [`gemm_packed_conv`] gathers from.
#[derive(Debug, Clone, Copy)]
pub struct ConvInput<'a> {
    /// Image `i` starts at `x[i * img_stride]` and holds the group's
    /// `cin / group` channels of `ih` rows.
    pub x: &'a [f32],
    /// Consecutive images.
    pub images: usize,
    /// Floats between images.
    pub img_stride: usize,
    /// `None`: rows of `iw` floats. `Some(w)`: rows of `stride_w * w`
    /// floats, column `ix` at `(ix % stride_w) * w + ix / stride_w`, so a
    /// strided window's taps are contiguous.
    pub phase_width: Option<usize>,
}

/// Convolution as GEMM without an im2col buffer: column `j` of B is output
/// pixel `j` of the input's consecutive images, and each panel of B is
/// gathered straight from the input while it is used.
///
/// With `images: Some(stride)`, C is the output itself (`[n, cout, p]`
/// with images `stride` floats apart and `ldc == p`): column `j` is written
/// at `(j / p) * stride + j % p`, with the whole epilogue, which spares the
/// caller a scatter; only the products [`writes_images`] names can, and
/// others return `false`.
/// Returns `false` without computing if [`conv_source_available`] is false
/// or a buffer is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_conv(
    a: &PackedA,
    conv: &Conv2d,
    input: ConvInput<'_>,
    c: &mut [f32],
    ldc: usize,
    images: Option<usize>,
    epi: Epilogue<'_>,
    threads: usize,
) -> bool {
    let (m, k) = (a.m, a.k);
    let p = conv.oh * conv.ow;
    let n = input.images * p;
    let cin_g = conv.cin / conv.group;
    let sw = conv.stride.1;
    let row_len = input.phase_width.map_or(conv.iw, |w| w * sw);
    let needed_x = if input.images == 0 {
        0
    } else {
        (input.images - 1) * input.img_stride + cin_g * conv.ih * row_len
    };
    let phases_fit = input
        .phase_width
        .is_none_or(|w| sw > 0 && w >= conv.iw.div_ceil(sw));
    if !use_avx512() || k != cin_g * conv.kh * conv.kw || input.x.len() < needed_x || !phases_fit {
        return false;
    }
    if images.is_some() && (k == 0 || ldc != p || !writes_images(conv, input.phase_width)) {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    // Where the last column lies, one past.
    let c_end = images.map_or(n, |stride| (input.images - 1) * stride + p);
    if (m - 1) * ldc + c_end > c.len() || !epi_fits(&epi, m, c_end, ldc) {
        return false;
    }
    let pointwise = is_pointwise(conv, input.phase_width);
    if pointwise {
        // Row r of B is input channel r of every image: runs of whole
        // planes, read in place where 16 divides the plane.
        let offsets = (0..k).map(|r| r * p).collect();
        let windows = Windows::new(
            input.x,
            input.img_stride,
            (conv.oh, conv.ow),
            conv.ow,
            offsets,
            images,
        );
        if images.is_some() && windows.is_none() {
            // (`writes_images` said otherwise: C's layout needs windows.)
            return false;
        }
        let wins = windows.as_ref().map(InPlace::Windows);
        tiled(a, n, c, ldc, epi, threads, wins, |j0, nc, k0, kc, out| {
            if p == 1 {
                // One pixel per image: B is the images' channel vectors
                // transposed. Read each image's channels in order (no run
                // arithmetic per value), write them down a column.
                for (j, img) in (j0..j0 + nc).enumerate() {
                    let src = &input.x[img * input.img_stride + k0..][..kc];
                    for (row, &v) in out.chunks_exact_mut(NR).zip(src) {
                        row[j] = v;
                    }
                }
                if nc < NR {
                    out.chunks_exact_mut(NR)
                        .for_each(|row| zero(&mut row[nc..]));
                }
                return;
            }
            // The panel's runs (first column, length, start in channel 0)
            // once, not per row: small planes make many short runs.
            let mut runs = [(0usize, 0usize, 0usize); NR];
            let (mut nruns, mut j) = (0, 0);
            while j < nc {
                let (img, s) = ((j0 + j) / p, (j0 + j) % p);
                let len = (nc - j).min(p - s);
                runs[nruns] = (j, len, img * input.img_stride + s);
                nruns += 1;
                j += len;
            }
            for (row, r) in out.chunks_exact_mut(NR).zip(k0..k0 + kc) {
                for &(j, len, b) in &runs[..nruns] {
                    copy_run(&mut row[j..j + len], &input.x[b + r * p..][..len]);
                }
                zero(&mut row[nc..]);
            }
        });
        return true;
    }
    if conv.ow >= GATHER_BELOW || input.phase_width.is_some() {
        tiled(a, n, c, ldc, epi, threads, None, |j0, nc, k0, kc, out| {
            pack_conv(conv, input, j0, nc, k0, kc, out)
        });
        return true;
    }
    // Short output rows: a row of B is many short runs, each with its own
    // padding checks. Gather instead from a zero-padded copy, where every
    // tap is valid: B[r][j] = padded[base(j) + tap(r)].
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (pt, pl) = conv.pad;
    let ph = ((conv.oh - 1) * sh + dh * (conv.kh - 1) + 1).max(conv.ih + pt);
    let pw = ((conv.ow - 1) * sw + dw * (conv.kw - 1) + 1).max(conv.iw + pl);
    let plane = ph * pw;
    let taps: Vec<usize> = (0..k)
        .map(|r| {
            let kk = conv.kh * conv.kw;
            let (ci, ki, kj) = (r / kk, (r / conv.kw) % conv.kh, r % conv.kw);
            ci * plane + ki * dh * pw + kj * dw
        })
        .collect();
    if images.is_some() && !((sh, sw) == (1, 1) && Windows::fits(p, conv.ow, pw)) {
        // (`writes_images` said otherwise: C's layout needs windows.)
        return false;
    }
    // 32 floats past the last plane: what a permuted window's second load
    // may touch beyond its pixels (see `Windows`).
    with_reused(&PADDED, input.images * cin_g * plane + 32, |padded| {
        // One memset and a copy per row: these maps are small, and per-row
        // padding writes measured about 10% slower on the ResNet-50 fixture.
        padded.fill(0.0);
        for img in 0..input.images {
            for ci in 0..cin_g {
                let src = &input.x[img * input.img_stride + ci * conv.ih * conv.iw..]
                    [..conv.ih * conv.iw];
                let dst = &mut padded[(img * cin_g + ci) * plane..][..plane];
                for (iy, row) in src.chunks_exact(conv.iw).enumerate() {
                    super::copy_short(&mut dst[(iy + pt) * pw + pl..][..conv.iw], row);
                }
            }
        }
        let padded = &*padded;
        // Stride 1: panels read their windows in place.
        let windows = ((sh, sw) == (1, 1))
            .then(|| {
                let shape = (conv.oh, conv.ow);
                Windows::new(padded, cin_g * plane, shape, pw, taps.clone(), images)
            })
            .flatten();
        let wins = windows.as_ref().map(InPlace::Windows);
        let base = |j: usize| {
            let (img, rem) = (j / p, j % p);
            let (oy, ox) = (rem / conv.ow, rem % conv.ow);
            img * cin_g * plane + oy * sh * pw + ox * sw
        };
        tiled(a, n, c, ldc, epi, threads, wins, |j0, nc, k0, kc, out| {
            if sw > 1 || conv.ow < 4 {
                // Runs too short to pay for themselves: one gather per column.
                let mut bases = [0usize; NR];
                for (j, b) in bases.iter_mut().enumerate().take(nc) {
                    *b = base(j0 + j);
                }
                for (row, &tap) in out.chunks_exact_mut(NR).zip(&taps[k0..k0 + kc]) {
                    for (d, &b) in row.iter_mut().zip(&bases[..nc]) {
                        *d = padded[b + tap];
                    }
                    zero(&mut row[nc..]);
                }
                return;
            }
            // Runs of columns on one output row, each reading contiguous
            // padded input: (first column, length, base).
            let mut runs = [(0usize, 0usize, 0usize); NR];
            let mut nruns = 0;
            let mut j = 0;
            while j < nc {
                let ox = (j0 + j) % p % conv.ow;
                let len = (conv.ow - ox).min(nc - j);
                runs[nruns] = (j, len, base(j0 + j));
                nruns += 1;
                j += len;
            }
            let runs = &runs[..nruns];
            for (row, &tap) in out.chunks_exact_mut(NR).zip(&taps[k0..k0 + kc]) {
                for &(j, len, b) in runs {
                    copy_run(&mut row[j..j + len], &padded[b + tap..][..len]);
                }
                zero(&mut row[nc..]);
            }
        });
    });
    true
}

/// `dst = src` for a run of a small feature map's row: fixed-size copies
/// for the common widths, so each compiles to a few vector moves.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    match dst.len() {
        8 => dst.copy_from_slice(&src[..8]),
        4 => dst.copy_from_slice(&src[..4]),
        2 => dst.copy_from_slice(&src[..2]),
        1 => dst[0] = src[0],
        _ => copy(dst, src),
    }
}

/// Output rows shorter than this are packed by gathering from a padded copy.
pub const GATHER_BELOW: usize = 16;

/// The tiled product shared by both B sources: tasks over (panel of B
/// columns, range of A panels); each packs its B panel with `pack` and
/// writes finished tiles through the epilogue.
#[allow(clippy::too_many_arguments)]
fn tiled(
    a: &PackedA,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    threads: usize,
    direct: Option<InPlace<'_>>,
    pack: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
) {
    let (m, k) = (a.m, a.k);
    if k == 0 {
        // An empty reduction: every output is the epilogue of 0.
        for (r, row) in c.chunks_mut(ldc).take(m).enumerate() {
            for (j, v) in row[..n].iter_mut().enumerate() {
                *v = epi.apply(0.0, r, r * ldc + j);
            }
        }
        return;
    }
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    let parallel = threads > 1 && !super::is_sequential();
    let want = if parallel { 4 * threads } else { 1 };
    // Blocking as in GotoBLAS: a chunk of B panels whose KC-row block fits
    // in L2 is packed once per reduction block, then every A panel of the
    // task (its KC x MR block stays in L1) sweeps across it, so each weight
    // is read once per chunk. Partial sums live in C between blocks.
    // Threads split the operand whose duplicated work is cheaper: splitting
    // A's panels repacks B per task; splitting B's panels re-reads A.
    let l2_chunk = (L2_FLOATS / (KC * NR)).max(1);
    let (chunk, m_split) = if m >= n {
        let n_chunks = n_panels.div_ceil(l2_chunk);
        (l2_chunk, want.div_ceil(n_chunks).clamp(1, m_panels))
    } else {
        (l2_chunk.min(n_panels.div_ceil(want)).max(1), 1)
    };
    // When tasks split A, pack B once for all of them (in parallel by panel)
    // instead of once per task.
    // (Windows read every panel in place: nothing to pack or share.)
    let share = m_split > 1 && !matches!(direct, Some(InPlace::Windows(_)));
    let shared_len = if share { n_panels * k * NR } else { 0 };
    with_reused(&SHARED_B, shared_len, |all| {
        // Pieces of KC rows of one panel, so both threads share the packing
        // even when there are only a few panels.
        let fill = |jp: usize, kb: usize, piece: &mut [f32]| {
            let nc = NR.min(n - jp * NR);
            if !InPlace::reads(direct, nc) {
                pack(jp * NR, nc, kb * KC, piece.len() / NR, piece);
            }
        };
        if parallel {
            use rayon::prelude::*;
            all.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(jp, panel)| {
                    panel
                        .par_chunks_mut(KC * NR)
                        .enumerate()
                        .for_each(|(kb, piece)| fill(jp, kb, piece))
                });
        } else {
            for (jp, panel) in all.chunks_mut(k * NR).enumerate() {
                for (kb, piece) in panel.chunks_mut(KC * NR).enumerate() {
                    fill(jp, kb, piece);
                }
            }
        }
        let shared = share.then_some(&*all);
        tiles(
            a, n, c, ldc, epi, parallel, direct, &pack, shared, chunk, m_split,
        );
    });
}

/// The task loop of [`tiled`]: `shared` holds B packed for every task, or
/// each task packs its own chunk of B panels.
#[allow(clippy::too_many_arguments)]
fn tiles(
    a: &PackedA,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
    parallel: bool,
    direct: Option<InPlace<'_>>,
    pack: &(impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync),
    shared: Option<&[f32]>,
    chunk: usize,
    m_split: usize,
) {
    let (m, k) = (a.m, a.k);
    let m_panels = m.div_ceil(MR);
    let n_panels = n.div_ceil(NR);
    let n_chunks = n_panels.div_ceil(chunk);
    let m_per = m_panels.div_ceil(m_split);
    let tasks = n_chunks * m_split;
    let b_outer = m < n && m_panels <= 16;
    let c_ptr = SendPtr(c.as_mut_ptr());
    // Where C's column j lies in its rows.
    let out_at = |j: usize| match direct {
        Some(InPlace::Windows(w)) => w.out_at(j),
        _ => j,
    };
    // Offsets of a row-major B's rows for in-place reads.
    let offsets: Vec<usize> = match direct {
        Some(InPlace::Rows(_, rs)) => (0..k).map(|p| p * rs).collect(),
        _ => Vec::new(),
    };
    let run = |t: usize| {
        let (ms, jc) = (t % m_split, t / m_split);
        let ips = ms * m_per..((ms + 1) * m_per).min(m_panels);
        let jps = jc * chunk..((jc + 1) * chunk).min(n_panels);
        // Panels an in-place source covers are read where they lie (see
        // `InPlace::reads`); the rest are packed.
        let in_place = |jp: usize| direct.filter(|_| InPlace::reads(direct, NR.min(n - jp * NR)));
        let bp_len = if shared.is_some() || matches!(direct, Some(InPlace::Windows(_))) {
            0
        } else {
            jps.len() * KC.min(k) * NR
        };
        with_reused(&TASK_B, bp_len, |bp| {
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                if shared.is_none() {
                    for (q, jp) in jps.clone().enumerate() {
                        if in_place(jp).is_none() {
                            pack(
                                jp * NR,
                                NR.min(n - jp * NR),
                                k0,
                                kc,
                                &mut bp[q * kc * NR..(q + 1) * kc * NR],
                            );
                        }
                    }
                }
                // Block `q`'s packed rows k0..k0+kc: per task, or from the shared packing.
                let b_block = |q: usize, jp: usize| -> &[f32] {
                    match &shared {
                        Some(all) => &all[jp * k * NR + k0 * NR..jp * k * NR + (k0 + kc) * NR],
                        None => &bp[q * kc * NR..(q + 1) * kc * NR],
                    }
                };
                let last = k0 + kc == k;
                let tile = |ip: usize, q: usize, jp: usize| {
                    let i0 = ip * MR;
                    let rows = MR.min(m - i0);
                    let a_blk = &a.panel(ip)[k0 * MR..(k0 + kc) * MR];
                    let j0 = jp * NR;
                    let at = out_at(j0);
                    let dst = Store {
                        // SAFETY: rows i0..i0+rows <= m and columns j0..j0+nc <= n
                        // lie inside `c` (callers checked that the last
                        // column of row m-1 does); tasks write disjoint
                        // (row, column) ranges.
                        c: unsafe { c_ptr.get().add(i0 * ldc + at) },
                        res: epi
                            .res
                            .map_or(std::ptr::null(), |r| r[i0 * ldc + at..].as_ptr()),
                        ldc,
                        vecs: [0, 16, 32].map(|v| out_at(j0 + v) - at),
                        rows,
                        cols: NR.min(n - j0),
                        bias: &epi.bias[i0..i0 + rows],
                        act: epi.act,
                        next_a: if q == 0 && ip + 1 < ips.end {
                            a.panel(ip + 1)[k0 * MR..].as_ptr()
                        } else {
                            std::ptr::null()
                        },
                    };
                    // SAFETY: AVX-512F is available (callers check
                    // use_avx512); the blocks hold kc * MR and kc * NR floats
                    // (or, in place, B's rows hold NR floats from each offset).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        match in_place(jp) {
                            Some(InPlace::Rows(ptr, _)) => {
                                let b = Direct {
                                    base: ptr.get().wrapping_add(j0),
                                    offsets: offsets[k0..].as_ptr(),
                                };
                                kernel(kc, a_blk, b, dst, k0 > 0, last)
                            }
                            Some(InPlace::Windows(w)) => w.kernel(kc, a_blk, j0, k0, dst, last),
                            None => {
                                let b_blk = b_block(q, jp);
                                debug_assert!(b_blk.len() >= kc * NR);
                                kernel(kc, a_blk, Packed(b_blk.as_ptr()), dst, k0 > 0, last)
                            }
                        }
                    };
                };
                if b_outer {
                    // Few A panels (few rows of C written at once): each B
                    // panel is fetched once and serves them all from L2 (a
                    // chunk read in place with a large row stride would not
                    // stay in L2 across A panels).
                    for (q, jp) in jps.clone().enumerate() {
                        for ip in ips.clone() {
                            tile(ip, q, jp);
                        }
                    }
                } else {
                    for ip in ips.clone() {
                        for (q, jp) in jps.clone().enumerate() {
                            tile(ip, q, jp);
                        }
                    }
                }
                k0 += kc;
            }
        });
    };
    if tasks > 1 && parallel {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Gathers columns `j0..j0 + nc` of a convolution's im2col matrix into a
/// packed panel (`out[r * NR + j]`), zero-padding to [`NR`] columns. Runs
/// of columns on one output row read contiguous input for stride 1 and for
/// phase-split input.
fn pack_conv(
    cv: &Conv2d,
    input: ConvInput<'_>,
    j0: usize,
    nc: usize,
    k0: usize,
    kc: usize,
    out: &mut [f32],
) {
    let (ih, iw, ow) = (cv.ih, cv.iw, cv.ow);
    let p = cv.oh * cv.ow;
    let (sh, sw) = cv.stride;
    let (dh, dw) = cv.dilation;
    let (pt, pl) = (cv.pad.0 as isize, cv.pad.1 as isize);
    let kk = cv.kh * cv.kw;
    // Runs of columns sharing an image and output row:
    // (first column, length, image, oy, ox).
    let mut runs = [(0usize, 0usize, 0usize, 0usize, 0usize); NR];
    let mut nruns = 0;
    let mut j = 0;
    while j < nc {
        let q = j0 + j;
        let (img, rem) = (q / p, q % p);
        let (oy, ox) = (rem / ow, rem % ow);
        let len = (nc - j).min(ow - ox);
        runs[nruns] = (j, len, img, oy, ox);
        nruns += 1;
        j += len;
    }
    for (row_out, r) in (k0..k0 + kc).enumerate() {
        let (ci, ki, kj) = (r / kk, (r / cv.kw) % cv.kh, r % cv.kw);
        let dst = &mut out[row_out * NR..(row_out + 1) * NR];
        zero(&mut dst[nc..]);
        for &(j, len, img, oy, ox) in &runs[..nruns] {
            let d = &mut dst[j..j + len];
            let iy = (oy * sh + ki * dh) as isize - pt;
            if iy < 0 || iy >= ih as isize {
                zero(d);
                continue;
            }
            let ix0 = (ox * sw + kj * dw) as isize - pl;
            if let Some(w) = input.phase_width {
                let row =
                    &input.x[input.img_stride * img + (ci * ih + iy as usize) * sw * w..][..sw * w];
                // Tap t reads column ix0 + t * sw: phase `ph`, index t0 + t.
                let (ph, t0) = (ix0.rem_euclid(sw as isize), ix0.div_euclid(sw as isize));
                let in_phase = ((iw as isize - ph).max(0) as usize).div_ceil(sw) as isize;
                let lo = (-t0).clamp(0, len as isize) as usize;
                let hi = (in_phase - t0).clamp(lo as isize, len as isize) as usize;
                zero(&mut d[..lo]);
                zero(&mut d[hi..]);
                if hi > lo {
                    let s0 = ph as usize * w + (t0 + lo as isize) as usize;
                    copy(&mut d[lo..hi], &row[s0..s0 + (hi - lo)]);
                }
                continue;
            }
            let row = &input.x[img * input.img_stride + (ci * ih + iy as usize) * iw..][..iw];
            if sw == 1 {
                // Valid t: 0 <= ix0 + t < iw.
                let lo = (-ix0).clamp(0, len as isize) as usize;
                let hi = (iw as isize - ix0).clamp(lo as isize, len as isize) as usize;
                zero(&mut d[..lo]);
                zero(&mut d[hi..]);
                if hi > lo {
                    let s0 = (ix0 + lo as isize) as usize;
                    copy(&mut d[lo..hi], &row[s0..s0 + (hi - lo)]);
                }
            } else {
                for (t, v) in d.iter_mut().enumerate() {
                    let ix = ix0 + (t * sw) as isize;
                    *v = if ix >= 0 && ix < iw as isize {
                        row[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// `dst = src` for the short runs of small feature maps, where a call to
/// `memcpy` costs more than the copy.
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    if dst.len() <= 64 {
        super::copy_short(dst, src);
    } else {
        dst.copy_from_slice(src);
    }
}

/// Zeroes `dst` without a `memset` call for short runs.
#[inline(always)]
fn zero(dst: &mut [f32]) {
    if dst.len() <= 16 {
        for d in dst.iter_mut() {
            *d = 0.0;
        }
    } else {
        dst.fill(0.0);
    }
}

/// Where [`tiled`] reads B panels in place instead of packing them.
#[derive(Clone, Copy)]
enum InPlace<'a> {
    /// A row-major B (full panels): its start and row stride.
    Rows(SendConst, usize),
    /// Feature maps read as 16-column vectors (every panel).
    Windows(&'a Windows),
}

impl InPlace<'_> {
    /// Whether a panel of `nc` columns of `src` is read in place.
    fn reads(src: Option<InPlace<'_>>, nc: usize) -> bool {
        match src {
            Some(InPlace::Rows(..)) => nc == NR,
            // 16 divides every panel's width (16 | p).
            Some(InPlace::Windows(_)) => true,
            None => false,
        }
    }
}

/// A raw pointer that may cross threads: tasks write disjoint parts of C
/// (here), or of Winograd's buffers and output (`super::winograd`).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes, coordinated by its users.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Packs rows `k0..k0 + kc` of columns `j0..j0 + nc` of the view `b` into
/// `out[p * NR + j]`, zero-padding to [`NR`] columns.
fn pack_b(b: Mat<'_>, j0: usize, nc: usize, k0: usize, kc: usize, out: &mut [f32]) {
    if b.rs == 1 && b.cs != 1 {
        // The transpose of a row-major matrix: column by column, so that
        // the source is read in order.
        for q in 0..kc {
            out[q * NR + nc..(q + 1) * NR].fill(0.0);
        }
        for j in 0..nc {
            let src = &b.data[(j0 + j) * b.cs + k0..][..kc];
            for (q, &v) in src.iter().enumerate() {
                out[q * NR + j] = v;
            }
        }
        return;
    }
    for (q, p) in (k0..k0 + kc).enumerate() {
        let dst = &mut out[q * NR..(q + 1) * NR];
        if b.cs == 1 {
            dst[..nc].copy_from_slice(&b.data[p * b.rs + j0..p * b.rs + j0 + nc]);
        } else {
            for (j, d) in dst[..nc].iter_mut().enumerate() {
                *d = b.data[p * b.rs + (j0 + j) * b.cs];
            }
        }
        dst[nc..].fill(0.0);
    }
}

/// The 8 x 48 microkernel: `tile = A_panel (8 x k) * B_panel (k x 48)`,
/// with 512-bit vectors: 24 accumulators, three loads of B and eight
/// broadcasts of A per step. Zen 4 splits 512-bit FMAs in two, yet they
/// still run at the full FMA rate with half the loads and instructions of
/// 256-bit ones; measured in isolation on L1-resident panels, 8 x 48 zmm
/// reached 97% of the FMA peak and 8 x 24 ymm under 65%.
///
/// # Safety
/// The CPU must support AVX-512F; `a` holds `k * 8` floats and `b`
/// yields `k` rows of `NR` readable floats (the [`BRows`] contract).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel<B: BRows>(
    k: usize,
    a: &[f32],
    b: B,
    dst: Store<'_>,
    accumulate: bool,
    last: bool,
) {
    // A narrow last panel (a 7x7 feature map has 49 columns: 48 + 1) runs
    // only the vectors that hold columns, and up to 8 columns, alone or
    // after whole vectors (a 56-pixel row is 48 + 8), go through the column
    // kernel instead of a half-empty vector: one load of A and N broadcasts
    // per step, about N / 2 cycles, against 8 for a 16-wide FMA per row.
    // (Splitting 28 columns as 16 + 12 measured slower than 2 vectors.)
    let cols = dst.cols;
    let (wide, tail) = if cols <= NARROW {
        (0, cols)
    } else if cols % 16 <= NARROW {
        (cols - cols % 16, cols % 16)
    } else {
        (cols, 0)
    };
    // SAFETY: forwarded; the vectors cover columns 0..wide and the column
    // kernel columns wide..cols, all inside the NR-wide panel.
    unsafe {
        if wide > 0 {
            let part = Store { cols: wide, ..dst };
            kernel_vectors(k, a, b, part, accumulate, last);
        }
        if tail > 0 {
            let part = Store {
                c: dst.c.wrapping_add(wide),
                res: if dst.res.is_null() {
                    dst.res
                } else {
                    dst.res.wrapping_add(wide)
                },
                cols: tail,
                next_a: if wide > 0 {
                    std::ptr::null()
                } else {
                    dst.next_a
                },
                ..dst
            };
            let b = Shifted(b, wide);
            match tail {
                1 => kernel_cols::<1, _>(k, a, b, part, accumulate, last),
                2 => kernel_cols::<2, _>(k, a, b, part, accumulate, last),
                3 => kernel_cols::<3, _>(k, a, b, part, accumulate, last),
                4 => kernel_cols::<4, _>(k, a, b, part, accumulate, last),
                5 => kernel_cols::<5, _>(k, a, b, part, accumulate, last),
                6 => kernel_cols::<6, _>(k, a, b, part, accumulate, last),
                7 => kernel_cols::<7, _>(k, a, b, part, accumulate, last),
                _ => kernel_cols::<8, _>(k, a, b, part, accumulate, last),
            }
        }
    }
}

/// Most columns the column kernel takes.
const NARROW: usize = 8;

/// B rows starting `.1` columns into another source's rows.
#[derive(Clone, Copy)]
struct Shifted<B>(B, usize);

// SAFETY: only built by `kernel` with a shift that leaves the columns the
// column kernel reads (shift + N <= cols <= NR) inside the source's rows.
unsafe impl<B: BRows> BRows for Shifted<B> {
    #[inline(always)]
    fn row(self, p: usize) -> *const f32 {
        self.0.row(p).wrapping_add(self.1)
    }
}

/// Where row `p` of a B tile (`NR` floats) starts.
///
/// # Safety
/// Implementations return pointers to at least `NR` readable floats for
/// every `p` below the `k` the kernel is called with.
unsafe trait BRows: Copy {
    /// Start of row `p`.
    fn row(self, p: usize) -> *const f32;
    /// Whether the kernel should prefetch the next tile's part of each row
    /// (rows far apart defeat the hardware prefetchers).
    const PREFETCH_NEXT: bool = false;
}

/// A packed panel: rows `NR` floats apart.
#[derive(Clone, Copy)]
struct Packed(*const f32);

// SAFETY: callers pass panels of k * NR floats.
unsafe impl BRows for Packed {
    #[inline(always)]
    fn row(self, p: usize) -> *const f32 {
        self.0.wrapping_add(p * NR)
    }
}

/// Rows read in place from a padded input image: row `p` (input channel,
/// kernel row, kernel column) starts at `base + offsets[p]`.
#[derive(Clone, Copy)]
struct Direct {
    base: *const f32,
    offsets: *const usize,
}

// SAFETY: `conv_direct` sizes the padded image so every offset plus NR is
// inside it; `gemm_packed` reads in place only full tiles of a checked B.
unsafe impl BRows for Direct {
    const PREFETCH_NEXT: bool = true;
    #[inline(always)]
    fn row(self, p: usize) -> *const f32 {
        // SAFETY: p < k = number of offsets.
        self.base.wrapping_add(unsafe { *self.offsets.add(p) })
    }
}

/// How [`kernel_v`] reads the `V` vectors (16 columns each) of row `p` of
/// its B tile.
///
/// # Safety
/// Implementations read only memory that is valid for every `p` below the
/// `k` the kernel is called with.
unsafe trait BTile: Copy {
    /// Columns `16 v .. 16 v + 16` of row `p`, for `v < V`.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `p` is below the kernel's `k`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load<const V: usize>(self, p: usize) -> [std::arch::x86_64::__m512; V];
}

// SAFETY: the BRows contract makes NR >= 16 V floats readable at `row(p)`.
unsafe impl<B: BRows> BTile for B {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<const V: usize>(self, p: usize) -> [std::arch::x86_64::__m512; V] {
        use std::arch::x86_64::*;
        let row = self.row(p);
        if B::PREFETCH_NEXT {
            for v in 0..V {
                // A hint only: never faults, even past the buffer.
                // SAFETY: prefetching has no memory effects.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR + 16 * v) as *const i8) };
            }
        }
        // SAFETY: the CPU has AVX-512F (the caller's contract).
        let mut bv = [unsafe { _mm512_setzero_ps() }; V];
        for (v, x) in bv.iter_mut().enumerate() {
            // SAFETY: row p holds NR >= 16 V readable floats.
            *x = unsafe { _mm512_loadu_ps(row.add(16 * v)) };
        }
        bv
    }
}

/// A batch of feature maps read in place as B: column `j` is pixel
/// `j % p` of image `j / p`, row `r` lies `offsets[r]` floats past each
/// column's pixel, and a map's rows are `pitch` floats apart. With `p` a
/// multiple of 16, every 16-column vector of every panel lies in one
/// image; where the pixels of one vector span several rows of a padded
/// map (`pitch > ow`), one permute of two loads picks them out. This
/// serves the convolutions on small maps (a 3x3 window over 4x4 or 8x8
/// maps, whose B rows are runs of 4 or 8 floats) and the pointwise ones
/// on them, whose panels otherwise cost about as much to pack as to
/// multiply.
struct Windows {
    src: SendConst,
    img_stride: usize,
    /// Output pixels per image.
    p: usize,
    /// Output row width.
    ow: usize,
    /// Floats between a map's rows in `src`.
    pitch: usize,
    /// Whether a vector's pixels span rows with gaps between them.
    permute: bool,
    /// With `permute`: lane `l`'s float, counted from the vector's first.
    lanes: [i32; 16],
    /// Row `r` of B: its offset from a column's pixel.
    offsets: Vec<usize>,
    /// Where C's columns lie: with `Some(stride)`, column `j` at
    /// `(j / p) * stride + j % p` (the output's images); else at `j`.
    images: Option<usize>,
}

impl Windows {
    /// Whether maps of `p` pixels in rows of `ow`, `pitch` floats apart,
    /// can be read this way: 16 | p, and where a vector spans rows, 16 / ow
    /// whole rows within 32 floats.
    fn fits(p: usize, ow: usize, pitch: usize) -> bool {
        let permute = pitch != ow && !ow.is_multiple_of(16);
        p.is_multiple_of(16) && (!permute || (16 % ow == 0 && (16 / ow - 1) * pitch + ow <= 32))
    }

    /// The batch's windows, if [`Windows::fits`] (C's columns as `images`).
    fn new(
        src: &[f32],
        img_stride: usize,
        (oh, ow): (usize, usize),
        pitch: usize,
        offsets: Vec<usize>,
        images: Option<usize>,
    ) -> Option<Windows> {
        let p = oh * ow;
        let permute = pitch != ow && !ow.is_multiple_of(16);
        Windows::fits(p, ow, pitch).then_some(Windows {
            src: SendConst(src.as_ptr()),
            img_stride,
            p,
            ow,
            pitch,
            permute,
            lanes: std::array::from_fn(|l| (l / ow * pitch + l % ow) as i32),
            offsets,
            images,
        })
    }

    /// Where column `j` lies in C's rows.
    fn out_at(&self, j: usize) -> usize {
        self.images
            .map_or(j, |stride| j / self.p * stride + j % self.p)
    }

    /// `src` offset of column `j`'s pixel.
    fn base(&self, j: usize) -> usize {
        let (img, s) = (j / self.p, j % self.p);
        img * self.img_stride + s / self.ow * self.pitch + s % self.ow
    }

    /// The microkernel on the panel at column `j0` (`st.cols`, a multiple
    /// of 16), rows `k0..k0 + k`.
    ///
    /// # Safety
    /// AVX-512F is available; columns `j0..j0 + st.cols` are in the batch,
    /// and `src` holds 32 readable floats from every column's pixel plus
    /// the offset of each of those rows (16 without a permute).
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel(&self, k: usize, a: &[f32], j0: usize, k0: usize, st: Store<'_>, last: bool) {
        const { assert!(NR == 48) };
        let bases = [0, 1, 2].map(|v| self.src.get().wrapping_add(self.base(j0 + 16 * v)));
        let (offsets, lanes) = (self.offsets[k0..].as_ptr(), self.lanes);
        let acc = k0 > 0;
        // SAFETY: forwarded; the panel is whole vectors (16 | p).
        unsafe {
            if self.permute {
                let b = Window::<true> {
                    bases,
                    offsets,
                    lanes,
                };
                kernel_vectors(k, a, b, st, acc, last)
            } else {
                let b = Window::<false> {
                    bases,
                    offsets,
                    lanes,
                };
                kernel_vectors(k, a, b, st, acc, last)
            }
        }
    }
}

/// [`kernel_v`] with as many vectors as the tile's columns need (at most
/// [`NR`] columns; the last vector masked where they end inside it).
///
/// # Safety
/// As [`kernel_v`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel_vectors<B: BTile>(
    k: usize,
    a: &[f32],
    b: B,
    st: Store<'_>,
    accumulate: bool,
    last: bool,
) {
    // SAFETY: forwarded.
    unsafe {
        match st.cols.div_ceil(16) {
            1 => kernel_v::<1, _>(k, a, b, st, accumulate, last),
            2 => kernel_v::<2, _>(k, a, b, st, accumulate, last),
            _ => kernel_v::<3, _>(k, a, b, st, accumulate, last),
        }
    }
}

/// One panel of [`Windows`]: vector `v` of row `r` starts at
/// `bases[v] + offsets[r]`; with `PERMUTE`, lane `l` is float `lanes[l]`
/// (below 32) from there.
#[derive(Clone, Copy)]
struct Window<const PERMUTE: bool> {
    bases: [*const f32; 3],
    offsets: *const usize,
    lanes: [i32; 16],
}

// SAFETY: `Windows::kernel`'s contract: 16 (32 with PERMUTE) floats are
// readable at every base plus every row's offset.
unsafe impl<const PERMUTE: bool> BTile for Window<PERMUTE> {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<const V: usize>(self, p: usize) -> [std::arch::x86_64::__m512; V] {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (see the impl).
        unsafe {
            let off = *self.offsets.add(p);
            let lanes = _mm512_loadu_si512(self.lanes.as_ptr().cast());
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                let at = self.bases[v].add(off);
                *x = if PERMUTE {
                    _mm512_permutex2var_ps(_mm512_loadu_ps(at), lanes, _mm512_loadu_ps(at.add(16)))
                } else {
                    _mm512_loadu_ps(at)
                };
            }
            bv
        }
    }
}

/// The `rows x cols` tile of C at `c` (row stride `ldc`) a kernel call
/// accumulates into; the last reduction block adds `bias[row]` (and the
/// residual) and applies the activation.
#[derive(Clone, Copy)]
struct Store<'a> {
    c: *mut f32,
    /// Residual laid out like `c`, or null.
    res: *const f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: &'a [f32],
    act: Activation,
    /// The A block the next calls will read (null: none), prefetched at
    /// the pace this call consumes its own: weights stream from memory, and
    /// the hardware prefetchers lose the stream at each new panel.
    next_a: *const f32,
    /// Where the tile's 16-column vectors start, from `c` (and `res`):
    /// `[0, 16, 32]` unless C's columns are an output's images.
    vecs: [usize; 3],
}

/// The microkernel with `V` vectors of 16 columns (see [`kernel`]).
///
/// # Safety
/// As [`kernel`]; `V <= NR / 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel_v<const V: usize, B: BTile>(
    k: usize,
    a: &[f32],
    b: B,
    st: Store<'_>,
    accumulate: bool,
    last: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k * MR && V * 16 <= NR);
    let mask = |v: usize| ((1u32 << st.cols.saturating_sub(16 * v).min(16)) - 1) as u16;
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    if accumulate {
        // Partial sums of earlier reduction blocks, kept in C.
        for (i, c) in acc.iter_mut().enumerate().take(st.rows) {
            for (v, cv) in c.iter_mut().enumerate() {
                // SAFETY: row i < rows and the masked columns lie in C.
                *cv = unsafe { _mm512_maskz_loadu_ps(mask(v), st.c.add(i * st.ldc + st.vecs[v])) };
            }
        }
    }
    let ap = a.as_ptr();
    for p in 0..k {
        // SAFETY: p < k, so every read is inside A's panel and row p of B
        // is readable (the BTile contract).
        unsafe {
            if !st.next_a.is_null() {
                _mm_prefetch::<_MM_HINT_T0>(st.next_a.wrapping_add(p * MR) as *const i8);
            }
            let bv = b.load::<V>(p);
            let a_row = ap.add(p * MR);
            for (i, c) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a_row.add(i));
                for v in 0..V {
                    c[v] = _mm512_fmadd_ps(x, bv[v], c[v]);
                }
            }
        }
    }
    if !last {
        for (i, c) in acc.into_iter().enumerate().take(st.rows) {
            for (v, cv) in c.into_iter().enumerate() {
                // SAFETY: row i < rows and the masked columns lie in C.
                unsafe { _mm512_mask_storeu_ps(st.c.add(i * st.ldc + st.vecs[v]), mask(v), cv) };
            }
        }
        return;
    }
    // Epilogue in registers. max/min take the accumulator as the second
    // operand so NaN propagates, as the scalar activations do.
    let (lo, hi) = match st.act {
        Activation::None | Activation::Silu => (f32::NEG_INFINITY, f32::INFINITY),
        Activation::Relu => (0.0, f32::INFINITY),
        Activation::Clip(lo, hi) => (lo, hi),
    };
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let clamp = matches!(st.act, Activation::Relu | Activation::Clip(..));
    let silu = st.act == Activation::Silu;
    for (i, c) in acc.into_iter().enumerate().take(st.rows) {
        let b = _mm512_set1_ps(st.bias[i]);
        for (v, cv) in c.into_iter().enumerate() {
            let mut y = _mm512_add_ps(cv, b);
            let mask = mask(v);
            if !st.res.is_null() {
                // SAFETY: the residual has C's layout; the mask keeps the
                // load inside the tile's valid columns.
                y = _mm512_add_ps(y, unsafe {
                    _mm512_maskz_loadu_ps(mask, st.res.add(i * st.ldc + st.vecs[v]))
                });
            }
            if clamp {
                y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
            }
            if silu {
                y = super::silu_zmm(y);
            }
            // SAFETY: row i < rows and the columns under the mask (< cols)
            // lie in C (see `tiled`); the mask keeps the store inside them.
            unsafe {
                let dst = st.c.add(i * st.ldc + st.vecs[v]);
                if mask == u16::MAX {
                    _mm512_storeu_ps(dst, y);
                } else {
                    _mm512_mask_storeu_ps(dst, mask, y);
                }
            }
        }
    }
}

/// The microkernel for a tile of `N` (<= [`NARROW`]) columns: vectors run down the
/// panel's 8 rows instead of across columns, so each step is one load of A
/// and `N` broadcasts of B rather than 8 mostly masked 16-wide FMAs. Each
/// output still sums its products in order with FMA, as [`kernel_v`] does.
///
/// # Safety
/// As [`kernel`]; `st.cols == N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel_cols<const N: usize, B: BRows>(
    k: usize,
    a: &[f32],
    b: B,
    st: Store<'_>,
    accumulate: bool,
    last: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k * MR && st.cols == N && MR == 8);
    let mut acc = [_mm256_setzero_ps(); N];
    if accumulate {
        for (c, v) in acc.iter_mut().enumerate() {
            let mut col = [0.0f32; MR];
            for (i, x) in col.iter_mut().enumerate().take(st.rows) {
                // SAFETY: row i < rows and column c < cols lie in C.
                *x = unsafe { *st.c.add(i * st.ldc + c) };
            }
            // SAFETY: `col` holds 8 floats.
            *v = unsafe { _mm256_loadu_ps(col.as_ptr()) };
        }
    }
    let ap = a.as_ptr();
    for p in 0..k {
        // SAFETY: p < k, so the 8 floats of A's row p are inside the panel;
        // `b.row(p)` points at NR >= N readable floats.
        unsafe {
            let av = _mm256_loadu_ps(ap.add(p * MR));
            let row = b.row(p);
            for (c, v) in acc.iter_mut().enumerate() {
                *v = _mm256_fmadd_ps(av, _mm256_set1_ps(*row.add(c)), *v);
            }
        }
    }
    for (c, v) in acc.into_iter().enumerate() {
        let mut col = [0.0f32; MR];
        // SAFETY: `col` holds 8 floats.
        unsafe { _mm256_storeu_ps(col.as_mut_ptr(), v) };
        for (i, &x) in col.iter().enumerate().take(st.rows) {
            let at = i * st.ldc + c;
            let y = if last {
                let y = x + st.bias[i];
                // SAFETY: the residual has C's layout; (i, c) is in the tile.
                let y = if st.res.is_null() {
                    y
                } else {
                    y + unsafe { *st.res.add(at) }
                };
                st.act.apply(y)
            } else {
                x
            };
            // SAFETY: row i < rows and column c < cols lie in C.
            unsafe { *st.c.add(at) = y };
        }
    }
}

/// Whether [`conv_direct`] can run `cv`: ungrouped convolutions on a CPU
/// with the AVX-512 microkernel.
pub fn direct_available(cv: &Conv2d) -> bool {
    use_avx512() && cv.group == 1 && cv.packed.len() == 1
}

/// Direct convolution: each tile (8 output channels x up to 48 pixels of
/// one output row) reads its B rows straight from a zero-padded copy of the
/// input, so no im2col or packing pass touches memory. For a column stride
/// `sw > 1` the copy's rows are split by column phase (see
/// [`ConvInput::phase_width`]), which makes every tap's pixels contiguous.
/// Callers check [`direct_available`]; returns `false` without computing
/// otherwise.
pub fn conv_direct(
    cv: &Conv2d,
    x: &[f32],
    res: Option<&[f32]>,
    y: &mut [f32],
    threads: usize,
) -> bool {
    if !direct_available(cv) || res.is_some_and(|r| r.len() < y.len()) {
        return false;
    }
    let a = &cv.packed[0];
    let (cin, ih, iw, oh, ow) = (cv.cin, cv.ih, cv.iw, cv.oh, cv.ow);
    let (sh, sw) = cv.stride;
    let (dh, dw) = cv.dilation;
    let (pt, pl) = cv.pad;
    if sh == 0 || sw == 0 || oh == 0 || ow == 0 {
        return false;
    }
    // Padded extent every window reads, and the phase-split row layout:
    // padded column `c` lives at `(c % sw) * pw + c / sw` of a row of `rl`.
    let ph = ((oh - 1) * sh + dh * (cv.kh - 1) + 1).max(ih + pt);
    let pw = ((ow - 1) * sw + dw * (cv.kw - 1) + 1)
        .max(iw + pl)
        .div_ceil(sw);
    let rl = sw * pw;
    let k = a.k;
    if x.len() < cv.n * cin * ih * iw
        || y.len() < cv.n * cv.cout * oh * ow
        || k != cin * cv.kh * cv.kw
    {
        return false;
    }
    let offsets: Vec<usize> = (0..k)
        .map(|r| {
            let (ci, ki, kj) = (r / (cv.kh * cv.kw), (r / cv.kw) % cv.kh, r % cv.kw);
            let c = kj * dw;
            ci * ph * rl + ki * dh * rl + (c % sw) * pw + c / sw
        })
        .collect();
    let parallel = threads > 1 && !super::is_sequential();
    let m_panels = a.m.div_ceil(MR);
    let segs = ow.div_ceil(NR);
    // Zero-padded image, with NR floats of slack so full-width loads of
    // the last (masked) columns stay inside the buffer.
    with_reused(&PADDED, cin * ph * rl + NR, |padded| {
        // With stride 1 the margins are zeroed once, by one `memset`, and
        // each image writes only its rows.
        let from = if sw == 1 { 0 } else { cin * ph * rl };
        padded[from..].fill(0.0);
        for img in 0..cv.n {
            // One padded channel from input channel `ci`.
            let fill = |ci: usize, plane: &mut [f32]| {
                let src = &x[(img * cin + ci) * ih * iw..][..ih * iw];
                if sw == 1 {
                    plane_rows(src, plane, iw, pt, pl, pw);
                } else {
                    pad_plane(src, plane, iw, pt, pl, sw, pw);
                }
            };
            let planes = &mut padded[..cin * ph * rl];
            if parallel && planes.len() >= 1 << 15 {
                use rayon::prelude::*;
                planes
                    .par_chunks_mut(ph * rl)
                    .enumerate()
                    .for_each(|(ci, p)| fill(ci, p));
            } else {
                planes
                    .chunks_mut(ph * rl)
                    .enumerate()
                    .for_each(|(ci, p)| fill(ci, p));
            }
            let yi = &mut y[img * cv.cout * oh * ow..(img + 1) * cv.cout * oh * ow];
            let c_ptr = SendPtr(yi.as_mut_ptr());
            let res_img = res.map(|r| SendConst(r[img * cv.cout * oh * ow..].as_ptr()));
            let pad_ptr = SendConst(padded.as_ptr());
            // The tile of A panel `ip` whose first output pixel is `at`,
            // `cols` pixels wide, its 16-pixel vectors at `vecs` from it.
            let store = |ip: usize, at: usize, cols: usize, vecs: [usize; 3]| {
                let i0 = ip * MR;
                let rows = MR.min(a.m - i0);
                Store {
                    // SAFETY: rows i0..i0+rows < cout and the tile's pixels
                    // (at + vecs, cols in all) lie inside this image's
                    // output planes; tasks write disjoint (row, pixel) ranges.
                    c: unsafe { c_ptr.get().add(i0 * oh * ow + at) },
                    res: res_img.map_or(std::ptr::null(), |r| {
                        r.get().wrapping_add(i0 * oh * ow + at)
                    }),
                    ldc: oh * ow,
                    rows,
                    cols,
                    bias: &cv.bias[i0..i0 + rows],
                    act: cv.act,
                    next_a: if ip + 1 < m_panels {
                        a.panel(ip + 1).as_ptr()
                    } else {
                        std::ptr::null()
                    },
                    vecs,
                }
            };
            let want = if parallel { 4 * threads } else { 1 };
            if let Some(vpr) = vector_tiles(ow) {
                // Tiles of three 16-pixel vectors taken in row order across
                // output rows: rows of 16 or 32 pixels would otherwise fill
                // one or two of a tile's three vectors.
                let nvec = oh * vpr;
                let tiles = nvec.div_ceil(3);
                let m_split = want.div_ceil(tiles).clamp(1, m_panels);
                let m_per = m_panels.div_ceil(m_split);
                // Input and output offsets of vector `g`.
                let in_at = |g: usize| (g / vpr) * sh * rl + (g % vpr) * 16;
                let out_at = |g: usize| (g / vpr) * ow + (g % vpr) * 16;
                let run = |t: usize| {
                    let (tile, ms) = (t / m_split, t % m_split);
                    let g0 = 3 * tile;
                    let v = 3.min(nvec - g0);
                    let at = out_at(g0);
                    let rel = |j: usize| if j < v { out_at(g0 + j) - at } else { 0 };
                    let b = Window::<false> {
                        bases: [0, 1, 2].map(|j| {
                            pad_ptr
                                .get()
                                .wrapping_add(in_at(g0 + if j < v { j } else { 0 }))
                        }),
                        offsets: offsets.as_ptr(),
                        lanes: [0; 16],
                    };
                    for ip in ms * m_per..((ms + 1) * m_per).min(m_panels) {
                        let st = store(ip, at, 16 * v, [0, 1, 2].map(rel));
                        // SAFETY: AVX-512F is available (direct_available);
                        // every vector's start plus the largest offset plus
                        // 16 stays inside `padded` (each lies within a
                        // padded row's first ow + span floats), and A's
                        // panel holds k * MR.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel_vectors(k, a.panel(ip), b, st, false, true)
                        };
                    }
                };
                run_tasks(tiles * m_split, parallel, run);
                continue;
            }
            // Tasks: output rows, split over channel panels when rows are few.
            let m_split = want.div_ceil(oh).clamp(1, m_panels);
            let m_per = m_panels.div_ceil(m_split);
            let run = |t: usize| {
                let (oy, ms) = (t / m_split, t % m_split);
                for seg in 0..segs {
                    let ox0 = seg * NR;
                    let cols = NR.min(ow - ox0);
                    let b = Direct {
                        base: pad_ptr.get().wrapping_add(oy * sh * rl + ox0),
                        offsets: offsets.as_ptr(),
                    };
                    for ip in ms * m_per..((ms + 1) * m_per).min(m_panels) {
                        let st = store(ip, oy * ow + ox0, cols, [0, 16, 32]);
                        // SAFETY: AVX-512F is available (direct_available);
                        // the largest offset plus the tile start plus NR stays
                        // inside `padded` (sized above), and A's panel holds k * MR.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel(k, a.panel(ip), b, st, false, true)
                        };
                    }
                }
            };
            run_tasks(oh * m_split, parallel, run);
        }
    });
    true
}

/// Runs `run(t)` for every task `t` below `tasks`, on the rayon pool when
/// `parallel` and there is more than one.
fn run_tasks(tasks: usize, parallel: bool, run: impl Fn(usize) + Sync + Send) {
    if tasks > 1 && parallel {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Vectors per output row when [`conv_direct`] tiles by 16-pixel vectors
/// across rows: rows of whole vectors that a row's [`NR`]-wide segments
/// would leave partly empty (16, 32, 64 pixels, ...).
fn vector_tiles(ow: usize) -> Option<usize> {
    (ow.is_multiple_of(16) && !ow.is_multiple_of(NR)).then_some(ow / 16)
}

/// Writes one input plane (rows of `iw`) into `dst`, zero-padded by `pt`
/// rows on top and `pl` columns on the left and zero to the end: rows of
/// `sw * pw` floats, each split by column phase (see [`pad_row`]).
pub(crate) fn pad_plane(
    src: &[f32],
    dst: &mut [f32],
    iw: usize,
    pt: usize,
    pl: usize,
    sw: usize,
    pw: usize,
) {
    let rows = src.len() / iw.max(1);
    for (py, row) in dst.chunks_mut(sw * pw).enumerate() {
        match py.checked_sub(pt).filter(|&iy| iy < rows) {
            Some(iy) => pad_row(&src[iy * iw..(iy + 1) * iw], row, sw, pw, pl),
            None => zero(row),
        }
    }
}

multiversion! {
    /// [`pad_plane`] for column stride 1 on a plane whose margins are
    /// already zero (zeroed, or padded before with the same geometry):
    /// writes only the input rows, at row `pt + iy`, column `pl` of rows
    /// of `pw` floats. Short fixed-size copies, compiled per instruction
    /// set: a row of 32 floats is two vector moves, where [`pad_row`]'s
    /// calls (a `memset` for each one-float margin) took about a fifth of
    /// a small-channel convolution's time.
    pub(crate) fn plane_rows(src: &[f32], dst: &mut [f32], iw: usize, pt: usize, pl: usize, pw: usize) {
        if iw == 0 || pw < pl + iw {
            return;
        }
        let rows = dst.len() / pw;
        for (iy, row) in src.chunks_exact(iw).enumerate().take(rows.saturating_sub(pt)) {
            super::copy_short(&mut dst[(pt + iy) * pw + pl..][..iw], row);
        }
    }
}

/// One input row placed in a padded row of `sw` phases of `pw` floats:
/// padded column `c = ix + pl` at `(c % sw) * pw + c / sw`, zero where no
/// input column lands. With `sw = 1` that is the row shifted by `pl`.
pub(crate) fn pad_row(src: &[f32], dst: &mut [f32], sw: usize, pw: usize, pl: usize) {
    let iw = src.len();
    if sw == 1 {
        // Small maps have rows of a few floats: no memcpy/memset calls.
        zero(&mut dst[..pl]);
        copy(&mut dst[pl..pl + iw], src);
        zero(&mut dst[pl + iw..]);
        return;
    }
    if sw == 2 {
        split_pair(src, dst, pw, pl);
        return;
    }
    for (phase, part) in dst.chunks_mut(pw).enumerate() {
        let lo = pl.saturating_sub(phase).div_ceil(sw).min(pw);
        let hi = (iw + pl).saturating_sub(phase).div_ceil(sw).clamp(lo, pw);
        part[..lo].fill(0.0);
        part[hi..].fill(0.0);
        if hi > lo {
            let first = lo * sw + phase - pl;
            let taps = src[first..].iter().step_by(sw);
            for (d, &v) in part[lo..hi].iter_mut().zip(taps) {
                *d = v;
            }
        }
    }
}

/// One padded row for column stride 2: `dst` is two phases of `pw` floats,
/// padded column `c = ix + pl` at `(c % 2) * pw + c / 2`, zero where no
/// input column lands. Even and odd inputs go to their phases in one pass
/// over pairs, which vectorizes (the stride-2 gather does not).
fn split_pair(src: &[f32], dst: &mut [f32], pw: usize, pl: usize) {
    dst.fill(0.0);
    let (p0, p1) = dst.split_at_mut(pw);
    // Input column 0 lands in phase pl % 2 at t = pl / 2; column 1 in the
    // other phase at (pl + 1) / 2.
    let (evens, odds) = if pl.is_multiple_of(2) {
        (&mut p0[pl / 2..], &mut p1[pl / 2..])
    } else {
        (&mut p1[pl / 2..], &mut p0[pl.div_ceil(2)..])
    };
    let pairs = src.chunks_exact(2);
    if let (Some(&last), Some(e)) = (pairs.remainder().first(), evens.get_mut(src.len() / 2)) {
        *e = last;
    }
    for ((e, o), pair) in evens.iter_mut().zip(odds.iter_mut()).zip(pairs) {
        *e = pair[0];
        *o = pair[1];
    }
}

/// A read-only raw pointer that may cross threads.
#[derive(Clone, Copy)]
struct SendConst(*const f32);
// SAFETY: only read, while the owning buffer outlives the parallel region.
unsafe impl Send for SendConst {}
// SAFETY: as above.
unsafe impl Sync for SendConst {}

impl SendConst {
    fn get(self) -> *const f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Writing an image's rows over a plane padded for another image,
        /// or over a zeroed one, gives what padding it from scratch gives.
        #[test]
        fn plane_rows_over_a_padded_plane_match_pad_plane(
            ih in 1usize..12,
            iw in 1usize..70,
            (pt, pl) in (0usize..3, 0usize..3),
            (pb, pr) in (0usize..3, 0usize..3),
            seed in any::<u32>(),
        ) {
            let (ph, pw) = (ih + pt + pb, iw + pl + pr);
            let image = |k: u32| -> Vec<f32> {
                (0..ih * iw).map(|i| (i as u32 ^ seed ^ k) as f32 + 1.0).collect()
            };
            let (first, second) = (image(0), image(0x5555));
            let mut reused = vec![f32::NAN; ph * pw];
            pad_plane(&first, &mut reused, iw, pt, pl, 1, pw);
            plane_rows(&second, &mut reused, iw, pt, pl, pw);
            let mut fresh = vec![f32::NAN; ph * pw];
            pad_plane(&second, &mut fresh, iw, pt, pl, 1, pw);
            prop_assert_eq!(&reused, &fresh);
            // On a zeroed plane too.
            let mut zeroed = vec![0f32; ph * pw];
            plane_rows(&second, &mut zeroed, iw, pt, pl, pw);
            prop_assert_eq!(&zeroed, &fresh);
        }
    }
}
