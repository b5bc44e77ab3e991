//! Turns a detected ONNX graph into the graph tract runs: each MoE block becomes one sparse-op
//! node, the nodes only the block used are dropped, and the expert initializers leave the graph
//! (their weights now live in the expert store).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::pb::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto,
};
use tract_onnx::prelude::*;

use super::detect::{detect_blocks, BlockReport, DetectOptions, MatchedBlock};
use super::graph::GraphIndex;
use super::tensors::{load_f32, load_linear_out_in};
use super::{MOE_OP_DOMAIN, MOE_OP_TYPE};
use crate::error::{Error, Result};
use crate::moe::forward::MoeLayer;
use crate::moe::store::{DenseExpert, F32ExpertStore, SharedExpert};
use crate::sparse_op::LayerRegistration;

/// A model after import: the rewritten protobuf for tract, and the MoE layers it refers to.
#[derive(Debug)]
pub struct ImportedModel {
    pub path: PathBuf,
    pub proto: ModelProto,
    pub blocks: Vec<MatchedBlock>,
    pub layers: Vec<Arc<MoeLayer>>,
    /// Registry id of each layer (the `moe_id` attribute of its node).
    pub layer_ids: Vec<i64>,
    pub fallbacks: Vec<BlockReport>,
    /// Initializers removed from the graph (expert weights and what only the blocks used).
    pub removed_initializers: Vec<String>,
    _registration: LayerRegistration,
}

impl ImportedModel {
    /// A model whose graph already refers to `layers` through `moe_id` attributes equal to
    /// `layer_ids` (as registered by the caller).
    pub(crate) fn from_parts(
        path: PathBuf,
        proto: ModelProto,
        layers: Vec<Arc<MoeLayer>>,
        layer_ids: Vec<i64>,
        registration: LayerRegistration,
    ) -> Self {
        ImportedModel {
            path,
            proto,
            blocks: vec![],
            layers,
            layer_ids,
            fallbacks: vec![],
            removed_initializers: vec![],
            _registration: registration,
        }
    }

    /// Directory that external data is resolved against.
    pub fn dir(&self) -> Option<&Path> {
        self.path.parent()
    }
}

