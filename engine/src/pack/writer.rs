//! `moe-edge pack`: writes a self-contained model directory with the rewritten graph (dense
//! weights only), one expert file, a manifest and the tokenizer/config files.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::format::{
    align_up, Entry, Header, TensorFormat, TensorKind, ENTRY_BYTES, HEADER_BYTES, NO_EXPERT,
    TENSOR_ALIGN,
};
use super::manifest::{
    DenseLayer, EmbeddingTable, ExpertFormat, Manifest, PackLayer, SourceInfo, EXPERT_FILE,
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::kernels::q4::{q4_bytes, quantize_q4};
use crate::kernels::q8::{q8_bytes, quantize, scale_type_for, ScaleType};
use crate::kernels::BLOCK;
use crate::moe::Activation;
use crate::onnx::load::BlockWeights;
use crate::onnx::pack_graph::{constant_matmuls, embedding_gather, write_packed_graph};
use crate::onnx::{import_graph, DetectOptions};

/// Default alignment of each expert: a multiple of 4 KiB, 16 KiB (Raspberry Pi 5) and
/// 64 KiB page kernels.
pub const DEFAULT_ALIGN: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub experts: ExpertFormat,
    /// Block scales of int8 experts: f16 (default) or f32.
    pub int8_scales: ScaleType,
    pub alignment: u64,
    pub dense_fallback: bool,
    /// Also store the dense linear layers (MatMul by a constant weight: attention projections,
    /// LM head) as int8, computed by the int8 kernels.
    pub dense_int8: bool,
    /// int8 packs: store these routed experts (by model layer) as int4 instead: the cold
    /// experts of a routing profile (`pack --int4-cold`).
    pub int4_experts: Option<crate::moe::ExpertMask>,
    /// Move the token embedding table into the expert file, read a row per token, instead of
    /// keeping it in the graph (in memory).
    pub embedding_in_file: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            experts: ExpertFormat::Int8,
            int8_scales: ScaleType::F16,
            alignment: DEFAULT_ALIGN,
            dense_fallback: false,
            dense_int8: false,
            int4_experts: None,
            embedding_in_file: true,
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

/// A tensor to write: its table entry (offset filled when it is placed) and its values.
struct Planned<'a> {
    entry: Entry,
    values: Values<'a>,
}

enum Values<'a> {
    /// Encoded in the entry's format.
    F32(&'a [f32]),
    /// Already encoded.
    Bytes(Vec<u8>),
}

/// The expert file being written: tensors placed one after the other from `cursor`, each group
/// (a dense layer, a layer's router and shared expert, an expert) at an `alignment` boundary,
/// each tensor at a [`TENSOR_ALIGN`] one.
struct TensorSink<'a> {
    file: &'a File,
    path: &'a Path,
    alignment: u64,
    cursor: u64,
    entries: Vec<Entry>,
    groups_done: usize,
    groups: usize,
    progress: &'a mut dyn FnMut(usize, usize),
}

impl TensorSink<'_> {
    fn group(&mut self, group: Vec<Planned>) -> Result<()> {
        self.cursor = align_up(self.cursor, self.alignment);
        for t in group {
            let mut entry = t.entry;
            self.cursor = align_up(self.cursor, TENSOR_ALIGN);
            let bytes = match t.values {
                Values::F32(v) => encode(v, entry.format, entry.rows as usize, entry.cols as usize),
                Values::Bytes(b) => b,
            };
            if bytes.len() as u64 != entry.length {
                return Err(Error::InvalidInput(format!(
                    "{}: encoded to {} bytes, its format takes {}",
                    entry.describe(),
                    bytes.len(),
                    entry.length
                )));
            }
            entry.offset = self.cursor;
            entry.crc32 = crc32fast::hash(&bytes);
            self.file
                .write_all_at(&bytes, entry.offset)
                .map_err(Error::io(self.path))?;
            self.cursor += entry.length;
            self.entries.push(entry);
        }
        self.groups_done += 1;
        (self.progress)(self.groups_done, self.groups);
        Ok(())
    }
}

/// Packs the model at `src` into `out`.
pub fn pack_model(src: &Path, out: &Path, opts: &PackOptions) -> Result<PackSummary> {
    pack_model_with_progress(src, out, opts, &mut |_, _| {})
}

