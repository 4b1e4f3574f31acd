//! `config.json` of a Hugging Face GPT-2 model: reading it (every key that changes the
//! computation is checked, so a model this engine would compute differently is refused
//! with the key named) and writing one for an export.

use super::{io_err, InteropError, Result};
use crate::model::GptConfig;
use serde_json::{json, Map, Value};
use std::path::Path;

/// The sizes of a Hugging Face GPT-2, from its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// `n_positions` (or the older `n_ctx`): rows of the position embedding.
    pub n_positions: usize,
    pub vocab_size: usize,
}

impl HfConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::parse(&text, path)
    }

    /// Parses and checks the text of a `config.json` (`path` is only named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<HfConfig> {
        let v: Value = serde_json::from_str(text).map_err(|e| InteropError::ConfigJson {
            path: path.to_path_buf(),
            reason: format!("not valid JSON ({e})"),
        })?;
        let Value::Object(obj) = v else {
            return Err(InteropError::ConfigJson {
                path: path.to_path_buf(),
                reason: "expected a JSON object".to_string(),
            });
        };
        let bad = |key: &str, value: &Value, reason: &str| InteropError::ConfigKey {
            path: path.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let not_gpt2 = "this is not a GPT-2 model; init_from takes GPT-2 models \
                        (GPT2LMHeadModel, model_type \"gpt2\") only";
        let archs = obj.get("architectures");
        if let Some(a) = archs {
            let names: Vec<&str> = a
                .as_array()
                .map(|xs| xs.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            if !names
                .iter()
                .any(|n| matches!(*n, "GPT2LMHeadModel" | "GPT2Model"))
            {
                return Err(bad("architectures", a, not_gpt2));
            }
        }
        match obj.get("model_type") {
            Some(Value::String(t)) if t == "gpt2" => {}
            Some(t) => return Err(bad("model_type", t, not_gpt2)),
            None if archs.is_some() => {}
            None => {
                return Err(bad(
                    "model_type",
                    &Value::Null,
                    "missing: a GPT-2 config.json has model_type \"gpt2\"",
                ))
            }
        }
        let size = |key: &str, alt: Option<&str>| -> Result<usize> {
            let (k, v) = match (obj.get(key), alt.and_then(|a| obj.get(a).map(|v| (a, v)))) {
                (Some(v), _) => (key, v),
                (None, Some((a, v))) => (a, v),
                (None, None) => {
                    return Err(bad(
                        key,
                        &Value::Null,
                        "missing; a GPT-2 config.json sets it",
                    ))
                }
            };
            match v.as_u64() {
                Some(n) if n >= 1 => Ok(n as usize),
                _ => Err(bad(k, v, "must be a positive integer")),
            }
        };
        let cfg = HfConfig {
            n_layer: size("n_layer", None)?,
            n_head: size("n_head", None)?,
            n_embd: size("n_embd", None)?,
            n_positions: size("n_positions", Some("n_ctx"))?,
            vocab_size: size("vocab_size", None)?,
        };
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(bad(
                "n_embd",
                &json!(cfg.n_embd),
                &format!("must be divisible by n_head = {}", cfg.n_head),
            ));
        }
        if let Some(a) = obj.get("activation_function") {
            if !matches!(a.as_str(), Some("gelu_new" | "gelu_pytorch_tanh")) {
                return Err(bad(
                    "activation_function",
                    a,
                    "this engine computes the tanh GELU of GPT-2 (\"gelu_new\") only",
                ));
            }
        }
        if let Some(e) = obj.get("layer_norm_epsilon") {
            if !e.as_f64().is_some_and(|x| (x - 1e-5).abs() <= 1e-12) {
                return Err(bad(
                    "layer_norm_epsilon",
                    e,
                    "this engine's LayerNorm uses GPT-2's 1e-5 only",
                ));
            }
        }
        if let Some(n) = obj.get("n_inner").filter(|v| !v.is_null()) {
            if n.as_u64() != Some(4 * cfg.n_embd as u64) {
                return Err(bad(
                    "n_inner",
                    n,
                    &format!("this engine's MLP is 4 * n_embd = {} wide", 4 * cfg.n_embd),
                ));
            }
        }
        let flag = |key: &str, want: bool, reason: &str| -> Result<()> {
            match obj.get(key) {
                Some(v) if v.as_bool() != Some(want) => Err(bad(key, v, reason)),
                _ => Ok(()),
            }
        };
        flag(
            "scale_attn_weights",
            true,
            "this engine always scales attention by 1/sqrt(head size)",
        )?;
        flag(
            "scale_attn_by_inverse_layer_idx",
            false,
            "this engine does not scale attention by layer index",
        )?;
        flag(
            "tie_word_embeddings",
            true,
            "this engine ties the output layer to the token embedding, as GPT-2 does",
        )?;
        flag(
            "add_cross_attention",
            false,
            "cross-attention layers are not supported",
        )?;
        Ok(cfg)
    }

    /// Our model config for these sizes: vocabulary unpadded, biases on, `block_size`
    /// positions (at most `n_positions`), the given dropout.
    pub fn model_config(&self, block_size: usize, dropout: f32) -> Result<GptConfig> {
        let mut cfg = GptConfig::new(
            self.n_layer,
            self.n_head,
            self.n_embd,
            block_size,
            self.vocab_size,
            true,
            dropout,
        )?;
        cfg.padded_vocab_size = self.vocab_size;
        Ok(cfg)
    }

    /// `n_layer=.., n_head=.., n_embd=.., n_positions=.., vocab_size=..` (for messages).
    pub fn sizes(&self) -> String {
        format!(
            "n_layer={}, n_head={}, n_embd={}, n_positions={}, vocab_size={}",
            self.n_layer, self.n_head, self.n_embd, self.n_positions, self.vocab_size
        )
    }
}

