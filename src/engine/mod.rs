//! The engine contract: one model's parameters, gradients, AdamW state and activations on
//! one device. The trainer, evaluator, sampler and benchmark talk only to [`Engine`], so the
//! CPU reference engine and accelerator engines are interchangeable.

pub mod auto;
pub mod cpu;
pub mod cuda;
pub mod dropout;

use crate::model::{GptConfig, ParamLayout};
use crate::optim::AdamWConfig;
use std::ops::Range;

/// A batch of `b` rows of `t` tokens. `targets[i] == -1` means "no loss at this position".
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [i32],
    pub b: usize,
    pub t: usize,
}

/// AdamW moments and step count, on the host, in the parameter layout: the moments of
/// the engine's [`Engine::optimizer_shard`] (the whole buffer unless ZeRO-1 narrowed it).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("batch shape: {0}")]
    Shape(String),
    #[error("token id {id} at position {pos} is outside the model's vocabulary of {vocab}; the data was prepared for a different vocabulary")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("sequence of {t} tokens is longer than the model's block_size {block_size}")]
    TooLong { t: usize, block_size: usize },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Which activations the backward pass recomputes instead of keeping them from the forward
/// pass (config key `recompute`, as llm.c's `-r`). Recomputed tensors live in one buffer
/// shared by every layer instead of one per layer; the gradients are the same bits either
/// way, because the backward recomputes them with the forward's own arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Recompute {
    /// `recompute=0`: every activation is kept.
    #[default]
    Nothing,
    /// `recompute=1`: the GELU output (N x 4C per layer) is recomputed from the kept
    /// pre-activation.
    Gelu,
    /// `recompute=2`: also both LayerNorm outputs of every block (2 x N x C per layer),
    /// recomputed from the kept LayerNorm input, mean and rstd.
    GeluLayerNorm,
}

impl Recompute {
    /// The level of `recompute=level` (0, 1 or 2).
    pub fn from_level(level: u64) -> Option<Recompute> {
        match level {
            0 => Some(Recompute::Nothing),
            1 => Some(Recompute::Gelu),
            2 => Some(Recompute::GeluLayerNorm),
            _ => None,
        }
    }

    pub fn level(self) -> u8 {
        self as u8
    }

    /// Whether the GELU output is recomputed in the backward pass.
    pub fn gelu(self) -> bool {
        self >= Recompute::Gelu
    }

    /// Whether the blocks' LayerNorm outputs are recomputed in the backward pass.
    pub fn layernorm(self) -> bool {
        self >= Recompute::GeluLayerNorm
    }

    /// What the level recomputes, for logs.
    pub fn describe(self) -> &'static str {
        match self {
            Recompute::Nothing => "every activation kept",
            Recompute::Gelu => "GELU outputs recomputed in the backward pass",
            Recompute::GeluLayerNorm => {
                "GELU and LayerNorm outputs recomputed in the backward pass"
            }
        }
    }
}

/// Where an engine keeps its gradient buffer on a GPU, for collectives that reduce it in
/// place there (NCCL) instead of through [`Engine::grads_mut`]'s host copy (also used for
/// the parameter buffer: [`Engine::device_params`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceGrads {
    /// Device address of the first of `len` contiguous f32 gradients (layout order).
    pub ptr: u64,
    pub len: usize,
    /// The `CUstream` the engine computes on: work enqueued there runs after the
    /// backward pass and before the next optimizer step.
    pub stream: u64,
}

/// A range of the flat gradient buffer (layout order) that the running backward pass has
/// finished: it will not write there again, so the range may be reduced across ranks while
/// the backward pass goes on ([`Engine::forward_backward_notify`]).
#[derive(Clone, Copy, Debug)]
pub struct GradReady<'a> {
    /// Start of the range in the layout.
    pub start: usize,
    /// The finished gradients, `range.len()` values, when the engine keeps them on the
    /// host (valid during the call only: copy what you need).
    pub host: Option<&'a [f32]>,
    /// Length of the range.
    pub len: usize,
    /// For an engine on a GPU: its compute stream (a `CUstream`). Every write to the range
    /// is enqueued on it before the call, so an event recorded on it during the call (or a
    /// stream made to wait on it) marks the range as done.
    pub stream: Option<u64>,
}

