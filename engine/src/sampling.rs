//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, with
//! an optional repetition penalty and a fixed seed.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen by this (1.0 = off),
    /// as in the CTRL paper and Hugging Face's `repetition_penalty`.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Each parameter within its range (finite numbers only), or an error naming the first
    /// that is not.
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str, value: f32, range: &str| {
            Err(Error::InvalidInput(format!(
                "{what} must be {range}, got {value}"
            )))
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p, "in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "the repetition penalty",
                self.repetition_penalty,
                "a finite number > 0",
            );
        }
        Ok(())
    }
}

/// A seeded sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Picks the next token given the logits of the last position and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[i64]) -> i64 {
        let mut logits = logits.to_vec();
        if self.params.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize).filter(|_| seen.insert(t)) {
                    *l = if *l > 0.0 {
                        *l / self.params.repetition_penalty
                    } else {
                        *l * self.params.repetition_penalty
                    };
                }
            }
        }
        if self.params.temperature <= 0.0 {
            return argmax(&logits) as i64;
        }
        let mut candidates: Vec<(usize, f32)> = logits
            .iter()
            .map(|&l| l / self.params.temperature)
            .enumerate()
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.params.top_p
                })
                .map(|i| i + 1)
                .unwrap_or(probs.len());
            probs.truncate(keep);
            candidates.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r: f32 = self.rng.random();
        let mut cumulative = 0.0;
        for (c, p) in candidates.iter().zip(&probs) {
            cumulative += p;
            if r < cumulative {
                return c.0 as i64;
            }
        }
        candidates.last().map(|c| c.0 as i64).unwrap_or(0)
    }
}

/// Index of the largest value (the first one on ties).
pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_parameters_are_named() {
        let p = SamplingParams::default;
        for (params, says) in [
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..p()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..p()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..p()
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..p() }, "top-p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..p()
                },
                "top-p",
            ),
            (SamplingParams { top_p: 1.5, ..p() }, "top-p"),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..p()
                },
                "repetition penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..p()
                },
                "repetition penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..p()
                },
                "repetition penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::INFINITY,
                    ..p()
                },
                "repetition penalty",
            ),
        ] {
            let err = params.check().unwrap_err();
            assert!(err.to_string().contains(says), "{params:?}: {err}");
        }
        assert!(SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..p()
        }
        .check()
        .is_ok());
    }

    #[test]
    fn greedy_is_argmax_and_penalty_applies() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // 2.0 / 2 = 1.0 < 1.9
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&logits, &[]), argmax(&logits) as i64);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<i64> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<i64> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.84, 0.11, 0.04, ...]: top_p 0.5 keeps only the first
        let logits = [5.0, 3.0, 2.0, -5.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        });
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 0));
        // with top_p 1.0 the others do show up
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        });
        assert!((0..200).any(|_| s.sample(&logits, &[]) != 0));
    }
}
