//! Named parameters: walking a model's tensors under their HuggingFace names, and `params_sha256`.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::device::Device;
use crate::tensor::Tensor;

/// Whether a named tensor is trained (has a gradient) or is a buffer updated by other means
/// (`e_score_correction_bias`, moved by the auxiliary-loss-free balancing rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Weight,
    Buffer,
}

/// Anything that owns named tensors. `prefix` ends with '.' or is empty.
pub trait Params {
    /// Calls `f(name, tensor, kind)` for every tensor.
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind));
    /// Calls `f(name, tensor, kind)` for every tensor, mutably.
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind));
    /// Calls `f(tensor)` for every tensor in `visit`'s order, without building names: for the
    /// hot loops of a step, which go by position ([`Selection`]).
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor));
    /// [`Params::for_each_tensor`], mutably.
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor));
}

/// Some of a model's tensors, by name, found by their positions in the visit order: built once
/// from the names (one named visit), then used every step without building a name.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Per tensor of the visit order, its slot among the selected (`u32::MAX`: not selected).
    slot: Vec<u32>,
    /// How many are selected.
    len: usize,
}

impl Selection {
    const NONE: u32 = u32::MAX;

    /// The tensors of `p` named in `names`, in the order of `names` (names `p` lacks are left
    /// out).
    pub fn of<P: Params + ?Sized>(p: &P, names: &[String]) -> Selection {
        let wanted: std::collections::HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut at = Vec::new();
        p.visit("", &mut |n, _, _| {
            at.push(wanted.get(n).copied());
        });
        // Slots in the order of `names`, counting only the names found.
        let mut order: Vec<(usize, usize)> = at
            .iter()
            .enumerate()
            .filter_map(|(pos, w)| w.map(|i| (i, pos)))
            .collect();
        order.sort_unstable();
        let mut slot = vec![Self::NONE; at.len()];
        for (s, &(_, pos)) in order.iter().enumerate() {
            slot[pos] = u32::try_from(s).unwrap_or(Self::NONE);
        }
        Selection {
            slot,
            len: order.len(),
        }
    }

    /// How many tensors are selected.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, pos: usize) -> Option<usize> {
        self.slot
            .get(pos)
            .filter(|&&s| s != Self::NONE)
            .map(|&s| s as usize)
    }

    /// The selected tensors of `p`, in selection order.
    pub fn refs<'a, P: Params + ?Sized>(&self, p: &'a P) -> Vec<&'a Tensor> {
        let mut out: Vec<Option<&'a Tensor>> = vec![None; self.len];
        let mut pos = 0;
        p.for_each_tensor(&mut |t| {
            if let Some(s) = self.slot_of(pos) {
                out[s] = Some(t);
            }
            pos += 1;
        });
        out.into_iter().flatten().collect()
    }

    /// Calls `f` on every selected tensor of `p`, in the visit order.
    pub fn for_each_mut<P: Params + ?Sized>(&self, p: &mut P, f: &mut dyn FnMut(&mut Tensor)) {
        let mut pos = 0;
        p.for_each_tensor_mut(&mut |t| {
            if self.slot_of(pos).is_some() {
                f(t);
            }
            pos += 1;
        });
    }

    /// Moves the selected tensors out of `p`, in selection order, leaving shape-only
    /// placeholders, so that many can be held mutably at once; [`Selection::put_back`] restores
    /// them.
    pub fn take<P: Params + ?Sized>(&self, p: &mut P) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = (0..self.len).map(|_| Tensor::shape_only(&[])).collect();
        let mut pos = 0;
        p.for_each_tensor_mut(&mut |t| {
            if let Some(s) = self.slot_of(pos) {
                out[s] = std::mem::replace(t, Tensor::shape_only(&[]));
            }
            pos += 1;
        });
        out
    }

    /// Puts tensors taken by [`Selection::take`] back.
    pub fn put_back<P: Params + ?Sized>(&self, p: &mut P, taken: Vec<Tensor>) {
        let mut taken: Vec<Option<Tensor>> = taken.into_iter().map(Some).collect();
        let mut pos = 0;
        p.for_each_tensor_mut(&mut |t| {
            if let Some(v) = self.slot_of(pos).and_then(|s| taken.get_mut(s)?.take()) {
                *t = v;
            }
            pos += 1;
        });
    }
}

/// All tensors by name (sorted), trainable ones and buffers.
pub fn named<P: Params + ?Sized>(p: &P) -> BTreeMap<String, &Tensor> {
    let mut out = BTreeMap::new();
    p.visit("", &mut |n, t, _| {
        out.insert(n.to_string(), t);
    });
    out
}

/// SHA-256 over every tensor (weights and buffers) in sorted-name order, each as little-endian
/// f32 bytes; `None` when the tensors hold no values (simulated device).
pub fn params_sha256<P: Params + ?Sized>(p: &P, dev: &dyn Device) -> Option<String> {
    // One tensor downloaded at a time; stops at the first that holds no values.
    let mut missing = false;
    let digest = sha256_hex(named(p).values().map_while(|t| {
        let v = dev.download(t);
        missing |= v.is_none();
        v
    }));
    (!missing).then_some(digest)
}

/// SHA-256 (hex) over tensors' values as little-endian f32, in the order given: the digest of
/// [`params_sha256`] when given every tensor in sorted-name order (a parallel job hashes the
/// tensors gathered from its ranks with it).
pub fn sha256_hex<T: AsRef<[f32]>>(tensors: impl IntoIterator<Item = T>) -> String {
    let mut h = Sha256::new();
    for v in tensors {
        for x in v.as_ref() {
            h.update(x.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{dev, small_config};

    #[test]
    fn a_selection_goes_by_the_visit_order() {
        let d = dev();
        let m = crate::DeepSeekV3::init(&small_config(), &d, 1).expect("model");
        let mut w = m.weights.clone();
        let mut by_name = Vec::new();
        w.visit("", &mut |_, t, _| by_name.push(t as *const Tensor));
        let mut by_pos = Vec::new();
        w.for_each_tensor(&mut |t| by_pos.push(t as *const Tensor));
        assert_eq!(
            by_name, by_pos,
            "for_each_tensor visits what visit does, in its order"
        );

        let names: Vec<String> = named(&w).keys().cloned().collect();
        let pick = vec![
            names[5].clone(),
            "no.such.tensor".to_owned(),
            names[2].clone(),
            names[names.len() - 1].clone(),
        ];
        let sel = Selection::of(&w, &pick);
        assert_eq!(sel.len(), 3);
        let shapes = |ts: &[&Tensor]| ts.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>();
        let want = {
            let all = named(&w);
            let picked = [&names[5], &names[2], &names[names.len() - 1]].map(|n| all[n.as_str()]);
            assert_eq!(shapes(&sel.refs(&w)), shapes(&picked));
            shapes(&picked)
        };
        let before = params_sha256(&w, &d);
        let taken = sel.take(&mut w);
        assert_eq!(
            shapes(&taken.iter().collect::<Vec<_>>()),
            want,
            "taken in the order of the names"
        );
        assert_eq!(named(&w)[names[2].as_str()].shape(), &[] as &[usize]);
        sel.put_back(&mut w, taken);
        assert_eq!(params_sha256(&w, &d), before);
        let mut seen = 0;
        sel.for_each_mut(&mut w, &mut |_| seen += 1);
        assert_eq!(seen, 3);
    }
}
