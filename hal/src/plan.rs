//! Plans: a partition turned into segments (maximal runs of the topological order on one
//! device), the transfers between them and the predicted total, with an explanation per node.

use std::collections::HashMap;
use std::fmt::Write as _;

use edgehal_core::driver::Subgraph;
use edgehal_core::graph::{Graph, NodeId};

use crate::partition::{self, Solution};
use crate::profile::Profile;
use crate::{Error, Result};

/// Consecutive nodes (in topological order) on one device.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Index into [`Plan::devices`].
    pub device: usize,
    pub nodes: Vec<NodeId>,
    pub sub: Subgraph,
    /// Sum of the nodes' measured times plus the device's fixed cost of a segment (submission
    /// and the scheduler's hand-offs).
    pub predicted_ms: f64,
}

/// A value moved between locations.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub value: String,
    /// Device name or `host`.
    pub from: String,
    pub to: String,
    pub bytes: u64,
    pub predicted_ms: f64,
}

/// Per node: where it runs and what it measured everywhere.
#[derive(Clone, Debug)]
pub struct NodeChoice {
    pub node: NodeId,
    pub label: String,
    pub device: usize,
    /// Measured ms per device (`None`: unsupported there, see `reasons`).
    pub times: Vec<Option<f64>>,
    pub reasons: Vec<Option<String>>,
}

/// An executable, explainable assignment of a graph to devices.
#[derive(Clone, Debug)]
pub struct Plan {
    pub devices: Vec<String>,
    /// Device per node (graph numbering).
    pub assign: Vec<usize>,
    pub segments: Vec<Segment>,
    pub transfers: Vec<Transfer>,
    /// In topological order.
    pub nodes: Vec<NodeChoice>,
    /// Nodes + segments + transfers + [`Plan::request_ms`].
    pub predicted_ms: f64,
    /// Fixed cost of one segment per device (ms: the device's submission and completion plus
    /// [`Plan::dispatch_ms`]), included in the predictions.
    pub segment_ms: Vec<f64>,
    /// Of `segment_ms`, what the scheduler's hand-offs add per segment (ms, per device).
    pub dispatch_ms: Vec<f64>,
    /// Fixed cost of one request through the scheduler (ms), included in `predicted_ms`.
    pub request_ms: f64,
    /// `exact`, `chain-dp`, `dp+refine` or `single-device`.
    pub method: String,
}

/// Which devices a plan may use and which nodes are pinned.
#[derive(Clone, Debug, Default)]
pub struct PlanConstraints {
    /// Device names not to use.
    pub exclude: Vec<String>,
    /// Node (index, or node name) -> device name.
    pub pins: Vec<(String, String)>,
}

fn loc_name(p: &Profile, l: usize) -> String {
    p.devices.get(l).cloned().unwrap_or_else(|| "host".into())
}

impl Plan {
    /// Best plan under `c`.
    pub fn choose(g: &Graph, p: &Profile, c: &PlanConstraints) -> Result<Plan> {
        let nd = p.devices.len();
        let dev_index = |name: &str| -> Result<usize> {
            p.devices.iter().position(|d| d == name).ok_or_else(|| {
                Error::arg(format!(
                    "no device '{name}' (devices: {})",
                    p.devices.join(", ")
                ))
            })
        };
        let mut allowed = vec![true; nd];
        for e in &c.exclude {
            allowed[dev_index(e)?] = false;
        }
        let mut pins = HashMap::new();
        for (node, dev) in &c.pins {
            let n = match node.parse::<usize>() {
                Ok(i) if i < g.nodes.len() => i,
                _ => g
                    .nodes
                    .iter()
                    .position(|x| x.name == *node)
                    .ok_or_else(|| Error::arg(format!("no node '{node}' to pin")))?,
            };
            pins.insert(n, dev_index(dev)?);
        }
        let prob = p.problem(g, &allowed, &pins);
        for (i, row) in prob.cost.iter().enumerate() {
            if row.iter().all(|c| c.is_none()) {
                let n = p.order[i];
                let why: Vec<String> = (0..nd)
                    .map(|d| {
                        let r = if !allowed[d] {
                            "excluded".to_string()
                        } else if pins.get(&n).is_some_and(|&x| x != d) {
                            "node pinned elsewhere".to_string()
                        } else {
                            p.reasons[n][d]
                                .clone()
                                .unwrap_or_else(|| "no timing".into())
                        };
                        format!("{}: {r}", p.devices[d])
                    })
                    .collect();
                return Err(Error::unsupported(format!(
                    "no allowed device runs {} ({})",
                    g.describe_node(n),
                    why.join("; ")
                )));
            }
        }
        let sol = partition::partition(&prob)?;
        Plan::from_solution(g, p, &sol)
    }

    /// Everything on device `d`, if it runs every node.
    pub fn single_device(g: &Graph, p: &Profile, d: usize) -> Option<Plan> {
        let mut allowed = vec![false; p.devices.len()];
        *allowed.get_mut(d)? = true;
        let prob = p.problem(g, &allowed, &HashMap::new());
        if prob.cost.iter().any(|r| r[d].is_none()) {
            return None;
        }
        let assign = vec![d; prob.n_nodes()];
        let sol = Solution {
            cost: prob.cost(&assign),
            assign,
            method: "single-device",
        };
        Plan::from_solution(g, p, &sol).ok()
    }

