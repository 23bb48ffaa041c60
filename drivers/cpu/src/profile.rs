//! Per-node timing of the CPU executor, for finding where a model's time goes.
//!
//! Enabled with `EDGEHAL_OP_PROFILE=1`: every executor then times each node it runs and, when
//! dropped, prints one line per op type (total ms, calls, share of the total) to stderr, the
//! slowest first; convolutions are split by kind (`dw` grouped, `1x1`, `3x3`..., stride,
//! `+res` with a fused residual). `EDGEHAL_OP_PROFILE=node` prints one line per node instead,
//! in graph order. Off by default; when off the executor pays one branch per node.

use std::sync::Mutex;
use std::time::Duration;

use edgehal_core::{Graph, Node};

/// Accumulated node times of one executor.
pub struct OpProfile {
    labels: Vec<String>,
    /// One line per node (`EDGEHAL_OP_PROFILE=node`) instead of per label.
    per_node: bool,
    totals: Mutex<Vec<(Duration, u64)>>,
}

impl OpProfile {
    /// A profile for `graph` when `EDGEHAL_OP_PROFILE=1`, otherwise `None`.
    pub fn from_env(graph: &Graph) -> Option<OpProfile> {
        match std::env::var("EDGEHAL_OP_PROFILE").as_deref() {
            Ok("1") => Some(Self::new(graph)),
            Ok("node") => Some(OpProfile {
                labels: graph
                    .nodes
                    .iter()
                    .map(|n| format!("{} {}", label_of(n), n.name))
                    .collect(),
                per_node: true,
                totals: Mutex::new(vec![(Duration::ZERO, 0); graph.nodes.len()]),
            }),
            _ => None,
        }
    }

    /// A profile for `graph`, labelling nodes by op type (convolutions by kind).
    pub fn new(graph: &Graph) -> OpProfile {
        OpProfile {
            labels: graph.nodes.iter().map(label_of).collect(),
            per_node: false,
            totals: Mutex::new(vec![(Duration::ZERO, 0); graph.nodes.len()]),
        }
    }

    /// Adds one run of node `n`.
    pub fn add(&self, n: usize, d: Duration) {
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = t.get_mut(n) {
            e.0 += d;
            e.1 += 1;
        }
    }

    /// `(label, total, calls)` per label, the slowest first (per node, in order, with
    /// `EDGEHAL_OP_PROFILE=node`).
    pub fn by_op(&self) -> Vec<(String, Duration, u64)> {
        let t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        if self.per_node {
            return self
                .labels
                .iter()
                .zip(t.iter())
                .filter(|(_, e)| e.1 > 0)
                .map(|(l, e)| (l.clone(), e.0, e.1))
                .collect();
        }
        let mut m: Vec<(String, Duration, u64)> = Vec::new();
        for (label, (d, c)) in self.labels.iter().zip(t.iter()) {
            match m.iter_mut().find(|e| &e.0 == label) {
                Some(e) => {
                    e.1 += *d;
                    e.2 += *c;
                }
                None => m.push((label.clone(), *d, *c)),
            }
        }
        m.retain(|e| e.2 > 0);
        m.sort_by_key(|e| std::cmp::Reverse(e.1));
        m
    }
}

/// The profile label of a node: its op type; for convolutions also the kind (`dw` for
/// grouped, else the kernel size), the stride when not 1 and `+res` for a fused residual.
fn label_of(n: &Node) -> String {
    if n.op != "Conv" && n.op != "FusedConv" && n.op != "FusedConvNhwc" {
        return n.op.clone();
    }
    let mut l = n.op.clone();
    let ks = n.attr_ints("kernel_shape").unwrap_or_default();
    let ks: Vec<String> = ks.iter().map(|k| k.to_string()).collect();
    if n.attr_i("group").unwrap_or(1) > 1 {
        l.push_str(" dw");
    }
    if !ks.is_empty() {
        l.push(' ');
        l.push_str(&ks.join("x"));
    }
    if let Some(s) = n.attr_ints("strides") {
        if s.iter().any(|&v| v != 1) {
            l.push_str(&format!(" s{}", s[0]));
        }
    }
    if n.inputs.get(3).is_some_and(|v| v.is_some()) {
        l.push_str(" +res");
    }
    l
}

impl Drop for OpProfile {
    fn drop(&mut self) {
        let rows = self.by_op();
        let total: Duration = rows.iter().map(|r| r.1).sum();
        if total.is_zero() {
            return;
        }
        eprintln!(
            "op profile ({:.3} ms in all nodes):",
            total.as_secs_f64() * 1e3
        );
        for (op, d, c) in rows {
            eprintln!(
                "  {op:<24} {:>10.3} ms {c:>8} calls {:>5.1}%",
                d.as_secs_f64() * 1e3,
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            );
        }
    }
}
