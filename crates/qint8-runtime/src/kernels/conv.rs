//! 2-D convolution (ONNX Conv, <https://onnx.ai/onnx/operators/onnx__Conv.html>,
//! opsets 1-22): depthwise convolutions run a direct kernel, everything else
//! im2col + GEMM (1x1 stride-1 convolutions skip the im2col). Bias and a
//! following activation are applied in the same pass over the output.

use std::sync::Arc;

use rayon::prelude::*;

use qint8_graph::{shape, ConvAttrs, GraphError, Node};

use super::gemm::{sgemm, Mat};
use super::int8::{self, InputQuant, Int8Weights};
use super::packed::{
    conv_direct, conv_source_available, gemm_packed, gemm_packed_conv, pad_row, with_reused,
    writes_images, ConvInput, Epilogue, PackedA, DEPTHWISE, GATHER_BELOW, NR,
};
use super::winograd::Winograd;
use super::{multiversion, Activation};

/// The input a GEMM path reads: the plain `[n, cin, ih, iw]` tensor, or
/// its phase-split copy (rows of `stride * phase_width` floats).
#[derive(Clone, Copy)]
struct Source<'a> {
    x: &'a [f32],
    phase_width: Option<usize>,
}

impl Source<'_> {
    /// Floats per input row.
    fn row_len(&self, iw: usize, sw: usize) -> usize {
        self.phase_width.map_or(iw, |w| w * sw)
    }
}

/// A 2-D convolution's geometry for one input shape (1-D convolutions
/// have `ih = kh = oh = 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height.
    pub ih: usize,
    /// Input width.
    pub iw: usize,
    /// Output channels.
    pub cout: usize,
    /// Groups.
    pub group: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (h, w).
    pub stride: (usize, usize),
    /// Dilations (h, w).
    pub dilation: (usize, usize),
    /// Padding at the top and left.
    pub pad: (usize, usize),
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeom {
    /// The geometry of Conv `node` (attributes `attrs`) for input shape
    /// `x` (`[N, C, H, W]` or `[N, C, W]`) and weight shape `w`.
    pub fn resolve(
        node: &Node,
        attrs: &ConvAttrs,
        x: &[usize],
        w: &[usize],
    ) -> Result<Self, GraphError> {
        let win = shape::conv_window(node, attrs, x, w)?;
        if x.len() != 4 && x.len() != 3 {
            return Err(GraphError::Shape {
                node: node.name.clone(),
                op: node.op.op_type().to_string(),
                detail: format!("only 1-D and 2-D convolutions are supported, input is {x:?}"),
            });
        }
        let two_d = x.len() == 4;
        let pick = |v: &[usize], one: usize| if two_d { (v[0], v[1]) } else { (one, v[0]) };
        let (ih, iw) = pick(&x[2..], 1);
        let (kh, kw) = pick(&win.kernel, 1);
        let (oh, ow) = pick(&win.out, 1);
        Ok(Self {
            n: x[0],
            cin: x[1],
            ih,
            iw,
            cout: w[0],
            group: attrs.group.max(1),
            kh,
            kw,
            stride: pick(&win.strides, 1),
            dilation: pick(&win.dilations, 1),
            pad: pick(&win.pad_begin, 0),
            oh,
            ow,
        })
    }
}

/// What [`Conv2d::with_int8`] needs: integer weights and the scales of
/// weights and input.
#[derive(Debug, Clone)]
pub struct Int8Source {
    /// Integer weights (`-128..=127`, stored as f32), laid out like [`Conv2d::weight`].
    pub q: Vec<f32>,
    /// Weight scale per output channel, or one for the whole tensor.
    pub w_scale: Vec<f32>,
    /// How the input is quantized.
    pub input: InputQuant,
}

/// A convolution resolved for one input shape, with its weights packed.
/// Its geometry's fields read through it (`conv.n`, `conv.kh`, ...).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Shapes, strides, dilations and padding.
    pub geom: ConvGeom,
    /// Weights `[cout, cin / group * kh * kw]`.
    pub weight: std::sync::Arc<Vec<f32>>,
    /// Bias per output channel (zeros when the node has none).
    pub bias: Vec<f32>,
    /// Activation fused into the epilogue.
    pub act: Activation,
    /// Weights packed for the GEMM, one per group (see [`Conv2d::pack`]).
    pub packed: Vec<PackedA>,
    /// Integer weights: when set, the convolution runs on the integer
    /// kernel ([`super::int8`]), which quantizes its input; `weight` and
    /// `packed` are then empty.
    pub int8: Option<Int8Weights>,
    /// Weights transformed for Winograd F(4x4, 3x3), set by
    /// [`Conv2d::pack_for`] where [`Winograd::applies`]; the convolution then
    /// runs on [`Winograd::run`] and `packed` is empty.
    pub winograd: Option<Arc<Winograd>>,
}

/// Elements per parallel task: below this, splitting costs more than it saves.
const GRAIN: usize = 1 << 14;

/// Depthwise planes up to this size run channels-last.
const CHANNELS_LAST_BELOW: usize = 1024;

/// Channels of one image a task of the channels-last depthwise path
/// takes, on images of at least [`CHANNEL_RUNS_FROM`] multiply-adds (a
/// run's reordered input stays in cache, and one image spreads over the
/// threads).
const CHANNELS_PER_TASK: usize = 32;

/// Multiply-adds per image from which the channels-last depthwise path
/// cuts images into runs of channels.
const CHANNEL_RUNS_FROM: usize = 1 << 18;

/// Output planes smaller than this are computed for the whole batch in one
/// GEMM (better shaped products for small feature maps).
const BATCHED_BELOW: usize = 256;

impl std::ops::Deref for Conv2d {
    type Target = ConvGeom;

    fn deref(&self) -> &ConvGeom {
        &self.geom
    }
}

impl Conv2d {
    /// Packs the weights of every group for the GEMM paths (on input
    /// planes no larger than the window, the unrolled weight matrix
    /// instead). Must be called (by the plan compiler) after `weight` is
    /// set and before [`Conv2d::run`]. Kernels are chosen for any batch
    /// size; see [`Conv2d::pack_for`].
    pub fn pack(self) -> Self {
        self.pack_for(false)
    }

    /// [`Conv2d::pack`], with kernels chosen for batches of many images
    /// when `many_images` (see [`Winograd::applies`]). The choice never
    /// depends on the batch a run gets.
    pub fn pack_for(mut self, many_images: bool) -> Self {
        if !self.is_depthwise() && Winograd::applies(&self, many_images) {
            self.winograd = Some(Arc::new(Winograd::new(&self.weight, self.cout, self.cin)));
            self.packed = Vec::new();
            return self;
        }
        self.pack_direct()
    }

    /// [`Conv2d::pack`] for the direct kernels only, never Winograd (for
    /// comparisons of the two).
    pub fn pack_direct(mut self) -> Self {
        let (cout_g, k) = (self.cout / self.group, self.k());
        self.winograd = None;
        if self.is_depthwise() {
            // The depthwise kernels read `weight` directly.
            return self;
        }
        if self.unrolling_pays() {
            let (m, k) = (self.cout * self.oh * self.ow, self.cin * self.ih * self.iw);
            self.packed = vec![PackedA::new(Arc::new(self.unrolled_weight()), m, k)];
            return self;
        }
        self.packed = if self.group == 1 {
            vec![PackedA::new(self.weight.clone(), cout_g, k)]
        } else {
            (0..self.group)
                .map(|g| {
                    PackedA::new(
                        Arc::new(self.weight[g * cout_g * k..(g + 1) * cout_g * k].to_vec()),
                        cout_g,
                        k,
                    )
                })
                .collect()
        };
        self
    }

