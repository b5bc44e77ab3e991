//! `moe-edge serve`: the OpenAI-compatible local server.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::serve::{run as serve, ServeOptions};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (loopback by default: put a reverse proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Model name clients ask for (default: the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on the API routes.
    #[arg(long, env = "MOE_EDGE_API_KEY")]
    pub api_key: Option<String>,
    /// Requests generated at once, each on its own session (they share the model and its cache).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Requests waiting for a free session; past that the server answers 429.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens_limit: usize,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Write the routing of each request to DIR/<response id>.jsonl, in the `--trace` format
    /// (off by default). The prompt prefix reused from a kept KV cache is not routed again.
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<std::path::PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.parallel >= 1, "--parallel must be at least 1");
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        let p = args
            .model
            .model
            .canonicalize()
            .unwrap_or(args.model.model.clone());
        let p = if p.is_file() {
            p.parent().map(|d| d.to_path_buf()).unwrap_or(p)
        } else {
            p
        };
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "moe-edge".into())
    });
    if let Some(dir) = &args.trace_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the trace directory {}", dir.display()))?;
    }
    let model = args.model.load()?;
    serve(
        model,
        ServeOptions {
            addr: args.addr,
            model_name,
            api_key: args.api_key,
            parallel: args.parallel,
            queue: args.queue,
            max_tokens: args.max_tokens_limit,
            max_body_bytes: args.max_body_bytes,
            trace_dir: args.trace_dir,
        },
    )
}
