//! The `moe-edge` binary end to end: generate, logits, inspect, and failures without panics.

mod common;

use std::process::Output;

use common::*;

fn moe_edge(args: &[&str]) -> Output {
    moe_edge_cmd().args(args).output().expect("run moe-edge")
}

fn tiny() -> String {
    tiny_model().display().to_string()
}

/// `moe-edge logits` on the tiny model.
fn logits_cmd(input: &str, output: &str) -> Output {
    moe_edge(&[
        "logits",
        "-m",
        &tiny(),
        "--input",
        input,
        "--output",
        output,
    ])
}

fn assert_clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    stderr
}

#[test]
fn generate_json_gives_torchs_greedy_tokens() {
    // models/tiny-mixtral is the KV-cache Mixtral of the kit: compare with its torch reference
    let reference = fixtures().join("hf-moe-kv/mixtral/reference.npz");
    let prompt = read_npz::<i64>(&reference, "prompt_2");
    let tokens = read_npz::<i64>(&reference, "tokens_2");
    let ids: Vec<String> = prompt.iter().map(|v| v.to_string()).collect();
    let j = json_output(moe_edge_cmd().args([
        "generate",
        "-m",
        &tiny(),
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "16",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]));
    for key in [
        "prompt_ids",
        "generated_ids",
        "text",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(j.get(key).is_some(), "missing key {key} in {j}");
    }
    let got: Vec<i64> = j["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(got, tokens.iter().copied().collect::<Vec<_>>());
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        j["text"].as_str().unwrap().starts_with('t'),
        "decoded through tokenizer.json: {}",
        j["text"]
    );
}

#[test]
fn generate_streams_text_from_a_text_prompt_and_sampling_is_seeded() {
    let run = |seed: &str| {
        moe_edge(&[
            "generate",
            "-m",
            &tiny(),
            "--prompt",
            "t10 t20 t30",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ignore-eos",
        ])
    };
    let a = run("5");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let text = String::from_utf8_lossy(&a.stdout);
    assert_eq!(
        text.split_whitespace().count(),
        12,
        "12 streamed tokens: {text:?}"
    );
    assert_eq!(a.stdout, run("5").stdout, "same seed, same text");
}

