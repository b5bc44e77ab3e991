//! Read-only index over an ONNX graph: producers, consumers, initializers and constants.

use std::collections::HashMap;

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

/// Lookup tables over one `GraphProto`.
pub struct GraphIndex<'a> {
    pub graph: &'a GraphProto,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    initializers: HashMap<&'a str, &'a TensorProto>,
}

impl<'a> GraphIndex<'a> {
    pub fn new(graph: &'a GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for o in &node.output {
                if !o.is_empty() {
                    producer.insert(o.as_str(), i);
                }
            }
            for inp in &node.input {
                if !inp.is_empty() {
                    consumers.entry(inp.as_str()).or_default().push(i);
                }
            }
        }
        let initializers = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        GraphIndex {
            graph,
            producer,
            consumers,
            initializers,
        }
    }

    pub fn node(&self, i: usize) -> &'a NodeProto {
        &self.graph.node[i]
    }

    /// Index of the node producing `tensor`.
    pub fn producer_of(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    /// The node producing `tensor` if it has type `op`.
    pub fn produced_by(&self, tensor: &str, op: &str) -> Option<&'a NodeProto> {
        self.producer_of(tensor)
            .map(|i| self.node(i))
            .filter(|n| n.op_type == op && n.domain.is_empty())
    }

    pub fn consumers_of(&self, tensor: &str) -> &[usize] {
        self.consumers
            .get(tensor)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// Consumers of `tensor` with op type `op`.
    pub fn consumers_with_op(&self, tensor: &str, op: &str) -> Vec<&'a NodeProto> {
        self.consumers_of(tensor)
            .iter()
            .map(|&i| self.node(i))
            .filter(|n| n.op_type == op)
            .collect()
    }

    pub fn initializer(&self, name: &str) -> Option<&'a TensorProto> {
        self.initializers.get(name).copied()
    }

    /// A constant tensor: an initializer or the `value` of a `Constant` node.
    pub fn constant(&self, name: &str) -> Option<&'a TensorProto> {
        if let Some(t) = self.initializer(name) {
            return Some(t);
        }
        let node = self.produced_by(name, "Constant")?;
        node.attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
    }

    /// Integer values of a small constant tensor (int64 or int32), or of a `Constant` node's
    /// `value_int`/`value_ints`.
    pub fn const_ints(&self, name: &str) -> Option<Vec<i64>> {
        if let Some(node) = self.produced_by(name, "Constant") {
            for a in &node.attribute {
                match a.name.as_str() {
                    "value_int" => return Some(vec![a.i]),
                    "value_ints" => return Some(a.ints.clone()),
                    _ => {}
                }
            }
        }
        decode_ints(self.constant(name)?)
    }

    /// Follows producers back through ops of the given types (first input each time). `Cast` is
    /// only followed when it casts to f32 (a no-op in the f32 graphs this reads).
    pub fn peel<'s>(&'s self, mut tensor: &'a str, ops: &[&str]) -> &'a str {
        while let Some(i) = self.producer_of(tensor) {
            let n = self.node(i);
            let float_cast_or_not_cast = n.op_type != "Cast" || attr_int(n, "to") == Some(FLOAT);
            if n.domain.is_empty()
                && ops.contains(&n.op_type.as_str())
                && !n.input.is_empty()
                && float_cast_or_not_cast
            {
                tensor = n.input[0].as_str();
            } else {
                break;
            }
        }
        tensor
    }

    /// Tensors that hold the same values as `tensor`: itself and the outputs of f32 casts of it.
    pub fn with_float_casts(&self, tensor: &'a str) -> Vec<&'a str> {
        let mut v = vec![tensor];
        for &c in self.consumers_of(tensor) {
            let n = self.node(c);
            if n.op_type == "Cast" && attr_int(n, "to") == Some(FLOAT) {
                v.push(n.output[0].as_str());
            }
        }
        v
    }

    /// The tensor that `tensor` is a plain re-view of (through Reshape, Flatten, Cast, Identity).
    pub fn root(&self, tensor: &'a str) -> &'a str {
        self.peel(tensor, &["Reshape", "Flatten", "Cast", "Identity"])
    }
}

/// ONNX `TensorProto.DataType` of f32.
pub const FLOAT: i64 = 1;

/// Integer attribute of a node.
pub fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// Integer-list attribute of a node.
pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

fn decode_ints(t: &TensorProto) -> Option<Vec<i64>> {
    const INT32: i32 = 6;
    const INT64: i32 = 7;
    match t.data_type {
        INT64 if !t.int64_data.is_empty() => Some(t.int64_data.clone()),
        INT64 => Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        INT32 if !t.int32_data.is_empty() => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
        INT32 => Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        _ => None,
    }
}

/// Model layer number named in a tensor or node name (`layers.3`, `layers/3`, `layer_3`), if any.
pub fn layer_in_name(name: &str) -> Option<usize> {
    for key in [
        "layers.", "layers/", "layers_", "block.", "blocks.", "layer.", "layer_", "h.",
    ] {
        if let Some(pos) = name.find(key) {
            let digits: String = name[pos + key.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// The fewest inputs and outputs a node of the standard domain must have for its operator, for
/// the operators moe-edge's matchers read by position (as of the opsets the exporters write:
/// `Reshape`'s shape, `TopK`'s k and `Slice`'s starts and ends are inputs). Every other standard
/// operator takes at least one input (except the generators) and every node has an output.
const ARITY: [(&str, usize, usize); 33] = [
    ("Add", 2, 1),
    ("Sub", 2, 1),
    ("Mul", 2, 1),
    ("Div", 2, 1),
    ("Equal", 2, 1),
    ("MatMul", 2, 1),
    ("Gemm", 2, 1),
    ("Reshape", 2, 1),
    ("Expand", 2, 1),
    ("Tile", 2, 1),
    ("Gather", 2, 1),
    ("GatherElements", 2, 1),
    ("GatherND", 2, 1),
    ("CumSum", 2, 1),
    ("TopK", 2, 2),
    ("Slice", 3, 1),
    ("OneHot", 3, 1),
    ("Range", 3, 1),
    ("Where", 3, 1),
    ("ScatterElements", 3, 1),
    ("ScatterND", 3, 1),
    ("Cast", 1, 1),
    ("Softmax", 1, 1),
    ("Sigmoid", 1, 1),
    ("Unsqueeze", 1, 1),
    ("Squeeze", 1, 1),
    ("Flatten", 1, 1),
    ("Split", 1, 1),
    ("ReduceSum", 1, 1),
    ("NonZero", 1, 1),
    ("Identity", 1, 1),
    ("Transpose", 1, 1),
    ("Concat", 1, 1),
];

/// Operators of the standard domain that take no input.
const GENERATORS: [&str; 3] = ["Constant", "RandomNormal", "RandomUniform"];

/// Refuses a graph with a node that has fewer inputs or outputs than its operator takes: such a
/// graph is not valid ONNX, and the matchers read inputs by position.
pub(crate) fn check_node_arity(graph: &GraphProto) -> Result<(), String> {
    for (i, node) in graph.node.iter().enumerate() {
        let standard = node.domain.is_empty() || node.domain == "ai.onnx";
        let (inputs, outputs) = match ARITY.iter().find(|(op, ..)| *op == node.op_type) {
            Some(&(_, inputs, outputs)) if standard => (inputs, outputs),
            _ if standard && !GENERATORS.contains(&node.op_type.as_str()) => (1, 1),
            _ => (0, 1),
        };
        if node.input.len() < inputs || node.output.len() < outputs {
            let op = crate::error::clip(&node.op_type);
            return Err(format!(
                "node {i} ('{}', {op}) has {} input(s) and {} output(s); {op} takes at least \
                 {inputs} input(s) and {outputs} output(s)",
                crate::error::clip(&node.name),
                node.input.len(),
                node.output.len(),
            ));
        }
    }
    Ok(())
}
