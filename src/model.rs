//! A loaded model: the imported graph, its inputs (plain `input_ids -> logits` or a KV-cache
//! decoder), and the tract plans built from it, one per batch size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::pb::{type_proto, ModelProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::optim::Optimizer;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::onnx::{import_model, DetectOptions, ImportedModel};
use crate::pack::cache::ExpertCache;
use crate::pack::manifest::Manifest;
use crate::pack::{is_pack, open_pack, PackOpenOptions};

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
    pub cache_policy: crate::pack::EvictionPolicy,
}

/// The files of a model: an `.onnx` file, or a directory holding `model.onnx` and optionally
/// `tokenizer.json` and `config.json`.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub onnx: PathBuf,
    pub dir: PathBuf,
}

impl ModelFiles {
    pub fn resolve(path: &Path) -> Result<Self> {
        let onnx = if path.is_dir() {
            path.join("model.onnx")
        } else {
            path.to_path_buf()
        };
        if !onnx.is_file() {
            return Err(Error::ModelLoad {
                path: path.to_path_buf(),
                reason: format!("{} does not exist", onnx.display()),
            });
        }
        let dir = onnx
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ModelFiles { onnx, dir })
    }

    /// A companion file: next to the ONNX file, or (for kit-style layouts) one directory up.
    pub fn companion(&self, name: &str) -> Option<PathBuf> {
        [
            self.dir.join(name),
            self.dir.join("..").join(name),
            self.dir.join("..").join("hf").join(name),
        ]
        .into_iter()
        .find(|p| p.is_file())
    }
}

/// The graph's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    /// `input_ids [, attention_mask, position_ids] -> logits`: generation re-runs the sequence.
    Plain {
        attention_mask: bool,
        position_ids: bool,
    },
    /// Form-A decoder with `past_key_values.{i}.key/value` inputs and `present.*` outputs.
    KvCache {
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        attention_mask: bool,
        position_ids: bool,
    },
}

/// A runnable model.
#[derive(Debug)]
pub struct Model {
    pub files: ModelFiles,
    pub imported: ImportedModel,
    pub interface: Interface,
    pub config: ModelConfig,
    /// The expert cache of a packed model.
    pub cache: Option<Arc<ExpertCache>>,
    /// The manifest of a packed model.
    pub manifest: Option<Manifest>,
    plans: Mutex<HashMap<usize, Arc<Plan>>>,
}

/// A tract plan for one batch size, with its input order resolved.
#[derive(Debug)]
pub struct Plan {
    pub runnable: Arc<TypedRunnableModel>,
    pub inputs: Vec<String>,
    pub logits_output: usize,
}

impl Model {
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Model> {
        let files = ModelFiles::resolve(path)?;
        let (imported, cache, manifest) = if is_pack(&files.dir) {
            let pack = open_pack(
                &files.dir,
                PackOpenOptions {
                    expert_cache_mb: opts.expert_cache_mb,
                    verify: opts.verify,
                    cache_policy: opts.cache_policy,
                },
            )?;
            (pack.imported, Some(pack.cache), Some(pack.manifest))
        } else {
            let detect = DetectOptions {
                dense_fallback: opts.dense_fallback,
                literal: opts.literal,
            };
            (import_model(&files.onnx, detect)?, None, None)
        };
        let interface = interface_of(&imported.proto).map_err(|reason| Error::ModelLoad {
            path: files.onnx.clone(),
            reason,
        })?;
        let config = match files.companion("config.json") {
            Some(p) => ModelConfig::read(&p)?,
            None => ModelConfig::default(),
        };
        Ok(Model {
            files,
            imported,
            interface,
            config,
            cache,
            manifest,
            plans: Mutex::new(HashMap::new()),
        })
    }

    pub fn has_kv_cache(&self) -> bool {
        matches!(self.interface, Interface::KvCache { .. })
    }

