//! Reading initializer data (embedded or external) as f32 matrices in moe-edge's layouts.

use std::path::Path;

use tract_onnx::pb::TensorProto;

use super::graph::GraphIndex;
use super::patterns::LinearRef;
use crate::error::{Error, Result};

/// Loads an initializer as f32 values (converting from f16/bf16/f64 if needed).
pub fn load_f32(
    g: &GraphIndex,
    name: &str,
    model_dir: Option<&Path>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let proto: &TensorProto = g
        .initializer(name)
        .ok_or_else(|| Error::InvalidInput(format!("initializer '{name}' not found")))?;
    let resolver = tract_onnx::data_resolver::default();
    let dir = model_dir.and_then(|d| d.to_str());
    let tensor = tract_onnx::tensor::load_tensor(&*resolver, proto, dir)
        .map_err(Error::tract(format!("loading initializer '{name}'")))?;
    let values = tensor
        .cast_to::<f32>()
        .and_then(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
        .map_err(Error::tract(format!(
            "converting initializer '{name}' to f32"
        )))?;
    Ok((tensor.shape().to_vec(), values))
}

/// Loads a linear layer's weight as `[out, in]` row-major.
pub fn load_linear_out_in(
    g: &GraphIndex,
    linear: &LinearRef,
    model_dir: Option<&Path>,
) -> Result<Vec<f32>> {
    let (_, w) = load_f32(g, &linear.weight, model_dir)?;
    Ok(if linear.in_out_layout {
        transpose(&w, linear.dims[0], linear.dims[1])
    } else {
        w
    })
}

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Element sizes of the ONNX data types tract loads; others (strings, bfloat16, complex,
/// float8...) are refused before tract sees them.
fn element_bytes(data_type: i32) -> Option<u64> {
    match data_type {
        2 | 3 | 9 => Some(1),   // uint8, int8, bool
        4 | 5 | 10 => Some(2),  // uint16, int16, float16
        1 | 6 | 12 => Some(4),  // float, int32, uint32
        7 | 11 | 13 => Some(8), // int64, double, uint64
        _ => None,
    }
}

/// Checks every constant tensor of the graph (initializers and `Constant` nodes) before tract
/// loads it: a data type tract reads, non-negative dims of a sane size, and embedded bytes that
/// match the dims. A damaged file is an error naming the tensor, not a panic inside tract.
pub(crate) fn check_constant_tensors(graph: &tract_onnx::pb::GraphProto) -> Result<()> {
    let node_tensors = graph
        .node
        .iter()
        .flat_map(|n| {
            n.attribute
                .iter()
                .filter_map(move |a| a.t.as_ref().map(|t| (n, t)))
        })
        .map(|(n, t)| (format!("the tensor of node '{}'", n.name), t));
    let initializers = graph
        .initializer
        .iter()
        .map(|t| (format!("initializer '{}'", t.name), t));
    for (what, t) in initializers.chain(node_tensors) {
        let bad = |why: String| Error::UnsupportedGraph(format!("{what}: {why}"));
        let size = element_bytes(t.data_type)
            .ok_or_else(|| bad(format!("data type {} is not supported", t.data_type)))?;
        let mut elements: u64 = 1;
        for &d in &t.dims {
            let d = u64::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))?;
            elements = elements
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or_else(|| bad(format!("dims {:?} are too large", t.dims)))?;
        }
        if !t.raw_data.is_empty() && t.raw_data.len() as u64 != elements * size {
            return Err(bad(format!(
                "{} bytes of data for dims {:?} ({} expected)",
                t.raw_data.len(),
                t.dims,
                elements * size
            )));
        }
    }
    Ok(())
}
