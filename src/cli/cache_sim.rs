//! `moe-edge cache-sim`: replays a routing against a packed model's expert cache at several
//! budgets and eviction policies, without running the model, and reports hit rates and the
//! expert bytes read per token: which budget and policy a device needs for a workload.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::Args;
use moe_edge_engine::pack::{
    hot_experts, simulate_cache, uniform_routing, BlockCall, CacheSimulation, EvictionPolicy,
    FREQUENCY_HALF_LIFE_TOKENS,
};
use moe_edge_engine::{LoadOptions, Model};
use serde_json::json;

use super::{CachePolicy, ProfileRef};

#[derive(Debug, Args)]
pub struct CacheSimArgs {
    /// The packed model (see `moe-edge pack`): its experts' sizes and layers.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Routing traces of this model (`--trace` of generate, chat or perplexity), replayed one
    /// after the other.
    #[arg(
        long,
        value_name = "TRACE.jsonl",
        required_unless_present = "uniform_tokens"
    )]
    pub trace: Vec<PathBuf>,
    /// Instead of traces: this many tokens routed uniformly at random (each block's top-k).
    #[arg(long, value_name = "N", conflicts_with = "trace")]
    pub uniform_tokens: Option<usize>,
    /// Seed of the uniform routing.
    #[arg(long, default_value_t = 1, requires = "uniform_tokens")]
    pub seed: u64,
    /// Cache budgets as shares of all experts' in-memory bytes, in (0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5")]
    pub budgets: Vec<f64>,
    /// Cache budgets in MiB instead, as `--expert-cache-mb` gives them.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "MIB,...",
        conflicts_with = "budgets"
    )]
    pub budget_mb: Vec<u64>,
    /// Eviction policies to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lru,layer-cycle,frequency,layer-cycle-frequency"
    )]
    pub policies: Vec<CachePolicy>,
    /// Half-life of the frequency policies' use counts, in tokens.
    #[arg(long, value_name = "TOKENS", default_value_t = FREQUENCY_HALF_LIFE_TOKENS)]
    pub half_life_tokens: u64,
    /// Also replay each policy with the experts this routing profile shows most used kept
    /// resident, as `--pin-hot` keeps them.
    #[arg(long, value_name = "PROFILE.json[:LABEL]")]
    pub pin_hot: Option<String>,
    /// The share of each budget --pin-hot may fill, in (0, 1).
    #[arg(long, value_name = "S", default_value_t = 0.5, requires = "pin_hot")]
    pub pin_share: f64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CacheSimArgs) -> anyhow::Result<()> {
    if args.budget_mb.is_empty() {
        for &b in &args.budgets {
            ensure!(b > 0.0 && b <= 1.0, "--budgets: {b} is outside (0, 1]");
        }
    }
    ensure!(
        args.budget_mb.iter().all(|&m| m > 0),
        "--budget-mb: a budget must be at least 1 MiB"
    );
    ensure!(
        args.half_life_tokens > 0,
        "--half-life-tokens must be at least 1"
    );
    let model = Model::load(&args.model, LoadOptions::default())?;
    let sizes = model.expert_bytes().with_context(|| {
        format!(
            "{} is not a packed model: only packs have an expert cache (see `moe-edge pack`)",
            args.model.display()
        )
    })?;
    let blocks = model.blocks();
    let (calls, tokens) = match args.uniform_tokens {
        Some(n) => {
            ensure!(n > 0, "--uniform-tokens must be at least 1");
            let experts: Vec<usize> = blocks.iter().map(|b| b.spec.experts).collect();
            let top_k: Vec<usize> = blocks.iter().map(|b| b.spec.top_k).collect();
            (uniform_routing(n, &experts, &top_k, args.seed), n)
        }
        None => {
            let layers: Vec<usize> = blocks.iter().map(|b| b.spec.layer).collect();
            let mut calls = vec![];
            let mut tokens = 0;
            for path in &args.trace {
                let (c, t) = read_trace(path, &layers)?;
                calls.extend(c);
                tokens += t;
            }
            ensure!(tokens > 0, "the traces route no token");
            (calls, tokens)
        }
    };
    let profile = match &args.pin_hot {
        Some(text) => {
            ensure!(
                args.pin_share > 0.0 && args.pin_share < 1.0,
                "--pin-share {} is outside (0, 1)",
                args.pin_share
            );
            let r = ProfileRef::parse(text, "--pin-hot")?;
            Some((r.read(&model)?, r.label))
        }
        None => None,
    };
    let total: u64 = sizes.iter().flatten().sum();
    let largest = sizes.iter().flatten().copied().max().unwrap_or(0);
    let requests_per_token: u64 = blocks.iter().map(|b| b.spec.top_k as u64).sum();
    if !args.json {
        println!(
            "{tokens} tokens, {} block calls; experts {:.1} MiB in memory",
            calls.len(),
            total as f64 / 1048576.0
        );
        println!("| budget | MiB | policy | hit rate | misses / token | MiB read / token |");
        println!("|---|---|---|---|---|---|");
    }
    // as the cache does, a budget below the largest expert is raised to it
    let budgets: Vec<u64> = if args.budget_mb.is_empty() {
        args.budgets
            .iter()
            .map(|s| (total as f64 * s) as u64)
            .collect()
    } else {
        args.budget_mb
            .iter()
            .map(|m| m.saturating_mul(1 << 20))
            .collect()
    };
    for budget in budgets {
        let budget = budget.max(largest);
        let share = budget as f64 / total as f64;
        for &policy in &args.policies {
            let policy: EvictionPolicy = policy.into();
            let mut variants = vec![(policy.name().to_string(), vec![])];
            if let Some((p, label)) = &profile {
                let usage = p.usage(label.as_deref())?;
                let kept = hot_experts(usage, &sizes, (budget as f64 * args.pin_share) as u64);
                variants.push((format!("{} + pin-hot", policy.name()), kept));
            }
            for (name, kept) in variants {
                let stats = simulate_cache(
                    &calls,
                    &CacheSimulation {
                        expert_bytes: &sizes,
                        budget,
                        policy,
                        half_life_requests: args.half_life_tokens * requests_per_token,
                        kept: &kept,
                    },
                )?;
                let misses = stats.misses as f64 / tokens as f64;
                let read = stats.bytes_loaded as f64 / tokens as f64 / 1048576.0;
                if args.json {
                    println!(
                        "{}",
                        json!({
                            "budget_share": share, "budget_bytes": budget, "policy": name,
                            "pinned_experts": kept.len(), "tokens": tokens,
                            "hits": stats.hits, "misses": stats.misses, "hit_rate": stats.hit_rate(),
                            "misses_per_token": misses, "bytes_read_per_token": stats.bytes_loaded as f64 / tokens as f64,
                        })
                    );
                } else {
                    println!(
                        "| {:.0}% | {:.1} | {name} | {:.1}% | {misses:.2} | {read:.2} |",
                        share * 100.0,
                        budget as f64 / 1048576.0,
                        stats.hit_rate() * 100.0
                    );
                }
            }
        }
    }
    Ok(())
}

