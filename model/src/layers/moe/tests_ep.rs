//! Expert parallelism against the single-rank layer and model: P ranks in one thread, each with
//! its own tokens and output-gradient, their phases run in lock-step and the parts moved between
//! them by [`run_group`] (what the actors do over the fabric).

use std::collections::BTreeMap;
use std::ops::Range;

use super::*;
use crate::config::ModelConfig;
use crate::layers::block::Ffn;
use crate::layers::ep::experts_of;
use crate::layers::gradcheck::{dev, randn, rope_table, small_config};
use crate::layers::local::LocalExperts;
use crate::layers::zeros_like;
use crate::model::{Batch, DeepSeekV3, StepOptions, Weights};
use crate::stage::{BackwardPass, ForwardPass, PassError, StageSpec, Yield};

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

/// Every expert-owner runs its experts on what every source sent it (`sent[src][dst]`); returns
/// what goes back to each source (`back[src][dst]`) and each owner's caches by layer.
fn owners_forward(
    d: &dyn crate::device::Device,
    moes: &[Moe],
    hidden: usize,
    sent: Vec<Vec<DispatchPart>>,
) -> (Vec<Vec<Tensor>>, Vec<BTreeMap<usize, ShardCache>>) {
    let p = moes.len();
    let mut inbox: Vec<Vec<DispatchPart>> = (0..p).map(|_| Vec::new()).collect();
    for parts in sent {
        for (dst, part) in parts.into_iter().enumerate() {
            inbox[dst].push(part);
        }
    }
    let mut back: Vec<Vec<Tensor>> = (0..p).map(|_| Vec::new()).collect();
    let mut caches = Vec::new();
    for (dst, parts) in inbox.into_iter().enumerate() {
        let m = &moes[dst];
        let ids = experts_of(m.n_experts(), p, dst);
        let (outs, cache) = shard::forward(d, &m.experts, ids, hidden, parts).expect("owner");
        caches.push(BTreeMap::from([(m.layer, cache)]));
        for (src, t) in outs.into_iter().enumerate() {
            back[src].push(t);
        }
    }
    (back, caches)
}

