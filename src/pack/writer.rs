//! `moe-edge pack`: writes a self-contained model directory with the rewritten graph (dense
//! weights only), one expert file, a manifest and the tokenizer/config files.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, AttributeProto,
    StringStringEntryProto,
};

use super::format::{
    align_up, Entry, Header, TensorFormat, TensorKind, ENTRY_BYTES, HEADER_BYTES, NO_EXPERT,
    TENSOR_ALIGN,
};
use super::manifest::{
    DenseLayer, ExpertFormat, Manifest, PackLayer, SourceInfo, EXPERT_FILE, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_FILE,
};
use crate::dense_op::LINEAR_OP_TYPE;
use crate::error::{Error, Result};
use crate::kernels::q8::{q8_bytes, quantize, scale_type_for, ScaleType};
use crate::kernels::BLOCK;
use crate::model::ModelFiles;
use crate::moe::DenseExpert;
use crate::onnx::graph::GraphIndex;
use crate::onnx::tensors::{load_f32, transpose};
use crate::onnx::{import_model, DetectOptions, ImportedModel, MOE_OP_TYPE};

/// Default alignment of each expert: a multiple of 4 KiB, 16 KiB (Raspberry Pi 5) and
/// 64 KiB page kernels.
pub const DEFAULT_ALIGN: u64 = 64 * 1024;

/// Attribute of the sparse-op nodes in a packed graph: the index of the layer in the manifest.
pub const PACK_LAYER_ATTR: &str = "pack_layer";
/// Attribute of the int8 dense nodes in a packed graph: the index in the manifest's `dense`.
pub const PACK_DENSE_ATTR: &str = "pack_dense";

/// A `MatMul(x, W)` by a constant f32 weight to store as int8.
struct DenseCandidate {
    /// Output tensor of the MatMul (kept by the replacement node).
    output: String,
    input: String,
    initializer: String,
    in_features: usize,
    out_features: usize,
    /// `[out, in]`
    weight_out_in: Vec<f32>,
}

/// Every MatMul by a 2D f32 initializer used by no other node, with both sides at least 32 wide.
fn dense_candidates(imported: &ImportedModel, dir: &Path) -> Result<Vec<DenseCandidate>> {
    let graph = imported.proto.graph.as_ref().expect("imported graph");
    let g = GraphIndex::new(graph);
    let mut found = vec![];
    for node in &graph.node {
        if node.op_type != "MatMul" || !node.domain.is_empty() || node.input.len() != 2 {
            continue;
        }
        let Some(init) = g.initializer(&node.input[1]) else {
            continue;
        };
        let float = init.data_type == tract_onnx::pb::tensor_proto::DataType::Float as i32;
        if !float
            || init.dims.len() != 2
            || init.dims.iter().any(|&d| d < 32)
            || g.consumers_of(&node.input[1]).len() != 1
        {
            continue;
        }
        let (in_f, out_f) = (init.dims[0] as usize, init.dims[1] as usize);
        let (_, w) = load_f32(&g, &node.input[1], Some(dir))?;
        found.push(DenseCandidate {
            output: node.output[0].clone(),
            input: node.input[0].clone(),
            initializer: node.input[1].clone(),
            in_features: in_f,
            out_features: out_f,
            weight_out_in: transpose(&w, in_f, out_f),
        });
    }
    Ok(found)
}

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub experts: ExpertFormat,
    /// Block scales of int8 experts: f16 (default) or f32.
    pub int8_scales: ScaleType,
    pub alignment: u64,
    pub dense_fallback: bool,
    pub progress: bool,
    /// Also store the dense linear layers (MatMul by a constant weight: attention projections,
    /// LM head) as int8, computed by the int8 kernels.
    pub dense_int8: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            experts: ExpertFormat::Int8,
            int8_scales: ScaleType::F16,
            alignment: DEFAULT_ALIGN,
            dense_fallback: false,
            progress: false,
            dense_int8: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct PackSummary {
    pub out_dir: PathBuf,
    pub layers: usize,
    pub experts: usize,
    pub expert_file_bytes: u64,
    pub tensors_with_f32_scales: usize,
}

/// A tensor to write: its table entry (offset filled by the layout) and its f32 values.
struct Planned<'a> {
    entry: Entry,
    values: std::borrow::Cow<'a, [f32]>,
}

