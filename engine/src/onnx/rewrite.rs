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

/// Reads an ONNX file and replaces its MoE blocks (unless `opts.literal`), with every block's
/// weights loaded into its layer.
pub(crate) fn import_model(path: &Path, opts: DetectOptions) -> Result<ImportedModel> {
    let (mut imported, weights) = import_graph(path, opts)?;
    let g = weights.index();
    imported.layers = imported
        .blocks
        .iter()
        .enumerate()
        .map(|(index, b)| load_layer(&g, b, index, weights.dir()).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    Ok(imported)
}

/// The initializers the replaced blocks' weights are in, taken out of the graph (and the
/// model's directory, for external data): read a block, or an expert, at a time with
/// [`super::load::BlockWeights`].
#[derive(Debug)]
pub(crate) struct BlockInitializers {
    graph: GraphProto,
    dir: Option<std::path::PathBuf>,
}

impl BlockInitializers {
    pub(crate) fn index(&self) -> GraphIndex<'_> {
        GraphIndex::new(&self.graph)
    }

    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// [`import_model`] without loading the blocks' weights: the rewritten graph (`layers` is
/// empty) and the initializers the blocks' weights are in.
pub(crate) fn import_graph(
    path: &Path,
    opts: DetectOptions,
) -> Result<(ImportedModel, BlockInitializers)> {
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

    let detection = if opts.literal {
        Default::default()
    } else {
        detect_blocks(&GraphIndex::new(graph), opts)?
    };
    let used: HashSet<String> = detection
        .blocks
        .iter()
        .flat_map(block_initializers)
        .collect();
    let graph = proto.graph.as_mut().expect("checked above");
    let removed = replace_blocks(graph, &detection.blocks);
    let removed_initializers = removed.len();
    // the blocks' weights: those that left the graph move, those it still uses are copied
    let mut kept: Vec<_> = removed
        .into_iter()
        .filter(|t| used.contains(&t.name))
        .collect();
    kept.extend(
        graph
            .initializer
            .iter()
            .filter(|t| used.contains(&t.name))
            .cloned(),
    );
    let weights = BlockInitializers {
        graph: GraphProto {
            initializer: kept,
            ..Default::default()
        },
        dir: dir.map(Path::to_path_buf),
    };
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
    Ok((
        ImportedModel {
            proto,
            blocks: detection.blocks,
            layers: vec![],
            fallbacks: detection.fallbacks,
            removed_initializers,
        },
        weights,
    ))
}

/// Names of the initializers a block's weights are read from.
fn block_initializers(b: &BlockDescription) -> Vec<String> {
    let t = &b.experts;
    let mut names = vec![b.router.weight.clone(), t.gate_up.clone(), t.down.clone()];
    names.extend(b.router_bias.iter().cloned());
    if let Some(bt) = &t.bias {
        names.extend([bt.gate_up.clone(), bt.down.clone()]);
    }
    if let Some(r) = &b.shared {
        for l in [&r.gate_proj, &r.up_proj, &r.down_proj, &r.gate] {
            names.push(l.weight.clone());
        }
    }
    names
}

/// Puts one sparse-op node in place of each block's output node (block i gets `index` i), then
/// drops dead nodes and unused initializers. Returns the initializers dropped.
fn replace_blocks(
    graph: &mut GraphProto,
    blocks: &[BlockDescription],
) -> Vec<tract_onnx::pb::TensorProto> {
    if blocks.is_empty() {
        return vec![];
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
    let (kept, removed): (Vec<_>, Vec<_>) = std::mem::take(&mut graph.initializer)
        .into_iter()
        .partition(|t| live.contains(&t.name));
    graph.initializer = kept;
    let names: HashSet<&str> = removed.iter().map(|t| t.name.as_str()).collect();
    graph.input.retain(|i| !names.contains(i.name.as_str()));
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
