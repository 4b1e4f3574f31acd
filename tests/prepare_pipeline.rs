//! GPT-2 BPE preparation end to end: byte-identical to nanoGPT's prepare.py steps on a
//! synthetic corpus (jsonl and parquet), restart after interruptions in both passes,
//! llm.c shard output read back by the loader, and the command line.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use nanogpt::data::bpe::{self, BpeJob, Interrupt, OutputFormat};
use nanogpt::data::sources::{Format, Source};
use nanogpt::data::{DataLoader, Split};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use common::bpe::{corpus_texts, expected, fixtures, sha256_hex};

fn sha256_file(p: &Path) -> String {
    sha256_hex(&std::fs::read(p).unwrap())
}

/// The fixture corpus as `parts` parquet files with small row groups.
fn write_parquet_corpus(dir: &Path, parts: usize) -> Vec<PathBuf> {
    let texts = corpus_texts();
    let per = texts.len().div_ceil(parts);
    let mut files = Vec::new();
    for (k, chunk) in texts.chunks(per).enumerate() {
        let path = dir.join(format!("train-{k:05}-of-{parts:05}.parquet"));
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..chunk.len() as i64));
        let text: ArrayRef = Arc::new(StringArray::from_iter_values(chunk.iter()));
        let batch = RecordBatch::try_from_iter([("id", ids), ("text", text)]).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(37))
            .build();
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        files.push(path);
    }
    files
}

fn job(format: Format, files: Vec<PathBuf>, out: &Path, test_size: f64) -> BpeJob {
    BpeJob {
        source: Source {
            format,
            files,
            column: "text".into(),
        },
        out_dir: out.to_path_buf(),
        test_size,
        seed: 2357,
        num_proc: 2,
        output: OutputFormat::NanoGpt,
        skip_space_check: false,
        interrupt: None,
    }
}

fn assert_matches_nanogpt(out: &Path, test_size: &str) {
    for file in ["train.bin", "val.bin"] {
        let (tokens, sha) = expected(test_size, file);
        let p = out.join(file);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * tokens, "{file}");
        assert_eq!(sha256_file(&p), sha, "{file} differs from nanoGPT's");
    }
}

#[test]
fn jsonl_and_parquet_match_nanogpt_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for (ts, tss) in [(0.0005, "0.0005"), (0.05, "0.05")] {
        let out = dir.path().join(format!("jsonl-{tss}"));
        let r = bpe::run(&job(
            Format::Jsonl,
            vec![fixtures().join("corpus.jsonl")],
            &out,
            ts,
        ))
        .unwrap();
        assert_matches_nanogpt(&out, tss);
        assert_eq!(r.documents, 600);
        assert_eq!(r.val_tokens, expected(tss, "val.bin").0);
        assert_eq!(r.train_documents + r.val_documents, 600);
        // Outputs only: the work directory is gone.
        assert!(!out.join(bpe::WORK_DIR).exists());
        assert!(out.join("meta.json").exists() && out.join(bpe::SUMMARY_FILE).exists());
    }
    let files = write_parquet_corpus(dir.path(), 3);
    let out = dir.path().join("parquet");
    let r = bpe::run(&job(Format::Parquet, files, &out, 0.05)).unwrap();
    assert_matches_nanogpt(&out, "0.05");
    assert_eq!((r.train_documents, r.val_documents), (570, 30));
    // The loader reads the result.
    let dl = DataLoader::new(&out, 2, 16, 50257, 0, 0).unwrap();
    assert_eq!(dl.tokens(Split::Val), r.val_tokens);
}

#[test]
fn interrupted_runs_resume_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_parquet_corpus(dir.path(), 6);
    let out = dir.path().join("out");
    let mut j = job(Format::Parquet, files, &out, 0.05);
    j.num_proc = 1;

    // Killed half-way through the 4th unit: its first records are on disk, uncommitted as
    // a finished unit.
    j.interrupt = Some(Interrupt::AfterUnits(3));
    let err = bpe::run(&j).unwrap_err().to_string();
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.join("train.bin").exists() && !out.join("val.bin").exists());
    assert!(out.join(bpe::WORK_DIR).join("state.json").exists());

    // Resumed, then killed again after gathering the first bucket (val).
    j.interrupt = Some(Interrupt::AfterBuckets(1));
    let err = bpe::run(&j).unwrap_err().to_string();
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.join("train.bin").exists() && !out.join("val.bin").exists());

    j.interrupt = None;
    let r = bpe::run(&j).unwrap();
    assert!(r.resumed && !r.already_done);
    assert_matches_nanogpt(&out, "0.05");

    // A third run finds the work done.
    let again = bpe::run(&j).unwrap();
    assert!(again.already_done);
    assert_eq!(again.train_tokens, r.train_tokens);

    // Other settings start over and replace the outputs.
    j.test_size = 0.0005;
    let r2 = bpe::run(&j).unwrap();
    assert!(!r2.resumed);
    assert_matches_nanogpt(&out, "0.0005");
}

