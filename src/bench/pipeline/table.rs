//! The benchmark's short human-readable table (without `--json`).

use serde_json::Value;

use super::Report;

/// The short human-readable table of a report.
pub fn print_table(report: &Report) {
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    for r in &report.records {
        match r.get("bench").and_then(Value::as_str) {
            Some("pipeline_setup") => println!(
                "pipeline bench: {} ranks on {} cores, pp={} ep={} micro-batches={} batch={} seq={} layers={}",
                r["ranks"],
                r["cores"],
                r["pp"],
                r["ep"],
                r["micro_batches"],
                r["batch"],
                r["seq"],
                r["layers"]
            ),
            Some("pipeline_run") => {
                if r["run"] == "dualpipe_free_link" {
                    println!(
                        "{:<32} {:>9} {:>9} {:>10}",
                        "run", "step s", "comm s", "peak held"
                    );
                }
                let peaks: Vec<String> = r["per_rank"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .map(|x| x["peak_activations"].to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{:<32} {:>9.3} {:>9.3} {:>10}",
                    r["run"].as_str().unwrap_or("?"),
                    f(r, "step_s"),
                    f(r, "comm_s"),
                    peaks.join(",")
                );
            }
            _ => {
                if let Some(s) = r.get("summary") {
                    println!(
                        "compute {:.3} s, communication {:.3} s (no overlap: {:.3} s); DualPipe on \
                         the link {:.3} s: {:.2} × max(compute, communication); one action per \
                         stage actor {:.3} s ({:.2} ×); 1F1B {:.3} s",
                        f(s, "compute_s"),
                        f(s, "comm_s"),
                        f(s, "no_overlap_sum_s"),
                        f(s, "step_overlap_s"),
                        f(s, "dualpipe_step_over_max_compute_comm"),
                        f(s, "step_window_1_s"),
                        f(s, "window_1_step_over_max_compute_comm"),
                        f(s, "step_1f1b_s"),
                    );
                    println!(
                        "peak activations per rank (stage micro-batches; the runs above count sub-batches): 1F1B {} (report: PP − r = {} on rank 0), DualPipe {} (report: PP+1 = {})",
                        s["peak_activations_1f1b"],
                        s["expected_peak_1f1b_max"],
                        s["peak_activations_dualpipe"],
                        s["expected_peak_dualpipe"]
                    );
                }
            }
        }
    }
}
