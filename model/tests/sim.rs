//! The simulated device runs the whole model (forward + B + W) on shapes only: a nonzero cost,
//! no values anywhere, and GEMM FLOPs equal to the analytic count.

use flotilla_model::flops::step_flops;
use flotilla_model::params::Params;
use flotilla_model::{Batch, DeepSeekV3, Device, ModelConfig, SimDevice, SimProfile, StepOptions};

#[test]
fn whole_model_step_on_the_simulator_costs_time_and_does_no_arithmetic() {
    let dev = SimDevice::new(SimProfile::h200());
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 1).expect("valid config");
    let _ = dev.take_cost();
    let (b, t) = (8, 64);
    let batch = Batch::causal((0..b * t).map(|i| (i % 256) as u32).collect(), b, t);
    let mut grads = model.zero_grads(&dev);
    let _ = dev.take_cost();
    let opts = StepOptions::from_config(&cfg);
    let out = model
        .forward_backward(&dev, &batch, &opts, &mut grads)
        .expect("step runs");
    let cost = dev.take_cost();

    assert!(
        cost.seconds > 0.0 && cost.flops > 0.0 && cost.bytes > 0.0,
        "{cost:?}"
    );
    let expected = step_flops(&cfg, b, t, model.mtp_depth()).total();
    assert_eq!(
        cost.gemm_flops, expected,
        "simulated GEMM FLOPs vs the analytic count"
    );
    // No values anywhere: weights, gradients and outputs are shapes only.
    let mut all_shape_only = true;
    model
        .weights
        .visit("", &mut |_, t, _| all_shape_only &= t.is_shape_only());
    grads.visit("", &mut |_, t, _| all_shape_only &= t.is_shape_only());
    assert!(all_shape_only);
    assert_eq!(out.losses.ce, 0.0);
    // Synthetic routing is perfectly balanced.
    assert!(!out.loads.is_empty());
    assert!(out.loads.iter().all(|l| l.max_over_mean() == 1.0));
    println!(
        "simulated step: {:.3} ms, {:.3} GFLOP, {} ops",
        cost.seconds * 1e3,
        cost.flops / 1e9,
        cost.ops
    );
}
