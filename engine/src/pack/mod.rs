//! Packed models: experts quantised into one expert file that is read on demand through a
//! byte-budget cache, next to the rewritten graph and a manifest. Writing (`writer.rs`), the file
//! format (`format.rs`, `file.rs`), the manifest and the cache each have their module; this one
//! opens a pack into the layers its graph names.

pub(crate) mod cache;
pub(crate) mod cache_sim;
pub(crate) mod file;
pub(crate) mod format;
pub(crate) mod manifest;
pub(crate) mod prune;
pub(crate) mod validate;
pub(crate) mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::ModelProto;

use crate::error::{Error, Result};
use crate::kernels::q4::Q4Matrix;
use crate::kernels::q8::{blocks_per_row, Q8Matrix};
use crate::moe::expert::{DenseExpert, Expert, ExpertFfn, Q4Expert, Q8Expert};
use crate::moe::layer::MoeLayer;
use crate::moe::store::{ExpertStore, SharedExpert};
use crate::ops::{EmbeddingRows, OpTable, Q8Linear};
use cache::ExpertCache;
use file::PackFile;
use format::{Entry, TensorFormat, TensorKind};
pub(crate) use manifest::MANIFEST_FILE;

pub use cache::{
    hot_experts, kept_and_largest_other, CacheCounters, CacheStats, EvictionPolicy,
    FREQUENCY_HALF_LIFE_TOKENS,
};
pub use cache_sim::{simulate_cache, uniform_routing, BlockCall, CacheSimulation};
pub use manifest::{DenseLayer, ExpertFormat, Manifest, PackLayer, SourceInfo};
pub use prune::{prune_pack, PruneSummary};
pub use writer::{pack_model, pack_model_with_progress, PackOptions, PackSummary, DEFAULT_ALIGN};

/// Whether `dir` is a packed model directory.
pub(crate) fn is_pack(dir: &Path) -> bool {
    dir.is_dir() && dir.join(MANIFEST_FILE).is_file()
}

/// How to open a pack.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PackOpenOptions {
    /// Budget of the expert cache in MiB (`None`: the manifest's default, else every expert).
    pub expert_cache_mb: Option<u64>,
    /// Check every tensor's checksum at open.
    pub verify: bool,
    pub cache_policy: EvictionPolicy,
    /// Read the experts the next layer's router predicts on a background thread while a layer
    /// computes (`--prefetch`).
    pub prefetch: bool,
}

/// An opened pack: its graph, the layers its nodes name, and the cache the layers share.
pub(crate) struct OpenedPack {
    pub proto: ModelProto,
    pub ops: OpTable,
    pub manifest: Manifest,
    pub cache: Arc<ExpertCache>,
}

