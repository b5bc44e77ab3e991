//! Generation through the public API on the tiny Mixtral of `models/` (whose greedy tokens are
//! torch's, see the KV-cache tests): stop tokens, stop strings, cancellation from another thread,
//! and streamed text with multi-byte characters split across tokens.

#[path = "../../tests/common/fixtures.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;

use common::*;
use moe_edge_engine::{Flow, GenerateParams, Generator, LoadOptions, Model, StopReason};

/// torch's 16 greedy tokens after prompt [501] (`hf-moe-kv/mixtral/reference.npz`, prompt 0).
fn reference() -> (Vec<i64>, Vec<i64>) {
    let reference = fixtures().join("hf-moe-kv/mixtral/reference.npz");
    let prompt = read_npz::<i64>(&reference, "prompt_0");
    let tokens = read_npz::<i64>(&reference, "tokens_0");
    (
        prompt.iter().copied().collect(),
        tokens.iter().copied().collect(),
    )
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn generation_stops_at_eos_from_config() {
    let model = Model::load(&tiny_model(), LoadOptions::default()).unwrap();
    assert_eq!(
        model.config().eos_token_ids,
        vec![2],
        "eos_token_id from config.json"
    );
    let (prompt, tokens) = reference();
    let stop = tokens[4];
    let first = tokens.iter().position(|&t| t == stop).unwrap();
    let params = GenerateParams {
        stop_tokens: vec![stop],
        ..greedy(16)
    };
    let mut generator = Generator::new(&model, params).unwrap();
    let out = generator.generate(&prompt, |_| Flow::Continue).unwrap();
    assert_eq!(out.generated_ids, tokens[..=first]);
    assert_eq!(out.stop_reason, StopReason::Eos);
}

/// The bytes of GPT-2's byte-level alphabet: each byte is written as one printable character.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A copy of the tiny model whose byte-level tokenizer spells torch's greedy tokens after
/// prompt [501] as "日本 é🙂ß✙   ", with most characters split across tokens.
fn model_with_byte_tokens() -> (PathBuf, &'static str) {
    let pieces: [(i64, &[u8]); 12] = [
        (363, &[0xE6, 0x97]), // 日 = E6 97 A5
        (344, &[0xA5]),
        (130, &[0xE6]), // 本 = E6 9C AC
        (447, &[0x9C, 0xAC]),
        (86, b" "),
        (287, &[0xC3]), // é = C3 A9
        (147, &[0xA9]),
        (261, &[0xF0, 0x9F]), // 🙂 = F0 9F 99 82
        (377, &[0x99]),
        (372, &[0x82]),
        (231, &[0xC3, 0x9F]), // ß
        (409, &[0xE2, 0x9C]), // ✙ = E2 9C 99 (377 again)
    ];
    let mut vocab: HashMap<String, i64> = (0..512).map(|i| (format!("<{i}>"), i)).collect();
    vocab.retain(|_, id| !pieces.iter().any(|(p, _)| p == id));
    for (id, bytes) in pieces {
        vocab.insert(bytes.iter().map(|&b| byte_level_char(b)).collect(), id);
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    let dir = std::env::temp_dir().join(format!("moe-edge-bytes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.onnx", "config.json"] {
        std::fs::copy(tiny_model().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    (dir, "日本 é🙂ß✙   ")
}

#[test]
fn streamed_pieces_concatenate_to_the_decoded_multibyte_text() {
    let (dir, text) = model_with_byte_tokens();
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let (prompt, tokens) = reference();
    let mut pieces = vec![];
    let mut generator = Generator::new(&model, greedy(16)).unwrap();
    let out = generator
        .generate(&prompt, |step| {
            pieces.push(step.text.clone());
            Flow::Continue
        })
        .unwrap();
    assert_eq!(out.generated_ids, tokens);
    let decoded = model
        .tokenizer()
        .unwrap()
        .decode(&out.generated_ids)
        .unwrap();
    assert_eq!(decoded, text);
    assert_eq!(pieces.concat(), decoded);
    assert_eq!(out.text, decoded);
    assert!(
        pieces.iter().all(|p| !p.contains('\u{FFFD}')),
        "an incomplete character was emitted: {pieces:?}"
    );
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() >= 5,
        "tokens ending inside a character emit nothing: {pieces:?}"
    );
    // the iterator gives the same pieces (a new session: the old one holds the first reply)
    let mut generator = Generator::new(&model, greedy(16)).unwrap();
    generator.start(&prompt).unwrap();
    let again: Vec<String> = generator.steps().map(|s| s.unwrap().text).collect();
    assert_eq!(again, pieces);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_stop_string_ends_generation_and_is_not_emitted() {
    let (dir, _) = model_with_byte_tokens();
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let (prompt, tokens) = reference();
    // "🙂ß" spans four tokens; "🙂" alone must be held back until "ß" decides
    let params = GenerateParams {
        stop_strings: vec!["🙂ß".into(), "never".into()],
        ..greedy(16)
    };
    let mut pieces = vec![];
    let mut generator = Generator::new(&model, params).unwrap();
    let out = generator
        .generate(&prompt, |step| {
            pieces.push(step.text.clone());
            Flow::Continue
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::StopString);
    assert_eq!(out.text, "日本 é");
    assert_eq!(pieces.concat(), "日本 é");
    assert_eq!(
        out.generated_ids,
        tokens[..11],
        "stops at the token completing it"
    );
    // a stop string that is only a prefix of the output is flushed at the token limit
    let params = GenerateParams {
        stop_strings: vec!["ß✙ x".into()],
        ..greedy(16)
    };
    let mut generator = Generator::new(&model, params).unwrap();
    let mut pieces = vec![];
    let out = generator
        .generate(&prompt, |step| {
            pieces.push(step.text.clone());
            Flow::Continue
        })
        .unwrap();
    assert_eq!(out.stop_reason, StopReason::MaxTokens);
    assert_eq!(pieces.concat(), "日本 é🙂ß✙   ");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cancelling_from_another_thread_stops_within_one_token() {
    let model = Model::load(&tiny_model(), LoadOptions::default()).unwrap();
    let (prompt, tokens) = reference();
    let mut generator = Generator::new(&model, greedy(16)).unwrap();
    let cancel = generator.cancel_handle();
    let (reached, wait_reached) = mpsc::channel::<usize>();
    let (done, wait_done) = mpsc::channel::<()>();
    let canceller = std::thread::spawn(move || {
        let at = wait_reached.recv().unwrap();
        cancel.cancel();
        done.send(()).unwrap();
        at
    });
    let mut seen = 0;
    let out = generator
        .generate(&prompt, |_| {
            seen += 1;
            if seen == 3 {
                // hand over to the other thread and wait until it has cancelled
                reached.send(seen).unwrap();
                wait_done.recv().unwrap();
            }
            Flow::Continue
        })
        .unwrap();
    assert_eq!(canceller.join().unwrap(), 3);
    assert_eq!(out.stop_reason, StopReason::Cancelled);
    assert_eq!(
        out.generated_ids,
        tokens[..3],
        "no token after the cancellation"
    );
    // the callback stops it too
    let mut generator = Generator::new(&model, greedy(16)).unwrap();
    let out = generator.generate(&prompt, |_| Flow::Stop).unwrap();
    assert_eq!(out.generated_ids.len(), 1);
    assert_eq!(out.stop_reason, StopReason::Cancelled);
}

#[test]
fn generation_stops_at_the_context_limit() {
    let model = Model::load(&tiny_model(), LoadOptions::default()).unwrap();
    let limit = model
        .context_limit()
        .expect("max_position_embeddings in config.json");
    assert_eq!(limit, 256);
    let prompt: Vec<i64> = (0..250).map(|i| 10 + i % 400).collect();
    let params = GenerateParams {
        max_tokens: 100,
        ..Default::default()
    };
    let mut generator = Generator::new(&model, params).unwrap();
    let out = generator.generate(&prompt, |_| Flow::Continue).unwrap();
    assert_eq!(out.stop_reason, StopReason::ContextFull);
    // every generated token but the last was fed; the last would be position `limit`
    assert_eq!(out.generated_ids.len(), limit - prompt.len() + 1);
    let mut session = generator.into_session();
    assert_eq!(session.len(), limit);
    let err = session.feed(&[5]).unwrap_err();
    assert!(
        matches!(
            err,
            moe_edge_engine::Error::ContextFull {
                limit: 256,
                needed: 257
            }
        ),
        "{err}"
    );
}
