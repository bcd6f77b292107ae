//! Quantization arithmetic for qint8.
//!
//! - [`params`]: int8/uint8, symmetric/affine, narrow range, per-tensor and
//!   per-channel [`QuantParams`], built from ranges with every edge handled.
//! - [`quant`]: quantize / dequantize / fake-quantize slices and ndarray
//!   views (round half to even, saturating), fast kernels chosen at run time
//!   ([`kernels`]) with scalar references ([`reference`](mod@reference)).
//! - [`requant`]: i32 accumulator to int8 with per-channel multipliers.
//! - [`grad`]: straight-through and LSQ backward passes for QAT.
//! - [`histogram`] and [`search`]: streaming histograms and range search
//!   (max, percentile, entropy as TensorRT does it, MSE).
//! - [`metrics`]: SQNR, cosine similarity, max abs error, KL divergence.
//! - [`stats`]: global and per-channel ranges with non-finite detection.
//!
//! ```
//! use qint8_math::prelude::*;
//!
//! // TensorRT-style per-channel weights: int8, symmetric, [-127, 127], axis 0.
//! let w = [0.5f32, -1.0, 0.25, 2.0, -4.0, 1.0];
//! let shape = [2, 3];
//! let amax = amax_per_channel(&w, &shape, 0)?;
//! let params = QuantParams::symmetric_per_channel(&amax, 0, QuantDtype::Int8, true)?;
//! let q: Vec<i8> = quantize(&w, &shape, &params)?;
//! assert_eq!(q, vec![64, -127, 32, 64, -127, 32]);
//!
//! // Activation range from a histogram with TensorRT's entropy method.
//! let mut h = Histogram::dynamic_abs(DEFAULT_BINS)?;
//! h.add(&[0.0, 0.5, 1.0, 1.5, 8.0])?;
//! let amax = search_amax(&h, &RangeMethod::entropy())?;
//! assert!(amax > 0.0 && amax <= 8.0);
//! # Ok::<(), qint8_math::MathError>(())
//! ```

pub mod error;
pub mod grad;
pub mod histogram;
pub mod kernels;
pub mod metrics;
pub mod params;
pub mod quant;
pub mod reference;
pub mod requant;
pub mod search;
pub mod stats;

pub use error::{MathError, Result};
pub use params::{ChannelParams, Granularity, QuantDtype, QuantInt, QuantParams, QuantScheme};

/// The commonly used items in one import.
pub mod prelude {
    pub use crate::error::{MathError, Result};
    pub use crate::histogram::{Histogram, HistogramKind, DEFAULT_BINS};
    pub use crate::kernels::SimdLevel;
    pub use crate::metrics::{cosine_similarity, kl_divergence, max_abs_error, sqnr_db};
    pub use crate::params::{
        ChannelParams, Granularity, QuantDtype, QuantInt, QuantParams, QuantScheme,
    };
    pub use crate::quant::{
        dequantize, dequantize_array, dequantize_into, fake_quant, fake_quant_array,
        fake_quant_into, quantize, quantize_array, quantize_into,
    };
    pub use crate::search::{search_amax, search_min_max, EntropyVariant, RangeMethod};
    pub use crate::stats::{amax_per_channel, min_max, min_max_per_channel};
}
