//! Incremental decoding on the GPU with a KV cache: the keys and values of every layer stay
//! on the device for `n_seq` sequences of up to block_size positions, so a new token runs
//! the model on one position per sequence (GEMMs with M = n_seq) and attends over the cached
//! positions: O(current length) per token instead of a forward pass over the whole context.
//!
//! Semantics are the CPU engine's (`engine::cpu::decode`): `decode_prefill` replaces the
//! cache with the given context (one batched pass over its `n_seq * t` tokens, which writes
//! the keys and values of every position and returns the logits of each row's last token);
//! `decode_step` appends one token per sequence at position `len` and returns next-token
//! logits; a step with the cache full (`len == block_size`) is refused with
//! [`EngineError::TooLong`], and the sampler then re-prefills the cropped window
//! (`sample::generate` keeps the last block_size/2 tokens).
//!
//! Prefill and step are the same pass over `nq` new tokens per sequence starting at
//! position `pos0` (prefill: nq = t, pos0 = 0; step: nq = 1, pos0 = len), through the
//! engine's own helpers (LayerNorm, bias + GEMM, GELU, residual adds) and two kernels of
//! `kernels/decode.cu`: `decode_kv_append` copies the new keys/values into the cache and
//! `decode_attention` runs one block per (row, head) over the cached positions (fp32 scores
//! in shared memory, tiled with an online softmax). Only the last position of each sequence
//! goes through the LM head, over the real vocabulary.
//!
//! Device memory is allocated on first use (`decode_reset` cannot fail): the cache
//! (2 * n_layer * n_seq * block_size * C floats), the logits and per-pass scratch sized for
//! the largest pass so far; it is kept across resets and prefills with the same `n_seq`.

use super::kernels::{grid_vec, Arg, BLOCK};
use super::{at, cuda_err, Buf, CResult, CudaEngine, LnOut, Out, Src};
use crate::cuda::cublas::Operand;
use crate::cuda::driver::Context;
use crate::engine::{EngineError, Result};
use crate::model::GptConfig;

// decode_attention's shared arrays are sized for blocks of 256 threads (kernels/decode.cu).
const _: () = assert!(
    BLOCK == 256,
    "decode_attention runs with 256 threads per block"
);

/// Keys, values and logits: fixed for a given `n_seq`.
struct Cache {
    /// Per layer, `[n_seq, block_size, C]`.
    k: Vec<Buf>,
    v: Vec<Buf>,
    /// `[n_seq, vocab_size]`.
    logits: Buf,
}

/// Activations of one pass over `rows` new tokens (sized for the largest pass so far).
struct Scratch {
    rows: usize,
    tokens: Buf,
    x: Buf,
    ln: Buf,
    mean: Buf,
    rstd: Buf,
    qkv: Buf,
    atty: Buf,
    tmp: Buf,
    fch: Buf,
    gelu: Buf,
}

/// The decoding state of the engine: how many sequences, how many positions are cached,
/// and the device memory (allocated on first use).
pub(super) struct DecodeState {
    n_seq: usize,
    len: usize,
    cache: Option<Cache>,
    scratch: Option<Scratch>,
}

impl DecodeState {
    pub(super) fn new(n_seq: usize) -> DecodeState {
        DecodeState {
            n_seq,
            len: 0,
            cache: None,
            scratch: None,
        }
    }

    /// Positions held in the cache (per sequence).
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Empties the cache for `n_seq` sequences, keeping the memory when `n_seq` is unchanged.
    pub(super) fn reset(state: &mut Option<DecodeState>, n_seq: usize) {
        match state {
            Some(st) if st.n_seq == n_seq => st.len = 0,
            _ => *state = Some(DecodeState::new(n_seq)),
        }
    }

