//! Loading Hugging Face GPT-2 weights into our flat parameter buffer: from the Hub
//! (`init_from=gpt2*`, through [`crate::hub`]) or a local directory. The safetensors files
//! are memory-mapped and each tensor is converted (F32 / F16 / BF16 -> f32) straight into its
//! slot of the one parameter buffer, so a 1.5B-parameter model needs one f32 copy in memory,
//! not two. Position embeddings are cropped to the requested block size while copying.

use super::hf_config::HfConfig;
use super::{
    hub_repo, io_err, is_local_dir_spec, InteropError, Result, CONFIG_FILE, WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
};
use crate::config::TrainConfig;
use crate::data::meta::Meta;
use crate::data::GPT2_VOCAB_SIZE;
use crate::hub::{HubClient, HubError, RepoType};
use crate::model::{GptConfig, ParamLayout};
use crate::tokenizer::Tokenizer;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Revision of the GPT-2 repositories that `init_from=gpt2*` reads.
pub const GPT2_REVISION: &str = "main";
/// Floats converted per parallel task.
const PAR_CHUNK: usize = 1 << 18;

/// Where pretrained weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `gpt2`, `gpt2-medium`, `gpt2-large` or `gpt2-xl`, from `openai-community/<name>`.
    Hub(String),
    /// A local Hugging Face GPT-2 directory (config.json + model.safetensors).
    Dir(PathBuf),
}

impl Source {
    /// The source an `init_from` value names (`None` for `scratch`, `resume` and unknown
    /// words). `~/` at the start of a directory is the home directory.
    pub fn parse(init_from: &str) -> Option<Source> {
        if hub_repo(init_from).is_some() {
            return Some(Source::Hub(init_from.to_string()));
        }
        if !is_local_dir_spec(init_from) {
            return None;
        }
        let path = match init_from.strip_prefix("~/") {
            Some(rest) => std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(rest))
                .unwrap_or_else(|| PathBuf::from(init_from)),
            None => PathBuf::from(init_from),
        };
        Some(Source::Dir(path))
    }
}

/// Pretrained weights in our layout.
#[derive(Clone, Debug)]
pub struct Pretrained {
    /// Our model config: the checkpoint's sizes, unpadded vocabulary, biases, the block size
    /// asked for (position embeddings cropped to it) and the dropout asked for.
    pub model: GptConfig,
    /// Flat parameters in `ParamLayout::new(&model)` order.
    pub params: Vec<f32>,
    /// Sizes from config.json (`n_positions` is the uncropped block size).
    pub hf: HfConfig,
    /// Dtypes of the weights found in the file(s), e.g. `["F32"]`.
    pub dtypes: Vec<String>,
    /// config.json and the weight file(s) that were read.
    pub config_path: PathBuf,
    pub weight_paths: Vec<PathBuf>,
    /// Human description of the source, e.g. `gpt2 (openai-community/gpt2)`.
    pub description: String,
}

/// Loads pretrained weights, with a Hub client from the environment for `Source::Hub`.
/// `block_size: None` keeps all `n_positions` positions.
pub fn load_pretrained(
    src: &Source,
    block_size: Option<usize>,
    dropout: f32,
) -> Result<Pretrained> {
    load_checked(src, None, block_size, dropout, &|_| Ok(()))
}

/// [`load_pretrained`] with an explicit Hub client for `Source::Hub`.
pub fn load_pretrained_with(
    src: &Source,
    hub: Option<&HubClient>,
    block_size: Option<usize>,
    dropout: f32,
) -> Result<Pretrained> {
    load_checked(src, hub, block_size, dropout, &|_| Ok(()))
}

