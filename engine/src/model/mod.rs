//! A loaded model: its graph (imported, or a packed model's), the op table its moe-edge nodes
//! name, its interface, configuration, tokenizer and chat template, the expert cache of a
//! packed model, and the tract plans built from it, one per batch size.

mod interface;
mod plan;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tract_onnx::pb::ModelProto;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::moe::{ExpertMask, MoeSpec};
use crate::onnx::forms::BlockReport;
use crate::onnx::{import_model, DetectOptions};
use crate::ops::OpTable;
use crate::pack::cache::ExpertCache;
use crate::pack::{is_pack, open_pack, CacheStats, EvictionPolicy, Manifest, PackOpenOptions};
use crate::tokenizer::Tokenizer;
pub use interface::Interface;
#[cfg(test)]
pub(crate) use plan::run_imported_graph;
pub(crate) use plan::Plan;

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Run blocks that are not understood literally in tract instead of refusing the model.
    pub dense_fallback: bool,
    /// Skip the MoE rewrite entirely (runs the exported graph as it is; for comparisons).
    pub literal: bool,
    /// Expert cache budget in MiB for packed models (default: the manifest's, else all experts).
    pub expert_cache_mb: Option<u64>,
    /// Check every expert's checksum at open (packed models).
    pub verify: bool,
    /// Which expert the cache evicts on a miss (packed models).
    pub cache_policy: EvictionPolicy,
    /// Skipping low-weight experts at run time (off by default).
    pub adaptive_top_k: crate::moe::AdaptiveTopK,
    /// Packed models: while a block computes, read on a background thread the experts it is
    /// about to run and those the next block's router predicts from this block's input.
    pub prefetch: bool,
}

/// How many expert slots (token x chosen expert) the model's MoE blocks ran, and how many the
/// learnt top-k chose that adaptive top-k skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoutingStats {
    pub routed_slots: u64,
    pub skipped_slots: u64,
}

/// One MoE block of a model, as imported (or as packed).
#[derive(Debug, Clone)]
pub struct BlockInfo {
    pub spec: MoeSpec,
    /// The form it was exported in (for a packed model: its storage and original form).
    pub form: String,
    /// The graph node it was recognised from (empty for packed models).
    pub node: String,
}

/// A runnable model. Shared by any number of [`Session`](crate::Session)s, on any threads.
///
/// ```no_run
/// use moe_edge_engine::{LoadOptions, Model};
/// let model = Model::load("models/tiny-mixtral".as_ref(), LoadOptions::default())?;
/// println!("{} MoE blocks, KV cache: {}", model.blocks().len(), model.has_kv_cache());
/// # Ok::<(), moe_edge_engine::Error>(())
/// ```
pub struct Model {
    pub(crate) files: ModelFiles,
    pub(crate) proto: ModelProto,
    pub(crate) ops: OpTable,
    pub(crate) interface: Interface,
    /// Rows of the embedding table `input_ids` index, when the graph shows them.
    vocab: Option<usize>,
    config: ModelConfig,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    pub(crate) cache: Option<Arc<ExpertCache>>,
    manifest: Option<Manifest>,
    removed_initializers: usize,
    blocks: Vec<BlockInfo>,
    fallbacks: Vec<BlockReport>,
    plans: Mutex<HashMap<usize, Arc<Plan>>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model({}, {} MoE blocks)",
            self.files.onnx.display(),
            self.blocks.len()
        )
    }
}

