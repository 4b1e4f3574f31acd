//! CPU reference engine: fp32, deterministic for a given thread count, multi-threaded
//! (rayon + the `gemm` crate). Activations are allocated once per (B, T) shape and reused;
//! dropout masks are recomputed from counter-based hashes instead of being stored.
//!
//! Layout per layer (N = B*T rows): ln1 (N,C) -> qkv (N,3C) -> att (B,NH,T,T) -> atty (N,C)
//! -> res2 = x + proj(atty) -> ln2 (N,C) -> fch (N,4C) -> gelu (N,4C) -> res3 = res2 + proj.
//!
//! Activation recomputation ([`Recompute`], config key `recompute`): at level 1 no layer
//! keeps its GELU output; the forward pass writes it into one buffer shared by all layers
//! (consumed at once by the MLP projection) and the backward pass recomputes it from `fch`
//! right before the MLP projection's weight gradient. Level 2 does the same for ln1 and ln2
//! (one shared N x C buffer: the two are never needed at the same time), recomputed from
//! the LayerNorm input and the saved mean and rstd with the forward's own row arithmetic.
//! Either way the gradients are bit-identical to level 0.

mod decode;
pub mod kernels;
pub mod matmul;
pub mod simd;

use super::dropout::{Dropout, DropoutSeeds};
use super::{Batch, Engine, EngineError, GradReady, OptimizerState, Recompute, Result};
use crate::model::{BlockOffsets, GptConfig, ParamLayout};
use crate::optim::{adamw, AdamWConfig};
use crate::rng::Rng;
use kernels::{AttnShape, LnOut};
use matmul::{matmul, Op};

/// Saved activations of one transformer block. `ln1`, `ln2` (level 2) and `fch_gelu`
/// (levels 1 and 2) are empty when recomputed; the shared buffers hold them meanwhile.
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    res3: Vec<f32>,
}

/// All activation and backward scratch memory for one (B, T) shape.
struct Activations {
    b: usize,
    t: usize,
    recompute: Recompute,
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    logits: Vec<f32>,
    row_loss: Vec<f64>,
    // backward scratch
    dres: Vec<f32>,
    dtmp: Vec<f32>,
    dln: Vec<f32>,
    dfch: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    ln_scratch: Vec<f32>,
    /// GELU output of the layer being computed (N, 4C) at levels 1 and 2, else empty.
    gelu_shared: Vec<f32>,
    /// ln1 or ln2 of the layer being computed (N, C) at level 2, else empty.
    ln_shared: Vec<f32>,
}

