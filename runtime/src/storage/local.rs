//! Local-filesystem storage: keys are paths below a root directory. File work runs on tokio's
//! blocking pool so actors keep answering while a large checkpoint shard is written.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{BoxFuture, Storage, StorageError, check_key};

/// Storage in a directory on the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Storage rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io(key: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::NotFound {
            key: key.to_string(),
        }
    } else {
        StorageError::Io {
            key: key.to_string(),
            why: e.to_string(),
        }
    }
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| io(key, e)),
        Err(e) => Err(StorageError::Io {
            key: key.to_string(),
            why: format!("storage task failed: {e}"),
        }),
    }
}

fn put_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("blob");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Storage for LocalStorage {
    fn put(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            let path = self.path(&key)?;
            blocking(&key, move || put_atomic(&path, &bytes)).await
        })
    }

    fn put_sized(&self, key: &str, len: u64) -> BoxFuture<'_, Result<(), StorageError>> {
        let r = check_key(key).and_then(|()| {
            Err(StorageError::Unsupported {
                key: key.to_string(),
                why: format!(
                    "a value of {len} bytes without its bytes (shape-only state of the simulated \
                     cluster) cannot be written to the local filesystem; use simulated storage"
                ),
            })
        });
        Box::pin(std::future::ready(r))
    }

    fn append(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            let path = self.path(&key)?;
            blocking(&key, move || {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(&bytes)
            })
            .await
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Vec<u8>, StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            let path = self.path(&key)?;
            blocking(&key, move || std::fs::read(path)).await
        })
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        let prefix = prefix.trim_end_matches('/').to_string();
        Box::pin(async move {
            let dir = if prefix.is_empty() {
                self.root.clone()
            } else {
                self.path(&prefix)?
            };
            blocking(&prefix, move || {
                let mut names = Vec::new();
                match std::fs::read_dir(&dir) {
                    Ok(rd) => {
                        for e in rd {
                            let n = e?.file_name().to_string_lossy().into_owned();
                            if !n.starts_with('.') {
                                names.push(n);
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                names.sort();
                Ok(names)
            })
            .await
        })
    }

    fn remove(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            let path = self.path(&key)?;
            blocking(&key, move || {
                let r = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("flotilla-storage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn put_get_append_list_remove() {
        let s = LocalStorage::new(tmpdir("basic"));
        s.put("run/summary.json", b"{}".to_vec())
            .await
            .expect("put");
        s.append("run/metrics.jsonl", b"a\n".to_vec())
            .await
            .expect("append");
        s.append("run/metrics.jsonl", b"b\n".to_vec())
            .await
            .expect("append");
        assert_eq!(s.get("run/metrics.jsonl").await.expect("get"), b"a\nb\n");
        assert_eq!(
            s.list("run").await.expect("list"),
            vec!["metrics.jsonl", "summary.json"]
        );
        s.remove("run").await.expect("remove");
        assert!(matches!(
            s.get("run/summary.json").await,
            Err(StorageError::NotFound { .. })
        ));
        assert_eq!(s.list("run").await.expect("list"), Vec::<String>::new());
        let _ = std::fs::remove_dir_all(s.root());
    }

    #[tokio::test]
    async fn a_sized_put_is_refused_and_writes_nothing() {
        let s = LocalStorage::new(tmpdir("sized"));
        let err = s.put_sized("ckpt/rank-0.safetensors", 1 << 40).await;
        match err {
            Err(StorageError::Unsupported { key, why }) => {
                assert_eq!(key, "ckpt/rank-0.safetensors");
                assert!(why.contains("simulated"), "{why}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(s.list("ckpt").await.expect("list"), Vec::<String>::new());
        assert!(matches!(
            s.put_sized("../x", 1).await,
            Err(StorageError::BadKey { .. })
        ));
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let s = LocalStorage::new(tmpdir("escape"));
        for k in ["../x", "/etc/passwd", "a//b", ""] {
            assert!(
                matches!(s.put(k, vec![]).await, Err(StorageError::BadKey { .. })),
                "{k}"
            );
        }
    }
}