impl Model {
    /// Loads an `.onnx` file, a directory holding `model.onnx`, or a packed model directory.
    /// Companion files (`config.json`, `tokenizer.json`, `tokenizer_config.json`,
    /// `chat_template.jinja`) are read from the model's own directory only.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Model> {
        crate::threads::share_pool_with_tract();
        opts.adaptive_top_k.validate()?;
        let files = ModelFiles::resolve(path)?;
        let mut removed_initializers = 0;
        let mut manifest = None;
        let (mut proto, ops, blocks, fallbacks, cache) =
            if files.is_directory_model() && is_pack(&files.dir) {
                let pack = open_pack(
                    &files.dir,
                    PackOpenOptions {
                        expert_cache_mb: opts.expert_cache_mb,
                        verify: opts.verify,
                        cache_policy: opts.cache_policy,
                        prefetch: opts.prefetch,
                    },
                )?;
                let blocks = pack
                    .manifest
                    .layers
                    .iter()
                    .map(|l| BlockInfo {
                        spec: l.spec.clone(),
                        form: format!("packed {:?}, from {}", pack.manifest.experts, l.form),
                        node: String::new(),
                    })
                    .collect();
                manifest = Some(pack.manifest);
                (pack.proto, pack.ops, blocks, vec![], Some(pack.cache))
            } else {
                let detect = DetectOptions {
                    dense_fallback: opts.dense_fallback,
                    literal: opts.literal,
                };
                let imported = import_model(&files.onnx, detect)?;
                let blocks = imported
                    .blocks
                    .iter()
                    .map(|b| BlockInfo {
                        spec: b.spec.clone(),
                        form: b.form.to_string(),
                        node: b.anchor.clone(),
                    })
                    .collect();
                removed_initializers = imported.removed_initializers;
                let ops = OpTable {
                    moe: imported.layers,
                    linear: vec![],
                    embedding: None,
                };
                (imported.proto, ops, blocks, imported.fallbacks, None)
            };
        let mut ops = ops;
        for layer in ops.moe.iter_mut() {
            Arc::get_mut(layer)
                .ok_or_else(|| Error::ModelLoad {
                    path: files.onnx.clone(),
                    reason: "an MoE layer is shared while loading".into(),
                })?
                .router
                .adaptive = opts.adaptive_top_k;
        }
        if opts.prefetch && cache.is_some() {
            wire_lookahead(&ops.moe);
        }
        let load_err = |reason: String| Error::ModelLoad {
            path: files.onnx.clone(),
            reason,
        };
        let graph = proto
            .graph
            .as_mut()
            .ok_or_else(|| load_err("the file holds no graph".into()))?;
        ops.annotate(graph).map_err(load_err)?;
        let interface = interface::interface_of(&proto).map_err(load_err)?;
        // a pack's embedding table left the graph for the expert file
        let vocab = interface::vocab_of(&proto).or(ops.embedding.as_ref().map(|e| e.vocab));
        let config = match files.sibling("config.json") {
            Some(p) => ModelConfig::read(&p)?,
            None => ModelConfig::default(),
        };
        let tokenizer = match files.sibling("tokenizer.json") {
            Some(p) => Some(Tokenizer::from_file(&p)?),
            None => None,
        };
        let chat_template = ChatTemplate::find(&files.dir)?;
        Ok(Model {
            files,
            proto,
            ops,
            interface,
            vocab,
            config,
            tokenizer,
            chat_template,
            cache,
            manifest,
            removed_initializers,
            blocks,
            fallbacks,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The model's ONNX file.
    pub fn path(&self) -> &Path {
        &self.files.onnx
    }

    /// What the graph takes and gives.
    pub fn interface(&self) -> &Interface {
        &self.interface
    }

    /// The manifest of a packed model.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// How many initializers the import took out of the graph (expert weights, and what only
    /// the MoE blocks used).
    pub fn removed_initializers(&self) -> usize {
        self.removed_initializers
    }

    /// The MoE blocks moe-edge runs with its sparse op, in graph order.
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }

    /// Blocks that were not understood and run literally in tract (`dense_fallback`).
    pub fn fallbacks(&self) -> &[BlockReport] {
        &self.fallbacks
    }

    pub fn has_kv_cache(&self) -> bool {
        matches!(self.interface, Interface::KvCache { .. })
    }

    /// The parts of `config.json` that generation uses.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer (`tokenizer.json` beside the model), if there is one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The chat template (`chat_template.jinja`, or `chat_template` of `tokenizer_config.json`).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The most tokens a session can hold (`max_position_embeddings`), if the config says.
    pub fn context_limit(&self) -> Option<usize> {
        self.config.max_position_embeddings
    }

    /// The vocabulary size (the embedding table's rows), when the graph shows it.
    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }

    /// What the model holds in memory outside the expert cache, by part (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        let graph_weights_bytes = self
            .proto
            .graph
            .as_ref()
            .map_or(0, |g| g.initializer.iter().map(initializer_bytes).sum());
        let int8_dense_bytes = self.ops.linear.iter().map(|l| l.bytes()).sum();
        let moe_fixed_bytes = self
            .ops
            .moe
            .iter()
            .map(|l| {
                let shared = l.shared.as_ref().map_or(0, |s| {
                    let f = &s.ffn;
                    f.gate.values.len() + f.up.values.len() + f.down.values.len() + s.gate.len()
                });
                ((l.router.weights.len() + shared) * 4) as u64
            })
            .sum();
        Footprint {
            graph_weights_bytes,
            int8_dense_bytes,
            moe_fixed_bytes,
            embedding_in_file: self.ops.embedding.is_some(),
        }
    }

    /// Bytes of the KV cache of one sequence of `positions` tokens (0 for graphs without one).
    pub fn kv_cache_bytes(&self, positions: usize) -> u64 {
        match self.interface {
            Interface::KvCache {
                layers,
                kv_heads,
                head_dim,
                ..
            } => (2 * layers * kv_heads * head_dim * positions * 4) as u64,
            Interface::Plain { .. } => 0,
        }
    }

    /// Expert slots run and skipped so far, over every MoE block and session.
    pub fn routing_stats(&self) -> RoutingStats {
        use std::sync::atomic::Ordering::Relaxed;
        self.ops
            .moe
            .iter()
            .fold(RoutingStats::default(), |s, l| RoutingStats {
                routed_slots: s.routed_slots + l.routed_slots.load(Relaxed),
                skipped_slots: s.skipped_slots + l.skipped_slots.load(Relaxed),
            })
    }

    /// Forbids the routers to choose the experts `mask` disables (see [`Router::restrict`]
    /// for the routing over the rest). Call before running the model; a layer the model does not
    /// have, an expert out of range, or fewer than top-k experts left in a layer is refused and
    /// changes nothing.
    ///
    /// [`Router::restrict`]: crate::moe::router::Router::restrict
    pub fn restrict_experts(&mut self, mask: &ExpertMask) -> Result<()> {
        let mut updated = vec![];
        for (layer, disabled) in mask.layers() {
            let (b, l) = self
                .ops
                .moe
                .iter()
                .enumerate()
                .find(|(_, l)| l.spec.layer == layer)
                .ok_or_else(|| {
                    let have: Vec<String> = self
                        .blocks
                        .iter()
                        .map(|b| b.spec.layer.to_string())
                        .collect();
                    Error::InvalidInput(format!(
                        "expert mask: the model has no MoE layer {layer} (its MoE layers: {})",
                        have.join(", ")
                    ))
                })?;
            let experts = l.spec.experts;
            if let Some(&e) = disabled.iter().find(|&&e| e >= experts) {
                return Err(Error::InvalidInput(format!(
                    "expert mask: layer {layer} has {experts} experts, there is no expert {e}"
                )));
            }
            let mut router = l.router.clone();
            let allowed: Vec<bool> = (0..experts).map(|e| !disabled.contains(&e)).collect();
            router
                .restrict(&allowed)
                .map_err(|e| Error::InvalidInput(format!("expert mask, layer {layer}: {e}")))?;
            updated.push((b, router));
        }
        for (b, router) in updated {
            let layer = Arc::get_mut(&mut self.ops.moe[b]).ok_or_else(|| {
                Error::InvalidInput("experts can only be restricted before the model runs".into())
            })?;
            layer.router = router;
        }
        if self.ops.moe.iter().any(|l| {
            l.lookahead
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        }) {
            wire_lookahead(&self.ops.moe);
        }
        Ok(())
    }

    /// Keeps the most used experts of `usage` (a routing profile of this model, over all MoE
    /// layers, most used first) in a packed model's expert cache once loaded, as many as fit in
    /// `share` of the cache budget; the rest of the budget serves the others. Returns how many
    /// experts and bytes are kept. Refused for models without an expert cache, for a share
    /// outside (0, 1), and when the rest could not hold one more expert.
    pub fn keep_hot_experts(&self, usage: &crate::moe::Usage, share: f64) -> Result<(usize, u64)> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "only a packed model has an expert cache to keep experts in (see `moe-edge pack`)"
                    .into(),
            )
        })?;
        if !(share > 0.0 && share < 1.0) {
            return Err(Error::InvalidInput(format!(
                "a kept share of the cache of {share} is outside (0, 1)"
            )));
        }
        if usage.layers.len() != self.ops.moe.len() {
            return Err(Error::InvalidInput(format!(
                "the profile has {} MoE layers, this model {}",
                usage.layers.len(),
                self.ops.moe.len()
            )));
        }
        let sizes = self.expert_bytes().unwrap_or_default();
        let allowance = (cache.budget() as f64 * share) as u64;
        let keys = crate::pack::hot_experts(usage, &sizes, allowance);
        let (kept, largest_other) = crate::pack::kept_and_largest_other(&keys, &sizes);
        cache.keep_resident(&keys, kept, largest_other)?;
        Ok((keys.len(), kept))
    }

    /// In-memory bytes of each routed expert once loaded, per MoE block (packed models: what
    /// the expert cache counts against its budget).
    pub fn expert_bytes(&self) -> Option<Vec<Vec<u64>>> {
        self.cache.as_ref()?;
        self.ops
            .moe
            .iter()
            .map(|l| {
                (0..l.spec.experts)
                    .map(|e| l.experts.loaded_bytes(e))
                    .collect()
            })
            .collect()
    }

    /// The expert cache's budget in bytes, for packed models.
    pub fn cache_budget(&self) -> Option<u64> {
        self.cache.as_ref().map(|c| c.budget())
    }

    /// Whether the routers of model layer `layer` may choose `expert` (`None`: no such layer).
    pub fn expert_allowed(&self, layer: usize, expert: usize) -> Option<bool> {
        self.ops
            .moe
            .iter()
            .find(|l| l.spec.layer == layer)
            .map(|l| l.router.is_allowed(expert))
    }

    /// The expert cache's counters, for packed models.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// The plan for `batch` sequences, built on first use.
    pub(crate) fn plan(&self, batch: usize) -> Result<Arc<Plan>> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.get(&batch) {
            return Ok(p.clone());
        }
        let plan = Arc::new(crate::guard::catch_panic("building the plan", || {
            plan::build_plan(self, batch)
        })?);
        plans.insert(batch, plan.clone());
        Ok(plan)
    }

    /// One forward pass over `ids[batch, seq]` (empty past for KV-cache graphs): returns
    /// logits `[batch, seq, vocab]` and the vocabulary size.
    pub fn logits(&self, ids: &[i64], batch: usize) -> Result<(Vec<f32>, usize)> {
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::InvalidInput(format!(
                "{} ids do not form {batch} non-empty sequences",
                ids.len()
            )));
        }
        check_token_ids(ids, self.vocab)?;
        let seq = ids.len() / batch;
        if let Some(limit) = self.context_limit().filter(|&l| seq > l) {
            return Err(Error::ContextFull { limit, needed: seq });
        }
        let plan = self.plan(batch)?;
        crate::threads::on_pool(|| {
            let mut state = plan
                .runnable
                .spawn()
                .map_err(Error::tract("starting a run"))?;
            let out = plan.run(&mut state, ids, batch, 0);
            plan.retire(state);
            out
        })
    }
}