impl Activations {
    fn new(cfg: &GptConfig, b: usize, t: usize, recompute: Recompute) -> Self {
        let (n, c, nh) = (b * t, cfg.n_embd, cfg.n_head);
        let z = |len: usize| vec![0f32; len];
        // Per layer, or once for all layers when recomputed.
        let (ln_own, ln_shared) = if recompute.layernorm() {
            (0, n * c)
        } else {
            (n * c, 0)
        };
        let (gelu_own, gelu_shared) = if recompute.gelu() {
            (0, n * 4 * c)
        } else {
            (n * 4 * c, 0)
        };
        let layers = (0..cfg.n_layer)
            .map(|_| LayerActs {
                ln1: z(ln_own),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                att: z(b * nh * t * t),
                atty: z(n * c),
                res2: z(n * c),
                ln2: z(ln_own),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                fch_gelu: z(gelu_own),
                res3: z(n * c),
            })
            .collect();
        Activations {
            b,
            t,
            recompute,
            encoded: z(n * c),
            layers,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * cfg.vocab_size),
            row_loss: vec![0f64; n],
            dres: z(n * c),
            dtmp: z(n * c),
            dln: z(n * c),
            dfch: z(n * 4 * c),
            dqkv: z(n * 3 * c),
            datt: z(b * nh * t * t),
            ln_scratch: z(kernels::LN_BACKWARD_PARTS * 2 * c),
            gelu_shared: z(gelu_shared),
            ln_shared: z(ln_shared),
        }
    }

    /// Bytes [`Activations::new`] allocates for this shape and level (kept in step with it
    /// by a unit test).
    fn planned_bytes(cfg: &GptConfig, b: usize, t: usize, recompute: Recompute) -> u64 {
        let (n, c, nh, l) = (b * t, cfg.n_embd, cfg.n_head, cfg.n_layer);
        let att = b * nh * t * t;
        let ln = if recompute.layernorm() { 0 } else { 2 * n * c };
        let gelu = if recompute.gelu() { 0 } else { n * 4 * c };
        // ln1/ln2 stats (4N), qkv, atty, res2, fch, res3, att
        let layer = ln + gelu + 4 * n + 3 * n * c + 3 * n * c + n * 4 * c + att;
        let shared = if recompute.gelu() { n * 4 * c } else { 0 }
            + if recompute.layernorm() { n * c } else { 0 };
        let once = n * c // encoded
            + n * c + 2 * n // lnf, mean, rstd
            + n * cfg.vocab_size // logits
            + 3 * n * c + n * 4 * c + n * 3 * c + att // dres, dtmp, dln, dfch, dqkv, datt
            + kernels::LN_BACKWARD_PARTS * 2 * c;
        4 * (l * layer + shared + once) as u64 + 8 * n as u64 // row_loss is f64
    }

    /// Bytes held by these buffers.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        let layer: usize = self
            .layers
            .iter()
            .map(|la| {
                [
                    &la.ln1,
                    &la.ln1_mean,
                    &la.ln1_rstd,
                    &la.qkv,
                    &la.att,
                    &la.atty,
                    &la.res2,
                    &la.ln2,
                    &la.ln2_mean,
                    &la.ln2_rstd,
                    &la.fch,
                    &la.fch_gelu,
                    &la.res3,
                ]
                .iter()
                .map(|v| v.len())
                .sum::<usize>()
            })
            .sum();
        let once: usize = [
            &self.encoded,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.dres,
            &self.dtmp,
            &self.dln,
            &self.dfch,
            &self.dqkv,
            &self.datt,
            &self.ln_scratch,
            &self.gelu_shared,
            &self.ln_shared,
        ]
        .iter()
        .map(|v| v.len())
        .sum();
        4 * (layer + once) as u64 + 8 * self.row_loss.len() as u64
    }
}

/// Bytes of the activation buffers a CPU training step on `b` rows of `t` tokens allocates
/// at level `recompute` (what [`Engine::activation_bytes`] reports).
pub fn activation_bytes(cfg: &GptConfig, b: usize, t: usize, recompute: Recompute) -> u64 {
    Activations::planned_bytes(cfg, b, t, recompute)
}

/// `own` when the layer keeps this activation, else the buffer shared by all layers.
fn own_or<'a>(own: &'a mut [f32], shared: &'a mut [f32]) -> &'a mut [f32] {
    if own.is_empty() {
        shared
    } else {
        own
    }
}

/// Where the backward pass reports finished gradient ranges, if anywhere.
type Ready<'r> = Option<&'r mut (dyn FnMut(GradReady) + Send)>;

/// Everything the engine computes on (kept apart from the thread pool so that a pool
/// borrow and a mutable state borrow can coexist).
struct Core {
    cfg: GptConfig,
    layout: ParamLayout,
    decay_runs: Vec<(usize, usize, bool)>,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// AdamW moments of `opt_shard` (the whole buffer unless ZeRO-1 narrowed it).
    m: Vec<f32>,
    v: Vec<f32>,
    opt_shard: std::ops::Range<usize>,
    step: u64,
    rng: Rng,
    threads: usize,
    recompute: Recompute,
    acts: Option<Activations>,
    kv: Option<decode::KvCache>,
}

/// The CPU engine. See the module docs.
pub struct CpuEngine {
    core: Core,
    pool: rayon::ThreadPool,
}

