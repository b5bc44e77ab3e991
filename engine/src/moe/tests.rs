//! The sparse MoE forward pass against a hand-written per-token reference: random routers and
//! experts, several k and routings, tied router scores, batches where some experts get no token
//! and some get all, router and expert biases, clamped SwiGLU. The observer must see exactly the
//! choices the reference routing makes.

// The reference is written as plain index loops on purpose: it must not share code or tricks with the op.
#![allow(clippy::needless_range_loop)]

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::moe::expert::{DenseExpert, Expert, ExpertBias, ExpertFfn, F32Matrix};
use crate::moe::layer::{CallContext, MoeLayer};
use crate::moe::store::{ExpertStore, F32ExpertStore, SharedExpert};
use crate::moe::{Activation, MoeSpec, RoutedTokens, Routing, RoutingObserver};

const H: usize = 24;
const F: usize = 10;

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn random_expert(rng: &mut StdRng, f: usize) -> DenseExpert {
    DenseExpert::silu_gated(
        H,
        f,
        randn(rng, f * H, 0.3),
        randn(rng, f * H, 0.3),
        randn(rng, H * f, 0.3),
    )
    .unwrap()
}

/// An expert with biases and GPT-OSS's clamped SwiGLU.
fn random_biased_expert(rng: &mut StdRng, f: usize, activation: Activation) -> DenseExpert {
    Expert::new(
        F32Matrix::new(f, H, randn(rng, f * H, 0.5)).unwrap(),
        F32Matrix::new(f, H, randn(rng, f * H, 0.5)).unwrap(),
        F32Matrix::new(H, f, randn(rng, H * f, 0.3)).unwrap(),
        Some(ExpertBias {
            gate: randn(rng, f, 0.5),
            up: randn(rng, f, 0.5),
            down: randn(rng, H, 0.5),
        }),
        activation,
    )
    .unwrap()
}

/// Store that records which experts the op asked for, and which it announced.
#[derive(Debug)]
struct RecordingStore {
    inner: F32ExpertStore,
    touched: Mutex<Vec<usize>>,
    prefetched: Mutex<Vec<usize>>,
}

impl ExpertStore for RecordingStore {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>> {
        assert!(
            self.prefetched.lock().unwrap().contains(&index),
            "expert {index} asked for before being announced"
        );
        self.touched.lock().unwrap().push(index);
        self.inner.expert(index)
    }
    fn prefetch(&self, experts: &[usize]) {
        self.prefetched.lock().unwrap().extend_from_slice(experts);
    }
}

/// Each token's (expert, weight) choices.
type TokenChoices = Vec<Vec<(usize, f32)>>;

/// Observer that records every call: layer, first position, choices.
#[derive(Default)]
struct RecordingObserver {
    calls: Mutex<Vec<(usize, usize, TokenChoices)>>,
}

impl RoutingObserver for RecordingObserver {
    fn on_routing(&self, routed: &RoutedTokens<'_>) {
        let tokens = (0..routed.tokens())
            .map(|t| routed.token(t).to_vec())
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push((routed.layer, routed.first_position, tokens));
    }
}

