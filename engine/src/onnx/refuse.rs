//! Forms that moe-edge refuses outright, whatever the flags: graphs that tract would run but
//! with wrong numbers, and fused MoE contrib ops that are not supported yet.

use std::collections::{HashSet, VecDeque};

use super::graph::{attr_ints, layer_in_name, GraphIndex};
use crate::error::{Error, Result};

/// How far back from a `Split` to look for the `NonZero` of a traced expert loop.
const R5_SEARCH_DEPTH: usize = 16;

/// Refuses the legacy-traced eager expert loop (form R5) and contrib MoE ops.
pub fn check_refused_forms(g: &GraphIndex) -> Result<()> {
    for node in &g.graph.node {
        if matches!(node.op_type.as_str(), "MoE" | "QMoE") && node.domain == "com.microsoft" {
            return Err(Error::RefusedBlock {
                node: node.name.clone(),
                layer: layer_in_name(&node.name),
                reason: format!(
                    "com.microsoft.{} (forms R3/R4 of onnxruntime's fused MoE) is not supported yet; \
                     export with experts_implementation=\"batched_mm\" (form R1) instead",
                    node.op_type
                ),
            });
        }
        if node.op_type == "Split"
            && node.domain.is_empty()
            && has_static_sizes(g, node)
            && fed_by_nonzero(g, &node.input[0])
        {
            return Err(Error::RefusedBlock {
                node: node.name.clone(),
                layer: layer_in_name(&node.name),
                reason: "legacy-traced eager expert loop (form R5): a Split with sizes fixed at trace time \
                         is fed by NonZero, so any input that hits a different number of experts runs wrong; \
                         re-export with experts_implementation=\"batched_mm\""
                    .into(),
            });
        }
    }
    Ok(())
}

fn has_static_sizes(g: &GraphIndex, split: &tract_onnx::pb::NodeProto) -> bool {
    match split.input.get(1).filter(|s| !s.is_empty()) {
        Some(sizes) => g.const_ints(sizes).is_some(),
        None => attr_ints(split, "split")
            .map(|v| !v.is_empty())
            .unwrap_or(false),
    }
}

fn fed_by_nonzero(g: &GraphIndex, tensor: &str) -> bool {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([(tensor.to_string(), 0usize)]);
    while let Some((t, depth)) = queue.pop_front() {
        let Some(p) = g.producer_of(&t) else { continue };
        let n = g.node(p);
        if n.op_type == "NonZero" {
            return true;
        }
        if depth < R5_SEARCH_DEPTH {
            for i in &n.input {
                if !i.is_empty() && seen.insert(i.clone()) {
                    queue.push_back((i.clone(), depth + 1));
                }
            }
        }
    }
    false
}
