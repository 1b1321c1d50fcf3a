//! A deterministic xorshift generator for the tests and benches: generated inputs that
//! reproduce without a seed file. Not for anything that needs randomness.

/// Xorshift64 from a non-zero seed.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }

    /// Roughly Zipf over `0..n`: small indices are much more likely.
    pub fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (((n as f64 + 1.0).powf(u) - 1.0) as usize).min(n - 1)
    }

    /// Small indices more likely, like letter frequencies (milder than [`Self::zipf`]).
    pub fn zipf_ish(&mut self, n: usize) -> usize {
        self.below(n).min(self.below(n))
    }

    /// `n` decimal digits (0..=9).
    pub fn digits(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.below(10) as u8).collect()
    }
}
