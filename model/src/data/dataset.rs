//! Token windows, batches, and the seeded, data-parallel-sharded loader that serves them.
//!
//! # Windows and labels
//!
//! A [`TokenDataset`] cuts its token array into `floor(len / seq_len)` non-overlapping windows of
//! `seq_len` tokens; window `w` is `tokens[w·seq_len .. (w+1)·seq_len]` (a trailing partial window
//! is dropped). A [`Batch`] holds `batch` windows as `input_ids` (`[batch, seq]`, row-major) and
//! `labels` with **`labels == input_ids`**, the HuggingFace convention: the loss shifts internally,
//! comparing the logits at position `t` with the label at `t + 1`, so each window yields
//! `seq_len − 1` next-token predictions (and multi-token-prediction depth `k` shifts by `k + 1`).
//! Labels are `i64` so that callers may mask positions with [`IGNORE_INDEX`] (−100); the loader
//! itself never pads, so it never produces that value.
//!
//! # Order, sharding, micro-batches
//!
//! Each epoch visits the windows in a permutation drawn from `(seed, epoch)` (or in order when
//! shuffling is off). Global batch `s` of the epoch is permutation entries
//! `[s·B, (s+1)·B)` for a global batch size `B`; an epoch has `floor(windows / B)` batches and the
//! rest of the permutation is skipped (a different rest each epoch). Data-parallel rank `r` of
//! `dp` takes the contiguous slice `[r·B/dp, (r+1)·B/dp)` of every global batch and splits it
//! into micro-batches of `micro_batch` windows, in order. Hence the ranks' slices are disjoint,
//! equal in size, and concatenated in rank order they are exactly the batch a single rank gets
//! (tested), which is what lets a DP run be compared with a single-rank run.

use std::sync::Arc;

use super::DataError;
use super::cursor::DataCursor;
use super::rng::{Rng, mix64};

/// The label value that losses skip (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// A token array viewed as non-overlapping windows of `seq_len` tokens.
#[derive(Clone, Debug)]
pub struct TokenDataset {
    tokens: Vec<u32>,
    seq_len: usize,
    num_windows: usize,
    fingerprint: u64,
}

impl TokenDataset {
    /// Windows of `seq_len` tokens over `tokens`. Needs `seq_len >= 2` (one prediction at least)
    /// and at least one whole window.
    pub fn new(tokens: Vec<u32>, seq_len: usize) -> Result<Self, DataError> {
        if seq_len < 2 {
            return Err(DataError::Config(format!(
                "seq_len is {seq_len}; it must be at least 2"
            )));
        }
        let num_windows = tokens.len() / seq_len;
        if num_windows == 0 {
            return Err(DataError::Config(format!(
                "{} tokens are fewer than one window of seq_len {seq_len}",
                tokens.len()
            )));
        }
        let fingerprint = fingerprint(&tokens, seq_len);
        Ok(Self {
            tokens,
            seq_len,
            num_windows,
            fingerprint,
        })
    }

    /// All tokens (including a dropped partial window at the end).
    #[must_use]
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens per window.
    #[must_use]
    pub const fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of whole windows.
    #[must_use]
    pub const fn num_windows(&self) -> usize {
        self.num_windows
    }

