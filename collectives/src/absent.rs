//! Shape-only elements: [`Absent`], a zero-sized element type, so that the generic algorithms run
//! unchanged on buffers that have a length and no values (`Vec<Absent>` never allocates), and
//! its wire form, `Payload::Tensor` with `Values::Absent`, whose sizes are counted as f32 (the
//! encoding is described in [`crate::shape_only`]).

use flotilla_runtime::fabric::{Payload, TensorMsg, Values};

use crate::ReduceOp;
use crate::elem::{Elem, Pool, Unframed};

/// A shape-only element: no value, no size in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Absent;

/// Bytes of the f32 frame trailer (three f32 elements).
const F32_TRAILER_BYTES: u64 = 12;

/// Bytes of `len` f32 elements.
fn f32_bytes(len: usize) -> u64 {
    (len as u64).saturating_mul(4)
}

/// A shape-only buffer of `len` elements, in O(log len) steps (nothing is allocated).
pub(crate) fn absent(len: usize) -> Vec<Absent> {
    let mut v = Vec::new();
    Absent::resize(&mut v, len);
    v
}

/// A shape-only payload of `bytes` bytes with metadata `meta`.
fn tensor(meta: Vec<u64>, bytes: u64) -> Payload {
    Payload::Tensor(TensorMsg {
        meta,
        values: Values::Absent { bytes },
    })
}

/// The length (in f32 elements) that `bytes` stand for, when they are whole elements.
fn elements(bytes: u64) -> Option<usize> {
    if bytes.is_multiple_of(4) {
        usize::try_from(bytes / 4).ok()
    } else {
        None
    }
}

impl Elem for Absent {
    const NAME: &'static str = "shape-only";
    const TRAILER: usize = 0;
    const HAS_VALUES: bool = false;

    fn wrap(v: Vec<Self>) -> Payload {
        tensor(Vec::new(), f32_bytes(v.len()))
    }

    fn unwrap(p: Payload) -> Result<Vec<Self>, Payload> {
        match &p {
            Payload::Tensor(TensorMsg {
                meta,
                values: Values::Absent { bytes },
            }) if meta.is_empty() => elements(*bytes).map(absent).ok_or(p),
            _ => Err(p),
        }
    }

    fn frame(v: Vec<Self>, kind: u32, total: u64) -> Payload {
        let f32_frame = f32_bytes(v.len()).saturating_add(F32_TRAILER_BYTES);
        let meta = if total <= u64::from(u32::MAX) {
            vec![u64::from(kind) | total << 32]
        } else {
            vec![u64::from(kind), total, v.len() as u64]
        };
        let bytes = f32_frame.saturating_sub(8 * meta.len() as u64);
        tensor(meta, bytes)
    }

    fn unframe(p: Payload) -> Unframed<Self> {
        let (meta, bytes) = match p {
            Payload::Tensor(TensorMsg {
                meta,
                values: Values::Absent { bytes },
            }) => (meta, bytes),
            Payload::Tensor(_) => {
                return Unframed::Malformed(
                    "an f32 tensor where a shape-only frame was expected".into(),
                );
            }
            other => return Unframed::Other(other),
        };
        let malformed = || {
            Unframed::Malformed(format!(
                "a shape-only frame of {bytes} bytes with metadata {meta:?}"
            ))
        };
        // The f32 frame that the message stands for.
        let stands_for = bytes.saturating_add(8 * meta.len() as u64);
        let (kind, total, len) = match meta[..] {
            [word] => match stands_for.checked_sub(F32_TRAILER_BYTES).and_then(elements) {
                Some(len) => (word as u32, word >> 32, len),
                None => return malformed(),
            },
            [kind, total, len] => {
                let expect = len
                    .saturating_mul(4)
                    .saturating_add(F32_TRAILER_BYTES)
                    .saturating_sub(8 * meta.len() as u64);
                match (u32::try_from(kind), usize::try_from(len)) {
                    (Ok(kind), Ok(len)) if bytes == expect => (kind, total, len),
                    _ => return malformed(),
                }
            }
            _ => return malformed(),
        };
        Unframed::Frame {
            data: absent(len),
            kind,
            total,
        }
    }

