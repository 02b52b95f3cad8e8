//! The expert-owner's side of a MoE layer: the rows that every token-owner of the EP group
//! dispatched to this rank's experts, regrouped by expert, run through them, and sent back to
//! each source in the order it sent them.
//!
//! A source's [`DispatchPart`] holds, for each of this rank's experts in order, how many rows it
//! sends (integers: counts travel exactly, whatever their size), then those rows. The owner
//! concatenates the parts in source order and gathers them into expert order (`perm`; within an
//! expert: source order, then the source's own row order), runs each expert's GEMMs on its row
//! range ([`super::experts::ExpertRows`]), and gathers the outputs back into source order
//! (`inv`) to cut them into one tensor per source. With a single source (no expert parallelism,
//! or a group of one) the rows are already grouped by expert and nothing is gathered.
//!
//! B runs the same way on the gradients of the output rows; W accumulates the experts' weight
//! gradients from the rows this rank ran. Everything a source sent is checked against its counts
//! first: a part that does not fit is a [`ShardError`] naming the source, never a panic.

use std::ops::Range;

use crate::device::Device;
use crate::layers::mlp::Mlp;
use crate::tensor::Tensor;

use super::experts::{ExpertDys, ExpertRows};

/// What one token-owner sends one expert-owner for one MoE layer's forward.
#[derive(Debug)]
pub struct DispatchPart {
    /// Rows for each of the receiver's experts, in expert order.
    pub counts: Vec<u64>,
    /// Those rows, `[Σ counts, hidden]`, grouped by expert.
    pub rows: Tensor,
}

/// Why the rows a source sent cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("source {source_index}: {got} counts for {want} experts")]
    Counts {
        source_index: usize,
        got: usize,
        want: usize,
    },
    #[error("source {source_index}: counts sum to {counted} rows, the part holds {rows}")]
    Rows {
        source_index: usize,
        counted: u64,
        rows: usize,
    },
    #[error("source {source_index}: rows of width {got}, the experts take {want}")]
    Width {
        source_index: usize,
        got: usize,
        want: usize,
    },
    #[error("{got} gradient parts for {want} sources")]
    Sources { got: usize, want: usize },
    #[error("source {source_index}: a gradient of {got} rows for the {want} it was sent")]
    GradRows {
        source_index: usize,
        got: usize,
        want: usize,
    },
    #[error("B of a layer whose forward did not run here, or ran its B already")]
    NoForward,
    #[error("W before B")]
    NoBackward,
}

/// One layer's expert activations for one micro-batch, from forward to B to W.
#[derive(Debug)]
pub struct ShardCache {
    rows: ExpertRows,
    hidden: usize,
    /// Rows received from each source, in source order.
    recv: Vec<usize>,
    /// `xl[i] = received[perm[i]]`, and back `received[r] = xl[inv[r]]` (`None`: one source,
    /// already in expert order).
    perm: Option<(Vec<u32>, Vec<u32>)>,
    /// The output-gradients B leaves for W.
    dys: Option<ExpertDys>,
}

impl ShardCache {
    /// Rows this rank's experts ran on.
    pub fn rows(&self) -> usize {
        self.recv.iter().sum()
    }
}

/// Forward of experts `ids` (indices into `experts`, this rank's share) on what each source sent
/// (`parts[q]` from source `q`). Returns one output tensor per source, its rows in the order
/// the source sent them, and the cache B and W need.
pub fn forward(
    dev: &dyn Device,
    experts: &[Mlp],
    ids: Range<usize>,
    hidden: usize,
    parts: Vec<DispatchPart>,
) -> Result<(Vec<Tensor>, ShardCache), ShardError> {
    for (q, p) in parts.iter().enumerate() {
        if p.counts.len() != ids.len() {
            return Err(ShardError::Counts {
                source_index: q,
                got: p.counts.len(),
                want: ids.len(),
            });
        }
        let counted = p.counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
        if counted != Some(p.rows.rows() as u64) {
            return Err(ShardError::Rows {
                source_index: q,
                counted: counted.unwrap_or(u64::MAX),
                rows: p.rows.rows(),
            });
        }
        if p.rows.rows() > 0 && p.rows.cols() != hidden {
            return Err(ShardError::Width {
                source_index: q,
                got: p.rows.cols(),
                want: hidden,
            });
        }
    }
    let recv: Vec<usize> = parts.iter().map(|p| p.rows.rows()).collect();
    let n_local = ids.len();
    // Rows of local expert j: offsets[j] .. offsets[j + 1].
    let mut offsets = vec![0usize; n_local + 1];
    for j in 0..n_local {
        offsets[j + 1] = offsets[j] + parts.iter().map(|p| p.counts[j] as usize).sum::<usize>();
    }
    let (xl, perm) = if parts.len() == 1 {
        let rows = parts.into_iter().next().map(|p| p.rows);
        (rows.unwrap_or_else(|| dev.zeros(&[0, hidden])), None)
    } else {
        let perm = expert_order(&parts, n_local);
        let mut inv = vec![0u32; perm.len()];
        for (i, &r) in perm.iter().enumerate() {
            inv[r as usize] = i as u32;
        }
        let refs: Vec<&Tensor> = parts.iter().map(|p| &p.rows).collect();
        let received = dev.concat_rows(&refs, hidden);
        drop(parts);
        (dev.gather_rows(&received, &perm), Some((perm, inv)))
    };
    let (y, rows) = ExpertRows::forward(dev, experts, ids, offsets, xl);
    let out = to_sources(dev, y, perm.as_ref().map(|p| &p.1), &recv);
    Ok((
        out,
        ShardCache {
            rows,
            hidden,
            recv,
            perm,
            dys: None,
        },
    ))
}

