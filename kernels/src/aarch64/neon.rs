//! Baseline Advanced SIMD kernels (Cortex-A72 / Raspberry Pi 4, Cortex-A57): widening multiplies
//! `smull`/`smlal` to i16 (two products per lane stay below 2^15 as |q| <= 127), then pairwise
//! widening adds to i32.

/// Whether this CPU has Advanced SIMD (every aarch64 Linux system does).
pub fn is_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// Four i32 partial sums of one 32-value block.
///
/// # Safety
/// NEON required; `a` and `b` point to 32 readable bytes with values in -127..=127.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot_block(a: *const i8, b: *const i8) -> int32x4_t {
    // SAFETY: 32 readable bytes at a and b (caller's contract).
    let (a0, a1, b0, b1) = unsafe {
        (
            vld1q_s8(a),
            vld1q_s8(a.add(16)),
            vld1q_s8(b),
            vld1q_s8(b.add(16)),
        )
    };
    let p0 = vmlal_s8(
        vmull_s8(vget_low_s8(a0), vget_low_s8(b0)),
        vget_high_s8(a0),
        vget_high_s8(b0),
    );
    let p1 = vmlal_s8(
        vmull_s8(vget_low_s8(a1), vget_low_s8(b1)),
        vget_high_s8(a1),
        vget_high_s8(b1),
    );
    vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
}

super::arm_kernels!("neon", dot_block);
