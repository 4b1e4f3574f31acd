//! The CPU engine's layer kernels, each forward beside its backward (llm.c notation:
//! B batch, T time, C channels, NH heads, hs = C/NH head size, N = B*T rows, V vocab).
//!
//! Row-parallel work uses rayon; everything is fp32 and deterministic for a given thread
//! count (reductions over rows are done per row, never racing).

use super::matmul::{gemm_strided, View};
use rayon::prelude::*;

pub const LN_EPS: f32 = 1e-5;

/// Rows per rayon task for row-wise kernels: large enough to amortise scheduling.
fn row_chunk(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads.max(1) * 4).max(1)
}

// ---------------------------------------------------------------------------------------
// Embedding: x[n, :] = wte[tok[n], :] + wpe[n % T, :]          x: (N, C)

pub fn embedding_forward(
    x: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    t: usize,
    c: usize,
) {
    x.par_chunks_mut(c).enumerate().for_each(|(n, row)| {
        let tok = tokens[n] as usize;
        let te = &wte[tok * c..(tok + 1) * c];
        let pe = &wpe[(n % t) * c..(n % t + 1) * c];
        for i in 0..c {
            row[i] = te[i] + pe[i];
        }
    });
}

/// dwte[tok[n]] += dx[n]; dwpe[n % T] += dx[n]. Serial over rows so that repeated tokens
/// accumulate in a fixed order (deterministic).
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dx: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    for (n, drow) in dx.chunks(c).enumerate() {
        let tok = tokens[n] as usize;
        for (w, d) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(drow) {
            *w += d;
        }
    }
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(pos, wrow)| {
            for (n, drow) in dx.chunks(c).enumerate().skip(pos).step_by(t) {
                debug_assert_eq!(n % t, pos);
                for (w, d) in wrow.iter_mut().zip(drow) {
                    *w += d;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------
// LayerNorm: out = (x - mean) * rstd * w + b, per row of C.    x, out: (N, C); mean, rstd: (N)

pub struct LnOut<'a> {
    pub out: &'a mut [f32],
    pub mean: &'a mut [f32],
    pub rstd: &'a mut [f32],
}

pub fn layernorm_forward(
    o: LnOut,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    c: usize,
    threads: usize,
) {
    let rows = o.mean.len();
    let chunk = row_chunk(rows, threads);
    o.out
        .par_chunks_mut(c * chunk)
        .zip(o.mean.par_chunks_mut(chunk))
        .zip(o.rstd.par_chunks_mut(chunk))
        .zip(x.par_chunks(c * chunk))
        .for_each(|(((out, mean), rstd), x)| {
            for r in 0..mean.len() {
                let xr = &x[r * c..(r + 1) * c];
                let m = xr.iter().sum::<f32>() / c as f32;
                let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / c as f32;
                let s = 1.0 / (var + LN_EPS).sqrt();
                let orow = &mut out[r * c..(r + 1) * c];
                match b {
                    Some(b) => {
                        for i in 0..c {
                            orow[i] = (xr[i] - m) * s * w[i] + b[i];
                        }
                    }
                    None => {
                        for i in 0..c {
                            orow[i] = (xr[i] - m) * s * w[i];
                        }
                    }
                }
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

/// Adds the LayerNorm input gradient into `dx` and returns (dw, db) accumulated into the
/// given gradient slices. `scratch` holds `threads`-many partial (dw, db) rows: 2*C each.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
    scratch: &mut [f32],
    threads: usize,
) {
    let rows = mean.len();
    let parts = threads.max(1).min(rows);
    let per = rows.div_ceil(parts);
    let scratch = &mut scratch[..parts * 2 * c];
    scratch.fill(0.0);
    scratch
        .par_chunks_mut(2 * c)
        .zip(dx.par_chunks_mut(per * c))
        .enumerate()
        .for_each(|(p, (part, dxp))| {
            let (pdw, pdb) = part.split_at_mut(c);
            let r0 = p * per;
            for (r, dxr) in dxp.chunks_mut(c).enumerate() {
                let row = r0 + r;
                let xr = &x[row * c..(row + 1) * c];
                let dr = &dout[row * c..(row + 1) * c];
                let (m, s) = (mean[row], rstd[row]);
                let mut dnorm_mean = 0f32;
                let mut dnorm_norm_mean = 0f32;
                for i in 0..c {
                    let norm = (xr[i] - m) * s;
                    let dnorm = w[i] * dr[i];
                    dnorm_mean += dnorm;
                    dnorm_norm_mean += dnorm * norm;
                    pdw[i] += norm * dr[i];
                    pdb[i] += dr[i];
                }
                dnorm_mean /= c as f32;
                dnorm_norm_mean /= c as f32;
                for i in 0..c {
                    let norm = (xr[i] - m) * s;
                    let dnorm = w[i] * dr[i];
                    dxr[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
                }
            }
        });
    for part in scratch.chunks(2 * c) {
        for i in 0..c {
            dw[i] += part[i];
        }
    }
    if let Some(db) = db {
        for part in scratch.chunks(2 * c) {
            for i in 0..c {
                db[i] += part[c + i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bias: out[n, :] = bias (before an accumulating GEMM) and dbias = column sums of dout.

pub fn broadcast_rows(out: &mut [f32], bias: Option<&[f32]>, cols: usize) {
    match bias {
        Some(b) => out
            .par_chunks_mut(cols)
            .for_each(|row| row.copy_from_slice(b)),
        None => out.par_iter_mut().for_each(|v| *v = 0.0),
    }
}

/// dbias += sum over rows of dout (N, cols). Parallel over column blocks, fixed order.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], cols: usize) {
    let block = 64;
    dbias
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(bi, db)| {
            let c0 = bi * block;
            for row in dout.chunks(cols) {
                for (j, d) in db.iter_mut().enumerate() {
                    *d += row[c0 + j];
                }
            }
        });
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation, as GPT-2):  out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)

#[inline]
fn tanh_fast(x: f32) -> f32 {
    // tanh via exp; exact to fp32 rounding for the range that matters and saturating beyond.
    if x > 9.0 {
        return 1.0;
    }
    if x < -9.0 {
        return -1.0;
    }
    let e = (2.0 * x).exp();
    (e - 1.0) / (e + 1.0)
}

pub fn gelu_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                let t = tanh_fast(GELU_K * (x + 0.044715 * x * x * x));
                *o = 0.5 * x * (1.0 + t);
            }
        });
}

/// dx = dout * gelu'(x), written in place over `dout`.
pub fn gelu_backward_inplace(dout: &mut [f32], x: &[f32]) {
    dout.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(d, x)| {
            for (d, &x) in d.iter_mut().zip(x) {
                let u = GELU_K * (x + 0.044715 * x * x * x);
                let t = tanh_fast(u);
                let sech2 = 1.0 - t * t;
                let grad =
                    0.5 * (1.0 + t) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
                *d *= grad;
            }
        });
}

// ---------------------------------------------------------------------------------------
// Dropout with a counter-based mask: element i of a site is kept when
// hash(seed, i) >= p * 2^32. Masks are recomputed in the backward pass, never stored, and do
// not depend on the thread count.

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

// ---------------------------------------------------------------------------------------
// Causal self-attention over fused qkv (N, 3C): per (b, h), q/k/v are (T, hs) views with row
// stride 3C. att: (B, NH, T, T) softmax probabilities before dropout. y: (N, C).

pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub c: usize,
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

pub fn attention_forward(
    y: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    s: &AttnShape,
    drop: Dropout,
) {
    let (t, nh, c) = (s.t, s.nh, s.c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    let y_ptr = SendPtr(y.as_mut_ptr());
    let (th, dscale) = (drop.threshold(), drop.scale());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, a)| {
        let (bi, h) = (bh / nh, bh % nh);
        let base = bi * t * c3;
        let q = View {
            ptr: qkv[base + h * hs..].as_ptr(),
            rs: c3 as isize,
            cs: 1,
        };
        let kt = View {
            ptr: qkv[base + c + h * hs..].as_ptr(),
            rs: 1,
            cs: c3 as isize,
        };
        // SAFETY: q/k views stay inside qkv's (b, :, :) slab; `a` is this task's T x T block.
        unsafe { gemm_strided(t, t, hs, a.as_mut_ptr(), t as isize, false, q, kt, 1) };
        for i in 0..t {
            let row = &mut a[i * t..(i + 1) * t];
            let mut mx = f32::NEG_INFINITY;
            for v in row[..=i].iter_mut() {
                *v *= scale;
                mx = mx.max(*v);
            }
            let mut sum = 0f32;
            for v in row[..=i].iter_mut() {
                *v = (*v - mx).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row[..=i].iter_mut() {
                *v *= inv;
            }
            row[i + 1..].fill(0.0);
        }
        let v = View {
            ptr: qkv[base + 2 * c + h * hs..].as_ptr(),
            rs: c3 as isize,
            cs: 1,
        };
        // SAFETY: this task writes only the (b, :, h*hs..(h+1)*hs) block of y.
        let y_dst = unsafe { y_ptr.get().add(bi * t * c + h * hs) };
        if drop.active() {
            // y = dropout(P) @ v, computed row by row from the recomputable mask.
            let site = (bh * t * t) as u64;
            for i in 0..t {
                let yrow = unsafe { std::slice::from_raw_parts_mut(y_dst.add(i * c), hs) };
                yrow.fill(0.0);
                for j in 0..=i {
                    let idx = site + (i * t + j) as u64;
                    if keep(drop.seed, idx, th) {
                        let p = a[i * t + j] * dscale;
                        let vrow = &qkv[base + j * c3 + 2 * c + h * hs..][..hs];
                        for d in 0..hs {
                            yrow[d] += p * vrow[d];
                        }
                    }
                }
            }
        } else {
            let p = View::rows(a, t);
            unsafe { gemm_strided(t, hs, t, y_dst, c as isize, false, p, v, 1) };
        }
    });
}

/// dqkv (N, 3C) = gradient of attention given dy (N, C). `scratch` is (B, NH, T, T).
pub fn attention_backward(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dy: &[f32],
    att: &[f32],
    qkv: &[f32],
    s: &AttnShape,
    drop: Dropout,
) {
    let (t, nh, c) = (s.t, s.nh, s.c);
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    let c3 = 3 * c;
    let dqkv_ptr = SendPtr(dqkv.as_mut_ptr());
    let (th, dscale) = (drop.threshold(), drop.scale());
    scratch
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, dp)| {
            let (bi, h) = (bh / nh, bh % nh);
            let base = bi * t * c3;
            let a = &att[bh * t * t..(bh + 1) * t * t];
            let site = (bh * t * t) as u64;
            let dy_v = View {
                ptr: dy[bi * t * c + h * hs..].as_ptr(),
                rs: c as isize,
                cs: 1,
            };
            let v_t = View {
                ptr: qkv[base + 2 * c + h * hs..].as_ptr(),
                rs: 1,
                cs: c3 as isize,
            };
            // dPd = dy @ v^T  (T x T)
            unsafe { gemm_strided(t, t, hs, dp.as_mut_ptr(), t as isize, false, dy_v, v_t, 1) };
            let dq = unsafe { dqkv_ptr.get().add(base + h * hs) };
            let dk = unsafe { dqkv_ptr.get().add(base + c + h * hs) };
            let dv = unsafe { dqkv_ptr.get().add(base + 2 * c + h * hs) };
            // dv = Pd^T @ dy, with Pd the dropped probabilities; reuse nothing: build Pd^T on the fly.
            if drop.active() {
                for j in 0..t {
                    let dvrow = unsafe { std::slice::from_raw_parts_mut(dv.add(j * c3), hs) };
                    dvrow.fill(0.0);
                }
                for i in 0..t {
                    let dyrow = &dy[(bi * t + i) * c + h * hs..][..hs];
                    for j in 0..=i {
                        if keep(drop.seed, site + (i * t + j) as u64, th) {
                            let p = a[i * t + j] * dscale;
                            let dvrow =
                                unsafe { std::slice::from_raw_parts_mut(dv.add(j * c3), hs) };
                            for d in 0..hs {
                                dvrow[d] += p * dyrow[d];
                            }
                        } else {
                            dp[i * t + j] = 0.0;
                        }
                    }
                }
                for i in 0..t {
                    for j in 0..=i {
                        dp[i * t + j] *= dscale;
                    }
                }
            } else {
                let pt = View::transposed(a, t);
                unsafe { gemm_strided(t, hs, t, dv, c3 as isize, false, pt, dy_v, 1) };
            }
            // softmax backward in place: dS = P * (dP - sum_j P dP), then the 1/sqrt(hs) scale.
            for i in 0..t {
                let prow = &a[i * t..i * t + i + 1];
                let drow = &mut dp[i * t..(i + 1) * t];
                let dot: f32 = prow.iter().zip(&drow[..=i]).map(|(p, d)| p * d).sum();
                for j in 0..=i {
                    drow[j] = prow[j] * (drow[j] - dot) * scale;
                }
                drow[i + 1..].fill(0.0);
            }
            let ds = View::rows(dp, t);
            let k = View {
                ptr: qkv[base + c + h * hs..].as_ptr(),
                rs: c3 as isize,
                cs: 1,
            };
            let q = View {
                ptr: qkv[base + h * hs..].as_ptr(),
                rs: c3 as isize,
                cs: 1,
            };
            let ds_t = View::transposed(dp, t);
            unsafe {
                // dq = dS @ k ; dk = dS^T @ q
                gemm_strided(t, hs, t, dq, c3 as isize, false, ds, k, 1);
                gemm_strided(t, hs, t, dk, c3 as isize, false, ds_t, q, 1);
            }
        });
}

// ---------------------------------------------------------------------------------------
// Softmax cross-entropy over the real vocabulary V of logits (N, V). Targets of -1 are
// skipped. With `grad_scale = Some(s)` the logits are overwritten in place by
// d(loss * s)/d(logits), where loss is the mean over counted positions.

/// Returns (sum of losses over counted rows, number of counted rows). `row_loss` is a
/// scratch of N values (per-row losses, summed in order so the result is deterministic).
pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    v: usize,
    grad_scale: Option<f32>,
    row_loss: &mut [f64],
) -> (f64, usize) {
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let inv = if count > 0 { 1.0 / count as f32 } else { 0.0 };
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter())
        .zip(row_loss.par_iter_mut())
        .for_each(|((row, &tgt), out)| {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let target_logit = if tgt >= 0 { row[tgt as usize] } else { 0.0 };
            let mut sum = 0f32;
            match grad_scale {
                Some(_) => {
                    for x in row.iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                }
                None => {
                    for x in row.iter() {
                        sum += (*x - mx).exp();
                    }
                }
            }
            *out = if tgt >= 0 {
                (mx + sum.ln() - target_logit) as f64
            } else {
                0.0
            };
            if let Some(s) = grad_scale {
                if tgt < 0 {
                    row.fill(0.0);
                } else {
                    let k = s * inv / sum;
                    for x in row.iter_mut() {
                        *x *= k;
                    }
                    row[tgt as usize] -= s * inv;
                }
            }
        });
    (row_loss[..targets.len()].iter().sum(), count)
}
