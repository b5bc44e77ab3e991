//! The trained model shipped in `models/moe-edge-mini` (int8 experts, f32 dense layers)
//! against torch's f32 checkpoint: per language, its perplexity over the start of the held-out
//! text is torch's within the bound its quantisation was measured at, and the model has learnt
//! the languages (far below the perplexity of a uniform guess over its 8192 tokens).
//!
//! `tests/fixtures/moe-edge-mini/` was written by `tools/train_moe.py fixture` from the same
//! checkpoint: one 256-token window of each language's held-out text and torch's perplexity over
//! it, scored as `moe-edge perplexity` and llama-perplexity score.

mod common;

use common::*;

/// The int8 experts measured 0.01-0.44% from torch's f32 perplexity on these windows (AVX-512
/// VNNI kernels); 2% leaves room for other kernels' rounding, and a broken kernel or layout moves
/// perplexity by far more.
const BOUND: f64 = 0.02;

#[test]
fn trained_model_perplexity_matches_torch_per_language() {
    let dir = fixtures().join("moe-edge-mini");
    let torch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("torch.json")).unwrap()).unwrap();
    let langs: Vec<String> = torch["per_language"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(langs.len(), 10);
    let model = workspace_root().join("models").join("moe-edge-mini");
    let mut args = vec![
        "perplexity".to_string(),
        "-m".into(),
        model.to_str().unwrap().into(),
        "--context".into(),
        "256".into(),
        "--json".into(),
    ];
    for lang in &langs {
        args.push("-f".into());
        args.push(dir.join(format!("{lang}.txt")).to_str().unwrap().into());
    }
    let out = moe_edge_cmd().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        j["bos_first"], true,
        "the byte-level BPE starts texts with BOS"
    );
    for (lang, got) in langs.iter().zip(j["texts"].as_array().unwrap()) {
        let want = &torch["per_language"][lang];
        assert_eq!(got["label"], lang.as_str());
        assert_eq!(
            got["tokens"], want["tokens"],
            "{lang}: same tokenisation as torch's"
        );
        assert_eq!(got["scored"], want["scored"], "{lang}");
        let (g, w) = (
            got["perplexity"].as_f64().unwrap(),
            want["perplexity"].as_f64().unwrap(),
        );
        assert!(
            (g / w - 1.0).abs() < BOUND,
            "{lang}: moe-edge int8 {g:.3}, torch f32 {w:.3}"
        );
        assert!(g < 300.0, "{lang}: perplexity {g} is near a guess");
    }
}
