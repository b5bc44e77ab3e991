//! Checks one R1 block, starting from its TopK node, and extracts its description.

use tract_onnx::pb::NodeProto;

use crate::moe::{Activation, MoeSpec, Routing};
use crate::onnx::forms::{BlockDescription, ExpertTensors, GateUpLayout, SharedRefs};
use crate::onnx::graph::{attr_int, attr_ints, GraphIndex};
use crate::onnx::patterns::{is_last_axis, linear_of, silu_gated};

/// Checks one block, starting from its TopK node.
pub(super) struct BlockMatcher<'g, 'a> {
    g: &'g GraphIndex<'a>,
    topk: &'a NodeProto,
    k: usize,
}

type Match<T> = std::result::Result<T, String>;

impl<'g, 'a> BlockMatcher<'g, 'a> {
    pub(super) fn new(g: &'g GraphIndex<'a>, topk_index: usize) -> Match<Self> {
        let topk = g.node(topk_index);
        let k = g
            .const_ints(&topk.input[1])
            .filter(|v| v.len() == 1 && v[0] > 0)
            .ok_or("TopK has no constant k")?[0] as usize;
        if attr_int(topk, "largest").unwrap_or(1) != 1 {
            return Err("TopK selects the smallest values".into());
        }
        let axis = attr_int(topk, "axis").unwrap_or(-1);
        if !(axis == -1 || axis == 1) {
            return Err(format!(
                "TopK over axis {axis}, expected the expert axis (-1)"
            ));
        }
        Ok(BlockMatcher { g, topk, k })
    }

    pub(super) fn run(&self, gathers: &[usize]) -> Match<BlockDescription> {
        let g = self.g;
        let (routing, logits, weights) = self.routing()?;
        let (x, router) = linear_of(g, g.peel(logits, &["Cast"]))
            .ok_or("router logits are not a bias-free MatMul/Gemm by a constant weight")?;
        let experts = router.out_features();
        let hidden = router.in_features();

        if gathers.len() != 2 {
            return Err(format!(
                "{} expert tensors are gathered by the router's indices, expected 2 (gate_up and down); \
                 expert biases or other expert parameters (e.g. GPT-OSS) are not supported yet",
                gathers.len()
            ));
        }
        // the gate_up gather feeds the first MatMul, whose input is the repeated block input
        let (gu_idx, down_idx) = {
            let a = g.node(gathers[0]);
            if self
                .expert_matmul(a)
                .map(|m| self.is_repeat_of(&m.input[1], x))
                .unwrap_or(false)
            {
                (gathers[0], gathers[1])
            } else {
                (gathers[1], gathers[0])
            }
        };
        let gu = g.node(gu_idx);
        let dn = g.node(down_idx);
        for gather in [gu, dn] {
            self.check_gather_indices(gather)?;
        }
        let gu_dims = dims3(g, &gu.input[0]);
        let dn_dims = dims3(g, &dn.input[0]);
        if gu_dims[0] != experts || gu_dims[2] != hidden || !gu_dims[1].is_multiple_of(2) {
            return Err(format!(
                "gate_up '{}' has shape {:?}, expected [{experts}, 2*ffn, {hidden}]",
                gu.input[0], gu_dims
            ));
        }
        let ffn = gu_dims[1] / 2;
        if dn_dims != [experts, hidden, ffn] {
            return Err(format!(
                "down '{}' has shape {:?}, expected [{experts}, {hidden}, {ffn}]",
                dn.input[0], dn_dims
            ));
        }

        // gate_up projection over the repeated input
        let mm1 = self
            .expert_matmul(gu)
            .ok_or("gathered gate_up weights do not feed a MatMul")?;
        if !self.is_repeat_of(&mm1.input[1], x) {
            return Err(
                "gate_up MatMul input is not the block input repeated k times per token".into(),
            );
        }
        let h1 = self
            .squeezed_last(&mm1.output[0])
            .ok_or("gate_up MatMul output is not squeezed on its last axis")?;
        let (first_half, second_half) = self.halves(h1)?;

        // down projection of the activation
        let mm2 = self
            .expert_matmul(dn)
            .ok_or("gathered down weights do not feed a MatMul")?;
        let act = self
            .unsqueezed_last(&mm2.input[1])
            .ok_or("down MatMul input is not an unsqueezed activation")?;
        let (gate, up) = silu_gated(g, act).ok_or_else(|| {
            format!("expert activation at '{act}' is not silu(gate) * up (clamped SwiGLU, GELU or others are not supported yet)")
        })?;
        let gate_up_layout =
            match (gate, up) {
                (a, b) if a == first_half && b == second_half => GateUpLayout::GateFirst,
                (a, b) if a == second_half && b == first_half => GateUpLayout::UpFirst,
                _ => return Err(
                    "the SiLU gate and up inputs are not the two halves of the gate_up projection"
                        .into(),
                ),
            };
        let y = self
            .squeezed_last(&mm2.output[0])
            .ok_or("down MatMul output is not squeezed on its last axis")?;

        // combine: y * weights, reshape to [T, k, H], sum over k
        let routed = self.weighted_sum(y, weights, hidden)?;
        let (output, shared) = self.shared_expert(routed, x, hidden);

        Ok(BlockDescription {
            spec: MoeSpec {
                layer: 0,
                hidden,
                ffn,
                experts,
                top_k: self.k,
                routing,
                activation: Activation::SiluGated,
                shared_ffn: shared.as_ref().map(|s| s.gate_proj.out_features()),
                router_bias: false,
                expert_bias: false,
            },
            form: if gu.op_type == "GatherND" {
                "R1 (GatherND, dynamo or HF exporter)"
            } else {
                "R1 (Gather/OneHot/Tile/Flatten, legacy exporter)"
            },
            anchor: self.topk.name.clone(),
            input: x.to_string(),
            output,
            router,
            router_bias: None,
            experts: ExpertTensors {
                gate_up: gu.input[0].clone(),
                gate_up_layout,
                down: dn.input[0].clone(),
                bias: None,
            },
            shared,
        })
    }