impl GradReady<'_> {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

pub trait Engine: Send {
    fn config(&self) -> &GptConfig;
    fn layout(&self) -> &ParamLayout;
    /// Human-readable device name (e.g. "cpu (8 threads)").
    fn device_name(&self) -> String;
    /// The device's peak FLOP/s for this engine's arithmetic, when known: MFU's denominator
    /// unless `peak_flops` is set. The CUDA engine in bf16 gives its GPU's dense bf16
    /// tensor-core peak from [`crate::cuda::peak`]; CPUs and fp32 give none (the logs then
    /// show achieved GFLOP/s).
    fn peak_flops(&self) -> Option<f64> {
        None
    }

    /// Training forward + backward. Gradients are *accumulated* (scaled by `loss_scale`,
    /// e.g. 1/grad_accum_steps); dropout is active. Returns the mean loss of the batch.
    fn forward_backward(&mut self, batch: Batch, loss_scale: f32) -> Result<f32>;
    /// [`Engine::forward_backward`] that reports, while the backward pass runs, each range
    /// of the gradient buffer it has finished ([`GradReady`]), so that the reduction across
    /// ranks can overlap the rest of the backward pass. Every element of the buffer is
    /// reported exactly once, in the order the backward pass finishes them (for GPT-2:
    /// ln_f, the blocks from last to first, then the embeddings). The default runs
    /// [`Engine::forward_backward`] and reports the whole buffer at the end, with no host
    /// slice and no stream: the caller reads the gradients itself afterwards.
    fn forward_backward_notify(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        ready: &mut (dyn FnMut(GradReady) + Send),
    ) -> Result<f32> {
        let loss = self.forward_backward(batch, loss_scale)?;
        ready(GradReady {
            start: 0,
            len: self.layout().total,
            host: None,
            stream: None,
        });
        Ok(loss)
    }
    /// Evaluation loss: no dropout, no gradients.
    fn loss(&mut self, batch: Batch) -> Result<f32>;
    /// Logits over the real vocabulary for every position, `[b, t, vocab_size]` (evaluation mode).
    fn logits(&mut self, batch: Batch) -> Result<Vec<f32>>;
    fn zero_grad(&mut self);
    /// Global-norm clip (if `grad_clip > 0`) then one AdamW step at `lr`.
    /// Returns the gradient norm before clipping. The same arithmetic as
    /// [`Engine::grad_sumsq`] over the whole buffer followed by [`Engine::step_shard`]
    /// (with a narrowed optimizer shard, only the shard's parameters move).
    fn step(&mut self, hp: &AdamWConfig, lr: f32) -> f32;
    /// Sum of squares of the gradients in `range` of the layout, accumulated in f64 (the
    /// whole buffer's square root is [`Engine::step`]'s pre-clip norm).
    fn grad_sumsq(&mut self, range: Range<usize>) -> f64;
    /// ZeRO-1's optimizer step: clips the gradients of [`Engine::optimizer_shard`] as
    /// [`Engine::step`] would for a pre-clip global norm `norm` (of all ranks' summed
    /// gradients), then one AdamW step at `lr` over the shard's parameters only.
    fn step_shard(&mut self, hp: &AdamWConfig, lr: f32, norm: f32);
    /// The range of the parameter layout whose AdamW moments this engine holds (and whose
    /// parameters [`Engine::step_shard`] updates): the whole buffer unless narrowed.
    fn optimizer_shard(&self) -> Range<usize>;
    /// Keeps AdamW moments only for `range` (ZeRO-1: each data-parallel rank holds and
    /// updates one shard): the moments inside `range` are kept, the rest freed. The whole
    /// buffer's range undoes the sharding (moments outside the old shard start at zero).
    fn set_optimizer_shard(&mut self, range: Range<usize>);
    /// The host parameter buffer, for engines that keep their parameters on the host
    /// (sharded collectives write into it in place); `None` otherwise.
    fn params_mut(&mut self) -> Option<&mut [f32]> {
        None
    }
    /// The parameter buffer on the GPU (as [`Engine::device_grads`]), for collectives that
    /// write parameters in place there; call [`Engine::device_params_written`] afterwards.
    /// `None` for engines that keep parameters on the host.
    fn device_params(&mut self) -> Option<DeviceGrads> {
        None
    }
    /// Parameters were written through [`Engine::device_params`]: refresh what derives
    /// from them (the bf16 copy).
    fn device_params_written(&mut self) {}

