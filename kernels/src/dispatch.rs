//! Run-time choice of the kernels: a table of function pointers filled once from CPU detection.

use std::sync::OnceLock;

use crate::q4::Q4Matrix;
use crate::q8::{Q8Activations, Q8Matrix};

/// Instruction sets with kernels, weakest first within each architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    /// x86_64 AVX2 + FMA
    Avx2,
    /// x86_64 AVX-VNNI (`vpdpbusd`, VEX-encoded; Alder Lake and later)
    AvxVnni,
    /// x86_64 AVX-512 VNNI (`vpdpbusd` on 256-bit vectors with AVX-512VL)
    Avx512Vnni,
    /// aarch64 Advanced SIMD (Cortex-A72, Raspberry Pi 4)
    Neon,
    /// aarch64 `sdot` (Cortex-A76/A78: Raspberry Pi 5, Jetson Orin)
    Dotprod,
    /// aarch64 `smmla` (Cortex-A710/X2 and later, Graviton 3)
    I8mm,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
            Isa::I8mm => "i8mm",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        ALL.iter().copied().find(|i| i.name() == name)
    }

    /// Whether this CPU can run the ISA's kernels.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => crate::x86_64::avx2::is_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => crate::x86_64::avxvnni::is_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => crate::x86_64::avx512vnni::is_available(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => crate::aarch64::neon::is_available(),
            #[cfg(target_arch = "aarch64")]
            Isa::Dotprod => crate::aarch64::dotprod::is_available(),
            #[cfg(target_arch = "aarch64")]
            Isa::I8mm => crate::aarch64::i8mm::is_available(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// Every ISA moe-edge has kernels for, in preference order (best last) per architecture.
pub const ALL: [Isa; 7] = [
    Isa::Scalar,
    Isa::Avx2,
    Isa::AvxVnni,
    Isa::Avx512Vnni,
    Isa::Neon,
    Isa::Dotprod,
    Isa::I8mm,
];

/// `out[r, o] = sum_b xs[r,b] ws[o,b] dot(xq[r,b], wq[o,b])`; shapes checked by the caller.
pub type GemmQ8Fn = unsafe fn(&Q8Activations, &Q8Matrix, &mut [f32]);
/// `out[i] = dot(a[32i..32i+32], b[32i..32i+32])` in i32; lengths checked by the caller.
pub type BlockDotsFn = unsafe fn(&[i8], &[i8], &mut [i32]);

/// `out[r, o] = sum_b xs[r,b] ws[o,b] dot(xq[r,b], code[o,b] - 8)`; shapes checked by the caller.
pub type GemmQ4Fn = unsafe fn(&Q8Activations, &Q4Matrix, &mut [f32]);
/// `out[i] = dot(a[32i..32i+32], codes[16i..16i+16] - 8)` in i32; lengths checked by the caller.
pub type BlockDotsQ4Fn = unsafe fn(&[i8], &[u8], &mut [i32]);

/// One ISA's kernels.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    gemm_q8_q8: GemmQ8Fn,
    block_dots: BlockDotsFn,
    gemm_q4_q8: GemmQ4Fn,
    block_dots_q4: BlockDotsQ4Fn,
}

impl Kernels {
    /// `out[r * w.rows + o]` = row `r` of `x` times row `o` of `w`.
    pub fn gemm_q8_q8(&self, x: &Q8Activations, w: &Q8Matrix, out: &mut [f32]) {
        let nb = w.blocks_per_row();
        assert_eq!(
            x.blocks_per_row, nb,
            "activation and weight block counts differ"
        );
        assert_eq!(x.qs.len(), x.rows * nb * crate::BLOCK);
        assert_eq!(x.scales.len(), x.rows * nb);
        assert_eq!(w.qs.len(), w.rows * nb * crate::BLOCK);
        assert_eq!(w.scales.len(), w.rows * nb);
        assert_eq!(out.len(), x.rows * w.rows);
        // SAFETY: `self` only exists for ISAs the CPU supports (see `for_isa`), and the shapes
        // the kernels index by were checked above.
        unsafe { (self.gemm_q8_q8)(x, w, out) }
    }

    /// Per-block i32 dot products (exposed to test the integer part bit-exactly).
    pub fn block_dots(&self, a: &[i8], b: &[i8], out: &mut [i32]) {
        assert_eq!(a.len(), out.len() * crate::BLOCK);
        assert_eq!(b.len(), a.len());
        // SAFETY: as in `gemm_q8_q8`: supported ISA, lengths checked.
        unsafe { (self.block_dots)(a, b, out) }
    }

