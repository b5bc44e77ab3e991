//! A conversation that keeps its session between turns: each turn renders the whole history with
//! the chat template, keeps the KV cache of the longest prefix it shares with what the session
//! already holds (cutting the cache back when the history was edited), and feeds only the rest.
//!
//! Context policy: when the rendered history does not fit the model's context
//! (`max_position_embeddings`, with room for one generated token), the oldest turns after the
//! system message are dropped until it fits; if the last message alone does not fit, the turn
//! fails with [`Error::ContextFull`]. A reply stops at the model's EOS, at the template's
//! end-of-turn token, at the caller's stop tokens and strings, or when the context is full.

use std::sync::Arc;

use crate::chat::template::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::generate::{CancelHandle, Flow, GenerateParams, Generation, Generator, Step};
use crate::model::Model;
use crate::moe::RoutingObserver;
use crate::session::Session;
use crate::tokenizer::Tokenizer;

/// A chat with a model.
///
/// ```no_run
/// use moe_edge_engine::{Conversation, Flow, GenerateParams, LoadOptions, Model};
/// let model = Model::load("models/tiny-mixtral".as_ref(), LoadOptions::default())?;
/// let mut chat = Conversation::new(&model)?;
/// chat.set_system("Answer briefly.");
/// let reply = chat.reply("What does tar do?", GenerateParams::for_model(&model, 64), |step| {
///     print!("{}", step.text);
///     Flow::Continue
/// })?;
/// // the next turn feeds only the new tokens
/// chat.reply("And gzip?", GenerateParams::for_model(&model, 64), |_| Flow::Continue)?;
/// # Ok::<(), moe_edge_engine::Error>(())
/// ```
pub struct Conversation<'m> {
    model: &'m Model,
    template: &'m ChatTemplate,
    tokenizer: &'m Tokenizer,
    session: Option<Session>,
    messages: Vec<ChatMessage>,
    end_of_turn: Vec<i64>,
    last_prefill: usize,
    cancel: CancelHandle,
    observer: Option<Arc<dyn RoutingObserver>>,
}

impl<'m> Conversation<'m> {
    /// A conversation with `model`, which needs a tokenizer and a chat template.
    pub fn new(model: &'m Model) -> Result<Self> {
        let tokenizer = model
            .tokenizer()
            .ok_or_else(|| Error::Tokenizer("chat needs the model's tokenizer.json".into()))?;
        let template = model.chat_template().ok_or_else(|| Error::Template {
            file: model.path().display().to_string(),
            message: "the model has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)".into(),
        })?;
        let end_of_turn = template.end_of_turn_tokens(tokenizer)?;
        Ok(Conversation {
            model,
            template,
            tokenizer,
            session: Some(Session::new(model)?),
            messages: vec![],
            end_of_turn,
            last_prefill: 0,
            cancel: CancelHandle::default(),
            observer: None,
        })
    }

    /// Sets (or replaces) the system message at the start of the history.
    pub fn set_system(&mut self, text: &str) {
        let system = ChatMessage::new("system", text);
        match self.messages.first_mut() {
            Some(m) if m.role == "system" => *m = system,
            _ => self.messages.insert(0, system),
        }
    }

    /// Forgets every message but the system message (the cache is reused as far as it matches).
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }

    /// The history.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Replaces the history (an edited conversation): the next turn keeps the cache of the
    /// prefix the new history shares with the old.
    pub fn set_messages(&mut self, messages: Vec<ChatMessage>) {
        self.messages = messages;
    }

    /// Tokens the template ends a turn with (and the model's EOS): a reply stops at them.
    pub fn end_of_turn_tokens(&self) -> &[i64] {
        &self.end_of_turn
    }

    /// Stops the reply being generated, from any thread (the next turn starts anew).
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// How many prompt tokens the last turn fed (the rest came from the cache).
    pub fn last_prefill_tokens(&self) -> usize {
        self.last_prefill
    }

    /// Hands the routing of every MoE block call of the conversation to `observer` (or stops),
    /// including sessions it starts anew after a failed turn.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn RoutingObserver>>) {
        if let Some(session) = self.session.as_mut() {
            session.set_observer(observer.clone());
        }
        self.observer = observer;
    }

    /// The session (its tokens are the rendered history and the last reply).
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Adds a user message and generates the assistant's reply, which joins the history. When
    /// the turn fails, the user message is taken back out, so the history stays well-formed.
    pub fn reply(
        &mut self,
        user: &str,
        params: GenerateParams,
        on_step: impl FnMut(&Step) -> Flow,
    ) -> Result<Generation> {
        self.messages.push(ChatMessage::new("user", user));
        let result = self.respond(params, on_step);
        if result.is_err() && self.messages.last().is_some_and(|m| m.role == "user") {
            self.messages.pop();
        }
        result
    }

    /// Generates the assistant's reply to the history as it is.
    pub fn respond(
        &mut self,
        mut params: GenerateParams,
        on_step: impl FnMut(&Step) -> Flow,
    ) -> Result<Generation> {
        let prompt = self.fitting_prompt()?;
        let mut session = match self.session.take() {
            Some(s) => s,
            None => {
                let mut session = Session::new(self.model)?;
                session.set_observer(self.observer.clone());
                session
            }
        };
        let common = session
            .tokens()
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // at least one token is fed, for the logits of the next one
        let keep = common.min(prompt.len() - 1);
        session.truncate(keep)?;
        for &t in &self.end_of_turn {
            if !params.stop_tokens.contains(&t) {
                params.stop_tokens.push(t);
            }
        }
        let mut generator = Generator::with_session(self.model, session, params)?;
        generator.set_cancel_handle(self.cancel.clone());
        let result = generator.generate(&prompt[keep..], on_step);
        match result {
            Ok(generation) => {
                self.session = Some(generator.into_session());
                self.last_prefill = prompt.len() - keep;
                self.messages
                    .push(ChatMessage::new("assistant", &generation.text));
                Ok(generation)
            }
            // the session may hold part of a turn: the next one starts from a fresh session
            Err(e) => Err(e),
        }
    }

    /// The rendered history with the assistant's header, as token ids, after dropping the
    /// oldest turns that do not fit the context. The history changes only when it fits.
    fn fitting_prompt(&mut self) -> Result<Vec<i64>> {
        let mut messages = self.messages.clone();
        let first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
        loop {
            let text = self.template.render(&messages, true)?;
            let ids = self.tokenizer.encode_raw(&text)?;
            if ids.is_empty() {
                return Err(Error::InvalidInput("the rendered prompt is empty".into()));
            }
            let limit = match self.model.context_limit() {
                Some(limit) if ids.len() >= limit => limit,
                _ => {
                    self.messages = messages;
                    return Ok(ids);
                }
            };
            if messages.len() <= first + 1 {
                return Err(Error::ContextFull {
                    limit,
                    needed: ids.len() + 1,
                });
            }
            log::info!(
                "the conversation ({} tokens) does not fit the context of {limit}: dropping its oldest turn",
                ids.len()
            );
            messages.remove(first);
            // a user/assistant pair goes together
            if messages.len() > first + 1 && messages[first].role == "assistant" {
                messages.remove(first);
            }
        }
    }
}
