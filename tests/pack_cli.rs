//! `moe-edge pack` end to end: the packed directory generates through the CLI with a cache.

mod common;

use common::*;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-edge-pack-cli-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

#[test]
fn pack_cli_writes_a_model_that_generates() {
    let out = scratch("cli");
    let status = moe_edge_cmd()
        .args([
            "pack",
            tiny_model().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--experts",
            "f16",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let j = json_output(moe_edge_cmd().args([
        "generate",
        "-m",
        out.to_str().unwrap(),
        "--prompt",
        "t10 t20",
        "--max-tokens",
        "8",
        "--json",
        "--verify",
        "--expert-cache-mb",
        "1",
    ]));
    assert_cache_keys(&j["cache"]);
    assert_eq!(j["cache"]["budget_bytes"], 1 << 20);
    std::fs::remove_dir_all(&out).ok();
}

/// `--prefetch` reaches the cache: experts are read ahead and used, and the tokens are the ones
/// generated without it.
#[test]
fn prefetch_flag_reads_experts_ahead_without_changing_tokens() {
    let model = workspace_root().join("models/moe-edge-mini");
    let run = |prefetch: bool| {
        let mut cmd = moe_edge_cmd();
        cmd.args([
            "generate",
            "-m",
            model.to_str().unwrap(),
            "--prompt",
            "fn main() {",
        ])
        .args(["--max-tokens", "40", "--expert-cache-mb", "3", "--json"]);
        if prefetch {
            cmd.arg("--prefetch");
        }
        json_output(&mut cmd)
    };
    let (off, on) = (run(false), run(true));
    assert_eq!(off["generated_ids"], on["generated_ids"]);
    assert_eq!(off["cache"]["prefetched"], 0);
    let c = &on["cache"];
    assert!(c["prefetched"].as_u64().unwrap() > 0, "{c}");
    assert!(c["prefetch_used"].as_u64().unwrap() > 0, "{c}");
}
