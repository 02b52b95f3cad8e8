//! Wire frames of the QUIC fabric: a fixed 32-byte versioned header, then the body.
//!
//! Header layout (little-endian):
//!
//! | bytes  | field                                   |
//! | ------ | --------------------------------------- |
//! | 0..4   | magic `FLQF`                            |
//! | 4      | version (1)                             |
//! | 5      | kind: 1 hello, 2 data                   |
//! | 6      | payload dtype: 1 f32, 2 bf16, 3 bytes   |
//! | 7      | flags (0)                               |
//! | 8..12  | source rank (u32)                       |
//! | 12..16 | tag channel (u32)                       |
//! | 16..24 | tag (u64)                               |
//! | 24..32 | body length in bytes (u64)              |
//!
//! Decoding never panics: every malformed or truncated input is a [`FrameError`].

use crate::fabric::{Payload, Rank, Tag};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLQF";
/// Version of this wire format.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 32;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first frame on a new connection, both ways: the sender's rank, `tag.tag` = world.
    Hello = 1,
    /// A message.
    Data = 2,
}

/// Element type of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32 = 1,
    Bf16 = 2,
    Bytes = 3,
}

impl Dtype {
    /// Bytes per element.
    pub fn elem_bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::Bytes => 1,
        }
    }

    fn of(p: &Payload) -> Self {
        match p {
            Payload::F32(_) => Dtype::F32,
            Payload::Bf16(_) => Dtype::Bf16,
            Payload::Bytes(_) => Dtype::Bytes,
        }
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub dtype: Dtype,
    pub src: Rank,
    pub tag: Tag,
    /// Body length in bytes.
    pub len: u64,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("unknown payload dtype {0}")]
    BadDtype(u8),
    #[error("unknown frame flags {0:#x}")]
    BadFlags(u8),
    #[error("source rank {0} does not fit a rank")]
    BadRank(u32),
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("body of {len} bytes is not a whole number of {dtype:?} elements")]
    Misaligned { len: u64, dtype: Dtype },
    #[error("truncated frame: {got} of {need} bytes")]
    Truncated { need: u64, got: u64 },
}

impl Header {
    /// A data header for `payload`.
    pub fn data(src: Rank, tag: Tag, payload: &Payload) -> Self {
        Self {
            kind: Kind::Data,
            dtype: Dtype::of(payload),
            src,
            tag,
            len: payload.byte_len() as u64,
        }
    }

