//! Configuration of `nanogpt train`, `nanogpt sample` and `nanogpt bench`: the
//! [`TrainConfig`], [`SampleConfig`] and [`BenchConfig`] structs with nanoGPT's keys and
//! defaults, loaded the way nanoGPT's configurator.py does it (TOML config files in order,
//! then `--key=value` overrides in Python spelling), validated, and written back as TOML.
//!
//! ```text
//! nanogpt train configs/train_shakespeare_char.toml --device=cpu --compile=False --max_iters=2000
//! ```
//!
//! The loading mechanism is generic ([`loader`]); each struct only lists its fields,
//! defaults and validation rules.

pub mod keep;
pub mod loader;

#[cfg(test)]
mod tests;

pub use keep::KeepSchedule;
pub use loader::ValueKind;

use crate::engine::Recompute;
use crate::model::{GptConfig, ModelError};
use crate::optim::{AdamWConfig, LrSchedule};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Everything that can go wrong while reading, overriding or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file '{}': {source}; check the path (config files are TOML, e.g. configs/train_shakespeare_char.toml)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file '{}' is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("unknown config key '{key}'{location}{hint}")]
    UnknownKey {
        key: String,
        /// `" in <file>"`, or empty for the command line.
        location: String,
        /// `"; did you mean '<key>'?"` or the list of known keys.
        hint: String,
    },
    #[error("invalid value '{value}' for config key '{key}'{location}: expected {expected}")]
    Type {
        key: String,
        value: String,
        expected: &'static str,
        location: String,
    },
    #[error("invalid value '{value}' for config key '{key}': {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("missing value for --{key}; write --{key}=VALUE")]
    MissingValue { key: String },
    #[error("unexpected argument '{arg}': {hint}")]
    BadArgument { arg: String, hint: String },
    #[error("cannot read the start text file '{}' (from start=FILE:...): {source}", path.display())]
    StartFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write config file '{}': {source}; check that the directory is writable", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the generic loader needs from a config struct. The defaults (serialized to TOML)
/// define the known keys and their types; integer fields must be unsigned (negative values
/// are rejected by type).
pub trait ConfigSchema: Serialize + DeserializeOwned + Default {
    /// Keys that are absent by default (`Option` fields that are `None`) and their types.
    /// On the command line `--key=none` clears them.
    const OPTIONAL_KEYS: &'static [(&'static str, ValueKind)] = &[];

    /// Checks values that are well-typed but out of range; the error names the key.
    fn validate(&self) -> Result<(), ConfigError>;
}

macro_rules! config_api {
    ($t:ty) => {
        impl $t {
            /// Loads from the arguments that follow the subcommand: TOML config files (applied
            /// in order), then `--key=value` / `--key value` overrides; then validates.
            pub fn load(args: &[String]) -> Result<Self, ConfigError> {
                loader::load(args)
            }

            /// Defaults overlaid with one TOML document; `name` appears in error messages.
            pub fn from_toml_str(text: &str, name: &str) -> Result<Self, ConfigError> {
                loader::from_toml_str(text, name)
            }

            /// The effective config as TOML; loading it back gives an equal struct.
            pub fn to_toml_string(&self) -> String {
                toml::to_string(self).unwrap_or_else(|e| {
                    unreachable!("config fields are scalars and lists and always serialize: {e}")
                })
            }

            /// Writes [`Self::to_toml_string`] to `path` atomically (e.g. `out_dir/config.toml`).
            pub fn write_toml(&self, path: &Path) -> Result<(), ConfigError> {
                crate::fsutil::write_atomic(path, self.to_toml_string().as_bytes()).map_err(
                    |source| ConfigError::Write {
                        path: path.to_path_buf(),
                        source,
                    },
                )
            }

            /// All key names, sorted (for help text).
            pub fn known_keys() -> Vec<String> {
                loader::known_keys::<Self>()
            }
        }
    };
}

/// Where to run: `auto` (this process's GPU when the CUDA engine passes its check against the
/// CPU engine there, else the CPU; see `engine::auto`), `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    /// `cuda` (None: the default device, or the local rank's under a launcher) or `cuda:N`.
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::Invalid {
            key: "device".into(),
            value: s.to_string(),
            reason: reason.to_string(),
        };
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            "mps" => Err(bad("Apple mps is not supported; use cpu")),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(|n| DeviceSpec::Cuda(Some(n)))
                    .map_err(|_| bad("the GPU index in cuda:N must be a non-negative integer")),
                None => Err(bad("expected auto, cpu, cuda or cuda:N (e.g. cuda:0)")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// Compute precision (`dtype`): bfloat16, float16 or float32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    BFloat16,
    Float16,
    Float32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BFloat16 => "bfloat16",
            Dtype::Float16 => "float16",
            Dtype::Float32 => "float32",
        }
    }
}

