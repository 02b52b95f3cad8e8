//! The run's outputs through the storage seam: `metrics.jsonl` (a line per step),
//! `events.jsonl` (supervision and anomaly events), `summary.json`, and `trace.json` (the last
//! step's device work on every rank, as a Chrome trace that opens in Perfetto).

use std::sync::Arc;

use flotilla_runtime::storage::{Storage, StorageError};
use serde::Serialize;

/// Writes one run's files under a storage root.
#[derive(Debug, Clone)]
pub struct RunLog {
    storage: Arc<dyn Storage>,
}

impl RunLog {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self { storage }
    }

    /// Start fresh files for a new run (an old run's metrics and events are replaced).
    pub async fn start(&self) -> Result<(), StorageError> {
        self.storage.put("metrics.jsonl", Vec::new()).await?;
        self.storage.put("events.jsonl", Vec::new()).await
    }

    pub async fn metric<T: Serialize>(&self, rec: &T) -> Result<(), StorageError> {
        self.append("metrics.jsonl", rec).await
    }

    pub async fn event<T: Serialize>(&self, rec: &T) -> Result<(), StorageError> {
        self.append("events.jsonl", rec).await
    }

    pub async fn summary<T: Serialize>(&self, rec: &T) -> Result<(), StorageError> {
        let mut text = serde_json::to_vec_pretty(rec).map_err(|e| StorageError::Io {
            key: "summary.json".into(),
            why: e.to_string(),
        })?;
        text.push(b'\n');
        self.storage.put("summary.json", text).await
    }

    /// `trace.json`: every rank's jobs of one step (`spans[rank]`) as Chrome trace events, one
    /// process per rank (times in µs since the step began; virtual on the simulated cluster).
    pub async fn trace(&self, spans: &[Vec<crate::stream::Span>]) -> Result<(), StorageError> {
        let mut events = Vec::new();
        for (rank, ss) in spans.iter().enumerate() {
            events.push(serde_json::json!({
                "name": "process_name", "ph": "M", "pid": rank,
                "args": {"name": format!("rank {rank}")},
            }));
            for s in ss {
                events.push(serde_json::json!({
                    "name": format!("{} {}", s.what, s.chunk),
                    "cat": s.what, "ph": "X", "pid": rank, "tid": 0,
                    "ts": s.start * 1e6, "dur": (s.end - s.start).max(0.0) * 1e6,
                    "args": {"chunk": s.chunk, "stage": s.stage},
                }));
            }
        }
        let text =
            serde_json::to_vec(&serde_json::json!({ "traceEvents": events })).map_err(|e| {
                StorageError::Io {
                    key: "trace.json".into(),
                    why: e.to_string(),
                }
            })?;
        self.storage.put("trace.json", text).await
    }

    async fn append<T: Serialize>(&self, key: &str, rec: &T) -> Result<(), StorageError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| StorageError::Io {
            key: key.into(),
            why: e.to_string(),
        })?;
        line.push(b'\n');
        self.storage.append(key, line).await
    }
}

/// A line of `events.jsonl`: which supervisor, which child, what happened.
#[derive(Debug, Serialize)]
pub(crate) struct EventLine {
    pub(crate) supervisor: String,
    pub(crate) child: String,
    pub(crate) event: String,
}
