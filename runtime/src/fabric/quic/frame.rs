//! Wire frames of the QUIC fabric: a fixed 56-byte versioned header, then the body.
//!
//! Header layout (little-endian):
//!
//! | bytes  | field                                                           |
//! | ------ | --------------------------------------------------------------- |
//! | 0..4   | magic `FLQF`                                                    |
//! | 4      | version (2)                                                     |
//! | 5      | kind: 1 hello, 2 data (a whole message), 3 piece (of a striped message) |
//! | 6      | payload dtype: 1 f32, 2 bf16, 3 bytes, 4 tensor                 |
//! | 7      | flags (0)                                                       |
//! | 8..12  | source rank (u32)                                               |
//! | 12..16 | tag channel (u32)                                               |
//! | 16..24 | tag (u64)                                                       |
//! | 24..32 | body length of this frame in bytes (u64)                        |
//! | 32..40 | message length in bytes (u64; equals the body length but for pieces) |
//! | 40..48 | piece: byte offset of this body in the message (u64; else 0)    |
//! | 48..56 | piece: the sender's striped-message sequence number (u64; else 0) |
//!
//! A hello's `channel` is the index of the connection it opens and its `total` the number of
//! connections per pair of ranks; its `tag` is the job's world size. Bodies are the elements in
//! little-endian order, so on little-endian hosts a `Vec<f32>` goes on the wire as it lies in
//! memory ([`payload_bytes`]) and arrives straight into a typed buffer ([`payload_bytes_mut`]).
//!
//! A tensor's body is its metadata count (u64), the metadata (u64 each), then its f32 values; it
//! is assembled as bytes and parsed once whole ([`finish_payload`]). A shape-only tensor (the
//! simulated device's) has no values to send: [`tensor_body`] refuses it.
//!
//! Decoding never panics: every malformed or truncated input is a [`FrameError`].

use bytes::Bytes;

use crate::fabric::{Payload, Rank, Tag, TensorMsg, Values};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLQF";
/// Version of this wire format.
pub const VERSION: u8 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 56;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first frame on a new connection, both ways: the sender's rank, `tag.tag` = world,
    /// `tag.channel` = connection index, `total` = connections per pair.
    Hello = 1,
    /// A whole message.
    Data = 2,
    /// One piece of a message striped over several lanes.
    Piece = 3,
}

/// Element type of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32 = 1,
    Bf16 = 2,
    Bytes = 3,
    Tensor = 4,
}

