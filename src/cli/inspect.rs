//! `moe-edge inspect`: what the importer found in a model.

use clap::Args;
use serde_json::json;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    if args.json {
        let blocks: Vec<_> = model
            .blocks()
            .iter()
            .map(|r| {
                let s = &r.spec;
                json!({
                    "layer": s.layer, "form": r.form, "node": r.node, "experts": s.experts,
                    "top_k": s.top_k, "routing": s.routing.to_string(), "activation": s.activation.to_string(),
                    "hidden": s.hidden, "ffn": s.ffn, "shared_expert_ffn": s.shared_ffn,
                    "expert_bytes_f32": s.expert_bytes_f32(),
                })
            })
            .collect();
        let out = json!({
            "model": model.path(), "kv_cache": model.has_kv_cache(), "blocks": blocks,
            "dense_fallback": model.fallbacks(), "removed_initializers": model.removed_initializers(),
            "pack": model.manifest().map(|m| json!({"experts": m.experts, "alignment": m.alignment, "source": m.source})),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model: {}", model.path().display());
    println!("interface: {:?}", model.interface());
    if model.blocks().is_empty() && model.fallbacks().is_empty() {
        println!("no MoE block found: the graph runs as a plain tract model");
    }
    for r in model.blocks() {
        let s = &r.spec;
        println!(
            "layer {:>3}  {}  experts {}  top-{}  routing {}  activation {}  hidden {}  ffn {}  shared expert {}  expert bytes {} (f32){}",
            s.layer,
            r.form,
            s.experts,
            s.top_k,
            s.routing,
            s.activation,
            s.hidden,
            s.ffn,
            s.shared_ffn.map(|f| format!("ffn {f} (sigmoid-gated)")).unwrap_or_else(|| "none".into()),
            s.expert_bytes_f32(),
            if r.node.is_empty() { String::new() } else { format!("  [node {}]", r.node) }
        );
    }
    for f in model.fallbacks() {
        println!(
            "layer {:?}  NOT UNDERSTOOD, runs literally in tract (--dense-fallback): {} [node {}]",
            f.layer, f.reason, f.node
        );
    }
    if let Some(c) = model.cache_stats() {
        println!(
            "expert cache budget: {:.1} MiB",
            c.budget_bytes as f64 / 1048576.0
        );
    } else {
        println!(
            "{} initializers removed from the graph (expert weights now in the expert store)",
            model.removed_initializers()
        );
    }
    Ok(())
}
