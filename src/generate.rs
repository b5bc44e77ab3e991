//! Text generation loop: prefill, then sample and feed one token at a time until EOS or the
//! token limit, reporting each token as it comes.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the generation (usually the model's EOS ids).
    pub stop_tokens: Vec<i64>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
}

/// Result of one generation, with timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<i64>,
    pub generated_ids: Vec<i64>,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prefill_seconds.max(1e-9)
    }
    /// Decode speed over the tokens produced after the first one (which comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let steps = self.generated_ids.len().saturating_sub(1);
        if steps == 0 {
            0.0
        } else {
            steps as f64 / self.decode_seconds.max(1e-9)
        }
    }
}

/// Generates up to `params.max_tokens` tokens after `prompt`, calling `on_token` for each.
pub fn generate(
    model: &Model,
    prompt: &[i64],
    params: &GenerateParams,
    mut on_token: impl FnMut(i64),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    let mut session = Session::new(model)?;
    let mut sampler = Sampler::new(params.sampling);
    let t0 = Instant::now();
    let mut logits = session.feed(prompt)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = vec![];
    let mut stop_reason = StopReason::MaxTokens;
    while generated.len() < params.max_tokens {
        let next = sampler.sample(&logits, session.tokens());
        generated.push(next);
        on_token(next);
        if params.stop_tokens.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        if generated.len() == params.max_tokens {
            break;
        }
        logits = session.feed(&[next])?;
    }
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        generated_ids: generated,
        stop_reason,
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}
