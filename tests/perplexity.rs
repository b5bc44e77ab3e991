//! `moe-edge perplexity` against torch: the perplexity of the kit's Mixtral over a token sequence
//! equals the one computed here from torch's logits, and the KL divergence / top-1 agreement
//! against torch's logits (written as a base file here) are those computed here.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn scratch(name: &str) -> PathBuf {
    scratch_dir("ppl", name)
}

/// The kit's 32-token input as text for the tiny model's word-level tokenizer (`t<id>`), and
/// torch's logits for it `[32, 512]`.
fn sequence(dir: &Path) -> (PathBuf, Vec<i64>, Vec<Vec<f64>>) {
    let ids = read_npy::<i64>(&fixtures().join("hf-moe/inputs/input_ids_3.npy"));
    let ids: Vec<i64> = ids.iter().copied().collect();
    let text: Vec<String> = ids.iter().map(|i| format!("t{i}")).collect();
    let path = dir.join("kit.txt");
    std::fs::write(&path, text.join(" ")).unwrap();
    let logits = read_npy::<f32>(&fixtures().join("hf-moe/models/mixtral/torch_logits_3.npy"));
    let vocab = logits.shape()[2];
    let rows = logits
        .as_slice()
        .unwrap()
        .chunks(vocab)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    (path, ids, rows)
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    row.iter().map(|v| v - lse).collect()
}

fn run_json(args: &[&str]) -> serde_json::Value {
    json_output(moe_edge_cmd().args(args))
}

fn tiny() -> String {
    tiny_model().to_str().unwrap().to_string()
}

