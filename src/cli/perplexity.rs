//! `moe-edge perplexity`: perplexity over text files, as llama.cpp's `llama-perplexity` computes
//! it, and the comparison of a model with a base model's saved logits (KL divergence, top-1
//! agreement, perplexity ratio), per file and over all of them.

use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use moe_edge_engine::Session;

use super::ModelArgs;
use crate::quality::{self, LogitsHeader, LogitsReader, LogitsWriter, TextTokens, Window};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file; give several (a held-out split per language) to get a line for each,
    /// labelled with the file's name.
    #[arg(long, short, required = true)]
    pub file: Vec<PathBuf>,
    /// Tokens per window (default: 512, or the model's context if shorter).
    #[arg(long, short)]
    pub context: Option<usize>,
    /// Tokens between window starts (default: the context, as llama-perplexity; a smaller
    /// stride scores fewer tokens per window, each with more context).
    #[arg(long, short)]
    pub stride: Option<usize>,
    /// Score at most this many windows per file.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Save the logits of every scored position to FILE (f32), to compare other models with
    /// this one through --kl-base.
    #[arg(long, value_name = "FILE", conflicts_with = "kl_base")]
    pub save_logits: Option<PathBuf>,
    /// Compare with a base model's logits saved by --save-logits over the same files and
    /// settings: KL divergence (mean, median, 99th percentile), top-1 agreement, perplexity ratio.
    #[arg(long, value_name = "FILE")]
    pub kl_base: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the routing of every token at every MoE layer to FILE (JSON lines, each with the
    /// text's label and the window's start).
    #[arg(long, value_name = "FILE.jsonl")]
    pub trace: Option<PathBuf>,
}

/// What one file's run measured.
#[derive(Default)]
struct Tally {
    nll: Vec<f64>,
    base_nll: Vec<f64>,
    kl: Vec<f64>,
    same_top1: usize,
}

impl Tally {
    fn extend(&mut self, other: &Tally) {
        self.nll.extend_from_slice(&other.nll);
        self.base_nll.extend_from_slice(&other.base_nll);
        self.kl.extend_from_slice(&other.kl);
        self.same_top1 += other.same_top1;
    }

    fn report(&self, label: &str, tokens: usize) -> serde_json::Value {
        let (ppl, ppl_se) = quality::perplexity(&self.nll);
        let mut out = json!({
            "label": label,
            "tokens": tokens,
            "scored": self.nll.len(),
            "perplexity": ppl,
            "perplexity_stderr": ppl_se,
            "mean_nll": self.nll.iter().sum::<f64>() / self.nll.len().max(1) as f64,
        });
        if !self.base_nll.is_empty() {
            let (base_ppl, _) = quality::perplexity(&self.base_nll);
            let kl = quality::spread(&self.kl);
            out["base_perplexity"] = json!(base_ppl);
            out["perplexity_ratio"] = json!(ppl / base_ppl);
            out["kl"] = json!(kl);
            out["top1_agreement"] = json!(self.same_top1 as f64 / self.kl.len().max(1) as f64);
        }
        out
    }
}

struct Text {
    label: String,
    ids: Vec<i64>,
    windows: Vec<Window>,
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let tokenizer = model
        .tokenizer()
        .context("perplexity needs the model's tokenizer.json (next to model.onnx)")?;
    let vocab = model
        .vocab_size()
        .context("the model's vocabulary size is not known")?;
    let context = match args.context {
        Some(c) => c,
        None => model.context_limit().map_or(512, |l| l.min(512)),
    };
    if let Some(limit) = model.context_limit() {
        ensure!(
            context <= limit,
            "--context {context} is longer than the model's context ({limit} tokens)"
        );
    }
    let stride = args.stride.unwrap_or(context);
    ensure!(
        args.max_windows != Some(0),
        "--max-windows must be at least 1"
    );
    let bos = quality::window_bos(&model, tokenizer);

