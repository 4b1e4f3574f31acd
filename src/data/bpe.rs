//! GPT-2 BPE preparation: any [`Source`] -> `train.bin` / `val.bin` (or llm.c shards),
//! exact to nanoGPT's `prepare.py`, parallel, bounded in memory and restartable.
//!
//! The output is nanoGPT's: the documents are split as Hugging Face `datasets`'
//! `train_test_split(test_size=0.0005, seed=2357, shuffle=True)` splits them (the first
//! `ceil(test_size * n)` entries of numpy's `default_rng(seed).permutation(n)` are the val
//! split, the rest the train split, each in permutation order; see [`super::shuffle`]);
//! each document becomes its ordinary GPT-2 encoding followed by `<|endoftext|>` (50256);
//! the documents of a split are concatenated as little-endian uint16.
//!
//! How, in two passes under `out_dir/.prepare-work/`:
//!
//! 1. Tokenize. Units of source documents (see [`Source::plan`]) are tokenized in parallel
//!    in any order. Each document's output position is known from the permutation, so its
//!    tokens are appended, as a record `(position u64, count u32, tokens u16...)`, to the
//!    bucket file that holds its range of output positions (~128 MB of tokens per bucket).
//!    Every ~15 s the bucket files are flushed and synced, and `state.json` records their
//!    lengths and the finished units.
//! 2. Gather. Bucket by bucket in output order: read it (bounded memory), sort its records by
//!    position, check that every position is present once, append the tokens to the output,
//!    sync, record progress, delete the bucket. Peak disk is about one output size plus one
//!    bucket, on top of the inputs.
//!
//! Restart: a re-run with the same inputs and settings truncates the bucket files to their
//! recorded lengths and tokenizes only unfinished units; records a killed run wrote for an
//! unfinished unit are written again and the duplicate is dropped in pass 2 (its tokens
//! are checked identical). In pass 2 it continues with the next bucket. Outputs stay in the
//! work directory until everything is done, then are renamed into `out_dir`, and
//! `prepare.json` is written last; a killed run never leaves a `train.bin` that looks
//! complete.
//!
//! Memory: per worker thread one unit's decoded text (~8 MB for lines; one parquet batch of
//! 1024 rows plus the unit's row groups' column pages for parquet) and up to 4 MB of
//! pending records; 128 KB per bucket for file buffers; in pass 2 one bucket (~128 MB plus
//! 16 bytes per document of index). While the split is computed, 8 bytes per document (64
//! MB for OpenWebText's 8 million documents) are held for a few seconds and freed before
//! tokenization. Nothing else grows with the corpus.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shards::{LLMC_HEADER_BYTES, LLMC_MAGIC, LLMC_VERSION};
use super::shuffle::{permutation, split_sizes};
use super::sources::{Source, Unit};
use super::{space, DataError, Meta, GPT2_VOCAB_SIZE};
use crate::fsutil;
use crate::tokenizer::{Gpt2Bpe, GPT2_EOT};

/// nanoGPT's `test_size` and `seed` for `train_test_split`.
pub const NANOGPT_TEST_SIZE: f64 = 0.0005;
pub const NANOGPT_SEED: u64 = 2357;

/// Name of the work directory inside `out_dir`.
pub const WORK_DIR: &str = ".prepare-work";
/// Summary written last into `out_dir`.
pub const SUMMARY_FILE: &str = "prepare.json";

const STATE_FILE: &str = "state.json";
const DEST_FILE: &str = "dest.u32";
const BUCKET_TOKENS: u64 = 64 << 20;
const MAX_BUCKETS: u64 = 512;
const WORKER_FLUSH_BYTES: usize = 4 << 20;
const BUCKET_BUFFER_BYTES: usize = 128 << 10;
const COMMIT_EVERY: Duration = Duration::from_secs(15);
/// Work-format version: a change invalidates old work directories.
const WORK_VERSION: u32 = 1;

/// What the output files look like.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFormat {
    /// nanoGPT: `train.bin` and `val.bin`, raw little-endian uint16.
    NanoGpt,
    /// llm.c: `{name}_val_000000.bin`, `{name}_train_000000.bin`, ... each with a 1024-byte
    /// header and at most `shard_tokens` tokens.
    Llmc { name: String, shard_tokens: u64 },
}

