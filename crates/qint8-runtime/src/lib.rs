//! CPU execution of qint8 graphs in FP32 and of QDQ graphs in INT8
//! (convolutions on integer kernels where the CPU has AVX-512 VNNI, see
//! [`kernels::int8`]; everything else simulated through
//! QuantizeLinear/DequantizeLinear).
//!
//! A [`Session`] simplifies the graph once (BatchNorm folding, constant
//! folding, Identity/Dropout removal) and compiles a [`plan`] per input
//! shape: shapes inferred, shape subgraphs folded to constants, weights
//! packed, Conv + activation and Sigmoid + Mul (SiLU) fused, and every
//! intermediate tensor given a place in one reusable arena (lifetimes
//! overlap only where values are live together). Kernels run on a rayon
//! pool of a configurable size. An [`Observer`] sees every tensor the plan
//! produces, by name: the base for calibration and per-layer analysis;
//! [`Session::record_split`] keeps all of them in place instead (a
//! [`Recording`]). [`grad::backward`] carries the gradient of an output
//! back to any activation from the values such a run recorded.
//!
//! ```no_run
//! use qint8_runtime::{Session, SessionOptions};
//! let model = qint8_graph::onnx::load("model.onnx")?;
//! let session = Session::new(&model, SessionOptions { threads: 2, ..Default::default() })?;
//! let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 1, 32, 32]));
//! let outputs = session.run(&[("input", x.view())])?;
//! println!("{:?}", outputs[0].shape());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod grad;
pub mod kernels;
pub mod plan;
mod session;

pub use error::{Result, RuntimeError};
pub use plan::{Plan, PlanStats};
pub use session::{Observer, Recording, Session, SessionOptions};
