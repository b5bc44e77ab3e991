//! The files of a model: an `.onnx` file, or a directory holding `model.onnx` and, beside it,
//! `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `config.json`. Only the
//! model's own directory is looked in.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files beside `model.onnx` that describe the model (tokenizer, chat template, config); a
/// packed model directory carries copies of them.
pub(crate) const COMPANION_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
];

#[derive(Debug, Clone)]
pub(crate) struct ModelFiles {
    pub onnx: PathBuf,
    pub dir: PathBuf,
}

impl ModelFiles {
    pub fn resolve(path: &Path) -> Result<Self> {
        let onnx = if path.is_dir() {
            path.join("model.onnx")
        } else {
            path.to_path_buf()
        };
        if !onnx.is_file() {
            return Err(Error::ModelLoad {
                path: path.to_path_buf(),
                reason: format!("{} does not exist", onnx.display()),
            });
        }
        let dir = onnx
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ModelFiles { onnx, dir })
    }

    /// `name` in the model's directory, if it exists.
    pub fn sibling(&self, name: &str) -> Option<PathBuf> {
        Some(self.dir.join(name)).filter(|p| p.is_file())
    }
}
