//! The `nanogpt` binary end to end: prepare -> train -> sample from a working directory,
//! `nanogpt bench` output, `nanogpt prepare` files, and the error messages (and exit codes)
//! for mistakes users make with keys, config files, data files and run directories.

mod common;

use common::{
    assert_contains_all, corpus, expect_clean_failure, expect_ok, prepare_data, run, stderr,
    tiny_train_args,
};
use std::fs;
use std::path::Path;
use std::process::Output;

/// `nanogpt train` with the tiny-model arguments plus `extra`, in `cwd`.
fn train_cli(cwd: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train".to_string()];
    args.extend(tiny_train_args(data, out, extra));
    run(cwd, &args)
}

/// The arguments of `nanogpt train` with the tiny-model arguments but no `data_dir` (the
/// data directory then follows from `dataset`), plus `extra`.
fn train_args_without_data_dir(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["train".to_string()];
    args.extend(tiny_train_args(Path::new(""), out, extra));
    args.retain(|a| !a.starts_with("--data_dir="));
    args
}

/// `nanogpt prepare shakespeare_char --input <input>` in `dir`, with `--out_dir <out>` when
/// given.
fn prepare_char(dir: &Path, input: &str, out: Option<&str>) -> Output {
    let mut args = vec!["prepare", "shakespeare_char", "--input", input];
    if let Some(out) = out {
        args.extend(["--out_dir", out]);
    }
    run(dir, &args)
}

// ---------------------------------------------------------------------------------------
// prepare

#[test]
fn prepare_writes_a_90_10_character_split() {
    let dir = tempfile::tempdir().unwrap();
    let text = corpus(1234);
    let n = text.chars().count();
    fs::write(dir.path().join("input.txt"), &text).unwrap();
    let out = dir.path().join("prepared");
    expect_ok(&prepare_char(dir.path(), "input.txt", Some("prepared")));
    let train = fs::read(out.join("train.bin")).unwrap();
    let val = fs::read(out.join("val.bin")).unwrap();
    let n_train = (n as f64 * 0.9) as usize;
    assert_eq!(
        train.len(),
        2 * n_train,
        "train.bin holds int(n * 0.9) uint16 tokens"
    );
    assert_eq!(val.len(), 2 * (n - n_train), "val.bin holds the rest");

    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("meta.json")).unwrap()).unwrap();
    let itos: Vec<String> = meta["itos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort();
    chars.dedup();
    assert_eq!(meta["vocab_size"].as_u64().unwrap() as usize, chars.len());
    assert_eq!(meta["tokenizer"], "char");
    assert_eq!(
        itos,
        chars.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "sorted characters, as nanoGPT"
    );
    let decode = |bytes: &[u8]| -> String {
        bytes
            .chunks_exact(2)
            .map(|b| itos[u16::from_le_bytes([b[0], b[1]]) as usize].as_str())
            .collect()
    };
    let (head, tail): (String, String) = (
        text.chars().take(n_train).collect(),
        text.chars().skip(n_train).collect(),
    );
    assert_eq!(decode(&train), head);
    assert_eq!(decode(&val), tail);
}

#[test]
fn prepare_defaults_to_data_dataset_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("in.txt"), corpus(500)).unwrap();
    expect_ok(&prepare_char(dir.path(), "in.txt", None));
    for f in ["train.bin", "val.bin", "meta.json"] {
        assert!(
            dir.path().join("data/shakespeare_char").join(f).is_file(),
            "{f}"
        );
    }
}

#[test]
fn prepare_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["prepare", "nosuchdataset"]));
    assert_contains_all(&err, &["nosuchdataset", "shakespeare_char"]);

    let err = expect_clean_failure(&prepare_char(dir.path(), "missing.txt", Some("d")));
    assert_contains_all(&err, &["missing.txt"]);

    fs::write(dir.path().join("latin1.txt"), b"caf\xe9 au lait\n").unwrap();
    let err = expect_clean_failure(&prepare_char(dir.path(), "latin1.txt", Some("d")));
    assert_contains_all(&err, &["latin1.txt", "UTF-8"]);

    fs::write(dir.path().join("one.txt"), "x").unwrap();
    let err = expect_clean_failure(&prepare_char(dir.path(), "one.txt", Some("d")));
    assert_contains_all(&err, &["one.txt"]);
    assert!(
        !dir.path().join("d/train.bin").exists(),
        "nothing written on failure"
    );
}

