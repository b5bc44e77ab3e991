//! moe-edge's tract operators and how a model binds them.
//!
//! A rewritten graph holds moe-edge nodes (`ai.moe_edge::MoeEdgeSparseMoe`, `MoeEdgeLinearQ8`,
//! `MoeEdgeEmbedding`)
//! whose `index` attribute names an entry of the model's [`OpTable`], assigned once at import
//! and kept by packs. tract's op builders are plain functions, so parsing makes an unbound slot
//! per node; [`OpTable::bind`] then puts the model's own op in each slot of the typed graph.
//! Two models in one process never see each other's layers.

mod embedding;
mod linear_q8;
mod slot;
mod sparse_moe;

use std::sync::Arc;

use tract_onnx::pb::GraphProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

pub(crate) use embedding::EmbeddingRows;
pub(crate) use linear_q8::Q8Linear;
pub(crate) use sparse_moe::{session_of, set_session_routing, SparseMoeOp};

use crate::moe::layer::MoeLayer;
use slot::{SlotKind, UnboundSlot};

/// The layers a model's moe-edge nodes stand for, by their `index` attribute.
#[derive(Debug, Default, Clone)]
pub(crate) struct OpTable {
    pub moe: Vec<Arc<MoeLayer>>,
    pub linear: Vec<Arc<Q8Linear>>,
    /// A pack's token embedding, read from its expert file.
    pub embedding: Option<Arc<EmbeddingRows>>,
}

impl OpTable {
    /// Checks that every entry has exactly one node in `graph` and every moe-edge node names an
    /// entry, and gives each node the shape attributes its slot needs to be parsed.
    pub fn annotate(&self, graph: &mut GraphProto) -> Result<(), String> {
        let linear: Vec<(usize, usize)> = self
            .linear
            .iter()
            .map(|l| (l.in_features, l.out_features))
            .collect();
        let embedding = self.embedding.as_ref().map(|e| e.hidden);
        crate::onnx::bind::annotate_nodes(graph, self.moe.len(), &linear, embedding)
    }

    /// Replaces every unbound slot of `model` by the op of its table entry.
    pub fn bind(&self, model: &mut TypedModel) -> TractResult<()> {
        for id in 0..model.nodes().len() {
            let Some(slot) = model.node(id).op_as::<UnboundSlot>().cloned() else {
                continue;
            };
            let op: Box<dyn TypedOp> = match slot.kind {
                SlotKind::Moe => Box::new(SparseMoeOp {
                    layer: self
                        .moe
                        .get(slot.index)
                        .context("MoE slot out of range")?
                        .clone(),
                }),
                SlotKind::Linear => Box::new(linear_q8::LinearQ8Op {
                    linear: self
                        .linear
                        .get(slot.index)
                        .context("linear slot out of range")?
                        .clone(),
                }),
                SlotKind::Embedding => Box::new(embedding::EmbeddingOp {
                    rows: self
                        .embedding
                        .clone()
                        .filter(|_| slot.index == 0)
                        .context("embedding slot out of range")?,
                }),
            };
            model.node_mut(id).op = op;
        }
        Ok(())
    }
}

/// Registers the builders of moe-edge's node types with a tract ONNX framework.
pub(crate) fn register(onnx: &mut tract_onnx::Onnx) {
    slot::register(onnx);
}
