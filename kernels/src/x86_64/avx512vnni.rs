//! AVX-512 VNNI kernels: `vpdpbusd` on 256-bit vectors (AVX-512VL), u8 x i8 quadruples to i32.

/// Whether this CPU has AVX-512 F/BW/VL/VNNI (and AVX2/FMA).
pub fn is_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && super::avx2::is_available()
}

/// Eight i32 partial sums of one 32-value block.
///
/// # Safety
/// AVX-512 VNNI + VL and AVX2 required; `a` and `b` point to 32 readable bytes with values in
/// -127..=127.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_block(a: *const i8, b: *const i8) -> __m256i {
    // SAFETY: forwarded caller contract.
    let (ua, sb) = unsafe { load_sign_split(a, b) };
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sb)
}

super::x86_kernels!("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", dot_block);
