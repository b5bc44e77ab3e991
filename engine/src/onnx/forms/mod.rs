//! One importer per form in which exporters write MoE blocks, each producing the same
//! [`BlockDescription`]: where the router, the experts and the shared expert are in the graph,
//! and what the block computes ([`MoeSpec`]: routing, activation, biases). Loading the weights
//! (`onnx/load.rs`) and replacing the block (`onnx/rewrite.rs`) do not depend on the form.
//!
//! Today: R1 ([`r1_batched`], batched gathers of 3D expert weights). R2, `com.microsoft.MoE` /
//! `QMoE`, PhiMoE's sparsemixer and GPT-OSS come as further modules here.

pub(crate) mod r1_batched;

use serde::Serialize;

use super::patterns::LinearRef;
use crate::moe::MoeSpec;

/// A recognised block, whatever its form: what it computes and where its weights are.
#[derive(Debug, Clone)]
pub struct BlockDescription {
    pub spec: MoeSpec,
    /// Which form and dialect the block was exported in.
    pub form: &'static str,
    /// Name of the node the block was recognised from (R1: its TopK).
    pub anchor: String,
    /// Tensor holding the block input `[tokens, hidden]` (the router's input).
    pub input: String,
    /// Tensor the block computes, to be produced by the sparse op instead.
    pub output: String,
    pub router: LinearRef,
    /// Initializer `[experts]` added to the router logits.
    pub router_bias: Option<String>,
    pub experts: ExpertTensors,
    pub shared: Option<SharedRefs>,
}

/// Where the routed experts' weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTensors {
    /// Gate and up projections, `[experts, 2*ffn, hidden]` in one initializer laid out as
    /// `gate_up_layout` says.
    pub gate_up: String,
    pub gate_up_layout: GateUpLayout,
    /// Initializer `[experts, hidden, ffn]`.
    pub down: String,
    /// Initializers `[experts, 2*ffn]` (same layout as `gate_up`) and `[experts, hidden]`.
    pub bias: Option<ExpertBiasTensors>,
}

/// How the rows of a fused gate/up weight alternate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpLayout {
    /// `ffn` gate rows, then `ffn` up rows (transformers' `gate_up_proj`).
    GateFirst,
    /// `ffn` up rows, then `ffn` gate rows.
    UpFirst,
    /// gate and up rows alternate, gate first (GPT-OSS, onnxruntime's `swiglu_fusion=1`).
    /// Loaded by [`super::load`]; the importers of those forms will produce it.
    #[allow(dead_code)]
    Interleaved,
}

/// Initializers of the experts' biases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertBiasTensors {
    pub gate_up: String,
    pub down: String,
}

/// Weight references of a shared expert (`sigmoid(gate(x)) * down(silu(gate_proj(x)) * up_proj(x))`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRefs {
    pub gate_proj: LinearRef,
    pub up_proj: LinearRef,
    pub down_proj: LinearRef,
    pub gate: LinearRef,
}

/// A block that looks like MoE but was not understood: refused, or run literally in tract
/// (`--dense-fallback`).
#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    pub node: String,
    pub layer: Option<usize>,
    pub reason: String,
}

/// What one form's importer found: recognised blocks, and blocks it could not take.
#[derive(Debug, Default)]
pub(crate) struct FormScan {
    pub blocks: Vec<BlockDescription>,
    pub refusals: Vec<BlockReport>,
}