fn slice(p: &[f32], off: usize, len: usize) -> &[f32] {
    &p[off..off + len]
}

fn opt_slice(p: &[f32], off: Option<usize>, len: usize) -> Option<&[f32]> {
    off.map(|o| &p[o..o + len])
}

impl CpuEngine {
    /// An engine over `params` (flat, in [`ParamLayout`] order). `threads == 0` uses all cores.
    pub fn new(cfg: GptConfig, params: Vec<f32>, seed: u64, threads: usize) -> Result<Self> {
        let layout = super::layout_for(&cfg, params.len())?;
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| EngineError::Other(format!("cannot start {threads} CPU threads: {e}")))?;
        let total = layout.total;
        Ok(CpuEngine {
            core: Core {
                decay_runs: layout.decay_runs(),
                layout,
                cfg,
                params,
                grads: vec![0.0; total],
                m: vec![0.0; total],
                v: vec![0.0; total],
                opt_shard: 0..total,
                step: 0,
                rng: Rng::derive(seed, 0xD50F),
                threads,
                recompute: Recompute::Nothing,
                acts: None,
                kv: None,
            },
            pool,
        })
    }

    /// A freshly initialised model (nanoGPT's init) from `seed`.
    pub fn from_seed(cfg: GptConfig, seed: u64, threads: usize) -> Result<Self> {
        let params = ParamLayout::new(&cfg).init_params(&cfg, seed);
        Self::new(cfg, params, seed, threads)
    }

    pub fn threads(&self) -> usize {
        self.core.threads
    }
}