    /// The same convolution without the kernel rows and columns that fall
    /// in the padding for every output position (a 3x3 window with
    /// padding 1 on a 1x1 plane is its centre tap; ResNet-50's last stage
    /// at 32x32 inputs runs on such planes): less work, the same sums.
    /// Call before [`Conv2d::pack`].
    pub fn without_dead_taps(mut self) -> Self {
        let g = self.geom;
        let live = |taps: usize, outs: usize, s: usize, d: usize, pad: usize, len: usize| {
            let hit = |k: usize| {
                (0..outs).any(|o| (o * s + k * d).checked_sub(pad).is_some_and(|i| i < len))
            };
            let first = (0..taps).find(|&k| hit(k));
            let last = (0..taps).rev().find(|&k| hit(k));
            match (first, last) {
                // Dead taps between live ones stay: they only add zeros.
                (Some(a), Some(b)) if a * d <= pad => Some(a..b + 1),
                _ => None,
            }
        };
        let (Some(rows), Some(cols)) = (
            live(g.kh, g.oh, g.stride.0, g.dilation.0, g.pad.0, g.ih),
            live(g.kw, g.ow, g.stride.1, g.dilation.1, g.pad.1, g.iw),
        ) else {
            return self;
        };
        if rows.len() == g.kh && cols.len() == g.kw {
            return self;
        }
        let filters = g.cout * (g.cin / g.group);
        let mut w = Vec::with_capacity(filters * rows.len() * cols.len());
        for f in self.weight.chunks(g.kh * g.kw).take(filters) {
            for r in rows.clone() {
                w.extend_from_slice(&f[r * g.kw + cols.start..r * g.kw + cols.end]);
            }
        }
        self.geom.pad = (
            g.pad.0 - rows.start * g.dilation.0,
            g.pad.1 - cols.start * g.dilation.1,
        );
        self.geom.kh = rows.len();
        self.geom.kw = cols.len();
        self.weight = Arc::new(w);
        self
    }

    /// The same convolution on the integer kernel: `src.q` are its integer
    /// weights, laid out like `weight`. Call instead of [`Conv2d::pack`]
    /// (padding taps are dropped here as by [`Conv2d::without_dead_taps`]).
    /// The integer kernels are for ungrouped and depthwise convolutions
    /// (the latter where [`int8::depthwise_fits`]): other grouped ones are
    /// returned packed for the float kernels, `src` unused.
    pub fn with_int8(self, src: Int8Source) -> Self {
        if self.group != 1 && !self.is_depthwise() {
            return self.without_dead_taps().pack();
        }
        let q = Conv2d {
            weight: Arc::new(src.q),
            int8: None,
            ..self.clone()
        }
        .without_dead_taps();
        let int8 = if q.group == 1 {
            Int8Weights::new(
                &q.weight,
                [q.cout, q.cin, q.kh, q.kw],
                &src.w_scale,
                src.input,
            )
        } else if int8::depthwise_fits(&q.geom) {
            Int8Weights::new_depthwise(&q.weight, [q.cout, q.kh, q.kw], &src.w_scale, src.input)
        } else {
            return self.without_dead_taps().pack();
        };
        Conv2d {
            geom: q.geom,
            // The float weights are not needed any more.
            weight: Arc::new(Vec::new()),
            packed: Vec::new(),
            winograd: None,
            int8: Some(int8),
            ..self
        }
    }

    /// Whether the convolution is cheaper as one dense product of each
    /// image's whole input with the unrolled weight matrix
    /// ([`Conv2d::unrolled_weight`]): on planes no larger than the window
    /// (a 3x3 window on a 2x2 plane, where im2col's columns are more than
    /// half padding), that product does no more multiply-adds than im2col
    /// and reads the input in place, with no gather: 3.6x faster for 48
    /// channels on 2x2 planes, 1.4x for 64 on 3x3 (32 and 16 images, one
    /// thread); on 4x4 planes it lost. The matrix is held to four times the
    /// weights, or 4 MB.
    fn unrolling_pays(&self) -> bool {
        let (p, q, taps) = (self.oh * self.ow, self.ih * self.iw, self.kh * self.kw);
        let dense = self.cout * self.cin * p * q;
        self.group == 1 && p >= 2 && q <= taps && (p * q <= 4 * taps || dense <= 1 << 20)
    }

    /// Whether [`Conv2d::pack`] packed the unrolled weight matrix.
    fn is_unrolled(&self) -> bool {
        let p = self.oh * self.ow;
        p >= 2 && self.packed.len() == 1 && self.packed[0].m == self.cout * p
    }

    /// The convolution as a `[cout * oh * ow, cin * ih * iw]` matrix
    /// (rows: output channel, then position; columns: input channel, then
    /// position) that maps one image's input to its output.
    fn unrolled_weight(&self) -> Vec<f32> {
        let (p, q) = (self.oh * self.ow, self.ih * self.iw);
        let (k, taps) = (self.cin * q, self.kh * self.kw);
        let mut w = vec![0.0f32; self.cout * p * k];
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dilation;
        let (pt, pl) = self.pad;
        for co in 0..self.cout {
            for (oy, ox) in (0..self.oh).flat_map(|oy| (0..self.ow).map(move |ox| (oy, ox))) {
                let row = &mut w[(co * p + oy * self.ow + ox) * k..][..k];
                for ky in live_taps(oy * sh, dh, pt, self.ih, self.kh) {
                    let iy = oy * sh + ky * dh - pt;
                    for kx in live_taps(ox * sw, dw, pl, self.iw, self.kw) {
                        let ix = ox * sw + kx * dw - pl;
                        for ci in 0..self.cin {
                            row[ci * q + iy * self.iw + ix] +=
                                self.weight[(co * self.cin + ci) * taps + ky * self.kw + kx];
                        }
                    }
                }
            }
        }
        w
    }

    fn is_depthwise(&self) -> bool {
        self.group == self.cin && self.group == self.cout && self.group > 1
    }

    fn is_pointwise(&self) -> bool {
        // End padding changes the output size even for 1x1 kernels.
        self.kh == 1
            && self.kw == 1
            && self.stride == (1, 1)
            && self.pad == (0, 0)
            && (self.oh, self.ow) == (self.ih, self.iw)
    }

    fn k(&self) -> usize {
        self.cin / self.group * self.kh * self.kw
    }

    /// Scratch floats [`Conv2d::run`] needs.
    pub fn scratch_len(&self) -> usize {
        if let Some(w) = &self.int8 {
            return int8::scratch_len(self, w);
        }
        if self.winograd.is_some() {
            // Its blocks use per-thread buffers.
            return 0;
        }
        self.paths_scratch_len() + self.phased_len()
    }

    /// Width of each stride phase when the GEMM gathers from an input whose
    /// rows are split by column phase (see [`Conv2d::split_phases`]).
    fn phase_width(&self) -> Option<usize> {
        let sw = self.stride.1;
        (sw > 1
            && self.ow >= GATHER_BELOW
            && !self.is_unrolled()
            && !self.is_depthwise()
            && !(self.is_strided_pointwise() && self.oh * self.ow >= NR)
            && conv_source_available())
        .then(|| self.iw.div_ceil(sw))
    }

