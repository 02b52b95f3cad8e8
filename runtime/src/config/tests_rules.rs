//! Tests of the value ranges and cross-field rules in `validate.rs`, one case per rule.

use super::tests::{parse, problems};
use super::*;

/// `(file, expected key, expected line)`: each file breaks exactly one rule.
const CASES: &[(&str, &str, usize)] = &[
    // [job]
    ("[job]\nname = \" \"\n", "job.name", 2),
    (
        "[job]\nsteps = 0\n[optimizer]\nwarmup_steps = 0\n",
        "job.steps",
        2,
    ),
    ("[job]\nout_dir = \"\"\n", "job.out_dir", 2),
    // [model]: sizes, divisibility, routing bounds
    ("[model]\nhidden_size = 0\n", "model.hidden_size", 2),
    (
        "[model]\nqk_rope_head_dim = 7\n",
        "model.qk_rope_head_dim",
        2,
    ),
    (
        "[model]\nfirst_k_dense_replace = 3\n",
        "model.first_k_dense_replace",
        2,
    ),
    ("[model]\nn_group = 3\n", "model.n_group", 2),
    (
        "[model]\nn_routed_experts = 8\nn_group = 8\ntopk_group = 2\n",
        "model.n_routed_experts",
        2,
    ),
    ("[model]\n\ntopk_group = 3\n", "model.topk_group", 3),
    (
        "[model]\nnum_experts_per_tok = 5\n",
        "model.num_experts_per_tok",
        2,
    ),
    ("[model]\nrms_norm_eps = 0.0\n", "model.rms_norm_eps", 2),
    ("[model]\nmtp_lambda = -0.1\n", "model.mtp_lambda", 2),
    ("[model]\ninit_std = nan\n", "model.init_std", 2),
    ("[model]\nhf_dir = \"\"\n", "model.hf_dir", 2),
    (
        "[model.rope_scaling]\nfactor = 0.5\n",
        "model.rope_scaling.factor",
        2,
    ),
    (
        "[model.rope_scaling]\nbeta_fast = 1.0\n",
        "model.rope_scaling.beta_fast",
        2,
    ),
    (
        "[model.rope_scaling]\noriginal_max_position_embeddings = 512\n",
        "model.rope_scaling.original_max_position_embeddings",
        2,
    ),
    // [parallel]
    ("[parallel]\npp = 0\n", "parallel.pp", 2),
    ("[parallel]\ndp = 2\n", "parallel.dp", 2),
    ("[cluster]\nhosts = 2\n", "cluster.hosts", 2),
    (
        "[parallel]\nep = 3\n[cluster]\nranks_per_host = 3\n[data]\nbatch_size = 6\n",
        "parallel.ep",
        2,
    ),
    (
        "[parallel]\npp = 4\nmicro_batches = 4\n[cluster]\nranks_per_host = 4\n",
        "parallel.pp",
        2,
    ),
    (
        "[parallel]\npp = 2\nschedule = \"dualpipev\"\nmicro_batches = 4\n[cluster]\nranks_per_host = 2\n",
        "parallel.pp",
        2,
    ),
    (
        "[parallel]\npp = 3\nschedule = \"dualpipe\"\nmicro_batches = 6\n[cluster]\nranks_per_host = 3\n[data]\nbatch_size = 6\n",
        "parallel.pp",
        2,
    ),
    (
        "[parallel]\npp = 2\nschedule = \"dualpipe\"\nmicro_batches = 2\n[cluster]\nranks_per_host = 2\n",
        "parallel.micro_batches",
        4,
    ),
    (
        "[parallel]\npp = 2\nschedule = \"zb1p\"\n[cluster]\nranks_per_host = 2\n",
        "parallel.pp",
        2,
    ),
    (
        "[parallel]\nmicro_batches = 3\n",
        "parallel.micro_batches",
        2,
    ),
    ("[parallel]\nsub_batches = 0\n", "parallel.sub_batches", 2),
    (
        "[data]\nbatch_size = 131072\n[parallel]\nmicro_batches = 512\nsub_batches = 256\n",
        "parallel.micro_batches",
        4,
    ),
    (
        "[data]\nbatch_size = 8\n[parallel]\nmicro_batches = 4\nsub_batches = 4\n",
        "data.batch_size",
        2,
    ),
    (
        "[data]\nbatch_size = 7\n[parallel]\nmicro_batches = 2\n",
        "data.batch_size",
        2,
    ),
    (
        "[parallel]\npp = 2\nmicro_batches = 2\nstage_layers = [1, 0, 1]\n[cluster]\nranks_per_host = 2\n",
        "parallel.stage_layers",
        4,
    ),
    (
        "[parallel]\npp = 2\nmicro_batches = 2\nstage_layers = [2]\n[cluster]\nranks_per_host = 2\n",
        "parallel.stage_layers",
        4,
    ),
    (
        "[parallel]\n\nstage_layers = [3]\n",
        "parallel.stage_layers",
        3,
    ),
    // [cluster]
    ("[cluster]\ncpu_threads = 0\n", "cluster.cpu_threads", 2),
    // [supervision]
    ("[supervision]\nwithin_s = 0\n", "supervision.within_s", 2),
    (
        "[supervision]\nbackoff_ms = 6000\n",
        "supervision.backoff_ms",
        2,
    ),
    (
        "[supervision]\nbackoff_max_ms = 50\n",
        "supervision.backoff_max_ms",
        2,
    ),
    (
        "[supervision]\nbackoff_ms = 300\nbackoff_max_ms = 200\n",
        "supervision.backoff_max_ms",
        3,
    ),
    (
        "[supervision]\npeer_timeout_ms = 0\n",
        "supervision.peer_timeout_ms",
        2,
    ),
    (
        "[supervision]\nshutdown_timeout_ms = 0\n",
        "supervision.shutdown_timeout_ms",
        2,
    ),
    // [checkpoint]
    ("[checkpoint]\nkeep = 0\n", "checkpoint.keep", 2),
    ("[checkpoint]\nreplicas = 2\n", "checkpoint.replicas", 2),
    ("[checkpoint]\ndir = \"\"\n", "checkpoint.dir", 2),
    // [data]
    ("[data]\nseq_len = 512\n", "data.seq_len", 2),
    (
        "[model]\nmax_position_embeddings = 32\n",
        "model.max_position_embeddings",
        2,
    ),
    ("[data]\nsource = \"\"\n", "data.source", 2),
    ("[model]\nvocab_size = 100\n", "model.vocab_size", 2),
    // [optimizer]
    ("[optimizer]\nlr = -1\n", "optimizer.lr", 2),
    (
        "[optimizer]\nlr = 1e-4\nmin_lr = 1e-3\n",
        "optimizer.min_lr",
        3,
    ),
    (
        "[optimizer]\nwarmup_steps = 500\n",
        "optimizer.warmup_steps",
        2,
    ),
    ("[optimizer]\nbeta2 = 1.0\n", "optimizer.beta2", 2),
    ("[optimizer]\neps = 0\n", "optimizer.eps", 2),
    ("[optimizer]\ngrad_clip = -1\n", "optimizer.grad_clip", 2),
    (
        "[optimizer]\nweight_decay = inf\n",
        "optimizer.weight_decay",
        2,
    ),
    // [metrics]
    (
        "[metrics]\nprometheus = \"nowhere\"\n",
        "metrics.prometheus",
        2,
    ),
    ("[metrics]\nlog_every = 0\n", "metrics.log_every", 2),
];