/// A trace's block calls, in order, and how many tokens it routes. Consecutive lines of one
/// layer are one call (a prompt's tokens), their experts fetched once.
fn read_trace(path: &PathBuf, layers: &[usize]) -> anyhow::Result<(Vec<BlockCall>, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut calls: Vec<BlockCall> = vec![];
    let mut current: Option<(usize, BTreeSet<usize>)> = None;
    let mut tokens = 0;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not JSON", at()))?;
        let layer = v["layer"]
            .as_u64()
            .with_context(|| format!("{}: no `layer`", at()))? as usize;
        let block = layers
            .iter()
            .position(|&l| l == layer)
            .with_context(|| format!("{}: the model has no MoE block at layer {layer}", at()))?;
        let experts = v["experts"]
            .as_array()
            .with_context(|| format!("{}: no `experts`", at()))?
            .iter()
            .map(|e| e.as_u64().map(|e| e as usize))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: `experts` are not expert numbers", at()))?;
        if block == 0 {
            tokens += 1;
        }
        match &mut current {
            Some((b, set)) if *b == block => set.extend(experts),
            _ => {
                if let Some((b, set)) = current.take() {
                    calls.push(BlockCall {
                        block: b,
                        experts: set.into_iter().collect(),
                    });
                }
                current = Some((block, experts.into_iter().collect()));
            }
        }
    }
    if let Some((b, set)) = current {
        calls.push(BlockCall {
            block: b,
            experts: set.into_iter().collect(),
        });
    }
    Ok((calls, tokens))
}