    /// Build segments and transfers from a solution over [`Profile::order`].
    pub fn from_solution(g: &Graph, p: &Profile, sol: &Solution) -> Result<Plan> {
        if sol.assign.len() != p.order.len() {
            return Err(Error::arg(format!(
                "plan: {} assignments for {} nodes",
                sol.assign.len(),
                p.order.len()
            )));
        }
        let mut assign = vec![0usize; g.nodes.len()];
        for (i, &n) in p.order.iter().enumerate() {
            assign[n] = sol.assign[i];
        }
        let mut segments: Vec<Segment> = Vec::new();
        let mut run: Vec<NodeId> = Vec::new();
        let flush = |run: &mut Vec<NodeId>, segments: &mut Vec<Segment>| -> Result<()> {
            if let Some(&first) = run.first() {
                let device = assign[first];
                let predicted_ms = run.iter().filter_map(|&n| p.times[n][device]).sum::<f64>()
                    + p.segment_cost(device);
                segments.push(Segment {
                    device,
                    sub: Subgraph::extract(g, run)?,
                    nodes: std::mem::take(run),
                    predicted_ms,
                });
            }
            Ok(())
        };
        for &n in &p.order {
            if run.first().is_some_and(|&f| assign[f] != assign[n]) {
                flush(&mut run, &mut segments)?;
            }
            run.push(n);
        }
        flush(&mut run, &mut segments)?;

        let host = p.devices.len();
        let producers = g.producers();
        let consumers = g.consumers();
        let mut transfers = Vec::new();
        for v in 0..g.values.len() {
            if g.initializers.contains_key(&v) {
                continue;
            }
            let from = match producers[v] {
                Some(n) => assign[n],
                None if g.inputs.contains(&v) => host,
                None => continue,
            };
            let mut tos: Vec<usize> = consumers[v].iter().map(|&c| assign[c]).collect();
            if g.outputs.contains(&v) {
                tos.push(host);
            }
            tos.sort_unstable();
            tos.dedup();
            for to in tos.into_iter().filter(|&t| t != from) {
                let bytes = p.value_bytes.get(v).copied().unwrap_or(0);
                transfers.push(Transfer {
                    value: g.value_name(v).to_string(),
                    from: loc_name(p, from),
                    to: loc_name(p, to),
                    bytes,
                    predicted_ms: p.transfer[from][to].ms(bytes),
                });
            }
        }
        let nodes = p
            .order
            .iter()
            .map(|&n| NodeChoice {
                node: n,
                label: g.describe_node(n),
                device: assign[n],
                times: p.times[n].clone(),
                reasons: p.reasons[n].clone(),
            })
            .collect();
        Ok(Plan {
            devices: p.devices.clone(),
            assign,
            segments,
            transfers,
            nodes,
            predicted_ms: sol.cost + p.request_ms,
            segment_ms: (0..p.devices.len()).map(|d| p.segment_cost(d)).collect(),
            dispatch_ms: p.dispatch_ms.clone(),
            request_ms: p.request_ms,
            method: sol.method.to_string(),
        })
    }

    /// Devices the plan uses, in segment order, deduplicated.
    pub fn used_devices(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        for s in &self.segments {
            let d = self.devices[s.device].as_str();
            if !v.contains(&d) {
                v.push(d);
            }
        }
        v
    }

    /// The explanation as a text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let w = self
            .nodes
            .iter()
            .map(|n| n.label.len())
            .max()
            .unwrap_or(4)
            .clamp(4, 48);
        let _ = write!(s, "{:<w$}  {:<10}", "node", "chosen");
        for d in &self.devices {
            let _ = write!(s, "  {d:>12}");
        }
        s.push('\n');
        for n in &self.nodes {
            let label: String = n.label.chars().take(w).collect();
            let _ = write!(s, "{label:<w$}  {:<10}", self.devices[n.device]);
            for t in &n.times {
                match t {
                    Some(ms) => {
                        let _ = write!(s, "  {:>9.3} ms", ms);
                    }
                    None => {
                        let _ = write!(s, "  {:>12}", "-");
                    }
                }
            }
            s.push('\n');
        }
        let _ = writeln!(s, "\nsegments ({}):", self.segments.len());
        for (i, seg) in self.segments.iter().enumerate() {
            let _ = writeln!(
                s,
                "  {i}: {} nodes on {} (predicted {:.3} ms, of which {:.4} ms segment overhead: \
                 {:.4} ms submission, {:.4} ms scheduler hand-offs)",
                seg.nodes.len(),
                self.devices[seg.device],
                seg.predicted_ms,
                self.segment_ms.get(seg.device).copied().unwrap_or(0.0),
                self.segment_ms.get(seg.device).copied().unwrap_or(0.0)
                    - self.dispatch_ms.get(seg.device).copied().unwrap_or(0.0),
                self.dispatch_ms.get(seg.device).copied().unwrap_or(0.0)
            );
        }
        let _ = writeln!(s, "transfers ({}):", self.transfers.len());
        for t in &self.transfers {
            let _ = writeln!(
                s,
                "  {} {} -> {} ({} bytes, predicted {:.3} ms)",
                t.value, t.from, t.to, t.bytes, t.predicted_ms
            );
        }
        let _ = writeln!(
            s,
            "request overhead {:.4} ms (inputs bound, caller woken, outputs collected; measured)",
            self.request_ms
        );
        let _ = writeln!(
            s,
            "predicted total {:.3} ms ({})",
            self.predicted_ms, self.method
        );
        s
    }
}
