//! The qint8 model: ONNX load and save (with external data), a typed graph
//! IR, shape inference with constant propagation, graph passes, and a model
//! zoo of torchvision topologies.
//!
//! ```no_run
//! let mut model = qint8_graph::onnx::load("model.onnx")?;
//! qint8_graph::passes::simplify(&mut model.graph)?;
//! println!("{} nodes, {} parameters", model.graph.nodes.len(), model.graph.parameter_count());
//! # Ok::<(), qint8_graph::GraphError>(())
//! ```

pub mod atomic;
pub mod error;
pub mod ir;
pub mod onnx;
pub mod ops;
pub mod passes;
pub mod proto;
pub mod quant;
pub mod shape;
pub mod tensor;
pub mod zoo;

pub use error::{GraphError, Result, UnsupportedOp};
pub use ir::{Dim, Graph, Model, Node, ValueInfo};
pub use ops::{AutoPad, ConvAttrs, Op, PadMode, PoolAttrs};
pub use quant::{placement, Placement, PlacementPolicy, Precision, QuantPlan, WeightStorage};
pub use tensor::{DataType, Tensor};
