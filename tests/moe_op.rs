//! The sparse MoE op against a hand-written per-token reference: random routers and experts,
//! several k, tied router scores, and batches where some experts get no token and some get all.

// The reference is written as plain index loops on purpose: it must not share code or tricks with the op.
#![allow(clippy::needless_range_loop)]

use std::sync::{Arc, Mutex};

use moe_edge::moe::forward::MoeLayer;
use moe_edge::moe::{
    Activation, DenseExpert, ExpertFfn, ExpertStore, F32ExpertStore, MoeSpec, Routing, SharedExpert,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const H: usize = 24;
const F: usize = 10;

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn random_expert(rng: &mut StdRng, f: usize) -> DenseExpert {
    DenseExpert::new(
        H,
        f,
        randn(rng, f * H, 0.3),
        randn(rng, f * H, 0.3),
        randn(rng, H * f, 0.3),
    )
    .unwrap()
}

/// Store that records which experts the op asked for.
#[derive(Debug)]
struct RecordingStore {
    inner: F32ExpertStore,
    touched: Mutex<Vec<usize>>,
}

impl ExpertStore for RecordingStore {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn expert(&self, index: usize) -> moe_edge::Result<Arc<dyn ExpertFfn>> {
        self.touched.lock().unwrap().push(index);
        self.inner.expert(index)
    }
    fn to_dense(&self, index: usize) -> moe_edge::Result<DenseExpert> {
        self.inner.to_dense(index)
    }
}

/// Naive reference: per token, per selected expert, plain loops.
fn reference(
    x: &[f32],
    router: &[f32],
    experts: &[DenseExpert],
    shared: Option<&SharedExpert>,
    k: usize,
    routing: Routing,
) -> Vec<f32> {
    let e_count = experts.len();
    let tokens = x.len() / H;
    let mut out = vec![0f32; x.len()];
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let ffn = |e: &DenseExpert, xt: &[f32]| -> Vec<f32> {
        let mut act = vec![0f32; e.ffn];
        for i in 0..e.ffn {
            let (mut g, mut u) = (0f32, 0f32);
            for j in 0..H {
                g += e.gate[i * H + j] * xt[j];
                u += e.up[i * H + j] * xt[j];
            }
            act[i] = silu(g) * u;
        }
        (0..H)
            .map(|o| (0..e.ffn).map(|i| e.down[o * e.ffn + i] * act[i]).sum())
            .collect()
    };
    for t in 0..tokens {
        let xt = &x[t * H..(t + 1) * H];
        let logits: Vec<f32> = (0..e_count)
            .map(|e| (0..H).map(|j| router[e * H + j] * xt[j]).sum())
            .collect();
        let softmax = |v: &[f32]| -> Vec<f32> {
            let m = v.iter().cloned().fold(f32::MIN, f32::max);
            let s: f32 = v.iter().map(|a| (a - m).exp()).sum();
            v.iter().map(|a| (a - m).exp() / s).collect()
        };
        let scores = match routing {
            Routing::TopKSoftmax => logits.clone(),
            Routing::SoftmaxTopK { .. } => softmax(&logits),
        };
        let mut idx: Vec<usize> = (0..e_count).collect();
        idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
        idx.truncate(k);
        let mut w: Vec<f32> = idx.iter().map(|&e| scores[e]).collect();
        match routing {
            Routing::TopKSoftmax => w = softmax(&w),
            Routing::SoftmaxTopK { renormalize: true } => {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            }
            Routing::SoftmaxTopK { renormalize: false } => {}
        }
        for (&e, &we) in idx.iter().zip(&w) {
            for (o, y) in ffn(&experts[e], xt).into_iter().enumerate() {
                out[t * H + o] += we * y;
            }
        }
        if let Some(s) = shared {
            let g = 1.0 / (1.0 + (-(0..H).map(|j| s.gate[j] * xt[j]).sum::<f32>()).exp());
            for (o, y) in ffn(&s.ffn, xt).into_iter().enumerate() {
                out[t * H + o] += g * y;
            }
        }
    }
    out
}

struct Case {
    experts: Vec<DenseExpert>,
    router: Vec<f32>,
    shared: Option<SharedExpert>,
}

fn run_case(
    case: &Case,
    x: &[f32],
    k: usize,
    routing: Routing,
) -> (Vec<f32>, Vec<usize>, Vec<u32>) {
    let e_count = case.experts.len();
    let spec = MoeSpec {
        layer: 0,
        hidden: H,
        ffn: F,
        experts: e_count,
        top_k: k,
        routing,
        activation: Activation::SiluGated,
        shared_ffn: None,
    };
    let store = Arc::new(RecordingStore {
        inner: F32ExpertStore::new(case.experts.clone()),
        touched: Mutex::new(vec![]),
    });
    let layer = MoeLayer::new(
        spec,
        case.router.clone(),
        store.clone(),
        case.shared.clone(),
    )
    .unwrap();
    let (y, stats) = layer.forward(x).unwrap();
    let mut touched = store.touched.lock().unwrap().clone();
    touched.sort();
    (y, touched, stats.tokens_per_expert)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "{what}: max abs diff {d}");
}

