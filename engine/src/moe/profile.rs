//! Routing profiles: how a model's routers used their experts over some text, per layer and
//! expert, overall and per label (language, domain). A [`ProfileRecorder`] watches sessions as a
//! routing observer and produces a [`RoutingProfile`], the JSON file that `moe-edge profile`
//! writes and that pruning and static routing read.
//!
//! What a layer's entry holds (over the tokens routed under a label):
//! - `chosen[e]`: tokens that chose expert `e`; `token_share[e] = chosen[e] / tokens` (sums to
//!   top-k) and `slot_share[e] = chosen[e] / Σ chosen` (sums to 1);
//! - `mean_weight[e]`: the mean combination weight of `e` when chosen;
//! - `entropy_bits`: the entropy of `slot_share` (log2 of the number of experts when every expert
//!   is used alike, 0 when one expert takes every slot);
//! - `coactivation[a][b]`: tokens that chose both `a` and `b` (the diagonal is `chosen`);
//! - `reuse`: of each token's experts, the share that the previous token of the same sequence
//!   also chose at this layer (what an expert cache keeps hitting on);
//! - `predicted`: of each token's experts, the share that this layer's router picks (its top-k)
//!   when applied to the previous MoE layer's input for the same token: how well the layer can be
//!   prefetched one layer ahead. `None` for the first MoE layer.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::observer::{RoutedTokens, RoutingObserver};
use super::router::Router;
use super::spec::MoeSpec;
use crate::error::{clip, Error, Result};

pub const PROFILE_FORMAT: &str = "moe-edge-profile";
pub const PROFILE_VERSION: u32 = 1;

/// The shape of one MoE layer a profile was recorded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfiledLayer {
    pub layer: usize,
    pub experts: usize,
    pub top_k: usize,
}

/// A ratio with its parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub hits: u64,
    pub total: u64,
    pub rate: f64,
}

impl Ratio {
    fn new(hits: u64, total: u64) -> Self {
        Ratio {
            hits,
            total,
            rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
        }
    }
}

/// One layer's usage (see the module doc for each field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerUsage {
    pub layer: usize,
    pub tokens: u64,
    pub chosen: Vec<u64>,
    pub weight_sum: Vec<f64>,
    pub token_share: Vec<f64>,
    pub slot_share: Vec<f64>,
    pub mean_weight: Vec<f64>,
    pub entropy_bits: f64,
    pub max_entropy_bits: f64,
    pub coactivation: Vec<Vec<u64>>,
    pub reuse: Ratio,
    pub predicted: Option<Ratio>,
}

/// Every layer's usage over the tokens of one label (or of all of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens routed (each routed once per layer).
    pub tokens: u64,
    pub layers: Vec<LayerUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledUsage {
    pub label: String,
    pub usage: Usage,
}

/// A model's routing over some text (the file `moe-edge profile` writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingProfile {
    pub format: String,
    pub version: u32,
    /// The model it was recorded on (as given on the command line).
    pub model: String,
    pub layers: Vec<ProfiledLayer>,
    pub overall: Usage,
    pub labels: Vec<LabelledUsage>,
}

impl RoutingProfile {
    /// Reads and checks a profile file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::files::read_text(path, crate::files::TEXT_LIMIT)?;
        let bad = |why: String| {
            Error::InvalidInput(format!(
                "{} is not a routing profile: {why}",
                path.display()
            ))
        };
        let p: RoutingProfile =
            serde_json::from_str(&text).map_err(|e| bad(clip(&e.to_string())))?;
        if p.format != PROFILE_FORMAT || p.version != PROFILE_VERSION {
            return Err(bad(format!(
                "format {} v{}, expected {PROFILE_FORMAT} v{PROFILE_VERSION}",
                clip(&p.format),
                p.version
            )));
        }
        for u in std::iter::once(&p.overall).chain(p.labels.iter().map(|l| &l.usage)) {
            let fits = u.layers.len() == p.layers.len()
                && u.layers.iter().zip(&p.layers).all(|(l, s)| {
                    l.layer == s.layer
                        && l.chosen.len() == s.experts
                        && l.weight_sum.len() == s.experts
                        && l.slot_share.len() == s.experts
                        && l.token_share.len() == s.experts
                        && l.mean_weight.len() == s.experts
                        && l.coactivation.len() == s.experts
                        && l.coactivation.iter().all(|r| r.len() == s.experts)
                });
            if !fits {
                return Err(bad("its usage tables do not match its layer list".into()));
            }
        }
        Ok(p)
    }

    /// Refuses a profile recorded on a model with other MoE layers than `blocks`.
    pub fn check_fits(&self, blocks: &[MoeSpec]) -> Result<()> {
        let model: Vec<ProfiledLayer> = blocks.iter().map(ProfiledLayer::of).collect();
        if model.len() != self.layers.len() {
            return Err(Error::InvalidInput(format!(
                "the profile (of {}) has {} MoE layers, this model {}",
                clip(&self.model),
                self.layers.len(),
                model.len()
            )));
        }
        for (p, m) in self.layers.iter().zip(&model) {
            if p != m {
                return Err(Error::InvalidInput(format!(
                    "the profile (of {}) does not fit this model: its layer {} has {} experts, top-{}; the model's layer {} has {} experts, top-{}",
                    clip(&self.model),
                    p.layer,
                    p.experts,
                    p.top_k,
                    m.layer,
                    m.experts,
                    m.top_k
                )));
            }
        }
        Ok(())
    }

    /// The usage under `label`, or over everything for `None`.
    pub fn usage(&self, label: Option<&str>) -> Result<&Usage> {
        match label {
            None => Ok(&self.overall),
            Some(name) => self
                .labels
                .iter()
                .find(|l| l.label == name)
                .map(|l| &l.usage)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.labels.iter().map(|l| l.label.as_str()).collect();
                    Error::InvalidInput(format!(
                        "the profile has no label {:?} (it has: {})",
                        clip(name),
                        known.join(", ")
                    ))
                }),
        }
    }
}

