//! The graph IR: nodes over typed values, initializers, topological order and validation.
//!
//! Values are numbered ([`ValueId`]) and named; nodes refer to values by id. Op types and
//! attributes follow ONNX naming (TFLite imports lower to the same ops), so the CPU reference,
//! the partitioner and every driver share one vocabulary. Initializers are [`Tensor`]s whose
//! storage may point into the mapped model file.

use std::collections::{BTreeMap, HashMap};

use crate::dtype::DType;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;
/// Index of a node in [`Graph::nodes`].
pub type NodeId = usize;

/// One dimension of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A known size.
    Fixed(usize),
    /// A named symbolic size (`batch`), or unknown when the name is empty.
    Sym(String),
}

impl Dim {
    /// The size when known.
    pub fn fixed(&self) -> Option<usize> {
        match self {
            Dim::Fixed(d) => Some(*d),
            Dim::Sym(_) => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(d) => write!(f, "{d}"),
            Dim::Sym(s) if s.is_empty() => f.write_str("?"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A named value (graph input, node output, initializer) with what is known of its type.
#[derive(Clone, Debug, Default)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub shape: Option<Vec<Dim>>,
}

impl ValueInfo {
    /// The shape when every dimension is known.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.shape.as_ref()?.iter().map(Dim::fixed).collect()
    }
}

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Tensor(Tensor),
    Graph(Box<Graph>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Vec<u8>>),
    Tensors(Vec<Tensor>),
    Graphs(Vec<Graph>),
}

/// An operation.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// Name from the model file (may be empty).
    pub name: String,
    /// Op type, ONNX spelling (`Conv`, `QLinearConv`, ...).
    pub op: String,
    /// Op domain (`""` for the default ONNX domain, `com.microsoft`, ...).
    pub domain: String,
    /// Inputs; `None` for an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs; `None` for an omitted optional output.
    pub outputs: Vec<Option<ValueId>>,
    pub attrs: BTreeMap<String, Attr>,
}

impl Node {
    /// Attribute lookup.
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.get(name)
    }
    /// Integer attribute.
    pub fn attr_i(&self, name: &str) -> Option<i64> {
        match self.attrs.get(name)? {
            Attr::Int(v) => Some(*v),
            _ => None,
        }
    }
    /// Float attribute.
    pub fn attr_f(&self, name: &str) -> Option<f32> {
        match self.attrs.get(name)? {
            Attr::Float(v) => Some(*v),
            Attr::Int(v) => Some(*v as f32),
            _ => None,
        }
    }
    /// String attribute (lossy UTF-8).
    pub fn attr_s(&self, name: &str) -> Option<String> {
        match self.attrs.get(name)? {
            Attr::String(v) => Some(String::from_utf8_lossy(v).into_owned()),
            _ => None,
        }
    }
    /// Integer list attribute.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attrs.get(name)? {
            Attr::Ints(v) => Some(v),
            _ => None,
        }
    }
    /// Float list attribute.
    pub fn attr_floats(&self, name: &str) -> Option<&[f32]> {
        match self.attrs.get(name)? {
            Attr::Floats(v) => Some(v),
            _ => None,
        }
    }
    /// Tensor attribute.
    pub fn attr_t(&self, name: &str) -> Option<&Tensor> {
        match self.attrs.get(name)? {
            Attr::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// Graph attribute.
    pub fn attr_g(&self, name: &str) -> Option<&Graph> {
        match self.attrs.get(name)? {
            Attr::Graph(g) => Some(g),
            _ => None,
        }
    }
    /// `Conv "conv1"` — how errors name a node.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.op.clone()
        } else {
            format!("{} \"{}\"", self.op, self.name)
        }
    }
}

