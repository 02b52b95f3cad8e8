//! Whole-model behaviour: pipeline stages reproduce the single-stage step exactly, W can run
//! after all B's, MTP follows the report's definition, init is deterministic, training learns.

use flotilla_model::layers::Ctx;
use flotilla_model::layers::loss::{self, shifted_targets};
use flotilla_model::layers::rope;
use flotilla_model::params::Params;
use flotilla_model::{
    BackwardPass, Batch, CpuDevice, DeepSeekV3, Device, EpGroup, ForwardPass, LocalExperts,
    ModelConfig, StageSpec, StepOptions, Weights,
};

fn batch(b: usize, t: usize, seed: u32) -> Batch {
    Batch::causal(
        (0..b * t)
            .map(|i| {
                ((i as u32)
                    .wrapping_mul(2654435761u32)
                    .wrapping_add(seed.wrapping_mul(40503))
                    >> 13)
                    % 256
            })
            .collect(),
        b,
        t,
    )
}

fn values(dev: &CpuDevice, w: &Weights) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    w.visit("", &mut |n, t, _| {
        out.push((n.to_string(), dev.download(t).unwrap_or_default()))
    });
    out
}

#[test]
fn pipeline_stages_reproduce_the_whole_model_step() {
    let dev = CpuDevice::new(2);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 3).expect("init");
    let b = batch(2, 16, 1);
    let opts = StepOptions {
        balance_alpha: 0.01,
        mtp_lambda: 0.3,
        keep_logits: false,
    };
    let mut whole = model.zero_grads(&dev);
    let reference = model
        .forward_backward(&dev, &b, &opts, &mut whole)
        .expect("step");
    assert!(reference.losses.mtp > 0.0 && reference.losses.balance > 0.0);

    for n_stages in [2, 3] {
        let specs = StageSpec::split(&cfg, n_stages);
        let mut grads = model.zero_grads(&dev);
        let mut experts = LocalExperts::default();
        let mut caches = Vec::new();
        let mut losses = flotilla_model::LossParts::default();
        let mut hidden = None;
        for spec in &specs {
            let mut f = ForwardPass::new(spec, b.clone(), hidden.take(), &opts, EpGroup::ALONE)
                .expect("pass");
            model
                .drive_local(&dev, &mut experts, |back| f.step(&model, &dev, back))
                .expect("forward");
            let (out, cache) = f.finish().expect("forward");
            losses.merge(&out.losses);
            hidden = out.hidden;
            caches.push(cache);
        }
        // All B passes first (last stage to first), then the W passes: a zero-bubble order.
        let mut d = None;
        let mut done = Vec::new();
        for cache in caches.into_iter().rev() {
            let mut bp = BackwardPass::new(cache, d.take()).expect("pass");
            model
                .drive_local(&dev, &mut experts, |back| bp.step(&model, &dev, back))
                .expect("B");
            let (dx, cache) = bp.finish().expect("B");
            d = dx;
            done.push(cache);
        }
        assert!(d.is_none(), "the first stage has no input gradient");
        for cache in done {
            model
                .stage_backward_weight(&dev, cache, &mut grads, Some(&mut experts))
                .expect("W");
        }
        assert_eq!(losses, reference.losses, "{n_stages} stages");
        assert_eq!(
            values(&dev, &grads),
            values(&dev, &whole),
            "{n_stages} stages"
        );
    }
}

#[test]
fn mtp_loss_follows_the_report() {
    // L_1 = CE(lm_head(shared_head.norm(TRM(eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])))), t_{i+2}),
    // with h the main model's last hidden state before the final norm.
    let dev = CpuDevice::new(1);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 5).expect("init");
    let (bs, t) = (2, 12);
    let b = batch(bs, t, 9);
    let opts = StepOptions {
        balance_alpha: 0.0,
        mtp_lambda: 0.5,
        keep_logits: false,
    };
    let out = model.forward(&dev, &b, &opts).expect("forward");

    let w = &model.weights;
    let table = rope::table(&cfg, &dev, t).expect("rope");
    let ctx = Ctx {
        dev: &dev,
        batch: bs,
        seq: t,
        rope: &table,
        balance_alpha: 0.0,
    };
    let mut ex = LocalExperts::default();
    let mut h = w.embed_tokens.forward(&dev, &b.input_ids);
    for block in &w.layers {
        h = block.forward_local(&ctx, h, &mut ex).0;
    }
    let next: Vec<u32> = (0..bs * t)
        .map(|i| if i % t + 1 < t { b.input_ids[i + 1] } else { 0 })
        .collect();
    let m = &w.mtp[0];
    let (z, _) = m.pre(&ctx, &h, w.embed_tokens.forward(&dev, &next));
    let (h1, _) = m.block.forward_local(&ctx, z, &mut ex);
    let targets = shifted_targets(&b.labels, bs, t, 2);
    let l1 = loss::forward(
        &dev,
        &m.shared_head_norm,
        &w.lm_head,
        &h1,
        &targets,
        1.0,
        false,
    );
    assert_eq!(l1.count, bs * (t - 2));
    assert!((out.losses.mtp_per_depth[0] - l1.loss).abs() < 1e-6);
    assert!((out.losses.mtp - 0.5 * l1.loss).abs() < 1e-6);
}

#[test]
fn init_is_deterministic_in_the_seed() {
    let dev = CpuDevice::new(1);
    let cfg = ModelConfig::tiny();
    let a = DeepSeekV3::init(&cfg, &dev, 42)
        .expect("init")
        .params_sha256(&dev);
    let b = DeepSeekV3::init(&cfg, &dev, 42)
        .expect("init")
        .params_sha256(&dev);
    let c = DeepSeekV3::init(&cfg, &dev, 43)
        .expect("init")
        .params_sha256(&dev);
    assert!(a.is_some());
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn config_round_trips_through_json() {
    let cfg = ModelConfig::tiny();
    assert_eq!(
        ModelConfig::from_json(&cfg.to_json().expect("json")).expect("parse"),
        cfg
    );
    let err = ModelConfig::from_json("{\"hidden_size\": 4}").expect_err("incomplete");
    assert!(err.to_string().contains("missing field"), "{err}");
}

#[test]
fn a_few_sgd_steps_reduce_the_loss_and_the_bias_update_applies() {
    let dev = CpuDevice::new(2);
    let cfg = ModelConfig::tiny();
    let mut model = DeepSeekV3::init(&cfg, &dev, 1).expect("init");
    let b = batch(4, 32, 2);
    let opts = StepOptions::from_config(&cfg);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..8 {
        let mut g = model.zero_grads(&dev);
        let out = model
            .forward_backward(&dev, &b, &opts, &mut g)
            .expect("step");
        first.get_or_insert(out.losses.ce);
        last = out.losses.ce;
        let grads = g.trainable();
        model.weights_visit_mut(&mut |name, t| {
            if let (Some(gt), Some(v)) = (grads.get(name), t.host_mut()) {
                let gv = gt.host().unwrap_or(&[]);
                v.iter_mut().zip(gv).for_each(|(p, g)| *p -= 0.5 * g);
            }
        });
        model.update_biases(&dev, &out.loads, cfg.bias_gamma());
    }
    let first = first.unwrap_or(0.0);
    assert!(last < first - 0.1, "loss should fall: {first} -> {last}");
    let bias = model.named()["model.layers.1.mlp.gate.e_score_correction_bias"]
        .host()
        .unwrap_or(&[])
        .to_vec();
    assert!(bias.iter().any(|&x| x != 0.0), "biases moved");
}
