//! int4 x int8 kernels: the 16 code bytes of a block are split into two vectors of 16 codes,
//! centred to -8..=7 as int8, and multiplied with the int8 activations: `sdot` where the CPU has
//! DotProd (Cortex-A76 and later), widening `smull`/`smlal` otherwise (Cortex-A72). Exact in i32.

use std::arch::aarch64::*;

use crate::q4::Q4Matrix;
use crate::q8::Q8Activations;
use crate::BLOCK;

/// The codes of one block as two int8 vectors (values 0..15 and 16..31), centred on zero.
///
/// # Safety
/// NEON required; `codes` points to 16 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn centred_codes(codes: *const u8) -> (int8x16_t, int8x16_t) {
    // SAFETY: 16 readable bytes (caller's contract).
    let c = unsafe { vld1q_u8(codes) };
    let eight = vdupq_n_s8(8);
    let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(c, vdupq_n_u8(0x0f))), eight);
    let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(c, 4)), eight);
    (lo, hi)
}

/// Four i32 partial sums of `x . (code - 8)` over one block, with `smull`/`smlal` (|8 x 127| x 2
/// stays far below 2^15).
///
/// # Safety
/// NEON required; `codes` points to 16 readable bytes and `x` to 32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot_block_q4_neon(codes: *const u8, x: *const i8) -> int32x4_t {
    // SAFETY: forwarded caller contract.
    let ((lo, hi), x0, x1) = unsafe { (centred_codes(codes), vld1q_s8(x), vld1q_s8(x.add(16))) };
    let p0 = vmlal_s8(
        vmull_s8(vget_low_s8(lo), vget_low_s8(x0)),
        vget_high_s8(lo),
        vget_high_s8(x0),
    );
    let p1 = vmlal_s8(
        vmull_s8(vget_low_s8(hi), vget_low_s8(x1)),
        vget_high_s8(hi),
        vget_high_s8(x1),
    );
    vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
}

/// Four i32 partial sums of `x . (code - 8)` over one block, with `sdot`.
///
/// # Safety
/// DotProd required; `codes` points to 16 readable bytes and `x` to 32.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_block_q4_dotprod(codes: *const u8, x: *const i8) -> int32x4_t {
    // SAFETY: forwarded caller contract; DotProd enabled for `sdot`.
    unsafe {
        let (lo, hi) = centred_codes(codes);
        let acc = super::dotprod::sdot(vdupq_n_s32(0), lo, vld1q_s8(x));
        super::dotprod::sdot(acc, hi, vld1q_s8(x.add(16)))
    }
}

/// Generates `block_dots_q4` and `gemm_q4_q8` in a module for the target features `$features`
/// from a block dot product.
macro_rules! q4_kernels {
    ($module:ident, $features:literal, $dot:ident) => {
        pub mod $module {
            use super::*;

            /// Per-block i32 dot products of int8 values with int4 blocks.
            ///
            /// # Safety
            /// The CPU must support the features; `a` holds `32 * out.len()` values and
            /// `codes` `16 * out.len()` bytes.
            #[target_feature(enable = $features)]
            pub unsafe fn block_dots_q4(a: &[i8], codes: &[u8], out: &mut [i32]) {
                for (i, o) in out.iter_mut().enumerate() {
                    // SAFETY: block i lies within a and codes (caller's contract).
                    *o = vaddvq_s32(unsafe {
                        $dot(codes.as_ptr().add(i * 16), a.as_ptr().add(i * BLOCK))
                    });
                }
            }

            /// `out[r * w.rows + o] = sum_b x.scale[r,b] * w.scale[o,b] * dot(x[r,b], w[o,b] - 8)`.
            ///
            /// # Safety
            /// The CPU must support the features; the shapes must agree (checked by
            /// `Kernels::gemm_q4_q8`).
            #[target_feature(enable = $features)]
            pub unsafe fn gemm_q4_q8(x: &Q8Activations, w: &Q4Matrix, out: &mut [f32]) {
                let nb = w.blocks_per_row();
                for o in 0..w.rows {
                    let wc = w.codes[o * nb * 16..].as_ptr();
                    for r in 0..x.rows {
                        let xq = x.qs[r * nb * BLOCK..].as_ptr();
                        let mut acc = vdupq_n_f32(0.0);
                        for b in 0..nb {
                            // SAFETY: block b of both rows lies within the slices (shapes checked).
                            let d = unsafe { $dot(wc.add(b * 16), xq.add(b * BLOCK)) };
                            acc = vfmaq_f32(
                                acc,
                                vcvtq_f32_s32(d),
                                vdupq_n_f32(x.scales[r * nb + b] * w.scales[o * nb + b]),
                            );
                        }
                        out[r * w.rows + o] = vaddvq_f32(acc);
                    }
                }
            }
        }
    };
}

q4_kernels!(neon, "neon", dot_block_q4_neon);
q4_kernels!(dotprod, "neon,dotprod", dot_block_q4_dotprod);
