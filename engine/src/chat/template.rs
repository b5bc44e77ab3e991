//! Chat templates rendered the way transformers' `apply_chat_template` does: Jinja with
//! `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson`
//! that writes what Python's `json.dumps` writes, and Python's string and dict methods
//! (`strip`, `startswith`, `items`, ...), over `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token`.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template and the special tokens it is rendered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// Where it came from.
    pub file: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl ChatTemplate {
    /// A template from its source, rendered with the given special tokens.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        ChatTemplate {
            source: source.into(),
            file: "<string>".into(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        }
    }

    /// `chat_template.jinja` in `dir`, else the `chat_template` of `tokenizer_config.json` (a
    /// string, or a list of named templates of which `default` is taken); the special tokens
    /// come from `tokenizer_config.json`.
    pub(crate) fn find(dir: &Path) -> Result<Option<Self>> {
        let config = dir.join("tokenizer_config.json");
        // something by either name is read, and refused unless it is a regular file (a directory
        // or a FIFO is an error, not a reason to look elsewhere)
        let present = |p: &Path| p.symlink_metadata().is_ok();
        let json: serde_json::Value = if present(&config) {
            let text = crate::files::read_text(&config, crate::files::TEXT_LIMIT)?;
            serde_json::from_str(&text).map_err(|e| Error::ModelLoad {
                path: config.clone(),
                reason: format!("invalid tokenizer_config.json: {e}"),
            })?
        } else {
            serde_json::Value::Null
        };
        // a special token is a string, or an AddedToken object with its `content`
        let token = |key: &str| match &json[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        };
        let (bos_token, eos_token) = (token("bos_token"), token("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        let (source, file) = if present(&jinja) {
            let source = crate::files::read_text(&jinja, crate::files::TEXT_LIMIT)?;
            (source, jinja)
        } else {
            let source = match &json["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(list) => match list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                {
                    Some(s) => s.to_string(),
                    None => return Ok(None),
                },
                _ => return Ok(None),
            };
            (source, config)
        };
        Ok(Some(ChatTemplate {
            source,
            file: file.display().to_string(),
            bos_token,
            eos_token,
        }))
    }

    /// Renders `messages`, followed by the assistant's turn header when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let fail = |e: minijinja::Error| Error::Template {
            file: self.file.clone(),
            message: describe(&e),
        };
        // rendered on a thread of its own with a large stack: a template can build values nested
        // as deep as its fuel allows, and minijinja walks (and drops) them recursively
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("chat-template".into())
                .stack_size(RENDER_STACK)
                .spawn_scoped(scope, || {
                    let template = env.template_from_str(&self.source).map_err(fail)?;
                    let messages: Vec<Value> = messages
                        .iter()
                        .map(|m| {
                            minijinja::context! {
                                role => m.role.as_str(),
                                content => m.content.as_str(),
                            }
                        })
                        .collect();
                    let ctx = minijinja::context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => self.bos_token.clone().unwrap_or_default(),
                        eos_token => self.eos_token.clone().unwrap_or_default(),
                    };
                    template.render(ctx).map_err(fail)
                })
                .map_err(|e| Error::Template {
                    file: self.file.clone(),
                    message: format!("no thread to render it on: {e}"),
                })?
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::Template {
                        file: self.file.clone(),
                        message: "rendering failed (panic)".into(),
                    })
                })
        })
    }

    /// The special token the template ends an assistant turn with (found by rendering one
    /// exchange), and the template's EOS: a reply stops at them.
    pub fn end_of_turn_tokens(&self, tokenizer: &Tokenizer) -> Result<Vec<i64>> {
        let template = self;
        const ANSWER: &str = "moe-edge-answer";
        let question = [ChatMessage::new("user", "moe-edge-question")];
        let exchange = [question[0].clone(), ChatMessage::new("assistant", ANSWER)];
        let mut tokens = vec![];
        if let (Ok(prompt), Ok(full)) = (
            template.render(&question, true),
            template.render(&exchange, false),
        ) {
            let turn = full.strip_prefix(prompt.as_str()).unwrap_or(&full);
            if let Some(at) = turn.find(ANSWER) {
                let after = &turn[at + ANSWER.len()..];
                if let Some(&t) = tokenizer
                    .encode_raw(after)?
                    .iter()
                    .find(|&&t| tokenizer.is_special(t))
                {
                    tokens.push(t);
                }
            }
        }
        if let Some(eos) = template
            .eos_token
            .as_deref()
            .and_then(|e| tokenizer.token_id(e))
        {
            if !tokens.contains(&eos) {
                tokens.push(eos);
            }
        }
        Ok(tokens)
    }
}

/// The error with the construct and line it concerns.
fn describe(e: &minijinja::Error) -> String {
    let what = match e.detail() {
        _ if e.kind() == ErrorKind::OutOfFuel => {
            format!("the template ran more than {TEMPLATE_FUEL} instructions without finishing")
        }
        Some(detail) if detail.starts_with("raise_exception: ") => format!(
            "the template raised an exception: {}",
            &detail["raise_exception: ".len()..]
        ),
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

/// The most instructions one rendering may run: a template is code from a model's files, and
/// one that loops for ever (or for 10^10 steps) must end in an error, not hang. Real templates
/// run tens of instructions per message.
const TEMPLATE_FUEL: u64 = 2_000_000;

/// Stack of the rendering thread (reserved, touched only as deep as a template goes): with
/// [`TEMPLATE_FUEL`], values nested as deep as a template can make them fit in it.
const RENDER_STACK: usize = 256 << 20;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {message}"),
            ))
        },
    );
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// The local time now, formatted by C's `strftime` (as Python's `datetime.now().strftime`).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad =
        |m: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {m}"));
    let fmt = std::ffi::CString::new(format).map_err(|_| bad("the format holds a NUL byte"))?;
    let mut buf = [0u8; 256];
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes the broken-down
    // time into `tm`, which lives on this stack frame; `strftime` writes at most `buf.len()` bytes
    // into `buf`, reads the NUL-terminated `fmt` and `tm`, and returns how many bytes it wrote
    // (0 if they did not fit).
    let written = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("no local time"));
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm)
    };
    Ok(String::from_utf8_lossy(&buf[..written]).into_owned())
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as transformers' `tojson` filter does.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, &mut out)?;
    Ok(out)
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => write_json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot write a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps(..., ensure_ascii=False)` writes it.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
