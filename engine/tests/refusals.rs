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

/// Damage inside the protobuf that decodes fine: an initializer whose data type says STRING,
/// and flipped bits in int64 constants (shapes, axes, indices). Each load and first run is an
/// error or a working model, never a panic.
#[test]
fn damaged_constants_give_errors_not_panics() {
    use prost::Message;
    use tract_onnx::pb::ModelProto;
    let src = std::fs::read(tiny_model().join("model.onnx")).unwrap();
    let dir = std::env::temp_dir().join(format!("moe-edge-constants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tiny_model().join("config.json"), dir.join("config.json")).unwrap();
    let original = ModelProto::decode(src.as_slice()).unwrap();
    let graph = original.graph.as_ref().unwrap();
    let mut variants: Vec<(String, ModelProto)> = vec![];
    let mut string_typed = original.clone();
    string_typed.graph.as_mut().unwrap().initializer[0].data_type = 8;
    variants.push(("an initializer typed STRING".into(), string_typed));
    // int64 constants: initializers, and tensors held by Constant nodes
    let flip = |t: &mut tract_onnx::pb::TensorProto, bit: usize| {
        if t.raw_data.len() >= 8 {
            let i = t.raw_data.len() - 8 + bit / 8;
            t.raw_data[i] ^= 1 << (bit % 8);
        } else if let Some(v) = t.int64_data.last_mut() {
            *v ^= 1 << bit;
        }
    };
    let initializers: Vec<usize> = graph
        .initializer
        .iter()
        .enumerate()
        .filter(|(_, t)| t.data_type == 7)
        .map(|(i, _)| i)
        .collect();
    let constants: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type == "Constant"
                && n.attribute
                    .iter()
                    .any(|a| a.t.as_ref().is_some_and(|t| t.data_type == 7))
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        initializers.len() + constants.len() > 0,
        "the tiny model has int64 constants"
    );
    for (k, &ti) in initializers.iter().take(8).enumerate() {
        let bit = [62, 40, 20, 3][k % 4];
        let mut m = original.clone();
        let t = &mut m.graph.as_mut().unwrap().initializer[ti];
        flip(t, bit);
        variants.push((format!("bit {bit} flipped in initializer {}", t.name), m));
    }
    for (k, &ni) in constants.iter().take(8).enumerate() {
        let bit = [62, 40, 20, 3][k % 4];
        let mut m = original.clone();
        let node = &mut m.graph.as_mut().unwrap().node[ni];
        flip(
            node.attribute
                .iter_mut()
                .find_map(|a| a.t.as_mut())
                .unwrap(),
            bit,
        );
        variants.push((format!("bit {bit} flipped in constant {}", node.name), m));
    }
    for (what, m) in variants {
        std::fs::write(dir.join("model.onnx"), m.encode_to_vec()).unwrap();
        let run = std::panic::catch_unwind(|| {
            let model = Model::load(&dir, LoadOptions::default())?;
            moe_edge_engine::Session::new(&model)?.feed(&[10, 20, 30])
        });
        match run {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => assert!(!e.to_string().is_empty(), "{what}"),
            Err(_) => panic!("{what}: the engine panicked instead of returning an error"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A node with fewer inputs than its operator takes (a MatMul with one input, found by the
/// `onnx` fuzz target as a panic in the matchers) is refused, naming the node, in a model and in
/// a pack's graph.
#[test]
fn a_node_missing_inputs_is_refused_naming_it() {
    use prost::Message;
    use tract_onnx::pb::ModelProto;
    let src = fixtures().join("hf-moe/blocks/mixtral/legacy_batched/model.onnx");
    let mut m = ModelProto::decode(std::fs::read(&src).unwrap().as_slice()).unwrap();
    let node = m
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type == "MatMul")
        .expect("the block has a MatMul");
    node.input.truncate(1);
    let name = node.name.clone();
    let dir = std::env::temp_dir().join(format!("moe-edge-arity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), m.encode_to_vec()).unwrap();
    let err = Model::load(&dir, LoadOptions::default())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains(&name)
            && err.contains("has 1 input(s)")
            && err.contains("MatMul takes at least 2 input(s)"),
        "{err}"
    );
}
