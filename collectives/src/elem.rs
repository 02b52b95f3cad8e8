//! Element types the collectives move: `f32`, bf16 as raw bits (`u16`) and shape-only elements
//! (see [`crate::shape_only`]), with their fabric payloads, frame trailers, reductions, and the
//! communicator's pool of spare buffers.
//!
//! bf16 reductions accumulate in f32 and round to nearest-even once per hop: every time a rank
//! folds a received bf16 buffer into its own (ring reduce-scatter step, tree level, star root),
//! the f32 result of `a ∘ b` is rounded back to bf16. The division of `Avg` is done in f32 on the
//! rounded sum and rounded once more. Integers up to 256 in magnitude (and halves, quarters… of
//! small integers) are exact in bf16, so sums of such data are exact whatever the order.

use flotilla_runtime::fabric::Payload;

use crate::ReduceOp;
use crate::absent::Absent;

/// bf16 bits of `x`, rounded to nearest-even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The f32 value of bf16 bits `b` (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A data frame taken apart by [`Elem::unframe`].
pub(crate) enum Unframed<T> {
    /// The buffer and its trailer: the operation's kind and the sender's total length.
    Frame { data: Vec<T>, kind: u32, total: u64 },
    /// A payload of this type that is not a well-formed frame.
    Malformed(String),
    /// A payload of another type, given back.
    Other(Payload),
}

/// An element type of the collectives (implemented for `f32`, for bf16 bits, `u16`, and for
/// shape-only elements, [`crate::absent::Absent`]).
///
/// A data frame carries a trailer (the operation's kind: 32 bits, the sender's total length:
/// 64 bits). Types with values append it to the buffer ([`Elem::TRAILER`] elements, so that a
/// buffer with that much spare room is framed without a copy); shape-only buffers carry it in the
/// payload's metadata instead (`TRAILER` is 0).
pub(crate) trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Name in error messages.
    const NAME: &'static str;
    /// Spare elements a buffer needs to hold its frame trailer (0: the trailer travels beside
    /// the buffer, never in it).
    const TRAILER: usize;
    /// Whether elements hold values (false: shape-only buffers, with nothing to reduce).
    const HAS_VALUES: bool;
    /// The buffer as a payload without a trailer.
    fn wrap(v: Vec<Self>) -> Payload;
    /// The buffer of a payload without a trailer, or the payload back when it holds another
    /// type.
    fn unwrap(p: Payload) -> Result<Vec<Self>, Payload>;
    /// The buffer as a data frame of operation `kind` from a sender of `total` elements.
    fn frame(v: Vec<Self>, kind: u32, total: u64) -> Payload;
    /// A data frame taken apart into its buffer and trailer.
    fn unframe(p: Payload) -> Unframed<Self>;
    /// Fold `other` into `acc` element-wise (`Avg` sums; [`Elem::finish`] divides).
    fn combine(op: ReduceOp, acc: &mut [Self], other: &[Self]);
    /// Turn a fully combined buffer into the result (`Avg`: divide by the group size).
    fn finish(op: ReduceOp, buf: &mut [Self], group: usize);
    /// This type's spare buffers.
    fn spares(p: &mut Pool) -> &mut Vec<Vec<Self>>;
    /// Make `v` `len` elements long (new elements are the default).
    fn resize(v: &mut Vec<Self>, len: usize) {
        v.resize(len, Self::default());
    }
}

/// Frame `v` with the trailer `put` appends, or take such a frame apart: the in-buffer framing
/// of the types with values.
fn frame_in_buffer<T: Elem>(
    mut v: Vec<T>,
    kind: u32,
    total: u64,
    put: fn(&mut Vec<T>, u32, u64),
) -> Payload {
    put(&mut v, kind, total);
    T::wrap(v)
}

/// See [`frame_in_buffer`]: `get` reads `(kind, total)` from the last [`Elem::TRAILER`]
/// elements.
fn unframe_in_buffer<T: Elem>(p: Payload, get: fn(&[T]) -> (u32, u64)) -> Unframed<T> {
    let mut v = match T::unwrap(p) {
        Ok(v) => v,
        Err(other) => return Unframed::Other(other),
    };
    let Some(body) = v.len().checked_sub(T::TRAILER) else {
        return Unframed::Malformed("frame shorter than its trailer".into());
    };
    let (kind, total) = get(&v[body..]);
    v.truncate(body);
    Unframed::Frame {
        data: v,
        kind,
        total,
    }
}