impl FromStr for Dtype {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "bfloat16" => Ok(Dtype::BFloat16),
            "float16" => Ok(Dtype::Float16),
            "float32" => Ok(Dtype::Float32),
            _ => Err(ConfigError::Invalid {
                key: "dtype".into(),
                value: s.to_string(),
                reason: "expected bfloat16, float16 or float32".into(),
            }),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which checkpoints `nanogpt sample` reads (`checkpoints` key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointSelection {
    /// `""` or `"latest"`: the latest checkpoint only.
    Latest,
    /// `"all"`: every kept checkpoint, in iteration order.
    All,
    /// `"10000,20000"`: these iterations, in the order given.
    Iters(Vec<u64>),
}

impl FromStr for CheckpointSelection {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim() {
            "" | "latest" => Ok(CheckpointSelection::Latest),
            "all" => Ok(CheckpointSelection::All),
            list => list
                .split(',')
                .map(|p| p.trim().replace('_', "").parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .map(CheckpointSelection::Iters)
                .map_err(|_| ConfigError::Invalid {
                    key: "checkpoints".into(),
                    value: s.to_string(),
                    reason: "expected \"\" (latest), \"all\", or a comma list of iterations such as \"10000,20000\"".into(),
                }),
        }
    }
}

/// `threads = 0` means all cores.
pub fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// GPT-2 weights nanoGPT can start from.
const GPT2_NAMES: [&str; 4] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// Small validation toolkit: `check(cond, key, value, reason)`.
fn check(ok: bool, key: &str, value: impl fmt::Display, reason: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        })
    }
}

fn at_least_one(pairs: &[(&str, usize)]) -> Result<(), ConfigError> {
    pairs
        .iter()
        .try_for_each(|&(k, v)| check(v >= 1, k, v, "must be at least 1"))
}

fn non_negative(pairs: &[(&str, f64)]) -> Result<(), ConfigError> {
    pairs.iter().try_for_each(|&(k, v)| {
        check(
            v.is_finite() && v >= 0.0,
            k,
            v,
            "must be a finite number >= 0",
        )
    })
}

fn check_model(
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    block_size: usize,
    dropout: f64,
) -> Result<(), ConfigError> {
    at_least_one(&[
        ("n_layer", n_layer),
        ("n_head", n_head),
        ("n_embd", n_embd),
        ("block_size", block_size),
    ])?;
    check(
        n_embd.is_multiple_of(n_head),
        "n_embd",
        n_embd,
        &format!("must be divisible by n_head = {n_head}"),
    )?;
    check(
        (0.0..1.0).contains(&dropout),
        "dropout",
        dropout,
        "must be in [0, 1)",
    )
}

fn check_betas(beta1: f64, beta2: f64) -> Result<(), ConfigError> {
    check(
        (0.0..1.0).contains(&beta1),
        "beta1",
        beta1,
        "must be in [0, 1)",
    )?;
    check(
        (0.0..1.0).contains(&beta2),
        "beta2",
        beta2,
        "must be in [0, 1)",
    )
}

/// The [`Recompute`] level of config key `recompute`.
pub fn recompute_level(value: u64) -> Result<Recompute, ConfigError> {
    Recompute::from_level(value).ok_or_else(|| ConfigError::Invalid {
        key: "recompute".into(),
        value: value.to_string(),
        reason: "expected 0 (keep every activation), 1 (recompute the GELU outputs in the \
                 backward pass) or 2 (also the LayerNorm outputs)"
            .into(),
    })
}

fn check_peak_flops(peak_flops: Option<f64>) -> Result<(), ConfigError> {
    match peak_flops {
        Some(p) => check(
            p.is_finite() && p > 0.0,
            "peak_flops",
            p,
            "must be a positive number of FLOP/s (e.g. 989e12), or none",
        ),
        None => Ok(()),
    }
}

fn check_init_from(value: &str, local: &[&str]) -> Result<(), ConfigError> {
    check(
        local.contains(&value)
            || GPT2_NAMES.contains(&value)
            || crate::interop::is_local_dir_spec(value),
        "init_from",
        value,
        &format!(
            "expected {}, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a directory holding a \
             Hugging Face GPT-2 (config.json + model.safetensors)",
            local.join(", ")
        ),
    )
}

