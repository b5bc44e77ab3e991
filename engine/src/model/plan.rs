//! Tract plans of a model: parse the rewritten graph, bind moe-edge's nodes to the model's op
//! table, fold the KV cache into tract state, optimise; and run one turn of a plan.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::SessionId;
use tract_onnx::tract_core::optim::Optimizer;

use super::interface::Interface;
use super::Model;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::onnx::ImportedModel;
use crate::ops::OpTable;

/// A tract plan for one batch size, with its input order resolved.
#[derive(Debug)]
pub(crate) struct Plan {
    pub runnable: Arc<TypedRunnableModel>,
    pub inputs: Vec<String>,
    pub logits_output: usize,
}

/// Parses `proto` with moe-edge's node types, sets each input's fact (`facts(symbols, index,
/// name)`), and binds moe-edge's nodes to `ops`.
fn parse_bound(
    proto: &ModelProto,
    dir: Option<&Path>,
    ops: &OpTable,
    facts: impl Fn(&SymbolScope, usize, &str) -> Result<InferenceFact>,
) -> Result<TypedModel> {
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
    crate::ops::register(&mut onnx);
    let parsed = onnx
        .parse(proto, dir.and_then(|d| d.to_str()))
        .map_err(Error::tract("parsing the rewritten graph"))?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(Error::UnsupportedGraph(format!(
            "unresolved graph inputs {:?}",
            parsed.unresolved_inputs
        )));
    }
    let mut model = parsed.model;
    let inputs = model
        .input_outlets()
        .map_err(Error::tract("model inputs"))?
        .to_vec();
    for (ix, outlet) in inputs.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let fact = facts(&model.symbols, ix, &name)?;
        model
            .set_input_fact(ix, fact)
            .map_err(Error::tract(format!("input '{name}'")))?;
    }
    let mut typed = model
        .into_typed()
        .map_err(Error::tract("analysing the graph"))?;
    ops.bind(&mut typed)
        .map_err(Error::tract("binding moe-edge's ops"))?;
    Ok(typed)
}

/// Builds the plan of `model` for `batch` sequences.
pub(crate) fn build_plan(model: &Model, batch: usize) -> Result<Plan> {
    let started = std::time::Instant::now();
    let b = TDim::from(batch as i64);
    let kv = model.has_kv_cache();
    let facts = |symbols: &SymbolScope, _ix: usize, name: &str| -> Result<InferenceFact> {
        let s = symbols.sym("S");
        let p = symbols.sym("P");
        Ok(match name {
            "input_ids" | "position_ids" => {
                InferenceFact::dt_shape(i64::datum_type(), tvec![b.clone(), s.into()])
            }
            "attention_mask" if kv => InferenceFact::dt_shape(
                i64::datum_type(),
                tvec![b.clone(), TDim::from(p) + TDim::from(s)],
            ),
            "attention_mask" => {
                InferenceFact::dt_shape(i64::datum_type(), tvec![b.clone(), s.into()])
            }
            n if n.starts_with("past_key_values.") => {
                let Interface::KvCache {
                    kv_heads, head_dim, ..
                } = model.interface
                else {
                    unreachable!("past_key_values inputs make a KV-cache interface")
                };
                InferenceFact::dt_shape(
                    f32::datum_type(),
                    tvec![b.clone(), kv_heads.into(), p.into(), head_dim.into()],
                )
            }
            other => {
                return Err(Error::UnsupportedGraph(format!(
                    "model input '{other}' is not understood"
                )))
            }
        })
    };
    let mut typed = parse_bound(&model.proto, Some(&model.files.dir), &model.ops, facts)?;
    // FoldUniformMask folds the causal mask into a constant of the wrong shape when the
    // sequence length is symbolic (a known tract pitfall): run declutter without it.
    let mut declutter = Optimizer::declutter();
    declutter
        .passes
        .retain(|p| !format!("{p:?}").starts_with("FoldUniformMask"));
    declutter
        .optimize(&mut typed)
        .map_err(Error::tract("decluttering"))?;
    if kv {
        let transform = tract_onnx::tract_core::transform::get_transform("transformers_detect_all")
            .map_err(Error::tract("KV-cache transform"))?
            .ok_or_else(|| Error::UnsupportedGraph("tract-transformers is not linked".into()))?;
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

impl Plan {
    /// Drops a state of this plan, and the scratch its forward passes left on the pool threads
    /// (tract keeps it per thread and session, and a state's drop only frees the dropping
    /// thread's).
    pub(crate) fn retire(&self, state: TypedSimpleState) {
        let session = crate::ops::session_of(&state);
        drop(state);
        self.release_pool_scratch(session);
    }

    /// Frees what the forward passes of tract session `session` left on the pool threads.
    pub(crate) fn release_pool_scratch(&self, session: Option<SessionId>) {
        let Some(session) = session else { return };
        let model = self.runnable.model();
        crate::threads::on_every_pool_thread(|| {
            for (ix, node) in model.nodes().iter().enumerate() {
                node.op().drop_session(session, ix);
            }
        });
    }

    /// Runs one turn: `ids[batch, seq]` after `past` cached positions. Returns all logits.
    pub(crate) fn run(
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
        let run = crate::guard::catch_panic("running the model", || {
            state.run(inputs).map_err(Error::tract("running the model"))
        });
        let outputs = match run {
            Ok(o) => o,
            Err(e) => {
                let _ = state.reset_turn();
                return Err(e);
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

/// Runs an imported graph once on concrete inputs (in graph input order), whatever its
/// interface: used for standalone MoE blocks and for checking rewrites. Returns the outputs and
/// the tract model it ran, for inspection.
#[cfg(test)]
pub(crate) fn run_imported_graph(
    imported: &ImportedModel,
    dir: Option<&Path>,
    inputs: Vec<Tensor>,
) -> Result<(Vec<Tensor>, TypedModel)> {
    let ops = OpTable {
        moe: imported.layers.clone(),
        linear: vec![],
        embedding: None,
    };
    let mut proto = imported.proto.clone();
    if let Some(graph) = proto.graph.as_mut() {
        ops.annotate(graph).map_err(Error::UnsupportedGraph)?;
    }
    let typed = parse_bound(&proto, dir, &ops, |_, ix, _| {
        let t = &inputs[ix];
        Ok(InferenceFact::dt_shape(t.datum_type(), t.shape()))
    })?;
    let typed = typed.into_optimized().map_err(Error::tract("optimising"))?;
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
