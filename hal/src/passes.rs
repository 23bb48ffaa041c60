//! Graph passes run once when a session is prepared: constant folding, dead node removal and
//! static shape/type inference.

use edgehal_core::graph::{Dim, Graph};
use edgehal_core::{Error, Result, Tensor};
use edgehal_cpu::{OpCtx, Registry};

/// Ops never folded: their result is not a function of their inputs alone.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// Largest tensor (bytes) a fold may create: folding must not blow up memory (e.g. a
/// ConstantOfShape of a huge shape stays a node and is computed at run time).
const MAX_FOLD_BYTES: usize = 64 << 20;

/// Replace every node whose inputs are all constants by its outputs as initializers.
/// Returns the number of nodes folded.
pub fn fold_constants(g: &mut Graph, registry: &Registry) -> Result<usize> {
    let order = g.topo_order()?;
    let mut folded = vec![false; g.nodes.len()];
    let mut count = 0;
    for n in order {
        let node = &g.nodes[n];
        if NONDETERMINISTIC.contains(&node.op.as_str())
            || node.attrs.values().any(|a| {
                matches!(
                    a,
                    edgehal_core::Attr::Graph(_) | edgehal_core::Attr::Graphs(_)
                )
            })
        {
            continue;
        }
        if !node
            .inputs
            .iter()
            .flatten()
            .all(|v| g.initializers.contains_key(v))
        {
            continue;
        }
        if node
            .outputs
            .iter()
            .flatten()
            .any(|o| g.outputs.contains(o) && g.inputs.contains(o))
        {
            continue;
        }
        let Some(f) = registry.get(&node.domain, &node.op) else {
            continue;
        };
        let ins: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| g.initializers.get(&v)))
            .collect();
        let ctx = OpCtx {
            node,
            opset: g
                .opsets
                .get(&node.domain)
                .copied()
                .unwrap_or_else(|| g.opset()),
            subgraph: None,
            dest: None,
        };
        // A node that fails here (bad attribute...) is left for run time, where the error is
        // reported with the inputs the user gave.
        let Ok(outs) = f(&ctx, &ins) else { continue };
        if outs.iter().any(|t| t.bytes().len() > MAX_FOLD_BYTES)
            || outs.len() < node.outputs.iter().flatten().count()
        {
            continue;
        }
        let outputs = node.outputs.clone();
        for (o, t) in outputs.iter().zip(outs) {
            if let Some(o) = o {
                g.values[*o].dtype = Some(t.dtype());
                g.values[*o].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
                g.initializers.insert(*o, t);
            }
        }
        folded[n] = true;
        count += 1;
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        let keep = !folded[k];
        k += 1;
        keep
    });
    Ok(count)
}

/// Everything a session runs before execution. Returns a short log of what changed.
pub fn optimize(g: &mut Graph, registry: &Registry) -> Result<String> {
    let folded = fold_constants(g, registry)?;
    let dead = g.remove_dead_nodes();
    edgehal_core::infer::infer_shapes(g);
    g.validate()
        .map_err(|e| Error::InvalidGraph(format!("after optimisation: {e}")))?;
    Ok(format!(
        "folded {folded} constant nodes, removed {dead} dead nodes"
    ))
}