/// The loader: config.json first, then `check` on it (so that a model the caller cannot
/// use is refused before its weights are downloaded), then the weights. `hub: None` builds
/// a client from the environment when one is needed.
fn load_checked(
    src: &Source,
    hub: Option<&HubClient>,
    block_size: Option<usize>,
    dropout: f32,
    check: &dyn Fn(&HfConfig) -> Result<()>,
) -> Result<Pretrained> {
    let (config_path, hub_source, local_weights, description) = match src {
        Source::Hub(name) => {
            let hub = match hub {
                Some(h) => h.clone(),
                None => HubClient::from_env()?,
            };
            let repo = hub_repo(name).unwrap_or(name);
            let config = hub.download(repo, RepoType::Model, GPT2_REVISION, CONFIG_FILE)?;
            (config, Some((hub, name)), None, format!("{name} ({repo})"))
        }
        Source::Dir(dir) => {
            let (c, w) = dir_files(dir)?;
            (c, None, Some(w), dir.display().to_string())
        }
    };
    let hf = HfConfig::load(&config_path)?;
    check(&hf)?;
    let block = block_size.unwrap_or(hf.n_positions);
    if block > hf.n_positions {
        return Err(InteropError::BlockSize {
            requested: block,
            available: hf.n_positions,
            source_desc: description,
        });
    }
    let model = hf.model_config(block, dropout)?;
    let weight_paths = match (local_weights, hub_source) {
        (Some(w), _) => w,
        (None, Some((hub, name))) => hub_weights(&hub, name)?,
        (None, None) => unreachable!("invariant: a source is either a directory or the Hub"),
    };
    let (params, dtypes) = read_weights(&weight_paths, &hf, &model)?;
    Ok(Pretrained {
        model,
        params,
        hf,
        dtypes,
        config_path,
        weight_paths,
        description,
    })
}

/// The weight file(s) of a GPT-2 on the Hub, downloaded into the cache.
fn hub_weights(hub: &HubClient, name: &str) -> Result<Vec<PathBuf>> {
    let repo = hub_repo(name).unwrap_or(name);
    let get = |file: &str| hub.download(repo, RepoType::Model, GPT2_REVISION, file);
    let weights = match get(WEIGHTS_FILE) {
        Ok(p) => vec![p],
        Err(HubError::FileNotFound { .. }) => {
            let index = get(WEIGHTS_INDEX_FILE)?;
            shard_names(&index)?
                .iter()
                .map(|f| get(f))
                .collect::<std::result::Result<Vec<_>, _>>()?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(weights)
}

/// config.json and the weight file(s) of a local directory, with errors that say what the
/// directory holds instead.
fn dir_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    if !dir.is_dir() {
        return Err(InteropError::NotADirectory {
            dir: dir.to_path_buf(),
        });
    }
    let run_dir_hint = if dir.join(crate::train::checkpoint::LATEST_NAME).exists() {
        " (this is a nanogpt run directory: continue it with init_from=resume and \
         out_dir set to it, or convert it with `nanogpt export`)"
    } else {
        ""
    };
    let config = dir.join(CONFIG_FILE);
    if !config.is_file() {
        return Err(InteropError::MissingFile {
            dir: dir.to_path_buf(),
            file: CONFIG_FILE.to_string(),
            hint: format!(
                "a Hugging Face model directory holds config.json and model.safetensors, as \
                 save_pretrained writes them{run_dir_hint}"
            ),
        });
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok((config, vec![single]));
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let shards = shard_names(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect::<Vec<_>>();
        if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
            return Err(InteropError::MissingFile {
                dir: dir.to_path_buf(),
                file: missing
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                hint: format!("{WEIGHTS_INDEX_FILE} lists it; copy every shard into the directory"),
            });
        }
        return Ok((config, shards));
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        "only safetensors weights are read; convert pytorch_model.bin with transformers: \
         GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            .to_string()
    } else {
        format!("the weights are missing{run_dir_hint}")
    };
    Err(InteropError::MissingFile {
        dir: dir.to_path_buf(),
        file: WEIGHTS_FILE.to_string(),
        hint,
    })
}

/// Shard file names listed by a `model.safetensors.index.json`, each once, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(io_err("read", index))?;
    let bad = |reason: String| InteropError::ConfigJson {
        path: index.to_path_buf(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .filter(|f| !f.is_empty() && !f.contains('/') && !f.contains('\\') && *f != "..")
            .ok_or_else(|| {
                bad(format!(
                    "weight_map[\"{tensor}\"] = {file} is not a file name"
                ))
            })?;
        names.insert(f.to_string());
    }
    Ok(names.into_iter().collect())
}

/// A tensor in one of the mapped files.
struct Found<'a> {
    file: usize,
    name: String,
    view: safetensors::tensor::TensorView<'a>,
}

