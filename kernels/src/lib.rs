//! int8 and int4 block-quantised matrix kernels; nothing here knows about models.
//!
//! The format (`q8`) is the one moe-edge packs experts in: a matrix `[rows, cols]` (output-major,
//! as `W` in `y = W x`) stored as `rows x cols_padded` int8 values (`cols_padded` = `cols` rounded
//! up to 32, zero-filled) and one scale per block of 32 along the input dimension, symmetric
//! (`w = q * scale`, `|q| <= 127`). Activations are quantised the same way per row, and products
//! accumulate exactly in i32 within a block, in f32 across blocks. The int4 format (`q4`) stores
//! cold experts at 4.5 bits per weight; its kernels multiply int8 activations by it the same way.
//!
//! Every instruction set has a module with the same functions ([`scalar`] is the reference; the
//! int4 ones are one AVX2 module for every x86_64 ISA, and NEON and `sdot` modules on aarch64);
//! [`kernels`] picks the best one the CPU supports, once, at run time (never from compile-time
//! target features), capped by `MOE_EDGE_ISA`.

pub mod dispatch;
pub mod q4;
pub mod q8;
pub mod scalar;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

pub use dispatch::{available, for_isa, kernels, Isa, Kernels};

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// Dot product of two f32 slices of equal length, with eight independent accumulators (lane
/// `l` sums the products at indices `l`, `l + 8`, ...; then the lanes pairwise, then the tail).
/// Written over exact chunks so that it vectorises without bounds checks, inlined or not.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        sum += x * y;
    }
    sum
}