impl Core {
    fn ensure_acts(&mut self, b: usize, t: usize) {
        let rc = self.recompute;
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t && a.recompute == rc) {
            self.acts = None; // free the old shape first
            self.acts = Some(Activations::new(&self.cfg, b, t, rc));
        }
    }

    /// Forward pass up to the logits (N, V). `drop` is None in evaluation.
    fn forward(&mut self, inputs: &[u32], b: usize, t: usize, drop: Option<DropoutSeeds>) {
        self.ensure_acts(b, t);
        let cfg = &self.cfg;
        let (c, n, th) = (cfg.n_embd, b * t, self.threads);
        let p = &self.params;
        let lay = &self.layout;
        let acts = self
            .acts
            .as_mut()
            .expect("activations allocated just above");
        let shape = AttnShape {
            b,
            t,
            nh: cfg.n_head,
            c,
        };
        let wte = slice(p, lay.wte, cfg.padded_vocab_size * c);
        kernels::embedding_forward(
            &mut acts.encoded,
            inputs,
            wte,
            slice(p, lay.wpe, cfg.block_size * c),
            t,
            c,
        );
        if let Some(d) = drop {
            d.embedding().apply(&mut acts.encoded);
        }
        for l in 0..cfg.n_layer {
            let o: &BlockOffsets = &lay.blocks[l];
            let (prev, rest) = acts.layers.split_at_mut(l);
            let x: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &prev[l - 1].res3
            };
            let la = &mut rest[0];
            let ln1 = own_or(&mut la.ln1, &mut acts.ln_shared);
            kernels::layernorm_forward(
                LnOut {
                    out: ln1,
                    mean: &mut la.ln1_mean,
                    rstd: &mut la.ln1_rstd,
                },
                x,
                slice(p, o.ln1_w, c),
                opt_slice(p, o.ln1_b, c),
                c,
                th,
            );
            kernels::linear_forward(
                &mut la.qkv,
                ln1,
                &linear(p, o.qkv_w, o.qkv_b, c, 3 * c),
                n,
                th,
            );
            let attn_drop = drop.map_or(Dropout::off(), |d| d.attn_probs(l));
            kernels::attention_forward(&mut la.atty, &mut la.att, &la.qkv, &shape, attn_drop);
            // res2 = x + dropout(atty @ Wproj + b)
            kernels::linear_forward(
                &mut la.res2,
                &la.atty,
                &linear(p, o.attn_proj_w, o.attn_proj_b, c, c),
                n,
                th,
            );
            if let Some(d) = drop {
                d.attn_resid(l).apply(&mut la.res2);
            }
            add_inplace(&mut la.res2, x);
            let ln2 = own_or(&mut la.ln2, &mut acts.ln_shared);
            kernels::layernorm_forward(
                LnOut {
                    out: ln2,
                    mean: &mut la.ln2_mean,
                    rstd: &mut la.ln2_rstd,
                },
                &la.res2,
                slice(p, o.ln2_w, c),
                opt_slice(p, o.ln2_b, c),
                c,
                th,
            );
            kernels::linear_forward(
                &mut la.fch,
                ln2,
                &linear(p, o.fc_w, o.fc_b, c, 4 * c),
                n,
                th,
            );
            let gelu = own_or(&mut la.fch_gelu, &mut acts.gelu_shared);
            kernels::gelu_forward(gelu, &la.fch);
            kernels::linear_forward(
                &mut la.res3,
                gelu,
                &linear(p, o.mlp_proj_w, o.mlp_proj_b, 4 * c, c),
                n,
                th,
            );
            if let Some(d) = drop {
                d.mlp_resid(l).apply(&mut la.res3);
            }
            add_inplace(&mut la.res3, &la.res2);
        }
        let last: &[f32] = match acts.layers.last() {
            Some(la) => &la.res3,
            None => &acts.encoded,
        };
        kernels::layernorm_forward(
            LnOut {
                out: &mut acts.lnf,
                mean: &mut acts.lnf_mean,
                rstd: &mut acts.lnf_rstd,
            },
            last,
            slice(p, lay.lnf_w, c),
            opt_slice(p, lay.lnf_b, c),
            c,
            th,
        );
        let v = cfg.vocab_size;
        matmul(
            &mut acts.logits,
            &acts.lnf,
            &wte[..v * c],
            n,
            c,
            v,
            Op::NT,
            false,
            th,
        );
    }

    /// Backward from dlogits (already in `acts.logits`) to all parameter gradients.
    /// The backward pass; `ready` hears of each finished range of the gradient buffer
    /// (see [`Engine::forward_backward_notify`]).
    fn backward(&mut self, inputs: &[u32], drop: Option<DropoutSeeds>, ready: Ready) {
        let mut ready = ready;
        let mut report = |g: &[f32], range: std::ops::Range<usize>| {
            if let Some(f) = ready.as_mut() {
                f(GradReady {
                    start: range.start,
                    len: range.len(),
                    host: Some(&g[range]),
                    stream: None,
                });
            }
        };
        let cfg = &self.cfg;
        let acts = self.acts.as_mut().expect("backward runs after forward");
        let (b, t) = (acts.b, acts.t);
        let (c, n, v, th) = (cfg.n_embd, b * t, cfg.vocab_size, self.threads);
        let p = &self.params;
        let g = &mut self.grads;
        let lay = &self.layout;
        let shape = AttnShape {
            b,
            t,
            nh: cfg.n_head,
            c,
        };
        // LM head (tied): dlnf = dlogits @ wte ; dwte += dlogits^T @ lnf
        matmul(
            &mut acts.dln,
            &acts.logits,
            slice(p, lay.wte, v * c),
            n,
            v,
            c,
            Op::NN,
            false,
            th,
        );
        matmul(
            &mut g[lay.wte..lay.wte + v * c],
            &acts.logits,
            &acts.lnf,
            v,
            n,
            c,
            Op::TN,
            true,
            th,
        );
        acts.dres.fill(0.0);
        let last: &[f32] = match acts.layers.last() {
            Some(la) => &la.res3,
            None => &acts.encoded,
        };
        {
            let (gw, gb) = grad_pair(g, lay.lnf_w, lay.lnf_b, c);
            kernels::layernorm_backward(
                &mut acts.dres,
                gw,
                gb,
                &acts.dln,
                last,
                slice(p, lay.lnf_w, c),
                &acts.lnf_mean,
                &acts.lnf_rstd,
                c,
                &mut acts.ln_scratch,
            );
        }
        // ln_f is the end of the layout; block l runs up to block l + 1 (or ln_f).
        let block_end = |l: usize| lay.blocks.get(l + 1).map_or(lay.lnf_w, |o| o.ln1_w);
        report(g, lay.lnf_w..lay.total);
        for l in (0..cfg.n_layer).rev() {
            let o = &lay.blocks[l];
            let (prev, rest) = acts.layers.split_at(l);
            let x: &[f32] = if l == 0 {
                &acts.encoded
            } else {
                &prev[l - 1].res3
            };
            let la = &rest[0];
            // Recomputed activations: the same kernels as the forward pass, same bits.
            let gelu: &[f32] = if la.fch_gelu.is_empty() {
                kernels::gelu_forward(&mut acts.gelu_shared, &la.fch);
                &acts.gelu_shared
            } else {
                &la.fch_gelu
            };
            // ---- MLP branch: res3 = res2 + dropout(gelu(ln2 @ Wfc + bfc) @ Wp + bp)
            let gbranch: &[f32] = match drop.map(|d| d.mlp_resid(l)) {
                Some(d) if d.active() => {
                    acts.dtmp.copy_from_slice(&acts.dres);
                    d.apply(&mut acts.dtmp);
                    &acts.dtmp
                }
                _ => &acts.dres,
            };
            let (gw, gb) = grad_wb(g, o.mlp_proj_w, o.mlp_proj_b, 4 * c, c);
            kernels::linear_backward(
                &mut acts.dfch,
                gw,
                gb,
                gbranch,
                gelu,
                &linear(p, o.mlp_proj_w, o.mlp_proj_b, 4 * c, c),
                n,
                th,
            );
            kernels::gelu_backward_inplace(&mut acts.dfch, &la.fch);
            let ln2: &[f32] = if la.ln2.is_empty() {
                kernels::layernorm_recompute(
                    &mut acts.ln_shared,
                    &la.res2,
                    &la.ln2_mean,
                    &la.ln2_rstd,
                    slice(p, o.ln2_w, c),
                    opt_slice(p, o.ln2_b, c),
                    th,
                );
                &acts.ln_shared
            } else {
                &la.ln2
            };
            let (gw, gb) = grad_wb(g, o.fc_w, o.fc_b, c, 4 * c);
            kernels::linear_backward(
                &mut acts.dln,
                gw,
                gb,
                &acts.dfch,
                ln2,
                &linear(p, o.fc_w, o.fc_b, c, 4 * c),
                n,
                th,
            );
            {
                let (gw, gb) = grad_pair(g, o.ln2_w, o.ln2_b, c);
                kernels::layernorm_backward(
                    &mut acts.dres,
                    gw,
                    gb,
                    &acts.dln,
                    &la.res2,
                    slice(p, o.ln2_w, c),
                    &la.ln2_mean,
                    &la.ln2_rstd,
                    c,
                    &mut acts.ln_scratch,
                );
            }
            // ---- attention branch: res2 = x + dropout(attn(ln1) @ Wproj + bproj)
            let gbranch: &[f32] = match drop.map(|d| d.attn_resid(l)) {
                Some(d) if d.active() => {
                    acts.dtmp.copy_from_slice(&acts.dres);
                    d.apply(&mut acts.dtmp);
                    &acts.dtmp
                }
                _ => &acts.dres,
            };
            let (gw, gb) = grad_wb(g, o.attn_proj_w, o.attn_proj_b, c, c);
            kernels::linear_backward(
                &mut acts.dln,
                gw,
                gb,
                gbranch,
                &la.atty,
                &linear(p, o.attn_proj_w, o.attn_proj_b, c, c),
                n,
                th,
            );
            let attn_drop = drop.map_or(Dropout::off(), |d| d.attn_probs(l));
            kernels::attention_backward(
                &mut acts.dqkv,
                &mut acts.datt,
                &acts.dln,
                &la.att,
                &la.qkv,
                &shape,
                attn_drop,
            );
            let ln1: &[f32] = if la.ln1.is_empty() {
                kernels::layernorm_recompute(
                    &mut acts.ln_shared,
                    x,
                    &la.ln1_mean,
                    &la.ln1_rstd,
                    slice(p, o.ln1_w, c),
                    opt_slice(p, o.ln1_b, c),
                    th,
                );
                &acts.ln_shared
            } else {
                &la.ln1
            };
            let (gw, gb) = grad_wb(g, o.qkv_w, o.qkv_b, c, 3 * c);
            kernels::linear_backward(
                &mut acts.dln,
                gw,
                gb,
                &acts.dqkv,
                ln1,
                &linear(p, o.qkv_w, o.qkv_b, c, 3 * c),
                n,
                th,
            );
            let (gw, gb) = grad_pair(g, o.ln1_w, o.ln1_b, c);
            kernels::layernorm_backward(
                &mut acts.dres,
                gw,
                gb,
                &acts.dln,
                x,
                slice(p, o.ln1_w, c),
                &la.ln1_mean,
                &la.ln1_rstd,
                c,
                &mut acts.ln_scratch,
            );
            report(g, o.ln1_w..block_end(l));
        }
        if let Some(d) = drop {
            d.embedding().apply(&mut acts.dres);
        }
        let (wte_g, rest) = g[lay.wte..].split_at_mut(lay.wpe - lay.wte);
        kernels::embedding_backward(
            wte_g,
            &mut rest[..cfg.block_size * c],
            &acts.dres,
            inputs,
            t,
            c,
        );
        // wte (also written by the tied LM head above) and wpe: the start of the layout.
        let first_block = lay.blocks.first().map_or(lay.lnf_w, |o| o.ln1_w);
        report(g, 0..first_block);
    }

    fn dropout_seeds(&mut self) -> Option<DropoutSeeds> {
        DropoutSeeds::draw(&mut self.rng, self.cfg.dropout)
    }
}

