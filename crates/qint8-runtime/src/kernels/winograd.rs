//! Winograd F(4x4, 3x3) for 3x3, stride-1, ungrouped float convolutions
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! CVPR 2016): each 4x4 tile of the output comes from a 6x6 tile of the
//! input with 36 multiply-adds per input and output channel pair instead
//! of 144.
//!
//! The convolution runs on blocks of tiles sized to stay in L2. For each
//! block: every input tile `d` is transformed (`V = B^T d B`); 36
//! independent products `M_p[cout x tiles] = U_p[cout x cin] V_p[cin x
//! tiles]`, one per position `p` of the 6x6 transformed tile, run on the
//! packed kernel (`U = G g G^T` are the weights, transformed once at plan
//! time); each output tile is transformed back (`Y = A^T M A`) and written
//! with bias, residual and activation. Blocks run one per task, or, when
//! there are too few to occupy the threads, one after another with each
//! phase split over them. A tile's result does not depend on the block it
//! lands in or on the split, so outputs do not depend on batch size or
//! thread count.
//!
//! The transforms run on [`LANES`] tiles at once, lane by lane, compiled
//! per instruction set and chosen at run time (`multiversion!`);
//! every variant performs the same operations in the same order as the
//! per-tile [`input_transform_reference`] and
//! [`output_transform_reference`], which tests hold them to bit for bit.
//! With AVX-512, tiles are gathered and scattered with masked loads and
//! stores ([`Kernels::Avx512`]), held to the lane loops bit for bit. The
//! whole convolution is tested against the direct sum
//! ([`super::conv::Conv2d::reference`]): it rounds differently, within
//! about 1e-5 of the sum of the terms' magnitudes.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::conv::Conv2d;
use super::gemm::Mat;
use super::packed::{gemm_packed, with_reused, Epilogue, PackedA, SendPtr};
use super::{multiversion, Activation};

/// Output tile side.
const TILE: usize = 4;
/// Input tile side.
const PATCH: usize = 6;
/// Positions of a transformed tile.
const POS: usize = PATCH * PATCH;
/// Tiles transformed together.
pub const LANES: usize = 16;
/// Floats of one block's transformed input and products: 1 MiB, within L2.
const BLOCK_FLOATS: usize = 1 << 18;

/// Whether Winograd is on: `QINT8_WINOGRAD=0` (or `off`) turns it off, for
/// results that round as the direct kernels do. Read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("QINT8_WINOGRAD").map_or(true, |v| v != "0" && !v.eq_ignore_ascii_case("off"))
    })
}

/// One value per lane.
type Lanes = [f32; LANES];

/// `G`, rows of the weight transform (`U = G g G^T`), in f64: the weights
/// are transformed once, in double precision, then rounded.
const G: [[f64; 3]; PATCH] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

thread_local! {
    /// A block's transformed input and products, reused between calls.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `U = G g G^T` of one 3x3 filter (row-major), computed in f64 and rounded.
fn weight_transform(g: &[f32]) -> [f32; POS] {
    // t = G g (6x3).
    let mut t = [[0f64; 3]; PATCH];
    for (i, row) in t.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = G[i][0] * g[j] as f64 + G[i][1] * g[3 + j] as f64 + G[i][2] * g[6 + j] as f64;
        }
    }
    let mut u = [0f32; POS];
    for i in 0..PATCH {
        for j in 0..PATCH {
            u[i * PATCH + j] = (t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]) as f32;
        }
    }
    u
}

/// `B^T d` for six values along one axis of an input tile.
#[inline(always)]
fn bt(d: [f32; PATCH]) -> [f32; PATCH] {
    let [d0, d1, d2, d3, d4, d5] = d;
    [
        4.0 * d0 - 5.0 * d2 + d4,
        (d3 + d4) - 4.0 * (d1 + d2),
        4.0 * (d1 - d2) + (d4 - d3),
        2.0 * (d3 - d1) + (d4 - d2),
        2.0 * (d1 - d3) + (d4 - d2),
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `A^T m` for six values along one axis of a transformed product tile.
#[inline(always)]
fn at(m: [f32; PATCH]) -> [f32; TILE] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m5,
    ]
}

/// A separable transform of one 6x6 tile (row-major): `f` along each row,
/// then along each column of the result, giving `O x O` values.
#[inline(always)]
fn separable<const O: usize>(x: &[f32; POS], f: fn([f32; PATCH]) -> [f32; O], out: &mut [f32]) {
    let mut rows = [0f32; POS];
    for i in 0..PATCH {
        let r = f(std::array::from_fn(|j| x[i * PATCH + j]));
        rows[i * O..(i + 1) * O].copy_from_slice(&r);
    }
    for j in 0..O {
        let c = f(std::array::from_fn(|i| rows[i * O + j]));
        for (i, v) in c.into_iter().enumerate() {
            out[i * O + j] = v;
        }
    }
}

