//! The graph of a packed model: which dense linear layers can leave the graph as int8 (constant
//! `MatMul`s), and writing the graph with them replaced and its external data relocated.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{tensor_proto::DataLocation, StringStringEntryProto};

use super::graph::GraphIndex;
use super::rewrite::ImportedModel;
use super::tensors::{load_f32, load_f32_range, transpose, ExternalData};
use super::{moe_edge_node, EMBEDDING_OP_TYPE, LINEAR_OP_TYPE};
use crate::error::{Error, Result};

/// A `MatMul(x, W)` by a constant f32 weight to store as int8.
pub(crate) struct LinearCandidate {
    /// Output tensor of the MatMul (kept by the replacement node).
    pub output: String,
    pub input: String,
    pub initializer: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearCandidate {
    /// The weight as `[out, in]`, read from the graph when asked (one layer at a time).
    pub(crate) fn weight_out_in(&self, imported: &ImportedModel, dir: &Path) -> Result<Vec<f32>> {
        let graph = imported.proto.graph.as_ref().expect("imported graph");
        let g = GraphIndex::new(graph);
        let (_, w) = load_f32(&g, &self.initializer, Some(dir))?;
        Ok(transpose(&w, self.in_features, self.out_features))
    }
}

/// Every MatMul by a 2D f32 initializer used by no other node, with both sides at least 32 wide.
pub(crate) fn constant_matmuls(imported: &ImportedModel) -> Vec<LinearCandidate> {
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
        found.push(LinearCandidate {
            output: node.output[0].clone(),
            input: node.input[0].clone(),
            initializer: node.input[1].clone(),
            in_features: in_f,
            out_features: out_f,
        });
    }
    found
}

/// The token embedding `Gather(table, ids)` whose table can leave the graph: an f32 `[vocab,
/// hidden]` initializer used by that Gather alone, gathered along axis 0.
pub(crate) struct EmbeddingCandidate {
    pub output: String,
    /// The token ids.
    pub input: String,
    pub initializer: String,
    pub vocab: usize,
    pub hidden: usize,
}

impl EmbeddingCandidate {
    /// The table, `[vocab, hidden]` row-major.
    pub(crate) fn table(&self, imported: &ImportedModel, dir: &Path) -> Result<Vec<f32>> {
        let graph = imported.proto.graph.as_ref().expect("imported graph");
        let g = GraphIndex::new(graph);
        load_f32_range(
            &g,
            &self.initializer,
            Some(dir),
            0,
            self.vocab * self.hidden,
        )
    }
}

/// The graph's token embedding, if it is one Gather from a table nothing else uses (a table
/// tied to the LM head stays in the graph). The first such Gather whose indices are a graph
/// input.
pub(crate) fn embedding_gather(imported: &ImportedModel) -> Option<EmbeddingCandidate> {
    let graph = imported.proto.graph.as_ref()?;
    let g = GraphIndex::new(graph);
    let inputs: std::collections::HashSet<&str> =
        graph.input.iter().map(|i| i.name.as_str()).collect();
    graph.node.iter().find_map(|node| {
        if node.op_type != "Gather" || !node.domain.is_empty() || node.input.len() != 2 {
            return None;
        }
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let init = g.initializer(&node.input[0])?;
        let float = init.data_type == tract_onnx::pb::tensor_proto::DataType::Float as i32;
        let ok = axis == 0
            && float
            && init.dims.len() == 2
            && init.dims.iter().all(|&d| d > 0)
            && inputs.contains(node.input[1].as_str())
            && g.consumers_of(&node.input[0]).len() == 1;
        ok.then(|| EmbeddingCandidate {
            output: node.output[0].clone(),
            input: node.input[1].clone(),
            initializer: node.input[0].clone(),
            vocab: init.dims[0] as usize,
            hidden: init.dims[1] as usize,
        })
    })
}

/// Writes the graph of a packed model to `out/model.onnx`: the imported graph (whose MoE nodes
/// keep their `index`), with each linear candidate replaced by an int8 linear node of `index` i
/// and its weight removed, and the embedding Gather (if given) replaced by an embedding node
/// reading rows from the expert file; dense weights that the source kept in external data go to
/// the pack's own `model.onnx.data`.
pub(crate) fn write_packed_graph(
    imported: &ImportedModel,
    linears: &[LinearCandidate],
    embedding: Option<&EmbeddingCandidate>,
    src_dir: &Path,
    out: &Path,
) -> Result<()> {
    let mut proto = imported.proto.clone();
    let graph = proto.graph.as_mut().expect("imported graph");
    if let Some(emb) = embedding {
        let node = graph
            .node
            .iter_mut()
            .find(|n| n.output.first() == Some(&emb.output))
            .expect("embedding node");
        *node = moe_edge_node(
            "moe_edge/embedding".into(),
            EMBEDDING_OP_TYPE,
            &emb.input,
            &emb.output,
            0,
        );
    }
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
    let moved: std::collections::HashSet<&str> = linears
        .iter()
        .map(|d| d.initializer.as_str())
        .chain(embedding.map(|e| e.initializer.as_str()))
        .collect();
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
        let ext = ExternalData::of(t, Some(src_dir))?;
        let src = ext.path;
        let f = File::open(&src).map_err(Error::io(&src))?;
        let length: u64 = match ext.length {
            Some(l) => l,
            None => f
                .metadata()
                .map_err(Error::io(&src))?
                .len()
                .checked_sub(ext.offset)
                .ok_or_else(|| {
                    Error::UnsupportedGraph(format!(
                        "initializer '{}': external data offset {} is past the end of {}",
                        t.name,
                        ext.offset,
                        src.display()
                    ))
                })?,
        };
        let dst = match &mut data {
            Some(d) => d,
            None => data.insert(File::create(&data_path).map_err(Error::io(&data_path))?),
        };
        let at = align_up(data_len, 4096);
        // in pieces: an embedding table can be hundreds of MB
        let mut buf = vec![0u8; (length as usize).min(8 << 20)];
        let mut copied = 0u64;
        while copied < length {
            let n = buf.len().min((length - copied) as usize);
            f.read_exact_at(&mut buf[..n], ext.offset + copied)
                .map_err(Error::io(&src))?;
            dst.write_all_at(&buf[..n], at + copied)
                .map_err(Error::io(&data_path))?;
            copied += n as u64;
        }
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