/// `nanogpt train` settings: nanoGPT train.py's keys and defaults, plus a few of ours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // I/O
    pub out_dir: String,
    pub eval_interval: u64,
    pub log_interval: u64,
    pub eval_iters: u64,
    /// Evaluate once and exit.
    pub eval_only: bool,
    /// Save a checkpoint at every evaluation, even when val loss did not improve.
    pub always_save_checkpoint: bool,
    /// `scratch`, `resume`, or GPT-2 weights: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`.
    pub init_from: String,
    // wandb logging: accepted for compatibility with nanoGPT config files and ignored.
    pub wandb_log: bool,
    pub wandb_project: String,
    pub wandb_run_name: String,
    // data
    pub dataset: String,
    pub gradient_accumulation_steps: usize,
    pub batch_size: usize,
    pub block_size: usize,
    // model
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub dropout: f64,
    pub bias: bool,
    // AdamW
    pub learning_rate: f64,
    pub max_iters: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    // learning-rate schedule
    pub decay_lr: bool,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub min_lr: f64,
    // system
    /// Distributed backend: `nccl` on GPUs; `gloo` (or `tcp`) for CPU processes.
    pub backend: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `bfloat16`, `float16` or `float32`.
    pub dtype: String,
    /// Accepted for compatibility; the engines are always compiled ahead of time.
    pub compile: bool,
    pub seed: u64,
    // ours
    /// Directory with train.bin / val.bin; empty means `data/<dataset>`.
    pub data_dir: String,
    /// Checkpoints kept for good besides the latest one.
    pub keep_checkpoints_at: KeepSchedule,
    /// Peak FLOP/s of one device, the denominator of MFU (e.g. 989e12); none = not reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops: Option<f64>,
    /// CPU engine threads; 0 = all cores (shared between the ranks on one node).
    pub threads: usize,
    /// Seconds a rank waits on its peers (rendezvous, gradient all-reduce, barriers) before
    /// it stops with an error naming the silent rank.
    pub dist_timeout: u64,
    /// Launch environment: `auto` (torchrun, then Slurm, then MPI variables), `torchrun`,
    /// `slurm`, `mpi`, or `none` (one process, whatever the environment says).
    pub dist_env: String,
    /// ZeRO stage of data-parallel training: 0 = every rank holds the full AdamW state;
    /// 1 = the AdamW moments are sharded over the ranks (each holds and updates 1/W).
    pub zero_stage: u64,
    /// Activation recomputation, as llm.c's `-r`: 0 keeps every activation; 1 recomputes
    /// the GELU outputs in the backward pass; 2 also the LayerNorm outputs. Less memory for
    /// a little more compute; the gradients are the same.
    pub recompute: u64,
    /// Data-parallel runs reduce the gradients across ranks during the backward pass,
    /// bucket by bucket as they are finished (as PyTorch DDP does), instead of once after
    /// it; the results are the same. No effect on one rank.
    pub overlap_grad_reduce: bool,
    /// Smallest gradient bucket of `overlap_grad_reduce`, in MiB (PyTorch DDP's
    /// `bucket_cap_mb`); a bucket always holds whole transformer blocks.
    pub bucket_cap_mb: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            out_dir: "out".into(),
            eval_interval: 2000,
            log_interval: 1,
            eval_iters: 200,
            eval_only: false,
            always_save_checkpoint: true,
            init_from: "scratch".into(),
            wandb_log: false,
            wandb_project: "owt".into(),
            wandb_run_name: "gpt2".into(),
            dataset: "openwebtext".into(),
            gradient_accumulation_steps: 40,
            batch_size: 12,
            block_size: 1024,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            dropout: 0.0,
            bias: false,
            learning_rate: 6e-4,
            max_iters: 600_000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            decay_lr: true,
            warmup_iters: 2000,
            lr_decay_iters: 600_000,
            min_lr: 6e-5,
            backend: "nccl".into(),
            device: "auto".into(),
            dtype: "bfloat16".into(),
            compile: true,
            seed: 1337,
            data_dir: String::new(),
            keep_checkpoints_at: KeepSchedule::default(),
            peak_flops: None,
            threads: 0,
            dist_timeout: 60,
            dist_env: "auto".into(),
            zero_stage: 0,
            recompute: 0,
            overlap_grad_reduce: true,
            bucket_cap_mb: crate::dist::overlap::DEFAULT_BUCKET_MB,
        }
    }
}

