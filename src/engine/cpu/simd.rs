//! Vectorisable building blocks for the CPU kernels and runtime dispatch to AVX2+FMA.
//!
//! The default x86-64 target only guarantees SSE2, so hot loops are compiled twice: once
//! for the baseline and once with `avx2,fma` enabled, chosen at run time (`dispatch!`).
//! Reductions use 8 independent lanes so the compiler can keep them in vector registers;
//! the lane order is fixed, so results stay deterministic.

use std::sync::atomic::{AtomicU8, Ordering};

static AVX2: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes

/// Whether this CPU has AVX2 and FMA (checked once).
#[inline]
pub fn has_avx2_fma() -> bool {
    match AVX2.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            #[cfg(target_arch = "x86_64")]
            let yes = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            #[cfg(not(target_arch = "x86_64"))]
            let yes = false;
            AVX2.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Defines `pub fn $name(args) -> ret` that runs `$body` compiled with AVX2+FMA when the
/// CPU has them, and the baseline build of the same body otherwise.
macro_rules! dispatch {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::engine::cpu::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// e^x for f32 with ~1 ulp error on [-87, 88] (Cephes-style range reduction and
/// polynomial); branch-free so that loops over it vectorise. Inputs below -87.3 give ~1e-38.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    f32::from_bits(((n as i32 + 127) << 23) as u32) * y
}

/// tanh via [`exp`], saturating for |x| > 9.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-9.0, 9.0);
    let e = exp(2.0 * x);
    (e - 1.0) / (e + 1.0)
}

/// Sum with 8 fixed lanes.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &t in tail {
        s += t;
    }
    s
}

/// Dot product with 8 fixed lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    let (a8, b8) = (&a[..n / 8 * 8], &b[..n / 8 * 8]);
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n / 8 * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// Maximum with 8 fixed lanes.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &t in tail {
        m = m.max(t);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn reductions_match_sequential() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let s: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((sum(&xs) as f64 - s).abs() < 1e-4);
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::MIN, f32::max));
        let d: f64 = xs.iter().map(|&x| (x * x) as f64).sum();
        assert!((dot(&xs, &xs) as f64 - d).abs() < 1e-4);
        assert!((tanh(0.5) - 0.5f32.tanh()).abs() < 1e-6);
    }
}
