//! Chaos tests of a multi-process job (`configs/chaos.toml`): `flotilla launch` ends with the
//! parameters of `flotilla train`; killing a rank process or a whole node agent (SIGKILL) at a
//! random step, the job recovers and still ends with those parameters. Each trial prints a line
//! (kill step, detection, kill → next completed step, steps redone, restore sources).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{flotilla_ok, tmp};

const CONFIG: &str = "configs/chaos.toml";
/// Every trial's bound: a fault-free run takes about a second.
const TRIAL_LIMIT: Duration = Duration::from_secs(180);

fn params_sha(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
    v["params_sha256"]
        .as_str()
        .expect("params_sha256")
        .to_owned()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn reference() -> String {
    reference_of(Path::new(CONFIG))
}

/// The `params_sha256` of `flotilla train` on `config`.
fn reference_of(config: &Path) -> String {
    // One directory per call: several tests may train at once.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = tmp(&format!("chaos-train-{n}"));
    flotilla_ok(&[
        "train",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        dir.to_str().expect("utf-8"),
        "--quiet",
    ]);
    params_sha(&dir)
}
fn start_launch(dir: &Path) -> Child {
    start_launch_with(dir, Path::new(CONFIG))
}

fn start_launch_with(dir: &Path, config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["launch", "--config"])
        .arg(config)
        .arg("--out")
        .arg(dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla launch starts")
}

/// Wait for `child` within `limit`; its output, or a panic naming the trial.
fn finish(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{what}: still running after {limit:?}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The pid of rank `rank`'s process, or of the agent running host `host`, from `agents.json`.
fn victim(dir: &Path, kill_agent: bool, target: usize) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("agents.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    for a in v["agents"].as_array()? {
        if kill_agent {
            if a["host"].as_u64() == Some(target as u64) {
                return a["pid"].as_u64().map(|p| p as u32);
            }
        } else {
            for r in a["ranks"].as_array()? {
                if r["rank"].as_u64() == Some(target as u64) {
                    return r["pid"].as_u64().map(|p| p as u32);
                }
            }
        }
    }
    None
}

/// The job in `dir` succeeded with parameters `want`: its `events.jsonl` lines.
fn ended_with(out: &std::process::Output, dir: &Path, want: &str) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        params_sha(dir),
        want,
        "other parameters than without faults"
    );
    lines(&dir.join("events.jsonl"))
}

/// The first event of `kind`.
fn event<'a>(events: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    events
        .iter()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} event: {events:?}"))
}

/// A small deterministic generator (the trials' seeds).
fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// What one trial measured.
#[derive(Debug)]
struct Trial {
    seed: u64,
    what: String,
    kill_step: usize,
    detect_s: f64,
    next_step_s: f64,
    redone: u64,
    sources: Vec<String>,
}

