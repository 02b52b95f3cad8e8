//! What the stage actors and expert shards send each other over the fabric: their channels,
//! the tags that say what a message is, and device tensors as payloads.
//!
//! Every stage actor subscribes to a channel of its own, `STAGE_CHANNEL + stage` (so the two
//! stages DualPipe puts on one rank never take each other's messages): stage-boundary
//! activations and gradients, and what the expert-owners send back. Every rank's expert shard
//! subscribes to [`SHARD_CHANNEL`]: the dispatched rows and their gradients. A rank's actors send
//! to each other the same way (in process a message to oneself is moved, as any other).
//!
//! A tag packs the job's attempt (so that nothing from before a roll-back is taken after it),
//! the step, the micro-batch, the layer and the [`Kind`]. A tensor travels as
//! [`TensorMsg`]: `meta = [rows, cols, extra…]` (integers, exact at any size: the dispatch's
//! per-expert row counts are its extra) and the values, or only their size for the simulated
//! device. A tensor for this rank's own actors travels as itself ([`Values::Local`]), so a
//! GPU's rows never leave the GPU on their way to its own expert shard. Everything read off
//! the fabric is checked before use: a message that does not fit is an error naming its
//! sender, never a panic.

use flotilla_model::{Device, Tensor};
use flotilla_runtime::fabric::{LocalValue, Payload, Rank, Tag, TensorMsg, Values};

/// First channel of the stage actors (`+ stage`).
pub const STAGE_CHANNEL: u32 = 0x5347_0000;
/// The expert shards' channel.
pub const SHARD_CHANNEL: u32 = 0x5348_0000;

/// Whether a message with `tag` is part of an expert all-to-all (a dispatch to the expert
/// shards or a combine back, forward or backward): what a benchmark's modelled link delays.
pub fn is_all_to_all(tag: Tag) -> bool {
    let stage = tag.channel.wrapping_sub(STAGE_CHANNEL) < 0x1_0000;
    tag.channel == SHARD_CHANNEL
        || (stage
            && Key::of(tag).is_some_and(|k| matches!(k.kind, Kind::Combine | Kind::GradCombine)))
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A stage's output activation, to the next stage.
    Act = 1,
    /// The gradient of a stage's input, to the previous stage.
    Grad = 2,
    /// Forward: token-owner → expert-owner, a [`flotilla_model::layers::moe::DispatchPart`].
    Dispatch = 3,
    /// Forward: expert-owner → token-owner, the experts' output rows.
    Combine = 4,
    /// B: token-owner → expert-owner, the gradient of the rows it was sent back.
    GradDispatch = 5,
    /// B: expert-owner → token-owner, the gradient of the rows it was sent.
    GradCombine = 6,
}

impl Kind {
    fn from_code(c: u64) -> Option<Kind> {
        Some(match c {
            1 => Kind::Act,
            2 => Kind::Grad,
            3 => Kind::Dispatch,
            4 => Kind::Combine,
            5 => Kind::GradDispatch,
            6 => Kind::GradCombine,
            _ => return None,
        })
    }

    /// What the expert-owner sends back for this kind (and `None` for the others).
    pub fn answer(self) -> Option<Kind> {
        match self {
            Kind::Dispatch => Some(Kind::Combine),
            Kind::GradDispatch => Some(Kind::GradCombine),
            _ => None,
        }
    }
}

/// What a tag says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The job's attempt (bumped at every roll-back), modulo 256.
    pub attempt: u8,
    /// The step, modulo 2^16.
    pub step: u16,
    pub chunk: usize,
    pub layer: usize,
    pub kind: Kind,
}

impl Key {
    /// A key of `kind` for `(chunk, layer)` of `step` in `attempt` (the step and attempt wrap;
    /// chunk and layer must be below 2^16, which the config's validation guarantees).
    pub fn new(attempt: u64, step: u64, chunk: usize, layer: usize, kind: Kind) -> Key {
        Key {
            attempt: attempt as u8,
            step: step as u16,
            chunk,
            layer,
            kind,
        }
    }

