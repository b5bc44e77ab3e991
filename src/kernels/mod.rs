//! Compute kernels on slices and block formats; nothing here knows about models.
//!
//! The int8 format (`q8`) is the pack's: a matrix `[rows, cols]` (output-major, as `W` in
//! `y = W x`) stored as `rows x cols_padded` int8 values (`cols_padded` = `cols` rounded up to
//! 32, zero-filled) followed by `rows x cols_padded / 32` scales, one per block of 32 along the
//! input dimension, symmetric (`w = q * scale`).

pub mod q8;
pub mod scalar;

/// Values per quantisation block.
pub const BLOCK: usize = 32;