/// Mutable (weight, bias) gradient slices of one LayerNorm (`c` values each).
fn grad_pair(
    g: &mut [f32],
    w: usize,
    b: Option<usize>,
    c: usize,
) -> (&mut [f32], Option<&mut [f32]>) {
    grad_wb(g, w, b, 1, c)
}

/// Mutable (weight `[ic, oc]`, bias `[oc]`) gradient slices of one layer; in the layout a
/// bias directly follows its weight.
fn grad_wb(
    g: &mut [f32],
    w: usize,
    b: Option<usize>,
    ic: usize,
    oc: usize,
) -> (&mut [f32], Option<&mut [f32]>) {
    let wl = ic * oc;
    match b {
        Some(bo) => {
            assert_eq!(
                bo,
                w + wl,
                "a bias follows its weight in the parameter layout"
            );
            let (gw, gb) = g[w..w + wl + oc].split_at_mut(wl);
            (gw, Some(gb))
        }
        None => (&mut g[w..w + wl], None),
    }
}

/// The weights of one dense layer inside the flat parameter buffer.
fn linear(p: &[f32], w: usize, b: Option<usize>, ic: usize, oc: usize) -> kernels::Linear<'_> {
    kernels::Linear {
        w: slice(p, w, ic * oc),
        b: opt_slice(p, b, oc),
        ic,
        oc,
    }
}

