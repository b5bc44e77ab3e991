//! Standalone MoE blocks (`hidden_states -> output`) against PyTorch.

mod common;

use common::*;
use moe_edge::model::run_imported_graph;
use moe_edge::onnx::{import_model, DetectOptions};
use tract_onnx::prelude::*;

fn check_block(arch: &str, method: &str) {
    let dir = fixtures().join("hf-moe/blocks").join(arch).join(method);
    let imported = import_model(&dir.join("model.onnx"), DetectOptions::default()).unwrap();
    assert_eq!(imported.blocks.len(), 1, "{arch}/{method}");
    for i in 0..4 {
        let x = read_npz::<f32>(&dir.join("io.npz"), &format!("input_{i}"));
        let want = read_npz::<f32>(&dir.join("io.npz"), &format!("torch_output_{i}"));
        let (out, typed) = run_imported_graph(&imported, vec![Tensor::from(x)]).unwrap();
        assert_eq!(
            moe_edge::onnx::expert_like_consts(&typed, &imported.blocks),
            0
        );
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
