//! Router: turn one token's logits into its top-k (expert, weight) pairs.

use super::spec::Routing;

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
                let sum: f32 = out.iter().map(|(_, w)| w).sum();
                for (_, w) in out.iter_mut() {
                    *w /= sum;
                }
            }
        }
        Routing::TopKSoftmax => {
            top_k(logits, k, out);
            let selected: Vec<f32> = out.iter().map(|(_, w)| *w).collect();
            for ((_, w), p) in out.iter_mut().zip(softmax(&selected)) {
                *w = p;
            }
        }
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