/// Opens a packed model directory.
pub(crate) fn open_pack(dir: &Path, opts: PackOpenOptions) -> Result<OpenedPack> {
    let manifest = Manifest::read(dir)?;
    let expert_file = dir.join(validate::expert_file_name(&manifest)?);
    let file = Arc::new(PackFile::open(&expert_file)?);
    validate::check(&manifest, &file)?;
    if opts.verify {
        file.verify_all()?;
    }
    // resident bytes of every expert, to size and bound the cache
    let mut sizes: Vec<Vec<u64>> = vec![];
    for (li, l) in manifest.layers.iter().enumerate() {
        let mut per = vec![];
        for e in 0..l.spec.experts as u32 {
            let mut b = 0;
            if l.pruned.binary_search(&(e as usize)).is_err() {
                for kind in [TensorKind::Gate, TensorKind::Up, TensorKind::Down] {
                    b += resident_bytes(file.entry(li as u32, Some(e), kind)?);
                }
            }
            per.push(b);
        }
        sizes.push(per);
    }
    let total: u64 = sizes.iter().flatten().sum();
    let largest = sizes.iter().flatten().copied().max().unwrap_or(0);
    let mut budget = match opts.expert_cache_mb.or(manifest.expert_cache_mb) {
        Some(mb) => mb.checked_mul(1 << 20).ok_or_else(|| {
            Error::InvalidInput(format!("an expert cache of {mb} MiB is too large"))
        })?,
        None => total,
    };
    if budget < largest {
        log::warn!("expert cache budget {budget} bytes is smaller than one expert ({largest} bytes): using {largest}");
        budget = largest;
    }
    let requests_per_token: u64 = manifest.layers.iter().map(|l| l.spec.top_k as u64).sum();
    let cache = ExpertCache::with_half_life(
        budget,
        manifest.layers.len(),
        opts.cache_policy,
        FREQUENCY_HALF_LIFE_TOKENS * requests_per_token,
    );
    log::info!(
        "expert cache: budget {:.1} MiB of {:.1} MiB of experts",
        budget as f64 / 1048576.0,
        total as f64 / 1048576.0
    );

    let prefetch = if opts.prefetch {
        let readers = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(li, l)| PackLayerStore {
                file: file.clone(),
                cache: cache.clone(),
                layer: li as u32,
                sizes: sizes[li].clone(),
                pruned: l.pruned.clone(),
                prefetch: None,
            })
            .collect();
        Some(spawn_prefetcher(readers)?)
    } else {
        None
    };
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
                    ffn: DenseExpert::silu_gated(
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
            pruned: l.pruned.clone(),
            prefetch: prefetch.clone(),
        };
        let mut layer = MoeLayer::new(l.spec.clone(), li, router, None, Arc::new(store), shared)?;
        if !l.pruned.is_empty() {
            let allowed: Vec<bool> = (0..l.spec.experts)
                .map(|e| l.pruned.binary_search(&e).is_err())
                .collect();
            layer.router.restrict(&allowed)?;
        }
        layers.push(Arc::new(layer));
    }
    let mut linear = vec![];
    for di in 0..manifest.dense.len() {
        // shape and format were checked against the manifest by validate::check
        let e = file.entry(di as u32, None, TensorKind::Dense)?;
        let m = q8_matrix(&file.read_tensor(e)?, e)?;
        linear.push(Arc::new(Q8Linear::new(m)));
    }
    let embedding = match manifest.embedding {
        Some(_) => Some(Arc::new(EmbeddingRows::open(file.clone())?)),
        None => None,
    };
    let graph_path = dir.join("model.onnx");
    let bytes = crate::files::read_regular(&graph_path, crate::files::ONNX_LIMIT)?;
    let proto =
        <ModelProto as prost::Message>::decode(bytes.as_slice()).map_err(|e| Error::ModelLoad {
            path: graph_path.clone(),
            reason: format!("not a valid ONNX protobuf ({e})"),
        })?;
    if let Some(graph) = &proto.graph {
        crate::onnx::check_constant_tensors(graph).map_err(|e| Error::ModelLoad {
            path: graph_path.clone(),
            reason: e.to_string(),
        })?;
        crate::onnx::check_node_arity(graph).map_err(|reason| Error::ModelLoad {
            path: graph_path.clone(),
            reason,
        })?;
    }
    Ok(OpenedPack {
        proto,
        ops: OpTable {
            moe: layers,
            linear,
            embedding,
        },
        manifest,
        cache,
    })
}