/// Wait until `dir`'s job has taken `step` steps; then the pid `victim` names.
fn at_step(dir: &Path, step: usize, kill_agent: bool, target: usize) -> (Instant, usize, u32) {
    let start = Instant::now();
    loop {
        let done = lines(&dir.join("metrics.jsonl")).len();
        if done >= step
            && let Some(pid) = victim(dir, kill_agent, target)
        {
            return (Instant::now(), done, pid);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "step {step} never came in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) of a process this test's job started.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill -{sig} {pid}");
}

/// Kill a rank process or an agent at a random step of a launched job; the job must end with
/// `want`.
fn trial(seed: u64, want: &str) -> Trial {
    let r = mix(seed);
    let kill_agent = seed % 3 == 2;
    let target = (r % 4) as usize;
    let kill_step = 1 + (r >> 8) as usize % 20;
    let what = if kill_agent {
        format!("agent of host {target}")
    } else {
        format!("rank {target}")
    };
    let dir = tmp(&format!("chaos-{seed}"));
    let child = start_launch(&dir);
    let metrics = dir.join("metrics.jsonl");
    let start = Instant::now();
    let (killed_at, steps_at_kill, pid) = at_step(&dir, kill_step, kill_agent, target);
    signal(pid, libc::SIGKILL);
    let t_kill = killed_at.duration_since(start).as_secs_f64();
    // The next step completed after the roll-back: a metrics line beyond those at the kill.
    let mut next_step_s = f64::NAN;
    let mut child = Some(child);
    while killed_at.elapsed() < TRIAL_LIMIT {
        if lines(&metrics).len() > steps_at_kill + 1 {
            next_step_s = killed_at.elapsed().as_secs_f64();
            break;
        }
        if let Some(c) = child.as_mut()
            && c.try_wait().expect("wait").is_some()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = finish(
        child.take().expect("child"),
        TRIAL_LIMIT,
        &format!("seed {seed}"),
    );
    assert!(
        out.status.success(),
        "seed {seed} ({what} killed at step {kill_step}): the job failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        params_sha(&dir),
        want,
        "seed {seed}: {what} killed at step {kill_step}: other parameters than without faults"
    );
    let events = lines(&dir.join("events.jsonl"));
    // Detection: the first failure event's time since the controller started, less the kill's
    // (the controller starts a few ms after this test's clock: the figure errs high).
    let detect_s = events
        .iter()
        .find(|e| {
            matches!(
                e["kind"].as_str(),
                Some("rank_exit" | "agent_exit" | "heartbeat" | "link_lost")
            )
        })
        .and_then(|e| e["t"].as_f64())
        .map_or(f64::NAN, |t| (t - t_kill).max(0.0));
    let texts: Vec<String> = events
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .collect();
    let back_to = texts
        .iter()
        .find_map(|t| t.split("rolling every rank back to step ").nth(1))
        .and_then(|s| s.parse::<u64>().ok());
    let failed_at = texts
        .iter()
        .find(|t| t.contains("rolling every rank back"))
        .and_then(|t| t.split(" failed at step ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<u64>().ok());
    let sources = texts
        .iter()
        .filter_map(|t| {
            t.split_once(" from ")
                .filter(|_| t.contains(" restored step "))
        })
        .map(|(who, src)| {
            format!(
                "{}: {src}",
                who.trim_end_matches(|c: char| !c.is_ascii_digit())
            )
        })
        .collect();
    assert!(
        back_to.is_some(),
        "seed {seed}: no roll-back in events.jsonl: {texts:?}"
    );
    Trial {
        seed,
        what,
        kill_step,
        detect_s,
        next_step_s,
        redone: failed_at.zip(back_to).map_or(0, |(f, b)| f - b),
        sources,
    }
}

#[test]
fn launch_ends_with_the_parameters_of_train() {
    let want = reference();
    let dir = tmp("chaos-launch");
    let out = finish(start_launch(&dir), TRIAL_LIMIT, "launch without faults");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(params_sha(&dir), want);
    // agents.json names every agent (4 hosts + 1 spare) with its pid, and every rank's pid.
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("agents.json")).expect("agents.json"),
    )
    .expect("JSON");
    let agents = v["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 5, "{v}");
    assert_eq!(
        agents.iter().filter(|a| a["spare"] == true).count(),
        1,
        "{v}"
    );
    let ranks: Vec<u64> = agents
        .iter()
        .flat_map(|a| a["ranks"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["pid"].as_u64().is_some())
        .filter_map(|r| r["rank"].as_u64())
        .collect();
    assert_eq!(ranks.len(), 4, "{v}");
    // The job directory and its CA key are the job's user's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
}

#[test]
fn killed_rank_processes_and_agents_are_recovered_with_the_same_parameters() {
    let want = reference();
    let trials: Vec<Trial> = (1..=10).map(|seed| trial(seed, &want)).collect();
    for t in &trials {
        eprintln!(
            "chaos seed {:2}: killed {:15} at step {:2}: detected in {:.3} s, next step {:.3} s after the kill, {} steps redone; restored {}",
            t.seed,
            t.what,
            t.kill_step,
            t.detect_s,
            t.next_step_s,
            t.redone,
            t.sources.join(", ")
        );
    }
    for t in &trials {
        assert!(
            t.next_step_s <= 10.0,
            "seed {}: {:.3} s from the kill to the next step (goal: 10 s)",
            t.seed,
            t.next_step_s
        );
    }
}

#[test]
fn a_hung_rank_process_is_caught_by_the_watchdog_and_restarted() {
    let want = reference();
    // chaos.toml with the hung-step watchdog on ([supervision] is its last table).
    let (_cfg_dir, config) = chaos_config("chaos-hung-config", |t| {
        format!("{t}watchdog_factor = 20.0\n")
    });
    let dir = tmp("chaos-hung");
    let child = start_launch_with(&dir, &config);
    let (stopped_at, _, pid) = at_step(&dir, 9, false, 1);
    signal(pid, libc::SIGSTOP);
    let out = finish(child, TRIAL_LIMIT, "hung rank");
    let took = stopped_at.elapsed();
    let events = ended_with(&out, &dir, &want);
    let hung = event(&events, "hung");
    assert_eq!(hung["rank"], 1, "{hung}");
    let watchdog = events
        .iter()
        .filter_map(|e| e["event"].as_str())
        .find(|t| t.contains("hung: no answer within"));
    assert!(watchdog.is_some(), "the watchdog did not fire: {events:?}");
    eprintln!("hung rank 1 (SIGSTOP at step 9): the job ended {took:?} later");
}

/// `srun` runs the agents (agent 0 also runs the controller). Skips where there is no Slurm.
#[test]
fn under_srun_killed_rank_processes_and_agents_are_recovered() {
    let have_srun = Command::new("srun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_srun {
        eprintln!("skipped: no srun here (.ci/slurm-up brings up a one-node Slurm)");
        return;
    }
    let want = reference();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join(CONFIG);
    for seed in 1..=3u64 {
        let r = mix(seed + 100);
        // Agent 0 runs the controller: kill another agent, or a rank process.
        let kill_agent = seed == 2;
        let target = if kill_agent {
            1 + (r % 3) as usize
        } else {
            (r % 4) as usize
        };
        let kill_step = 2 + (r >> 8) as usize % 18;
        let dir = tmp(&format!("chaos-srun-{seed}"));
        let child = Command::new("srun")
            .args(["-N", "1", "-n", "5", "--overcommit", "-J", "flotilla-chaos"])
            .arg(env!("CARGO_BIN_EXE_flotilla"))
            .args(["agent", "--config"])
            .arg(&config)
            .arg("--job-dir")
            .arg(&*dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("srun starts");
        let (_, _, pid) = at_step(&dir, kill_step, kill_agent, target);
        signal(pid, libc::SIGKILL);
        let out = finish(child, TRIAL_LIMIT, &format!("srun seed {seed}"));
        let what = if kill_agent { "agent of host" } else { "rank" };
        // srun's own status says that one of its tasks was killed; the job is judged by what
        // the controller (task 0) wrote.
        let summary = dir.join("summary.json");
        assert!(
            summary.exists(),
            "srun seed {seed} ({what} {target} killed at step {kill_step}): no summary\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(params_sha(&dir), want, "srun seed {seed}: {what} {target}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&want),
            "task 0 prints the summary: {stdout}"
        );
        eprintln!("srun seed {seed}: killed {what} {target} at step {kill_step}: same parameters");
    }
}

/// `configs/chaos.toml` with `edit` applied to its text, in a scratch file.
fn chaos_config(
    name: &str,
    edit: impl Fn(String) -> String,
) -> (super::Scratch, std::path::PathBuf) {
    let dir = tmp(name);
    std::fs::create_dir_all(&*dir).expect("mkdir");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(CONFIG))
        .expect("chaos.toml");
    let path = dir.join("chaos.toml");
    std::fs::write(&path, edit(text)).expect("write");
    (dir, path)
}

/// An agent that stops (SIGSTOP) sends no heartbeat: after two periods its host is evicted and
/// the spare takes its rank; the job ends with the parameters of the run without faults.
#[test]
fn a_silent_agent_is_evicted_after_two_missed_heartbeats() {
    // Long enough for the silence to be noticed before the job ends (a silent agent does not
    // stop its rank processes from training).
    let (_cfg_dir, config) = chaos_config("chaos-silent-config", |t| {
        t.replace("steps = 24", "steps = 160")
    });
    let want = reference_of(&config);
    let dir = tmp("chaos-silent-agent");
    let child = start_launch_with(&dir, &config);
    let (stopped_at, _, pid) = at_step(&dir, 6, true, 2);
    signal(pid, libc::SIGSTOP);
    let out = finish(child, TRIAL_LIMIT, "silent agent");
    // The stopped agent is killed when the job ends; make sure of it.
    // SAFETY: kill(2) of the agent this test stopped.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let events = ended_with(&out, &dir, &want);
    let silent = event(&events, "heartbeat");
    assert_eq!(silent["host"], 2, "{silent}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "reassign" && e["host"] == 2),
        "the spare did not take host 2: {events:?}"
    );
    eprintln!(
        "silent agent of host 2 (SIGSTOP at step 6): {}; evicted, the job ended {:?} later",
        silent["reason"],
        stopped_at.elapsed()
    );
}

/// With a budget of one roll-back, a second failure ends the job: a non-zero exit naming the
/// failure and the spent budget, and the last committed checkpoint verifies.
#[test]
fn a_spent_restart_budget_ends_the_job_with_a_verified_checkpoint() {
    let (_cfg_dir, config) = chaos_config("chaos-budget-config", |t| {
        t.replace("max_job_restarts = 20", "max_job_restarts = 1")
    });
    let dir = tmp("chaos-budget");
    let child = start_launch_with(&dir, &config);
    let (_, done, pid) = at_step(&dir, 6, false, 1);
    signal(pid, libc::SIGKILL);
    // The second kill, of the restarted process, once training has gone on.
    let start = Instant::now();
    let pid2 = loop {
        if let Some(p) = victim(&dir, false, 1).filter(|&p| p != pid)
            && lines(&dir.join("metrics.jsonl")).len() > done + 2
        {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rank 1 never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    signal(pid2, libc::SIGKILL);
    let out = finish(child, TRIAL_LIMIT, "spent budget");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job went on past its budget");
    assert!(
        err.contains("rank 1 failed") && err.contains("max_job_restarts = 1) is spent"),
        "{err}"
    );
    let verify = flotilla_ok(&[
        "ckpt",
        "verify",
        dir.join("checkpoints").to_str().expect("utf-8"),
    ]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(!text.is_empty(), "ckpt verify said nothing");
}

/// Dial the controller trusting the job's CA but presenting no certificate; whether anything
/// came back.
async fn without_certificate(addr: std::net::SocketAddr, dir: &Path) -> bool {
    use quinn::rustls;
    let ca = std::fs::read(dir.join("ca.der")).expect("ca.der");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.into()).expect("the job's CA");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![flotilla_runtime::control::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut ep =
        quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let exchange = async {
        let conn = ep
            .connect(addr, flotilla_runtime::control::CONTROLLER_NAME)
            .ok()?
            .await
            .ok()?;
        let (mut tx, mut rx) = conn.open_bi().await.ok()?;
        tx.write_all(b"hello").await.ok()?;
        let mut b = [0u8; 1];
        rx.read_exact(&mut b).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// While a job runs, the controller refuses a peer with another CA's certificate, one with no
/// certificate, and peers of the job's CA that send garbage or an oversized frame; the job ends
/// with the parameters of the run without them.
#[test]
fn strangers_and_bad_frames_are_refused_while_the_job_goes_on() {
    use flotilla_runtime::control::{self, keys};
    use flotilla_runtime::fabric::quic::JobCa;

    let (_cfg_dir, config) = chaos_config("chaos-rogue-config", |t| {
        t.replace("steps = 24", "steps = 120")
    });
    let want = reference_of(&config);
    let dir = tmp("chaos-rogue");
    let child = start_launch_with(&dir, &config);
    at_step(&dir, 3, false, 0);
    let agents: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("agents.json")).expect("agents"))
            .expect("JSON");
    let addr: std::net::SocketAddr = agents["controller"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the controller's address");
    let wait = Duration::from_secs(5);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Another CA: the handshake fails (at connect, or at the first exchange).
        let stranger = JobCa::generate()
            .and_then(|ca| ca.issue_named("agent-0.flotilla"))
            .expect("a stranger's identity");
        if let Ok(link) = control::connect(addr, &stranger, wait, wait).await {
            let (tx, mut rx, _ep) = link.split();
            let _ = tx.send_raw(b"hello").await;
            assert!(
                !matches!(rx.recv::<serde_json::Value>().await, Ok(Some(_))),
                "a peer of another CA was answered"
            );
        }
        // No certificate at all: the server requires one.
        assert!(
            !without_certificate(addr, &dir).await,
            "a peer without a certificate was answered"
        );
        // The job's own CA, but garbage or an oversized frame instead of a hello.
        let ca = keys::load_ca(&dir).expect("the job's CA");
        let mut oversized = control::MAGIC.to_vec();
        oversized.extend_from_slice(&u32::MAX.to_le_bytes());
        oversized.extend_from_slice(&0u64.to_le_bytes());
        for (name, bytes) in [
            ("agent-1.flotilla", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("agent-2.flotilla", oversized),
        ] {
            let id = ca.issue_named(name).expect("identity");
            let link = control::connect(addr, &id, wait, wait)
                .await
                .expect("connects");
            let (tx, mut rx, _ep) = link.split();
            tx.send_raw(&bytes).await.expect("sent");
            let answer = tokio::time::timeout(wait, rx.recv::<serde_json::Value>()).await;
            assert!(
                matches!(answer, Ok(Err(_) | Ok(None))),
                "{name}: the controller did not drop a link that sent a bad frame"
            );
        }
    });
    let out = finish(child, TRIAL_LIMIT, "rogue peers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(params_sha(&dir), want, "the rogue peers changed the run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused"),
        "the refusals are logged: {stderr}"
    );
}

/// A rank process whose device is slowed (`FLOTILLA_DEBUG_SLOW_RANK`) is reported by the
/// sentinel as a straggler on (nearly) every step, and nothing is restarted or rolled back.
#[test]
fn a_slow_rank_process_is_reported_as_a_straggler_and_left_running() {
    let want = reference();
    let (_cfg_dir, config) = chaos_config("chaos-slow-config", |t| format!("{t}\n[sentinel]\n"));
    let dir = tmp("chaos-slow");
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["launch", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&*dir)
        .env("FLOTILLA_DEBUG_SLOW_RANK", "2:6")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla launch starts");
    let out = finish(child, TRIAL_LIMIT, "slow rank");
    let events = ended_with(&out, &dir, &want);
    let named = |rank: u64| {
        events
            .iter()
            .filter(|v| v["anomaly"]["kind"] == "straggler" && v["anomaly"]["rank"] == rank)
            .count()
    };
    assert!(
        named(2) >= 12,
        "rank 2 on half the 24 steps at least: {events:?}"
    );
    for kind in ["rank_exit", "agent_exit", "heartbeat", "link_lost", "hung"] {
        assert!(
            !events.iter().any(|e| e["kind"] == kind),
            "{kind}: a straggler must not be restarted"
        );
    }
    assert!(
        !events
            .iter()
            .filter_map(|e| e["event"].as_str())
            .any(|t| t.contains("rolling every rank back")),
        "a straggler must not roll the job back"
    );
}