    let mut texts = vec![];
    for path in &args.file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (UTF-8 text)", path.display()))?;
        let ids = tokenizer
            .encode(&text)
            .with_context(|| format!("tokenising {}", path.display()))?;
        let mut windows = quality::windows(ids.len(), context, stride)?;
        ensure!(
            !windows.is_empty(),
            "{} has {} tokens, fewer than one window of {context}: give a longer text or a smaller --context",
            path.display(),
            ids.len()
        );
        if let Some(max) = args.max_windows {
            windows.truncate(max);
        }
        let label = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        texts.push(Text {
            label,
            ids,
            windows,
        });
    }
    let header = LogitsHeader {
        model: model.path().display().to_string(),
        vocab,
        context,
        stride,
        texts: texts
            .iter()
            .map(|t| TextTokens {
                label: t.label.clone(),
                ids: t.ids.clone(),
                scored: t.windows.iter().map(|w| context - 1 - w.first).sum(),
            })
            .collect(),
    };
    let mut base = match &args.kl_base {
        Some(path) => {
            let reader = LogitsReader::open(path)?;
            reader.header.check_same_run(&header, path)?;
            Some(reader)
        }
        None => None,
    };
    let mut saved = match &args.save_logits {
        Some(path) => Some(LogitsWriter::create(path, &header)?),
        None => None,
    };

    let trace = args
        .trace
        .as_deref()
        .map(super::trace::TraceFile::create)
        .transpose()?;
    let total_windows: usize = texts.iter().map(|t| t.windows.len()).sum();
    let progress = ProgressBar::new(total_windows as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} windows, {msg} ({eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut results = vec![];
    let mut all = Tally::default();
    for text in &texts {
        progress.set_prefix(text.label.clone());
        let mut tally = Tally::default();
        for w in &text.windows {
            let mut ids = text.ids[w.start..w.start + context].to_vec();
            if let Some(b) = bos {
                ids[0] = b;
            }
            // each window from an empty cache, as llama-perplexity evaluates its chunks
            let mut session = Session::new(&model)?;
            if let Some(t) = &trace {
                t.set_tag(&format!(
                    "\"text\":{},\"start\":{}",
                    serde_json::to_string(&text.label)?,
                    w.start
                ));
                session.set_observer(Some(t.clone()));
            }
            let (logits, v) = session.feed_all(&ids)?;
            ensure!(
                v == vocab,
                "the model returned {v} logits per token, expected {vocab}"
            );
            for p in w.first..context - 1 {
                let row = &logits[p * vocab..(p + 1) * vocab];
                let logp = quality::log_softmax(row);
                let target = ids[p + 1] as usize;
                tally.nll.push(-logp[target]);
                if let Some(reader) = base.as_mut() {
                    let base_logp = quality::log_softmax(&reader.next_row()?);
                    tally.base_nll.push(-base_logp[target]);
                    let c = quality::compare(&base_logp, &logp);
                    tally.kl.push(c.kl);
                    tally.same_top1 += usize::from(c.same_top1);
                }
                if let Some(writer) = saved.as_mut() {
                    writer.push(row)?;
                }
            }
            progress.inc(1);
            progress.set_message(format!(
                "perplexity {:.3}",
                quality::perplexity(&tally.nll).0
            ));
        }
        if progress.is_hidden() {
            // no terminal to draw the bar on: one line per file instead
            eprintln!(
                "{}: {} windows, perplexity {:.4} ({:.1} s)",
                text.label,
                text.windows.len(),
                quality::perplexity(&tally.nll).0,
                started.elapsed().as_secs_f64()
            );
        }
        results.push(tally.report(&text.label, text.ids.len()));
        all.extend(&tally);
    }
    progress.finish_and_clear();
    if let Some(writer) = saved {
        writer.finish()?;
    }
    if let Some(t) = trace {
        t.finish()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = all.report("all", texts.iter().map(|t| t.ids.len()).sum());
    if args.json {
        let out = json!({
            "model": model.path().display().to_string(),
            "context": context,
            "stride": stride,
            "bos_first": bos.is_some(),
            "texts": results,
            "all": total,
            "seconds": seconds,
            "kl_base": args.kl_base.as_ref().map(|p| p.display().to_string()),
            "routing": routing_report(&model),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_table(&results, &total, args.kl_base.is_some());
    let routing = model.routing_stats();
    if routing.skipped_slots > 0 {
        eprintln!(
            "adaptive top-k ran {} of the {} experts the routers chose ({:.1}% skipped)",
            routing.routed_slots,
            routing.routed_slots + routing.skipped_slots,
            100.0 * skipped_share(routing)
        );
    }
    eprintln!(
        "{} windows of {context} tokens (stride {stride}) in {seconds:.1} s",
        total_windows
    );
    Ok(())
}

fn skipped_share(r: moe_edge_engine::RoutingStats) -> f64 {
    r.skipped_slots as f64 / (r.routed_slots + r.skipped_slots).max(1) as f64
}

/// Expert slots run and skipped (adaptive top-k), for the JSON outputs.
pub fn routing_report(model: &moe_edge_engine::Model) -> serde_json::Value {
    let r = model.routing_stats();
    json!({
        "routed_slots": r.routed_slots,
        "skipped_slots": r.skipped_slots,
        "skipped_share": skipped_share(r),
    })
}

fn print_table(results: &[serde_json::Value], total: &serde_json::Value, with_base: bool) {
    let mut head = format!(
        "{:<12} {:>8} {:>8} {:>18}",
        "text", "tokens", "scored", "perplexity"
    );
    if with_base {
        head += &format!(
            " {:>10} {:>10} {:>10} {:>10} {:>8}",
            "ppl ratio", "mean KL", "median KL", "p99 KL", "top-1"
        );
    }
    println!("{head}");
    for r in results.iter().chain(std::iter::once(total)) {
        let mut line = format!(
            "{:<12} {:>8} {:>8} {:>9.4} ± {:<6.4}",
            r["label"].as_str().unwrap_or(""),
            r["tokens"].as_u64().unwrap_or(0),
            r["scored"].as_u64().unwrap_or(0),
            r["perplexity"].as_f64().unwrap_or(f64::NAN),
            r["perplexity_stderr"].as_f64().unwrap_or(f64::NAN),
        );
        if with_base {
            let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
            line += &format!(
                " {:>10.5} {:>10.6} {:>10.6} {:>10.6} {:>7.2}%",
                f(&r["perplexity_ratio"]),
                f(&r["kl"]["mean"]),
                f(&r["kl"]["median"]),
                f(&r["kl"]["p99"]),
                100.0 * f(&r["top1_agreement"]),
            );
        }
        println!("{line}");
    }
}