/// [`separable`] on [`LANES`] tiles at once: `x[q][lane]` is position `q`
/// of tile `lane`, and so is `out[q][lane]`.
#[inline(always)]
fn separable_lanes<const O: usize>(
    x: &[Lanes; POS],
    f: fn([f32; PATCH]) -> [f32; O],
    out: &mut [Lanes],
) {
    let mut rows = [[0f32; LANES]; POS];
    for i in 0..PATCH {
        for l in 0..LANES {
            let r = f(std::array::from_fn(|j| x[i * PATCH + j][l]));
            for (j, v) in r.into_iter().enumerate() {
                rows[i * O + j][l] = v;
            }
        }
    }
    for j in 0..O {
        for l in 0..LANES {
            let c = f(std::array::from_fn(|i| rows[i * O + j][l]));
            for (i, v) in c.into_iter().enumerate() {
                out[i * O + j][l] = v;
            }
        }
    }
}

/// `B^T d B` of one 6x6 input tile (row-major): the reference the lane
/// transforms are tested against.
pub fn input_transform_reference(d: &[f32; POS]) -> [f32; POS] {
    let mut v = [0f32; POS];
    separable(d, bt, &mut v);
    v
}

/// `A^T m A` of one 6x6 product tile: the 4x4 outputs (row-major), the
/// reference the lane transforms are tested against.
pub fn output_transform_reference(m: &[f32; POS]) -> [f32; TILE * TILE] {
    let mut y = [0f32; TILE * TILE];
    separable(m, at, &mut y);
    y
}

/// [`input_transform_reference`] of [`LANES`] tiles at once.
#[inline(always)]
fn input_lanes(d: &[Lanes; POS], v: &mut [Lanes; POS]) {
    separable_lanes(d, bt, v)
}

/// [`output_transform_reference`] of [`LANES`] tiles at once.
#[inline(always)]
fn output_lanes(m: &[Lanes; POS], y: &mut [Lanes; TILE * TILE]) {
    separable_lanes(m, at, y)
}

multiversion! {
    /// [`input_transform_reference`] of [`LANES`] tiles at once, compiled
    /// for the best instruction set the CPU has: `d[q][lane]` is position
    /// `q` of tile `lane`, and so is `v[q][lane]`.
    pub fn input_transform_lanes(d: &[Lanes; POS], v: &mut [Lanes; POS]) {
        input_lanes(d, v)
    }
}

multiversion! {
    /// [`output_transform_reference`] of [`LANES`] tiles at once, compiled
    /// for the best instruction set the CPU has.
    pub fn output_transform_lanes(m: &[Lanes; POS], y: &mut [Lanes; TILE * TILE]) {
        output_lanes(m, y)
    }
}

/// A convolution's weights transformed for Winograd F(4x4, 3x3).
#[derive(Debug, Clone)]
pub struct Winograd {
    /// `U_p` (`[cout x cin]`, packed) for each position `p` of the 6x6 tile.
    u: Vec<PackedA>,
    /// The products' (empty) bias: bias is added when tiles are written.
    zeros: Vec<f32>,
}

impl Winograd {
    /// Whether `conv` can run on [`Winograd::run`] and is expected to gain:
    /// 3x3 windows, stride and dilation 1, one group, float weights, at
    /// least 24 input and output channels, output planes of at least 4x4
    /// and at least 4 tiles (16 when the transformed weights pass 1 MiB),
    /// and transformed
    /// weights (4x the weights) of at most 64 MiB (512 channels in and out).
    /// With fewer channels the transforms cost more than the products
    /// save: on the VGG-16-BN fixture's 8-channel 32x32 layer Winograd took
    /// twice the direct kernel's time, and since direct rows of 16 pixels
    /// fill whole tiles its 16-channel 16x16 layer took 1.2x (batch 25, one
    /// thread); 24 channels on 16x16 planes gained 1.08-1.15x, 32 on 8x8
    /// 1.13-1.33x, 64 on 56x56 2.3x. With fewer tiles
    /// per image, a small batch's products are too narrow to pay for
    /// reading 4x the weights: the VGG-16-BN fixture at batch 1 took 1.8x
    /// the direct time with its 4x4 planes (one tile) on Winograd, and
    /// ResNet-50's 512-channel 7x7 layers (four tiles) were slower too.
    ///
    /// With `many_images` (plans for batches of many images, see
    /// [`crate::SessionOptions::many_images`]) one tile per image is
    /// enough: the batch's images fill the products' width. The VGG-16-BN
    /// fixture's 64-channel 4x4 layers at batch 25 (one thread): 0.25 ->
    /// 0.19 ms.
    pub fn applies(conv: &Conv2d, many_images: bool) -> bool {
        conv.kh == 3
            && conv.kw == 3
            && conv.stride == (1, 1)
            && conv.dilation == (1, 1)
            && conv.group == 1
            && conv.int8.is_none()
            && enabled()
            && conv.cin >= 24
            && conv.cout >= 24
            && conv.oh >= TILE
            && conv.ow >= TILE
            && POS * conv.cin * conv.cout <= 1 << 24
            && {
                // Per image, not per batch: the choice (and so the rounding)
                // must not depend on the batch size.
                let tiles = conv.oh.div_ceil(TILE) * conv.ow.div_ceil(TILE);
                let u_bytes = 4 * POS * conv.cin * conv.cout;
                (many_images || tiles >= 4) && (tiles >= 16 || u_bytes <= 1 << 20)
            }
            && conv.weight.len() == conv.cout * conv.cin * 9
    }