#[test]
fn logits_command_matches_torch_on_a_batch() {
    let dir = std::env::temp_dir().join(format!("moe-edge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("logits.npy");
    let model = fixtures().join("hf-moe/models/qwen2_moe/dynamo_batched/model.onnx");
    let input = fixtures().join("hf-moe/inputs/input_ids_4.npy");
    let out = moe_edge(&[
        "logits",
        "-m",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = read_npy::<f32>(&output);
    let want = read_npy::<f32>(&fixtures().join("hf-moe/models/qwen2_moe/torch_logits_4.npy"));
    assert_eq!(got.shape(), want.shape());
    assert!(max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap()) < TOL);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reports_blocks() {
    let j = json_output(moe_edge_cmd().args(["inspect", "-m", &tiny(), "--json"]));
    let blocks = j["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[1]["layer"], 1);
    assert_eq!(blocks[0]["experts"], 8);
    assert_eq!(blocks[0]["top_k"], 2);
    assert_eq!(j["kv_cache"], true);
}

#[test]
fn refused_and_broken_models_exit_nonzero_without_panic() {
    let eager = fixtures().join("hf-moe/models/mixtral/legacy_eager/model.onnx");
    let stderr = assert_clean_failure(&moe_edge(&["inspect", "-m", eager.to_str().unwrap()]));
    assert!(
        stderr.contains("refused MoE block") && stderr.contains("layers.0"),
        "{stderr}"
    );
    let switch = fixtures().join("hf-moe/models/switch/legacy_eager/model.onnx");
    assert_clean_failure(&moe_edge(&[
        "generate",
        "-m",
        switch.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]));

    let dir = std::env::temp_dir().join(format!("moe-edge-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("model.onnx");
    let bytes = std::fs::read(tiny_model().join("model.onnx")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let stderr = assert_clean_failure(&moe_edge(&[
        "generate",
        "-m",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
    ]));
    assert!(stderr.contains("not a valid ONNX"), "{stderr}");
    // wrong input rank for logits
    let ids = dir.join("ids.npy");
    let arr = ndarray::ArrayD::<i64>::zeros(vec![3]);
    ndarray_npy::write_npy(&ids, &arr).unwrap();
    let stderr = assert_clean_failure(&logits_cmd(
        ids.to_str().unwrap(),
        dir.join("o.npy").to_str().unwrap(),
    ));
    assert!(stderr.contains("[batch, seq]"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn generate_stops_at_a_stop_string_without_printing_it() {
    // torch's greedy tokens after [501] begin t363 t344 t130 (hf-moe-kv/mixtral, prompt 0)
    let reference = fixtures().join("hf-moe-kv/mixtral/reference.npz");
    let tokens = read_npz::<i64>(&reference, "tokens_0");
    let j = json_output(moe_edge_cmd().args([
        "generate",
        "-m",
        &tiny(),
        "--prompt-ids",
        "501",
        "--max-tokens",
        "16",
        "--stop",
        "t130",
        "--json",
    ]));
    assert_eq!(j["stop_reason"], "stop_string");
    assert_eq!(j["text"], "t363 t344 ");
    let ids: Vec<i64> = j["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids, tokens.iter().take(3).copied().collect::<Vec<_>>());
    // streamed: the same text on stdout
    let out = moe_edge(&[
        "generate",
        "-m",
        &tiny(),
        "--prompt-ids",
        "501",
        "--max-tokens",
        "16",
        "--stop",
        "t130",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "t363 t344 \n");
}

#[test]
fn chat_answers_a_piped_prompt_like_the_library() {
    use std::io::Write;
    let dir = chat_model("pipe");
    let mut child = moe_edge_cmd()
        .args(["chat", "-m", dir.to_str().unwrap(), "--max-tokens", "12"])
        .args(["--system", "Be brief."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Was macht tar? 日本\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let model = moe_edge_engine::Model::load(&dir, Default::default()).unwrap();
    let mut chat = moe_edge_engine::Conversation::new(&model).unwrap();
    chat.set_system("Be brief.");
    let params = moe_edge_engine::GenerateParams {
        stop_tokens: model.config().eos_token_ids.clone(),
        ..moe_edge_engine::GenerateParams::for_model(&model, 12)
    };
    let want = chat
        .reply("Was macht tar? 日本", params, |_| {
            moe_edge_engine::Flow::Continue
        })
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", want.text)
    );
    // an empty pipe is a clear error
    let out = moe_edge_cmd()
        .args(["chat", "-m", dir.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = assert_clean_failure(&out);
    assert!(stderr.contains("no prompt"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn out_of_range_ids_and_sampling_parameters_are_clean_errors() {
    let model = tiny();
    for (args, says) in [
        (
            vec!["--prompt-ids", "10,512"],
            "token id 512 at position 1 is outside the vocabulary (0..512)",
        ),
        (vec!["--prompt-ids", "-3"], "token id -3 at position 0"),
        (
            vec!["--prompt-ids", "10", "--temperature", "-1"],
            "temperature",
        ),
        (
            vec!["--prompt-ids", "10", "--temperature=NaN"],
            "temperature",
        ),
        (
            vec!["--prompt-ids", "10", "--temperature", "inf"],
            "temperature",
        ),
        (
            vec!["--prompt-ids", "10", "--repetition-penalty", "0"],
            "repetition penalty",
        ),
        (vec!["--prompt-ids", "10", "--top-p", "-0.5"], "top-p"),
    ] {
        let mut all = vec!["generate", "-m", model.as_str()];
        all.extend(&args);
        let stderr = assert_clean_failure(&moe_edge(&all));
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Something other than a model file where one is expected: a clean, immediate error naming the
/// file (a FIFO must not block, a pack's expert file must not run as the pack).
#[test]
fn files_that_are_not_models_are_named_and_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("moe-edge-notfiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let packed = dir.join("packed");
    let out = moe_edge(&["pack", &tiny(), "-o", packed.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["model.onnx", "config.json"] {
        std::fs::copy(tiny_model().join(f), plain.join(f)).unwrap();
    }
    std::fs::create_dir(plain.join("tokenizer.json")).unwrap();
    let fifo_pack = dir.join("fifo-pack");
    std::fs::create_dir_all(&fifo_pack).unwrap();
    for f in ["model.onnx", "manifest.json", "config.json"] {
        std::fs::copy(packed.join(f), fifo_pack.join(f)).unwrap();
    }
    let fifo = fifo_pack.join("experts.bin");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());

    // a pack without its manifest; a directory as the chat template
    let no_manifest = dir.join("no-manifest");
    let chat_dir = dir.join("template-dir");
    for (d, skip) in [(&no_manifest, "manifest.json"), (&chat_dir, "")] {
        std::fs::create_dir_all(d).unwrap();
        for f in ["model.onnx", "manifest.json", "experts.bin", "config.json"] {
            if f != skip {
                std::fs::copy(packed.join(f), d.join(f)).unwrap();
            }
        }
    }
    std::fs::create_dir(chat_dir.join("chat_template.jinja")).unwrap();
    // manifests with a 100,000-character value where a short one belongs
    let mut long_values = vec![];
    for field in ["format", "experts", "expert_file"] {
        let d = dir.join(format!("long-{field}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.onnx", "experts.bin", "config.json"] {
            std::fs::copy(packed.join(f), d.join(f)).unwrap();
        }
        let text = std::fs::read_to_string(packed.join("manifest.json")).unwrap();
        let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        manifest[field] = serde_json::json!("x".repeat(100_000));
        std::fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
        long_values.push(d);
    }

    let expert_file = packed.join("experts.bin");
    let mut cases: Vec<(&str, String, &str)> = vec![
        ("/dev/null", "/dev/null".into(), "is not a regular file"),
        (
            "a pack's expert file",
            expert_file.display().to_string(),
            "not a valid ONNX protobuf",
        ),
        (
            "a FIFO as the expert file",
            fifo_pack.display().to_string(),
            "experts.bin: not a regular file",
        ),
        (
            "a directory as tokenizer.json",
            plain.display().to_string(),
            "tokenizer.json: not a regular file",
        ),
        (
            "a missing file",
            dir.join("nothing.onnx").display().to_string(),
            "does not exist",
        ),
        (
            "a pack without its manifest",
            no_manifest.display().to_string(),
            "graph of a packed model (it has moe-edge's own nodes), which runs only with its pack: ",
        ),
        (
            "a directory as chat_template.jinja",
            chat_dir.display().to_string(),
            "chat_template.jinja: not a regular file",
        ),
    ];
    for d in &long_values {
        cases.push((
            "a 100,000-character manifest value",
            d.display().to_string(),
            "manifest.json",
        ));
    }
    for (what, model, says) in cases {
        let start = std::time::Instant::now();
        let stderr =
            assert_clean_failure(&moe_edge(&["generate", "-m", &model, "--prompt-ids", "10"]));
        assert!(stderr.contains(says), "{what}: {stderr}");
        assert!(
            stderr.len() < 1000,
            "{what}: a message of {} bytes",
            stderr.len()
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{what}: took {:?}",
            start.elapsed()
        );
    }
    // an I/O error is said once, not repeated by the error chain
    let stderr = assert_clean_failure(&logits_cmd(
        dir.join("missing.npy").to_str().unwrap(),
        dir.join("out.npy").to_str().unwrap(),
    ));
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Sizes read from a file or a flag are bounded before anything is allocated for them, and the
/// logits file appears whole or not at all.
#[test]
fn declared_sizes_are_checked_before_allocating() {
    let dir = std::env::temp_dir().join(format!("moe-edge-sizes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // an .npy header declaring 2^40 ids over 16 bytes of data
    let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 1099511627776), }";
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let pad = 64 - (10 + header.len() + 1) % 64;
    let full = format!("{header}{}\n", " ".repeat(pad));
    npy.extend_from_slice(&(full.len() as u16).to_le_bytes());
    npy.extend_from_slice(full.as_bytes());
    npy.extend_from_slice(&[0u8; 16]);
    let input = dir.join("huge.npy");
    std::fs::write(&input, npy).unwrap();
    let output = dir.join("out.npy");
    let stderr = assert_clean_failure(&logits_cmd(
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ));
    assert!(stderr.contains("huge.npy"), "{stderr}");
    assert!(!output.exists());
    let stderr = assert_clean_failure(&moe_edge(&[
        "bench",
        "-m",
        &tiny(),
        "--prompt-tokens",
        "1099511627776",
    ]));
    assert!(
        stderr.contains("exceed the model's context of 256 tokens"),
        "{stderr}"
    );
    // a sequence longer than the context, through logits
    let long = ndarray::Array2::<i64>::from_elem((1, 300), 10);
    let input = dir.join("long.npy");
    ndarray_npy::write_npy(&input, &long).unwrap();
    let stderr = assert_clean_failure(&logits_cmd(
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ));
    assert!(stderr.contains("context is full"), "{stderr}");
    assert!(!output.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}
