//! Command-line interface: argument definitions and one module per subcommand.

pub mod bench;
pub mod cache_sim;
pub mod chat;
pub mod generate;
pub mod info;
pub mod inspect;
pub mod logits;
pub mod npy;
pub mod pack;
pub mod perplexity;
pub mod plots;
pub mod profile;
pub mod prune;
pub mod serve;
pub mod trace;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run Mixture-of-Experts ONNX language models on small devices.
#[derive(Debug, Parser)]
#[command(name = "moe-edge", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Threads of the one pool that runs the experts, the int8 layers and tract's matrix products
    /// (default: one per core).
    #[arg(long, global = true, env = "MOE_EDGE_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the MoE blocks the importer found (or why a block was refused).
    Inspect(inspect::InspectArgs),
    /// Generate text from a prompt, streaming it as it comes.
    Generate(generate::GenerateArgs),
    /// Chat with the model through its chat template (interactive, or one prompt from a pipe).
    Chat(chat::ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions).
    Serve(serve::ServeArgs),
    /// What this CPU supports and which kernels moe-edge chose.
    Info,
    /// Quantise a model's experts into a packed model directory (experts read on demand).
    Pack(pack::PackArgs),
    /// Measure load time, time to first token, prefill and decode speed, memory.
    Bench(bench::BenchArgs),
    /// One forward pass over token ids from a .npy file; writes the logits as .npy.
    Logits(logits::LogitsArgs),
    /// Perplexity over text files (as llama-perplexity), and KL divergence / top-1 agreement
    /// against a base model's saved logits.
    Perplexity(perplexity::PerplexityArgs),
    /// How the routers use their experts over text files (per layer, expert and label), as a
    /// JSON profile and SVG plots.
    Profile(profile::ProfileArgs),
    /// Write a smaller pack without the least used experts of a profile (or named experts).
    Prune(prune::PruneArgs),
    /// Replay a routing (traces, or uniformly random) against a pack's expert cache at several
    /// budgets and eviction policies: hit rates and bytes read per token, without running it.
    CacheSim(cache_sim::CacheSimArgs),
}

/// How to open a model; shared by every subcommand.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// An .onnx file, a directory holding model.onnx (+ tokenizer.json, config.json), or a
    /// packed model directory (see `moe-edge pack`).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Run MoE blocks that are not understood literally in tract (slow) instead of refusing.
    #[arg(long)]
    pub dense_fallback: bool,
    /// Do not replace MoE blocks: run the exported graph as it is (for comparisons).
    #[arg(long)]
    pub literal: bool,
    /// Memory budget of the expert cache of a packed model, in MiB (default: all experts).
    #[arg(long, env = "MOE_EDGE_EXPERT_CACHE_MB")]
    pub expert_cache_mb: Option<u64>,
    /// Check the checksum of every expert of a packed model when opening it.
    #[arg(long)]
    pub verify: bool,
    /// Which expert the cache evicts on a miss.
    #[arg(long, value_enum, default_value_t = CachePolicy::Frequency)]
    pub cache_policy: CachePolicy,
    /// Packed models: while a block computes, read on a background thread the experts it is
    /// about to run and the ones the next block's router predicts from this block's input.
    #[arg(long)]
    pub prefetch: bool,
    /// Adaptive top-k: skip a chosen expert whose routing weight is below W (the first choice
    /// is always kept) and rescale the others' weights to the chosen weights' sum.
    #[arg(long, value_name = "W")]
    pub min_expert_weight: Option<f32>,
    /// Adaptive top-k: keep the fewest chosen experts whose weights reach P of the chosen
    /// weights' sum, in the router's order, and rescale their weights likewise.
    #[arg(long, value_name = "P")]
    pub top_p_experts: Option<f32>,
    /// Never route to these experts: LAYER:EXPERT,EXPERT,... separated by ';' (e.g.
    /// "0:3,5;2:1"); each token's top-k is chosen among the others.
    #[arg(long, value_name = "SPEC")]
    pub expert_mask: Option<String>,
    /// How tokens are routed: `learnt` (the model's router, per token) or
    /// `static:PROFILE.json[:LABEL]`: every layer runs only the top-k experts the profile shows
    /// most used (under LABEL, or over all its text), weighted by the router over them alone.
    #[arg(long, value_name = "ROUTE", default_value = "learnt")]
    pub route: String,
    /// Packed models: keep the experts a routing profile shows most used (over all layers, under
    /// LABEL or over all its text) in the expert cache once loaded, as many as fit in
    /// --pin-share of the cache budget; the other experts share the rest.
    #[arg(long, value_name = "PROFILE.json[:LABEL]")]
    pub pin_hot: Option<String>,
    /// The share of the expert cache budget --pin-hot may fill, in (0, 1).
    #[arg(long, value_name = "S", default_value_t = 0.5, requires = "pin_hot")]
    pub pin_share: f64,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<moe_edge_engine::Model> {
        let opts = moe_edge_engine::LoadOptions {
            dense_fallback: self.dense_fallback,
            literal: self.literal,
            expert_cache_mb: self.expert_cache_mb,
            verify: self.verify,
            cache_policy: self.cache_policy.into(),
            prefetch: self.prefetch,
            adaptive_top_k: moe_edge_engine::AdaptiveTopK {
                min_weight: self.min_expert_weight,
                top_p: self.top_p_experts,
            },
        };
        let mut model = moe_edge_engine::Model::load(&self.model, opts)?;
        let mut mask = moe_edge_engine::ExpertMask::default();
        if let Some(spec) = &self.expert_mask {
            mask.merge(&moe_edge_engine::ExpertMask::parse(spec)?);
        }
        if let Some(routing) = static_route(&self.route)? {
            let profile = routing.read(&model)?;
            let top_k: Vec<usize> = model.blocks().iter().map(|b| b.spec.top_k).collect();
            mask.merge(&moe_edge_engine::ExpertMask::keeping(
                profile.usage(routing.label.as_deref())?,
                &top_k,
                moe_edge_engine::Keep::TopK,
            )?);
        }
        if !mask.is_empty() {
            model.restrict_experts(&mask)?;
        }
        if let Some(spec) = &self.pin_hot {
            let hot = ProfileRef::parse(spec, "--pin-hot")?;
            let profile = hot.read(&model)?;
            let (experts, bytes) =
                model.keep_hot_experts(profile.usage(hot.label.as_deref())?, self.pin_share)?;
            log::info!(
                "expert cache: the {experts} most used experts ({:.1} MiB) stay once loaded",
                bytes as f64 / 1048576.0
            );
        }
        Ok(model)
    }
}

