//! What a graph takes and gives: plain `input_ids -> logits`, or a KV-cache decoder, read from
//! its inputs.

use tract_onnx::pb::{type_proto, ModelProto};

/// The graph's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    /// `input_ids [, attention_mask, position_ids] -> logits`: generation re-runs the sequence.
    Plain {
        attention_mask: bool,
        position_ids: bool,
    },
    /// Form-A decoder with `past_key_values.{i}.key/value` inputs and `present.*` outputs.
    KvCache {
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        attention_mask: bool,
        position_ids: bool,
    },
}

/// Reads the graph's interface from its inputs.
pub(crate) fn interface_of(proto: &ModelProto) -> std::result::Result<Interface, String> {
    let graph = proto.graph.as_ref().ok_or("no graph")?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let has = |n: &str| inputs.iter().any(|i| i.name == n);
    if !has("input_ids") {
        return Err(format!(
            "the graph has no 'input_ids' input (inputs: {:?}); moe-edge runs language models",
            inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
        ));
    }
    let pasts: Vec<_> = inputs
        .iter()
        .filter(|i| i.name.starts_with("past_key_values."))
        .collect();
    let (attention_mask, position_ids) = (has("attention_mask"), has("position_ids"));
    if pasts.is_empty() {
        return Ok(Interface::Plain {
            attention_mask,
            position_ids,
        });
    }
    let dims = |i: &tract_onnx::pb::ValueInfoProto| -> Option<Vec<i64>> {
        let Some(type_proto::Value::TensorType(t)) = i.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        Some(
            t.shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                    _ => -1,
                })
                .collect(),
        )
    };
    let d = dims(pasts[0]).ok_or("past_key_values input has no shape")?;
    if d.len() != 4 || d[1] <= 0 || d[3] <= 0 {
        return Err(format!(
            "past_key_values input '{}' has shape {:?}, expected [batch, kv_heads, past, head_dim]",
            pasts[0].name, d
        ));
    }
    Ok(Interface::KvCache {
        layers: pasts.len() / 2,
        kv_heads: d[1] as usize,
        head_dim: d[3] as usize,
        attention_mask,
        position_ids,
    })
}

/// The vocabulary size: the rows of the embedding table that `input_ids` index (a `Gather` on an
/// initializer, directly or through one `Cast`), if the graph has one.
pub(crate) fn vocab_of(proto: &ModelProto) -> Option<usize> {
    let graph = proto.graph.as_ref()?;
    let mut ids = vec!["input_ids".to_string()];
    for node in &graph.node {
        if node.op_type == "Cast" && node.input.first().is_some_and(|i| i == "input_ids") {
            ids.extend(node.output.iter().cloned());
        }
    }
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Gather" && n.input.len() == 2 && ids.contains(&n.input[1]))
        .find_map(|n| {
            let table = graph.initializer.iter().find(|i| i.name == n.input[0])?;
            match table.dims.as_slice() {
                [rows, _] if *rows > 0 => Some(*rows as usize),
                _ => None,
            }
        })
}