fn add_inplace(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(4096)
        .zip(src.par_chunks(4096))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}

impl CpuEngine {
    /// Forward and backward of one training micro-batch (see
    /// [`Engine::forward_backward_notify`] for `ready`).
    fn train_step(&mut self, batch: Batch, loss_scale: f32, ready: Ready) -> Result<f32> {
        super::check_batch(&self.core.cfg, &batch, true)?;
        let core = &mut self.core;
        self.pool.install(|| {
            let drop = core.dropout_seeds();
            core.forward(batch.inputs, batch.b, batch.t, drop);
            let acts = core.acts.as_mut().expect("forward allocated activations");
            let v = core.cfg.vocab_size;
            let (sum, count) = kernels::cross_entropy(
                &mut acts.logits,
                batch.targets,
                v,
                Some(loss_scale),
                &mut acts.row_loss,
            );
            core.backward(batch.inputs, drop, ready);
            Ok(if count > 0 {
                (sum / count as f64) as f32
            } else {
                0.0
            })
        })
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &GptConfig {
        &self.core.cfg
    }
    fn layout(&self) -> &ParamLayout {
        &self.core.layout
    }
    fn device_name(&self) -> String {
        format!("cpu ({} threads, fp32)", self.core.threads)
    }

    fn forward_backward(&mut self, batch: Batch, loss_scale: f32) -> Result<f32> {
        self.train_step(batch, loss_scale, None)
    }

    fn forward_backward_notify(
        &mut self,
        batch: Batch,
        loss_scale: f32,
        ready: &mut (dyn FnMut(GradReady) + Send),
    ) -> Result<f32> {
        self.train_step(batch, loss_scale, Some(ready))
    }

    fn loss(&mut self, batch: Batch) -> Result<f32> {
        super::check_batch(&self.core.cfg, &batch, true)?;
        let core = &mut self.core;
        self.pool.install(|| {
            core.forward(batch.inputs, batch.b, batch.t, None);
            let acts = core.acts.as_mut().expect("forward allocated activations");
            let (sum, count) = kernels::cross_entropy(
                &mut acts.logits,
                batch.targets,
                core.cfg.vocab_size,
                None,
                &mut acts.row_loss,
            );
            Ok(if count > 0 {
                (sum / count as f64) as f32
            } else {
                0.0
            })
        })
    }

    fn logits(&mut self, batch: Batch) -> Result<Vec<f32>> {
        super::check_batch(&self.core.cfg, &batch, false)?;
        let core = &mut self.core;
        self.pool
            .install(|| core.forward(batch.inputs, batch.b, batch.t, None));
        Ok(core
            .acts
            .as_ref()
            .expect("forward allocated activations")
            .logits
            .clone())
    }

    fn zero_grad(&mut self) {
        self.core.grads.fill(0.0);
    }

    fn step(&mut self, hp: &AdamWConfig, lr: f32) -> f32 {
        let all = 0..self.core.params.len();
        let norm = adamw::norm_from_sumsq(self.grad_sumsq(all));
        self.step_shard(hp, lr, norm);
        norm
    }

    fn grad_sumsq(&mut self, range: std::ops::Range<usize>) -> f64 {
        let grads = &self.core.grads[range];
        self.pool.install(|| adamw::grad_sumsq(grads))
    }

    fn step_shard(&mut self, hp: &AdamWConfig, lr: f32, norm: f32) {
        let core = &mut self.core;
        core.step += 1;
        self.pool.install(|| {
            adamw::shard_step(
                &mut core.params,
                &mut core.grads,
                &mut core.m,
                &mut core.v,
                &core.decay_runs,
                core.opt_shard.clone(),
                norm,
                hp,
                lr,
                core.step,
            )
        });
    }

    fn optimizer_shard(&self) -> std::ops::Range<usize> {
        self.core.opt_shard.clone()
    }

    fn set_optimizer_shard(&mut self, range: std::ops::Range<usize>) {
        let core = &mut self.core;
        assert!(
            range.end <= core.params.len() && range.start <= range.end,
            "optimizer shard {range:?} outside the {} parameters",
            core.params.len()
        );
        core.m = adamw::reshard(&core.m, &core.opt_shard, &range);
        core.v = adamw::reshard(&core.v, &core.opt_shard, &range);
        core.opt_shard = range;
    }

    fn params_mut(&mut self) -> Option<&mut [f32]> {
        Some(&mut self.core.params)
    }

    fn params(&self) -> Vec<f32> {
        self.core.params.clone()
    }
    fn set_params(&mut self, params: &[f32]) {
        assert_eq!(
            params.len(),
            self.core.params.len(),
            "set_params: layout size mismatch"
        );
        self.core.params.copy_from_slice(params);
    }
    fn grads(&self) -> Vec<f32> {
        self.core.grads.clone()
    }
    fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.core.grads
    }
    fn optimizer_state(&self) -> OptimizerState {
        OptimizerState {
            m: self.core.m.clone(),
            v: self.core.v.clone(),
            step: self.core.step,
        }
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) {
        let n = self.core.opt_shard.len();
        assert!(
            state.m.len() == n && state.v.len() == n,
            "optimizer state of {} and {} values for an optimizer shard of {n}",
            state.m.len(),
            state.v.len()
        );
        self.core.m = state.m;
        self.core.v = state.v;
        self.core.step = state.step;
    }
    fn rng_state(&self) -> [u64; 4] {
        self.core.rng.state
    }
    fn set_rng_state(&mut self, state: [u64; 4]) {
        self.core.rng.state = state;
    }

