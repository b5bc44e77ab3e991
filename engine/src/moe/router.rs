//! The router: per-token logits from the router weights (and bias), turned into each token's
//! (expert, weight) choices.

use super::expert::{matmul_wt, sigmoid};
use super::spec::Routing;
use crate::error::{Error, Result};

/// A block's router: `logits = x . W^T (+ bias)`, then [`route`].
#[derive(Debug, Clone)]
pub struct Router {
    /// `[experts, hidden]`
    pub weights: Vec<f32>,
    /// `[experts]`, added to the logits.
    pub bias: Option<Vec<f32>>,
    pub routing: Routing,
    pub top_k: usize,
    experts: usize,
    hidden: usize,
}

/// Every token's choices: token `t` chose `choices[offsets[t]..offsets[t + 1]]`.
#[derive(Debug, Clone, Default)]
pub struct Choices {
    pub offsets: Vec<usize>,
    pub choices: Vec<(usize, f32)>,
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
            experts,
            hidden,
        })
    }

    /// Routes `x[tokens, hidden]`.
    pub fn choose(&self, x: &[f32], tokens: usize) -> Choices {
        let e_count = self.experts;
        let mut logits = vec![0f32; tokens * e_count];
        matmul_wt(x, tokens, self.hidden, &self.weights, e_count, &mut logits);
        let mut out = Choices {
            offsets: Vec::with_capacity(tokens + 1),
            choices: Vec::with_capacity(tokens * self.top_k),
        };
        out.offsets.push(0);
        let mut one = Vec::with_capacity(self.top_k);
        for row in logits.chunks_exact_mut(e_count) {
            if let Some(b) = &self.bias {
                for (l, b) in row.iter_mut().zip(b) {
                    *l += b;
                }
            }
            route(row, self.top_k, self.routing, &mut one);
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