    /// The plan for `batch` sequences, built on first use.
    pub fn plan(&self, batch: usize) -> Result<Arc<Plan>> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.get(&batch) {
            return Ok(p.clone());
        }
        let plan = Arc::new(self.build_plan(batch)?);
        plans.insert(batch, plan.clone());
        Ok(plan)
    }

    fn build_plan(&self, batch: usize) -> Result<Plan> {
        let started = std::time::Instant::now();
        let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
        crate::sparse_op::register(&mut onnx);
        crate::dense_op::register(&mut onnx);
        let dir = self.files.dir.to_str();
        let parsed = onnx
            .parse(&self.imported.proto, dir)
            .map_err(Error::tract("parsing the rewritten graph"))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(Error::UnsupportedGraph(format!(
                "unresolved graph inputs {:?}",
                parsed.unresolved_inputs
            )));
        }
        let mut model = parsed.model;
        let s = model.symbols.sym("S");
        let p = model.symbols.sym("P");
        let b = TDim::from(batch as i64);
        let kv = self.has_kv_cache();
        let inputs = model
            .input_outlets()
            .map_err(Error::tract("model inputs"))?
            .to_vec();
        for (ix, outlet) in inputs.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let fact = match name.as_str() {
                "input_ids" | "position_ids" => {
                    InferenceFact::dt_shape(i64::datum_type(), tvec![b.clone(), s.clone().into()])
                }
                "attention_mask" if kv => InferenceFact::dt_shape(
                    i64::datum_type(),
                    tvec![b.clone(), TDim::from(p.clone()) + TDim::from(s.clone())],
                ),
                "attention_mask" => {
                    InferenceFact::dt_shape(i64::datum_type(), tvec![b.clone(), s.clone().into()])
                }
                n if n.starts_with("past_key_values.") => {
                    let Interface::KvCache {
                        kv_heads, head_dim, ..
                    } = self.interface
                    else {
                        unreachable!()
                    };
                    InferenceFact::dt_shape(
                        f32::datum_type(),
                        tvec![
                            b.clone(),
                            kv_heads.into(),
                            p.clone().into(),
                            head_dim.into()
                        ],
                    )
                }
                other => {
                    return Err(Error::UnsupportedGraph(format!(
                        "model input '{other}' is not understood"
                    )))
                }
            };
            model
                .set_input_fact(ix, fact)
                .map_err(Error::tract(format!("input '{name}'")))?;
        }
        let mut typed = model
            .into_typed()
            .map_err(Error::tract("analysing the graph"))?;
        // FoldUniformMask folds the causal mask into a constant of the wrong shape when the
        // sequence length is symbolic (see docs/TRACT-NOTES.md): run declutter without it.
        let mut declutter = Optimizer::declutter();
        declutter
            .passes
            .retain(|p| !format!("{p:?}").starts_with("FoldUniformMask"));
        declutter
            .optimize(&mut typed)
            .map_err(Error::tract("decluttering"))?;
        if kv {
            let transform =
                tract_onnx::tract_core::transform::get_transform("transformers_detect_all")
                    .map_err(Error::tract("KV-cache transform"))?
                    .ok_or_else(|| {
                        Error::UnsupportedGraph("tract-transformers is not linked".into())
                    })?;
            transform
                .transform(&mut typed)
                .map_err(Error::tract("folding the KV cache into state"))?;
            if typed.input_outlets().map(|i| i.len()).unwrap_or(0) > 3 {
                return Err(Error::UnsupportedGraph(
                    "past_key_values inputs could not be folded into a KV cache".into(),
                ));
            }
        }
        typed.optimize().map_err(Error::tract("optimising"))?;
        let input_names = typed
            .input_outlets()
            .map_err(Error::tract("inputs"))?
            .iter()
            .map(|o| typed.node(o.node).name.clone())
            .collect();
        let outputs = typed
            .output_outlets()
            .map_err(Error::tract("outputs"))?
            .to_vec();
        let logits_output = outputs
            .iter()
            .position(|o| typed.outlet_label(*o) == Some("logits"))
            .unwrap_or(0);
        let runnable = typed
            .into_runnable()
            .map_err(Error::tract("making the plan"))?;
        log::info!(
            "plan for batch {batch} ready in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        Ok(Plan {
            runnable,
            inputs: input_names,
            logits_output,
        })
    }

    /// One forward pass over `ids[batch, seq]` (empty past for KV-cache graphs): returns
    /// logits `[batch, seq, vocab]` and the vocabulary size.
    pub fn logits(&self, ids: &[i64], batch: usize) -> Result<(Vec<f32>, usize)> {
        if batch == 0 || ids.is_empty() || ids.len() % batch != 0 {
            return Err(Error::InvalidInput(format!(
                "{} ids do not form {batch} non-empty sequences",
                ids.len()
            )));
        }
        let plan = self.plan(batch)?;
        let mut state = plan
            .runnable
            .spawn()
            .map_err(Error::tract("starting a run"))?;
        let out = plan.run(&mut state, ids, batch, 0)?;
        Ok(out)
    }
}