/// [`pack_model`], calling `progress(done, total)` after each group of tensors is written.
pub fn pack_model_with_progress(
    src: &Path,
    out: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PackSummary> {
    if !opts.alignment.is_power_of_two() || opts.alignment < TENSOR_ALIGN {
        return Err(Error::InvalidInput(format!(
            "alignment {} must be a power of two >= {TENSOR_ALIGN}",
            opts.alignment
        )));
    }
    let files = ModelFiles::resolve(src)?;
    let target = OutputDir::prepare(out, &files)?;
    match write_pack(&files, target.partial(), opts, progress) {
        Ok(mut summary) => {
            target.commit()?;
            summary.out_dir = out.to_path_buf();
            Ok(summary)
        }
        Err(e) => {
            target.discard();
            Err(e)
        }
    }
}

/// Writes the whole pack of `files` into the directory `out` (an empty temporary directory).
fn write_pack(
    files: &ModelFiles,
    out: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PackSummary> {
    let (imported, weights) = import_graph(
        &files.onnx,
        DetectOptions {
            dense_fallback: opts.dense_fallback,
            literal: false,
        },
    )?;
    if imported.blocks.is_empty() {
        return Err(Error::UnsupportedGraph(format!(
            "{}: no MoE block to pack",
            files.onnx.display()
        )));
    }
    for b in &imported.blocks {
        let s = &b.spec;
        if s.router_bias || s.expert_bias || s.activation != Activation::SiluGated {
            return Err(Error::UnsupportedGraph(format!(
                "layer {}: the pack format does not store router biases, expert biases or a {} activation yet",
                s.layer, s.activation
            )));
        }
    }

    if let Some(mask) = &opts.int4_experts {
        if opts.experts != ExpertFormat::Int8 {
            return Err(Error::InvalidInput(
                "int4 cold experts go into an int8 pack (--experts int8)".into(),
            ));
        }
        for (layer, experts) in mask.layers() {
            let spec = imported
                .blocks
                .iter()
                .map(|b| &b.spec)
                .find(|s| s.layer == layer)
                .ok_or_else(|| {
                    Error::InvalidInput(format!("int4 experts: the model has no MoE layer {layer}"))
                })?;
            if let Some(e) = experts.iter().find(|&&e| e >= spec.experts) {
                return Err(Error::InvalidInput(format!(
                    "int4 experts: layer {layer} has {} experts, there is no expert {e}",
                    spec.experts
                )));
            }
        }
    }

    // 1. the expert file, written as it is read: one dense layer or one expert in memory at a
    // time. The table's size is known from the shapes; each tensor's format (and so its
    // length) only once its values are, so tensors are placed one after the other and the
    // table and header are written last.
    let dense_layers = if opts.dense_int8 {
        constant_matmuls(&imported)
    } else {
        vec![]
    };
    let embedding = if opts.embedding_in_file {
        embedding_gather(&imported)
    } else {
        None
    };
    let count = dense_layers.len()
        + 2 * embedding.is_some() as usize
        + imported
            .blocks
            .iter()
            .map(|b| 1 + 3 * b.spec.experts + if b.shared.is_some() { 4 } else { 0 })
            .sum::<usize>();
    let groups = dense_layers.len()
        + embedding.is_some() as usize
        + imported
            .blocks
            .iter()
            .map(|b| 1 + b.spec.experts)
            .sum::<usize>();
    let data_offset = align_up(
        HEADER_BYTES as u64 + (count * ENTRY_BYTES) as u64,
        opts.alignment,
    );
    let expert_path = out.join(EXPERT_FILE);
    let file = File::create(&expert_path).map_err(Error::io(&expert_path))?;
    let mut sink = TensorSink {
        file: &file,
        path: &expert_path,
        alignment: opts.alignment,
        cursor: data_offset,
        entries: Vec::with_capacity(count),
        groups_done: 0,
        groups,
        progress,
    };
    let int8 = PackOptions {
        experts: ExpertFormat::Int8,
        ..opts.clone()
    };
    for (di, d) in dense_layers.iter().enumerate() {
        let w = d.weight_out_in(&imported, &files.dir)?;
        let format = fmt(&int8, &w, d.in_features);
        sink.group(vec![planned(
            di as u32,
            NO_EXPERT,
            TensorKind::Dense,
            format,
            d.out_features,
            d.in_features,
            &w,
        )])?;
    }
    if let Some(emb) = &embedding {
        // the table as f32 rows, and each row's checksum (a row is read and checked alone)
        let table = encode(
            &emb.table(&imported, &files.dir)?,
            TensorFormat::F32,
            emb.vocab,
            emb.hidden,
        );
        let crcs: Vec<u8> = table
            .chunks_exact(emb.hidden * 4)
            .flat_map(|row| crc32fast::hash(row).to_le_bytes())
            .collect();
        let raw = |kind, format, rows, cols, bytes| {
            let mut t = planned(0, NO_EXPERT, kind, format, rows, cols, &[]);
            t.values = Values::Bytes(bytes);
            t
        };
        sink.group(vec![
            raw(
                TensorKind::Embedding,
                TensorFormat::F32,
                emb.vocab,
                emb.hidden,
                table,
            ),
            raw(
                TensorKind::EmbeddingRowCrc,
                TensorFormat::U32,
                emb.vocab,
                1,
                crcs,
            ),
        ])?;
    }
    let block_index = weights.index();
    for (li, b) in imported.blocks.iter().enumerate() {
        let source = BlockWeights::new(&block_index, b, weights.dir())?;
        let li = li as u32;
        let (h, e_count) = (b.spec.hidden, b.spec.experts);
        let router = source.router()?;
        let shared = source.shared()?;
        let mut layer_group = vec![planned(
            li,
            NO_EXPERT,
            TensorKind::Router,
            TensorFormat::F32,
            e_count,
            h,
            &router,
        )];
        if let Some(s) = &shared {
            let f = s.ffn.ffn();
            for (kind, m, rows, cols) in [
                (TensorKind::SharedGateProj, &s.ffn.gate.values, f, h),
                (TensorKind::SharedUpProj, &s.ffn.up.values, f, h),
                (TensorKind::SharedDownProj, &s.ffn.down.values, h, f),
            ] {
                layer_group.push(planned(
                    li,
                    NO_EXPERT,
                    kind,
                    shared_fmt(opts, m, cols),
                    rows,
                    cols,
                    m,
                ));
            }
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
        sink.group(layer_group)?;
        for e in 0..e_count {
            let x = source.expert(e)?;
            let f = x.ffn();
            let group = [
                (TensorKind::Gate, &x.gate.values, f, h),
                (TensorKind::Up, &x.up.values, f, h),
                (TensorKind::Down, &x.down.values, h, f),
            ]
            .into_iter()
            .map(|(kind, m, rows, cols)| {
                let format = expert_fmt(opts, b.spec.layer, e, m, cols);
                planned(li, e as u32, kind, format, rows, cols, m)
            })
            .collect();
            sink.group(group)?;
        }
    }
    let file_bytes = sink.cursor;
    let entries = sink.entries;
    if entries.len() != count {
        // the table's room was reserved for `count` entries
        return Err(Error::InvalidInput(format!(
            "wrote {} tensors where the layout planned {count}",
            entries.len()
        )));
    }
    file.set_len(file_bytes).map_err(Error::io(&expert_path))?;
    finish_expert_file(
        &file,
        &expert_path,
        &entries,
        opts.alignment,
        data_offset,
        file_bytes,
    )?;

    // 3. the graph, with each MoE node naming its manifest layer
    write_packed_graph(
        &imported,
        &dense_layers,
        embedding.as_ref(),
        &files.dir,
        out,
    )?;

    // 4. manifest and companions
    let layers = imported
        .blocks
        .iter()
        .enumerate()
        .map(|(li, b)| PackLayer {
            spec: b.spec.clone(),
            form: b.form.to_string(),
            expert_file_bytes: layer_expert_bytes(&entries, li),
            pruned: vec![],
        })
        .collect();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        source: source_info(files)?,
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
        embedding: embedding.as_ref().map(|e| EmbeddingTable {
            name: e.initializer.clone(),
            vocab: e.vocab,
            hidden: e.hidden,
        }),
    };
    write_manifest(out, &manifest)?;
    copy_companions(files, crate::files::COMPANION_FILES, out)?;
    Ok(PackSummary {
        out_dir: out.to_path_buf(),
        layers: imported.blocks.len(),
        experts: imported.blocks.iter().map(|b| b.spec.experts).sum(),
        expert_file_bytes: file_bytes,
        tensors_with_f32_scales: entries
            .iter()
            .filter(|e| e.format == TensorFormat::Q8F32Scales)
            .count(),
    })
}

/// Writes the table and the header of an expert file whose tensors are written (the table at
/// [`HEADER_BYTES`], `entries` in file order) and syncs the file.
pub(super) fn finish_expert_file(
    file: &File,
    path: &Path,
    entries: &[Entry],
    alignment: u64,
    data_offset: u64,
    file_bytes: u64,
) -> Result<()> {
    let table: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
    let header = Header {
        alignment: alignment as u32,
        entry_count: entries.len() as u32,
        table_offset: HEADER_BYTES as u64,
        data_offset,
        file_bytes,
        table_crc32: crc32fast::hash(&table),
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(Error::io(path))?;
    file.write_all_at(&table, HEADER_BYTES as u64)
        .map_err(Error::io(path))?;
    file.sync_all().map_err(Error::io(path))
}

/// Bytes the routed experts of manifest layer `layer` take in the expert file.
pub(super) fn layer_expert_bytes(entries: &[Entry], layer: usize) -> u64 {
    entries
        .iter()
        .filter(|e| e.layer == layer as u32 && e.expert != NO_EXPERT && e.kind != TensorKind::Dense)
        .map(|e| e.length)
        .sum()
}

/// Copies the files `names` that sit next to the model into `out`.
pub(super) fn copy_companions<'a>(
    files: &ModelFiles,
    names: impl IntoIterator<Item = &'a str>,
    out: &Path,
) -> Result<()> {
    for name in names {
        if let Some(p) = files.sibling(name) {
            // a new file with the default permissions, not a copy of the source's mode bits
            let bytes = std::fs::read(&p).map_err(Error::io(&p))?;
            let dst = out.join(name);
            std::fs::write(&dst, bytes).map_err(Error::io(&dst))?;
        }
    }
    Ok(())
}

/// Writes `manifest.json` into the pack directory `out`.
pub(super) fn write_manifest(out: &Path, manifest: &Manifest) -> Result<()> {
    let path = out.join(MANIFEST_FILE);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(manifest).expect("manifest serialises"),
    )
    .map_err(Error::io(&path))
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
        values: Values::F32(values),
    }
}

