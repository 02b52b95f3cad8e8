//! The data cursor: where a loader stands (seed, epoch, position), saved and restored exactly.
//!
//! A [`DataCursor`] is everything needed to continue a [`DataLoader`] from where it stood: the
//! seed and shuffle flag (which fix every epoch's permutation), the epoch, the position in the
//! epoch (a global sample index, so it does not depend on the data-parallel layout), the number of
//! steps served, and the dataset's fingerprint (so that a cursor is never applied to other data).
//! It goes into checkpoints either through serde or as 48 plain bytes ([`DataCursor::to_bytes`]):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `FLDC` |
//! | 4..6 | format version, `u16` little-endian, currently 1 |
//! | 6..8 | flags, `u16` little-endian: bit 0 = shuffle; other bits must be 0 |
//! | 8..16 | seed, `u64` little-endian |
//! | 16..24 | epoch |
//! | 24..32 | position |
//! | 32..40 | steps |
//! | 40..48 | dataset fingerprint |
//!
//! [`DataLoader`]: super::dataset::DataLoader

use super::DataError;
use super::dataset::TokenDataset;

/// The plain-bytes encoding's magic number.
const MAGIC: [u8; 4] = *b"FLDC";
/// The plain-bytes encoding's version.
const VERSION: u16 = 1;
/// The shuffle flag bit.
const FLAG_SHUFFLE: u16 = 1;

/// A loader's position in its data, to save with a checkpoint and resume from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCursor {
    /// The seed of the epoch permutations.
    pub seed: u64,
    /// Whether epochs are shuffled (otherwise windows are visited in order).
    pub shuffle: bool,
    /// The current epoch (0-based).
    pub epoch: u64,
    /// How many windows of this epoch's order the global batches have consumed: the next global
    /// batch starts at this index of the permutation.
    pub position: u64,
    /// Global batches (optimizer steps) served since the start of training.
    pub steps: u64,
    /// [`TokenDataset::fingerprint`] of the data this cursor walks.
    pub fingerprint: u64,
}

impl DataCursor {
    /// Length of [`DataCursor::to_bytes`]'s output.
    pub const ENCODED_LEN: usize = 48;

    /// The cursor at the very start (epoch 0, position 0, no steps) of the data with this
    /// fingerprint.
    #[must_use]
    pub const fn start(seed: u64, shuffle: bool, fingerprint: u64) -> Self {
        Self {
            seed,
            shuffle,
            epoch: 0,
            position: 0,
            steps: 0,
            fingerprint,
        }
    }

    /// Checks that this cursor was made for `dataset` and that its position lies inside it.
    pub fn check_dataset(&self, dataset: &TokenDataset) -> Result<(), DataError> {
        if self.fingerprint != dataset.fingerprint() {
            return Err(DataError::CursorMismatch {
                cursor: self.fingerprint,
                dataset: dataset.fingerprint(),
            });
        }
        if self.position > dataset.num_windows() as u64 {
            return Err(DataError::BadCursor(format!(
                "position {} is past the {} windows of the dataset",
                self.position,
                dataset.num_windows()
            )));
        }
        Ok(())
    }

