//! `moe-edge logits`: one forward pass, for checking the engine against references.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ndarray::{ArrayD, IxDyn};

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
    let ids: ArrayD<i64> = ndarray_npy::read_npy(&args.input)
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
    ndarray_npy::write_npy(&args.output, &arr)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}
