//! `moe-edge bench`: load time, time to first token, prefill and decode speed (median and spread
//! over repeats), peak memory and bytes read, for one model on this machine.

use std::time::Instant;

use crate::procstats;
use clap::Args;
use moe_edge_engine::{Sampler, SamplingParams, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length (random token ids, fixed seed).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens generated after the prompt (greedy, EOS ignored).
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Measured repeats (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Sample decode tokens at this temperature (seeded) instead of greedy: varied tokens route
    /// to varied experts, which is what a cache should be measured on.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Median and spread of one measure over the repeats.
#[derive(Debug, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
        Spread {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    mode: &'static str,
    moe_layers: usize,
    kv_cache: bool,
    prompt_tokens: usize,
    gen_tokens: usize,
    temperature: f32,
    repeat: usize,
    threads: usize,
    /// Threads of tract's matrix products (the same pool as `threads`).
    tract_threads: usize,
    /// int8 kernels in use (packed int8 experts; f32 experts use portable f32 code)
    isa: &'static str,
    load_s: f64,
    ttft_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft: Spread,
    prefill: Spread,
    decode: Spread,
    peak_rss_bytes: Option<u64>,
    /// bytes read from storage (`/proc/self/io` read_bytes) per decoded token, during decode
    disk_read_bytes_per_token: Option<f64>,
    /// bytes the expert cache loaded per decoded token, during decode (packed models)
    expert_bytes_loaded_per_token: Option<f64>,
    cache: Option<serde_json::Value>,
    /// Peak RSS by part: what the model holds, the expert cache's peak, one sequence's KV cache
    /// at its longest, and the rest (tract's plan and activations, buffers, thread stacks, the
    /// allocator's slack, the program itself).
    footprint: serde_json::Value,
}

struct Run {
    ttft: f64,
    prefill_tps: f64,
    decode_tps: f64,
    disk_read: Option<u64>,
    expert_loaded: Option<u64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.prompt_tokens > 0 && args.gen_tokens > 1 && args.repeat > 0,
        "need --prompt-tokens > 0, --gen-tokens > 1, --repeat > 0"
    );
    let t0 = Instant::now();
    let model = args.model.load()?;
    // a model without a stated context still gets a bound before anything is allocated
    let limit = model.context_limit().unwrap_or(1 << 20);
    anyhow::ensure!(
        args.prompt_tokens.saturating_add(args.gen_tokens) <= limit,
        "--prompt-tokens {} + --gen-tokens {} exceed the model's context of {limit} tokens",
        args.prompt_tokens,
        args.gen_tokens
    );
    // the first session builds the plan: part of loading
    let vocab = Session::new(&model)?.feed(&[1])?.len() as i64;
    let load_s = t0.elapsed().as_secs_f64();
    let mut rng = StdRng::seed_from_u64(1234);
    let prompt: Vec<i64> = (0..args.prompt_tokens)
        .map(|_| rng.random_range(3.min(vocab - 1)..vocab))
        .collect();

    let one_run = || -> anyhow::Result<Run> {
        let mut session = Session::new(&model)?;
        let mut sampler = Sampler::new(SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            ..Default::default()
        });
        let t = Instant::now();
        let mut logits = session.feed(&prompt)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut next = sampler.sample(&logits, &[]);
        let ttft = t.elapsed().as_secs_f64();
        let io_before = procstats::io_read_bytes();
        let loaded_before = model.cache_stats().map(|c| c.bytes_loaded);
        let t = Instant::now();
        for _ in 1..args.gen_tokens {
            logits = session.feed(&[next])?;
            next = sampler.sample(&logits, &[]);
        }
        let decode_s = t.elapsed().as_secs_f64();
        let expert_loaded = loaded_before
            .zip(model.cache_stats().map(|c| c.bytes_loaded))
            .map(|(a, b)| b - a);
        let disk_read = io_before
            .zip(procstats::io_read_bytes())
            .map(|(a, b)| b.0 - a.0);
        Ok(Run {
            ttft,
            prefill_tps: args.prompt_tokens as f64 / prefill_s,
            decode_tps: (args.gen_tokens - 1) as f64 / decode_s,
            disk_read,
            expert_loaded,
        })
    };
    one_run()?; // warm-up
    let runs = (0..args.repeat)
        .map(|_| one_run())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ttft = Spread::of(runs.iter().map(|r| r.ttft).collect());
    let prefill = Spread::of(runs.iter().map(|r| r.prefill_tps).collect());
    let decode = Spread::of(runs.iter().map(|r| r.decode_tps).collect());
    let per_decoded_token = |v: Vec<u64>| {
        (!v.is_empty())
            .then(|| v.iter().sum::<u64>() as f64 / (v.len() * (args.gen_tokens - 1)) as f64)
    };
    let disk_read_bytes_per_token =
        per_decoded_token(runs.iter().filter_map(|r| r.disk_read).collect());
    let expert_bytes_loaded_per_token =
        per_decoded_token(runs.iter().filter_map(|r| r.expert_loaded).collect());
    let fp = model.footprint();
    let expert_cache_peak = model.cache_stats().map_or(0, |c| c.peak_resident_bytes);
    let kv = model.kv_cache_bytes(args.prompt_tokens + args.gen_tokens);
    let peak_rss = procstats::peak_rss_bytes();
    let accounted =
        fp.graph_weights_bytes + fp.int8_dense_bytes + fp.moe_fixed_bytes + expert_cache_peak + kv;
    let footprint = serde_json::json!({
        "graph_weights_bytes": fp.graph_weights_bytes,
        "int8_dense_bytes": fp.int8_dense_bytes,
        "moe_fixed_bytes": fp.moe_fixed_bytes,
        "embedding": if fp.embedding_in_file { "file" } else { "graph" },
        "expert_cache_peak_bytes": expert_cache_peak,
        "kv_cache_bytes": kv,
        "other_bytes": peak_rss.map(|p| p.saturating_sub(accounted)),
    });
    let report = Report {
        model: model.path().display().to_string(),
        mode: if args.model.literal {
            "literal"
        } else {
            "sparse"
        },
        moe_layers: model.blocks().len(),
        kv_cache: model.has_kv_cache(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        temperature: args.temperature,
        repeat: args.repeat,
        threads: rayon::current_num_threads(),
        tract_threads: moe_edge_engine::tract_threads(),
        isa: moe_edge_engine::kernels::kernels().isa.name(),
        load_s,
        ttft_s: ttft.median,
        prefill_tokens_per_s: prefill.median,
        decode_tokens_per_s: decode.median,
        ttft,
        prefill,
        decode,
        peak_rss_bytes: peak_rss,
        disk_read_bytes_per_token,
        expert_bytes_loaded_per_token,
        cache: model.cache_stats().map(serde_json::to_value).transpose()?,
        footprint,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "model      {} ({} mode, {} MoE layers, kv cache {})",
            report.model, report.mode, report.moe_layers, report.kv_cache
        );
        println!("threads    {}   isa {}", report.threads, report.isa);
        println!("load       {:.3} s", report.load_s);
        println!(
            "ttft       {:.4} s (min {:.4}, max {:.4})",
            report.ttft.median, report.ttft.min, report.ttft.max
        );
        println!(
            "prefill    {:.1} tok/s (min {:.1}, max {:.1}) over {} tokens",
            report.prefill.median, report.prefill.min, report.prefill.max, args.prompt_tokens
        );
        println!(
            "decode     {:.1} tok/s (min {:.1}, max {:.1}) over {} tokens",
            report.decode.median,
            report.decode.min,
            report.decode.max,
            args.gen_tokens - 1
        );
        if let Some(p) = report.peak_rss_bytes {
            println!("peak RSS   {:.1} MiB", p as f64 / (1 << 20) as f64);
            let mib = |k: &str| report.footprint[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
            println!(
                "  of which  graph weights {:.1}, int8 dense {:.1}, routers/shared {:.1}, experts {:.1} (peak), KV {:.1}, other {:.1} MiB; embedding in {}",
                mib("graph_weights_bytes"),
                mib("int8_dense_bytes"),
                mib("moe_fixed_bytes"),
                mib("expert_cache_peak_bytes"),
                mib("kv_cache_bytes"),
                mib("other_bytes"),
                report.footprint["embedding"].as_str().unwrap_or("?")
            );
        }
        if let Some(d) = report.expert_bytes_loaded_per_token {
            println!(
                "experts    {:.0} bytes loaded per decoded token (cache counters)",
                d
            );
        }
        if let Some(d) = report.disk_read_bytes_per_token {
            println!("disk read  {:.0} bytes per decoded token", d);
        }
    }
    Ok(())
}
