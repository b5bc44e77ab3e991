//! Text generation over a session: sample one token at a time until a stop token, a stop
//! string, the token limit, the context limit or a cancellation, streaming each token with the
//! text it completes through an iterator or a callback that can stop it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;
use crate::tokenizer::TextStream;

/// Settings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the generation (usually the model's EOS ids: see
    /// [`GenerateParams::for_model`]). A stop token is reported but adds no text.
    pub stop_tokens: Vec<i64>,
    /// Strings that end the generation when the text produces them; the stop string and
    /// anything after it are not emitted.
    pub stop_strings: Vec<String>,
}

impl GenerateParams {
    /// Greedy generation of up to `max_tokens` tokens, stopping at the model's EOS tokens.
    pub fn for_model(model: &Model, max_tokens: usize) -> Self {
        GenerateParams {
            max_tokens,
            stop_tokens: model.config().eos_token_ids.clone(),
            ..Default::default()
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token (EOS) was produced.
    Eos,
    /// The text produced a stop string.
    StopString,
    MaxTokens,
    /// The session holds as many tokens as the model's context allows.
    ContextFull,
    /// [`CancelHandle::cancel`] was called, or the callback said stop.
    Cancelled,
}

/// One generated token and the text it adds to the output (empty while a UTF-8 character or a
/// possible stop string is incomplete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub token: i64,
    pub text: String,
}

/// What the streaming callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Result of one generation, with timings.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<i64>,
    pub generated_ids: Vec<i64>,
    /// The text emitted (without a stop string); empty without a tokenizer.
    pub text: String,
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

/// Stops a generation from any thread: the generation ends before its next token.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Clears a cancellation (a generation starting does this itself).
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Generates text over a [`Session`], which it keeps (multi-turn: take it back with
/// [`Generator::into_session`]).
///
/// ```no_run
/// use moe_edge_engine::{Flow, GenerateParams, Generator, LoadOptions, Model};
/// let model = Model::load("models/tiny-mixtral".as_ref(), LoadOptions::default())?;
/// let mut params = GenerateParams::for_model(&model, 16);
/// params.stop_strings = vec!["t42".into()];
/// let mut generator = Generator::new(&model, params)?;
/// let prompt = model.tokenizer().unwrap().encode("t10 t20 t30")?;
/// // streaming through a callback, which may stop the generation
/// let out = generator.generate(&prompt, |step| {
///     print!("{}", step.text);
///     Flow::Continue
/// })?;
/// println!("\n{:?}: {}", out.stop_reason, out.text);
/// // or through an iterator
/// generator.start(&prompt)?;
/// for step in generator.steps() {
///     print!("{}", step?.text);
/// }
/// # Ok::<(), moe_edge_engine::Error>(())
/// ```
pub struct Generator<'m> {
    model: &'m Model,
    session: Session,
    params: GenerateParams,
    sampler: Sampler,
    cancel: CancelHandle,
    /// Logits of the last position, from which the next token is sampled.
    logits: Vec<f32>,
    stream: TextStream,
    /// Text decoded but not emitted yet: it may be the start of a stop string.
    pending: String,
    text: String,
    prompt: Vec<i64>,
    generated: Vec<i64>,
    stopped: Option<StopReason>,
    prefill_seconds: f64,
    decode_started: Option<Instant>,
    decode_seconds: f64,
}

impl<'m> Generator<'m> {
    /// A generator over a new session of `model`.
    pub fn new(model: &'m Model, params: GenerateParams) -> Result<Self> {
        Self::with_session(model, Session::new(model)?, params)
    }

    /// A generator continuing `session` (which must belong to `model`).
    pub fn with_session(
        model: &'m Model,
        session: Session,
        params: GenerateParams,
    ) -> Result<Self> {
        params.sampling.check()?;
        if params.stop_strings.iter().any(String::is_empty) {
            return Err(Error::InvalidInput("a stop string is empty".into()));
        }
        Ok(Generator {
            model,
            session,
            sampler: Sampler::new(params.sampling),
            params,
            cancel: CancelHandle::default(),
            logits: vec![],
            stream: TextStream::new(),
            pending: String::new(),
            text: String::new(),
            prompt: vec![],
            generated: vec![],
            stopped: Some(StopReason::MaxTokens),
            prefill_seconds: 0.0,
            decode_started: None,
            decode_seconds: 0.0,
        })
    }

    /// A handle that stops this generator from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Makes `handle` the one that stops this generator (one handle can serve the generators of
    /// successive turns).
    pub fn set_cancel_handle(&mut self, handle: CancelHandle) {
        self.cancel = handle;
    }

    /// Feeds `prompt` after what the session holds and gets ready to generate; clears the
    /// output of a previous generation (and a previous cancellation).
    pub fn start(&mut self, prompt: &[i64]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        self.cancel.0.store(false, Ordering::SeqCst);
        let t0 = Instant::now();
        self.logits = self.session.feed(prompt)?;
        self.prefill_seconds = t0.elapsed().as_secs_f64();
        self.prompt = prompt.to_vec();
        self.generated.clear();
        self.stream = TextStream::new();
        self.pending.clear();
        self.text.clear();
        self.decode_started = None;
        self.decode_seconds = 0.0;
        self.stopped = None;
        Ok(())
    }

