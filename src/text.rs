//! Text in and out through the model's `tokenizer.json`, with incremental decoding for
//! streaming.

use std::path::Path;

use crate::error::{Error, Result};

pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
}

impl TextCodec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(TextCodec { tokenizer })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Emits the text of a growing token sequence piece by piece, holding back an incomplete
/// UTF-8 character until the token that completes it arrives.
pub struct StreamDecoder<'a> {
    codec: &'a TextCodec,
    ids: Vec<i64>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(codec: &'a TextCodec) -> Self {
        StreamDecoder {
            codec,
            ids: vec![],
            emitted: 0,
        }
    }

    /// Adds a token; returns the new text it completes.
    pub fn push(&mut self, id: i64) -> Result<String> {
        self.ids.push(id);
        let text = self.codec.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(new)
    }
}
