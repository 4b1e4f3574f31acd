//! Incremental decoding with a KV cache: each new token runs the model on one position per
//! sequence and attends over the cached keys and values, so a token costs O(current length)
//! instead of a full forward pass over the context.
//!
//! Small models decode on the calling thread (thread hand-offs would cost more than the
//! arithmetic); large ones split the weight-bound matrix-vector products across threads.

use super::kernels::{causal_softmax_row, gelu_chunk, layernorm_row, linear_forward};
use super::matmul::{small_m_matmul, Op};
use super::{opt_slice, slice, Core};
use crate::engine::{EngineError, Result};
use crate::model::GptConfig;
use rayon::prelude::*;

/// Cached keys/values per layer, `[n_seq, block_size, C]` each, plus per-token scratch.
pub(super) struct KvCache {
    pub n_seq: usize,
    pub len: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    x: Vec<f32>,
    ln: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    scores: Vec<f32>,
    tmp: Vec<f32>,
    fch: Vec<f32>,
    gelu: Vec<f32>,
    logits: Vec<f32>,
}

impl KvCache {
    pub fn new(cfg: &GptConfig, n_seq: usize) -> Self {
        let (c, s) = (cfg.n_embd, n_seq);
        let kv = || {
            (0..cfg.n_layer)
                .map(|_| vec![0f32; s * cfg.block_size * c])
                .collect()
        };
        KvCache {
            n_seq,
            len: 0,
            k: kv(),
            v: kv(),
            x: vec![0.0; s * c],
            ln: vec![0.0; s * c],
            qkv: vec![0.0; s * 3 * c],
            atty: vec![0.0; s * c],
            scores: vec![0.0; s * cfg.n_head * cfg.block_size],
            tmp: vec![0.0; s * c],
            fch: vec![0.0; s * 4 * c],
            gelu: vec![0.0; s * 4 * c],
            logits: vec![0.0; s * cfg.vocab_size],
        }
    }
}

/// Rebuilds the cache from the activations of a batched forward over `[n_seq, t]` tokens
/// (reusing the cache's memory when the batch size matches); returns the logits after each
/// row's last token.
pub(super) fn fill_from_forward(core: &mut Core, n_seq: usize, t: usize) -> Vec<f32> {
    let cfg = &core.cfg;
    let (c, t_max, v) = (cfg.n_embd, cfg.block_size, cfg.vocab_size);
    if !matches!(&core.kv, Some(kv) if kv.n_seq == n_seq) {
        core.kv = None;
        core.kv = Some(KvCache::new(cfg, n_seq));
    }
    let kv = core.kv.as_mut().expect("cache allocated just above");
    let acts = core
        .acts
        .as_ref()
        .expect("forward ran before fill_from_forward");
    for (l, la) in acts.layers.iter().enumerate() {
        for i in 0..n_seq {
            for pos in 0..t {
                let row = &la.qkv[(i * t + pos) * 3 * c..][..3 * c];
                kv.k[l][(i * t_max + pos) * c..][..c].copy_from_slice(&row[c..2 * c]);
                kv.v[l][(i * t_max + pos) * c..][..c].copy_from_slice(&row[2 * c..]);
            }
        }
    }
    kv.len = t;
    (0..n_seq)
        .flat_map(|i| {
            acts.logits[(i * t + t - 1) * v..(i * t + t) * v]
                .iter()
                .copied()
        })
        .collect()
}

/// Whether a decode step is worth spreading over threads: only when the weights are large.
pub(super) fn parallel_worth_it(cfg: &GptConfig, threads: usize) -> bool {
    let weights = 12 * cfg.n_layer * cfg.n_embd * cfg.n_embd + cfg.vocab_size * cfg.n_embd;
    threads > 1 && weights >= 1 << 21
}

fn layernorm_rows(out: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, c: usize) {
    for (o, xr) in out.chunks_mut(c).zip(x.chunks(c)) {
        layernorm_row(o, xr, w, b);
    }
}