// ---------------------------------------------------------------------------------------
// end to end

#[test]
fn prepare_train_sample_from_a_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    fs::write(cwd.join("input.txt"), corpus(4000)).unwrap();
    expect_ok(&prepare_char(cwd, "input.txt", None));
    // dataset=shakespeare_char reads data/shakespeare_char relative to the working directory.
    let args = train_args_without_data_dir(
        Path::new("out"),
        &["--max_iters=12", "--dataset=shakespeare_char"],
    );
    let o = run(cwd, &args);
    expect_ok(&o);
    let log = stderr(&o);
    assert_contains_all(
        &log,
        &["step 0:", "step 10:", "saved checkpoint at iter 10"],
    );
    for f in [
        "ckpt.safetensors",
        "config.toml",
        "metrics.jsonl",
        "meta.json",
        "loss.png",
    ] {
        assert!(
            cwd.join("out").join(f).is_file(),
            "out/{f} missing; log:\n{log}"
        );
    }
    let metrics = fs::read_to_string(cwd.join("out/metrics.jsonl")).unwrap();
    let evals: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .map(|v| v["iter"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 10]);

    // The saved effective config resumes the run when given back as a config file.
    let o = run(
        cwd,
        &[
            "train",
            "out/config.toml",
            "--init_from=resume",
            "--max_iters=21",
        ],
    );
    expect_ok(&o);
    let state = nanogpt::train::checkpoint::read_state(&cwd.join("out/ckpt.safetensors")).unwrap();
    assert_eq!(state.iter_num, 20);

    let stdout = expect_ok(&run(
        cwd,
        &[
            "sample",
            "--out_dir=out",
            "--num_samples=2",
            "--max_new_tokens=20",
            "--device=cpu",
        ],
    ));
    assert_eq!(common::split_samples(&stdout).len(), 2, "{stdout}");
}

// ---------------------------------------------------------------------------------------
// configuration errors

#[test]
fn unknown_key_suggests_the_closest() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["train", "--max_itres=5"]));
    assert_contains_all(
        &err,
        &["unknown config key 'max_itres'", "did you mean 'max_iters'"],
    );

    let err = expect_clean_failure(&run(dir.path(), &["sample", "--num_sample=2"]));
    assert_contains_all(&err, &["'num_sample'", "did you mean 'num_samples'"]);

    fs::write(dir.path().join("my.toml"), "learning_rat = 1e-3\n").unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["train", "my.toml"]));
    assert_contains_all(
        &err,
        &["'learning_rat'", "my.toml", "did you mean 'learning_rate'"],
    );

    let err = expect_clean_failure(&run(dir.path(), &["bench", "--n_layers=2"]));
    assert_contains_all(&err, &["'n_layers'", "did you mean 'n_layer'"]);
}

#[test]
fn wrong_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["train", "--max_iters=abc"]));
    assert_contains_all(&err, &["max_iters", "'abc'", "integer"]);

    let err = expect_clean_failure(&run(dir.path(), &["train", "--batch_size=-3"]));
    assert_contains_all(&err, &["batch_size", "-3"]);

    let err = expect_clean_failure(&run(dir.path(), &["train", "--decay_lr=maybe"]));
    assert_contains_all(&err, &["decay_lr", "maybe"]);

    fs::write(dir.path().join("t.toml"), "batch_size = \"twelve\"\n").unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["train", "t.toml"]));
    assert_contains_all(&err, &["batch_size", "twelve", "t.toml"]);

    let err = expect_clean_failure(&run(dir.path(), &["train", "--n_embd=30", "--n_head=4"]));
    assert_contains_all(&err, &["n_embd", "30", "n_head"]);

    let err = expect_clean_failure(&run(dir.path(), &["train", "nosuch.toml"]));
    assert_contains_all(&err, &["nosuch.toml"]);
}

#[test]
fn io_errors_are_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_clean_failure(&run(dir.path(), &["train", "nosuch.toml"]));
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
    let err = expect_clean_failure(&prepare_char(dir.path(), "missing.txt", Some("d")));
    assert_eq!(err.matches("(os error 2)").count(), 1, "{err}");
}

#[test]
fn unsupported_choices_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepare_data(&dir.path().join("data"));
    let out = dir.path().join("out");
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &out, &["--device=cuda"]));
    assert_contains_all(&err, &["cuda", "device=cpu"]);
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &out, &["--device=gpu"]));
    assert_contains_all(&err, &["device", "gpu"]);
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &out, &["--init_from=gpt2"]));
    assert_contains_all(&err, &["init_from", "gpt2"]);
}

