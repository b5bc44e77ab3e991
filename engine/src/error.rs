//! Typed errors of the library. The CLI wraps them with `anyhow`; every message names the
//! thing that is wrong (file, node, layer, expert) so that a user can act on it.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file or directory could not be read or decoded.
    #[error("cannot load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },

    /// An MoE block was found but cannot be run correctly by moe-edge.
    #[error("refused MoE block at node '{node}'{}: {reason}", layer.map(|l| format!(" (layer {l})")).unwrap_or_default())]
    RefusedBlock {
        node: String,
        layer: Option<usize>,
        reason: String,
    },

    /// The graph uses a construct that moe-edge refuses regardless of flags.
    #[error("unsupported graph: {0}")]
    UnsupportedGraph(String),

    /// Input given by the caller does not fit the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Feeding would exceed the model's context (`max_position_embeddings`).
    #[error("the context is full: {needed} tokens needed, the model takes at most {limit}")]
    ContextFull { limit: usize, needed: usize },

    /// A packed model's expert file or manifest is damaged or does not match.
    #[error("corrupt pack: {0}")]
    CorruptPack(String),

    /// A chat template that cannot be rendered: the construct and its line.
    #[error("chat template {file}: {message}")]
    Template { file: String, message: String },

    /// Tokenizer missing or failing.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An error raised inside tract while analysing or running the graph. (The cause is part
    /// of the message, not a separate `source()`, so that printing the error chain does not
    /// repeat it.)
    #[error("{context}: {cause:#}")]
    Tract {
        context: String,
        cause: anyhow::Error,
    },

    /// A file could not be read or written; the cause is part of the message.
    #[error("i/o error on {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl Error {
    pub(crate) fn tract(context: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
        let context = context.into();
        move |cause| Error::Tract { context, cause }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { path, cause }
    }
}

/// A value read from a file, shortened for an error message: a hostile or damaged file cannot
/// make a message of unbounded length (the first and last characters and the length are kept).
pub(crate) fn clip(value: &str) -> String {
    const KEEP: usize = 40;
    let n = value.chars().count();
    if n <= 2 * KEEP + 20 {
        return value.to_string();
    }
    let head: String = value.chars().take(KEEP).collect();
    let tail: String = value.chars().skip(n - KEEP).collect();
    format!("{head}[...{} characters...]{tail}", n - 2 * KEEP)
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn long_values_are_clipped_short_ones_kept() {
        assert_eq!(clip("int8"), "int8");
        let long = format!("{}{}", "a".repeat(50_000), "b".repeat(50_000));
        let c = clip(&long);
        assert_eq!(
            c,
            format!(
                "{}[...99920 characters...]{}",
                "a".repeat(40),
                "b".repeat(40)
            )
        );
        // character boundaries, not bytes
        assert!(clip(&"é".repeat(1000)).starts_with(&"é".repeat(40)));
    }
}
