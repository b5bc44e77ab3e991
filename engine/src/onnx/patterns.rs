//! Small structural patterns shared by the MoE matcher: constant linear layers, SiLU gating,
//! axis checks.

use super::graph::{attr_int, GraphIndex};

/// A linear layer by a constant 2D weight, as `MatMul(x, W[in,out])` or `Gemm(x, W, transB)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearRef {
    /// Initializer holding the weight.
    pub weight: String,
    /// True when the initializer is stored `[in, out]` (MatMul, or Gemm without transB).
    pub in_out_layout: bool,
    /// Rows and columns of the initializer as stored.
    pub dims: [usize; 2],
}

impl LinearRef {
    /// Output width of the layer.
    pub fn out_features(&self) -> usize {
        if self.in_out_layout {
            self.dims[1]
        } else {
            self.dims[0]
        }
    }
    /// Input width of the layer.
    pub fn in_features(&self) -> usize {
        if self.in_out_layout {
            self.dims[0]
        } else {
            self.dims[1]
        }
    }
}

/// Matches `tensor = Linear(x)` without bias and returns `(x, layer)`.
pub fn linear_of<'a>(g: &GraphIndex<'a>, tensor: &str) -> Option<(&'a str, LinearRef)> {
    let node = g.node(g.producer_of(tensor)?);
    if !node.domain.is_empty() {
        return None;
    }
    let (x, w, in_out) = match node.op_type.as_str() {
        "MatMul" => (&node.input[0], &node.input[1], true),
        "Gemm" => {
            let plain = attr_int(node, "transA").unwrap_or(0) == 0
                && node
                    .attribute
                    .iter()
                    .all(|a| a.name != "alpha" || a.f == 1.0)
                && node.input.get(2).map(|c| c.is_empty()).unwrap_or(true);
            if !plain {
                return None;
            }
            (
                &node.input[0],
                &node.input[1],
                attr_int(node, "transB").unwrap_or(0) == 0,
            )
        }
        _ => return None,
    };
    let init = g.initializer(w)?;
    if init.dims.len() != 2 {
        return None;
    }
    let dims = [init.dims[0] as usize, init.dims[1] as usize];
    Some((
        x.as_str(),
        LinearRef {
            weight: w.clone(),
            in_out_layout: in_out,
            dims,
        },
    ))
}

/// Matches `tensor = silu(gate) * up` written as `Mul(Mul(a, Sigmoid(a)), b)` in any operand
/// order, and returns `(gate, up)`.
pub fn silu_gated<'a>(g: &GraphIndex<'a>, tensor: &str) -> Option<(&'a str, &'a str)> {
    let mul = g.produced_by(tensor, "Mul")?;
    for (act, other) in [(0, 1), (1, 0)] {
        if let Some(gate) = silu_input(g, &mul.input[act]) {
            return Some((gate, mul.input[other].as_str()));
        }
    }
    None
}

/// Matches `tensor = a * sigmoid(a)` and returns `a`.
pub(crate) fn silu_input<'a>(g: &GraphIndex<'a>, tensor: &str) -> Option<&'a str> {
    let mul = g.produced_by(tensor, "Mul")?;
    for (a, s) in [(0, 1), (1, 0)] {
        if let Some(sig) = g.produced_by(&mul.input[s], "Sigmoid") {
            if sig.input[0] == mul.input[a] {
                return Some(mul.input[a].as_str());
            }
        }
    }
    None
}

/// Whether an `axis`/`axes` value names the last axis of a tensor of rank `rank` (-1 always does).
pub fn is_last_axis(axis: i64, rank: usize) -> bool {
    axis == -1 || axis == rank as i64 - 1
}