    /// Transforms `weight` (`[cout, cin, 3, 3]`).
    pub fn new(weight: &[f32], cout: usize, cin: usize) -> Self {
        let mut u = vec![vec![0f32; cout * cin]; POS];
        for (f, g) in weight.chunks_exact(9).take(cout * cin).enumerate() {
            for (p, v) in weight_transform(g).into_iter().enumerate() {
                u[p][f] = v;
            }
        }
        Self {
            u: u.into_iter()
                .map(|m| PackedA::new_owned(m, cout, cin))
                .collect(),
            zeros: vec![0.0; cout],
        }
    }

    /// Runs `conv` (whose weights these are): `x` is `[n, cin, ih, iw]`,
    /// `y` is `[n, cout, oh, ow]`, `res` (shaped like `y`) is added before
    /// the activation. Blocks of tiles run on the rayon pool unless
    /// `threads` is 1 or this thread is sequential.
    pub fn run(
        &self,
        conv: &Conv2d,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        threads: usize,
    ) {
        self.run_on(Kernels::best(), conv, x, res, y, threads)
    }

    /// [`Winograd::run`] with the given gather and scatter code (tests
    /// compare them).
    pub fn run_on(
        &self,
        kernels: Kernels,
        conv: &Conv2d,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        threads: usize,
    ) {
        let (tiles_h, tiles_w) = (conv.oh.div_ceil(TILE), conv.ow.div_ceil(TILE));
        let total = conv.n * tiles_h * tiles_w;
        if total == 0 {
            // An empty batch.
            return;
        }
        let per_tile = POS * (conv.cin + conv.cout);
        // Blocks of whole panels of the packed kernel (48 columns) within
        // the budget, except that up to a quarter over it stays one block:
        // a short second block (4 tiles after 96 for a batch of 25 8x8
        // maps) pays for 36 products and a group of transforms on a few
        // columns (the VGG-16-BN fixture's 32-channel 8x8 layer, batch 25,
        // one thread: 177-187 -> 169-176 us, best of 3000 runs).
        let cap = (BLOCK_FLOATS / per_tile / 48 * 48).max(48);
        let block = if total <= cap + cap / 4 {
            total.next_multiple_of(LANES)
        } else {
            cap
        };
        let blocks = total.div_ceil(block);
        let out = SendPtr(y.as_mut_ptr());
        let y_len = y.len();
        let parallel = threads > 1 && !super::is_sequential();
        // Enough blocks: one task each. Too few to keep the threads busy
        // (a 14x14 plane of one image is one block): the blocks one after
        // another, each phase split over the threads (input channels, the
        // 36 products, output channels).
        let split = if parallel && blocks < 2 * threads {
            threads
        } else {
            1
        };
        let task = |b: usize| {
            let t0 = b * block;
            let ctx = Block {
                conv,
                w: self,
                x,
                res,
                tiles: (tiles_h, tiles_w),
                t0,
                nt: block.min(total - t0),
                stride: block,
            };
            with_reused(&BLOCK, per_tile * block, |buf| {
                // SAFETY: blocks write disjoint tiles of `y`, whose length
                // is `y_len`.
                let y = unsafe { std::slice::from_raw_parts_mut(out.get(), y_len) };
                ctx.run(buf, y, kernels, split)
            });
        };
        if parallel && split == 1 {
            (0..blocks).into_par_iter().for_each(task);
        } else {
            (0..blocks).for_each(task);
        }
    }
}

/// Where one tile lies: its image and its top-left output position.
#[derive(Clone, Copy, Default)]
struct TileAt {
    img: usize,
    oy: usize,
    ox: usize,
}

/// One block of tiles of one call.
struct Block<'a> {
    conv: &'a Conv2d,
    w: &'a Winograd,
    x: &'a [f32],
    res: Option<&'a [f32]>,
    /// Tiles per column and per row of an output plane.
    tiles: (usize, usize),
    /// First tile (numbered image by image, row by row).
    t0: usize,
    /// Tiles in the block.
    nt: usize,
    /// Row length of the transformed input and of the products.
    stride: usize,
}

