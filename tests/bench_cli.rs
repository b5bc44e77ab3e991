//! The `bench` command's JSON report: its keys and their types (not timings); `--threads` reaching
//! both the expert pool and tract's matrix products.

mod common;
use common::{assert_cache_keys, json_output, moe_edge_cmd, tiny_model};

#[test]
fn bench_json_has_the_documented_keys() {
    let dir = std::env::temp_dir().join(format!("moe-edge-bench-{}", std::process::id()));
    let model = tiny_model().display().to_string();
    assert!(moe_edge_cmd()
        .args(["pack", &model, "-o", dir.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    for (m, packed) in [(model.as_str(), false), (dir.to_str().unwrap(), true)] {
        let j = json_output(moe_edge_cmd().args([
            "--threads",
            "2",
            "bench",
            "-m",
            m,
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "2",
            "--json",
            "--expert-cache-mb",
            "1",
        ]));
        for key in [
            "load_s",
            "ttft_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "peak_rss_bytes",
        ] {
            assert!(j[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {j}");
        }
        assert_eq!(j["threads"], 2);
        assert_eq!(
            j["tract_threads"], 2,
            "tract's matrix products run on the --threads pool"
        );
        assert!(j["isa"].is_string());
        for key in ["median", "min", "max"] {
            assert!(j["decode"][key].as_f64().is_some(), "decode.{key}");
        }
        assert!(j["decode"]["min"].as_f64() <= j["decode"]["max"].as_f64());
        assert_eq!(j["prompt_tokens"], 8);
        if packed {
            assert_cache_keys(&j["cache"]);
            assert!(j["cache"]["misses"].as_u64().unwrap() > 0);
        } else {
            assert!(j["cache"].is_null());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn threads_size_the_pool_of_the_experts_and_of_tract() {
    for n in ["1", "2", "3"] {
        let out = moe_edge_cmd()
            .args(["--threads", n, "info"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "threads: {n} (experts, int8 layers), tract matrix products: {n}"
            )),
            "{text}"
        );
    }
    // an absurd count is clamped (8 per core), not spawned
    let cores = std::thread::available_parallelism().unwrap().get();
    let out = moe_edge_cmd()
        .args(["--threads", "65536", "info"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let clamped = 8 * cores;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("threads: {clamped} (")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = moe_edge_cmd()
        .args(["--threads", "0", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("threads must be at least 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bench --json`'s footprint against what the model's config implies: the embedding table
/// leaves the graph's weights when a pack reads it from its file (vocab x hidden x 4 bytes), and
/// the KV cache is 2 x layers x kv_heads x head_dim x positions x 4 bytes.
#[test]
fn bench_footprint_itemises_the_embedding_table_and_the_kv_cache() {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    let n = |k: &str| config[k].as_u64().unwrap();
    let base = std::env::temp_dir().join(format!("moe-edge-bench-fp-{}", std::process::id()));
    let mut footprints = vec![];
    for embeddings in ["file", "graph"] {
        let dir = base.join(embeddings);
        let out = moe_edge_cmd()
            .args(["pack", tiny_model().to_str().unwrap(), "-o"])
            .arg(&dir)
            .args(["--embeddings", embeddings])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_output(moe_edge_cmd().arg("bench").arg("-m").arg(&dir).args([
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "1",
            "--json",
        ]));
        let fp = j["footprint"].clone();
        assert_eq!(fp["embedding"], embeddings);
        let kv = 2 * n("num_hidden_layers") * n("num_key_value_heads") * n("head_dim") * 12 * 4;
        assert_eq!(fp["kv_cache_bytes"].as_u64().unwrap(), kv);
        assert!(fp["moe_fixed_bytes"].as_u64().unwrap() > 0);
        assert!(fp["other_bytes"].as_u64().is_some());
        footprints.push(fp);
    }
    let graph = |i: usize| footprints[i]["graph_weights_bytes"].as_u64().unwrap();
    assert_eq!(graph(1) - graph(0), n("vocab_size") * n("hidden_size") * 4);
    std::fs::remove_dir_all(&base).ok();
}
