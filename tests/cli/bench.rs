//! End-to-end tests of `flotilla bench`: what each benchmark prints, and its refusals of bad
//! flags.

use super::{flotilla, flotilla_ok, tmp};

#[test]
fn bench_step_prints_the_step_then_its_baseline_then_the_summary() {
    let out = flotilla_ok(&["bench", "step", "--json", "--warmup", "0", "--steps", "1"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["bench"], "train_step");
    assert!(lines[0]["tokens_per_s"].as_f64().is_some_and(|x| x > 0.0));
    assert_eq!(lines[1]["bench"], "raw_gemm_same_shapes");
    assert!(
        lines[2]["summary"]["step_over_gemm"]
            .as_f64()
            .is_some_and(|x| x > 0.0)
    );
    for flags in [
        &["--kernels"][..],
        &["--attention", "cublas"],
        &["--expert-gemm", "kernel"],
    ] {
        let err = flotilla(&[&["bench", "step"][..], flags].concat());
        assert!(!err.status.success(), "{flags:?} on the CPU");
        assert!(
            String::from_utf8_lossy(&err.stderr).contains("need --device cuda"),
            "{flags:?}: {}",
            String::from_utf8_lossy(&err.stderr)
        );
    }
}

#[test]
fn bench_ckpt_reports_stall_persist_and_restore() {
    let dir = tmp("bench-ckpt");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let out = flotilla_ok(&[
        "bench",
        "ckpt",
        "--size-mib",
        "8",
        "--json",
        "--dir",
        dir.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    for k in [
        "async_stall_over_sync_save",
        "persist_over_raw_write",
        "restore_peer_s",
        "restore_storage_s",
    ] {
        assert!(
            last["summary"][k].as_f64().is_some_and(|x| x > 0.0),
            "{last}"
        );
    }
    // The bench cleans up after itself.
    assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench pipeline` on a tiny job: every way of overlapping runs, the summary has the ratios,
/// and the peaks are the report's (DualPipe PP + 1 on every rank, 1F1B PP − r, in micro-batches
/// of two sub-batches each); the stages are the balanced split; `--trace` writes a Chrome trace and a profile per rank; a bad
/// `--window` or `--stage-layers` is refused by name.
#[test]
fn bench_pipeline_compares_every_overlap_with_the_reports_peaks() {
    let dir = tmp("bench-pipeline");
    std::fs::create_dir_all(&dir.0).expect("scratch dir");
    let trace = dir.0.join("trace.json");
    let trace_arg = trace.to_string_lossy().into_owned();
    let out = flotilla_ok(&[
        "bench",
        "pipeline",
        "--json",
        "--micro-batches",
        "4",
        "--batch",
        "16",
        "--seq",
        "16",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--no-pin",
        "--trace",
        &trace_arg,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let runs: Vec<&str> = records
        .iter()
        .filter(|r| r["bench"] == "pipeline_run")
        .filter_map(|r| r["run"].as_str())
        .collect();
    for name in [
        "dualpipe_free_link",
        "dualpipe_link",
        "dualpipe_link_window_1",
        "1f1b_free_link",
        "1f1b_link",
    ] {
        assert!(runs.contains(&name), "{name} missing from {runs:?}");
    }
    let s = &records.last().expect("a summary")["summary"];
    for key in [
        "dualpipe_step_over_max_compute_comm",
        "window_1_step_over_max_compute_comm",
        "compute_s",
        "comm_s",
        "step_overlap_s",
        "no_overlap_sum_s",
    ] {
        let v = s[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    // The activation memory the schedules promise, counted by the ranks' forward gates.
    assert_eq!(
        s["peak_activations_dualpipe"],
        serde_json::json!([3.0, 3.0, 3.0, 3.0])
    );
    assert_eq!(
        s["peak_activations_1f1b"],
        serde_json::json!([2.0, 2.0, 1.0, 1.0])
    );
    assert_eq!(records[0]["sub_batches"], 2);
    assert_eq!(records[0]["window"], 6);
    assert_eq!(records[0]["stage_layers"], serde_json::json!([3, 1]));

    // The profile: every rank's step split into compute and idle, and a trace to open.
    let profiles: Vec<_> = records
        .iter()
        .filter(|r| r["bench"] == "pipeline_profile")
        .collect();
    assert_eq!(profiles.len(), 4);
    for p in profiles {
        let (step, compute) = (p["step_s"].as_f64(), p["compute_s"].as_f64());
        let (step, compute) = (step.unwrap_or(0.0), compute.unwrap_or(0.0));
        assert!(compute > 0.0 && compute <= step * 1.001, "{p}");
        assert!(
            p["all_to_all_messages_sent"].as_u64().unwrap_or(0) > 0,
            "{p}"
        );
    }
    let chrome: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("the trace file")).expect("JSON");
    let events = chrome["traceEvents"].as_array().expect("traceEvents");
    for cat in ["forward", "B", "W", "experts", "wire", "in flight"] {
        assert!(events.iter().any(|e| e["cat"] == cat), "no {cat} event");
    }

    let bad = flotilla(&["bench", "pipeline", "--stage-layers", "2,1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("parallel.stage_layers"));
    let bad = flotilla(&["bench", "pipeline", "--window", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--window"));
}
