//! The GPT-2 model description: [`GptConfig`] (sizes and presets), the named layout of the
//! single contiguous parameter buffer ([`ParamLayout`], Hugging Face GPT-2 tensor names and
//! Conv1D `[in, out]` weight layout), nanoGPT's initialisation, and FLOPs accounting for MFU.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Largest vocabulary a uint16 token file can address.
pub const MAX_U16_VOCAB: usize = 65_536;

/// Errors for model shapes a user can ask for but that cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("invalid model config: {key} = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("unknown model preset '{0}'; known presets: gpt2, gpt2-medium, gpt2-large, gpt2-xl")]
    UnknownPreset(String),
}

/// Architecture hyper-parameters (nanoGPT's `GPTConfig`).
///
/// `vocab_size` is the real vocabulary (e.g. 50257); the embedding table is padded to
/// [`GptConfig::padded_vocab_size`] rows and padded logits never enter softmax or the loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    /// Rows of the embedding table: `vocab_size` rounded up (to 64 when training from scratch).
    pub padded_vocab_size: usize,
    pub bias: bool,
    pub dropout: f32,
}

impl GptConfig {
    /// A config with the vocabulary padded up to a multiple of 64, as for training from scratch.
    pub fn new(
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        block_size: usize,
        vocab_size: usize,
        bias: bool,
        dropout: f32,
    ) -> Result<Self, ModelError> {
        let cfg = GptConfig {
            n_layer,
            n_head,
            n_embd,
            block_size,
            vocab_size,
            padded_vocab_size: vocab_size.div_ceil(64) * 64,
            bias,
            dropout,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// GPT-2 presets by Hugging Face name: gpt2 (124M), gpt2-medium (350M), gpt2-large
    /// (774M), gpt2-xl (1558M); vocab 50257 (unpadded), block 1024, bias true, dropout 0.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let (l, h, c) = match name {
            "gpt2" => (12, 12, 768),
            "gpt2-medium" => (24, 16, 1024),
            "gpt2-large" => (36, 20, 1280),
            "gpt2-xl" => (48, 25, 1600),
            other => return Err(ModelError::UnknownPreset(other.to_string())),
        };
        let mut cfg = GptConfig::new(l, h, c, 1024, 50257, true, 0.0)?;
        cfg.padded_vocab_size = 50257;
        Ok(cfg)
    }

    /// Checks every size; the error names the offending key.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, value: String, reason: &str| {
            Err(ModelError::Invalid {
                key,
                value,
                reason: reason.to_string(),
            })
        };
        for (key, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(key, v.to_string(), "must be at least 1");
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(
                "n_embd",
                self.n_embd.to_string(),
                &format!("must be divisible by n_head = {}", self.n_head),
            );
        }
        if self.vocab_size > MAX_U16_VOCAB {
            return bad(
                "vocab_size",
                self.vocab_size.to_string(),
                "token files store uint16 ids, so the vocabulary can hold at most 65536 tokens",
            );
        }
        if self.padded_vocab_size < self.vocab_size {
            return bad(
                "padded_vocab_size",
                self.padded_vocab_size.to_string(),
                "must be at least vocab_size",
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", self.dropout.to_string(), "must be in [0, 1)");
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameter count with position embeddings excluded, as nanoGPT prints it.
    pub fn num_params_non_embedding(&self) -> usize {
        ParamLayout::new(self).total - self.block_size * self.n_embd
    }

    /// Training FLOPs per token by nanoGPT's formula: 6N + 12*L*H*Q*T (N without wpe).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let n = self.num_params_non_embedding() as f64;
        6.0 * n
            + 12.0
                * self.n_layer as f64
                * self.n_head as f64
                * self.head_size() as f64
                * seq_len as f64
    }
}

/// How a tensor is initialised (nanoGPT's `_init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

/// One named tensor inside the flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Hugging Face GPT-2 name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape; matrices are stored `[in, out]` row-major (HF Conv1D layout).
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub init: Init,
}

impl TensorSpec {
    /// AdamW weight decay applies to tensors of two or more dimensions only.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// Offsets of one transformer block's tensors in the flat buffer (`None` when bias=false).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockOffsets {
    pub ln1_w: usize,
    pub ln1_b: Option<usize>,
    pub qkv_w: usize,
    pub qkv_b: Option<usize>,
    pub attn_proj_w: usize,
    pub attn_proj_b: Option<usize>,
    pub ln2_w: usize,
    pub ln2_b: Option<usize>,
    pub fc_w: usize,
    pub fc_b: Option<usize>,
    pub mlp_proj_w: usize,
    pub mlp_proj_b: Option<usize>,
}