#[test]
fn config_each_rule_blames_its_key_and_line() {
    for (src, key, line) in CASES {
        let got = problems(src);
        assert_eq!(got.len(), 1, "{src}\n{got:?}");
        let (got_key, got_line, _) = &got[0];
        assert_eq!(got_key, key, "{src}");
        assert_eq!(got_line, line, "{src}");
    }
}

#[test]
fn config_a_rule_blames_the_key_the_file_wrote() {
    // backoff_max_ms is absent: the rule falls back to backoff_ms, which is present.
    assert_eq!(
        problems("[supervision]\n\nbackoff_ms = 40000\n"),
        [("supervision.backoff_ms".to_owned(), 3, 1)]
    );
    // min_lr absent, lr present.
    assert_eq!(
        problems("[optimizer]\nlr = 1e-4\n"),
        [("optimizer.lr".to_owned(), 2, 1)]
    );
    // Only the schedule is written: dualpipe with the default pp = 1 (odd) and micro_batches
    // = 1 (odd, and fewer than 2 * pp).
    let got = problems("[parallel]\nschedule = \"dualpipe\"\n");
    assert_eq!(
        got,
        [
            ("parallel.schedule".to_owned(), 2, 1),
            ("parallel.schedule".to_owned(), 2, 1),
            ("parallel.schedule".to_owned(), 2, 1)
        ]
    );
}

