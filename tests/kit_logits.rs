//! Full-model logits of every supported kit export against PyTorch, with every MoE block
//! replaced by the sparse op.

mod common;

use common::*;
use moe_edge::{LoadOptions, Model};

fn check_export(arch: &str, method: &str) {
    let dir = fixtures().join("hf-moe/models").join(arch);
    let model = Model::load(&dir.join(method).join("model.onnx"), LoadOptions::default()).unwrap();
    let imported = &model.imported;
    assert_eq!(
        imported.blocks.len(),
        2,
        "{arch}/{method}: both MoE layers replaced"
    );
    for b in &imported.blocks {
        for w in [&b.gate_up, &b.down] {
            assert!(
                imported.removed_initializers.contains(w),
                "{arch}/{method}: expert initializer {w} still in graph"
            );
        }
        assert!(imported
            .proto
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .all(|t| t.name != b.gate_up && t.name != b.down));
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
        let left = moe_edge::onnx::expert_like_consts(plan.runnable.model(), &imported.blocks);
        assert_eq!(
            left, 0,
            "{arch}/{method}: {left} expert-shaped constants left in the tract graph"
        );
        let sparse_nodes = plan
            .runnable
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op_as::<moe_edge::sparse_op::SparseMoeOp>().is_some())
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
    use moe_edge::moe::Routing;
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
        for b in &model.imported.blocks {
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
                .imported
                .blocks
                .iter()
                .map(|b| b.spec.layer)
                .collect::<Vec<_>>(),
            vec![0, 1],
            "{arch}"
        );
    }
}
