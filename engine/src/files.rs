//! The files of a model: an `.onnx` file, or a directory holding `model.onnx` and, beside it,
//! `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `config.json`. Only the
//! model's own directory is looked in.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Opens `path` for reading if it is a regular file. Opened without blocking, so that a FIFO or a
/// device in a model's place is refused at once instead of waiting for a writer.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(Error::io(path))?;
    let meta = file.metadata().map_err(Error::io(path))?;
    if !meta.is_file() {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(file)
}

/// The whole content of the regular file `path`, refusing files over `limit` bytes before
/// reading them.
pub(crate) fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let len = file.metadata().map_err(Error::io(path))?.len();
    if len > limit {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, more than the {limit} this file may have"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).map_err(Error::io(path))?;
    Ok(bytes)
}

/// The regular file `path` as UTF-8 text (at most `limit` bytes).
pub(crate) fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_regular(path, limit)?).map_err(|_| Error::ModelLoad {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// Size limits of the files a model reads whole: an ONNX protobuf cannot exceed 2 GiB; the JSON
/// and template files of any published model are far below 64 MiB.
pub(crate) const ONNX_LIMIT: u64 = 2 << 30;
pub(crate) const TEXT_LIMIT: u64 = 64 << 20;

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
        match std::fs::metadata(&onnx) {
            Err(_) => {
                return Err(Error::ModelLoad {
                    path: path.to_path_buf(),
                    reason: format!("{} does not exist", onnx.display()),
                })
            }
            Ok(m) if !m.is_file() => {
                return Err(Error::ModelLoad {
                    path: path.to_path_buf(),
                    reason: format!("{} is not a regular file", onnx.display()),
                })
            }
            Ok(_) => {}
        }
        let dir = onnx
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ModelFiles { onnx, dir })
    }

    /// Whether the model was named as a directory (or that directory's `model.onnx`), which is how
    /// a packed model is opened; any other file is read as an ONNX file.
    pub fn is_directory_model(&self) -> bool {
        self.onnx.file_name().is_some_and(|n| n == "model.onnx")
    }

    /// `name` in the model's directory, if something by that name is there (reading it then
    /// refuses anything but a regular file, rather than ignoring it).
    pub fn sibling(&self, name: &str) -> Option<PathBuf> {
        Some(self.dir.join(name)).filter(|p| p.symlink_metadata().is_ok())
    }
}
