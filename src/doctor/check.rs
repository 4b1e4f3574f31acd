//! The host side of the GPU self-tests: inputs, CPU references and pass/fail rules. Kept
//! apart from the GPU calls so that it is tested on machines without a GPU.

use crate::cuda::bf16::{bf16_bits_to_f32, f32_to_bf16_bits, same_f32, selftest_reference};
use crate::rng::Rng;

/// Inputs of the conversion/reduction kernel: the first warp holds awkward finite cases
/// (ties both ways, subnormals, signed zeros), the second the non-finite ones (overflow to
/// infinity, infinities, NaN), the rest are random values over many magnitudes.
pub fn selftest_inputs(n: usize, seed: u64) -> Vec<f32> {
    const FINITE: [u32; 14] = [
        0x3f80_8000, // 1 + 2^-8: tie, rounds down to even
        0x3f81_8000, // tie, rounds up to even
        0x3f80_8001, // just above a tie
        0x3f80_7fff, // just below a tie
        0x0000_0001, // smallest subnormal
        0x8040_0000, // negative subnormal
        0x0000_0000, // +0
        0x8000_0000, // -0
        0x3f80_0000, // 1
        0xbf80_0000, // -1
        0x4049_0fdb, // pi
        0x3dcc_cccd, // 0.1
        0x4b80_0001, // 2^24 + 2
        0xc2f6_e979, // -123.456
    ];
    const NON_FINITE: [u32; 5] = [
        0x7f7f_ffff, // f32::MAX: overflows to +inf
        0xff7f_ffff, // -f32::MAX: overflows to -inf
        0x7f80_0000, // +inf
        0xff80_0000, // -inf
        0x7fc0_0001, // NaN with payload: stays NaN
    ];
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let special = if i < 32 {
                FINITE.get(i)
            } else if i < 64 {
                NON_FINITE.get(i - 32)
            } else {
                None
            };
            match special {
                Some(&b) => f32::from_bits(b),
                None => {
                    let mantissa = rng.next_f32() * 2.0 - 1.0;
                    let exp = (rng.below(40) as i32) - 20;
                    mantissa * (2.0f32).powi(exp)
                }
            }
        })
        .collect()
}

/// Compares the kernel's outputs with the host reference; the error names the first
/// mismatches.
pub fn compare_selftest(x: &[f32], bits: &[u16], sums: &[f32]) -> Result<(), String> {
    let (want_bits, want_sums) = selftest_reference(x);
    if bits.len() != want_bits.len() || sums.len() != want_sums.len() {
        return Err(format!(
            "output sizes {} / {} differ from the expected {} / {}",
            bits.len(),
            sums.len(),
            want_bits.len(),
            want_sums.len()
        ));
    }
    let bad_bits: Vec<String> = (0..x.len())
        .filter(|&i| bits[i] != want_bits[i])
        .take(3)
        .map(|i| {
            format!(
                "x[{i}] = {:#010x}: GPU bf16 {:#06x}, CPU {:#06x}",
                x[i].to_bits(),
                bits[i],
                want_bits[i]
            )
        })
        .collect();
    if !bad_bits.is_empty() {
        return Err(format!("bf16 conversion differs: {}", bad_bits.join("; ")));
    }
    let bad_sums: Vec<String> = (0..sums.len())
        .filter(|&w| !same_f32(sums[w], want_sums[w]))
        .take(3)
        .map(|w| format!("warp {w}: GPU {:e}, CPU {:e}", sums[w], want_sums[w]))
        .collect();
    if !bad_sums.is_empty() {
        return Err(format!("warp reduction differs: {}", bad_sums.join("; ")));
    }
    Ok(())
}

/// `n` bf16 values uniform in [-1, 1].
pub fn random_bf16(n: usize, seed: u64) -> Vec<u16> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| f32_to_bf16_bits(rng.next_f32() * 2.0 - 1.0))
        .collect()
}

/// The elements of an `m x n` product that are checked: an 8 x 8 block at a random place
/// and 64 scattered elements (corners included).
pub fn gemm_sample_points(m: usize, n: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut pts = Vec::new();
    let (bm, bn) = (8.min(m), 8.min(n));
    let r0 = rng.below((m - bm + 1) as u64) as usize;
    let c0 = rng.below((n - bn + 1) as u64) as usize;
    for i in r0..r0 + bm {
        for j in c0..c0 + bn {
            pts.push((i, j));
        }
    }
    pts.extend([(0, 0), (0, n - 1), (m - 1, 0), (m - 1, n - 1)]);
    for _ in 0..60 {
        pts.push((rng.below(m as u64) as usize, rng.below(n as u64) as usize));
    }
    pts
}

