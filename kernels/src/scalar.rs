//! Portable reference kernels for the int8 block format. SIMD kernels must match these:
//! bit-exact for the integer dot products, within a stated bound for float paths.

use crate::q4::Q4Matrix;
use crate::q8::{Q8Activations, Q8Matrix};
use crate::BLOCK;

/// Integer dot product of one block: `sum(a[i] * b[i])` in i32.
#[inline]
pub fn dot_block_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = 0i32;
    for i in 0..BLOCK {
        acc += a[i] as i32 * b[i] as i32;
    }
    acc
}

/// `out[r, o] = sum_b xs[r,b] * ws[o,b] * dot(xq[r,b], wq[o,b])`: int8 activations times int8
/// weights with i32 accumulation per block, f32 across blocks.
pub fn gemm_q8_q8(x: &Q8Activations, w: &Q8Matrix, out: &mut [f32]) {
    let nb = w.blocks_per_row();
    assert_eq!(
        x.blocks_per_row, nb,
        "activation and weight block counts differ"
    );
    assert_eq!(out.len(), x.rows * w.rows);
    for o in 0..w.rows {
        let wq = &w.qs[o * nb * BLOCK..(o + 1) * nb * BLOCK];
        let ws = &w.scales[o * nb..(o + 1) * nb];
        for r in 0..x.rows {
            let xq = &x.qs[r * nb * BLOCK..(r + 1) * nb * BLOCK];
            let xs = &x.scales[r * nb..(r + 1) * nb];
            let mut acc = 0f32;
            for b in 0..nb {
                let d = dot_block_i8(
                    &xq[b * BLOCK..(b + 1) * BLOCK],
                    &wq[b * BLOCK..(b + 1) * BLOCK],
                );
                acc += (xs[b] * ws[b]) * d as f32;
            }
            out[r * w.rows + o] = acc;
        }
    }
}

/// [`gemm_q8_q8`] behind the dispatch table's signature.
///
/// # Safety
/// Always safe to call (no special instructions); `unsafe` only to share the table's type.
pub unsafe fn gemm_q8_q8_unchecked(x: &Q8Activations, w: &Q8Matrix, out: &mut [f32]) {
    gemm_q8_q8(x, w, out)
}

/// Per-block i32 dot products: `out[i] = dot(a[32i..], b[32i..])`.
pub fn block_dots(a: &[i8], b: &[i8], out: &mut [i32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_block_i8(
            &a[i * BLOCK..(i + 1) * BLOCK],
            &b[i * BLOCK..(i + 1) * BLOCK],
        );
    }
}

/// [`block_dots`] behind the dispatch table's signature.
///
/// # Safety
/// Always safe to call; `unsafe` only to share the table's type.
pub unsafe fn block_dots_unchecked(a: &[i8], b: &[i8], out: &mut [i32]) {
    block_dots(a, b, out)
}

/// Integer dot product of one int4 block (16 code bytes: value `i` in the low nibble of byte `i`,
/// value `i + 16` in the high nibble) with 32 int8 values: `sum(a[i] * (code[i] - 8))` in i32.
#[inline]
pub fn dot_block_q4(codes: &[u8], a: &[i8]) -> i32 {
    let mut acc = 0i32;
    for i in 0..BLOCK / 2 {
        acc += a[i] as i32 * ((codes[i] & 0x0f) as i32 - 8);
        acc += a[i + 16] as i32 * ((codes[i] >> 4) as i32 - 8);
    }
    acc
}

/// Per-block i32 dot products of int8 values with int4 blocks: `out[i] = dot(a[32i..], block i)`.
pub fn block_dots_q4(a: &[i8], codes: &[u8], out: &mut [i32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = dot_block_q4(&codes[i * 16..(i + 1) * 16], &a[i * BLOCK..(i + 1) * BLOCK]);
    }
}

/// [`block_dots_q4`] behind the dispatch table's signature.
///
/// # Safety
/// Always safe to call; `unsafe` only to share the table's type.
pub unsafe fn block_dots_q4_unchecked(a: &[i8], codes: &[u8], out: &mut [i32]) {
    block_dots_q4(a, codes, out)
}

