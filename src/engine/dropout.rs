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

/// Dropout parameters for one site: `seed` and probability `p` (p = 0 disables).
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub seed: u64,
    pub p: f32,
}

impl Dropout {
    pub fn off() -> Self {
        Dropout { seed: 0, p: 0.0 }
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
        }
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