/// Append the f32 trailer (kind, low and high halves of the total, as bits).
fn put_f32_trailer(v: &mut Vec<f32>, kind: u32, total: u64) {
    v.extend_from_slice(&[
        f32::from_bits(kind),
        f32::from_bits(total as u32),
        f32::from_bits((total >> 32) as u32),
    ]);
}

fn get_f32_trailer(t: &[f32]) -> (u32, u64) {
    (
        t[0].to_bits(),
        u64::from(t[2].to_bits()) << 32 | u64::from(t[1].to_bits()),
    )
}

/// Append the bf16 trailer (the kind in two 16-bit words, the total in four, low first).
fn put_bf16_trailer(v: &mut Vec<u16>, kind: u32, total: u64) {
    let k = u64::from(kind);
    v.extend((0..2).map(|i| (k >> (16 * i)) as u16));
    v.extend((0..4).map(|i| (total >> (16 * i)) as u16));
}

fn get_bf16_trailer(t: &[u16]) -> (u32, u64) {
    let word = |s: &[u16]| {
        s.iter()
            .rev()
            .fold(0u64, |acc, &w| (acc << 16) | u64::from(w))
    };
    (word(&t[..2]) as u32, word(&t[2..6]))
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const TRAILER: usize = 3;
    const HAS_VALUES: bool = true;

    fn wrap(v: Vec<Self>) -> Payload {
        Payload::F32(v)
    }

    fn unwrap(p: Payload) -> Result<Vec<Self>, Payload> {
        match p {
            Payload::F32(v) => Ok(v),
            other => Err(other),
        }
    }

    fn frame(v: Vec<Self>, kind: u32, total: u64) -> Payload {
        frame_in_buffer(v, kind, total, put_f32_trailer)
    }

    fn unframe(p: Payload) -> Unframed<Self> {
        unframe_in_buffer(p, get_f32_trailer)
    }

    fn combine(op: ReduceOp, acc: &mut [Self], other: &[Self]) {
        op.combine(acc, other);
    }

    fn finish(op: ReduceOp, buf: &mut [Self], group: usize) {
        op.finish(buf, group);
    }

    fn spares(p: &mut Pool) -> &mut Vec<Vec<Self>> {
        &mut p.f32
    }
}

impl Elem for u16 {
    const NAME: &'static str = "bf16";
    const TRAILER: usize = 6;
    const HAS_VALUES: bool = true;

    fn wrap(v: Vec<Self>) -> Payload {
        Payload::Bf16(v)
    }

    fn unwrap(p: Payload) -> Result<Vec<Self>, Payload> {
        match p {
            Payload::Bf16(v) => Ok(v),
            other => Err(other),
        }
    }

    fn frame(v: Vec<Self>, kind: u32, total: u64) -> Payload {
        frame_in_buffer(v, kind, total, put_bf16_trailer)
    }

    fn unframe(p: Payload) -> Unframed<Self> {
        unframe_in_buffer(p, get_bf16_trailer)
    }

    fn combine(op: ReduceOp, acc: &mut [Self], other: &[Self]) {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a = to_bf16(from_bf16(*a) + from_bf16(*b));
                }
            }
            ReduceOp::Max => {
                for (a, b) in acc.iter_mut().zip(other) {
                    if from_bf16(*b) > from_bf16(*a) {
                        *a = *b;
                    }
                }
            }
        }
    }

    fn finish(op: ReduceOp, buf: &mut [Self], group: usize) {
        if op == ReduceOp::Avg {
            let n = group as f32;
            for x in buf.iter_mut() {
                *x = to_bf16(from_bf16(*x) / n);
            }
        }
    }

    fn spares(p: &mut Pool) -> &mut Vec<Vec<Self>> {
        &mut p.bf16
    }
}

/// Most spare buffers kept per element type.
const POOL_MAX: usize = 2;

