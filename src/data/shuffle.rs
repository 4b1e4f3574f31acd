//! numpy's `default_rng(seed).permutation(n)`, bit for bit, and the train/test split that
//! Hugging Face `datasets`' `train_test_split(test_size, seed, shuffle=True)` makes with it.
//!
//! The chain is numpy's: `SeedSequence(seed)` mixes the seed into a 4-word pool and
//! generates 4 x 64-bit words; `PCG64` is seeded with them (state, increment); the
//! permutation is `arange(n)` shuffled by Fisher-Yates from the end, each swap index drawn
//! by `random_interval` (masked rejection sampling on 32-bit draws, each 64-bit output
//! giving two of them, low half first). `tests/fixtures/bpe/permutation.json`
//! (from `tools/make_bpe_fixtures.py`) pins the result for several n and seeds.

/// numpy's `SeedSequence` (pool size 4, no spawn key) for an integer seed.
pub struct SeedSequence {
    pool: [u32; 4],
}

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

impl SeedSequence {
    pub fn new(seed: u128) -> SeedSequence {
        // The integer as little-endian 32-bit words ([0] for zero).
        let mut entropy = Vec::new();
        let mut s = seed;
        while s > 0 {
            entropy.push(s as u32);
            s >>= 32;
        }
        if entropy.is_empty() {
            entropy.push(0);
        }
        let mut pool = [0u32; 4];
        let mut hash_const = INIT_A;
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for src in 0..4 {
            for dst in 0..4 {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &e in entropy.iter().skip(4) {
            for slot in pool.iter_mut() {
                let h = hashmix(e, &mut hash_const);
                *slot = mix(*slot, h);
            }
        }
        SeedSequence { pool }
    }

    /// `generate_state(n_words, np.uint64)`.
    pub fn generate_state_u64(&self, n_words: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let words: Vec<u32> = (0..2 * n_words)
            .map(|i| {
                let mut v = self.pool[i % 4] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect();
        words
            .chunks_exact(2)
            .map(|w| w[0] as u64 | ((w[1] as u64) << 32))
            .collect()
    }
}

const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

/// numpy's `PCG64` bit generator (XSL-RR 128/64) with its buffered 32-bit draws.
pub struct Pcg64 {
    state: u128,
    inc: u128,
    buffered: Option<u32>,
}

impl Pcg64 {
    /// `PCG64(seed)` as `default_rng(seed)` builds it.
    pub fn from_seed(seed: u128) -> Pcg64 {
        let v = SeedSequence::new(seed).generate_state_u64(4);
        let initstate = ((v[0] as u128) << 64) | v[1] as u128;
        let initseq = ((v[2] as u128) << 64) | v[3] as u128;
        let mut rng = Pcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
            buffered: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    #[inline]
    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        ((s >> 64) as u64 ^ s as u64).rotate_right((s >> 122) as u32)
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.buffered.take() {
            return v;
        }
        let next = self.next_u64();
        self.buffered = Some((next >> 32) as u32);
        next as u32
    }

    /// numpy's `random_interval(max)`: uniform in `[0, max]` by masked rejection.
    #[inline]
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u32::MAX as u64 {
            loop {
                let v = (self.next_u32() as u64) & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let v = self.next_u64() & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }
}

/// `np.random.default_rng(seed).permutation(n)`.
pub fn permutation(n: usize, seed: u128) -> Vec<u32> {
    assert!(
        n <= u32::MAX as usize,
        "permutations are stored as u32: n = {n} documents is beyond 4 billion"
    );
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut rng = Pcg64::from_seed(seed);
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        p.swap(i, j);
    }
    p
}

/// Sizes of `datasets`' `train_test_split(test_size=f)`: `n_test = ceil(f * n)`,
/// `n_train = n - n_test`.
pub fn split_sizes(n: usize, test_size: f64) -> (usize, usize) {
    let n_test = (test_size * n as f64).ceil() as usize;
    (n - n_test.min(n), n_test.min(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openwebtext_split_sizes() {
        assert_eq!(split_sizes(8_013_769, 0.0005), (8_009_762, 4_007));
        assert_eq!(split_sizes(1000, 0.0005), (999, 1));
    }

    #[test]
    fn small_permutation_is_a_permutation() {
        let p = permutation(1000, 2357);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_ne!(p, s);
    }
}
