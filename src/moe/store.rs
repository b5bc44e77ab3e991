//! Where expert weights live, behind a narrow interface: the MoE forward pass asks a store for
//! an expert and runs it over a group of rows, whatever format and residency the store uses.

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::{Error, Result};

/// One expert's feed-forward network, runnable over a group of token rows.
pub trait ExpertFfn: Send + Sync {
    /// `out[rows, hidden] = down(silu(gate(x)) * up(x))` for `x[rows, hidden]` (row-major).
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]);
    /// Bytes of weights this expert holds.
    fn weight_bytes(&self) -> usize;
}

/// The routed experts of one MoE layer.
pub trait ExpertStore: Send + Sync + Debug {
    /// Number of experts in the layer.
    fn len(&self) -> usize;
    /// Whether the layer has no experts.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The expert `index`, loading it if the store keeps experts out of memory.
    ///
    /// Implementations may block until memory is free (a cache with a byte budget): callers
    /// must not hold one expert while asking for another on the same thread, and
    /// [`ExpertFfn::forward`] must not run other experts' work (no nested rayon tasks).
    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>>;

    /// The expert `index` as f32 matrices (dequantised if stored quantised), for repacking.
    fn to_dense(&self, index: usize) -> Result<DenseExpert>;
}

/// A SwiGLU expert held as f32 matrices in `[out, in]` (row-major) layout.
#[derive(Debug, Clone)]
pub struct DenseExpert {
    pub hidden: usize,
    pub ffn: usize,
    /// `[ffn, hidden]`
    pub gate: Vec<f32>,
    /// `[ffn, hidden]`
    pub up: Vec<f32>,
    /// `[hidden, ffn]`
    pub down: Vec<f32>,
}

impl DenseExpert {
    pub fn new(
        hidden: usize,
        ffn: usize,
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
    ) -> Result<Self> {
        let ok =
            gate.len() == ffn * hidden && up.len() == ffn * hidden && down.len() == hidden * ffn;
        if !ok {
            return Err(Error::InvalidInput(format!(
                "expert tensors do not match hidden {hidden} / ffn {ffn}: gate {}, up {}, down {} values",
                gate.len(),
                up.len(),
                down.len()
            )));
        }
        Ok(DenseExpert {
            hidden,
            ffn,
            gate,
            up,
            down,
        })
    }
}

impl ExpertFfn for DenseExpert {
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (h, f) = (self.hidden, self.ffn);
        let mut g = vec![0f32; rows * f];
        let mut u = vec![0f32; rows * f];
        matmul_wt(x, rows, h, &self.gate, f, &mut g);
        matmul_wt(x, rows, h, &self.up, f, &mut u);
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = silu(*gv) * uv;
        }
        matmul_wt(&g, rows, f, &self.down, h, out);
    }

    fn weight_bytes(&self) -> usize {
        (self.gate.len() + self.up.len() + self.down.len()) * 4
    }
}

/// The always-on shared expert of Qwen2-MoE style blocks, scaled by `sigmoid(x . gate)`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub ffn: DenseExpert,
    /// `[hidden]`
    pub gate: Vec<f32>,
}

/// Routed experts as f32 in memory.
#[derive(Debug, Clone)]
pub struct F32ExpertStore {
    experts: Vec<Arc<DenseExpert>>,
}

impl F32ExpertStore {
    pub fn new(experts: Vec<DenseExpert>) -> Self {
        F32ExpertStore {
            experts: experts.into_iter().map(Arc::new).collect(),
        }
    }
}

impl ExpertStore for F32ExpertStore {
    fn len(&self) -> usize {
        self.experts.len()
    }

    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>> {
        self.experts
            .get(index)
            .map(|e| e.clone() as Arc<dyn ExpertFfn>)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "expert {index} out of range ({})",
                    self.experts.len()
                ))
            })
    }

    fn to_dense(&self, index: usize) -> Result<DenseExpert> {
        self.experts
            .get(index)
            .map(|e| (**e).clone())
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "expert {index} out of range ({})",
                    self.experts.len()
                ))
            })
    }
}

pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `out[rows, n_out] = x[rows, k] . w[n_out, k]^T`: each weight row is read once for all rows.
pub(crate) fn matmul_wt(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n_out: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), n_out * k);
    debug_assert_eq!(out.len(), rows * n_out);
    for (o, w_row) in w.chunks_exact(k).enumerate() {
        for r in 0..rows {
            out[r * n_out + o] = dot(&x[r * k..(r + 1) * k], w_row);
        }
    }
}

pub(crate) use crate::kernels::dot_f32 as dot;
