//! Loads a described block's weights from the graph into an f32 [`MoeLayer`], whatever form it
//! came from: router (and bias), experts (fused gate/up in any layout, optional biases) and the
//! shared expert.

use std::path::Path;
use std::sync::Arc;

use super::forms::{BlockDescription, GateUpLayout};
use super::graph::GraphIndex;
use super::tensors::{initializer_elements, load_f32, load_f32_range, load_linear_out_in};
use crate::error::{Error, Result};
use crate::moe::expert::{DenseExpert, Expert, ExpertBias, F32Matrix};
use crate::moe::layer::MoeLayer;
use crate::moe::store::{F32ExpertStore, SharedExpert};

/// Builds the layer of block `index` of the model, every expert in memory as f32.
pub(crate) fn load_layer(
    g: &GraphIndex,
    b: &BlockDescription,
    index: usize,
    dir: Option<&Path>,
) -> Result<MoeLayer> {
    let w = BlockWeights::new(g, b, dir)?;
    let experts = (0..b.spec.experts)
        .map(|e| w.expert(e))
        .collect::<Result<Vec<_>>>()?;
    MoeLayer::new(
        b.spec.clone(),
        index,
        w.router()?,
        w.router_bias()?,
        Arc::new(F32ExpertStore::new(experts)),
        w.shared()?,
    )
}

/// The weights of one described block, read from the graph's initializers a piece at a time:
/// the router and the shared expert whole, each routed expert on its own (only its rows of the
/// stacked expert tensors are read), so that a pack holds one expert in memory, not a model.
pub(crate) struct BlockWeights<'a> {
    g: &'a GraphIndex<'a>,
    b: &'a BlockDescription,
    dir: Option<&'a Path>,
}

impl<'a> BlockWeights<'a> {
    /// Checks that the stacked expert tensors hold exactly what the block's shape says.
    pub(crate) fn new(
        g: &'a GraphIndex<'a>,
        b: &'a BlockDescription,
        dir: Option<&'a Path>,
    ) -> Result<Self> {
        let s = &b.spec;
        let (e, h, f) = (s.experts, s.hidden, s.ffn);
        let t = &b.experts;
        let mut expected = vec![(&t.gate_up, e * 2 * f * h), (&t.down, e * h * f)];
        if let Some(bt) = &t.bias {
            expected.extend([(&bt.gate_up, e * 2 * f), (&bt.down, e * h)]);
        }
        for (name, len) in expected {
            let n = initializer_elements(g, name)?;
            if n != len {
                return Err(Error::UnsupportedGraph(format!(
                    "'{name}' has {n} values, expected {len}"
                )));
            }
        }
        Ok(BlockWeights { g, b, dir })
    }

    /// `[experts, hidden]`
    pub(crate) fn router(&self) -> Result<Vec<f32>> {
        load_linear_out_in(self.g, &self.b.router, self.dir)
    }

    pub(crate) fn router_bias(&self) -> Result<Option<Vec<f32>>> {
        match &self.b.router_bias {
            Some(name) => Ok(Some(load_vector(
                self.g,
                name,
                self.b.spec.experts,
                self.dir,
            )?)),
            None => Ok(None),
        }
    }

    pub(crate) fn shared(&self) -> Result<Option<SharedExpert>> {
        let Some(r) = &self.b.shared else {
            return Ok(None);
        };
        let (g, dir) = (self.g, self.dir);
        Ok(Some(SharedExpert {
            ffn: DenseExpert::silu_gated(
                self.b.spec.hidden,
                r.gate_proj.out_features(),
                load_linear_out_in(g, &r.gate_proj, dir)?,
                load_linear_out_in(g, &r.up_proj, dir)?,
                load_linear_out_in(g, &r.down_proj, dir)?,
            )?,
            gate: load_linear_out_in(g, &r.gate, dir)?,
        }))
    }

    /// Routed expert `e` as f32 matrices (with its biases).
    pub(crate) fn expert(&self, e: usize) -> Result<DenseExpert> {
        let s = &self.b.spec;
        let (h, f) = (s.hidden, s.ffn);
        let t = &self.b.experts;
        let rows = |name: &str, per_expert: usize| {
            load_f32_range(self.g, name, self.dir, e * per_expert, per_expert)
        };
        let (gate, up) = split_gate_up(&rows(&t.gate_up, 2 * f * h)?, f, t.gate_up_layout);
        let down = rows(&t.down, h * f)?;
        let bias = match &t.bias {
            Some(bt) => {
                let (gate, up) = split_gate_up(&rows(&bt.gate_up, 2 * f)?, f, t.gate_up_layout);
                Some(ExpertBias {
                    gate,
                    up,
                    down: rows(&bt.down, h)?,
                })
            }
            None => None,
        };
        Expert::new(
            F32Matrix::new(f, h, gate)?,
            F32Matrix::new(f, h, up)?,
            F32Matrix::new(h, f, down)?,
            bias,
            s.activation,
        )
    }
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
