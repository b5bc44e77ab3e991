//! `moe-edge profile`: how the model's routers use their experts over text files, per layer and
//! expert, overall and per label (see `moe_edge_engine::RoutingProfile` for the fields), written
//! as JSON for `prune` and `--route static:` and drawn with `--plot`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moe_edge_engine::{PartialFile, ProfileRecorder, RoutingProfile, Session};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file; give several (one per language or domain) to get a profile for each.
    #[arg(long, short, required = true)]
    pub file: Vec<PathBuf>,
    /// The label of each file, in order, comma-separated (default: each file's name without
    /// its extension). Files with the same label count together.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Where to write the profile (JSON).
    #[arg(long, short, value_name = "PROFILE.json")]
    pub output: PathBuf,
    /// Also draw the profile as SVG pictures into DIR: usage heatmaps (overall and per label)
    /// and the reuse and prediction rates per layer.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Tokens per window; each window runs from an empty cache, as `perplexity` runs them
    /// (default: 512, or the model's context if shorter).
    #[arg(long, short)]
    pub context: Option<usize>,
    /// Route at most this many tokens of each file.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    ensure!(
        args.labels.is_empty() || args.labels.len() == args.file.len(),
        "--labels gives {} labels for {} files",
        args.labels.len(),
        args.file.len()
    );
    ensure!(
        args.max_tokens != Some(0),
        "--max-tokens must be at least 1"
    );
    let model = args.model.load()?;
    let tokenizer = model
        .tokenizer()
        .context("profile needs the model's tokenizer.json (next to model.onnx)")?;
    let context = match args.context {
        Some(c) => c,
        None => model.context_limit().map_or(512, |l| l.min(512)),
    };
    ensure!(context >= 2, "--context must be at least 2 tokens");
    if let Some(limit) = model.context_limit() {
        ensure!(
            context <= limit,
            "--context {context} is longer than the model's context ({limit} tokens)"
        );
    }
    let bos = crate::quality::window_bos(&model, tokenizer);
    let mut texts = vec![];
    for (i, path) in args.file.iter().enumerate() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (UTF-8 text)", path.display()))?;
        let mut ids = tokenizer
            .encode(&text)
            .with_context(|| format!("tokenising {}", path.display()))?;
        if let Some(max) = args.max_tokens {
            ids.truncate(max);
        }
        ensure!(ids.len() >= 2, "{} has fewer than 2 tokens", path.display());
        let label = match args.labels.get(i) {
            Some(l) => l.clone(),
            None => path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            ),
        };
        texts.push((label, ids));
    }

    let recorder = std::sync::Arc::new(ProfileRecorder::new(
        &model,
        &args.model.model.display().to_string(),
    ));
    let total: usize = texts.iter().map(|(_, ids)| ids.len()).sum();
    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tokens ({eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    for (label, ids) in &texts {
        progress.set_prefix(label.clone());
        for chunk in ids.chunks(context) {
            let mut window = chunk.to_vec();
            if let Some(b) = bos {
                window[0] = b;
            }
            recorder.begin(label);
            let mut session = Session::new(&model)?;
            session.set_observer(Some(recorder.clone()));
            session.feed_all(&window)?;
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish_and_clear();
    let profile = recorder.finish();
    write_profile(&profile, &args.output)?;
    eprintln!(
        "routed {total} tokens through {} MoE layers in {:.1} s; profile written to {}",
        profile.layers.len(),
        started.elapsed().as_secs_f64(),
        args.output.display()
    );
    print_summary(&profile);
    if let Some(dir) = &args.plot {
        let written = super::plots::draw_profile(&profile, dir)?;
        for p in written {
            eprintln!("plot: {}", p.display());
        }
    }
    Ok(())
}

fn write_profile(profile: &RoutingProfile, path: &std::path::Path) -> anyhow::Result<()> {
    let mut file =
        PartialFile::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer(file.writer(), profile)?;
    file.writer().write_all(b"\n")?;
    file.commit()
        .with_context(|| format!("writing {}", path.display()))
}

/// One line per layer: how evenly it uses its experts, its busiest experts, reuse and prediction.
fn print_summary(p: &RoutingProfile) {
    println!(
        "{:>5} {:>8} {:>9}  {:<28} {:>7} {:>9}",
        "layer", "entropy", "(max)", "most used (share of slots)", "reuse", "predicted"
    );
    for l in &p.overall.layers {
        let top: Vec<String> = l
            .ranked()
            .into_iter()
            .take(3)
            .map(|e| format!("{e}:{:.0}%", 100.0 * l.slot_share[e]))
            .collect();
        println!(
            "{:>5} {:>8.2} {:>9.2}  {:<28} {:>6.1}% {:>9}",
            l.layer,
            l.entropy_bits,
            l.max_entropy_bits,
            top.join(" "),
            100.0 * l.reuse.rate,
            l.predicted
                .map_or("-".to_string(), |r| format!("{:.1}%", 100.0 * r.rate))
        );
    }
}
