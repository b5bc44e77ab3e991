//! A conversation with a model: feed tokens, get the logits of the last one. KV-cache graphs
//! keep their cache in tract state, so a step only runs the new tokens, and the cache can be cut
//! back to a prefix; graphs without a cache re-run the whole sequence (correct, but slower).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_transformers::ops::dyn_kv_cache::DynKeyValueCacheState;

use crate::error::{Error, Result};
use crate::model::{Model, Plan};
use crate::moe::RoutingObserver;
use crate::ops::set_session_routing;

#[cfg(test)]
mod tests;

/// One sequence's state over a [`Model`]: the tokens fed so far and their KV cache.
///
/// ```no_run
/// # use moe_edge_engine::{LoadOptions, Model, Session};
/// let model = Model::load("models/tiny-mixtral".as_ref(), LoadOptions::default())?;
/// let mut session = Session::new(&model)?;
/// let logits = session.feed(&[10, 20, 30])?; // prefill: logits of the last position
/// let logits = session.feed(&[42])?;         // one decode step, using the KV cache
/// session.truncate(2)?;                      // keep the first two tokens' cache
/// # Ok::<(), moe_edge_engine::Error>(())
/// ```
pub struct Session {
    plan: Arc<Plan>,
    state: TypedSimpleState,
    kv_cache: bool,
    tokens: Vec<i64>,
    limit: Option<usize>,
    vocab: Option<usize>,
    observer: Option<Arc<dyn RoutingObserver>>,
}

impl Session {
    pub fn new(model: &Model) -> Result<Session> {
        let plan = model.plan(1)?;
        let state = spawn(&plan)?;
        Ok(Session {
            plan,
            state,
            kv_cache: model.has_kv_cache(),
            tokens: vec![],
            limit: model.context_limit(),
            vocab: model.vocab_size(),
            observer: None,
        })
    }

    /// Appends `ids` to the sequence and returns the logits of the last position.
    pub fn feed(&mut self, ids: &[i64]) -> Result<Vec<f32>> {
        let (logits, vocab) = self.feed_all(ids)?;
        Ok(logits[logits.len() - vocab..].to_vec())
    }

    /// Appends `ids` to the sequence and returns the logits of each of them (`[ids.len(),
    /// vocab]`; for graphs without a KV cache, of every position of the sequence) and the
    /// vocabulary size.
    pub fn feed_all(&mut self, ids: &[i64]) -> Result<(Vec<f32>, usize)> {
        crate::threads::on_pool(|| self.feed_on_pool(ids))
    }

    fn feed_on_pool(&mut self, ids: &[i64]) -> Result<(Vec<f32>, usize)> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("no tokens to feed".into()));
        }
        crate::model::check_token_ids(ids, self.vocab)?;
        let needed = self.tokens.len() + ids.len();
        if let Some(limit) = self.limit.filter(|&l| needed > l) {
            return Err(Error::ContextFull { limit, needed });
        }
        let (logits, vocab) = if self.kv_cache {
            set_session_routing(&mut self.state, self.observer.as_ref(), self.tokens.len());
            let out = self.plan.run(&mut self.state, ids, 1, self.tokens.len())?;
            self.tokens.extend_from_slice(ids);
            out
        } else {
            // the whole sequence runs again: the observer sees every position again
            let mut all = self.tokens.clone();
            all.extend_from_slice(ids);
            let mut fresh = spawn(&self.plan)?;
            set_session_routing(&mut fresh, self.observer.as_ref(), 0);
            let out = self.plan.run(&mut fresh, &all, 1, 0);
            self.plan.retire(fresh);
            self.tokens = all;
            out?
        };
        if vocab == 0 || logits.len() < vocab {
            return Err(Error::UnsupportedGraph(
                "the model returned empty logits".into(),
            ));
        }
        Ok((logits, vocab))
    }

    /// Every token fed so far.
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }

    /// How many tokens the session holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The most tokens the session can hold (the model's `max_position_embeddings`), if known.
    pub fn context_limit(&self) -> Option<usize> {
        self.limit
    }

    /// Keeps the first `len` tokens and their KV cache, forgetting the rest: feeding continues
    /// from position `len` without running the kept tokens again.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.tokens.len() {
            return Ok(());
        }
        if len == 0 {
            return self.reset();
        }
        if self.kv_cache {
            for s in self.state.op_states.iter_mut().flatten() {
                if let Some(kv) = s.downcast_mut::<DynKeyValueCacheState>() {
                    kv.truncate(len)
                        .map_err(Error::tract("truncating the KV cache"))?;
                }
            }
            set_session_routing(&mut self.state, self.observer.as_ref(), len);
        }
        self.tokens.truncate(len);
        Ok(())
    }

    /// Forgets every token.
    pub fn reset(&mut self) -> Result<()> {
        let old = std::mem::replace(&mut self.state, spawn(&self.plan)?);
        self.plan.retire(old);
        set_session_routing(&mut self.state, self.observer.as_ref(), 0);
        self.tokens.clear();
        Ok(())
    }

    /// Hands the routing of every MoE block call of this session to `observer` (or stops).
    pub fn set_observer(&mut self, observer: Option<Arc<dyn RoutingObserver>>) {
        self.observer = observer;
        let position = if self.kv_cache { self.tokens.len() } else { 0 };
        set_session_routing(&mut self.state, self.observer.as_ref(), position);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // the state itself is dropped after this, freeing this thread's scratch
        self.plan
            .release_pool_scratch(crate::ops::session_of(&self.state));
    }
}

fn spawn(plan: &Arc<Plan>) -> Result<TypedSimpleState> {
    plan.runnable
        .spawn()
        .map_err(Error::tract("starting a session"))
}