/// The named layout of the single parameter buffer (the same layout serves gradients and
/// AdamW moments). The LM head is tied to `transformer.wte.weight` and has no storage.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockOffsets>,
    pub lnf_w: usize,
    pub lnf_b: Option<usize>,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(cfg: &GptConfig) -> Self {
        let c = cfg.n_embd;
        let std = 0.02f32;
        let proj_std = 0.02 / ((2 * cfg.n_layer) as f32).sqrt();
        let mut tensors = Vec::new();
        let mut total = 0usize;
        let mut push = |name: String, shape: Vec<usize>, init: Init| -> usize {
            let len = shape.iter().product();
            let offset = total;
            total += len;
            tensors.push(TensorSpec {
                name,
                shape,
                offset,
                len,
                init,
            });
            offset
        };
        let wte = push(
            "transformer.wte.weight".into(),
            vec![cfg.padded_vocab_size, c],
            Init::Normal(std),
        );
        let wpe = push(
            "transformer.wpe.weight".into(),
            vec![cfg.block_size, c],
            Init::Normal(std),
        );
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = format!("transformer.h.{l}.");
            let bias =
                |push: &mut dyn FnMut(String, Vec<usize>, Init) -> usize, name: &str, n: usize| {
                    cfg.bias
                        .then(|| push(format!("{p}{name}"), vec![n], Init::Zeros))
                };
            let ln1_w = push(format!("{p}ln_1.weight"), vec![c], Init::Ones);
            let ln1_b = bias(&mut push, "ln_1.bias", c);
            let qkv_w = push(
                format!("{p}attn.c_attn.weight"),
                vec![c, 3 * c],
                Init::Normal(std),
            );
            let qkv_b = bias(&mut push, "attn.c_attn.bias", 3 * c);
            let attn_proj_w = push(
                format!("{p}attn.c_proj.weight"),
                vec![c, c],
                Init::Normal(proj_std),
            );
            let attn_proj_b = bias(&mut push, "attn.c_proj.bias", c);
            let ln2_w = push(format!("{p}ln_2.weight"), vec![c], Init::Ones);
            let ln2_b = bias(&mut push, "ln_2.bias", c);
            let fc_w = push(
                format!("{p}mlp.c_fc.weight"),
                vec![c, 4 * c],
                Init::Normal(std),
            );
            let fc_b = bias(&mut push, "mlp.c_fc.bias", 4 * c);
            let mlp_proj_w = push(
                format!("{p}mlp.c_proj.weight"),
                vec![4 * c, c],
                Init::Normal(proj_std),
            );
            let mlp_proj_b = bias(&mut push, "mlp.c_proj.bias", c);
            blocks.push(BlockOffsets {
                ln1_w,
                ln1_b,
                qkv_w,
                qkv_b,
                attn_proj_w,
                attn_proj_b,
                ln2_w,
                ln2_b,
                fc_w,
                fc_b,
                mlp_proj_w,
                mlp_proj_b,
            });
        }
        let lnf_w = push("transformer.ln_f.weight".into(), vec![c], Init::Ones);
        let lnf_b = cfg
            .bias
            .then(|| push("transformer.ln_f.bias".into(), vec![c], Init::Zeros));
        ParamLayout {
            tensors,
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
            total,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// nanoGPT's initialisation, reproducible from `seed`. Rows of the token embedding past
    /// the real vocabulary start at zero: they are never read by the model.
    pub fn init_params(&self, cfg: &GptConfig, seed: u64) -> Vec<f32> {
        let mut params = vec![0f32; self.total];
        let mut rng = Rng::derive(seed, 0x1417);
        for t in &self.tensors {
            let dst = &mut params[t.offset..t.offset + t.len];
            match t.init {
                Init::Zeros => {}
                Init::Ones => dst.fill(1.0),
                Init::Normal(std) => {
                    let live = if t.offset == self.wte {
                        cfg.vocab_size * cfg.n_embd
                    } else {
                        t.len
                    };
                    for x in &mut dst[..live] {
                        *x = (rng.normal() * std as f64) as f32;
                    }
                }
            }
        }
        params
    }

    /// Per-element weight-decay mask, as contiguous `(offset, len, decays)` runs.
    pub fn decay_runs(&self) -> Vec<(usize, usize, bool)> {
        self.tensors
            .iter()
            .map(|t| (t.offset, t.len, t.decays()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_parameter_counts_match_nanogpt() {
        let cfg = GptConfig::new(12, 12, 768, 1024, 50257, false, 0.0).unwrap();
        assert_eq!(cfg.padded_vocab_size, 50304);
        assert_eq!(cfg.num_params_non_embedding(), 123_587_328);
        assert_eq!(ParamLayout::new(&cfg).total, 124_373_760);
        let hf = GptConfig::preset("gpt2").unwrap();
        assert_eq!(ParamLayout::new(&hf).total, 124_439_808);
    }

    #[test]
    fn presets_and_validation() {
        assert_eq!(GptConfig::preset("gpt2-xl").unwrap().n_embd, 1600);
        assert_eq!(GptConfig::preset("gpt2-medium").unwrap().n_layer, 24);
        assert_eq!(GptConfig::preset("gpt2-large").unwrap().n_head, 20);
        assert!(matches!(
            GptConfig::preset("gpt3"),
            Err(ModelError::UnknownPreset(_))
        ));
        let err = GptConfig::new(2, 3, 64, 16, 97, true, 0.0).unwrap_err();
        assert!(err.to_string().contains("n_embd"), "{err}");
        let err = GptConfig::new(0, 1, 64, 16, 97, true, 0.0).unwrap_err();
        assert!(err.to_string().contains("n_layer"), "{err}");
        let err = GptConfig::new(2, 4, 64, 16, 70_000, true, 0.0).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }

    #[test]
    fn layout_is_contiguous_and_init_is_seeded() {
        let cfg = GptConfig::new(2, 4, 64, 16, 97, true, 0.0).unwrap();
        let layout = ParamLayout::new(&cfg);
        let mut end = 0;
        for t in &layout.tensors {
            assert_eq!(t.offset, end);
            end += t.len;
        }
        assert_eq!(end, layout.total);
        let a = layout.init_params(&cfg, 1337);
        assert_eq!(a, layout.init_params(&cfg, 1337));
        assert_ne!(a, layout.init_params(&cfg, 1338));
        let proj = layout.get("transformer.h.1.mlp.c_proj.weight").unwrap();
        let xs = &a[proj.offset..proj.offset + proj.len];
        let std = (xs.iter().map(|x| x * x).sum::<f32>() / xs.len() as f32).sqrt();
        assert!((std - 0.01).abs() < 0.001, "std {std}");
        assert!(!layout.get("transformer.ln_f.bias").unwrap().decays());
        assert!(layout.get("transformer.wpe.weight").unwrap().decays());
    }
}
