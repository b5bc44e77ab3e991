//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not part of the API): steps
//! that the public API reaches only through a whole generation, exposed so that a target can
//! drive them on their own.

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::error::Result;
use crate::model::Model;

/// Loads every routed expert of every MoE layer once, through the layer's store (for a packed
/// model: read, checksum, decode, through the cache), and multiplies each by a zero row; returns
/// how many experts were loaded.
pub fn load_every_expert(model: &Model) -> Result<usize> {
    let mut loaded = 0;
    for layer in &model.ops.moe {
        for e in 0..layer.experts.len() {
            let expert = layer.experts.expert(e)?;
            let x = vec![0.0f32; layer.spec.hidden];
            let mut out = vec![0.0f32; layer.spec.hidden];
            expert.forward(&x, 1, &mut out);
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// The chat template found in a model directory, as [`Model::load`] finds it.
pub fn find_chat_template(dir: &Path) -> Result<Option<ChatTemplate>> {
    ChatTemplate::find(dir)
}