impl Block<'_> {
    fn tile(&self, t: usize) -> TileAt {
        let per_img = self.tiles.0 * self.tiles.1;
        let (img, r) = (t / per_img, t % per_img);
        TileAt {
            img,
            oy: r / self.tiles.1 * TILE,
            ox: r % self.tiles.1 * TILE,
        }
    }

    /// The tiles of the lane group starting at block tile `l0`.
    fn group(&self, l0: usize) -> ([TileAt; LANES], usize) {
        let lanes = LANES.min(self.nt - l0);
        let at = std::array::from_fn(|l| {
            if l < lanes {
                self.tile(self.t0 + l0 + l)
            } else {
                TileAt::default()
            }
        });
        (at, lanes)
    }

    /// Transforms, multiplies and writes the block; `buf` holds
    /// `POS * (cin + cout) * stride` floats. With `split > 1` each phase
    /// runs in that many parts on the rayon pool.
    fn run(&self, buf: &mut [f32], y: &mut [f32], kernels: Kernels, split: usize) {
        let c = self.conv;
        let (v, m) = buf.split_at_mut(POS * c.cin * self.stride);
        let (vp, v_len) = (SendPtr(v.as_mut_ptr()), v.len());
        each_part(c.cin, split, |chans| {
            // SAFETY: parts write the rows of disjoint input channels of
            // `v`, whose length is `v_len`.
            let v = unsafe { std::slice::from_raw_parts_mut(vp.get(), v_len) };
            for l0 in (0..self.nt).step_by(LANES) {
                let (at, lanes) = self.group(l0);
                let at = &at[..lanes];
                match kernels {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Kernels::Avx512` is only chosen where the CPU
                    // has AVX-512F; `v` holds `POS * cin * stride` floats.
                    Kernels::Avx512 => unsafe {
                        avx512::inputs(c, self.x, at, v, self.stride, l0, chans.clone())
                    },
                    _ => transform_inputs(c, self.x, at, v, self.stride, l0, chans.clone()),
                }
            }
        });
        let epi = Epilogue {
            bias: &self.w.zeros,
            res: None,
            act: Activation::None,
        };
        let (vl, ml) = (c.cin * self.stride, c.cout * self.stride);
        let product = |(p, mp): (usize, &mut [f32])| {
            let b = Mat::row_major(&v[p * vl..(p + 1) * vl], self.stride);
            let done = gemm_packed(&self.w.u[p], b, self.nt, mp, self.stride, epi, 1);
            debug_assert!(done, "block buffers are sized for the products");
        };
        let m = &mut m[..POS * ml];
        if split > 1 {
            m.par_chunks_mut(ml).enumerate().for_each(product);
        } else {
            m.chunks_mut(ml).enumerate().for_each(product);
        }
        let m = &*m;
        // The vector writer handles the activations a 3x3 convolution is
        // followed by in the models; a residual or another activation
        // takes the lane-loop writer.
        let vector_out = self.res.is_none() && matches!(c.act, Activation::None | Activation::Relu);
        let (yp, y_len) = (SendPtr(y.as_mut_ptr()), y.len());
        each_part(c.cout, split, |chans| {
            // SAFETY: parts write disjoint output channels of `y`, whose
            // length is `y_len`.
            let y = unsafe { std::slice::from_raw_parts_mut(yp.get(), y_len) };
            for l0 in (0..self.nt).step_by(LANES) {
                let (at, lanes) = self.group(l0);
                let at = &at[..lanes];
                match kernels {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above; `m` holds `POS * cout * stride`
                    // floats and the tiles lie inside `y`.
                    Kernels::Avx512 if vector_out => unsafe {
                        avx512::outputs(c, m, at, y, self.stride, l0, chans.clone())
                    },
                    _ => write_outputs(c, m, at, self.res, y, self.stride, l0, chans.clone()),
                }
            }
        });
    }
}

/// Calls `f` on `0..n` in `parts` ranges (multiples of 4 long but the
/// last), on the rayon pool when `parts > 1`.
fn each_part(n: usize, parts: usize, f: impl Fn(Range<usize>) + Sync) {
    if parts <= 1 || n <= 4 {
        f(0..n);
        return;
    }
    let per = n.div_ceil(parts).next_multiple_of(4);
    (0..n.div_ceil(per))
        .into_par_iter()
        .for_each(|i| f(i * per..((i + 1) * per).min(n)));
}

/// Which gather and scatter code a call uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kernels {
    /// Masked AVX-512 loads and stores with in-register 4x4 transposes.
    Avx512,
    /// Lane loops (compiled per instruction set): the reference.
    Lanes,
}

impl Kernels {
    /// The fastest the CPU runs.
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::simd_level() >= qint8_math::kernels::SimdLevel::Avx512 {
            return Kernels::Avx512;
        }
        Kernels::Lanes
    }
}

multiversion! {
    /// Gathers the 6x6 input tiles of `at` (zero outside the plane) for
    /// the input channels `chans` and stores their transforms at lane offset `l0` of
    /// `v` (`[POS][cin][stride]`).
    fn transform_inputs(c: &Conv2d, x: &[f32], at: &[TileAt], v: &mut [f32], stride: usize, l0: usize, chans: Range<usize>) {
        let (ih, iw) = (c.ih as isize, c.iw as isize);
        let (pt, pl) = (c.pad.0 as isize, c.pad.1 as isize);
        let plane = c.ih * c.iw;
        let mut d = [[0f32; LANES]; POS];
        let mut t = [[0f32; LANES]; POS];
        for ci in chans {
            for (l, a) in at.iter().enumerate() {
                let base = (a.img * c.cin + ci) * plane;
                let (y0, x0) = (a.oy as isize - pt, a.ox as isize - pl);
                for i in 0..PATCH {
                    let iy = y0 + i as isize;
                    for j in 0..PATCH {
                        let ix = x0 + j as isize;
                        d[i * PATCH + j][l] = if iy < 0 || iy >= ih || ix < 0 || ix >= iw {
                            0.0
                        } else {
                            x[base + iy as usize * c.iw + ix as usize]
                        };
                    }
                }
            }
            input_lanes(&d, &mut t);
            for (p, tp) in t.iter().enumerate() {
                v[(p * c.cin + ci) * stride + l0..][..LANES].copy_from_slice(tp);
            }
        }
    }
}

multiversion! {
    /// Transforms back the products at lane offset `l0` of `m`
    /// (`[POS][cout][stride]`) for the tiles `at` and output channels
    /// `chans`, and writes their outputs with bias, residual and activation.
    fn write_outputs(c: &Conv2d, m: &[f32], at: &[TileAt], res: Option<&[f32]>, y: &mut [f32], stride: usize, l0: usize, chans: Range<usize>) {
        let mut mt = [[0f32; LANES]; POS];
        let mut o = [[0f32; LANES]; TILE * TILE];
        let plane = c.oh * c.ow;
        for co in chans {
            for (p, mp) in mt.iter_mut().enumerate() {
                mp.copy_from_slice(&m[(p * c.cout + co) * stride + l0..][..LANES]);
            }
            output_lanes(&mt, &mut o);
            let bias = c.bias[co];
            for (l, a) in at.iter().enumerate() {
                let base = (a.img * c.cout + co) * plane;
                for r in 0..TILE.min(c.oh - a.oy) {
                    let row = base + (a.oy + r) * c.ow + a.ox;
                    for s in 0..TILE.min(c.ow - a.ox) {
                        let mut val = o[r * TILE + s][l] + bias;
                        if let Some(res) = res {
                            val += res[row + s];
                        }
                        y[row + s] = c.act.apply(val);
                    }
                }
            }
        }
    }
}

/// The AVX-512 gather and scatter. A tile's row of four values moves
/// with one masked load or store into (out of) a 128-bit block of a
/// register, lane `4b + k` of the group in block `b` of register `k`; a
/// 4x4 transpose inside each block turns four such registers into four
/// columns across the group's lanes (and back). Masks leave out the
/// padding, so loads and stores touch only elements of the plane.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use std::ops::Range;

    use super::{Conv2d, TileAt, LANES, PATCH, POS, TILE};

    /// `B^T d` on registers, the operations of [`super::bt`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bt_regs(d: [__m512; PATCH]) -> [__m512; PATCH] {
        let [d0, d1, d2, d3, d4, d5] = d;
        let (two, four, five) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(5.0),
        );
        [
            _mm512_add_ps(
                _mm512_sub_ps(_mm512_mul_ps(four, d0), _mm512_mul_ps(five, d2)),
                d4,
            ),
            _mm512_sub_ps(
                _mm512_add_ps(d3, d4),
                _mm512_mul_ps(four, _mm512_add_ps(d1, d2)),
            ),
            _mm512_add_ps(
                _mm512_mul_ps(four, _mm512_sub_ps(d1, d2)),
                _mm512_sub_ps(d4, d3),
            ),
            _mm512_add_ps(
                _mm512_mul_ps(two, _mm512_sub_ps(d3, d1)),
                _mm512_sub_ps(d4, d2),
            ),
            _mm512_add_ps(
                _mm512_mul_ps(two, _mm512_sub_ps(d1, d3)),
                _mm512_sub_ps(d4, d2),
            ),
            _mm512_add_ps(
                _mm512_sub_ps(_mm512_mul_ps(four, d1), _mm512_mul_ps(five, d3)),
                d5,
            ),
        ]
    }

    /// `A^T m` on registers, the operations of [`super::at`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn at_regs(m: [__m512; PATCH]) -> [__m512; TILE] {
        let [m0, m1, m2, m3, m4, m5] = m;
        let (two, four, eight) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(8.0),
        );
        let (s12, d12) = (_mm512_add_ps(m1, m2), _mm512_sub_ps(m1, m2));
        let (s34, d34) = (_mm512_add_ps(m3, m4), _mm512_sub_ps(m3, m4));
        [
            _mm512_add_ps(_mm512_add_ps(m0, s12), s34),
            _mm512_add_ps(d12, _mm512_mul_ps(two, d34)),
            _mm512_add_ps(s12, _mm512_mul_ps(four, s34)),
            _mm512_add_ps(_mm512_add_ps(d12, _mm512_mul_ps(eight, d34)), m5),
        ]
    }

    /// Transposes the 4x4 matrix in each 128-bit block of `v`: block `b`
    /// of result `s` holds element `s` of block `b` of `v[0..4]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose4(v: [__m512; 4]) -> [__m512; 4] {
        let t0 = _mm512_castps_pd(_mm512_unpacklo_ps(v[0], v[1]));
        let t1 = _mm512_castps_pd(_mm512_unpackhi_ps(v[0], v[1]));
        let t2 = _mm512_castps_pd(_mm512_unpacklo_ps(v[2], v[3]));
        let t3 = _mm512_castps_pd(_mm512_unpackhi_ps(v[2], v[3]));
        [
            _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2)),
            _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3)),
        ]
    }

    /// Transposes 16 vectors: lane `l` of result `k` is element `k` of
    /// `v[l]`. 4x4 transposes within 128-bit blocks, then the blocks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(v: [__m512; 16]) -> [__m512; 16] {
        // Block `b` of `u[g][s]` holds element `4b + s` of `v[4g..4g + 4]`.
        let u: [[__m512; 4]; 4] =
            std::array::from_fn(|g| transpose4(std::array::from_fn(|j| v[4 * g + j])));
        let mut out = [_mm512_setzero_ps(); 16];
        for s in 0..4 {
            let [a0, a1, a2, a3] = [u[0][s], u[1][s], u[2][s], u[3][s]];
            // Blocks 0, 1 (`lo`) and 2, 3 (`hi`) of a0 and a1, and of a2 and a3.
            let (lo01, hi01) = (
                _mm512_shuffle_f32x4::<0x44>(a0, a1),
                _mm512_shuffle_f32x4::<0xEE>(a0, a1),
            );
            let (lo23, hi23) = (
                _mm512_shuffle_f32x4::<0x44>(a2, a3),
                _mm512_shuffle_f32x4::<0xEE>(a2, a3),
            );
            // Block b of each of a0..a3, in that order.
            out[s] = _mm512_shuffle_f32x4::<0x88>(lo01, lo23);
            out[4 + s] = _mm512_shuffle_f32x4::<0xDD>(lo01, lo23);
            out[8 + s] = _mm512_shuffle_f32x4::<0x88>(hi01, hi23);
            out[12 + s] = _mm512_shuffle_f32x4::<0xDD>(hi01, hi23);
        }
        out
    }

    /// Whether every plane of `c` is one tile: 4x4 maps, padded by one on
    /// every side. Lane `l`'s input and output planes are then 16
    /// consecutive floats each, moved with one load or store and a 16x16
    /// transpose instead of 12 masked loads or 4 masked stores per lane
    /// (whose mask and offset reads dominated the transforms of the
    /// VGG-16-BN fixture's 4x4 layers).
    fn one_tile(c: &Conv2d) -> bool {
        (c.ih, c.iw, c.oh, c.ow, c.pad) == (TILE, TILE, TILE, TILE, (1, 1))
    }

    /// Columns `0..width` of `[start, start + 4)` that lie in `[0, len)`,
    /// as a 4-bit mask.
    fn columns(start: isize, width: isize, len: isize) -> u16 {
        let lo = (-start).clamp(0, width);
        let hi = (len - start).clamp(0, width);
        if lo >= hi {
            0
        } else {
            ((1u32 << hi) - (1u32 << lo)) as u16
        }
    }

    /// As [`super::transform_inputs`], bit for bit, for input channels
    /// `chans`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `at` holds at most [`LANES`] tiles of `c`'s
    /// output, `x` is `c`'s input and `v` holds `POS * cin * stride`
    /// floats with `l0 + LANES <= stride` (checked, as is `chans`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn inputs(
        c: &Conv2d,
        x: &[f32],
        at: &[TileAt],
        v: &mut [f32],
        stride: usize,
        l0: usize,
        chans: Range<usize>,
    ) {
        let plane = c.ih * c.iw;
        assert!(
            x.len() >= c.n * c.cin * plane
                && v.len() >= POS * c.cin * stride
                && l0 + LANES <= stride
                && chans.end <= c.cin
        );
        if one_tile(c) {
            for ci in chans {
                // SAFETY: lane `l`'s plane of channel `ci` is inside `x`
                // (checked above).
                let planes = transpose16(std::array::from_fn(|l| match at.get(l) {
                    Some(a) => unsafe {
                        _mm512_loadu_ps(x.as_ptr().add((a.img * c.cin + ci) * plane))
                    },
                    None => _mm512_setzero_ps(),
                }));
                // The plane fills the patch's inner 4x4; its border is padding.
                let mut d = [_mm512_setzero_ps(); POS];
                for (k, p) in planes.into_iter().enumerate() {
                    d[(k / TILE + 1) * PATCH + k % TILE + 1] = p;
                }
                // SAFETY: as this function's.
                unsafe { store_inputs(d, v, c.cin, ci, stride, l0) };
            }
            return;
        }
        // Per patch row, column half (0..4, 4..6) and lane: the offset
        // of the load in channel 0, and its mask (block `l / 4`).
        let mut off = [[[0isize; LANES]; 2]; PATCH];
        let mut mask = [[[0u16; LANES]; 2]; PATCH];
        for (l, a) in at.iter().enumerate().take(LANES) {
            let b = (l / 4) as isize;
            let y0 = a.oy as isize - c.pad.0 as isize;
            let x0 = a.ox as isize - c.pad.1 as isize;
            for i in 0..PATCH {
                let iy = y0 + i as isize;
                if iy < 0 || iy >= c.ih as isize {
                    continue;
                }
                for h in 0..2 {
                    let xs = x0 + 4 * h as isize;
                    let cols = columns(xs, if h == 0 { 4 } else { 2 }, c.iw as isize);
                    mask[i][h][l] = cols << (4 * b);
                    off[i][h][l] =
                        ((a.img * c.cin * plane) as isize) + iy * c.iw as isize + xs - 4 * b;
                }
            }
        }
        let mut d = [_mm512_setzero_ps(); POS];
        for ci in chans {
            let base = x.as_ptr().wrapping_add(ci * plane);
            for i in 0..PATCH {
                for h in 0..2 {
                    let mut r = [_mm512_setzero_ps(); 4];
                    for l in 0..LANES {
                        // SAFETY: only the unmasked elements are read, and
                        // they lie in row `iy` of the plane (`columns`);
                        // masked ones are never accessed.
                        r[l % 4] = unsafe {
                            _mm512_mask_loadu_ps(
                                r[l % 4],
                                mask[i][h][l],
                                base.wrapping_offset(off[i][h][l]),
                            )
                        };
                    }
                    let t = transpose4(r);
                    let width = if h == 0 { 4 } else { 2 };
                    d[i * PATCH + 4 * h..][..width].copy_from_slice(&t[..width]);
                }
            }
            // SAFETY: as this function's.
            unsafe { store_inputs(d, v, c.cin, ci, stride, l0) };
        }
    }

    /// `B^T d B` of one input channel's patches (`d`, lanes = tiles),
    /// stored at `v[(p * cin + ci) * stride + l0..][..LANES]` for each
    /// position `p`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `v` holds `POS * cin * stride` floats,
    /// `ci < cin` and `l0 + LANES <= stride`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_inputs(
        d: [__m512; POS],
        v: &mut [f32],
        cin: usize,
        ci: usize,
        stride: usize,
        l0: usize,
    ) {
        let mut rows = [_mm512_setzero_ps(); POS];
        for i in 0..PATCH {
            let r = bt_regs(std::array::from_fn(|j| d[i * PATCH + j]));
            rows[i * PATCH..][..PATCH].copy_from_slice(&r);
        }
        for j in 0..PATCH {
            let col = bt_regs(std::array::from_fn(|i| rows[i * PATCH + j]));
            for (i, t) in col.into_iter().enumerate() {
                let p = i * PATCH + j;
                // SAFETY: `p * cin + ci < POS * cin` and `l0 + LANES <= stride`.
                unsafe { _mm512_storeu_ps(v.as_mut_ptr().add((p * cin + ci) * stride + l0), t) };
            }
        }
    }

    /// As [`super::write_outputs`] without a residual and for no
    /// activation or Relu, bit for bit, for output channels `chans`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `at` holds at most [`LANES`] tiles of `c`'s
    /// output, `y` is `c`'s output and `m` holds `POS * cout * stride`
    /// floats with `l0 + LANES <= stride` (checked, as is `chans`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn outputs(
        c: &Conv2d,
        m: &[f32],
        at: &[TileAt],
        y: &mut [f32],
        stride: usize,
        l0: usize,
        chans: Range<usize>,
    ) {
        let plane = c.oh * c.ow;
        assert!(
            y.len() >= c.n * c.cout * plane
                && m.len() >= POS * c.cout * stride
                && l0 + LANES <= stride
                && chans.end <= c.cout
        );
        let mut off = [[0isize; LANES]; TILE];
        let mut mask = [[0u16; LANES]; TILE];
        for (l, a) in at.iter().enumerate().take(LANES) {
            let b = (l / 4) as isize;
            for r in 0..TILE.min(c.oh - a.oy) {
                let cols = columns(a.ox as isize, 4, c.ow as isize);
                mask[r][l] = cols << (4 * b);
                off[r][l] = ((a.img * c.cout * plane + (a.oy + r) * c.ow + a.ox) as isize) - 4 * b;
            }
        }
        let relu = c.act == super::Activation::Relu;
        let whole_planes = one_tile(c);
        let zero = _mm512_setzero_ps();
        for co in chans {
            // SAFETY: `p * cout + co < POS * cout` and `l0 + LANES <= stride`.
            let mt: [__m512; POS] = std::array::from_fn(|p| unsafe {
                _mm512_loadu_ps(m.as_ptr().add((p * c.cout + co) * stride + l0))
            });
            let mut rows = [zero; PATCH * TILE];
            for i in 0..PATCH {
                let r = at_regs(std::array::from_fn(|j| mt[i * PATCH + j]));
                rows[i * TILE..][..TILE].copy_from_slice(&r);
            }
            let mut o = [zero; TILE * TILE];
            for j in 0..TILE {
                let col = at_regs(std::array::from_fn(|i| rows[i * TILE + j]));
                for (i, t) in col.into_iter().enumerate() {
                    o[i * TILE + j] = t;
                }
            }
            let bias = _mm512_set1_ps(c.bias[co]);
            for v in o.iter_mut() {
                *v = _mm512_add_ps(*v, bias);
                if relu {
                    // The second operand wins for NaN and for -0.0, as in
                    // `Activation::apply`.
                    *v = _mm512_max_ps(zero, *v);
                }
            }
            if whole_planes {
                // Lane `l`'s whole output plane, in order.
                for (a, w) in at.iter().zip(transpose16(o)) {
                    // SAFETY: the plane lies inside `y` (checked above).
                    unsafe {
                        _mm512_storeu_ps(y.as_mut_ptr().add((a.img * c.cout + co) * plane), w)
                    };
                }
                continue;
            }
            let base = y.as_mut_ptr().wrapping_add(co * plane);
            for r in 0..TILE {
                let t = transpose4(std::array::from_fn(|s| o[r * TILE + s]));
                for l in 0..LANES {
                    // SAFETY: only the unmasked elements are written, and
                    // they lie in output row `oy + r` of the tile.
                    unsafe {
                        _mm512_mask_storeu_ps(base.wrapping_offset(off[r][l]), mask[r][l], t[l % 4])
                    };
                }
            }
        }
    }
}