#[test]
fn config_rejected_keys_do_not_trigger_rules_twice() {
    // pp has the wrong type: the dualpipe rules that read pp are skipped.
    assert_eq!(
        problems(
            "[parallel]\npp = \"3\"\nschedule = \"dualpipe\"\nmicro_batches = 6\n[data]\nbatch_size = 12\n"
        ),
        [("parallel.pp".to_owned(), 2, 6)]
    );
    // A whole section of the wrong type: rules reading it are skipped.
    assert_eq!(
        problems("cluster = 1\n[parallel]\ndp = 2\n"),
        [("cluster".to_owned(), 1, 11)]
    );
}

/// `stage_layers`' three rules, word for word: the count of stages (pp, or 2 * pp for
/// dualpipev), the sum of layers, and no empty stage.
#[test]
fn config_stage_layers_rules_say_what_is_wrong() {
    let one = |src: &str| match Config::from_toml_str(src, "f.toml") {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => {
            assert_eq!(e.len(), 1, "{e}");
            e.to_string()
        }
    };
    let pp2 = |schedule: &str, micro: usize, list: &str| {
        format!(
            "[model]\nnum_hidden_layers = 4\n[parallel]\npp = 2\nschedule = \"{schedule}\"\n\
             micro_batches = {micro}\nstage_layers = {list}\n[cluster]\nranks_per_host = 2\n"
        )
    };
    assert_eq!(
        one(&pp2("dualpipe", 4, "[1, 1, 2]")),
        "f.toml:7:1: parallel.stage_layers: 3 entries, but dualpipe at pp = 2 cuts the model \
         into 2 stages"
    );
    assert_eq!(
        one(&pp2("dualpipev", 4, "[3, 1]")),
        "f.toml:7:1: parallel.stage_layers: 2 entries, but dualpipev at pp = 2 cuts the model \
         into 4 stages"
    );
    assert_eq!(
        one(&pp2("1f1b", 2, "[3, 2]")),
        "f.toml:7:1: parallel.stage_layers: sums to 5 layers, model.num_hidden_layers is 4"
    );
    assert_eq!(
        one(&pp2("1f1b", 2, "[4, 0]")),
        "f.toml:7:1: parallel.stage_layers: entry 1 is 0: every stage needs at least one \
         decoder layer"
    );
    parse(&pp2("dualpipe", 4, "[3, 1]"))
        .validate()
        .expect("valid");
    parse(&pp2("dualpipev", 4, "[1, 1, 1, 1]"))
        .validate()
        .expect("valid");
    // Built in code: no position.
    let mut c = Config::default();
    c.parallel.stage_layers = vec![1];
    let err = c.validate().expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "<config>:0:0: parallel.stage_layers: sums to 1 layer, model.num_hidden_layers is 2"
    );
}

#[test]
fn config_validate_in_code_reports_every_problem_without_positions() {
    let mut c = Config::default();
    c.parallel.pp = 0;
    c.optimizer.lr = -1.0;
    c.model.precision = Precision::Bf16;
    let err = c.validate().expect_err("invalid");
    assert_eq!(
        err.keys(),
        ["model.precision", "optimizer.lr", "parallel.pp"]
    );
    assert!(err.iter().all(|p| p.line == 0 && p.column == 0));
    assert!(err.to_string().starts_with(
        "<config>:0:0: model.precision: precision = \"bf16\" needs device = \"cuda\""
    ));
}

