//! Metric names (one place, so dashboards and the sentinel agree) and the Prometheus exporter.
//!
//! Actors record through the `metrics` facade; with `[metrics] prometheus = "host:port"` the
//! binary installs the exporter, which serves `/metrics` over HTTP on that address.

use std::net::SocketAddr;

/// Training loss of the last step (gauge).
pub const TRAIN_LOSS: &str = "flotilla_train_loss";
/// Global gradient norm before clipping (gauge).
pub const GRAD_NORM: &str = "flotilla_grad_norm";
/// Learning rate (gauge).
pub const LEARNING_RATE: &str = "flotilla_learning_rate";
/// Tokens processed per second (gauge).
pub const TOKENS_PER_SECOND: &str = "flotilla_tokens_per_second";
/// Optimizer steps completed (counter).
pub const STEPS: &str = "flotilla_steps_total";
/// Step duration in seconds (histogram).
pub const STEP_SECONDS: &str = "flotilla_step_seconds";
/// Max over mean routed-expert load of the last step (gauge, label `layer`).
pub const EXPERT_LOAD_IMBALANCE: &str = "flotilla_expert_load_max_over_mean";
/// Child restarts performed by supervisors (counter, label `supervisor`).
pub const SUPERVISOR_RESTARTS: &str = "flotilla_supervisor_restarts_total";
/// Escalations to a parent supervisor (counter, label `supervisor`).
pub const SUPERVISOR_ESCALATIONS: &str = "flotilla_supervisor_escalations_total";
/// Bytes sent over the fabric (counter, label `fabric`).
pub const FABRIC_BYTES_SENT: &str = "flotilla_fabric_bytes_sent_total";
/// Collective operation duration in seconds (histogram, label `op`).
pub const COLLECTIVE_SECONDS: &str = "flotilla_collective_seconds";
/// Checkpoint stall of the training loop in seconds (histogram).
pub const CHECKPOINT_STALL_SECONDS: &str = "flotilla_checkpoint_stall_seconds";
/// Anomalies flagged by the sentinel (counter, label `kind`).
pub const ANOMALIES: &str = "flotilla_anomalies_total";
/// Failures the controller of a multi-process job detected (counter, label `kind`:
/// `rank_exit`, `agent_exit`, `heartbeat`, `link_lost`, `hung`).
pub const FAILURES: &str = "flotilla_failures_total";
/// Actions the controller of a multi-process job took (counter, label `action`: `evict`,
/// `reassign`, `restart_agent`).
pub const RECOVERY_ACTIONS: &str = "flotilla_recovery_actions_total";
/// Seconds from a failure's detection to every rank being back in the mesh (histogram).
pub const REJOIN_SECONDS: &str = "flotilla_rejoin_seconds";

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.prometheus: `{addr}` is not a socket address: {why}")]
    BadAddress { addr: String, why: String },
    #[error("cannot start the Prometheus exporter on {addr}: {why}")]
    Install { addr: SocketAddr, why: String },
}

/// Install the Prometheus exporter, serving on `addr` (needs a running tokio runtime).
pub fn install_prometheus(addr: &str) -> Result<SocketAddr, MetricsError> {
    let sock: SocketAddr =
        addr.parse()
            .map_err(|e: std::net::AddrParseError| MetricsError::BadAddress {
                addr: addr.to_string(),
                why: e.to_string(),
            })?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(sock)
        .install()
        .map_err(|e| MetricsError::Install {
            addr: sock,
            why: e.to_string(),
        })?;
    Ok(sock)
}