    /// Returns the routing mode, the router logits tensor and the tensor of per-slot weights.
    fn routing(&self) -> Match<(Routing, &'a str, &'a str)> {
        let g = self.g;
        let values = self.topk.output[0].as_str();
        if let Some(sm) = g.produced_by(g.peel(&self.topk.input[0], &["Cast"]), "Softmax") {
            if !is_last_axis(attr_int(sm, "axis").unwrap_or(-1), 2) {
                return Err("router softmax is not over the expert axis".into());
            }
            // renormalisation: Div(values, ReduceSum(values, axis -1, keepdims))
            for values in g.with_float_casts(values) {
                for sum in g.consumers_with_op(values, "ReduceSum") {
                    let axes = sum
                        .input
                        .get(1)
                        .and_then(|a| g.const_ints(a))
                        .or_else(|| attr_ints(sum, "axes"));
                    let keep = attr_int(sum, "keepdims").unwrap_or(1) == 1;
                    if axes
                        .as_deref()
                        .map(|a| a.len() == 1 && is_last_axis(a[0], 2))
                        != Some(true)
                        || !keep
                    {
                        continue;
                    }
                    if let Some(div) = g
                        .consumers_with_op(values, "Div")
                        .into_iter()
                        .find(|d| d.input[0] == values && d.input[1] == sum.output[0])
                    {
                        return Ok((
                            Routing::SoftmaxTopK { renormalize: true },
                            sm.input[0].as_str(),
                            div.output[0].as_str(),
                        ));
                    }
                }
            }
            Ok((
                Routing::SoftmaxTopK { renormalize: false },
                sm.input[0].as_str(),
                values,
            ))
        } else {
            let sm = g
                .with_float_casts(values)
                .into_iter()
                .flat_map(|v| g.consumers_with_op(v, "Softmax"))
                .find(|s| is_last_axis(attr_int(s, "axis").unwrap_or(-1), 2))
                .ok_or("TopK input is not a softmax and its values are not softmaxed: routing not understood")?;
            Ok((
                Routing::TopKSoftmax,
                self.topk.input[0].as_str(),
                sm.output[0].as_str(),
            ))
        }
    }

