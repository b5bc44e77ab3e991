//! The sparse MoE block as a tract operator, evaluated by [`MoeLayer::forward`]. Its state
//! belongs to one session (one tract state): the routing observer and the position of the next
//! token, so that sessions sharing a model observe only their own tokens.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::moe::layer::{CallContext, MoeLayer};
use crate::moe::RoutingObserver;

/// The typed op: `x[..., hidden] -> y[..., hidden]`.
#[derive(Clone)]
pub(crate) struct SparseMoeOp {
    pub layer: Arc<MoeLayer>,
}

impl std::fmt::Debug for SparseMoeOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseMoe(layer {})", self.layer.spec.layer)
    }
}

impl PartialEq for SparseMoeOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.layer, &other.layer)
    }
}
impl Eq for SparseMoeOp {}

impl Op for SparseMoeOp {
    fn name(&self) -> StaticName {
        "SparseMoe".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let s = &self.layer.spec;
        Ok(vec![format!(
            "layer {}: {} experts, top-{}, {}",
            s.layer, s.experts, s.top_k, s.routing
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SparseMoeOp {
    not_out_of_plan!();

    fn state(&self, ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(MoeSessionState {
            session: Some(ctx.session),
            ..Default::default()
        })))
    }
}

impl TypedOp for SparseMoeOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "SparseMoe takes f32 input"
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// What one session keeps in each MoE node: who observes its routing and where it is in the
/// sequence.
#[derive(Clone, Default)]
pub(crate) struct MoeSessionState {
    observer: Option<Arc<dyn RoutingObserver>>,
    /// Position of the next token this node will see.
    position: usize,
    /// The tract session the state belongs to (see [`session_of`]).
    session: Option<SessionId>,
}

impl std::fmt::Debug for MoeSessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MoeSessionState(position {}, observer: {})",
            self.position,
            self.observer.is_some()
        )
    }
}

impl OpState for MoeSessionState {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<SparseMoeOp>()
            .context("MoE state attached to another op")?;
        let x = &inputs[0];
        let hidden = op.layer.spec.hidden;
        ensure!(
            x.shape().last() == Some(&hidden),
            "SparseMoe layer {}: input shape {:?} does not end with hidden size {hidden}",
            op.layer.spec.layer,
            x.shape()
        );
        // sessions run one sequence: the positions of this call are the rows of its last
        // sequence axis
        let rank = x.rank();
        let seq = if rank >= 2 { x.shape()[rank - 2] } else { 1 };
        let data = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let ctx = CallContext {
            observer: self.observer.as_deref(),
            first_position: self.position,
        };
        let y = op.layer.forward(data, ctx)?;
        self.position += seq;
        Ok(tvec!(Tensor::from_shape(x.shape(), &y)?.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        self.position = 0;
        Ok(())
    }
}

/// The tract session of a state, as its MoE nodes recorded it (`None` for a graph without one).
pub(crate) fn session_of(state: &TypedSimpleState) -> Option<SessionId> {
    state
        .op_states
        .iter()
        .flatten()
        .find_map(|s| s.downcast_ref::<MoeSessionState>())
        .and_then(|m| m.session)
}

/// Sets the routing observer and the position of the next token in every MoE node of a
/// session's tract state.
pub(crate) fn set_session_routing(
    state: &mut TypedSimpleState,
    observer: Option<&Arc<dyn RoutingObserver>>,
    position: usize,
) {
    for s in state.op_states.iter_mut().flatten() {
        if let Some(moe) = s.downcast_mut::<MoeSessionState>() {
            moe.observer = observer.cloned();
            moe.position = position;
        }
    }
}