impl ProfiledLayer {
    pub fn of(spec: &MoeSpec) -> Self {
        ProfiledLayer {
            layer: spec.layer,
            experts: spec.experts,
            top_k: spec.top_k,
        }
    }
}

impl LayerUsage {
    /// A layer's usage with only the counts of tokens per expert set (for tests of what reads them).
    #[cfg(test)]
    pub(crate) fn with_counts(layer: usize, chosen: Vec<u64>) -> Self {
        let n = chosen.len();
        LayerUsage {
            layer,
            tokens: 0,
            weight_sum: vec![0.0; n],
            token_share: vec![0.0; n],
            slot_share: vec![0.0; n],
            mean_weight: vec![0.0; n],
            entropy_bits: 0.0,
            max_entropy_bits: 0.0,
            coactivation: vec![vec![0; n]; n],
            reuse: Ratio::default(),
            predicted: None,
            chosen,
        }
    }

    /// Experts from most to least used (slots), lower index first on ties.
    pub fn ranked(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.chosen.len()).collect();
        order.sort_by(|&a, &b| self.chosen[b].cmp(&self.chosen[a]).then(a.cmp(&b)));
        order
    }
}

/// Running counts of one layer under one label.
#[derive(Debug, Clone)]
struct LayerCounts {
    tokens: u64,
    chosen: Vec<u64>,
    weight_sum: Vec<f64>,
    coactivation: Vec<u64>,
    reuse: (u64, u64),
    predicted: (u64, u64),
}

impl LayerCounts {
    fn new(experts: usize) -> Self {
        LayerCounts {
            tokens: 0,
            chosen: vec![0; experts],
            weight_sum: vec![0.0; experts],
            coactivation: vec![0; experts * experts],
            reuse: (0, 0),
            predicted: (0, 0),
        }
    }

    fn finish(&self, shape: ProfiledLayer, first: bool) -> LayerUsage {
        let e = shape.experts;
        let slots: u64 = self.chosen.iter().sum();
        let frac = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let slot_share: Vec<f64> = self.chosen.iter().map(|&c| frac(c, slots)).collect();
        let entropy_bits = -slot_share
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|p| p * p.log2())
            .sum::<f64>();
        LayerUsage {
            layer: shape.layer,
            tokens: self.tokens,
            chosen: self.chosen.clone(),
            weight_sum: self.weight_sum.clone(),
            token_share: self.chosen.iter().map(|&c| frac(c, self.tokens)).collect(),
            slot_share,
            mean_weight: self
                .chosen
                .iter()
                .zip(&self.weight_sum)
                .map(|(&c, &w)| if c == 0 { 0.0 } else { w / c as f64 })
                .collect(),
            entropy_bits: entropy_bits.max(0.0),
            max_entropy_bits: (e as f64).log2(),
            coactivation: self
                .coactivation
                .chunks(e.max(1))
                .map(<[u64]>::to_vec)
                .collect(),
            reuse: Ratio::new(self.reuse.0, self.reuse.1),
            predicted: (!first).then(|| Ratio::new(self.predicted.0, self.predicted.1)),
        }
    }

    fn add(&mut self, other: &LayerCounts) {
        self.tokens += other.tokens;
        for (a, b) in self.chosen.iter_mut().zip(&other.chosen) {
            *a += b;
        }
        for (a, b) in self.weight_sum.iter_mut().zip(&other.weight_sum) {
            *a += b;
        }
        for (a, b) in self.coactivation.iter_mut().zip(&other.coactivation) {
            *a += b;
        }
        self.reuse.0 += other.reuse.0;
        self.reuse.1 += other.reuse.1;
        self.predicted.0 += other.predicted.0;
        self.predicted.1 += other.predicted.1;
    }
}

