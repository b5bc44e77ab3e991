//! moe-edge's engine: run Mixture-of-Experts ONNX language models on small devices.
//!
//! A model is loaded from an ONNX export (or a packed model directory). Each MoE block of the
//! graph is recognised by an importer of its form and replaced by one node of moe-edge's sparse
//! MoE op, so that only the experts the router selects run; everything else runs in tract.
//!
//! The public API is small:
//! - [`Model`]: the graph, its op table, expert store, tokenizer, chat template and config;
//!   loaded with [`LoadOptions`].
//! - [`Session`]: one sequence and its KV cache (feed, truncate, reset, context limit), with an
//!   optional [`RoutingObserver`] that sees every routing decision.
//! - [`Generator`]: sampling, stop tokens and strings, streaming (iterator or callback),
//!   cancellation from another thread ([`CancelHandle`]), incremental text decoding.
//! - [`pack`]: writing packed models (int8 experts read on demand through a byte-budget cache).
//! - [`configure_threads`]: the one thread pool the experts and tract's matrix products share.
//! - [`Error`]: what went wrong, with the file, node, layer or expert it concerns.
//!
//! ```no_run
//! use moe_edge_engine::{Flow, GenerateParams, Generator, LoadOptions, Model};
//!
//! let model = Model::load("models/tiny-mixtral".as_ref(), LoadOptions::default())?;
//! let prompt = model.tokenizer().expect("tokenizer.json").encode("t10 t20 t30")?;
//! let mut generator = Generator::new(&model, GenerateParams::for_model(&model, 32))?;
//! let out = generator.generate(&prompt, |step| {
//!     print!("{}", step.text);
//!     Flow::Continue
//! })?;
//! println!("\n{} tokens, {:?}", out.generated_ids.len(), out.stop_reason);
//! # Ok::<(), moe_edge_engine::Error>(())
//! ```

mod chat;
mod config;
mod durable;
mod error;
mod files;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod generate;
mod guard;
mod model;
mod moe;
mod onnx;
mod ops;
pub mod pack;
mod sampling;
mod session;
mod threads;
mod tokenizer;

#[cfg(test)]
#[path = "../../tests/common/fixtures.rs"]
mod test_support;

pub use chat::{ChatMessage, ChatTemplate, Conversation};
pub use config::ModelConfig;
pub use durable::{persist, sync_dir, PartialFile};
pub use error::{Error, Result};
pub use generate::{
    CancelHandle, Flow, GenerateParams, Generation, Generator, Step, Steps, StopReason,
};
pub use guard::panic_is_caught;
pub use model::{BlockInfo, Footprint, LoadOptions, Model, RoutingStats};
pub use moe::{
    Activation, AdaptiveTopK, ExpertMask, Keep, LabelledUsage, LayerUsage, MoeSpec,
    ProfileRecorder, ProfiledLayer, Ratio, RoutedTokens, Routing, RoutingObserver, RoutingProfile,
    Usage,
};
pub use onnx::forms::BlockReport;
pub use sampling::{Sampler, SamplingParams};
pub use session::Session;
pub use threads::{configure_threads, pool_threads, tract_threads};
pub use tokenizer::{TextStream, Tokenizer};

/// The int8 kernels (a crate of their own: they know nothing about models).
pub use moe_edge_kernels as kernels;
