//! Command-line interface: argument definitions and one module per subcommand.

pub mod generate;
pub mod inspect;
pub mod logits;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run Mixture-of-Experts ONNX language models on small devices.
#[derive(Debug, Parser)]
#[command(name = "moe-edge", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Worker threads for the MoE experts (default: all cores).
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
    /// One forward pass over token ids from a .npy file; writes the logits as .npy.
    Logits(logits::LogitsArgs),
}

/// How to open a model; shared by every subcommand.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// An .onnx file, or a directory holding model.onnx (+ tokenizer.json, config.json).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Run MoE blocks that are not understood literally in tract (slow) instead of refusing.
    #[arg(long)]
    pub dense_fallback: bool,
    /// Do not replace MoE blocks: run the exported graph as it is (for comparisons).
    #[arg(long)]
    pub literal: bool,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<moe_edge::Model> {
        let opts = moe_edge::LoadOptions {
            dense_fallback: self.dense_fallback,
            literal: self.literal,
        };
        Ok(moe_edge::Model::load(&self.model, opts)?)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
    }
}