    /// The MatMul consuming a gather's output as its first operand.
    fn expert_matmul(&self, gather: &NodeProto) -> Option<&'a NodeProto> {
        let mms = self.g.consumers_with_op(&gather.output[0], "MatMul");
        match mms.as_slice() {
            [m] if m.input[0] == gather.output[0] => Some(*m),
            _ => None,
        }
    }

    /// Indices must be the TopK indices flattened row-major to `[T*k]` (`[T*k, 1]` for GatherND).
    fn check_gather_indices(&self, gather: &NodeProto) -> Match<()> {
        let g = self.g;
        let mut t = gather.input[1].as_str();
        if gather.op_type == "GatherND" {
            if attr_int(gather, "batch_dims").unwrap_or(0) != 0 {
                return Err(format!("GatherND '{}' has batch_dims != 0", gather.name));
            }
            let un = g
                .produced_by(t, "Unsqueeze")
                .ok_or_else(|| format!("GatherND '{}' indices are not unsqueezed", gather.name))?;
            if !self.axes_are(un, &[-1, 1]) {
                return Err(format!(
                    "GatherND '{}' indices unsqueezed on an unexpected axis",
                    gather.name
                ));
            }
            t = un.input[0].as_str();
        } else if attr_int(gather, "axis").unwrap_or(0) != 0 {
            return Err(format!(
                "Gather '{}' is not over the expert axis",
                gather.name
            ));
        }
        let rs = g.produced_by(t, "Reshape").ok_or_else(|| {
            format!(
                "'{}' indices are not the flattened TopK indices",
                gather.name
            )
        })?;
        if g.const_ints(&rs.input[1]).as_deref() != Some(&[-1])
            || rs.input[0] != self.topk.output[1]
        {
            return Err(format!(
                "'{}' indices are not the TopK indices reshaped to [-1]",
                gather.name
            ));
        }
        Ok(())
    }

    /// Whether a node's axes (input 1 or attribute) is a single value among `allowed`.
    fn axes_are(&self, node: &NodeProto, allowed: &[i64]) -> bool {
        let axes = node
            .input
            .get(1)
            .and_then(|a| self.g.const_ints(a))
            .or_else(|| attr_ints(node, "axes"));
        matches!(axes.as_deref(), Some([a]) if allowed.contains(a))
    }

    /// `tensor = Unsqueeze(inner, -1)` for a rank-2 inner tensor: returns `inner`.
    fn unsqueezed_last(&self, tensor: &str) -> Option<&'a str> {
        let un = self.g.produced_by(tensor, "Unsqueeze")?;
        self.axes_are(un, &[-1, 2]).then_some(un.input[0].as_str())
    }

    /// The single `Squeeze(tensor, -1)` consuming a rank-3 tensor: returns its output.
    fn squeezed_last(&self, tensor: &str) -> Option<&'a str> {
        match self.g.consumers_with_op(tensor, "Squeeze").as_slice() {
            [sq] if self.axes_are(sq, &[-1, 2]) => Some(sq.output[0].as_str()),
            _ => None,
        }
    }

    /// Whether `tensor` is `Unsqueeze(repeat_interleave(x, k, dim 0), -1)`, written as
    /// `Reshape|Flatten(Expand|Tile(Unsqueeze(x, 1), [.., k, ..]))` (dynamo, HF exporter, legacy).
    fn is_repeat_of(&self, tensor: &str, x: &str) -> bool {
        let g = self.g;
        let Some(rep) = self.unsqueezed_last(tensor) else {
            return false;
        };
        let repeated = if let Some(rs) = g.produced_by(rep, "Reshape") {
            rs.input[0].as_str()
        } else if let Some(fl) = g
            .produced_by(rep, "Flatten")
            .filter(|f| attr_int(f, "axis") == Some(2))
        {
            fl.input[0].as_str()
        } else {
            return false;
        };
        let k = self.k as i64;
        let unsqueezed = if let Some(ex) = g.produced_by(repeated, "Expand") {
            if let Some(shape) = g.const_ints(&ex.input[1]) {
                if shape.len() != 3 || shape[1] != k {
                    return false;
                }
            }
            ex.input[0].as_str()
        } else if let Some(tile) = g.produced_by(repeated, "Tile") {
            let repeats = g.peel(&tile.input[1], &["Reshape", "Cast"]);
            let k_on_axis_1 = match g.const_ints(repeats) {
                Some(r) => r == [1, k, 1],
                // legacy: OneHot(indices 1, depth 3, values [1, k]) = [1, k, 1]
                None => g.produced_by(repeats, "OneHot").is_some_and(|oh| {
                    g.const_ints(&oh.input[0]).as_deref() == Some(&[1])
                        && g.const_ints(&oh.input[1]).as_deref() == Some(&[3])
                }),
            };
            if !k_on_axis_1 {
                return false;
            }
            tile.input[0].as_str()
        } else {
            return false;
        };
        g.produced_by(unsqueezed, "Unsqueeze")
            .is_some_and(|un| self.axes_are(un, &[1]) && g.root(&un.input[0]) == g.root(x))
    }

    /// The two halves `(first, second)` of the gate_up output along its last axis.
    fn halves(&self, h: &str) -> Match<(&'a str, &'a str)> {
        let g = self.g;
        let splits = g.consumers_with_op(h, "Split");
        if let [sp] = splits.as_slice() {
            let axis = attr_int(sp, "axis").unwrap_or(0);
            let equal = match sp.input.get(1).filter(|s| !s.is_empty()) {
                Some(sizes) => matches!(g.const_ints(sizes).as_deref(), Some([a, b]) if a == b),
                None => sp.output.len() == 2,
            };
            if is_last_axis(axis, 2) && equal && sp.output.len() == 2 {
                return Ok((sp.output[0].as_str(), sp.output[1].as_str()));
            }
            return Err("gate_up projection is split in an unexpected way".into());
        }
        // legacy chunk(2): Slice(h, 0, mid, -1) and Slice(h, mid, end, -1)
        let slices = g.consumers_with_op(h, "Slice");
        if let [a, b] = slices.as_slice() {
            let on_last = |s: &NodeProto| {
                s.input
                    .get(3)
                    .and_then(|ax| g.const_ints(ax))
                    .map(|v| v.len() == 1 && is_last_axis(v[0], 2))
                    .unwrap_or(false)
            };
            let step_one = |s: &NodeProto| {
                s.input
                    .get(4)
                    .map(|st| g.const_ints(st).as_deref() == Some(&[1]))
                    .unwrap_or(true)
            };
            if on_last(a) && on_last(b) && step_one(a) && step_one(b) {
                for (first, second) in [(a, b), (b, a)] {
                    if g.const_ints(&first.input[1]).as_deref() == Some(&[0])
                        && second.input[1] == first.input[2]
                        && chunk_end_is_double(g, &second.input[2], &first.input[2])
                    {
                        return Ok((first.output[0].as_str(), second.output[0].as_str()));
                    }
                }
            }
        }
        Err("gate_up projection is not split into two halves (Split or chunk Slices)".into())
    }

    /// `y * weights` reshaped to `[T, k, H]` and summed over k. Returns the sum tensor.
    fn weighted_sum(&self, y: &str, weights: &str, hidden: usize) -> Match<&'a str> {
        let g = self.g;
        let mul = match g.consumers_with_op(y, "Mul").as_slice() {
            [m] => *m,
            _ => return Err("expert outputs are not multiplied by the routing weights".into()),
        };
        let other = if mul.input[0] == y {
            &mul.input[1]
        } else {
            &mul.input[0]
        };
        if g.peel(other, &["Unsqueeze", "Reshape", "Cast"]) != weights {
            return Err(
                "expert outputs are scaled by something other than the routing weights".into(),
            );
        }
        let rs = match g.consumers_with_op(&mul.output[0], "Reshape").as_slice() {
            [r] => *r,
            _ => {
                return Err(
                    "weighted expert outputs are not reshaped to [tokens, k, hidden]".into(),
                )
            }
        };
        if let Some(shape) = g.const_ints(&rs.input[1]) {
            if shape.len() != 3 || shape[1] != self.k as i64 || shape[2] != hidden as i64 {
                return Err(format!(
                    "weighted expert outputs reshaped to {shape:?}, expected [-1, {}, {hidden}]",
                    self.k
                ));
            }
        }
        let sum = match g.consumers_with_op(&rs.output[0], "ReduceSum").as_slice() {
            [s] => *s,
            _ => return Err("weighted expert outputs are not summed over k".into()),
        };
        let keep = attr_int(sum, "keepdims").unwrap_or(1);
        if !self.axes_are(sum, &[1, -2]) || keep != 0 {
            return Err("expert outputs are summed over an axis other than k".into());
        }
        Ok(sum.output[0].as_str())
    }

    /// Extends the block over a gated shared expert added to the routed sum, when present and
    /// fully recognised. Returns the block's output tensor.
    fn shared_expert(
        &self,
        routed: &'a str,
        x: &str,
        hidden: usize,
    ) -> (String, Option<SharedRefs>) {
        let g = self.g;
        let mut out = routed;
        if let [c] = g.consumers_of(out) {
            let n = g.node(*c);
            if n.op_type == "Cast" && attr_int(n, "to") == Some(1) {
                out = n.output[0].as_str();
            }
        }
        let fallback = (out.to_string(), None);
        let [c] = g.consumers_of(out) else {
            return fallback;
        };
        let add = g.node(*c);
        if add.op_type != "Add" {
            return fallback;
        }
        let other = if add.input[0] == out {
            &add.input[1]
        } else {
            &add.input[0]
        };
        let Some(refs) = self.match_shared(other, x, hidden) else {
            return fallback;
        };
        (add.output[0].clone(), Some(refs))
    }

    fn match_shared(&self, t: &str, x: &str, hidden: usize) -> Option<SharedRefs> {
        let g = self.g;
        let root_x = g.root(x);
        let same_x = |inp: &str| g.root(inp) == root_x;
        let mul = g.produced_by(t, "Mul")?;
        for (s, d) in [(0, 1), (1, 0)] {
            let Some(sig) = g.produced_by(&mul.input[s], "Sigmoid") else {
                continue;
            };
            let (gx, gate) = linear_of(g, &sig.input[0])?;
            let (hx, down_proj) = linear_of(g, &mul.input[d])?;
            let (gate_in, up_in) = silu_gated(g, hx)?;
            let (x1, gate_proj) = linear_of(g, gate_in)?;
            let (x2, up_proj) = linear_of(g, up_in)?;
            let f = gate_proj.out_features();
            let ok = same_x(gx)
                && same_x(x1)
                && same_x(x2)
                && gate.out_features() == 1
                && gate.in_features() == hidden
                && gate_proj.in_features() == hidden
                && up_proj.in_features() == hidden
                && up_proj.out_features() == f
                && down_proj.in_features() == f
                && down_proj.out_features() == hidden;
            if ok {
                return Some(SharedRefs {
                    gate_proj,
                    up_proj,
                    down_proj,
                    gate,
                });
            }
        }
        None
    }
}

fn dims3(g: &GraphIndex, init: &str) -> [usize; 3] {
    let d = &g
        .initializer(init)
        .expect("checked expert initializer")
        .dims;
    [d[0] as usize, d[1] as usize, d[2] as usize]
}

/// For torch's `chunk(2)` as exported: the second slice ends at twice the first one's end
/// (`Mul(mid, 2)`), or at a constant past the end.
fn chunk_end_is_double(g: &GraphIndex, end2: &str, end1: &str) -> bool {
    if let Some(m) = g.produced_by(end2, "Mul") {
        let mid_producer = |t: &str| g.produced_by(t, "Mul").map(|n| n.input[0].clone());
        // end1 = Mul(half, 1), end2 = Mul(half, 2)
        let half1 = mid_producer(end1);
        let factor = |n: &NodeProto, half: &str| {
            n.input[0] == half && g.const_ints(&n.input[1]).as_deref() == Some(&[2])
        };
        if let Some(h) = half1 {
            return factor(m, &h);
        }
        return factor(m, end1);
    }
    matches!(g.const_ints(end2).as_deref(), Some([v]) if *v >= i64::MAX / 2)
}
