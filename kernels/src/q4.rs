//! The int4 block format moe-edge stores cold experts in: blocks of 32 values along the input
//! dimension, each with an f16 scale `d` and 32 4-bit codes `n` (0..=15), the value being
//! `(n - 8) * d`. The scale carries the sign of the block's largest-magnitude value so that value
//! maps to code 0 (-8): the full 16 levels are used, as llama.cpp's Q4_0 does.
//!
//! Layout of a `[rows, cols]` matrix: all code bytes first (`rows x blocks x 16`; in each block,
//! byte `i` holds value `i` in its low nibble and value `i + 16` in its high nibble), then the
//! scales (`rows x blocks` f16, little-endian). 4.5 bits per weight.
//!
//! [`Q4Matrix`] holds such a matrix in memory as it is stored (codes and f32 scales); the int4
//! kernels multiply int8 activations by it directly. [`widen_q4`] turns it into the int8 format
//! exactly instead (each value `(n - 8) * d` becomes the int8 `±(n - 8)` with the scale `|d|`).

use half::f16;

use crate::q8::{blocks_per_row, Q8Matrix};
use crate::BLOCK;

/// Bytes of an int4 `[rows, cols]` matrix.
pub fn q4_bytes(rows: usize, cols: usize) -> usize {
    let nb = blocks_per_row(cols);
    rows * nb * (BLOCK / 2) + rows * nb * 2
}

/// Quantises a row-major `[rows, cols]` f32 matrix into `out` (length [`q4_bytes`]).
pub fn quantize_q4(w: &[f32], rows: usize, cols: usize, out: &mut [u8]) {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(out.len(), q4_bytes(rows, cols));
    let nb = blocks_per_row(cols);
    let (codes, scales) = out.split_at_mut(rows * nb * (BLOCK / 2));
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for b in 0..nb {
            let chunk = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
            // the value of largest magnitude, with its sign, maps to -8
            let extreme = chunk
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = f16::from_f32(extreme / -8.0);
            let inv = if d.to_f32() != 0.0 {
                1.0 / d.to_f32()
            } else {
                0.0
            };
            let code = |i: usize| -> u8 {
                let v = chunk.get(i).copied().unwrap_or(0.0);
                ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8
            };
            let block = &mut codes[(r * nb + b) * 16..(r * nb + b + 1) * 16];
            for (i, byte) in block.iter_mut().enumerate() {
                *byte = code(i) | (code(i + 16) << 4);
            }
            let at = (r * nb + b) * 2;
            scales[at..at + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
}

/// An int4 matrix in memory: `rows x blocks x 16` code bytes and `rows x blocks` scales (signed,
/// f32), laid out as in the file.
#[derive(Debug, Clone)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

impl Q4Matrix {
    /// Reads a matrix written by [`quantize_q4`]; `None` if the size does not match the shape or
    /// a scale is not finite.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if bytes.len() != q4_bytes(rows, cols) {
            return None;
        }
        let nb = blocks_per_row(cols);
        let (codes, scales) = bytes.split_at(rows * nb * (BLOCK / 2));
        let scales: Vec<f32> = scales
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        if !scales.iter().all(|s| s.is_finite()) {
            return None;
        }
        Some(Q4Matrix {
            rows,
            cols,
            codes: codes.to_vec(),
            scales,
        })
    }

    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.cols)
    }

    /// Dequantised row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.blocks_per_row();
        let mut w = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let (b, i) = (r * nb + c / BLOCK, c % BLOCK);
                let byte = self.codes[b * 16 + i % 16];
                let code = if i < 16 { byte & 0x0f } else { byte >> 4 };
                w.push((code as i32 - 8) as f32 * self.scales[b]);
            }
        }
        w
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * 4
    }
}