/// A GPT-2 BPE preparation.
#[derive(Clone, Debug)]
pub struct BpeJob {
    pub source: Source,
    pub out_dir: PathBuf,
    pub test_size: f64,
    pub seed: u64,
    /// Worker threads (0 = all cores).
    pub num_proc: usize,
    pub output: OutputFormat,
    /// Skip the free-space check.
    pub skip_space_check: bool,
    /// Stop with an error part-way, as a killed run would (for restart tests).
    pub interrupt: Option<Interrupt>,
}

/// Where [`BpeJob::interrupt`] stops a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// In the tokenize pass, half-way through the unit after this many units (its first
    /// records already written).
    AfterUnits(usize),
    /// In the gather pass, after this many buckets.
    AfterBuckets(usize),
}

fn interrupted() -> DataError {
    DataError::Prepare("preparation interrupted".into())
}

/// What a preparation produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BpeReport {
    pub fingerprint: String,
    pub documents: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// Bytes of source text tokenized (parquet: uncompressed column bytes).
    pub text_bytes: u64,
    pub files: Vec<PathBuf>,
    /// Seconds this run took (0 when the data was already prepared).
    pub seconds: f64,
    /// True when this run continued an interrupted one, or found the work already done.
    pub resumed: bool,
    pub already_done: bool,
}

impl std::fmt::Display for BpeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_done {
            writeln!(
                f,
                "already prepared (same inputs and settings); nothing to do"
            )?;
        }
        writeln!(
            f,
            "documents: {} ({} train, {} val)",
            group(self.documents),
            group(self.train_documents),
            group(self.val_documents)
        )?;
        writeln!(f, "train has {} tokens", group(self.train_tokens))?;
        write!(f, "val has {} tokens", group(self.val_tokens))?;
        if self.seconds > 0.0 {
            write!(
                f,
                "\n{:.1} s, {:.1} MB/s of text",
                self.seconds,
                self.text_bytes as f64 / 1e6 / self.seconds
            )?;
        }
        for p in &self.files {
            write!(f, "\nwrote {}", p.display())?;
        }
        Ok(())
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct SinkState {
    /// Tokens written in all.
    tokens: u64,
    /// llm.c: index of the shard being written and its tokens so far.
    shard: u64,
    shard_tokens: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    fingerprint: String,
    documents: u64,
    val_documents: u64,
    /// Output positions per bucket (the last bucket of each split may be shorter).
    bucket_docs: u64,
    /// `(first position, end position)` of every bucket; val buckets first.
    buckets: Vec<(u64, u64)>,
    /// Committed length of every bucket file.
    bucket_lens: Vec<u64>,
    /// Units whose records are all inside the committed lengths.
    units_done: Vec<bool>,
    /// Pass 2: buckets already gathered into the outputs.
    gathered: usize,
    val: SinkState,
    train: SinkState,
}

