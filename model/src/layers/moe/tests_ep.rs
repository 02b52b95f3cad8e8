//! Expert parallelism against the single-rank layer and model: P ranks on threads, one in-process
//! [`ExpertExchange`] each, every rank with its own tokens and output-gradient.

use std::ops::Range;

use super::*;
use crate::config::ModelConfig;
use crate::layers::block::Ffn;
use crate::layers::expert_exchange::{experts_of, threads};
use crate::layers::gradcheck::{dev, randn, rope_table, small_config};
use crate::layers::zeros_like;
use crate::model::{Batch, DeepSeekV3, StepOptions, Weights};
use crate::stage::StageSpec;

/// Worst `|a − b|` over the largest `|b|`, asserting same shapes; `None` when `b` is all zeros.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.h(), b.h());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

fn rel_f32(a: f32, b: f32) -> f64 {
    ((a - b).abs() / b.abs().max(f32::MIN_POSITIVE)) as f64
}

const TOL: f64 = 1e-5;

/// The experts outside `mine` become shape-only placeholders (reading one would panic).
fn keep_only(experts: &mut [Mlp], mine: &Range<usize>) {
    for (e, m) in experts.iter_mut().enumerate() {
        if !mine.contains(&e) {
            m.visit_mut("", &mut |_, t, _| *t = Tensor::shape_only(t.shape()));
        }
    }
}

/// The element-wise sum of tensors of one shape.
fn sum(ts: &[&Tensor]) -> Tensor {
    let mut out = vec![0.0f32; ts[0].numel()];
    for t in ts {
        for (o, v) in out.iter_mut().zip(t.h()) {
            *o += v;
        }
    }
    Tensor::from_host(ts[0].shape(), out)
}

fn moe_config(top_k: usize) -> ModelConfig {
    let mut cfg = small_config();
    cfg.n_routed_experts = 8;
    cfg.n_group = 4;
    cfg.topk_group = 2;
    cfg.num_experts_per_tok = top_k;
    cfg.n_shared_experts = 2;
    cfg
}

/// One rank's single-rank reference: output, input gradient, weight gradients, plan.
struct Reference {
    y: Tensor,
    dx: Tensor,
    g: Moe,
    plan: DispatchPlan,
    balance: f32,
}

