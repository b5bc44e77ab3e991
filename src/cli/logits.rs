//! `moe-edge logits`: one forward pass, for checking the engine against references.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::ViewNpyExt;

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
    // written beside the output, then renamed: an interrupted run leaves no partial file
    let name = args
        .output
        .file_name()
        .with_context(|| format!("{} is not a file name", args.output.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = args
        .output
        .with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let written = ndarray_npy::write_npy(&tmp, &arr)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, &args.output)
                .with_context(|| format!("renaming {} to {}", tmp.display(), args.output.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The ids of an `.npy` file, checked against the file's size before anything is allocated for
/// them (a header may declare any shape).
fn read_ids(path: &std::path::Path) -> anyhow::Result<ArrayD<i64>> {
    let len = std::fs::metadata(path)?.len();
    anyhow::ensure!(
        len <= MAX_IDS_FILE,
        "{len} bytes: more than the {MAX_IDS_FILE} an ids file may have"
    );
    let bytes = std::fs::read(path)?;
    // the view checks the declared shape against the bytes present; only then is it copied
    let view = ndarray::ArrayViewD::<i64>::view_npy(&bytes)?;
    Ok(view.to_owned())
}

/// 64 MiB of ids: 8 M tokens, far beyond any context.
const MAX_IDS_FILE: u64 = 64 << 20;
