//! Packed models: experts quantised into one expert file that is read on demand through a
//! byte-budget LRU cache, next to the rewritten graph and a manifest.

pub mod cache;
pub mod file;
pub mod format;
pub mod manifest;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto};
use tract_onnx::prelude::*;

use crate::dense_op::{Q8Linear, LINEAR_OP_TYPE};
use crate::error::{Error, Result};
use crate::kernels::q8::{blocks_per_row, Q8Matrix};
use crate::moe::forward::MoeLayer;
use crate::moe::q8_expert::{Q8Expert, Q8Path};
use crate::moe::{DenseExpert, ExpertFfn, ExpertStore, SharedExpert};
use crate::onnx::{ImportedModel, MOE_OP_TYPE};
use crate::sparse_op::{LayerRegistration, Registered};
pub use cache::EvictionPolicy;
use cache::ExpertCache;
use file::PackFile;
use format::{Entry, TensorFormat, TensorKind};
use manifest::{Manifest, MANIFEST_FILE};

pub use cache::CacheStats;
pub use manifest::ExpertFormat;
pub use writer::{pack_model, PackOptions, PackSummary};

/// Whether `dir` is a packed model directory.
pub fn is_pack(dir: &Path) -> bool {
    dir.is_dir() && dir.join(MANIFEST_FILE).is_file()
}

/// How to open a pack.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackOpenOptions {
    /// Budget of the expert cache in MiB (`None`: the manifest's default, else every expert).
    pub expert_cache_mb: Option<u64>,
    /// Check every tensor's checksum at open.
    pub verify: bool,
    pub cache_policy: EvictionPolicy,
}

/// An opened pack: its graph, layers and the cache they share.
pub struct OpenedPack {
    pub imported: ImportedModel,
    pub manifest: Manifest,
    pub cache: Arc<ExpertCache>,
}

/// Opens a packed model directory.
pub fn open_pack(dir: &Path, opts: PackOpenOptions) -> Result<OpenedPack> {
    let manifest = Manifest::read(dir)?;
    let file = Arc::new(PackFile::open(&dir.join(&manifest.expert_file))?);
    if opts.verify {
        file.verify_all()?;
    }
    let q8_path = Q8Path::from_env();
    // resident bytes of every expert, to size and bound the cache
    let mut sizes: Vec<Vec<u64>> = vec![];
    for (li, l) in manifest.layers.iter().enumerate() {
        let mut per = vec![];
        for e in 0..l.spec.experts as u32 {
            let mut b = 0;
            for kind in [TensorKind::Gate, TensorKind::Up, TensorKind::Down] {
                b += resident_bytes(file.entry(li as u32, Some(e), kind)?);
            }
            per.push(b);
        }
        sizes.push(per);
    }
    let total: u64 = sizes.iter().flatten().sum();
    let largest = sizes.iter().flatten().copied().max().unwrap_or(0);
    let mut budget = opts
        .expert_cache_mb
        .or(manifest.expert_cache_mb)
        .map(|mb| mb << 20)
        .unwrap_or(total);
    if budget < largest {
        log::warn!("expert cache budget {budget} bytes is smaller than one expert ({largest} bytes): using {largest}");
        budget = largest;
    }
    let cache = ExpertCache::with_policy(budget, manifest.layers.len(), opts.cache_policy);
    log::info!(
        "expert cache: budget {:.1} MiB of {:.1} MiB of experts",
        budget as f64 / 1048576.0,
        total as f64 / 1048576.0
    );

    let mut layers = vec![];
    for (li, l) in manifest.layers.iter().enumerate() {
        let li32 = li as u32;
        let router = read_f32(&file, file.entry(li32, None, TensorKind::Router)?)?;
        let shared = match l.spec.shared_ffn {
            Some(_) => {
                let gate = file.entry(li32, None, TensorKind::SharedGateProj)?;
                let up = file.entry(li32, None, TensorKind::SharedUpProj)?;
                let down = file.entry(li32, None, TensorKind::SharedDownProj)?;
                Some(SharedExpert {
                    ffn: DenseExpert::new(
                        l.spec.hidden,
                        gate.rows as usize,
                        read_f32(&file, gate)?,
                        read_f32(&file, up)?,
                        read_f32(&file, down)?,
                    )?,
                    gate: read_f32(&file, file.entry(li32, None, TensorKind::SharedGate)?)?,
                })
            }
            None => None,
        };
        let store = PackLayerStore {
            file: file.clone(),
            cache: cache.clone(),
            layer: li32,
            sizes: sizes[li].clone(),
            q8_path,
        };
        layers.push(Arc::new(MoeLayer::new(
            l.spec.clone(),
            router,
            Arc::new(store),
            shared,
        )?));
    }
    let graph_path = dir.join("model.onnx");
    let bytes = std::fs::read(&graph_path).map_err(Error::io(&graph_path))?;
    let mut proto = tract_onnx::onnx()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|e| Error::ModelLoad {
            path: graph_path.clone(),
            reason: format!("not a valid ONNX protobuf ({e:#})"),
        })?;
    let (mut registration, ids) = LayerRegistration::register(&layers);
    let mut dense = vec![];
    for (di, d) in manifest.dense.iter().enumerate() {
        let e = file.entry(di as u32, None, TensorKind::Dense)?;
        if (e.rows as usize, e.cols as usize) != (d.out_features, d.in_features)
            || e.format.scale_type().is_none()
        {
            return Err(Error::CorruptPack(format!(
                "dense layer {di} ('{}') does not match its table entry",
                d.name
            )));
        }
        let m = q8_matrix(&file.read_tensor(e)?, e)?;
        dense.push(Registered::Linear(Arc::new(Q8Linear::new(di, m))));
    }
    let (dense_registration, dense_ids) = LayerRegistration::register_items(dense);
    registration.absorb(dense_registration);
    let graph = proto.graph.as_mut().ok_or_else(|| Error::ModelLoad {
        path: graph_path.clone(),
        reason: "no graph".into(),
    })?;
    point_nodes_at(graph, MOE_OP_TYPE, writer::PACK_LAYER_ATTR, &ids, "layer")?;
    point_nodes_at(
        graph,
        LINEAR_OP_TYPE,
        writer::PACK_DENSE_ATTR,
        &dense_ids,
        "dense layer",
    )?;
    let imported = ImportedModel::from_parts(graph_path, proto, layers, ids, registration);
    Ok(OpenedPack {
        imported,
        manifest,
        cache,
    })
}