    /// The tag of this key on `channel`.
    pub fn tag(&self, channel: u32) -> Tag {
        Tag::new(
            channel,
            u64::from(self.attempt) << 56
                | u64::from(self.step) << 40
                | ((self.chunk as u64) & 0xffff) << 24
                | ((self.layer as u64) & 0xffff) << 8
                | self.kind as u64,
        )
    }

    /// The key a tag carries (`None`: not one of ours).
    pub fn of(tag: Tag) -> Option<Key> {
        let t = tag.tag;
        Some(Key {
            attempt: (t >> 56) as u8,
            step: (t >> 40) as u16,
            chunk: ((t >> 24) & 0xffff) as usize,
            layer: ((t >> 8) & 0xffff) as usize,
            kind: Kind::from_code(t & 0xff)?,
        })
    }

    /// Whether this key belongs to `step` of `attempt`.
    pub fn is_of(&self, attempt: u64, step: u64) -> bool {
        self.attempt == attempt as u8 && self.step == step as u16
    }
}

/// A device tensor `[rows, cols]` as a payload, with integer `extra` metadata. To this rank
/// (`local`) the tensor itself travels, as an in-process value, and stays on the device; to
/// another rank its values go through the host (moved out of the tensor, no copy on the CPU).
/// The simulated device's tensors travel as their size either way.
pub fn to_payload(dev: &dyn Device, t: Tensor, extra: &[u64], local: bool) -> Payload {
    let (rows, cols) = (t.rows() as u64, t.cols() as u64);
    let bytes = t.numel() as u64 * 4;
    let mut meta = Vec::with_capacity(2 + extra.len());
    meta.extend([rows, cols]);
    meta.extend_from_slice(extra);
    let values = if t.is_shape_only() {
        Values::Absent { bytes }
    } else if local {
        Values::Local {
            bytes,
            value: LocalValue::new(t),
        }
    } else {
        match dev.take_values(t) {
            Some(v) => Values::F32(v),
            None => Values::Absent { bytes },
        }
    };
    Payload::Tensor(TensorMsg { meta, values })
}

