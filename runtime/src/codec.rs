//! The wire codec for control messages: bincode 2.0.1 behind a small API, so it can be swapped
//! (e.g. for wincode) without touching callers.
//!
//! Decoding is always size-limited: the input may be at most the caller's limit, and bincode's
//! own allocation limit stops a hostile length prefix from reserving more than that. Malformed,
//! truncated or trailing bytes are an error, never a panic.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The most bytes a control message may take; bincode refuses to allocate past it while decoding.
pub const MAX_CONTROL_BYTES: usize = 16 << 20;

type Wire = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_CONTROL_BYTES>,
>;

fn wire() -> Wire {
    bincode::config::standard().with_limit::<MAX_CONTROL_BYTES>()
}

/// What went wrong while encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("malformed message: {trailing} trailing bytes after a {used}-byte value")]
    Trailing { used: usize, trailing: usize },
}

/// Encode a control message.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, wire())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_CONTROL_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: MAX_CONTROL_BYTES,
        });
    }
    Ok(bytes)
}

/// Decode a control message of at most `limit` bytes (capped at [`MAX_CONTROL_BYTES`]).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    let limit = limit.min(MAX_CONTROL_BYTES);
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, wire())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing {
            used,
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Control {
        Heartbeat { rank: u32, step: u64 },
        Failed { rank: u32, why: String },
        Shapes(Vec<Vec<u64>>),
    }

    #[test]
    fn round_trip() {
        let m = Control::Failed {
            rank: 3,
            why: "nan loss".into(),
        };
        let b = encode(&m).expect("encode");
        assert_eq!(decode::<Control>(&b, 1024).expect("decode"), m);
    }

    #[test]
    fn refuses_oversized_trailing_and_truncated() {
        let b = encode(&Control::Heartbeat { rank: 1, step: 9 }).expect("encode");
        assert!(matches!(
            decode::<Control>(&b, 2),
            Err(CodecError::TooLarge { .. })
        ));
        let mut extra = b.clone();
        extra.push(0);
        assert!(matches!(
            decode::<Control>(&extra, 64),
            Err(CodecError::Trailing { .. })
        ));
        assert!(decode::<Control>(&b[..b.len() - 1], 64).is_err());
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        // Variant 2 (Shapes), then a varint length of u64::MAX elements.
        let bytes = [2u8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode::<Control>(&bytes, 64).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Control>(&bytes, 4096);
        }
    }
}
