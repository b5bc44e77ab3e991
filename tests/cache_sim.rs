//! `moe-edge cache-sim` against the cache it simulates: a trace recorded by a real
//! single-threaded run, replayed at that run's budget and policy, gives the run's own hits and
//! misses, for every policy and with hot experts pinned.

mod common;

use common::*;

/// The trained model shipped in `models/`, a pack.
fn model() -> String {
    workspace_root()
        .join("models/moe-edge-mini")
        .to_string_lossy()
        .into_owned()
}

/// Hits and misses of a real run: `generate` on one thread with a 3 MiB expert cache (about a
/// seventh of the trained model's experts), writing its routing trace.
fn real_run(trace: &str, policy: &str, pin: Option<&str>) -> (u64, u64) {
    let model = model();
    let mut cmd = moe_edge_cmd();
    cmd.args([
        "--threads",
        "1",
        "generate",
        "-m",
        &model,
        "--prompt",
        "fn main() {",
    ])
    .args([
        "--max-tokens",
        "80",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--ignore-eos",
    ])
    .args([
        "--expert-cache-mb",
        "3",
        "--cache-policy",
        policy,
        "--trace",
        trace,
        "--json",
    ]);
    if let Some(p) = pin {
        cmd.args(["--pin-hot", p, "--pin-share", "0.5"]);
    }
    let out = json_output(&mut cmd);
    let cache = &out["cache"];
    (
        cache["hits"].as_u64().unwrap(),
        cache["misses"].as_u64().unwrap(),
    )
}

fn simulated(trace: &str, policy: &str, pin: Option<&str>) -> Vec<serde_json::Value> {
    simulated_with(trace, policy, pin, &[])
}

fn simulated_with(
    trace: &str,
    policy: &str,
    pin: Option<&str>,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let model = model();
    let mut args = vec![
        "cache-sim",
        "-m",
        &model,
        "--trace",
        trace,
        "--budget-mb",
        "3",
    ];
    args.extend(["--policies", policy, "--json"]);
    if let Some(p) = pin {
        args.extend(["--pin-hot", p]);
    }
    args.extend(extra);
    json_lines(&args)
}

/// The JSON objects `moe-edge ARGS` prints, a line each.
fn json_lines(args: &[&str]) -> Vec<serde_json::Value> {
    String::from_utf8(run_ok(args).stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_replayed_trace_gives_the_hits_and_misses_of_the_run_that_recorded_it() {
    let dir = scratch_dir("cache-sim", "replay");
    for policy in ["lru", "layer-cycle", "frequency", "layer-cycle-frequency"] {
        let trace = dir.join(format!("{policy}.jsonl"));
        let trace = trace.to_str().unwrap();
        let (hits, misses) = real_run(trace, policy, None);
        assert!(
            misses > 0 && hits > 0,
            "{policy}: {hits} hits, {misses} misses"
        );
        let rows = simulated(trace, policy, None);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["policy"], policy);
        assert_eq!(
            (
                rows[0]["hits"].as_u64().unwrap(),
                rows[0]["misses"].as_u64().unwrap()
            ),
            (hits, misses),
            "{policy}"
        );
        if policy == "frequency" {
            // the half-life the run used (the default) is the one replayed; another changes hits
            let other = simulated_with(trace, policy, None, &["--half-life-tokens", "1"]);
            assert_ne!(
                other[0]["hits"], rows[0]["hits"],
                "--half-life-tokens took no effect"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pinned_hot_experts_are_replayed_as_pin_hot_keeps_them() {
    let dir = scratch_dir("cache-sim", "pin");
    let profile = dir.join("profile.json");
    let profile = profile.to_str().unwrap();
    let (model, readme) = (model(), workspace_root().join("README.md"));
    let readme = readme.to_str().unwrap();
    run_ok(&[
        "profile",
        "-m",
        &model,
        "-f",
        readme,
        "-o",
        profile,
        "--max-tokens",
        "400",
    ]);
    let trace = dir.join("pinned.jsonl");
    let trace = trace.to_str().unwrap();
    let (hits, misses) = real_run(trace, "layer-cycle", Some(profile));
    let rows = simulated(trace, "layer-cycle", Some(profile));
    assert_eq!(rows.len(), 2, "without and with pinning");
    assert_eq!(rows[1]["policy"], "layer-cycle + pin-hot");
    assert!(rows[1]["pinned_experts"].as_u64().unwrap() > 0);
    assert_eq!(
        (
            rows[1]["hits"].as_u64().unwrap(),
            rows[1]["misses"].as_u64().unwrap()
        ),
        (hits, misses)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn uniform_routing_and_bad_input() {
    let model = model();
    let tiny = tiny_model();
    let uniform = [
        "cache-sim",
        "-m",
        &model,
        "--uniform-tokens",
        "50",
        "--json",
    ];
    let rows = json_lines(&uniform);
    // 3 budgets x 4 policies; 50 tokens x 6 layers x top-2 requests each
    assert_eq!(rows.len(), 12);
    for r in &rows {
        assert_eq!(
            r["hits"].as_u64().unwrap() + r["misses"].as_u64().unwrap(),
            600
        );
    }
    // the seed chooses the routing: the same seed replays the same, another does not
    let hits = |seed: &str| {
        let mut args = uniform.to_vec();
        args.extend(["--seed", seed, "--budgets", "0.25", "--policies", "lru"]);
        json_lines(&args)[0]["hits"].as_u64().unwrap()
    };
    assert_eq!(hits("1"), hits("1"));
    assert_ne!(hits("1"), hits("2"));
    let dir = scratch_dir("cache-sim", "bad");
    let trace = dir.join("t.jsonl");
    std::fs::write(&trace, "{\"position\":0,\"layer\":9,\"experts\":[1,2]}\n").unwrap();
    let t = trace.to_str().unwrap();
    let err = run_err(&["cache-sim", "-m", &model, "--trace", t]);
    assert!(
        err.contains("line 1: the model has no MoE block at layer 9"),
        "{err}"
    );
    std::fs::write(&trace, "{\"position\":0,\"layer\":0,\"experts\":[1,99]}\n").unwrap();
    let err = run_err(&["cache-sim", "-m", &model, "--trace", t]);
    assert!(err.contains("expert 99 of block 0"), "{err}");
    std::fs::write(&trace, "not json\n").unwrap();
    let err = run_err(&["cache-sim", "-m", &model, "--trace", t]);
    assert!(err.contains("line 1: not JSON"), "{err}");
    let err = run_err(&[
        "cache-sim",
        "-m",
        &model,
        "--uniform-tokens",
        "5",
        "--budgets",
        "1.5",
    ]);
    assert!(err.contains("--budgets: 1.5 is outside (0, 1]"), "{err}");
    let err = run_err(&[
        "cache-sim",
        "-m",
        tiny.to_str().unwrap(),
        "--uniform-tokens",
        "5",
    ]);
    assert!(err.contains("is not a packed model"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
