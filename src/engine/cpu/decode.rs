//! Incremental decoding with a KV cache: each new token runs the model on one position per
//! sequence and attends over the cached keys and values, so a token costs O(current length)
//! instead of a full forward pass over the context.

use super::kernels::{self, LnOut};
use super::matmul::{matmul, Op};
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
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
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
            mean: vec![0.0; s],
            rstd: vec![0.0; s],
            qkv: vec![0.0; s * 3 * c],
            atty: vec![0.0; s * c],
            tmp: vec![0.0; s * c],
            fch: vec![0.0; s * 4 * c],
            gelu: vec![0.0; s * 4 * c],
            logits: vec![0.0; s * cfg.vocab_size],
        }
    }
}

/// Appends `tokens` (one per sequence) at position `len` and returns next-token logits.
pub(super) fn step(core: &mut Core, tokens: &[u32]) -> Result<Vec<f32>> {
    let cfg = &core.cfg;
    let Some(kv) = core.kv.as_mut() else {
        return Err(EngineError::Other(
            "decode_step called before decode_reset".into(),
        ));
    };
    let (s, c, t_max, th) = (kv.n_seq, cfg.n_embd, cfg.block_size, core.threads);
    if tokens.len() != s {
        return Err(EngineError::Shape(format!(
            "decode_step needs {s} tokens (one per sequence), got {}",
            tokens.len()
        )));
    }
    if kv.len >= t_max {
        return Err(EngineError::TooLong {
            t: kv.len + 1,
            block_size: t_max,
        });
    }
    if let Some((pos, &id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= cfg.vocab_size)
    {
        return Err(EngineError::TokenOutOfRange {
            id,
            pos,
            vocab: cfg.vocab_size,
        });
    }
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
        kernels::layernorm_forward(
            LnOut {
                out: &mut kv.ln,
                mean: &mut kv.mean,
                rstd: &mut kv.rstd,
            },
            &kv.x,
            slice(p, o.ln1_w, c),
            opt_slice(p, o.ln1_b, c),
            c,
            th,
        );
        kernels::broadcast_rows(&mut kv.qkv, opt_slice(p, o.qkv_b, 3 * c), 3 * c);
        matmul(
            &mut kv.qkv,
            &kv.ln,
            slice(p, o.qkv_w, 3 * c * c),
            s,
            c,
            3 * c,
            Op::NN,
            true,
            th,
        );
        let (kc, vc) = (&mut kv.k[l], &mut kv.v[l]);
        for i in 0..s {
            let row = &kv.qkv[i * 3 * c..(i + 1) * 3 * c];
            kc[(i * t_max + pos) * c..][..c].copy_from_slice(&row[c..2 * c]);
            vc[(i * t_max + pos) * c..][..c].copy_from_slice(&row[2 * c..]);
        }
        let (kc, vc, qkv) = (&*kc, &*vc, &kv.qkv);
        kv.atty.par_chunks_mut(hs).enumerate().for_each(|(ih, y)| {
            let (i, h) = (ih / nh, ih % nh);
            let q = &qkv[i * 3 * c + h * hs..][..hs];
            let mut scores = Vec::with_capacity(pos + 1);
            let mut mx = f32::NEG_INFINITY;
            for j in 0..=pos {
                let k = &kc[(i * t_max + j) * c + h * hs..][..hs];
                let sc = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - mx).exp();
                sum += *sc;
            }
            y.fill(0.0);
            for (j, w) in scores.iter().enumerate() {
                let vrow = &vc[(i * t_max + j) * c + h * hs..][..hs];
                let w = w / sum;
                for d in 0..hs {
                    y[d] += w * vrow[d];
                }
            }
        });
        kernels::broadcast_rows(&mut kv.tmp, opt_slice(p, o.attn_proj_b, c), c);
        matmul(
            &mut kv.tmp,
            &kv.atty,
            slice(p, o.attn_proj_w, c * c),
            s,
            c,
            c,
            Op::NN,
            true,
            th,
        );
        super::add_inplace(&mut kv.x, &kv.tmp);
        kernels::layernorm_forward(
            LnOut {
                out: &mut kv.ln,
                mean: &mut kv.mean,
                rstd: &mut kv.rstd,
            },
            &kv.x,
            slice(p, o.ln2_w, c),
            opt_slice(p, o.ln2_b, c),
            c,
            th,
        );
        kernels::broadcast_rows(&mut kv.fch, opt_slice(p, o.fc_b, 4 * c), 4 * c);
        matmul(
            &mut kv.fch,
            &kv.ln,
            slice(p, o.fc_w, 4 * c * c),
            s,
            c,
            4 * c,
            Op::NN,
            true,
            th,
        );
        kernels::gelu_forward(&mut kv.gelu, &kv.fch);
        kernels::broadcast_rows(&mut kv.tmp, opt_slice(p, o.mlp_proj_b, c), c);
        matmul(
            &mut kv.tmp,
            &kv.gelu,
            slice(p, o.mlp_proj_w, 4 * c * c),
            s,
            4 * c,
            c,
            Op::NN,
            true,
            th,
        );
        super::add_inplace(&mut kv.x, &kv.tmp);
    }
    kernels::layernorm_forward(
        LnOut {
            out: &mut kv.ln,
            mean: &mut kv.mean,
            rstd: &mut kv.rstd,
        },
        &kv.x,
        slice(p, lay.lnf_w, c),
        opt_slice(p, lay.lnf_b, c),
        c,
        th,
    );
    let v = cfg.vocab_size;
    matmul(
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
