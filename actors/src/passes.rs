//! What a stage actor's jobs do on the device: start a stage pass (forward or B) of a
//! micro-batch, resume it with what the EP group sent back, finish it, and W. Each call runs
//! the pass until its next stop ([`flotilla_model::Yield`]) and tells the actor what to do next
//! ([`Out`]); the pass itself waits in the rank's store, on the device, between its phases.

use flotilla_model::layers::moe::shard;
use flotilla_model::{BackwardPass, EpGroup, ForwardPass, Yield};
use flotilla_runtime::fabric::{Payload, Rank, TensorMsg};

use crate::store::Pass;
use crate::stream::OnDevice;
use crate::wire::{Kind, from_payload, to_payload};

/// What the stage actor does after a phase.
#[derive(Debug)]
pub enum Out {
    /// Send `parts[p]` to EP index `p`'s expert shard as `kind` of `layer`, then resume the
    /// pass at once (it runs the shared expert while the rows travel).
    Post {
        layer: usize,
        kind: Kind,
        parts: Vec<Payload>,
    },
    /// Resume the pass with what every EP index sends back for `layer` as `kind`.
    Await { layer: usize, kind: Kind },
    /// The pass is over; `output` goes to the neighbouring stage (an activation forward, an
    /// input gradient backward), if there is one.
    Done { output: Option<Payload> },
}

/// What a job of the stage actor answers.
pub type Answer = Result<Out, String>;

/// A micro-batch's input off the fabric as a device tensor `[tokens, hidden]`.
fn input(
    d: &mut OnDevice<'_>,
    chunk: usize,
    msg: Option<(Rank, TensorMsg)>,
) -> Result<Option<flotilla_model::Tensor>, String> {
    let hidden = d.store.model.config.hidden_size;
    let tokens = d
        .store
        .batches
        .get(chunk)
        .map(|b| b.input_ids.len())
        .ok_or_else(|| format!("micro-batch {chunk} is not in this step"))?;
    msg.map(|(src, m)| {
        let (t, _) = from_payload(d.dev, src, m, hidden)?;
        if t.rows() == tokens {
            Ok(t)
        } else {
            Err(format!(
                "rank {src} sent {} rows for micro-batch {chunk} of {tokens} tokens",
                t.rows()
            ))
        }
    })
    .transpose()
}

/// Start the forward of `(chunk, stage)`; `act` is the previous stage's output (`None` for the
/// stage with the embedding).
pub fn start_forward(
    d: &mut OnDevice<'_>,
    chunk: usize,
    stage: usize,
    ep: EpGroup,
    act: Option<(Rank, TensorMsg)>,
) -> Answer {
    let x = input(d, chunk, act)?;
    let spec = d.store.placement.specs[stage].clone();
    let batch = d.store.batches[chunk].clone();
    let rope = d.store.rope_table(d.dev, batch.seq)?;
    let pass = ForwardPass::new(&spec, batch, x, &d.store.opts, ep)
        .and_then(|p| p.with_rope(rope))
        .map_err(|e| format!("forward of micro-batch {chunk}, stage {stage}: {e}"))?;
    advance(d, chunk, stage, Pass::Forward(pass), None)
}

/// Start B of `(chunk, stage)`; `grad` is the next stage's input gradient (`None` on the head
/// stage).
pub fn start_backward(
    d: &mut OnDevice<'_>,
    chunk: usize,
    stage: usize,
    grad: Option<(Rank, TensorMsg)>,
) -> Answer {
    let g = input(d, chunk, grad)?;
    let cache = d
        .store
        .caches
        .remove(&(chunk, stage))
        .ok_or_else(|| format!("B of micro-batch {chunk}, stage {stage} before its forward"))?;
    let pass = BackwardPass::new(cache, g)
        .map_err(|e| format!("B of micro-batch {chunk}, stage {stage}: {e}"))?;
    advance(d, chunk, stage, Pass::Backward(pass), None)
}

/// Resume the pass of `(chunk, stage)` (`back`: what the EP group sent back, by EP index).
pub fn resume(
    d: &mut OnDevice<'_>,
    chunk: usize,
    stage: usize,
    back: Option<Vec<(Rank, TensorMsg)>>,
) -> Answer {
    let pass = d
        .store
        .passes
        .remove(&(chunk, stage))
        .ok_or_else(|| format!("no pass of micro-batch {chunk}, stage {stage} to resume"))?;
    advance(d, chunk, stage, pass, back)
}

