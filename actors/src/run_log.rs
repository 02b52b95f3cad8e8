//! The run's outputs through the storage seam: `metrics.jsonl` (a line per step),
//! `events.jsonl` (supervision and anomaly events) and `summary.json`.

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
