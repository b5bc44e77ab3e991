//! `moe-edge logits`: one forward pass, for checking the engine against references.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::WriteNpyExt;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// int64 token ids `[batch, seq]` (.npy).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write f32 logits `[batch, seq, vocab]` (.npy).
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    let ids = read_ids(&args.input)
        .with_context(|| format!("reading int64 ids from {}", args.input.display()))?;
    anyhow::ensure!(
        ids.ndim() == 2,
        "{}: ids must be [batch, seq], got shape {:?}",
        args.input.display(),
        ids.shape()
    );
    let (batch, seq) = (ids.shape()[0], ids.shape()[1]);
    let model = args.model.load()?;
    let flat: Vec<i64> = ids.iter().copied().collect();
    let (logits, vocab) = model.logits(&flat, batch)?;
    let arr = ArrayD::from_shape_vec(IxDyn(&[batch, seq, vocab]), logits)?;
    // written beside the output, synced, then renamed: an interrupted run or a crash leaves no
    // partial file
    let written = moe_edge_engine::PartialFile::create(&args.output).and_then(|mut file| {
        arr.write_npy(file.writer())
            .map_err(std::io::Error::other)?;
        file.commit()
    });
    written.with_context(|| format!("writing {}", args.output.display()))
}

/// The ids of an `.npy` file, checked against the file's size before anything is allocated for
/// them (a header may declare any shape).
fn read_ids(path: &std::path::Path) -> anyhow::Result<ArrayD<i64>> {
    let len = std::fs::metadata(path)?.len();
    anyhow::ensure!(
        len <= MAX_IDS_FILE,
        "{len} bytes: more than the {MAX_IDS_FILE} an ids file may have"
    );
    ids_from_npy(&std::fs::read(path)?)
}

/// The int64 array of an `.npy` file's bytes.
pub fn ids_from_npy(bytes: &[u8]) -> anyhow::Result<ArrayD<i64>> {
    let a = super::npy::read_i64(bytes)?;
    Ok(ArrayD::from_shape_vec(IxDyn(&a.shape), a.data)?)
}

/// 64 MiB of ids: 8 M tokens, far beyond any context.
const MAX_IDS_FILE: u64 = 64 << 20;
