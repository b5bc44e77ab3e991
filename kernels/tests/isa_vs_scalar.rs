//! Every ISA's kernels against the scalar reference: block dot products bit-exact (integer
//! arithmetic), the fused GEMM within a float bound derived below, on random shapes including
//! lengths that are not multiples of the block, single rows, zero blocks and extreme values.
//!
//! An ISA this CPU lacks is reported as skipped on stderr; listing it in `MOE_EDGE_REQUIRE_ISAS`
//! (comma-separated, as CI does per emulated CPU) turns the skip into a failure. ISAs of the
//! other architecture are `#[ignore]`d, so they are counted as skipped by the test runner.

use moe_edge_kernels::q4::Q4Matrix;
use moe_edge_kernels::q8::{blocks_per_row, Q8Activations, Q8Matrix};
use moe_edge_kernels::{for_isa, scalar, Isa, Kernels, BLOCK};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn i8(&mut self) -> i8 {
        ((self.next() % 255) as i32 - 127) as i8
    }
    fn f32(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

/// Kernels for `isa`, or `None` after reporting the skip (failing if the ISA is required).
fn kernels_or_skip(isa: Isa) -> Option<Kernels> {
    let required = std::env::var("MOE_EDGE_REQUIRE_ISAS").unwrap_or_default();
    match for_isa(isa) {
        Some(k) => Some(k),
        None if required.split(',').any(|r| r.trim() == isa.name()) => {
            panic!("{} is required but this CPU lacks it", isa.name())
        }
        None => {
            eprintln!(
                "SKIPPED: {} kernels not tested, this CPU lacks the instructions",
                isa.name()
            );
            None
        }
    }
}

/// Random int8 data in -127..=127 with some all-zero and some extreme (+-127) blocks.
fn int8_data(rng: &mut Rng, blocks: usize) -> Vec<i8> {
    let mut v: Vec<i8> = (0..blocks * BLOCK).map(|_| rng.i8()).collect();
    for b in 0..blocks {
        match rng.next() % 6 {
            0 => v[b * BLOCK..(b + 1) * BLOCK].fill(0),
            1 => v[b * BLOCK..(b + 1) * BLOCK]
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = if i % 3 == 0 { -127 } else { 127 }),
            _ => {}
        }
    }
    v
}

fn check_block_dots(k: &Kernels) {
    let mut rng = Rng(11);
    for blocks in [1usize, 2, 3, 7, 64, 129] {
        let (a, b) = (int8_data(&mut rng, blocks), int8_data(&mut rng, blocks));
        let (mut got, mut want) = (vec![0i32; blocks], vec![0i32; blocks]);
        k.block_dots(&a, &b, &mut got);
        scalar::block_dots(&a, &b, &mut want);
        assert_eq!(
            got,
            want,
            "{}: block dots differ ({blocks} blocks)",
            k.isa.name()
        );
    }
    // the extremes: every product 127 * 127 or -127 * 127
    let a = vec![127i8; BLOCK];
    let b: Vec<i8> = (0..BLOCK)
        .map(|i| if i % 2 == 0 { 127 } else { -127 })
        .collect();
    for (x, y, want) in [(&a, &a, 32 * 16129), (&a, &b, 0), (&b, &b, 32 * 16129)] {
        let mut got = [0i32];
        k.block_dots(x, y, &mut got);
        assert_eq!(got[0], want, "{}: extreme block", k.isa.name());
    }
}

fn random_matrix(rng: &mut Rng, rows: usize, cols: usize) -> Q8Matrix {
    let nb = blocks_per_row(cols);
    let mut qs = int8_data(rng, rows * nb);
    for r in 0..rows {
        // the padding of each row's last block is zero, as the format says
        qs[r * nb * BLOCK + cols..(r + 1) * nb * BLOCK].fill(0);
    }
    let scales = (0..rows * nb)
        .map(|_| {
            rng.f32().abs() * 0.01
                + if rng.next().is_multiple_of(9) {
                    50.0
                } else {
                    0.0
                }
        })
        .collect();
    Q8Matrix {
        rows,
        cols,
        qs,
        scales,
    }
}

fn random_activations(rng: &mut Rng, rows: usize, cols: usize) -> Q8Activations {
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| if i % 97 < 32 { 0.0 } else { rng.f32() * 3.0 })
        .collect();
    Q8Activations::quantize(&x, rows, cols)
}