/// B: from the gradients of the rows sent back to each source (`grads[q]`, in source `q`'s
/// order) to the gradients of the rows each source sent; keeps what W needs in `cache`.
pub fn backward_input(
    dev: &dyn Device,
    experts: &[Mlp],
    cache: &mut ShardCache,
    grads: Vec<Tensor>,
) -> Result<Vec<Tensor>, ShardError> {
    if grads.len() != cache.recv.len() {
        return Err(ShardError::Sources {
            got: grads.len(),
            want: cache.recv.len(),
        });
    }
    for (q, (g, &want)) in grads.iter().zip(&cache.recv).enumerate() {
        if g.rows() != want || (want > 0 && g.cols() != cache.hidden) {
            return Err(ShardError::GradRows {
                source_index: q,
                got: g.rows(),
                want,
            });
        }
    }
    if cache.dys.is_some() {
        return Err(ShardError::NoForward);
    }
    let d_y = match &cache.perm {
        None => grads
            .into_iter()
            .next()
            .unwrap_or_else(|| dev.zeros(&[0, cache.hidden])),
        Some((perm, _)) => {
            let refs: Vec<&Tensor> = grads.iter().collect();
            let received = dev.concat_rows(&refs, cache.hidden);
            dev.gather_rows(&received, perm)
        }
    };
    let (d_x, dys) = cache.rows.backward_input(dev, experts, d_y);
    cache.dys = Some(dys);
    Ok(to_sources(
        dev,
        d_x,
        cache.perm.as_ref().map(|p| &p.1),
        &cache.recv,
    ))
}

/// W: accumulates the weight gradients of the experts that ran here into `grads` (indexed like
/// the layer's experts; the other experts' gradients are not touched).
pub fn backward_weight(
    dev: &dyn Device,
    cache: ShardCache,
    grads: &mut [Mlp],
) -> Result<(), ShardError> {
    let dys = cache.dys.as_ref().ok_or(ShardError::NoBackward)?;
    cache.rows.backward_weight(dev, dys, grads);
    Ok(())
}

/// The expert order of the rows of `parts` concatenated in source order: for each local expert,
/// every source's rows of that expert, sources in order.
fn expert_order(parts: &[DispatchPart], n_local: usize) -> Vec<u32> {
    // Start of (source q, local expert j) in the concatenation.
    let mut start = Vec::with_capacity(parts.len());
    let mut at = 0usize;
    for p in parts {
        let mut s = Vec::with_capacity(n_local);
        for &c in &p.counts {
            s.push(at);
            at += c as usize;
        }
        start.push(s);
    }
    let mut perm = Vec::with_capacity(at);
    for j in 0..n_local {
        for (s, p) in start.iter().zip(parts) {
            perm.extend((s[j]..s[j] + p.counts[j] as usize).map(|r| r as u32));
        }
    }
    perm
}

/// Rows of `t` (in expert order) back in source order, cut into one tensor per source.
fn to_sources(dev: &dyn Device, t: Tensor, inv: Option<&Vec<u32>>, recv: &[usize]) -> Vec<Tensor> {
    match inv {
        None if recv.len() == 1 => vec![t],
        None => dev.split_rows(&t, recv),
        Some(inv) => dev.split_rows(&dev.gather_rows(&t, inv), recv),
    }
}
