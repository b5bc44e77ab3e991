//! Text in and out: the model's `tokenizer.json` (through `tokenizers`) and incremental decoding
//! for streaming.

use std::path::Path;

use crate::error::{Error, Result};

/// The model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({} tokens)", self.inner.get_vocab_size(true))
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_regular(path, crate::files::TEXT_LIMIT)?;
        let invalid = |e: String| Error::Tokenizer(format!("{}: {e}", path.display()));
        let inner = guarded(
            || tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| invalid(e.to_string())),
            |panic| invalid(format!("not a tokenizer this version can read ({panic})")),
        )?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built in code.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, true)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&i| {
                u32::try_from(i).map_err(|_| Error::Tokenizer(format!("token id {i} is negative")))
            })
            .collect::<Result<Vec<u32>>>()?;
        guarded(
            || {
                self.inner
                    .decode(&ids, true)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            },
            failed("decoding"),
        )
    }

    /// Token ids of `text` as it is, special tokens written in it included, without the ones the
    /// post-processor would add (a rendered chat template already has them).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<i64>> {
        self.encode_with(text, false)
    }

    /// Token ids of `text`, with or without the post-processor's special tokens.
    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = guarded(
            || {
                self.inner
                    .encode(text, add_special_tokens)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            },
            failed("encoding"),
        )?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Whether `id` is a special token (an added token marked special, such as `<|im_end|>`).
    pub fn is_special(&self, id: i64) -> bool {
        u32::try_from(id).is_ok_and(|id| {
            self.inner
                .get_added_tokens_decoder()
                .get(&id)
                .is_some_and(|t| t.special)
        })
    }

    /// The id of a token of the vocabulary (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

/// `tokenizers` panics on some inputs its own checks let through (a malformed decoder in
/// `tokenizer.json`, for one): those become errors.
fn guarded<T>(f: impl FnOnce() -> Result<T>, to_error: impl FnOnce(String) -> Error) -> Result<T> {
    crate::guard::catch_library_panic(f, to_error)
}

fn failed(what: &'static str) -> impl FnOnce(String) -> Error {
    move |panic| Error::Tokenizer(format!("the tokenizer failed while {what} ({panic})"))
}

/// Turns a growing token sequence into text pieces as tokens arrive: each piece is what the new
/// token adds to the text, an incomplete UTF-8 character held back until the token that completes
/// it. Only a short window of recent tokens is decoded at each step, so a reply costs linear time
/// in its length. The pieces, followed by [`finish`](Self::finish), concatenate to the decoded
/// text of all the tokens.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<i64>,
    /// Start of the window decoded to find the new text.
    prefix_offset: usize,
    /// End of the tokens whose text has been emitted.
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: i64) -> Result<String> {
        self.ids.push(id);
        self.emit(tokenizer, false)
    }

    /// The text held back at the end (an incomplete character, as the tokenizer decodes it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        self.emit(tokenizer, true)
    }

    fn emit(&mut self, tokenizer: &Tokenizer, flush: bool) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let complete = !text.ends_with('\u{FFFD}') || flush;
        if text.len() > prefix.len() && text.is_char_boundary(prefix.len()) && complete {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(text[prefix.len()..].to_string())
        } else {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"decoder":` (JSON cut off after the decoder's key) makes `tokenizers` panic while it
    /// reads the file (found by the `companions` fuzz target).
    #[test]
    fn a_tokenizer_that_makes_tokenizers_panic_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("moe-edge-tok-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, r#"{"decoder":"#).unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a tokenizer this version can read"),
            "{err}"
        );
    }
}