/// Replaces the manifest index in attribute `attr` of every `op_type` node by the registry id of
/// that item (`moe_id`); every item must have exactly its node.
fn point_nodes_at(
    graph: &mut tract_onnx::pb::GraphProto,
    op_type: &str,
    attr: &str,
    ids: &[i64],
    what: &str,
) -> Result<()> {
    let mut seen = vec![false; ids.len()];
    for node in graph.node.iter_mut().filter(|n| n.op_type == op_type) {
        let index = node
            .attribute
            .iter()
            .find(|a| a.name == attr)
            .map(|a| a.i)
            .filter(|&i| i >= 0 && (i as usize) < ids.len());
        let index = index.ok_or_else(|| {
            Error::CorruptPack(format!(
                "node '{}' names no {what} of the manifest",
                node.name
            ))
        })? as usize;
        if std::mem::replace(&mut seen[index], true) {
            return Err(Error::CorruptPack(format!(
                "manifest {what} {index} has two nodes in the graph"
            )));
        }
        node.attribute = vec![AttributeProto {
            name: "moe_id".into(),
            r#type: AttributeType::Int as i32,
            i: ids[index],
            ..Default::default()
        }];
    }
    match seen.iter().position(|s| !s) {
        Some(missing) => Err(Error::CorruptPack(format!(
            "manifest {what} {missing} has no node in the graph"
        ))),
        None => Ok(()),
    }
}

/// Bytes an entry takes once loaded (int8 values and f32 scales; f16 and f32 as f32).
fn resident_bytes(e: &Entry) -> u64 {
    let (rows, cols) = (e.rows as u64, e.cols as u64);
    match e.format {
        TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales => {
            let nb = blocks_per_row(cols as usize) as u64;
            rows * nb * 32 + rows * nb * 4
        }
        TensorFormat::F32 | TensorFormat::F16 => rows * cols * 4,
    }
}

