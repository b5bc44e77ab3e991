//! The kit's exports against PyTorch: full-model logits of every supported architecture with
//! every MoE block replaced by the sparse op, and standalone MoE blocks.

use tract_onnx::prelude::*;

use crate::model::{run_imported_graph, LoadOptions, Model};
use crate::moe::Routing;
use crate::onnx::rewrite::expert_like_consts;
use crate::onnx::{import_model, DetectOptions};
use crate::ops::SparseMoeOp;
use crate::test_support::*;

fn check_export(arch: &str, method: &str) {
    let dir = fixtures().join("hf-moe/models").join(arch);
    let model = Model::load(&dir.join(method).join("model.onnx"), LoadOptions::default()).unwrap();
    let imported = import_model(
        &dir.join(method).join("model.onnx"),
        DetectOptions::default(),
    )
    .unwrap();
    assert_eq!(
        model.blocks().len(),
        2,
        "{arch}/{method}: both MoE layers replaced"
    );
    for b in &imported.blocks {
        for w in [&b.experts.gate_up, &b.experts.down] {
            assert!(
                model
                    .proto
                    .graph
                    .as_ref()
                    .unwrap()
                    .initializer
                    .iter()
                    .all(|t| &t.name != w),
                "{arch}/{method}: expert initializer {w} still in graph"
            );
        }
    }
    for i in 0..5 {
        let ids = read_npy::<i64>(&fixtures().join(format!("hf-moe/inputs/input_ids_{i}.npy")));
        let (batch, seq) = (ids.shape()[0], ids.shape()[1]);
        let flat: Vec<i64> = ids.iter().copied().collect();
        let (logits, vocab) = model.logits(&flat, batch).unwrap();
        let torch = read_npy::<f32>(&dir.join(format!("torch_logits_{i}.npy")));
        assert_eq!(torch.shape(), &[batch, seq, vocab]);
        let diff = max_abs_diff(&logits, torch.as_slice().unwrap());
        assert!(diff < TOL, "{arch}/{method} input {i}: max abs diff {diff}");
        let plan = model.plan(batch).unwrap();
        let left = expert_like_consts(plan.runnable.model(), &imported.blocks);
        assert_eq!(
            left, 0,
            "{arch}/{method}: {left} expert-shaped constants left in the tract graph"
        );
        let sparse_nodes = plan
            .runnable
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_as::<SparseMoeOp>().is_some())
            .count();
        assert_eq!(
            sparse_nodes, 2,
            "{arch}/{method}: sparse MoE nodes in the tract plan"
        );
    }
}

macro_rules! export_test {
    ($name:ident, $arch:literal, $method:literal) => {
        #[test]
        fn $name() {
            check_export($arch, $method);
        }
    };
}

export_test!(mixtral_legacy, "mixtral", "legacy_batched");
export_test!(mixtral_dynamo, "mixtral", "dynamo_batched");
export_test!(olmoe_legacy, "olmoe", "legacy_batched");
export_test!(olmoe_dynamo, "olmoe", "dynamo_batched");
export_test!(qwen2_moe_legacy, "qwen2_moe", "legacy_batched");
export_test!(qwen2_moe_dynamo, "qwen2_moe", "dynamo_batched");
export_test!(qwen3_moe_legacy, "qwen3_moe", "legacy_batched");
export_test!(granitemoe_legacy, "granitemoe", "legacy_batched");
export_test!(granitemoe_dynamo, "granitemoe", "dynamo_batched");

#[test]
fn detected_routing_matches_each_architecture() {
    let expect = [
        ("mixtral", Routing::SoftmaxTopK { renormalize: true }, false),
        ("olmoe", Routing::SoftmaxTopK { renormalize: false }, false),
        (
            "qwen2_moe",
            Routing::SoftmaxTopK { renormalize: false },
            true,
        ),
        (
            "qwen3_moe",
            Routing::SoftmaxTopK { renormalize: true },
            false,
        ),
        ("granitemoe", Routing::TopKSoftmax, false),
    ];
    for (arch, routing, shared) in expect {
        let path = fixtures()
            .join("hf-moe/models")
            .join(arch)
            .join("legacy_batched/model.onnx");
        let model = Model::load(&path, LoadOptions::default()).unwrap();
        for b in model.blocks() {
            assert_eq!(b.spec.routing, routing, "{arch}");
            assert_eq!(b.spec.shared_ffn.is_some(), shared, "{arch}");
            assert_eq!(
                (b.spec.experts, b.spec.top_k, b.spec.hidden, b.spec.ffn),
                (8, 2, 64, 32),
                "{arch}"
            );
        }
        assert_eq!(
            model
                .blocks()
                .iter()
                .map(|b| b.spec.layer)
                .collect::<Vec<_>>(),
            vec![0, 1],
            "{arch}"
        );
    }
}

// standalone blocks (`hidden_states -> output`)

fn check_block(arch: &str, method: &str) {
    let dir = fixtures().join("hf-moe/blocks").join(arch).join(method);
    let imported = import_model(&dir.join("model.onnx"), DetectOptions::default()).unwrap();
    assert_eq!(imported.blocks.len(), 1, "{arch}/{method}");
    for i in 0..4 {
        let x = read_npz::<f32>(&dir.join("io.npz"), &format!("input_{i}"));
        let want = read_npz::<f32>(&dir.join("io.npz"), &format!("torch_output_{i}"));
        let (out, typed) =
            run_imported_graph(&imported, Some(&dir), vec![Tensor::from(x)]).unwrap();
        assert_eq!(expert_like_consts(&typed, &imported.blocks), 0);
        assert_eq!(out[0].shape(), want.shape());
        let got = out[0].to_plain_array_view::<f32>().unwrap();
        let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(diff < TOL, "{arch}/{method} input {i}: max abs diff {diff}");
    }
}

#[test]
fn mixtral_block_legacy() {
    check_block("mixtral", "legacy_batched");
}

#[test]
fn mixtral_block_dynamo() {
    check_block("mixtral", "dynamo_batched");
}

#[test]
fn qwen2_moe_block_legacy() {
    check_block("qwen2_moe", "legacy_batched");
}

#[test]
fn qwen2_moe_block_dynamo() {
    check_block("qwen2_moe", "dynamo_batched");
}
