//! ONNX import: read the protobuf, find MoE blocks with one importer per form
//! ([`forms`], dispatched by [`detect`]), load their weights ([`load`]), replace each with one
//! node of moe-edge's sparse op ([`rewrite`]), and hand the rest to tract. Every edit of an ONNX
//! graph lives here, including the packed model's graph ([`pack_graph`]) and the attributes that
//! tie moe-edge nodes to a model's op table ([`bind`]).

use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, NodeProto};

pub(crate) mod bind;
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
pub(crate) use graph::check_node_arity;
#[cfg(test)]
pub(crate) use rewrite::ImportedModel;
pub(crate) use rewrite::{import_graph, import_model};
pub(crate) use tensors::check_constant_tensors;

/// Domain of moe-edge's node types in rewritten graphs.
pub(crate) const MOE_OP_DOMAIN: &str = "ai.moe_edge";
/// The sparse MoE node type.
pub(crate) const MOE_OP_TYPE: &str = "MoeEdgeSparseMoe";
/// The int8 linear node type (`pack --dense int8`).
pub(crate) const LINEAR_OP_TYPE: &str = "MoeEdgeLinearQ8";
/// The token embedding node type of packs: rows read from the expert file.
pub(crate) const EMBEDDING_OP_TYPE: &str = "MoeEdgeEmbedding";
/// Attribute of moe-edge nodes: the entry of the model's op table the node stands for (the block's
/// ordinal among MoE blocks, the linear layer's among int8 linear layers), also its index in a
/// pack's manifest.
pub(crate) const INDEX_ATTR: &str = "index";

/// A moe-edge node of `op_type` computing `output` from `input`, standing for entry `index` of
/// the model's op table.
pub(crate) fn moe_edge_node(
    name: String,
    op_type: &str,
    input: &str,
    output: &str,
    index: usize,
) -> NodeProto {
    NodeProto {
        name,
        op_type: op_type.into(),
        domain: MOE_OP_DOMAIN.into(),
        input: vec![input.into()],
        output: vec![output.into()],
        attribute: vec![int_attr(INDEX_ATTR, index as i64)],
        ..Default::default()
    }
}

/// An integer attribute.
pub(crate) fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}
