//! Chat templates against transformers' `apply_chat_template` (fixtures made by
//! `tools/chat_fixtures.py`), and conversations that keep their cache between turns.

use std::path::PathBuf;

use super::template::{ChatMessage, ChatTemplate};
use super::Conversation;
use crate::test_support::*;
use crate::tokenizer::Tokenizer;
use crate::{Error, Flow, GenerateParams, LoadOptions, Model, Session};

fn chat_fixtures() -> PathBuf {
    fixtures().join("chat")
}

fn template(style: &str, bos: Option<&str>, eos: Option<&str>) -> ChatTemplate {
    let source = std::fs::read_to_string(chat_fixtures().join(format!("{style}.jinja"))).unwrap();
    ChatTemplate::new(&source, bos, eos)
}

#[test]
fn templates_render_as_transformers_does() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chat_fixtures().join("cases.json")).unwrap())
            .unwrap();
    let tokenizer = Tokenizer::from_file(&chat_fixtures().join("tokenizer.json")).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 16, "four styles, four conversations");
    for case in cases {
        let what = format!("{} / {}", case["style"], case["case"]);
        let t = template(
            case["style"].as_str().unwrap(),
            case["bos_token"].as_str(),
            case["eos_token"].as_str(),
        );
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = t
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: text");
        let want: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tokenizer.encode_raw(&text).unwrap(),
            want,
            "{what}: token ids"
        );
    }
}

#[test]
fn template_errors_name_the_construct() {
    let t = template("mistral", Some("<s>"), Some("</s>"));
    let two_users = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = t.render(&two_users, true).unwrap_err().to_string();
    assert!(err.contains("roles must alternate"), "{err}");
    let broken = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None);
    let err = broken.render(&two_users, true).unwrap_err();
    assert!(matches!(err, Error::Template { .. }), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
    let unknown = ChatTemplate::new("{{ messages[0].content.frobnicate() }}", None, None);
    let err = unknown.render(&two_users, true).unwrap_err().to_string();
    assert!(err.contains("frobnicate"), "{err}");
}

/// A template that builds a list nested hundreds of thousands deep: minijinja walks and drops
/// it recursively, which overflowed the stack (found by the `chat_template` fuzz target).
#[test]
fn a_template_nesting_values_deeply_does_not_overflow_the_stack() {
    let deep = ChatTemplate::new(
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% for j in range(100) %}\
         {% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x|length }}",
        None,
        None,
    );
    let err = deep
        .render(&[ChatMessage::new("user", "a")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("instructions without finishing"), "{err}");
}

#[test]
fn a_template_that_does_not_end_is_stopped() {
    // 10^10 iterations: without a bound this renders for hours
    let endless = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        None,
        None,
    );
    let err = endless
        .render(&[ChatMessage::new("user", "a")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("instructions without finishing"), "{err}");
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    // json.dumps({"name": "tar", "args": ["-c", 1, True, None], "note": "Grüße \"x\"\n"}, ensure_ascii=False)
    let t = ChatTemplate::new(
        r#"{{ {"name": "tar", "args": ["-c", 1, true, none], "note": "Grüße \"x\"\n"} | tojson }}"#,
        None,
        None,
    );
    assert_eq!(
        t.render(&[], false).unwrap(),
        r#"{"name": "tar", "args": ["-c", 1, true, null], "note": "Grüße \"x\"\n"}"#
    );
    // json.dumps([1, {"a": []}], indent=2)
    let t = ChatTemplate::new(r#"{{ [1, {"a": []}] | tojson(indent=2) }}"#, None, None);
    assert_eq!(
        t.render(&[], false).unwrap(),
        "[\n  1,\n  {\n    \"a\": []\n  }\n]"
    );
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn second_turn_feeds_only_new_tokens_and_matches_a_fresh_session() {
    let dir = chat_model("conversation");
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let mut chat = Conversation::new(&model).unwrap();
    let im_end = model.tokenizer().unwrap().token_id("<|im_end|>").unwrap();
    assert!(chat.end_of_turn_tokens().contains(&im_end));
    chat.set_system("Be brief.");
    let first = chat
        .reply("What does tar do?", greedy(6), |_| Flow::Continue)
        .unwrap();
    let prompt1 = chat.last_prefill_tokens();
    assert_eq!(
        prompt1,
        first.prompt_ids.len(),
        "turn 1 feeds its whole prompt"
    );
    let second = chat
        .reply("Und gzip? 日本", greedy(6), |_| Flow::Continue)
        .unwrap();
    assert_eq!(chat.messages().len(), 5);

    // what a fresh session would be fed for turn 2
    let text = model
        .chat_template()
        .unwrap()
        .render(&chat.messages()[..4], true)
        .unwrap();
    let prompt2 = model.tokenizer().unwrap().encode_raw(&text).unwrap();
    let held: Vec<i64> = first
        .prompt_ids
        .iter()
        .chain(&first.generated_ids)
        .copied()
        .collect();
    let common = held
        .iter()
        .zip(&prompt2)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common > prompt1, "the cache of turn 1 is reused");
    assert_eq!(chat.last_prefill_tokens(), prompt2.len() - common);
    assert_eq!(second.prompt_ids, prompt2[common..]);

    // logits after turn 2's prompt: kept session vs fresh session fed the whole history
    let mut kept = Session::new(&model).unwrap();
    kept.feed(&held[..held.len() - 1]).unwrap();
    kept.truncate(common).unwrap();
    let a = kept.feed(&prompt2[common..]).unwrap();
    let b = Session::new(&model).unwrap().feed(&prompt2).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "turn 2 logits differ by {diff}");

    // and the reply is the one a fresh conversation with the same history gives
    let mut fresh = Conversation::new(&model).unwrap();
    fresh.set_messages(chat.messages()[..4].to_vec());
    let again = fresh.respond(greedy(6), |_| Flow::Continue).unwrap();
    assert_eq!(again.generated_ids, second.generated_ids);
    assert_eq!(fresh.last_prefill_tokens(), prompt2.len());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn old_turns_are_dropped_when_the_context_is_full() {
    let dir = chat_model("context");
    let model = Model::load(&dir, LoadOptions::default()).unwrap();
    let limit = model.context_limit().unwrap();
    let mut chat = Conversation::new(&model).unwrap();
    chat.set_system("S");
    // each exchange is about 60 byte tokens: four of them overflow 256
    let long = "x".repeat(40);
    for _ in 0..4 {
        chat.reply(&long, greedy(2), |_| Flow::Continue).unwrap();
        assert!(chat.session().unwrap().len() <= limit);
    }
    assert_eq!(
        chat.messages()[0].role,
        "system",
        "the system message stays"
    );
    assert!(chat.messages().len() < 9, "oldest turns were dropped");
    // a message that cannot fit on its own is an error, not a crash
    let err = chat
        .reply(&"y".repeat(400), greedy(2), |_| Flow::Continue)
        .unwrap_err();
    assert!(matches!(err, Error::ContextFull { .. }), "{err}");
    assert_eq!(
        chat.messages().last().unwrap().role,
        "assistant",
        "the failed turn is taken back"
    );
    // and the conversation goes on
    chat.reply("short", greedy(2), |_| Flow::Continue).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