    /// `out[r * w.rows + o]` = row `r` of `x` times row `o` of the int4 matrix `w`.
    pub fn gemm_q4_q8(&self, x: &Q8Activations, w: &Q4Matrix, out: &mut [f32]) {
        let nb = w.blocks_per_row();
        assert_eq!(
            x.blocks_per_row, nb,
            "activation and weight block counts differ"
        );
        assert_eq!(x.qs.len(), x.rows * nb * crate::BLOCK);
        assert_eq!(x.scales.len(), x.rows * nb);
        assert_eq!(w.codes.len(), w.rows * nb * crate::BLOCK / 2);
        assert_eq!(w.scales.len(), w.rows * nb);
        assert_eq!(out.len(), x.rows * w.rows);
        // SAFETY: `self` only exists for ISAs the CPU supports (see `for_isa`), and the shapes
        // the kernels index by were checked above.
        unsafe { (self.gemm_q4_q8)(x, w, out) }
    }

    /// Per-block i32 dot products of int8 values with int4 blocks (to test the integer part).
    pub fn block_dots_q4(&self, a: &[i8], codes: &[u8], out: &mut [i32]) {
        assert_eq!(a.len(), out.len() * crate::BLOCK);
        assert_eq!(codes.len(), out.len() * crate::BLOCK / 2);
        // SAFETY: as in `gemm_q4_q8`: supported ISA, lengths checked.
        unsafe { (self.block_dots_q4)(a, codes, out) }
    }
}

/// The kernels of `isa`, if this CPU supports it.
pub fn for_isa(isa: Isa) -> Option<Kernels> {
    if !isa.is_supported() {
        return None;
    }
    let (gemm_q8_q8, block_dots): (GemmQ8Fn, BlockDotsFn) = match isa {
        Isa::Scalar => (
            crate::scalar::gemm_q8_q8_unchecked,
            crate::scalar::block_dots_unchecked,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (
            crate::x86_64::avx2::gemm_q8_q8,
            crate::x86_64::avx2::block_dots,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => (
            crate::x86_64::avxvnni::gemm_q8_q8,
            crate::x86_64::avxvnni::block_dots,
        ),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => (
            crate::x86_64::avx512vnni::gemm_q8_q8,
            crate::x86_64::avx512vnni::block_dots,
        ),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => (
            crate::aarch64::neon::gemm_q8_q8,
            crate::aarch64::neon::block_dots,
        ),
        #[cfg(target_arch = "aarch64")]
        Isa::Dotprod => (
            crate::aarch64::dotprod::gemm_q8_q8,
            crate::aarch64::dotprod::block_dots,
        ),
        #[cfg(target_arch = "aarch64")]
        Isa::I8mm => (
            crate::aarch64::i8mm::gemm_q8_q8,
            crate::aarch64::i8mm::block_dots,
        ),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let (gemm_q4_q8, block_dots_q4): (GemmQ4Fn, BlockDotsQ4Fn) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni => (
            crate::x86_64::q4::gemm_q4_q8,
            crate::x86_64::q4::block_dots_q4,
        ),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => (
            crate::aarch64::q4::neon::gemm_q4_q8,
            crate::aarch64::q4::neon::block_dots_q4,
        ),
        #[cfg(target_arch = "aarch64")]
        Isa::Dotprod | Isa::I8mm => (
            crate::aarch64::q4::dotprod::gemm_q4_q8,
            crate::aarch64::q4::dotprod::block_dots_q4,
        ),
        _ => (
            crate::scalar::gemm_q4_q8_unchecked,
            crate::scalar::block_dots_q4_unchecked,
        ),
    };
    Some(Kernels {
        isa,
        gemm_q8_q8,
        block_dots,
        gemm_q4_q8,
        block_dots_q4,
    })
}

/// ISAs this CPU supports, weakest first.
pub fn available() -> Vec<Isa> {
    ALL.iter().copied().filter(|i| i.is_supported()).collect()
}

/// The kernels in use: the best the CPU supports, or the one `MOE_EDGE_ISA` names if that is
/// supported (an unknown or unsupported name is ignored with a warning). Chosen once.
pub fn kernels() -> &'static Kernels {
    static CHOSEN: OnceLock<Kernels> = OnceLock::new();
    CHOSEN.get_or_init(|| {
        let best = *available().last().expect("scalar is always available");
        let isa = match std::env::var("MOE_EDGE_ISA") {
            Ok(name) => match Isa::from_name(&name) {
                Some(isa) if isa.is_supported() => isa,
                _ => {
                    log::warn!(
                        "MOE_EDGE_ISA={name} is unknown or not supported by this CPU; using {}",
                        best.name()
                    );
                    best
                }
            },
            Err(_) => best,
        };
        log::info!(
            "int8 kernels: {} (CPU supports: {})",
            isa.name(),
            available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for_isa(isa).expect("chosen ISA is supported")
    })
}