/// The int4 matrix in `bytes` as an int8 matrix with the same values, or `None` if the size does
/// not match the shape or a scale is not finite.
pub fn widen_q4(bytes: &[u8], rows: usize, cols: usize) -> Option<Q8Matrix> {
    if bytes.len() != q4_bytes(rows, cols) {
        return None;
    }
    let nb = blocks_per_row(cols);
    let (codes, scales) = bytes.split_at(rows * nb * (BLOCK / 2));
    let mut qs = vec![0i8; rows * nb * BLOCK];
    let mut out_scales = Vec::with_capacity(rows * nb);
    for (blk, (c, s)) in codes
        .chunks_exact(16)
        .zip(scales.chunks_exact(2))
        .enumerate()
    {
        let d = f16::from_le_bytes([s[0], s[1]]).to_f32();
        if !d.is_finite() {
            return None;
        }
        // a negative scale moves its sign into the values: -(n - 8) is in -7..=8
        let sign = if d < 0.0 { -1 } else { 1 };
        let q = &mut qs[blk * BLOCK..(blk + 1) * BLOCK];
        for (i, &byte) in c.iter().enumerate() {
            q[i] = sign * ((byte & 0x0f) as i8 - 8);
            q[i + 16] = sign * ((byte >> 4) as i8 - 8);
        }
        out_scales.push(d.abs());
    }
    Some(Q8Matrix {
        rows,
        cols,
        qs,
        scales: out_scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One block worked by hand: the extreme value -2.0 gives d = 0.25, so 1.0 -> code 12,
    /// -2.0 -> 0, 0.3 -> round(1.2) + 8 = 9, 0.0 -> 8.
    #[test]
    fn a_block_by_hand() {
        let mut w = vec![0f32; 32];
        w[0] = 1.0;
        w[1] = -2.0;
        w[17] = 0.3;
        let mut buf = vec![0u8; q4_bytes(1, 32)];
        quantize_q4(&w, 1, 32, &mut buf);
        assert_eq!(buf.len(), 18);
        assert_eq!(buf[0], 12 | (8 << 4));
        assert_eq!(buf[1], (9 << 4));
        assert_eq!(buf[2], 8 | (8 << 4));
        assert_eq!(f16::from_le_bytes([buf[16], buf[17]]).to_f32(), 0.25);
        let m = widen_q4(&buf, 1, 32).unwrap();
        assert_eq!(m.scales, vec![0.25]);
        assert_eq!((m.qs[0], m.qs[1], m.qs[17], m.qs[5]), (4, -8, 1, 0));
        let back = m.dequantize();
        assert_eq!((back[0], back[1], back[17]), (1.0, -2.0, 0.25));
        let direct = Q4Matrix::from_bytes(&buf, 1, 32).unwrap();
        assert_eq!(direct.dequantize(), back);
        assert_eq!(direct.heap_bytes(), 16 + 4);
    }

    /// A positive extreme gives a negative stored scale; widened, the signs move to the values.
    #[test]
    fn a_positive_extreme_is_exact_and_the_widened_scale_is_positive() {
        let w: Vec<f32> = (0..40).map(|i| (i as f32 - 10.0) / 7.0).collect();
        let mut buf = vec![0u8; q4_bytes(1, 40)];
        quantize_q4(&w, 1, 40, &mut buf);
        let m = widen_q4(&buf, 1, 40).unwrap();
        assert!(m.scales.iter().all(|s| *s >= 0.0));
        assert!(m.qs.iter().all(|q| (-8..=8).contains(q)));
        let back = m.dequantize();
        // each value within half a step of its block's scale (plus the scale's f16 rounding)
        for (b, chunk) in w.chunks(32).enumerate() {
            let step = m.scales[b];
            for (i, v) in chunk.iter().enumerate() {
                let err = (back[b * 32 + i] - v).abs();
                assert!(err <= 0.5 * step * 1.01, "{v}: {err} > half of {step}");
            }
            let extreme = chunk
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let got = back[b * 32 + chunk.iter().position(|v| *v == extreme).unwrap()];
            assert!(
                (got - extreme).abs() <= extreme.abs() * 1e-3,
                "the extreme {extreme} is kept: {got}"
            );
        }
        // padded tail values are zero
        assert!(back.len() == 40);
        assert!(widen_q4(&buf[1..], 1, 40).is_none());
        let mut nan = buf.clone();
        let at = nan.len() - 2;
        nan[at..].copy_from_slice(&f16::NAN.to_le_bytes());
        assert!(widen_q4(&nan, 1, 40).is_none());
    }
}