/// Packs the model at `src` into `out`.
pub fn pack_model(src: &Path, out: &Path, opts: &PackOptions) -> Result<PackSummary> {
    if !opts.alignment.is_power_of_two() || opts.alignment < TENSOR_ALIGN {
        return Err(Error::InvalidInput(format!(
            "alignment {} must be a power of two >= {TENSOR_ALIGN}",
            opts.alignment
        )));
    }
    let files = ModelFiles::resolve(src)?;
    let imported = import_model(
        &files.onnx,
        DetectOptions {
            dense_fallback: opts.dense_fallback,
            literal: false,
        },
    )?;
    if imported.layers.is_empty() {
        return Err(Error::UnsupportedGraph(format!(
            "{}: no MoE block to pack",
            files.onnx.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(Error::io(out))?;

    // 1. experts as f32, then the table: every tensor with its format and shape
    let mut dense: Vec<Vec<DenseExpert>> = vec![];
    for layer in &imported.layers {
        dense.push(
            (0..layer.spec.experts)
                .map(|e| layer.experts.to_dense(e))
                .collect::<Result<_>>()?,
        );
    }
    let dense_layers = if opts.dense_int8 {
        dense_candidates(&imported, &files.dir)?
    } else {
        vec![]
    };
    let mut plan: Vec<Vec<Planned>> = vec![]; // groups placed at `alignment` boundaries
    for (di, d) in dense_layers.iter().enumerate() {
        let format = fmt(
            &PackOptions {
                experts: ExpertFormat::Int8,
                ..opts.clone()
            },
            &d.weight_out_in,
            d.in_features,
        );
        plan.push(vec![planned(
            di as u32,
            NO_EXPERT,
            TensorKind::Dense,
            format,
            d.out_features,
            d.in_features,
            &d.weight_out_in,
        )]);
    }
    for (li, layer) in imported.layers.iter().enumerate() {
        let li = li as u32;
        let (h, e_count) = (layer.spec.hidden, layer.spec.experts);
        let mut layer_group = vec![planned(
            li,
            NO_EXPERT,
            TensorKind::Router,
            TensorFormat::F32,
            e_count,
            h,
            &layer.router,
        )];
        if let Some(s) = &layer.shared {
            let f = s.ffn.ffn;
            layer_group.push(planned(
                li,
                NO_EXPERT,
                TensorKind::SharedGateProj,
                fmt(opts, &s.ffn.gate, h),
                f,
                h,
                &s.ffn.gate,
            ));
            layer_group.push(planned(
                li,
                NO_EXPERT,
                TensorKind::SharedUpProj,
                fmt(opts, &s.ffn.up, h),
                f,
                h,
                &s.ffn.up,
            ));
            layer_group.push(planned(
                li,
                NO_EXPERT,
                TensorKind::SharedDownProj,
                fmt(opts, &s.ffn.down, f),
                h,
                f,
                &s.ffn.down,
            ));
            layer_group.push(planned(
                li,
                NO_EXPERT,
                TensorKind::SharedGate,
                TensorFormat::F32,
                1,
                h,
                &s.gate,
            ));
        }
        plan.push(layer_group);
        for (e, x) in dense[li as usize].iter().enumerate() {
            let e = e as u32;
            let f = x.ffn;
            plan.push(vec![
                planned(
                    li,
                    e,
                    TensorKind::Gate,
                    fmt(opts, &x.gate, h),
                    f,
                    h,
                    &x.gate,
                ),
                planned(li, e, TensorKind::Up, fmt(opts, &x.up, h), f, h, &x.up),
                planned(
                    li,
                    e,
                    TensorKind::Down,
                    fmt(opts, &x.down, f),
                    h,
                    f,
                    &x.down,
                ),
            ]);
        }
    }
    let count: usize = plan.iter().map(|g| g.len()).sum();
    let table_offset = HEADER_BYTES as u64;
    let data_offset = align_up(table_offset + (count * ENTRY_BYTES) as u64, opts.alignment);
    let mut cursor = data_offset;
    for group in plan.iter_mut() {
        cursor = align_up(cursor, opts.alignment);
        for t in group.iter_mut() {
            cursor = align_up(cursor, TENSOR_ALIGN);
            t.entry.offset = cursor;
            cursor += t.entry.length;
        }
    }
    let file_bytes = cursor;

    // 2. the expert file
    let expert_path = out.join(EXPERT_FILE);
    let file = File::create(&expert_path).map_err(Error::io(&expert_path))?;
    file.set_len(file_bytes).map_err(Error::io(&expert_path))?;
    let bar = opts.progress.then(|| {
        let b = indicatif::ProgressBar::new(plan.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} tensor groups, {eta} left",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b.set_message("packing experts");
        b
    });
    let mut entries = Vec::with_capacity(count);
    for group in plan.iter_mut() {
        for t in group.iter_mut() {
            let bytes = encode(
                &t.values,
                t.entry.format,
                t.entry.rows as usize,
                t.entry.cols as usize,
            );
            debug_assert_eq!(bytes.len() as u64, t.entry.length);
            t.entry.crc32 = crc32fast::hash(&bytes);
            file.write_all_at(&bytes, t.entry.offset)
                .map_err(Error::io(&expert_path))?;
            entries.push(t.entry.clone());
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let table: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
    let header = Header {
        alignment: opts.alignment as u32,
        entry_count: count as u32,
        table_offset,
        data_offset,
        file_bytes,
        table_crc32: crc32fast::hash(&table),
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(Error::io(&expert_path))?;
    file.write_all_at(&table, table_offset)
        .map_err(Error::io(&expert_path))?;
    file.sync_all().map_err(Error::io(&expert_path))?;

    // 3. the graph, with each MoE node naming its manifest layer
    write_graph(&imported, &dense_layers, &files, out)?;

    // 4. manifest and companions
    let layers = imported
        .layers
        .iter()
        .enumerate()
        .map(|(li, l)| PackLayer {
            spec: l.spec.clone(),
            form: imported
                .blocks
                .get(li)
                .map(|b| b.form.to_string())
                .unwrap_or_default(),
            expert_file_bytes: entries
                .iter()
                .filter(|e| {
                    e.layer == li as u32 && e.expert != NO_EXPERT && e.kind != TensorKind::Dense
                })
                .map(|e| e.length)
                .sum(),
        })
        .collect();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        source: source_info(&files)?,
        experts: opts.experts,
        block_size: BLOCK,
        alignment: opts.alignment,
        expert_file: EXPERT_FILE.into(),
        expert_cache_mb: None,
        layers,
        dense: dense_layers
            .iter()
            .map(|d| DenseLayer {
                name: d.initializer.clone(),
                in_features: d.in_features,
                out_features: d.out_features,
            })
            .collect(),
    };
    let manifest_path = out.join(MANIFEST_FILE);
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).expect("manifest serialises"),
    )
    .map_err(Error::io(&manifest_path))?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    ] {
        if let Some(p) = files.companion(name) {
            let dst = out.join(name);
            std::fs::copy(&p, &dst).map_err(Error::io(&p))?;
            let mut perms = std::fs::metadata(&dst)
                .map_err(Error::io(&dst))?
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&dst, perms).map_err(Error::io(&dst))?;
        }
    }
    Ok(PackSummary {
        out_dir: out.to_path_buf(),
        layers: imported.layers.len(),
        experts: dense.iter().map(|d| d.len()).sum(),
        expert_file_bytes: file_bytes,
        tensors_with_f32_scales: entries
            .iter()
            .filter(|e| e.format == TensorFormat::Q8F32Scales)
            .count(),
    })
}

fn planned(
    layer: u32,
    expert: u32,
    kind: TensorKind,
    format: TensorFormat,
    rows: usize,
    cols: usize,
    values: &[f32],
) -> Planned<'_> {
    let length = format.bytes(rows, cols) as u64;
    Planned {
        entry: Entry {
            layer,
            expert,
            kind,
            format,
            rows: rows as u32,
            cols: cols as u32,
            offset: 0,
            length,
            crc32: 0,
        },
        values: values.into(),
    }
}

/// Storage format of one matrix: int8 packs use f16 scales unless the matrix needs f32 ones.
fn fmt(opts: &PackOptions, w: &[f32], cols: usize) -> TensorFormat {
    match opts.experts {
        ExpertFormat::F32 => TensorFormat::F32,
        ExpertFormat::F16 => TensorFormat::F16,
        ExpertFormat::Int8 => match scale_type_for(w, cols, opts.int8_scales) {
            ScaleType::F16 => TensorFormat::Q8F16Scales,
            ScaleType::F32 => TensorFormat::Q8F32Scales,
        },
    }
}

fn encode(values: &[f32], format: TensorFormat, rows: usize, cols: usize) -> Vec<u8> {
    match format {
        TensorFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorFormat::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales => {
            let st = format.scale_type().expect("q8 format");
            let mut out = vec![0u8; q8_bytes(rows, cols, st)];
            quantize(values, rows, cols, st, &mut out);
            out
        }
    }
}

/// Writes the rewritten graph: MoE nodes carry `pack_layer`; dense weights that the source kept
/// in external data go to the pack's own `model.onnx.data`.
fn write_graph(
    imported: &ImportedModel,
    dense: &[DenseCandidate],
    files: &ModelFiles,
    out: &Path,
) -> Result<()> {
    let mut proto = imported.proto.clone();
    let graph = proto.graph.as_mut().expect("imported graph");
    for (di, d) in dense.iter().enumerate() {
        let node = graph
            .node
            .iter_mut()
            .find(|n| n.output.first() == Some(&d.output))
            .expect("dense candidate node");
        *node = tract_onnx::pb::NodeProto {
            name: format!("moe_edge/dense{di}/linear_q8"),
            op_type: LINEAR_OP_TYPE.into(),
            domain: crate::onnx::MOE_OP_DOMAIN.into(),
            input: vec![d.input.clone()],
            output: vec![d.output.clone()],
            attribute: vec![AttributeProto {
                name: PACK_DENSE_ATTR.into(),
                r#type: AttributeType::Int as i32,
                i: di as i64,
                ..Default::default()
            }],
            ..Default::default()
        };
    }
    let moved: std::collections::HashSet<&str> =
        dense.iter().map(|d| d.initializer.as_str()).collect();
    graph
        .initializer
        .retain(|t| !moved.contains(t.name.as_str()));
    graph.input.retain(|i| !moved.contains(i.name.as_str()));
    for node in graph.node.iter_mut().filter(|n| n.op_type == MOE_OP_TYPE) {
        let id = node
            .attribute
            .iter()
            .find(|a| a.name == "moe_id")
            .map(|a| a.i);
        let index = id
            .and_then(|id| imported.layer_ids.iter().position(|&x| x == id))
            .expect("every sparse node has a registered layer");
        node.attribute = vec![AttributeProto {
            name: PACK_LAYER_ATTR.into(),
            r#type: AttributeType::Int as i32,
            i: index as i64,
            ..Default::default()
        }];
    }
    let data_name = "model.onnx.data";
    let data_path = out.join(data_name);
    let mut data: Option<File> = None;
    let mut data_len = 0u64;
    for t in graph.initializer.iter_mut() {
        if t.data_location != Some(DataLocation::External as i32) {
            continue;
        }
        let kv = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let location = kv("location").ok_or_else(|| {
            Error::UnsupportedGraph(format!(
                "initializer '{}' has external data without a location",
                t.name
            ))
        })?;
        let offset: u64 = kv("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
        let src = files.dir.join(&location);
        let f = File::open(&src).map_err(Error::io(&src))?;
        let length: u64 = match kv("length").and_then(|v| v.parse().ok()) {
            Some(l) => l,
            None => f.metadata().map_err(Error::io(&src))?.len() - offset,
        };
        let mut bytes = vec![0u8; length as usize];
        f.read_exact_at(&mut bytes, offset)
            .map_err(Error::io(&src))?;
        let dst = match &mut data {
            Some(d) => d,
            None => data.insert(File::create(&data_path).map_err(Error::io(&data_path))?),
        };
        let at = align_up(data_len, 4096);
        dst.write_all_at(&bytes, at)
            .map_err(Error::io(&data_path))?;
        data_len = at + length;
        t.external_data = vec![
            StringStringEntryProto {
                key: "location".into(),
                value: data_name.into(),
            },
            StringStringEntryProto {
                key: "offset".into(),
                value: at.to_string(),
            },
            StringStringEntryProto {
                key: "length".into(),
                value: length.to_string(),
            },
        ];
    }
    let path = out.join("model.onnx");
    std::fs::write(&path, proto.encode_to_vec()).map_err(Error::io(&path))
}

/// SHA-256 over the source graph and its external data files.
fn source_info(files: &ModelFiles) -> Result<SourceInfo> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut paths = vec![files.onnx.clone()];
    let data = files.onnx.with_extension("onnx.data");
    if data.is_file() {
        paths.push(data);
    }
    for p in paths {
        let mut f = File::open(&p).map_err(Error::io(&p))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(Error::io(&p))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
    }
    let digest = hasher.finalize();
    Ok(SourceInfo {
        file: files.onnx.display().to_string(),
        sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        bytes,
    })
}