const ROUTINGS: [Routing; 3] = [
    Routing::SoftmaxTopK { renormalize: true },
    Routing::SoftmaxTopK { renormalize: false },
    Routing::TopKSoftmax,
];

#[test]
fn random_blocks_match_reference_for_several_k() {
    let mut rng = StdRng::seed_from_u64(1234);
    for &e_count in &[4usize, 8, 13] {
        let case = Case {
            experts: (0..e_count).map(|_| random_expert(&mut rng, F)).collect(),
            router: randn(&mut rng, e_count * H, 1.0),
            shared: None,
        };
        for k in [1, 2, 4, e_count] {
            for routing in ROUTINGS {
                for tokens in [1usize, 3, 17] {
                    let x = randn(&mut rng, tokens * H, 1.0);
                    let (y, touched, counts) = run_case(&case, &x, k.min(e_count), routing);
                    assert_close(
                        &y,
                        &reference(
                            &x,
                            &case.router,
                            &case.experts,
                            None,
                            k.min(e_count),
                            routing,
                        ),
                        &format!("E={e_count} k={k} {routing} T={tokens}"),
                    );
                    // each selected expert fetched exactly once, unselected ones never
                    let selected: Vec<usize> = (0..e_count).filter(|&e| counts[e] > 0).collect();
                    assert_eq!(touched, selected);
                    assert_eq!(counts.iter().sum::<u32>() as usize, tokens * k.min(e_count));
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
        shared: None,
    };
    // inputs aligned with the strong row so the tied experts win
    let x: Vec<f32> = (0..5)
        .flat_map(|t| strong.iter().map(move |v| v * (1.0 + t as f32 * 0.1)))
        .collect();
    for routing in ROUTINGS {
        let (y, _, counts) = run_case(&case, &x, 2, routing);
        assert_eq!(
            counts,
            vec![0, 5, 0, 5, 0, 0],
            "{routing}: ties go to the lower indices"
        );
        assert_close(
            &y,
            &reference(&x, &case.router, &case.experts, None, 2, routing),
            &format!("ties {routing}"),
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
        shared: Some(shared),
    };
    let x: Vec<f32> = randn(&mut rng, 9 * H, 0.5)
        .into_iter()
        .map(|v| v + 1.0)
        .collect();
    for routing in ROUTINGS {
        let (y, touched, counts) = run_case(&case, &x, 2, routing);
        assert_eq!(counts, vec![0, 0, 9, 0, 0, 0, 9, 0]);
        assert_eq!(
            touched,
            vec![2, 6],
            "experts with no tokens are never fetched"
        );
        assert_close(
            &y,
            &reference(
                &x,
                &case.router,
                &case.experts,
                case.shared.as_ref(),
                2,
                routing,
            ),
            &format!("all-or-nothing {routing}"),
        );
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
    };
    let store = Arc::new(F32ExpertStore::new(experts));
    assert!(MoeLayer::new(spec.clone(), vec![0.0; 3 * H], store.clone(), None).is_err());
    assert!(MoeLayer::new(
        MoeSpec {
            top_k: 5,
            ..spec.clone()
        },
        vec![0.0; 4 * H],
        store.clone(),
        None
    )
    .is_err());
    let layer = MoeLayer::new(spec, vec![0.0; 4 * H], store, None).unwrap();
    let err = layer.forward(&[0.0; H + 1]).unwrap_err();
    assert!(err.to_string().contains("layer 3"), "{err}");
}
