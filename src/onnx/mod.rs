//! ONNX import: read the protobuf, find MoE blocks, replace each with one node of moe-edge's
//! sparse op (taking the expert weights out of the graph), and hand the rest to tract.

pub mod detect;
pub mod graph;
pub mod patterns;
pub mod refuse;
pub mod rewrite;
pub mod tensors;

pub use detect::{detect_blocks, BlockReport, DetectOptions, Detection, MatchedBlock};
pub use rewrite::{expert_like_consts, import_model, ImportedModel};

/// Custom-op type and domain of the sparse MoE node written into the rewritten graph.
pub const MOE_OP_TYPE: &str = "MoeEdgeSparseMoe";
pub const MOE_OP_DOMAIN: &str = "ai.moe_edge";
