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
