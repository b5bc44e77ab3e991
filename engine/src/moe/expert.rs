//! One expert feed-forward network, whatever the storage format of its weights: the gated FFN
//! `down(act(gate(x), up(x)))` with optional biases, written once and parameterised by a
//! [`WeightMatrix`] (f32 in memory, int8 and int4 blocks computed by the kernels crate).

use std::fmt::Debug;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::kernels::q4::Q4Matrix;
use crate::kernels::q8::{Q8Activations, Q8Matrix};
use crate::kernels::{kernels, scalar};
use crate::moe::spec::Activation;

/// One expert's feed-forward network, runnable over a group of token rows.
pub trait ExpertFfn: Send + Sync {
    /// `out[rows, hidden] = down(act(gate(x), up(x)))` for `x[rows, hidden]` (row-major).
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]);
}

/// A weight matrix `W[out, in]` in some storage format, applied as `y[rows, out] = x . W^T`.
pub trait WeightMatrix: Send + Sync + Debug {
    /// Activations prepared once for every matrix that reads them (quantised, for int8).
    type Prepared<'a>;
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    fn prepare<'a>(&self, x: &'a [f32], rows: usize) -> Self::Prepared<'a>;
    fn matmul(&self, x: &Self::Prepared<'_>, rows: usize, out: &mut [f32]);
}

/// An f32 matrix `[rows, cols]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl F32Matrix {
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "matrix [{rows}, {cols}] given {} values",
                values.len()
            )));
        }
        Ok(F32Matrix { rows, cols, values })
    }
}

impl WeightMatrix for F32Matrix {
    type Prepared<'a> = &'a [f32];
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn prepare<'a>(&self, x: &'a [f32], _rows: usize) -> &'a [f32] {
        x
    }
    fn matmul(&self, x: &&[f32], rows: usize, out: &mut [f32]) {
        matmul_wt(x, rows, self.cols, &self.values, self.rows, out)
    }
}

/// How int8 weights multiply: int8 x int8 with per-block activation quantisation (default), or
/// f32 activations times weights dequantised on the fly (`MOE_EDGE_Q8_PATH=dequant`, for
/// comparisons). Read once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Path {
    Int8,
    Dequant,
}

impl Q8Path {
    pub fn current() -> Q8Path {
        static PATH: OnceLock<Q8Path> = OnceLock::new();
        *PATH.get_or_init(|| match std::env::var("MOE_EDGE_Q8_PATH").as_deref() {
            Ok("dequant") => Q8Path::Dequant,
            _ => Q8Path::Int8,
        })
    }
}

/// Activations as an int8 matrix reads them.
pub enum Q8Input<'a> {
    Quantized(Q8Activations),
    F32(&'a [f32]),
}

impl WeightMatrix for Q8Matrix {
    type Prepared<'a> = Q8Input<'a>;
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn prepare<'a>(&self, x: &'a [f32], rows: usize) -> Q8Input<'a> {
        match Q8Path::current() {
            Q8Path::Int8 => Q8Input::Quantized(Q8Activations::quantize(x, rows, self.cols)),
            Q8Path::Dequant => Q8Input::F32(x),
        }
    }
    fn matmul(&self, x: &Q8Input<'_>, rows: usize, out: &mut [f32]) {
        match x {
            Q8Input::Quantized(q) => kernels().gemm_q8_q8(q, self, out),
            Q8Input::F32(x) => scalar::gemm_f32_q8(x, rows, self, out),
        }
    }
}

/// int4 weights always take int8-quantised activations (the int4 kernels' only form).
impl WeightMatrix for Q4Matrix {
    type Prepared<'a> = Q8Activations;
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn prepare(&self, x: &[f32], rows: usize) -> Q8Activations {
        Q8Activations::quantize(x, rows, self.cols)
    }
    fn matmul(&self, x: &Q8Activations, _rows: usize, out: &mut [f32]) {
        kernels().gemm_q4_q8(x, self, out)
    }
}

