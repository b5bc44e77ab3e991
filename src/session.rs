//! A conversation with a model: prefill a prompt, then feed one token at a time. KV-cache
//! graphs keep their cache in tract state, so a step only runs the new token; graphs without a
//! cache re-run the whole sequence (correct, but slower).

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::model::{Model, Plan};

pub struct Session {
    plan: Arc<Plan>,
    state: TypedSimpleState,
    kv_cache: bool,
    tokens: Vec<i64>,
}

impl Session {
    pub fn new(model: &Model) -> Result<Session> {
        let plan = model.plan(1)?;
        let state = plan
            .runnable
            .spawn()
            .map_err(Error::tract("starting a session"))?;
        Ok(Session {
            plan,
            state,
            kv_cache: model.has_kv_cache(),
            tokens: vec![],
        })
    }

    /// Appends `ids` to the conversation and returns the logits of the last position.
    pub fn feed(&mut self, ids: &[i64]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidInput("no tokens to feed".into()));
        }
        let (logits, vocab) = if self.kv_cache {
            let out = self.plan.run(&mut self.state, ids, 1, self.tokens.len())?;
            self.tokens.extend_from_slice(ids);
            out
        } else {
            self.tokens.extend_from_slice(ids);
            let mut fresh = self
                .plan
                .runnable
                .spawn()
                .map_err(Error::tract("starting a run"))?;
            match self.plan.run(&mut fresh, &self.tokens, 1, 0) {
                Ok(out) => out,
                Err(e) => {
                    self.tokens.truncate(self.tokens.len() - ids.len());
                    return Err(e);
                }
            }
        };
        if vocab == 0 || logits.len() < vocab {
            return Err(Error::UnsupportedGraph(
                "the model returned empty logits".into(),
            ));
        }
        Ok(logits[logits.len() - vocab..].to_vec())
    }

    /// Every token fed so far.
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }
}