    /// Floats of the phase-split input, or 0.
    fn phased_len(&self) -> usize {
        self.phase_width()
            .map_or(0, |w| self.n * self.cin * self.ih * self.stride.1 * w)
    }

    /// Writes `x` with every input row reordered by column phase: row
    /// `[ph * w + t] = x_row[t * sw + ph]` (zero past the row's end), so a
    /// strided window's taps become contiguous reads for the GEMM's gather.
    fn split_phases(&self, x: &[f32], out: &mut [f32], w: usize) {
        let (iw, sw) = (self.iw, self.stride.1);
        let rows = self.n * self.cin * self.ih;
        for (src, dst) in x.chunks(iw).zip(out.chunks_mut(sw * w)).take(rows) {
            pad_row(src, dst, sw, w, 0);
        }
    }

    /// Scratch of the convolution paths, without the phase-split input.
    fn paths_scratch_len(&self) -> usize {
        if self.is_depthwise() {
            return 0;
        }
        let p = self.oh * self.ow;
        let cout_g = self.cout / self.group;
        if self.is_unrolled() {
            // The product `[cout * p, n]` before it is transposed.
            return if self.n > 1 {
                self.cout * p * self.n
            } else {
                0
            };
        }
        if self.is_strided_pointwise() && p >= NR {
            // The subsampled input.
            self.n * self.cin * p
        } else if p < BATCHED_BELOW {
            // Column matrix for the whole batch plus the product before scatter.
            self.k() * self.n * p + cout_g * self.n * p
        } else if self.is_pointwise() {
            0
        } else {
            self.k() * p
        }
    }

    /// Runs the convolution: `x` is `[n, cin, ih, iw]`, `y` is `[n, cout, oh, ow]`.
    pub fn run(&self, x: &[f32], y: &mut [f32], scratch: &mut [f32], threads: usize) {
        self.run_with_residual(x, None, y, scratch, threads)
    }

    /// Whether a residual `Add` can be fused into this convolution.
    pub fn can_fuse_residual(&self) -> bool {
        !self.is_depthwise()
    }

