//! Matrix products for the CPU engine, on top of the `gemm` crate.
//!
//! All matrices are row-major f32. [`matmul`] covers the dense layer products
//! (`out (+)= op(a) @ op(b)`); [`gemm_strided`] exposes arbitrary strides for attention,
//! where q, k and v are interleaved views into the fused qkv activation.

use gemm::Parallelism;

/// A strided read-only matrix view: element (i, j) lives at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    /// Row-major `rows x cols` matrix stored contiguously in `data`.
    pub fn rows(data: &[f32], cols: usize) -> Self {
        View {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &[f32], cols: usize) -> Self {
        View {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] lhs (m x k) @ rhs (k x n)`.
///
/// # Safety
/// Every element addressed by the views and by `dst` for the given sizes and strides must be
/// in bounds of live allocations, and `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    threads: usize,
) {
    let parallelism = if threads > 1 && (m * n * k) >= 64 * 64 * 64 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Which operand is transposed in [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `out = a (m x k) @ b (k x n)`
    NN,
    /// `out = a (m x k) @ b^T`, with b stored `n x k`
    NT,
    /// `out = a^T @ b (k x n)`, with a stored `k x m`
    TN,
}

/// Dense product `out (m x n) (+)= op(a) @ op(b)` on row-major contiguous matrices.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    op: Op,
    accumulate: bool,
    threads: usize,
) {
    assert!(out.len() >= m * n, "matmul: output buffer too small");
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "matmul: input too small"
    );
    let (lhs, rhs) = match op {
        Op::NN => (View::rows(a, k), View::rows(b, n)),
        Op::NT => (View::rows(a, k), View::transposed(b, k)),
        Op::TN => (View::transposed(a, m), View::rows(b, n)),
    };
    // SAFETY: sizes were checked above; `out` is a distinct mutable borrow.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n as isize,
            accumulate,
            lhs,
            rhs,
            threads,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, op: Op) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let x = match op {
                        Op::TN => a[p * m + i],
                        _ => a[i * k + p],
                    };
                    let y = match op {
                        Op::NT => b[j * k + p],
                        _ => b[p * n + j],
                    };
                    s += x as f64 * y as f64;
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn few_row_products_match_naive_product() {
        let mut rng = crate::rng::Rng::new(4);
        for (m, k, n) in [(1, 64, 65), (3, 128, 4000), (8, 300, 1000)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            for op in [Op::NN, Op::NT] {
                for threads in [1, 2] {
                    let want = naive(&a, &b, m, k, n, op);
                    let mut out = vec![1f32; m * n];
                    matmul(&mut out, &a, &b, m, k, n, op, false, threads);
                    for (x, y) in out.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-3, "{op:?} m={m}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn all_ops_match_naive_product() {
        let mut rng = crate::rng::Rng::new(3);
        let (m, k, n) = (37, 70, 129);
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        for op in [Op::NN, Op::NT, Op::TN] {
            for threads in [1, 2] {
                let want = naive(&a, &b, m, k, n, op);
                let mut out = vec![1f32; m * n];
                matmul(&mut out, &a, &b, m, k, n, op, false, threads);
                for (x, y) in out.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{op:?} {x} vs {y}");
                }
                matmul(&mut out, &a, &b, m, k, n, op, true, threads);
                for (x, y) in out.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 2e-4, "{op:?} accumulate");
                }
            }
        }
    }
}

crate::engine::cpu::simd::dispatch! {
    /// Rows `i` of `out (m x n) (+)= a (m x k) @ b` for columns `j0..j0+out_cols` of `out`,
    /// with `b` either `k x n` (NN) or `n x k` (NT). Serial; the caller splits columns.
    pub fn small_m_block(
        out: &mut [f32],
        ldo: usize,
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        out_cols: usize,
        transposed_b: bool,
        accumulate: bool,
    ) {
        for i in 0..m {
            let row = &mut out[i * ldo..i * ldo + out_cols];
            if !accumulate {
                row.fill(0.0);
            }
            let ai = &a[i * k..(i + 1) * k];
            if transposed_b {
                for (jj, o) in row.iter_mut().enumerate() {
                    let j = j0 + jj;
                    *o += crate::engine::cpu::simd::dot(ai, &b[j * k..(j + 1) * k]);
                }
            } else {
                for (p, &s) in ai.iter().enumerate() {
                    let brow = &b[p * n + j0..p * n + j0 + out_cols];
                    for (o, &w) in row.iter_mut().zip(brow) {
                        *o += s * w;
                    }
                }
            }
        }
    }
}

/// `out (m x n) (+)= a @ op(b)` for a few rows `m` (decoding): matrix-vector products that
/// read `b` once, split over column blocks across threads when `b` is large.
#[allow(clippy::too_many_arguments)]
pub fn small_m_matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    op: Op,
    accumulate: bool,
    threads: usize,
) {
    use rayon::prelude::*;
    assert!(op != Op::TN, "small_m_matmul handles NN and NT");
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "small_m_matmul: buffer too small"
    );
    let nt = op == Op::NT;
    if threads <= 1 || k * n < (1 << 18) {
        small_m_block(out, n, a, b, m, k, n, 0, n, nt, accumulate);
        return;
    }
    // Column blocks: each task owns out[:, j0..j1]. Rows of `out` are strided, so hand out
    // raw column offsets and write through a per-task view of each row.
    let block = n.div_ceil(threads * 4).max(64);
    let out_ptr = out.as_mut_ptr() as usize;
    (0..n.div_ceil(block)).into_par_iter().for_each(|bi| {
        let j0 = bi * block;
        let cols = block.min(n - j0);
        // SAFETY: tasks write disjoint column ranges [j0, j0 + cols) of each row of `out`,
        // which is at least m x n (checked above).
        let view = unsafe {
            std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(j0), (m - 1) * n + cols)
        };
        small_m_block(view, n, a, b, m, k, n, j0, cols, nt, accumulate);
    });
}
