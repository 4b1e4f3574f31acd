//! Dropout shared by every engine: a counter-based mask (element `i` of a site is kept when
//! `hash(seed, i) >= p * 2^32`), recomputed in the backward pass instead of stored and
//! independent of the thread count, and the derivation of each site's seed from one draw of
//! the engine's generator per forward pass. Engines that derive seeds here and apply
//! [`keep`] (or its CUDA mirror in kernels/elementwise.cu) drop exactly the same elements.

use crate::rng::Rng;
use rayon::prelude::*;

#[inline]
pub fn keep(seed: u64, i: u64, threshold: u32) -> bool {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32 >= threshold
}

/// Dropout parameters for one site: `seed` and probability `p` (p = 0 disables). `slot`
/// is the site's place in its pass's seed table ([`DropoutSeeds::table`]), for engines that
/// keep the seeds in device memory.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub seed: u64,
    pub p: f32,
    pub slot: usize,
}

impl Dropout {
    pub fn off() -> Self {
        Dropout {
            seed: 0,
            p: 0.0,
            slot: 0,
        }
    }
    pub fn active(&self) -> bool {
        self.p > 0.0
    }
    pub fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32
    }
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
    /// Applies the mask and 1/(1-p) scale in place (forward and backward are the same map).
    pub fn apply(&self, x: &mut [f32]) {
        if !self.active() {
            return;
        }
        let (th, s, seed) = (self.threshold(), self.scale(), self.seed);
        x.par_chunks_mut(4096).enumerate().for_each(|(ci, chunk)| {
            let base = (ci * 4096) as u64;
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = if keep(seed, base + j as u64, th) {
                    *v * s
                } else {
                    0.0
                };
            }
        });
    }
}

/// Dropout sites of one forward pass, derived from one draw of the engine's generator.
#[derive(Clone, Copy, Debug)]
pub struct DropoutSeeds {
    base: u64,
    p: f32,
}

impl DropoutSeeds {
    /// Seeds for one training forward pass (`None` when `p == 0`); advances `rng` by one
    /// draw only when dropout is on.
    pub fn draw(rng: &mut Rng, p: f32) -> Option<Self> {
        (p > 0.0).then(|| DropoutSeeds {
            base: rng.next_u64(),
            p,
        })
    }
    fn site(&self, layer: usize, which: u64) -> Dropout {
        let mut r = Rng::derive(self.base, (layer as u64) << 8 | which);
        Dropout {
            seed: r.next_u64(),
            p: self.p,
            slot: if which == 0 {
                0
            } else {
                1 + 3 * layer + which as usize - 1
            },
        }
    }

    /// Every site's seed of a pass over `n_layer` layers, by slot: the embedding's, then
    /// each layer's attention probabilities, attention residual and MLP residual.
    pub fn table(&self, n_layer: usize) -> Vec<u64> {
        let mut seeds = vec![self.embedding().seed];
        for l in 0..n_layer {
            seeds.extend([
                self.attn_probs(l).seed,
                self.attn_resid(l).seed,
                self.mlp_resid(l).seed,
            ]);
        }
        seeds
    }

    /// Slots in the seed table of a pass over `n_layer` layers.
    pub fn slots(n_layer: usize) -> usize {
        1 + 3 * n_layer
    }

    pub fn embedding(&self) -> Dropout {
        self.site(usize::MAX >> 9, 0)
    }
    pub fn attn_probs(&self, l: usize) -> Dropout {
        self.site(l, 1)
    }
    pub fn attn_resid(&self, l: usize) -> Dropout {
        self.site(l, 2)
    }
    pub fn mlp_resid(&self, l: usize) -> Dropout {
        self.site(l, 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_finds_its_seed_at_its_slot_of_the_table() {
        let seeds = DropoutSeeds::draw(&mut Rng::new(7), 0.1).expect("p > 0");
        let layers = 3;
        let table = seeds.table(layers);
        assert_eq!(table.len(), DropoutSeeds::slots(layers));
        let mut sites = vec![seeds.embedding()];
        for l in 0..layers {
            sites.extend([seeds.attn_probs(l), seeds.attn_resid(l), seeds.mlp_resid(l)]);
        }
        let mut slots: Vec<usize> = sites.iter().map(|d| d.slot).collect();
        for d in &sites {
            assert_eq!(table[d.slot], d.seed);
        }
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), table.len(), "two sites share a slot");
        assert!(DropoutSeeds::draw(&mut Rng::new(7), 0.0).is_none());
    }
}
