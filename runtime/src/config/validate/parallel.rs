//! The `[parallel]` rules: degrees, the world, the schedule's needs, and `stage_layers`.

use super::{Checker, n};
use crate::config::{Config, Schedule};

pub(super) fn parallel(cfg: &Config, c: &mut Checker<'_>) {
    let p = &cfg.parallel;
    for (key, v) in [
        ("parallel.pp", p.pp),
        ("parallel.ep", p.ep),
        ("parallel.dp", p.dp),
        ("parallel.micro_batches", p.micro_batches),
        ("parallel.sub_batches", p.sub_batches),
        ("parallel.max_hosts_per_token", p.max_hosts_per_token),
        ("parallel.dp_bucket_mib", p.dp_bucket_mib),
    ] {
        c.at_least_one(key, n(v));
    }
    if p.pp == 0 || p.ep == 0 || p.dp == 0 || p.micro_batches == 0 || p.sub_batches == 0 {
        return; // the ratios below are meaningless; the zero is already reported
    }
    let world = cfg.cluster.world_size();
    c.rule(
        &[
            "parallel.pp",
            "parallel.ep",
            "parallel.dp",
            "cluster.hosts",
            "cluster.ranks_per_host",
        ],
        p.world_size() == world || world == 0,
        || {
            format!(
                "pp * ep * dp = {} * {} * {} = {} ranks, but the cluster has hosts * \
                 ranks_per_host = {} * {} = {world}",
                p.pp,
                p.ep,
                p.dp,
                p.world_size(),
                cfg.cluster.hosts,
                cfg.cluster.ranks_per_host
            )
        },
    );
    let experts = cfg.model.n_routed_experts;
    c.rule(
        &["parallel.ep", "model.n_routed_experts"],
        experts.is_multiple_of(p.ep),
        || {
            format!(
                "ep = {} does not divide model.n_routed_experts = {experts}",
                p.ep
            )
        },
    );
    let (stages, layers) = (p.stages(), cfg.model.pipeline_layers());
    c.rule(
        &[
            "parallel.pp",
            "parallel.schedule",
            "model.num_hidden_layers",
            "model.num_nextn_predict_layers",
        ],
        layers >= stages,
        || {
            format!(
                "{} with pp = {} needs {stages} pipeline stages, but the model has only {layers} \
                 layers (num_hidden_layers + num_nextn_predict_layers)",
                p.schedule, p.pp
            )
        },
    );
    stage_layers(cfg, c);
    let sched_keys = ["parallel.pp", "parallel.schedule"];
    let mb_keys = ["parallel.micro_batches", "parallel.pp", "parallel.schedule"];
    match p.schedule {
        Schedule::DualPipe | Schedule::DualPipeV => {
            if p.schedule == Schedule::DualPipe {
                c.rule(&sched_keys, p.pp.is_multiple_of(2), || {
                    format!(
                        "dualpipe needs an even pp (ranks pair up stage i with pp-1-i), found {}",
                        p.pp
                    )
                });
                c.rule(&mb_keys, p.micro_batches.is_multiple_of(2), || {
                    format!(
                        "dualpipe feeds half the micro-batches from each end, so it needs an even \
                         micro_batches, found {}",
                        p.micro_batches
                    )
                });
            }
            let need = p.pp.saturating_mul(2);
            c.rule(&mb_keys, p.micro_batches >= need, || {
                format!(
                    "{} needs micro_batches >= 2 * pp = {need}, found {}",
                    p.schedule, p.micro_batches
                )
            });
        }
        Schedule::OneFOneB | Schedule::Zb1p => {
            c.rule(&mb_keys, p.micro_batches >= p.pp, || {
                format!(
                    "{} needs micro_batches >= pp = {}, found {}",
                    p.schedule, p.pp, p.micro_batches
                )
            });
        }
        Schedule::GPipe => {}
    }
    // Micro-batches per step as the rules name them: `sub_batches` only when it is set.
    let sub = p.sub_batches > 1;
    let with_mb = |mut keys: Vec<&'static str>| {
        keys.push("parallel.micro_batches");
        if sub {
            keys.push("parallel.sub_batches");
        }
        keys
    };
    let (mb_name, mb_values) = if sub {
        (
            "micro_batches * sub_batches",
            format!("{} * {}", p.micro_batches, p.sub_batches),
        )
    } else {
        ("micro_batches", p.micro_batches.to_string())
    };
    // A message tag carries 16 bits of the (sub-)micro-batch index (`actors/src/pipeline/
    // transport.rs`): more would make two micro-batches' messages collide.
    c.rule(
        &with_mb(vec![]),
        p.sub_batches_per_step() <= 1 << 16,
        || {
            format!(
                "{mb_name} = {mb_values} exceeds 65536, the most a step's messages can tell apart"
            )
        },
    );
    // Expert-parallel ranks train on different data (the attention is data-parallel over
    // dp * ep ranks), so the global batch splits over dp * ep * micro_batches (* sub_batches).
    let per_step =
        p.dp.saturating_mul(p.ep)
            .saturating_mul(p.sub_batches_per_step());
    let batch = cfg.data.batch_size;
    let keys = with_mb(vec!["data.batch_size", "parallel.dp", "parallel.ep"]);
    c.rule(&keys, batch.is_multiple_of(per_step), || {
        format!(
            "batch_size = {batch} is not divisible by dp * ep * {mb_name} = {} * {} * {mb_values} \
             = {per_step}",
            p.dp, p.ep
        )
    });
}

/// `stage_layers`, when set: one entry per model stage, each at least 1, summing to the model's
/// decoder layers.
fn stage_layers(cfg: &Config, c: &mut Checker<'_>) {
    let p = &cfg.parallel;
    let list = &p.stage_layers;
    if list.is_empty() {
        return; // the even split
    }
    const KEY: &str = "parallel.stage_layers";
    if let Some(i) = list.iter().position(|&l| l == 0) {
        c.rule(&[KEY], false, || {
            format!("entry {i} is 0: every stage needs at least one decoder layer")
        });
    }
    let stages = p.stages();
    c.rule(
        &[KEY, "parallel.pp", "parallel.schedule"],
        list.len() == stages,
        || {
            format!(
                "{} {}, but {} at pp = {} cuts the model into {stages} {}",
                list.len(),
                plural(list.len(), "entry", "entries"),
                p.schedule,
                p.pp,
                plural(stages, "stage", "stages")
            )
        },
    );
    let sum = list.iter().fold(0usize, |a, &l| a.saturating_add(l));
    let layers = cfg.model.num_hidden_layers;
    c.rule(&[KEY, "model.num_hidden_layers"], sum == layers, || {
        format!(
            "sums to {sum} {}, model.num_hidden_layers is {layers}",
            plural(sum, "layer", "layers")
        )
    });
}

/// `one` for 1, else `many`.
fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}
