//! AVX-VNNI kernels: `vpdpbusd` (VEX encoding) multiplies u8 x i8 quadruples into i32 directly.

/// Whether this CPU has AVX-VNNI (and the AVX2/FMA the rest of the kernel uses).
pub fn is_available() -> bool {
    is_x86_feature_detected!("avxvnni") && super::avx2::is_available()
}

/// Eight i32 partial sums of one 32-value block.
///
/// # Safety
/// AVX-VNNI and AVX2 required; `a` and `b` point to 32 readable bytes with values in -127..=127.
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn dot_block(a: *const i8, b: *const i8) -> __m256i {
    // SAFETY: forwarded caller contract.
    let (ua, sb) = unsafe { load_sign_split(a, b) };
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ua, sb)
}

super::x86_kernels!("avx2,fma,avxvnni", dot_block);