    /// A 64-bit digest of the tokens and `seq_len` (FNV-1a over 32-bit words, then [`mix64`]).
    /// Cursors carry it so that a cursor cannot silently be applied to different data.
    #[must_use]
    pub const fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Window `index`, or `None` past the last window.
    #[must_use]
    pub fn window(&self, index: u64) -> Option<&[u32]> {
        let index = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.num_windows)?;
        Some(&self.tokens[index * self.seq_len..(index + 1) * self.seq_len])
    }

    /// The order in which epoch `epoch` visits the windows: a Fisher–Yates permutation of
    /// `0..num_windows` drawn from [`Rng::from_stream`]`(seed, epoch)`, or the identity when
    /// `shuffle` is false.
    #[must_use]
    pub fn epoch_order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<u64> {
        let mut order: Vec<u64> = (0..self.num_windows as u64).collect();
        if shuffle {
            Rng::from_stream(seed, epoch).shuffle(&mut order);
        }
        order
    }

    /// The batch made of these windows, in this order. Fails on an id past the last window.
    pub fn batch(&self, window_ids: &[u64]) -> Result<Batch, DataError> {
        if let Some(&id) = window_ids.iter().find(|&&id| self.window(id).is_none()) {
            return Err(DataError::Config(format!(
                "window {id} does not exist (the dataset has {} windows)",
                self.num_windows
            )));
        }
        Ok(self.gather(window_ids))
    }

    /// The batch of these windows, which the caller has checked to be in range.
    fn gather(&self, window_ids: &[u64]) -> Batch {
        let seq = self.seq_len;
        let mut input_ids = Vec::with_capacity(window_ids.len() * seq);
        for &id in window_ids {
            let w = id as usize;
            input_ids.extend_from_slice(&self.tokens[w * seq..(w + 1) * seq]);
        }
        let labels = input_ids.iter().map(|&t| i64::from(t)).collect();
        Batch {
            input_ids,
            labels,
            batch: window_ids.len(),
            seq,
            window_ids: window_ids.to_vec(),
        }
    }
}

/// FNV-1a (64-bit offset basis and prime) over `seq_len`, the length and each token as a word,
/// finished with [`mix64`].
fn fingerprint(tokens: &[u32], seq_len: usize) -> u64 {
    const OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut h = OFFSET;
    for word in [seq_len as u64, tokens.len() as u64] {
        h = (h ^ word).wrapping_mul(PRIME);
    }
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(PRIME);
    }
    mix64(h)
}

/// A batch of windows: `input_ids` and `labels` are `[batch, seq]` row-major, `labels` equal to
/// `input_ids` (shifted by the loss; see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `batch × seq`, row-major.
    pub input_ids: Vec<u32>,
    /// Labels, `batch × seq`, row-major; equal to `input_ids` (the loss shifts them).
    pub labels: Vec<i64>,
    /// Number of sequences (rows).
    pub batch: usize,
    /// Tokens per sequence (columns).
    pub seq: usize,
    /// The dataset window of each row (for tracing and tests).
    pub window_ids: Vec<u64>,
}

impl Batch {
    /// Number of tokens (`batch × seq`).
    #[must_use]
    pub const fn num_tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Row `i`'s input ids, or `None` past the last row.
    #[must_use]
    pub fn row(&self, i: usize) -> Option<&[u32]> {
        (i < self.batch).then(|| &self.input_ids[i * self.seq..(i + 1) * self.seq])
    }

    /// Splits into consecutive batches of `micro_batch` rows each; `batch` must be a multiple of
    /// `micro_batch`.
    pub fn split_micro(&self, micro_batch: usize) -> Result<Vec<Batch>, DataError> {
        if micro_batch == 0 || !self.batch.is_multiple_of(micro_batch) {
            return Err(DataError::Config(format!(
                "a batch of {} sequences cannot be split into micro-batches of {micro_batch}",
                self.batch
            )));
        }
        let n = micro_batch * self.seq;
        Ok((0..self.batch / micro_batch)
            .map(|i| Batch {
                input_ids: self.input_ids[i * n..(i + 1) * n].to_vec(),
                labels: self.labels[i * n..(i + 1) * n].to_vec(),
                batch: micro_batch,
                seq: self.seq,
                window_ids: self.window_ids[i * micro_batch..(i + 1) * micro_batch].to_vec(),
            })
            .collect())
    }

    /// The rows of `parts` stacked in order (the inverse of [`Batch::split_micro`], and how the
    /// data-parallel ranks' slices reassemble into the global batch). All parts need the same
    /// `seq`; an empty list is an error.
    pub fn concat(parts: &[Batch]) -> Result<Batch, DataError> {
        let seq = parts.first().map(|b| b.seq).ok_or_else(|| {
            DataError::Config("cannot concatenate an empty list of batches".to_owned())
        })?;
        if let Some(bad) = parts.iter().find(|b| b.seq != seq) {
            return Err(DataError::Config(format!(
                "cannot concatenate batches of seq {seq} and {}",
                bad.seq
            )));
        }
        Ok(Batch {
            input_ids: parts
                .iter()
                .flat_map(|b| b.input_ids.iter().copied())
                .collect(),
            labels: parts
                .iter()
                .flat_map(|b| b.labels.iter().copied())
                .collect(),
            batch: parts.iter().map(|b| b.batch).sum(),
            seq,
            window_ids: parts
                .iter()
                .flat_map(|b| b.window_ids.iter().copied())
                .collect(),
        })
    }
}

