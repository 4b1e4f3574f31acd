//! Shared helpers of the integration tests: a small synthetic character corpus, prepared
//! data directories, tiny-model training arguments, and running the `nanogpt` binary.
//! The submodules hold the helpers of groups of tests: [`dist`] (several ranks on loopback),
//! [`gpu`] (GPU tests), [`model`] (parameters and batches for comparing engines),
//! [`emulate`] (the kernel emulators), [`nvrtc`] (kernel compilation) and [`bpe`] (the BPE
//! preparation fixtures).
// Each test file uses a different subset of these helpers and of the submodules' (this
// attribute covers the submodules too).
#![allow(dead_code)]

pub mod bpe;
pub mod dist;
pub mod emulate;
pub mod gpu;
pub mod model;
pub mod nvrtc;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nanogpt::config::TrainConfig;
use nanogpt::train::TrainSummary;

/// The separator line `nanogpt sample` prints after every sample.
pub const SAMPLE_SEPARATOR: &str = "---------------";

/// A deterministic, Shakespeare-flavoured text of about `chars` characters (lower-case
/// letters, spaces, a few punctuation marks and newlines; never '-', so sample separators
/// stay unambiguous).
pub fn corpus(chars: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "king", "and", "queen", "shall", "speak", "of", "love", "my", "lord", "good",
        "night", "sweet", "prince", "what", "is", "this", "thou", "art", "a", "fool", "hath", "no",
        "more",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut text = String::with_capacity(chars + 16);
    let mut words_in_line = 0;
    while text.len() < chars {
        text.push_str(WORDS[next() % WORDS.len()]);
        words_in_line += 1;
        if words_in_line >= 6 + next() % 4 {
            text.push_str(if next() % 3 == 0 { ".\n" } else { ",\n" });
            words_in_line = 0;
        } else {
            text.push(' ');
        }
    }
    text
}

/// Prepares a character-level data directory `dir` (train.bin, val.bin, meta.json) from
/// [`corpus`] and returns its path.
pub fn prepare_data(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    nanogpt::data::prepare::prepare_char_text(&corpus(6000), "test corpus", dir)
        .expect("preparing the synthetic corpus");
    dir.to_path_buf()
}

/// `--key=value` arguments of a tiny CPU run reading `data_dir` and writing `out_dir`,
/// followed by `extra` overrides (later overrides win).
pub fn tiny_train_args(data_dir: &Path, out_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        format!("--data_dir={}", data_dir.display()),
        format!("--out_dir={}", out_dir.display()),
        "--device=cpu".into(),
        "--dtype=float32".into(),
        "--threads=1".into(),
        "--n_layer=2".into(),
        "--n_head=2".into(),
        "--n_embd=32".into(),
        "--block_size=16".into(),
        "--batch_size=4".into(),
        "--gradient_accumulation_steps=1".into(),
        "--dropout=0.0".into(),
        "--learning_rate=1e-3".into(),
        "--min_lr=1e-4".into(),
        "--warmup_iters=2".into(),
        "--lr_decay_iters=100".into(),
        "--eval_iters=2".into(),
        "--eval_interval=10".into(),
        "--log_interval=1000".into(),
        "--max_iters=10".into(),
        "--always_save_checkpoint=True".into(),
        "--seed=1337".into(),
    ]
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Loads the config from `args` and trains in this process.
pub fn train(args: &[String]) -> anyhow::Result<TrainSummary> {
    let cfg = TrainConfig::load(args)?;
    nanogpt::train::train(&cfg)
}

/// Prepares data under `root/data` and trains a tiny model for `max_iters` into
/// `root/out`; returns the out_dir.
pub fn trained_run(root: &Path, max_iters: u64, extra: &[&str]) -> PathBuf {
    let data = prepare_data(&root.join("data"));
    let out = root.join("out");
    let max = format!("--max_iters={max_iters}");
    let mut all = vec![max.as_str()];
    all.extend_from_slice(extra);
    train(&tiny_train_args(&data, &out, &all)).expect("training the tiny model");
    out
}

/// A `nanogpt` command running in `cwd`: the binary named by NANOGPT_BIN when set and not
/// empty (scripts/gpu_check.sh sets it: its test binaries run on another machine than they
/// were built on), else the one cargo built with these tests.
pub fn nanogpt(cwd: &Path) -> Command {
    let bin = std::env::var_os("NANOGPT_BIN")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_nanogpt").into());
    let mut cmd = Command::new(bin);
    // Tests never touch the network: the Hugging Face Hub is offline with an empty cache.
    cmd.current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cwd.join(".hf-cache"))
        .env_remove("HF_ENDPOINT");
    cmd
}

/// Runs `nanogpt <args>` in `cwd`.
pub fn run<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Output {
    nanogpt(cwd).args(args).output().expect("starting nanogpt")
}

/// Runs `nanogpt sample` in `cwd` on the CPU (one thread) from the run in `out`, with
/// `extra` arguments.
pub fn sample_cpu(cwd: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec![
        "sample".into(),
        format!("--out_dir={}", out.display()),
        "--device=cpu".into(),
        "--threads=1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(cwd, &args)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn expect_ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "nanogpt failed with {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts a clean failure (non-zero exit code, no panic, an `error:` line) and returns
/// stderr.
pub fn expect_clean_failure(o: &Output) -> String {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "nanogpt unexpectedly succeeded\nstdout:\n{}\nstderr:\n{err}",
        stdout(o)
    );
    assert!(
        o.status.code().is_some_and(|c| c != 0),
        "nanogpt did not exit with a code (killed by a signal?): {}\nstderr:\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "nanogpt panicked:\n{err}");
    assert!(err.contains("error"), "no error message on stderr:\n{err}");
    err
}

/// Asserts that `haystack` contains every needle.
pub fn assert_contains_all(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            haystack.contains(n),
            "expected {n:?} in the message:\n{haystack}"
        );
    }
}

/// The samples of `nanogpt sample` output (the text before each separator line).
pub fn split_samples(out: &str) -> Vec<String> {
    let mut samples = Vec::new();
    let mut cur = String::new();
    for line in out.split_inclusive('\n') {
        if line.trim_end_matches('\n') == SAMPLE_SEPARATOR {
            // `writeln!(text)` added one newline after the sample.
            let s = cur.strip_suffix('\n').unwrap_or(&cur).to_string();
            samples.push(s);
            cur.clear();
        } else if !line.starts_with("=== iter ") {
            cur.push_str(line);
        }
    }
    samples
}
