//! `nanogpt sample` on a tiny trained run: near-greedy temperatures, determinism for a
//! seed, several samples at once, generations longer than block_size (the KV cache window
//! is refilled), prompts from files; and `sample::generate` called directly.

mod common;

use common::{
    assert_contains_all, corpus, expect_clean_failure, expect_ok, sample_cpu, split_samples,
    trained_run,
};
use nanogpt::config::DeviceSpec;
use nanogpt::rng::Rng;
use nanogpt::sample::{generate, SamplingParams};
use nanogpt::train::checkpoint;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

/// A tiny model trained in a temporary directory, to sample from.
struct Trained {
    root: tempfile::TempDir,
    out: PathBuf,
}

impl Trained {
    fn new(max_iters: u64) -> Trained {
        let root = tempfile::tempdir().unwrap();
        let out = trained_run(root.path(), max_iters, &[]);
        Trained { root, out }
    }

    /// `nanogpt sample` of this run on the CPU with `extra` arguments.
    fn sample(&self, extra: &[&str]) -> Output {
        sample_cpu(self.root.path(), &self.out, extra)
    }

    /// The stdout of a successful [`Trained::sample`] and its `n` samples.
    fn samples(&self, extra: &[&str], n: usize) -> (String, Vec<String>) {
        let stdout = expect_ok(&self.sample(extra));
        let samples = split_samples(&stdout);
        assert_eq!(samples.len(), n, "{stdout}");
        (stdout, samples)
    }
}

/// Asserts that every character of `text` occurs in the training corpus.
fn assert_in_vocab(text: &str) {
    let vocab: BTreeSet<char> = corpus(6000).chars().collect();
    for c in text.chars() {
        assert!(
            vocab.contains(&c),
            "character {c:?} is not in the vocabulary: {text:?}"
        );
    }
}

#[test]
fn near_greedy_sampling_is_finite_and_deterministic() {
    let run = Trained::new(30);
    let args = [
        "--temperature=0.01",
        "--top_k=0",
        "--seed=7",
        "--num_samples=2",
        "--max_new_tokens=30",
        "--start=the king",
    ];
    let (first, samples) = run.samples(&args, 2);
    let second = expect_ok(&run.sample(&args));
    assert_eq!(first, second, "same seed, same checkpoint: same text");
    for s in &samples {
        assert!(s.starts_with("the king"), "{s:?}");
        assert_eq!(s.chars().count(), "the king".len() + 30, "{s:?}");
        assert_in_vocab(s);
    }
}

#[test]
fn seed_changes_samples_at_temperature_one() {
    let run = Trained::new(10);
    let sample = |seed: &str| {
        let s = format!("--seed={seed}");
        let args = [
            "--temperature=1.0",
            "--num_samples=1",
            "--max_new_tokens=40",
            s.as_str(),
        ];
        split_samples(&expect_ok(&run.sample(&args)))
    };
    let a = sample("1");
    assert_eq!(a, sample("1"));
    assert_ne!(
        a,
        sample("2"),
        "40 tokens at temperature 1 from two seeds should differ"
    );
}

#[test]
fn num_samples_prints_that_many_samples() {
    let run = Trained::new(10);
    let args = ["--num_samples=3", "--max_new_tokens=10", "--start=my lord"];
    let (stdout, samples) = run.samples(&args, 3);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| *l == common::SAMPLE_SEPARATOR)
            .count(),
        3
    );
    for s in &samples {
        assert!(s.starts_with("my lord"), "{s:?}");
        assert_eq!(s.chars().count(), 7 + 10);
        assert_in_vocab(s);
    }
    // No checkpoint header when sampling the latest checkpoint only.
    assert!(!stdout.contains("=== iter"), "{stdout}");
}

#[test]
fn generation_longer_than_block_size() {
    let run = Trained::new(10); // block_size 16
    let args = ["--num_samples=2", "--max_new_tokens=75", "--start=a"];
    let (_, samples) = run.samples(&args, 2);
    for s in &samples {
        assert_eq!(s.chars().count(), 1 + 75, "{s:?}");
        assert_in_vocab(s);
    }
    // A prompt longer than block_size is cut to the last tokens that fit.
    let long_prompt: String = corpus(200).chars().take(50).collect();
    let start = format!("--start={long_prompt}");
    let (_, samples) = run.samples(&["--num_samples=1", "--max_new_tokens=20", &start], 1);
    assert!(
        samples[0].starts_with(long_prompt.trim()),
        "{:?}",
        samples[0]
    );
    assert_eq!(
        samples[0].chars().count(),
        long_prompt.trim().chars().count() + 20
    );
}

