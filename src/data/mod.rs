//! Data: turning a corpus into token files and feeding training from them.
//!
//! - [`prepare`]: corpus -> vocabulary -> 90/10 split -> `train.bin` / `val.bin` (flat
//!   little-endian uint16, the format nanoGPT writes) plus `meta.json` for character
//!   vocabularies.
//! - [`loader`]: memory-mapped token files and the random-window batch sampler, with a
//!   savable RNG state for exact resume.
//! - [`meta`]: the `meta.json` file that describes a character vocabulary.
//! - [`bpe`]: GPT-2 BPE preparation of any corpus (exact to nanoGPT's `prepare.py`,
//!   parallel, bounded memory, restartable), reading [`sources`] (text, jsonl, parquet),
//!   split by [`shuffle`] (numpy's permutation), from local files or the Hugging Face Hub
//!   ([`hub_source`]), after a [`space`] check; [`shards`]: llm.c's token shard format.
//!
//! Every error here is a [`DataError`] that names the file or value at fault and says what
//! to do next.

pub mod bpe;
pub mod hub_source;
pub mod loader;
pub mod meta;
pub mod prepare;
pub mod shards;
pub mod shuffle;
pub mod sources;
pub mod space;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use loader::{first_train_batch, DataLoader, LoaderState, TokenFile};
pub use meta::{vocab_size_for, Meta};
pub use prepare::{prepare_char, PrepareReport};

/// Vocabulary size of GPT-2's BPE encoding (50,000 merges + 256 bytes + `<|endoftext|>`).
/// A data directory without `meta.json` is taken to hold GPT-2 tokens, as in nanoGPT.
pub const GPT2_VOCAB_SIZE: usize = 50257;

/// Largest vocabulary a uint16 token file can address.
pub const MAX_UINT16_VOCAB: usize = 1 << 16;

/// Which token file a batch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// `"train"` or `"val"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    /// `"train.bin"` or `"val.bin"`.
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.bin",
            Split::Val => "val.bin",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors from preparing, reading and sampling token data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "token file {} not found; create it with `nanogpt prepare` for this dataset \
         (e.g. `nanogpt prepare shakespeare_char`) or point the data directory at prepared data",
        path.display()
    )]
    MissingTokenFile { path: PathBuf },

    #[error(
        "token file {} has {bytes} bytes, an odd number, so it is not a file of uint16 tokens; \
         it may be truncated or written in another format: prepare it again with `nanogpt prepare`",
        path.display()
    )]
    OddLength { path: PathBuf, bytes: u64 },

    #[error("token file {} is empty; prepare the dataset again with `nanogpt prepare`", path.display())]
    EmptyTokenFile { path: PathBuf },

    #[error(
        "token file {}: token id {id} at token offset {index} (byte offset {}) is outside the \
         vocabulary of {vocab_size}; the data was probably prepared for a different tokenizer \
         (GPT-2 BPE vs characters): check meta.json in the data directory or prepare the data again",
        path.display(), index * 2
    )]
    TokenOutOfVocab {
        path: PathBuf,
        index: u64,
        id: u32,
        vocab_size: usize,
    },

    #[error(
        "token file {} holds {tokens} tokens but block_size {block_size} needs at least {} \
         (block_size + 1); use a smaller block_size or more data",
        path.display(), block_size + 1
    )]
    TooShort {
        path: PathBuf,
        tokens: usize,
        block_size: usize,
    },

    #[error("{}: {reason}", path.display())]
    BadSource { path: PathBuf, reason: String },

    #[error("{0}")]
    Prepare(String),

    #[error("invalid data loader setting: {0}")]
    InvalidSetting(String),

    #[error("{}: {reason}; prepare the dataset again with `nanogpt prepare` or fix the file", path.display())]
    MalformedMeta { path: PathBuf, reason: String },

    #[error(
        "{}: not valid UTF-8 text (first bad byte at offset {offset}); convert the corpus to UTF-8",
        path.display()
    )]
    NotUtf8 { path: PathBuf, offset: usize },

    #[error("{source_desc}: the corpus has {chars} characters; at least 2 are needed to make a train and a val split")]
    CorpusTooSmall { source_desc: String, chars: usize },

    #[error(
        "{source_desc}: {size} distinct characters do not fit uint16 token files (at most 65536); \
         use a GPT-2 BPE dataset for this corpus"
    )]
    VocabTooLarge { source_desc: String, size: usize },

    #[error(
        "{} exists but is not tiny Shakespeare (sha256 {actual}, expected {expected}); \
         to prepare that file pass it with --input, or delete it to download tiny Shakespeare again",
        path.display()
    )]
    ExistingInputMismatch {
        path: PathBuf,
        actual: String,
        expected: String,
    },

    #[error(
        "download from {url} has sha256 {actual}, expected {expected}; the file changed upstream \
         or was corrupted in transit: download it by other means and pass it with --input"
    )]
    ChecksumMismatch {
        url: String,
        actual: String,
        expected: String,
    },
}

impl DataError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        DataError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
