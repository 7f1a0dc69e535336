//! The two small pieces of statistics that the lab's measurements and the benchmarks share, so
//! that a percentile or a seeded draw means the same thing in every report.

/// The nearest-rank percentile of an ascending sample: the smallest value with at least a share
/// `q` (0 to 1) of the sample at or below it. `q = 0.5` of `[1, 2, 3, 4]` is 2, `q = 1` the
/// largest value. `None` for an empty sample: there is no percentile of nothing.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// SplitMix64 (Steele, Lea and Flood, 2014): small, fast, and good enough to draw loss,
/// jitter and benchmark inputs; the same seed gives the same sequence. Not for secrets.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is below 2^-40 for any `n` under 2^24).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn next_gaussian(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_is_the_nearest_rank_and_nothing_has_none() {
        let s = [1, 2, 3, 4];
        assert_eq!(percentile(&s, 0.5), Some(2));
        assert_eq!(percentile(&s, 0.51), Some(3));
        assert_eq!(percentile(&s, 0.0), Some(1));
        assert_eq!(percentile(&s, 1.0), Some(4));
        let hundred: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 0.99), Some(99));
        assert_eq!(percentile::<f64>(&[], 0.5), None);
    }

    #[test]
    fn the_same_seed_draws_the_same_sequence_and_below_stays_below() {
        let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!((0..10_000).all(|_| a.below(13) < 13));
        // The reference sequence for seed 0 (the first output of the published algorithm).
        assert_eq!(SplitMix64(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn the_gaussian_has_unit_variance() {
        let mut r = SplitMix64(42);
        let xs: Vec<f64> = (0..100_000).map(|_| r.next_gaussian()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
