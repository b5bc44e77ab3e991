//! What an MoE block computes, as extracted from the graph.

use serde::{Deserialize, Serialize};

/// How router logits become (expert, weight) pairs for each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// softmax over all experts, then top-k of the probabilities; with `renormalize` the k
    /// weights are divided by their sum (Mixtral, Qwen3) and otherwise used as they are (OLMoE, Qwen2).
    SoftmaxTopK { renormalize: bool },
    /// top-k of the raw logits, then softmax over the k selected logits (GraniteMoe).
    TopKSoftmax,
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Routing::SoftmaxTopK { renormalize: true } => write!(f, "softmax->top-k->renormalize"),
            Routing::SoftmaxTopK { renormalize: false } => write!(f, "softmax->top-k"),
            Routing::TopKSoftmax => write!(f, "top-k->softmax"),
        }
    }
}

/// Expert FFN activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`
    SiluGated,
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::SiluGated => write!(f, "silu-gated (SwiGLU)"),
        }
    }
}

/// Shape and semantics of one MoE block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeSpec {
    /// Model layer the block belongs to (from tensor names where available, else the block's ordinal).
    pub layer: usize,
    /// Hidden size (input and output width).
    pub hidden: usize,
    /// Expert FFN inner width.
    pub ffn: usize,
    /// Number of routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    pub routing: Routing,
    pub activation: Activation,
    /// Inner width of the always-on shared expert, if the block has one.
    pub shared_ffn: Option<usize>,
}

impl MoeSpec {
    /// Bytes of routed expert weights at f32.
    pub fn expert_bytes_f32(&self) -> usize {
        self.experts * 3 * self.hidden * self.ffn * 4
    }
}
