//! The partitioner: assign every node to a device so that the end-to-end latency of one
//! inference, transfers included, is as small as possible.
//!
//! Cost model (the same one [`Problem::cost`] evaluates and the brute-force tests check):
//! one request runs its nodes one after another (parallelism comes from pipelining several
//! requests, see the scheduler), so its latency is the sum of the chosen nodes' measured times,
//! plus each segment's fixed cost (a segment is a maximal run of the topological order on one
//! device; [`Problem::segment_ms`]), plus, for every value, one transfer from where it is produced to each *distinct* place that
//! reads it. Graph inputs start on, and graph outputs end on, the host (location
//! `n_devices`). The request's fixed cost (the same for every assignment) is added by the
//! plan, not here.
//!
//! Search: chains are solved exactly by a Viterbi-style dynamic programme over the topological
//! order. For DAGs the same programme is run with path-dependent edge costs (each state keeps
//! a small beam of best paths, so edges from any earlier node are priced), then refined by
//! local moves — contiguous segments of the topological order (single nodes included) and
//! pairs of nodes — to a fixed point, also starting from every feasible single-device
//! assignment; the best result wins.
//! Small problems (`n_devices^n_nodes` up to [`EXACT_LIMIT`]) are solved exactly by branch and
//! bound instead.

use crate::{Error, Result};

/// Search-space size up to which [`partition`] solves exactly.
pub const EXACT_LIMIT: f64 = 2.0e5;

/// Time to move `bytes` bytes between two places: `fixed_ms + bytes * per_byte_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TransferCost {
    pub fixed_ms: f64,
    pub per_byte_ms: f64,
}

impl TransferCost {
    /// Free (shared memory).
    pub const ZERO: TransferCost = TransferCost {
        fixed_ms: 0.0,
        per_byte_ms: 0.0,
    };
    /// Milliseconds for `bytes`.
    pub fn ms(&self, bytes: u64) -> f64 {
        self.fixed_ms + self.per_byte_ms * bytes as f64
    }
}

/// A value of the graph as the partitioner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    /// Producing node, or `None` for a graph input (lives on the host).
    pub producer: Option<usize>,
    /// Nodes that read it.
    pub consumers: Vec<usize>,
    /// True when it is a graph output (must reach the host).
    pub to_host: bool,
    pub bytes: u64,
}

/// A partitioning problem.
#[derive(Clone, Debug)]
pub struct Problem {
    pub n_devices: usize,
    /// `cost[node][device]`: measured milliseconds, `None` where the device cannot (or may
    /// not) run the node. Nodes are numbered in a topological order.
    pub cost: Vec<Vec<Option<f64>>>,
    pub values: Vec<Value>,
    /// `transfer[from][to]` over locations `0..=n_devices` (the last is the host).
    pub transfer: Vec<Vec<TransferCost>>,
    /// Fixed cost of one segment (a maximal run of the topological order on one device) per
    /// device; empty means none.
    pub segment_ms: Vec<f64>,
}

impl Problem {
    /// Number of nodes.
    pub fn n_nodes(&self) -> usize {
        self.cost.len()
    }

    fn host(&self) -> usize {
        self.n_devices
    }

    /// Segment cost charged when node `n` on device `d` starts a segment (`prev` is the
    /// device of node `n - 1`).
    fn segment_start(&self, prev: Option<usize>, d: usize) -> f64 {
        if prev == Some(d) {
            0.0
        } else {
            self.segment_ms.get(d).copied().unwrap_or(0.0)
        }
    }