    fn combine(_: ReduceOp, _: &mut [Self], _: &[Self]) {}

    fn finish(_: ReduceOp, _: &mut [Self], _: usize) {}

    fn spares(p: &mut Pool) -> &mut Vec<Vec<Self>> {
        &mut p.absent
    }

    /// By doubling: `Vec::resize` would write the elements one by one.
    fn resize(v: &mut Vec<Self>, len: usize) {
        if len <= v.len() {
            v.truncate(len);
            return;
        }
        if v.is_empty() {
            v.push(Absent);
        }
        while v.len() < len {
            let more = v.len().min(len - v.len());
            v.extend_from_within(..more);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame;

    fn unframe(p: Payload) -> (usize, u32, u64) {
        match Absent::unframe(p) {
            Unframed::Frame { data, kind, total } => (data.len(), kind, total),
            Unframed::Malformed(why) => panic!("malformed: {why}"),
            Unframed::Other(p) => panic!("not shape-only: {p:?}"),
        }
    }

    #[test]
    fn frames_weigh_what_f32_frames_weigh_and_round_trip() {
        let big = 1usize << 33;
        for (len, total) in [
            (0, 0),
            (0, 1),
            (1, 1),
            (7, 29),
            (1 << 20, 1 << 22),
            (1_000_000_000, 1_000_000_000),
            (3, big),
            (big / 8, big),
            (big, big),
        ] {
            let kind = 0x00ab_cd05;
            let (header, body) = frame(absent(len), kind, total);
            assert!(header.is_none(), "one message, however large");
            if len < 1 << 20 {
                let (_, f) = frame(vec![0.0f32; len], kind, total);
                assert_eq!(body.byte_len(), f.byte_len(), "len {len}");
            }
            assert_eq!(body.byte_len() as u64, 4 * len as u64 + 12, "len {len}");
            assert_eq!(unframe(body), (len, kind, total as u64));
        }
    }

    #[test]
    fn raw_buffers_weigh_what_f32_buffers_weigh() {
        for len in [0, 1, 5, 1 << 40] {
            let p = Absent::wrap(absent(len));
            assert_eq!(p.byte_len() as u64, 4 * len as u64);
            assert_eq!(Absent::unwrap(p).map(|v| v.len()), Ok(len));
        }
        assert!(Absent::unwrap(Payload::F32(vec![1.0])).is_err());
        assert!(Absent::unwrap(tensor(vec![1], 4)).is_err());
        assert!(Absent::unwrap(tensor(Vec::new(), 3)).is_err());
    }

    #[test]
    fn malformed_frames_are_refused() {
        let bad = [
            tensor(Vec::new(), 16),
            tensor(vec![7], 2),
            tensor(vec![7], 9),
            tensor(vec![7, 8], 16),
            tensor(vec![7, 1 << 40, 10], 4),
            tensor(vec![1 << 40, 1 << 40, 10], 28),
            Payload::Tensor(TensorMsg {
                meta: vec![7],
                values: Values::F32(vec![1.0]),
            }),
        ];
        for p in bad {
            assert!(
                matches!(Absent::unframe(p.clone()), Unframed::Malformed(_)),
                "{p:?}"
            );
        }
        assert!(matches!(
            Absent::unframe(Payload::F32(vec![0.0; 3])),
            Unframed::Other(Payload::F32(_))
        ));
        assert!(matches!(
            f32::unframe(Absent::frame(absent(4), 1, 4)),
            Unframed::Other(Payload::Tensor(_))
        ));
    }

    #[test]
    fn huge_buffers_cost_nothing() {
        let start = std::time::Instant::now();
        let mut v = absent(usize::MAX / 2);
        assert_eq!(v.len(), usize::MAX / 2);
        Absent::resize(&mut v, 3);
        assert_eq!(v, [Absent; 3]);
        let w = v.split_off(1);
        assert_eq!((v.len(), w.len()), (1, 2));
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
    }
}
