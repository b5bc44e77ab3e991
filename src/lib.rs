//! The `moe-edge` command-line tool as a library: its subcommands ([`cli`]) and the
//! OpenAI-compatible server ([`serve`]), and the quality measures `perplexity` reports ([`quality`]). The binary in `main.rs` parses the command line and
//! calls [`cli::run`]; the fuzz targets in `fuzz/` call the request and file parsers directly.

pub mod cli;
mod procstats;
pub mod quality;
pub mod serve;
