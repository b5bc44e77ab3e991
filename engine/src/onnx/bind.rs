//! The moe-edge nodes of a rewritten graph and the op table they name: each node's `index` is
//! checked against the table (one node per entry), and linear nodes get the feature counts the
//! parser needs for their shapes.

use tract_onnx::pb::GraphProto;

use super::{int_attr, EMBEDDING_OP_TYPE, INDEX_ATTR, LINEAR_OP_TYPE, MOE_OP_TYPE};

/// Attribute of int8 linear nodes, set before parsing: input features.
pub(crate) const IN_FEATURES_ATTR: &str = "in_features";
/// Attribute of int8 linear nodes, set before parsing: output features (of embedding nodes:
/// the row width).
pub(crate) const OUT_FEATURES_ATTR: &str = "out_features";

/// Attribute names of the index in packs of format 1, still read.
const V1_INDEX_ATTRS: [&str; 2] = ["pack_layer", "pack_dense"];

/// Checks that each of the `moe_blocks` MoE entries, each int8 linear entry (`(in, out)`
/// features) and the embedding entry (its `hidden` width, if the model has one) has exactly one
/// node in `graph`, and that every moe-edge node names an entry; then rewrites each node's
/// attributes to its `index` (and the widths its shape needs).
pub(crate) fn annotate_nodes(
    graph: &mut GraphProto,
    moe_blocks: usize,
    linear: &[(usize, usize)],
    embedding: Option<usize>,
) -> Result<(), String> {
    let mut seen_moe = vec![false; moe_blocks];
    let mut seen_linear = vec![false; linear.len()];
    let mut seen_embedding = vec![false; embedding.is_some() as usize];
    for node in graph.node.iter_mut() {
        let (seen, what) = match node.op_type.as_str() {
            MOE_OP_TYPE => (&mut seen_moe, "MoE block"),
            LINEAR_OP_TYPE => (&mut seen_linear, "int8 linear layer"),
            EMBEDDING_OP_TYPE => (&mut seen_embedding, "embedding table"),
            _ => continue,
        };
        let index = node
            .attribute
            .iter()
            .find(|a| a.name == INDEX_ATTR || V1_INDEX_ATTRS.contains(&a.name.as_str()))
            .map(|a| a.i)
            .filter(|&i| i >= 0 && (i as usize) < seen.len())
            .ok_or_else(|| {
                format!(
                    "node '{}' names no {what} of the model (it has {})",
                    node.name,
                    seen.len()
                )
            })? as usize;
        if std::mem::replace(&mut seen[index], true) {
            return Err(format!("{what} {index} has two nodes in the graph"));
        }
        let mut attrs = vec![int_attr(INDEX_ATTR, index as i64)];
        match node.op_type.as_str() {
            LINEAR_OP_TYPE => {
                let (inp, out) = linear[index];
                attrs.push(int_attr(IN_FEATURES_ATTR, inp as i64));
                attrs.push(int_attr(OUT_FEATURES_ATTR, out as i64));
            }
            EMBEDDING_OP_TYPE => {
                let hidden = embedding.expect("an embedding entry exists");
                attrs.push(int_attr(OUT_FEATURES_ATTR, hidden as i64));
            }
            _ => {}
        }
        node.attribute = attrs;
    }
    for (seen, what) in [
        (&seen_moe, "MoE block"),
        (&seen_linear, "int8 linear layer"),
        (&seen_embedding, "embedding table"),
    ] {
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(format!("{what} {missing} has no node in the graph"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::moe_edge_node;

    fn graph(nodes: &[(&str, usize)]) -> GraphProto {
        GraphProto {
            node: nodes
                .iter()
                .enumerate()
                .map(|(i, &(op, index))| {
                    moe_edge_node(format!("n{i}"), op, "x", &format!("y{i}"), index)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_entry_has_exactly_one_node() {
        let mut ok = graph(&[(MOE_OP_TYPE, 1), (LINEAR_OP_TYPE, 0), (MOE_OP_TYPE, 0)]);
        annotate_nodes(&mut ok, 2, &[(64, 32)], None).unwrap();
        let linear = &ok.node[1].attribute;
        assert_eq!(
            linear
                .iter()
                .map(|a| (a.name.as_str(), a.i))
                .collect::<Vec<_>>(),
            vec![("index", 0), ("in_features", 64), ("out_features", 32)]
        );
        let err = annotate_nodes(&mut graph(&[(MOE_OP_TYPE, 2)]), 2, &[], None).unwrap_err();
        assert!(err.contains("names no MoE block"), "{err}");
        let err = annotate_nodes(
            &mut graph(&[(MOE_OP_TYPE, 0), (MOE_OP_TYPE, 0)]),
            2,
            &[],
            None,
        )
        .unwrap_err();
        assert!(err.contains("MoE block 0 has two nodes"), "{err}");
        let err = annotate_nodes(&mut graph(&[(MOE_OP_TYPE, 0)]), 2, &[], None).unwrap_err();
        assert!(err.contains("MoE block 1 has no node"), "{err}");
        let err = annotate_nodes(&mut graph(&[(MOE_OP_TYPE, 0)]), 1, &[(8, 8)], None).unwrap_err();
        assert!(err.contains("int8 linear layer 0 has no node"), "{err}");
        let err = annotate_nodes(&mut graph(&[(MOE_OP_TYPE, 0)]), 1, &[], Some(16)).unwrap_err();
        assert!(err.contains("embedding table 0 has no node"), "{err}");
        let err = annotate_nodes(&mut graph(&[(EMBEDDING_OP_TYPE, 0)]), 0, &[], None).unwrap_err();
        assert!(err.contains("names no embedding table"), "{err}");
        let mut with = graph(&[(EMBEDDING_OP_TYPE, 0), (MOE_OP_TYPE, 0)]);
        annotate_nodes(&mut with, 1, &[], Some(16)).unwrap();
        assert_eq!(with.node[0].attribute[1].i, 16);
    }
}
