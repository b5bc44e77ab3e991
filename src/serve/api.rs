//! The OpenAI-compatible request bodies (checked field by field, with OpenAI-style errors) and
//! the response objects.

use moe_edge_engine::{ChatMessage, Generation, StopReason};
use serde::Deserialize;
use serde_json::{json, Value};

use super::worker::Finished;

/// An error answered as `{"error": {"message", "type", "code"}}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, code: &'static str) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

/// A stop given as one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields shared by chat and text completions.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: String,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Parses a body, naming the field that does not fit.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!("the body is not valid JSON: {e}"), "invalid_json")
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "the body must be a JSON object",
            "invalid_json",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(format!("invalid request: {e}"), "invalid_request"))
}

/// The checked sampling settings of a request.
pub struct Checked {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Sampling {
    pub fn check(&self, served: &str, max_tokens_limit: usize) -> Result<Checked, ApiError> {
        if let Some(m) = &self.model {
            if !m.is_empty() && m != served {
                return Err(ApiError {
                    status: 404,
                    message: format!(
                        "the model '{m}' does not exist; this server serves '{served}'"
                    ),
                    kind: "invalid_request_error",
                    code: "model_not_found",
                });
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", "invalid_n"));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(max_tokens_limit.min(256));
        if max_tokens == 0 || max_tokens > max_tokens_limit {
            return Err(ApiError::invalid(
                format!("max_tokens must be between 1 and {max_tokens_limit}, got {max_tokens}"),
                "invalid_max_tokens",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "invalid_temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p must be in (0, 1], got {top_p}"),
                "invalid_top_p",
            ));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop takes up to 4 non-empty strings",
                "invalid_stop",
            ));
        }
        Ok(Checked {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed.unwrap_or(0),
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

pub fn finish_reason(g: &Generation) -> &'static str {
    match g.stop_reason {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
    }
}

/// moe-edge's figures for one request, in the shape llama.cpp's server gives them (`timings`),
/// with the KV-cache reuse (`cache_n`) and the expert cache's traffic added.
pub fn timings(f: &Finished) -> Value {
    let g = &f.generation;
    let fed = g.prompt_ids.len().saturating_sub(f.reused_prompt_tokens);
    let prompt_ms = g.prefill_seconds * 1e3;
    let predicted = g.generated_ids.len().saturating_sub(1);
    let predicted_ms = g.decode_seconds * 1e3;
    let per_second = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let mut t = json!({
        "cache_n": f.reused_prompt_tokens,
        "prompt_n": fed,
        "prompt_ms": prompt_ms,
        "prompt_per_second": per_second(fed, prompt_ms),
        "predicted_n": predicted,
        "predicted_ms": predicted_ms,
        "predicted_per_second": per_second(predicted, predicted_ms),
    });
    if let Some(c) = &f.cache {
        t["expert_cache"] = json!({"hits": c.hits, "misses": c.misses,
            "resident_bytes": c.resident_bytes, "budget_bytes": c.budget_bytes});
    }
    t
}

pub fn usage(g: &Generation) -> Value {
    let (p, c) = (g.prompt_ids.len(), g.generated_ids.len());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}
