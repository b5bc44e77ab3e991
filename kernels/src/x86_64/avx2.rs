//! AVX2 + FMA kernels: `vpmaddubsw` (u8 x i8 pairs to i16) then `vpmaddwd` (i16 pairs to i32).

/// Whether this CPU has AVX2 and FMA.
pub fn is_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Eight i32 partial sums of one 32-value block.
///
/// # Safety
/// AVX2 required; `a` and `b` point to 32 readable bytes with values in -127..=127.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_block(a: *const i8, b: *const i8) -> __m256i {
    // SAFETY: forwarded caller contract.
    let (ua, sb) = unsafe { load_sign_split(a, b) };
    _mm256_madd_epi16(_mm256_maddubs_epi16(ua, sb), _mm256_set1_epi16(1))
}

super::x86_kernels!("avx2,fma", dot_block);
