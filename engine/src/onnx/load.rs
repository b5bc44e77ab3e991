//! Loads a described block's weights from the graph into an f32 [`MoeLayer`], whatever form it
//! came from: router (and bias), experts (fused gate/up in any layout, optional biases) and the
//! shared expert.

use std::path::Path;
use std::sync::Arc;

use super::forms::{BlockDescription, GateUpLayout};
use super::graph::GraphIndex;
use super::tensors::{load_f32, load_linear_out_in};
use crate::error::{Error, Result};
use crate::moe::expert::{DenseExpert, Expert, ExpertBias, F32Matrix};
use crate::moe::layer::MoeLayer;
use crate::moe::store::{F32ExpertStore, SharedExpert};

/// Builds the layer of block `index` of the model.
pub(crate) fn load_layer(
    g: &GraphIndex,
    b: &BlockDescription,
    index: usize,
    dir: Option<&Path>,
) -> Result<MoeLayer> {
    let s = &b.spec;
    let (h, f) = (s.hidden, s.ffn);
    let router = load_linear_out_in(g, &b.router, dir)?;
    let router_bias = match &b.router_bias {
        Some(name) => Some(load_vector(g, name, s.experts, dir)?),
        None => None,
    };
    let (_, gate_up) = load_f32(g, &b.experts.gate_up, dir)?;
    let (_, down) = load_f32(g, &b.experts.down, dir)?;
    let bias = match &b.experts.bias {
        Some(t) => Some((
            load_vector(g, &t.gate_up, s.experts * 2 * f, dir)?,
            load_vector(g, &t.down, s.experts * h, dir)?,
        )),
        None => None,
    };
    let layout = b.experts.gate_up_layout;
    let experts = (0..s.experts)
        .map(|e| {
            let (gate, up) = split_gate_up(&gate_up[e * 2 * f * h..(e + 1) * 2 * f * h], f, layout);
            let bias = bias.as_ref().map(|(gu, dn)| {
                let (gate, up) = split_gate_up(&gu[e * 2 * f..(e + 1) * 2 * f], f, layout);
                ExpertBias {
                    gate,
                    up,
                    down: dn[e * h..(e + 1) * h].to_vec(),
                }
            });
            Expert::new(
                F32Matrix::new(f, h, gate)?,
                F32Matrix::new(f, h, up)?,
                F32Matrix::new(h, f, down[e * h * f..(e + 1) * h * f].to_vec())?,
                bias,
                s.activation,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let shared = match &b.shared {
        Some(r) => {
            let sf = r.gate_proj.out_features();
            Some(SharedExpert {
                ffn: DenseExpert::silu_gated(
                    h,
                    sf,
                    load_linear_out_in(g, &r.gate_proj, dir)?,
                    load_linear_out_in(g, &r.up_proj, dir)?,
                    load_linear_out_in(g, &r.down_proj, dir)?,
                )?,
                gate: load_linear_out_in(g, &r.gate, dir)?,
            })
        }
        None => None,
    };
    MoeLayer::new(
        s.clone(),
        index,
        router,
        router_bias,
        Arc::new(F32ExpertStore::new(experts)),
        shared,
    )
}

/// Splits one expert's fused `[2*ffn, cols]` gate/up rows into gate and up `[ffn, cols]`.
fn split_gate_up(rows: &[f32], ffn: usize, layout: GateUpLayout) -> (Vec<f32>, Vec<f32>) {
    let cols = rows.len() / (2 * ffn);
    match layout {
        GateUpLayout::GateFirst | GateUpLayout::UpFirst => {
            let (first, second) = rows.split_at(ffn * cols);
            if layout == GateUpLayout::GateFirst {
                (first.to_vec(), second.to_vec())
            } else {
                (second.to_vec(), first.to_vec())
            }
        }
        GateUpLayout::Interleaved => {
            let mut gate = Vec::with_capacity(ffn * cols);
            let mut up = Vec::with_capacity(ffn * cols);
            for pair in rows.chunks_exact(2 * cols) {
                gate.extend_from_slice(&pair[..cols]);
                up.extend_from_slice(&pair[cols..]);
            }
            (gate, up)
        }
    }
}

fn load_vector(g: &GraphIndex, name: &str, len: usize, dir: Option<&Path>) -> Result<Vec<f32>> {
    let (_, v) = load_f32(g, name, dir)?;
    if v.len() != len {
        return Err(Error::UnsupportedGraph(format!(
            "'{name}' has {} values, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_up_layouts_by_hand() {
        // ffn 2, cols 1: rows r0..r3
        let rows = [0.0, 1.0, 2.0, 3.0];
        let gf = split_gate_up(&rows, 2, GateUpLayout::GateFirst);
        assert_eq!(gf, (vec![0.0, 1.0], vec![2.0, 3.0]));
        let uf = split_gate_up(&rows, 2, GateUpLayout::UpFirst);
        assert_eq!(uf, (vec![2.0, 3.0], vec![0.0, 1.0]));
        let il = split_gate_up(&rows, 2, GateUpLayout::Interleaved);
        assert_eq!(il, (vec![0.0, 2.0], vec![1.0, 3.0]));
    }
}