#[test]
fn llmc_shards_hold_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let mut j = job(
        Format::Jsonl,
        vec![fixtures().join("corpus.jsonl")],
        &out,
        0.05,
    );
    j.output = OutputFormat::Llmc {
        name: "synth".into(),
        shard_tokens: 10_000,
    };
    let r = bpe::run(&j).unwrap();
    let (train_tokens, _) = expected("0.05", "train.bin");
    assert_eq!(r.train_tokens, train_tokens);
    // 34,324 train tokens -> shards of 10,000, 10,000, 10,000, 4,324.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "synth_train_000000.bin",
            "synth_train_000001.bin",
            "synth_train_000002.bin",
            "synth_train_000003.bin",
            "synth_val_000000.bin"
        ]
    );
    // Headers, and the concatenated tokens equal nanoGPT's train.bin.
    let raw = dir.path().join("raw");
    bpe::run(&job(
        Format::Jsonl,
        vec![fixtures().join("corpus.jsonl")],
        &raw,
        0.05,
    ))
    .unwrap();
    let mut cat = Vec::new();
    for n in &names[..4] {
        let b = std::fs::read(out.join(n)).unwrap();
        let count = i32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
        assert_eq!(i32::from_le_bytes(b[0..4].try_into().unwrap()), 20240520);
        assert_eq!(i32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(b.len(), 1024 + 2 * count);
        cat.extend_from_slice(&b[1024..]);
    }
    assert_eq!(cat, std::fs::read(raw.join("train.bin")).unwrap());
    let dl = DataLoader::new(&out, 2, 64, 50257, 0, 0).unwrap();
    assert_eq!(dl.files(Split::Train).len(), 4);
    assert_eq!(dl.tokens(Split::Train), train_tokens);
}

fn nanogpt(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nanogpt"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// `nanogpt prepare jsonl --input <the fixture corpus> <args>` in `dir`.
fn prepare_corpus(dir: &Path, args: &[&str]) -> std::process::Output {
    let corpus = fixtures().join("corpus.jsonl");
    let mut all = vec!["prepare", "jsonl", "--input", corpus.to_str().unwrap()];
    all.extend_from_slice(args);
    nanogpt(dir, &all)
}

#[test]
fn command_line_prepare_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = prepare_corpus(dir.path(), &["--out_dir", "d", "--num_proc", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("train has 36,421 tokens") && err.contains("val has 106 tokens"),
        "{err}"
    );
    assert!(err.contains("disk space: needs about"), "{err}");
    assert_eq!(
        sha256_file(&dir.path().join("d/train.bin")),
        expected("0.0005", "train.bin").1
    );

    let o = prepare_corpus(dir.path(), &["--column", "body", "--out_dir", "e"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("corpus.jsonl") && err.contains("\"body\"") && err.contains("--column"),
        "{err}"
    );
    assert!(!dir.path().join("e/train.bin").exists());

    let o = nanogpt(
        dir.path(),
        &["prepare", "parquet", "--input", "nothing/*.parquet"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("nothing/*.parquet") && err.contains("no file matches"),
        "{err}"
    );

    // One text file is one document: too few to split.
    std::fs::write(
        dir.path().join("one.txt"),
        "just one document\nor two lines\n",
    )
    .unwrap();
    let o = nanogpt(
        dir.path(),
        &["prepare", "text", "--input", "one.txt", "--out_dir", "t"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--sample_by"), "{err}");
    let o = nanogpt(
        dir.path(),
        &[
            "prepare",
            "text",
            "--input",
            "one.txt",
            "--out_dir",
            "t",
            "--sample_by",
            "line",
            "--test_size",
            "0.5",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