/// Biases of an expert's three projections.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBias {
    /// `[ffn]`
    pub gate: Vec<f32>,
    /// `[ffn]`
    pub up: Vec<f32>,
    /// `[hidden]`
    pub down: Vec<f32>,
}

/// A gated expert: `gate [ffn, hidden]`, `up [ffn, hidden]`, `down [hidden, ffn]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Expert<W> {
    pub gate: W,
    pub up: W,
    pub down: W,
    pub bias: Option<ExpertBias>,
    pub activation: Activation,
}

/// An expert held as f32 matrices.
pub type DenseExpert = Expert<F32Matrix>;
/// An expert held as int8 blocks (the pack's format).
pub type Q8Expert = Expert<Q8Matrix>;
/// An expert held as int4 blocks.
pub type Q4Expert = Expert<Q4Matrix>;

impl<W: WeightMatrix> Expert<W> {
    /// Checks that the shapes chain (`gate`/`up` `[ffn, hidden]`, `down` `[hidden, ffn]`).
    pub fn new(
        gate: W,
        up: W,
        down: W,
        bias: Option<ExpertBias>,
        activation: Activation,
    ) -> Result<Self> {
        let (f, h) = (gate.rows(), gate.cols());
        let shapes_ok = (up.rows(), up.cols()) == (f, h) && (down.rows(), down.cols()) == (h, f);
        let bias_ok = bias
            .as_ref()
            .is_none_or(|b| b.gate.len() == f && b.up.len() == f && b.down.len() == h);
        if !shapes_ok || !bias_ok {
            return Err(Error::InvalidInput(format!(
                "expert tensors do not chain: gate [{f}, {h}], up [{}, {}], down [{}, {}]{}",
                up.rows(),
                up.cols(),
                down.rows(),
                down.cols(),
                if bias_ok {
                    ""
                } else {
                    ", biases of other sizes"
                }
            )));
        }
        Ok(Expert {
            gate,
            up,
            down,
            bias,
            activation,
        })
    }

    pub fn ffn(&self) -> usize {
        self.gate.rows()
    }
}

impl DenseExpert {
    /// A SiLU-gated f32 expert without biases from `[out, in]` row-major values.
    pub fn silu_gated(
        hidden: usize,
        ffn: usize,
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
    ) -> Result<Self> {
        Expert::new(
            F32Matrix::new(ffn, hidden, gate)?,
            F32Matrix::new(ffn, hidden, up)?,
            F32Matrix::new(hidden, ffn, down)?,
            None,
            Activation::SiluGated,
        )
    }
}

impl<W: WeightMatrix> ExpertFfn for Expert<W> {
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let f = self.ffn();
        let xp = self.gate.prepare(x, rows);
        let mut g = vec![0f32; rows * f];
        let mut u = vec![0f32; rows * f];
        self.gate.matmul(&xp, rows, &mut g);
        self.up.matmul(&xp, rows, &mut u);
        if let Some(b) = &self.bias {
            add_row_bias(&mut g, &b.gate);
            add_row_bias(&mut u, &b.up);
        }
        self.activation.apply(&mut g, &u);
        let gp = self.down.prepare(&g, rows);
        self.down.matmul(&gp, rows, out);
        if let Some(b) = &self.bias {
            add_row_bias(out, &b.down);
        }
    }
}

impl Activation {
    /// `g[i] = act(g[i], u[i])` elementwise.
    pub fn apply(self, g: &mut [f32], u: &[f32]) {
        match self {
            Activation::SiluGated => {
                for (gv, uv) in g.iter_mut().zip(u) {
                    *gv = silu(*gv) * uv;
                }
            }
            Activation::ClampedSwiGlu { alpha, limit } => {
                for (gv, uv) in g.iter_mut().zip(u) {
                    let gate = gv.min(limit);
                    let up = uv.clamp(-limit, limit);
                    *gv = (up + 1.0) * gate * sigmoid(alpha * gate);
                }
            }
        }
    }
}

fn add_row_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

pub(crate) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
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