/// Spare buffers of a communicator: buffers that an operation ends up holding (the last chunk
/// a ring step received) are kept for the next operation's first send, so that a steady stream
/// of collectives allocates (and page-faults) nothing.
#[derive(Default)]
pub(crate) struct Pool {
    f32: Vec<Vec<f32>>,
    bf16: Vec<Vec<u16>>,
    pub(crate) absent: Vec<Vec<Absent>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("f32", &self.f32.len())
            .field("bf16", &self.bf16.len())
            .field("absent", &self.absent.len())
            .finish()
    }
}

impl Pool {
    /// An empty buffer with room for at least `cap` elements (a spare one if any fits).
    pub(crate) fn take<T: Elem>(&mut self, cap: usize) -> Vec<T> {
        let spares = T::spares(self);
        match spares.iter().position(|v| v.capacity() >= cap) {
            Some(i) => {
                let mut v = spares.swap_remove(i);
                v.clear();
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// Keep `v` for later (the smallest spare makes room when the pool is full).
    pub(crate) fn give<T: Elem>(&mut self, v: Vec<T>) {
        let spares = T::spares(self);
        if spares.len() < POOL_MAX {
            spares.push(v);
        } else if let Some((i, _)) = spares
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.capacity())
            .filter(|(_, s)| s.capacity() < v.capacity())
        {
            spares[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Elem + PartialEq>(v: Vec<T>, kind: u32, total: u64) {
        let Unframed::Frame {
            data,
            kind: k,
            total: t,
        } = T::unframe(T::frame(v.clone(), kind, total))
        else {
            panic!("a {} frame must come apart", T::NAME);
        };
        assert_eq!((data, k, t), (v, kind, total));
    }

    #[test]
    fn trailers_round_trip() {
        for (kind, total) in [(0u32, 0u64), (0xdead_beef, (5 << 32) | 9), (7, u64::MAX)] {
            round_trip(vec![1.0f32, -2.5], kind, total);
            round_trip(Vec::<f32>::new(), kind, total);
            round_trip(vec![1u16], kind, total);
            let mut b = vec![1u16];
            put_bf16_trailer(&mut b, kind, total);
            assert_eq!(b.len(), 1 + u16::TRAILER);
        }
        assert!(matches!(
            f32::unframe(Payload::F32(vec![1.0, 2.0])),
            Unframed::Malformed(_)
        ));
        assert!(matches!(
            u16::unframe(Payload::F32(vec![1.0; 9])),
            Unframed::Other(Payload::F32(_))
        ));
    }

    #[test]
    fn bf16_reductions_round_to_nearest_even() {
        let mut a = vec![to_bf16(1.0), to_bf16(256.0), to_bf16(-3.0)];
        u16::combine(
            ReduceOp::Sum,
            &mut a,
            &[to_bf16(2.0), to_bf16(1.0), to_bf16(1.0)],
        );
        // 257 is not a bf16: it ties between 256 and 258 and rounds to the even 256.
        assert_eq!(
            a.iter().map(|&b| from_bf16(b)).collect::<Vec<_>>(),
            [3.0, 256.0, -2.0]
        );
        u16::combine(
            ReduceOp::Max,
            &mut a,
            &[to_bf16(4.0), to_bf16(0.0), to_bf16(-1.0)],
        );
        assert_eq!(
            a.iter().map(|&b| from_bf16(b)).collect::<Vec<_>>(),
            [4.0, 256.0, -1.0]
        );
        u16::finish(ReduceOp::Avg, &mut a, 4);
        assert_eq!(
            a.iter().map(|&b| from_bf16(b)).collect::<Vec<_>>(),
            [1.0, 64.0, -0.25]
        );
    }

    #[test]
    fn the_pool_hands_back_big_enough_buffers() {
        let mut p = Pool::default();
        let v: Vec<f32> = p.take(10);
        assert!(v.capacity() >= 10);
        let ptr = v.as_ptr();
        p.give(v);
        let w: Vec<f32> = p.take(5);
        assert_eq!(w.as_ptr(), ptr);
        let x: Vec<u16> = p.take(5);
        assert!(x.capacity() >= 5);
    }
}
