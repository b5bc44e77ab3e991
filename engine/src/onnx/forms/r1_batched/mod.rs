//! Form R1: router -> TopK -> gather of 3D expert weights -> batched MatMul -> weighted
//! ReduceSum over k, in the legacy (`Gather/OneHot/Tile/Flatten`), dynamo (`GatherND/Expand/Gemm`)
//! and transformers-exporter (`GatherND/Tile`) dialects. Detection is structural and
//! conservative: every assumption is checked on the graph ([`matcher`]), and a block that looks
//! like MoE but is not fully understood is reported with the reason.

mod matcher;

use std::collections::{HashSet, VecDeque};

use tract_onnx::pb::NodeProto;

use super::{BlockReport, FormScan};
use crate::onnx::graph::{layer_in_name, GraphIndex};
use crate::onnx::patterns::linear_of;
use matcher::BlockMatcher;

/// Finds every R1 block of the graph, and every expert gather it cannot explain.
pub(crate) fn scan(g: &GraphIndex) -> FormScan {
    let mut scan = FormScan::default();
    let mut claimed: HashSet<String> = HashSet::new();
    let mut failures: Vec<(HashSet<String>, BlockReport)> = vec![];
    for (i, node) in g.graph.node.iter().enumerate() {
        if node.op_type != "TopK" || !node.domain.is_empty() {
            continue;
        }
        let gathers = expert_gathers_from(g, &node.output[1]);
        if gathers.is_empty() {
            if is_router_topk(g, node) {
                failures.push((
                    HashSet::new(),
                    BlockReport {
                        node: node.name.clone(),
                        layer: layer_in_name(&node.name),
                        reason: "a router (linear -> TopK) selects experts that are not computed in a recognised form \
                                 (e.g. R2, grouped_mm unrolled per expert, is not supported yet); \
                                 export with experts_implementation=\"batched_mm\""
                            .into(),
                    },
                ));
            }
            continue; // any other TopK is not an MoE router
        }
        let gather_names: HashSet<String> =
            gathers.iter().map(|&j| g.node(j).name.clone()).collect();
        match BlockMatcher::new(g, i).and_then(|m| m.run(&gathers)) {
            Ok(mut block) => {
                let ordinal = scan.blocks.len();
                block.spec.layer = [&block.router.weight, &block.experts.gate_up, &node.name]
                    .iter()
                    .find_map(|n| layer_in_name(n))
                    .unwrap_or(ordinal);
                claimed.extend(gather_names);
                scan.blocks.push(block);
            }
            Err(reason) => {
                let layer = layer_in_name(&node.name)
                    .or_else(|| gathers.iter().find_map(|&j| gather_layer(g, j)));
                failures.push((
                    gather_names,
                    BlockReport {
                        node: node.name.clone(),
                        layer,
                        reason,
                    },
                ));
            }
        }
    }
    // every gather of 3D expert weights must belong to a recognised block
    let mut refusals: Vec<BlockReport> = failures.iter().map(|(_, r)| r.clone()).collect();
    let explained: HashSet<String> = failures
        .iter()
        .flat_map(|(n, _)| n.iter().cloned())
        .collect();
    for (j, node) in g.graph.node.iter().enumerate() {
        if is_expert_gather(g, node)
            && !claimed.contains(&node.name)
            && !explained.contains(&node.name)
        {
            refusals.push(BlockReport {
                node: node.name.clone(),
                layer: gather_layer(g, j),
                reason: format!(
                    "expert weights '{}' are gathered by indices that do not come from a TopK router \
                     (routing not understood, e.g. PhiMoE's sparsemixer)",
                    node.input[0]
                ),
            });
        }
    }
    scan.refusals = refusals;
    scan
}

/// Whether a TopK ranks the output of a linear layer by a constant weight (optionally softmaxed).
fn is_router_topk(g: &GraphIndex, topk: &NodeProto) -> bool {
    let mut t = g.peel(&topk.input[0], &["Cast"]);
    if let Some(sm) = g.produced_by(t, "Softmax") {
        t = g.peel(&sm.input[0], &["Cast"]);
    }
    linear_of(g, t).is_some()
}

fn gather_layer(g: &GraphIndex, j: usize) -> Option<usize> {
    let n = g.node(j);
    layer_in_name(&n.name).or_else(|| layer_in_name(&n.input[0]))
}

/// A Gather/GatherND reading rows of a rank-3 initializer with computed indices.
pub(crate) fn is_expert_gather(g: &GraphIndex, node: &NodeProto) -> bool {
    matches!(node.op_type.as_str(), "Gather" | "GatherND")
        && node.domain.is_empty()
        && node.input.len() == 2
        && g.initializer(&node.input[0])
            .map(|t| t.dims.len() == 3)
            .unwrap_or(false)
        && g.constant(&node.input[1]).is_none()
}

/// Expert gathers reached from `indices` through index reshaping ops.
fn expert_gathers_from(g: &GraphIndex, indices: &str) -> Vec<usize> {
    let mut found = vec![];
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([indices.to_string()]);
    while let Some(t) = queue.pop_front() {
        for &c in g.consumers_of(&t) {
            let n = g.node(c);
            if is_expert_gather(g, n) && n.input[1] == t {
                if !found.contains(&c) {
                    found.push(c);
                }
            } else if matches!(
                n.op_type.as_str(),
                "Reshape" | "Unsqueeze" | "Flatten" | "Cast"
            ) && n.input[0] == t
                && seen.insert(n.output[0].clone())
            {
                queue.push_back(n.output[0].clone());
            }
        }
    }
    found
}
