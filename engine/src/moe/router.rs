//! The router: per-token logits from the router weights (and bias), turned into each token's
//! (expert, weight) choices.

use super::expert::{matmul_wt, sigmoid};
use super::spec::Routing;
use crate::error::{Error, Result};

/// A block's router: `logits = x . W^T (+ bias)`, experts outside `allowed` masked out, then
/// [`route`], then the run-time [`AdaptiveTopK`] (off unless asked for).
#[derive(Debug, Clone)]
pub struct Router {
    /// `[experts, hidden]`
    pub weights: Vec<f32>,
    /// `[experts]`, added to the logits.
    pub bias: Option<Vec<f32>>,
    pub routing: Routing,
    pub top_k: usize,
    pub adaptive: AdaptiveTopK,
    /// Per expert, whether the router may choose it (`None`: all may). A masked expert's logit is
    /// -inf: it is never chosen and the routing is computed over the others alone, as if the
    /// block had been trained without it (softmax over the allowed experts, renormalised or not
    /// as the block's routing is). Set by [`Router::restrict`].
    allowed: Option<Vec<bool>>,
    experts: usize,
    hidden: usize,
}

/// Every token's choices: token `t` chose `choices[offsets[t]..offsets[t + 1]]`.
#[derive(Debug, Clone, Default)]
pub struct Choices {
    pub offsets: Vec<usize>,
    pub choices: Vec<(usize, f32)>,
    /// Experts the learnt top-k chose that [`AdaptiveTopK`] skipped.
    pub skipped: usize,
}

/// Run-time changes to the learnt top-k (adaptive top-k): a chosen expert whose weight is too
/// small to matter is skipped, and the weights of the kept experts are rescaled so that they sum
/// to what all the chosen weights summed to (the block's output keeps its scale; with
/// renormalised routing they sum to 1 again). The router's first choice is always kept.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdaptiveTopK {
    /// Skip a chosen expert whose combination weight is below this.
    pub min_weight: Option<f32>,
    /// Keep the fewest experts, in the router's order, whose weights reach this share of the
    /// chosen weights' sum.
    pub top_p: Option<f32>,
}

impl AdaptiveTopK {
    pub fn is_off(&self) -> bool {
        self.min_weight.is_none() && self.top_p.is_none()
    }

    /// Checks the values: a minimum weight in [0, 1], a top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = self.min_weight.filter(|w| !(0.0..=1.0).contains(w)) {
            return Err(Error::InvalidInput(format!(
                "minimum expert weight {w} is outside [0, 1]"
            )));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(Error::InvalidInput(format!(
                "expert top-p {p} is outside (0, 1]"
            )));
        }
        Ok(())
    }

    /// Drops the experts of one token's choices (router order, highest first) that the settings
    /// skip and rescales the rest; returns how many were dropped.
    pub fn apply(&self, choices: &mut Vec<(usize, f32)>) -> usize {
        let before = choices.len();
        if before <= 1 || self.is_off() {
            return 0;
        }
        let total: f32 = choices.iter().map(|(_, w)| w).sum();
        let mut keep = before;
        if let Some(p) = self.top_p {
            let mut reached = 0.0;
            for (i, (_, w)) in choices.iter().enumerate() {
                reached += w;
                if reached >= p * total {
                    keep = i + 1;
                    break;
                }
            }
        }
        if let Some(min) = self.min_weight {
            keep = keep.min(
                1 + choices[1..keep]
                    .iter()
                    .take_while(|(_, w)| *w >= min)
                    .count(),
            );
        }
        choices.truncate(keep);
        let kept: f32 = choices.iter().map(|(_, w)| w).sum();
        if keep < before && kept > 0.0 {
            for (_, w) in choices.iter_mut() {
                *w *= total / kept;
            }
        }
        before - keep
    }
}

impl Choices {
    pub fn tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn token(&self, t: usize) -> &[(usize, f32)] {
        &self.choices[self.offsets[t]..self.offsets[t + 1]]
    }
}