/// Gives each MoE block the next block's router and experts (prefetching); called again when
/// routers change.
fn wire_lookahead(moe: &[Arc<crate::moe::layer::MoeLayer>]) {
    for pair in moe.windows(2) {
        let next = crate::moe::layer::Lookahead {
            router: pair[1].router.clone(),
            experts: pair[1].experts.clone(),
        };
        *pair[0].lookahead.write().unwrap_or_else(|e| e.into_inner()) = Some(next);
    }
}

/// What a model holds in memory besides its expert cache and its sessions' KV caches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// Weights left in tract's graph (attention, norms; the LM head unless int8; the embedding
    /// table unless a pack reads it from its file), at their stored size.
    pub graph_weights_bytes: u64,
    /// Dense layers a pack stores as int8 (`pack --dense int8`), as held in memory.
    pub int8_dense_bytes: u64,
    /// Routers and shared experts of the MoE blocks (f32).
    pub moe_fixed_bytes: u64,
    /// Whether the embedding table is read a row per token from the pack's file.
    pub embedding_in_file: bool,
}

/// Bytes an initializer's values take (embedded or external); the graph's tensors were checked
/// to have types tract reads when it was opened.
fn initializer_bytes(t: &tract_onnx::pb::TensorProto) -> u64 {
    let elements: u64 = t.dims.iter().map(|&d| d.max(0) as u64).product();
    elements * crate::onnx::tensors::element_bytes(t.data_type).unwrap_or(4)
}

/// Token ids must index the embedding table: `0 <= id < vocab` (`0 <= id` when the vocabulary
/// size is not known), checked before the graph runs.
pub(crate) fn check_token_ids(ids: &[i64], vocab: Option<usize>) -> Result<()> {
    let bad = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || vocab.is_some_and(|v| id as u64 >= v as u64));
    match bad {
        None => Ok(()),
        Some((at, id)) => Err(Error::InvalidInput(match vocab {
            Some(v) => format!("token id {id} at position {at} is outside the vocabulary (0..{v})"),
            None => format!("token id {id} at position {at} is negative"),
        })),
    }
}