/// bf16 GEMMs run only on the GPU: on the CPU (or the simulator) `model.precision = "bf16"` is
/// refused, naming the key, its line and why; with `device = "cuda"` it passes validation
/// (whether this binary has the CUDA device is the job's question: `make_device` names the
/// cargo feature).
#[test]
fn config_bf16_needs_the_cuda_device() {
    let err = Config::from_toml_str("[model]\nprecision = \"bf16\"\n", "f.toml")
        .expect_err("bf16 on the CPU");
    assert_eq!(
        err.to_string(),
        "f.toml:2:1: model.precision: precision = \"bf16\" needs device = \"cuda\" (the cpu \
         device computes in f32)"
    );
    let ok = "[model]\nprecision = \"bf16\"\n[cluster]\ndevice = \"cuda\"\n";
    let c = Config::from_toml_str(ok, "f.toml").expect("bf16 on cuda");
    assert_eq!(
        (c.model.precision, c.cluster.device),
        (Precision::Bf16, DeviceKind::Cuda)
    );
    let c = Config::from_toml_str("[cluster]\ndevice = \"cuda\"\n", "f.toml").expect("cuda");
    assert_eq!(c.model.precision, Precision::Fp32);
}

/// The CUDA kernels' limits are the config's: more routed experts, groups or rotary channels
/// than the router and RoPE kernels take are refused on `device = "cuda"` (and allowed on the
/// CPU), naming the key.
#[test]
fn config_names_what_exceeds_the_cuda_kernels() {
    let src = "[model]\nn_routed_experts = 512\nn_group = 128\nnum_experts_per_tok = 8\n\
               topk_group = 4\nqk_rope_head_dim = 512\n";
    parse(src).validate().expect("the CPU takes them");
    let err = Config::from_toml_str(&format!("{src}[cluster]\ndevice = \"cuda\"\n"), "f.toml")
        .expect_err("beyond the CUDA kernels");
    let text = err.to_string();
    for want in [
        "model.n_routed_experts = 512 exceeds the CUDA device's limit of 256",
        "model.n_group = 128 exceeds the CUDA device's limit of 64",
        "model.qk_rope_head_dim = 512 exceeds the CUDA device's limit of 256",
    ] {
        assert!(text.contains(want), "{text}");
    }
}

#[test]
fn config_valid_layouts_pass() {
    for src in [
        "[parallel]\npp = 2\nschedule = \"gpipe\"\n[cluster]\nranks_per_host = 2\n",
        "[parallel]\npp = 2\nschedule = \"dualpipev\"\nmicro_batches = 4\n[model]\nnum_hidden_layers = 3\n[cluster]\nranks_per_host = 2\n",
        "[parallel]\ndp = 2\nep = 2\nmicro_batches = 2\n[cluster]\nhosts = 2\nranks_per_host = 2\n",
        "[model]\nq_lora_rank = 0\nnum_nextn_predict_layers = 0\nfirst_k_dense_replace = 2\n",
        "[metrics]\nprometheus = \"0.0.0.0:9100\"\n",
        "[checkpoint]\ninterval = 0\nmode = \"sync\"\n",
        "[data]\nformat = \"u16\"\nsource = \"tokens.bin\"\nseq_len = 256\n",
    ] {
        parse(src).validate().expect("valid");
    }
}