fn layer_vs_single_rank(p: usize, top_k: usize) {
    let cfg = moe_config(top_k);
    let d = dev();
    let mut moe = Moe::init(&d, &cfg, "m.", 3, 9);
    // Uneven routing: experts 6 and 7 (group 3) never win, so with P = 4 rank 3 receives no
    // rows at all and every source sends some expert zero rows.
    moe.gate.e_score_correction_bias =
        Tensor::from_host(&[8], vec![0.30, 0.10, 0.0, -0.05, 0.20, 0.05, -2.0, -2.0]);
    let hidden = cfg.hidden_size;
    // Ranks hold micro-batches of different lengths.
    let shapes: Vec<(usize, usize)> = (0..p).map(|q| (2, 5 + q)).collect();
    let xs: Vec<Tensor> = (0..p)
        .map(|q| randn(&[shapes[q].0 * shapes[q].1, hidden], 100 + q as u64, 1.0))
        .collect();
    let rs: Vec<Tensor> = (0..p)
        .map(|q| randn(&[shapes[q].0 * shapes[q].1, hidden], 200 + q as u64, 1.0))
        .collect();

    let refs: Vec<Reference> = (0..p)
        .map(|q| {
            let (batch, seq) = shapes[q];
            let rope = rope_table(&cfg, &d, seq);
            let ctx = Ctx {
                dev: &d,
                batch,
                seq,
                rope: &rope,
                balance_alpha: 0.3,
                ep: None,
            };
            let (y, c) = moe.forward(&ctx, &xs[q]);
            let (dx, dys) = moe.backward_input(&ctx, &c, &rs[q]);
            let mut g = zeros_like(&moe, &d);
            moe.backward_weight(&ctx, &xs[q], &c, &dys, &mut g);
            Reference {
                y,
                dx,
                g,
                balance: c.router.balance_loss,
                plan: c.plan,
            }
        })
        .collect();
    assert!(refs.iter().all(|r| r.balance > 0.0));
    for r in &refs {
        assert!(r.plan.rows(6).is_empty() && r.plan.rows(7).is_empty());
        assert!((0..6).any(|e| !r.plan.rows(e).is_empty()));
    }

    let group = threads::group(p);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(q, ex)| {
                let (moe, xs, rs, cfg, shapes) = (&moe, &xs, &rs, &cfg, &shapes);
                s.spawn(move || {
                    let d = dev();
                    let mine = experts_of(8, p, q);
                    let mut local = moe.clone();
                    keep_only(&mut local.experts, &mine);
                    let mut g = zeros_like(moe, &d);
                    keep_only(&mut g.experts, &mine);
                    let (batch, seq) = shapes[q];
                    let rope = rope_table(cfg, &d, seq);
                    let ctx = Ctx {
                        dev: &d,
                        batch,
                        seq,
                        rope: &rope,
                        balance_alpha: 0.3,
                        ep: Some(ex),
                    };
                    let (y, c) = local.forward(&ctx, &xs[q]);
                    let (dx, dys) = local.backward_input(&ctx, &c, &rs[q]);
                    local.backward_weight(&ctx, &xs[q], &c, &dys, &mut g);
                    (y, dx, g, local.load(&c), c.router.balance_loss)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });

    // Worst relative difference of the outputs and input gradients, and of everything compared.
    let mut worst_y = 0.0f64;
    for (q, (y, dx, ..)) in outs.iter().enumerate() {
        worst_y = worst_y.max(rel(y, &refs[q].y)).max(rel(dx, &refs[q].dx));
    }
    let mut worst = 0.0f64;
    let mut check = |what: &str, a: &Tensor, b: &Tensor| {
        let r = rel(a, b);
        assert!(
            r <= TOL,
            "P={p} top-{top_k}: {what}: relative difference {r:.3e}"
        );
        worst = worst.max(r);
    };
    for (q, (y, dx, g, load, balance)) in outs.iter().enumerate() {
        let reference = &refs[q];
        check(&format!("rank {q} y"), y, &reference.y);
        check(&format!("rank {q} dx"), dx, &reference.dx);
        assert_eq!(*balance, reference.balance, "rank {q} balance loss");
        assert_eq!(load.counts, reference.plan.counts(), "rank {q} load");
        check(
            &format!("rank {q} router"),
            &g.gate.gate.weight,
            &reference.g.gate.gate.weight,
        );
        let (gs, rs) = (&g.shared_experts, &reference.g.shared_experts);
        check("shared gate", &gs.gate_proj.weight, &rs.gate_proj.weight);
        check("shared up", &gs.up_proj.weight, &rs.up_proj.weight);
        check("shared down", &gs.down_proj.weight, &rs.down_proj.weight);
        let mine = experts_of(8, p, q);
        for (e, ge) in g.experts.iter().enumerate() {
            if !mine.contains(&e) {
                let mut untouched = true;
                ge.visit("", &mut |_, t, _| untouched &= t.is_shape_only());
                assert!(untouched, "rank {q} wrote expert {e}'s gradient");
                continue;
            }
            let total = |f: fn(&Mlp) -> &Tensor| {
                sum(&refs.iter().map(|r| f(&r.g.experts[e])).collect::<Vec<_>>())
            };
            let busy = refs.iter().any(|r| !r.plan.rows(e).is_empty());
            for (name, f) in [
                (
                    "gate",
                    (|m: &Mlp| &m.gate_proj.weight) as fn(&Mlp) -> &Tensor,
                ),
                ("up", |m: &Mlp| &m.up_proj.weight),
                ("down", |m: &Mlp| &m.down_proj.weight),
            ] {
                if busy {
                    check(&format!("expert {e} {name}"), f(ge), &total(f));
                } else {
                    assert!(f(ge).h().iter().all(|&v| v == 0.0), "idle expert {e}");
                }
            }
        }
    }
    eprintln!(
        "EP layer P={p} top-{top_k}: max relative difference y/dx {worst_y:.3e}, all {worst:.3e}"
    );
}

#[test]
fn ep_moe_layer_matches_single_rank_p2_top2() {
    layer_vs_single_rank(2, 2);
}

#[test]
fn ep_moe_layer_matches_single_rank_p2_top3() {
    layer_vs_single_rank(2, 3);
}

#[test]
fn ep_moe_layer_matches_single_rank_p4_top2() {
    layer_vs_single_rank(4, 2);
}

#[test]
fn ep_moe_layer_matches_single_rank_p4_top3() {
    layer_vs_single_rank(4, 3);
}

/// An exchange whose peer is gone: what comes back is short, long, missing or garbled (counts
/// that claim more rows than came, a negative and a NaN count).
#[derive(Debug)]
struct Broken;

impl ExpertExchange for Broken {
    fn size(&self) -> usize {
        2
    }
    fn index(&self) -> usize {
        1
    }
    fn post(&self, _layer: usize, _phase: ExchangePhase, _send: Vec<Vec<f32>>) {}
    fn wait(&self, _layer: usize, phase: ExchangePhase) -> Vec<Vec<f32>> {
        match phase {
            ExchangePhase::Dispatch => vec![
                vec![5.0, 1e9, -3.0, f32::NAN, 1.0, 2.0],
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ],
            _ => vec![vec![1.0; 3]],
        }
    }
}

#[test]
fn ep_moe_layer_survives_a_failed_exchange() {
    let cfg = moe_config(2);
    let d = dev();
    let moe = Moe::init(&d, &cfg, "m.", 1, 9);
    let mut local = moe.clone();
    let mine = experts_of(8, 2, 1);
    keep_only(&mut local.experts, &mine);
    let mut g = zeros_like(&moe, &d);
    keep_only(&mut g.experts, &mine);
    let (batch, seq) = (2, 4);
    let rope = rope_table(&cfg, &d, seq);
    let ctx = Ctx {
        dev: &d,
        batch,
        seq,
        rope: &rope,
        balance_alpha: 0.1,
        ep: Some(&Broken),
    };
    let x = randn(&[batch * seq, cfg.hidden_size], 1, 1.0);
    let (y, c) = local.forward(&ctx, &x);
    let (dx, dys) = local.backward_input(&ctx, &c, &x);
    local.backward_weight(&ctx, &x, &c, &dys, &mut g);
    assert!(y.h().iter().chain(dx.h()).all(|v| v.is_finite()));
    assert_eq!(local.load(&c).counts.iter().sum::<u64>(), 16);
}

/// The MoE layers of a model (decoder layers, then MTP blocks).
fn moes(w: &mut Weights) -> Vec<&mut Moe> {
    w.layers
        .iter_mut()
        .chain(w.mtp.iter_mut().map(|m| &mut m.block))
        .filter_map(|b| match &mut b.mlp {
            Ffn::Moe(m) => Some(&mut **m),
            Ffn::Dense(_) => None,
        })
        .collect()
}

/// The routed expert a tensor name belongs to (`…mlp.experts.{e}.…`).
fn expert_of_name(name: &str) -> Option<usize> {
    let rest = &name[name.find(".mlp.experts.")? + ".mlp.experts.".len()..];
    rest.split('.').next()?.parse().ok()
}

#[test]
fn ep_stage_matches_single_rank_model() {
    let p = 2;
    let cfg = ModelConfig::tiny();
    let d = dev();
    let mut model = DeepSeekV3::init(&cfg, &d, 3).expect("init");
    for (i, m) in moes(&mut model.weights).into_iter().enumerate() {
        m.gate.e_score_correction_bias = randn(&[8], 50 + i as u64, 0.2);
    }
    let opts = StepOptions {
        balance_alpha: 0.01,
        mtp_lambda: 0.3,
        keep_logits: false,
    };
    let batches: Vec<Batch> = (0..p)
        .map(|q| {
            let ids = (0..2 * 16u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(q as u32 * 977) >> 13) % 256)
                .collect();
            Batch::causal(ids, 2, 16)
        })
        .collect();
    let refs: Vec<_> = batches
        .iter()
        .map(|b| {
            let mut g = model.zero_grads(&d);
            let out = model.forward_backward(&d, b, &opts, &mut g).expect("step");
            (out, g)
        })
        .collect();

    let group = threads::group(p);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(q, ex)| {
                let (model, batches, opts, cfg) = (&model, &batches, &opts, &cfg);
                s.spawn(move || {
                    let d = dev();
                    let mine = experts_of(8, p, q);
                    let mut local = model.clone();
                    moes(&mut local.weights)
                        .into_iter()
                        .for_each(|m| keep_only(&mut m.experts, &mine));
                    let mut g = model.zero_grads(&d);
                    moes(&mut g)
                        .into_iter()
                        .for_each(|m| keep_only(&mut m.experts, &mine));
                    let spec = StageSpec::whole(cfg);
                    let (out, mut cache) = local
                        .stage_forward_ep(&d, &spec, &batches[q], None, opts, Some(ex))
                        .expect("forward");
                    let none = local.stage_backward_input_ep(&d, &mut cache, None, Some(ex));
                    assert!(none.is_none());
                    local.stage_backward_weight(&d, cache, &mut g);
                    (out, g)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });

    let mut worst = 0.0f64;
    for (q, (out, g)) in outs.iter().enumerate() {
        let (reference, g_ref) = &refs[q];
        let (a, b) = (&out.losses, &reference.losses);
        assert!(b.balance > 0.0 && b.mtp > 0.0);
        for (what, x, y) in [
            ("ce", a.ce, b.ce),
            ("mtp", a.mtp, b.mtp),
            ("balance", a.balance, b.balance),
        ] {
            let r = rel_f32(x, y);
            assert!(r <= TOL, "rank {q} {what} loss: {x} vs {y}");
            worst = worst.max(r);
        }
        assert_eq!(out.loads, reference.loads, "rank {q} loads");
        let mine = experts_of(8, p, q);
        let mut ours = Vec::new();
        g.visit("", &mut |n, t, _| ours.push((n.to_string(), t.clone())));
        let named = |w: &Weights, name: &str| {
            let mut found = None;
            w.visit("", &mut |n, t, _| {
                if n == name {
                    found = Some(t.clone())
                }
            });
            found.expect("same names")
        };
        for (name, t) in &ours {
            match expert_of_name(name) {
                Some(e) if !mine.contains(&e) => {
                    assert!(t.is_shape_only(), "rank {q} wrote {name}");
                }
                Some(_) => {
                    let all: Vec<Tensor> = refs.iter().map(|(_, g)| named(g, name)).collect();
                    let total = sum(&all.iter().collect::<Vec<_>>());
                    if total.h().iter().any(|&v| v != 0.0) {
                        let r = rel(t, &total);
                        assert!(r <= TOL, "rank {q} {name}: {r:.3e}");
                        worst = worst.max(r);
                    }
                }
                None => {
                    let reference = named(g_ref, name);
                    if reference.h().iter().any(|&v| v != 0.0) {
                        let r = rel(t, &reference);
                        assert!(r <= TOL, "rank {q} {name}: {r:.3e}");
                        worst = worst.max(r);
                    }
                }
            }
        }
    }
    eprintln!("EP stage P={p}: max relative difference {worst:.3e}");
}

#[test]
fn ep_stage_runs_on_the_simulated_device() {
    use crate::device::sim::{SimDevice, SimProfile};
    let p = 2;
    let cfg = ModelConfig::tiny();
    let group = threads::group(p);
    std::thread::scope(|s| {
        for (q, ex) in group.iter().enumerate() {
            let cfg = &cfg;
            s.spawn(move || {
                let d = SimDevice::new(SimProfile::h200());
                let model = DeepSeekV3::init(cfg, &d, 1).expect("init");
                let mut g = model.zero_grads(&d);
                let batch =
                    Batch::causal((0..64).map(|i| (i * 7 + q) as u32 % 256).collect(), 2, 32);
                let spec = StageSpec::whole(cfg);
                let opts = StepOptions::from_config(cfg);
                let (_, mut cache) = model
                    .stage_forward_ep(&d, &spec, &batch, None, &opts, Some(ex))
                    .expect("forward");
                model.stage_backward_input_ep(&d, &mut cache, None, Some(ex));
                model.stage_backward_weight(&d, cache, &mut g);
                assert!(d.take_cost().gemm_flops > 0.0);
            });
        }
    });
}
