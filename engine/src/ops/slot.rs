//! What the ONNX parser makes of a moe-edge node before the model binds it: shape rules from the
//! node's attributes, and a typed placeholder that refuses to run.

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::onnx::bind::{IN_FEATURES_ATTR, OUT_FEATURES_ATTR};
use crate::onnx::{EMBEDDING_OP_TYPE, INDEX_ATTR, LINEAR_OP_TYPE, MOE_OP_DOMAIN, MOE_OP_TYPE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum SlotKind {
    /// `x[..., hidden] -> y[..., hidden]`
    Moe,
    /// `x[..., in] -> y[..., out]`
    Linear,
    /// `ids[...]` (integers) -> `y[..., hidden]`
    Embedding,
}

pub(super) fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(MOE_OP_TYPE, build_moe);
    onnx.op_register.insert(LINEAR_OP_TYPE, build_linear);
    onnx.op_register.insert(EMBEDDING_OP_TYPE, build_embedding);
}

fn build_embedding(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    build(node, SlotKind::Embedding)
}

fn build_moe(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    build(node, SlotKind::Moe)
}

fn build_linear(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    build(node, SlotKind::Linear)
}

fn build(node: &NodeProto, kind: SlotKind) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if node.domain != MOE_OP_DOMAIN {
        bail!(
            "node '{}': op {} of domain '{}' is not moe-edge's",
            node.name,
            node.op_type,
            node.domain
        );
    }
    let index: i64 = node.get_attr(INDEX_ATTR)?;
    let features = match kind {
        SlotKind::Moe => None,
        SlotKind::Linear => Some((
            node.get_attr::<i64>(IN_FEATURES_ATTR)? as usize,
            node.get_attr::<i64>(OUT_FEATURES_ATTR)? as usize,
        )),
        SlotKind::Embedding => Some((0, node.get_attr::<i64>(OUT_FEATURES_ATTR)? as usize)),
    };
    let slot = UnboundSlot {
        kind,
        index: index as usize,
        features,
    };
    Ok((expand(slot), vec![]))
}

/// A moe-edge node before binding: knows its table index and output shape, cannot run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct UnboundSlot {
    pub(super) kind: SlotKind,
    pub(super) index: usize,
    /// `(in, out)` features of a linear slot; `(0, hidden)` of an embedding slot.
    features: Option<(usize, usize)>,
}

impl Expansion for UnboundSlot {
    fn name(&self) -> StaticName {
        "MoeEdgeSlot".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        if self.kind == SlotKind::Embedding {
            let hidden = self.features.map_or(0, |f| f.1);
            s.equals(&inputs[0].rank, outputs[0].rank.bex() - 1)?;
            return s.given(&inputs[0].rank, move |s, rank| {
                let rank = rank as usize;
                for i in 0..rank {
                    s.equals(&inputs[0].shape[i], &outputs[0].shape[i])?;
                }
                s.equals(&outputs[0].shape[rank], TDim::from(hidden as i64))
            });
        }
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        match self.features {
            None => s.equals(&inputs[0].shape, &outputs[0].shape),
            Some((inp, out)) => {
                s.equals(&inputs[0].rank, &outputs[0].rank)?;
                s.given(&inputs[0].rank, move |s, rank| {
                    let rank = rank as usize;
                    for i in 0..rank - 1 {
                        s.equals(&inputs[0].shape[i], &outputs[0].shape[i])?;
                    }
                    s.equals(&inputs[0].shape[rank - 1], TDim::from(inp as i64))?;
                    s.equals(&outputs[0].shape[rank - 1], TDim::from(out as i64))
                })
            }
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for UnboundSlot {
    fn name(&self) -> StaticName {
        "MoeEdgeSlot".into()
    }
    op_as_typed_op!();
}

impl EvalOp for UnboundSlot {
    not_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!(
            "moe-edge {:?} slot {} was not bound to a model",
            self.kind,
            self.index
        )
    }
}

impl TypedOp for UnboundSlot {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        if self.kind == SlotKind::Embedding {
            shape.push(self.features.map_or(0, |f| f.1).to_dim());
            return Ok(tvec!(f32::fact(shape)));
        }
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "moe-edge ops take f32 input"
        );
        if let Some((_, out)) = self.features {
            *shape.last_mut().context("linear input needs rank >= 1")? = out.to_dim();
        }
        Ok(tvec!(f32::fact(shape)))
    }
    as_op!();
}