impl Router {
    pub fn new(
        weights: Vec<f32>,
        bias: Option<Vec<f32>>,
        routing: Routing,
        top_k: usize,
        experts: usize,
        hidden: usize,
    ) -> Result<Self> {
        if weights.len() != experts * hidden {
            return Err(Error::InvalidInput(format!(
                "router has {} values, expected {experts} experts x {hidden} hidden",
                weights.len()
            )));
        }
        if bias.as_ref().is_some_and(|b| b.len() != experts) {
            return Err(Error::InvalidInput(format!(
                "router bias does not have {experts} values"
            )));
        }
        if top_k == 0 || top_k > experts {
            return Err(Error::InvalidInput(format!(
                "top-k {top_k} with {experts} experts"
            )));
        }
        Ok(Router {
            weights,
            bias,
            routing,
            top_k,
            adaptive: AdaptiveTopK::default(),
            allowed: None,
            experts,
            hidden,
        })
    }

    /// Whether the router may choose `expert`.
    pub fn is_allowed(&self, expert: usize) -> bool {
        expert < self.experts && self.allowed.as_ref().is_none_or(|a| a[expert])
    }

    /// Forbids the experts whose `allowed` flag is false, on top of any earlier restriction.
    /// At least top-k experts must stay allowed.
    pub fn restrict(&mut self, allowed: &[bool]) -> Result<()> {
        if allowed.len() != self.experts {
            return Err(Error::InvalidInput(format!(
                "an expert mask of {} experts for a router of {}",
                allowed.len(),
                self.experts
            )));
        }
        let merged: Vec<bool> = (0..self.experts)
            .map(|e| allowed[e] && self.is_allowed(e))
            .collect();
        let left = merged.iter().filter(|a| **a).count();
        if left < self.top_k {
            return Err(Error::InvalidInput(format!(
                "{left} of {} experts left allowed, fewer than the {} each token chooses",
                self.experts, self.top_k
            )));
        }
        self.allowed = (left < self.experts).then_some(merged);
        Ok(())
    }

