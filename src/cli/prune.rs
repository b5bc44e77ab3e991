//! `moe-edge prune`: a smaller pack without the experts a routing profile shows least used (or
//! those named with --expert-mask).

use std::path::PathBuf;

use anyhow::{ensure, Context};
use clap::Args;
use moe_edge_engine::pack::{prune_pack, Manifest};
use moe_edge_engine::{ExpertMask, Keep, RoutingProfile};

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The packed model to prune (see `moe-edge pack`).
    pub model: PathBuf,
    /// Output directory (a new pack).
    #[arg(short, long)]
    pub output: PathBuf,
    /// A routing profile of this model (`moe-edge profile`): the least used experts go.
    #[arg(long, value_name = "PROFILE.json", requires = "keep_rule")]
    pub profile: Option<PathBuf>,
    /// Use the profile's usage under this label (a language or domain) instead of over all text.
    #[arg(long, requires = "profile")]
    pub label: Option<String>,
    /// Keep, per layer, the fewest most used experts that carried this share of the routed
    /// slots, in (0, 1] (at least the layer's top-k).
    #[arg(long, value_name = "SHARE", group = "keep_rule")]
    pub keep_share: Option<f64>,
    /// Keep this many most used experts per layer (at least the layer's top-k).
    #[arg(long, value_name = "N", group = "keep_rule")]
    pub keep: Option<usize>,
    /// Also remove these experts: LAYER:EXPERT,EXPERT,... separated by ';' (e.g. "0:3,5;2:1").
    #[arg(long, value_name = "SPEC")]
    pub expert_mask: Option<String>,
}

pub fn run(args: PruneArgs) -> anyhow::Result<()> {
    let mut mask = ExpertMask::default();
    if let Some(path) = &args.profile {
        let manifest = Manifest::read(&args.model)
            .with_context(|| format!("{} is not a packed model", args.model.display()))?;
        let specs: Vec<_> = manifest.layers.iter().map(|l| l.spec.clone()).collect();
        let profile = RoutingProfile::read(path)?;
        profile.check_fits(&specs)?;
        let keep = match (args.keep_share, args.keep) {
            (Some(s), None) => Keep::Share(s),
            (None, Some(n)) => Keep::Count(n),
            _ => anyhow::bail!("give --keep-share or --keep with --profile"),
        };
        let top_k: Vec<usize> = specs.iter().map(|s| s.top_k).collect();
        mask = ExpertMask::keeping(profile.usage(args.label.as_deref())?, &top_k, keep)?;
    }
    if let Some(spec) = &args.expert_mask {
        mask.merge(&ExpertMask::parse(spec)?);
    }
    ensure!(
        !mask.is_empty(),
        "nothing to prune: give --profile with --keep-share or --keep, or --expert-mask"
    );
    let s = prune_pack(&args.model, &args.output, &mask)?;
    let before: usize = s.experts_before.iter().sum();
    let after: usize = s.experts_after.iter().sum();
    println!(
        "kept {after} of {before} experts ({}), expert file {:.1} MiB -> {:.1} MiB, in {}",
        s.experts_after
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        s.expert_file_bytes_before as f64 / 1048576.0,
        s.expert_file_bytes_after as f64 / 1048576.0,
        s.out_dir.display()
    );
    Ok(())
}