/// A dataflow graph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub values: Vec<ValueInfo>,
    /// Graph inputs that callers feed (initializers excluded).
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Constant values, by id. May point into the mapped model file.
    pub initializers: HashMap<ValueId, Tensor>,
    /// Opset version per domain (`""` is the default ONNX domain).
    pub opsets: BTreeMap<String, i64>,
    /// Free-form model metadata (producer, version, `metadata_props`, TFLite signature names...).
    pub metadata: BTreeMap<String, String>,
    names: HashMap<String, ValueId>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Opset of the default domain (0 when unknown).
    pub fn opset(&self) -> i64 {
        self.opsets.get("").copied().unwrap_or(0)
    }

    /// The id of the value named `name`, created if new.
    pub fn value_id(&mut self, name: &str) -> ValueId {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.values.len();
        self.values.push(ValueInfo {
            name: name.to_string(),
            ..Default::default()
        });
        self.names.insert(name.to_string(), id);
        id
    }

    /// A fresh value with a unique name derived from `hint`.
    pub fn new_value(&mut self, hint: &str) -> ValueId {
        let mut name = hint.to_string();
        let mut k = 0;
        while self.names.contains_key(&name) {
            k += 1;
            name = format!("{hint}_{k}");
        }
        self.value_id(&name)
    }

    /// Look a value up by name.
    pub fn find_value(&self, name: &str) -> Option<ValueId> {
        self.names.get(name).copied()
    }

    /// Rebuild the name index (after editing `values` directly).
    pub fn reindex_names(&mut self) {
        self.names = self
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
    }

    /// Name of a value.
    pub fn value_name(&self, id: ValueId) -> &str {
        self.values
            .get(id)
            .map(|v| v.name.as_str())
            .unwrap_or("<?>")
    }

    /// `node 17 (Conv "conv1")`.
    pub fn describe_node(&self, id: NodeId) -> String {
        match self.nodes.get(id) {
            Some(n) => format!("node {id} ({})", n.label()),
            None => format!("node {id}"),
        }
    }

    /// Which node produces each value (None for inputs, initializers and undefined values).
    pub fn producers(&self) -> Vec<Option<NodeId>> {
        let mut p = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                p[*o] = Some(i);
            }
        }
        p
    }

    /// Which nodes consume each value.
    pub fn consumers(&self) -> Vec<Vec<NodeId>> {
        let mut c = vec![Vec::new(); self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                if !c[*v].contains(&i) {
                    c[*v].push(i);
                }
            }
        }
        c
    }

    /// Check the structure: ids in range, one producer per value, every node input defined
    /// (graph input, initializer, outer-scope name or a node output), graph outputs defined.
    /// `outer` lists names visible from an enclosing graph (for subgraphs).
    pub fn validate_with_outer(&self, outer: &dyn Fn(&str) -> bool) -> Result<()> {
        let nv = self.values.len();
        let mut defined = vec![false; nv];
        for &i in &self.inputs {
            if i >= nv {
                return Err(Error::InvalidGraph(format!(
                    "graph input id {i} out of range"
                )));
            }
            defined[i] = true;
        }
        for &i in self.initializers.keys() {
            if i >= nv {
                return Err(Error::InvalidGraph(format!(
                    "initializer id {i} out of range"
                )));
            }
            defined[i] = true;
        }
        let mut produced_by: Vec<Option<NodeId>> = vec![None; nv];
        for (ni, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                if *o >= nv {
                    return Err(Error::InvalidGraph(format!(
                        "{}: output id out of range",
                        self.describe_node(ni)
                    )));
                }
                if let Some(prev) = produced_by[*o] {
                    return Err(Error::InvalidGraph(format!(
                        "{}: output '{}' is already produced by {}",
                        self.describe_node(ni),
                        self.values[*o].name,
                        self.describe_node(prev)
                    )));
                }
                if defined[*o] && !self.initializers.contains_key(o) {
                    return Err(Error::InvalidGraph(format!(
                        "{}: output '{}' is also a graph input",
                        self.describe_node(ni),
                        self.values[*o].name
                    )));
                }
                produced_by[*o] = Some(ni);
            }
        }
        for (ni, n) in self.nodes.iter().enumerate() {
            for (k, i) in n.inputs.iter().enumerate() {
                let Some(i) = *i else { continue };
                if i >= nv {
                    return Err(Error::InvalidGraph(format!(
                        "{}: input {k} id out of range",
                        self.describe_node(ni)
                    )));
                }
                if !defined[i] && produced_by[i].is_none() && !outer(&self.values[i].name) {
                    return Err(Error::InvalidGraph(format!(
                        "{}: input {k} '{}' is not produced by any node, initializer or graph input",
                        self.describe_node(ni),
                        self.values[i].name
                    )));
                }
            }
        }
        for &o in &self.outputs {
            if o >= nv || (!defined[o] && produced_by[o].is_none() && !outer(&self.values[o].name))
            {
                return Err(Error::InvalidGraph(format!(
                    "graph output '{}' is never produced",
                    self.values.get(o).map(|v| v.name.as_str()).unwrap_or("?")
                )));
            }
        }
        self.topo_order().map(|_| ())
    }

    /// [`Graph::validate_with_outer`] for a top-level graph.
    pub fn validate(&self) -> Result<()> {
        self.validate_with_outer(&|_| false)
    }

    /// Nodes in an order where every node comes after the producers of its inputs (stable:
    /// keeps file order where possible). Fails on a cycle, naming a node on it.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let producers = self.producers();
        let n = self.nodes.len();
        let mut indeg = vec![0usize; n];
        let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); n];
        for (i, node) in self.nodes.iter().enumerate() {
            let mut deps: Vec<NodeId> = node
                .inputs
                .iter()
                .flatten()
                .filter_map(|v| producers.get(*v).copied().flatten())
                .collect();
            deps.sort_unstable();
            deps.dedup();
            for d in deps {
                indeg[i] += 1;
                users[d].push(i);
            }
        }
        // Min-heap on node index keeps the file's order when it is already valid.
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<NodeId>> = (0..n)
            .filter(|&i| indeg[i] == 0)
            .map(std::cmp::Reverse)
            .collect();
        let mut order = Vec::with_capacity(n);
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &u in &users[i] {
                indeg[u] -= 1;
                if indeg[u] == 0 {
                    ready.push(std::cmp::Reverse(u));
                }
            }
        }
        if order.len() != n {
            let stuck = (0..n).find(|&i| indeg[i] > 0).unwrap_or(0);
            return Err(Error::InvalidGraph(format!(
                "{} is part of a cycle",
                self.describe_node(stuck)
            )));
        }
        Ok(order)
    }

    /// Reorder `nodes` topologically.
    pub fn sort_nodes(&mut self) -> Result<()> {
        let order = self.topo_order()?;
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order.into_iter().filter_map(|i| old[i].take()).collect();
        Ok(())
    }

    /// Remove nodes none of whose outputs reach a graph output. Returns how many were removed.
    /// Nodes with subgraphs are kept conservatively only when live, like any other.
    pub fn remove_dead_nodes(&mut self) -> usize {
        let producers = self.producers();
        let mut live_val = vec![false; self.values.len()];
        let mut live_node = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = self.outputs.clone();
        while let Some(v) = stack.pop() {
            if v >= live_val.len() || live_val[v] {
                continue;
            }
            live_val[v] = true;
            if let Some(Some(p)) = producers.get(v) {
                if !live_node[*p] {
                    live_node[*p] = true;
                    stack.extend(self.nodes[*p].inputs.iter().flatten().copied());
                    // Names a subgraph captures from this scope are live too.
                    for a in self.nodes[*p].attrs.values() {
                        let subs: Vec<&Graph> = match a {
                            Attr::Graph(g) => vec![g],
                            Attr::Graphs(gs) => gs.iter().collect(),
                            _ => vec![],
                        };
                        for g in subs {
                            for name in g.captured_names() {
                                if let Some(id) = self.find_value(&name) {
                                    stack.push(id);
                                }
                            }
                        }
                    }
                }
            }
        }
        let before = self.nodes.len();
        let mut k = 0;
        self.nodes.retain(|_| {
            let keep = live_node[k];
            k += 1;
            keep
        });
        let inits: Vec<ValueId> = self.initializers.keys().copied().collect();
        for i in inits {
            if !live_val[i] && !self.inputs.contains(&i) {
                self.initializers.remove(&i);
            }
        }
        before - self.nodes.len()
    }

    /// Names used inside this graph (and nested ones) that it does not define itself: what a
    /// subgraph captures from its enclosing scope.
    pub fn captured_names(&self) -> Vec<String> {
        let mut defined: std::collections::HashSet<ValueId> = self.inputs.iter().copied().collect();
        defined.extend(self.initializers.keys().copied());
        for n in &self.nodes {
            defined.extend(n.outputs.iter().flatten().copied());
        }
        let mut out = Vec::new();
        for n in &self.nodes {
            for i in n.inputs.iter().flatten() {
                if !defined.contains(i) {
                    out.push(self.values[*i].name.clone());
                }
            }
            for a in n.attrs.values() {
                let subs: Vec<&Graph> = match a {
                    Attr::Graph(g) => vec![g],
                    Attr::Graphs(gs) => gs.iter().collect(),
                    _ => vec![],
                };
                for g in subs {
                    for name in g.captured_names() {
                        if self
                            .find_value(&name)
                            .map(|id| !defined.contains(&id))
                            .unwrap_or(true)
                        {
                            out.push(name);
                        }
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Add a node; returns its id.
    pub fn add_node(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(g: &mut Graph, op: &str, ins: &[&str], outs: &[&str]) {
        let inputs = ins.iter().map(|n| Some(g.value_id(n))).collect();
        let outputs = outs.iter().map(|n| Some(g.value_id(n))).collect();
        g.add_node(Node {
            op: op.into(),
            inputs,
            outputs,
            ..Default::default()
        });
    }

    #[test]
    fn topo_sorts_out_of_order_nodes() {
        let mut g = Graph::new("t");
        let x = g.value_id("x");
        g.inputs.push(x);
        node(&mut g, "Relu", &["a"], &["b"]);
        node(&mut g, "Neg", &["x"], &["a"]);
        let b = g.value_id("b");
        g.outputs.push(b);
        g.validate().unwrap();
        assert_eq!(g.topo_order().unwrap(), vec![1, 0]);
    }

    #[test]
    fn cycle_is_reported_with_node() {
        let mut g = Graph::new("t");
        node(&mut g, "Relu", &["b"], &["a"]);
        node(&mut g, "Neg", &["a"], &["b"]);
        let e = g.topo_order().unwrap_err().to_string();
        assert!(e.contains("cycle") && e.contains("node 0 (Relu)"), "{e}");
    }

    #[test]
    fn missing_input_is_named() {
        let mut g = Graph::new("t");
        node(&mut g, "Relu", &["nowhere"], &["a"]);
        let a = g.value_id("a");
        g.outputs.push(a);
        let e = g.validate().unwrap_err().to_string();
        assert!(
            e.contains("'nowhere'") && e.contains("node 0 (Relu)"),
            "{e}"
        );
    }

    #[test]
    fn dead_nodes_are_removed() {
        let mut g = Graph::new("t");
        let x = g.value_id("x");
        g.inputs.push(x);
        node(&mut g, "Relu", &["x"], &["a"]);
        node(&mut g, "Neg", &["x"], &["unused"]);
        let a = g.value_id("a");
        g.outputs.push(a);
        assert_eq!(g.remove_dead_nodes(), 1);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].op, "Relu");
    }
}