/// Relative tolerance of a checked element, as a fraction of `sum_k |x w|`: fp32
/// accumulation in any order (and tensor-core partial sums) stays far below it, while a
/// wrong layout, transposition or shifted index lands far above. The doctor's GEMM writes
/// fp32, so no output rounding enters.
pub const GEMM_REL_TOL: f64 = 1.0 / 4096.0;

/// The result of checking sampled elements of `d = x w^T`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmCheck {
    pub checked: usize,
    /// Largest `|got - want| / (sum_k |x w| + 1e-30)` seen.
    pub worst_ratio: f64,
    /// The worst element: (row, col, got, want).
    pub worst: (usize, usize, f64, f64),
}

impl GemmCheck {
    pub fn ok(&self) -> bool {
        self.worst_ratio <= GEMM_REL_TOL
    }
}

/// Checks `d` (row-major `m x n`, from the GPU) against an f64 reference of
/// `sum_k x[i,k] w[j,k]` (bf16 row-major `m x k` and `n x k`) at `points`.
pub fn check_gemm(
    x: &[u16],
    w: &[u16],
    d: &[f32],
    (m, n, k): (usize, usize, usize),
    points: &[(usize, usize)],
) -> GemmCheck {
    assert!(
        x.len() == m * k && w.len() == n * k && d.len() == m * n,
        "check_gemm: buffers must match the shapes (caller invariant)"
    );
    let mut out = GemmCheck {
        checked: 0,
        worst_ratio: 0.0,
        worst: (0, 0, 0.0, 0.0),
    };
    for &(i, j) in points {
        let (xr, wr) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        let (mut want, mut abs) = (0.0f64, 0.0f64);
        for (&a, &b) in xr.iter().zip(wr) {
            let p = bf16_bits_to_f32(a) as f64 * bf16_bits_to_f32(b) as f64;
            want += p;
            abs += p.abs();
        }
        let got = d[i * n + j] as f64;
        let ratio = if got.is_finite() {
            (got - want).abs() / (abs + 1e-30)
        } else {
            f64::INFINITY
        };
        if ratio > out.worst_ratio || out.checked == 0 {
            out.worst_ratio = out.worst_ratio.max(ratio);
            out.worst = (i, j, got, want);
        }
        out.checked += 1;
    }
    out
}

/// TFLOP/s of `iters` products of `m x n x k` in `ms` milliseconds.
pub fn tflops(m: usize, n: usize, k: usize, iters: usize, ms: f64) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64 * iters as f64 / (ms * 1e-3) / 1e12
}

/// GB/s of `iters` copies of `bytes`, counting bytes read plus bytes written.
pub fn copy_gbps(bytes: usize, iters: usize, ms: f64) -> f64 {
    2.0 * bytes as f64 * iters as f64 / (ms * 1e-3) / 1e9
}

/// Number of timed GEMM iterations: about 100 at 4096^3, at least 5.
pub fn gemm_iters(m: usize, n: usize, k: usize) -> usize {
    let work = m as f64 * n as f64 * k as f64;
    ((100.0 * 4096f64.powi(3) / work) as usize).clamp(5, 1000)
}

/// The pattern written before the copy test; position-dependent so that shifted or
/// partial copies are caught.
pub fn copy_pattern(words: usize, seed: u32) -> Vec<u32> {
    (0..words as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) ^ seed)
        .collect()
}

/// Input of GPU `rank` in the all-reduce test, and the exact expected sum over `ranks`.
pub fn allreduce_input(count: usize, rank: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((i % 1000) as f32) * (rank + 1) as f32)
        .collect()
}

pub fn allreduce_expected(count: usize, ranks: usize) -> Vec<f32> {
    let factor = (ranks * (ranks + 1) / 2) as f32;
    (0..count).map(|i| ((i % 1000) as f32) * factor).collect()
}

