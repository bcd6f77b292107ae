// Device code of qint8's CUDA executor, compiled at run time by NVRTC.
// Every tensor is float32 and contiguous (NCHW); quantized values are held
// as float integers, which represent int8/uint8 exactly. Loops are
// grid-stride so one launch shape serves any size.

#define GRID_LOOP(i, n)                                                        \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + \
                                threadIdx.x;                                   \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

#define MAX_RANK 6
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Elementwise functions of one input. kind: 0 Relu, 1 Sigmoid, 2 Clip(a, b),
// 3 HardSigmoid(alpha a, beta b), 4 HardSwish, 5 copy.
extern "C" __global__ void unary_f32(const float* x, float* y,
                                     unsigned long long n, int kind, float a,
                                     float b) {
    GRID_LOOP(i, n) {
        float v = x[i];
        float r;
        switch (kind) {
            case 0: r = v > 0.0f ? v : (v == v ? 0.0f : v); break;
            case 1: r = 1.0f / (1.0f + expf(-v)); break;
            case 2: r = fminf(fmaxf(v, a), b); break;
            case 3: r = fminf(fmaxf(a * v + b, 0.0f), 1.0f); break;
            case 4: r = v * fminf(fmaxf(v / 6.0f + 0.5f, 0.0f), 1.0f); break;
            default: r = v; break;
        }
        y[i] = r;
    }
}

// Strides of two operands broadcast (or permuted) to an output of `dims`.
struct Strided {
    int rank;
    int kind;  // 0 add, 1 sub, 2 mul, 3 div, 4 copy of `a` (expand, transpose)
    long long dims[MAX_RANK];
    long long sa[MAX_RANK];
    long long sb[MAX_RANK];
};

// y[i] = a[..] op b[..], the operands read through their (broadcast or
// permuted) strides; y is contiguous.
extern "C" __global__ void binary_f32(const float* a, const float* b, float* y,
                                      unsigned long long n, Strided p) {
    GRID_LOOP(i, n) {
        unsigned long long r = i;
        long long ia = 0, ib = 0;
        for (int d = p.rank - 1; d >= 0; --d) {
            long long c = (long long)(r % (unsigned long long)p.dims[d]);
            r /= (unsigned long long)p.dims[d];
            ia += c * p.sa[d];
            ib += c * p.sb[d];
        }
        float u = a[ia];
        float r2;
        switch (p.kind) {
            case 0: r2 = u + b[ib]; break;
            case 1: r2 = u - b[ib]; break;
            case 2: r2 = u * b[ib]; break;
            case 3: r2 = u / b[ib]; break;
            default: r2 = u; break;
        }
        y[i] = r2;
    }
}

// Copies contiguous x (of `dims`) into y at `offset` through y's strides
// `sa` (Concat's slabs).
extern "C" __global__ void scatter_f32(const float* x, float* y,
                                       unsigned long long n,
                                       unsigned long long offset, Strided p) {
    GRID_LOOP(i, n) {
        unsigned long long r = i;
        long long iy = 0;
        for (int d = p.rank - 1; d >= 0; --d) {
            long long c = (long long)(r % (unsigned long long)p.dims[d]);
            r /= (unsigned long long)p.dims[d];
            iy += c * p.sa[d];
        }
        y[offset + iy] = x[i];
    }
}

// Unrolls convolution windows: col[n][(c*KH + kh)*KW + kw][oh*OW + ow],
// zero where the window reads padding.
extern "C" __global__ void im2col_f32(const float* x, float* col, int N, int C,
                                      int H, int W, int KH, int KW, int SH,
                                      int SW, int PH, int PW, int DH, int DW,
                                      int OH, int OW) {
    unsigned long long n_total =
        (unsigned long long)N * C * KH * KW * OH * OW;
    GRID_LOOP(i, n_total) {
        unsigned long long t = i;
        int ow = (int)(t % OW); t /= OW;
        int oh = (int)(t % OH); t /= OH;
        int kw = (int)(t % KW); t /= KW;
        int kh = (int)(t % KH); t /= KH;
        int c = (int)(t % C);
        unsigned long long n = t / C;
        int ih = oh * SH - PH + kh * DH;
        int iw = ow * SW - PW + kw * DW;
        float v = 0.0f;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
            v = x[((n * C + c) * H + ih) * W + iw];
        }
        col[i] = v;
    }
}

