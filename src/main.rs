//! The `nanogpt` command line: parses the subcommand and hands its arguments to the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "nanogpt",
    version,
    about = "Train GPT-2-class models: prepare data, train, sample"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize a dataset into train.bin / val.bin (e.g. `nanogpt prepare openwebtext`)
    Prepare(Box<nanogpt::cli::PrepareArgs>),
    /// Train a model: config files (TOML) then --key=value overrides, as nanoGPT's train.py
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Generate text from checkpoints, with sample.py's --key=value options
    Sample {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Time training steps on random tokens or a dataset's (--n_layer=.. --data_dir=.. ...)
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write a checkpoint as a Hugging Face GPT-2 directory (config.json + model.safetensors)
    Export {
        /// Run directory holding the checkpoint (and meta.json)
        #[arg(long = "out_dir", alias = "out-dir")]
        out_dir: PathBuf,
        /// Directory to write (created if needed)
        #[arg(long)]
        to: PathBuf,
        /// Checkpoint file inside out_dir, or a path (default ckpt.safetensors)
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Start this node's ranks of a distributed run (torchrun's job), e.g.
    /// `nanogpt launch --nproc_per_node=4 -- train config.toml`
    Launch {
        /// Ranks (processes) to start on this node
        #[arg(long = "nproc_per_node", alias = "nproc-per-node", default_value_t = 1)]
        nproc_per_node: usize,
        /// Number of nodes taking part
        #[arg(long = "nnodes", default_value_t = 1)]
        nnodes: usize,
        /// This node's index, 0..nnodes
        #[arg(long = "node_rank", alias = "node-rank", default_value_t = 0)]
        node_rank: usize,
        /// Host name or address of the node with node_rank 0 (required with nnodes > 1)
        #[arg(long = "master_addr", alias = "master-addr")]
        master_addr: Option<String>,
        /// Port of rank 0's rendezvous (default: a free port on one node, 29500 on several)
        #[arg(long = "master_port", alias = "master-port")]
        master_port: Option<u16>,
        /// The command every rank runs, after `--` (e.g. `-- train config.toml --max_iters=100`)
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Find the GPU stack (driver, NVRTC, cuBLASLt, NCCL), show where it looked, and test
    /// each GPU; exit code 0 only when every requested check passes
    Doctor {
        /// Check the CPU only: a missing GPU stack is reported but is not an error
        #[arg(long = "cpu-only", alias = "cpu_only", conflicts_with = "require_gpu")]
        cpu_only: bool,
        /// Fail unless a GPU and every CUDA library are found and pass their self-tests
        #[arg(long = "require-gpu", alias = "require_gpu")]
        require_gpu: bool,
        /// Print one JSON object instead of the text report
        #[arg(long)]
        json: bool,
        /// Side of the square bf16 GEMM self-test
        #[arg(long = "gemm-size", alias = "gemm_size", default_value_t = 4096)]
        gemm_size: usize,
    },
    /// Prepare character-level Shakespeare, train a small model on the CPU and sample from it
    Quickstart {
        /// Corpus file to use instead of downloading tiny Shakespeare
        #[arg(long)]
        input: Option<PathBuf>,
        /// Extra --key=value training overrides
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each cause shown once (messages often quote their cause).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare(args) => nanogpt::cli::prepare_with(&args),
        Command::Train { args } => nanogpt::cli::train(&args),
        Command::Sample { args } => nanogpt::cli::sample(&args),
        Command::Bench { args } => nanogpt::cli::bench(&args),
        Command::Export {
            out_dir,
            to,
            checkpoint,
        } => nanogpt::cli::export(&out_dir, checkpoint.as_deref(), &to),
        Command::Doctor {
            cpu_only,
            require_gpu,
            json,
            gemm_size,
        } => nanogpt::cli::doctor(cpu_only, require_gpu, json, gemm_size),
        Command::Quickstart { input, args } => nanogpt::cli::quickstart(input, &args),
        Command::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            command,
        } => nanogpt::cli::launch(nanogpt::dist::launch::LaunchSpec {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            command,
        }),
    }
}
