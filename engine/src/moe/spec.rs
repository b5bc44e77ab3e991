//! The common description of an MoE block, whatever form it was exported in: shapes, how router
//! scores become per-token (expert, weight) choices, the expert activation, and what else the
//! block has (router bias, expert biases, shared expert). Every importer under `onnx::forms`
//! produces it; the sparse op computes from it.

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
    /// sigmoid of every logit, then top-k of the scores, optionally renormalised to sum to one
    /// (DeepSeek-V3 / LFM2 style routers).
    SigmoidTopK { renormalize: bool },
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Routing::SoftmaxTopK { renormalize: true } => write!(f, "softmax->top-k->renormalize"),
            Routing::SoftmaxTopK { renormalize: false } => write!(f, "softmax->top-k"),
            Routing::TopKSoftmax => write!(f, "top-k->softmax"),
            Routing::SigmoidTopK { renormalize: true } => write!(f, "sigmoid->top-k->renormalize"),
            Routing::SigmoidTopK { renormalize: false } => write!(f, "sigmoid->top-k"),
        }
    }
}

/// Expert FFN activation, combining the gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    SiluGated,
    /// GPT-OSS's clamped SwiGLU: `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
    /// `(u + 1) * g * sigmoid(alpha * g)`.
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::SiluGated => write!(f, "silu-gated (SwiGLU)"),
            Activation::ClampedSwiGlu { alpha, limit } => {
                write!(f, "clamped SwiGLU (alpha {alpha}, limit {limit})")
            }
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
    /// Whether the router adds a bias to its logits.
    #[serde(default)]
    pub router_bias: bool,
    /// Whether the experts' projections have biases.
    #[serde(default)]
    pub expert_bias: bool,
}

impl MoeSpec {
    /// Bytes of routed expert weights at f32.
    pub fn expert_bytes_f32(&self) -> usize {
        self.experts * 3 * self.hidden * self.ffn * 4
    }
}
