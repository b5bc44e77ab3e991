//! The sparse MoE forward pass: route every token, group tokens by expert, run each selected
//! expert once over all of its tokens, and combine the results with the routing weights.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use super::routing::route;
use super::spec::MoeSpec;
use super::store::{dot, matmul_wt, ExpertStore, SharedExpert};
use crate::error::{Error, Result};

/// One MoE block, ready to run: router, routed experts (behind a store) and shared expert.
#[derive(Debug)]
pub struct MoeLayer {
    pub spec: MoeSpec,
    /// Router weights `[experts, hidden]`.
    pub router: Vec<f32>,
    pub experts: Arc<dyn ExpertStore>,
    pub shared: Option<SharedExpert>,
    usage: Vec<AtomicU64>,
}

/// Per-call routing facts, for traces and statistics.
#[derive(Debug, Clone, Default)]
pub struct MoeStats {
    /// Number of tokens routed to each expert in this call.
    pub tokens_per_expert: Vec<u32>,
}

impl MoeLayer {
    pub fn new(
        spec: MoeSpec,
        router: Vec<f32>,
        experts: Arc<dyn ExpertStore>,
        shared: Option<SharedExpert>,
    ) -> Result<Self> {
        if router.len() != spec.experts * spec.hidden {
            return Err(Error::InvalidInput(format!(
                "layer {}: router has {} values, expected {} experts x {} hidden",
                spec.layer,
                router.len(),
                spec.experts,
                spec.hidden
            )));
        }
        if experts.len() != spec.experts {
            return Err(Error::InvalidInput(format!(
                "layer {}: store holds {} experts, block has {}",
                spec.layer,
                experts.len(),
                spec.experts
            )));
        }
        if spec.top_k == 0 || spec.top_k > spec.experts {
            return Err(Error::InvalidInput(format!(
                "layer {}: top-k {} with {} experts",
                spec.layer, spec.top_k, spec.experts
            )));
        }
        let usage = (0..spec.experts).map(|_| AtomicU64::new(0)).collect();
        Ok(MoeLayer {
            spec,
            router,
            experts,
            shared,
            usage,
        })
    }

    /// How many token slots each expert has served since the layer was built.
    pub fn usage(&self) -> Vec<u64> {
        self.usage
            .iter()
            .map(|u| u.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs the block over `x[tokens, hidden]` and returns `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, MoeStats)> {
        let h = self.spec.hidden;
        if x.len() % h != 0 {
            return Err(Error::InvalidInput(format!(
                "layer {}: input of {} values is not a multiple of hidden size {h}",
                self.spec.layer,
                x.len()
            )));
        }
        let tokens = x.len() / h;
        let e_count = self.spec.experts;

        // 1. router logits and per-token choices
        let mut logits = vec![0f32; tokens * e_count];
        matmul_wt(x, tokens, h, &self.router, e_count, &mut logits);
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_count];
        let k = self.spec.top_k;
        let mut choices = Vec::with_capacity(tokens * k);
        let mut choice = Vec::with_capacity(k);
        for t in 0..tokens {
            route(
                &logits[t * e_count..(t + 1) * e_count],
                k,
                self.spec.routing,
                &mut choice,
            );
            for &(e, w) in &choice {
                groups[e].push((t, w));
            }
            choices.extend_from_slice(&choice);
        }
        let stats = MoeStats {
            tokens_per_expert: groups.iter().map(|g| g.len() as u32).collect(),
        };
        for (u, g) in self.usage.iter().zip(&groups) {
            u.fetch_add(g.len() as u64, Ordering::Relaxed);
        }

        // 2. each selected expert once over its gathered rows (experts with no token are never fetched)
        let selected: Vec<(usize, &Vec<(usize, f32)>)> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect();
        let results: Vec<Result<(usize, Vec<f32>)>> = selected
            .par_iter()
            .map(|&(e, group)| {
                let expert = self.experts.expert(e)?;
                let mut rows = Vec::with_capacity(group.len() * h);
                for &(t, _) in group {
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
        for (t, token_choices) in choices.chunks_exact(k).enumerate() {
            let dst = &mut out[t * h..(t + 1) * h];
            for &(e, w) in token_choices {
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
            super::store::ExpertFfn::forward(&shared.ffn, x, tokens, &mut y);
            for t in 0..tokens {
                let g = 1.0 / (1.0 + (-dot(&x[t * h..(t + 1) * h], &shared.gate)).exp());
                for (d, v) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&y[t * h..(t + 1) * h])
                {
                    *d += g * v;
                }
            }
        }
        Ok((out, stats))
    }
}
