//! moe-edge's fuzz targets, one function per parser an attacker can reach: the packed model
//! (manifest, expert file and graph together), the ONNX import with MoE detection and rewrite,
//! the `.npy` ids reader, a model's companion files (tokenizer, config, template), the chat
//! template engine, the server's request bodies and the C API's entry points.
//!
//! Each function takes the fuzzer's bytes and must return normally whatever they hold: an error
//! is the expected answer to bad input; a panic, a hang, an abort or running out of memory is a
//! bug. The binaries in `fuzz_targets/` hand them to libFuzzer (`tools/fuzz.sh`); the test in
//! `tests/replay.rs` runs every kept input through them in the ordinary test suite.
//!
//! Inputs that hold several files separate them with [`SEPARATOR`]; an empty part stands for a
//! file that is absent.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moe_edge_engine::{ChatMessage, ChatTemplate, LoadOptions, Model, ModelConfig, Tokenizer};

mod capi;

pub use capi::capi;

/// Separates the files of a multi-file input.
pub const SEPARATOR: &[u8] = b"\n\x00moe-edge-fuzz-file\x00\n";

/// The names of the targets, as the binaries and corpus directories are named.
pub const TARGETS: [&str; 7] = [
    "pack",
    "onnx",
    "npy",
    "companions",
    "chat_template",
    "server_request",
    "capi",
];

/// Called once before a libFuzzer run: the panics that the engine turns into errors (inside tract
/// or `tokenizers`, which panic on some malformed models) pass quietly; any other panic still
/// reaches libFuzzer's hook, which aborts, and so is reported as a crash.
pub fn init() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !moe_edge_engine::panic_is_caught() {
            abort(info)
        }
    }));
}

/// Runs `data` through the target `name`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "pack" => pack(data),
        "onnx" => onnx(data),
        "npy" => npy(data),
        "companions" => companions(data),
        "chat_template" => chat_template(data),
        "server_request" => server_request(data),
        "capi" => capi(data),
        _ => panic!("no fuzz target named {name}"),
    }
}

/// Joins files into one input (the inverse of [`split`]; for making seeds).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEPARATOR)
}

/// The first `n` parts of a multi-file input (missing ones empty).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    while parts.len() + 1 < n {
        match find(rest, SEPARATOR) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts.resize(n, &[]);
    parts
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// This process's scratch directory for target `name` (on `/dev/shm` when there is one), emptied.
fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base
        .join(format!("moe-edge-fuzz-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the scratch directory can be created");
    dir
}

/// Removes this process's scratch directories.
pub fn remove_scratch() {
    for base in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        let _ = std::fs::remove_dir_all(base.join(format!("moe-edge-fuzz-{}", std::process::id())));
    }
}

/// Writes `bytes` as `dir/name`, or nothing when empty (the file is then absent).
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    if !bytes.is_empty() {
        std::fs::write(dir.join(name), bytes).expect("the scratch file can be written");
    }
}

/// The repository's root (the fixtures the targets use are read from it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ sits in the repository")
        .to_path_buf()
}

/// A packed model directory: `manifest.json`, `experts.bin`, `model.onnx`. The model is
/// opened, and then every expert is loaded (read, checked and decoded) and run once.
pub fn pack(data: &[u8]) {
    let parts = split(data, 3);
    let dir = scratch("pack");
    put(&dir, "manifest.json", parts[0]);
    put(&dir, "experts.bin", parts[1]);
    put(&dir, "model.onnx", parts[2]);
    let opts = LoadOptions {
        // a budget of one expert: every load goes through eviction
        expert_cache_mb: Some(0),
        verify: data.len().is_multiple_of(2),
        ..LoadOptions::default()
    };
    if let Ok(model) = Model::load(&dir, opts) {
        let _ = moe_edge_engine::fuzzing::load_every_expert(&model);
    }
}

/// An ONNX file: import, MoE detection, weight loading and rewrite; then every expert of the
/// imported blocks runs once.
pub fn onnx(data: &[u8]) {
    let dir = scratch("onnx");
    put(&dir, "model.onnx", data);
    let opts = LoadOptions {
        dense_fallback: data.len().is_multiple_of(3),
        ..LoadOptions::default()
    };
    if let Ok(model) = Model::load(&dir, opts) {
        let _ = moe_edge_engine::fuzzing::load_every_expert(&model);
    }
}