/// Naive reference: per token, per selected expert, plain loops.
/// The reference output, and each token's (expert, weight) choices.
fn reference(
    x: &[f32],
    case: &Case,
    k: usize,
    routing: Routing,
) -> (Vec<f32>, Vec<Vec<(usize, f32)>>) {
    let (router, experts, shared) = (&case.router, &case.experts, case.shared.as_ref());
    let e_count = experts.len();
    let tokens = x.len() / H;
    let mut out = vec![0f32; x.len()];
    let mut chosen = vec![];
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
    let ffn = |e: &DenseExpert, xt: &[f32]| -> Vec<f32> {
        let f = e.gate.rows;
        let mut act = vec![0f32; f];
        for i in 0..f {
            let (mut g, mut u) = (0f32, 0f32);
            for j in 0..H {
                g += e.gate.values[i * H + j] * xt[j];
                u += e.up.values[i * H + j] * xt[j];
            }
            if let Some(b) = &e.bias {
                g += b.gate[i];
                u += b.up[i];
            }
            act[i] = match e.activation {
                Activation::SiluGated => silu(g) * u,
                Activation::ClampedSwiGlu { alpha, limit } => {
                    let g = if g > limit { limit } else { g };
                    let u = if u > limit {
                        limit
                    } else if u < -limit {
                        -limit
                    } else {
                        u
                    };
                    (u + 1.0) * g * sigmoid(alpha * g)
                }
            };
        }
        (0..H)
            .map(|o| {
                let bias = e.bias.as_ref().map_or(0.0, |b| b.down[o]);
                bias + (0..f)
                    .map(|i| e.down.values[o * f + i] * act[i])
                    .sum::<f32>()
            })
            .collect()
    };
    for t in 0..tokens {
        let xt = &x[t * H..(t + 1) * H];
        let logits: Vec<f32> = (0..e_count)
            .map(|e| {
                let bias = case.router_bias.as_ref().map_or(0.0, |b| b[e]);
                bias + (0..H).map(|j| router[e * H + j] * xt[j]).sum::<f32>()
            })
            .collect();
        let softmax = |v: &[f32]| -> Vec<f32> {
            let m = v.iter().cloned().fold(f32::MIN, f32::max);
            let s: f32 = v.iter().map(|a| (a - m).exp()).sum();
            v.iter().map(|a| (a - m).exp() / s).collect()
        };
        let scores = match routing {
            Routing::TopKSoftmax => logits.clone(),
            Routing::SoftmaxTopK { .. } => softmax(&logits),
            Routing::SigmoidTopK { .. } => logits.iter().map(|&l| sigmoid(l)).collect(),
        };
        let mut idx: Vec<usize> = (0..e_count).collect();
        idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
        idx.truncate(k);
        let mut w: Vec<f32> = idx.iter().map(|&e| scores[e]).collect();
        match routing {
            Routing::TopKSoftmax => w = softmax(&w),
            Routing::SoftmaxTopK { renormalize: true }
            | Routing::SigmoidTopK { renormalize: true } => {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            }
            Routing::SoftmaxTopK { renormalize: false }
            | Routing::SigmoidTopK { renormalize: false } => {}
        }
        chosen.push(idx.iter().copied().zip(w.iter().copied()).collect());
        for (&e, &we) in idx.iter().zip(&w) {
            for (o, y) in ffn(&experts[e], xt).into_iter().enumerate() {
                out[t * H + o] += we * y;
            }
        }
        if let Some(s) = shared {
            let g = sigmoid((0..H).map(|j| s.gate[j] * xt[j]).sum::<f32>());
            for (o, y) in ffn(&s.ffn, xt).into_iter().enumerate() {
                out[t * H + o] += g * y;
            }
        }
    }
    (out, chosen)
}

struct Case {
    experts: Vec<DenseExpert>,
    router: Vec<f32>,
    router_bias: Option<Vec<f32>>,
    shared: Option<SharedExpert>,
}

/// What a call of the layer did.
struct Run {
    y: Vec<f32>,
    /// Experts fetched, sorted.
    touched: Vec<usize>,
    /// Tokens per expert, from the observer.
    counts: Vec<u32>,
    /// Each token's choices, as the observer saw them.
    observed: Vec<Vec<(usize, f32)>>,
}

