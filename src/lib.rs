//! moe-edge: run Mixture-of-Experts ONNX language models on small devices.
//!
//! The ONNX graph is read through tract; each MoE block is found ([`onnx::detect`]) and replaced
//! by one node of moe-edge's sparse MoE op ([`sparse_op`], computing with [`moe`]), so that only
//! the experts the router selects run. Everything else runs in tract. [`session`] and
//! [`generate`] turn the model into a text generator with a KV cache.

pub mod config;
pub mod dense_op;
pub mod error;
pub mod generate;
pub mod model;
pub mod moe;
pub mod onnx;
pub mod pack;
pub mod procstats;
pub mod sampling;
pub mod session;
pub mod sparse_op;
pub mod text;
pub mod threads;

pub use error::{Error, Result};
pub use generate::{generate, GenerateParams, Generation};
pub use model::{LoadOptions, Model};
/// The int8 kernels (a crate of their own: they know nothing about models).
pub use moe_edge_kernels as kernels;
pub use sampling::SamplingParams;
pub use session::Session;

/// Ensures tract-transformers (whose model transforms register themselves at link time) is
/// linked into every binary using this crate.
#[doc(hidden)]
pub fn link_tract_transformers() -> fn(&mut tract_transformers::ops::dyn_kv_cache::DynKeyValueCache)
{
    |_| {}
}