    fn check(&self) -> Result<()> {
        let locs = self.n_devices + 1;
        if self.transfer.len() != locs || self.transfer.iter().any(|r| r.len() != locs) {
            return Err(Error::arg(format!(
                "partition: transfer table must be {locs}x{locs} (devices + host)"
            )));
        }
        if !self.segment_ms.is_empty() && self.segment_ms.len() != self.n_devices {
            return Err(Error::arg(format!(
                "partition: {} segment costs for {} devices",
                self.segment_ms.len(),
                self.n_devices
            )));
        }
        if self.segment_ms.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err(Error::arg(
                "partition: segment costs must be finite and not negative",
            ));
        }
        for (n, row) in self.cost.iter().enumerate() {
            if row.len() != self.n_devices {
                return Err(Error::arg(format!(
                    "partition: node {n} has {} costs for {} devices",
                    row.len(),
                    self.n_devices
                )));
            }
            if row.iter().all(|c| c.is_none()) {
                return Err(Error::unsupported(format!(
                    "partition: no allowed device can run node {n}"
                )));
            }
        }
        for (i, v) in self.values.iter().enumerate() {
            let bad = |n: usize| n >= self.n_nodes();
            if v.producer.is_some_and(bad) || v.consumers.iter().copied().any(bad) {
                return Err(Error::arg(format!(
                    "partition: value {i} names a missing node"
                )));
            }
            if let Some(p) = v.producer {
                if v.consumers.iter().any(|&c| c <= p) {
                    return Err(Error::arg(format!(
                        "partition: value {i} is read before it is produced (nodes must be in \
                         topological order)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Transfer cost of one value given where its producer and consumers run (`None` for
    /// consumers not yet assigned: they are ignored).
    fn value_cost(&self, v: &Value, at: &dyn Fn(usize) -> Option<usize>) -> f64 {
        let from = match v.producer {
            Some(p) => match at(p) {
                Some(d) => d,
                None => return 0.0,
            },
            None => self.host(),
        };
        let mut seen = [false; 64];
        let mut extra: Vec<usize> = Vec::new();
        let mut total = 0.0;
        let mut visit = |to: usize, total: &mut f64| {
            if to == from {
                return;
            }
            let first = if to < 64 {
                !std::mem::replace(&mut seen[to], true)
            } else if extra.contains(&to) {
                false
            } else {
                extra.push(to);
                true
            };
            if first {
                *total += self.transfer[from][to].ms(v.bytes);
            }
        };
        for &c in &v.consumers {
            if let Some(d) = at(c) {
                visit(d, &mut total);
            }
        }
        if v.to_host {
            visit(self.host(), &mut total);
        }
        total
    }

    /// End-to-end latency of a full assignment (`f64::INFINITY` if a node is on a device that
    /// cannot run it).
    pub fn cost(&self, assign: &[usize]) -> f64 {
        let mut t = 0.0;
        for (n, &d) in assign.iter().enumerate() {
            match self.cost.get(n).and_then(|r| r.get(d)).copied().flatten() {
                Some(c) => t += c,
                None => return f64::INFINITY,
            }
            let prev = n.checked_sub(1).map(|p| assign[p]);
            t += self.segment_start(prev, d);
        }
        for v in &self.values {
            t += self.value_cost(v, &|n| assign.get(n).copied());
        }
        t
    }

    /// Cost of the first `k` nodes of an assignment: their times plus transfers whose both
    /// ends are among them. Never decreases as `k` grows (a lower bound for branch and bound).
    fn partial_cost(&self, assign: &[usize], k: usize) -> f64 {
        let mut t = 0.0;
        for (n, &d) in assign.iter().enumerate().take(k) {
            t += self.cost[n][d].unwrap_or(f64::INFINITY);
            let prev = n.checked_sub(1).map(|p| assign[p]);
            t += self.segment_start(prev, d);
        }
        for v in &self.values {
            t += self.value_cost(v, &|n| if n < k { Some(assign[n]) } else { None });
        }
        t
    }

    /// True when every value has at most one consumer, which is the next node.
    pub fn is_chain(&self) -> bool {
        self.values.iter().all(|v| match v.producer {
            Some(p) => v.consumers.iter().all(|&c| c == p + 1),
            None => true,
        })
    }
}

/// A solved assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct Solution {
    /// Device per node.
    pub assign: Vec<usize>,
    /// Predicted end-to-end milliseconds.
    pub cost: f64,
    /// How it was found (`exact`, `chain-dp`, `dp+refine`).
    pub method: &'static str,
}

/// Solve `p`: exact when the search space is small or the graph is a chain, otherwise the
/// dynamic programme plus local refinement.
pub fn partition(p: &Problem) -> Result<Solution> {
    p.check()?;
    if p.n_nodes() == 0 {
        return Ok(Solution {
            assign: vec![],
            cost: p.cost(&[]),
            method: "exact",
        });
    }
    if p.is_chain() {
        let assign = dp(p);
        return Ok(Solution {
            cost: p.cost(&assign),
            assign,
            method: "chain-dp",
        });
    }
    if (p.n_devices as f64).powi(p.n_nodes() as i32) <= EXACT_LIMIT {
        return exact(p);
    }
    heuristic(p)
}

/// The dynamic programme plus refinement, whatever the size (what [`partition`] uses on
/// large DAGs; tests compare it with [`exact`]).
pub fn heuristic(p: &Problem) -> Result<Solution> {
    p.check()?;
    let mut best = refine(p, dp(p));
    let mut best_cost = p.cost(&best);
    for d in 0..p.n_devices {
        if p.cost.iter().all(|r| r[d].is_some()) {
            let a = refine(p, vec![d; p.n_nodes()]);
            let c = p.cost(&a);
            if c < best_cost {
                best = a;
                best_cost = c;
            }
        }
    }
    Ok(Solution {
        assign: best,
        cost: best_cost,
        method: "dp+refine",
    })
}

/// Paths kept per (node, device) state by the dynamic programme on DAGs.
const BEAM: usize = 8;

/// Viterbi over the topological order; each state carries its best paths (a beam of
/// [`BEAM`]) so edges from any earlier node are priced against them. Exact for chains (the
/// best path per state suffices there).
fn dp(p: &Problem) -> Vec<usize> {
    let n = p.n_nodes();
    let nd = p.n_devices;
    let beam = if p.is_chain() { 1 } else { BEAM };
    // states[d]: up to `beam` (cost so far, path) with the current node on device d.
    let mut states: Vec<Vec<(f64, Vec<usize>)>> = vec![vec![(0.0, vec![])]];
    for i in 0..n {
        let mut next: Vec<Vec<(f64, Vec<usize>)>> = vec![Vec::new(); nd];
        for (d, slot) in next.iter_mut().enumerate() {
            if p.cost[i][d].is_none() {
                continue;
            }
            for prev in states.iter().flatten() {
                let mut path = prev.1.clone();
                path.push(d);
                let total = p.partial_cost(&path, i + 1);
                slot.push((total, path));
            }
            slot.sort_by(|a, b| a.0.total_cmp(&b.0));
            slot.dedup_by(|a, b| a.1 == b.1);
            slot.truncate(beam);
        }
        states = next;
    }
    let mut best: Option<(f64, Vec<usize>)> = None;
    for (_, path) in states.into_iter().flatten() {
        let c = p.cost(&path);
        if best.as_ref().is_none_or(|b| c < b.0) {
            best = Some((c, path));
        }
    }
    best.map(|b| b.1).unwrap_or_default()
}

/// Local moves to a fixed point: every contiguous segment of the topological order (single
/// nodes included) moved to one device, and every pair of nodes moved together.
fn refine(p: &Problem, mut a: Vec<usize>) -> Vec<usize> {
    let n = p.n_nodes();
    let nd = p.n_devices;
    let mut cur = p.cost(&a);
    let try_it = |b: Vec<usize>, a: &mut Vec<usize>, cur: &mut f64| -> bool {
        let c = p.cost(&b);
        if c < *cur - 1e-12 {
            *a = b;
            *cur = c;
            true
        } else {
            false
        }
    };
    loop {
        let mut improved = false;
        for len in 1..=n {
            for start in 0..=(n - len) {
                for d in 0..nd {
                    if (start..start + len).any(|k| p.cost[k][d].is_none())
                        || (start..start + len).all(|k| a[k] == d)
                    {
                        continue;
                    }
                    let mut b = a.clone();
                    b[start..start + len].iter_mut().for_each(|x| *x = d);
                    improved |= try_it(b, &mut a, &mut cur);
                }
            }
        }
        for i in 0..n {
            for j in i + 1..n {
                for di in 0..nd {
                    for dj in 0..nd {
                        if p.cost[i][di].is_none()
                            || p.cost[j][dj].is_none()
                            || (a[i] == di && a[j] == dj)
                        {
                            continue;
                        }
                        let mut b = a.clone();
                        b[i] = di;
                        b[j] = dj;
                        improved |= try_it(b, &mut a, &mut cur);
                    }
                }
            }
        }
        if !improved {
            return a;
        }
    }
}

/// Exact optimum by branch and bound over the topological order (exponential: small
/// problems and tests only).
pub fn exact(p: &Problem) -> Result<Solution> {
    p.check()?;
    let n = p.n_nodes();
    // Start from the heuristic's answer so pruning bites early.
    let start = refine(p, dp(p));
    let mut best = (p.cost(&start), start);
    let mut a = vec![0usize; n];
    fn go(p: &Problem, a: &mut Vec<usize>, k: usize, best: &mut (f64, Vec<usize>)) {
        if k == a.len() {
            let c = p.cost(a);
            if c < best.0 {
                *best = (c, a.clone());
            }
            return;
        }
        for d in 0..p.n_devices {
            if p.cost[k][d].is_none() {
                continue;
            }
            a[k] = d;
            if p.partial_cost(a, k + 1) >= best.0 {
                continue;
            }
            go(p, a, k + 1, best);
        }
    }
    go(p, &mut a, 0, &mut best);
    Ok(Solution {
        assign: best.1,
        cost: best.0,
        method: "exact",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(costs: Vec<Vec<Option<f64>>>, t: f64) -> Problem {
        let n = costs.len();
        let nd = costs[0].len();
        let mut values = vec![Value {
            producer: None,
            consumers: vec![0],
            to_host: false,
            bytes: 100,
        }];
        for i in 0..n {
            values.push(Value {
                producer: Some(i),
                consumers: if i + 1 < n { vec![i + 1] } else { vec![] },
                to_host: i + 1 == n,
                bytes: 100,
            });
        }
        let mut transfer = vec![vec![TransferCost::ZERO; nd + 1]; nd + 1];
        for (i, row) in transfer.iter_mut().enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                if i != j {
                    c.fixed_ms = t;
                }
            }
        }
        Problem {
            n_devices: nd,
            cost: costs,
            values,
            transfer,
            segment_ms: vec![],
        }
    }

    #[test]
    fn chain_prefers_staying_put_when_transfers_cost_more() {
        let c = vec![
            vec![Some(1.0), Some(2.0)],
            vec![Some(2.0), Some(1.5)],
            vec![Some(1.0), Some(2.0)],
        ];
        let p = chain(c.clone(), 1.0);
        let s = partition(&p).unwrap();
        assert_eq!(s.method, "chain-dp");
        // Moving node 1 saves 0.5 but costs two transfers of 1.0 each.
        assert_eq!(s.assign, vec![0, 0, 0]);
        // Host <-> device 0 transfers: in and out, 2.0; nodes 4.0.
        assert!((s.cost - 6.0).abs() < 1e-9, "{}", s.cost);
        let p = chain(c, 0.1);
        assert_eq!(partition(&p).unwrap().assign, vec![0, 1, 0]);
    }

    #[test]
    fn unsupported_everywhere_is_an_error() {
        let p = chain(vec![vec![None, None]], 0.0);
        let e = partition(&p).unwrap_err().to_string();
        assert!(e.contains("no allowed device can run node 0"), "{e}");
    }
}