/// Appends `tokens` (one per sequence) at position `len` and returns next-token logits.
pub(super) fn step(core: &mut Core, tokens: &[u32], th: usize) -> Result<Vec<f32>> {
    let cfg = &core.cfg;
    let Some(kv) = core.kv.as_mut() else {
        return Err(EngineError::Other(
            "decode_step called before decode_reset".into(),
        ));
    };
    let (s, c, t_max) = (kv.n_seq, cfg.n_embd, cfg.block_size);
    crate::engine::check_decode_step(t_max, cfg.vocab_size, tokens, s, kv.len)?;
    let (p, lay, pos) = (&core.params, &core.layout, kv.len);
    let (nh, hs) = (cfg.n_head, cfg.head_size());
    let scale = 1.0 / (hs as f32).sqrt();
    for (i, &tok) in tokens.iter().enumerate() {
        let te = slice(p, lay.wte + tok as usize * c, c);
        let pe = slice(p, lay.wpe + pos * c, c);
        for j in 0..c {
            kv.x[i * c + j] = te[j] + pe[j];
        }
    }
    for (l, o) in lay.blocks.iter().enumerate() {
        layernorm_rows(
            &mut kv.ln,
            &kv.x,
            slice(p, o.ln1_w, c),
            opt_slice(p, o.ln1_b, c),
            c,
        );
        let layer = super::linear(p, o.qkv_w, o.qkv_b, c, 3 * c);
        linear_forward(&mut kv.qkv, &kv.ln, &layer, s, th);
        let (kc, vc) = (&mut kv.k[l], &mut kv.v[l]);
        for i in 0..s {
            let row = &kv.qkv[i * 3 * c..(i + 1) * 3 * c];
            kc[(i * t_max + pos) * c..][..c].copy_from_slice(&row[c..2 * c]);
            vc[(i * t_max + pos) * c..][..c].copy_from_slice(&row[2 * c..]);
        }
        let (kc, vc, qkv) = (&*kc, &*vc, &kv.qkv);
        let head = |ih: usize, y: &mut [f32], scores: &mut [f32]| {
            let (i, h) = (ih / nh, ih % nh);
            let q = &qkv[i * 3 * c + h * hs..][..hs];
            for (j, sc) in scores[..=pos].iter_mut().enumerate() {
                *sc = super::simd::dot(q, &kc[(i * t_max + j) * c + h * hs..][..hs]);
            }
            causal_softmax_row(&mut scores[..=pos], pos + 1, scale);
            y.fill(0.0);
            for (j, &wgt) in scores[..=pos].iter().enumerate() {
                let vrow = &vc[(i * t_max + j) * c + h * hs..][..hs];
                for d in 0..hs {
                    y[d] += wgt * vrow[d];
                }
            }
        };
        if th > 1 {
            kv.atty
                .par_chunks_mut(hs)
                .zip(kv.scores.par_chunks_mut(t_max))
                .enumerate()
                .for_each(|(ih, (y, sc))| head(ih, y, sc));
        } else {
            for (ih, (y, sc)) in kv
                .atty
                .chunks_mut(hs)
                .zip(kv.scores.chunks_mut(t_max))
                .enumerate()
            {
                head(ih, y, sc);
            }
        }
        let layer = super::linear(p, o.attn_proj_w, o.attn_proj_b, c, c);
        linear_forward(&mut kv.tmp, &kv.atty, &layer, s, th);
        kv.x.iter_mut().zip(&kv.tmp).for_each(|(x, t)| *x += t);
        layernorm_rows(
            &mut kv.ln,
            &kv.x,
            slice(p, o.ln2_w, c),
            opt_slice(p, o.ln2_b, c),
            c,
        );
        let layer = super::linear(p, o.fc_w, o.fc_b, c, 4 * c);
        linear_forward(&mut kv.fch, &kv.ln, &layer, s, th);
        gelu_chunk(&mut kv.gelu, &kv.fch);
        let layer = super::linear(p, o.mlp_proj_w, o.mlp_proj_b, 4 * c, c);
        linear_forward(&mut kv.tmp, &kv.gelu, &layer, s, th);
        kv.x.iter_mut().zip(&kv.tmp).for_each(|(x, t)| *x += t);
    }
    layernorm_rows(
        &mut kv.ln,
        &kv.x,
        slice(p, lay.lnf_w, c),
        opt_slice(p, lay.lnf_b, c),
        c,
    );
    let v = cfg.vocab_size;
    small_m_matmul(
        &mut kv.logits,
        &kv.ln,
        slice(p, lay.wte, v * c),
        s,
        c,
        v,
        Op::NT,
        false,
        th,
    );
    kv.len += 1;
    Ok(kv.logits.clone())
}