    /// Runs the convolution with a fused residual: `y = act(conv(x) + bias + res)`,
    /// `res` shaped like `y`. Depthwise convolutions ignore `res`
    /// (see [`Conv2d::can_fuse_residual`]).
    pub fn run_with_residual(
        &self,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
        threads: usize,
    ) {
        if let Some(w) = &self.int8 {
            // SAFETY: f32 and u32 have the same size and alignment, and
            // every bit pattern is valid for both.
            let words = unsafe {
                std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u32, scratch.len())
            };
            int8::run(self, w, x, res, y, words, int8::Kernels::Best);
        } else if let Some(w) = &self.winograd {
            w.run(self, x, res, y, threads);
        } else if self.is_depthwise() {
            self.depthwise(x, y);
        } else if self.is_unrolled() {
            self.unrolled(x, res, y, scratch, threads);
        } else if self.is_pointwise()
            && self.oh * self.ow == 1
            && self.group == 1
            && !conv_source_available()
        {
            // [N, Cin] x [Cin, Cout]: NCHW with 1x1 planes is already row-major.
            // (With AVX-512, `batched` runs this on the packed kernel.)
            let k = self.cin;
            sgemm(
                self.n,
                self.cout,
                k,
                Mat::row_major(x, k),
                Mat::transposed(&self.weight, k),
                y,
                self.cout,
                false,
                threads,
            );
            self.epilogue(y, 1, res);
        } else if self.is_strided_pointwise() && self.oh * self.ow >= NR {
            // A strided 1x1 convolution is a pointwise one on the subsampled input.
            let (ci, oh, ow, (sh, sw)) = (self.cin, self.oh, self.ow, self.stride);
            let sub = &mut scratch[..self.n * ci * oh * ow];
            for (plane, dst) in sub.chunks_mut(oh * ow).enumerate() {
                let src = &x[plane * self.ih * self.iw..(plane + 1) * self.ih * self.iw];
                for (oy, row) in dst.chunks_mut(ow).enumerate() {
                    let srow = &src[oy * sh * self.iw..];
                    for (ox, d) in row.iter_mut().enumerate() {
                        *d = srow[ox * sw];
                    }
                }
            }
            self.pointwise_per_image(&scratch[..self.n * ci * oh * ow], res, y, threads);
        } else if self.is_pointwise()
            && self.group == 1
            && self.oh * self.ow >= NR
            && (self.n == 1 || self.oh * self.ow >= BATCHED_BELOW)
        {
            // Small planes of several images go to `batched`: one product
            // over all of them instead of one small one per image.
            self.pointwise_per_image(x, res, y, threads);
        } else if !self.is_pointwise()
            && self.oh * self.ow >= BATCHED_BELOW
            && conv_direct(self, x, res, y, threads)
        {
            // Large planes: direct, no im2col.
        } else {
            // Strided windows gather from a phase-split copy of the input.
            let (scratch, phased) = scratch.split_at_mut(self.paths_scratch_len());
            let src = match self.phase_width() {
                Some(w) => {
                    let phased = &mut phased[..self.phased_len()];
                    self.split_phases(x, phased, w);
                    Source {
                        x: phased,
                        phase_width: Some(w),
                    }
                }
                None => Source {
                    x,
                    phase_width: None,
                },
            };
            if self.oh * self.ow < BATCHED_BELOW {
                self.batched(src, res, y, scratch, threads);
            } else {
                self.per_image(src, res, y, scratch, threads);
            }
        }
    }

    /// `Y^T = W_unrolled X^T` for the batch's `[n, cin * ih * iw]` input
    /// `X`: the product's column `j` is image `j`'s whole output.
    fn unrolled(
        &self,
        x: &[f32],
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
        threads: usize,
    ) {
        let a = &self.packed[0];
        let (m, k, n) = (a.m, a.k, self.n);
        let p = self.oh * self.ow;
        let bias: Vec<f32> = self
            .bias
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, p))
            .collect();
        let b = Mat::transposed(&x[..n * k], k);
        if n == 1 {
            // One image: the product's layout is the output's.
            let epi = Epilogue {
                bias: &bias,
                res: res.map(|r| &r[..m]),
                act: self.act,
            };
            gemm_packed(a, b, 1, &mut y[..m], 1, epi, threads);
            return;
        }
        let prod = &mut scratch[..m * n];
        let epi = Epilogue {
            bias: &bias,
            res: None,
            // With a residual, the activation waits for the transpose.
            act: if res.is_some() {
                Activation::None
            } else {
                self.act
            },
        };
        gemm_packed(a, b, n, prod, n, epi, threads);
        // [m, n] -> [n, m].
        scatter_planes::<1>(prod, y, n, m, 0);
        if let Some(r) = res {
            add_activate(&mut y[..n * m], &r[..n * m], self.act);
        }
    }

    /// A 1x1 convolution with stride > 1 that reads no padding, ungrouped.
    fn is_strided_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride != (1, 1)
            && self.pad == (0, 0)
            && self.group == 1
            && self.dilation == (1, 1)
            // End padding would make outputs read past the input.
            && (self.oh.max(1) - 1) * self.stride.0 < self.ih
            && (self.ow.max(1) - 1) * self.stride.1 < self.iw
    }

    /// Ungrouped pointwise convolution of `x` laid out `[n, cin, oh * ow]`:
    /// one GEMM per image straight into the output (B's rows are the input
    /// channels, read in place).
    fn pointwise_per_image(&self, x: &[f32], res: Option<&[f32]>, y: &mut [f32], threads: usize) {
        let p = self.oh * self.ow;
        for img in 0..self.n {
            let xi = &x[img * self.cin * p..(img + 1) * self.cin * p];
            let yi = &mut y[img * self.cout * p..(img + 1) * self.cout * p];
            let epi = Epilogue {
                bias: &self.bias,
                res: res.map(|r| &r[img * self.cout * p..(img + 1) * self.cout * p]),
                act: self.act,
            };
            gemm_packed(
                &self.packed[0],
                Mat::row_major(xi, p),
                p,
                yi,
                p,
                epi,
                threads,
            );
        }
    }

    fn per_image(
        &self,
        src: Source<'_>,
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
        threads: usize,
    ) {
        let (p, cin_g, cout_g, k) = (
            self.oh * self.ow,
            self.cin / self.group,
            self.cout / self.group,
            self.k(),
        );
        let (x, rl) = (src.x, src.row_len(self.iw, self.stride.1));
        let in_img = self.cin * self.ih * rl;
        for img in 0..self.n {
            let xi = &x[img * in_img..(img + 1) * in_img];
            let yi = &mut y[img * self.cout * p..(img + 1) * self.cout * p];
            for g in 0..self.group {
                let xg = &xi[g * cin_g * self.ih * rl..(g + 1) * cin_g * self.ih * rl];
                let yg = &mut yi[g * cout_g * p..(g + 1) * cout_g * p];
                let epi = Epilogue {
                    bias: &self.bias[g * cout_g..(g + 1) * cout_g],
                    res: res.map(|r| &r[img * self.cout * p + g * cout_g * p..][..cout_g * p]),
                    act: self.act,
                };
                if !self.is_pointwise() && conv_source_available() {
                    // im2col gathered panel by panel inside the GEMM.
                    gemm_packed_conv(
                        &self.packed[g],
                        self,
                        ConvInput {
                            x: xg,
                            images: 1,
                            img_stride: in_img,
                            phase_width: src.phase_width,
                        },
                        yg,
                        p,
                        None,
                        epi,
                        threads,
                    );
                    continue;
                }
                let cols: &[f32] = if self.is_pointwise() {
                    xg
                } else {
                    im2col(self, xg, &mut scratch[..k * p], p, 1, 0);
                    &scratch[..k * p]
                };
                gemm_packed(
                    &self.packed[g],
                    Mat::row_major(cols, p),
                    p,
                    yg,
                    p,
                    epi,
                    threads,
                );
            }
        }
    }

    fn batched(
        &self,
        src: Source<'_>,
        res: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
        threads: usize,
    ) {
        let (p, cin_g, cout_g, k) = (
            self.oh * self.ow,
            self.cin / self.group,
            self.cout / self.group,
            self.k(),
        );
        let np = self.n * p;
        let (x, rl) = (src.x, src.row_len(self.iw, self.stride.1));
        let in_img = self.cin * self.ih * rl;
        let (cols, prod) = scratch.split_at_mut(k * np);
        // One image: the product's [cout_g, p] layout is the output's, so
        // it is written in place with the whole epilogue.
        let single = self.n == 1;
        for g in 0..self.group {
            let epi = Epilogue {
                bias: &self.bias[g * cout_g..(g + 1) * cout_g],
                res: res
                    .filter(|_| single)
                    .map(|r| &r[g * cout_g * p..][..cout_g * p]),
                // With a residual, the activation waits for the scatter below.
                act: if res.is_some() && !single {
                    Activation::None
                } else {
                    self.act
                },
            };
            let xg = &x[g * cin_g * self.ih * rl..];
            if !single && writes_images(self, src.phase_width) {
                // Straight into the output's images, residual and
                // activation included: no product buffer, no scatter.
                let input = ConvInput {
                    x: xg,
                    images: self.n,
                    img_stride: in_img,
                    phase_width: src.phase_width,
                };
                let epi = Epilogue {
                    res: res.map(|r| &r[g * cout_g * p..]),
                    act: self.act,
                    ..epi
                };
                let out = &mut y[g * cout_g * p..];
                let images = Some(self.cout * p);
                if gemm_packed_conv(&self.packed[g], self, input, out, p, images, epi, threads) {
                    continue;
                }
            }
            let product = |out: &mut [f32], cols: &mut [f32]| {
                if conv_source_available() {
                    let input = ConvInput {
                        x: xg,
                        images: self.n,
                        img_stride: in_img,
                        phase_width: src.phase_width,
                    };
                    gemm_packed_conv(&self.packed[g], self, input, out, np, None, epi, threads);
                } else {
                    // All images at once: row r of `cols` holds that row for every image.
                    im2col(self, xg, cols, np, self.n, in_img);
                    let b = Mat::row_major(cols, np);
                    gemm_packed(&self.packed[g], b, np, out, np, epi, threads);
                }
            };
            if single {
                product(&mut y[g * cout_g * p..(g + 1) * cout_g * p], cols);
                continue;
            }
            let prod = &mut prod[..cout_g * np];
            product(prod, cols);
            // [cout_g, n, p] -> [n, cout, p].
            match p {
                1 => scatter_planes::<1>(prod, y, self.n, self.cout, g * cout_g),
                2 => scatter_planes::<2>(prod, y, self.n, self.cout, g * cout_g),
                4 => scatter_planes::<4>(prod, y, self.n, self.cout, g * cout_g),
                8 => scatter_planes::<8>(prod, y, self.n, self.cout, g * cout_g),
                16 => scatter_planes::<16>(prod, y, self.n, self.cout, g * cout_g),
                _ => {
                    for co in 0..cout_g {
                        for img in 0..self.n {
                            let at = (img * self.cout + g * cout_g + co) * p;
                            let src = &prod[co * np + img * p..][..p];
                            super::copy_short(&mut y[at..at + p], src);
                        }
                    }
                }
            }
            // Then the residual and activation over each image's
            // contiguous block of this group's channels, in one loop that
            // vectorizes (per plane, a loop of 1-64 values did not).
            if let Some(r) = res {
                for img in 0..self.n {
                    let at = (img * self.cout + g * cout_g) * p
                        ..(img * self.cout + (g + 1) * cout_g) * p;
                    add_activate(&mut y[at.clone()], &r[at], self.act);
                }
            }
        }
    }

    /// Adds the bias and applies the activation to outputs laid out as
    /// consecutive `[.., cout, p]` planes.
    fn epilogue(&self, y: &mut [f32], p: usize, res: Option<&[f32]>) {
        let act = self.act;
        let planes_per_task = (GRAIN / p.max(1)).max(1);
        if let Some(r) = res {
            for (i, v) in y.iter_mut().enumerate() {
                *v = act.apply(*v + self.bias[(i / p) % self.cout] + r[i]);
            }
            return;
        }
        super::for_chunks(y, p * planes_per_task, |t, chunk| {
            for (i, plane) in chunk.chunks_mut(p).enumerate() {
                bias_act(plane, self.bias[(t * planes_per_task + i) % self.cout], act);
            }
        });
    }

    fn depthwise(&self, x: &[f32], y: &mut [f32]) {
        let (ih, iw, oh, ow) = (self.ih, self.iw, self.oh, self.ow);
        let kk = self.kh * self.kw;
        if oh * ow <= CHANNELS_LAST_BELOW {
            // Small planes: rows are too short to vectorize, so work
            // channels-last, where the innermost loop runs over channels.
            return self.depthwise_channels_last(x, y);
        }
        #[cfg(target_arch = "x86_64")]
        let fast = super::simd_level() >= qint8_math::kernels::SimdLevel::Avx512
            && depthwise_rows_apply(self);
        super::for_chunks(y, oh * ow, |plane_idx, out| {
            let c = plane_idx % self.cout;
            let src = &x[plane_idx * ih * iw..(plane_idx + 1) * ih * iw];
            let w = &self.weight[c * kk..(c + 1) * kk];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: AVX-512 is available (simd_level never exceeds
                // what the CPU has); `src` and `out` are whole planes.
                unsafe { depthwise_rows_avx512(self, src, w, self.bias[c], out) };
                return;
            }
            depthwise_plane(self, src, w, self.bias[c], out);
        });
    }

    /// [`Conv2d::depthwise`] on small planes: each image's channels in
    /// runs of [`CHANNELS_PER_TASK`], one task each (so that one image
    /// spreads over the threads too), each reordered channels-last, summed
    /// by [`depthwise_nhwc`] (or its AVX-512 form) and reordered back.
    fn depthwise_channels_last(&self, x: &[f32], y: &mut [f32]) {
        let (c, kk) = (self.cout, self.kh * self.kw);
        let (pixels, plane) = (self.ih * self.iw, self.oh * self.ow);
        let mut w_t = vec![0.0f32; kk * c];
        for ch in 0..c {
            for t in 0..kk {
                w_t[t * c + ch] = self.weight[ch * kk + t];
            }
        }
        // Rows of a few pixels have too few windows to share each tap's
        // weights between; there the reference's wider channel blocks do
        // better.
        #[cfg(target_arch = "x86_64")]
        let fast =
            super::simd_level() >= qint8_math::kernels::SimdLevel::Avx512 && self.ow >= NHWC_PIXELS;
        // (image, first channel, output planes of its channels). Small
        // images whole: their runs of channels would cost more to hand out
        // than to sum.
        let per_task = match c * plane * kk >= CHANNEL_RUNS_FROM {
            true => CHANNELS_PER_TASK,
            false => c,
        };
        let mut tasks: Vec<(usize, usize, &mut [f32])> =
            Vec::with_capacity(self.n * c.div_ceil(per_task));
        let mut rest = &mut y[..self.n * c * plane];
        for img in 0..self.n {
            for c0 in (0..c).step_by(per_task) {
                let cr = per_task.min(c - c0);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(cr * plane);
                tasks.push((img, c0, head));
                rest = tail;
            }
        }
        let task = |(img, c0, out): (usize, usize, &mut [f32])| {
            let cr = out.len() / plane.max(1);
            let src = &x[(img * c + c0) * pixels..][..cr * pixels];
            // Both halves are written before they are read.
            with_reused(&DEPTHWISE, (pixels + plane) * cr, |buf| {
                let (nhwc, sums) = buf.split_at_mut(pixels * cr);
                super::transpose(src, cr, pixels, nhwc);
                let (w, bias) = (&w_t[c0..], &self.bias[c0..c0 + cr]);
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: AVX-512 F is available (simd_level never
                    // exceeds what the CPU has); the buffers' sizes are
                    // those the function asks for.
                    unsafe { depthwise_nhwc_avx512(self, cr, nhwc, w, c, bias, sums) };
                    super::transpose(sums, plane, cr, out);
                    return;
                }
                depthwise_nhwc(self, cr, nhwc, w, c, bias, sums);
                super::transpose(sums, plane, cr, out);
            });
        };
        if super::is_sequential() || tasks.len() == 1 {
            tasks.into_iter().for_each(task);
        } else {
            tasks.into_par_iter().for_each(task);
        }
    }

    /// Straightforward reference convolution for tests.
    pub fn reference(&self, x: &[f32], y: &mut [f32]) {
        let (cin_g, cout_g) = (self.cin / self.group, self.cout / self.group);
        for img in 0..self.n {
            for co in 0..self.cout {
                let g = co / cout_g;
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let mut s = self.bias[co] as f64;
                        for ci in 0..cin_g {
                            for ki in 0..self.kh {
                                for kj in 0..self.kw {
                                    let iy = (oy * self.stride.0 + ki * self.dilation.0) as isize
                                        - self.pad.0 as isize;
                                    let ix = (ox * self.stride.1 + kj * self.dilation.1) as isize
                                        - self.pad.1 as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= self.ih as isize
                                        || ix >= self.iw as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((img * self.cin + g * cin_g + ci) * self.ih
                                        + iy as usize)
                                        * self.iw
                                        + ix as usize];
                                    let wv = self.weight
                                        [((co * cin_g + ci) * self.kh + ki) * self.kw + kj];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((img * self.cout + co) * self.oh + oy) * self.ow + ox] =
                            self.act.apply(s as f32);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Adds `b` to a plane and applies the activation.
    fn bias_act(plane: &mut [f32], b: f32, act: Activation) {
        match act {
            Activation::None => plane.iter_mut().for_each(|v| *v += b),
            Activation::Relu => plane.iter_mut().for_each(|v| *v = Activation::Relu.apply(*v + b)),
            Activation::Clip(lo, hi) => plane.iter_mut().for_each(|v| *v = Activation::Clip(lo, hi).apply(*v + b)),
            Activation::Silu => plane.iter_mut().for_each(|v| *v = Activation::Silu.apply(*v + b)),
        }
    }
}

multiversion! {
    /// Channels-last depthwise sums of `cr` channels: `nhwc` is the input
    /// `[ih, iw, cr]`, tap `t`'s weights of these channels start at
    /// `w_t[t * wc]`, `bias` holds their biases, and `out` gets the
    /// activated `[oh, ow, cr]` result. Every output pixel accumulates a
    /// vector of channels for each tap that falls inside the image (on the
    /// small planes this path takes, most of a 5x5 window can lie in the
    /// padding): bias, then the taps row by row, each a product then an
    /// add. The reference of [`depthwise_nhwc_avx512`].
    fn depthwise_nhwc(cv: &Conv2d, cr: usize, nhwc: &[f32], w_t: &[f32], wc: usize, bias: &[f32], out: &mut [f32]) {
        let (ih, iw, oh, ow) = (cv.ih, cv.iw, cv.oh, cv.ow);
        let (sh, sw) = cv.stride;
        let (dh, dw) = cv.dilation;
        let (pt, pl) = cv.pad;
        for oy in 0..oh {
            let rows = live_taps(oy * sh, dh, pt, ih, cv.kh);
            for ox in 0..ow {
                let cols = live_taps(ox * sw, dw, pl, iw, cv.kw);
                let acc = &mut out[(oy * ow + ox) * cr..(oy * ow + ox + 1) * cr];
                // Channels in blocks of fixed size, each summed over every
                // tap in registers (one load and store of the sums per
                // block, not per tap); the same sums in the same order.
                let mut c0 = 0;
                macro_rules! blocks {
                    ($b:expr) => {
                        while cr - c0 >= $b {
                            let mut sums = [0f32; $b];
                            sums.copy_from_slice(&bias[c0..c0 + $b]);
                            for ki in rows.clone() {
                                let iy = oy * sh + ki * dh - pt;
                                for kj in cols.clone() {
                                    let ix = ox * sw + kj * dw - pl;
                                    let w = &w_t[(ki * cv.kw + kj) * wc + c0..][..$b];
                                    let src = &nhwc[(iy * iw + ix) * cr + c0..][..$b];
                                    for j in 0..$b {
                                        sums[j] = w[j].mul_add(src[j], sums[j]);
                                    }
                                }
                            }
                            acc[c0..c0 + $b].copy_from_slice(&sums);
                            c0 += $b;
                        }
                    };
                }
                blocks!(64);
                blocks!(16);
                blocks!(1);
            }
        }
        cv.act.apply_all(&mut out[..oh * ow * cr]);
    }
}

/// The output columns `first..end` whose windows lie inside the image
/// across (every column tap of theirs reads the input, none the padding).
#[cfg(target_arch = "x86_64")]
fn inside_columns(cv: &Conv2d) -> (usize, usize) {
    let (sw, dw, pl) = (cv.stride.1, cv.dilation.1, cv.pad.1);
    let span = (cv.kw - 1) * dw;
    let first = pl.div_ceil(sw).min(cv.ow);
    // Columns with `ox * sw + span < pl + iw`.
    let end = match (pl + cv.iw).checked_sub(span + 1) {
        Some(last) => (last / sw + 1).min(cv.ow),
        None => 0,
    };
    (first, end.max(first))
}

/// Output pixels of a row [`depthwise_nhwc_avx512`] sums at once at most,
/// one register of 16 channels each.
#[cfg(target_arch = "x86_64")]
const NHWC_PIXELS: usize = 8;

/// [`depthwise_nhwc`] with up to [`NHWC_PIXELS`] output pixels of a row
/// summed in registers at once, each tap's weights loaded once for all of
/// them (the reference loads them for every pixel), and the activation
/// applied before the store. Columns whose windows reach into the padding
/// go one at a time, testing each tap; the others in groups that test
/// nothing. Each output is the same sum in the same order (bias, then the
/// taps inside the image row by row, each a fused multiply-add), so the
/// bits are [`depthwise_nhwc`]'s.
///
/// # Safety
/// The CPU has AVX-512 F; `nhwc` holds `ih * iw * cr` floats, `w_t` at
/// least `(kh * kw - 1) * wc + cr`, `bias` `cr` and `out` `oh * ow * cr`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise_nhwc_avx512(
    cv: &Conv2d,
    cr: usize,
    nhwc: &[f32],
    w_t: &[f32],
    wc: usize,
    bias: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (oh, ow) = (cv.oh, cv.ow);
    assert!(
        nhwc.len() >= cv.ih * cv.iw * cr
            && w_t.len() >= (cv.kh * cv.kw).saturating_sub(1) * wc + cr
            && bias.len() >= cr
            && out.len() >= oh * ow * cr,
        "channels-last depthwise called with short buffers"
    );
    let (lo, hi) = cv.act.bounds();
    let (first, end) = inside_columns(cv);
    let g = NhwcGroup {
        cv,
        cr,
        nhwc,
        w_t,
        wc,
    };
    for c0 in (0..cr).step_by(16) {
        let left = cr - c0;
        let m: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
        // SAFETY (the loads and stores here and in `NhwcGroup::sums`):
        // channels `c0..c0 + 16` under the mask `m` lie within `cr`; pixel
        // and tap indices within the planes, as asserted above.
        let b = unsafe { _mm512_maskz_loadu_ps(m, bias.as_ptr().add(c0)) };
        for oy in 0..oh {
            let mut store = |ox: usize, v: __m512| unsafe {
                let v = super::act_zmm(v, cv.act, lo, hi);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add((oy * ow + ox) * cr + c0), m, v)
            };
            let mut ox = first;
            while ox < end {
                let n = end - ox;
                // Whole groups, then the rest in halves.
                macro_rules! group {
                    ($p:literal) => {{
                        let acc = unsafe { g.sums::<$p, false>(oy, ox, c0, m, b) };
                        acc.into_iter()
                            .enumerate()
                            .for_each(|(p, v)| store(ox + p, v));
                        ox += $p;
                    }};
                }
                match n {
                    8.. => group!(8),
                    4..=7 => group!(4),
                    2..=3 => group!(2),
                    _ => group!(1),
                }
            }
            for ox in (0..first).chain(end..ow) {
                let [v] = unsafe { g.sums::<1, true>(oy, ox, c0, m, b) };
                store(ox, v);
            }
        }
    }
}

/// What [`depthwise_nhwc_avx512`]'s groups read.
#[cfg(target_arch = "x86_64")]
struct NhwcGroup<'a> {
    cv: &'a Conv2d,
    cr: usize,
    nhwc: &'a [f32],
    w_t: &'a [f32],
    wc: usize,
}