#[test]
fn start_text_from_a_file() {
    let run = Trained::new(10);
    let prompt = "good night,\nsweet prince ";
    let file = run.root.path().join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let start = format!("--start=FILE:{}", file.display());
    let (_, samples) = run.samples(&["--num_samples=2", "--max_new_tokens=8", &start], 2);
    for s in &samples {
        assert!(
            s.starts_with(prompt),
            "the file's text (with its newline and trailing space) is the prompt: {s:?}"
        );
        assert_eq!(s.chars().count(), prompt.chars().count() + 8);
    }
    // A relative FILE: path is read from the working directory.
    let stdout = expect_ok(&run.sample(&[
        "--num_samples=1",
        "--max_new_tokens=3",
        "--start=FILE:prompt.txt",
    ]));
    assert!(split_samples(&stdout)[0].starts_with(prompt));
}

#[test]
fn bad_start_texts_are_clear_errors() {
    let run = Trained::new(10);
    let err = expect_clean_failure(&run.sample(&["--start=FILE:no_such_prompt.txt"]));
    assert_contains_all(&err, &["no_such_prompt.txt", "start"]);
    // 'Z' never occurs in the corpus.
    let err = expect_clean_failure(&run.sample(&["--start=Zebra"]));
    assert_contains_all(&err, &["'Z'", "vocabulary"]);
    let err = expect_clean_failure(&run.sample(&["--temperature=0"]));
    assert_contains_all(&err, &["temperature"]);
}

#[test]
fn missing_start_file_error_does_not_repeat_itself() {
    let run = Trained::new(10);
    let err = expect_clean_failure(&run.sample(&["--start=FILE:no_such_prompt.txt"]));
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

#[test]
fn start_keeps_surrounding_whitespace_like_nanogpt() {
    let run = Trained::new(10);
    let stdout = expect_ok(&run.sample(&["--num_samples=1", "--max_new_tokens=5", "--start=the "]));
    assert!(split_samples(&stdout)[0].starts_with("the "), "{stdout}");
    expect_ok(&run.sample(&["--num_samples=1", "--max_new_tokens=5", "--start= "]));
}

/// `generate` directly: several sequences decoded together far past block_size.
#[test]
fn generate_refills_the_cache_window() {
    let trained = Trained::new(10);
    let ckpt = checkpoint::load(&trained.out.join("ckpt.safetensors"), false).unwrap();
    let mut model = ckpt.state.model.clone();
    model.dropout = 0.0;
    let (block, vocab) = (model.block_size, model.vocab_size);
    let mut engine = nanogpt::engine::create(
        DeviceSpec::Cpu,
        nanogpt::config::Dtype::Float32,
        model,
        ckpt.params,
        1,
        1,
    )
    .unwrap();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(5),
        stop_token: None,
    };
    let prompt = [1u32, 2, 3];
    let run = |engine: &mut dyn nanogpt::engine::Engine| {
        let mut rng = Rng::new(99);
        generate(engine, &prompt, 3, 4 * block + 5, &params, &mut rng).unwrap()
    };
    let seqs = run(engine.as_mut());
    assert_eq!(seqs.len(), 3);
    for s in &seqs {
        assert_eq!(s.len(), 4 * block + 5);
        assert!(s.iter().all(|&t| (t as usize) < vocab), "{s:?}");
        assert!(
            engine.decode_len() <= block,
            "the cache never holds more than block_size"
        );
    }
    assert_ne!(
        seqs[0], seqs[1],
        "sequences of one batch draw different tokens"
    );
    assert_eq!(run(engine.as_mut()), seqs, "same seed: same tokens");
    let err = generate(engine.as_mut(), &[], 1, 5, &params, &mut Rng::new(1)).unwrap_err();
    assert!(err.to_string().contains("start"), "{err}");
}
