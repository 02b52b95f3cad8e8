//! Tests of the single-rank MoE layer: dispatch planning and finite-difference gradients.

use super::*;
use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
use crate::layers::local::LocalExperts;
use crate::layers::zeros_like;

/// The layer's forward with every expert local.
fn forward(ctx: &Ctx<'_>, moe: &Moe, x: &Tensor, ex: &mut LocalExperts) -> (Tensor, MoeCache) {
    let (routed, parts) = moe.route(ctx, x, EpGroup::ALONE);
    let back = ex.forward(ctx.dev, moe, parts).expect("local experts");
    let shared = moe.shared_forward(ctx.dev, x);
    moe.combine(ctx, routed, back, shared, x.rows())
        .expect("combine")
}

/// The layer's B with every expert local.
fn backward(
    ctx: &Ctx<'_>,
    moe: &Moe,
    c: &MoeCache,
    dy: &Tensor,
    ex: &mut LocalExperts,
) -> (Tensor, MoeDys) {
    let (d_w_perm, parts) = moe.combine_backward(ctx, c, dy);
    let back = ex
        .backward_input(ctx.dev, moe, parts)
        .expect("local experts");
    let shared = moe.shared_backward(ctx.dev, c, dy);
    moe.route_backward(ctx, c, &d_w_perm, back, shared)
        .expect("route backward")
}

#[test]
fn plan_groups_rows_by_expert_in_token_order() {
    let plan = plan_dispatch(&[2, 0, 1, 2, 0, 1], 3, 2);
    assert_eq!(plan.offsets, vec![0, 2, 4, 6]);
    assert_eq!(plan.token_of_row, vec![0, 2, 1, 2, 0, 1]);
    assert_eq!(plan.slot_of_row, vec![1, 4, 2, 5, 0, 3]);
    assert_eq!(plan.counts(), vec![2, 2, 2]);
}

#[test]
fn moe_backward_matches_finite_differences_with_balance_loss() {
    let d = dev();
    let mut cfg = small_config();
    cfg.n_routed_experts = 8;
    cfg.n_group = 4;
    cfg.topk_group = 2;
    cfg.num_experts_per_tok = 3;
    cfg.n_shared_experts = 2;
    let (b, t) = (2, 6);
    let rope = rope_table(&cfg, &d, t);
    let ctx = Ctx {
        dev: &d,
        batch: b,
        seq: t,
        rope: &rope,
        balance_alpha: 0.3,
    };
    let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
    let mut moe = Moe::init(&d, &cfg, "m.", 1, 9);
    moe.gate.e_score_correction_bias = randn(&[8], 4, 0.05);
    let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
    let mut ex = LocalExperts::default();
    let (_, c) = forward(&ctx, &moe, &x, &mut ex);
    assert!(c.router.balance_loss > 0.0);
    let (dx, dys) = backward(&ctx, &moe, &c, &r, &mut ex);
    let mut g = zeros_like(&moe, &d);
    moe.backward_weight(&ctx, &x, &c, &dys, &mut g);
    ex.backward_weight(&d, &moe, &mut g).expect("experts' W");
    let busy = (0..8).max_by_key(|&e| c.plan.rows(e).len()).unwrap_or(0);
    let chosen = c.router.topk.clone();
    let mut st = (moe, x, busy);
    let loss = |s: &(Moe, Tensor, usize)| {
        let (y, c) = forward(&ctx, &s.0, &s.1, &mut LocalExperts::default());
        if c.router.topk != chosen {
            return f64::NAN;
        }
        project(&y, &r) + c.router.balance_loss as f64
    };
    check("moe dx", &mut st, |s| &mut s.1, loss, &dx, 40);
    check(
        "moe router W_gate",
        &mut st,
        |s| &mut s.0.gate.gate.weight,
        loss,
        &g.gate.gate.weight,
        40,
    );
    check(
        "moe shared up",
        &mut st,
        |s| &mut s.0.shared_experts.up_proj.weight,
        loss,
        &g.shared_experts.up_proj.weight,
        20,
    );
    let e = busy;
    check(
        "moe expert gate",
        &mut st,
        |s| &mut s.0.experts[s.2].gate_proj.weight,
        loss,
        &g.experts[e].gate_proj.weight,
        20,
    );
    check(
        "moe expert down",
        &mut st,
        |s| &mut s.0.experts[s.2].down_proj.weight,
        loss,
        &g.experts[e].down_proj.weight,
        20,
    );
}