// ---------------------------------------------------------------------------------------
// data errors

#[test]
fn missing_data_says_to_run_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let err = expect_clean_failure(&train_cli(
        dir.path(),
        &dir.path().join("nodata"),
        &out,
        &[],
    ));
    assert_contains_all(&err, &["nodata", "train.bin", "nanogpt prepare"]);

    // dataset=... without data_dir looks in data/<dataset> under the working directory.
    let args = train_args_without_data_dir(&out, &["--dataset=mini"]);
    let err = expect_clean_failure(&run(dir.path(), &args));
    assert_contains_all(&err, &["data/mini/train.bin", "nanogpt prepare"]);
}

/// A prepared data directory whose train.bin is replaced by `bytes`.
fn data_with_train_bin(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>),
) -> std::path::PathBuf {
    let data = prepare_data(&root.join(name));
    let mut bytes = fs::read(data.join("train.bin")).unwrap();
    edit(&mut bytes);
    fs::write(data.join("train.bin"), bytes).unwrap();
    data
}

#[test]
fn odd_length_token_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_with_train_bin(dir.path(), "odd", |b| {
        b.pop();
    });
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &dir.path().join("out"), &[]));
    assert_contains_all(&err, &["train.bin", "odd", "nanogpt prepare"]);
}

#[test]
fn token_outside_vocabulary_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_with_train_bin(dir.path(), "oov", |b| {
        b[600..602].copy_from_slice(&1000u16.to_le_bytes());
    });
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &dir.path().join("out"), &[]));
    assert_contains_all(
        &err,
        &[
            "train.bin",
            "token id 1000",
            "token offset 300",
            "vocabulary",
        ],
    );
}

#[test]
fn too_short_and_malformed_data_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepare_data(&dir.path().join("short"));
    fs::write(data.join("val.bin"), [1u8, 0, 2, 0, 3, 0]).unwrap();
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &dir.path().join("out"), &[]));
    assert_contains_all(&err, &["val.bin", "block_size"]);

    let data = prepare_data(&dir.path().join("badmeta"));
    fs::write(data.join("meta.json"), "{\"vocab_size\": 3}").unwrap();
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &dir.path().join("out2"), &[]));
    assert_contains_all(&err, &["meta.json"]);

    let data = data_with_train_bin(dir.path(), "empty", |b| b.clear());
    let err = expect_clean_failure(&train_cli(dir.path(), &data, &dir.path().join("out3"), &[]));
    assert_contains_all(&err, &["train.bin", "empty"]);
}

#[test]
fn sample_without_a_run_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_clean_failure(&run(
        dir.path(),
        &["sample", "--out_dir=no_such_run", "--device=cpu"],
    ));
    assert_contains_all(&err, &["no_such_run", "ckpt.safetensors"]);
    let err = expect_clean_failure(&run(
        dir.path(),
        &["sample", "--init_from=gpt2", "--device=cpu"],
    ));
    assert_contains_all(&err, &["init_from", "gpt2"]);
}

// ---------------------------------------------------------------------------------------
// bench

/// The tiny CPU benchmark's arguments plus `extra` (later arguments win).
fn tiny_bench(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "bench",
        "--n_layer=2",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--iters=2",
        "--warmup=1",
        "--vocab_size=128",
        "--device=cpu",
        "--threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn bench_profile_on_the_cpu_says_it_needs_cuda_and_still_benchmarks() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &tiny_bench(&["--profile", "--profile_out=prof.json"]),
    );
    let stdout = expect_ok(&out);
    assert!(
        stdout.contains("ms/iter") && stdout.lines().any(|l| l.starts_with('{')),
        "the benchmark itself still runs:\n{stdout}"
    );
    assert_contains_all(
        &stderr(&out),
        &["--profile", "needs the CUDA engine", "--device=cuda"],
    );
    assert!(
        !dir.path().join("prof.json").exists(),
        "no profile, so no profile file"
    );
}