/// Bound for the fused GEMM: the block dots are exact, so results differ from the scalar
/// reference only by f32 rounding of the scaled block sums and their summation order: at most
/// `2 * (blocks + 8) * eps * sum_b |xs * ws| * sum_i |xq_i * wq_i|` per output.
fn check_gemm(k: &Kernels) {
    let mut rng = Rng(5);
    for &cols in &[1usize, 5, 31, 32, 33, 100, 1024, 1030] {
        for &(rows, out_rows) in &[(1usize, 1usize), (1, 7), (2, 16), (3, 33), (5, 8), (64, 3)] {
            let w = random_matrix(&mut rng, out_rows, cols);
            let x = random_activations(&mut rng, rows, cols);
            let (mut got, mut want) = (vec![0f32; rows * out_rows], vec![0f32; rows * out_rows]);
            k.gemm_q8_q8(&x, &w, &mut got);
            scalar::gemm_q8_q8(&x, &w, &mut want);
            let nb = w.blocks_per_row();
            for r in 0..rows {
                for o in 0..out_rows {
                    let mut mag = 0f64;
                    for b in 0..nb {
                        let s = (x.scales[r * nb + b] * w.scales[o * nb + b]).abs() as f64;
                        let p: i64 = (0..BLOCK)
                            .map(|i| {
                                (x.qs[(r * nb + b) * BLOCK + i] as i64
                                    * w.qs[(o * nb + b) * BLOCK + i] as i64)
                                    .abs()
                            })
                            .sum();
                        mag += s * p as f64;
                    }
                    let bound = 2.0 * (nb as f64 + 8.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let (g, e) = (got[r * out_rows + o] as f64, want[r * out_rows + o] as f64);
                    assert!((g - e).abs() <= bound, "{}: cols {cols} rows {rows}x{out_rows} at ({r},{o}): {g} vs {e} (bound {bound})", k.isa.name());
                }
            }
        }
    }
}

/// int4 blocks: random codes with some all-0 and all-15 blocks (the extremes, -8 and +7).
fn int4_codes(rng: &mut Rng, blocks: usize) -> Vec<u8> {
    let mut c: Vec<u8> = (0..blocks * 16).map(|_| (rng.next() % 256) as u8).collect();
    for b in 0..blocks {
        match rng.next() % 6 {
            0 => c[b * 16..(b + 1) * 16].fill(0),
            1 => c[b * 16..(b + 1) * 16].fill(0xff),
            _ => {}
        }
    }
    c
}

fn check_block_dots_q4(k: &Kernels) {
    let mut rng = Rng(23);
    for blocks in [1usize, 2, 3, 7, 64, 129] {
        let (a, c) = (int8_data(&mut rng, blocks), int4_codes(&mut rng, blocks));
        let (mut got, mut want) = (vec![0i32; blocks], vec![0i32; blocks]);
        k.block_dots_q4(&a, &c, &mut got);
        scalar::block_dots_q4(&a, &c, &mut want);
        assert_eq!(
            got,
            want,
            "{}: int4 block dots differ ({blocks} blocks)",
            k.isa.name()
        );
    }
    // the extremes: -127 x -8 everywhere, and 127 x 7
    let (mut got, a, c) = ([0i32], [-127i8; BLOCK], [0u8; 16]);
    k.block_dots_q4(&a, &c, &mut got);
    assert_eq!(got[0], 32 * 1016, "{}: extreme int4 block", k.isa.name());
    k.block_dots_q4(&[127i8; BLOCK], &[0xffu8; 16], &mut got);
    assert_eq!(got[0], 32 * 889, "{}: extreme int4 block", k.isa.name());
}

/// The int4 GEMM against the scalar one, with the bound of [`check_gemm`] (exact block dots,
/// f32 rounding of the scaled sums and their order).
fn check_gemm_q4(k: &Kernels) {
    let mut rng = Rng(29);
    for &cols in &[1usize, 5, 31, 32, 33, 100, 1024, 1030] {
        for &(rows, out_rows) in &[(1usize, 1usize), (1, 7), (2, 16), (3, 33), (5, 8), (64, 3)] {
            let nb = blocks_per_row(cols);
            let w = Q4Matrix {
                rows: out_rows,
                cols,
                codes: int4_codes(&mut rng, out_rows * nb),
                scales: (0..out_rows * nb).map(|_| rng.f32() * 0.02).collect(),
            };
            let x = random_activations(&mut rng, rows, cols);
            let (mut got, mut want) = (vec![0f32; rows * out_rows], vec![0f32; rows * out_rows]);
            k.gemm_q4_q8(&x, &w, &mut got);
            scalar::gemm_q4_q8(&x, &w, &mut want);
            for r in 0..rows {
                for o in 0..out_rows {
                    let mut mag = 0f64;
                    for b in 0..nb {
                        let s = (x.scales[r * nb + b] * w.scales[o * nb + b]).abs() as f64;
                        let p: i64 = (0..BLOCK)
                            .map(|i| {
                                let byte = w.codes[(o * nb + b) * 16 + i % 16];
                                let code = if i < 16 { byte & 0x0f } else { byte >> 4 } as i64 - 8;
                                (x.qs[(r * nb + b) * BLOCK + i] as i64 * code).abs()
                            })
                            .sum();
                        mag += s * p as f64;
                    }
                    let bound = 2.0 * (nb as f64 + 8.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let (g, e) = (got[r * out_rows + o] as f64, want[r * out_rows + o] as f64);
                    assert!((g - e).abs() <= bound, "{}: int4 cols {cols} rows {rows}x{out_rows} at ({r},{o}): {g} vs {e} (bound {bound})", k.isa.name());
                }
            }
        }
    }
}

/// The scalar int4 GEMM against the f32 product of the dequantised matrix (exact integer part;
/// within f32 rounding of the sums).
#[test]
fn scalar_int4_gemm_equals_the_dequantised_product() {
    let mut rng = Rng(31);
    let (rows, out_rows, cols) = (3, 5, 70);
    let nb = blocks_per_row(cols);
    let mut codes = int4_codes(&mut rng, out_rows * nb);
    // the padding of each row's last block holds code 8 (value 0), as quantize_q4 writes it
    for o in 0..out_rows {
        for i in cols % BLOCK..BLOCK {
            let byte = &mut codes[(o * nb + nb - 1) * 16 + i % 16];
            *byte = if i < 16 {
                (*byte & 0xf0) | 8
            } else {
                (*byte & 0x0f) | 0x80
            };
        }
    }
    let w = Q4Matrix {
        rows: out_rows,
        cols,
        codes,
        scales: (0..out_rows * nb).map(|_| rng.f32() * 0.1).collect(),
    };
    let x = random_activations(&mut rng, rows, cols);
    let mut got = vec![0f32; rows * out_rows];
    scalar::gemm_q4_q8(&x, &w, &mut got);
    let wf = w.dequantize();
    for r in 0..rows {
        for o in 0..out_rows {
            let want: f64 = (0..cols)
                .map(|c| {
                    x.qs[r * nb * BLOCK + c] as f64
                        * x.scales[r * nb + c / BLOCK] as f64
                        * wf[o * cols + c] as f64
                })
                .sum();
            let g = got[r * out_rows + o] as f64;
            assert!(
                (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                "({r},{o}): {g} vs {want}"
            );
        }
    }
}

macro_rules! isa_tests {
    ($isa:expr, $arch:literal, $dots:ident, $gemm:ident) => {
        #[test]
        #[cfg_attr(not(target_arch = $arch), ignore = "kernels of another architecture")]
        fn $dots() {
            if let Some(k) = kernels_or_skip($isa) {
                check_block_dots(&k);
            }
        }

        #[test]
        #[cfg_attr(not(target_arch = $arch), ignore = "kernels of another architecture")]
        fn $gemm() {
            if let Some(k) = kernels_or_skip($isa) {
                check_gemm(&k);
                check_block_dots_q4(&k);
                check_gemm_q4(&k);
            }
        }
    };
}

isa_tests!(
    Isa::Avx2,
    "x86_64",
    avx2_block_dots_bit_exact,
    avx2_gemm_within_bound
);
isa_tests!(
    Isa::AvxVnni,
    "x86_64",
    avxvnni_block_dots_bit_exact,
    avxvnni_gemm_within_bound
);
isa_tests!(
    Isa::Avx512Vnni,
    "x86_64",
    avx512vnni_block_dots_bit_exact,
    avx512vnni_gemm_within_bound
);
isa_tests!(
    Isa::Neon,
    "aarch64",
    neon_block_dots_bit_exact,
    neon_gemm_within_bound
);
isa_tests!(
    Isa::Dotprod,
    "aarch64",
    dotprod_block_dots_bit_exact,
    dotprod_gemm_within_bound
);
isa_tests!(
    Isa::I8mm,
    "aarch64",
    i8mm_block_dots_bit_exact,
    i8mm_gemm_within_bound
);

#[test]
fn minus_128_is_rejected_by_the_format() {
    let mut bytes =
        vec![0u8; moe_edge_kernels::q8::q8_bytes(1, 32, moe_edge_kernels::q8::ScaleType::F32)];
    assert!(Q8Matrix::from_bytes(&bytes, 1, 32, moe_edge_kernels::q8::ScaleType::F32).is_some());
    bytes[3] = 0x80;
    assert!(Q8Matrix::from_bytes(&bytes, 1, 32, moe_edge_kernels::q8::ScaleType::F32).is_none());
}

#[test]
fn dispatch_picks_a_supported_isa_and_honours_the_override() {
    let chosen = moe_edge_kernels::kernels().isa;
    assert!(chosen.is_supported());
    let avail = moe_edge_kernels::available();
    match std::env::var("MOE_EDGE_ISA")
        .ok()
        .and_then(|n| Isa::from_name(&n))
        .filter(|i| i.is_supported())
    {
        Some(forced) => assert_eq!(chosen, forced),
        None => assert_eq!(Some(&chosen), avail.last()),
    }
    eprintln!(
        "ISAs supported here: {:?}; chosen: {}",
        avail.iter().map(|i| i.name()).collect::<Vec<_>>(),
        chosen.name()
    );
}
