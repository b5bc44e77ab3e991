//! Watching the router: a session hands each MoE call's routing to an observer (routing traces,
//! usage profiles, prefetch predictors hang off it), without touching the computation.

use super::router::Choices;

/// Receives the routing of every MoE block call of a session, in execution order. Called on the
/// thread that runs the model, once per block per forward pass; keep it cheap.
pub trait RoutingObserver: Send + Sync {
    fn on_routing(&self, routed: &RoutedTokens<'_>);
}

/// The routing of one MoE block call: which experts each token chose, with their weights.
#[derive(Debug, Clone, Copy)]
pub struct RoutedTokens<'a> {
    /// Index of the block in the model (0 for the first MoE block of the graph).
    pub block: usize,
    /// Model layer of the block.
    pub layer: usize,
    /// Position in the sequence of the first token of the call (tokens follow in order).
    pub first_position: usize,
    pub(crate) choices: &'a Choices,
    /// The block's input `[tokens, hidden]` (what its router scored).
    pub(crate) input: &'a [f32],
    /// Per expert of the layer, whether it was in memory when the call routed (packed models).
    pub(crate) resident: Option<&'a [bool]>,
}

impl<'a> RoutedTokens<'a> {
    /// Number of tokens routed in this call.
    pub fn tokens(&self) -> usize {
        self.choices.tokens()
    }

    /// The (expert, weight) choices of token `t` of the call, in the router's order (highest
    /// score first). Their number may differ from token to token.
    pub fn token(&self, t: usize) -> &'a [(usize, f32)] {
        self.choices.token(t)
    }

    /// Whether `expert` was in memory when this call routed its tokens, before any was loaded:
    /// `Some` for packed models, whose expert cache loads experts on demand (`Some(false)` is a
    /// miss the call then loads), `None` when every expert is always in memory.
    pub fn resident(&self, expert: usize) -> Option<bool> {
        self.resident.and_then(|r| r.get(expert).copied())
    }

    /// The block's input for token `t` of the call (`hidden` values): the hidden state its
    /// router scored. Lets an observer ask what another layer's router would choose from it.
    pub fn input(&self, t: usize) -> &'a [f32] {
        let h = self.input.len() / self.tokens().max(1);
        &self.input[t * h..(t + 1) * h]
    }

    /// Position in the sequence of token `t` of the call.
    pub fn position(&self, t: usize) -> usize {
        self.first_position + t
    }
}
