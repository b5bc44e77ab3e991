//! The graph of a packed model: which dense linear layers can leave the graph as int8 (constant
//! `MatMul`s), and writing the graph with them replaced and its external data relocated.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{tensor_proto::DataLocation, StringStringEntryProto};

use super::graph::GraphIndex;
use super::rewrite::ImportedModel;
use super::tensors::{load_f32, transpose};
use super::{moe_edge_node, LINEAR_OP_TYPE};
use crate::error::{Error, Result};

/// A `MatMul(x, W)` by a constant f32 weight to store as int8.
pub(crate) struct LinearCandidate {
    /// Output tensor of the MatMul (kept by the replacement node).
    pub output: String,
    pub input: String,
    pub initializer: String,
    pub in_features: usize,
    pub out_features: usize,
    /// `[out, in]`
    pub weight_out_in: Vec<f32>,
}

/// Every MatMul by a 2D f32 initializer used by no other node, with both sides at least 32 wide.
pub(crate) fn constant_matmuls(
    imported: &ImportedModel,
    dir: &Path,
) -> Result<Vec<LinearCandidate>> {
    let graph = imported.proto.graph.as_ref().expect("imported graph");
    let g = GraphIndex::new(graph);
    let mut found = vec![];
    for node in &graph.node {
        if node.op_type != "MatMul" || !node.domain.is_empty() || node.input.len() != 2 {
            continue;
        }
        let Some(init) = g.initializer(&node.input[1]) else {
            continue;
        };
        let float = init.data_type == tract_onnx::pb::tensor_proto::DataType::Float as i32;
        if !float
            || init.dims.len() != 2
            || init.dims.iter().any(|&d| d < 32)
            || g.consumers_of(&node.input[1]).len() != 1
        {
            continue;
        }
        let (in_f, out_f) = (init.dims[0] as usize, init.dims[1] as usize);
        let (_, w) = load_f32(&g, &node.input[1], Some(dir))?;
        found.push(LinearCandidate {
            output: node.output[0].clone(),
            input: node.input[0].clone(),
            initializer: node.input[1].clone(),
            in_features: in_f,
            out_features: out_f,
            weight_out_in: transpose(&w, in_f, out_f),
        });
    }
    Ok(found)
}

/// Writes the graph of a packed model to `out/model.onnx`: the imported graph (whose MoE nodes
/// keep their `index`), with each linear candidate replaced by an int8 linear node of `index` i
/// and its weight removed; dense weights that the source kept in external data go to the pack's
/// own `model.onnx.data`.
pub(crate) fn write_packed_graph(
    imported: &ImportedModel,
    linears: &[LinearCandidate],
    src_dir: &Path,
    out: &Path,
) -> Result<()> {
    let mut proto = imported.proto.clone();
    let graph = proto.graph.as_mut().expect("imported graph");
    for (index, d) in linears.iter().enumerate() {
        let node = graph
            .node
            .iter_mut()
            .find(|n| n.output.first() == Some(&d.output))
            .expect("dense candidate node");
        *node = moe_edge_node(
            format!("moe_edge/dense{index}/linear_q8"),
            LINEAR_OP_TYPE,
            &d.input,
            &d.output,
            index,
        );
    }
    let moved: std::collections::HashSet<&str> =
        linears.iter().map(|d| d.initializer.as_str()).collect();
    graph
        .initializer
        .retain(|t| !moved.contains(t.name.as_str()));
    graph.input.retain(|i| !moved.contains(i.name.as_str()));
    let data_name = "model.onnx.data";
    let data_path = out.join(data_name);
    let mut data: Option<File> = None;
    let mut data_len = 0u64;
    for t in graph.initializer.iter_mut() {
        if t.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let kv = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let location = kv("location").ok_or_else(|| {
            Error::UnsupportedGraph(format!(
                "initializer '{}' has external data without a location",
                t.name
            ))
        })?;
        let offset: u64 = kv("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let src = src_dir.join(&location);
        let f = File::open(&src).map_err(Error::io(&src))?;
        let length: u64 = match kv("length").and_then(|v| v.parse().ok()) {
            Some(l) => l,
            None => f.metadata().map_err(Error::io(&src))?.len() - offset,
        };
        let mut bytes = vec![0u8; length as usize];
        f.read_exact_at(&mut bytes, offset)
            .map_err(Error::io(&src))?;
        let dst = match &mut data {
            Some(d) => d,
            None => data.insert(File::create(&data_path).map_err(Error::io(&data_path))?),
        };
        let at = align_up(data_len, 4096);
        dst.write_all_at(&bytes, at)
            .map_err(Error::io(&data_path))?;
        data_len = at + length;
        t.external_data = vec![
            StringStringEntryProto {
                key: "location".into(),
                value: data_name.into(),
            },
            StringStringEntryProto {
                key: "offset".into(),
                value: at.to_string(),
            },
            StringStringEntryProto {
                key: "length".into(),
                value: length.to_string(),
            },
        ];
    }
    let path = out.join("model.onnx");
    std::fs::write(&path, proto.encode_to_vec()).map_err(Error::io(&path))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}
