//! The CPU engine's layer kernels, each forward beside its backward (llm.c notation:
//! B batch, T time, C channels, NH heads, hs = C/NH head size, N = B*T rows, V vocab).
//!
//! Row-parallel work uses rayon; everything is fp32 and deterministic for a given thread
//! count (reductions over rows are done per row, never racing).

use super::matmul::{gemm_strided, matmul, Op, View};
use super::simd::{self, dispatch};
use crate::engine::dropout::{keep, Dropout};
use rayon::prelude::*;

pub const LN_EPS: f32 = 1e-5;
/// Row groups whose LayerNorm weight gradients are summed separately, then in order.
pub const LN_BACKWARD_PARTS: usize = 16;

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

/// `dwte[tok[n]] += dx[n]; dwpe[n % T] += dx[n]`. Serial over rows so that repeated tokens
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

/// Mean and rstd of one LayerNorm row (two-pass biased variance, 8 fixed lanes).
#[inline(always)]
fn layernorm_stats(x: &[f32]) -> (f32, f32) {
    let c = x.len();
    let m = simd::sum(x) / c as f32;
    let mut acc = [0f32; 8];
    let main = c / 8 * 8;
    for ch in x[..main].chunks_exact(8) {
        for i in 0..8 {
            let d = ch[i] - m;
            acc[i] += d * d;
        }
    }
    let mut var = simd::sum(&acc);
    for &v in &x[main..] {
        var += (v - m) * (v - m);
    }
    (m, 1.0 / (var / c as f32 + LN_EPS).sqrt())
}

/// `out = (x - m) * s * w (+ b)`: the normalise-scale-shift of one row with given
/// statistics, shared by the forward pass and the backward pass's recomputation
/// (`recompute=2`), so that both produce the same bits.
#[inline(always)]
fn layernorm_apply(out: &mut [f32], x: &[f32], m: f32, s: f32, w: &[f32], b: Option<&[f32]>) {
    let c = x.len();
    match b {
        Some(b) => {
            for i in 0..c {
                out[i] = (x[i] - m) * s * w[i] + b[i];
            }
        }
        None => {
            for i in 0..c {
                out[i] = (x[i] - m) * s * w[i];
            }
        }
    }
}

dispatch! {
    /// One LayerNorm row: writes the normalised, scaled row and returns (mean, rstd).
    pub fn layernorm_row(out: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>) -> (f32, f32) {
        let (m, s) = layernorm_stats(x);
        layernorm_apply(out, x, m, s, w, b);
        (m, s)
    }
}