/// What the recorder remembers between calls of one sequence.
#[derive(Debug, Default)]
struct Carry {
    /// Per block: the position and experts of the last token it routed.
    last_token: Vec<Option<(usize, Vec<usize>)>>,
    /// Per block: the first position and input of its last call.
    last_input: Vec<Option<(usize, Vec<f32>)>>,
}

#[derive(Debug)]
struct RecorderState {
    label: usize,
    labels: Vec<(String, Vec<LayerCounts>)>,
    carry: Carry,
}

/// A routing observer that builds a [`RoutingProfile`]. Attach it to the sessions that run the
/// text, call [`ProfileRecorder::begin`] before each sequence, then [`ProfileRecorder::finish`].
#[derive(Debug)]
pub struct ProfileRecorder {
    model: String,
    shapes: Vec<ProfiledLayer>,
    /// Each block's router, to ask what it would choose from the previous block's input.
    routers: Vec<Router>,
    state: Mutex<RecorderState>,
}

impl ProfileRecorder {
    /// A recorder for `model` (named `name` in the profile).
    pub fn new(model: &crate::Model, name: &str) -> Self {
        let routers: Vec<Router> = model.ops.moe.iter().map(|l| l.router.clone()).collect();
        let shapes = model
            .ops
            .moe
            .iter()
            .map(|l| ProfiledLayer::of(&l.spec))
            .collect();
        Self::with_routers(name, shapes, routers)
    }