/// Keys that no code reads yet are refused when set, each problem naming its key, its line and
/// "not supported yet"; the same keys unset (or at their one supported value) pass.
#[test]
fn config_unsupported_keys_are_refused_by_name() {
    let refused = |src: &str| -> Vec<(String, usize)> {
        match Config::from_toml_str(src, "f.toml") {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => {
                assert!(
                    e.iter()
                        .all(|p| p.message.starts_with("not supported yet: ")),
                    "{e}"
                );
                e.iter().map(|p| (p.key.clone(), p.line)).collect()
            }
        }
    };
    let one = |key: &str, line: usize| vec![(key.to_owned(), line)];
    assert_eq!(
        refused("[cluster]\nfabric = \"quic\"\n"),
        one("cluster.fabric", 2)
    );
    assert_eq!(
        refused("[cluster]\nlisten = \"127.0.0.1:0\"\n"),
        one("cluster.listen", 2)
    );
    assert_eq!(refused("[cluster]\npeers = []\n"), one("cluster.peers", 2));
    assert_eq!(
        refused("[cluster]\nlisten = \"127.0.0.1:0\"\n\npeers = []\n"),
        [
            ("cluster.listen".to_owned(), 2),
            ("cluster.peers".to_owned(), 4)
        ]
    );
    // The messages say why and what to do instead.
    let text = |src: &str| match Config::from_toml_str(src, "f.toml") {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => e.to_string(),
    };
    assert!(
        text("[cluster]\nfabric = \"quic\"\n").contains("`flotilla launch` / `agent`"),
        "quic names the missing commands"
    );
    // Unset, or at the supported value, they pass.
    parse("[cluster]\ndevice = \"cpu\"\nfabric = \"inproc\"\n")
        .validate()
        .expect("valid");
    // Built in code: the key is named by its path.
    let mut c = Config::default();
    c.cluster.peers = Some(Vec::new());
    let err = c.validate().expect_err("refused");
    assert_eq!(err.keys(), ["cluster.peers"]);
    // heartbeat_ms is read by the agents of `flotilla launch` / `agent`.
    let mut c = Config::default();
    c.supervision.heartbeat_ms = Some(1000);
    c.validate().expect("heartbeat_ms is supported");
    c.supervision.heartbeat_ms = Some(0);
    let err = c.validate().expect_err("a zero period");
    assert_eq!(err.keys(), ["supervision.heartbeat_ms"]);
}

/// `[sentinel]`: absent, no sentinel; present, its thresholds must make sense.
#[test]
fn config_sentinel_thresholds_are_checked() {
    parse("[sentinel]\n")
        .validate()
        .expect("the defaults are valid");
    let keys = |src: &str| match Config::from_toml_str(src, "f.toml") {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => e.keys().into_iter().map(str::to_owned).collect::<Vec<_>>(),
    };
    assert_eq!(
        keys("[sentinel]\nloss_spike_factor = 1.0\nthroughput_drop = 1.5\nwindow = 0\n"),
        [
            "sentinel.loss_spike_factor",
            "sentinel.throughput_drop",
            "sentinel.window"
        ]
    );
    assert_eq!(
        keys("[sentinel]\ngrad_norm_max = -1.0\nexpert_load_max = 0.5\n"),
        ["sentinel.grad_norm_max", "sentinel.expert_load_max"]
    );
}

/// The simulated cluster: device and fabric "sim" go together, and `[cluster.sim]` is read by
/// it alone; its numbers must make physical sense.
#[test]
fn config_the_simulated_cluster_is_device_and_fabric_sim() {
    let keys = |src: &str| -> Vec<(String, usize)> {
        match Config::from_toml_str(src, "f.toml") {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.iter().map(|p| (p.key.clone(), p.line)).collect(),
        }
    };
    parse("[cluster]\ndevice = \"sim\"\nfabric = \"sim\"\n[cluster.sim]\nlink_gbps = 100\n")
        .validate()
        .expect("valid");
    parse("[cluster]\ndevice = \"sim\"\nfabric = \"sim\"\n")
        .validate()
        .expect("valid: [cluster.sim] defaults");
    assert_eq!(
        keys("[cluster]\n\ndevice = \"sim\"\n"),
        [("cluster.device".to_owned(), 3)]
    );
    assert_eq!(
        keys("[cluster]\nfabric = \"sim\"\n"),
        [("cluster.fabric".to_owned(), 2)]
    );
    assert_eq!(keys("[cluster.sim]\n"), [("cluster.sim".to_owned(), 1)]);
    assert_eq!(
        keys("[cluster]\ndevice = \"sim\"\nfabric = \"sim\"\n[cluster.sim]\nlink_gbps = 0\n"),
        [("cluster.sim.link_gbps".to_owned(), 5)]
    );
    let text = match Config::from_toml_str("[cluster]\ndevice = \"sim\"\n", "f.toml") {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(text.contains("go together"), "{text}");
}