/// The first index where `got` and `want` differ, with both values.
pub fn first_difference<T: PartialEq + Copy>(got: &[T], want: &[T]) -> Option<(usize, T, T)> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| (i, got[i], want[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(x: &[u16], w: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut d = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for kk in 0..k {
                    s += bf16_bits_to_f32(x[i * k + kk]) * bf16_bits_to_f32(w[j * k + kk]);
                }
                d[i * n + j] = s;
            }
        }
        d
    }

    #[test]
    fn gemm_check_accepts_fp32_in_any_order_and_rejects_layout_errors() {
        let (m, n, k) = (48, 40, 512);
        let x = random_bf16(m * k, 1);
        let w = random_bf16(n * k, 2);
        let pts = gemm_sample_points(m, n, 3);
        assert_eq!(pts.len(), 64 + 4 + 60);
        let d = product(&x, &w, m, n, k);
        let c = check_gemm(&x, &w, &d, (m, n, k), &pts);
        assert!(c.ok(), "fp32 sequential sum must pass: {c:?}");
        assert!(c.worst_ratio < 1e-5, "{c:?}");
        assert_eq!(c.checked, pts.len());
        // Partial sums in another order (as tensor cores and split-K do) still pass.
        let mut reordered = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut parts = [0f32; 8];
                for kk in 0..k {
                    parts[kk % 8] +=
                        bf16_bits_to_f32(x[i * k + kk]) * bf16_bits_to_f32(w[j * k + kk]);
                }
                reordered[i * n + j] = parts.iter().sum();
            }
        }
        assert!(check_gemm(&x, &w, &reordered, (m, n, k), &pts).ok());
        // x w (w read as k x n, the transposition mistake) fails.
        let mut wt = vec![0u16; n * k];
        for j in 0..n {
            for kk in 0..k {
                wt[j * k + kk] = w[(kk * n + j) % (n * k)];
            }
        }
        let bad = product(&x, &wt, m, n, k);
        assert!(!check_gemm(&x, &w, &bad, (m, n, k), &pts).ok());
        // A result shifted by one column fails.
        let mut shifted = d.clone();
        shifted.rotate_left(1);
        let s = check_gemm(&x, &w, &shifted, (m, n, k), &pts);
        assert!(!s.ok() && s.worst_ratio > 10.0 * GEMM_REL_TOL, "{s:?}");
        // NaN output fails.
        let mut nan = d.clone();
        let (i, j) = pts[5];
        nan[i * n + j] = f32::NAN;
        let c = check_gemm(&x, &w, &nan, (m, n, k), &pts);
        assert!(!c.ok() && c.worst.0 == i && c.worst.1 == j);
    }

    #[test]
    fn selftest_comparison_finds_wrong_bits_and_sums() {
        let x = selftest_inputs(1000, 9);
        assert_eq!(x[0].to_bits(), 0x3f80_8000);
        assert!(x[36].is_nan());
        let (bits, sums) = selftest_reference(&x);
        assert_eq!(sums.len(), 32);
        assert_eq!(bits[32], 0x7f80, "f32::MAX rounds to +inf");
        assert!(sums[0].is_finite(), "warp 0 holds only finite cases");
        assert!(sums[1].is_nan(), "the NaN lane makes warp 1 NaN");
        assert!(sums[2..].iter().all(|s| s.is_finite()));
        compare_selftest(&x, &bits, &sums).unwrap();
        // Truncation instead of rounding is caught.
        let truncated: Vec<u16> = x.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let e = compare_selftest(&x, &truncated, &sums).unwrap_err();
        assert!(
            e.contains("bf16 conversion differs") && e.contains("x[1] = 0x3f818000"),
            "{e}"
        );
        // A sequential (not butterfly) sum is caught on some warp.
        let seq: Vec<f32> = bits
            .chunks(32)
            .map(|c| c.iter().map(|&b| bf16_bits_to_f32(b)).sum())
            .collect();
        let mut differs = false;
        for (a, b) in seq.iter().zip(&sums) {
            differs |= !same_f32(*a, *b);
        }
        if differs {
            assert!(compare_selftest(&x, &bits, &seq).is_err());
        }
        let mut off = sums.clone();
        off[7] += 1.0;
        let e = compare_selftest(&x, &bits, &off).unwrap_err();
        assert!(e.contains("warp 7"), "{e}");
        assert!(compare_selftest(&x, &bits[1..], &sums).is_err());
    }

    #[test]
    fn rates_and_patterns() {
        assert!((tflops(4096, 4096, 4096, 100, 200.0) - 68.72).abs() < 0.01);
        assert_eq!(copy_gbps(1_000_000_000, 1, 1000.0), 2.0);
        assert_eq!(gemm_iters(4096, 4096, 4096), 100);
        assert_eq!(gemm_iters(16384, 16384, 16384), 5);
        assert_eq!(gemm_iters(256, 256, 256), 1000);
        let p = copy_pattern(1000, 7);
        assert_eq!(p[0], 7);
        assert_ne!(p[1], p[2]);
        let sum = allreduce_expected(2000, 3);
        let mut acc = vec![0f32; 2000];
        for r in 0..3 {
            for (a, v) in acc.iter_mut().zip(allreduce_input(2000, r)) {
                *a += v;
            }
        }
        assert_eq!(first_difference(&acc, &sum), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some((1, 2, 5)));
    }
}