dispatch! {
    /// Rows of `x` normalised with the given per-row `mean` and `rstd`, scaled and shifted.
    pub fn layernorm_apply_rows(out: &mut [f32], x: &[f32], mean: &[f32], rstd: &[f32], w: &[f32], b: Option<&[f32]>) {
        let c = w.len();
        for (r, (o, xr)) in out.chunks_mut(c).zip(x.chunks(c)).enumerate() {
            layernorm_apply(o, xr, mean[r], rstd[r], w, b);
        }
    }
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
                let (m, s) =
                    layernorm_row(&mut out[r * c..(r + 1) * c], &x[r * c..(r + 1) * c], w, b);
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

/// The LayerNorm output again from its input and the forward's saved `mean` and `rstd`
/// (one per row): bit for bit what [`layernorm_forward`] wrote.
pub fn layernorm_recompute(
    out: &mut [f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    threads: usize,
) {
    let c = w.len();
    let chunk = row_chunk(mean.len(), threads);
    out.par_chunks_mut(c * chunk)
        .zip(x.par_chunks(c * chunk))
        .zip(mean.par_chunks(chunk).zip(rstd.par_chunks(chunk)))
        .for_each(|((o, x), (m, s))| layernorm_apply_rows(o, x, m, s, w, b));
}

dispatch! {
    /// LayerNorm backward for one row: adds into `dx` and into the partial `pdw`, `pdb`.
    pub fn layernorm_backward_row(
        dx: &mut [f32],
        pdw: &mut [f32],
        pdb: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        m: f32,
        s: f32,
    ) {
        let c = x.len();
        let (mut a1, mut a2) = ([0f32; 8], [0f32; 8]);
        let main = c / 8 * 8;
        for i0 in (0..main).step_by(8) {
            for j in 0..8 {
                let i = i0 + j;
                let norm = (x[i] - m) * s;
                let dnorm = w[i] * dout[i];
                a1[j] += dnorm;
                a2[j] += dnorm * norm;
                pdw[i] += norm * dout[i];
                pdb[i] += dout[i];
            }
        }
        let mut dnorm_mean = simd::sum(&a1);
        let mut dnorm_norm_mean = simd::sum(&a2);
        for i in main..c {
            let norm = (x[i] - m) * s;
            let dnorm = w[i] * dout[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
            pdw[i] += norm * dout[i];
            pdb[i] += dout[i];
        }
        dnorm_mean /= c as f32;
        dnorm_norm_mean /= c as f32;
        for i in 0..c {
            let norm = (x[i] - m) * s;
            let dnorm = w[i] * dout[i];
            dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

/// Adds the LayerNorm input gradient into `dx` and (dw, db) into the given gradient slices.
/// `scratch` holds [`LN_BACKWARD_PARTS`] partial (dw, db) rows of 2*C each, summed in order.
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
) {
    // A fixed number of partial sums (not one per thread) keeps results independent of the
    // thread count.
    let rows = mean.len();
    let parts = LN_BACKWARD_PARTS.min(rows);
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
                let span = row * c..(row + 1) * c;
                layernorm_backward_row(
                    dxr,
                    pdw,
                    pdb,
                    &dout[span.clone()],
                    &x[span],
                    w,
                    mean[row],
                    rstd[row],
                );
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
// Dense layer (HF Conv1D layout): out (N, OC) = inp (N, IC) @ W [IC, OC] + b [OC]

/// The weights of one dense layer.
pub struct Linear<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub ic: usize,
    pub oc: usize,
}

/// out (rows, OC) = inp (rows, IC) @ W + b.
pub fn linear_forward(out: &mut [f32], inp: &[f32], l: &Linear, rows: usize, threads: usize) {
    if rows * l.oc < 1 << 16 {
        // few rows (decoding): stay on this thread
        match l.b {
            Some(b) => out[..rows * l.oc]
                .chunks_mut(l.oc)
                .for_each(|r| r.copy_from_slice(b)),
            None => out[..rows * l.oc].fill(0.0),
        }
    } else {
        broadcast_rows(&mut out[..rows * l.oc], l.b, l.oc);
    }
    matmul(out, inp, l.w, rows, l.ic, l.oc, Op::NN, true, threads);
}

/// Backward of [`linear_forward`]: dW += inp^T @ dout, db += column sums of dout, and
/// dinp = dout @ W^T (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    l: &Linear,
    rows: usize,
    threads: usize,
) {
    matmul(dw, inp, dout, l.ic, rows, l.oc, Op::TN, true, threads);
    if let Some(db) = db {
        bias_backward(db, dout, l.oc);
    }
    matmul(dinp, dout, l.w, rows, l.oc, l.ic, Op::NT, false, threads);
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

dispatch! {
    pub fn gelu_chunk(out: &mut [f32], x: &[f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            let t = simd::tanh(GELU_K * (x + 0.044715 * x * x * x));
            *o = 0.5 * x * (1.0 + t);
        }
    }
}

dispatch! {
    pub fn gelu_backward_chunk(d: &mut [f32], x: &[f32]) {
        for (d, &x) in d.iter_mut().zip(x) {
            let t = simd::tanh(GELU_K * (x + 0.044715 * x * x * x));
            let sech2 = 1.0 - t * t;
            let grad = 0.5 * (1.0 + t) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x);
            *d *= grad;
        }
    }
}

pub fn gelu_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(o, x)| gelu_chunk(o, x));
}

/// dx = dout * gelu'(x), written in place over `dout`.
pub fn gelu_backward_inplace(dout: &mut [f32], x: &[f32]) {
    dout.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(d, x)| gelu_backward_chunk(d, x));
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

dispatch! {
    /// Softmax of `row[..len] * scale` in place; entries from `len` on are set to zero.
    pub fn causal_softmax_row(row: &mut [f32], len: usize, scale: f32) {
        let (live, masked) = row.split_at_mut(len);
        let mx = simd::max(live) * scale;
        for v in live.iter_mut() {
            *v = simd::exp(*v * scale - mx);
        }
        let inv = 1.0 / simd::sum(live);
        for v in live.iter_mut() {
            *v *= inv;
        }
        masked.fill(0.0);
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
            causal_softmax_row(&mut a[i * t..(i + 1) * t], i + 1, scale);
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

dispatch! {
    /// Loss of one row of logits for target `tgt`. With `grad = Some(k)` the row is
    /// replaced by k * (softmax(row) - onehot(tgt)).
    pub fn xent_row(row: &mut [f32], tgt: usize, grad: Option<f32>) -> f64 {
        let mx = simd::max(row);
        let target_logit = row[tgt];
        let sum = match grad {
            Some(_) => {
                for x in row.iter_mut() {
                    *x = simd::exp(*x - mx);
                }
                simd::sum(row)
            }
            None => {
                let mut acc = [0f32; 8];
                let main = row.len() / 8 * 8;
                for ch in row[..main].chunks_exact(8) {
                    for i in 0..8 {
                        acc[i] += simd::exp(ch[i] - mx);
                    }
                }
                simd::sum(&acc) + row[main..].iter().map(|&x| simd::exp(x - mx)).sum::<f32>()
            }
        };
        if let Some(k) = grad {
            let scale = k / sum;
            for x in row.iter_mut() {
                *x *= scale;
            }
            row[tgt] -= k;
        }
        (mx as f64 + (sum as f64).ln()) - target_logit as f64
    }
}

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
            if tgt < 0 {
                *out = 0.0;
                if grad_scale.is_some() {
                    row.fill(0.0);
                }
            } else {
                *out = xent_row(row, tgt as usize, grad_scale.map(|s| s * inv));
            }
        });
    (row_loss[..targets.len()].iter().sum(), count)
}