/// Writes a base-logits file in the documented format (magic, header length, JSON header, f32
/// rows) from torch's logits of the scored positions: one window of 32, logits 16..31 scored.
fn write_torch_base(path: &Path, ids: &[i64], torch: &[Vec<f64>]) {
    let header = serde_json::json!({
        "model": "torch",
        "vocab": torch[0].len(),
        "context": 32,
        "stride": 32,
        "texts": [{"label": "kit", "ids": ids, "scored": 15}],
    });
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = b"moe-edge-logits\x01".to_vec();
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for row in &torch[16..31] {
        for &v in row {
            bytes.extend_from_slice(&(v as f32).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn perplexity_equals_the_one_from_torchs_logits() {
    let dir = scratch("torch");
    let (text, ids, torch) = sequence(&dir);
    // one window of 32 (llama-perplexity's scheme): logits 16..31 scored against the next token
    let nll: Vec<f64> = (16..31)
        .map(|p| -log_softmax(&torch[p])[ids[p + 1] as usize])
        .collect();
    let want = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
    let j = run_json(&[
        "perplexity",
        "-m",
        &tiny(),
        "-f",
        text.to_str().unwrap(),
        "--context",
        "32",
        "--json",
    ]);
    let got = j["all"]["perplexity"].as_f64().unwrap();
    assert_eq!(j["all"]["scored"], 15);
    assert_eq!(j["texts"][0]["label"], "kit");
    assert_eq!(
        j["bos_first"], false,
        "the word-level tokenizer adds no BOS"
    );
    assert!(
        (got / want - 1.0).abs() < 1e-5,
        "moe-edge {got}, torch {want}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kl_and_top1_against_torchs_logits() {
    let dir = scratch("kl");
    let (text, ids, torch) = sequence(&dir);
    let base = dir.join("torch.logits");
    write_torch_base(&base, &ids, &torch);
    let args = |model: &str| {
        run_json(&[
            "perplexity",
            "-m",
            model,
            "-f",
            text.to_str().unwrap(),
            "--context",
            "32",
            "--kl-base",
            base.to_str().unwrap(),
            "--json",
        ])
    };
    // the f32 model is torch's within float noise
    let j = args(&tiny());
    assert!(j["all"]["kl"]["max"].as_f64().unwrap() < 1e-9, "{j}");
    assert_eq!(j["all"]["top1_agreement"], 1.0);
    assert!((j["all"]["perplexity_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    // int8 experts: the KL is the one computed here from the pack's own logits
    let pack = dir.join("int8");
    let status = moe_edge_cmd()
        .args([
            "pack",
            &tiny(),
            "-o",
            pack.to_str().unwrap(),
            "--experts",
            "int8",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let npy = dir.join("int8.npy");
    let status = moe_edge_cmd()
        .args([
            "logits",
            "-m",
            pack.to_str().unwrap(),
            "--input",
            fixtures()
                .join("hf-moe/inputs/input_ids_3.npy")
                .to_str()
                .unwrap(),
            "--output",
            npy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let int8 = read_npy::<f32>(&npy);
    let int8: Vec<Vec<f64>> = int8
        .as_slice()
        .unwrap()
        .chunks(torch[0].len())
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let mut kl = vec![];
    let mut same = 0;
    for p in 16..31 {
        // the base file holds f32 values, as torch's logits were
        let b: Vec<f64> = torch[p].iter().map(|&v| v as f32 as f64).collect();
        let (lb, lq) = (log_softmax(&b), log_softmax(&int8[p]));
        kl.push(
            lb.iter()
                .zip(&lq)
                .map(|(b, q)| b.exp() * (b - q))
                .sum::<f64>(),
        );
        let top = |v: &[f64]| (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m });
        same += usize::from(top(&lb) == top(&lq));
    }
    let j = args(pack.to_str().unwrap());
    let mean = kl.iter().sum::<f64>() / kl.len() as f64;
    let got = j["all"]["kl"]["mean"].as_f64().unwrap();
    assert!(mean > 0.0);
    assert!(
        (got / mean - 1.0).abs() < 1e-6,
        "KL {got}, computed here {mean}"
    );
    let top1 = j["all"]["top1_agreement"].as_f64().unwrap();
    assert!(
        (top1 - same as f64 / 15.0).abs() < 1e-12,
        "{top1} vs {same}/15"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_logits_then_compare_round_trip() {
    let dir = scratch("save");
    let (text, _, _) = sequence(&dir);
    let saved = dir.join("base.logits");
    let t = text.to_str().unwrap();
    let m = tiny();
    let s = saved.to_str().unwrap();
    run_json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        t,
        "-c",
        "16",
        "--stride",
        "8",
        "--save-logits",
        s,
        "--json",
    ]);
    // windows at 0, 8 and 16, each scoring the last 8 tokens of the window: 3 x 8 rows
    let bytes = std::fs::read(&saved).unwrap();
    let header = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 24 + header + 24 * 512 * 4);
    let j = run_json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        t,
        "-c",
        "16",
        "--stride",
        "8",
        "--kl-base",
        s,
        "--json",
    ]);
    assert_eq!(j["all"]["kl"]["max"], 0.0);
    assert_eq!(j["all"]["scored"], 24);
    assert_eq!(j["all"]["perplexity"], j["all"]["base_perplexity"]);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        2,
        "no temporary file left"
    );
    // --max-windows: the first window only
    let j = run_json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        t,
        "-c",
        "16",
        "--stride",
        "8",
        "--max-windows",
        "1",
        "--json",
    ]);
    assert_eq!(j["all"]["scored"], 8);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_named() {
    let dir = scratch("bad");
    let (text, _, _) = sequence(&dir);
    let t = text.to_str().unwrap();
    let m = tiny();
    let e = run_err(&["perplexity", "-m", &m, "-f", t, "--context", "64"]);
    assert!(
        e.contains("kit.txt has 32 tokens, fewer than one window of 64"),
        "{e}"
    );
    let e = run_err(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        t,
        "--context",
        "16",
        "--stride",
        "0",
    ]);
    assert!(
        e.contains("--stride must be between 1 and the context"),
        "{e}"
    );
    let e = run_err(&["perplexity", "-m", &m, "-f", t, "--max-windows", "0"]);
    assert!(e.contains("--max-windows must be at least 1"), "{e}");
    let e = run_err(&["perplexity", "-m", &m, "-f", t, "--context", "100000"]);
    assert!(e.contains("longer than the model's context"), "{e}");
    let missing = dir.join("missing.txt");
    let e = run_err(&["perplexity", "-m", &m, "-f", missing.to_str().unwrap()]);
    assert!(e.contains("missing.txt"), "{e}");

    // a base saved over other text, a truncated base, and something that is not a base
    let other = dir.join("other.txt");
    std::fs::write(
        &other,
        "t5 t6 t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t17 t18 t19 t20",
    )
    .unwrap();
    let base = dir.join("other.logits");
    let b = base.to_str().unwrap();
    let o = other.to_str().unwrap();
    run_json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        o,
        "-c",
        "16",
        "--save-logits",
        b,
        "--json",
    ]);
    let e = run_err(&["perplexity", "-m", &m, "-f", t, "-c", "16", "--kl-base", b]);
    assert!(e.contains("tokenised differently"), "{e}");
    let bytes = std::fs::read(&base).unwrap();
    std::fs::write(&base, &bytes[..bytes.len() - 100]).unwrap();
    let e = run_err(&["perplexity", "-m", &m, "-f", o, "-c", "16", "--kl-base", b]);
    assert!(e.contains("truncated or damaged"), "{e}");
    let e = run_err(&["perplexity", "-m", &m, "-f", o, "-c", "16", "--kl-base", t]);
    assert!(e.contains("not a saved-logits file"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