    /// Produces the next token, or `None` once the generation has stopped. The step that ends
    /// a generation (stop token, stop string, token or context limit) carries the text held back
    /// until then; after a cancellation, held-back text is dropped.
    pub fn next_step(&mut self) -> Result<Option<Step>> {
        if self.stopped.is_some() {
            return Ok(None);
        }
        if self.cancel.is_cancelled() {
            self.stopped = Some(StopReason::Cancelled);
            return Ok(None);
        }
        if self.generated.len() >= self.params.max_tokens {
            self.stopped = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        let started = *self.decode_started.get_or_insert_with(Instant::now);
        if let Some(&last) = self.generated.last() {
            self.logits = self.session.feed(&[last])?;
        }
        let token = self.sampler.sample(&self.logits, self.session.tokens());
        self.generated.push(token);
        let mut text = if self.params.stop_tokens.contains(&token) {
            self.stopped = Some(StopReason::Eos);
            String::new()
        } else {
            self.take_text(token)?
        };
        if self.stopped.is_none() && self.generated.len() >= self.params.max_tokens {
            self.stopped = Some(StopReason::MaxTokens);
        }
        let full = |l: usize| self.session.len() + 1 > l;
        if self.stopped.is_none() && self.session.context_limit().is_some_and(full) {
            self.stopped = Some(StopReason::ContextFull);
        }
        if self.stopped.is_some_and(|r| r != StopReason::StopString) {
            text.push_str(&self.flush_pending()?);
        }
        self.decode_seconds = started.elapsed().as_secs_f64();
        Ok(Some(Step { token, text }))
    }

    /// An iterator over the steps of the generation started by [`start`](Self::start).
    pub fn steps(&mut self) -> Steps<'_, 'm> {
        Steps { generator: self }
    }

    /// Runs a whole generation after `prompt`, calling `on_step` for each token (it may stop the
    /// generation), and returns its summary.
    pub fn generate(
        &mut self,
        prompt: &[i64],
        mut on_step: impl FnMut(&Step) -> Flow,
    ) -> Result<Generation> {
        self.start(prompt)?;
        while let Some(step) = self.next_step()? {
            if on_step(&step) == Flow::Stop && self.stopped.is_none() {
                self.stopped = Some(StopReason::Cancelled);
            }
        }
        Ok(self.summary())
    }

    /// What was generated so far (after the generation stopped: all of it).
    pub fn summary(&self) -> Generation {
        Generation {
            prompt_ids: self.prompt.clone(),
            generated_ids: self.generated.clone(),
            text: self.text.clone(),
            stop_reason: self.stopped.unwrap_or(StopReason::MaxTokens),
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session, holding the prompt and the generated tokens but the last (whose logits were
    /// never needed); feed it with the next prompt to continue.
    pub fn into_session(self) -> Session {
        self.session
    }

    /// The text `token` completes, minus what may be the start of a stop string.
    fn take_text(&mut self, token: i64) -> Result<String> {
        let Some(tokenizer) = self.model.tokenizer() else {
            return Ok(String::new());
        };
        let piece = self.stream.push(tokenizer, token)?;
        self.pending.push_str(&piece);
        if let Some(at) = self
            .params
            .stop_strings
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            self.text.push_str(&out);
            self.stopped = Some(StopReason::StopString);
            return Ok(out);
        }
        let keep = self
            .params
            .stop_strings
            .iter()
            .map(|s| partial_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..out.len());
        self.text.push_str(&out);
        Ok(out)
    }

    /// Emits what was held back, at the end of a generation.
    fn flush_pending(&mut self) -> Result<String> {
        if self.model.tokenizer().is_none() {
            return Ok(String::new());
        }
        if let Some(tokenizer) = self.model.tokenizer() {
            let rest = self.stream.finish(tokenizer)?;
            self.pending.push_str(&rest);
        }
        let out = std::mem::take(&mut self.pending);
        self.text.push_str(&out);
        Ok(out)
    }
}

/// The longest suffix of `text` that is a proper prefix of `stop` (in bytes, at a char boundary).
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

/// The steps of a generation, as an iterator.
pub struct Steps<'g, 'm> {
    generator: &'g mut Generator<'m>,
}

impl Iterator for Steps<'_, '_> {
    type Item = Result<Step>;

    fn next(&mut self) -> Option<Result<Step>> {
        self.generator.next_step().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn partial_suffix_by_hand() {
        assert_eq!(partial_suffix("hello <|e", "<|end|>"), 3);
        assert_eq!(partial_suffix("hello", "<|end|>"), 0);
        assert_eq!(partial_suffix("ab<", "<|end|>"), 1);
        // a whole match is not partial: found by the caller's search
        assert_eq!(partial_suffix("x<|end|>", "<|end|>"), 0);
        assert_eq!(partial_suffix("日本", "本語"), "本".len());
    }
}