impl Dtype {
    /// Bytes per element.
    pub fn elem_bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::Bytes | Dtype::Tensor => 1,
        }
    }

    /// The dtype of `p`.
    pub fn of(p: &Payload) -> Self {
        match p {
            Payload::F32(_) => Dtype::F32,
            Payload::Bf16(_) => Dtype::Bf16,
            Payload::Bytes(_) => Dtype::Bytes,
            Payload::Tensor(_) => Dtype::Tensor,
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
    /// Body length of this frame in bytes.
    pub len: u64,
    /// Length of the whole message in bytes (`len` but for pieces).
    pub total: u64,
    /// A piece's byte offset in its message.
    pub offset: u64,
    /// A piece's striped-message sequence number (per sender and receiver).
    pub seq: u64,
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
    #[error("piece of {len} bytes at offset {offset} does not fit a message of {total} bytes")]
    BadPiece { len: u64, offset: u64, total: u64 },
    #[error("truncated frame: {got} of {need} bytes")]
    Truncated { need: u64, got: u64 },
    #[error("malformed tensor body: {0}")]
    BadTensor(String),
}

impl Header {
    /// A data header for a whole `payload` (not a tensor, whose body is longer than its
    /// [`Payload::byte_len`]: use [`Header::body`] with the serialized length).
    pub fn data(src: Rank, tag: Tag, payload: &Payload) -> Self {
        Self::body(src, tag, Dtype::of(payload), payload.byte_len() as u64)
    }

    /// A data header for a whole body of `len` bytes of `dtype`.
    pub fn body(src: Rank, tag: Tag, dtype: Dtype, len: u64) -> Self {
        Self {
            kind: Kind::Data,
            dtype,
            src,
            tag,
            len,
            total: len,
            offset: 0,
            seq: 0,
        }
    }

    /// The header of the piece `offset..offset + len` of striped message `seq` (of `total`
    /// bytes).
    pub fn piece(whole: &Header, seq: u64, offset: u64, len: u64) -> Self {
        Self {
            kind: Kind::Piece,
            len,
            offset,
            seq,
            ..*whole
        }
    }

    /// A hello from `src` in a job of `world` ranks, opening connection `index` of `count`.
    pub fn hello(src: Rank, world: usize, index: u32, count: u32) -> Self {
        Self {
            kind: Kind::Hello,
            dtype: Dtype::Bytes,
            src,
            tag: Tag::new(index, world as u64),
            len: 0,
            total: u64::from(count),
            offset: 0,
            seq: 0,
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
        b[32..40].copy_from_slice(&self.total.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Parse and check a header; messages over `max_body` bytes are refused, and a piece must
    /// lie inside its message.
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
            3 => Kind::Piece,
            k => return Err(FrameError::BadKind(k)),
        };
        let dtype = match b[6] {
            1 => Dtype::F32,
            2 => Dtype::Bf16,
            3 => Dtype::Bytes,
            4 => Dtype::Tensor,
            d => return Err(FrameError::BadDtype(d)),
        };
        if b[7] != 0 {
            return Err(FrameError::BadFlags(b[7]));
        }
        let src_raw = u32_at(8);
        let src = Rank::try_from(src_raw).map_err(|_| FrameError::BadRank(src_raw))?;
        let tag = Tag::new(u32_at(12), u64_at(16));
        let (len, total, offset, seq) = (u64_at(24), u64_at(32), u64_at(40), u64_at(48));
        let h = Self {
            kind,
            dtype,
            src,
            tag,
            len,
            total,
            offset,
            seq,
        };
        if kind == Kind::Hello {
            // A hello carries no body; `total` is the connection count.
            return if len == 0 {
                Ok(h)
            } else {
                Err(FrameError::TooLarge { len, max: 0 })
            };
        }
        for n in [len, total] {
            if n > max_body {
                return Err(FrameError::TooLarge {
                    len: n,
                    max: max_body,
                });
            }
        }
        for n in [len, total, offset] {
            if !n.is_multiple_of(dtype.elem_bytes()) {
                return Err(FrameError::Misaligned { len: n, dtype });
            }
        }
        let fits = match kind {
            Kind::Piece => offset.checked_add(len).is_some_and(|end| end <= total),
            _ => total == len && offset == 0 && seq == 0,
        };
        if !fits {
            return Err(FrameError::BadPiece { len, offset, total });
        }
        Ok(h)
    }
}

/// Buffers from this size up are backed by transparent huge pages where the OS offers them.
const HUGE_FROM: usize = 4 << 20;

/// A zeroed payload of `dtype` holding `len` bytes (`len` a multiple of the element size).
///
/// Large buffers are fresh memory that the copy from the wire faults in page by page; with
/// 4 KiB pages that costs about as much CPU as the copy, so they ask for huge pages first.
pub fn alloc_payload(dtype: Dtype, len: usize) -> Payload {
    let mut p = match dtype {
        Dtype::F32 => Payload::F32(vec![0.0; len / 4]),
        Dtype::Bf16 => Payload::Bf16(vec![0; len / 2]),
        // A tensor is assembled as bytes and parsed by `finish_payload`.
        Dtype::Bytes | Dtype::Tensor => Payload::Bytes(vec![0; len]),
    };
    if len >= HUGE_FROM {
        advise_huge_pages(payload_bytes_mut(&mut p));
    }
    p
}

/// Ask the kernel to back `buf` with transparent huge pages (best effort; Linux only).
#[cfg(target_os = "linux")]
fn advise_huge_pages(buf: &mut [u8]) {
    const PAGE: usize = 4096;
    let start = buf.as_mut_ptr() as usize;
    let aligned = start.next_multiple_of(PAGE);
    let end = start + buf.len();
    if end <= aligned {
        return;
    }
    let len = (end - aligned) / PAGE * PAGE;
    // SAFETY: the range lies inside `buf`, which we borrow mutably, and MADV_HUGEPAGE only
    // changes how the kernel backs those pages, never their contents.
    let r = unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::trace!("madvise(MADV_HUGEPAGE) refused; using small pages");
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_buf: &mut [u8]) {}

/// The payload's memory as bytes, to be filled with little-endian wire bytes (call
/// [`finish_payload`] when it is full). Only buffers made by [`alloc_payload`] (never a
/// tensor: those are assembled as bytes) are filled this way.
pub fn payload_bytes_mut(p: &mut Payload) -> &mut [u8] {
    match p {
        Payload::F32(v) => bytemuck::cast_slice_mut(v.as_mut_slice()),
        Payload::Bf16(v) => bytemuck::cast_slice_mut(v.as_mut_slice()),
        Payload::Bytes(v) => v.as_mut_slice(),
        Payload::Tensor(_) => &mut [],
    }
}

/// Turn a payload of `dtype` filled by [`payload_bytes_mut`] into what was sent: elements from
/// wire order into host order (a no-op on little-endian hosts), a tensor parsed from its bytes.
pub fn finish_payload(dtype: Dtype, p: Payload) -> Result<Payload, FrameError> {
    match (dtype, p) {
        (Dtype::Tensor, Payload::Bytes(b)) => parse_tensor(&b).map(Payload::Tensor),
        (_, Payload::F32(mut v)) if cfg!(target_endian = "big") => {
            v.iter_mut()
                .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
            Ok(Payload::F32(v))
        }
        (_, Payload::Bf16(mut v)) if cfg!(target_endian = "big") => {
            v.iter_mut().for_each(|x| *x = u16::from_le(*x));
            Ok(Payload::Bf16(v))
        }
        (_, p) => Ok(p),
    }
}

/// A tensor's body bytes: metadata count, metadata, values (all little-endian). A shape-only
/// tensor has no values to send.
pub fn tensor_body(t: &TensorMsg) -> Result<Vec<u8>, FrameError> {
    let v = match &t.values {
        Values::F32(v) => v,
        Values::Absent { .. } => {
            return Err(FrameError::BadTensor(
                "a shape-only tensor (the simulated device's) has no values to send".into(),
            ));
        }
        Values::Local { .. } => {
            return Err(FrameError::BadTensor(
                "an in-process value (a device tensor for this rank) cannot cross the network"
                    .into(),
            ));
        }
    };
    let mut out = Vec::with_capacity(8 + t.meta.len() * 8 + v.len() * 4);
    out.extend_from_slice(&(t.meta.len() as u64).to_le_bytes());
    for m in &t.meta {
        out.extend_from_slice(&m.to_le_bytes());
    }
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// The inverse of [`tensor_body`].
fn parse_tensor(b: &[u8]) -> Result<TensorMsg, FrameError> {
    let bad = |why: String| FrameError::BadTensor(why);
    let (head, rest) = b
        .split_first_chunk::<8>()
        .ok_or_else(|| bad(format!("{} bytes hold no metadata count", b.len())))?;
    let n = u64::from_le_bytes(*head);
    let meta_bytes = n
        .checked_mul(8)
        .filter(|&m| m <= rest.len() as u64)
        .ok_or_else(|| bad(format!("{n} metadata words in {} bytes", rest.len())))?;
    let (meta, values) = rest.split_at(meta_bytes as usize);
    if !values.len().is_multiple_of(4) {
        return Err(bad(format!(
            "{} value bytes are not whole f32s",
            values.len()
        )));
    }
    Ok(TensorMsg {
        meta: meta
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        values: Values::F32(
            values
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect(),
        ),
    })
}

/// A payload's memory viewed as bytes (keeps the buffer alive inside a [`Bytes`]).
struct WireBody(Payload);

impl AsRef<[u8]> for WireBody {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Payload::F32(v) => bytemuck::cast_slice(v.as_slice()),
            Payload::Bf16(v) => bytemuck::cast_slice(v.as_slice()),
            Payload::Bytes(v) => v.as_slice(),
            // Tensors are turned into bytes by `payload_bytes` before they get here.
            Payload::Tensor(_) => &[],
        }
    }
}

/// A payload's body bytes (little-endian elements). On little-endian hosts no byte of an f32,
/// bf16 or bytes payload is copied: the returned [`Bytes`] owns the payload's buffer. A tensor
/// is serialized ([`tensor_body`]); a shape-only one is an error.
pub fn payload_bytes(payload: Payload) -> Result<Bytes, FrameError> {
    Ok(match payload {
        Payload::Bytes(v) => Bytes::from(v),
        Payload::Tensor(t) => Bytes::from(tensor_body(&t)?),
        p if cfg!(target_endian = "little") => Bytes::from_owner(WireBody(p)),
        Payload::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Payload::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

/// The payload of a whole body of `dtype`.
pub fn decode_body(dtype: Dtype, body: &[u8]) -> Result<Payload, FrameError> {
    let len = body.len() as u64;
    if !len.is_multiple_of(dtype.elem_bytes()) {
        return Err(FrameError::Misaligned { len, dtype });
    }
    let mut p = alloc_payload(dtype, body.len());
    payload_bytes_mut(&mut p).copy_from_slice(body);
    finish_payload(dtype, p)
}

/// One whole frame as bytes (header then body).
pub fn encode_frame(src: Rank, tag: Tag, payload: Payload) -> Result<Vec<u8>, FrameError> {
    let dtype = Dtype::of(&payload);
    let body = payload_bytes(payload)?;
    let h = Header::body(src, tag, dtype, body.len() as u64);
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode one whole-message frame from the front of `buf`: the header, the payload and the
/// bytes used.
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
    let payload = decode_body(h.dtype, &rest[..n])?;
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
            (
                proptest::collection::vec(any::<u64>(), 0..8),
                proptest::collection::vec(
                    any::<f32>().prop_filter("NaN != NaN", |x| !x.is_nan()),
                    0..64
                ),
            )
                .prop_map(|(meta, v)| Payload::Tensor(TensorMsg {
                    meta,
                    values: Values::F32(v),
                })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128),
                                    keep_magic in any::<bool>(), kind in 0u8..5) {
            let mut bytes = bytes;
            if keep_magic && bytes.len() >= 8 {
                bytes[0..4].copy_from_slice(&MAGIC);
                bytes[4] = VERSION;
                bytes[5] = kind;
            }
            let _ = decode_frame(&bytes, 1 << 20);
            if let Some(Ok(h)) = bytes.first_chunk::<HEADER_LEN>().map(|h| Header::decode(h, 1 << 20)) {
                prop_assert!(h.len <= 1 << 20 && h.total <= 1 << 20);
                prop_assert!(h.kind == Kind::Hello || h.offset + h.len <= h.total);
            }
        }

        #[test]
        fn frames_round_trip_and_truncation_is_an_error(
            p in payload(), src in 0usize..1024, ch in any::<u32>(), t in any::<u64>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let tag = Tag::new(ch, t);
            let bytes = encode_frame(src, tag, p.clone()).expect("a payload with values");
            let (h, got, used) = decode_frame(&bytes, 1 << 20).expect("valid frame");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(h.src, src);
            prop_assert_eq!(h.tag, tag);
            prop_assert_eq!(got, p);
            let cut = cut.index(bytes.len());
            let r = decode_frame(&bytes[..cut], 1 << 20);
            prop_assert!(matches!(r, Err(FrameError::Truncated { .. })), "{:?}", r);
        }

        #[test]
        fn pieces_round_trip_and_must_fit_their_message(
            total in 0u64..4096, offset in 0u64..4096, len in 0u64..4096, seq in any::<u64>(),
        ) {
            let whole = Header::data(3, Tag::new(1, 2), &Payload::Bytes(vec![0; total as usize]));
            let h = Header::piece(&whole, seq, offset, len);
            let r = Header::decode(&h.encode(), 1 << 20);
            if offset + len <= total {
                prop_assert_eq!(r, Ok(h));
            } else {
                prop_assert!(matches!(r, Err(FrameError::BadPiece { .. })), "{:?}", r);
            }
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
        // A data frame whose message length differs from its body is malformed.
        let mut d = Header::data(1, Tag::new(0, 0), &Payload::Bytes(vec![0; 8]));
        d.total = 16;
        assert!(matches!(
            Header::decode(&d.encode(), 100),
            Err(FrameError::BadPiece { .. })
        ));
    }

    #[test]
    fn a_shape_only_tensor_cannot_be_framed_and_bad_tensor_bodies_are_errors() {
        let shape_only = Payload::Tensor(TensorMsg {
            meta: vec![1],
            values: Values::Absent { bytes: 64 },
        });
        assert!(matches!(
            encode_frame(0, Tag::new(0, 0), shape_only),
            Err(FrameError::BadTensor(_))
        ));
        // Nor can a value that only lives in this process (a device tensor for this rank).
        let local = Payload::Tensor(TensorMsg {
            meta: vec![1, 1],
            values: Values::Local {
                bytes: 4,
                value: crate::fabric::LocalValue::new(1.0f32),
            },
        });
        match encode_frame(0, Tag::new(0, 0), local) {
            Err(FrameError::BadTensor(why)) => assert!(why.contains("cannot cross"), "{why}"),
            other => panic!("an in-process value was framed: {other:?}"),
        }
        for body in [
            &[1u8, 2, 3][..],
            &u64::MAX.to_le_bytes()[..],
            &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0][..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][..],
        ] {
            assert!(
                matches!(
                    decode_body(Dtype::Tensor, body),
                    Err(FrameError::BadTensor(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn typed_bodies_are_little_endian_on_the_wire() {
        let b = payload_bytes(Payload::F32(vec![1.0, -2.5])).expect("bytes");
        let mut want = 1.0f32.to_le_bytes().to_vec();
        want.extend_from_slice(&(-2.5f32).to_le_bytes());
        assert_eq!(&b[..], &want[..]);
        assert_eq!(
            decode_body(Dtype::F32, &want),
            Ok(Payload::F32(vec![1.0, -2.5]))
        );
        assert_eq!(
            &payload_bytes(Payload::Bf16(vec![0x3f80])).expect("bytes")[..],
            &[0x80, 0x3f]
        );
    }
}