fn run_case(case: &Case, x: &[f32], k: usize, routing: Routing) -> Run {
    let e_count = case.experts.len();
    let spec = MoeSpec {
        layer: 5,
        hidden: H,
        ffn: F,
        experts: e_count,
        top_k: k,
        routing,
        activation: case.experts[0].activation,
        shared_ffn: case.shared.as_ref().map(|s| s.ffn.ffn()),
        router_bias: case.router_bias.is_some(),
        expert_bias: case.experts[0].bias.is_some(),
    };
    let store = Arc::new(RecordingStore {
        inner: F32ExpertStore::new(case.experts.clone()),
        touched: Mutex::new(vec![]),
        prefetched: Mutex::new(vec![]),
    });
    let layer = MoeLayer::new(
        spec,
        2,
        case.router.clone(),
        case.router_bias.clone(),
        store.clone(),
        case.shared.clone(),
    )
    .unwrap();
    let observer = RecordingObserver::default();
    let ctx = CallContext {
        observer: Some(&observer),
        first_position: 40,
    };
    let y = layer.forward(x, ctx).unwrap();
    let mut touched = store.touched.lock().unwrap().clone();
    touched.sort();
    let mut prefetched = store.prefetched.lock().unwrap().clone();
    prefetched.sort();
    assert_eq!(
        prefetched, touched,
        "the experts announced are the ones run"
    );
    let mut calls = observer.calls.into_inner().unwrap();
    assert_eq!(calls.len(), 1, "one observer call per forward pass");
    let (layer_seen, position, observed) = calls.pop().unwrap();
    assert_eq!((layer_seen, position), (5, 40));
    let mut counts = vec![0u32; e_count];
    for token in &observed {
        for &(e, _) in token {
            counts[e] += 1;
        }
    }
    Run {
        y,
        touched,
        counts,
        observed,
    }
}

/// Runs a case and checks output and observed routing against the reference.
fn check_case(case: &Case, x: &[f32], k: usize, routing: Routing, what: &str) -> Run {
    let run = run_case(case, x, k, routing);
    let (want, chosen) = reference(x, case, k, routing);
    assert_close(&run.y, &want, what);
    assert_eq!(run.observed.len(), chosen.len(), "{what}: observed tokens");
    for (t, (seen, want)) in run.observed.iter().zip(&chosen).enumerate() {
        let experts: Vec<usize> = seen.iter().map(|c| c.0).collect();
        let want_experts: Vec<usize> = want.iter().map(|c| c.0).collect();
        assert_eq!(experts, want_experts, "{what}: token {t} experts");
        for (a, b) in seen.iter().zip(want) {
            assert!(
                (a.1 - b.1).abs() < 1e-6,
                "{what}: token {t} weights {seen:?} vs {want:?}"
            );
        }
    }
    run
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "{what}: max abs diff {d}");
}

const ROUTINGS: [Routing; 5] = [
    Routing::SoftmaxTopK { renormalize: true },
    Routing::SoftmaxTopK { renormalize: false },
    Routing::TopKSoftmax,
    Routing::SigmoidTopK { renormalize: true },
    Routing::SigmoidTopK { renormalize: false },
];

#[test]
fn random_blocks_match_reference_for_several_k() {
    let mut rng = StdRng::seed_from_u64(1234);
    for &e_count in &[4usize, 8, 13] {
        let case = Case {
            experts: (0..e_count).map(|_| random_expert(&mut rng, F)).collect(),
            router: randn(&mut rng, e_count * H, 1.0),
            router_bias: None,
            shared: None,
        };
        for k in [1, 2, 4, e_count] {
            for routing in ROUTINGS {
                for tokens in [1usize, 3, 17] {
                    let x = randn(&mut rng, tokens * H, 1.0);
                    let what = format!("E={e_count} k={k} {routing} T={tokens}");
                    let run = check_case(&case, &x, k.min(e_count), routing, &what);
                    // each selected expert fetched exactly once, unselected ones never
                    let selected: Vec<usize> =
                        (0..e_count).filter(|&e| run.counts[e] > 0).collect();
                    assert_eq!(run.touched, selected);
                    assert_eq!(
                        run.counts.iter().sum::<u32>() as usize,
                        tokens * k.min(e_count)
                    );
                }
            }
        }
    }
}

#[test]
fn tied_router_scores_pick_lower_indices() {
    let mut rng = StdRng::seed_from_u64(7);
    let e_count = 6;
    // experts 1, 3 and 4 have identical router rows: their scores tie for every token
    let mut router = randn(&mut rng, e_count * H, 0.1);
    let strong = randn(&mut rng, H, 2.0);
    for e in [1, 3, 4] {
        router[e * H..(e + 1) * H].copy_from_slice(&strong);
    }
    let case = Case {
        experts: (0..e_count).map(|_| random_expert(&mut rng, F)).collect(),
        router,
        router_bias: None,
        shared: None,
    };
    // inputs aligned with the strong row so the tied experts win
    let x: Vec<f32> = (0..5)
        .flat_map(|t| strong.iter().map(move |v| v * (1.0 + t as f32 * 0.1)))
        .collect();
    for routing in ROUTINGS {
        let run = check_case(&case, &x, 2, routing, &format!("ties {routing}"));
        assert_eq!(
            run.counts,
            vec![0, 5, 0, 5, 0, 0],
            "{routing}: ties go to the lower indices"
        );
    }
}

