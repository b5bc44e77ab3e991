//! The sparse Mixture-of-Experts computation: block description, expert storage interface and
//! the routed forward pass. Nothing here knows about ONNX or tract.

pub mod forward;
pub mod q8_expert;
pub mod routing;
pub mod spec;
pub mod store;

pub use forward::{MoeLayer, MoeStats};
pub use spec::{Activation, MoeSpec, Routing};
pub use store::{DenseExpert, ExpertFfn, ExpertStore, F32ExpertStore, SharedExpert};
