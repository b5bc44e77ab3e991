//! Graphs moe-edge must refuse, and malformed files: clear errors naming the block or file.

#[path = "../../tests/common/fixtures.rs"]
mod common;

use common::*;
use moe_edge_engine::{Error, LoadOptions, Model};

fn load(rel: &str, opts: LoadOptions) -> moe_edge_engine::Result<Model> {
    Model::load(&fixtures().join(rel), opts)
}

#[test]
fn legacy_eager_mixtral_is_refused_naming_the_block() {
    for opts in [
        LoadOptions::default(),
        LoadOptions {
            dense_fallback: true,
            ..Default::default()
        },
    ] {
        let err = load("hf-moe/models/mixtral/legacy_eager/model.onnx", opts).unwrap_err();
        let Error::RefusedBlock {
            node,
            layer,
            reason,
        } = &err
        else {
            panic!("unexpected error {err}")
        };
        assert!(
            node.contains("layers.0") && node.contains("Split"),
            "{node}"
        );
        assert_eq!(*layer, Some(0));
        assert!(reason.contains("R5"), "{reason}");
    }
}

#[test]
fn legacy_eager_switch_is_refused() {
    let err = load(
        "hf-moe/models/switch/legacy_eager/model.onnx",
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::RefusedBlock { node, .. } if node.contains("block.0")),
        "{err}"
    );
    assert!(
        err.to_string().contains("legacy-traced eager expert loop"),
        "{err}"
    );
}

#[test]
fn grouped_mm_export_is_refused_unless_dense_fallback() {
    let err = load(
        "hf-moe/models/mixtral/hf_onnx/model.onnx",
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::RefusedBlock { .. }), "{err}");
    let model = load(
        "hf-moe/models/mixtral/hf_onnx/model.onnx",
        LoadOptions {
            dense_fallback: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(model.fallbacks().len(), 2);
    assert!(model.blocks().is_empty());
}

#[test]
fn truncated_and_garbage_onnx_give_clear_errors() {
    let src =
        std::fs::read(fixtures().join("hf-moe/models/mixtral/legacy_batched/model.onnx")).unwrap();
    let dir = std::env::temp_dir().join(format!("moe-edge-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated_half", src[..src.len() / 2].to_vec()),
        ("truncated_tail", src[..src.len() - 7].to_vec()),
        (
            "garbage",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("empty", vec![]),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.onnx"));
        std::fs::write(&path, bytes).unwrap();
        let err = Model::load(&path, LoadOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::ModelLoad { .. } | Error::Tract { .. }),
            "{name}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("{name}.onnx")),
            "{name}: error does not name the file: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_model_is_a_clear_error() {
    let err = Model::load(
        std::path::Path::new("/nonexistent/model-dir"),
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}
