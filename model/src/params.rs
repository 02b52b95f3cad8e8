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
