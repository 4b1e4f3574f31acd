//! Switches for the CUDA engine's optimisations, for debugging and for measuring what each
//! one is worth. Every optimisation is on by default where it applies; the environment
//! variable `NANOGPT_CUDA_DISABLE` turns some off, as a comma-separated list of names:
//!
//! - `flash`: fused causal attention (otherwise the plain path: `q k^T`, masked softmax,
//!   `P v`, with the `T x T` matrix in memory)
//! - `flash_bf16`: the fused attention's bf16 tensor-core kernels in bf16 mode (otherwise
//!   the fused attention runs in fp32 SIMT even in bf16 mode, forward and backward; no
//!   effect in fp32 mode or with `flash` off)
//! - `flash_hs64`: the bf16 attention kernels' forms compiled for head size 64 (GPT-2's at
//!   every model size: fewer registers, more blocks per multiprocessor) where the head size
//!   is 64 (otherwise the generic bf16 kernels; the same bits either way)
//! - `flash_async`: with bf16 attention storage (`bf16_attn`), the bf16 attention kernels
//!   load their tiles by cp.async, a tile ahead of the products that read it, so loads
//!   overlap tensor-core work (otherwise synchronous loads, global memory to registers to
//!   shared memory; the same bits either way)
//! - `flash_exp2`: the bf16 attention kernels' softmax exponentials in base 2 on the
//!   special-function unit (`ex2.approx`, FlashAttention-2's: a probability is one fused
//!   multiply-add and one instruction), for every form above (otherwise the accurate
//!   `expf` in natural units, eight instructions more per probability: the probabilities
//!   within a few units in the last place of fp32 of each other, not the same bits; where
//!   that flips a bf16 rounding the difference spreads like any bf16 rounding)
//! - `epilogues`: bias and GELU fused into the cuBLASLt matrix products (otherwise separate
//!   kernels)
//! - `fused_ln`: residual add fused with the following LayerNorm, and the LayerNorm
//!   backward's input gradient and weight and bias gradient sums in one pass over its
//!   inputs (C <= 1024; otherwise two kernels each)
//! - `fused_residual`: in bf16 mode without dropout, each block's two residual adds done by
//!   the projection products themselves (cuBLASLt's `D = A B + bias + C`, C the block's
//!   residual stream, D the new one), so the LayerNorm after each reads one fp32 stream and
//!   writes none (otherwise, or where a product cannot add it, the product writes the
//!   branch and the residual-add LayerNorm kernel, or with `fused_ln` off the add kernel,
//!   adds the stream to it: the same sum up to the fp32 rounding order)
//! - `bf16_acts`: in bf16 mode, LayerNorm outputs, the logits gradient (fp32 logits, with
//!   `bf16_logits` off) and (bf16 fused attention) the qkv gradient stored in bf16 only,
//!   written so by the LayerNorm, cross-entropy and attention-backward kernels, and the
//!   residual-stream gradient's bf16 copy for the next backward products written by the
//!   LayerNorm backward alongside the fp32 gradient (otherwise fp32, rounded into bf16
//!   scratch by a cast pass before the products that read them; the same bits either way;
//!   no effect in fp32 mode)
//! - `bf16_mlp`: in bf16 mode, the MLP's pre-activation, GELU output and pre-activation
//!   gradient stored in bf16 only: the fc product writes the first two in bf16 (cuBLASLt's
//!   GELU epilogue with a bf16 output, the bias its bf16 copy), the MLP projection's input
//!   gradient product writes the third (the GELU-derivative epilogue reading the bf16
//!   pre-activation). Unlike `bf16_acts` this changes a value: the GELU derivative is taken
//!   at the bf16-rounded pre-activation, as llm.c does (otherwise fp32, with the GELU output
//!   and the gradient rounded into scratch before the products that read them)
//! - `bf16_logits`: in bf16 mode, the LM head writes the logits in bf16 (as torch
//!   autocast's are), the cross-entropy kernel reads them and writes their gradient over
//!   them in bf16: half the bytes of the largest activation and no separate gradient
//!   buffer (otherwise fp32 logits, and the gradient in bf16 scratch or rounded there)
//! - `bf16_attn`: in bf16 mode with the bf16 fused attention, the attention's inputs and
//!   outputs stored in bf16 only: the qkv product writes q, k, v in bf16 (its bias the
//!   parameter's bf16 copy), the attention kernels read them and write their output in bf16
//!   for the projection, and the projection's input-gradient product writes the attention
//!   output's gradient in bf16 for the attention backward (otherwise fp32, rounded as the
//!   kernels load them and by cast passes before the products). Changes two values: the qkv
//!   bias is added in its bf16 copy, and the backward's D = y . dy sums bf16 y and dy
//! - `bf16_dln`: in bf16 mode, the gradient of each LayerNorm output (ln1, ln2, lnf) stored
//!   in bf16: the input-gradient products of the qkv and fc layers and of the LM head write
//!   it in bf16, and the LayerNorm backward reads it so (half the bytes written and read
//!   back: ~0.6 GB per GPT-2 124M step at B = 8, T = 1024). Changes a value as torch
//!   autocast does (its linear layers' input gradients are bf16): the gradient is rounded
//!   to bf16 before the LayerNorm backward (otherwise fp32)
//! - `fresh_grads`: the first micro-step after `zero_grad` writes the parameter gradients
//!   instead of adding them to a zeroed buffer, as PyTorch's `zero_grad(set_to_none=True)`
//!   leaves them for its first backward pass: no pass zeroing the gradient buffer (4 bytes
//!   per parameter), and the weight-gradient products do not read it (beta 0): ~1 GB less
//!   traffic per optimizer step for GPT-2 124M (otherwise `zero_grad` zeroes the buffer and
//!   every micro-step adds to it). The same values either way (an exactly zero gradient
//!   may keep its sign, which no later value can tell)
//! - `graphs`: a training micro-step (forward, loss, backward) captured once as a CUDA
//!   graph and replayed with one launch while its shape stays the same (not while
//!   gradients are all-reduced bucket by bucket during the backward pass: see
//!   `engine::cuda::graphs`); otherwise every kernel and product is
//!   launched from the host, a few hundred per micro-step. The same bits either way
//! - `all`: every one of the above
//!
//! An unknown name is an error listing the known ones, so that a typo never silently
//! measures the wrong thing.