// Direct grouped convolution (depthwise and other groups), bias included.
// x [N, C, H, W], w [M, C/G, KH, KW], y [N, M, OH, OW].
extern "C" __global__ void conv_grouped_f32(
    const float* x, const float* w, const float* bias, int has_bias, float* y,
    int N, int C, int H, int W, int M, int G, int KH, int KW, int SH, int SW,
    int PH, int PW, int DH, int DW, int OH, int OW) {
    int cg = C / G;
    int mg = M / G;
    unsigned long long n_total = (unsigned long long)N * M * OH * OW;
    GRID_LOOP(i, n_total) {
        unsigned long long t = i;
        int ow = (int)(t % OW); t /= OW;
        int oh = (int)(t % OH); t /= OH;
        int m = (int)(t % M);
        unsigned long long n = t / M;
        int g = m / mg;
        float acc = has_bias ? bias[m] : 0.0f;
        for (int ci = 0; ci < cg; ++ci) {
            const float* xp = x + (n * C + (unsigned long long)(g * cg + ci)) * H * W;
            const float* wp = w + ((unsigned long long)m * cg + ci) * KH * KW;
            for (int kh = 0; kh < KH; ++kh) {
                int ih = oh * SH - PH + kh * DH;
                if (ih < 0 || ih >= H) continue;
                for (int kw = 0; kw < KW; ++kw) {
                    int iw = ow * SW - PW + kw * DW;
                    if (iw < 0 || iw >= W) continue;
                    acc = fmaf(xp[ih * W + iw], wp[kh * KW + kw], acc);
                }
            }
        }
        y[i] = acc;
    }
}

// y[(n*C + c)*inner + j] += bias[c].
extern "C" __global__ void add_channel_f32(float* y, const float* bias,
                                           unsigned long long n, int C,
                                           unsigned long long inner) {
    GRID_LOOP(i, n) { y[i] += bias[(i / inner) % C]; }
}

// y = x * a[c] + b[c] (inference BatchNormalization, folded on the host).
extern "C" __global__ void affine_channel_f32(const float* x, float* y,
                                              unsigned long long n, int C,
                                              unsigned long long inner,
                                              const float* a, const float* b) {
    GRID_LOOP(i, n) {
        int c = (int)((i / inner) % C);
        y[i] = fmaf(x[i], a[c], b[c]);
    }
}

// 2-D max or average pooling over [NC, H, W] planes. Average windows are
// clipped to the padded input (count_include_pad) or to the input.
extern "C" __global__ void pool2d_f32(const float* x, float* y, int NC, int H,
                                      int W, int OH, int OW, int KH, int KW,
                                      int SH, int SW, int PH, int PW, int PHE,
                                      int PWE, int DH, int DW, int is_max,
                                      int count_include_pad) {
    unsigned long long n_total = (unsigned long long)NC * OH * OW;
    GRID_LOOP(i, n_total) {
        unsigned long long t = i;
        int ow = (int)(t % OW); t /= OW;
        int oh = (int)(t % OH);
        unsigned long long p = t / OH;
        const float* xp = x + p * H * W;
        int hs = oh * SH - PH;
        int ws = ow * SW - PW;
        if (is_max) {
            float m = NEG_INF;
            for (int kh = 0; kh < KH; ++kh) {
                int ih = hs + kh * DH;
                if (ih < 0 || ih >= H) continue;
                for (int kw = 0; kw < KW; ++kw) {
                    int iw = ws + kw * DW;
                    if (iw < 0 || iw >= W) continue;
                    float v = xp[ih * W + iw];
                    m = (v > m || v != v) ? v : m;
                }
            }
            y[i] = m;
        } else {
            int he = imin(hs + KH, H + PHE);
            int we = imin(ws + KW, W + PWE);
            int area = (he - hs) * (we - ws);
            int h0 = imax(hs, 0), w0 = imax(ws, 0);
            int h1 = imin(he, H), w1 = imin(we, W);
            float s = 0.0f;
            for (int ih = h0; ih < h1; ++ih)
                for (int iw = w0; iw < w1; ++iw) s += xp[ih * W + iw];
            int div = count_include_pad ? area : (h1 - h0) * (w1 - w0);
            y[i] = div > 0 ? s / (float)div : 0.0f;
        }
    }
}

// Mean of each contiguous row of `len` values: one warp per row.
extern "C" __global__ void row_mean_f32(const float* x, float* y,
                                        unsigned long long rows,
                                        unsigned long long len) {
    unsigned long long warp =
        (blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x) / 32;
    unsigned long long warps = (unsigned long long)gridDim.x * blockDim.x / 32;
    int lane = threadIdx.x % 32;
    for (unsigned long long r = warp; r < rows; r += warps) {
        const float* xp = x + r * len;
        float s = 0.0f;
        for (unsigned long long j = lane; j < len; j += 32) s += xp[j];
        for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) y[r] = s / (float)len;
    }
}

