//! Simulated storage: blobs in memory, each operation costing latency + bytes / bandwidth on
//! virtual time (queued per disk, so concurrent writers contend), with injectable faults.
//! Like the virtual clock it sleeps dilated ([`crate::clock::dilate`]). A value written by
//! `put_sized` is a size only: it costs and lists like a `put` of that many bytes, holds none
//! ([`SimStorage::size`] tells its size), and a read of it is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::dilate;

use super::{BoxFuture, Storage, StorageError, check_key};

/// One stored value: its bytes, or only its size (`put_sized`).
#[derive(Debug)]
enum Blob {
    Bytes(Vec<u8>),
    Sized(u64),
}

impl Blob {
    fn len(&self) -> u64 {
        match self {
            Blob::Bytes(b) => b.len() as u64,
            Blob::Sized(n) => *n,
        }
    }
}

#[derive(Debug, Default)]
struct Disk {
    blobs: BTreeMap<String, Blob>,
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

    /// An in-memory disk that costs no time (no latency, no bandwidth limit): a scratch store
    /// for runs and tests that measure something else, safe on the real clock too.
    pub fn unlimited() -> Self {
        Self::new(f64::INFINITY, Duration::ZERO)
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

    /// The size of the value under `key` (bytes written, or the size `put_sized` recorded).
    pub fn size(&self, key: &str) -> Option<u64> {
        self.lock().blobs.get(key).map(Blob::len)
    }

    /// Bytes the disk really holds in memory (values written by size hold none).
    pub fn held_bytes(&self) -> u64 {
        self.lock()
            .blobs
            .values()
            .map(|b| match b {
                Blob::Bytes(v) => v.len() as u64,
                Blob::Sized(_) => 0,
            })
            .sum()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for an operation of `bytes` (at once on an [`SimStorage::unlimited`] disk).
    async fn cost(&self, bytes: u64) {
        if self.latency.is_zero() && self.bytes_per_s == f64::INFINITY {
            return;
        }
        tokio::time::sleep_until(self.reserve(bytes)).await;
    }

    /// Queue an operation of `bytes` on the disk; returns when it completes.
    fn reserve(&self, bytes: u64) -> Instant {
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
            self.cost(bytes.len() as u64).await;
            self.lock().blobs.insert(key, Blob::Bytes(bytes));
            Ok(())
        })
    }

    fn put_sized(&self, key: &str, len: u64) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            self.check_write(&key)?;
            self.cost(len).await;
            self.lock().blobs.insert(key, Blob::Sized(len));
            Ok(())
        })
    }

    fn append(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            self.check_write(&key)?;
            if let Some(&Blob::Sized(n)) = self.lock().blobs.get(&key) {
                return Err(StorageError::SizeOnly { key, bytes: n });
            }
            self.cost(bytes.len() as u64).await;
            match self
                .lock()
                .blobs
                .entry(key.clone())
                .or_insert_with(|| Blob::Bytes(Vec::new()))
            {
                Blob::Bytes(v) => {
                    v.extend_from_slice(&bytes);
                    Ok(())
                }
                Blob::Sized(n) => Err(StorageError::SizeOnly { key, bytes: *n }),
            }
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Vec<u8>, StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            check_key(&key)?;
            let len = match self.lock().blobs.get(&key) {
                None => return Err(StorageError::NotFound { key }),
                Some(Blob::Sized(n)) => return Err(StorageError::SizeOnly { key, bytes: *n }),
                Some(Blob::Bytes(v)) => v.len() as u64,
            };
            self.cost(len).await;
            match self.lock().blobs.get(&key) {
                Some(Blob::Bytes(v)) => Ok(v.clone()),
                Some(Blob::Sized(n)) => Err(StorageError::SizeOnly { key, bytes: *n }),
                None => Err(StorageError::NotFound { key }),
            }
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
    async fn a_sized_put_costs_its_size_and_holds_no_bytes() {
        let s = SimStorage::new(1e9, Duration::ZERO);
        let t0 = Instant::now();
        let len = 3_000_000_000u64;
        s.put_sized("ckpt/step-1/rank-0", len)
            .await
            .expect("put_sized");
        assert_eq!(
            crate::clock::undilate(Instant::now() - t0),
            Duration::from_secs(3)
        );
        assert_eq!(s.size("ckpt/step-1/rank-0"), Some(len));
        assert_eq!(s.held_bytes(), 0);
        assert_eq!(s.list("ckpt/step-1").await.expect("list"), vec!["rank-0"]);
        match s.get("ckpt/step-1/rank-0").await {
            Err(StorageError::SizeOnly { key, bytes }) => {
                assert_eq!((key.as_str(), bytes), ("ckpt/step-1/rank-0", len));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            s.append("ckpt/step-1/rank-0", vec![1]).await,
            Err(StorageError::SizeOnly { .. })
        ));
        s.fail_writes_under("bad/");
        assert!(matches!(
            s.put_sized("bad/x", 1).await,
            Err(StorageError::Fault { .. })
        ));
        s.put("ckpt/step-1/rank-0", vec![7]).await.expect("put");
        assert_eq!(s.get("ckpt/step-1/rank-0").await.expect("get"), vec![7]);
        s.remove("ckpt").await.expect("remove");
        assert_eq!(s.size("ckpt/step-1/rank-0"), None);
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
