//! Finds every MoE block of a graph: refuses the forms that can never run correctly, asks each
//! form's importer ([`super::forms`]) for its blocks, and applies the fallback policy to the
//! blocks no importer understood.

use super::forms::{r1_batched, BlockDescription, BlockReport};
use super::graph::GraphIndex;
use super::refuse;
use crate::error::{Error, Result};

/// Options of the detector.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetectOptions {
    /// Leave blocks that are not understood in the graph, to run literally in tract (with a
    /// warning), instead of refusing the model.
    pub dense_fallback: bool,
    /// Do not rewrite anything: run every block literally (for comparisons).
    pub literal: bool,
}

/// What the detector found in a graph.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    pub blocks: Vec<BlockDescription>,
    pub fallbacks: Vec<BlockReport>,
}

/// Finds every MoE block of the graph. Errors when a block must be refused.
pub fn detect_blocks(g: &GraphIndex, opts: DetectOptions) -> Result<Detection> {
    refuse::check_refused_forms(g)?;
    let scan = r1_batched::scan(g);
    let mut detection = Detection {
        blocks: scan.blocks,
        fallbacks: vec![],
    };
    let refusals = scan.refusals;
    if let Some(first) = refusals.first() {
        if !opts.dense_fallback {
            return Err(Error::RefusedBlock {
                node: first.node.clone(),
                layer: first.layer,
                reason: first.reason.clone(),
            });
        }
        for r in &refusals {
            log::warn!(
                "MoE block at node '{}' (layer {:?}) not understood ({}); running it literally in tract (--dense-fallback)",
                r.node,
                r.layer,
                r.reason
            );
        }
        detection.fallbacks = refusals;
    }
    Ok(detection)
}