    fn params(&self) -> Vec<f32>;
    fn set_params(&mut self, params: &[f32]);
    fn grads(&self) -> Vec<f32>;
    /// Gradient buffer, for all-reduce across ranks.
    fn grads_mut(&mut self) -> &mut [f32];
    /// Allocates the gradients where the engine defers them until training needs them (the
    /// CUDA engine, so that sampling holds none), with a clear error where they do not fit;
    /// training calls it before anything else touches them. Engines that allocate them
    /// with the parameters do nothing.
    fn allocate_gradients(&mut self) -> Result<()> {
        Ok(())
    }
    /// The gradient buffer on the GPU, current (host edits through `grads_mut` uploaded)
    /// and with the device's context current on this thread; `None` for engines that keep
    /// gradients on the host.
    fn device_grads(&mut self) -> Option<DeviceGrads> {
        None
    }
    /// Where the gradient buffer lives on the GPU, for collectives that read each range as
    /// the next micro-step's backward pass reports it written
    /// ([`Engine::forward_backward_notify`]): as [`Engine::device_grads`], except that
    /// after `zero_grad` the buffer may be left unwritten until that micro-step writes it
    /// (so its contents must not be read before then). `None` as for `device_grads`.
    fn device_grads_for_backward(&mut self) -> Option<DeviceGrads> {
        self.device_grads()
    }
    fn optimizer_state(&self) -> OptimizerState;
    fn set_optimizer_state(&mut self, state: OptimizerState);
    /// State of the dropout generator (saved in checkpoints for exact resume).
    fn rng_state(&self) -> [u64; 4];
    fn set_rng_state(&mut self, state: [u64; 4]);