// Softmax along an axis of length `len`, with `inner` values after it.
extern "C" __global__ void softmax_f32(const float* x, float* y,
                                       unsigned long long outer,
                                       unsigned long long len,
                                       unsigned long long inner) {
    GRID_LOOP(i, outer * inner) {
        unsigned long long o = i / inner, k = i % inner;
        const float* xp = x + o * len * inner + k;
        float* yp = y + o * len * inner + k;
        float m = NEG_INF;
        for (unsigned long long j = 0; j < len; ++j) m = fmaxf(m, xp[j * inner]);
        float s = 0.0f;
        for (unsigned long long j = 0; j < len; ++j) {
            float e = expf(xp[j * inner] - m);
            yp[j * inner] = e;
            s += e;
        }
        for (unsigned long long j = 0; j < len; ++j) yp[j * inner] /= s;
    }
}

// QuantizeLinear (`quantize` set): round half to even of x / scale, plus
// the zero point, saturated to [lo, hi]. DequantizeLinear: (x - zero point)
// * scale. Channel c = (i / inner) % C (C = 1 per tensor).
extern "C" __global__ void linear8_f32(const float* x, float* y,
                                       unsigned long long n,
                                       const float* scale, const float* zp,
                                       int C, unsigned long long inner,
                                       int quantize, float lo, float hi) {
    GRID_LOOP(i, n) {
        int c = (int)((i / inner) % C);
        if (quantize) {
            float q = rintf(__fdiv_rn(x[i], scale[c])) + zp[c];
            y[i] = fminf(fmaxf(q, lo), hi);
        } else {
            y[i] = (x[i] - zp[c]) * scale[c];
        }
    }
}

// Floats as unsigned integers that order like the floats (negative values
// flipped), so one atomicMin/atomicMax tracks a signed minimum or maximum.
__device__ __forceinline__ unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
__device__ __forceinline__ unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }

__device__ __forceinline__ unsigned ordered(float v) {
    unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Calibration statistics of one tensor, folded into `out`: out[0] the bits
// of the largest |x| (non-negative floats order like their bits), out[1]
// the number of NaN or infinite values, out[2] and out[3] the smallest and
// largest value as `ordered` integers. The caller sets out to
// {0, 0, 0xffffffff, 0} first.
extern "C" __global__ void stats_f32(const float* x, unsigned long long n,
                                     unsigned* out) {
    unsigned amax = 0, bad = 0, lo = 0xffffffffu, hi = 0;
    GRID_LOOP(i, n) {
        float v = x[i];
        if ((__float_as_uint(v) & 0x7f800000u) != 0x7f800000u) {
            amax = umax(amax, __float_as_uint(fabsf(v)));
            unsigned o = ordered(v);
            lo = umin(lo, o);
            hi = umax(hi, o);
        } else {
            bad += 1;
        }
    }
    for (int o = 16; o > 0; o /= 2) {
        amax = umax(amax, __shfl_down_sync(0xffffffffu, amax, o));
        bad += __shfl_down_sync(0xffffffffu, bad, o);
        lo = umin(lo, __shfl_down_sync(0xffffffffu, lo, o));
        hi = umax(hi, __shfl_down_sync(0xffffffffu, hi, o));
    }
    if (threadIdx.x % 32 == 0) {
        atomicMax(&out[0], amax);
        if (bad) atomicAdd(&out[1], bad);
        atomicMin(&out[2], lo);
        atomicMax(&out[3], hi);
    }
}

// Histogram of |x| over [0, hi] into `bins` counts by the CPU's rule: bin
// min(|x| * inv, bins - 1) truncated, inv = bins / hi; clipped counts the
// values above hi. Bins are counted in shared memory per block (`bins`
// 32-bit counters of dynamic shared memory) when `shared` is set.
extern "C" __global__ void abs_hist_f32(const float* x, unsigned long long n,
                                        float inv, float hi, unsigned bins,
                                        unsigned long long* counts,
                                        unsigned long long* clipped,
                                        int shared) {
    extern __shared__ unsigned local[];
    if (shared) {
        for (unsigned b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
        __syncthreads();
    }
    float last = (float)(bins - 1);
    unsigned long long over = 0;
    GRID_LOOP(i, n) {
        float a = fabsf(x[i]);
        float t = fminf(a * inv, last);
        unsigned b = (t >= 0.0f && t < 16777216.0f) ? (unsigned)t : 0u;
        if (shared) {
            atomicAdd(&local[b], 1u);
        } else {
            atomicAdd(&counts[b], 1ull);
        }
        over += a > hi;
    }
    for (int o = 16; o > 0; o /= 2) over += __shfl_down_sync(0xffffffffu, over, o);
    if (threadIdx.x % 32 == 0 && over) atomicAdd(clipped, over);
    if (shared) {
        __syncthreads();
        for (unsigned b = threadIdx.x; b < bins; b += blockDim.x) {
            if (local[b]) atomicAdd(&counts[b], (unsigned long long)local[b]);
        }
    }
}