/// Storage format of routed expert `expert` of model layer `layer`.
fn expert_fmt(
    opts: &PackOptions,
    layer: usize,
    expert: usize,
    w: &[f32],
    cols: usize,
) -> TensorFormat {
    let cold = opts
        .int4_experts
        .as_ref()
        .is_some_and(|m| m.disabled(layer).contains(&expert));
    if cold {
        TensorFormat::Q4F16Scales
    } else {
        fmt(opts, w, cols)
    }
}

/// Storage format of a shared expert's matrix: always used, so int4 packs keep it int8.
fn shared_fmt(opts: &PackOptions, w: &[f32], cols: usize) -> TensorFormat {
    match opts.experts {
        ExpertFormat::Int4 => fmt(
            &PackOptions {
                experts: ExpertFormat::Int8,
                ..opts.clone()
            },
            w,
            cols,
        ),
        _ => fmt(opts, w, cols),
    }
}

/// Storage format of one matrix: int8 packs use f16 scales unless the matrix needs f32 ones.
fn fmt(opts: &PackOptions, w: &[f32], cols: usize) -> TensorFormat {
    match opts.experts {
        ExpertFormat::F32 => TensorFormat::F32,
        ExpertFormat::F16 => TensorFormat::F16,
        ExpertFormat::Int4 => TensorFormat::Q4F16Scales,
        ExpertFormat::Int8 => match scale_type_for(w, cols, opts.int8_scales) {
            ScaleType::F16 => TensorFormat::Q8F16Scales,
            ScaleType::F32 => TensorFormat::Q8F32Scales,
        },
    }
}