#[cfg(target_arch = "x86_64")]
impl NhwcGroup<'_> {
    /// The sums of pixels `ox..ox + P` of row `oy`, channels `c0..` under
    /// `m`, starting from `b`. With `CHECKED`, taps outside the image
    /// across are skipped; without, all of them must lie inside.
    ///
    /// # Safety
    /// As [`depthwise_nhwc_avx512`], which checked the buffers; without
    /// `CHECKED`, the pixels' windows lie inside the image across.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn sums<const P: usize, const CHECKED: bool>(
        &self,
        oy: usize,
        ox: usize,
        c0: usize,
        m: std::arch::x86_64::__mmask16,
        b: std::arch::x86_64::__m512,
    ) -> [std::arch::x86_64::__m512; P] {
        use std::arch::x86_64::*;
        let (cv, cr) = (self.cv, self.cr);
        let (sh, sw) = cv.stride;
        let (dh, dw) = cv.dilation;
        let (pt, pl) = cv.pad;
        let (iw, kw) = (cv.iw, cv.kw);
        let mut acc = [b; P];
        for ki in live_taps(oy * sh, dh, pt, cv.ih, cv.kh) {
            let row = (oy * sh + ki * dh - pt) * iw;
            let cols = match CHECKED {
                true => live_taps(ox * sw, dw, pl, iw, kw),
                false => 0..kw,
            };
            for kj in cols {
                // SAFETY: see `depthwise_nhwc_avx512`.
                let wv = unsafe {
                    _mm512_maskz_loadu_ps(m, self.w_t.as_ptr().add((ki * kw + kj) * self.wc + c0))
                };
                let at = (row + ox * sw + kj * dw - pl) * cr + c0;
                for (p, a) in acc.iter_mut().enumerate() {
                    let v = unsafe {
                        _mm512_maskz_loadu_ps(m, self.nhwc.as_ptr().add(at + p * sw * cr))
                    };
                    *a = _mm512_fmadd_ps(wv, v, *a);
                }
            }
        }
        acc
    }
}