/// `out[r, o] = sum_b xs[r,b] * ws[o,b] * dot(xq[r,b], code[o,b] - 8)`: int8 activations times
/// int4 weights, i32 within a block, f32 across blocks.
pub fn gemm_q4_q8(x: &Q8Activations, w: &Q4Matrix, out: &mut [f32]) {
    let nb = w.blocks_per_row();
    assert_eq!(
        x.blocks_per_row, nb,
        "activation and weight block counts differ"
    );
    assert_eq!(out.len(), x.rows * w.rows);
    for o in 0..w.rows {
        let wc = &w.codes[o * nb * 16..(o + 1) * nb * 16];
        let ws = &w.scales[o * nb..(o + 1) * nb];
        for r in 0..x.rows {
            let xq = &x.qs[r * nb * BLOCK..(r + 1) * nb * BLOCK];
            let xs = &x.scales[r * nb..(r + 1) * nb];
            let mut acc = 0f32;
            for b in 0..nb {
                let d = dot_block_q4(&wc[b * 16..(b + 1) * 16], &xq[b * BLOCK..(b + 1) * BLOCK]);
                acc += (xs[b] * ws[b]) * d as f32;
            }
            out[r * w.rows + o] = acc;
        }
    }
}

/// [`gemm_q4_q8`] behind the dispatch table's signature.
///
/// # Safety
/// Always safe to call; `unsafe` only to share the table's type.
pub unsafe fn gemm_q4_q8_unchecked(x: &Q8Activations, w: &Q4Matrix, out: &mut [f32]) {
    gemm_q4_q8(x, w, out)
}

/// `out[r, o] = sum_c x[r, c] * w[o, c]` with `w` dequantised on the fly (f32 activations).
pub fn gemm_f32_q8(x: &[f32], rows: usize, w: &Q8Matrix, out: &mut [f32]) {
    let (cols, nb) = (w.cols, w.blocks_per_row());
    assert_eq!(x.len(), rows * cols);
    assert_eq!(out.len(), rows * w.rows);
    let mut wrow = vec![0f32; nb * BLOCK];
    for o in 0..w.rows {
        for b in 0..nb {
            let s = w.scales[o * nb + b];
            for i in 0..BLOCK {
                wrow[b * BLOCK + i] = w.qs[(o * nb + b) * BLOCK + i] as f32 * s;
            }
        }
        for r in 0..rows {
            out[r * w.rows + o] = crate::dot_f32(&x[r * cols..(r + 1) * cols], &wrow[..cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q8::{q8_bytes, quantize, ScaleType};

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    fn q(w: &[f32], rows: usize, cols: usize) -> Q8Matrix {
        let mut buf = vec![0u8; q8_bytes(rows, cols, ScaleType::F16)];
        quantize(w, rows, cols, ScaleType::F16, &mut buf);
        Q8Matrix::from_bytes(&buf, rows, cols, ScaleType::F16).unwrap()
    }

    /// Both int8 paths against an f32 product of the original weights: within 2% of the
    /// largest output magnitude (two int8 roundings of ~0.4% each, accumulated).
    #[test]
    fn int8_paths_track_f32() {
        for (rows, out_rows, cols) in [(1, 5, 64), (3, 7, 100), (4, 16, 33)] {
            let w = matrix(out_rows, cols, 1);
            let x = matrix(rows, cols, 2);
            let mut exact = vec![0f32; rows * out_rows];
            for r in 0..rows {
                for o in 0..out_rows {
                    exact[r * out_rows + o] =
                        (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
                }
            }
            let qw = q(&w, out_rows, cols);
            let mut a = vec![0f32; rows * out_rows];
            gemm_f32_q8(&x, rows, &qw, &mut a);
            let mut b = vec![0f32; rows * out_rows];
            gemm_q8_q8(&Q8Activations::quantize(&x, rows, cols), &qw, &mut b);
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            for i in 0..exact.len() {
                assert!(
                    (a[i] - exact[i]).abs() <= 0.02 * scale,
                    "dequant path {} vs {}",
                    a[i],
                    exact[i]
                );
                assert!(
                    (b[i] - exact[i]).abs() <= 0.02 * scale,
                    "int8 path {} vs {}",
                    b[i],
                    exact[i]
                );
            }
        }
    }
}
