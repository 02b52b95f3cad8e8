//! The built-in corpus: Genesis and Exodus of the King James Bible (public domain), embedded.
//!
//! `flotilla train` with no data configured trains on this text, so that the default run needs
//! no files and no network. It is real English prose (374,733 bytes of 7-bit ASCII), which a
//! byte-level language model learns quickly: spelling, frequent words and the verse layout.
//! The file lives at `model/data/kjv_genesis_exodus.txt`; `model/data/README.md` records its
//! source (the Debian package `bible-kjv-text` 4.38), how it was extracted, and its licence
//! (public domain: the translation dates from 1611).

use super::tokenizer::ByteTokenizer;

/// The built-in corpus's bytes.
pub static BUILTIN_CORPUS: &[u8] = include_bytes!("../../data/kjv_genesis_exodus.txt");

/// A short name for the built-in corpus (used in metrics and run summaries).
pub const BUILTIN_CORPUS_NAME: &str = "kjv-genesis-exodus";

/// Where the built-in corpus comes from and under which terms.
pub const BUILTIN_CORPUS_SOURCE: &str = "King James Version of the Bible (1611), books of Genesis \
     and Exodus, as shipped in the Debian package bible-kjv-text 4.38; public domain";

/// SHA-256 of [`BUILTIN_CORPUS`], hex-encoded (checked by a test, quotable in run summaries).
pub const BUILTIN_CORPUS_SHA256: &str =
    "0ddf6b5e965d5c7ef84731d7a094226199f6bf411083d11edaecd626cb7dc7da";

/// The built-in corpus's bytes.
#[must_use]
pub fn builtin_corpus() -> &'static [u8] {
    BUILTIN_CORPUS
}

/// The built-in corpus tokenized by the byte tokenizer (one token per byte).
#[must_use]
pub fn builtin_corpus_tokens() -> Vec<u32> {
    ByteTokenizer::new().encode(BUILTIN_CORPUS)
}

/// `n` tokens drawn uniformly from `0..vocab` by a generator seeded with `seed` (text does not
/// matter where only shapes do: the simulated cluster, benchmarks).
#[must_use]
pub fn synthetic_tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut rng = super::rng::SplitMix64::new(seed);
    let vocab = u64::from(vocab.max(1));
    (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()
}

/// Splits `tokens` into a training part and a held-out tail of `round(len × holdout_fraction)`
/// tokens (the fraction is clamped to `[0, 1]`; NaN counts as 0). The tail is contiguous so that
/// no held-out window overlaps a training window.
#[must_use]
pub fn split_holdout(tokens: &[u32], holdout_fraction: f64) -> (&[u32], &[u32]) {
    let fraction = if holdout_fraction.is_nan() {
        0.0
    } else {
        holdout_fraction.clamp(0.0, 1.0)
    };
    let held = ((tokens.len() as f64) * fraction).round() as usize;
    tokens.split_at(tokens.len() - held.min(tokens.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn corpus_is_the_documented_file() {
        let digest = Sha256::digest(BUILTIN_CORPUS);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, BUILTIN_CORPUS_SHA256);
        assert_eq!(builtin_corpus().len(), 374_733);
        assert!((100 * 1024..1024 * 1024).contains(&builtin_corpus().len()));
        assert!(BUILTIN_CORPUS.is_ascii());
        assert!(BUILTIN_CORPUS.starts_with(b"Genesis 1\n\n1 In the beginning God created"));
    }

    #[test]
    fn tokens_are_bytes() {
        let tokens = builtin_corpus_tokens();
        assert_eq!(tokens.len(), BUILTIN_CORPUS.len());
        assert!(tokens.iter().all(|&t| t < 128));
        assert_eq!(ByteTokenizer::new().decode(&tokens[..9]), "Genesis 1");
    }

    #[test]
    fn holdout_split_is_a_contiguous_tail() {
        let tokens: Vec<u32> = (0..100).collect();
        let (train, held) = split_holdout(&tokens, 0.1);
        assert_eq!(train.len(), 90);
        assert_eq!(held, &tokens[90..]);
        assert_eq!(split_holdout(&tokens, 0.0).1.len(), 0);
        assert_eq!(split_holdout(&tokens, 2.0).0.len(), 0);
        assert_eq!(split_holdout(&tokens, f64::NAN).1.len(), 0);
        assert_eq!(split_holdout(&[], 0.5), (&[][..], &[][..]));
    }
}
