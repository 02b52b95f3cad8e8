//! Data pipeline: byte tokenizer, built-in corpus, token files, deterministic shuffling and sharding.
//!
//! The pieces, in the order data flows through them:
//!
//! 1. A token source: the [`corpus`] embedded in the crate (public-domain English text), or a file
//!    read by [`files::load_tokens`] (plain text through the [`tokenizer::ByteTokenizer`], or a
//!    little-endian `u16`/`u32` token file).
//! 2. A [`dataset::TokenDataset`]: the token array cut into non-overlapping windows of `seq_len`
//!    tokens. A [`dataset::Batch`] carries `input_ids` and `labels` with `labels == input_ids`
//!    (the HuggingFace convention: the loss shifts them by one position).
//! 3. A [`dataset::DataLoader`]: an epoch-wise seeded permutation of the windows, cut into global
//!    batches; data-parallel rank `r` takes the `r`-th contiguous slice of each global batch and
//!    splits it into micro-batches. Concatenating the ranks' slices in rank order gives exactly
//!    the single-rank global batch, so DP runs are comparable with single-rank runs.
//! 4. A [`cursor::DataCursor`]: where the loader stands (seed, epoch, position). Saved with a
//!    checkpoint and handed back to [`dataset::DataLoader::resume`], it reproduces exactly the
//!    batches the uninterrupted run would have produced.
//!
//! All randomness comes from [`rng`], a small seeded generator with identical output everywhere.

pub mod corpus;
pub mod cursor;
pub mod dataset;
pub mod files;
pub mod rng;
pub mod tokenizer;

pub use corpus::{BUILTIN_CORPUS, builtin_corpus, builtin_corpus_tokens, synthetic_tokens};
pub use cursor::DataCursor;
pub use dataset::{Batch, DataLoader, IGNORE_INDEX, LoaderConfig, StepBatch, TokenDataset};
pub use files::{TokenFormat, load_tokens, parse_tokens};
pub use rng::{Rng, SplitMix64};
pub use tokenizer::{BYTE_VOCAB_SIZE, ByteTokenizer};

/// Everything that can go wrong in the data pipeline. Messages name the file (or other origin)
/// and the byte offset where that applies.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Io {
        /// The file's path as given.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A binary token file's length is not a whole number of tokens.
    #[error(
        "{origin}: length {len} bytes is not a multiple of {width} ({format} tokens); \
         the incomplete token starts at byte offset {offset}"
    )]
    TruncatedToken {
        /// The file (or other origin) of the bytes.
        origin: String,
        /// The total length in bytes.
        len: usize,
        /// The token width in bytes.
        width: usize,
        /// The format's name.
        format: &'static str,
        /// The byte offset of the incomplete trailing token.
        offset: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error(
        "{origin}: token {index} (byte offset {offset}) has id {token}, \
         which is not below the vocabulary size {vocab_size}"
    )]
    TokenOutOfRange {
        /// The file (or other origin) of the tokens.
        origin: String,
        /// The token's index in the sequence.
        index: usize,
        /// The token's byte offset in the file (equal to `index` for plain text).
        offset: usize,
        /// The offending id.
        token: u32,
        /// The vocabulary size it was checked against.
        vocab_size: u32,
    },
    /// A token file holds no tokens.
    #[error("{origin}: holds no tokens")]
    Empty {
        /// The file (or other origin).
        origin: String,
    },
    /// A token format name is not one of `text`, `u16`, `u32`.
    #[error("unknown token format {0:?} (expected \"text\", \"u16\" or \"u32\")")]
    UnknownFormat(String),
    /// A token id does not fit the width of the format it is written in.
    #[error("token {index} has id {token}, which does not fit in {format}")]
    TokenTooWide {
        /// The token's index.
        index: usize,
        /// The offending id.
        token: u32,
        /// The format's name.
        format: &'static str,
    },
    /// A dataset, batch or loader setting is inconsistent (the message says which and why).
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// Saved cursor bytes could not be decoded.
    #[error("invalid data cursor bytes: {0}")]
    BadCursor(String),
    /// A cursor was saved for a different dataset than the one it is applied to.
    #[error(
        "data cursor belongs to a different dataset (cursor fingerprint {cursor:#018x}, \
         dataset fingerprint {dataset:#018x})"
    )]
    CursorMismatch {
        /// The fingerprint stored in the cursor.
        cursor: u64,
        /// The fingerprint of the dataset it was applied to.
        dataset: u64,
    },
}
