//! Two models in one process, of different architectures and one of them packed, run
//! interleaved step by step: each gives torch's logits, and each session's observer sees only
//! its own model's routing. (The op table is per model: nothing is looked up process-wide.)

#[path = "../../tests/common/fixtures.rs"]
mod common;

use std::sync::{Arc, Mutex};

use common::*;
use moe_edge_engine::pack::{pack_model, ExpertFormat, PackOptions};
use moe_edge_engine::{LoadOptions, Model, RoutedTokens, RoutingObserver, Session};

/// Records (layer, first position, tokens) of every call.
#[derive(Default)]
struct Calls(Mutex<Vec<(usize, usize, usize)>>);

impl RoutingObserver for Calls {
    fn on_routing(&self, r: &RoutedTokens<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((r.layer, r.first_position, r.tokens()));
    }
}

struct Run {
    session: Session,
    prompt: Vec<i64>,
    tokens: Vec<i64>,
    /// `[steps + 1, vocab]`: the prefill's last position, then one row per step.
    logits: Vec<f32>,
    calls: Arc<Calls>,
}

fn start(model: &Model, arch: &str) -> Run {
    let reference = fixtures()
        .join("hf-moe-kv")
        .join(arch)
        .join("reference.npz");
    let mut session = Session::new(model).unwrap();
    let calls = Arc::new(Calls::default());
    session.set_observer(Some(calls.clone()));
    Run {
        session,
        prompt: read_npz::<i64>(&reference, "prompt_2")
            .iter()
            .copied()
            .collect(),
        tokens: read_npz::<i64>(&reference, "tokens_2")
            .iter()
            .copied()
            .collect(),
        logits: read_npz::<f32>(&reference, "logits_2")
            .iter()
            .copied()
            .collect(),
        calls,
    }
}

/// Step `step` of a run: the prompt at step 0, then torch's token of the previous step.
fn check_step(run: &mut Run, step: usize, what: &str) {
    let input = if step == 0 {
        run.prompt.clone()
    } else {
        vec![run.tokens[step - 1]]
    };
    let got = run.session.feed(&input).unwrap();
    let vocab = got.len();
    let want = &run.logits[step * vocab..(step + 1) * vocab];
    let diff = max_abs_diff(&got, want);
    assert!(diff < TOL, "{what} step {step}: max abs diff {diff}");
}

#[test]
fn two_models_interleaved_give_their_own_logits() {
    let mixtral = Model::load(
        &fixtures().join("hf-moe-kv/mixtral/model.onnx"),
        LoadOptions::default(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("moe-edge-two-models-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let opts = PackOptions {
        experts: ExpertFormat::F32,
        ..Default::default()
    };
    pack_model(
        &fixtures().join("hf-moe-kv/qwen2_moe/model.onnx"),
        &dir,
        &opts,
    )
    .unwrap();
    let qwen = Model::load(&dir, LoadOptions::default()).unwrap();
    assert!(qwen.cache_stats().is_some(), "a packed model");

    let mut a = start(&mixtral, "mixtral");
    let mut b = start(&qwen, "qwen2_moe");
    for step in 0..=a.tokens.len() {
        check_step(&mut a, step, "mixtral");
        check_step(&mut b, step, "qwen2_moe (packed)");
    }
    // each observer saw its own model's two blocks, once per step, at its own positions
    for (run, name) in [(&a, "mixtral"), (&b, "qwen2_moe")] {
        let calls = run.calls.0.lock().unwrap();
        let n = run.prompt.len();
        assert_eq!(calls.len(), 2 * (run.tokens.len() + 1), "{name}");
        assert_eq!(calls[0], (0, 0, n), "{name}: prefill, layer 0");
        assert_eq!(calls[1], (1, 0, n), "{name}: prefill, layer 1");
        for (i, c) in calls[2..].iter().enumerate() {
            assert_eq!(*c, (i % 2, n + i / 2, 1), "{name}: decode call {i}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
