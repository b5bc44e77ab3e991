//! Fixture paths and array I/O, shared by the tests of every crate of the workspace.
//!
//! Fixtures under `tests/fixtures/` are copies of the HF-MoE kits (real ONNX exports of tiny
//! random-weight MoE models, with PyTorch ground truth); see `tests/fixtures/README.md`.
#![allow(dead_code)]

use std::path::PathBuf;

use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyExt};

/// The five architectures whose R1 exports moe-edge supports.
pub const ARCHS: [&str; 5] = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe"];

/// Acceptance bound against torch fp32 (onnxruntime itself is within 2.2e-6).
pub const TOL: f32 = 1e-4;

/// The workspace's root directory (the first ancestor of the crate holding `Cargo.lock`), which
/// holds `tests/fixtures/` and `models/` for every crate's tests.
pub fn workspace_root() -> PathBuf {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .unwrap_or(&crate_dir)
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    workspace_root().join("tests").join("fixtures")
}

/// The tiny model shipped in `models/` (the KV-cache Mixtral export of the kit).
pub fn tiny_model() -> PathBuf {
    workspace_root().join("models").join("tiny-mixtral")
}

pub fn read_npy<T: ndarray_npy::ReadableElement>(path: &std::path::Path) -> ArrayD<T> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ArrayD::<T>::read_npy(f).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_npz<T: ndarray_npy::ReadableElement>(path: &std::path::Path, key: &str) -> ArrayD<T> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut npz = NpzReader::new(f).unwrap();
    npz.by_name(key)
        .unwrap_or_else(|e| panic!("{}[{key}]: {e}", path.display()))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Path of an R1 export of the kit: `hf-moe/models/<arch>/<method>/model.onnx`.
pub fn kit_export(arch: &str, method: &str) -> PathBuf {
    fixtures()
        .join("hf-moe/models")
        .join(arch)
        .join(method)
        .join("model.onnx")
}

/// A copy of the tiny model with the chat fixtures' byte-level tokenizer and ChatML template, in a
/// temporary directory named after `name`.
pub fn chat_model(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-edge-chat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.onnx", "config.json"] {
        std::fs::copy(tiny_model().join(f), dir.join(f)).unwrap();
    }
    let chat = fixtures().join("chat");
    std::fs::copy(chat.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::copy(chat.join("chatml.jinja"), dir.join("chat_template.jinja")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "bos_token": null}"#,
    )
    .unwrap();
    dir
}
