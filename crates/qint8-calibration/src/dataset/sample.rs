//! Seeded random choice of dataset items.
//!
//! [`SplitMix64`] is a tiny, well-mixed 64-bit generator (Steele, Lea and
//! Flood, "Fast splittable pseudorandom number generators", 2014): the same
//! seed gives the same sequence on every platform and in every release of
//! this crate, which is what reproducible calibration subsets need (this is
//! not a cryptographic generator). [`sample_indices`] draws distinct indices
//! with a partial Fisher–Yates shuffle whose swaps live in a hash map, so
//! choosing `n` of `len` items costs `O(n)` time and memory whatever `len`.

use std::collections::HashMap;

/// The SplitMix64 generator.
///
/// ```
/// use qint8_calibration::dataset::sample::SplitMix64;
///
/// let mut a = SplitMix64::new(7);
/// let mut b = SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed` (every seed, 0 included, is fine).
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..bound` (without modulo bias: draws that
    /// fall in the incomplete last block are rejected). Returns 0 when
    /// `bound` is 0 or 1.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound <= 1 {
            return 0;
        }
        // Largest multiple of `bound` that fits; reject draws at or above it.
        let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % bound;
            }
        }
    }
}

/// `n` distinct indices chosen uniformly from `0..len` with the generator
/// seeded by `seed`, in ascending order (every `n`-subset is equally
/// likely). All of `0..len` when `n >= len`.
///
/// The same `(len, n, seed)` always gives the same indices.
///
/// ```
/// use qint8_calibration::dataset::sample::sample_indices;
///
/// let a = sample_indices(100, 5, 42);
/// assert_eq!(a, sample_indices(100, 5, 42));
/// assert_eq!(a.len(), 5);
/// assert!(a.windows(2).all(|w| w[0] < w[1]) && a[4] < 100);
/// assert_eq!(sample_indices(3, 10, 0), vec![0, 1, 2]);
/// ```
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    let mut rng = SplitMix64::new(seed);
    // Position -> value for the positions a swap has touched; every other
    // position still holds its own index.
    let mut moved: HashMap<usize, usize> = HashMap::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // `len - i` fits in u64 and the draw is below it, so it fits usize.
        let j = i + rng.below((len - i) as u64) as usize;
        let at_i = moved.get(&i).copied().unwrap_or(i);
        let at_j = moved.get(&j).copied().unwrap_or(j);
        out.push(at_j);
        moved.insert(j, at_i);
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 1234567 from the reference C implementation.
        let mut g = SplitMix64::new(1_234_567);
        assert_eq!(g.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(g.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn below_stays_in_range() {
        let mut g = SplitMix64::new(3);
        for bound in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(g.below(bound) < bound.max(1));
            }
        }
        assert_eq!(g.below(0), 0);
    }

    #[test]
    fn indices_are_distinct_sorted_and_cover_small_sets() {
        for seed in 0..20 {
            let v = sample_indices(10, 4, seed);
            assert_eq!(v.len(), 4);
            assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
            assert!(v.iter().all(|&i| i < 10));
        }
        assert_eq!(sample_indices(5, 5, 9), vec![0, 1, 2, 3, 4]);
        assert!(sample_indices(0, 3, 1).is_empty());
        assert!(sample_indices(7, 0, 1).is_empty());
    }

    #[test]
    fn every_item_is_chosen_about_equally_often() {
        // 2000 draws of 3 out of 6: each index expects 1000 hits.
        let mut hits = [0usize; 6];
        for seed in 0..2000 {
            for i in sample_indices(6, 3, seed) {
                hits[i] += 1;
            }
        }
        assert!(hits.iter().all(|&h| (850..1150).contains(&h)), "{hits:?}");
    }
}
