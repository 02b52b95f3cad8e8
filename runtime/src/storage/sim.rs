//! Simulated storage: blobs in memory, each operation costing latency + bytes / bandwidth on
//! virtual time (queued per disk, so concurrent writers contend), with injectable faults.
//! Like the virtual clock it sleeps dilated ([`crate::clock::dilate`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::dilate;

use super::{BoxFuture, Storage, StorageError, check_key};

#[derive(Debug, Default)]
struct Disk {
    blobs: BTreeMap<String, Vec<u8>>,
    busy_until: Option<Instant>,
    failing: BTreeSet<String>,
    /// Prefixes whose next writes fail, each with how many more are to fail.
    failing_next: Vec<(String, usize)>,
}

/// An in-memory disk with a bandwidth and latency model.
#[derive(Debug, Clone)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
    bytes_per_s: f64,
    latency: Duration,
}

impl SimStorage {
    pub fn new(bytes_per_s: f64, latency: Duration) -> Self {
        Self {
            disk: Arc::new(Mutex::new(Disk::default())),
            bytes_per_s,
            latency,
        }
    }

    /// Make every later write under `prefix` fail (a dying disk).
    pub fn fail_writes_under(&self, prefix: &str) {
        self.lock().failing.insert(prefix.to_string());
    }

    /// Make the next `count` writes under `prefix` fail, then let writes through again (a
    /// transient fault: a full disk that was cleaned up, a storage server that came back).
    pub fn fail_next_writes_under(&self, prefix: &str, count: usize) {
        if count > 0 {
            self.lock().failing_next.push((prefix.to_string(), count));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an operation of `bytes` on the disk; returns when it completes.
    fn reserve(&self, bytes: usize) -> Instant {
        let mut d = self.lock();
        let now = Instant::now();
        let start = d.busy_until.map_or(now, |b| b.max(now));
        let cost = self.latency + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s);
        let done = start + dilate(cost);
        d.busy_until = Some(done);
        done
    }

    fn check_write(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        let mut d = self.lock();
        let mut fail = d.failing.iter().any(|p| key.starts_with(p.as_str()));
        if !fail
            && let Some(pos) = d
                .failing_next
                .iter()
                .position(|(p, _)| key.starts_with(p.as_str()))
        {
            fail = true;
            d.failing_next[pos].1 -= 1;
            if d.failing_next[pos].1 == 0 {
                d.failing_next.remove(pos);
            }
        }
        if fail {
            return Err(StorageError::Fault {
                key: key.to_string(),
            });
        }
        Ok(())
    }
}

impl Storage for SimStorage {
    fn put(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            self.check_write(&key)?;
            tokio::time::sleep_until(self.reserve(bytes.len())).await;
            self.lock().blobs.insert(key, bytes);
            Ok(())
        })
    }

    fn append(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            self.check_write(&key)?;
            tokio::time::sleep_until(self.reserve(bytes.len())).await;
            self.lock()
                .blobs
                .entry(key)
                .or_default()
                .extend_from_slice(&bytes);
            Ok(())
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Vec<u8>, StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            check_key(&key)?;
            let len = self.lock().blobs.get(&key).map(Vec::len);
            let Some(len) = len else {
                return Err(StorageError::NotFound { key });
            };
            tokio::time::sleep_until(self.reserve(len)).await;
            self.lock()
                .blobs
                .get(&key)
                .cloned()
                .ok_or(StorageError::NotFound { key })
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let p = prefix.trim_end_matches('/');
        let p = if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        };
        let names: BTreeSet<String> = self
            .lock()
            .blobs
            .keys()
            .filter_map(|k| k.strip_prefix(&p))
            .filter_map(|rest| rest.split('/').next().map(String::from))
            .collect();
        Box::pin(std::future::ready(Ok(names.into_iter().collect())))
    }

    fn remove(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let dir = format!("{key}/");
        let mut d = self.lock();
        d.blobs.retain(|k, _| k != key && !k.starts_with(&dir));
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn writes_cost_bandwidth_and_contend() {
        let s = SimStorage::new(1e6, Duration::ZERO);
        let t0 = Instant::now();
        let (a, b) = (s.clone(), s.clone());
        let (r1, r2) = tokio::join!(a.put("x", vec![0; 1000]), b.put("y", vec![0; 1000]));
        r1.expect("put");
        r2.expect("put");
        assert_eq!(
            crate::clock::undilate(Instant::now() - t0),
            Duration::from_millis(2)
        );
        assert_eq!(s.list("").await.expect("list"), vec!["x", "y"]);
    }

    #[tokio::test(start_paused = true)]
    async fn injected_faults_fail_writes() {
        let s = SimStorage::new(1e9, Duration::ZERO);
        s.fail_writes_under("ckpt/");
        assert!(matches!(
            s.put("ckpt/a", vec![1]).await,
            Err(StorageError::Fault { .. })
        ));
        s.put("other", vec![1]).await.expect("put");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_faults_fail_only_the_next_writes() {
        let s = SimStorage::new(1e9, Duration::ZERO);
        s.fail_next_writes_under("ckpt/a", 2);
        s.put("ckpt/b", vec![1])
            .await
            .expect("another key is not affected");
        for _ in 0..2 {
            assert!(matches!(
                s.put("ckpt/a", vec![1]).await,
                Err(StorageError::Fault { .. })
            ));
        }
        s.put("ckpt/a", vec![2])
            .await
            .expect("the third write goes through");
        assert_eq!(s.get("ckpt/a").await.expect("get"), vec![2]);
        s.fail_next_writes_under("x", 0);
        s.put("x", vec![1]).await.expect("zero faults fail nothing");
    }
}
