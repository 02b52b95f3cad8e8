//! A small deterministic random source for parameter initialisation: the data pipeline's
//! SplitMix64 ([`crate::data::rng::SplitMix64`]) with a stream per parameter name and Box-Muller
//! normals. Deterministic across platforms and runs, so that a seed names an initial model.

use crate::data::rng::SplitMix64;

/// SplitMix64 generator.
#[derive(Clone, Debug)]
pub struct Rng {
    bits: SplitMix64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            bits: SplitMix64::new(seed),
        }
    }

    /// A generator for a named stream derived from `seed`, independent of the order in which
    /// streams are drawn (each parameter gets its own stream from its name).
    pub fn for_name(seed: u64, name: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng::new(seed ^ h.rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.bits.next_u64()
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` values from N(0, std²).
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}