/// The taps `k` of a kernel axis of `taps` taps, dilation `d`, whose input
/// position `start + k * d - pad` lies in `[0, len)` (`start`: the output
/// position times the stride). They are consecutive.
fn live_taps(
    start: usize,
    d: usize,
    pad: usize,
    len: usize,
    taps: usize,
) -> std::ops::Range<usize> {
    let first = pad.saturating_sub(start).div_ceil(d);
    let end = (len + pad).saturating_sub(start).div_ceil(d).min(taps);
    first.min(end)..end
}

multiversion! {
    /// One output plane of a depthwise convolution.
    fn depthwise_plane(c: &Conv2d, src: &[f32], w: &[f32], bias: f32, out: &mut [f32]) {
        let (ih, iw, oh, ow) = (c.ih, c.iw, c.oh, c.ow);
        let (sh, sw) = c.stride;
        let (dh, dw) = c.dilation;
        let (pt, pl) = c.pad;
        out.fill(bias);
        for ki in 0..c.kh {
            for kj in 0..c.kw {
                let wv = w[ki * c.kw + kj];
                // Output columns whose input column is inside the image.
                let off = kj * dw;
                let ox0 = if pl > off { (pl - off).div_ceil(sw) } else { 0 };
                let ox1 = if iw + pl > off { ((iw + pl - off - 1) / sw + 1).min(ow) } else { 0 };
                if ox0 >= ox1 {
                    continue;
                }
                for oy in 0..oh {
                    let iy = (oy * sh + ki * dh) as isize - pt as isize;
                    if iy < 0 || iy >= ih as isize {
                        continue;
                    }
                    let row = &src[iy as usize * iw..(iy as usize + 1) * iw];
                    let orow = &mut out[oy * ow..(oy + 1) * ow];
                    let base = ox0 * sw + off - pl;
                    if sw == 1 {
                        let n = ox1 - ox0;
                        for (o, &v) in orow[ox0..ox1].iter_mut().zip(&row[base..base + n]) {
                            *o += wv * v;
                        }
                    } else {
                        for (t, o) in orow[ox0..ox1].iter_mut().enumerate() {
                            *o += wv * row[base + t * sw];
                        }
                    }
                }
            }
        }
        c.act.apply_all(out);
    }
}

