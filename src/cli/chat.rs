//! `moe-edge chat`: talk to the model in the terminal, or answer one prompt from a pipe.

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::Context;
use clap::Args;
use moe_edge_engine::{Conversation, Flow, GenerateParams, Generation, SamplingParams};

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop a reply when its text produces this string (not printed); may be given several times.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Write the routing of every token at every MoE layer to FILE (JSON lines: position,
    /// layer, experts, weights and, for packed models, whether each expert was in memory).
    #[arg(long, value_name = "FILE.jsonl")]
    pub trace: Option<std::path::PathBuf>,
}

const HELP: &str =
    "/reset forgets the conversation, /system TEXT sets the system message, /stats shows the last \
reply's speed and the expert cache; Ctrl-C stops a reply, Ctrl-D exits";

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let mut chat = Conversation::new(&model)?;
    if let Some(system) = &args.system {
        chat.set_system(system);
    }
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k.unwrap_or(0),
            top_p: args.top_p.unwrap_or(1.0),
            seed: args.seed,
            ..Default::default()
        },
        stop_tokens: model.config().eos_token_ids.clone(),
        stop_strings: args.stop.clone(),
    };
    let trace = args
        .trace
        .as_deref()
        .map(super::trace::TraceFile::create)
        .transpose()?;
    if let Some(t) = &trace {
        chat.set_observer(Some(t.clone()));
    }
    let result = converse(&model, &mut chat, &params);
    chat.set_observer(None);
    if let Some(t) = trace {
        t.finish()?;
    }
    result
}

/// Answers the message on standard input (a pipe), or talks on the terminal until Ctrl-D.
fn converse(
    model: &moe_edge_engine::Model,
    chat: &mut Conversation<'_>,
    params: &GenerateParams,
) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        // scripting: the whole input is one message, the reply goes to stdout
        let mut message = String::new();
        stdin
            .lock()
            .read_to_string(&mut message)
            .context("reading the prompt from standard input")?;
        anyhow::ensure!(!message.trim().is_empty(), "no prompt on standard input");
        reply(chat, message.trim_end(), params)?;
        return Ok(());
    }
    let cancel = chat.cancel_handle();
    ctrlc::set_handler(move || cancel.cancel()).context("installing the Ctrl-C handler")?;
    eprintln!("{HELP}");
    let mut last: Option<Generation> = None;
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(()); // Ctrl-D
        }
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/reset" => {
                chat.reset();
                eprintln!("(conversation forgotten)");
            }
            "/stats" => print_stats(model, last.as_ref()),
            "/help" => eprintln!("{HELP}"),
            cmd if cmd.starts_with("/system") => {
                let text = cmd["/system".len()..].trim();
                chat.set_system(text);
                eprintln!("(system message set)");
            }
            _ => match reply(chat, input, params) {
                Ok(g) => last = Some(g),
                Err(e) => eprintln!("error: {e:#}"),
            },
        }
    }
}

/// Streams the reply to `message` on stdout.
fn reply(
    chat: &mut Conversation,
    message: &str,
    params: &GenerateParams,
) -> anyhow::Result<Generation> {
    let mut stdout = std::io::stdout().lock();
    let generation = chat.reply(message, params.clone(), |step| {
        let _ = write!(stdout, "{}", step.text);
        let _ = stdout.flush();
        Flow::Continue
    })?;
    writeln!(stdout)?;
    Ok(generation)
}

fn print_stats(model: &moe_edge_engine::Model, last: Option<&Generation>) {
    match last {
        Some(g) => eprintln!(
            "last reply: {} prompt tokens fed at {:.1} tok/s, {} generated at {:.1} tok/s ({:?})",
            g.prompt_ids.len(),
            g.prefill_tokens_per_s(),
            g.generated_ids.len(),
            g.decode_tokens_per_s(),
            g.stop_reason
        ),
        None => eprintln!("no reply yet"),
    }
    match model.cache_stats() {
        Some(s) => eprintln!(
            "expert cache: {:.1}% hits ({} hits, {} misses), {:.1} MiB loaded, peak {:.1} of {:.1} MiB",
            100.0 * s.hit_rate(),
            s.hits,
            s.misses,
            s.bytes_loaded as f64 / 1048576.0,
            s.peak_resident_bytes as f64 / 1048576.0,
            s.budget_bytes as f64 / 1048576.0
        ),
        None => eprintln!("expert cache: none (experts are in memory)"),
    }
}
