//! KV-cache generation against torch: same 16 greedy tokens for every prompt, and per-step
//! logits within tolerance, for the HF-exporter and legacy exports of every supported arch.

use crate::sampling::argmax;
use crate::test_support::*;
use crate::{Error, GenerateParams, Generator, LoadOptions, Model, Session};

/// The HF-exporter or legacy KV-cache export of `arch`.
fn kv_export(arch: &str, legacy: bool) -> std::path::PathBuf {
    let dir = fixtures().join("hf-moe-kv").join(arch);
    if legacy {
        dir.join("legacy/model.onnx")
    } else {
        dir.join("model.onnx")
    }
}

fn check_kv(arch: &str, legacy: bool) {
    let dir = fixtures().join("hf-moe-kv").join(arch);
    let model = Model::load(&kv_export(arch, legacy), LoadOptions::default()).unwrap();
    assert!(model.has_kv_cache(), "{arch}: KV-cache interface detected");
    assert_eq!(model.blocks().len(), 2);
    let plan = model.plan(1).unwrap();
    assert!(
        plan.inputs
            .iter()
            .all(|i| !i.starts_with("past_key_values")),
        "{arch}: cache folded into state: {:?}",
        plan.inputs
    );
    let reference = dir.join("reference.npz");
    for p in 0..3 {
        let prompt = read_npz::<i64>(&reference, &format!("prompt_{p}"));
        let tokens = read_npz::<i64>(&reference, &format!("tokens_{p}"));
        let ref_logits = read_npz::<f32>(&reference, &format!("logits_{p}"));
        let vocab = ref_logits.shape()[1];
        let mut session = Session::new(&model).unwrap();
        let mut logits = session.feed(prompt.as_slice().unwrap()).unwrap();
        for (step, &want) in tokens.iter().enumerate() {
            let expected = &ref_logits.as_slice().unwrap()[step * vocab..(step + 1) * vocab];
            let diff = max_abs_diff(&logits, expected);
            assert!(
                diff < TOL,
                "{arch} prompt {p} step {step}: max abs logit diff {diff}"
            );
            let next = argmax(&logits) as i64;
            assert_eq!(next, want, "{arch} prompt {p} step {step}");
            logits = session.feed(&[next]).unwrap();
        }
        assert_eq!(session.tokens().len(), prompt.len() + tokens.len());
    }
}

macro_rules! kv_test {
    ($name:ident, $arch:literal, $legacy:literal) => {
        #[test]
        fn $name() {
            check_kv($arch, $legacy);
        }
    };
}

kv_test!(mixtral_hf_exporter, "mixtral", false);
kv_test!(mixtral_legacy, "mixtral", true);
kv_test!(olmoe_hf_exporter, "olmoe", false);
kv_test!(olmoe_legacy, "olmoe", true);
kv_test!(qwen2_moe_hf_exporter, "qwen2_moe", false);
kv_test!(qwen2_moe_legacy, "qwen2_moe", true);
kv_test!(qwen3_moe_hf_exporter, "qwen3_moe", false);
kv_test!(qwen3_moe_legacy, "qwen3_moe", true);
kv_test!(granitemoe_hf_exporter, "granitemoe", false);
kv_test!(granitemoe_legacy, "granitemoe", true);

/// A graph without a KV cache generates too, by re-running the sequence: same tokens as the
/// KV-cache export of the same checkpoint.
#[test]
fn plain_graph_generates_by_rerunning() {
    let plain = Model::load(
        &fixtures().join("hf-moe/models/mixtral/dynamo_batched/model.onnx"),
        LoadOptions::default(),
    )
    .unwrap();
    assert!(!plain.has_kv_cache());
    let reference = fixtures().join("hf-moe-kv/mixtral/reference.npz");
    let prompt = read_npz::<i64>(&reference, "prompt_1");
    let tokens = read_npz::<i64>(&reference, "tokens_1");
    let params = GenerateParams {
        max_tokens: 16,
        ..Default::default()
    };
    let mut generator = Generator::new(&plain, params).unwrap();
    let out = generator
        .generate(prompt.as_slice().unwrap(), |_| crate::Flow::Continue)
        .unwrap();
    assert_eq!(
        out.generated_ids,
        tokens.iter().copied().collect::<Vec<_>>()
    );
}

/// One forward pass over a batch with an empty past (the `logits` command on a KV-cache graph):
/// the KV exports have the weights of the kit's plain exports, so torch's logits apply.
#[test]
fn kv_graphs_give_torch_logits_for_batches_with_empty_past() {
    for arch in ARCHS {
        for legacy in [false, true] {
            let model = Model::load(&kv_export(arch, legacy), LoadOptions::default()).unwrap();
            for i in 0..5 {
                let ids =
                    read_npy::<i64>(&fixtures().join(format!("hf-moe/inputs/input_ids_{i}.npy")));
                let (logits, _) = model
                    .logits(ids.as_slice().unwrap(), ids.shape()[0])
                    .unwrap();
                let torch = read_npy::<f32>(
                    &fixtures().join(format!("hf-moe/models/{arch}/torch_logits_{i}.npy")),
                );
                let diff = max_abs_diff(&logits, torch.as_slice().unwrap());
                assert!(diff < TOL, "{arch} (legacy {legacy}) input {i}: {diff}");
            }
        }
    }
}