    /// Allocates the cache and scratch for a pass over `rows` new tokens.
    fn ensure(&mut self, ctx: &Context<'static>, cfg: &GptConfig, rows: usize) -> Result<()> {
        let (c, s) = (cfg.n_embd, self.n_seq);
        if rows.saturating_mul(cfg.n_head) > i32::MAX as usize {
            return Err(EngineError::Other(format!(
                "decoding {s} sequences of {} tokens at once is too many for one kernel \
                 launch; sample fewer sequences (num_samples)",
                rows / s.max(1)
            )));
        }
        if self.cache.is_none() {
            let per = s * cfg.block_size * c;
            let mib = (2 * cfg.n_layer * per * 4) >> 20;
            let oom = |e| {
                EngineError::Other(format!(
                    "CUDA: cannot allocate the KV cache ({mib} MiB for {s} sequences of \
                     block_size {} over {} layers): {e}; sample fewer sequences (num_samples)",
                    cfg.block_size, cfg.n_layer
                ))
            };
            let mut k = Vec::with_capacity(cfg.n_layer);
            let mut v = Vec::with_capacity(cfg.n_layer);
            for _ in 0..cfg.n_layer {
                k.push(ctx.alloc(4 * per).map_err(oom)?);
                v.push(ctx.alloc(4 * per).map_err(oom)?);
            }
            let logits = ctx.alloc(4 * s * cfg.vocab_size).map_err(oom)?;
            self.cache = Some(Cache { k, v, logits });
        }
        if !matches!(&self.scratch, Some(sc) if sc.rows >= rows) {
            self.scratch = None; // free the smaller one first
            let oom = |e| {
                EngineError::Other(format!(
                    "CUDA: cannot allocate the decoding activations for {rows} tokens \
                     ({} MiB): {e}; use a shorter prompt or fewer samples",
                    (rows * (15 * c + 3) * 4) >> 20
                ))
            };
            let z = |len: usize| ctx.alloc(4 * len).map_err(oom);
            self.scratch = Some(Scratch {
                rows,
                tokens: z(rows)?,
                x: z(rows * c)?,
                ln: z(rows * c)?,
                mean: z(rows)?,
                rstd: z(rows)?,
                qkv: z(rows * 3 * c)?,
                atty: z(rows * c)?,
                tmp: z(rows * c)?,
                fch: z(rows * 4 * c)?,
                gelu: z(rows * 4 * c)?,
            });
        }
        Ok(())
    }
}

impl CudaEngine {
    /// `decode_prefill`: replaces the cache with `tokens` (`n_seq` rows of equal length).
    pub(super) fn kv_prefill(&mut self, tokens: &[u32], n_seq: usize) -> Result<Vec<f32>> {
        let t = super::super::check_prefill(&self.cfg, tokens, n_seq)?;
        DecodeState::reset(&mut self.decode, n_seq);
        let st = self.decode.as_mut().expect("decode state set just above");
        st.ensure(&self.ctx, &self.cfg, n_seq * t)?;
        let logits = self.kv_run(tokens, t, 0)?;
        self.decode.as_mut().expect("kv_run keeps the state").len = t;
        Ok(logits)
    }