/// Runs (or resumes, or confirms) a preparation.
pub fn run(job: &BpeJob) -> Result<BpeReport, DataError> {
    let t0 = Instant::now();
    let units = job.source.plan()?;
    let documents: u64 = units.iter().map(|u| u.docs).sum();
    let text_bytes: u64 = units.iter().map(|u| u.bytes).sum();
    let (n_train, n_val) = split_sizes(documents as usize, job.test_size);
    if n_train == 0 || n_val == 0 {
        return Err(DataError::Prepare(format!(
            "the corpus has {documents} documents; with test_size {} that leaves {n_train} \
             train and {n_val} val documents, and both must be at least 1: add documents \
             (for text files try --sample_by paragraph or line)",
            job.test_size
        )));
    }
    if documents > u32::MAX as u64 {
        return Err(DataError::Prepare(format!(
            "{documents} documents is more than this version handles (4,294,967,295)"
        )));
    }
    let fingerprint = fingerprint(job, &units)?;
    let out_dir = &job.out_dir;
    fs::create_dir_all(out_dir).map_err(|e| DataError::io("cannot create", out_dir, e))?;

    // Already done?
    if let Some(done) = load_summary(out_dir) {
        if done.fingerprint == fingerprint && done.files.iter().all(|p| p.exists()) {
            return Ok(BpeReport {
                seconds: 0.0,
                already_done: true,
                resumed: true,
                ..done
            });
        }
    }

    let work = out_dir.join(WORK_DIR);
    let mut state = match load_state(&work) {
        Some(s) if s.fingerprint == fingerprint => {
            eprintln!(
                "resuming the preparation in {} ({} of {} units tokenized, {} of {} buckets gathered)",
                work.display(),
                s.units_done.iter().filter(|d| **d).count(),
                s.units_done.len(),
                s.gathered,
                s.buckets.len()
            );
            s
        }
        other => {
            if other.is_some() {
                eprintln!(
                    "{} holds work for other inputs or settings; starting over",
                    work.display()
                );
            }
            if work.exists() {
                fs::remove_dir_all(&work).map_err(|e| DataError::io("cannot remove", &work, e))?;
            }
            remove_stale_outputs(out_dir, &job.output)?;
            fs::create_dir_all(&work).map_err(|e| DataError::io("cannot create", &work, e))?;
            new_state(
                fingerprint.clone(),
                &units,
                documents,
                n_val as u64,
                text_bytes,
            )
        }
    };
    let resumed = state.units_done.iter().any(|d| *d) || state.gathered > 0;

    // Space: the outputs plus the bucket records, less what is already there.
    if !job.skip_space_check {
        let est_tokens = text_bytes / 4 + documents;
        let need = (est_tokens * 2 + documents * 12) * 21 / 20 + (256 << 20);
        let have = dir_size(&work);
        space::check(&[space::Need {
            path: out_dir.clone(),
            bytes: need.saturating_sub(have),
            what: format!(
                "tokens of ~{} MB of text (estimated at 4 bytes of text per token)",
                text_bytes / 1_000_000
            ),
        }])?;
    }

    let dest_path = work.join(DEST_FILE);
    if !dest_path.exists() {
        write_dest(&dest_path, documents as usize, n_val as u64, job.seed)?;
    }
    save_state(&work, &state)?;

    let threads = if job.num_proc == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        job.num_proc
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| DataError::Prepare(format!("cannot start {threads} worker threads: {e}")))?;

    if state.units_done.iter().any(|d| !d) {
        pool.install(|| tokenize_pass(job, &units, &work, &mut state, threads))?;
    }
    let (val_files, train_files) = gather_pass(job, &work, &mut state)?;

    // Move the outputs into place, then write the summary.
    let mut files = Vec::new();
    for src in val_files.iter().chain(train_files.iter()) {
        let name = src.file_name().expect("output files have names");
        let dst = out_dir.join(name);
        fs::rename(src, &dst).map_err(|e| DataError::io("cannot move into place", &dst, e))?;
        files.push(dst);
    }
    let meta = Meta {
        vocab_size: GPT2_VOCAB_SIZE,
        itos: vec![],
        tokenizer: "gpt2".into(),
    };
    files.push(meta.save(out_dir)?);
    let report = BpeReport {
        fingerprint,
        documents,
        train_documents: n_train as u64,
        val_documents: n_val as u64,
        train_tokens: state.train.tokens,
        val_tokens: state.val.tokens,
        text_bytes,
        files,
        seconds: t0.elapsed().as_secs_f64(),
        resumed,
        already_done: false,
    };
    let summary = out_dir.join(SUMMARY_FILE);
    let json = serde_json::to_string_pretty(&report).expect("the report serializes");
    fsutil::write_atomic(&summary, json.as_bytes())
        .map_err(|e| DataError::io("cannot write", &summary, e))?;
    fs::remove_dir_all(&work).map_err(|e| DataError::io("cannot remove", &work, e))?;
    Ok(report)
}