#[cfg(test)]
// Lanes and positions index two arrays each.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values from small integers to large magnitudes, NaN and infinities
    /// included: the lane transforms must match the reference bit for bit.
    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            (-64i32..64).prop_map(|v| v as f32 / 8.0),
            -1e6f32..1e6,
            any::<u32>().prop_map(f32::from_bits),
        ]
    }

    fn same_bits(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    proptest! {
        #[test]
        fn input_lanes_match_the_reference(tiles in proptest::collection::vec(proptest::array::uniform32(value()), LANES)) {
            // 32 values per generated array; the tile takes 36 of two arrays.
            let tile = |l: usize| -> [f32; POS] {
                std::array::from_fn(|q| if q < 32 { tiles[l][q] } else { tiles[(l + 1) % LANES][q - 32] })
            };
            let d: [Lanes; POS] = std::array::from_fn(|q| std::array::from_fn(|l| tile(l)[q]));
            let mut v = [[0f32; LANES]; POS];
            input_transform_lanes(&d, &mut v);
            for l in 0..LANES {
                let r = input_transform_reference(&tile(l));
                for q in 0..POS {
                    prop_assert!(same_bits(v[q][l], r[q]), "lane {} position {}: {} vs {}", l, q, v[q][l], r[q]);
                }
            }
        }

        #[test]
        fn output_lanes_match_the_reference(tiles in proptest::collection::vec(proptest::array::uniform32(value()), LANES)) {
            let tile = |l: usize| -> [f32; POS] {
                std::array::from_fn(|q| if q < 32 { tiles[l][q] } else { tiles[(l + 1) % LANES][q - 32] })
            };
            let m: [Lanes; POS] = std::array::from_fn(|q| std::array::from_fn(|l| tile(l)[q]));
            let mut y = [[0f32; LANES]; TILE * TILE];
            output_transform_lanes(&m, &mut y);
            for l in 0..LANES {
                let r = output_transform_reference(&tile(l));
                for q in 0..TILE * TILE {
                    prop_assert!(same_bits(y[q][l], r[q]), "lane {} output {}: {} vs {}", l, q, y[q][l], r[q]);
                }
            }
        }
    }

    /// The transforms compose to the 3x3 correlation: on one tile, with
    /// exact small integers, Winograd gives the direct sums exactly.
    #[test]
    fn one_tile_equals_the_direct_sums() {
        let d: [f32; POS] = std::array::from_fn(|q| ((q * 7) % 11) as f32 - 5.0);
        let g: [f32; 9] = [1.0, -2.0, 0.0, 3.0, 1.0, -1.0, 2.0, 0.0, 1.0];
        let u = weight_transform(&g);
        let v = input_transform_reference(&d);
        let m: [f32; POS] = std::array::from_fn(|q| u[q] * v[q]);
        let y = output_transform_reference(&m);
        for r in 0..TILE {
            for s in 0..TILE {
                let direct: f32 = (0..3)
                    .flat_map(|i| (0..3).map(move |j| (i, j)))
                    .map(|(i, j)| g[i * 3 + j] * d[(r + i) * PATCH + s + j])
                    .sum();
                let got = y[r * TILE + s];
                assert!(
                    (got - direct).abs() <= 1e-4 * direct.abs().max(1.0),
                    "({r}, {s}): {got} vs {direct}"
                );
            }
        }
    }
}
