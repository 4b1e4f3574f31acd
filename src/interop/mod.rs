//! GPT-2 / Hugging Face interop: starting from OpenAI's GPT-2 weights (`init_from=gpt2`,
//! `gpt2-medium`, `gpt2-large`, `gpt2-xl`, fetched from the Hub) or from a local Hugging Face
//! GPT-2 directory (`init_from=/path/to/dir`), and exporting any checkpoint of ours as a
//! directory that `transformers` loads with `GPT2LMHeadModel.from_pretrained`.
//!
//! Our parameter layout already uses Hugging Face's names and Conv1D `[in, out]` matrices,
//! so the mapping is one to one: `[transformer.]wte.weight`, `wpe.weight`,
//! `h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}.{weight,bias}`,
//! `ln_f.{weight,bias}`. The attention-mask buffers (`h.{i}.attn.bias`, `masked_bias`) are
//! ignored, and `lm_head.weight`, when present, must equal `wte.weight` (GPT-2 ties them).
//!
//! - [`hf_config`]: reading and checking `config.json`, and writing one.
//! - [`import`]: safetensors (F32 / F16 / BF16, single file or sharded) to our flat buffer.
//! - [`export`]: a checkpoint to `config.json` + `model.safetensors`.

pub mod export;
pub mod hf_config;
pub mod import;

pub use export::{export_checkpoint, export_run, ExportReport};
pub use hf_config::HfConfig;
pub use import::{
    init_for_training, load_for_sampling, load_pretrained, load_pretrained_with, Pretrained, Source,
};

use std::path::PathBuf;

/// `config.json` of a Hugging Face model directory.
pub const CONFIG_FILE: &str = "config.json";
/// Weights of a Hugging Face model directory (single file).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights (`model-00001-of-00002.safetensors`, ...).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Hub repository of each GPT-2 size nanoGPT can start from.
pub fn hub_repo(name: &str) -> Option<&'static str> {
    match name {
        "gpt2" => Some("openai-community/gpt2"),
        "gpt2-medium" => Some("openai-community/gpt2-medium"),
        "gpt2-large" => Some("openai-community/gpt2-large"),
        "gpt2-xl" => Some("openai-community/gpt2-xl"),
        _ => None,
    }
}

/// Whether an `init_from` value names a local directory rather than a keyword: it contains
/// a path separator, starts with `.` or `~`, or is an existing directory.
pub fn is_local_dir_spec(value: &str) -> bool {
    if matches!(value, "scratch" | "resume") || hub_repo(value).is_some() || value.is_empty() {
        return false;
    }
    value.contains('/')
        || value.contains(std::path::MAIN_SEPARATOR)
        || value.starts_with('.')
        || value.starts_with('~')
        || std::path::Path::new(value).is_dir()
}

#[derive(Debug, thiserror::Error)]
pub enum InteropError {
    #[error("{} has no {file}: {hint}", dir.display())]
    MissingFile {
        dir: PathBuf,
        file: String,
        hint: String,
    },

    #[error(
        "init_from={}: no such directory; give a directory that holds a Hugging Face GPT-2 \
         (config.json + model.safetensors), or one of gpt2, gpt2-medium, gpt2-large, gpt2-xl",
        dir.display()
    )]
    NotADirectory { dir: PathBuf },

    #[error(
        "no checkpoint {} to export; {}",
        path.display(),
        if available.is_empty() {
            "that run directory holds no checkpoints (train first, or set --out_dir to a run directory)".to_string()
        } else {
            format!("checkpoints there: {} (choose one with --checkpoint NAME)", available.join(", "))
        }
    )]
    NoCheckpoint {
        path: PathBuf,
        available: Vec<String>,
    },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {reason}", path.display())]
    ConfigJson { path: PathBuf, reason: String },

    #[error("{}: {key} = {value}: {reason}", path.display())]
    ConfigKey {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },

    #[error("{} is not a readable safetensors file ({reason}); download or export it again", path.display())]
    Safetensors { path: PathBuf, reason: String },

    #[error(
        "{} has no tensor '{tensor}' (nor '{alt}'), which a GPT-2 with the sizes in config.json \
         needs; the weights are incomplete or belong to another model",
        path.display()
    )]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        alt: String,
    },

    #[error(
        "{}: tensor '{tensor}' has shape {found:?} but {needs}",
        path.display()
    )]
    Shape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        /// What config.json implies, and what to do.
        needs: String,
    },

    #[error(
        "{}: tensor '{tensor}' has dtype {found}; GPT-2 weights must be F32, F16 or BF16",
        path.display()
    )]
    Dtype {
        path: PathBuf,
        tensor: String,
        found: String,
    },

    #[error(
        "{}: unexpected tensor '{tensor}' for a GPT-2 with the sizes in config.json ({sizes}); \
         {hint}",
        path.display()
    )]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        sizes: String,
        hint: String,
    },

    #[error(
        "{}: 'lm_head.weight' differs from 'wte.weight'; GPT-2 ties the output layer to the \
         token embedding, and models with a separate output layer are not supported",
        path.display()
    )]
    UntiedHead { path: PathBuf },

    #[error(
        "block_size = {requested} is larger than the {available} positions of {source_desc} \
         (n_positions in config.json); use --block_size={available} or smaller"
    )]
    BlockSize {
        requested: usize,
        available: usize,
        source_desc: String,
    },

    #[error(
        "init_from={init_from}: the model's vocabulary has {model_vocab} tokens but the data in \
         {} uses {data_vocab} ({data_desc}); {hint}",
        data_dir.display()
    )]
    VocabMismatch {
        init_from: String,
        model_vocab: usize,
        data_vocab: usize,
        data_dir: PathBuf,
        data_desc: String,
        hint: String,
    },

    #[error(
        "init_from={init_from}: the model has a vocabulary of {vocab} tokens and {} has no \
         meta.json describing it, so its text cannot be encoded; put the meta.json of the \
         data it was trained on into that directory",
        dir.display()
    )]
    NoTokenizer {
        init_from: String,
        vocab: usize,
        dir: PathBuf,
    },

    #[error("cannot write the export to {}: {reason}", path.display())]
    Export { path: PathBuf, reason: String },

    #[error("init_from={init_from}: {source}")]
    InitFrom {
        init_from: String,
        #[source]
        source: Box<InteropError>,
    },

    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),

    #[error(transparent)]
    Model(#[from] crate::model::ModelError),

    #[error(transparent)]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),

    #[error(transparent)]
    Data(#[from] crate::data::DataError),

    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

pub type Result<T> = std::result::Result<T, InteropError>;

impl InteropError {
    /// This error, said to come from `init_from=<value>` (unless it already says so).
    pub(crate) fn for_init_from(self, init_from: &str) -> InteropError {
        if self.to_string().contains("init_from=") {
            return self;
        }
        InteropError::InitFrom {
            init_from: init_from.to_string(),
            source: Box::new(self),
        }
    }
}

pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> InteropError {
    let path = path.to_path_buf();
    move |source| InteropError::Io {
        action,
        path,
        source,
    }
}