/// Declares the switches once: the struct, the names `NAMES` accepts and the helpers that
/// read and set a switch by its name, all in the order given.
macro_rules! switches {
    ($($name:ident),* $(,)?) => {
        /// Which optimisations the engine may use.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Switches {
            $(pub $name: bool,)*
        }

        /// Names accepted in `NANOGPT_CUDA_DISABLE`.
        pub const NAMES: &[&str] = &[$(stringify!($name),)* "all"];

        impl Switches {
            /// Every optimisation on, or every one off.
            const fn every(on: bool) -> Switches {
                Switches { $($name: on,)* }
            }

            /// The switch called `name`, if there is one (not `all`).
            fn named(&mut self, name: &str) -> Option<&mut bool> {
                match name {
                    $(stringify!($name) => Some(&mut self.$name),)*
                    _ => None,
                }
            }

            /// Each switch's name and state, in declaration order.
            fn each(&self) -> Vec<(&'static str, bool)> {
                vec![$((stringify!($name), self.$name)),*]
            }
        }
    };
}

switches!(
    flash,
    flash_bf16,
    flash_hs64,
    flash_async,
    flash_exp2,
    epilogues,
    fused_ln,
    fused_residual,
    bf16_acts,
    bf16_mlp,
    bf16_logits,
    bf16_attn,
    bf16_dln,
    fresh_grads,
    graphs,
);