/// How a loader cuts the epoch into batches, and which data-parallel slice it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderConfig {
    /// Sequences per optimizer step, summed over all data-parallel ranks.
    pub global_batch: usize,
    /// Sequences per micro-batch (one forward/backward pass) on one rank.
    pub micro_batch: usize,
    /// This loader's data-parallel rank, `0..dp_size`.
    pub dp_rank: usize,
    /// Number of data-parallel ranks.
    pub dp_size: usize,
}

impl LoaderConfig {
    /// A single-rank configuration (`dp_rank 0` of `dp_size 1`).
    #[must_use]
    pub const fn single(global_batch: usize, micro_batch: usize) -> Self {
        Self {
            global_batch,
            micro_batch,
            dp_rank: 0,
            dp_size: 1,
        }
    }

    /// The same configuration for rank `dp_rank` of `dp_size`.
    #[must_use]
    pub const fn with_rank(self, dp_rank: usize, dp_size: usize) -> Self {
        Self {
            dp_rank,
            dp_size,
            ..self
        }
    }

    /// Sequences per step on this rank (`global_batch / dp_size`).
    #[must_use]
    pub const fn local_batch(&self) -> usize {
        match self.global_batch.checked_div(self.dp_size) {
            Some(n) => n,
            None => 0,
        }
    }

    /// Micro-batches per step on this rank.
    #[must_use]
    pub const fn num_micro_batches(&self) -> usize {
        match self.local_batch().checked_div(self.micro_batch) {
            Some(n) => n,
            None => 0,
        }
    }

    /// Checks that the sizes divide evenly and that a global batch fits in `num_windows`.
    pub fn validate(&self, num_windows: usize) -> Result<(), DataError> {
        let fail = |m: String| Err(DataError::Config(m));
        if self.dp_size == 0 || self.dp_rank >= self.dp_size {
            return fail(format!(
                "dp_rank {} is not in 0..dp_size {}",
                self.dp_rank, self.dp_size
            ));
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.dp_size) {
            return fail(format!(
                "global_batch {} must be a positive multiple of dp_size {}",
                self.global_batch, self.dp_size
            ));
        }
        if self.micro_batch == 0 || !self.local_batch().is_multiple_of(self.micro_batch) {
            return fail(format!(
                "the per-rank batch {} (global_batch / dp_size) must be a positive multiple of \
                 micro_batch {}",
                self.local_batch(),
                self.micro_batch
            ));
        }
        if self.global_batch > num_windows {
            return fail(format!(
                "global_batch {} exceeds the {num_windows} windows of the dataset",
                self.global_batch
            ));
        }
        Ok(())
    }
}

/// One optimizer step's data for one rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepBatch {
    /// The epoch this step belongs to.
    pub epoch: u64,
    /// The step's index within its epoch.
    pub step_in_epoch: u64,
    /// The step's index since the start of training (0 for the first step).
    pub global_step: u64,
    /// This rank's slice of the global batch, as micro-batches in order.
    pub micro_batches: Vec<Batch>,
}

impl StepBatch {
    /// This rank's whole slice (the micro-batches stacked).
    pub fn local_batch(&self) -> Result<Batch, DataError> {
        Batch::concat(&self.micro_batches)
    }
}

/// Serves one rank's batches, step after step, forever (epochs roll over). Its position is a
/// [`DataCursor`], which [`DataLoader::resume`] accepts to continue exactly where it stood.
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: Arc<TokenDataset>,
    config: LoaderConfig,
    cursor: DataCursor,
    /// The permutation of `order_epoch` (recomputed when the epoch changes).
    order: Vec<u64>,
    order_epoch: u64,
}