fn encode(values: &[f32], format: TensorFormat, rows: usize, cols: usize) -> Vec<u8> {
    match format {
        TensorFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // u32 tensors are written as bytes; f32 values are kept bit for bit
        TensorFormat::U32 => values
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
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
        TensorFormat::Q4F16Scales => {
            let mut out = vec![0u8; q4_bytes(rows, cols)];
            quantize_q4(values, rows, cols, &mut out);
            out
        }
    }
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

/// Removes what a pack into `parent/name` killed by another process left: its hidden
/// `.name.partial-PID` and `.name.old-PID` directories, when process PID is gone (a pack still
/// running keeps its own). An earlier pack moved aside with no pack in its place is put back.
/// Failures only warn: the new pack does not need them gone.
fn remove_leftovers(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let pid = [".partial-", ".old-"].iter().find_map(|tag| {
            file_name
                .strip_prefix(&format!(".{name}{tag}"))
                .and_then(|pid| pid.parse::<u32>().ok())
        });
        let Some(pid) = pid else { continue };
        let running = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if running {
            continue;
        }
        let path = entry.path();
        let out = parent.join(name);
        if file_name.contains(".old-") && !out.exists() {
            // killed between moving the earlier pack aside and putting the new one in its place:
            // the earlier pack goes back
            match std::fs::rename(&path, &out) {
                Ok(()) => log::info!("restored {} from an interrupted pack", out.display()),
                Err(e) => log::warn!("cannot restore {}: {e}", out.display()),
            }
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => log::info!("removed {}, left by an interrupted pack", path.display()),
            Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// Where a pack is written: a hidden temporary directory beside the output, renamed into place
/// when everything is written and synced, so that an interrupted or failed pack leaves no
/// directory under the output's name that would open (and never touches the source model).
pub(super) struct OutputDir {
    out: PathBuf,
    partial: PathBuf,
}

impl OutputDir {
    /// Checks that `out` may receive a pack of `files`: not the model's own directory, and either
    /// new, empty or an earlier pack (which is replaced as a whole).
    pub(super) fn prepare(out: &Path, files: &ModelFiles) -> Result<OutputDir> {
        let refuse =
            |why: String| Error::InvalidInput(format!("cannot pack into {}: {why}", out.display()));
        if out.exists() {
            if !out.is_dir() {
                return Err(refuse("it exists and is not a directory".into()));
            }
            let canonical = |p: &Path| std::fs::canonicalize(p).map_err(Error::io(p));
            if canonical(out)? == canonical(&files.dir)? {
                return Err(refuse(
                    "it is the source model's own directory; choose a new directory".into(),
                ));
            }
            let empty = std::fs::read_dir(out)
                .map_err(Error::io(out))?
                .next()
                .is_none();
            if !empty && !out.join(MANIFEST_FILE).is_file() {
                return Err(refuse(format!(
                    "it is neither empty nor a packed model (no {MANIFEST_FILE}); choose a new or \
                     empty directory"
                )));
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| refuse("it has no directory name".into()))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
        remove_leftovers(&parent, &name);
        let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(Error::io(&partial))?;
        }
        std::fs::create_dir(&partial).map_err(Error::io(&partial))?;
        Ok(OutputDir {
            out: out.to_path_buf(),
            partial,
        })
    }

    pub(super) fn partial(&self) -> &Path {
        &self.partial
    }

    /// Syncs the written files and renames the directory into place (replacing an earlier pack).
    pub(super) fn commit(self) -> Result<()> {
        for entry in std::fs::read_dir(&self.partial).map_err(Error::io(&self.partial))? {
            let path = entry.map_err(Error::io(&self.partial))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(Error::io(&path))?;
        }
        let old = self.partial.with_file_name(
            self.partial
                .file_name()
                .map(|n| n.to_string_lossy().replace(".partial-", ".old-"))
                .unwrap_or_default(),
        );
        // the files' directory entries, before the directory is renamed into place
        crate::durable::sync_dir(&self.partial).map_err(Error::io(&self.partial))?;
        let replacing = self.out.exists();
        if replacing {
            std::fs::rename(&self.out, &old).map_err(Error::io(&self.out))?;
        }
        if let Err(e) = std::fs::rename(&self.partial, &self.out) {
            if replacing {
                let _ = std::fs::rename(&old, &self.out);
            }
            let _ = std::fs::remove_dir_all(&self.partial);
            return Err(Error::io(&self.out)(e));
        }
        if replacing {
            let _ = std::fs::remove_dir_all(&old);
        }
        // the rename is durable once the parent's entries are
        let parent = self.out.parent().unwrap_or(Path::new("."));
        crate::durable::sync_dir(parent).map_err(Error::io(parent))
    }

    pub(super) fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.partial);
    }
}
