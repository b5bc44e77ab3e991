//! int4 x int8 kernels for every x86_64 ISA moe-edge uses (they all have AVX2): the 16 code bytes
//! of a block are split into 32 unsigned codes (0..=15), multiplied with the int8 activations by
//! `vpmaddubsw` (unsigned x signed pairs; 2 x 15 x 127 stays below 2^15), and `8 x sum(x)` is
//! subtracted to centre the codes: `dot(x, code - 8) = dot(x, code) - 8 sum(x)`, exact in i32.

use std::arch::x86_64::*;

use super::{hsum_f32, hsum_i32};
use crate::q4::Q4Matrix;
use crate::q8::Q8Activations;
use crate::BLOCK;

/// Eight i32 partial sums of `x . (code - 8)` over one block.
///
/// # Safety
/// AVX2 required; `codes` points to 16 readable bytes and `x` to 32 with values in -127..=127.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_block_q4(codes: *const u8, x: *const i8) -> __m256i {
    // SAFETY: 16 readable bytes at `codes` and 32 at `x` (caller's contract).
    let (c, xv) = unsafe {
        (
            _mm_loadu_si128(codes as *const __m128i),
            _mm256_loadu_si256(x as *const __m256i),
        )
    };
    let low = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(c, low);
    let hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
    // values 0..15 in the low 128 bits, 16..31 in the high ones: the activations' order
    let codes = _mm256_set_m128i(hi, lo);
    let ones = _mm256_set1_epi16(1);
    let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones);
    let sum_x = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), xv), ones);
    _mm256_sub_epi32(dot, _mm256_slli_epi32(sum_x, 3))
}

/// Per-block i32 dot products of int8 values with int4 blocks.
///
/// # Safety
/// AVX2 required; `a` holds `32 * out.len()` values and `codes` `16 * out.len()` bytes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_dots_q4(a: &[i8], codes: &[u8], out: &mut [i32]) {
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: block i lies within a and codes (caller's contract).
        *o = unsafe {
            hsum_i32(dot_block_q4(
                codes.as_ptr().add(i * 16),
                a.as_ptr().add(i * BLOCK),
            ))
        };
    }
}

/// `out[r * w.rows + o] = sum_b x.scale[r,b] * w.scale[o,b] * dot(x[r,b], w[o,b] - 8)`.
///
/// # Safety
/// AVX2 and FMA required; the shapes must agree (checked by `Kernels::gemm_q4_q8`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gemm_q4_q8(x: &Q8Activations, w: &Q4Matrix, out: &mut [f32]) {
    let nb = w.blocks_per_row();
    for o in 0..w.rows {
        let wc = w.codes[o * nb * 16..].as_ptr();
        let ws = &w.scales[o * nb..(o + 1) * nb];
        for r in 0..x.rows {
            let xq = x.qs[r * nb * BLOCK..].as_ptr();
            let xs = &x.scales[r * nb..(r + 1) * nb];
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: block b of row r / row o lies within x.qs / w.codes (shapes checked).
                let d = unsafe { dot_block_q4(wc.add(b * 16), xq.add(b * BLOCK)) };
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[b] * ws[b]), acc);
            }
            out[r * w.rows + o] = hsum_f32(acc);
        }
    }
}
