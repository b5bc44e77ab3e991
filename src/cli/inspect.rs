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
    let imported = &model.imported;
    if args.json {
        let blocks: Vec<_> = imported
            .blocks
            .iter()
            .map(|b| {
                json!({
                    "layer": b.spec.layer, "form": b.form, "node": b.anchor, "experts": b.spec.experts,
                    "top_k": b.spec.top_k, "routing": b.spec.routing.to_string(), "activation": b.spec.activation.to_string(),
                    "hidden": b.spec.hidden, "ffn": b.spec.ffn, "shared_expert_ffn": b.spec.shared_ffn,
                    "expert_bytes": b.spec.expert_bytes_f32(),
                })
            })
            .collect();
        let out = json!({
            "model": model.files.onnx, "kv_cache": model.has_kv_cache(), "blocks": blocks,
            "dense_fallback": imported.fallbacks, "removed_initializers": imported.removed_initializers.len(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model: {}", model.files.onnx.display());
    println!("interface: {:?}", model.interface);
    if imported.blocks.is_empty() && imported.fallbacks.is_empty() {
        println!("no MoE block found: the graph runs as a plain tract model");
    }
    for b in &imported.blocks {
        let s = &b.spec;
        println!(
            "layer {:>3}  {}  experts {}  top-{}  routing {}  activation {}  hidden {}  ffn {}  shared expert {}  expert bytes {} (f32)  [node {}]",
            s.layer,
            b.form,
            s.experts,
            s.top_k,
            s.routing,
            s.activation,
            s.hidden,
            s.ffn,
            s.shared_ffn.map(|f| format!("ffn {f} (sigmoid-gated)")).unwrap_or_else(|| "none".into()),
            s.expert_bytes_f32(),
            b.anchor
        );
    }
    for f in &imported.fallbacks {
        println!(
            "layer {:?}  NOT UNDERSTOOD, runs literally in tract (--dense-fallback): {} [node {}]",
            f.layer, f.reason, f.node
        );
    }
    println!(
        "{} initializers removed from the graph (expert weights now in the expert store)",
        imported.removed_initializers.len()
    );
    Ok(())
}
