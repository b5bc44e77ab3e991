//! The int8 block format: quantisation, dequantisation and borrowed views.

use half::f16;

use crate::BLOCK;

/// Number of blocks covering `cols` values.
pub fn blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// How block scales are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleType {
    F16,
    F32,
}

impl ScaleType {
    pub fn bytes(self) -> usize {
        match self {
            ScaleType::F16 => 2,
            ScaleType::F32 => 4,
        }
    }
}

/// Bytes of a quantised `[rows, cols]` matrix.
pub fn q8_bytes(rows: usize, cols: usize, scale: ScaleType) -> usize {
    let nb = blocks_per_row(cols);
    rows * nb * BLOCK + rows * nb * scale.bytes()
}

/// Smallest and largest block scales stored as f16 without losing the 0.5% bound
/// (f16's normal range).
const F16_SCALE_RANGE: (f32, f32) = (6.2e-5, 6.5e4);

/// Picks the scale type for a matrix: `preferred`, unless it is f16 and some block's scale is
/// outside f16's normal range, where f32 scales keep every weight within the error bound.
pub fn scale_type_for(w: &[f32], cols: usize, preferred: ScaleType) -> ScaleType {
    if preferred == ScaleType::F32 {
        return ScaleType::F32;
    }
    let fits = w.chunks(cols).all(|row| {
        row.chunks(BLOCK).all(|chunk| {
            let d = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            d == 0.0 || (F16_SCALE_RANGE.0..=F16_SCALE_RANGE.1).contains(&d)
        })
    });
    if fits {
        ScaleType::F16
    } else {
        ScaleType::F32
    }
}

/// Quantises a row-major `[rows, cols]` f32 matrix into `out` (length [`q8_bytes`]).
pub fn quantize(w: &[f32], rows: usize, cols: usize, scale: ScaleType, out: &mut [u8]) {
    assert_eq!(w.len(), rows * cols);
    assert_eq!(out.len(), q8_bytes(rows, cols, scale));
    let nb = blocks_per_row(cols);
    let (qs, scales) = out.split_at_mut(rows * nb * BLOCK);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for b in 0..nb {
            let chunk = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut d = max / 127.0;
            if scale == ScaleType::F16 {
                // round the scale up so that max / d never exceeds 127 after storage
                let mut h = f16::from_f32(d);
                if h.to_f32() < d {
                    h = f16::from_bits(h.to_bits() + 1);
                }
                d = h.to_f32();
            }
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut qs[(r * nb + b) * BLOCK..(r * nb + b + 1) * BLOCK];
            for (i, slot) in q.iter_mut().enumerate() {
                let v = chunk.get(i).copied().unwrap_or(0.0);
                *slot = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
            }
            let at = (r * nb + b) * scale.bytes();
            match scale {
                ScaleType::F16 => {
                    scales[at..at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes())
                }
                ScaleType::F32 => scales[at..at + 4].copy_from_slice(&d.to_le_bytes()),
            }
        }
    }
}

/// A quantised matrix borrowed from a buffer, with scales decoded to f32.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows x blocks_per_row(cols) x 32` int8 values
    pub qs: Vec<i8>,
    /// `rows x blocks_per_row(cols)` scales
    pub scales: Vec<f32>,
}

impl Q8Matrix {
    /// Reads a matrix written by [`quantize`]. `None` if the size does not match the shape, a
    /// value is -128 (the format never contains it; the SIMD kernels rely on |q| <= 127) or a
    /// scale is not a finite number >= 0 (a NaN scale would silently poison every output).
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize, scale: ScaleType) -> Option<Self> {
        if bytes.len() != q8_bytes(rows, cols, scale) {
            return None;
        }
        let nb = blocks_per_row(cols);
        let (qs, sc) = bytes.split_at(rows * nb * BLOCK);
        if qs.contains(&0x80) {
            return None;
        }
        let qs = qs.iter().map(|&b| b as i8).collect();
        let scales: Vec<f32> = match scale {
            ScaleType::F16 => sc
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            ScaleType::F32 => sc
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        if !scales.iter().all(|s| s.is_finite() && *s >= 0.0) {
            return None;
        }
        Some(Q8Matrix {
            rows,
            cols,
            qs,
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
                w.push(self.qs[r * nb * BLOCK + c] as f32 * self.scales[r * nb + c / BLOCK]);
            }
        }
        w
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.qs.len() + self.scales.len() * 4
    }
}

