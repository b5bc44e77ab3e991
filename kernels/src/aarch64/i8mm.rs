//! Int8 matrix-multiply kernels (`smmla`, Armv8.6 I8MM: Cortex-A710/X2 and later, Graviton 3).
//! `smmla` multiplies a 2 x 8 by an 8 x 2 int8 matrix into 2 x 2 i32, so rows of activations and
//! weights are taken in pairs; the odd row out and single-row products (decode) use `sdot`.

use std::arch::aarch64::*;

use super::dotprod;
use crate::q8::{Q8Activations, Q8Matrix};
use crate::BLOCK;

/// Whether this CPU has I8MM (and DotProd, which every I8MM core has).
pub fn is_available() -> bool {
    std::arch::is_aarch64_feature_detected!("i8mm") && dotprod::is_available()
}

/// `acc += a (2 x 8, row-major) * b^T (b: 2 x 8, row-major)`, i32 2 x 2 row-major (`smmla`).
///
/// # Safety
/// I8MM required.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `smmla` only reads and writes the named vector registers; the feature is enabled.
    unsafe {
        core::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// The 64-bit halves `(lo(p), lo(q))` and `(hi(p), hi(q))` of two 16-byte rows.
///
/// # Safety
/// NEON required.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn pair_halves(p: int8x16_t, q: int8x16_t) -> (int8x16_t, int8x16_t) {
    let (p, q) = (vreinterpretq_s64_s8(p), vreinterpretq_s64_s8(q));
    (
        vreinterpretq_s8_s64(vzip1q_s64(p, q)),
        vreinterpretq_s8_s64(vzip2q_s64(p, q)),
    )
}

/// `[x0.w0, x0.w1, x1.w0, x1.w1]` for one 32-value block of two activation and two weight rows.
///
/// # Safety
/// I8MM required; each pointer addresses 32 readable bytes.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn block_2x2(x0: *const i8, x1: *const i8, w0: *const i8, w1: *const i8) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    for half in 0..2 {
        // SAFETY: offsets 0 and 16 of 32 readable bytes (caller's contract).
        let (xa, xb, wa, wb) = unsafe {
            let o = half * 16;
            (
                vld1q_s8(x0.add(o)),
                vld1q_s8(x1.add(o)),
                vld1q_s8(w0.add(o)),
                vld1q_s8(w1.add(o)),
            )
        };
        // SAFETY: NEON and I8MM are enabled in this function.
        unsafe {
            let (x_lo, x_hi) = pair_halves(xa, xb);
            let (w_lo, w_hi) = pair_halves(wa, wb);
            acc = smmla(acc, x_lo, w_lo);
            acc = smmla(acc, x_hi, w_hi);
        }
    }
    acc
}

/// Per-block i32 dot products (single rows: `sdot`).
///
/// # Safety
/// I8MM and DotProd required; `a` and `b` hold `32 * out.len()` values.
#[target_feature(enable = "neon,dotprod,i8mm")]
pub unsafe fn block_dots(a: &[i8], b: &[i8], out: &mut [i32]) {
    // SAFETY: same contract.
    unsafe { dotprod::block_dots(a, b, out) }
}

/// `out[r * w.rows + o] = sum_b x.scale[r,b] * w.scale[o,b] * dot(x[r,b], w[o,b])`.
///
/// # Safety
/// I8MM and DotProd required; shapes must agree (checked by `Kernels::gemm_q8_q8`).
#[target_feature(enable = "neon,dotprod,i8mm")]
pub unsafe fn gemm_q8_q8(x: &Q8Activations, w: &Q8Matrix, out: &mut [f32]) {
    let nb = w.blocks_per_row();
    let (rows, outs) = (x.rows, w.rows);
    let mut o = 0;
    while o + 1 < outs {
        let mut r = 0;
        while r + 1 < rows {
            let (xq0, xq1) = (
                x.qs[r * nb * BLOCK..].as_ptr(),
                x.qs[(r + 1) * nb * BLOCK..].as_ptr(),
            );
            let (wq0, wq1) = (
                w.qs[o * nb * BLOCK..].as_ptr(),
                w.qs[(o + 1) * nb * BLOCK..].as_ptr(),
            );
            let mut acc = vdupq_n_f32(0.0);
            for b in 0..nb {
                let off = b * BLOCK;
                // SAFETY: block b of rows r, r+1, o, o+1 lies within the slices (shapes checked).
                let d =
                    unsafe { block_2x2(xq0.add(off), xq1.add(off), wq0.add(off), wq1.add(off)) };
                let (xs0, xs1) = (x.scales[r * nb + b], x.scales[(r + 1) * nb + b]);
                let (ws0, ws1) = (w.scales[o * nb + b], w.scales[(o + 1) * nb + b]);
                let s = [xs0 * ws0, xs0 * ws1, xs1 * ws0, xs1 * ws1];
                // SAFETY: s holds four f32.
                acc = vfmaq_f32(acc, vcvtq_f32_s32(d), unsafe { vld1q_f32(s.as_ptr()) });
            }
            let mut v = [0f32; 4];
            // SAFETY: v holds four f32.
            unsafe { vst1q_f32(v.as_mut_ptr(), acc) };
            out[r * outs + o] = v[0];
            out[r * outs + o + 1] = v[1];
            out[(r + 1) * outs + o] = v[2];
            out[(r + 1) * outs + o + 1] = v[3];
            r += 2;
        }
        if r < rows {
            for oo in [o, o + 1] {
                // SAFETY: row r of x and oo of w exist; DotProd enabled.
                out[r * outs + oo] = unsafe { dotprod::row_dot(x, r, w, oo, nb) };
            }
        }
        o += 2;
    }
    if o < outs {
        for r in 0..rows {
            // SAFETY: row r of x and o of w exist; DotProd enabled.
            out[r * outs + o] = unsafe { dotprod::row_dot(x, r, w, o, nb) };
        }
    }
}