/// Whether [`depthwise_rows_avx512`] takes `c`'s geometry: horizontal
/// stride 1 or 2, no horizontal dilation.
fn depthwise_rows_apply(c: &Conv2d) -> bool {
    c.dilation.1 == 1 && (1..=2).contains(&c.stride.1)
}

/// [`depthwise_plane`] with each output's taps summed in a register: 16
/// outputs of a row at a time, for every window that lies inside the
/// image across (the border columns one by one), where
/// [`depthwise_plane`] makes one pass over the plane per tap. Each output
/// is the same sum in the same order (bias, then the taps inside the image
/// row by row, each a product then an add), so the bits are
/// [`depthwise_plane`]'s.
///
/// # Safety
/// The CPU has AVX-512 F; `src` holds the input plane, `out` the output
/// plane; [`depthwise_rows_apply`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise_rows_avx512(c: &Conv2d, src: &[f32], w: &[f32], bias: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (ih, iw, oh, ow) = (c.ih, c.iw, c.oh, c.ow);
    let (sh, sw) = c.stride;
    let dh = c.dilation.0;
    let (pt, pl) = c.pad;
    let kw = c.kw;
    assert!(src.len() >= ih * iw && out.len() >= oh * ow && w.len() >= c.kh * kw && sw <= 2);
    // Columns whose whole window lies inside the image: `lo..hi`
    // (dilation 1 across, see `depthwise_rows_apply`).
    let (lo, hi) = inside_columns(c);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let mask = |n: usize| -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1u16 << n) - 1
        }
    };
    for oy in 0..oh {
        let rows = live_taps(oy * sh, dh, pt, ih, c.kh);
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        // One output, tap by tap, skipping taps outside the image.
        let one = |ox: usize| {
            let mut s = bias;
            for ki in rows.clone() {
                let iy = oy * sh + ki * dh - pt;
                for kj in 0..kw {
                    let ix = ox * sw + kj;
                    if ix >= pl && ix - pl < iw {
                        s += w[ki * kw + kj] * src[iy * iw + ix - pl];
                    }
                }
            }
            s
        };
        for ox in (0..lo).chain(hi..ow) {
            orow[ox] = one(ox);
        }
        for ox0 in (lo..hi).step_by(16) {
            let n = (hi - ox0).min(16);
            // Input values one load covers: the stride-1 window starts, or
            // every other value for stride 2.
            let span = (n - 1) * sw + 1;
            let mut acc = _mm512_set1_ps(bias);
            for ki in rows.clone() {
                let row = &src[(oy * sh + ki * dh - pt) * iw..][..iw];
                for kj in 0..kw {
                    let at = ox0 * sw + kj - pl;
                    // SAFETY: `at + span <= iw` for columns below `hi`;
                    // masked lanes read nothing.
                    let v = unsafe {
                        if sw == 1 {
                            _mm512_maskz_loadu_ps(mask(span), row.as_ptr().add(at))
                        } else {
                            let a = _mm512_maskz_loadu_ps(mask(span), row.as_ptr().add(at));
                            // (With no lane left for it, the second
                            // load's address may lie past the row.)
                            let b = _mm512_maskz_loadu_ps(
                                mask(span.saturating_sub(16)),
                                row.as_ptr().wrapping_add(at + 16),
                            );
                            _mm512_permutex2var_ps(a, even, b)
                        }
                    };
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w[ki * kw + kj]), v));
                }
            }
            // SAFETY: lanes below `n` are columns below `hi <= ow`.
            unsafe { _mm512_mask_storeu_ps(orow.as_mut_ptr().add(ox0), mask(n), acc) };
        }
    }
    let out = &mut out[..oh * ow];
    c.act.apply_all(out);
}

/// A batched product `[cout_g, n, P]` into the output `[n, cout, P]` at
/// channel `c0`: with the plane size a constant, each plane is a few
/// register moves (no `memcpy` call, no size tests).
#[inline(always)]
fn scatter_planes<const P: usize>(prod: &[f32], y: &mut [f32], n: usize, cout: usize, c0: usize) {
    if n == 0 {
        return;
    }
    for (co, row) in prod.chunks_exact(n * P).enumerate() {
        for (img, src) in row.chunks_exact(P).enumerate() {
            let at = (img * cout + c0 + co) * P;
            y[at..at + P].copy_from_slice(src);
        }
    }
}

/// `y = act(y + r)`, one loop per activation so that each vectorizes.
fn add_activate(y: &mut [f32], r: &[f32], act: Activation) {
    let pairs = y.iter_mut().zip(r);
    match act {
        Activation::None => pairs.for_each(|(v, &rv)| *v += rv),
        Activation::Relu => pairs.for_each(|(v, &rv)| *v = Activation::Relu.apply(*v + rv)),
        Activation::Clip(lo, hi) => {
            pairs.for_each(|(v, &rv)| *v = Activation::Clip(lo, hi).apply(*v + rv))
        }
        Activation::Silu => pairs.for_each(|(v, &rv)| *v = Activation::Silu.apply(*v + rv)),
    }
}

/// Writes the im2col matrix of one image's group (`[cin_g, ih, iw]`) into
/// `cols` (`[cin_g * kh * kw, ld]`), at column offset `col0`.
fn im2col(c: &Conv2d, x: &[f32], cols: &mut [f32], ld: usize, images: usize, img_stride: usize) {
    let rows = cin_rows(c);
    let per_task = (GRAIN / ld.max(1)).max(1);
    super::for_chunks(&mut cols[..rows * ld], ld * per_task, |t, chunk| {
        for (i, row) in chunk.chunks_mut(ld).enumerate() {
            im2col_row(c, x, row, t * per_task + i, images, img_stride);
        }
    });
}

