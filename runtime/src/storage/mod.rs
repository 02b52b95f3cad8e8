//! The storage seam: named blobs under a root, the only door to files for checkpoints and run
//! outputs (`metrics.jsonl`, `events.jsonl`, `summary.json`).
//!
//! Paths are relative, `/`-separated keys below the storage's root. `put` is atomic (write to a
//! temporary name, fsync, rename, fsync the directory), so a reader never sees half a file;
//! `append` is for line-oriented logs. `put_sized` stores a size without bytes: what the
//! simulated cluster writes for state whose values it does not hold (a shape-only checkpoint
//! shard); only simulated storage takes it. Implementations side by side: [`local`] (the
//! filesystem) and [`sim`] (in memory, with modelled bandwidth on virtual time and injectable
//! faults).

pub mod local;
pub mod sim;

pub use crate::clock::BoxFuture;

/// Why a storage operation failed; every variant names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StorageError {
    #[error("{key}: not found")]
    NotFound { key: String },
    #[error("{key}: invalid key (must be relative, without `..`)")]
    BadKey { key: String },
    #[error("{key}: {why}")]
    Io { key: String, why: String },
    #[error("{key}: injected fault")]
    Fault { key: String },
    /// `put_sized` on a storage that keeps real bytes.
    #[error("{key}: {why}")]
    Unsupported { key: String, why: String },
    /// A read of a value that `put_sized` wrote: it has a size and no bytes.
    #[error(
        "{key}: holds {bytes} modelled bytes and no values (written by size on simulated storage), \
         so it cannot be read"
    )]
    SizeOnly { key: String, bytes: u64 },
}

/// A place to keep bytes.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Write `bytes` under `key` atomically and durably (replacing any old value).
    fn put(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>>;
    /// Record a value of `len` bytes under `key` without its bytes (replacing any old value):
    /// simulated storage costs and lists it like a `put` of that size, and refuses to read it
    /// back ([`StorageError::SizeOnly`]); storage that keeps real bytes refuses it
    /// ([`StorageError::Unsupported`]).
    fn put_sized(&self, key: &str, len: u64) -> BoxFuture<'_, Result<(), StorageError>>;
    /// Append `bytes` to `key` (created if missing).
    fn append(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>>;
    /// Read the whole value of `key`.
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Vec<u8>, StorageError>>;
    /// Keys directly below `prefix` (one level, sorted); empty if there is none.
    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>>;
    /// Remove `key` and everything below it; removing nothing is not an error.
    fn remove(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>>;
}

/// Check that a key stays below the root.
pub(crate) fn check_key(key: &str) -> Result<(), StorageError> {
    let bad =
        key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c == ".." || c.is_empty());
    if bad {
        return Err(StorageError::BadKey {
            key: key.to_string(),
        });
    }
    Ok(())
}
