//! Replays a routing (a trace's, or uniformly random) against the expert cache without running
//! the model: the same [`ExpertCache`] code, with stand-in experts of the pack's in-memory sizes,
//! at any budget and eviction policy. Hit rates and bytes read per token come out exactly as a
//! single-threaded run would count them, in a fraction of a second, so a budget and a policy can
//! be chosen for a device before running anything on it.

use std::sync::Arc;

use super::cache::{CacheStats, EvictionPolicy, ExpertCache};
use crate::error::{Error, Result};
use crate::moe::expert::ExpertFfn;

/// One call of one MoE block: the experts its tokens selected (a decoded token's top-k, or the
/// union over a prompt's tokens), each fetched once, in ascending order as the block does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockCall {
    /// The block's index among the model's MoE blocks (the pack's layer order).
    pub block: usize,
    pub experts: Vec<usize>,
}

/// What the replay is run with.
#[derive(Debug, Clone)]
pub struct CacheSimulation<'a> {
    /// In-memory bytes of each expert, per block.
    pub expert_bytes: &'a [Vec<u64>],
    pub budget: u64,
    pub policy: EvictionPolicy,
    /// Frequency policies' half-life in requests.
    pub half_life_requests: u64,
    /// Experts kept resident (`--pin-hot`), as (block, expert).
    pub kept: &'a [(u32, u32)],
}

struct StandIn;

impl ExpertFfn for StandIn {
    fn forward(&self, _: &[f32], _: usize, _: &mut [f32]) {}
}

/// Replays `calls` in order and returns the cache's counters.
pub fn simulate_cache(calls: &[BlockCall], sim: &CacheSimulation) -> Result<CacheStats> {
    let layers = sim.expert_bytes.len();
    let cache = ExpertCache::with_half_life(sim.budget, layers, sim.policy, sim.half_life_requests);
    let size = |b: usize, e: usize| sim.expert_bytes.get(b).and_then(|l| l.get(e)).copied();
    if !sim.kept.is_empty() {
        let (kept, largest_other) =
            super::cache::kept_and_largest_other(sim.kept, sim.expert_bytes);
        cache.keep_resident(sim.kept, kept, largest_other)?;
    }
    for call in calls {
        for &e in &call.experts {
            let bytes = size(call.block, e).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "the routing names expert {e} of block {}, which the model does not have",
                    call.block
                ))
            })?;
            if bytes > sim.budget {
                return Err(Error::InvalidInput(format!(
                    "an expert of {bytes} bytes does not fit a {}-byte budget",
                    sim.budget
                )));
            }
            let expert = cache.get(call.block as u32, e as u32, bytes, || {
                Ok(Arc::new(StandIn) as Arc<dyn ExpertFfn>)
            })?;
            drop(expert);
        }
    }
    Ok(cache.stats())
}

/// Uniformly random routing: `tokens` decoded tokens, each choosing `top_k[b]` distinct experts
/// of block `b` at random (xorshift from `seed`), block after block.
pub fn uniform_routing(
    tokens: usize,
    experts: &[usize],
    top_k: &[usize],
    seed: u64,
) -> Vec<BlockCall> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut calls = Vec::with_capacity(tokens * experts.len());
    for _ in 0..tokens {
        for (b, (&n, &k)) in experts.iter().zip(top_k).enumerate() {
            let mut chosen: Vec<usize> = Vec::with_capacity(k);
            while chosen.len() < k.min(n) {
                let e = (next() % n as u64) as usize;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            chosen.sort_unstable();
            calls.push(BlockCall {
                block: b,
                experts: chosen,
            });
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(bytes: &[Vec<u64>], budget: u64, policy: EvictionPolicy) -> CacheSimulation<'_> {
        CacheSimulation {
            expert_bytes: bytes,
            budget,
            policy,
            half_life_requests: 64,
            kept: &[],
        }
    }

    /// Two blocks of 4 experts of 10 bytes, room for 6: a repeated cycle over both blocks'
    /// experts 0 and 1 fits (4 experts) and hits after the first round; the counts are by hand.
    #[test]
    fn a_working_set_that_fits_misses_once_per_expert() {
        let bytes = vec![vec![10; 4]; 2];
        let calls: Vec<BlockCall> = (0..5)
            .flat_map(|_| {
                (0..2).map(|b| BlockCall {
                    block: b,
                    experts: vec![0, 1],
                })
            })
            .collect();
        for policy in EvictionPolicy::ALL {
            let s = simulate_cache(&calls, &sim(&bytes, 60, policy)).unwrap();
            assert_eq!((s.misses, s.hits, s.evictions), (4, 16, 0), "{policy:?}");
            assert_eq!(s.bytes_loaded, 40);
        }
    }

    /// One block, room for 3 experts; expert 0 every fourth request, between them a scan of
    /// experts used once (which can never hit, so every hit is expert 0's). LRU loses expert 0
    /// before each return; the decayed counts keep it from its second use on (the first eviction
    /// is a tie of single uses, broken by recency as LRU does).
    #[test]
    fn frequency_keeps_a_hot_expert_that_a_scan_pushes_out_of_lru() {
        let bytes = vec![vec![10; 41]];
        let calls: Vec<BlockCall> = (0..40)
            .map(|i| BlockCall {
                block: 0,
                experts: vec![if i % 4 == 0 { 0 } else { 1 + i }],
            })
            .collect();
        let hits_on_0 = |policy| {
            let s = simulate_cache(&calls, &sim(&bytes, 30, policy)).unwrap();
            assert!(s.peak_resident_bytes <= 30);
            s.hits
        };
        // 10 uses of expert 0: missed at uses 1 and 2, kept for the 8 after
        assert_eq!(hits_on_0(EvictionPolicy::Lru), 0);
        assert_eq!(hits_on_0(EvictionPolicy::Frequency), 8);
        assert_eq!(hits_on_0(EvictionPolicy::LayerCycleFrequency), 8);
    }

    #[test]
    fn uniform_routing_chooses_k_distinct_experts_per_block() {
        let calls = uniform_routing(50, &[8, 4], &[2, 4], 7);
        assert_eq!(calls.len(), 100);
        for (i, c) in calls.iter().enumerate() {
            assert_eq!(c.block, i % 2);
            let k = if c.block == 0 { 2 } else { 4 };
            assert_eq!(c.experts.len(), k);
            assert!(c.experts.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(calls, uniform_routing(50, &[8, 4], &[2, 4], 7));
        assert_ne!(calls, uniform_routing(50, &[8, 4], &[2, 4], 8));
    }

    #[test]
    fn unknown_experts_and_oversized_experts_are_refused() {
        let bytes = vec![vec![10; 2]];
        let call = |e| {
            vec![BlockCall {
                block: 0,
                experts: vec![e],
            }]
        };
        let err = simulate_cache(&call(5), &sim(&bytes, 30, EvictionPolicy::Lru)).unwrap_err();
        assert!(err.to_string().contains("expert 5 of block 0"), "{err}");
        let err = simulate_cache(&call(0), &sim(&bytes, 5, EvictionPolicy::Lru)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
