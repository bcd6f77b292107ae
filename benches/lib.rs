//! Criterion benches for the qint8 workspace live in `benches/`; this
//! library holds what they share with the timing binaries.

use qint8_runtime::kernels::conv::{Conv2d, ConvGeom};
use qint8_runtime::kernels::Activation;

/// An ungrouped convolution on `n` square `hw x hw` images: `k x k`
/// window, stride `stride`, padding `pad` on every side, bias 0.1, fused
/// Relu, weights `[cout, cin, k, k]` (not packed yet).
pub fn square_conv(
    n: usize,
    (cin, cout): (usize, usize),
    hw: usize,
    (k, stride, pad): (usize, usize, usize),
    weights: Vec<f32>,
) -> Conv2d {
    let o = (hw + 2 * pad - k) / stride + 1;
    Conv2d {
        geom: ConvGeom {
            n,
            cin,
            ih: hw,
            iw: hw,
            cout,
            group: 1,
            kh: k,
            kw: k,
            stride: (stride, stride),
            dilation: (1, 1),
            pad: (pad, pad),
            oh: o,
            ow: o,
        },
        weight: std::sync::Arc::new(weights),
        bias: vec![0.1; cout],
        act: Activation::Relu,
        packed: Vec::new(),
        int8: None,
        winograd: None,
    }
}
