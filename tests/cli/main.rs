//! End-to-end tests of the `flotilla` binary: config checking, training determinism, HF grads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod bench;
mod chaos;
mod cuda;

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the flotilla binary runs")
}

/// [`flotilla`], which must succeed (its stderr is the failure message).
fn flotilla_ok(args: &[&str]) -> Output {
    let out = flotilla(args);
    assert!(
        out.status.success(),
        "flotilla {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A scratch directory under the system temp dir, removed when dropped (also when a
/// test panics), so that repeated runs do not fill the disk with training outputs.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("flotilla-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Scratch(d)
}

#[test]
fn config_check_reports_every_problem_with_key_and_line() {
    let out = flotilla(&["config", "check", "runtime/tests/data/bad.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].contains(":6:") && lines[0].contains("job.steps"),
        "{err}"
    );
    assert!(
        lines[1].contains(":9:") && lines[1].contains("optimizer.warmup_step"),
        "{err}"
    );
    assert!(
        lines[2].contains(":12:") && lines[2].contains("parallel.pp"),
        "{err}"
    );
}

#[test]
fn config_default_is_accepted_by_check() {
    let out = flotilla_ok(&["config", "default"]);
    let dir = tmp("default");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("default.toml");
    std::fs::write(&file, &out.stdout).expect("write");
    flotilla_ok(&["config", "check", file.to_str().expect("utf-8 path")]);
    for example in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")).expect("configs/")
    {
        let p = example.expect("entry").path();
        let path = p.to_str().expect("utf-8 path");
        flotilla_ok(&["config", "check", path]);
    }
}

#[test]
fn train_refuses_keys_that_are_not_supported_yet() {
    let dir = tmp("unsupported");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("quic.toml");
    std::fs::write(&file, "[cluster]\nfabric = \"quic\"\n").expect("write");
    let out = flotilla(&[
        "train",
        "--config",
        file.to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quic.toml:2:1: cluster.fabric: not supported yet"),
        "{err}"
    );
    assert!(!dir.join("summary.json").exists());
}

/// `[metrics] log_every = 3` over 7 steps: the `tracing` step line comes after steps 3 and 6.
#[test]
fn train_logs_every_log_every_steps() {
    let dir = tmp("log-every");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("log.toml");
    std::fs::write(
        &file,
        "[job]\nsteps = 7\n[optimizer]\nwarmup_steps = 1\n[data]\nbatch_size = 2\nseq_len = 16\n\
         [cluster]\ncpu_threads = 1\n[checkpoint]\ninterval = 0\n[metrics]\nlog_every = 3\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "train",
            "--config",
            file.to_str().expect("utf-8"),
            "--out",
            dir.join("run").to_str().expect("utf-8"),
            "--quiet",
        ])
        .env("FLOTILLA_LOG", "flotilla=info")
        .env("NO_COLOR", "1")
        .output()
        .expect("the flotilla binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("train step"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("step=")))
        .collect();
    assert_eq!(steps, ["step=3", "step=6"], "{err}");
    for field in ["loss=", "tokens_per_s=", "lr="] {
        assert!(
            err.lines()
                .filter(|l| l.contains("train step"))
                .all(|l| l.contains(field)),
            "{field} missing: {err}"
        );
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = flotilla(&["config", "check", "no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/file.toml"));
}

fn summary(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary is JSON")
}

#[test]
fn two_training_runs_give_the_same_parameters_and_the_loss_falls() {
    let (a, b) = (tmp("train-a"), tmp("train-b"));
    for d in [&a, &b] {
        flotilla_ok(&[
            "train",
            "--steps",
            "50",
            "--quiet",
            "--out",
            d.to_str().expect("utf-8"),
        ]);
    }
    let (sa, sb) = (summary(&a), summary(&b));
    assert_eq!(sa["params_sha256"], sb["params_sha256"]);
    assert_eq!(sa["params_sha256"].as_str().map(str::len), Some(64));
    let first = sa["first_loss"].as_f64().expect("first_loss");
    let last = sa["final_loss_avg10"].as_f64().expect("final_loss_avg10");
    assert!(last < first - 1.0, "loss {first} -> {last}");
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(metrics.lines().count(), 50);
    let line: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("a line")).expect("JSON");
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "expert_load_max_over_mean",
    ] {
        assert!(line.get(key).is_some(), "metrics.jsonl lacks {key}: {line}");
    }
}

#[test]
fn model_grads_matches_the_golden_gradients() {
    let g = "model/tests/data/golden/deepseek_v3_tiny";
    let out_dir = tmp("grads");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let out_file = out_dir.join("grads.safetensors");
    flotilla_ok(&[
        "model",
        "grads",
        "--hf",
        g,
        "--batch",
        &format!("{g}/io.safetensors"),
        "--out",
        out_file.to_str().expect("utf-8"),
    ]);
    let ours = flotilla_model::hf::read_safetensors(&out_file).expect("readable");
    let golden = flotilla_model::hf::read_safetensors(Path::new(&format!("{g}/grads.safetensors")))
        .expect("golden");
    for (key, reference) in &golden {
        let (flotilla_model::hf::HostData::F32(a), flotilla_model::hf::HostData::F32(b)) =
            (&ours[key].data, &reference.data)
        else {
            panic!("{key}: not f32");
        };
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
        // An expert that no token reached has an all-zero gradient: compare absolutely there.
        let err = if den == 0.0 { num } else { num / den };
        assert!(err < 1e-3, "{key}: rel err {err}");
    }
    assert!(ours.contains_key("logits") && ours.contains_key("loss"));
}

#[test]
fn model_grads_rejects_a_bad_batch_file() {
    let g = "model/tests/data/golden/deepseek_v3_tiny";
    let out = flotilla(&[
        "model",
        "grads",
        "--hf",
        g,
        "--batch",
        &format!("{g}/config.json"),
        "--out",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}

#[test]
fn help_lists_only_working_commands() {
    let out = flotilla(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["train", "config", "model", "bench"] {
        assert!(text.contains(cmd), "{text}");
    }
    let bench = flotilla_ok(&[
        "bench",
        "actors",
        "--json",
        "--messages",
        "1000",
        "--round-trips",
        "100",
        "--tensor-mib",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&bench.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    for k in ["fabric_over_memcpy", "msgs_per_s", "p99_us"] {
        assert!(last["summary"][k].is_number(), "{last}");
    }
}

#[test]
fn schedule_prints_actions_and_bubbles_and_refuses_odd_dualpipe() {
    let out = flotilla_ok(&[
        "schedule", "--kind", "1f1b", "--pp", "4", "--chunks", "8", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["kind"], "1f1b");
    assert_eq!(v["ranks"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["ranks"][0]["actions"][0]["op"], "F");
    // 1F1B with unit costs: (PP−1)(F+B) with B = B+W = 2 → 9 on the worst rank.
    let worst = v["bubble"]
        .as_array()
        .expect("bubble")
        .iter()
        .filter_map(|b| b.as_f64())
        .fold(0.0, f64::max);
    assert!((worst - 9.0).abs() < 1e-9, "{}", v["bubble"]);
    let bad = flotilla(&[
        "schedule", "--kind", "dualpipe", "--pp", "3", "--chunks", "12",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("even pp"));
}

/// A config whose model and data are small enough for a fast test, checkpointing every 3 steps.
fn ckpt_config(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let file = dir.join("job.toml");
    std::fs::write(
        &file,
        "[job]\nsteps = 6\n[optimizer]\nwarmup_steps = 1\n[data]\nbatch_size = 2\nseq_len = 16\n\
         [cluster]\ncpu_threads = 1\n[checkpoint]\ninterval = 3\nkeep = 2\nmode = \"async\"\n",
    )
    .expect("write config");
    file
}

#[test]
fn resume_from_a_checkpoint_matches_the_uninterrupted_run_and_shards_verify() {
    let root = tmp("resume");
    let cfg = ckpt_config(&root);
    let cfg = cfg.to_str().expect("utf-8");
    let (a, b) = (root.join("a"), root.join("b"));
    flotilla_ok(&[
        "train",
        "--config",
        cfg,
        "--quiet",
        "--out",
        a.to_str().expect("utf-8"),
    ]);
    let step3 = a.join("checkpoints").join("step-00000003");
    flotilla_ok(&["ckpt", "verify", step3.to_str().expect("utf-8")]);
    flotilla_ok(&[
        "train",
        "--config",
        cfg,
        "--quiet",
        "--out",
        b.to_str().expect("utf-8"),
        "--resume",
        step3.to_str().expect("utf-8"),
    ]);
    assert_eq!(summary(&a)["params_sha256"], summary(&b)["params_sha256"]);

    // A flipped bit in a shard is caught by verify, naming the file.
    let shard = step3.join("rank-0.safetensors");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&shard, &bytes).expect("write");
    let bad = flotilla(&["ckpt", "verify", step3.to_str().expect("utf-8")]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("rank-0.safetensors")
            || String::from_utf8_lossy(&bad.stderr).contains("rank-0.safetensors")
    );

    // Every shard opens with the Python `safetensors` library (CI installs it; elsewhere the
    // check runs when the library is there).
    let step6 = a
        .join("checkpoints")
        .join("step-00000006")
        .join("rank-0.safetensors");
    let script = "import sys; from safetensors.numpy import load_file; t = load_file(sys.argv[1]); \
                  assert len(t) > 0; print(len(t))";
    let has_python = Command::new("python3")
        .args(["-c", "import safetensors.numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if has_python {
        let py = Command::new("python3")
            .args(["-c", script, step6.to_str().expect("utf-8")])
            .output()
            .expect("python3 runs");
        assert!(
            py.status.success(),
            "python safetensors could not open the shard: {}",
            String::from_utf8_lossy(&py.stderr)
        );
    } else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the Python safetensors library (.ci/run does)"
        );
        eprintln!("skipping the Python safetensors check: the library is not installed");
    }
}

/// Committed (manifest present) and uncommitted step directories under a checkpoint root.
fn step_dirs(root: &Path) -> (Vec<u64>, Vec<u64>) {
    let (mut done, mut partial) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(root) else {
        return (done, partial);
    };
    for e in entries {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = flotilla_ckpt::format::parse_step_dir(&name) else {
            continue;
        };
        if e.path().join("manifest.json").is_file() {
            done.push(step);
        } else {
            partial.push(step);
        }
    }
    done.sort_unstable();
    partial.sort_unstable();
    (done, partial)
}

/// SIGKILL `flotilla train` (async checkpoints every step) at 20 seeded random moments, each
/// time resuming from the newest checkpoint: the checkpoint `latest` names always verifies, the
/// engine's latest-valid load always picks the committed step `latest` names (never a directory
/// without a manifest, never falling back past a damaged one), and every resume succeeds.
#[test]
fn sigkill_during_async_checkpoints_never_leaves_a_partial_checkpoint_chosen() {
    const KILLS: usize = 20;
    let dir = tmp("crash");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        "[job]\nsteps = 1000000\n[optimizer]\nwarmup_steps = 1\n[data]\nbatch_size = 2\n\
         seq_len = 16\n[cluster]\ncpu_threads = 1\n[checkpoint]\ninterval = 1\nkeep = 2\n\
         mode = \"async\"\n",
    )
    .expect("write config");
    let out = dir.join("out");
    let ckpts = out.join("checkpoints");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // xorshift64*, seeded: the same kill moments on every run.
    let mut state = 0x5eed_c0de_2026_u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let (mut resumed, mut partial_seen) = (0, 0);
    for kill in 0..KILLS {
        let delay_ms = 50 + next() % 1450;
        let resume = !step_dirs(&ckpts).0.is_empty();
        let stderr = std::fs::File::create(dir.join(format!("stderr-{kill}.txt"))).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.args(["train", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        if resume {
            cmd.args(["--resume", "latest"]);
            resumed += 1;
        }
        let mut child = cmd.spawn().expect("flotilla train starts");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if let Some(status) = child.try_wait().expect("poll child") {
            let err = std::fs::read_to_string(dir.join(format!("stderr-{kill}.txt")));
            panic!("kill {kill}: train exited by itself ({status}) before the kill: {err:?}");
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let (done, partial) = step_dirs(&ckpts);
        partial_seen += partial.len();
        let Some(&newest) = done.last() else {
            // Killed before the first commit: nothing may claim to be a checkpoint.
            assert!(
                !ckpts.join("latest").exists(),
                "kill {kill} after {delay_ms} ms: `latest` without a committed step"
            );
            continue;
        };
        let latest = std::fs::read_to_string(ckpts.join("latest")).expect("`latest` pointer");
        let latest_dir = ckpts.join(latest.trim());
        let v = flotilla(&["ckpt", "verify", latest_dir.to_str().expect("utf-8")]);
        assert!(
            v.status.success(),
            "kill {kill} after {delay_ms} ms: verify {}: {}{}",
            latest_dir.display(),
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let storage = std::sync::Arc::new(flotilla_runtime::storage::local::LocalStorage::new(
            ckpts.clone(),
        ));
        let engine = flotilla_ckpt::CheckpointEngine::new(storage, 2);
        let loaded = rt
            .block_on(engine.load_latest_valid(true))
            .unwrap_or_else(|e| panic!("kill {kill} after {delay_ms} ms: {e}"));
        assert!(
            !partial.contains(&loaded.step),
            "kill {kill}: picked the uncommitted step {}",
            loaded.step
        );
        // `latest` is written after the manifest, so it names a committed step: the newest, or
        // the one before when the kill fell between the manifest and the pointer.
        let named = flotilla_ckpt::format::parse_step_dir(latest.trim()).expect("step dir name");
        assert!(
            done.contains(&named) && named + 1 >= newest,
            "kill {kill}: `latest` names {named}, committed {done:?}"
        );
        assert_eq!(
            (loaded.step, loaded.fallbacks.as_slice()),
            (named, &[] as &[String]),
            "kill {kill} after {delay_ms} ms: committed {done:?}, partial {partial:?}"
        );
    }
    assert!(resumed > 0, "no kill landed after a commit");
    eprintln!("{KILLS} kills, {resumed} resumes, {partial_seen} partial step dirs seen");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_exports_to_an_hf_folder_that_loads_back_bit_exactly() {
    let root = tmp("export");
    let cfg = ckpt_config(&root);
    let run = root.join("run");
    flotilla_ok(&[
        "train",
        "--config",
        cfg.to_str().expect("utf-8"),
        "--quiet",
        "--out",
        run.to_str().expect("utf-8"),
    ]);
    let ckpts = run.join("checkpoints");
    let hf = root.join("hf");
    let out = flotilla_ok(&[
        "ckpt",
        "export",
        ckpts.to_str().expect("utf-8"),
        "--hf",
        hf.to_str().expect("utf-8"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("step-00000006"));

    // The exported folder loads with the HF loader and holds exactly the checkpoint's weights.
    let storage = std::sync::Arc::new(flotilla_runtime::storage::local::LocalStorage::new(ckpts));
    let engine = flotilla_ckpt::CheckpointEngine::new(storage, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let loaded = rt
        .block_on(engine.load(flotilla_ckpt::Which::Step(6), true))
        .expect("step 6 loads");
    let snap = &loaded.snapshots[0];
    let dev = flotilla_model::CpuDevice::new(1);
    let model = flotilla_model::hf::load(&hf, &dev).expect("the export loads");
    let named = model.named();
    assert_eq!(named.len(), snap.params.len());
    for (name, t) in &snap.params {
        let got = flotilla_model::Device::download(&dev, named[name.as_str()]).expect("values");
        assert!(
            got.len() == t.data().len()
                && got
                    .iter()
                    .zip(t.data())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} differs"
        );
    }

    // A step directory exports too; a folder that is no checkpoint is a clear error.
    let step3 = run.join("checkpoints").join("step-00000003");
    let hf3 = root.join("hf3");
    flotilla_ok(&[
        "ckpt",
        "export",
        step3.to_str().expect("utf-8"),
        "--hf",
        hf3.to_str().expect("utf-8"),
    ]);
    let bad = flotilla(&[
        "ckpt",
        "export",
        hf.to_str().expect("utf-8"),
        "--hf",
        root.join("nothing").to_str().expect("utf-8"),
    ]);
    assert_eq!(bad.status.code(), Some(1));

    // Python's `safetensors` opens the export, when it is installed.
    let has_python = Command::new("python3")
        .args(["-c", "import safetensors.numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if has_python {
        let script = "import sys; from safetensors.numpy import load_file; \
                      t = load_file(sys.argv[1]); assert 'lm_head.weight' in t; print(len(t))";
        let py = Command::new("python3")
            .args([
                "-c",
                script,
                hf.join("model.safetensors").to_str().expect("utf-8"),
            ])
            .output()
            .expect("python3 runs");
        assert!(
            py.status.success(),
            "python safetensors could not open the export: {}",
            String::from_utf8_lossy(&py.stderr)
        );
    } else {
        eprintln!("skipping the Python safetensors check: the library is not installed");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn parallel_training_checkpoints_and_resumes_bit_identically() {
    let dir = tmp("parallel-train");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/dualpipe-pp2-ep2-dp2.toml");
    let mut text = std::fs::read_to_string(&example).expect("example config");
    text = text.replace("[job]\n", "[job]\nsteps = 12\n");
    text.push_str(
        "\n[optimizer]\nwarmup_steps = 2\n\n[checkpoint]\ninterval = 4\nmode = \"async\"\nreplicas = 2\n",
    );
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("job.toml");
    std::fs::write(&cfg, text).expect("write config");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--quiet",
            "--out",
            dir.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        flotilla_ok(&args);
        summary(&dir)
    };
    let full = run(&[]);
    let first = full["first_loss"].as_f64().expect("first_loss");
    let last = full["final_loss"].as_f64().expect("final_loss");
    assert!(last < first, "loss {first} -> {last}");
    let resumed = run(&["--resume", "8"]);
    assert_eq!(full["params_sha256"], resumed["params_sha256"]);
}
