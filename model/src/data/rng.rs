//! Seeded pseudo-random numbers (SplitMix64 seeding, xoshiro256** streams), identical on every platform.
//!
//! The data pipeline needs randomness that is reproducible bit for bit: the same seed must give the
//! same shuffle on every machine, every build and every run, so that a data-parallel run can be
//! compared with a single-rank run and a resumed run with an uninterrupted one. This module is a
//! small, dependency-free implementation of two well-known generators by Sebastiano Vigna and
//! David Blackman (public domain reference code at <https://prng.di.unimi.it/>):
//!
//! - [`SplitMix64`]: a 64-bit counter passed through a mixing function. Used only to expand a
//!   seed into generator state, as its authors recommend.
//! - [`Rng`]: xoshiro256**, a fast generator with 256 bits of state and period 2^256 − 1.
//!
//! Everything is defined on `u64` with wrapping arithmetic, so results do not depend on the width
//! of `usize`, on endianness or on floating point. Not suitable for cryptography.

/// The golden-ratio increment of SplitMix64 (2^64 / φ, odd).
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a bijective mixer of 64-bit values (Stafford's variant 13).
///
/// Also useful on its own to derive independent seeds from structured values.
#[must_use]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a Weyl sequence (`state += γ`) passed through [`mix64`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed` (any value, zero included).
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }
}

/// xoshiro256**: the generator used for shuffling. Construct it with [`Rng::seed_from_u64`] or
/// [`Rng::from_stream`]; the state is never all zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose 256-bit state is the first four outputs of `SplitMix64::new(seed)`.
    #[must_use]
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        let s = [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()];
        Self::from_state(s)
    }

    /// An independent generator for sub-stream `stream` of `seed` (for example one per epoch):
    /// seeded with `mix64(seed ^ mix64(stream + γ))`, so that nearby `(seed, stream)` pairs give
    /// unrelated sequences.
    #[must_use]
    pub fn from_stream(seed: u64, stream: u64) -> Self {
        Self::seed_from_u64(seed ^ mix64(stream.wrapping_add(GOLDEN_GAMMA)))
    }

    /// A generator with exactly this state. An all-zero state (the one fixed point of xoshiro) is
    /// replaced by the state of `seed_from_u64(0)`.
    #[must_use]
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            return Self::seed_from_u64(0);
        }
        Self { s }
    }

    /// The current 256-bit state (for inspection; the data cursor does not need it, because each
    /// epoch's generator is derived afresh from the seed).
    #[must_use]
    pub const fn state(&self) -> [u64; 4] {
        self.s
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform `f64` in `[0, 1)` built from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        // 2^-53: the spacing of f64 values in [0.5, 1).
        const SCALE: f64 = 1.0 / ((1u64 << 53) as f64);
        (self.next_u64() >> 11) as f64 * SCALE
    }

    /// A uniform integer in `[0, n)`, without modulo bias (Lemire's multiply-and-reject method).
    /// Returns 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        let mut low = m as u64;
        if low < n {
            // The values of `low` below 2^64 mod n would over-represent some results.
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Shuffles `items` in place with the Fisher–Yates algorithm (from the back: item `i` swaps
    /// with a uniform index in `0..=i`). The same generator state gives the same permutation for
    /// the same length on every platform.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // `i + 1` fits in u64 on every platform Rust supports, and `below` returns at most `i`.
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_vector() {
        // First outputs of the reference splitmix64.c with seed 0.
        let mut sm = SplitMix64::new(0);
        assert_eq!(sm.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(sm.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(sm.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn xoshiro256starstar_matches_reference_vector() {
        // Reference xoshiro256starstar.c with s = {1, 2, 3, 4}.
        let mut rng = Rng::from_state([1, 2, 3, 4]);
        assert_eq!(rng.next_u64(), 11_520);
        assert_eq!(rng.next_u64(), 0);
        assert_eq!(rng.next_u64(), 1_509_978_240);
        assert_eq!(rng.next_u64(), 1_215_971_899_390_074_240);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_different_sequence() {
        let a: Vec<u64> = {
            let mut r = Rng::seed_from_u64(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::seed_from_u64(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let c: Vec<u64> = {
            let mut r = Rng::seed_from_u64(43);
            (0..8).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(Rng::from_stream(7, 0), Rng::from_stream(7, 1));
        assert_ne!(Rng::from_stream(7, 0), Rng::from_stream(8, 0));
    }

    #[test]
    fn all_zero_state_is_replaced() {
        let mut rng = Rng::from_state([0; 4]);
        assert_ne!(rng.state(), [0; 4]);
        assert_ne!(rng.next_u64(), 0);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::seed_from_u64(1);
        let mut seen = [0u32; 7];
        for _ in 0..7_000 {
            let x = rng.below(7);
            assert!(x < 7);
            seen[x as usize] += 1;
        }
        // Each bucket expects 1000; a fair generator stays well within ±20%.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
        let big = rng.below(u64::MAX);
        assert!(big < u64::MAX);
    }

    #[test]
    fn next_f64_is_in_unit_interval() {
        let mut rng = Rng::seed_from_u64(9);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let x = rng.next_f64();
            assert!((0.0..1.0).contains(&x));
            sum += x;
        }
        let mean = sum / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        Rng::seed_from_u64(5).shuffle(&mut a);
        Rng::seed_from_u64(5).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<u32>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
        // Pinned (values from an independent Python transcription of the same algorithms), so
        // that a change of algorithm, which would change every run's data order, is caught.
        let mut small: Vec<u32> = (0..8).collect();
        Rng::seed_from_u64(0).shuffle(&mut small);
        assert_eq!(small, [1, 6, 3, 7, 2, 0, 5, 4]);
        let mut streamed: Vec<u32> = (0..10).collect();
        Rng::from_stream(42, 3).shuffle(&mut streamed);
        assert_eq!(streamed, [7, 4, 6, 3, 8, 0, 1, 9, 5, 2]);
        let mut empty: Vec<u32> = Vec::new();
        Rng::seed_from_u64(0).shuffle(&mut empty);
        assert!(empty.is_empty());
    }
}
