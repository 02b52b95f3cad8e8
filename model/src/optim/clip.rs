//! Gradient clipping by global L2 norm (PyTorch's `clip_grad_norm_`), single-rank or pre-reduced.
//!
//! The global norm is `‖g‖ = √(Σ over all tensors Σ over elements g²)`, accumulated in `f64`:
//! each piece of [`SQ_PIECE`] elements in order, a tensor's pieces in order, the tensors in the
//! order given. The pieces may be summed on several threads ([`sum_of_squares_on`]); the result
//! is the same bits on any number, and for tensors of one piece the plain sequential sum. The
//! gradients are then scaled by `min(1, max_norm / (‖g‖ + 1e-6))` (PyTorch's formula and its
//! `1e-6`), and the norm **before** clipping is returned for metrics and anomaly detection.
//!
//! With data, pipeline or expert parallelism no rank holds all gradients. Each rank then computes
//! [`sum_of_squares`] over the gradients it owns (each parameter counted once: replicated
//! parameters on one rank of their replica group only, or their DP-averaged gradient on every
//! rank after the gradient all-reduce but then counted on one rank only), the ranks all-reduce
//! (sum) these partial sums, and every rank calls [`clip_grad_norm_from_sum_sq`] with the total,
//! so that all ranks scale by the same coefficient. The sum over ranks is in a different order
//! than the single-rank sum, so the two agree to rounding, not bit for bit.
//!
//! A non-finite norm (an `inf` or `NaN` gradient) leaves the gradients untouched and is returned
//! as is: the caller should skip the step. (PyTorch would scale everything by `NaN`.)

use super::OptimError;
use crate::par::run_pieces;

/// Elements per piece of the sum of squares and of the scaling (see the module docs).
pub const SQ_PIECE: usize = 1 << 16;
/// Below this many elements in all, everything runs on the calling thread.
const PAR_MIN: usize = 1 << 20;

/// The constant added to the norm in the clip coefficient, as in PyTorch.
pub const CLIP_EPS: f64 = 1e-6;

/// `Σ g²` over all `grads`, accumulated in `f64` in order.
pub fn sum_of_squares<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    let grads: Vec<&[f32]> = grads.into_iter().collect();
    sum_of_squares_on(&grads, 1)
}

/// [`sum_of_squares`] with its pieces spread over up to `threads` threads (the same bits).
pub fn sum_of_squares_on(grads: &[&[f32]], threads: usize) -> f64 {
    let pieces: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(SQ_PIECE)).collect();
    let mut sums = vec![0.0f64; pieces.len()];
    run_pieces(
        pieces.into_iter().zip(sums.iter_mut()).collect(),
        threads,
        PAR_MIN,
        |(p, _)| p.len(),
        |(p, s)| *s = p.iter().map(|&x| f64::from(x) * f64::from(x)).sum(),
    );
    let mut rest = &sums[..];
    grads
        .iter()
        .map(|g| {
            let (mine, tail) = rest.split_at(g.len().div_ceil(SQ_PIECE));
            rest = tail;
            mine.iter().sum::<f64>()
        })
        .sum()
}

/// The global L2 norm of `grads`: `√`[`sum_of_squares`].
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    sum_of_squares(grads).sqrt()
}

/// The factor gradients are multiplied by: `min(1, max_norm / (total_norm + 1e-6))`.
#[must_use]
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + CLIP_EPS)).min(1.0)
}

/// The scale AdamW applies to the gradients as it reads them ([`crate::optim::AdamW::step_scaled`])
/// to clip them to `max_norm` from `total_norm`: the clip coefficient in f32 where it is below
/// 1, else 1 (also where `max_norm` is not positive: no clipping).
#[must_use]
pub fn clip_scale(total_norm: f64, max_norm: f64) -> f32 {
    let coef = clip_coefficient(total_norm, max_norm);
    if max_norm > 0.0 && coef < 1.0 {
        coef as f32
    } else {
        1.0
    }
}

/// Clips `grads` in place to a global norm of at most `max_norm` and returns the norm before
/// clipping. `max_norm` must be positive (`f64::INFINITY` computes the norm without clipping).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> Result<f64, OptimError> {
    clip_grad_norm_on(grads, max_norm, 1)
}

/// [`clip_grad_norm`] on up to `threads` threads (the same bits).
pub fn clip_grad_norm_on(
    grads: &mut [&mut [f32]],
    max_norm: f64,
    threads: usize,
) -> Result<f64, OptimError> {
    let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
    let sum_sq = sum_of_squares_on(&views, threads);
    clip_grad_norm_from_sum_sq_on(grads, sum_sq, max_norm, threads)
}

/// Like [`clip_grad_norm`], but with the global `Σ g²` given: the sum of every rank's
/// [`sum_of_squares`] (see the module documentation). Scales only the local `grads` and returns
/// `√total_sum_sq`.
pub fn clip_grad_norm_from_sum_sq(
    grads: &mut [&mut [f32]],
    total_sum_sq: f64,
    max_norm: f64,
) -> Result<f64, OptimError> {
    clip_grad_norm_from_sum_sq_on(grads, total_sum_sq, max_norm, 1)
}

