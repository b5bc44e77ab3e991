//! `moe-edge pack`: write a packed model directory.

use std::path::PathBuf;

use clap::Args;
use moe_edge_engine::kernels::q8::ScaleType;
use moe_edge_engine::pack::{pack_model_with_progress, ExpertFormat, PackOptions};

#[derive(Debug, Args)]
pub struct PackArgs {
    /// The model to pack (.onnx file or directory).
    pub model: PathBuf,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// How experts are stored.
    #[arg(long, value_enum, default_value_t = Experts::Int8)]
    pub experts: Experts,
    /// Block scales of int8 experts (f16 loses no measurable accuracy and saves 6% of the bytes).
    #[arg(long, value_enum, default_value_t = Scales::F16)]
    pub int8_scales: Scales,
    /// Alignment of each expert in the expert file, in bytes (a power of two; the default suits
    /// 4, 16 and 64 KiB page kernels).
    #[arg(long, default_value_t = moe_edge_engine::pack::DEFAULT_ALIGN)]
    pub align: u64,
    /// How to store the dense linear layers (attention projections, LM head): f32 keeps them in
    /// the graph (tract computes them), int8 quantises them like the experts.
    #[arg(long, value_enum, default_value_t = DenseFormat::F32)]
    pub dense: DenseFormat,
    /// Pack even if some MoE blocks are not understood (they stay dense in the graph).
    #[arg(long)]
    pub dense_fallback: bool,
    /// Mixed precision: store the cold experts of a routing profile of this model (`moe-edge
    /// profile`, under LABEL or over all its text) as int4, the hot ones as int8 (int8 packs).
    #[arg(long, value_name = "PROFILE.json[:LABEL]")]
    pub int4_cold: Option<String>,
    /// With --int4-cold: per layer, the most used experts that carried this share of the routed
    /// slots stay int8 (at least top-k), in (0, 1].
    #[arg(long, value_name = "S", default_value_t = 0.8, requires = "int4_cold")]
    pub int8_share: f64,
    /// Where the token embedding table goes: `file` moves it into the expert file, read a row
    /// per token (exact f32 rows, each checked by its own checksum; the table takes no memory);
    /// `graph` keeps it in the graph, in memory.
    #[arg(long, value_enum, default_value_t = Embeddings::File)]
    pub embeddings: Embeddings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Embeddings {
    File,
    Graph,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experts {
    /// int8 blocks of 32 with f16 scales (f32 scales for matrices f16 cannot scale)
    Int8,
    /// int4 blocks of 32 with f16 scales (4.5 bits per weight on disk, 5 in memory), computed by
    /// the int4 kernels; a shared expert stays int8
    Int4,
    F16,
    F32,
}

impl From<Experts> for ExpertFormat {
    fn from(e: Experts) -> Self {
        match e {
            Experts::Int8 => ExpertFormat::Int8,
            Experts::Int4 => ExpertFormat::Int4,
            Experts::F16 => ExpertFormat::F16,
            Experts::F32 => ExpertFormat::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DenseFormat {
    F32,
    Int8,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Scales {
    F16,
    F32,
}

pub fn run(args: PackArgs) -> anyhow::Result<()> {
    let int8_scales = match args.int8_scales {
        Scales::F16 => ScaleType::F16,
        Scales::F32 => ScaleType::F32,
    };
    let opts = PackOptions {
        experts: args.experts.into(),
        int8_scales,
        alignment: args.align,
        dense_fallback: args.dense_fallback,
        dense_int8: args.dense == DenseFormat::Int8,
        embedding_in_file: args.embeddings == Embeddings::File,
        int4_experts: match &args.int4_cold {
            Some(spec) => Some(cold_experts(&args, spec)?),
            None => None,
        },
    };
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} tensor groups, {eta} left",
        )?
        .progress_chars("=> "),
    );
    bar.set_message("packing experts");
    let s = pack_model_with_progress(&args.model, &args.output, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let s = s?;
    println!(
        "packed {} experts of {} MoE layers as {:?} into {} ({:.1} MiB expert file) in {:.1}s",
        s.experts,
        s.layers,
        args.experts,
        s.out_dir.display(),
        s.expert_file_bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    if s.tensors_with_f32_scales > 0 {
        println!(
            "{} matrices use f32 block scales (values outside f16's range)",
            s.tensors_with_f32_scales
        );
    }
    Ok(())
}

/// The experts `--int4-cold` stores as int4: per layer, those outside the most used ones that
/// carried `--int8-share` of the routed slots in the profile.
fn cold_experts(args: &PackArgs, spec: &str) -> anyhow::Result<moe_edge_engine::ExpertMask> {
    let source = moe_edge_engine::Model::load(
        &args.model,
        moe_edge_engine::LoadOptions {
            dense_fallback: args.dense_fallback,
            ..Default::default()
        },
    )?;
    let hot = super::ProfileRef::parse(spec, "--int4-cold")?;
    let profile = hot.read(&source)?;
    let top_k: Vec<usize> = source.blocks().iter().map(|b| b.spec.top_k).collect();
    Ok(moe_edge_engine::ExpertMask::keeping(
        profile.usage(hot.label.as_deref())?,
        &top_k,
        moe_edge_engine::Keep::Share(args.int8_share),
    )?)
}
