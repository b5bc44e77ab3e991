//! A dense linear layer with int8 block-quantised weights, as a tract operator
//! (`ai.moe_edge::MoeEdgeLinearQ8`): what `pack --dense int8` puts in place of
//! `MatMul(x, W)` by a constant weight (attention projections, LM head), computed by the same
//! int8 kernels as the experts, its output rows split across threads.

use std::sync::Arc;

use rayon::prelude::*;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::kernels;
use crate::kernels::q8::{Q8Activations, Q8Matrix};

/// `y[.., out] = x[.., in] . W^T` with `W [out, in]` int8, stored as row bands for threads.
#[derive(Debug)]
pub(crate) struct Q8Linear {
    pub in_features: usize,
    pub out_features: usize,
    bands: Vec<Q8Matrix>,
}

impl Q8Linear {
    /// Splits `w` into bands of output rows (at least 256 rows each) for parallel use.
    pub fn new(w: Q8Matrix) -> Self {
        let (rows, cols, nb) = (w.rows, w.cols, w.blocks_per_row());
        let bands_wanted = (rows / 256).clamp(1, 4 * rayon::current_num_threads().max(1));
        let per = rows.div_ceil(bands_wanted);
        let bands = (0..rows.div_ceil(per))
            .map(|b| {
                let (r0, r1) = (b * per, ((b + 1) * per).min(rows));
                Q8Matrix {
                    rows: r1 - r0,
                    cols,
                    qs: w.qs[r0 * nb * 32..r1 * nb * 32].to_vec(),
                    scales: w.scales[r0 * nb..r1 * nb].to_vec(),
                }
            })
            .collect();
        Q8Linear {
            in_features: cols,
            out_features: rows,
            bands,
        }
    }

    /// Bytes held in memory: int8 values and f32 scales.
    pub fn bytes(&self) -> u64 {
        self.bands
            .iter()
            .map(|b| (b.qs.len() + b.scales.len() * 4) as u64)
            .sum()
    }

    /// `x[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.in_features;
        let xq = Q8Activations::quantize(x, rows, self.in_features);
        let parts: Vec<Vec<f32>> = self
            .bands
            .par_iter()
            .map(|b| {
                let mut out = vec![0f32; rows * b.rows];
                kernels().gemm_q8_q8(&xq, b, &mut out);
                out
            })
            .collect();
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap_or_default();
        }
        let mut y = vec![0f32; rows * self.out_features];
        let mut col = 0;
        for (b, part) in self.bands.iter().zip(&parts) {
            for r in 0..rows {
                y[r * self.out_features + col..r * self.out_features + col + b.rows]
                    .copy_from_slice(&part[r * b.rows..(r + 1) * b.rows]);
            }
            col += b.rows;
        }
        y
    }
}

/// The typed op: `x[..., in] -> y[..., out]`.
#[derive(Clone)]
pub(crate) struct LinearQ8Op {
    pub linear: Arc<Q8Linear>,
}

impl std::fmt::Debug for LinearQ8Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LinearQ8({} -> {})",
            self.linear.in_features, self.linear.out_features
        )
    }
}

impl PartialEq for LinearQ8Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.linear, &other.linear)
    }
}
impl Eq for LinearQ8Op {}

impl Op for LinearQ8Op {
    fn name(&self) -> StaticName {
        "LinearQ8".into()
    }
    op_as_typed_op!();
}

impl EvalOp for LinearQ8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        ensure!(
            shape.last() == Some(&self.linear.in_features),
            "LinearQ8: input shape {:?} does not end with {}",
            shape,
            self.linear.in_features
        );
        let y = self
            .linear
            .forward(x.try_as_plain_ram()?.as_slice::<f32>()?);
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().expect("rank >= 1") = self.linear.out_features;
        Ok(tvec!(Tensor::from_shape(&out_shape, &y)?.into_tvalue()))
    }
}

impl TypedOp for LinearQ8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        let last = shape.last_mut().context("LinearQ8 needs rank >= 1")?;
        *last = self.linear.out_features.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }
    as_op!();
}
