//! Dot-product kernels (`sdot`, Armv8.2 DotProd: Cortex-A76 / Raspberry Pi 5, A78AE / Jetson Orin).

/// Whether this CPU has the DotProd extension.
pub fn is_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
        && std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc += ` four-way i8 dot products of `a` and `b` (`sdot`).
///
/// # Safety
/// DotProd required.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads and writes the named vector registers; the feature is enabled.
    unsafe {
        core::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// Four i32 partial sums of one 32-value block.
///
/// # Safety
/// DotProd required; `a` and `b` point to 32 readable bytes.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn dot_block(a: *const i8, b: *const i8) -> int32x4_t {
    // SAFETY: 32 readable bytes at a and b (caller's contract); DotProd enabled.
    unsafe {
        let acc = sdot(vdupq_n_s32(0), vld1q_s8(a), vld1q_s8(b));
        sdot(acc, vld1q_s8(a.add(16)), vld1q_s8(b.add(16)))
    }
}

super::arm_kernels!("neon,dotprod", dot_block);