impl ConfigSchema for TrainConfig {
    const OPTIONAL_KEYS: &'static [(&'static str, ValueKind)] = &[("peak_flops", ValueKind::Float)];

    fn validate(&self) -> Result<(), ConfigError> {
        check(!self.out_dir.is_empty(), "out_dir", "", "must not be empty")?;
        check(
            !self.dataset.is_empty() || !self.data_dir.is_empty(),
            "dataset",
            "",
            "set dataset (data is read from data/<dataset>) or data_dir",
        )?;
        at_least_one(&[
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("batch_size", self.batch_size),
        ])?;
        check(
            self.eval_interval >= 1,
            "eval_interval",
            self.eval_interval,
            "must be at least 1",
        )?;
        check(
            self.log_interval >= 1,
            "log_interval",
            self.log_interval,
            "must be at least 1",
        )?;
        check(
            self.eval_iters >= 1,
            "eval_iters",
            self.eval_iters,
            "must be at least 1",
        )?;
        check_model(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            self.dropout,
        )?;
        non_negative(&[
            ("learning_rate", self.learning_rate),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("bucket_cap_mb", self.bucket_cap_mb),
        ])?;
        check_betas(self.beta1, self.beta2)?;
        check_init_from(&self.init_from, &["scratch", "resume"])?;
        check(
            matches!(self.backend.as_str(), "nccl" | "gloo" | "tcp"),
            "backend",
            &self.backend,
            "expected nccl (GPUs), gloo or tcp (CPU processes)",
        )?;
        check(
            self.dist_timeout >= 1,
            "dist_timeout",
            self.dist_timeout,
            "must be at least 1 (seconds)",
        )?;
        check(
            matches!(
                self.dist_env.as_str(),
                "auto" | "torchrun" | "slurm" | "mpi" | "none"
            ),
            "dist_env",
            &self.dist_env,
            "expected auto, torchrun, slurm, mpi or none",
        )?;
        check(
            self.zero_stage <= 1,
            "zero_stage",
            self.zero_stage,
            "expected 0 (off) or 1 (shard the AdamW moments over the data-parallel ranks)",
        )?;
        self.device_spec()?;
        self.dtype_kind()?;
        recompute_level(self.recompute)?;
        check_peak_flops(self.peak_flops)
    }
}

config_api!(TrainConfig);

impl TrainConfig {
    /// `data_dir`, or `data/<dataset>` when it is empty.
    pub fn data_dir_resolved(&self) -> PathBuf {
        if self.data_dir.is_empty() {
            Path::new("data").join(&self.dataset)
        } else {
            PathBuf::from(&self.data_dir)
        }
    }

    pub fn device_spec(&self) -> Result<DeviceSpec, ConfigError> {
        self.device.parse()
    }

    pub fn dtype_kind(&self) -> Result<Dtype, ConfigError> {
        self.dtype.parse()
    }

    /// `recompute` as the engines take it.
    pub fn recompute_level(&self) -> Result<Recompute, ConfigError> {
        recompute_level(self.recompute)
    }

    /// The model's shape for a vocabulary of `vocab_size` tokens (padded to 64, as nanoGPT
    /// does from scratch).
    pub fn model_config(&self, vocab_size: usize) -> Result<GptConfig, ModelError> {
        GptConfig::new(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            vocab_size,
            self.bias,
            self.dropout as f32,
        )
    }

    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            learning_rate: self.learning_rate,
            min_lr: self.min_lr,
            warmup_iters: self.warmup_iters,
            lr_decay_iters: self.lr_decay_iters,
            decay_lr: self.decay_lr,
        }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            weight_decay: self.weight_decay as f32,
            grad_clip: self.grad_clip as f32,
            ..AdamWConfig::default()
        }
    }

    /// Notes for the user about keys that are accepted but have no effect here.
    pub fn warnings(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.wandb_log {
            notes.push(
                "wandb_log = true is accepted for compatibility with nanoGPT and ignored; \
                 metrics are written as JSON lines in out_dir"
                    .to_string(),
            );
        }
        notes
    }
}

