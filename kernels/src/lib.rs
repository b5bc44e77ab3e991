//! int8 block-quantised matrix kernels; nothing here knows about models.
//!
//! The format (`q8`) is the one moe-edge packs experts in: a matrix `[rows, cols]` (output-major,
//! as `W` in `y = W x`) stored as `rows x cols_padded` int8 values (`cols_padded` = `cols` rounded
//! up to 32, zero-filled) and one scale per block of 32 along the input dimension, symmetric
//! (`w = q * scale`, `|q| <= 127`). Activations are quantised the same way per row, and products
//! accumulate exactly in i32 within a block, in f32 across blocks.
//!
//! Every instruction set has a module with the same functions ([`scalar`] is the reference);
//! [`kernels`] picks the best one the CPU supports, once, at run time (never from compile-time
//! target features), capped by `MOE_EDGE_ISA`.

pub mod dispatch;
pub mod q8;
pub mod scalar;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

pub use dispatch::{available, for_isa, kernels, Isa, Kernels};

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// Dot product of two f32 slices with eight independent accumulators (vectorises well).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}
