//! Helpers of the command-line tests: the fixtures (shared with the engine's tests) and running
//! the `moe-edge` binary.
#![allow(dead_code)]

mod fixtures;

pub use fixtures::*;

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

/// An empty scratch directory for one test, named after the test file's `tag`, the test's `name`
/// and the process.
pub fn scratch_dir(tag: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-edge-{tag}-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `moe-edge ARGS`, asserts it succeeded (showing its stderr if not) and returns its output.
pub fn run_ok(args: &[&str]) -> std::process::Output {
    let out = moe_edge_cmd().args(args).output().expect("run moe-edge");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `moe-edge ARGS`, asserts it failed with exit code 1 and without a panic, and returns its
/// stderr (the error message).
pub fn run_err(args: &[&str]) -> String {
    let out = moe_edge_cmd().args(args).output().expect("run moe-edge");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}
