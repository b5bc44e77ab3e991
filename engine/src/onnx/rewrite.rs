//! Turns a detected ONNX graph into the graph tract runs: each MoE block becomes one sparse-op
//! node, the nodes only the block used are dropped, and the expert initializers leave the graph
//! (their weights now live in the expert store).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};
#[cfg(test)]
use tract_onnx::prelude::*;

use super::detect::{detect_blocks, DetectOptions};
use super::forms::{BlockDescription, BlockReport};
use super::graph::GraphIndex;
use super::load::load_layer;
use super::{moe_edge_node, LINEAR_OP_TYPE, MOE_OP_DOMAIN, MOE_OP_TYPE};
use crate::error::{Error, Result};
use crate::moe::layer::MoeLayer;

/// A model after import: the rewritten protobuf for tract, and the MoE layers its sparse-op
/// nodes name (node `index` i is `layers[i]`).
#[derive(Debug)]
pub(crate) struct ImportedModel {
    pub proto: ModelProto,
    pub blocks: Vec<BlockDescription>,
    pub layers: Vec<Arc<MoeLayer>>,
    pub fallbacks: Vec<BlockReport>,
    /// How many initializers left the graph (expert weights and what only the blocks used).
    pub removed_initializers: usize,
}

/// Reads an ONNX file and replaces its MoE blocks (unless `opts.literal`).
pub(crate) fn import_model(path: &Path, opts: DetectOptions) -> Result<ImportedModel> {
    let load_err = |reason: String| Error::ModelLoad {
        path: path.to_path_buf(),
        reason,
    };
    // read, not mapped: a file truncated by another process while it is decoded must give an
    // error, not SIGBUS (large weights live in external data files, read separately)
    let bytes = crate::files::read_regular(path, crate::files::ONNX_LIMIT)?;
    let mut proto = <ModelProto as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| load_err(format!("not a valid ONNX protobuf ({e})")))?;
    drop(bytes);
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| load_err("the file holds no graph".into()))?;
    if graph.node.is_empty() || graph.output.is_empty() {
        return Err(load_err(
            "the graph has no nodes or no outputs (truncated or not a model?)".into(),
        ));
    }
    super::tensors::check_constant_tensors(graph).map_err(|e| load_err(e.to_string()))?;
    super::graph::check_node_arity(graph).map_err(load_err)?;
    // a packed model's graph names experts that only its manifest and expert file describe
    if graph
        .node
        .iter()
        .any(|n| n.op_type == MOE_OP_TYPE || n.op_type == LINEAR_OP_TYPE)
    {
        let dir = path.parent().unwrap_or(Path::new("."));
        let manifest = dir.join(crate::pack::MANIFEST_FILE);
        let what = if manifest.is_file() {
            format!("load the pack's directory {}", dir.display())
        } else {
            format!("{} is missing", manifest.display())
        };
        return Err(load_err(format!(
            "this is the graph of a packed model (it has moe-edge's own nodes), which runs only \
             with its pack: {what}"
        )));
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
                .enumerate()
                .map(|(index, b)| load_layer(&g, b, index, dir).map(Arc::new))
                .collect::<Result<Vec<_>>>()?;
            (detection, layers)
        }
    };
    let graph = proto.graph.as_mut().expect("checked above");
    let removed_initializers = replace_blocks(graph, &detection.blocks);
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
        proto,
        blocks: detection.blocks,
        layers,
        fallbacks: detection.fallbacks,
        removed_initializers,
    })
}

/// Puts one sparse-op node in place of each block's output node (block i gets `index` i), then
/// drops dead nodes and unused initializers. Returns how many initializers were dropped.
fn replace_blocks(graph: &mut GraphProto, blocks: &[BlockDescription]) -> usize {
    if blocks.is_empty() {
        return 0;
    }
    for (index, b) in blocks.iter().enumerate() {
        let pos = graph
            .node
            .iter()
            .position(|n| n.output.contains(&b.output))
            .expect("block output has a producer");
        graph.node[pos] = moe_edge_node(
            format!("moe_edge/layer{}/sparse_moe", b.spec.layer),
            MOE_OP_TYPE,
            &b.input,
            &b.output,
            index,
        );
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
    let mut removed = HashSet::new();
    graph.initializer.retain(|t| {
        let used = live.contains(&t.name);
        if !used {
            removed.insert(t.name.clone());
        }
        used
    });
    graph.input.retain(|i| !removed.contains(&i.name));
    removed.len()
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

/// How many constants left in a tract model look like a stack of expert matrices of `blocks`.
#[cfg(test)]
pub(crate) fn expert_like_consts(model: &TypedModel, blocks: &[BlockDescription]) -> usize {
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