/// Rows of the im2col matrix of one group.
fn cin_rows(c: &Conv2d) -> usize {
    c.cin / c.group * c.kh * c.kw
}

multiversion! {
    /// Row `r` of the im2col matrix for `images` consecutive images
    /// (`img_stride` floats apart in `x`), each writing `oh * ow` columns.
    fn im2col_row(c: &Conv2d, x: &[f32], row: &mut [f32], r: usize, images: usize, img_stride: usize) {
        let (ih, iw, oh, ow) = (c.ih, c.iw, c.oh, c.ow);
        let (sh, sw) = c.stride;
        let (dh, dw) = c.dilation;
        let (pt, pl) = c.pad;
        let (kh, kw) = (c.kh, c.kw);
        let ci = r / (kh * kw);
        let ki = (r / kw) % kh;
        let kj = r % kw;
        let off = kj * dw;
        let ox0 = if pl > off { (pl - off).div_ceil(sw) } else { 0 }.min(ow);
        let ox1 = if iw + pl > off {
            ((iw + pl - off - 1) / sw + 1).min(ow)
        } else {
            0
        }
        .max(ox0);
        for img in 0..images {
        let src = &x[img * img_stride + ci * ih * iw..][..ih * iw];
        let dst = &mut row[img * oh * ow..(img + 1) * oh * ow];
        for oy in 0..oh {
            let d = &mut dst[oy * ow..(oy + 1) * ow];
            let iy = (oy * sh + ki * dh) as isize - pt as isize;
            if iy < 0 || iy >= ih as isize {
                d.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * iw..(iy as usize + 1) * iw];
            d[..ox0].fill(0.0);
            d[ox1..].fill(0.0);
            if ox1 > ox0 {
                let base = ox0 * sw + off - pl;
                if sw == 1 {
                    d[ox0..ox1].copy_from_slice(&srow[base..base + (ox1 - ox0)]);
                } else {
                    for (t, v) in d[ox0..ox1].iter_mut().enumerate() {
                        *v = srow[base + t * sw];
                    }
                }
            }
        }
    }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::test_values as values;
    use proptest::prelude::*;

    /// A convolution of geometry `geom` for the depthwise kernels' tests;
    /// `act` picks None, Relu, a Clip or Silu.
    fn depthwise_conv(geom: ConvGeom, weight: Vec<f32>, bias: Vec<f32>, act: u8) -> Conv2d {
        Conv2d {
            geom,
            weight: Arc::new(weight),
            bias,
            act: [
                Activation::None,
                Activation::Relu,
                Activation::Clip(-0.3, 0.4),
                Activation::Silu,
            ][act as usize],
            packed: Vec::new(),
            int8: None,
            winograd: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

        /// The register-blocked depthwise rows equal the per-tap passes bit
        /// for bit: windows of 1 to 5 taps, strides 1 and 2 across, any
        /// padding (border columns on both sides, planes narrower than a
        /// window), vertical stride and dilation, every activation.
        #[test]
        fn depthwise_rows_match_per_tap_passes(
            (ih, iw) in (1usize..20, 1usize..60),
            (kh, kw) in (1usize..6, 1usize..6),
            (sh, sw, dh) in (1usize..3, 1usize..3, 1usize..3),
            (pt, pl, pb, pr) in (0usize..3, 0usize..3, 0usize..3, 0usize..3),
            act in 0u8..4,
            seed in any::<u64>(),
        ) {
            let (eh, ew) = (ih + pt + pb, iw + pl + pr);
            prop_assume!(eh > (kh - 1) * dh && ew >= kw);
            let (oh, ow) = ((eh - (kh - 1) * dh - 1) / sh + 1, (ew - kw) / sw + 1);
            let c = depthwise_conv(
                ConvGeom {
                    n: 1, cin: 2, ih, iw, cout: 2, group: 2, kh, kw,
                    stride: (sh, sw), dilation: (dh, 1), pad: (pt, pl), oh, ow,
                },
                values(2 * kh * kw, seed),
                vec![0.25, -0.5],
                act,
            );
            if !std::arch::is_x86_feature_detected!("avx512f") {
                return Ok(());
            }
            let x = values(ih * iw, seed ^ 3);
            let (mut fast, mut slow) = (vec![f32::NAN; oh * ow], vec![f32::NAN; oh * ow]);
            // SAFETY: AVX-512 F is present; whole planes; stride and
            // dilation as `depthwise_rows_apply` requires.
            unsafe { depthwise_rows_avx512(&c, &x, &c.weight[..kh * kw], 0.25, &mut fast) };
            depthwise_plane(&c, &x, &c.weight[..kh * kw], 0.25, &mut slow);
            prop_assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?} vs {:?}", fast, slow);
        }

        /// The grouped channels-last kernel equals its reference bit for
        /// bit: rows from 1 to 30 pixels (groups of 8, 4, 2 and 1, border
        /// columns on both sides, windows wider than the image), strides
        /// and dilations on both axes, channel runs that are and are not
        /// multiples of 16 taken from the middle of a wider weight table,
        /// every activation.
        #[test]
        fn depthwise_nhwc_groups_match_the_reference(
            (ih, iw) in (1usize..12, 1usize..30),
            (kh, kw) in (1usize..6, 1usize..6),
            (sh, sw, dh, dw) in (1usize..3, 1usize..3, 1usize..3, 1usize..3),
            (pt, pl, pb, pr) in (0usize..3, 0usize..3, 0usize..3, 0usize..3),
            (cr, c0) in (1usize..40, 0usize..20),
            act in 0u8..4,
            seed in any::<u64>(),
        ) {
            let (eh, ew) = (ih + pt + pb, iw + pl + pr);
            prop_assume!(eh > (kh - 1) * dh && ew > (kw - 1) * dw);
            let (oh, ow) = ((eh - (kh - 1) * dh - 1) / sh + 1, (ew - (kw - 1) * dw - 1) / sw + 1);
            let wc = c0 + cr + 3;
            // The kernels take the weights as arguments, not from `c`.
            let c = depthwise_conv(
                ConvGeom {
                    n: 1, cin: wc, ih, iw, cout: wc, group: wc, kh, kw,
                    stride: (sh, sw), dilation: (dh, dw), pad: (pt, pl), oh, ow,
                },
                Vec::new(),
                values(wc, seed ^ 5),
                act,
            );
            if !std::arch::is_x86_feature_detected!("avx512f") {
                return Ok(());
            }
            let x = values(ih * iw * cr, seed ^ 3);
            let w_t = values(kh * kw * wc, seed);
            let bias = &c.bias[c0..c0 + cr];
            let (mut fast, mut slow) = (vec![f32::NAN; oh * ow * cr], vec![f32::NAN; oh * ow * cr]);
            // SAFETY: AVX-512 F is present; the buffers have the sizes
            // the kernel asks for.
            unsafe { depthwise_nhwc_avx512(&c, cr, &x, &w_t[c0..], wc, bias, &mut fast) };
            depthwise_nhwc(&c, cr, &x, &w_t[c0..], wc, bias, &mut slow);
            prop_assert!(fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?} vs {:?}", fast, slow);
        }
    }
}