impl Default for Switches {
    fn default() -> Self {
        Switches::every(true)
    }
}

impl Switches {
    /// The switches with the optimisations named in `disable` (comma-separated) turned off.
    pub fn parse(disable: &str) -> Result<Switches, String> {
        let mut s = Switches::default();
        for name in disable.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                s = Switches::every(false);
                continue;
            }
            match s.named(name) {
                Some(on) => *on = false,
                None => {
                    return Err(format!(
                        "NANOGPT_CUDA_DISABLE: unknown optimisation {name:?}; known: {}",
                        NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(s)
    }

    /// The switches from `NANOGPT_CUDA_DISABLE` (all on when it is unset).
    pub fn from_env() -> Result<Switches, String> {
        Switches::parse(&std::env::var("NANOGPT_CUDA_DISABLE").unwrap_or_default())
    }

    /// The optimisations that are off, for the engine's description ("" when none).
    pub fn disabled(&self) -> Vec<&'static str> {
        self.each()
            .into_iter()
            .filter(|&(_, on)| !on)
            .map(|(name, _)| name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_turn_optimisations_off_and_typos_are_errors() {
        assert_eq!(Switches::parse("").unwrap(), Switches::default());
        let s = Switches::parse("flash, fused_ln").unwrap();
        assert!(!s.flash && s.flash_bf16 && s.epilogues && !s.fused_ln && s.bf16_acts);
        assert_eq!(s.disabled(), ["flash", "fused_ln"]);
        let s = Switches::parse("flash_bf16").unwrap();
        assert!(s.flash && !s.flash_bf16 && s.epilogues && s.fused_ln);
        assert_eq!(s.disabled(), ["flash_bf16"]);
        let all = Switches::parse("all").unwrap();
        assert_eq!(
            all.disabled(),
            [
                "flash",
                "flash_bf16",
                "flash_hs64",
                "flash_async",
                "flash_exp2",
                "epilogues",
                "fused_ln",
                "fused_residual",
                "bf16_acts",
                "bf16_mlp",
                "bf16_logits",
                "bf16_attn",
                "bf16_dln",
                "fresh_grads",
                "graphs"
            ]
        );
        let s = Switches::parse("fused_residual").unwrap();
        assert!(s.fused_ln && !s.fused_residual && s.bf16_acts);
        assert_eq!(s.disabled(), ["fused_residual"]);
        let s = Switches::parse("bf16_acts").unwrap();
        assert_eq!(s.disabled(), ["bf16_acts"]);
        let s = Switches::parse("bf16_mlp").unwrap();
        assert!(s.bf16_acts && !s.bf16_mlp && s.bf16_logits);
        assert_eq!(s.disabled(), ["bf16_mlp"]);
        let s = Switches::parse("bf16_attn").unwrap();
        assert!(s.flash_bf16 && s.bf16_logits && !s.bf16_attn);
        assert_eq!(s.disabled(), ["bf16_attn"]);
        let s = Switches::parse("bf16_dln").unwrap();
        assert!(s.bf16_acts && s.bf16_attn && !s.bf16_dln && s.graphs);
        assert_eq!(s.disabled(), ["bf16_dln"]);
        let s = Switches::parse("flash_async").unwrap();
        assert!(s.flash_hs64 && !s.flash_async && s.bf16_attn);
        assert_eq!(s.disabled(), ["flash_async"]);
        let s = Switches::parse("flash_exp2").unwrap();
        assert!(s.flash_async && !s.flash_exp2 && s.epilogues);
        assert_eq!(s.disabled(), ["flash_exp2"]);
        let s = Switches::parse("graphs").unwrap();
        assert!(s.bf16_attn && !s.graphs);
        assert_eq!(s.disabled(), ["graphs"]);
        let err = Switches::parse("flsh").unwrap_err();
        assert!(
            err.contains("\"flsh\"") && err.contains("epilogues"),
            "{err}"
        );
    }
}