/// Reads an ONNX file and replaces its MoE blocks (unless `opts.literal`).
pub fn import_model(path: &Path, opts: DetectOptions) -> Result<ImportedModel> {
    let load_err = |reason: String| Error::ModelLoad {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    // SAFETY: the mapping is read-only and only used to decode the protobuf, which copies what
    // it keeps; it is dropped before this function returns. (A file truncated by another process
    // while being decoded could fault; model files are not expected to change under a reader.)
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(Error::io(path))?;
    let mut proto = <ModelProto as prost::Message>::decode(&map[..])
        .map_err(|e| load_err(format!("not a valid ONNX protobuf ({e})")))?;
    drop(map);
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| load_err("the file holds no graph".into()))?;
    if graph.node.is_empty() || graph.output.is_empty() {
        return Err(load_err(
            "the graph has no nodes or no outputs (truncated or not a model?)".into(),
        ));
    }
    let dir = path.parent();

    let (detection, layers) = {
        let g = GraphIndex::new(graph);
        if opts.literal {
            (Default::default(), vec![])
        } else {
            let detection = detect_blocks(&g, opts)?;
            let layers = detection
                .blocks
                .iter()
                .map(|b| build_layer(&g, b, dir).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            (detection, layers)
        }
    };
    let (registration, ids) = LayerRegistration::register(&layers);
    let graph = proto.graph.as_mut().expect("checked above");
    let removed = replace_blocks(graph, &detection.blocks, &ids);
    if !detection.blocks.is_empty() {
        proto.opset_import.push(OperatorSetIdProto {
            domain: MOE_OP_DOMAIN.into(),
            version: 1,
        });
    }
    for b in &detection.blocks {
        log::info!(
            "layer {}: {} with {} experts, top-{}, {} -> sparse op{}",
            b.spec.layer,
            b.form,
            b.spec.experts,
            b.spec.top_k,
            b.spec.routing,
            if b.shared.is_some() {
                " (with shared expert)"
            } else {
                ""
            }
        );
    }
    Ok(ImportedModel {
        path: path.to_path_buf(),
        proto,
        blocks: detection.blocks,
        layers,
        layer_ids: ids,
        fallbacks: detection.fallbacks,
        removed_initializers: removed,
        _registration: registration,
    })
}

/// Loads a matched block's weights into an f32 in-memory layer.
fn build_layer(g: &GraphIndex, b: &MatchedBlock, dir: Option<&Path>) -> Result<MoeLayer> {
    let s = &b.spec;
    let (h, f) = (s.hidden, s.ffn);
    let router = load_linear_out_in(g, &b.router, dir)?;
    let (_, gate_up) = load_f32(g, &b.gate_up, dir)?;
    let (_, down) = load_f32(g, &b.down, dir)?;
    let experts = (0..s.experts)
        .map(|e| {
            let gu = &gate_up[e * 2 * f * h..(e + 1) * 2 * f * h];
            let (first, second) = gu.split_at(f * h);
            let (gate, up) = if b.gate_first {
                (first, second)
            } else {
                (second, first)
            };
            DenseExpert::new(
                h,
                f,
                gate.to_vec(),
                up.to_vec(),
                down[e * h * f..(e + 1) * h * f].to_vec(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let shared = match &b.shared {
        Some(r) => {
            let sf = r.gate_proj.out_features();
            Some(SharedExpert {
                ffn: DenseExpert::new(
                    h,
                    sf,
                    load_linear_out_in(g, &r.gate_proj, dir)?,
                    load_linear_out_in(g, &r.up_proj, dir)?,
                    load_linear_out_in(g, &r.down_proj, dir)?,
                )?,
                gate: load_linear_out_in(g, &r.gate, dir)?,
            })
        }
        None => None,
    };
    MoeLayer::new(
        s.clone(),
        router,
        Arc::new(F32ExpertStore::new(experts)),
        shared,
    )
}

/// Puts one sparse-op node in place of each block's output node, drops dead nodes and unused
/// initializers. Returns the names of the removed initializers.
fn replace_blocks(graph: &mut GraphProto, blocks: &[MatchedBlock], ids: &[i64]) -> Vec<String> {
    if blocks.is_empty() {
        return vec![];
    }
    for (b, &id) in blocks.iter().zip(ids) {
        let pos = graph
            .node
            .iter()
            .position(|n| n.output.contains(&b.output))
            .expect("block output has a producer");
        graph.node[pos] = NodeProto {
            name: format!("moe_edge/layer{}/sparse_moe", b.spec.layer),
            op_type: MOE_OP_TYPE.into(),
            domain: MOE_OP_DOMAIN.into(),
            input: vec![b.input.clone()],
            output: vec![b.output.clone()],
            attribute: vec![AttributeProto {
                name: "moe_id".into(),
                r#type: AttributeType::Int as i32,
                i: id,
                ..Default::default()
            }],
            ..Default::default()
        };
    }
    // dead-node elimination, outputs backwards (ONNX nodes are topologically sorted)
    let mut live: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
            for a in &node.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    collect_subgraph_inputs(sub, &mut live);
                }
            }
        }
    }
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap());
    let mut removed = vec![];
    graph.initializer.retain(|t| {
        let used = live.contains(&t.name);
        if !used {
            removed.push(t.name.clone());
        }
        used
    });
    let removed_set: HashSet<&String> = removed.iter().collect();
    graph.input.retain(|i| !removed_set.contains(&i.name));
    removed
}

fn collect_subgraph_inputs(g: &GraphProto, live: &mut HashSet<String>) {
    for n in &g.node {
        live.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                collect_subgraph_inputs(sub, live);
            }
        }
    }
}

/// Whether any constant left in a tract model looks like a stack of expert matrices of `blocks`.
pub fn expert_like_consts(model: &TypedModel, blocks: &[MatchedBlock]) -> usize {
    let shapes: HashSet<Vec<usize>> = blocks
        .iter()
        .flat_map(|b| {
            let s = &b.spec;
            [
                vec![s.experts, 2 * s.ffn, s.hidden],
                vec![s.experts, s.hidden, s.ffn],
            ]
        })
        .collect();
    model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .filter(|c| shapes.contains(c.val().shape()))
        .count()
}