/// The `.npy` ids file of `moe-edge logits`.
pub fn npy(data: &[u8]) {
    let _ = moe_edge_cli::cli::logits::ids_from_npy(data);
}

/// A model's companion files: `tokenizer.json`, `config.json`, `tokenizer_config.json` and
/// `chat_template.jinja`, found and read as a model load does; the tokenizer then encodes and
/// decodes, and the template renders a conversation.
pub fn companions(data: &[u8]) {
    let parts = split(data, 4);
    let dir = scratch("companions");
    put(&dir, "tokenizer.json", parts[0]);
    put(&dir, "config.json", parts[1]);
    put(&dir, "tokenizer_config.json", parts[2]);
    put(&dir, "chat_template.jinja", parts[3]);
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).ok();
    if let Some(t) = &tokenizer {
        if let Ok(ids) = t.encode("Grüß dich, t10 t20 <s> ¿qué tal? 東京 \u{1F600}") {
            let _ = t.decode(&ids);
        }
        let _ = t.decode(&[0, 1, 2, 3, -1, i64::MAX, 1 << 40]);
    }
    let _ = ModelConfig::read(&dir.join("config.json"));
    if let Ok(Some(template)) = moe_edge_engine::fuzzing::find_chat_template(&dir) {
        let _ = template.render(&conversation(), true);
        if let Some(t) = &tokenizer {
            let _ = template.end_of_turn_tokens(t);
        }
    }
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What does tar do?"),
        ChatMessage::new("assistant", "It archives files."),
        ChatMessage::new("user", "Und gzip?"),
    ]
}

/// A chat template (`parts[0]`) rendered over the messages in `parts[1]` (a JSON list of
/// `{role, content}`, else a fixed conversation) with the BOS and EOS tokens of `parts[2..4]`.
pub fn chat_template(data: &[u8]) {
    let parts = split(data, 4);
    let Ok(source) = std::str::from_utf8(parts[0]) else {
        return;
    };
    let messages: Vec<ChatMessage> =
        serde_json::from_slice(parts[1]).unwrap_or_else(|_| conversation());
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    let (bos, eos) = (text(parts[2]), text(parts[3]));
    let template = ChatTemplate::new(source, bos.as_deref(), eos.as_deref());
    let _ = template.render(&messages, data.len().is_multiple_of(2));
}

/// The chat tokenizer and ChatML template of `tests/fixtures/chat`, loaded once.
fn chat_fixture() -> &'static (Tokenizer, ChatTemplate) {
    static FIXTURE: OnceLock<(Tokenizer, ChatTemplate)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = repo_root().join("tests/fixtures/chat");
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))
            .expect("tests/fixtures/chat/tokenizer.json loads");
        let source = std::fs::read_to_string(dir.join("chatml.jinja"))
            .expect("tests/fixtures/chat/chatml.jinja is readable");
        (
            tokenizer,
            ChatTemplate::new(&source, None, Some("<|im_end|>")),
        )
    })
}

/// A request body of the server's `/v1/chat/completions` (first byte even) or
/// `/v1/completions` (odd), prepared as the server prepares it: parsed, checked, rendered with
/// the chat template and tokenised.
pub fn server_request(data: &[u8]) {
    use moe_edge_cli::serve::api;
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let (tokenizer, template) = chat_fixture();
    if kind % 2 == 0 {
        let Ok(req) = api::parse::<api::ChatRequest>(body) else {
            return;
        };
        if req.sampling.check("moe-edge", 4096).is_ok() && !req.messages.is_empty() {
            if let Ok(text) = template.render(&req.messages, true) {
                let _ = tokenizer.encode_raw(&text);
            }
        }
    } else {
        let Ok(req) = api::parse::<api::CompletionRequest>(body) else {
            return;
        };
        if req.sampling.check("moe-edge", 4096).is_ok() {
            let _ = tokenizer.encode(&req.prompt);
        }
    }
}
