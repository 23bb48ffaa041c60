//! Per-node timing of the CPU executor, for finding where a model's time goes.
//!
//! Enabled with `EDGEHAL_OP_PROFILE=1`: every executor then times each node it runs and, when
//! dropped, prints one line per op type (total ms, calls, share of the total) to stderr, the
//! slowest first. Off by default; when off the executor pays one branch per node.

use std::sync::Mutex;
use std::time::Duration;

use edgehal_core::Graph;

/// Accumulated node times of one executor.
pub struct OpProfile {
    labels: Vec<String>,
    totals: Mutex<Vec<(Duration, u64)>>,
}

impl OpProfile {
    /// A profile for `graph` when `EDGEHAL_OP_PROFILE=1`, otherwise `None`.
    pub fn from_env(graph: &Graph) -> Option<OpProfile> {
        if std::env::var("EDGEHAL_OP_PROFILE").is_ok_and(|v| v == "1") {
            Some(Self::new(graph))
        } else {
            None
        }
    }

    /// A profile for `graph`, labelling nodes by op type.
    pub fn new(graph: &Graph) -> OpProfile {
        OpProfile {
            labels: graph.nodes.iter().map(|n| n.op.clone()).collect(),
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

    /// `(op type, total, calls)` per op type, the slowest first.
    pub fn by_op(&self) -> Vec<(String, Duration, u64)> {
        let t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
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