    pub(crate) fn with_routers(
        name: &str,
        shapes: Vec<ProfiledLayer>,
        routers: Vec<Router>,
    ) -> Self {
        let blocks = shapes.len();
        ProfileRecorder {
            model: name.to_string(),
            shapes,
            routers,
            state: Mutex::new(RecorderState {
                label: 0,
                labels: vec![],
                carry: Carry {
                    last_token: vec![None; blocks],
                    last_input: vec![None; blocks],
                },
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new sequence whose tokens count under `label` (nothing carries over from the
    /// previous sequence).
    pub fn begin(&self, label: &str) {
        let mut st = self.lock();
        self.select(&mut st, label);
        let blocks = self.shapes.len();
        st.carry = Carry {
            last_token: vec![None; blocks],
            last_input: vec![None; blocks],
        };
    }

    fn select(&self, st: &mut RecorderState, label: &str) {
        st.label = match st.labels.iter().position(|(l, _)| l == label) {
            Some(i) => i,
            None => {
                let counts = self
                    .shapes
                    .iter()
                    .map(|s| LayerCounts::new(s.experts))
                    .collect();
                st.labels.push((label.to_string(), counts));
                st.labels.len() - 1
            }
        };
    }

    /// The profile of everything recorded.
    pub fn finish(&self) -> RoutingProfile {
        let st = self.lock();
        let finish = |counts: &[LayerCounts]| Usage {
            tokens: counts.first().map_or(0, |c| c.tokens),
            layers: counts
                .iter()
                .zip(&self.shapes)
                .enumerate()
                .map(|(b, (c, s))| c.finish(*s, b == 0))
                .collect(),
        };
        let mut all: Vec<LayerCounts> = self
            .shapes
            .iter()
            .map(|s| LayerCounts::new(s.experts))
            .collect();
        for (_, counts) in &st.labels {
            for (a, c) in all.iter_mut().zip(counts) {
                a.add(c);
            }
        }
        RoutingProfile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            model: self.model.clone(),
            layers: self.shapes.clone(),
            overall: finish(&all),
            labels: st
                .labels
                .iter()
                .map(|(label, counts)| LabelledUsage {
                    label: label.clone(),
                    usage: finish(counts),
                })
                .collect(),
        }
    }
}

impl RoutingObserver for ProfileRecorder {
    fn on_routing(&self, routed: &RoutedTokens<'_>) {
        let Some(shape) = self.shapes.get(routed.block).copied() else {
            return;
        };
        let mut st = self.lock();
        if st.labels.is_empty() {
            // routed before any `begin`: counted without a label
            self.select(&mut st, "");
        }
        self.record(&mut st, routed, shape);
    }
}

impl ProfileRecorder {
    fn record(&self, st: &mut RecorderState, routed: &RoutedTokens<'_>, shape: ProfiledLayer) {
        let b = routed.block;
        let e_count = shape.experts;
        let tokens = routed.tokens();
        // what this block's router picks from the previous block's input, for the same tokens
        let previous_input = match b.checked_sub(1) {
            Some(prev) => st.carry.last_input[prev]
                .as_ref()
                .filter(|(first, x)| {
                    *first == routed.first_position && x.len() == routed.input.len()
                })
                .map(|(_, x)| x.clone()),
            None => None,
        };
        let predicted = previous_input.map(|x| {
            let mut router = self.routers[b].clone();
            router.adaptive = Default::default();
            router.choose(&x, tokens)
        });
        let label = st.label;
        let counts = &mut st.labels[label].1[b];
        let mut last = st.carry.last_token[b].take();
        for t in 0..tokens {
            let chosen = routed.token(t);
            let position = routed.position(t);
            counts.tokens += 1;
            for (i, &(e, w)) in chosen.iter().enumerate() {
                if e >= e_count {
                    continue;
                }
                counts.chosen[e] += 1;
                counts.weight_sum[e] += f64::from(w);
                for &(f, _) in &chosen[i + 1..] {
                    if f < e_count && f != e {
                        counts.coactivation[e * e_count + f] += 1;
                        counts.coactivation[f * e_count + e] += 1;
                    }
                }
                counts.coactivation[e * e_count + e] += 1;
            }
            let experts: Vec<usize> = chosen.iter().map(|c| c.0).collect();
            if let Some((p, prev)) = &last {
                if p + 1 == position {
                    counts.reuse.1 += experts.len() as u64;
                    counts.reuse.0 += experts.iter().filter(|e| prev.contains(e)).count() as u64;
                }
            }
            if let Some(pred) = &predicted {
                let guess: BTreeSet<usize> = pred.token(t).iter().map(|c| c.0).collect();
                counts.predicted.1 += experts.len() as u64;
                counts.predicted.0 += experts.iter().filter(|e| guess.contains(e)).count() as u64;
            }
            last = Some((position, experts));
        }
        st.carry.last_token[b] = last;
        st.carry.last_input[b] = Some((routed.first_position, routed.input.to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::router::Choices;
    use crate::moe::Routing;

    fn choices(tokens: &[&[(usize, f32)]]) -> Choices {
        let mut c = Choices {
            offsets: vec![0],
            ..Default::default()
        };
        for t in tokens {
            c.choices.extend_from_slice(t);
            c.offsets.push(c.choices.len());
        }
        c
    }

    fn call(
        rec: &ProfileRecorder,
        block: usize,
        first_position: usize,
        tokens: &[&[(usize, f32)]],
        input: &[f32],
    ) {
        let c = choices(tokens);
        rec.on_routing(&RoutedTokens {
            block,
            layer: block * 2 + 1,
            first_position,
            choices: &c,
            input,
            resident: None,
        });
    }

    /// Two layers of 4 experts, top-2, hidden 2; a 3-token call then a 1-token call; every
    /// figure below is counted by hand.
    #[test]
    fn a_crafted_routing_gives_the_counts_by_hand() {
        let shapes = vec![
            ProfiledLayer {
                layer: 1,
                experts: 4,
                top_k: 2,
            },
            ProfiledLayer {
                layer: 3,
                experts: 4,
                top_k: 2,
            },
        ];
        let any = Router::new(vec![0.0; 8], None, Routing::TopKSoftmax, 2, 4, 2).unwrap();
        // layer 3's router: logits [x0, x1, -x0, -x1]
        let second = Router::new(
            vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0],
            None,
            Routing::TopKSoftmax,
            2,
            4,
            2,
        )
        .unwrap();
        let rec = ProfileRecorder::with_routers("crafted", shapes.clone(), vec![any, second]);
        rec.begin("a");
        // layer 1's inputs: from them layer 3's router picks {2,3}, {2,3}, {1,0}, then {3,0}
        let x_a = [-1.0, -1.0, -2.0, -1.0, 1.0, 2.0];
        let x_b = [1.0, -3.0];
        call(
            &rec,
            0,
            0,
            &[
                &[(0, 0.6), (1, 0.4)],
                &[(0, 0.7), (2, 0.3)],
                &[(3, 0.5), (0, 0.5)],
            ],
            &x_a,
        );
        call(
            &rec,
            1,
            0,
            &[
                &[(2, 0.5), (3, 0.5)],
                &[(2, 0.8), (3, 0.2)],
                &[(1, 0.6), (2, 0.4)],
            ],
            &[0.0; 6],
        );
        call(&rec, 0, 3, &[&[(0, 0.9), (1, 0.1)]], &x_b);
        call(&rec, 1, 3, &[&[(2, 0.7), (0, 0.3)]], &[0.0; 2]);
        // a second sequence, under another label: nothing carries over
        rec.begin("b");
        call(&rec, 0, 0, &[&[(1, 0.5), (2, 0.5)]], &[0.0; 2]);
        call(&rec, 1, 0, &[&[(1, 0.5), (2, 0.5)]], &[0.0; 2]);
        let p = rec.finish();
        assert_eq!(p.layers, shapes);
        let a = &p.usage(Some("a")).unwrap().layers;
        assert_eq!(p.usage(Some("a")).unwrap().tokens, 4);
        assert_eq!(a[0].layer, 1);
        assert_eq!(a[0].chosen, vec![4, 2, 1, 1]);
        assert_eq!(a[0].token_share, vec![1.0, 0.5, 0.25, 0.25]);
        assert_eq!(a[0].slot_share, vec![0.5, 0.25, 0.125, 0.125]);
        assert!((a[0].mean_weight[0] - 0.675).abs() < 1e-6);
        assert!((a[0].mean_weight[1] - 0.25).abs() < 1e-6);
        assert!((a[0].entropy_bits - 1.75).abs() < 1e-12);
        assert_eq!(a[0].max_entropy_bits, 2.0);
        assert_eq!(a[0].coactivation[0], vec![4, 2, 1, 1]);
        assert_eq!(a[0].coactivation[1], vec![2, 2, 0, 0]);
        assert_eq!(a[0].coactivation[2][3], 0);
        // t1 keeps 0 of {0,1}, t2 keeps 0 of {0,2}, t3 (next call) keeps 0 of {3,0}
        assert_eq!((a[0].reuse.hits, a[0].reuse.total), (3, 6));
        assert_eq!(
            a[0].predicted, None,
            "the first MoE layer has no layer before it"
        );
        assert_eq!(a[1].chosen, vec![1, 1, 4, 2]);
        assert_eq!((a[1].reuse.hits, a[1].reuse.total), (4, 6));
        let predicted = a[1].predicted.unwrap();
        assert_eq!((predicted.hits, predicted.total), (6, 8));
        assert_eq!(predicted.rate, 0.75);
        let b = &p.usage(Some("b")).unwrap().layers;
        assert_eq!(b[0].chosen, vec![0, 1, 1, 0]);
        assert_eq!(b[0].reuse.total, 0, "the second sequence starts afresh");
        // overall = a + b
        assert_eq!(p.overall.tokens, 5);
        assert_eq!(p.overall.layers[0].chosen, vec![4, 3, 2, 1]);
        assert_eq!(p.overall.layers[1].predicted.unwrap().total, 10);
        assert!(p.usage(Some("c")).unwrap_err().to_string().contains("a, b"));
    }

    #[test]
    fn a_profile_of_another_model_is_refused() {
        let rec = ProfileRecorder::with_routers(
            "m",
            vec![ProfiledLayer {
                layer: 0,
                experts: 4,
                top_k: 2,
            }],
            vec![Router::new(vec![0.0; 8], None, Routing::TopKSoftmax, 2, 4, 2).unwrap()],
        );
        let p = rec.finish();
        let spec = |experts, top_k| MoeSpec {
            layer: 0,
            hidden: 2,
            ffn: 4,
            experts,
            top_k,
            routing: Routing::TopKSoftmax,
            activation: crate::moe::Activation::SiluGated,
            shared_ffn: None,
            router_bias: false,
            expert_bias: false,
        };
        p.check_fits(&[spec(4, 2)]).unwrap();
        let e = p.check_fits(&[spec(8, 2)]).unwrap_err().to_string();
        assert!(e.contains("8 experts"), "{e}");
        let e = p
            .check_fits(&[spec(4, 2), spec(4, 2)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 MoE layers, this model 2"), "{e}");
        // written and read back; a damaged file is refused
        let dir = std::env::temp_dir().join(format!("moe-edge-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(RoutingProfile::read(&path).unwrap(), p);
        let mut broken = p.clone();
        broken.overall.layers[0].chosen.pop();
        std::fs::write(&path, serde_json::to_string(&broken).unwrap()).unwrap();
        assert!(RoutingProfile::read(&path).is_err());
        std::fs::write(&path, "{}").unwrap();
        assert!(RoutingProfile::read(&path)
            .unwrap_err()
            .to_string()
            .contains("not a routing profile"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