    /// A hello header from `src` in a job of `world` ranks.
    pub fn hello(src: Rank, world: usize) -> Self {
        Self {
            kind: Kind::Hello,
            dtype: Dtype::Bytes,
            src,
            tag: Tag::new(0, world as u64),
            len: 0,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[6] = self.dtype as u8;
        b[7] = 0;
        // Ranks beyond u32 cannot be framed; the fabric refuses such worlds at bind.
        b[8..12].copy_from_slice(&(self.src as u32).to_le_bytes());
        b[12..16].copy_from_slice(&self.tag.channel.to_le_bytes());
        b[16..24].copy_from_slice(&self.tag.tag.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parse and check a header; bodies over `max_body` bytes are refused.
    pub fn decode(b: &[u8; HEADER_LEN], max_body: u64) -> Result<Self, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        let kind = match b[5] {
            1 => Kind::Hello,
            2 => Kind::Data,
            k => return Err(FrameError::BadKind(k)),
        };
        let dtype = match b[6] {
            1 => Dtype::F32,
            2 => Dtype::Bf16,
            3 => Dtype::Bytes,
            d => return Err(FrameError::BadDtype(d)),
        };
        if b[7] != 0 {
            return Err(FrameError::BadFlags(b[7]));
        }
        let src_raw = u32_at(8);
        let src = Rank::try_from(src_raw).map_err(|_| FrameError::BadRank(src_raw))?;
        let tag = Tag::new(u32_at(12), u64_at(16));
        let len = u64_at(24);
        if len > max_body {
            return Err(FrameError::TooLarge { len, max: max_body });
        }
        if !len.is_multiple_of(dtype.elem_bytes()) {
            return Err(FrameError::Misaligned { len, dtype });
        }
        Ok(Self {
            kind,
            dtype,
            src,
            tag,
            len,
        })
    }
}

/// A payload's body bytes (little-endian elements). Bytes payloads move without a copy.
pub fn encode_body(payload: Payload) -> Vec<u8> {
    match payload {
        Payload::Bytes(v) => v,
        Payload::F32(v) => {
            let mut out = vec![0u8; v.len() * 4];
            for (c, x) in out.as_chunks_mut::<4>().0.iter_mut().zip(&v) {
                *c = x.to_le_bytes();
            }
            out
        }
        Payload::Bf16(v) => {
            let mut out = vec![0u8; v.len() * 2];
            for (c, x) in out.as_chunks_mut::<2>().0.iter_mut().zip(&v) {
                *c = x.to_le_bytes();
            }
            out
        }
    }
}

/// The payload of a body of `dtype`. Bytes bodies move without a copy.
pub fn decode_body(dtype: Dtype, body: Vec<u8>) -> Result<Payload, FrameError> {
    let len = body.len() as u64;
    if !len.is_multiple_of(dtype.elem_bytes()) {
        return Err(FrameError::Misaligned { len, dtype });
    }
    Ok(match dtype {
        Dtype::Bytes => Payload::Bytes(body),
        Dtype::F32 => Payload::F32(
            body.as_chunks::<4>()
                .0
                .iter()
                .map(|c| f32::from_le_bytes(*c))
                .collect(),
        ),
        Dtype::Bf16 => Payload::Bf16(
            body.as_chunks::<2>()
                .0
                .iter()
                .map(|c| u16::from_le_bytes(*c))
                .collect(),
        ),
    })
}

/// One whole frame as bytes (header then body).
pub fn encode_frame(src: Rank, tag: Tag, payload: Payload) -> Vec<u8> {
    let h = Header::data(src, tag, &payload);
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&encode_body(payload));
    out
}

/// Decode one frame from the front of `buf`: the header, the payload and the bytes used.
pub fn decode_frame(buf: &[u8], max_body: u64) -> Result<(Header, Payload, usize), FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            need: HEADER_LEN as u64,
            got: buf.len() as u64,
        });
    };
    let h = Header::decode(head, max_body)?;
    let rest = &buf[HEADER_LEN..];
    let need = h.len;
    if (rest.len() as u64) < need {
        return Err(FrameError::Truncated {
            need: HEADER_LEN as u64 + need,
            got: buf.len() as u64,
        });
    }
    // `need <= rest.len()`, so it fits a usize.
    let n = need as usize;
    let payload = decode_body(h.dtype, rest[..n].to_vec())?;
    Ok((h, payload, HEADER_LEN + n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload() -> impl Strategy<Value = Payload> {
        prop_oneof![
            proptest::collection::vec(any::<f32>().prop_filter("nan", |x| !x.is_nan()), 0..64)
                .prop_map(Payload::F32),
            proptest::collection::vec(any::<u16>(), 0..64).prop_map(Payload::Bf16),
            proptest::collection::vec(any::<u8>(), 0..256).prop_map(Payload::Bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128),
                                    keep_magic in any::<bool>()) {
            let mut bytes = bytes;
            if keep_magic && bytes.len() >= 8 {
                bytes[0..4].copy_from_slice(&MAGIC);
                bytes[4] = VERSION;
            }
            let _ = decode_frame(&bytes, 1 << 20);
        }

        #[test]
        fn frames_round_trip_and_truncation_is_an_error(
            p in payload(), src in 0usize..1024, ch in any::<u32>(), t in any::<u64>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let tag = Tag::new(ch, t);
            let bytes = encode_frame(src, tag, p.clone());
            let (h, got, used) = decode_frame(&bytes, 1 << 20).expect("valid frame");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(h.src, src);
            prop_assert_eq!(h.tag, tag);
            prop_assert_eq!(got, p);
            let cut = cut.index(bytes.len());
            let r = decode_frame(&bytes[..cut], 1 << 20);
            prop_assert!(matches!(r, Err(FrameError::Truncated { .. })), "{:?}", r);
        }
    }

    #[test]
    fn oversized_and_misaligned_headers_are_refused() {
        let mut h = Header::data(1, Tag::new(0, 0), &Payload::Bytes(vec![0; 10])).encode();
        assert_eq!(
            Header::decode(&h, 9),
            Err(FrameError::TooLarge { len: 10, max: 9 })
        );
        h[6] = Dtype::F32 as u8;
        assert!(matches!(
            Header::decode(&h, 100),
            Err(FrameError::Misaligned { len: 10, .. })
        ));
        h[0] = b'X';
        assert!(matches!(
            Header::decode(&h, 100),
            Err(FrameError::BadMagic(_))
        ));
    }
}
