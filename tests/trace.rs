//! `--trace`: the routing written by `perplexity`, `generate` and `chat` is torch's routing of the
//! kit's Mixtral (`tools/routing_fixture.py`), and for packed models its in-memory flags add up
//! to the expert cache's misses.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    scratch_dir("trace", name)
}

fn read_trace(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn kit_ids() -> Vec<i64> {
    read_npy::<i64>(&fixtures().join("hf-moe/inputs/input_ids_3.npy"))
        .iter()
        .copied()
        .collect()
}

#[test]
fn perplexity_trace_is_torchs_routing() {
    let dir = scratch("torch");
    let text = dir.join("kit.txt");
    let words: Vec<String> = kit_ids().iter().map(|i| format!("t{i}")).collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let trace = dir.join("routing.jsonl");
    let tiny = tiny_model();
    run_ok(&[
        "perplexity",
        "-m",
        tiny.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--context",
        "32",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let lines = read_trace(&trace);
    let torch: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("hf-moe/models/mixtral/torch_routing_3.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(lines.len(), 32 * 2, "one line per position and layer");
    for line in &lines {
        assert_eq!(line["text"], "kit");
        assert_eq!(line["start"], 0);
        assert!(
            line.get("resident").is_none(),
            "f32 experts are always in memory"
        );
        let (p, l) = (
            line["position"].as_u64().unwrap() as usize,
            line["layer"].as_u64().unwrap() as usize,
        );
        let want_e = &torch["layers"][l]["experts"][p];
        let want_w = &torch["layers"][l]["weights"][p];
        assert_eq!(&line["experts"], want_e, "position {p} layer {l}");
        for (g, w) in line["weights"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want_w.as_array().unwrap())
        {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() < 1e-5, "position {p} layer {l}: {g} vs {w}");
        }
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "no temporary file left"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_trace_of_a_pack_counts_the_cache_misses() {
    let dir = scratch("pack");
    let pack = dir.join("int8");
    let tiny = tiny_model();
    run_ok(&["pack", tiny.to_str().unwrap(), "-o", pack.to_str().unwrap()]);
    let trace = dir.join("routing.jsonl");
    let out = run_ok(&[
        "generate",
        "-m",
        pack.to_str().unwrap(),
        "--prompt-ids",
        "10,20,30",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--expert-cache-mb",
        "1",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines = read_trace(&trace);
    // the prompt's 3 positions, then one per decode step but the last token's
    assert_eq!(lines.len(), (3 + 5) * 2);
    // one call routes the prompt, then one call per token: a miss is an expert of a call that
    // was not in memory when the call routed
    let mut misses = 0;
    for layer in 0..2 {
        let mut calls: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 6];
        for line in lines.iter().filter(|l| l["layer"] == layer) {
            let p = line["position"].as_u64().unwrap() as usize;
            let call = p.saturating_sub(2);
            for (e, r) in line["experts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(line["resident"].as_array().unwrap())
            {
                if !r.as_bool().unwrap() {
                    calls[call].insert(e.as_u64().unwrap());
                }
            }
        }
        misses += calls.iter().map(|c| c.len()).sum::<usize>();
    }
    assert_eq!(misses as u64, j["cache"]["misses"].as_u64().unwrap());
    assert!(misses > 0 && j["cache"]["hits"].as_u64().unwrap() > 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chat_trace_covers_every_fed_position() {
    let dir = scratch("chat");
    let model = chat_model("trace");
    let trace = dir.join("routing.jsonl");
    let mut child = moe_edge_cmd()
        .args([
            "chat",
            "-m",
            model.to_str().unwrap(),
            "--max-tokens",
            "5",
            "--trace",
            trace.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = read_trace(&trace);
    for layer in 0..2 {
        let positions: Vec<u64> = lines
            .iter()
            .filter(|l| l["layer"] == layer)
            .map(|l| l["position"].as_u64().unwrap())
            .collect();
        assert!(positions.len() > 5, "prompt and reply: {positions:?}");
        let want: Vec<u64> = (0..positions.len() as u64).collect();
        assert_eq!(
            positions, want,
            "layer {layer}: positions in order, each once"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn a_trace_that_cannot_be_written_is_named() {
    let tiny = tiny_model();
    let out = moe_edge_cmd()
        .args([
            "generate",
            "-m",
            tiny.to_str().unwrap(),
            "--prompt-ids",
            "10,20",
            "--max-tokens",
            "2",
            "--trace",
            "/nonexistent-dir/routing.jsonl",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent-dir/"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn adaptive_top_k_keeps_torchs_first_choice() {
    let dir = scratch("adaptive");
    let text = dir.join("kit.txt");
    let words: Vec<String> = kit_ids().iter().map(|i| format!("t{i}")).collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let torch: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("hf-moe/models/mixtral/torch_routing_3.json")).unwrap(),
    )
    .unwrap();
    let tiny = tiny_model();
    let run = |extra: &[&str], trace: &Path| -> Value {
        let mut args = vec![
            "perplexity",
            "-m",
            tiny.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
            "--context",
            "32",
            "--json",
            "--trace",
            trace.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        serde_json::from_slice(&run_ok(&args).stdout).unwrap()
    };
    let base = run(&[], &dir.join("base.jsonl"));
    assert_eq!(base["routing"]["skipped_slots"], 0);
    assert_eq!(base["routing"]["routed_slots"], 32 * 2 * 2);
    // every weight is at least 0: nothing is skipped and nothing changes
    let zero = run(&["--min-expert-weight", "0"], &dir.join("zero.jsonl"));
    assert_eq!(zero["all"]["perplexity"], base["all"]["perplexity"]);
    // renormalised top-2: the second weight is below 0.5, so only the first choice runs, with
    // weight 1 (the two weights summed to 1); in layer 0 that is torch's first choice
    for (flag, value) in [("--min-expert-weight", "0.5"), ("--top-p-experts", "0.5")] {
        let trace = dir.join("half.jsonl");
        let j = run(&[flag, value], &trace);
        assert_eq!(j["routing"]["skipped_slots"], 64, "{flag}");
        assert_eq!(j["routing"]["routed_slots"], 64, "{flag}");
        assert_ne!(j["all"]["perplexity"], base["all"]["perplexity"]);
        for line in read_trace(&trace) {
            let (p, l) = (
                line["position"].as_u64().unwrap() as usize,
                line["layer"].as_u64().unwrap(),
            );
            assert_eq!(line["experts"].as_array().unwrap().len(), 1, "{flag}");
            // layer 0 sees the same hidden states as torch did; later layers see the output of
            // a block that ran one expert per token
            if l == 0 {
                assert_eq!(
                    line["experts"][0], torch["layers"][0]["experts"][p][0],
                    "{flag}: position {p}"
                );
            }
            let w = line["weights"].as_array().unwrap();
            assert_eq!(w.len(), 1, "{flag}");
            assert!((w[0].as_f64().unwrap() - 1.0).abs() < 1e-6, "{flag}: {w:?}");
        }
    }
    let out = moe_edge_cmd()
        .args([
            "perplexity",
            "-m",
            tiny.to_str().unwrap(),
            "-f",
            text.to_str().unwrap(),
        ])
        .args(["--top-p-experts", "1.5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expert top-p 1.5 is outside (0, 1]"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