fn decode_f32(bytes: &[u8], format: TensorFormat) -> Option<Vec<f32>> {
    match format {
        TensorFormat::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        TensorFormat::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales => None,
    }
}

/// Reads a tensor as f32 values (dequantising int8).
fn read_f32(file: &PackFile, e: &Entry) -> Result<Vec<f32>> {
    let bytes = file.read_tensor(e)?;
    Ok(match decode_f32(&bytes, e.format) {
        Some(v) => v,
        None => q8_matrix(&bytes, e)?.dequantize(),
    })
}

fn q8_matrix(bytes: &[u8], e: &Entry) -> Result<Q8Matrix> {
    Q8Matrix::from_bytes(
        bytes,
        e.rows as usize,
        e.cols as usize,
        e.format.scale_type().expect("q8 format"),
    )
    .ok_or_else(|| Error::CorruptPack(format!("{}: size does not match its shape", e.describe())))
}

/// The routed experts of one layer of a pack, loaded through the shared cache.
#[derive(Debug)]
struct PackLayerStore {
    file: Arc<PackFile>,
    cache: Arc<ExpertCache>,
    layer: u32,
    sizes: Vec<u64>,
    q8_path: Q8Path,
}

impl PackLayerStore {
    fn load(&self, expert: u32) -> Result<Arc<dyn ExpertFfn>> {
        let entries = [TensorKind::Gate, TensorKind::Up, TensorKind::Down]
            .map(|k| self.file.entry(self.layer, Some(expert), k));
        let [gate, up, down] = entries;
        let (gate, up, down) = (gate?, up?, down?);
        // one read for the whole expert: its tensors are contiguous
        let start = gate.offset.min(up.offset).min(down.offset);
        let end = (gate.offset + gate.length)
            .max(up.offset + up.length)
            .max(down.offset + down.length);
        let blob = self.file.read_range(
            start,
            (end - start) as usize,
            &format!("layer {} expert {expert}", self.layer),
        )?;
        let slice = |e: &Entry| -> Result<&[u8]> {
            let b = &blob[(e.offset - start) as usize..(e.offset - start + e.length) as usize];
            file::check_crc(&self.file, e, b)?;
            Ok(b)
        };
        let (gb, ub, db) = (slice(gate)?, slice(up)?, slice(down)?);
        let expert: Arc<dyn ExpertFfn> = match gate.format {
            TensorFormat::F32 | TensorFormat::F16 => {
                let dec = |b: &[u8], e: &Entry| {
                    decode_f32(b, e.format).ok_or_else(|| {
                        Error::CorruptPack(format!(
                            "{}: mixed formats within an expert",
                            e.describe()
                        ))
                    })
                };
                Arc::new(DenseExpert::new(
                    gate.cols as usize,
                    gate.rows as usize,
                    dec(gb, gate)?,
                    dec(ub, up)?,
                    dec(db, down)?,
                )?)
            }
            TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales => Arc::new(Q8Expert {
                gate: q8_matrix(gb, gate)?,
                up: q8_matrix(ub, up)?,
                down: q8_matrix(db, down)?,
                path: self.q8_path,
            }),
        };
        Ok(expert)
    }
}

impl ExpertStore for PackLayerStore {
    fn len(&self) -> usize {
        self.sizes.len()
    }

    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>> {
        let bytes = *self.sizes.get(index).ok_or_else(|| {
            Error::InvalidInput(format!("layer {}: expert {index} out of range", self.layer))
        })?;
        self.cache
            .get(self.layer, index as u32, bytes, || self.load(index as u32))
    }

    fn to_dense(&self, index: usize) -> Result<DenseExpert> {
        let e = index as u32;
        let read = |k| -> Result<(Vec<f32>, &Entry)> {
            let entry = self.file.entry(self.layer, Some(e), k)?;
            Ok((read_f32(&self.file, entry)?, entry))
        };
        let (gate, ge) = read(TensorKind::Gate)?;
        let (up, _) = read(TensorKind::Up)?;
        let (down, _) = read(TensorKind::Down)?;
        DenseExpert::new(ge.cols as usize, ge.rows as usize, gate, up, down)
    }
}
