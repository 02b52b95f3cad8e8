//! Byte-level tokenizer: every byte is one token (vocabulary of 256 ids, no special tokens).
//!
//! Encoding is total (any byte string, UTF-8 or not, round-trips through [`ByteTokenizer::encode`]
//! and [`ByteTokenizer::decode_bytes`]). Decoding to text is lossy-safe: invalid UTF-8 and ids
//! outside the vocabulary become U+FFFD instead of failing, so that sampling from a model that
//! has a larger vocabulary than 256 can always be printed.

use super::DataError;

/// The vocabulary size of the byte tokenizer.
pub const BYTE_VOCAB_SIZE: u32 = 256;

/// The byte-level tokenizer: token id `b` is byte `b`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// The tokenizer (it has no state).
    #[must_use]
    pub const fn new() -> Self {
        Self
    }

    /// The number of token ids, 256.
    #[must_use]
    pub const fn vocab_size(&self) -> u32 {
        BYTE_VOCAB_SIZE
    }

    /// Token ids of `bytes`: one id per byte.
    #[must_use]
    pub fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        bytes.iter().map(|&b| u32::from(b)).collect()
    }

    /// Token ids of the UTF-8 bytes of `text`.
    #[must_use]
    pub fn encode_str(&self, text: &str) -> Vec<u32> {
        self.encode(text.as_bytes())
    }

    /// The bytes of `ids`, strictly: an id of 256 or more is an error naming its index.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, DataError> {
        ids.iter()
            .enumerate()
            .map(|(index, &token)| {
                u8::try_from(token).map_err(|_| DataError::TokenOutOfRange {
                    origin: "decode".to_owned(),
                    index,
                    offset: index,
                    token,
                    vocab_size: BYTE_VOCAB_SIZE,
                })
            })
            .collect()
    }

    /// The text of `ids`, lossily: invalid UTF-8 sequences and ids of 256 or more each become the
    /// replacement character U+FFFD. Never fails.
    #[must_use]
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::with_capacity(ids.len());
        let mut run: Vec<u8> = Vec::with_capacity(ids.len());
        for &token in ids {
            match u8::try_from(token) {
                Ok(byte) => run.push(byte),
                Err(_) => {
                    out.push_str(&String::from_utf8_lossy(&run));
                    run.clear();
                    out.push(char::REPLACEMENT_CHARACTER);
                }
            }
        }
        out.push_str(&String::from_utf8_lossy(&run));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        let tok = ByteTokenizer::new();
        let bytes: Vec<u8> = (0..=255).collect();
        let ids = tok.encode(&bytes);
        assert_eq!(ids, (0..256).collect::<Vec<u32>>());
        assert_eq!(tok.decode_bytes(&ids).ok(), Some(bytes));
        assert_eq!(tok.vocab_size(), 256);
    }

    #[test]
    fn round_trips_utf8_text() {
        let tok = ByteTokenizer::new();
        let text = "In the beginning — Καὶ εἶπεν ὁ θεός 🌍";
        let ids = tok.encode_str(text);
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids), text);
    }

    #[test]
    fn lossy_decode_replaces_bad_input() {
        let tok = ByteTokenizer::new();
        // "a", an id outside the vocabulary, "b", a lone continuation byte, "c".
        let ids = [97, 300, 98, 0x80, 99];
        assert_eq!(tok.decode(&ids), "a\u{FFFD}b\u{FFFD}c");
        // A multi-byte character split by an out-of-range id is not glued back together.
        let euro = "€".as_bytes();
        let ids = [
            u32::from(euro[0]),
            999,
            u32::from(euro[1]),
            u32::from(euro[2]),
        ];
        assert!(tok.decode(&ids).chars().all(|c| c == '\u{FFFD}'));
        assert_eq!(tok.decode(&[]), "");
    }

    #[test]
    fn strict_decode_names_the_bad_index() {
        let tok = ByteTokenizer::new();
        let err = tok.decode_bytes(&[1, 2, 256]).err().map(|e| e.to_string());
        let msg = err.unwrap_or_default();
        assert!(msg.contains("token 2"), "{msg}");
        assert!(msg.contains("256"), "{msg}");
    }
}