impl DataLoader {
    /// A loader at the start of epoch 0 with this seed (shuffling on or off).
    pub fn new(
        dataset: Arc<TokenDataset>,
        config: LoaderConfig,
        seed: u64,
        shuffle: bool,
    ) -> Result<Self, DataError> {
        let cursor = DataCursor::start(seed, shuffle, dataset.fingerprint());
        Self::resume(dataset, config, cursor)
    }

    /// A loader that continues from `cursor`: it yields exactly the batches that the loader which
    /// produced the cursor would have yielded next. The cursor's position is a global sample
    /// index, so the configuration may differ from the saving loader's (another rank, another
    /// `dp_size` or `micro_batch`), and the global batches stay the same as long as
    /// `global_batch` does. Fails if the cursor belongs to other data.
    pub fn resume(
        dataset: Arc<TokenDataset>,
        config: LoaderConfig,
        cursor: DataCursor,
    ) -> Result<Self, DataError> {
        config.validate(dataset.num_windows())?;
        cursor.check_dataset(&dataset)?;
        let order = dataset.epoch_order(cursor.seed, cursor.epoch, cursor.shuffle);
        let mut loader = Self {
            order_epoch: cursor.epoch,
            dataset,
            config,
            cursor,
            order,
        };
        loader.roll_epoch_if_done();
        Ok(loader)
    }

    /// Where the loader stands: handing this to [`DataLoader::resume`] continues from here.
    #[must_use]
    pub const fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// The dataset served.
    #[must_use]
    pub const fn dataset(&self) -> &Arc<TokenDataset> {
        &self.dataset
    }

    /// The loader's configuration.
    #[must_use]
    pub const fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Optimizer steps per epoch (`floor(windows / global_batch)`).
    #[must_use]
    pub fn steps_per_epoch(&self) -> u64 {
        (self.dataset.num_windows() / self.config.global_batch) as u64
    }

    /// This rank's data for the next optimizer step, and the cursor moves past it.
    pub fn next_step(&mut self) -> StepBatch {
        self.roll_epoch_if_done();
        if self.order_epoch != self.cursor.epoch {
            self.order =
                self.dataset
                    .epoch_order(self.cursor.seed, self.cursor.epoch, self.cursor.shuffle);
            self.order_epoch = self.cursor.epoch;
        }
        let c = self.config;
        let global = c.global_batch as u64;
        // `validate` and `roll_epoch_if_done` keep `position + global_batch <= num_windows`.
        let start = self.cursor.position as usize + c.dp_rank * c.local_batch();
        let micro_batches = (0..c.num_micro_batches())
            .map(|i| {
                let ids = &self.order[start + i * c.micro_batch..start + (i + 1) * c.micro_batch];
                self.dataset.gather(ids)
            })
            .collect();
        let step = StepBatch {
            epoch: self.cursor.epoch,
            step_in_epoch: self.cursor.position / global,
            global_step: self.cursor.steps,
            micro_batches,
        };
        self.cursor.position += global;
        self.cursor.steps += 1;
        self.roll_epoch_if_done();
        step
    }

    /// Moves the cursor to the start of the next epoch when the rest of this one is smaller than
    /// a global batch.
    fn roll_epoch_if_done(&mut self) {
        let needed = self
            .cursor
            .position
            .saturating_add(self.config.global_batch as u64);
        if needed > self.dataset.num_windows() as u64 {
            self.cursor.epoch += 1;
            self.cursor.position = 0;
        }
    }
}

impl Iterator for DataLoader {
    type Item = StepBatch;