/// [`clip_grad_norm_from_sum_sq`] scaling on up to `threads` threads (the same bits).
pub fn clip_grad_norm_from_sum_sq_on(
    grads: &mut [&mut [f32]],
    total_sum_sq: f64,
    max_norm: f64,
    threads: usize,
) -> Result<f64, OptimError> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(OptimError::Config(format!(
            "max_norm is {max_norm}; it must be positive"
        )));
    }
    let norm = total_sum_sq.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        let coef = coef as f32;
        let pieces: Vec<&mut [f32]> = grads
            .iter_mut()
            .flat_map(|g| g.chunks_mut(SQ_PIECE))
            .collect();
        run_pieces(
            pieces,
            threads,
            PAR_MIN,
            |p| p.len(),
            |p| p.iter_mut().for_each(|x| *x *= coef),
        );
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_spans_all_tensors() {
        let a = [3.0f32, 0.0];
        let b = [4.0f32];
        assert_eq!(sum_of_squares([&a[..], &b[..]]), 25.0);
        assert_eq!(global_norm([&a[..], &b[..]]), 5.0);
        assert_eq!(global_norm(std::iter::empty::<&[f32]>()), 0.0);
    }

    #[test]
    fn clips_to_max_norm_and_returns_pre_clip_norm() {
        let mut a = [3.0f32, 0.0];
        let mut b = [4.0f32];
        let norm = clip_grad_norm(&mut [&mut a[..], &mut b[..]], 1.0).expect("clip");
        assert_eq!(norm, 5.0);
        let coef = 1.0 / (5.0 + 1e-6);
        assert_eq!(a, [(coef as f32) * 3.0, 0.0]);
        assert_eq!(b, [(coef as f32) * 4.0]);
        let after = global_norm([&a[..], &b[..]]);
        assert!((after - 1.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn the_scale_adamw_applies_is_the_clip_coefficient_below_one() {
        assert_eq!(clip_scale(5.0, 1.0), (1.0 / (5.0 + 1e-6)) as f32);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0, "max_norm 0: no clipping");
        assert_eq!(clip_scale(0.0, 1.0), 1.0);
    }

    #[test]
    fn small_gradients_are_left_alone() {
        let mut a = [0.3f32, -0.4];
        let norm = clip_grad_norm(&mut [&mut a[..]], 1.0).expect("clip");
        assert!((norm - 0.5).abs() < 1e-7);
        assert_eq!(a, [0.3, -0.4]);
        // Exactly at the limit the coefficient is just below 1 (the 1e-6), as in PyTorch.
        assert!(clip_coefficient(1.0, 1.0) < 1.0);
        assert_eq!(clip_coefficient(0.0, 1.0), 1.0);
        let norm = clip_grad_norm(&mut [&mut a[..]], f64::INFINITY).expect("no clip");
        assert!((norm - 0.5).abs() < 1e-7);
    }

    #[test]
    fn pre_reduced_sum_matches_single_rank() {
        // Two "ranks" each own one tensor; their partial sums add up to the global one.
        let grads = [vec![1.0f32, -2.0, 0.5], vec![3.0f32, 0.25]];
        let mut single = grads.clone();
        let (s0, s1) = (
            sum_of_squares([&grads[0][..]]),
            sum_of_squares([&grads[1][..]]),
        );
        let (mut r0, mut r1) = (grads[0].clone(), grads[1].clone());
        let n = {
            let [x, y] = &mut single;
            clip_grad_norm(&mut [&mut x[..], &mut y[..]], 2.0).expect("clip")
        };
        let n0 = clip_grad_norm_from_sum_sq(&mut [&mut r0[..]], s0 + s1, 2.0).expect("rank 0");
        let n1 = clip_grad_norm_from_sum_sq(&mut [&mut r1[..]], s0 + s1, 2.0).expect("rank 1");
        assert_eq!(n, n0);
        assert_eq!(n0, n1);
        assert_eq!(single[0], r0);
        assert_eq!(single[1], r1);
    }

    #[test]
    fn threads_do_not_change_the_bits() {
        // Tensors of several pieces, a ragged last piece, and one empty; enough to go parallel.
        let sizes = [3 * SQ_PIECE + 17, 0, SQ_PIECE, 5, PAR_MIN];
        let grads: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n)
                    .map(|i| ((i * 7 + t * 13) % 101) as f32 * 0.013 - 0.6)
                    .collect()
            })
            .collect();
        let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let one = sum_of_squares_on(&views, 1);
        // One piece: the plain sequential sum.
        let plain: f64 = grads[3].iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert_eq!(sum_of_squares([&grads[3][..]]).to_bits(), plain.to_bits());
        for threads in [2, 3, 8] {
            assert_eq!(sum_of_squares_on(&views, threads).to_bits(), one.to_bits());
            let (mut a, mut b) = (grads.clone(), grads.clone());
            let mut va: Vec<&mut [f32]> = a.iter_mut().map(Vec::as_mut_slice).collect();
            let mut vb: Vec<&mut [f32]> = b.iter_mut().map(Vec::as_mut_slice).collect();
            let na = clip_grad_norm_on(&mut va, 1.0, 1).expect("clip");
            let nb = clip_grad_norm_on(&mut vb, 1.0, threads).expect("clip");
            assert_eq!(na.to_bits(), nb.to_bits());
            assert_eq!(a, b, "threads {threads}");
        }
    }

    #[test]
    fn non_finite_norm_leaves_grads_untouched() {
        let mut a = [1.0f32, f32::NAN];
        let norm = clip_grad_norm(&mut [&mut a[..]], 1.0).expect("clip");
        assert!(norm.is_nan());
        assert_eq!(a[0], 1.0);
        let mut b = [f32::INFINITY];
        assert_eq!(
            clip_grad_norm(&mut [&mut b[..]], 1.0).ok(),
            Some(f64::INFINITY)
        );
        assert_eq!(b, [f32::INFINITY]);
    }

    #[test]
    fn bad_max_norm_is_an_error() {
        let mut a = [1.0f32];
        for bad in [0.0, -1.0, f64::NAN] {
            assert!(clip_grad_norm(&mut [&mut a[..]], bad).is_err());
        }
    }
}
