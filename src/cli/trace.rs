//! `--trace FILE.jsonl`: the routing of every token at every MoE layer, one JSON object per line,
//! written as the model runs (see docs/TRACE.md for the format).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use moe_edge_engine::{PartialFile, RoutedTokens, RoutingObserver};

/// A routing observer writing a trace file: under a temporary name until [`TraceFile::finish`]
/// syncs it and renames it into place; a run that fails leaves no trace file.
pub struct TraceFile {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: Option<PartialFile>,
    /// The first write error (the observer cannot return one): reported by `finish`.
    error: Option<std::io::Error>,
    /// JSON members put first on every line (`"text":"de","start":512,`), or empty.
    tag: String,
    lines: u64,
}

impl TraceFile {
    pub fn create(path: &Path) -> anyhow::Result<Arc<Self>> {
        let file = PartialFile::create(path)
            .with_context(|| format!("creating the trace {}", path.display()))?;
        Ok(Arc::new(TraceFile {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                file: Some(file),
                error: None,
                tag: String::new(),
                lines: 0,
            }),
        }))
    }

    /// Members to put first on the following lines, e.g. which text and window they belong to
    /// (`"text":"de","start":512`); empty for none.
    pub fn set_tag(&self, members: &str) {
        let mut st = self.lock();
        st.tag = if members.is_empty() {
            String::new()
        } else {
            format!("{members},")
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flushes, syncs and renames the trace into place; returns the number of lines.
    pub fn finish(&self) -> anyhow::Result<u64> {
        let mut st = self.lock();
        let result = match (st.error.take(), st.file.take()) {
            (Some(e), _) => Err(anyhow::Error::from(e)),
            (None, None) => Err(anyhow::anyhow!("the trace was already finished")),
            (None, Some(file)) => file.commit().map(|()| st.lines).map_err(Into::into),
        };
        result.with_context(|| format!("writing the trace {}", self.path.display()))
    }
}

impl RoutingObserver for TraceFile {
    fn on_routing(&self, routed: &RoutedTokens<'_>) {
        let mut st = self.lock();
        let State {
            file,
            error,
            tag,
            lines,
        } = &mut *st;
        let (Some(file), None) = (file.as_mut(), error.as_ref()) else {
            return;
        };
        let out = file.writer();
        let mut line = String::with_capacity(128);
        for t in 0..routed.tokens() {
            line.clear();
            let choices = routed.token(t);
            line.push('{');
            line.push_str(tag);
            line.push_str(&format!(
                "\"position\":{},\"layer\":{},\"experts\":[",
                routed.position(t),
                routed.layer
            ));
            join(&mut line, choices.iter().map(|(e, _)| e.to_string()));
            line.push_str("],\"weights\":[");
            join(&mut line, choices.iter().map(|(_, w)| format_weight(*w)));
            line.push(']');
            if choices
                .first()
                .is_some_and(|(e, _)| routed.resident(*e).is_some())
            {
                line.push_str(",\"resident\":[");
                join(
                    &mut line,
                    choices
                        .iter()
                        .map(|(e, _)| routed.resident(*e).unwrap_or(false).to_string()),
                );
                line.push(']');
            }
            line.push_str("}\n");
            if let Err(e) = out.write_all(line.as_bytes()) {
                *error = Some(e);
                return;
            }
            *lines += 1;
        }
    }
}

fn join(line: &mut String, items: impl Iterator<Item = String>) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&item);
    }
}

/// A routing weight as JSON: the shortest decimal that reads back as the same f32 (`NaN` and
/// infinities, which no router produces, as `null`).
fn format_weight(w: f32) -> String {
    if w.is_finite() {
        format!("{w}")
    } else {
        "null".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_valid_json_and_round_trip() {
        for w in [0.5f32, 1.0, 0.123_456_79, 1e-8, 0.0] {
            let text = format_weight(w);
            let back: f32 = serde_json::from_str(&text).unwrap();
            assert_eq!(back, w, "{text}");
        }
        assert_eq!(format_weight(f32::NAN), "null");
    }

    #[test]
    fn an_unfinished_trace_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("moe-edge-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = TraceFile::create(&dir.join("t.jsonl")).unwrap();
        drop(trace);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let trace = TraceFile::create(&dir.join("t.jsonl")).unwrap();
        assert_eq!(trace.finish().unwrap(), 0);
        assert!(trace.finish().is_err(), "a second finish is an error");
        drop(trace);
        assert!(dir.join("t.jsonl").is_file());
        std::fs::remove_dir_all(&dir).ok();
    }
}
