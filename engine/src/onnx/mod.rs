//! ONNX import: read the protobuf, find MoE blocks with one importer per form
//! ([`forms`], dispatched by [`detect`]), load their weights ([`load`]), replace each with one
//! node of moe-edge's sparse op ([`rewrite`]), and hand the rest to tract. Every edit of an ONNX
//! graph lives here, including the packed model's graph ([`pack_graph`]).

pub(crate) mod detect;
pub(crate) mod forms;
pub(crate) mod graph;
pub(crate) mod load;
pub(crate) mod pack_graph;
pub(crate) mod patterns;
pub(crate) mod refuse;
pub(crate) mod rewrite;
pub(crate) mod tensors;

pub(crate) use detect::DetectOptions;
pub(crate) use rewrite::import_model;
#[cfg(test)]
pub(crate) use rewrite::ImportedModel;

/// Domain of moe-edge's node types in rewritten graphs.
pub(crate) const MOE_OP_DOMAIN: &str = "ai.moe_edge";
/// The sparse MoE node type.
pub(crate) const MOE_OP_TYPE: &str = "MoeEdgeSparseMoe";
/// The int8 linear node type (`pack --dense int8`).
pub(crate) const LINEAR_OP_TYPE: &str = "MoeEdgeLinearQ8";
/// Attribute of moe-edge nodes: the entry of the model's op table the node stands for (the block's
/// ordinal among MoE blocks, the linear layer's among int8 linear layers), also its index in a
/// pack's manifest.
pub(crate) const INDEX_ATTR: &str = "index";
