//! Export of a checkpoint as a Hugging Face GPT-2 directory: `config.json` and
//! `model.safetensors` (f32, `transformer.`-prefixed names as `save_pretrained` writes them,
//! the token embedding cut back from the padded to the real vocabulary), plus the run's
//! `meta.json` when it has a character vocabulary. Models trained with `bias=false` get zero
//! biases, which compute exactly the same function. Both files are written atomically.

use super::{hf_config, io_err, InteropError, Result, CONFIG_FILE, WEIGHTS_FILE};
use crate::data::meta::Meta;
use crate::fsutil;
use crate::model::{GptConfig, ParamLayout};
use crate::train::checkpoint::{self, CheckpointPaths};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub checkpoint: PathBuf,
    pub dir: PathBuf,
    pub model: GptConfig,
    pub iter_num: u64,
    /// Files written into `dir`.
    pub files: Vec<PathBuf>,
    /// Size of model.safetensors in bytes.
    pub weights_bytes: u64,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported {} (iteration {}; {} layers, {} heads, {} channels, block {}, vocabulary {}) \
             to {}: {}; load it with transformers.GPT2LMHeadModel.from_pretrained(\"{}\")",
            self.checkpoint.display(),
            self.iter_num,
            self.model.n_layer,
            self.model.n_head,
            self.model.n_embd,
            self.model.block_size,
            self.model.vocab_size,
            self.dir.display(),
            self.files
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
            self.dir.display()
        )
    }
}

/// Exports a run directory: its `checkpoint` file (a name inside `out_dir` or a path;
/// default `ckpt.safetensors`) and its meta.json.
pub fn export_run(out_dir: &Path, checkpoint: Option<&Path>, to: &Path) -> Result<ExportReport> {
    let ckpt = match checkpoint {
        Some(c) if c.components().count() > 1 || c.is_absolute() => c.to_path_buf(),
        Some(c) => out_dir.join(c),
        None => CheckpointPaths::new(out_dir).latest(),
    };
    if !ckpt.is_file() {
        let mut available: Vec<String> = std::fs::read_dir(out_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        available.sort();
        return Err(InteropError::NoCheckpoint {
            path: ckpt,
            available,
        });
    }
    let meta = Meta::load_opt(out_dir)?;
    export_checkpoint(&ckpt, meta.as_ref(), to)
}

/// One tensor of the export: its HF name, shape, and values (`None`: zeros).
struct Out<'a> {
    name: String,
    shape: Vec<usize>,
    data: Option<&'a [f32]>,
}

/// Writes `ckpt_path`'s weights to `to/config.json` + `to/model.safetensors` (and
/// `to/meta.json` for a character vocabulary).
pub fn export_checkpoint(ckpt_path: &Path, meta: Option<&Meta>, to: &Path) -> Result<ExportReport> {
    let ckpt = checkpoint::load(ckpt_path, false)?;
    let model = ckpt.state.model.clone();
    if let Some(m) = meta {
        if m.vocab_size != model.vocab_size {
            return Err(InteropError::Export {
                path: to.to_path_buf(),
                reason: format!(
                    "meta.json describes a vocabulary of {} tokens but {} has {}; export from \
                     the run directory the checkpoint belongs to",
                    m.vocab_size,
                    ckpt_path.display(),
                    model.vocab_size
                ),
            });
        }
    }
    let tensors = hf_tensors(&model, &ckpt.params);
    std::fs::create_dir_all(to).map_err(io_err("create directory", to))?;
    let weights = to.join(WEIGHTS_FILE);
    let weights_bytes = write_safetensors(&weights, &tensors)?;
    let config = to.join(CONFIG_FILE);
    let mut text = serde_json::to_string_pretty(&hf_config::to_json(&model)).map_err(|e| {
        InteropError::Export {
            path: config.clone(),
            reason: e.to_string(),
        }
    })?;
    text.push('\n');
    fsutil::write_atomic(&config, text.as_bytes()).map_err(io_err("write", &config))?;
    let mut files = vec![config, weights];
    if let Some(m) = meta.filter(|m| m.tokenizer == "char") {
        files.push(m.save(to)?);
    }
    Ok(ExportReport {
        checkpoint: ckpt_path.to_path_buf(),
        dir: to.to_path_buf(),
        iter_num: ckpt.state.iter_num,
        model,
        files,
        weights_bytes,
    })
}

/// The Hugging Face tensors of our parameters, in layout order: biases included (zeros when
/// the model has none), wte cut to the real vocabulary.
fn hf_tensors<'a>(model: &GptConfig, params: &'a [f32]) -> Vec<Out<'a>> {
    let layout = ParamLayout::new(model);
    let c = model.n_embd;
    let get = |name: &str| {
        layout
            .get(name)
            .map(|t| &params[t.offset..t.offset + t.len])
    };
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| {
        let data = get(&name);
        out.push(Out { name, shape, data });
    };
    push("transformer.wte.weight".into(), vec![model.vocab_size, c]);
    push("transformer.wpe.weight".into(), vec![model.block_size, c]);
    for l in 0..model.n_layer {
        let p = format!("transformer.h.{l}.");
        for (name, shape) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, 4 * c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![4 * c, c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            push(format!("{p}{name}"), shape);
        }
    }
    push("transformer.ln_f.weight".into(), vec![c]);
    push("transformer.ln_f.bias".into(), vec![c]);
    // wte: only the real rows (a prefix of the padded table)
    for o in &mut out {
        let n: usize = o.shape.iter().product();
        o.data = o.data.map(|d| &d[..n]);
    }
    out
}

/// Streams `tensors` into a safetensors file (F32) written atomically; returns its size.
fn write_safetensors(path: &Path, tensors: &[Out]) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({"format": "pt"}),
    );
    let mut offset = 0usize;
    for t in tensors {
        let bytes = 4 * t.shape.iter().product::<usize>();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| {
        InteropError::Export {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let total = 8 + json.len() as u64 + offset as u64;
    fsutil::write_atomic_with(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for t in tensors {
            let n: usize = t.shape.iter().product();
            match t.data {
                Some(d) => {
                    for chunk in d.chunks(1 << 14) {
                        buf.clear();
                        buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                        w.write_all(&buf)?;
                    }
                }
                None => {
                    let zeros = [0u8; 4096];
                    let mut left = 4 * n;
                    while left > 0 {
                        let k = left.min(zeros.len());
                        w.write_all(&zeros[..k])?;
                        left -= k;
                    }
                }
            }
        }
        Ok(())
    })
    .map_err(io_err("write", path))?;
    Ok(total)
}