/// Every expert-owner's B on the gradients every source sent it (`sent[src][dst]`).
fn owners_backward(
    d: &dyn crate::device::Device,
    moes: &[Moe],
    caches: &mut [BTreeMap<usize, ShardCache>],
    sent: Vec<Vec<Tensor>>,
) -> Vec<Vec<Tensor>> {
    let p = moes.len();
    let mut inbox: Vec<Vec<Tensor>> = (0..p).map(|_| Vec::new()).collect();
    for parts in sent {
        for (dst, part) in parts.into_iter().enumerate() {
            inbox[dst].push(part);
        }
    }
    let mut back: Vec<Vec<Tensor>> = (0..p).map(|_| Vec::new()).collect();
    for (dst, grads) in inbox.into_iter().enumerate() {
        let m = &moes[dst];
        let cache = caches[dst].get_mut(&m.layer).expect("forward ran");
        let outs = shard::backward_input(d, &m.experts, cache, grads).expect("owner B");
        for (src, t) in outs.into_iter().enumerate() {
            back[src].push(t);
        }
    }
    back
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
    let ropes: Vec<Tensor> = shapes.iter().map(|s| rope_table(&cfg, &d, s.1)).collect();
    let ctx = |q: usize| Ctx {
        dev: &d,
        batch: shapes[q].0,
        seq: shapes[q].1,
        rope: &ropes[q],
        balance_alpha: 0.3,
    };

    let refs: Vec<Reference> = (0..p)
        .map(|q| {
            let ctx = ctx(q);
            let mut ex = LocalExperts::default();
            let (routed, parts) = moe.route(&ctx, &xs[q], EpGroup::ALONE);
            let back = ex.forward(&d, &moe, parts).expect("experts");
            let shared = moe.shared_forward(&d, &xs[q]);
            let (y, c) = moe
                .combine(&ctx, routed, back, shared, xs[q].rows())
                .expect("combine");
            let (d_w, parts) = moe.combine_backward(&ctx, &c, &rs[q]);
            let back = ex.backward_input(&d, &moe, parts).expect("experts' B");
            let shared = moe.shared_backward(&d, &c, &rs[q]);
            let (dx, dys) = moe.route_backward(&ctx, &c, &d_w, back, shared).expect("B");
            let mut g = zeros_like(&moe, &d);
            moe.backward_weight(&ctx, &xs[q], &c, &dys, &mut g);
            ex.backward_weight(&d, &moe, &mut g).expect("experts' W");
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

    // Every rank: its own copy of the layer, holding only its experts.
    let locals: Vec<Moe> = (0..p)
        .map(|q| {
            let mut local = moe.clone();
            keep_only(&mut local.experts, &experts_of(8, p, q));
            local
        })
        .collect();
    let group = |q: usize| EpGroup { size: p, index: q };
    // Forward: route everywhere, run every owner's experts, combine everywhere.
    let (mut routed, mut sent) = (Vec::new(), Vec::new());
    for q in 0..p {
        let (r, parts) = locals[q].route(&ctx(q), &xs[q], group(q));
        routed.push(r);
        sent.push(parts);
    }
    let (backs, mut caches) = owners_forward(&d, &locals, hidden, sent);
    let mut outs = Vec::new();
    for (q, (r, back)) in routed.into_iter().zip(backs).enumerate() {
        let shared = locals[q].shared_forward(&d, &xs[q]);
        let (y, c) = locals[q]
            .combine(&ctx(q), r, back, shared, xs[q].rows())
            .expect("combine");
        outs.push((y, c));
    }
    // B the same way.
    let mut sent = Vec::new();
    let mut d_ws = Vec::new();
    for (q, (_, c)) in outs.iter().enumerate() {
        let (d_w, parts) = locals[q].combine_backward(&ctx(q), c, &rs[q]);
        d_ws.push(d_w);
        sent.push(parts);
    }
    let backs = owners_backward(&d, &locals, &mut caches, sent);
    let mut gs: Vec<Moe> = Vec::new();
    let mut results = Vec::new();
    for (q, ((y, c), back)) in outs.into_iter().zip(backs).enumerate() {
        let shared = locals[q].shared_backward(&d, &c, &rs[q]);
        let (dx, dys) = locals[q]
            .route_backward(&ctx(q), &c, &d_ws[q], back, shared)
            .expect("B");
        let mut g = zeros_like(&moe, &d);
        keep_only(&mut g.experts, &experts_of(8, p, q));
        locals[q].backward_weight(&ctx(q), &xs[q], &c, &dys, &mut g);
        gs.push(g);
        results.push((y, dx, locals[q].load(&c), c.router.balance_loss));
    }
    for (q, cache) in caches.into_iter().enumerate() {
        let c = cache
            .into_values()
            .next()
            .expect("the layer ran on every owner");
        shard::backward_weight(&d, c, &mut gs[q].experts).expect("W");
    }
    let outs: Vec<_> = results
        .into_iter()
        .zip(gs)
        .map(|((y, dx, load, balance), g)| (y, dx, g, load, balance))
        .collect();

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

#[test]
fn parts_that_do_not_fit_are_errors_not_panics() {
    let cfg = moe_config(2);
    let d = dev();
    let moe = Moe::init(&d, &cfg, "m.", 1, 9);
    let h = cfg.hidden_size;
    let part = |counts: Vec<u64>, rows: usize, cols: usize| DispatchPart {
        counts,
        rows: randn(&[rows, cols], 5, 1.0),
    };
    let run = |parts| shard::forward(&d, &moe.experts, 4..8, h, parts).map(|_| ());
    assert_eq!(
        run(vec![part(vec![1, 1, 1], 3, h)]),
        Err(ShardError::Counts {
            source_index: 0,
            got: 3,
            want: 4
        })
    );
    assert_eq!(
        run(vec![
            part(vec![0; 4], 0, h),
            part(vec![1, u64::MAX, 0, 0], 2, h)
        ]),
        Err(ShardError::Rows {
            source_index: 1,
            counted: u64::MAX,
            rows: 2
        })
    );
    assert_eq!(
        run(vec![part(vec![2, 0, 0, 1], 3, h + 1)]),
        Err(ShardError::Width {
            source_index: 0,
            got: h + 1,
            want: h
        })
    );
    // What comes back to the token-owner must match what it sent.
    let (batch, seq) = (2, 4);
    let rope = rope_table(&cfg, &d, seq);
    let ctx = Ctx {
        dev: &d,
        batch,
        seq,
        rope: &rope,
        balance_alpha: 0.0,
    };
    let x = randn(&[batch * seq, h], 1, 1.0);
    let ep = EpGroup { size: 2, index: 0 };
    let (routed, parts) = moe.route(&ctx, &x, ep);
    let sent: Vec<usize> = parts.iter().map(|p| p.rows.rows()).collect();
    let mut back: Vec<Tensor> = sent.iter().map(|&r| randn(&[r, h], 2, 1.0)).collect();
    back[1] = randn(&[sent[1] + 1, h], 3, 1.0);
    let shared = moe.shared_forward(&d, &x);
    let err = moe
        .combine(&ctx, routed, back, shared, x.rows())
        .map(|_| ());
    assert_eq!(
        err,
        Err(MoeError::Rows {
            layer: 1,
            index: 1,
            got: sent[1] + 1,
            want: sent[1]
        })
    );
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

/// A pass's `step`, as [`run_group`] calls it.
type Step<'a> = dyn FnMut(Option<Vec<Tensor>>) -> Result<Yield, PassError> + 'a;

/// Runs one pass per rank in lock-step to its end, moving the parts between them: every rank
/// runs the same stage, so all stop at the same layer's exchange. `caches[q]` keeps rank `q`'s
/// expert activations by layer.
fn run_group(
    d: &dyn crate::device::Device,
    models: &[DeepSeekV3],
    caches: &mut [BTreeMap<usize, ShardCache>],
    steps: &mut [&mut Step<'_>],
) {
    let p = steps.len();
    let hidden = models[0].config.hidden_size;
    let mut back: Vec<Option<Vec<Tensor>>> = (0..p).map(|_| None).collect();
    let mut ready: Vec<Vec<Tensor>> = Vec::new();
    loop {
        let ys: Vec<Yield> = steps
            .iter_mut()
            .zip(back.iter_mut())
            .map(|(s, b)| s(b.take()).expect("pass"))
            .collect();
        match &ys[0] {
            Yield::Done => {
                assert!(ys.iter().all(|y| matches!(y, Yield::Done)));
                return;
            }
            Yield::Await { .. } => {
                for (b, r) in back.iter_mut().zip(ready.drain(..)) {
                    *b = Some(r);
                }
            }
            Yield::Dispatch { layer, .. } => {
                let layer = *layer;
                let moes: Vec<Moe> = models
                    .iter()
                    .map(|m| m.moe(layer).expect("a MoE layer").clone())
                    .collect();
                let sent = ys
                    .into_iter()
                    .map(|y| match y {
                        Yield::Dispatch { parts, .. } => parts,
                        other => panic!("ranks out of step: {other:?}"),
                    })
                    .collect();
                let (b, new) = owners_forward(d, &moes, hidden, sent);
                for (c, n) in caches.iter_mut().zip(new) {
                    c.extend(n);
                }
                ready = b;
            }
            Yield::GradDispatch { layer, .. } => {
                let layer = *layer;
                let moes: Vec<Moe> = models
                    .iter()
                    .map(|m| m.moe(layer).expect("a MoE layer").clone())
                    .collect();
                let sent = ys
                    .into_iter()
                    .map(|y| match y {
                        Yield::GradDispatch { parts, .. } => parts,
                        other => panic!("ranks out of step: {other:?}"),
                    })
                    .collect();
                ready = owners_backward(d, &moes, caches, sent);
            }
        }
    }
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

    let locals: Vec<DeepSeekV3> = (0..p)
        .map(|q| {
            let mut local = model.clone();
            let mine = experts_of(8, p, q);
            moes(&mut local.weights)
                .into_iter()
                .for_each(|m| keep_only(&mut m.experts, &mine));
            local
        })
        .collect();
    let spec = StageSpec::whole(&cfg);
    let mut caches: Vec<BTreeMap<usize, ShardCache>> = (0..p).map(|_| BTreeMap::new()).collect();
    let mut fwds: Vec<ForwardPass> = (0..p)
        .map(|q| {
            let ep = EpGroup { size: p, index: q };
            ForwardPass::new(&spec, batches[q].clone(), None, &opts, ep).expect("pass")
        })
        .collect();
    {
        let (f0, f1) = fwds.split_at_mut(1);
        let (m0, m1) = (&locals[0], &locals[1]);
        let mut s0 = |b| f0[0].step(m0, &d, b);
        let mut s1 = |b| f1[0].step(m1, &d, b);
        run_group(&d, &locals, &mut caches, &mut [&mut s0, &mut s1]);
    }
    let mut outs = Vec::new();
    let mut bwds = Vec::new();
    for f in fwds {
        let (out, cache) = f.finish().expect("forward");
        outs.push(out);
        bwds.push(BackwardPass::new(cache, None).expect("B"));
    }
    {
        let (b0, b1) = bwds.split_at_mut(1);
        let (m0, m1) = (&locals[0], &locals[1]);
        let mut s0 = |b| b0[0].step(m0, &d, b);
        let mut s1 = |b| b1[0].step(m1, &d, b);
        run_group(&d, &locals, &mut caches, &mut [&mut s0, &mut s1]);
    }
    let outs: Vec<_> = bwds
        .into_iter()
        .zip(outs)
        .enumerate()
        .map(|(q, (b, out))| {
            let (none, cache) = b.finish().expect("B");
            assert!(none.is_none());
            let mut g = model.zero_grads(&d);
            moes(&mut g)
                .into_iter()
                .for_each(|m| keep_only(&mut m.experts, &experts_of(8, p, q)));
            locals[q]
                .stage_backward_weight(&d, cache, &mut g, None)
                .expect("W");
            for (layer, c) in std::mem::take(&mut caches[q]) {
                let gm = g.moe_mut(layer).expect("a MoE layer");
                shard::backward_weight(&d, c, &mut gm.experts).expect("W");
            }
            (out, g)
        })
        .collect();

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
    let d = SimDevice::new(SimProfile::h200());
    let model = DeepSeekV3::init(&cfg, &d, 1).expect("init");
    let models = vec![model.clone(), model];
    let spec = StageSpec::whole(&cfg);
    let opts = StepOptions::from_config(&cfg);
    let mut caches: Vec<BTreeMap<usize, ShardCache>> = (0..p).map(|_| BTreeMap::new()).collect();
    let mut fwds: Vec<ForwardPass> = (0..p)
        .map(|q| {
            let batch = Batch::causal((0..64).map(|i| (i * 7 + q) as u32 % 256).collect(), 2, 32);
            ForwardPass::new(&spec, batch, None, &opts, EpGroup { size: p, index: q })
                .expect("pass")
        })
        .collect();
    {
        let (f0, f1) = fwds.split_at_mut(1);
        let (m0, m1) = (&models[0], &models[1]);
        let mut s0 = |b| f0[0].step(m0, &d, b);
        let mut s1 = |b| f1[0].step(m1, &d, b);
        run_group(&d, &models, &mut caches, &mut [&mut s0, &mut s1]);
    }
    let mut bwds: Vec<BackwardPass> = fwds
        .into_iter()
        .map(|f| BackwardPass::new(f.finish().expect("forward").1, None).expect("B"))
        .collect();
    {
        let (b0, b1) = bwds.split_at_mut(1);
        let (m0, m1) = (&models[0], &models[1]);
        let mut s0 = |b| b0[0].step(m0, &d, b);
        let mut s1 = |b| b1[0].step(m1, &d, b);
        run_group(&d, &models, &mut caches, &mut [&mut s0, &mut s1]);
    }
    for (q, b) in bwds.into_iter().enumerate() {
        let (_, cache) = b.finish().expect("B");
        let mut g = models[q].zero_grads(&d);
        models[q]
            .stage_backward_weight(&d, cache, &mut g, None)
            .expect("W");
    }
    assert!(d.take_cost().gemm_flops > 0.0);
}