/// `nanogpt sample` settings: nanoGPT sample.py's keys and defaults, plus a few of ours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// `resume` (from out_dir) or GPT-2 weights: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`.
    pub init_from: String,
    pub out_dir: String,
    /// The prompt, or `FILE:path` to read it from a file (see [`SampleConfig::start_text`]).
    pub start: String,
    pub num_samples: usize,
    pub max_new_tokens: usize,
    /// Softmax temperature; must be > 0.
    pub temperature: f64,
    /// Keep only the top_k most likely tokens; 0 = no top-k filtering.
    pub top_k: usize,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    /// Accepted for compatibility; the engines are always compiled ahead of time.
    pub compile: bool,
    // ours
    /// `""` = latest checkpoint, `"all"` = every kept checkpoint, or `"10000,20000"`.
    pub checkpoints: String,
    /// Stop a sample at the end-of-text token.
    pub stop_at_eot: bool,
    /// CPU engine threads; 0 = all cores.
    pub threads: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            init_from: "resume".into(),
            out_dir: "out".into(),
            start: "\n".into(),
            num_samples: 10,
            max_new_tokens: 500,
            temperature: 0.8,
            top_k: 200,
            seed: 1337,
            device: "auto".into(),
            dtype: "bfloat16".into(),
            compile: false,
            checkpoints: String::new(),
            stop_at_eot: false,
            threads: 0,
        }
    }
}

impl ConfigSchema for SampleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_init_from(&self.init_from, &["resume"])?;
        at_least_one(&[
            ("num_samples", self.num_samples),
            ("max_new_tokens", self.max_new_tokens),
        ])?;
        check(
            self.temperature.is_finite() && self.temperature > 0.0,
            "temperature",
            self.temperature,
            "must be > 0 (use a small value such as 0.01 for near-greedy sampling)",
        )?;
        if self.init_from == "resume" {
            check(
                !self.out_dir.is_empty(),
                "out_dir",
                "",
                "must not be empty with init_from = resume",
            )?;
        }
        self.checkpoint_selection()?;
        self.device_spec()?;
        self.dtype_kind()?;
        Ok(())
    }
}

config_api!(SampleConfig);

impl SampleConfig {
    /// The prompt: `start` itself, or the contents of the file when it is `FILE:path`.
    pub fn start_text(&self) -> Result<String, ConfigError> {
        match self.start.strip_prefix("FILE:") {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::StartFile {
                path: PathBuf::from(path),
                source,
            }),
            None => Ok(self.start.clone()),
        }
    }

    /// The top-k cut-off, `None` when `top_k = 0`.
    pub fn top_k_opt(&self) -> Option<usize> {
        (self.top_k > 0).then_some(self.top_k)
    }

    pub fn checkpoint_selection(&self) -> Result<CheckpointSelection, ConfigError> {
        self.checkpoints.parse()
    }

    pub fn device_spec(&self) -> Result<DeviceSpec, ConfigError> {
        self.device.parse()
    }

    pub fn dtype_kind(&self) -> Result<Dtype, ConfigError> {
        self.dtype.parse()
    }
}

/// `nanogpt bench` settings: a model shape and a training step to time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub batch_size: usize,
    pub bias: bool,
    pub dropout: f64,
    pub vocab_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Timed iterations.
    pub iters: u64,
    /// Untimed iterations before timing starts.
    pub warmup: u64,
    pub device: String,
    pub dtype: String,
    /// CPU engine threads; 0 = all cores.
    pub threads: usize,
    pub seed: u64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    /// Peak FLOP/s of one device, the denominator of MFU (e.g. 989e12); none = not reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_flops: Option<f64>,
    /// When > 0: instead of a training step, time an sgemm of this size (n x n x n) with the
    /// CPU engine's matrix product, to show the machine's ceiling next to the model's rate.
    pub sgemm: usize,
    /// After the timed iterations, time one more step per operation (CUDA engine) and print
    /// a Markdown table with a roofline floor per operation.
    pub profile: bool,
    /// With `profile`: also write the table as JSON to this file (empty: no file).
    pub profile_out: String,
    /// Also print the profile and memory reports as JSON lines on stdout.
    pub json: bool,
    /// Roofline ceiling of bf16 matrix products in TFLOP/s (e.g. `nanogpt doctor`'s GEMM
    /// figure); none = the detected GPU's data sheet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_tflops: Option<f64>,
    /// Roofline ceiling of memory traffic in GB/s, bytes read plus written (`nanogpt
    /// doctor`'s copy figure); none = the detected GPU's data sheet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_gbps: Option<f64>,
    /// Comma-separated batch sizes (e.g. "4,8,16"): run the benchmark once per size, each
    /// with a fresh engine, and report time and peak memory per size; empty = `batch_size`.
    pub batch_sizes: String,
    /// Activation recomputation: 0, 1 or 2 (as `nanogpt train`'s `recompute`).
    pub recompute: u64,
    /// A prepared dataset (as `nanogpt train`'s `data_dir`): time its first training batch
    /// (the windows `nanogpt train` with this seed draws first; only the train split is
    /// read) instead of uniform random tokens. Real text repeats tokens far more often,
    /// which the token-embedding gradient's time depends on. Empty: random tokens.
    pub data_dir: String,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
            batch_size: 12,
            bias: false,
            dropout: 0.0,
            vocab_size: 50304,
            gradient_accumulation_steps: 1,
            iters: 20,
            warmup: 3,
            device: "auto".into(),
            dtype: "bfloat16".into(),
            threads: 0,
            seed: 1337,
            learning_rate: 6e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            peak_flops: None,
            sgemm: 0,
            profile: false,
            profile_out: String::new(),
            json: false,
            gemm_tflops: None,
            copy_gbps: None,
            batch_sizes: String::new(),
            recompute: 0,
            data_dir: String::new(),
        }
    }
}