    /// `decode_step`: appends one token per sequence.
    pub(super) fn kv_step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (block, vocab) = (self.cfg.block_size, self.cfg.vocab_size);
        let Some(st) = self.decode.as_mut() else {
            return Err(EngineError::Other(
                "decode_step called before decode_reset".into(),
            ));
        };
        super::super::check_decode_step(block, vocab, tokens, st.n_seq, st.len)?;
        let pos = st.len;
        st.ensure(&self.ctx, &self.cfg, st.n_seq)?;
        let logits = self.kv_run(tokens, 1, pos)?;
        self.decode.as_mut().expect("kv_run keeps the state").len = pos + 1;
        Ok(logits)
    }

    /// Runs [`CudaEngine::kv_pass`] with the state taken out of `self` (and put back).
    fn kv_run(&mut self, tokens: &[u32], nq: usize, pos0: usize) -> Result<Vec<f32>> {
        let st = self.decode.take().expect("decode state present");
        let r = self.kv_pass(&st, tokens, nq, pos0);
        self.decode = Some(st);
        r.map_err(cuda_err)
    }

    /// One pass over `nq` new tokens per sequence at positions `pos0..pos0 + nq` (`tokens`
    /// row-major `[n_seq, nq]`): writes their keys/values into the cache and returns the
    /// logits after each sequence's last one, `[n_seq, vocab_size]`.
    fn kv_pass(
        &self,
        st: &DecodeState,
        tokens: &[u32],
        nq: usize,
        pos0: usize,
    ) -> CResult<Vec<f32>> {
        let cache = st.cache.as_ref().expect("ensure allocated the cache");
        let sc = st.scratch.as_ref().expect("ensure allocated the scratch");
        let (cfg, lay) = (&self.cfg, &self.layout);
        let (s, c, nh, t_max, v) = (
            st.n_seq,
            cfg.n_embd,
            cfg.n_head,
            cfg.block_size,
            cfg.vocab_size,
        );
        let hs = c / nh;
        let rows = s * nq;
        assert!(
            rows <= sc.rows && tokens.len() == rows && pos0 + nq <= t_max,
            "decode pass of {nq} tokens at {pos0} for {s} sequences fits the scratch and cache"
        );
        let scale = 1.0 / (hs as f32).sqrt();
        self.ctx.make_current()?;
        sc.tokens.copy_from_host(tokens)?;
        // x = wte[token] + wpe[pos0 + i]: the kernel's position is row % nq, so the position
        // table is passed from row pos0 on.
        self.run(
            self.k.embedding_forward,
            grid_vec(rows * c),
            &[
                Arg::Ptr(sc.x.ptr),
                Arg::Ptr(sc.tokens.ptr),
                Arg::Ptr(self.p(lay.wte)),
                Arg::Ptr(self.p(lay.wpe + pos0 * c)),
                Arg::I32(rows as i32),
                Arg::I32(nq as i32),
                Arg::I32(c as i32),
            ],
        )?;
        for (l, o) in lay.blocks.iter().enumerate() {
            let (kc, vc) = (cache.k[l].ptr, cache.v[l].ptr);
            self.layernorm_fwd(
                LnOut::F32(sc.ln.ptr),
                sc.mean.ptr,
                sc.rstd.ptr,
                sc.x.ptr,
                o.ln1_w,
                o.ln1_b,
                rows,
            )?;
            self.linear_fwd(
                Out::F32(sc.qkv.ptr),
                Src::Act(sc.ln.ptr),
                o.qkv_w,
                o.qkv_b,
                c,
                3 * c,
                rows,
            )?;
            self.run(
                self.k.decode_kv_append,
                grid_vec(rows * c),
                &[
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::Ptr(sc.qkv.ptr),
                    Arg::I32(rows as i32),
                    Arg::I32(nq as i32),
                    Arg::I32(pos0 as i32),
                    Arg::I32(t_max as i32),
                    Arg::I32(c as i32),
                ],
            )?;
            self.run(
                self.k.decode_attention,
                ((rows * nh) as u32, 1, 1),
                &[
                    Arg::Ptr(sc.atty.ptr),
                    Arg::Ptr(sc.qkv.ptr),
                    Arg::Ptr(kc),
                    Arg::Ptr(vc),
                    Arg::I32(nq as i32),
                    Arg::I32(pos0 as i32),
                    Arg::I32(nh as i32),
                    Arg::I32(hs as i32),
                    Arg::I32(t_max as i32),
                    Arg::F32(scale),
                ],
            )?;
            self.linear_fwd(
                Out::F32(sc.tmp.ptr),
                Src::Act(sc.atty.ptr),
                o.attn_proj_w,
                o.attn_proj_b,
                c,
                c,
                rows,
            )?;
            self.residual_layernorm_fwd(
                sc.x.ptr,
                sc.x.ptr,
                sc.tmp.ptr,
                LnOut::F32(sc.ln.ptr),
                sc.mean.ptr,
                sc.rstd.ptr,
                o.ln2_w,
                o.ln2_b,
                rows,
            )?;
            self.linear_gelu_fwd(
                Out::F32(sc.gelu.ptr),
                sc.fch.ptr,
                Src::Act(sc.ln.ptr),
                o.fc_w,
                o.fc_b,
                c,
                4 * c,
                rows,
            )?;
            self.linear_fwd(
                Out::F32(sc.tmp.ptr),
                Src::Act(sc.gelu.ptr),
                o.mlp_proj_w,
                o.mlp_proj_b,
                4 * c,
                c,
                rows,
            )?;
            self.add(sc.x.ptr, sc.tmp.ptr, rows * c)?;
        }
        self.layernorm_fwd(
            LnOut::F32(sc.ln.ptr),
            sc.mean.ptr,
            sc.rstd.ptr,
            sc.x.ptr,
            lay.lnf_w,
            lay.lnf_b,
            rows,
        )?;
        // LM head on each sequence's last row only: row i of A is row i*nq + nq-1 of ln.
        self.gemm(
            s,
            v,
            c,
            Operand::n(at(sc.ln.ptr, (nq - 1) * c), nq * c),
            Operand::t(self.p(lay.wte), c),
            0.0,
            Operand::n(cache.logits.ptr, v),
            1,
        )?;
        let mut out = vec![0f32; s * v];
        cache.logits.copy_to_host(&mut out)?;
        Ok(out)
    }
}