/// Activations quantised per block of 32 (symmetric int8), for int8 x int8 dot products.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    pub rows: usize,
    pub blocks_per_row: usize,
    pub qs: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8Activations {
    /// Quantises `x[rows, cols]`, zero-padding each row to whole blocks.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        let nb = blocks_per_row(cols);
        let mut qs = vec![0i8; rows * nb * BLOCK];
        let mut scales = vec![0f32; rows * nb];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            for b in 0..nb {
                let chunk = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
                let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = max / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                for (i, v) in chunk.iter().enumerate() {
                    qs[(r * nb + b) * BLOCK + i] = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
                scales[r * nb + b] = d;
            }
        }
        Q8Activations {
            rows,
            blocks_per_row: nb,
            qs,
            scales,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(w: &[f32], rows: usize, cols: usize, preferred: ScaleType) -> Vec<f32> {
        let scale = scale_type_for(w, cols, preferred);
        let mut buf = vec![0u8; q8_bytes(rows, cols, scale)];
        quantize(w, rows, cols, scale, &mut buf);
        Q8Matrix::from_bytes(&buf, rows, cols, scale)
            .unwrap()
            .dequantize()
    }

    /// Every weight within 0.5% of its block's max |w|.
    fn check_bound(w: &[f32], rows: usize, cols: usize, scale: ScaleType) {
        let back = roundtrip(w, rows, cols, scale);
        for r in 0..rows {
            for b in 0..blocks_per_row(cols) {
                let range = r * cols + b * BLOCK..r * cols + ((b + 1) * BLOCK).min(cols);
                let max = w[range.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                for i in range {
                    let err = (w[i] - back[i]).abs();
                    assert!(
                        err <= 0.005 * max,
                        "{scale:?} row {r} block {b}: |{} - {}| = {err} > 0.5% of {max}",
                        w[i],
                        back[i]
                    );
                }
            }
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn reconstruction_within_half_percent_of_block_max() {
        for scale in [ScaleType::F16, ScaleType::F32] {
            for (rows, cols) in [(3, 32), (5, 100), (2, 7), (1, 1), (4, 65)] {
                check_bound(&pseudo_random(rows * cols, 42), rows, cols, scale);
            }
        }
    }

    #[test]
    fn zero_blocks_stay_zero_and_extremes_survive() {
        for scale in [ScaleType::F16, ScaleType::F32] {
            let mut w = vec![0f32; 96];
            w[40] = 1e-30; // tiny values next to zero
            w[64] = 6.0e4; // near f16 max
            w[65] = -6.0e4;
            w[70] = 1e-3;
            check_bound(&w, 1, 96, scale);
            let back = roundtrip(&w, 1, 96, scale);
            assert!(back[..32].iter().all(|&v| v == 0.0), "all-zero block");
            assert!(back.iter().all(|v| v.is_finite()));
        }
        // magnitudes outside f16's range switch the matrix to f32 scales and keep the bound
        for w in [
            vec![1e9f32, -3e8, 5.0],
            vec![1e-30f32, 0.0, -2e-31],
            vec![1e-7f32; 40],
        ] {
            assert_eq!(scale_type_for(&w, w.len(), ScaleType::F16), ScaleType::F32);
            check_bound(&w, 1, w.len(), ScaleType::F16);
        }
        assert_eq!(
            scale_type_for(&[0.5, -0.25, 0.0], 3, ScaleType::F16),
            ScaleType::F16
        );
    }

    #[test]
    fn tails_shorter_than_a_block_are_zero_padded() {
        let w = pseudo_random(2 * 37, 7);
        let mut buf = vec![0u8; q8_bytes(2, 37, ScaleType::F16)];
        quantize(&w, 2, 37, ScaleType::F16, &mut buf);
        let m = Q8Matrix::from_bytes(&buf, 2, 37, ScaleType::F16).unwrap();
        assert_eq!(m.blocks_per_row(), 2);
        for r in 0..2 {
            assert!(m.qs[r * 64 + 37..r * 64 + 64].iter().all(|&q| q == 0));
        }
    }
}