/// The `[rows, cols]` tensor of a payload from `src`, on `dev`, and its extra metadata; an
/// error naming `src` when it does not fit (`cols` must be `want_cols`).
pub fn from_payload(
    dev: &dyn Device,
    src: Rank,
    msg: TensorMsg,
    want_cols: usize,
) -> Result<(Tensor, Vec<u64>), String> {
    let bad = |why: String| format!("a tensor from rank {src}: {why}");
    let (rows, cols) = match msg.meta.get(..2) {
        Some(&[r, c]) => (r, c),
        _ => return Err(bad(format!("{} metadata words", msg.meta.len()))),
    };
    if cols != want_cols as u64 {
        return Err(bad(format!("{cols} columns, expected {want_cols}")));
    }
    let rows = usize::try_from(rows)
        .ok()
        .filter(|r| r.checked_mul(want_cols).is_some_and(|n| n < 1 << 40))
        .ok_or_else(|| bad(format!("{rows} rows")))?;
    let n = rows * want_cols;
    let values = match msg.values {
        Values::Local { value, .. } => {
            let t: Tensor = value.take().map_err(|why| bad(why.to_string()))?;
            if t.shape() != [rows, want_cols] {
                return Err(bad(format!(
                    "a {:?} tensor said to be {rows} x {want_cols}",
                    t.shape()
                )));
            }
            return Ok((t, msg.meta[2..].to_vec()));
        }
        Values::F32(v) if v.len() == n => Some(v),
        Values::F32(v) => return Err(bad(format!("{} values for {rows} x {want_cols}", v.len()))),
        Values::Absent { bytes } if bytes == n as u64 * 4 => None,
        Values::Absent { bytes } => {
            return Err(bad(format!("{bytes} bytes for {rows} x {want_cols}")));
        }
    };
    Ok((
        dev.adopt(&[rows, want_cols], values),
        msg.meta[2..].to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::{CpuDevice, SimDevice, SimProfile};

    #[test]
    fn the_all_to_all_is_the_dispatches_and_the_combines() {
        let k = |kind| Key::new(0, 3, 1, 2, kind);
        for kind in [Kind::Dispatch, Kind::GradDispatch] {
            assert!(is_all_to_all(k(kind).tag(SHARD_CHANNEL)));
        }
        for kind in [Kind::Combine, Kind::GradCombine] {
            assert!(is_all_to_all(k(kind).tag(STAGE_CHANNEL + 1)));
        }
        for kind in [Kind::Act, Kind::Grad] {
            assert!(!is_all_to_all(k(kind).tag(STAGE_CHANNEL + 1)));
        }
        assert!(!is_all_to_all(k(Kind::Combine).tag(7)));
    }

    #[test]
    fn tags_round_trip_and_wrap() {
        for kind in [Kind::Act, Kind::Grad, Kind::Dispatch, Kind::GradCombine] {
            let k = Key::new(300, 70_000, 65_535, 1234, kind);
            let back = Key::of(k.tag(STAGE_CHANNEL + 3)).expect("our tag");
            assert_eq!(back, k);
            assert!(back.is_of(300, 70_000) && back.is_of(44, 4464));
            assert!(!back.is_of(301, 70_000));
        }
        assert_eq!(Key::of(Tag::new(SHARD_CHANNEL, 0x77)), None);
    }

    #[test]
    fn tensors_travel_and_bad_ones_are_named() {
        let dev = CpuDevice::new(1);
        let t = dev.upload(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let Payload::Tensor(msg) = to_payload(&dev, t, &[7, u64::MAX], false) else {
            panic!("a tensor payload");
        };
        let (back, extra) = from_payload(&dev, 4, msg.clone(), 3).expect("fits");
        assert_eq!(back.host(), Some(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0][..]));
        assert_eq!(extra, vec![7, u64::MAX]);
        let e = from_payload(&dev, 4, msg.clone(), 2).expect_err("width");
        assert!(e.contains("rank 4") && e.contains("3 columns"), "{e}");
        let mut short = msg;
        short.meta[0] = 5;
        assert!(from_payload(&dev, 4, short, 3).is_err());
        // The simulated device sends sizes only, and takes them.
        let sim = SimDevice::new(SimProfile::h200());
        let Payload::Tensor(m) = to_payload(&sim, sim.empty(&[4, 8]), &[], true) else {
            panic!("a tensor payload");
        };
        assert_eq!(m.values, Values::Absent { bytes: 128 });
        let (t, _) = from_payload(&sim, 0, m, 8).expect("fits");
        assert_eq!(t.shape(), &[4, 8]);
    }

    #[test]
    fn to_this_rank_the_tensor_itself_travels_once() {
        let dev = CpuDevice::new(1);
        let t = dev.upload(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let Payload::Tensor(msg) = to_payload(&dev, t, &[9], true) else {
            panic!("a tensor payload");
        };
        assert!(matches!(msg.values, Values::Local { bytes: 16, .. }));
        let copy = msg.clone();
        let e = from_payload(&dev, 1, msg.clone(), 3).expect_err("width");
        assert!(e.contains("expected 3"), "{e}");
        let (back, extra) = from_payload(&dev, 1, msg, 2).expect("fits");
        assert_eq!(back.host(), Some(&[1.0, 2.0, 3.0, 4.0][..]));
        assert_eq!(extra, vec![9]);
        // A clone of the message shares the tensor, which only the first receiver gets.
        let e = from_payload(&dev, 1, copy, 2).expect_err("taken");
        assert!(e.contains("rank 1") && e.contains("already taken"), "{e}");
        // A local tensor whose metadata lies about its shape is refused.
        let t = dev.upload(&[1, 2], &[1.0, 2.0]);
        let Payload::Tensor(mut msg) = to_payload(&dev, t, &[], true) else {
            panic!("a tensor payload");
        };
        msg.meta[0] = 3;
        let e = from_payload(&dev, 2, msg, 2).expect_err("shape");
        assert!(e.contains("[1, 2]"), "{e}");
    }
}