#[test]
fn some_experts_get_every_token_and_others_none() {
    let mut rng = StdRng::seed_from_u64(99);
    let e_count = 8;
    let mut router = randn(&mut rng, e_count * H, 0.05);
    // experts 2 and 6 respond strongly to a positive mean, which every token has
    for e in [2, 6] {
        for j in 0..H {
            router[e * H + j] = 1.0 + 0.1 * e as f32;
        }
    }
    let shared = SharedExpert {
        ffn: random_expert(&mut rng, 7),
        gate: randn(&mut rng, H, 0.5),
    };
    let case = Case {
        experts: (0..e_count).map(|_| random_expert(&mut rng, F)).collect(),
        router,
        router_bias: None,
        shared: Some(shared),
    };
    let x: Vec<f32> = randn(&mut rng, 9 * H, 0.5)
        .into_iter()
        .map(|v| v + 1.0)
        .collect();
    for routing in ROUTINGS {
        let run = check_case(&case, &x, 2, routing, &format!("all-or-nothing {routing}"));
        assert_eq!(run.counts, vec![0, 0, 9, 0, 0, 0, 9, 0]);
        assert_eq!(
            run.touched,
            vec![2, 6],
            "experts with no tokens are never fetched"
        );
    }
}

#[test]
fn biases_and_clamped_swiglu_match_reference() {
    let mut rng = StdRng::seed_from_u64(2024);
    let e_count = 6;
    // limit 1.5 with weights and biases of this size clamps a good share of gate and up values
    let activation = Activation::ClampedSwiGlu {
        alpha: 1.702,
        limit: 1.5,
    };
    for activation in [activation, Activation::SiluGated] {
        let case = Case {
            experts: (0..e_count)
                .map(|_| random_biased_expert(&mut rng, F, activation))
                .collect(),
            router: randn(&mut rng, e_count * H, 1.0),
            router_bias: Some(randn(&mut rng, e_count, 2.0)),
            shared: None,
        };
        for routing in ROUTINGS {
            for tokens in [1usize, 7] {
                let x = randn(&mut rng, tokens * H, 1.0);
                check_case(
                    &case,
                    &x,
                    2,
                    routing,
                    &format!("{activation} {routing} T={tokens}"),
                );
            }
        }
    }
}

#[test]
fn layer_rejects_inconsistent_shapes() {
    let mut rng = StdRng::seed_from_u64(1);
    let experts: Vec<DenseExpert> = (0..4).map(|_| random_expert(&mut rng, F)).collect();
    let spec = MoeSpec {
        layer: 3,
        hidden: H,
        ffn: F,
        experts: 4,
        top_k: 2,
        routing: ROUTINGS[0],
        activation: Activation::SiluGated,
        shared_ffn: None,
        router_bias: false,
        expert_bias: false,
    };
    let store = Arc::new(F32ExpertStore::new(experts));
    let layer = |spec: &MoeSpec, router: usize, bias: Option<Vec<f32>>| {
        MoeLayer::new(
            spec.clone(),
            0,
            vec![0.0; router * H],
            bias,
            store.clone(),
            None,
        )
    };
    assert!(layer(&spec, 3, None).is_err());
    assert!(layer(&spec, 4, Some(vec![0.0; 3])).is_err());
    let k5 = MoeSpec {
        top_k: 5,
        ..spec.clone()
    };
    assert!(layer(&k5, 4, None).is_err());
    let ok = layer(&spec, 4, None).unwrap();
    let ctx = CallContext {
        observer: None,
        first_position: 0,
    };
    let err = ok.forward(&[0.0; H + 1], ctx).unwrap_err();
    assert!(err.to_string().contains("layer 3"), "{err}");
}