    /// Start incremental decoding of `n_seq` independent sequences with an empty KV cache.
    fn decode_reset(&mut self, n_seq: usize);
    /// Start decoding from a context: `tokens` holds `n_seq` rows of equal length (at most
    /// block_size), processed in one batched pass that fills a fresh KV cache. Returns the
    /// logits after each row's last token, `[n_seq, vocab_size]`.
    fn decode_prefill(&mut self, tokens: &[u32], n_seq: usize) -> Result<Vec<f32>>;
    /// Append one token to each sequence (`tokens.len() == n_seq`) and return the logits of
    /// the next token, `[n_seq, vocab_size]`. Each call costs O(current length).
    fn decode_step(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Tokens currently held in the KV cache (per sequence).
    fn decode_len(&self) -> usize;

    /// One training step (zero_grad, `micro_steps` x [`Engine::forward_backward`] with
    /// `loss_scale`, [`Engine::step`]) with every kernel and matrix product timed on the
    /// device; `None` for engines without per-operation timers (the CPU engine).
    fn profile_step(
        &mut self,
        _batch: Batch,
        _loss_scale: f32,
        _micro_steps: usize,
        _hp: &AdamWConfig,
        _lr: f32,
    ) -> Option<Result<cuda::profile::StepProfile>> {
        None
    }

    /// Which activations the backward pass recomputes (see [`Recompute`]); takes effect at
    /// the next forward pass (the activation buffers are reallocated for it).
    fn set_recompute(&mut self, recompute: Recompute);
    fn recompute(&self) -> Recompute;
    /// Bytes of the activation buffers (saved for the backward pass, logits, backward
    /// scratch) a training step on `b` rows of `t` tokens allocates at level `recompute`;
    /// `None` when the engine cannot say.
    fn activation_bytes(&self, _b: usize, _t: usize, _recompute: Recompute) -> Option<u64> {
        None
    }

    /// The engine's device memory by purpose (parameters, gradients, moments, activations,
    /// ...) and the device's free/total memory; `None` for engines on the host.
    fn memory_report(&self) -> Option<cuda::profile::MemoryReport> {
        None
    }

    /// How the training micro-steps so far were launched (e.g. replayed as CUDA graphs),
    /// for benchmark logs; `None` where there is nothing to say.
    fn launch_report(&self) -> Option<String> {
        None
    }
}

/// `1.25 GiB` from 1 GiB up, else `12.5 MiB`: how memory figures are written.
pub fn memory_size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// One log line on the activation memory of a training step on `b` x `t` tokens at the
/// engine's `recompute` level, with the figure of level 0 beside it and, on a GPU, the
/// memory free there (the engine's own buffers already taken); `None` when the engine
/// cannot say.
pub fn activation_summary(engine: &dyn Engine, b: usize, t: usize) -> Option<String> {
    let rc = engine.recompute();
    let bytes = engine.activation_bytes(b, t, rc)?;
    let mut line = format!(
        "activations: {} for a {b} x {t} micro-batch (recompute={}: {})",
        memory_size(bytes),
        rc.level(),
        rc.describe()
    );
    if rc != Recompute::Nothing {
        if let Some(all) = engine.activation_bytes(b, t, Recompute::Nothing) {
            line.push_str(&format!(
                "; {} with recompute=0, {} saved",
                memory_size(all),
                memory_size(all.saturating_sub(bytes))
            ));
        }
    }
    let Some(m) = engine.memory_report() else {
        return Some(line);
    };
    let Some((free, total)) = m.device_free.zip(m.device_total) else {
        return Some(line);
    };
    let pending: u64 = m.before_first_pass.iter().map(|(_, b)| b).sum();
    line.push_str(&format!(
        "; {} free of {} on the GPU",
        memory_size(free.saturating_sub(pending)),
        memory_size(total)
    ));
    if pending > 0 {
        let what: Vec<&str> = m
            .before_first_pass
            .iter()
            .map(|(w, _)| w.as_str())
            .collect();
        line.push_str(&format!(
            " once the {} ({}) are allocated",
            what.join(" and "),
            memory_size(pending)
        ));
    }
    Some(line)
}

/// The parameter layout of a valid `cfg`, checked against a parameter buffer of `len` values
/// (every engine's constructor starts here).
pub fn layout_for(cfg: &GptConfig, len: usize) -> Result<ParamLayout> {
    cfg.validate()
        .map_err(|e| EngineError::Other(e.to_string()))?;
    let layout = ParamLayout::new(cfg);
    if len != layout.total {
        return Err(EngineError::Other(format!(
            "parameter buffer has {len} values but the model needs {}",
            layout.total
        )));
    }
    Ok(layout)
}

/// Checks a batch against the model: shape, block size, and every token (and target, -1
/// allowed) inside the vocabulary. Engines call it before touching their buffers.
pub fn check_batch(cfg: &GptConfig, batch: &Batch, with_targets: bool) -> Result<()> {
    let (b, t) = (batch.b, batch.t);
    if b == 0 || t == 0 {
        return Err(EngineError::Shape(format!("empty batch ({b} x {t})")));
    }
    if t > cfg.block_size {
        return Err(EngineError::TooLong {
            t,
            block_size: cfg.block_size,
        });
    }
    if batch.inputs.len() != b * t || (with_targets && batch.targets.len() != b * t) {
        return Err(EngineError::Shape(format!(
            "expected {} inputs and targets for a {b} x {t} batch, got {} and {}",
            b * t,
            batch.inputs.len(),
            batch.targets.len()
        )));
    }
    check_tokens(batch.inputs, cfg.vocab_size)?;
    if with_targets {
        let vocab = cfg.vocab_size;
        if let Some((pos, &id)) = batch
            .targets
            .iter()
            .enumerate()
            .find(|(_, &x)| x < -1 || x as i64 >= vocab as i64)
        {
            return Err(EngineError::TokenOutOfRange {
                id: id as u32,
                pos,
                vocab,
            });
        }
    }
    Ok(())
}

fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens
        .iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= vocab)
    {
        Some((pos, &id)) => Err(EngineError::TokenOutOfRange { id, pos, vocab }),
        None => Ok(()),
    }
}