/// A routing profile named on the command line as `PROFILE.json[:LABEL]`.
pub(crate) struct ProfileRef {
    profile: PathBuf,
    pub(crate) label: Option<String>,
}

impl ProfileRef {
    /// A label follows the last ':' unless the whole text names a file.
    pub(crate) fn parse(text: &str, option: &str) -> anyhow::Result<Self> {
        let parsed = match text.rsplit_once(':') {
            Some((file, label)) if !std::path::Path::new(text).is_file() && !label.is_empty() => {
                ProfileRef {
                    profile: file.into(),
                    label: Some(label.to_string()),
                }
            }
            _ => ProfileRef {
                profile: text.into(),
                label: None,
            },
        };
        anyhow::ensure!(
            !parsed.profile.as_os_str().is_empty(),
            "{option} needs a profile file"
        );
        Ok(parsed)
    }

    /// Reads the profile and checks that it was recorded on a model shaped like `model`.
    pub(crate) fn read(
        &self,
        model: &moe_edge_engine::Model,
    ) -> anyhow::Result<moe_edge_engine::RoutingProfile> {
        let specs: Vec<_> = model.blocks().iter().map(|b| b.spec.clone()).collect();
        let profile = moe_edge_engine::RoutingProfile::read(&self.profile)?;
        profile.check_fits(&specs)?;
        Ok(profile)
    }
}

/// Parses `--route`: `None` for the learnt routing.
fn static_route(route: &str) -> anyhow::Result<Option<ProfileRef>> {
    if route == "learnt" || route == "dynamic" {
        return Ok(None);
    }
    let Some(rest) = route.strip_prefix("static:") else {
        anyhow::bail!("--route {route:?}: expected `learnt` or `static:PROFILE.json[:LABEL]`");
    };
    ProfileRef::parse(rest, "--route static:").map(Some)
}

/// Which expert the cache evicts on a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CachePolicy {
    /// Least recently used first.
    Lru,
    /// Evict from the layer whose next turn is furthest away (layers run in a cycle, once per
    /// token), least recently used first within it.
    LayerCycle,
    /// Least used first, by use counts that halve every 8 tokens and that an expert keeps
    /// while evicted.
    Frequency,
    /// The layer-cycle policy's choice of layer, then least used first within it (the same
    /// decayed counts).
    LayerCycleFrequency,
}

impl From<CachePolicy> for moe_edge_engine::pack::EvictionPolicy {
    fn from(p: CachePolicy) -> Self {
        match p {
            CachePolicy::Lru => Self::Lru,
            CachePolicy::LayerCycle => Self::LayerCycle,
            CachePolicy::Frequency => Self::Frequency,
            CachePolicy::LayerCycleFrequency => Self::LayerCycleFrequency,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Prune(a) => prune::run(a),
        Command::CacheSim(a) => cache_sim::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Pack(a) => pack::run(a),
        Command::Info => info::run(),
    }
}

/// Expert cache statistics on stderr (packed models).
pub fn print_cache_stats(model: &moe_edge_engine::Model) {
    let Some(s) = model.cache_stats() else {
        eprintln!("expert cache: none (experts are held in memory; pack the model to use a cache)");
        return;
    };
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "expert cache: {} hits, {} misses ({:.1}% hits), {:.1} MiB loaded, {} evictions, peak {:.1} MiB of {:.1} MiB budget",
        s.hits,
        s.misses,
        100.0 * s.hit_rate(),
        mib(s.bytes_loaded),
        s.evictions,
        mib(s.peak_resident_bytes),
        mib(s.budget_bytes)
    );
    if s.prefetched > 0 {
        eprintln!(
            "prefetch: {} experts ({:.1} MiB) read ahead, {} used, {} evicted unused",
            s.prefetched,
            mib(s.prefetched_bytes),
            s.prefetch_used,
            s.prefetch_wasted
        );
    }
    for (i, l) in s.per_layer.iter().enumerate() {
        let prefetch = if l.prefetched > 0 {
            format!(", prefetched {} (used {})", l.prefetched, l.prefetch_used)
        } else {
            String::new()
        };
        eprintln!(
            "  layer {i:>3}: {} hits, {} misses, {:.1} MiB loaded, {} evictions{prefetch}",
            l.hits,
            l.misses,
            mib(l.bytes_loaded),
            l.evictions
        );
    }
}