/// Run `pass` to its next stop.
fn advance(
    d: &mut OnDevice<'_>,
    chunk: usize,
    stage: usize,
    mut pass: Pass,
    back: Option<Vec<(Rank, TensorMsg)>>,
) -> Answer {
    let hidden = d.store.model.config.hidden_size;
    let back = back
        .map(|parts| {
            parts
                .into_iter()
                .map(|(src, m)| from_payload(d.dev, src, m, hidden).map(|(t, _)| t))
                .collect::<Result<Vec<_>, String>>()
        })
        .transpose()?;
    let what = |w: &str| format!("{w} of micro-batch {chunk}, stage {stage}");
    // This rank's own EP index: its part stays on the device.
    let own = d.store.placement.topo.coord(d.store.rank).ep;
    let model = &d.store.model;
    let (y, backward) = match &mut pass {
        Pass::Forward(p) => (p.step(model, d.dev, back), false),
        Pass::Backward(p) => (p.step(model, d.dev, back), true),
    };
    let name = if backward { "B" } else { "the forward" };
    let out = match y.map_err(|e| format!("{}: {e}", what(name)))? {
        Yield::Dispatch { layer, parts } => Out::Post {
            layer,
            kind: Kind::Dispatch,
            parts: parts
                .into_iter()
                .enumerate()
                .map(|(p, part)| to_payload(d.dev, part.rows, &part.counts, p == own))
                .collect(),
        },
        Yield::GradDispatch { layer, parts } => Out::Post {
            layer,
            kind: Kind::GradDispatch,
            parts: parts
                .into_iter()
                .enumerate()
                .map(|(p, t)| to_payload(d.dev, t, &[], p == own))
                .collect(),
        },
        Yield::Await { layer } => Out::Await {
            layer,
            kind: if backward {
                Kind::GradCombine
            } else {
                Kind::Combine
            },
        },
        Yield::Done => return finish(d, chunk, stage, pass),
    };
    d.store.passes.insert((chunk, stage), pass);
    Ok(out)
}

/// A pass that has run to its end: keep what B or W needs, hand on the output.
fn finish(d: &mut OnDevice<'_>, chunk: usize, stage: usize, pass: Pass) -> Answer {
    let what = |w: &str| format!("{w} of micro-batch {chunk}, stage {stage}");
    let output = match pass {
        Pass::Forward(p) => {
            let (out, cache) = p
                .finish()
                .map_err(|e| format!("{}: {e}", what("forward")))?;
            d.store
                .outputs
                .insert((chunk, stage), (out.losses, out.loads));
            d.store.caches.insert((chunk, stage), cache);
            out.hidden
        }
        Pass::Backward(p) => {
            let (d_in, cache) = p.finish().map_err(|e| format!("{}: {e}", what("B")))?;
            d.store.caches.insert((chunk, stage), cache);
            d_in
        }
    };
    Ok(Out::Done {
        output: output.map(|t| to_payload(d.dev, t, &[], false)),
    })
}

/// W of `(chunk, stage)`: the stage's weight gradients, and its MoE layers' routed experts'
/// from what this rank's expert shard kept of them.
pub fn weight(d: &mut OnDevice<'_>, chunk: usize, stage: usize) -> Result<(), String> {
    let what = format!("W of micro-batch {chunk}, stage {stage}");
    let cache = d
        .store
        .caches
        .remove(&(chunk, stage))
        .ok_or_else(|| format!("{what} before its B"))?;
    let store = &mut *d.store;
    let layers = cache.moe_layers(&store.model);
    store
        .model
        .stage_backward_weight(d.dev, cache, &mut store.grads, None)
        .map_err(|e| format!("{what}: {e}"))?;
    for layer in layers {
        let c = store
            .shards
            .remove(&(chunk, layer))
            .ok_or_else(|| format!("{what}: the experts of layer {layer} kept nothing"))?;
        let Some(g) = store.grads.moe_mut(layer) else {
            return Err(format!("{what}: layer {layer} has no routed experts"));
        };
        shard::backward_weight(d.dev, c, &mut g.experts)
            .map_err(|e| format!("{what}, experts of layer {layer}: {e}"))?;
    }
    Ok(())
}
