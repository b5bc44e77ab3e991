//! `profile`, `prune`, `--route static:` and `--expert-mask`: the profile's counts are torch's
//! routing of the kit's Mixtral counted here (`tools/routing_fixture.py`), a pruned pack and the
//! static route only ever run the experts the profile keeps, and profiles or settings that do not
//! fit are refused with the reason.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    scratch_dir("profile", name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The kit's 32 token ids as text the tiny model's word-level tokenizer maps back to them.
fn kit_text(dir: &Path) -> PathBuf {
    let ids: Vec<i64> = read_npy::<i64>(&fixtures().join("hf-moe/inputs/input_ids_3.npy"))
        .iter()
        .copied()
        .collect();
    let words: Vec<String> = ids.iter().map(|i| format!("t{i}")).collect();
    let path = dir.join("kit.txt");
    std::fs::write(&path, words.join(" ")).unwrap();
    path
}

fn profile_of(model: &Path, text: &Path, out: &Path) {
    run_ok(&[
        "profile",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--context",
        "32",
        "-o",
        out.to_str().unwrap(),
    ]);
}

#[test]
fn the_profile_counts_torchs_routing() {
    let dir = scratch("torch");
    let text = kit_text(&dir);
    let out = dir.join("p.json");
    let plots = dir.join("plots");
    let tiny = tiny_model();
    run_ok(&[
        "profile",
        "-m",
        tiny.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--labels",
        "kit",
        "--context",
        "32",
        "-o",
        out.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
    ]);
    let p = read_json(&out);
    let torch = read_json(&fixtures().join("hf-moe/models/mixtral/torch_routing_3.json"));
    assert_eq!(p["overall"]["tokens"], 32);
    assert_eq!(p["labels"][0]["label"], "kit");
    for (l, (mine, theirs)) in p["overall"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(torch["layers"].as_array().unwrap())
        .enumerate()
    {
        let experts: Vec<Vec<usize>> = theirs["experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                t.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_u64().unwrap() as usize)
                    .collect()
            })
            .collect();
        let weights: Vec<Vec<f64>> = theirs["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(numbers)
            .collect();
        let mut chosen = [0u64; 8];
        let mut weight_sum = [0f64; 8];
        let mut coactivation = [[0u64; 8]; 8];
        let (mut reused, mut reuse_total) = (0, 0);
        for (t, (es, ws)) in experts.iter().zip(&weights).enumerate() {
            for (&e, &w) in es.iter().zip(ws) {
                chosen[e] += 1;
                weight_sum[e] += w;
                for &f in es {
                    coactivation[e][f] += 1;
                }
            }
            if t > 0 {
                reuse_total += es.len();
                reused += es.iter().filter(|e| experts[t - 1].contains(e)).count();
            }
        }
        let got: Vec<u64> = mine["chosen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, chosen, "layer {l}: tokens per expert");
        for (e, (g, w)) in numbers(&mine["weight_sum"])
            .iter()
            .zip(weight_sum)
            .enumerate()
        {
            assert!(
                (g - w).abs() < 1e-4,
                "layer {l} expert {e}: weight sum {g} vs torch {w}"
            );
        }
        for (a, row) in mine["coactivation"].as_array().unwrap().iter().enumerate() {
            let row: Vec<u64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(row, coactivation[a], "layer {l}: co-activation row {a}");
        }
        assert_eq!(mine["reuse"]["hits"], reused, "layer {l}");
        assert_eq!(mine["reuse"]["total"], reuse_total, "layer {l}");
        let share: f64 = numbers(&mine["slot_share"]).iter().sum();
        assert!((share - 1.0).abs() < 1e-9);
        // entropy of the slot shares, recomputed from torch's counts
        let h: f64 = chosen
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / 64.0;
                -p * p.log2()
            })
            .sum();
        assert!((mine["entropy_bits"].as_f64().unwrap() - h).abs() < 1e-9);
        assert_eq!(mine["predicted"].is_null(), l == 0, "layer {l}");
    }
    // --max-tokens routes only the first tokens of each file
    let short = dir.join("short.json");
    run_ok(&[
        "profile",
        "-m",
        tiny.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--max-tokens",
        "10",
        "-o",
        short.to_str().unwrap(),
    ]);
    let short = read_json(&short);
    assert_eq!(short["overall"]["tokens"], 10);
    assert_eq!(
        short["labels"][0]["label"], "kit",
        "labelled by the file's name"
    );
    for svg in ["usage.svg", "usage-by-label.svg", "locality.svg"] {
        let body = std::fs::read_to_string(plots.join(svg)).unwrap();
        assert!(body.starts_with("<svg") && body.contains("<rect"), "{svg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The experts of every line of a trace, per layer.
fn traced_experts(trace: &Path) -> Vec<BTreeSet<u64>> {
    let mut per_layer = vec![BTreeSet::new(); 2];
    for line in std::fs::read_to_string(trace).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let layer = v["layer"].as_u64().unwrap() as usize;
        for e in v["experts"].as_array().unwrap() {
            per_layer[layer].insert(e.as_u64().unwrap());
        }
    }
    per_layer
}

/// Experts of each layer from most to least used in a profile (lower index first on ties).
fn ranked(profile: &Value) -> Vec<Vec<u64>> {
    profile["overall"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let chosen: Vec<u64> = l["chosen"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let mut order: Vec<u64> = (0..chosen.len() as u64).collect();
            order.sort_by(|&a, &b| chosen[b as usize].cmp(&chosen[a as usize]).then(a.cmp(&b)));
            order
        })
        .collect()
}

fn generate_traced(model: &Path, extra: &[&str], trace: &Path) -> Value {
    let mut args = vec![
        "generate",
        "-m",
        model.to_str().unwrap(),
        "--prompt-ids",
        "10,20,30,40,50",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run_ok(&args);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn prune_and_static_routing_only_run_the_profiles_experts() {
    let dir = scratch("prune");
    let text = kit_text(&dir);
    let pack = dir.join("int8");
    let tiny = tiny_model();
    run_ok(&["pack", tiny.to_str().unwrap(), "-o", pack.to_str().unwrap()]);
    let profile = dir.join("p.json");
    profile_of(&pack, &text, &profile);
    let order = ranked(&read_json(&profile));

    // pruned to the 4 most used experts per layer
    let pruned = dir.join("pruned");
    run_ok(&[
        "prune",
        pack.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--keep",
        "4",
        "-o",
        pruned.to_str().unwrap(),
    ]);
    let manifest = read_json(&pruned.join("manifest.json"));
    for (l, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let got: BTreeSet<u64> = layer["pruned"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let want: BTreeSet<u64> = order[l][4..].iter().copied().collect();
        assert_eq!(got, want, "layer {l}: the 4 least used are gone");
    }
    // --keep-share: per layer, the fewest most used experts whose slots reach the share
    let by_share = dir.join("by-share");
    run_ok(&[
        "prune",
        pack.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--label",
        "kit",
        "--keep-share",
        "0.6",
        "-o",
        by_share.to_str().unwrap(),
    ]);
    let p = read_json(&profile);
    for (l, layer) in read_json(&by_share.join("manifest.json"))["layers"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let chosen: Vec<u64> = p["labels"][0]["usage"]["layers"][l]["chosen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let total: u64 = chosen.iter().sum();
        let (mut reached, mut keep) = (0, 0);
        while (reached as f64) < 0.6 * total as f64 {
            reached += chosen[order[l][keep] as usize];
            keep += 1;
        }
        let keep = keep.max(2);
        let got: BTreeSet<u64> = layer["pruned"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let want: BTreeSet<u64> = order[l][keep..].iter().copied().collect();
        assert_eq!(got, want, "layer {l}: keep {keep} for 60% of the slots");
    }
    // the routed experts' bytes (the file also holds routers and the embedding table)
    let size = |p: &Path| -> u64 {
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("manifest.json")).unwrap())
                .unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["expert_file_bytes"].as_u64().unwrap())
            .sum()
    };
    assert!(
        size(&pruned) < size(&pack) * 6 / 10,
        "{} vs {}",
        size(&pruned),
        size(&pack)
    );
    let trace = dir.join("pruned.jsonl");
    let pruned_run = generate_traced(&pruned, &[], &trace);
    for (l, used) in traced_experts(&trace).iter().enumerate() {
        let kept: BTreeSet<u64> = order[l][..4].iter().copied().collect();
        assert!(
            used.is_subset(&kept),
            "layer {l}: {used:?} outside {kept:?}"
        );
    }
    // the same experts masked at run time on the full pack: the same tokens
    let mask: Vec<String> = (0..2)
        .map(|l| {
            format!(
                "{l}:{}",
                order[l][4..]
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    let masked_run = generate_traced(
        &pack,
        &["--expert-mask", &mask.join(";")],
        &dir.join("masked.jsonl"),
    );
    assert_eq!(
        pruned_run["generated_ids"].as_array().map(Vec::len),
        Some(12)
    );
    assert_eq!(pruned_run["generated_ids"], masked_run["generated_ids"]);

    // static routing: every token of a layer runs that layer's two most used experts
    let trace = dir.join("static.jsonl");
    let route = format!("static:{}", profile.display());
    generate_traced(&pack, &["--route", &route], &trace);
    for (l, used) in traced_experts(&trace).iter().enumerate() {
        let top: BTreeSet<u64> = order[l][..2].iter().copied().collect();
        assert_eq!(used, &top, "layer {l}");
    }
    // keeping the hot experts in the cache changes where experts live, not the result
    let plain = generate_traced(&pack, &[], &dir.join("plain.jsonl"));
    let pinned = generate_traced(
        &pack,
        &["--pin-hot", profile.to_str().unwrap(), "--pin-share", "0.3"],
        &dir.join("pinned.jsonl"),
    );
    assert_eq!(plain["generated_ids"].as_array().map(Vec::len), Some(12));
    assert_eq!(plain["generated_ids"], pinned["generated_ids"]);
    let by_label = format!("static:{}:kit", profile.display());
    generate_traced(&pack, &["--route", &by_label], &dir.join("label.jsonl"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn profiles_and_settings_that_do_not_fit_are_refused() {
    let dir = scratch("refuse");
    let text = kit_text(&dir);
    let tiny = tiny_model();
    let tiny_s = tiny.to_str().unwrap();
    let pack = dir.join("int8");
    run_ok(&["pack", tiny_s, "-o", pack.to_str().unwrap()]);
    // a profile of the tiny model does not fit moe-edge-mini (6 layers of 16 experts)
    let profile = dir.join("p.json");
    profile_of(&tiny, &text, &profile);
    let p = profile.to_str().unwrap();
    let mini = workspace_root().join("models/moe-edge-mini");
    let e = run_err(&[
        "prune",
        mini.to_str().unwrap(),
        "--profile",
        p,
        "--keep",
        "8",
        "-o",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("has 2 MoE layers, this model 6"), "{e}");
    let e = run_err(&[
        "generate",
        "-m",
        mini.to_str().unwrap(),
        "--prompt",
        "a",
        "--route",
        &format!("static:{p}"),
    ]);
    assert!(e.contains("has 2 MoE layers, this model 6"), "{e}");
    let pack_s = pack.to_str().unwrap();
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    for (args, want) in [
        (
            vec![
                "prune",
                pack_s,
                "--profile",
                p,
                "--keep-share",
                "1.5",
                "-o",
                out_s,
            ],
            "outside (0, 1]",
        ),
        (
            vec!["prune", pack_s, "--profile", p, "--keep", "1", "-o", out_s],
            "fewer than the 2",
        ),
        (vec!["prune", pack_s, "-o", out_s], "nothing to prune"),
        (
            vec!["prune", tiny_s, "--expert-mask", "0:1", "-o", out_s],
            "not a packed model",
        ),
        (
            vec![
                "prune",
                pack_s,
                "--profile",
                p,
                "--label",
                "de",
                "--keep",
                "4",
                "-o",
                out_s,
            ],
            "no label \"de\"",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--expert-mask",
                "0:9",
            ],
            "there is no expert 9",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--expert-mask",
                "7:1",
            ],
            "no MoE layer 7",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--expert-mask",
                "0:1,2,3,4,5,6,7",
            ],
            "fewer than the 2",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--expert-mask",
                "zero:1",
            ],
            "is not a number",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--route",
                "fixed",
            ],
            "expected `learnt`",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--route",
                "static:/nonexistent.json",
            ],
            "nonexistent.json",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--route",
                &format!("static:{}", text.display()),
            ],
            "not a routing profile",
        ),
        (
            vec![
                "generate",
                "-m",
                tiny_s,
                "--prompt-ids",
                "1",
                "--pin-hot",
                p,
            ],
            "only a packed model",
        ),
        (
            vec![
                "generate",
                "-m",
                pack_s,
                "--prompt-ids",
                "1",
                "--pin-hot",
                p,
                "--pin-share",
                "1.5",
            ],
            "outside (0, 1)",
        ),
        (
            vec![
                "profile",
                "-m",
                tiny_s,
                "-f",
                text.to_str().unwrap(),
                "--labels",
                "a,b",
                "-o",
                out_s,
            ],
            "2 labels for 1 files",
        ),
    ] {
        let e = run_err(&args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(!out.exists(), "a refused command writes nothing");
    std::fs::remove_dir_all(&dir).ok();
}

/// `pack --int4-cold`: the cold experts of a profile go int4 (the expert file lies between the
/// all-int8 and all-int4 packs'), the pack runs, and bad settings are refused.
#[test]
fn pack_int4_cold_stores_the_profiles_cold_experts_in_int4() {
    let dir = scratch("int4");
    let text = kit_text(&dir);
    let tiny = tiny_model();
    let tiny_s = tiny.to_str().unwrap();
    let profile = dir.join("p.json");
    profile_of(&tiny, &text, &profile);
    let p = profile.to_str().unwrap();
    let size = |name: &str, extra: &[&str]| -> u64 {
        let out = dir.join(name);
        let mut args = vec!["pack", tiny_s, "-o", out.to_str().unwrap(), "--align", "64"];
        args.extend_from_slice(extra);
        run_ok(&args);
        std::fs::metadata(out.join("experts.bin")).unwrap().len()
    };
    let int8 = size("int8", &[]);
    let int4 = size("int4", &["--experts", "int4"]);
    let mixed = size("mixed", &["--int4-cold", p, "--int8-share", "0.5"]);
    assert!(
        int4 < mixed && mixed < int8,
        "int4 {int4}, mixed {mixed}, int8 {int8}"
    );
    let out = run_ok(&[
        "generate",
        "-m",
        dir.join("mixed").to_str().unwrap(),
        "--prompt-ids",
        "10,20,30",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["generated_ids"].as_array().map(Vec::len), Some(4));
    let bad = dir.join("bad");
    let bad_s = bad.to_str().unwrap();
    for (args, want) in [
        (
            vec![
                "pack",
                tiny_s,
                "-o",
                bad_s,
                "--int4-cold",
                p,
                "--int8-share",
                "1.5",
            ],
            "outside (0, 1]",
        ),
        (
            vec![
                "pack",
                tiny_s,
                "-o",
                bad_s,
                "--int4-cold",
                p,
                "--experts",
                "f16",
            ],
            "int8 pack",
        ),
    ] {
        let e = run_err(&args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).ok();
}
