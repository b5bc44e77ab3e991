//! Checks a pack's manifest and expert-file table against each other at open, before any tensor
//! is used: the expert file is a plain name inside the pack directory, every tensor the manifest
//! implies is in the table with the shape and format it implies, the table holds nothing else,
//! and no two tensors share bytes. A pack that passes can only differ from what `pack` wrote in
//! tensor bytes, which the checksums cover.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::file::PackFile;
use super::format::{Entry, TensorFormat, TensorKind, NO_EXPERT, TENSOR_ALIGN};
use super::manifest::{ExpertFormat, Manifest, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::kernels::BLOCK;

fn corrupt(what: String) -> Error {
    Error::CorruptPack(format!(
        "{MANIFEST_FILE} and the expert table disagree: {what}"
    ))
}

/// The expert file named by the manifest, checked to be a plain file name.
pub(crate) fn expert_file_name(manifest: &Manifest) -> Result<&str> {
    let name = manifest.expert_file.as_str();
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
        // NAME_MAX: a longer name cannot be a file
        && name.len() <= 255;
    if plain {
        Ok(name)
    } else {
        Err(Error::CorruptPack(format!(
            "{MANIFEST_FILE}: expert_file must name a file inside the pack directory, got {:?}",
            crate::error::clip(name)
        )))
    }
}

/// Checks the manifest's own fields, then the table against them.
pub(crate) fn check(manifest: &Manifest, file: &PackFile) -> Result<()> {
    if manifest.block_size != BLOCK {
        return Err(corrupt(format!(
            "block_size is {}, this version reads blocks of {BLOCK}",
            manifest.block_size
        )));
    }
    if !manifest.alignment.is_power_of_two() || manifest.alignment < TENSOR_ALIGN {
        return Err(corrupt(format!(
            "alignment {} is not a power of two >= {TENSOR_ALIGN}",
            manifest.alignment
        )));
    }
    let mut expected: Vec<(u32, u32, TensorKind, usize, usize, bool)> = vec![];
    for (li, l) in manifest.layers.iter().enumerate() {
        let s = &l.spec;
        if s.hidden == 0 || s.ffn == 0 || s.experts == 0 || s.top_k == 0 || s.top_k > s.experts {
            return Err(corrupt(format!(
                "layer {li}: hidden {}, ffn {}, {} experts, top-{} do not make an MoE layer",
                s.hidden, s.ffn, s.experts, s.top_k
            )));
        }
        let pruned_ok = l.pruned.windows(2).all(|w| matches!(w, [a, b] if a < b))
            && l.pruned.last().is_none_or(|&e| e < s.experts)
            && s.experts.saturating_sub(l.pruned.len()) >= s.top_k;
        if !pruned_ok {
            return Err(corrupt(format!(
                "layer {li}: pruned experts {:?} are not ascending distinct experts of {} that leave top-{} choosable",
                crate::error::clip(&format!("{:?}", l.pruned)),
                s.experts,
                s.top_k
            )));
        }
        let li = li as u32;
        // (layer, expert, kind, rows, cols, quantisable)
        expected.push((
            li,
            NO_EXPERT,
            TensorKind::Router,
            s.experts,
            s.hidden,
            false,
        ));
        for e in (0..s.experts as u32).filter(|e| l.pruned.binary_search(&(*e as usize)).is_err()) {
            expected.push((li, e, TensorKind::Gate, s.ffn, s.hidden, true));
            expected.push((li, e, TensorKind::Up, s.ffn, s.hidden, true));
            expected.push((li, e, TensorKind::Down, s.hidden, s.ffn, true));
        }
        if let Some(f) = s.shared_ffn {
            expected.push((li, NO_EXPERT, TensorKind::SharedGateProj, f, s.hidden, true));
            expected.push((li, NO_EXPERT, TensorKind::SharedUpProj, f, s.hidden, true));
            expected.push((li, NO_EXPERT, TensorKind::SharedDownProj, s.hidden, f, true));
            expected.push((li, NO_EXPERT, TensorKind::SharedGate, 1, s.hidden, false));
        }
    }
    for (di, d) in manifest.dense.iter().enumerate() {
        expected.push((
            di as u32,
            NO_EXPERT,
            TensorKind::Dense,
            d.out_features,
            d.in_features,
            true,
        ));
    }
    if let Some(t) = &manifest.embedding {
        if t.vocab == 0 || t.hidden == 0 {
            return Err(corrupt(format!(
                "an embedding table of {} rows of {} values",
                t.vocab, t.hidden
            )));
        }
        expected.push((
            0,
            NO_EXPERT,
            TensorKind::Embedding,
            t.vocab,
            t.hidden,
            false,
        ));
        expected.push((0, NO_EXPERT, TensorKind::EmbeddingRowCrc, t.vocab, 1, false));
    }
    for &(layer, expert, kind, rows, cols, quantisable) in &expected {
        let e = file.entry(layer, (expert != NO_EXPERT).then_some(expert), kind)?;
        if (e.rows as usize, e.cols as usize) != (rows, cols) {
            return Err(corrupt(format!(
                "{} is [{}, {}] in the table, [{rows}, {cols}] in the manifest",
                e.describe(),
                e.rows,
                e.cols
            )));
        }
        let format_fits = match (kind, quantisable) {
            (TensorKind::Dense, _) => e.format.scale_type().is_some(),
            (TensorKind::EmbeddingRowCrc, _) => e.format == TensorFormat::U32,
            (_, false) => e.format == TensorFormat::F32,
            (_, true) => match manifest.experts {
                ExpertFormat::Int8 | ExpertFormat::Int4 => e.format.is_quantised(),
                ExpertFormat::F16 => e.format == TensorFormat::F16,
                ExpertFormat::F32 => e.format == TensorFormat::F32,
            },
        };
        if !format_fits {
            return Err(corrupt(format!(
                "{} is stored as {:?}, the manifest says {:?} experts",
                e.describe(),
                e.format,
                manifest.experts
            )));
        }
    }
    if file.entries.len() != expected.len() {
        return Err(corrupt(format!(
            "the table has {} tensors, the manifest describes {}",
            file.entries.len(),
            expected.len()
        )));
    }
    check_no_overlap(&file.entries)
}

/// No two tensors may share bytes (a table entry pointing at another tensor's data).
fn check_no_overlap(entries: &[Entry]) -> Result<()> {
    let mut ranges: Vec<(u64, u64, &Entry)> = entries
        .iter()
        .map(|e| (e.offset, e.offset.saturating_add(e.length), e))
        .collect();
    ranges.sort_by_key(|r| r.0);
    for pair in ranges.windows(2) {
        let &[(_, end, a), (start, _, b)] = pair else {
            continue;
        };
        if start < end {
            return Err(corrupt(format!(
                "{} and {} share bytes of the expert file",
                a.describe(),
                b.describe()
            )));
        }
    }
    Ok(())
}