/// Checks a `decode_prefill` context (`n_seq` rows of equal length) and returns its length.
pub fn check_prefill(cfg: &GptConfig, tokens: &[u32], n_seq: usize) -> Result<usize> {
    if n_seq == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(n_seq) {
        return Err(EngineError::Shape(format!(
            "decode_prefill needs {n_seq} rows of equal length, got {} tokens",
            tokens.len()
        )));
    }
    let t = tokens.len() / n_seq;
    let batch = Batch {
        inputs: tokens,
        targets: &[],
        b: n_seq,
        t,
    };
    check_batch(cfg, &batch, false)?;
    Ok(t)
}

/// Checks one `decode_step`: one token per sequence, room in the context (`len` tokens held
/// of `block_size`), tokens inside the vocabulary.
pub fn check_decode_step(
    block_size: usize,
    vocab: usize,
    tokens: &[u32],
    n_seq: usize,
    len: usize,
) -> Result<()> {
    if n_seq == 0 || tokens.len() != n_seq {
        return Err(EngineError::Shape(format!(
            "decode_step needs {n_seq} tokens (one per sequence), got {}",
            tokens.len()
        )));
    }
    if len >= block_size {
        return Err(EngineError::TooLong {
            t: len + 1,
            block_size,
        });
    }
    check_tokens(tokens, vocab)
}

/// Builds the engine for `device` ("auto", "cpu", "cuda", "cuda:N") computing in `dtype`.
///
/// `cpu` always computes in float32. `cuda:N` runs the CUDA engine on GPU N (`cuda` alone:
/// GPU 0) in float32, or with `dtype=bfloat16` in bf16 mixed precision (fp32 master weights,
/// bf16 linear-layer products; GPUs of compute capability 8.0 or newer); `float16` there is
/// an error that says so. `auto` takes this process's GPU (the launcher's local rank, else
/// GPU 0) when the CUDA engine passes a check against the CPU engine there ([`auto`]), in
/// bf16 when `dtype=bfloat16` and the GPU supports it, else the CPU engine (fp32).
/// `threads == 0` uses all cores (CPU only).
pub fn create(
    device: crate::config::DeviceSpec,
    dtype: crate::config::Dtype,
    cfg: GptConfig,
    params: Vec<f32>,
    seed: u64,
    threads: usize,
) -> Result<Box<dyn Engine>> {
    use crate::config::{DeviceSpec, Dtype};
    match device {
        DeviceSpec::Cpu => Ok(Box::new(cpu::CpuEngine::new(cfg, params, seed, threads)?)),
        DeviceSpec::Cuda(n) => {
            let precision = match dtype {
                Dtype::Float32 => cuda::Precision::F32,
                Dtype::BFloat16 => cuda::Precision::Bf16,
                Dtype::Float16 => {
                    return Err(EngineError::Other(format!(
                        "device={device} dtype={dtype}: fp16 is not available in this build; \
                         use dtype=bfloat16 (GPUs of compute capability 8.0 or newer) or \
                         dtype=float32"
                    )))
                }
            };
            let index = n.unwrap_or(0);
            match cuda::stack::available_gpus() {
                Ok(_) => Ok(Box::new(cuda::CudaEngine::with_precision(
                    cfg, params, seed, index, precision,
                )?)),
                Err(why) => Err(EngineError::Other(format!(
                    "device={device}: no usable GPU: {why}; or use device=cpu"
                ))),
            }
        }
        // `auto`: the GPU once the CUDA engine has matched the CPU engine on it (auto.rs).
        DeviceSpec::Auto => match auto::choose(dtype) {
            Some((index, precision)) => Ok(Box::new(cuda::CudaEngine::with_precision(
                cfg, params, seed, index, precision,
            )?)),
            None => Ok(Box::new(cpu::CpuEngine::new(cfg, params, seed, threads)?)),
        },
    }
}