/// The `config.json` that `transformers` writes for a `GPT2LMHeadModel` of `model`'s sizes
/// (real vocabulary, `n_positions = block_size`, dropout from the model).
pub fn to_json(model: &GptConfig) -> Value {
    let gpt2_vocab = model.vocab_size == crate::data::GPT2_VOCAB_SIZE;
    let eot = if gpt2_vocab {
        json!(crate::tokenizer::GPT2_EOT)
    } else {
        Value::Null
    };
    let p = model.dropout as f64;
    let mut m = Map::new();
    for (k, v) in [
        ("activation_function", json!("gelu_new")),
        ("architectures", json!(["GPT2LMHeadModel"])),
        ("attn_pdrop", json!(p)),
        ("bos_token_id", eot.clone()),
        ("embd_pdrop", json!(p)),
        ("eos_token_id", eot),
        ("initializer_range", json!(0.02)),
        ("layer_norm_epsilon", json!(1e-5)),
        ("model_type", json!("gpt2")),
        ("n_ctx", json!(model.block_size)),
        ("n_embd", json!(model.n_embd)),
        ("n_head", json!(model.n_head)),
        ("n_inner", Value::Null),
        ("n_layer", json!(model.n_layer)),
        ("n_positions", json!(model.block_size)),
        ("reorder_and_upcast_attn", json!(false)),
        ("resid_pdrop", json!(p)),
        ("scale_attn_by_inverse_layer_idx", json!(false)),
        ("scale_attn_weights", json!(true)),
        ("tie_word_embeddings", json!(true)),
        ("torch_dtype", json!("float32")),
        ("use_cache", json!(true)),
        ("vocab_size", json!(model.vocab_size)),
    ] {
        m.insert(k.to_string(), v);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HfConfig> {
        HfConfig::parse(text, Path::new("dir/config.json"))
    }

    #[test]
    fn reads_gpt2_and_refuses_other_models_by_key() {
        let c = parse(
            r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12,
                "n_head": 12, "n_embd": 768, "n_ctx": 1024, "vocab_size": 50257,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05}"#,
        )
        .unwrap();
        assert_eq!((c.n_layer, c.n_positions, c.vocab_size), (12, 1024, 50257));
        let m = c.model_config(256, 0.1).unwrap();
        assert_eq!(
            (m.block_size, m.padded_vocab_size, m.bias),
            (256, 50257, true)
        );

        let base = r#""n_layer": 2, "n_head": 2, "n_embd": 8, "n_positions": 16, "vocab_size": 11"#;
        for (extra, key) in [
            (
                r#""architectures": ["LlamaForCausalLM"], "model_type": "llama""#,
                "architectures",
            ),
            (r#""model_type": "gpt_neox""#, "model_type"),
            (
                r#""model_type": "gpt2", "activation_function": "relu""#,
                "activation_function",
            ),
            (
                r#""model_type": "gpt2", "layer_norm_epsilon": 1e-6"#,
                "layer_norm_epsilon",
            ),
            (r#""model_type": "gpt2", "n_inner": 10"#, "n_inner"),
            (
                r#""model_type": "gpt2", "scale_attn_by_inverse_layer_idx": true"#,
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                r#""model_type": "gpt2", "tie_word_embeddings": false"#,
                "tie_word_embeddings",
            ),
            (r#""#, "model_type"),
        ] {
            let text = if extra.is_empty() {
                format!("{{{base}}}")
            } else {
                format!("{{{base}, {extra}}}")
            };
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("{key} = ")), "{key}: {e}");
            assert!(e.contains("dir/config.json"), "{e}");
        }
        let e = parse(
            r#"{"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 11}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("n_positions") && e.contains("missing"), "{e}");
        let e = parse("[1]").unwrap_err().to_string();
        assert!(e.contains("JSON object"), "{e}");
    }

    #[test]
    fn written_config_reads_back() {
        let model = GptConfig::new(2, 4, 32, 16, 65, false, 0.1).unwrap();
        let text = serde_json::to_string_pretty(&to_json(&model)).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(
            (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size),
            (2, 4, 32, 16, 65)
        );
    }
}