/// Cutting the KV cache back to a prefix and feeding on gives the logits of a session that was
/// fed the same tokens from the start, and the observer's positions follow.
#[test]
fn truncated_session_continues_like_a_fresh_one() {
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Positions(Mutex<Vec<usize>>);
    impl crate::RoutingObserver for Positions {
        fn on_routing(&self, r: &crate::RoutedTokens<'_>) {
            if r.layer == 0 {
                self.0.lock().unwrap().push(r.first_position);
            }
        }
    }

    let model = Model::load(&kv_export("olmoe", false), LoadOptions::default()).unwrap();
    let history: Vec<i64> = vec![5, 17, 300, 42, 9, 128, 77, 3, 250, 11];
    let edited: Vec<i64> = vec![60, 61, 62];
    let mut session = Session::new(&model).unwrap();
    let positions = Arc::new(Positions::default());
    session.set_observer(Some(positions.clone()));
    session.feed(&history[..7]).unwrap();
    session.feed(&history[7..]).unwrap();
    session.truncate(6).unwrap();
    assert_eq!(session.tokens(), &history[..6]);
    let got = session.feed(&edited).unwrap();

    let mut fresh = Session::new(&model).unwrap();
    let mut all = history[..6].to_vec();
    all.extend_from_slice(&edited);
    let want = fresh.feed(&all).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "after truncation: max abs diff {diff}");
    assert_eq!(*positions.0.lock().unwrap(), vec![0, 7, 6]);

    // reset forgets everything; truncate(0) too
    session.reset().unwrap();
    assert!(session.is_empty());
    let again = session.feed(&all).unwrap();
    assert!(max_abs_diff(&again, &want) < 1e-5);
    session.truncate(0).unwrap();
    assert!(session.is_empty());
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused_before_the_graph_runs() {
    let model = Model::load(&tiny_model(), LoadOptions::default()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    assert_eq!(model.vocab_size(), Some(vocab));
    let mut session = Session::new(&model).unwrap();
    for (ids, says) in [
        (
            vec![10, vocab as i64],
            format!("token id {vocab} at position 1"),
        ),
        (vec![-1], "token id -1 at position 0".to_string()),
        (
            vec![i64::MIN],
            format!("token id {} at position 0", i64::MIN),
        ),
        (
            vec![1 << 40],
            format!("token id {} at position 0", 1i64 << 40),
        ),
    ] {
        let err = session.feed(&ids).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains(&says)),
            "{ids:?}: {err}"
        );
        let err = model.logits(&ids, 1).unwrap_err();
        assert!(matches!(&err, Error::InvalidInput(_)), "{ids:?}: {err}");
    }
    // nothing was fed: the session still works from the start
    assert_eq!(session.len(), 0);
    let last = session.feed(&[10, (vocab - 1) as i64]).unwrap();
    assert_eq!(last.len(), vocab);
}

/// Sessions of several models stepping at once from several threads (as a server's slots and
/// tests running in parallel do) give exactly the tokens each gives alone: forward passes share
/// the one pool without running into each other.
#[test]
fn concurrent_sessions_on_the_shared_pool_give_the_tokens_they_give_alone() {
    // the trained model's matrices (hidden 256, a vocabulary of 8192) are large enough for tract
    // to split its matrix products over the pool
    let models: Vec<Model> = [
        workspace_root().join("models/moe-edge-mini"),
        kv_export("mixtral", false),
        kv_export("qwen2_moe", false),
    ]
    .iter()
    .map(|p| Model::load(p, LoadOptions::default()).unwrap())
    .collect();
    let greedy = |model: &Model, first: i64| -> Vec<i64> {
        let mut session = Session::new(model).unwrap();
        let mut logits = session.feed(&[first, first + 1, first + 2]).unwrap();
        let mut out = vec![];
        for _ in 0..24 {
            let next = argmax(&logits) as i64;
            out.push(next);
            logits = session.feed(&[next]).unwrap();
        }
        out
    };
    let alone: Vec<Vec<i64>> = (0..6)
        .map(|i| greedy(&models[i % 3], 3 + i as i64))
        .collect();
    for _round in 0..3 {
        let together: Vec<Vec<i64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let model = &models[i % 3];
                    s.spawn(move || greedy(model, 3 + i as i64))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone);
    }
}
