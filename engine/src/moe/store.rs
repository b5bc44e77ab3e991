//! Where expert weights live, behind a narrow interface: the MoE forward pass asks a store for
//! an expert and runs it over a group of rows, whatever format and residency the store uses.

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::moe::expert::{DenseExpert, ExpertFfn};

/// The routed experts of one MoE layer.
pub trait ExpertStore: Send + Sync + Debug {
    /// Number of experts in the layer.
    fn len(&self) -> usize;
    /// The expert `index`, loading it if the store keeps experts out of memory.
    ///
    /// Implementations may block until memory is free (a cache with a byte budget): callers
    /// must not hold one expert while asking for another on the same thread, and
    /// [`ExpertFfn::forward`] must not run other experts' work (no nested rayon tasks).
    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>>;

    /// A hint that `experts` are about to be asked for: a store that reads experts from disk
    /// may start reading them. It must not block, and it changes no result.
    fn prefetch(&self, experts: &[usize]) {
        let _ = experts;
    }

    /// Whether asking for expert `index` now would find it in memory: `None` for stores that
    /// hold every expert, `Some` for stores that load them on demand (a packed model's cache).
    /// It counts as no use of the expert.
    fn resident(&self, index: usize) -> Option<bool> {
        let _ = index;
        None
    }

    /// Bytes expert `index` holds once loaded, for stores that load experts on demand.
    fn loaded_bytes(&self, index: usize) -> Option<u64> {
        let _ = index;
        None
    }
}

/// The always-on shared expert of Qwen2-MoE style blocks, scaled by `sigmoid(x . gate)`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub ffn: DenseExpert,
    /// `[hidden]`
    pub gate: Vec<f32>,
}

/// Routed experts as f32 in memory.
#[derive(Debug, Clone)]
pub struct F32ExpertStore {
    experts: Vec<Arc<DenseExpert>>,
}

impl F32ExpertStore {
    pub fn new(experts: Vec<DenseExpert>) -> Self {
        F32ExpertStore {
            experts: experts.into_iter().map(Arc::new).collect(),
        }
    }

    fn get(&self, index: usize) -> Result<&Arc<DenseExpert>> {
        self.experts.get(index).ok_or_else(|| {
            Error::InvalidInput(format!(
                "expert {index} out of range ({})",
                self.experts.len()
            ))
        })
    }
}

impl ExpertStore for F32ExpertStore {
    fn len(&self) -> usize {
        self.experts.len()
    }

    fn expert(&self, index: usize) -> Result<Arc<dyn ExpertFfn>> {
        Ok(self.get(index)?.clone() as Arc<dyn ExpertFfn>)
    }
}
