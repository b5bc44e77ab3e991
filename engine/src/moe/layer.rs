//! The sparse MoE forward pass: route every token, group tokens by expert, run each selected
//! expert once over all of its tokens, and combine the results with the routing weights.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use super::expert::{dot, sigmoid, ExpertFfn};
use super::observer::{RoutedTokens, RoutingObserver};
use super::router::Router;
use super::spec::MoeSpec;
use super::store::{ExpertStore, SharedExpert};
use crate::error::{Error, Result};

/// One MoE block, ready to run: router, routed experts (behind a store) and shared expert.
/// Shared by every session of a model; what a session observes is passed per call.
#[derive(Debug)]
pub struct MoeLayer {
    pub spec: MoeSpec,
    /// Index of the block in the model's op table (the graph node's `index` attribute).
    pub index: usize,
    pub router: Router,
    pub experts: Arc<dyn ExpertStore>,
    pub shared: Option<SharedExpert>,
    /// Expert slots routed so far (token x expert pairs that ran), and the ones the learnt
    /// top-k chose that adaptive top-k skipped.
    pub routed_slots: AtomicU64,
    pub skipped_slots: AtomicU64,
    /// The next MoE block's router and experts, when prefetching: decode steps apply that
    /// router to this block's input and hint its store with the experts it predicts.
    pub(crate) lookahead: std::sync::RwLock<Option<Lookahead>>,
}

/// What a block needs to predict the next block's experts.
#[derive(Debug, Clone)]
pub(crate) struct Lookahead {
    pub router: Router,
    pub experts: Arc<dyn ExpertStore>,
}

/// Calls of at most this many tokens predict the next block's experts (decode steps; a long
/// prompt's union would name most experts).
const LOOKAHEAD_MAX_TOKENS: usize = 4;

/// Who watches a call, and where the call's tokens sit in the sequence.
#[derive(Clone, Copy)]
pub struct CallContext<'a> {
    pub observer: Option<&'a dyn RoutingObserver>,
    pub first_position: usize,
}

impl MoeLayer {
    pub fn new(
        spec: MoeSpec,
        index: usize,
        router: Vec<f32>,
        router_bias: Option<Vec<f32>>,
        experts: Arc<dyn ExpertStore>,
        shared: Option<SharedExpert>,
    ) -> Result<Self> {
        let in_layer = |e: Error| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("layer {}: {m}", spec.layer)),
            other => other,
        };
        let router = Router::new(
            router,
            router_bias,
            spec.routing,
            spec.top_k,
            spec.experts,
            spec.hidden,
        )
        .map_err(in_layer)?;
        if experts.len() != spec.experts {
            return Err(Error::InvalidInput(format!(
                "layer {}: store holds {} experts, block has {}",
                spec.layer,
                experts.len(),
                spec.experts
            )));
        }
        Ok(MoeLayer {
            spec,
            index,
            router,
            experts,
            shared,
            routed_slots: AtomicU64::new(0),
            skipped_slots: AtomicU64::new(0),
            lookahead: std::sync::RwLock::new(None),
        })
    }

    /// Runs the block over `x[tokens, hidden]` and returns `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32], ctx: CallContext<'_>) -> Result<Vec<f32>> {
        let h = self.spec.hidden;
        if !x.len().is_multiple_of(h) {
            return Err(Error::InvalidInput(format!(
                "layer {}: input of {} values is not a multiple of hidden size {h}",
                self.spec.layer,
                x.len()
            )));
        }
        let tokens = x.len() / h;
        let e_count = self.spec.experts;

        // 1. per-token choices (their number may vary by token), grouped by expert
        let choices = self.router.choose(x, tokens);
        self.routed_slots
            .fetch_add(choices.choices.len() as u64, Ordering::Relaxed);
        self.skipped_slots
            .fetch_add(choices.skipped as u64, Ordering::Relaxed);
        if let Some(observer) = ctx.observer {
            let resident: Option<Vec<bool>> =
                (0..e_count).map(|e| self.experts.resident(e)).collect();
            observer.on_routing(&RoutedTokens {
                block: self.index,
                layer: self.spec.layer,
                first_position: ctx.first_position,
                choices: &choices,
                input: x,
                resident: resident.as_deref(),
            });
        }
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); e_count];
        for t in 0..tokens {
            for &(e, _) in choices.token(t) {
                groups[e].push(t);
            }
        }

        // 2. each selected expert once over its gathered rows (experts with no token are never fetched)
        let selected: Vec<(usize, &Vec<usize>)> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect();
        let wanted: Vec<usize> = selected.iter().map(|(e, _)| *e).collect();
        self.experts.prefetch(&wanted);
        if tokens <= LOOKAHEAD_MAX_TOKENS {
            let lookahead = self.lookahead.read().unwrap_or_else(|e| e.into_inner());
            if let Some(next) = lookahead.as_ref() {
                // the next block's router on this block's input: its choices for the same
                // tokens agree largely with the ones it will make (`moe-edge profile`'s
                // `predicted` measures how much)
                let predicted = next.router.choose(x, tokens);
                let mut next_wanted: Vec<usize> =
                    predicted.choices.iter().map(|&(e, _)| e).collect();
                next_wanted.sort_unstable();
                next_wanted.dedup();
                next.experts.prefetch(&next_wanted);
            }
        }
        let results: Vec<Result<(usize, Vec<f32>)>> = selected
            .par_iter()
            .map(|&(e, group)| {
                let expert = self.experts.expert(e)?;
                let mut rows = Vec::with_capacity(group.len() * h);
                for &t in group {
                    rows.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                let mut y = vec![0f32; group.len() * h];
                expert.forward(&rows, group.len(), &mut y);
                Ok((e, y))
            })
            .collect();

        // 3. weighted combine, in the order of each token's choices as the reference does
        let mut out = vec![0f32; tokens * h];
        let mut per_expert: Vec<Option<Vec<f32>>> = vec![None; e_count];
        for r in results {
            let (e, y) = r?;
            per_expert[e] = Some(y);
        }
        let mut cursor = vec![0usize; e_count];
        for t in 0..tokens {
            let dst = &mut out[t * h..(t + 1) * h];
            for &(e, w) in choices.token(t) {
                let y = per_expert[e]
                    .as_ref()
                    .expect("expert output present for a routed expert");
                let row = &y[cursor[e] * h..(cursor[e] + 1) * h];
                cursor[e] += 1;
                for (d, v) in dst.iter_mut().zip(row) {
                    *d += w * v;
                }
            }
        }

        // 4. shared expert, gated per token
        if let Some(shared) = &self.shared {
            let mut y = vec![0f32; tokens * h];
            shared.ffn.forward(x, tokens, &mut y);
            for t in 0..tokens {
                let g = sigmoid(dot(&x[t * h..(t + 1) * h], &shared.gate));
                for (d, v) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[t * h..(t + 1) * h])
                {
                    *d += g * v;
                }
            }
        }
        Ok(out)
    }
}
