//! `manifest.json` of a packed model directory.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{clip, Error, Result};
use crate::moe::MoeSpec;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const EXPERT_FILE: &str = "experts.bin";
pub const FORMAT_NAME: &str = "moe-edge-pack";
pub const FORMAT_VERSION: u32 = 1;

/// How experts are stored in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertFormat {
    /// int8 blocks of 32 with f16 scales (f32 scales for matrices f16 cannot scale); a pack
    /// made with cold experts in int4 (`pack --int4-cold`) also holds int4 ones
    Int8,
    /// int4 blocks of 32 with f16 scales (the shared expert, always used, stays int8)
    Int4,
    F16,
    F32,
}

/// One MoE layer of the pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackLayer {
    pub spec: MoeSpec,
    /// Form the block was exported in.
    pub form: String,
    /// Bytes the layer's routed experts take in the expert file.
    pub expert_file_bytes: u64,
    /// Experts removed by `moe-edge prune` (ascending): not in the expert file, and the router
    /// never chooses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<usize>,
}

/// Where the pack came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub source: SourceInfo,
    pub experts: ExpertFormat,
    pub block_size: usize,
    pub alignment: u64,
    pub expert_file: String,
    /// Default expert cache budget in MiB when the user gives none (`None`: all experts).
    pub expert_cache_mb: Option<u64>,
    pub layers: Vec<PackLayer>,
    /// Dense linear layers stored as int8 in the expert file (`pack --dense int8`).
    #[serde(default)]
    pub dense: Vec<DenseLayer>,
    /// The token embedding table, moved out of the graph into the expert file and read a row per
    /// token (packs made before this field keep it in the graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingTable>,
}

/// The token embedding table of a pack: `Gather(table, ids)` of the source graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingTable {
    /// The initializer it came from.
    pub name: String,
    pub vocab: usize,
    pub hidden: usize,
}

/// A dense linear layer moved out of the graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DenseLayer {
    /// The initializer it came from.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = crate::files::read_text(&path, crate::files::TEXT_LIMIT)?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::CorruptPack(format!("{}: {}", path.display(), clip(&e.to_string())))
        })?;
        if m.format != FORMAT_NAME || m.version != FORMAT_VERSION {
            return Err(Error::CorruptPack(format!(
                "{}: format {} v{} is not {FORMAT_NAME} v{FORMAT_VERSION}",
                path.display(),
                clip(&m.format),
                m.version
            )));
        }
        Ok(m)
    }
}