    /// The same as [`DataLoader::next_step`]; never `None`.
    fn next(&mut self) -> Option<StepBatch> {
        Some(self.next_step())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn dataset(windows: usize, seq: usize, extra: usize) -> Arc<TokenDataset> {
        let tokens: Vec<u32> = (0..windows * seq + extra)
            .map(|i| (i % 256) as u32)
            .collect();
        Arc::new(TokenDataset::new(tokens, seq).expect("dataset"))
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn windows_are_non_overlapping_and_labels_equal_inputs() {
        let ds = dataset(3, 4, 2);
        assert_eq!(ds.num_windows(), 3);
        assert_eq!(ds.window(1), Some(&[4, 5, 6, 7][..]));
        assert_eq!(ds.window(3), None);
        let b = ds.batch(&[2, 0]).expect("batch");
        assert_eq!(b.input_ids, vec![8, 9, 10, 11, 0, 1, 2, 3]);
        assert_eq!(
            b.labels,
            b.input_ids
                .iter()
                .map(|&t| i64::from(t))
                .collect::<Vec<_>>()
        );
        assert_eq!((b.batch, b.seq, b.num_tokens()), (2, 4, 8));
        assert_eq!(b.row(1), Some(&[0, 1, 2, 3][..]));
        assert_eq!(b.row(2), None);
        assert!(!b.labels.contains(&IGNORE_INDEX));
        assert!(err_text(ds.batch(&[3])).contains("window 3"));
    }

    #[test]
    fn bad_dataset_shapes_are_errors() {
        assert!(err_text(TokenDataset::new(vec![1, 2, 3], 1)).contains("at least 2"));
        assert!(err_text(TokenDataset::new(vec![1, 2, 3], 4)).contains("fewer than one window"));
    }

    #[test]
    fn fingerprint_depends_on_tokens_and_seq_len() {
        let a = TokenDataset::new(vec![1, 2, 3, 4], 2).expect("a");
        let b = TokenDataset::new(vec![1, 2, 3, 5], 2).expect("b");
        let c = TokenDataset::new(vec![1, 2, 3, 4], 4).expect("c");
        let a2 = TokenDataset::new(vec![1, 2, 3, 4], 2).expect("a2");
        assert_eq!(a.fingerprint(), a2.fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let ds = dataset(50, 2, 0);
        let e0 = ds.epoch_order(3, 0, true);
        assert_eq!(e0, ds.epoch_order(3, 0, true));
        assert_ne!(e0, ds.epoch_order(3, 1, true));
        assert_ne!(e0, ds.epoch_order(4, 0, true));
        assert_eq!(
            e0.iter().copied().collect::<BTreeSet<u64>>(),
            (0..50).collect()
        );
        assert_eq!(ds.epoch_order(3, 0, false), (0..50).collect::<Vec<u64>>());
    }

    #[test]
    fn config_validation_names_the_problem() {
        let v = |c: LoaderConfig| err_text(c.validate(100));
        assert!(v(LoaderConfig::single(8, 2).with_rank(2, 2)).contains("dp_rank 2"));
        assert!(v(LoaderConfig::single(8, 2).with_rank(0, 3)).contains("multiple of dp_size 3"));
        assert!(v(LoaderConfig::single(8, 3)).contains("micro_batch 3"));
        assert!(v(LoaderConfig::single(8, 0)).contains("micro_batch 0"));
        assert!(v(LoaderConfig::single(128, 1)).contains("100 windows"));
        assert!(
            LoaderConfig::single(8, 2)
                .with_rank(1, 2)
                .validate(100)
                .is_ok()
        );
        let c = LoaderConfig::single(16, 2).with_rank(0, 4);
        assert_eq!((c.local_batch(), c.num_micro_batches()), (4, 2));
    }

    #[test]
    fn micro_batches_split_and_concat_back() {
        let ds = dataset(6, 3, 0);
        let b = ds.batch(&[5, 1, 4, 0, 2, 3]).expect("batch");
        let parts = b.split_micro(2).expect("split");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].window_ids, vec![4, 0]);
        assert_eq!(
            parts[1].input_ids,
            [
                ds.window(4).unwrap_or_default(),
                ds.window(0).unwrap_or_default()
            ]
            .concat()
        );
        assert_eq!(Batch::concat(&parts).ok(), Some(b.clone()));
        assert!(err_text(b.split_micro(4)).contains("micro-batches of 4"));
        assert!(err_text(b.split_micro(0)).contains("micro-batches of 0"));
        assert!(Batch::concat(&[]).is_err());
        let other = TokenDataset::new(vec![0; 8], 4).expect("other");
        let mixed = [b, other.batch(&[0]).expect("batch")];
        assert!(err_text(Batch::concat(&mixed)).contains("seq 3 and 4"));
    }
}