    /// The 48-byte plain encoding described in the module documentation.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.shuffle { FLAG_SHUFFLE } else { 0 };
        out[6..8].copy_from_slice(&flags.to_le_bytes());
        let fields = [
            self.seed,
            self.epoch,
            self.position,
            self.steps,
            self.fingerprint,
        ];
        for (i, v) in fields.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes [`DataCursor::to_bytes`]'s output; rejects a wrong length, magic, version or
    /// unknown flag bits.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DataError> {
        if bytes.len() != Self::ENCODED_LEN {
            return Err(DataError::BadCursor(format!(
                "{} bytes, expected {}",
                bytes.len(),
                Self::ENCODED_LEN
            )));
        }
        if bytes[0..4] != MAGIC {
            return Err(DataError::BadCursor(format!(
                "magic {:02x?}, expected \"FLDC\"",
                &bytes[0..4]
            )));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(DataError::BadCursor(format!(
                "version {version}, expected {VERSION}"
            )));
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags & !FLAG_SHUFFLE != 0 {
            return Err(DataError::BadCursor(format!(
                "unknown flag bits {flags:#06x}"
            )));
        }
        let field = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(word)
        };
        Ok(Self {
            seed: field(0),
            shuffle: flags & FLAG_SHUFFLE != 0,
            epoch: field(1),
            position: field(2),
            steps: field(3),
            fingerprint: field(4),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The cursor's codecs, and the loader's walk over time: epochs, data-parallel sharding,
    //! resumption.

    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::data::dataset::{Batch, DataLoader, LoaderConfig, StepBatch};

    fn dataset(windows: usize, seq: usize) -> Arc<TokenDataset> {
        let tokens: Vec<u32> = (0..windows * seq + 3)
            .map(|i| (i * 7 % 251) as u32)
            .collect();
        Arc::new(TokenDataset::new(tokens, seq).expect("dataset"))
    }

    fn take(loader: &mut DataLoader, n: usize) -> Vec<StepBatch> {
        (0..n).map(|_| loader.next_step()).collect()
    }

    #[test]
    fn bytes_round_trip() {
        let c = DataCursor {
            seed: u64::MAX - 3,
            shuffle: true,
            epoch: 7,
            position: 1_234,
            steps: 99_999,
            fingerprint: 0xDEAD_BEEF_0123_4567,
        };
        let bytes = c.to_bytes();
        assert_eq!(&bytes[0..4], b"FLDC");
        assert_eq!(DataCursor::from_bytes(&bytes).ok(), Some(c));
        let off = DataCursor {
            shuffle: false,
            ..c
        };
        assert_eq!(DataCursor::from_bytes(&off.to_bytes()).ok(), Some(off));
    }

    #[test]
    fn serde_round_trip() {
        let c = DataCursor {
            seed: 1,
            shuffle: true,
            epoch: 2,
            position: 3,
            steps: 4,
            fingerprint: u64::MAX,
        };
        let json = serde_json::to_string(&c).unwrap_or_default();
        let back: Option<DataCursor> = serde_json::from_str(&json).ok();
        assert_eq!(back, Some(c));
        let unknown = json.replace("\"seed\"", "\"sead\"");
        assert!(serde_json::from_str::<DataCursor>(&unknown).is_err());
    }

    #[test]
    fn corrupt_bytes_are_rejected() {
        let good = DataCursor::start(5, true, 6).to_bytes();
        let msg = |b: &[u8]| {
            DataCursor::from_bytes(b)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(msg(&good[..47]).contains("47 bytes"));
        let mut bad = good;
        bad[0] = b'X';
        assert!(msg(&bad).contains("magic"));
        let mut bad = good;
        bad[4] = 2;
        assert!(msg(&bad).contains("version 2"));
        let mut bad = good;
        bad[6] = 0b10;
        assert!(msg(&bad).contains("flag"));
    }

    #[test]
    fn resume_yields_exactly_the_uninterrupted_batches() {
        // 23 windows, global batch 4: 5 steps per epoch, 3 windows skipped each epoch, so the
        // run crosses several epoch boundaries.
        let ds = dataset(23, 8);
        let config = LoaderConfig::single(4, 2);
        let mut straight = DataLoader::new(ds.clone(), config, 1234, true).expect("loader");
        let reference = take(&mut straight, 17);
        for stop in [0, 1, 4, 5, 9, 16] {
            let mut first = DataLoader::new(ds.clone(), config, 1234, true).expect("loader");
            let head = take(&mut first, stop);
            assert_eq!(head[..], reference[..stop]);
            let saved = first.cursor().to_bytes();
            drop(first);
            let cursor = DataCursor::from_bytes(&saved).expect("cursor");
            let mut resumed = DataLoader::resume(ds.clone(), config, cursor).expect("resume");
            let tail = take(&mut resumed, 17 - stop);
            assert_eq!(tail[..], reference[stop..], "resumed after {stop} steps");
        }
        assert_eq!(reference[16].global_step, 16);
        assert_eq!(reference[16].epoch, 3);
        assert_eq!(reference[16].step_in_epoch, 1);
    }

    #[test]
    fn resume_onto_another_dp_layout_keeps_the_global_batches() {
        let ds = dataset(40, 4);
        let single = LoaderConfig::single(8, 8);
        let mut straight = DataLoader::new(ds.clone(), single, 77, true).expect("loader");
        let reference = take(&mut straight, 12);
        let mut first = DataLoader::new(ds.clone(), single, 77, true).expect("loader");
        let _ = take(&mut first, 7);
        let cursor = first.cursor();
        let mut ranks: Vec<DataLoader> = (0..4)
            .map(|r| {
                DataLoader::resume(
                    ds.clone(),
                    LoaderConfig::single(8, 1).with_rank(r, 4),
                    cursor,
                )
            })
            .collect::<Result<_, _>>()
            .expect("ranks");
        for expected in &reference[7..] {
            let parts: Vec<_> = ranks
                .iter_mut()
                .map(|l| l.next_step().local_batch().expect("local"))
                .collect();
            let global = Batch::concat(&parts).expect("concat");
            assert_eq!(global, expected.local_batch().expect("local"));
        }
    }

    #[test]
    fn cursor_for_other_data_is_rejected() {
        let a = dataset(10, 4);
        let b = dataset(11, 4);
        let cursor = DataCursor::start(1, true, a.fingerprint());
        let err = DataLoader::resume(b, LoaderConfig::single(2, 1), cursor).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("different dataset"), "{msg}");
        let far = DataCursor {
            position: 11,
            ..cursor
        };
        assert!(DataLoader::resume(a, LoaderConfig::single(2, 1), far).is_err());
    }

    #[test]
    fn each_epoch_serves_distinct_windows_and_rolls_over() {
        let ds = dataset(10, 2);
        let mut loader = DataLoader::new(ds, LoaderConfig::single(3, 1), 9, true).expect("loader");
        assert_eq!(loader.steps_per_epoch(), 3);
        for epoch in 0..3 {
            let mut seen = BTreeSet::new();
            for step in 0..3 {
                let s = loader.next_step();
                assert_eq!(
                    (s.epoch, s.step_in_epoch, s.global_step),
                    (epoch, step, epoch * 3 + step)
                );
                assert_eq!(s.micro_batches.len(), 3);
                for b in &s.micro_batches {
                    assert!(
                        seen.insert(b.window_ids[0]),
                        "window served twice in an epoch"
                    );
                }
            }
            assert_eq!(seen.len(), 9);
            assert_eq!(loader.cursor().epoch, epoch + 1);
            assert_eq!(loader.cursor().position, 0);
        }
    }

    #[test]
    fn unshuffled_loader_walks_windows_in_order() {
        let ds = dataset(4, 2);
        let loader = DataLoader::new(ds, LoaderConfig::single(2, 2), 0, false).expect("loader");
        let ids: Vec<Vec<u64>> = loader
            .take(3)
            .map(|s| s.micro_batches[0].window_ids.clone())
            .collect();
        assert_eq!(ids, vec![vec![0, 1], vec![2, 3], vec![0, 1]]);
    }

    #[test]
    fn dp_ranks_partition_each_global_batch_in_order() {
        // 37 windows, global batch 8: 4 steps per epoch; 10 steps cross two epoch boundaries.
        let ds = dataset(37, 5);
        let seed = 2024;
        let single_cfg = LoaderConfig::single(8, 4);
        let single: Vec<StepBatch> = DataLoader::new(ds.clone(), single_cfg, seed, true)
            .expect("single")
            .take(10)
            .collect();
        for (dp, micro) in [(2, 2), (4, 1), (8, 1), (2, 4)] {
            let mut ranks: Vec<DataLoader> = (0..dp)
                .map(|r| {
                    DataLoader::new(
                        ds.clone(),
                        LoaderConfig::single(8, micro).with_rank(r, dp),
                        seed,
                        true,
                    )
                })
                .collect::<Result<_, _>>()
                .expect("ranks");
            for expected in &single {
                let steps: Vec<StepBatch> = ranks.iter_mut().map(DataLoader::next_step).collect();
                let mut windows = BTreeSet::new();
                for s in &steps {
                    assert_eq!(
                        (s.epoch, s.step_in_epoch),
                        (expected.epoch, expected.step_in_epoch)
                    );
                    assert_eq!(s.micro_batches.len(), 8 / dp / micro);
                    let local = s.local_batch().expect("local");
                    assert_eq!(local.batch, 8 / dp, "equal-sized slices");
                    for &w in &local.window_ids {
                        assert!(windows.insert(w), "dp {dp}: window {w} on two ranks");
                    }
                }
                let locals: Vec<Batch> = steps
                    .iter()
                    .map(|s| s.local_batch().expect("local"))
                    .collect();
                let union = Batch::concat(&locals).expect("concat");
                assert_eq!(union, expected.local_batch().expect("global"), "dp {dp}");
            }
        }
    }
}