#[test]
fn bench_batch_sizes_runs_each_size_and_tabulates() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = expect_ok(&run(
        dir.path(),
        &tiny_bench(&["--batch_sizes=1,3", "--json"]),
    ));
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 3 |"))
        .collect();
    assert_eq!(rows.len(), 2, "one table row per batch size:\n{stdout}");
    assert!(
        rows[0].starts_with("| 1 | 16 |") && rows[1].starts_with("| 3 | 48 |"),
        "{stdout}"
    );
    let sweep = stdout
        .lines()
        .find(|l| l.starts_with("{\"batch_sweep\""))
        .unwrap_or_else(|| panic!("no sweep JSON in:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(sweep).unwrap();
    let runs = v["batch_sweep"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["batch_size"], 3);
    assert_eq!(runs[1]["result"]["tokens_per_iter"], 48);
    let err = expect_clean_failure(&run(dir.path(), &tiny_bench(&["--batch_sizes=2,zero"])));
    assert_contains_all(&err, &["batch_sizes", "zero"]);
}

#[test]
fn bench_reads_its_batch_from_a_data_dir_and_says_how_often_tokens_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let write = |name: &str, tokens: &[u16]| {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(data.join(name), bytes).unwrap();
    };
    // One token repeated: every window of the batch is that token. No val.bin: only the
    // train split is read.
    write("train.bin", &[5; 64]);
    let out = run(
        dir.path(),
        &tiny_bench(&["--batch_size=2", "--data_dir=data"]),
    );
    expect_ok(&out);
    assert_contains_all(
        &stderr(&out),
        &[
            "tokens from data",
            "32 tokens, 1 distinct, the most frequent 32 times (100.0%)",
        ],
    );
    // A token outside the model's vocabulary (128) is refused, naming the file.
    write("train.bin", &[5, 6, 300, 7].repeat(16));
    let err = expect_clean_failure(&run(
        dir.path(),
        &tiny_bench(&["--batch_size=2", "--data_dir=data"]),
    ));
    assert_contains_all(
        &err,
        &["--data_dir", "train.bin", "300", "vocabulary of 128"],
    );
    let err = expect_clean_failure(&run(dir.path(), &tiny_bench(&["--data_dir=missing"])));
    assert_contains_all(
        &err,
        &["missing", "train.bin", "not found", "nanogpt prepare"],
    );
}

#[test]
fn bench_prints_a_json_line_with_positive_rates() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = expect_ok(&run(
        dir.path(),
        &tiny_bench(&["--batch_size=2", "--iters=3"]),
    ));
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {json}"))
    };
    let (median, min, max) = (num("median_ms"), num("min_ms"), num("max_ms"));
    assert!(
        median > 0.0 && min > 0.0 && min <= median && median <= max,
        "{json}"
    );
    assert!(num("tokens_per_s") > 0.0 && num("gflops") > 0.0, "{json}");
    assert_eq!(num("tokens_per_iter"), 32.0, "batch 2 x block 16");
    assert_eq!(
        v["step_ms"].as_array().unwrap().len(),
        3,
        "one time per timed iteration"
    );
    // nanoGPT's estimate: 6 N + 12 L H Q T with N the non-position parameters
    // (2 layers x 12 C^2, the tied 128 x 32 embedding, and 5 layer norms of 32 weights).
    let n = 2.0 * 12.0 * 32.0 * 32.0 + 128.0 * 32.0 + 5.0 * 32.0;
    assert_eq!(
        num("flops_per_token"),
        6.0 * n + 12.0 * 2.0 * 2.0 * 16.0 * 16.0
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(num("tokens_per_s"), 32.0 / (median / 1e3)) < 1e-6,
        "{json}"
    );
    assert!(
        rel(
            num("gflops"),
            num("tokens_per_s") * num("flops_per_token") / 1e9
        ) < 1e-6,
        "{json}"
    );
    let loss = num("last_loss");
    assert!(
        loss.is_finite() && loss > 0.0 && loss < (128f64).ln() + 1.0,
        "{json}"
    );
}

/// Resuming with a smaller block_size trains on windows of the new size (as nanoGPT does
/// after cropping the model); the note printed about it must not claim the opposite.
#[test]
fn resume_with_smaller_block_size_reports_what_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepare_data(&dir.path().join("data"));
    let out = dir.path().join("out");
    expect_ok(&train_cli(dir.path(), &data, &out, &["--max_iters=10"]));
    let o = train_cli(
        dir.path(),
        &data,
        &out,
        &["--init_from=resume", "--max_iters=12", "--block_size=8"],
    );
    expect_ok(&o);
    let log = stderr(&o);
    assert!(log.contains("tokens per iteration will be: 32"), "{log}");
    assert!(!log.contains("using 16"), "{log}");
}