impl ConfigSchema for BenchConfig {
    const OPTIONAL_KEYS: &'static [(&'static str, ValueKind)] = &[
        ("peak_flops", ValueKind::Float),
        ("gemm_tflops", ValueKind::Float),
        ("copy_gbps", ValueKind::Float),
    ];

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, example) in [
            ("gemm_tflops", self.gemm_tflops, "750"),
            ("copy_gbps", self.copy_gbps, "3000"),
        ] {
            if let Some(v) = v {
                check(
                    v.is_finite() && v > 0.0,
                    key,
                    v,
                    &format!("must be a positive number (e.g. {example}, as `nanogpt doctor` reports it), or none"),
                )?;
            }
        }
        self.batch_size_list()?;
        check_model(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            self.dropout,
        )?;
        at_least_one(&[
            ("batch_size", self.batch_size),
            ("vocab_size", self.vocab_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ])?;
        check(
            self.vocab_size <= crate::model::MAX_U16_VOCAB,
            "vocab_size",
            self.vocab_size,
            "token files store uint16 ids, so at most 65536",
        )?;
        check(self.iters >= 1, "iters", self.iters, "must be at least 1")?;
        non_negative(&[
            ("learning_rate", self.learning_rate),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ])?;
        check_betas(self.beta1, self.beta2)?;
        self.device_spec()?;
        self.dtype_kind()?;
        recompute_level(self.recompute)?;
        check_peak_flops(self.peak_flops)
    }
}

config_api!(BenchConfig);

impl BenchConfig {
    pub fn device_spec(&self) -> Result<DeviceSpec, ConfigError> {
        self.device.parse()
    }

    pub fn dtype_kind(&self) -> Result<Dtype, ConfigError> {
        self.dtype.parse()
    }

    /// `recompute` as the engines take it.
    pub fn recompute_level(&self) -> Result<Recompute, ConfigError> {
        recompute_level(self.recompute)
    }

    /// The batch sizes to run: `batch_sizes` parsed, or `[batch_size]` when it is empty.
    pub fn batch_size_list(&self) -> Result<Vec<usize>, ConfigError> {
        if self.batch_sizes.trim().is_empty() {
            return Ok(vec![self.batch_size]);
        }
        self.batch_sizes
            .split(',')
            .map(|p| match p.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(ConfigError::Invalid {
                    key: "batch_sizes".into(),
                    value: self.batch_sizes.clone(),
                    reason: format!(
                        "'{}' is not a positive integer; write comma-separated batch sizes, \
                         e.g. --batch_sizes=4,8,16",
                        p.trim()
                    ),
                }),
            })
            .collect()
    }

    /// Whether to profile a step (`profile`, or a `profile_out` file asked for).
    pub fn profiling(&self) -> bool {
        self.profile || !self.profile_out.is_empty()
    }

    /// The benchmarked model's shape (`vocab_size` padded to a multiple of 64).
    pub fn model_config(&self) -> Result<GptConfig, ModelError> {
        GptConfig::new(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            self.vocab_size,
            self.bias,
            self.dropout as f32,
        )
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            weight_decay: self.weight_decay as f32,
            grad_clip: self.grad_clip as f32,
            ..AdamWConfig::default()
        }
    }
}
