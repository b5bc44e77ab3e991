//! Matrix-vector throughput of the int8 and int4 kernels per ISA, in GB/s of weight bytes streamed
//! (as stored: int8 or int4 values and f16 scales),
//! next to this machine's read bandwidth measured by the same binary (a streaming-read probe).
//!
//! `cargo bench -p moe-edge-kernels` (optionally `-- --quick`). Matrices: one that fits in L2
//! (1024 x 1024) and one far larger than the last-level cache (16384 x 8192, 128 MiB int8).
//! Threads split the output rows. Each figure is the median of interleaved rounds.

use std::hint::black_box;
use std::time::Instant;

use moe_edge_kernels::q4::{q4_bytes, quantize_q4, Q4Matrix};
use moe_edge_kernels::q8::{q8_bytes, quantize, Q8Activations, Q8Matrix, ScaleType};
use moe_edge_kernels::{available, for_isa, Kernels};

fn weights(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn matrix(rows: usize, cols: usize) -> Q8Matrix {
    let w = weights(rows, cols);
    let mut buf = vec![0u8; q8_bytes(rows, cols, ScaleType::F16)];
    quantize(&w, rows, cols, ScaleType::F16, &mut buf);
    Q8Matrix::from_bytes(&buf, rows, cols, ScaleType::F16).unwrap()
}

fn matrix_q4(rows: usize, cols: usize) -> Q4Matrix {
    let w = weights(rows, cols);
    let mut buf = vec![0u8; q4_bytes(rows, cols)];
    quantize_q4(&w, rows, cols, &mut buf);
    Q4Matrix::from_bytes(&buf, rows, cols).unwrap()
}

/// Splits the int4 `w` into `threads` row bands (built once).
fn bands_q4(w: &Q4Matrix, threads: usize) -> Vec<Q4Matrix> {
    let nb = w.blocks_per_row();
    let per = w.rows.div_ceil(threads);
    (0..threads)
        .map(|t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(w.rows));
            Q4Matrix {
                rows: r1 - r0,
                cols: w.cols,
                codes: w.codes[r0 * nb * 16..r1 * nb * 16].to_vec(),
                scales: w.scales[r0 * nb..r1 * nb].to_vec(),
            }
        })
        .collect()
}

fn gemv_q4_seconds(k: &Kernels, x: &Q8Activations, bands: &[Q4Matrix], reps: usize) -> f64 {
    let mut outs: Vec<Vec<f32>> = bands.iter().map(|b| vec![0f32; b.rows]).collect();
    let t = Instant::now();
    for _ in 0..reps {
        std::thread::scope(|s| {
            for (b, o) in bands.iter().zip(outs.iter_mut()) {
                s.spawn(move || k.gemm_q4_q8(x, b, o));
            }
        });
        black_box(&outs);
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// Splits `w` into `threads` row bands (built once).
fn bands(w: &Q8Matrix, threads: usize) -> Vec<Q8Matrix> {
    let nb = w.blocks_per_row();
    let per = w.rows.div_ceil(threads);
    (0..threads)
        .map(|t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(w.rows));
            Q8Matrix {
                rows: r1 - r0,
                cols: w.cols,
                qs: w.qs[r0 * nb * 32..r1 * nb * 32].to_vec(),
                scales: w.scales[r0 * nb..r1 * nb].to_vec(),
            }
        })
        .collect()
}

fn gemv_seconds(k: &Kernels, x: &Q8Activations, bands: &[Q8Matrix], reps: usize) -> f64 {
    let mut outs: Vec<Vec<f32>> = bands.iter().map(|b| vec![0f32; b.rows]).collect();
    let t = Instant::now();
    for _ in 0..reps {
        std::thread::scope(|s| {
            for (b, o) in bands.iter().zip(outs.iter_mut()) {
                s.spawn(move || k.gemm_q8_q8(x, b, o));
            }
        });
        black_box(&outs);
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// Read bandwidth: `threads` threads summing disjoint parts of a large array of u64.
fn read_probe_gbs(data: &[u64], threads: usize) -> f64 {
    let per = data.len() / threads;
    let t = Instant::now();
    let sums: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = data
            .chunks(per)
            .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &v| a.wrapping_add(v))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    black_box(sums);
    (data.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 3 } else { 7 };
    let probe: Vec<u64> = (0..(if quick { 1 << 25 } else { 1 << 27 }))
        .map(|i| i as u64)
        .collect();
    let cases = [
        ("fits in cache", 1024usize, 1024usize, 400usize),
        ("far beyond LLC", 16384, 8192, 3),
    ];
    println!(
        "{:<16} {:<16} {:>7} {:>10} {:>14}",
        "matrix", "kernel", "threads", "GB/s", "% of read bw"
    );
    for threads in [1usize, 2] {
        let read_bw = median(
            (0..rounds)
                .map(|_| read_probe_gbs(&probe, threads))
                .collect(),
        );
        println!(
            "{:<16} {:<16} {threads:>7} {read_bw:>10.1} {:>14}",
            "read probe", "u64 sum", "100%"
        );
        for &(label, rows, cols, reps) in &cases {
            let w = matrix(rows, cols);
            let parts = bands(&w, threads);
            let x = Q8Activations::quantize(
                &(0..cols)
                    .map(|i| (i as f32 * 0.37).sin())
                    .collect::<Vec<_>>(),
                1,
                cols,
            );
            let bytes = (w.qs.len() + w.scales.len() * 2) as f64; // int8 values + f16 scales as stored
            let w4 = matrix_q4(rows, cols);
            let parts4 = bands_q4(&w4, threads);
            let bytes4 = (w4.codes.len() + w4.scales.len() * 2) as f64;
            let kernels: Vec<Kernels> = available().into_iter().filter_map(for_isa).collect();
            let mut times: Vec<Vec<f64>> = vec![vec![]; kernels.len()];
            let mut times4: Vec<Vec<f64>> = vec![vec![]; kernels.len()];
            for _ in 0..rounds {
                for ((k, t), t4) in kernels.iter().zip(times.iter_mut()).zip(times4.iter_mut()) {
                    t.push(gemv_seconds(k, &x, &parts, reps));
                    t4.push(gemv_q4_seconds(k, &x, &parts4, reps));
                }
            }
            for ((k, t), t4) in kernels.iter().zip(times).zip(times4) {
                for (kind, b, t) in [("int8", bytes, t), ("int4", bytes4, t4)] {
                    let gbs = b / median(t) / 1e9;
                    println!(
                        "{label:<16} {:<16} {threads:>7} {gbs:>10.1} {:>13.0}%",
                        format!("{} {kind}", k.isa.name()),
                        100.0 * gbs / read_bw
                    );
                }
            }
        }
    }
}
