//! Expert masks: which experts the routers may not choose, per model layer. They come from the
//! command line (`--expert-mask 3:0,5`), from a routing profile (static routing: every layer
//! keeps only its top-k most used experts) or from a pruned pack's manifest, and are applied to
//! the routers with [`Model::restrict_experts`](crate::Model::restrict_experts).

use std::collections::{BTreeMap, BTreeSet};

use super::profile::Usage;
use crate::error::{clip, Error, Result};

/// Experts disabled per model layer (the layer numbers traces and profiles show).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpertMask {
    disabled: BTreeMap<usize, BTreeSet<usize>>,
}

/// How many experts of each layer to keep when choosing them from a profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// The most used experts, this many per layer.
    Count(usize),
    /// The fewest most used experts whose routed slots reach this share of the layer's.
    Share(f64),
    /// Exactly the layer's top-k most used experts: every token of the layer then runs the same
    /// experts (static routing), weighted by the router over them alone.
    TopK,
}

impl ExpertMask {
    /// Parses `LAYER:E,E,...`, several separated by `;` (`"0:3,5;2:1"`): the experts listed are
    /// disabled in that layer.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "expert mask {:?}: {why} (expected LAYER:EXPERT,EXPERT,... separated by ';', e.g. 0:3,5;2:1)",
                clip(spec)
            ))
        };
        let mut mask = ExpertMask::default();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (layer, experts) = part.split_once(':').ok_or_else(|| bad("no ':'"))?;
            let layer: usize = layer
                .trim()
                .parse()
                .map_err(|_| bad(&format!("layer {:?} is not a number", clip(layer))))?;
            for e in experts.split(',').map(str::trim) {
                let e: usize = e
                    .parse()
                    .map_err(|_| bad(&format!("expert {:?} is not a number", clip(e))))?;
                mask.disable(layer, e);
            }
        }
        if mask.is_empty() {
            return Err(bad("it names no expert"));
        }
        Ok(mask)
    }

    pub fn disable(&mut self, layer: usize, expert: usize) {
        self.disabled.entry(layer).or_default().insert(expert);
    }

    /// Adds every expert `other` disables.
    pub fn merge(&mut self, other: &ExpertMask) {
        for (&layer, experts) in &other.disabled {
            for &e in experts {
                self.disable(layer, e);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.disabled.values().all(BTreeSet::is_empty)
    }

    /// The layers the mask names, with their disabled experts (ascending).
    pub fn layers(&self) -> impl Iterator<Item = (usize, Vec<usize>)> + '_ {
        self.disabled
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(&l, e)| (l, e.iter().copied().collect()))
    }

    /// The experts disabled in `layer` (ascending).
    pub fn disabled(&self, layer: usize) -> Vec<usize> {
        self.disabled
            .get(&layer)
            .map(|e| e.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Keeps, in every layer of `usage`, the experts `keep` selects (most used first) and
    /// disables the rest. Each layer keeps at least `top_k[i]` experts (its top-k).
    pub fn keeping(usage: &Usage, top_k: &[usize], keep: Keep) -> Result<Self> {
        match keep {
            Keep::Count(0) => {
                return Err(Error::InvalidInput(
                    "keep at least one expert per layer".into(),
                ))
            }
            Keep::Share(s) if !(s > 0.0 && s <= 1.0) => {
                return Err(Error::InvalidInput(format!(
                    "a kept share of {s} is outside (0, 1]"
                )))
            }
            _ => {}
        }
        let mut mask = ExpertMask::default();
        for (l, &k) in usage.layers.iter().zip(top_k) {
            let ranked = l.ranked();
            let mut kept = match keep {
                Keep::Count(n) => n,
                Keep::TopK => k,
                Keep::Share(share) => {
                    let total: u64 = l.chosen.iter().sum();
                    let mut reached = 0u64;
                    let mut n = ranked.len();
                    for (i, &e) in ranked.iter().enumerate() {
                        reached += l.chosen[e];
                        if reached as f64 >= share * total as f64 {
                            n = i + 1;
                            break;
                        }
                    }
                    n
                }
            };
            if kept < k {
                if matches!(keep, Keep::Count(_)) {
                    return Err(Error::InvalidInput(format!(
                        "keeping {kept} experts in layer {} is fewer than the {k} each token chooses",
                        l.layer
                    )));
                }
                kept = k;
            }
            if kept > ranked.len() {
                return Err(Error::InvalidInput(format!(
                    "layer {} has {} experts, fewer than {kept} to keep",
                    l.layer,
                    ranked.len()
                )));
            }
            for &e in &ranked[kept..] {
                mask.disable(l.layer, e);
            }
        }
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::profile::LayerUsage;

    fn layer(layer: usize, chosen: Vec<u64>) -> LayerUsage {
        LayerUsage::with_counts(layer, chosen)
    }

    #[test]
    fn parse_names_what_is_wrong() {
        let m = ExpertMask::parse("0:3,5; 2:1").unwrap();
        assert_eq!(m.disabled(0), vec![3, 5]);
        assert_eq!(m.disabled(2), vec![1]);
        assert_eq!(m.disabled(1), Vec::<usize>::new());
        for bad in ["", "3", "a:1", "0:x", "0:1,", ";"] {
            let e = ExpertMask::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expert mask"), "{bad}: {e}");
        }
    }

    #[test]
    fn keeping_by_count_and_by_share_by_hand() {
        // slots: expert 2 takes 50, 0 takes 30, 3 takes 15, 1 takes 5 (of 100)
        let usage = Usage {
            tokens: 50,
            layers: vec![layer(4, vec![30, 5, 50, 15])],
        };
        let m = ExpertMask::keeping(&usage, &[2], Keep::Count(3)).unwrap();
        assert_eq!(m.disabled(4), vec![1]);
        // 0.8 is reached by 50 + 30
        let m = ExpertMask::keeping(&usage, &[2], Keep::Share(0.8)).unwrap();
        assert_eq!(m.disabled(4), vec![1, 3]);
        let m = ExpertMask::keeping(&usage, &[2], Keep::Share(0.81)).unwrap();
        assert_eq!(m.disabled(4), vec![1]);
        // a small share still keeps top-k
        let m = ExpertMask::keeping(&usage, &[2], Keep::Share(0.1)).unwrap();
        assert_eq!(m.disabled(4), vec![1, 3]);
        assert!(ExpertMask::keeping(&usage, &[2], Keep::Count(1)).is_err());
        assert!(ExpertMask::keeping(&usage, &[2], Keep::Count(5)).is_err());
        assert!(ExpertMask::keeping(&usage, &[2], Keep::Share(1.5)).is_err());
        assert!(ExpertMask::keeping(&usage, &[2], Keep::Share(0.0)).is_err());
        // ties: the lower index stays
        let tied = Usage {
            tokens: 2,
            layers: vec![layer(0, vec![1, 1, 1, 1])],
        };
        let m = ExpertMask::keeping(&tied, &[2], Keep::Count(2)).unwrap();
        assert_eq!(m.disabled(0), vec![2, 3]);
        // static routing keeps each layer's top-k most used
        let m = ExpertMask::keeping(&usage, &[2], Keep::TopK).unwrap();
        assert_eq!(m.disabled(4), vec![1, 3]);
    }
}