    /// Routes `x[tokens, hidden]`.
    pub fn choose(&self, x: &[f32], tokens: usize) -> Choices {
        let e_count = self.experts;
        let mut logits = vec![0f32; tokens * e_count];
        matmul_wt(x, tokens, self.hidden, &self.weights, e_count, &mut logits);
        let mut out = Choices {
            offsets: Vec::with_capacity(tokens + 1),
            choices: Vec::with_capacity(tokens * self.top_k),
            skipped: 0,
        };
        out.offsets.push(0);
        let mut one = Vec::with_capacity(self.top_k);
        for row in logits.chunks_exact_mut(e_count) {
            if let Some(b) = &self.bias {
                for (l, b) in row.iter_mut().zip(b) {
                    *l += b;
                }
            }
            if let Some(allowed) = &self.allowed {
                for (l, a) in row.iter_mut().zip(allowed) {
                    if !a {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            route(row, self.top_k, self.routing, &mut one);
            out.skipped += self.adaptive.apply(&mut one);
            out.choices.extend_from_slice(&one);
            out.offsets.push(out.choices.len());
        }
        out
    }
}

/// Selects the `k` experts of one token and their combination weights.
///
/// Ties are broken towards the lower expert index, as ONNX `TopK` specifies. The softmax is
/// computed in f32 with the maximum subtracted, as torch does.
pub fn route(logits: &[f32], k: usize, routing: Routing, out: &mut Vec<(usize, f32)>) {
    out.clear();
    match routing {
        Routing::SoftmaxTopK { renormalize } => {
            let probs = softmax(logits);
            top_k(&probs, k, out);
            if renormalize {
                renormalise(out);
            }
        }
        Routing::TopKSoftmax => {
            top_k(logits, k, out);
            let selected: Vec<f32> = out.iter().map(|(_, w)| *w).collect();
            for ((_, w), p) in out.iter_mut().zip(softmax(&selected)) {
                *w = p;
            }
        }
        Routing::SigmoidTopK { renormalize } => {
            let scores: Vec<f32> = logits.iter().map(|&l| sigmoid(l)).collect();
            top_k(&scores, k, out);
            if renormalize {
                renormalise(out);
            }
        }
    }
}

fn renormalise(out: &mut [(usize, f32)]) {
    let sum: f32 = out.iter().map(|(_, w)| w).sum();
    for (_, w) in out.iter_mut() {
        *w /= sum;
    }
}

/// Numerically stable softmax.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` largest values with their indices, largest first, lower index first on ties.
fn top_k(values: &[f32], k: usize, out: &mut Vec<(usize, f32)>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    out.extend(order.into_iter().take(k).map(|i| (i, values[i])));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_top_k_by_hand() {
        let choices = vec![(3, 0.5f32), (1, 0.3), (7, 0.15), (0, 0.05)];
        let run = |a: AdaptiveTopK| {
            let mut c = choices.clone();
            let dropped = a.apply(&mut c);
            (c, dropped)
        };
        assert_eq!(run(AdaptiveTopK::default()), (choices.clone(), 0));
        // weight >= 0.3 kept: 0.5 and 0.3, rescaled to sum 1.0 (0.625, 0.375)
        let (c, d) = run(AdaptiveTopK {
            min_weight: Some(0.3),
            top_p: None,
        });
        assert_eq!(d, 2);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 1]);
        assert!((c[0].1 - 0.625).abs() < 1e-6 && (c[1].1 - 0.375).abs() < 1e-6);
        // the first choice stays whatever its weight
        let (c, d) = run(AdaptiveTopK {
            min_weight: Some(0.9),
            top_p: None,
        });
        assert_eq!((c, d), (vec![(3, 1.0)], 3));
        // top-p 0.9: 0.5 + 0.3 + 0.15 reaches 0.9 of the sum 1.0
        let (c, d) = run(AdaptiveTopK {
            min_weight: None,
            top_p: Some(0.9),
        });
        assert_eq!(d, 1);
        assert!((c.iter().map(|x| x.1).sum::<f32>() - 1.0).abs() < 1e-6);
        // top-p over weights that sum to 0.5 (no renormalisation): shares of that sum
        let mut half: Vec<(usize, f32)> = choices.iter().map(|&(e, w)| (e, w / 2.0)).collect();
        let a = AdaptiveTopK {
            min_weight: None,
            top_p: Some(0.5),
        };
        assert_eq!(a.apply(&mut half), 3);
        assert_eq!(half, vec![(3, 0.5)], "rescaled to the chosen weights' sum");
        // both: top-p keeps three, the minimum weight two of them
        let (c, d) = run(AdaptiveTopK {
            min_weight: Some(0.2),
            top_p: Some(0.9),
        });
        assert_eq!((c.len(), d), (2, 2));
        assert!(AdaptiveTopK {
            min_weight: Some(1.5),
            top_p: None
        }
        .validate()
        .is_err());
        assert!(AdaptiveTopK {
            min_weight: None,
            top_p: Some(0.0)
        }
        .validate()
        .is_err());
        assert!(AdaptiveTopK {
            min_weight: None,
            top_p: Some(f32::NAN)
        }
        .validate()
        .is_err());
        assert!(AdaptiveTopK {
            min_weight: Some(0.3),
            top_p: Some(1.0)
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn softmax_topk_renormalized_by_hand() {
        // probs of [0, ln 2, ln 3, ln 4] are [1,2,3,4]/10
        let logits = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let mut out = vec![];
        route(
            &logits,
            2,
            Routing::SoftmaxTopK { renormalize: false },
            &mut out,
        );
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!((out[0].1 - 0.4).abs() < 1e-6 && (out[1].1 - 0.3).abs() < 1e-6);
        route(
            &logits,
            2,
            Routing::SoftmaxTopK { renormalize: true },
            &mut out,
        );
        assert!((out[0].1 - 4.0 / 7.0).abs() < 1e-6 && (out[1].1 - 3.0 / 7.0).abs() < 1e-6);
    }

    #[test]
    fn topk_softmax_by_hand() {
        let logits = [1.0, 5.0, 3.0, 5.0 - 2f32.ln()];
        let mut out = vec![];
        route(&logits, 2, Routing::TopKSoftmax, &mut out);
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
        // exp(5) : exp(5 - ln 2) = 2 : 1
        assert!((out[0].1 - 2.0 / 3.0).abs() < 1e-6 && (out[1].1 - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_topk_by_hand() {
        // sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4
        let logits = [0.0, 3f32.ln(), -(3f32.ln())];
        let mut out = vec![];
        route(
            &logits,
            2,
            Routing::SigmoidTopK { renormalize: false },
            &mut out,
        );
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((out[0].1 - 0.75).abs() < 1e-6 && (out[1].1 - 0.5).abs() < 1e-6);
        route(
            &logits,
            2,
            Routing::SigmoidTopK { renormalize: true },
            &mut out,
        );
        assert!((out[0].1 - 0.6).abs() < 1e-6 && (out[1].1 - 0.4).abs() < 1e-6);
    }

    #[test]
    fn router_bias_shifts_the_choice() {
        // x = [1, 0]: logits [1, 2, 0] + bias [2, 0, 0] = [3, 2, 0]
        let r = Router::new(
            vec![1.0, 0.0, 2.0, 0.0, 0.0, 0.0],
            Some(vec![2.0, 0.0, 0.0]),
            Routing::TopKSoftmax,
            1,
            3,
            2,
        )
        .unwrap();
        let c = r.choose(&[1.0, 0.0], 1);
        assert_eq!(c.token(0), &[(0, 1.0)]);
    }

    #[test]
    fn a_masked_expert_is_never_chosen_and_the_rest_are_routed_as_without_it() {
        // x = [1]: logits [3, 2, 1, 0]; expert 0 (the best) masked
        let mut r = Router::new(
            vec![3.0, 2.0, 1.0, 0.0],
            None,
            Routing::SoftmaxTopK { renormalize: false },
            2,
            4,
            1,
        )
        .unwrap();
        r.restrict(&[false, true, true, true]).unwrap();
        let c = r.choose(&[1.0], 1);
        // softmax over [2, 1, 0] alone: e^2, e^1 over e^2 + e + 1
        let z = 2f32.exp() + 1f32.exp() + 1.0;
        let got = c.token(0);
        assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((got[0].1 - 2f32.exp() / z).abs() < 1e-6);
        assert!((got[1].1 - 1f32.exp() / z).abs() < 1e-6);
        // restrictions add up; fewer than top-k left is refused and changes nothing
        r.restrict(&[true, true, false, true]).unwrap();
        assert_eq!(
            r.choose(&[1.0], 1)
                .token(0)
                .iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(r.restrict(&[true, true, true, false]).is_err());
        assert!(r.restrict(&[true; 3]).is_err());
        assert!(r.is_allowed(3) && !r.is_allowed(0) && !r.is_allowed(9));
        // sigmoid and top-k-then-softmax routings skip it too
        for routing in [
            Routing::SigmoidTopK { renormalize: true },
            Routing::TopKSoftmax,
        ] {
            let mut r = Router::new(vec![3.0, 2.0, 1.0, 0.0], None, routing, 2, 4, 1).unwrap();
            r.restrict(&[false, true, false, true]).unwrap();
            let c = r.choose(&[1.0], 1);
            assert_eq!(
                c.token(0).iter().map(|p| p.0).collect::<Vec<_>>(),
                vec![1, 3],
                "{routing}"
            );
        }
    }

    #[test]
    fn ties_prefer_lower_index() {
        let logits = [0.5, 0.5, 0.5, 0.1];
        let mut out = vec![];
        route(
            &logits,
            2,
            Routing::SoftmaxTopK { renormalize: true },
            &mut out,
        );
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((out[0].1 - 0.5).abs() < 1e-7);
    }
}
