//! The parts of a Hugging Face `config.json` that generation needs.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Generation-relevant configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelConfig {
    /// Token ids that end generation.
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
    pub model_type: Option<String>,
    /// The longest sequence the model was trained for.
    pub max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
struct RawConfig {
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<i64>,
    model_type: Option<String>,
    max_position_embeddings: Option<usize>,
}

impl ModelConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path, crate::files::TEXT_LIMIT)?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: format!("invalid config.json: {e}"),
        })?;
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        Ok(ModelConfig {
            eos_token_ids,
            bos_token_id: raw.bos_token_id,
            model_type: raw.model_type,
            max_position_embeddings: raw.max_position_embeddings,
        })
    }
}
