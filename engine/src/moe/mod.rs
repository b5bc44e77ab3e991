//! The sparse Mixture-of-Experts computation: the block description, the router, what observes
//! it (traces, usage profiles) and what restricts it (expert masks), one expert FFN over any weight format, the expert storage interface, and the
//! routed forward pass. Nothing here knows about ONNX or tract.

pub(crate) mod expert;
pub(crate) mod layer;
pub(crate) mod mask;
pub(crate) mod observer;
pub(crate) mod profile;
pub(crate) mod router;
pub(crate) mod spec;
pub(crate) mod store;

#[cfg(test)]
mod tests;

pub use mask::{ExpertMask, Keep};
pub use observer::{RoutedTokens, RoutingObserver};
pub use profile::{
    LabelledUsage, LayerUsage, ProfileRecorder, ProfiledLayer, Ratio, RoutingProfile, Usage,
};
pub use router::AdaptiveTopK;
pub use spec::{Activation, MoeSpec, Routing};