fn dtype_size(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Converts `dst.len()` values of `dtype` from the start of `src` (little-endian) into `dst`.
fn convert(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    let size = dtype_size(dtype).expect("invariant: dtypes are checked before conversion");
    let src = &src[..dst.len() * size];
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK * size))
        .for_each(|(d, s)| match dtype {
            Dtype::F32 => {
                for (x, b) in d.iter_mut().zip(s.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::F16 => {
                for (x, b) in d.iter_mut().zip(s.chunks_exact(2)) {
                    *x = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            _ => {
                for (x, b) in d.iter_mut().zip(s.chunks_exact(2)) {
                    *x = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        });
}

/// Reads every tensor of `model`'s layout from the weight files (names with or without the
/// `transformer.` prefix), checking shapes against config.json and refusing unknown tensors.
fn read_weights(
    paths: &[PathBuf],
    hf: &HfConfig,
    model: &GptConfig,
) -> Result<(Vec<f32>, Vec<String>)> {
    let mut maps = Vec::with_capacity(paths.len());
    for p in paths {
        let file = std::fs::File::open(p).map_err(io_err("open", p))?;
        // SAFETY: the mapping is read-only; the file is not modified by this program while
        // it is read. A concurrent outside modification could change the values read, not
        // memory safety of the slices used (they are bounds-checked byte slices).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("map", p))?;
        maps.push(mmap);
    }
    let mut found: HashMap<String, Found> = HashMap::new();
    for (i, (p, m)) in paths.iter().zip(&maps).enumerate() {
        let st = SafeTensors::deserialize(m).map_err(|e| InteropError::Safetensors {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let short = name
                .strip_prefix("transformer.")
                .unwrap_or(&name)
                .to_string();
            if let Some(prev) = found.get(&short) {
                return Err(InteropError::UnexpectedTensor {
                    path: p.clone(),
                    tensor: name.clone(),
                    sizes: hf.sizes(),
                    hint: format!(
                        "it duplicates '{}' in {}; remove one of them",
                        prev.name,
                        paths[prev.file].display()
                    ),
                });
            }
            found.insert(
                short,
                Found {
                    file: i,
                    name,
                    view,
                },
            );
        }
    }
    let layout = ParamLayout::new(model);
    let mut params = vec![0f32; layout.total];
    let mut dtypes = BTreeSet::new();
    let c = model.n_embd;
    for t in &layout.tensors {
        let short = t
            .name
            .strip_prefix("transformer.")
            .expect("invariant: layout names start with transformer.");
        let f = found
            .remove(short)
            .ok_or_else(|| InteropError::MissingTensor {
                path: paths[0].clone(),
                tensor: t.name.clone(),
                alt: short.to_string(),
            })?;
        let path = &paths[f.file];
        let expected: Vec<usize> = if t.offset == layout.wpe {
            vec![hf.n_positions, c]
        } else {
            t.shape.clone()
        };
        if dtype_size(f.view.dtype()).is_none() {
            return Err(InteropError::Dtype {
                path: path.clone(),
                tensor: f.name,
                found: format!("{:?}", f.view.dtype()),
            });
        }
        if f.view.shape() != expected.as_slice() {
            let mut rev = expected.clone();
            rev.reverse();
            let hint = if expected.len() == 2 && f.view.shape() == rev.as_slice() {
                "; it looks transposed (nn.Linear [out, in] layout), but GPT-2 stores these \
                 weights Conv1D-style as [in, out]"
                    .to_string()
            } else {
                "; config.json and the weights do not belong together".to_string()
            };
            return Err(InteropError::Shape {
                path: path.clone(),
                tensor: f.name,
                found: f.view.shape().to_vec(),
                needs: format!("config.json ({}) needs {expected:?}{hint}", hf.sizes()),
            });
        }
        dtypes.insert(format!("{:?}", f.view.dtype()));
        // wpe: the first block_size rows (row-major), which is a prefix of the data
        convert(
            f.view.dtype(),
            f.view.data(),
            &mut params[t.offset..t.offset + t.len],
        );
    }
    let mut rest: Vec<Found> = found.into_values().collect();
    rest.sort_by(|a, b| a.name.cmp(&b.name));
    for f in rest {
        let short = f.name.strip_prefix("transformer.").unwrap_or(&f.name);
        if short.ends_with(".attn.bias") || short.ends_with(".attn.masked_bias") {
            continue; // causal-mask buffers of older transformers versions
        }
        let path = &paths[f.file];
        if short == "lm_head.weight" {
            check_tied(
                path,
                &f,
                &params[layout.wte..layout.wte + model.vocab_size * c],
            )?;
            continue;
        }
        let layer = short
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let hint = match layer {
            Some(l) if l >= model.n_layer => format!(
                "config.json says n_layer = {} but the weights have layer {l}: config.json and \
                 the weights do not belong together",
                model.n_layer
            ),
            _ => "the weights are not a GPT-2 (or not one this program can compute)".to_string(),
        };
        return Err(InteropError::UnexpectedTensor {
            path: path.clone(),
            tensor: f.name,
            sizes: hf.sizes(),
            hint,
        });
    }
    Ok((params, dtypes.into_iter().collect()))
}

/// `lm_head.weight` must be the token embedding (GPT-2 ties them).
fn check_tied(path: &Path, f: &Found, wte: &[f32]) -> Result<()> {
    let untied = || InteropError::UntiedHead {
        path: path.to_path_buf(),
    };
    let n = wte.len();
    if f.view.shape().iter().product::<usize>() != n || dtype_size(f.view.dtype()).is_none() {
        return Err(untied());
    }
    let mut head = vec![0f32; n];
    convert(f.view.dtype(), f.view.data(), &mut head);
    if head.par_iter().zip(wte.par_iter()).all(|(a, b)| a == b) {
        Ok(())
    } else {
        Err(untied())
    }
}

/// `init_from=gpt2*` or `init_from=DIR` for training: loads the weights with the config's
/// block_size and dropout, and checks that the data uses the model's vocabulary.
pub fn init_for_training(
    init_from: &str,
    cfg: &TrainConfig,
    meta: Option<&Meta>,
    data_dir: &Path,
) -> Result<(GptConfig, Vec<f32>)> {
    let src = Source::parse(init_from).ok_or_else(|| InteropError::ConfigKey {
        path: PathBuf::from("init_from"),
        key: "init_from".to_string(),
        value: init_from.to_string(),
        reason: "expected gpt2, gpt2-medium, gpt2-large, gpt2-xl or a directory".to_string(),
    })?;
    let (data_vocab, data_desc) = match meta {
        Some(m) => (
            m.vocab_size,
            format!("its meta.json, tokenizer \"{}\"", m.tokenizer),
        ),
        None => (
            GPT2_VOCAB_SIZE,
            "no meta.json, so GPT-2 BPE tokens".to_string(),
        ),
    };
    eprintln!("initializing from weights: {init_from}");
    let vocab_matches = |hf: &HfConfig| {
        if data_vocab == hf.vocab_size {
            return Ok(());
        }
        let hint = match src {
            Source::Hub(_) => "GPT-2 weights need data tokenized with GPT-2 BPE (a data directory \
                               without meta.json, or with tokenizer \"gpt2\"); prepare the dataset \
                               with GPT-2 BPE or set data_dir to such data"
                .to_string(),
            Source::Dir(_) => "train on data prepared with the vocabulary this model was trained \
                               on, or start from scratch"
                .to_string(),
        };
        Err(InteropError::VocabMismatch {
            init_from: init_from.to_string(),
            model_vocab: hf.vocab_size,
            data_vocab,
            data_dir: data_dir.to_path_buf(),
            data_desc: data_desc.clone(),
            hint,
        })
    };
    let pre = load_checked(
        &src,
        None,
        Some(cfg.block_size),
        cfg.dropout as f32,
        &vocab_matches,
    )
    .map_err(|e| e.for_init_from(init_from))?;
    report(&pre);
    if (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias)
        != (pre.model.n_layer, pre.model.n_head, pre.model.n_embd, true)
    {
        eprintln!(
            "note: the model's sizes come from {} (n_layer = {}, n_head = {}, n_embd = {}, \
             bias = True); n_layer, n_head, n_embd and bias in the config are not used",
            pre.description, pre.model.n_layer, pre.model.n_head, pre.model.n_embd
        );
    }
    Ok((pre.model, pre.params))
}

/// Prints what was loaded (stderr).
fn report(pre: &Pretrained) {
    let crop = if pre.model.block_size < pre.hf.n_positions {
        format!(
            ", position embeddings cropped from {} to block_size {}",
            pre.hf.n_positions, pre.model.block_size
        )
    } else {
        String::new()
    };
    eprintln!(
        "loaded {}: {} layers, {} heads, {} channels, vocabulary {}, {} weights from {}{crop}; \
         dropout = {}",
        pre.description,
        pre.model.n_layer,
        pre.model.n_head,
        pre.model.n_embd,
        pre.model.vocab_size,
        pre.dtypes.join("+"),
        pre.weight_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        pre.model.dropout
    );
}

/// `init_from=gpt2*` or `init_from=DIR` for sampling: the weights (all positions, no
/// dropout) and the tokenizer (GPT-2 BPE for the Hub models; for a directory its meta.json,
/// else GPT-2 BPE when the vocabulary is GPT-2's).
pub fn load_for_sampling(init_from: &str) -> Result<(Pretrained, Tokenizer)> {
    let src = Source::parse(init_from).ok_or_else(|| InteropError::ConfigKey {
        path: PathBuf::from("init_from"),
        key: "init_from".to_string(),
        value: init_from.to_string(),
        reason: "expected resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a directory"
            .to_string(),
    })?;
    let pre = load_pretrained(&src, None, 0.0).map_err(|e| e.for_init_from(init_from))?;
    report(&pre);
    let tok = match &src {
        Source::Hub(_) => Tokenizer::gpt2(),
        Source::Dir(dir) if Meta::path(dir).exists() => Tokenizer::for_data_dir(dir)?,
        Source::Dir(_) if pre.model.vocab_size == GPT2_VOCAB_SIZE => Tokenizer::gpt2(),
        Source::Dir(dir) => {
            return Err(InteropError::NoTokenizer {
                init_from: init_from.to_string(),
                vocab: pre.model.vocab_size,
                dir: dir.clone(),
            })
        }
    };
    Ok((pre, tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("gpt2-xl"),
            Some(Source::Hub("gpt2-xl".into()))
        );
        assert_eq!(Source::parse("scratch"), None);
        assert_eq!(Source::parse("resume"), None);
        assert_eq!(Source::parse("gpt3"), None);
        assert_eq!(
            Source::parse("./models/tiny"),
            Some(Source::Dir(PathBuf::from("./models/tiny")))
        );
        assert_eq!(
            Source::parse("/abs/dir"),
            Some(Source::Dir(PathBuf::from("/abs/dir")))
        );
    }

    #[test]
    fn half_precision_converts_exactly() {
        let vals = [1.0f32, -2.5, 0.0, 65504.0, 1.0 / 1024.0];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let mut out = vec![0f32; vals.len()];
        convert(Dtype::F16, &f16, &mut out);
        assert_eq!(out, vals);
        convert(Dtype::BF16, &bf16, &mut out);
        assert_eq!(out, [1.0, -2.5, 0.0, 65536.0, 1.0 / 1024.0]);
    }
}