fn fingerprint(job: &BpeJob, units: &[Unit]) -> Result<String, DataError> {
    let mut h = Sha256::new();
    h.update(format!("nanogpt-bpe-v{WORK_VERSION}\n"));
    for path in &job.source.files {
        let m =
            fs::metadata(path).map_err(|e| DataError::io("cannot read metadata of", path, e))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let abs = fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        h.update(format!("{}\t{}\t{mtime}\n", abs.display(), m.len()));
    }
    h.update(
        serde_json::to_string(&(&job.source.format, &job.source.column, &job.output))
            .unwrap_or_default(),
    );
    h.update(format!(
        "{}\t{}\t{}\n",
        job.test_size,
        job.seed,
        units.len()
    ));
    Ok(h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn load_summary(out_dir: &Path) -> Option<BpeReport> {
    let text = fs::read_to_string(out_dir.join(SUMMARY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn load_state(work: &Path) -> Option<State> {
    let text = fs::read_to_string(work.join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_state(work: &Path, state: &State) -> Result<(), DataError> {
    let path = work.join(STATE_FILE);
    let json = serde_json::to_vec(state).expect("the state serializes");
    fsutil::write_atomic(&path, &json).map_err(|e| DataError::io("cannot write", &path, e))
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes earlier outputs of this kind from `out_dir`, so that a killed run cannot leave
/// them looking like the result of this one.
fn remove_stale_outputs(out_dir: &Path, output: &OutputFormat) -> Result<(), DataError> {
    let mut stale = vec![out_dir.join(SUMMARY_FILE)];
    match output {
        OutputFormat::NanoGpt => {
            stale.push(out_dir.join("train.bin"));
            stale.push(out_dir.join("val.bin"));
        }
        OutputFormat::Llmc { name, .. } => {
            if let Ok(rd) = fs::read_dir(out_dir) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if (n.starts_with(&format!("{name}_train_"))
                        || n.starts_with(&format!("{name}_val_")))
                        && n.ends_with(".bin")
                    {
                        stale.push(e.path());
                    }
                }
            }
        }
    }
    for p in stale.into_iter().filter(|p| p.exists()) {
        eprintln!("removing {} from an earlier preparation", p.display());
        fs::remove_file(&p).map_err(|e| DataError::io("cannot remove", &p, e))?;
    }
    Ok(())
}

fn new_state(
    fingerprint: String,
    units: &[Unit],
    documents: u64,
    n_val: u64,
    text_bytes: u64,
) -> State {
    // Bucket size in documents from the estimated tokens per document.
    let tokens_per_doc = (text_bytes / 4 / documents.max(1)).max(1) + 1;
    let mut bucket_docs = (BUCKET_TOKENS / tokens_per_doc).max(1024);
    bucket_docs = bucket_docs.max(documents.div_ceil(MAX_BUCKETS));
    let mut buckets = Vec::new();
    for (lo, hi) in [(0, n_val), (n_val, documents)] {
        let mut s = lo;
        while s < hi {
            let e = (s + bucket_docs).min(hi);
            buckets.push((s, e));
            s = e;
        }
    }
    State {
        fingerprint,
        documents,
        val_documents: n_val,
        bucket_docs,
        bucket_lens: vec![0; buckets.len()],
        buckets,
        units_done: vec![false; units.len()],
        gathered: 0,
        val: SinkState::default(),
        train: SinkState::default(),
    }
}

/// Writes `dest[doc]` = output position of every document (little-endian u32): position
/// `k` for `perm[k] = doc`, so val is positions `0..n_val` and train the rest.
fn write_dest(path: &Path, n: usize, _n_val: u64, seed: u64) -> Result<(), DataError> {
    eprintln!("computing the split of {n} documents (numpy default_rng({seed}).permutation)");
    let perm = permutation(n, seed as u128);
    let mut dest = vec![0u32; n];
    for (k, &doc) in perm.iter().enumerate() {
        dest[doc as usize] = k as u32;
    }
    drop(perm);
    fsutil::write_atomic_with(path, |w| {
        for chunk in dest.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.write_all(&bytes)?;
        }
        Ok(())
    })
    .map_err(|e| DataError::io("cannot write", path, e))
}

fn bucket_path(work: &Path, b: usize) -> PathBuf {
    work.join(format!("bucket_{b:05}.rec"))
}

/// Bucket of output position `pos` (val buckets first, then train buckets).
fn bucket_of(val_documents: u64, bucket_docs: u64, pos: u64) -> usize {
    if pos < val_documents {
        (pos / bucket_docs) as usize
    } else {
        let val_buckets = val_documents.div_ceil(bucket_docs) as usize;
        val_buckets + ((pos - val_documents) / bucket_docs) as usize
    }
}

fn progress_bar(total: u64, msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(msg.to_string());
    bar
}

fn tokenize_pass(
    job: &BpeJob,
    units: &[Unit],
    work: &Path,
    state: &mut State,
    threads: usize,
) -> Result<(), DataError> {
    // Bucket files, cut back to what was committed.
    let mut writers = Vec::with_capacity(state.buckets.len());
    for (b, &len) in state.bucket_lens.iter().enumerate() {
        let path = bucket_path(work, b);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| DataError::io("cannot open", &path, e))?;
        f.set_len(len)
            .map_err(|e| DataError::io("cannot truncate", &path, e))?;
        let mut f = f;
        f.seek(SeekFrom::Start(len))
            .map_err(|e| DataError::io("cannot seek in", &path, e))?;
        writers.push(Mutex::new(BufWriter::with_capacity(BUCKET_BUFFER_BYTES, f)));
    }
    let pending: Vec<usize> = (0..units.len()).filter(|&u| !state.units_done[u]).collect();
    let total_bytes: u64 = pending.iter().map(|&u| units[u].bytes).sum();
    eprintln!(
        "tokenizing {} units ({} MB of text) on {threads} threads",
        pending.len(),
        total_bytes / 1_000_000
    );
    let bar = progress_bar(total_bytes, "tokenize");
    let layout = (state.val_documents, state.bucket_docs);
    let done = Mutex::new(state.units_done.clone());
    let shared = Mutex::new((state.clone(), Instant::now()));
    let dest_path = work.join(DEST_FILE);
    let tokens_seen = AtomicU64::new(0);
    let units_started = AtomicU64::new(0);

    let commit = |force: bool| -> Result<(), DataError> {
        let mut guard = if force {
            shared
                .lock()
                .expect("commit lock is never poisoned by a panic-free commit")
        } else {
            match shared.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        if !force && guard.1.elapsed() < COMMIT_EVERY {
            return Ok(());
        }
        let snapshot = done.lock().expect("done set lock").clone();
        let mut lens = Vec::with_capacity(writers.len());
        for (b, w) in writers.iter().enumerate() {
            let mut w = w.lock().expect("bucket writer lock");
            w.flush()
                .and_then(|_| w.get_ref().sync_data())
                .map_err(|e| DataError::io("cannot write", bucket_path(work, b), e))?;
            let len = w
                .get_mut()
                .stream_position()
                .map_err(|e| DataError::io("cannot write", bucket_path(work, b), e))?;
            lens.push(len);
        }
        guard.0.units_done = snapshot;
        guard.0.bucket_lens = lens;
        save_state(work, &guard.0)?;
        guard.1 = Instant::now();
        Ok(())
    };

    let result = pending.par_iter().with_max_len(1).try_for_each(|&u| {
        let unit = &units[u];
        let dest = read_dest(&dest_path, unit.first_doc, unit.docs)?;
        let bpe = Gpt2Bpe::new();
        let mut local: Vec<Vec<u8>> = vec![Vec::new(); writers.len()];
        let mut pending_bytes = 0usize;
        let mut ids: Vec<u32> = Vec::new();
        let flush = |local: &mut Vec<Vec<u8>>| -> Result<(), DataError> {
            for (b, buf) in local.iter_mut().enumerate() {
                if buf.is_empty() {
                    continue;
                }
                let mut w = writers[b].lock().expect("bucket writer lock");
                w.write_all(buf)
                    .map_err(|e| DataError::io("cannot write", bucket_path(work, b), e))?;
                drop(w);
                if buf.capacity() > (256 << 10) {
                    *buf = Vec::new();
                } else {
                    buf.clear();
                }
            }
            Ok(())
        };
        let mut unit_tokens = 0u64;
        let started = units_started.fetch_add(1, Ordering::SeqCst) as usize;
        let stop_at = match job.interrupt {
            Some(Interrupt::AfterUnits(k)) if started >= k => Some(unit.first_doc + unit.docs / 2),
            _ => None,
        };
        job.source.read_unit(unit, &mut |doc, text| {
            if Some(doc) == stop_at {
                flush(&mut local)?;
                return Err(interrupted());
            }
            ids.clear();
            bpe.encode_into(text, &mut ids);
            ids.push(GPT2_EOT);
            let pos = dest[(doc - unit.first_doc) as usize] as u64;
            let b = bucket_of(layout.0, layout.1, pos);
            let buf = &mut local[b];
            let before = buf.len();
            buf.extend_from_slice(&pos.to_le_bytes());
            buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            buf.extend(ids.iter().flat_map(|&t| (t as u16).to_le_bytes()));
            pending_bytes += buf.len() - before;
            unit_tokens += ids.len() as u64;
            if pending_bytes >= WORKER_FLUSH_BYTES {
                flush(&mut local)?;
                pending_bytes = 0;
            }
            Ok(())
        })?;
        flush(&mut local)?;
        done.lock().expect("done set lock")[u] = true;
        tokens_seen.fetch_add(unit_tokens, Ordering::Relaxed);
        bar.inc(unit.bytes);
        commit(false)
    });
    let committed = commit(true);
    bar.finish_and_clear();
    result?;
    committed?;
    *state = shared.into_inner().expect("commit lock").0;
    eprintln!(
        "tokenized: {} tokens this run",
        group(tokens_seen.load(Ordering::Relaxed))
    );
    Ok(())
}

fn read_dest(path: &Path, first: u64, count: u64) -> Result<Vec<u32>, DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io("cannot open", path, e))?;
    f.seek(SeekFrom::Start(first * 4))
        .map_err(|e| DataError::io("cannot read", path, e))?;
    let mut bytes = vec![0u8; (count * 4) as usize];
    f.read_exact(&mut bytes)
        .map_err(|e| DataError::io("cannot read", path, e))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Where one split's tokens go: a raw `.bin` or llm.c shards, in the work directory.
struct Sink {
    split: &'static str,
    work: PathBuf,
    format: OutputFormat,
    state: SinkState,
    file: Option<BufWriter<File>>,
    finished: Vec<PathBuf>,
}

impl Sink {
    fn path(&self, shard: u64) -> PathBuf {
        match &self.format {
            OutputFormat::NanoGpt => self.work.join(format!("{}.bin", self.split)),
            OutputFormat::Llmc { name, .. } => self
                .work
                .join(format!("{name}_{}_{shard:06}.bin", self.split)),
        }
    }

    fn header_bytes(&self) -> u64 {
        match self.format {
            OutputFormat::NanoGpt => 0,
            OutputFormat::Llmc { .. } => LLMC_HEADER_BYTES as u64,
        }
    }

    /// Opens the sink at its recorded state (cutting off anything written after it).
    fn open(
        split: &'static str,
        work: &Path,
        format: &OutputFormat,
        state: SinkState,
    ) -> Result<Sink, DataError> {
        let mut sink = Sink {
            split,
            work: work.to_path_buf(),
            format: format.clone(),
            state,
            file: None,
            finished: Vec::new(),
        };
        for k in 0..sink.state.shard {
            sink.finished.push(sink.path(k));
        }
        sink.open_current()?;
        Ok(sink)
    }

    fn open_current(&mut self) -> Result<(), DataError> {
        let path = self.path(self.state.shard);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| DataError::io("cannot open", &path, e))?;
        let len = self.header_bytes() + 2 * self.state.shard_tokens;
        f.set_len(len)
            .map_err(|e| DataError::io("cannot truncate", &path, e))?;
        f.seek(SeekFrom::Start(len))
            .map_err(|e| DataError::io("cannot seek in", &path, e))?;
        self.file = Some(BufWriter::with_capacity(1 << 20, f));
        Ok(())
    }

    /// Appends little-endian uint16 token bytes.
    fn append(&mut self, mut bytes: &[u8]) -> Result<(), DataError> {
        while !bytes.is_empty() {
            let room = match &self.format {
                OutputFormat::NanoGpt => bytes.len() as u64 / 2,
                OutputFormat::Llmc { shard_tokens, .. } => shard_tokens - self.state.shard_tokens,
            };
            let take = (room.min(bytes.len() as u64 / 2) * 2) as usize;
            let path = self.path(self.state.shard);
            let f = self
                .file
                .as_mut()
                .expect("the sink file is open between calls");
            f.write_all(&bytes[..take])
                .map_err(|e| DataError::io("cannot write", &path, e))?;
            self.state.tokens += take as u64 / 2;
            self.state.shard_tokens += take as u64 / 2;
            bytes = &bytes[take..];
            if !bytes.is_empty() {
                self.close_shard()?;
                self.state.shard += 1;
                self.state.shard_tokens = 0;
                self.open_current()?;
            }
        }
        Ok(())
    }

    /// Writes the llm.c header of the current shard, syncs and closes it.
    fn close_shard(&mut self) -> Result<(), DataError> {
        let path = self.path(self.state.shard);
        let mut f = self
            .file
            .take()
            .expect("the sink file is open between calls")
            .into_inner()
            .map_err(|e| DataError::io("cannot write", &path, e.into_error()))?;
        if let OutputFormat::Llmc { .. } = self.format {
            let mut header = [0u8; LLMC_HEADER_BYTES];
            header[0..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
            header[4..8].copy_from_slice(&LLMC_VERSION.to_le_bytes());
            header[8..12].copy_from_slice(&(self.state.shard_tokens as u32).to_le_bytes());
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.write_all(&header))
                .map_err(|e| DataError::io("cannot write", &path, e))?;
        }
        f.sync_all()
            .map_err(|e| DataError::io("cannot sync", &path, e))?;
        self.finished.push(path);
        Ok(())
    }

    /// Flushes and syncs what was appended; the returned state is safe to record.
    fn commit(&mut self) -> Result<SinkState, DataError> {
        let path = self.path(self.state.shard);
        let f = self
            .file
            .as_mut()
            .expect("the sink file is open between calls");
        f.flush()
            .and_then(|_| f.get_ref().sync_data())
            .map_err(|e| DataError::io("cannot write", &path, e))?;
        Ok(self.state.clone())
    }

    /// Closes the last file; returns every output file of the split.
    fn finish(mut self) -> Result<Vec<PathBuf>, DataError> {
        self.close_shard()?;
        Ok(self.finished)
    }
}

/// One bucket's records: (position, byte offset of the tokens, token count).
fn index_records(bytes: &[u8], path: &Path) -> Result<Vec<(u64, usize, usize)>, DataError> {
    let mut recs = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if at + 12 > bytes.len() {
            return Err(corrupt_work(path, "a record header is cut off"));
        }
        let pos = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        let start = at + 12;
        if start + 2 * n > bytes.len() {
            return Err(corrupt_work(path, "a record is cut off"));
        }
        recs.push((pos, start, n));
        at = start + 2 * n;
    }
    Ok(recs)
}

fn corrupt_work(path: &Path, what: &str) -> DataError {
    DataError::Prepare(format!(
        "{}: {what}; the work directory is damaged: delete {} and run again",
        path.display(),
        path.parent()
            .map_or_else(|| path.display().to_string(), |p| p.display().to_string())
    ))
}

/// Pass 2: buckets in output order -> the split files. Returns (val files, train files).
fn gather_pass(
    job: &BpeJob,
    work: &Path,
    state: &mut State,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DataError> {
    let mut val = Sink::open("val", work, &job.output, state.val.clone())?;
    let mut train = Sink::open("train", work, &job.output, state.train.clone())?;
    let total: u64 = state.bucket_lens[state.gathered..].iter().sum();
    let bar = progress_bar(total, "gather");
    for b in state.gathered..state.buckets.len() {
        let path = bucket_path(work, b);
        let mut bytes = fs::read(&path).map_err(|e| DataError::io("cannot read", &path, e))?;
        bytes.truncate(state.bucket_lens[b] as usize);
        let mut recs = index_records(&bytes, &path)?;
        recs.sort_unstable_by_key(|r| r.0);
        let (lo, hi) = state.buckets[b];
        let sink = if lo < state.val_documents {
            &mut val
        } else {
            &mut train
        };
        let mut expected = lo;
        let mut prev: Option<(usize, usize)> = None;
        for &(pos, start, n) in &recs {
            let tokens = &bytes[start..start + 2 * n];
            if pos + 1 == expected {
                // A unit tokenized again after an interruption: the copies must agree.
                let (ps, pn) = prev.expect("a duplicate follows its first copy");
                if bytes[ps..ps + 2 * pn] != *tokens {
                    return Err(corrupt_work(&path, "two copies of a document differ"));
                }
                continue;
            }
            if pos != expected {
                return Err(corrupt_work(
                    &path,
                    &format!("document at output position {expected} is missing"),
                ));
            }
            sink.append(tokens)?;
            prev = Some((start, n));
            expected += 1;
        }
        if expected != hi {
            return Err(corrupt_work(
                &path,
                &format!("documents from output position {expected} to {hi} are missing"),
            ));
        }
        state.val = val.commit()?;
        state.train = train.commit()?;
        state.gathered = b + 1;
        save_state(work, state)?;
        fs::remove_file(&path).map_err(|e| DataError::io("cannot remove", &path, e))?;
        bar.inc(state.bucket_lens[b]);
        if job.interrupt == Some(Interrupt::AfterBuckets(b + 1)) {
            return Err(interrupted());
        }
    }
    bar.finish_and_clear();
    Ok((val.finish()?, train.finish()?))
}
