//! An expert whose matrices are int8 blocks (the pack's format), computed by the int8 kernels.

use crate::kernels::q8::{Q8Activations, Q8Matrix};
use crate::kernels::{kernels, scalar};
use crate::moe::store::{silu, ExpertFfn};

/// How int8 experts multiply: int8 x int8 with per-block activation quantisation (default),
/// or f32 activations times weights dequantised on the fly (`MOE_EDGE_Q8_PATH=dequant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Path {
    Int8,
    Dequant,
}

impl Q8Path {
    pub fn from_env() -> Self {
        match std::env::var("MOE_EDGE_Q8_PATH").as_deref() {
            Ok("dequant") => Q8Path::Dequant,
            _ => Q8Path::Int8,
        }
    }
}

/// SwiGLU expert with int8 `gate [ffn, hidden]`, `up [ffn, hidden]`, `down [hidden, ffn]`.
#[derive(Debug, Clone)]
pub struct Q8Expert {
    pub gate: Q8Matrix,
    pub up: Q8Matrix,
    pub down: Q8Matrix,
    pub path: Q8Path,
}

impl Q8Expert {
    fn project(
        &self,
        x: &[f32],
        xq: Option<&Q8Activations>,
        rows: usize,
        w: &Q8Matrix,
        out: &mut [f32],
    ) {
        match xq {
            Some(q) => kernels().gemm_q8_q8(q, w, out),
            None => scalar::gemm_f32_q8(x, rows, w, out),
        }
    }
}

impl ExpertFfn for Q8Expert {
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (h, f) = (self.gate.cols, self.gate.rows);
        let xq = (self.path == Q8Path::Int8).then(|| Q8Activations::quantize(x, rows, h));
        let mut g = vec![0f32; rows * f];
        let mut u = vec![0f32; rows * f];
        self.project(x, xq.as_ref(), rows, &self.gate, &mut g);
        self.project(x, xq.as_ref(), rows, &self.up, &mut u);
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = silu(*gv) * uv;
        }
        let gq = (self.path == Q8Path::Int8).then(|| Q8Activations::quantize(&g, rows, f));
        self.project(&g, gq.as_ref(), rows, &self.down, out);
    }

    fn weight_bytes(&self) -> usize {
        self.gate.heap_bytes() + self.up.heap_bytes() + self.down.heap_bytes()
    }
}