    fn decode_reset(&mut self, n_seq: usize) {
        self.core.kv = Some(decode::KvCache::new(&self.core.cfg, n_seq));
    }
    fn decode_prefill(&mut self, tokens: &[u32], n_seq: usize) -> Result<Vec<f32>> {
        let t = super::check_prefill(&self.core.cfg, tokens, n_seq)?;
        let core = &mut self.core;
        self.pool.install(|| core.forward(tokens, n_seq, t, None));
        Ok(decode::fill_from_forward(core, n_seq, t))
    }

    fn decode_step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let core = &mut self.core;
        if decode::parallel_worth_it(&core.cfg, core.threads) {
            let th = core.threads;
            self.pool.install(|| decode::step(core, tokens, th))
        } else {
            decode::step(core, tokens, 1)
        }
    }
    fn decode_len(&self) -> usize {
        self.core.kv.as_ref().map_or(0, |k| k.len)
    }

    fn set_recompute(&mut self, recompute: Recompute) {
        self.core.recompute = recompute;
    }
    fn recompute(&self) -> Recompute {
        self.core.recompute
    }
    fn activation_bytes(&self, b: usize, t: usize, recompute: Recompute) -> Option<u64> {
        Some(activation_bytes(&self.core.cfg, b, t, recompute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_activation_bytes_match_the_allocation() {
        for bias in [false, true] {
            let cfg = GptConfig::new(3, 2, 16, 8, 50, bias, 0.0).expect("a valid small model");
            for rc in [
                Recompute::Nothing,
                Recompute::Gelu,
                Recompute::GeluLayerNorm,
            ] {
                let a = Activations::new(&cfg, 2, 5, rc);
                assert_eq!(
                    a.bytes(),
                    Activations::planned_bytes(&cfg, 2, 5, rc),
                    "{rc:?}"
                );
            }
        }
        // Level 1 saves (L - 1) x N x 4C floats, level 2 another (2L - 1) x N x C.
        let cfg = GptConfig::new(3, 2, 16, 8, 50, false, 0.0).expect("a valid small model");
        let bytes = |rc| Activations::planned_bytes(&cfg, 2, 5, rc);
        let (n, c) = (10u64, 16u64);
        assert_eq!(
            bytes(Recompute::Nothing) - bytes(Recompute::Gelu),
            4 * 2 * n * 4 * c
        );
        assert_eq!(
            bytes(Recompute::Gelu) - bytes(Recompute::GeluLayerNorm),
            4 * 5 * n * c
        );
    }
}
