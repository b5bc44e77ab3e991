//! Shared helpers of the integration tests: fixture paths and array I/O.
//!
//! Fixtures under `tests/fixtures/` are copies of the HF-MoE kits (real ONNX exports of tiny
//! random-weight MoE models, with PyTorch ground truth); see `tests/fixtures/README.md`.
#![allow(dead_code)]

use std::path::PathBuf;

use ndarray_npy::{NpzReader, ReadNpyExt};
use tract_onnx::tract_core::ndarray::ArrayD;

/// The five architectures whose R1 exports moe-edge supports.
pub const ARCHS: [&str; 5] = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe"];

/// Acceptance bound against torch fp32 (onnxruntime itself is within 2.2e-6).
pub const TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn read_npy<T: ndarray_npy::ReadableElement>(path: &std::path::Path) -> ArrayD<T> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ArrayD::<T>::read_npy(f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_npz<T: ndarray_npy::ReadableElement>(path: &std::path::Path, key: &str) -> ArrayD<T> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut npz = NpzReader::new(f).unwrap();
    npz.by_name(key)
        .unwrap_or_else(|e| panic!("{}[{key}]: {e}", path.display()))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Path of an R1 export of the kit: `hf-moe/models/<arch>/<method>/model.onnx`.
pub fn kit_export(arch: &str, method: &str) -> PathBuf {
    fixtures()
        .join("hf-moe/models")
        .join(arch)
        .join(method)
        .join("model.onnx")
}

/// Asserts that a JSON `cache` object has the documented counters.
pub fn assert_cache_keys(cache: &serde_json::Value) {
    for key in [
        "hits",
        "misses",
        "bytes_loaded",
        "evictions",
        "peak_resident_bytes",
        "budget_bytes",
    ] {
        assert!(
            cache[key].is_u64(),
            "cache.{key} missing or not a count in {cache}"
        );
    }
}

/// A command running the `moe-edge` binary; under emulation (no binfmt_misc), the runner named
/// by `MOE_EDGE_TEST_RUNNER` (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`) is put in front.
pub fn moe_edge_cmd() -> std::process::Command {
    let bin = env!("CARGO_BIN_EXE_moe-edge");
    match std::env::var("MOE_EDGE_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut c = std::process::Command::new(parts.next().unwrap());
            c.args(parts).arg(bin);
            c
        }
        _ => std::process::Command::new(bin),
    }
}

/// Runs `cmd`, asserts it succeeded (showing its stderr if not) and parses its stdout as JSON.
pub fn json_output(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().expect("run moe-edge");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}
