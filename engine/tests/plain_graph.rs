//! A graph without MoE blocks runs as a plain tract model: a tiny language model built here
//! (embedding Gather, then MatMul to the vocabulary) against logits computed by hand.

use moe_edge_engine::{Flow, GenerateParams, Generator, LoadOptions, Model};
use prost::Message;
use tract_onnx::pb::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value as Dim,
    tensor_shape_proto::Dimension, type_proto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

const V: usize = 11;
const H: usize = 4;

fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(d.clone()),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn weights() -> (Vec<f32>, Vec<f32>) {
    let emb: Vec<f32> = (0..V * H)
        .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.4)
        .collect();
    let w: Vec<f32> = (0..H * V)
        .map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5)
        .collect();
    (emb, w)
}

fn tiny_lm() -> ModelProto {
    let (emb, w) = weights();
    let node = |op: &str, inputs: &[&str], output: &str| NodeProto {
        op_type: op.into(),
        name: format!("{op}_0"),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "tiny_lm".into(),
            node: vec![
                node("Gather", &["emb", "input_ids"], "hidden"),
                node("MatMul", &["hidden", "w"], "logits"),
            ],
            initializer: vec![
                f32_tensor("emb", &[V as i64, H as i64], &emb),
                f32_tensor("w", &[H as i64, V as i64], &w),
            ],
            input: vec![value_info(
                "input_ids",
                DataType::Int64,
                &[Dim::DimParam("batch".into()), Dim::DimParam("seq".into())],
            )],
            output: vec![value_info(
                "logits",
                DataType::Float,
                &[
                    Dim::DimParam("batch".into()),
                    Dim::DimParam("seq".into()),
                    Dim::DimValue(V as i64),
                ],
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn by_hand(ids: &[i64]) -> Vec<f32> {
    let (emb, w) = weights();
    ids.iter()
        .flat_map(|&id| {
            let e = &emb[id as usize * H..(id as usize + 1) * H];
            (0..V)
                .map(|v| (0..H).map(|h| e[h] * w[h * V + v]).sum::<f32>())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn graph_without_moe_runs_as_plain_tract_model() {
    let dir = std::env::temp_dir().join(format!("moe-edge-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.onnx");
    std::fs::write(&path, tiny_lm().encode_to_vec()).unwrap();
    let model = Model::load(&path, LoadOptions::default()).unwrap();
    assert!(model.blocks().is_empty() && model.fallbacks().is_empty());
    assert!(!model.has_kv_cache());
    let ids = [3i64, 7, 0, 10, 3, 1];
    let (logits, vocab) = model.logits(&ids, 2).unwrap();
    assert_eq!(vocab, V);
    let want = by_hand(&ids);
    let diff = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-6, "max abs diff {diff}");
    // and it generates: greedy tokens are the argmax chain of the hand-computed logits
    let params = GenerateParams {
        max_tokens: 4,
        ..Default::default()
    };
    let mut generator = Generator::new(&model, params).unwrap();
    let out = generator.generate(&[5], |_| Flow::Continue).unwrap();
    let mut expected = vec![];
    let mut last = 5i64;
    for _ in 0..4 {
        let row = by_hand(&[last]);
        // first of the largest values, as greedy sampling breaks ties
        let best = row.iter().cloned().fold(f32::MIN, f32::max);
        last = row.iter().position(|&v| v == best).unwrap() as i64;
        expected.push(last);
    }
    assert_eq!(out.generated_ids, expected);
    std::fs::remove_dir_all(&dir).ok();
}
