//! `moe-edge generate`: stream generated text, or print one JSON object.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use moe_edge_engine::{Flow, GenerateParams, Generator, SamplingParams};
use serde_json::json;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(
        long,
        short,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub prompt_ids: Option<Vec<i64>>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Always take the most likely token (the default when no temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep going past the model's end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop when the text produces this string (not printed); may be given several times.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Print expert cache statistics (hits, misses, bytes loaded, evictions) at the end.
    #[arg(long)]
    pub stats: bool,
    /// Write the routing of every token at every MoE layer to FILE (JSON lines: position,
    /// layer, experts, weights and, for packed models, whether each expert was in memory).
    #[arg(long, value_name = "FILE.jsonl")]
    pub trace: Option<std::path::PathBuf>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => model
            .tokenizer()
            .context("--prompt needs the model's tokenizer.json (next to model.onnx); or pass --prompt-ids")?
            .encode(text)?,
        (None, None) => anyhow::bail!("give --prompt or --prompt-ids"),
    };
    if let Some(top_p) = args.top_p {
        anyhow::ensure!(
            top_p > 0.0 && top_p <= 1.0,
            "--top-p must be in (0, 1], got {top_p}"
        );
    }
    let sampling = SamplingParams {
        temperature: if args.greedy {
            0.0
        } else {
            args.temperature.unwrap_or(0.0)
        },
        top_k: args.top_k.unwrap_or(0),
        top_p: args.top_p.unwrap_or(1.0),
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens: if args.ignore_eos {
            vec![]
        } else {
            model.config().eos_token_ids.clone()
        },
        stop_strings: args.stop.clone(),
    };
    let trace = args
        .trace
        .as_deref()
        .map(super::trace::TraceFile::create)
        .transpose()?;
    let mut session = moe_edge_engine::Session::new(&model)?;
    if let Some(t) = &trace {
        session.set_observer(Some(t.clone()));
    }
    let mut generator = Generator::with_session(&model, session, params)?;
    let mut stdout = std::io::stdout().lock();
    let streaming = !args.json;
    let with_text = model.tokenizer().is_some();
    let result = generator.generate(&prompt_ids, |step| {
        if streaming {
            let _ = if with_text {
                write!(stdout, "{}", step.text)
            } else {
                write!(stdout, "{} ", step.token)
            };
            let _ = stdout.flush();
        }
        Flow::Continue
    })?;
    if args.json {
        let out = json!({
            "prompt_ids": result.prompt_ids,
            "generated_ids": result.generated_ids,
            "text": result.text,
            "stop_reason": result.stop_reason,
            "prefill_tokens_per_s": result.prefill_tokens_per_s(),
            "decode_tokens_per_s": result.decode_tokens_per_s(),
            "prefill_seconds": result.prefill_seconds,
            "decode_seconds": result.decode_seconds,
            "moe_layers": model.blocks().len(),
            "cache": model.cache_stats(),
            "routing": super::perplexity::routing_report(&model),
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        writeln!(stdout)?;
        log::info!(
            "{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({:?})",
            result.prompt_ids.len(),
            result.prefill_tokens_per_s(),
            result.generated_ids.len(),
            result.decode_tokens_per_s(),
            result.stop_reason
        );
    }
    drop(generator);
    if let Some(t) = trace {
        t.finish()?;
    }
    if args.stats {
        super::print_cache_stats(&model);
    }
    Ok(())
}
