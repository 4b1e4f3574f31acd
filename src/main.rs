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
    /// Time training steps on synthetic tokens (--n_layer=.. --batch_size=.. ...)
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
        Command::Quickstart { input, args } => nanogpt::cli::quickstart(input, &args),
    }
}