/// Bytes an entry takes once loaded (int8 values and f32 scales; f16 and f32 as f32).
fn resident_bytes(e: &Entry) -> u64 {
    let (rows, cols) = (e.rows as u64, e.cols as u64);
    match e.format {
        TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales => {
            let nb = blocks_per_row(cols as usize) as u64;
            rows * nb * 32 + rows * nb * 4
        }
        // codes as stored, scales as f32
        TensorFormat::Q4F16Scales => {
            let nb = blocks_per_row(cols as usize) as u64;
            rows * nb * 16 + rows * nb * 4
        }
        TensorFormat::F32 | TensorFormat::F16 | TensorFormat::U32 => rows * cols * 4,
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
        TensorFormat::Q8F16Scales
        | TensorFormat::Q8F32Scales
        | TensorFormat::Q4F16Scales
        | TensorFormat::U32 => None,
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

/// An int8 or int4 tensor as an int8 matrix (int4 widened exactly).
fn q8_matrix(bytes: &[u8], e: &Entry) -> Result<Q8Matrix> {
    let (rows, cols) = (e.rows as usize, e.cols as usize);
    let m = match e.format.scale_type() {
        Some(scale) => Q8Matrix::from_bytes(bytes, rows, cols, scale),
        None if e.format == TensorFormat::Q4F16Scales => {
            crate::kernels::q4::widen_q4(bytes, rows, cols)
        }
        None => None,
    };
    m.ok_or_else(|| {
        Error::CorruptPack(format!(
            "{}: not a valid {:?} tensor (size, a -128 value or a non-finite scale)",
            e.describe(),
            e.format
        ))
    })
}

/// The routed experts of one layer of a pack, loaded through the shared cache.
#[derive(Debug, Clone)]
struct PackLayerStore {
    file: Arc<PackFile>,
    cache: Arc<ExpertCache>,
    layer: u32,
    sizes: Vec<u64>,
    /// Experts `prune` removed (ascending).
    pruned: Vec<usize>,
    /// Where prefetch requests go (`--prefetch`): the pack's reader thread.
    prefetch: Option<std::sync::mpsc::SyncSender<(u32, u32)>>,
}

/// Prefetch requests waiting for the reader thread, at most: a few layers' worth of top-k
/// choices; a request that finds the queue full is dropped (the expert is then read on demand).
const PREFETCH_QUEUE: usize = 16;

/// Starts the thread that reads prefetched experts into the cache, one at a time, for `stores`
/// (one per layer, without senders of their own); it ends when every sender is gone (the model
/// is dropped).
fn spawn_prefetcher(
    stores: Vec<PackLayerStore>,
) -> Result<std::sync::mpsc::SyncSender<(u32, u32)>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u32, u32)>(PREFETCH_QUEUE);
    std::thread::Builder::new()
        .name("moe-edge-prefetch".into())
        .spawn(move || {
            while let Ok((layer, expert)) = rx.recv() {
                let Some(store) = stores.get(layer as usize) else {
                    continue;
                };
                let Some(&bytes) = store.sizes.get(expert as usize) else {
                    continue;
                };
                // the running layer (the one before) and the target layer keep their experts
                let protect = [layer.saturating_sub(1), layer];
                store
                    .cache
                    .prefetch(layer, expert, bytes, &protect, || store.load(expert));
            }
        })
        .map_err(|e| Error::InvalidInput(format!("cannot start the prefetch thread: {e}")))?;
    Ok(tx)
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
                Arc::new(DenseExpert::silu_gated(
                    gate.cols as usize,
                    gate.rows as usize,
                    dec(gb, gate)?,
                    dec(ub, up)?,
                    dec(db, down)?,
                )?)
            }
            TensorFormat::Q4F16Scales
                if up.format == TensorFormat::Q4F16Scales
                    && down.format == TensorFormat::Q4F16Scales =>
            {
                let q4 = |b: &[u8], e: &Entry| {
                    Q4Matrix::from_bytes(b, e.rows as usize, e.cols as usize).ok_or_else(|| {
                        Error::CorruptPack(format!(
                            "{}: not a valid int4 tensor (size or a non-finite scale)",
                            e.describe()
                        ))
                    })
                };
                let expert: Q4Expert = Expert::new(
                    q4(gb, gate)?,
                    q4(ub, up)?,
                    q4(db, down)?,
                    None,
                    crate::moe::Activation::SiluGated,
                )?;
                Arc::new(expert)
            }
            TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales | TensorFormat::Q4F16Scales => {
                // int8, or int4 mixed with int8 within the expert: int4 widened to int8
                let expert: Q8Expert = Expert::new(
                    q8_matrix(gb, gate)?,
                    q8_matrix(ub, up)?,
                    q8_matrix(db, down)?,
                    None,
                    crate::moe::Activation::SiluGated,
                )?;
                Arc::new(expert)
            }
            TensorFormat::U32 => {
                return Err(Error::CorruptPack(format!(
                    "{}: stored as u32 values, not weights",
                    gate.describe()
                )))
            }
        };
        Ok(expert)
    }
}

impl PackLayerStore {
    fn check_not_pruned(&self, index: usize) -> Result<()> {
        if self.pruned.binary_search(&index).is_ok() {
            return Err(Error::InvalidInput(format!(
                "layer {}: expert {index} was pruned from this pack",
                self.layer
            )));
        }
        Ok(())
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
        self.check_not_pruned(index)?;
        self.cache
            .get(self.layer, index as u32, bytes, || self.load(index as u32))
    }

    fn resident(&self, index: usize) -> Option<bool> {
        Some(self.cache.is_resident(self.layer, index as u32))
    }

    fn prefetch(&self, experts: &[usize]) {
        let Some(tx) = &self.prefetch else { return };
        for &e in experts {
            if e < self.sizes.len()
                && self.pruned.binary_search(&e).is_err()
                && !self.cache.is_resident(self.layer, e as u32)
            {
                // a full queue drops the hint: the expert is read on demand
                let _ = tx.try_send((self.layer, e as u32));
            }
        }
    }

    fn loaded_bytes(&self, index: usize) -> Option<u64> {
        self.sizes.get(index).copied()
    }
}
