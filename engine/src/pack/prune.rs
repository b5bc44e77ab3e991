//! `moe-edge prune`: a copy of a pack without some experts. The kept tensors are copied byte for
//! byte (no requantisation; their checksums stay), the manifest lists each layer's removed
//! experts, and the router of a pruned pack never chooses them (see `Router::restrict`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::file::PackFile;
use super::format::{align_up, TensorKind, ENTRY_BYTES, HEADER_BYTES, NO_EXPERT, TENSOR_ALIGN};
use super::manifest::Manifest;
use super::validate;
use super::writer::{
    copy_companions, finish_expert_file, layer_expert_bytes, write_manifest, OutputDir,
};
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::moe::ExpertMask;

/// What `prune_pack` wrote.
#[derive(Debug, Clone)]
pub struct PruneSummary {
    pub out_dir: PathBuf,
    /// Experts per layer before and after (manifest order).
    pub experts_before: Vec<usize>,
    pub experts_after: Vec<usize>,
    pub expert_file_bytes_before: u64,
    pub expert_file_bytes_after: u64,
}

/// Writes the pack at `src` to `out` without the experts `mask` disables (on top of any the pack
/// had already lost). Refuses a source that is not a pack, a mask naming a layer or expert the
/// pack does not have, and a layer left with fewer experts than its top-k.
pub fn prune_pack(src: &Path, out: &Path, mask: &ExpertMask) -> Result<PruneSummary> {
    let files = ModelFiles::resolve(src)?;
    if !(files.is_directory_model() && super::is_pack(&files.dir)) {
        return Err(Error::InvalidInput(format!(
            "{} is not a packed model: prune works on packs (make one with `moe-edge pack`)",
            src.display()
        )));
    }
    let manifest = Manifest::read(&files.dir)?;
    let source = PackFile::open(&files.dir.join(validate::expert_file_name(&manifest)?))?;
    validate::check(&manifest, &source)?;

    // the new pruned lists, checked against the pack's layers
    let mut pruned: Vec<Vec<usize>> = manifest.layers.iter().map(|l| l.pruned.clone()).collect();
    for (layer, disabled) in mask.layers() {
        let (li, l) = manifest
            .layers
            .iter()
            .enumerate()
            .find(|(_, l)| l.spec.layer == layer)
            .ok_or_else(|| {
                let have: Vec<String> = manifest
                    .layers
                    .iter()
                    .map(|l| l.spec.layer.to_string())
                    .collect();
                Error::InvalidInput(format!(
                    "the pack has no MoE layer {layer} (its MoE layers: {})",
                    have.join(", ")
                ))
            })?;
        if let Some(&e) = disabled.iter().find(|&&e| e >= l.spec.experts) {
            return Err(Error::InvalidInput(format!(
                "layer {layer} has {} experts, there is no expert {e}",
                l.spec.experts
            )));
        }
        pruned[li].extend(disabled);
        pruned[li].sort_unstable();
        pruned[li].dedup();
        let left = l.spec.experts - pruned[li].len();
        if left < l.spec.top_k {
            return Err(Error::InvalidInput(format!(
                "pruning would leave layer {layer} with {left} experts, fewer than the {} each token chooses",
                l.spec.top_k
            )));
        }
    }

    let target = OutputDir::prepare(out, &files)?;
    match write_pruned(&files, &manifest, &source, &pruned, target.partial()) {
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

fn write_pruned(
    files: &ModelFiles,
    manifest: &Manifest,
    source: &PackFile,
    pruned: &[Vec<usize>],
    out: &Path,
) -> Result<PruneSummary> {
    let is_pruned = |layer: u32, expert: u32, kind: TensorKind| {
        kind != TensorKind::Dense
            && expert != NO_EXPERT
            && pruned
                .get(layer as usize)
                .is_some_and(|p| p.binary_search(&(expert as usize)).is_ok())
    };
    // the kept entries in file order, each group (a dense layer, a layer's own tensors, one
    // expert) starting at the pack's alignment as `pack` lays them out
    let mut kept: Vec<_> = source
        .entries
        .iter()
        .filter(|e| !is_pruned(e.layer, e.expert, e.kind))
        .cloned()
        .collect();
    kept.sort_by_key(|e| e.offset);
    // groups as `pack` writes them: each dense layer, the embedding table with its row
    // checksums, each layer's own tensors, each expert
    let group_of = |e: &super::format::Entry| {
        let kind = match e.kind {
            TensorKind::Dense => 1u8,
            TensorKind::Embedding | TensorKind::EmbeddingRowCrc => 2,
            _ => 0,
        };
        (kind, e.layer, e.expert)
    };
    let alignment = manifest.alignment;
    let table_offset = HEADER_BYTES as u64;
    let data_offset = align_up(table_offset + (kept.len() * ENTRY_BYTES) as u64, alignment);
    let mut cursor = data_offset;
    let mut new_entries = Vec::with_capacity(kept.len());
    let mut previous = None;
    for e in &kept {
        if previous != Some(group_of(e)) {
            cursor = align_up(cursor, alignment);
            previous = Some(group_of(e));
        }
        cursor = align_up(cursor, TENSOR_ALIGN);
        let mut n = e.clone();
        n.offset = cursor;
        cursor += e.length;
        new_entries.push(n);
    }
    let file_bytes = cursor;

    let expert_path = out.join(&manifest.expert_file);
    let file = File::create(&expert_path).map_err(Error::io(&expert_path))?;
    file.set_len(file_bytes).map_err(Error::io(&expert_path))?;
    for (old, new) in kept.iter().zip(&new_entries) {
        let bytes = source.read_range(old.offset, old.length as usize, &old.describe())?;
        super::file::check_crc(source, old, &bytes)?;
        file.write_all_at(&bytes, new.offset)
            .map_err(Error::io(&expert_path))?;
    }
    finish_expert_file(
        &file,
        &expert_path,
        &new_entries,
        alignment,
        data_offset,
        file_bytes,
    )?;

    let mut new_manifest = manifest.clone();
    for (li, l) in new_manifest.layers.iter_mut().enumerate() {
        l.pruned = pruned[li].clone();
        l.expert_file_bytes = layer_expert_bytes(&new_entries, li);
    }
    write_manifest(out, &new_manifest)?;
    copy_companions(
        files,
        ["model.onnx", "model.onnx.data"]
            .into_iter()
            .chain(crate::files::COMPANION_FILES),
        out,
    )?;
    Ok(PruneSummary {
        out_dir: out.to_path_buf(),
        experts_before: manifest
            .layers
            .iter()
            .map(|l| l.spec.experts - l.pruned.len())
            .collect(),
        experts_after: manifest
            .layers
            .iter()
            .zip(pruned)
            .map(|(l, p)| l.spec.experts - p.len())
            .collect(),
        expert_file_bytes_before: std::fs::metadata(&source.path)
            .map_err(Error::io(&source.path))?
            .len(),
        expert_file_bytes_after: file_bytes,
    })
}
