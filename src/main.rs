//! The `moe-edge` command-line tool.

use moe_edge_cli::cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // the engine turns panics inside tract into errors; their default message would only repeat
    // the error printed below
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !moe_edge_engine::panic_is_caught() {
            default_hook(info)
        }
    }));
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(format!("{level},tract_onnx=error")),
    )
    .init();
    if let Err(e) = moe_edge_engine::configure_threads(cli.threads) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: libraries often put their cause's
/// text in their own message and also return it as `source()`.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