impl Plan {
    /// Runs one turn: `ids[batch, seq]` after `past` cached positions. Returns all logits.
    pub fn run(
        &self,
        state: &mut TypedSimpleState,
        ids: &[i64],
        batch: usize,
        past: usize,
    ) -> Result<(Vec<f32>, usize)> {
        let seq = ids.len() / batch;
        let mut inputs = TVec::new();
        for name in &self.inputs {
            let t = match name.as_str() {
                "input_ids" => Tensor::from_shape(&[batch, seq], ids),
                "attention_mask" => {
                    Tensor::from_shape(&[batch, past + seq], &vec![1i64; batch * (past + seq)])
                }
                "position_ids" => {
                    let pos: Vec<i64> = (0..batch)
                        .flat_map(|_| (past..past + seq).map(|p| p as i64))
                        .collect();
                    Tensor::from_shape(&[batch, seq], &pos)
                }
                other => {
                    return Err(Error::UnsupportedGraph(format!(
                        "no value to feed to input '{other}'"
                    )))
                }
            }
            .map_err(Error::tract("building inputs"))?;
            inputs.push(t.into_tvalue());
        }
        let outputs = match state.run(inputs) {
            Ok(o) => o,
            Err(e) => {
                let _ = state.reset_turn();
                return Err(Error::Tract {
                    context: "running the model".into(),
                    source: e,
                });
            }
        };
        let logits = &outputs[self.logits_output];
        let vocab = *logits.shape().last().unwrap_or(&0);
        let data = logits
            .try_as_plain_ram()
            .and_then(|v| Ok(v.as_slice::<f32>()?.to_vec()))
            .map_err(Error::tract("reading logits"))?;
        Ok((data, vocab))
    }
}

/// Reads the graph's interface from its inputs.
fn interface_of(proto: &ModelProto) -> std::result::Result<Interface, String> {
    let graph = proto.graph.as_ref().ok_or("no graph")?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let has = |n: &str| inputs.iter().any(|i| i.name == n);
    if !has("input_ids") {
        return Err(format!(
            "the graph has no 'input_ids' input (inputs: {:?}); moe-edge runs language models",
            inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
        ));
    }
    let pasts: Vec<_> = inputs
        .iter()
        .filter(|i| i.name.starts_with("past_key_values."))
        .collect();
    let (attention_mask, position_ids) = (has("attention_mask"), has("position_ids"));
    if pasts.is_empty() {
        return Ok(Interface::Plain {
            attention_mask,
            position_ids,
        });
    }
    let dims = |i: &tract_onnx::pb::ValueInfoProto| -> Option<Vec<i64>> {
        let Some(type_proto::Value::TensorType(t)) = i.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        Some(
            t.shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                    _ => -1,
                })
                .collect(),
        )
    };
    let d = dims(pasts[0]).ok_or("past_key_values input has no shape")?;
    if d.len() != 4 || d[1] <= 0 || d[3] <= 0 {
        return Err(format!(
            "past_key_values input '{}' has shape {:?}, expected [batch, kv_heads, past, head_dim]",
            pasts[0].name, d
        ));
    }
    Ok(Interface::KvCache {
        layers: pasts.len() / 2,
        kv_heads: d[1] as usize,
        head_dim: d[3] as usize,
        attention_mask,
        position_ids,
    })
}

/// Runs an imported graph once on concrete inputs (in graph input order), whatever its
/// interface: used for standalone MoE blocks and for checking rewrites. Returns the outputs and
/// the tract model it ran, for inspection.
pub fn run_imported_graph(
    imported: &ImportedModel,
    inputs: Vec<Tensor>,
) -> Result<(Vec<Tensor>, TypedModel)> {
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
    crate::sparse_op::register(&mut onnx);
    crate::dense_op::register(&mut onnx);
    let dir = imported.dir().and_then(|d| d.to_str());
    let parsed = onnx
        .parse(&imported.proto, dir)
        .map_err(Error::tract("parsing the rewritten graph"))?;
    let mut model = parsed.model;
    for (ix, t) in inputs.iter().enumerate() {
        model
            .set_input_fact(ix, InferenceFact::dt_shape(t.datum_type(), t.shape()))
            .map_err(Error::tract(format!("input {ix}")))?;
    }
    let typed = model.into_optimized().map_err(Error::tract("optimising"))?;
    let plan = typed
        .clone()
        .into_runnable()
        .map_err(Error::tract("making the plan"))?;
    let outputs = plan
        .run(inputs.into_iter().map(|t| t.into_tvalue()).collect())
        .map_err(Error::tract("running the graph"))?;
    Ok((
        outputs.into_iter().map(|v| v.into_tensor()).collect(),
        typed,
    ))
}
