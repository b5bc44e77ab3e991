//! The sparse MoE block as a tract operator: an ONNX custom op (`ai.moe_edge::MoeEdgeSparseMoe`)
//! that the rewritten graph contains once per MoE block, evaluated by [`MoeLayer::forward`].
//!
//! tract's op builders are plain function pointers, so the layer behind a node is found through
//! a process-wide registry keyed by the node's `moe_id` attribute (shared with the int8 dense
//! linear op of `dense_op`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::moe::forward::MoeLayer;
use crate::onnx::{MOE_OP_DOMAIN, MOE_OP_TYPE};

/// What a registered id stands for.
#[derive(Debug, Clone)]
pub enum Registered {
    Moe(Arc<MoeLayer>),
    Linear(Arc<crate::dense_op::Q8Linear>),
}

fn registry() -> &'static Mutex<HashMap<i64, Registered>> {
    static REGISTRY: OnceLock<Mutex<HashMap<i64, Registered>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Refuses a node that uses one of moe-edge's op types outside moe-edge's domain.
pub(crate) fn check_domain(node: &NodeProto) -> TractResult<()> {
    if node.domain != MOE_OP_DOMAIN {
        bail!(
            "node '{}': op {} of domain '{}' is not moe-edge's",
            node.name,
            node.op_type,
            node.domain
        );
    }
    Ok(())
}

/// Shape rules shared by moe-edge's ops: one f32 input, one f32 output.
pub(crate) fn f32_in_out_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, f32::datum_type())?;
    s.equals(&outputs[0].datum_type, f32::datum_type())?;
    Ok(())
}

/// The registered item behind `id`, for op builders.
pub(crate) fn lookup(node: &NodeProto) -> TractResult<Registered> {
    let id: i64 = node.get_attr("moe_id")?;
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned()
        .with_context(|| format!("node '{}': nothing registered under id {id}", node.name))
}

/// Keeps layers reachable by id while a rewritten graph may still be parsed; unregisters on drop.
#[derive(Debug)]
pub struct LayerRegistration {
    ids: Vec<i64>,
}

impl LayerRegistration {
    /// Registers MoE layers and returns their ids, in order.
    pub fn register(layers: &[Arc<MoeLayer>]) -> (Self, Vec<i64>) {
        Self::register_items(layers.iter().map(|l| Registered::Moe(l.clone())).collect())
    }

    /// Registers items and returns their ids, in order.
    pub fn register_items(items: Vec<Registered>) -> (Self, Vec<i64>) {
        static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
        let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<i64> = items
            .into_iter()
            .map(|item| {
                let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                map.insert(id, item);
                id
            })
            .collect();
        (LayerRegistration { ids: ids.clone() }, ids)
    }

    /// Adds the ids of another registration to this one (released together).
    pub fn absorb(&mut self, mut other: LayerRegistration) {
        self.ids.append(&mut std::mem::take(&mut other.ids));
    }
}

impl Drop for LayerRegistration {
    fn drop(&mut self) {
        let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.ids {
            map.remove(id);
        }
    }
}

/// Registers the sparse MoE op with a tract ONNX framework.
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert(MOE_OP_TYPE, build_from_onnx);
}

fn build_from_onnx(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    check_domain(node)?;
    let Registered::Moe(layer) = lookup(node)? else {
        bail!("node '{}': registered item is not an MoE layer", node.name)
    };
    Ok((expand(SparseMoeExpansion { layer }), vec![]))
}

/// Inference-time form of the op: shape rules, then wires [`SparseMoeOp`].
#[derive(Clone)]
struct SparseMoeExpansion {
    layer: Arc<MoeLayer>,
}

impl std::fmt::Debug for SparseMoeExpansion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SparseMoe(layer {})", self.layer.spec.layer)
    }
}

impl Expansion for SparseMoeExpansion {
    fn name(&self) -> StaticName {
        "SparseMoe".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        f32_in_out_rules(s, inputs, outputs)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(
            prefix,
            SparseMoeOp {
                layer: self.layer.clone(),
            },
            inputs,
        )
    }
}

/// The typed op: `x[..., hidden] -> y[..., hidden]`.
#[derive(Clone)]
pub struct SparseMoeOp {
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
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let hidden = self.layer.spec.hidden;
        ensure!(
            x.shape().last() == Some(&hidden),
            "SparseMoe layer {}: input shape {:?} does not end with hidden size {hidden}",
            self.layer.spec.layer,
            x.shape()
        );
        let data = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (y, _) = self.layer.forward(data)?;
        Ok(tvec!(Tensor::from_shape(x.shape(), &y)?.into_tvalue()))
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
