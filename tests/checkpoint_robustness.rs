//! Damaged checkpoints met by `init_from=resume` (truncated, a flipped byte, a foreign
//! safetensors file) fail with errors naming the file instead of panicking, and a training
//! process killed with SIGKILL at arbitrary moments never leaves a partial file that passes
//! for a checkpoint.

mod common;

use common::{assert_contains_all, expect_clean_failure, prepare_data, tiny_train_args, train};
use nanogpt::train::checkpoint::{self, CheckpointError, LATEST_NAME};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A finished tiny run (checkpoint at iteration 10) under `root`; returns (data, out_dir).
fn finished_run(root: &Path) -> (PathBuf, PathBuf) {
    let data = prepare_data(&root.join("data"));
    let out = root.join("out");
    train(&tiny_train_args(&data, &out, &["--max_iters=10"])).unwrap();
    assert!(out.join(LATEST_NAME).is_file());
    (data, out)
}

/// Copies the run's checkpoint into a fresh out_dir `name`, lets `damage` edit its bytes,
/// and returns the error of resuming from it (as the CLI prints it).
fn resume_error(
    root: &Path,
    data: &Path,
    good: &Path,
    name: &str,
    damage: impl Fn(&mut Vec<u8>),
) -> (PathBuf, String) {
    let out = root.join(name);
    fs::create_dir_all(&out).unwrap();
    let mut bytes = fs::read(good.join(LATEST_NAME)).unwrap();
    damage(&mut bytes);
    let path = out.join(LATEST_NAME);
    fs::write(&path, &bytes).unwrap();
    let err = train(&tiny_train_args(
        data,
        &out,
        &["--init_from=resume", "--max_iters=12"],
    ))
    .expect_err("resuming from a damaged checkpoint must fail");
    (path, format!("{err:#}"))
}

fn header_end(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn resume_from_damaged_checkpoints_fails_with_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let (data, good) = finished_run(root.path());

    let (path, msg) = resume_error(root.path(), &data, &good, "truncated", |b| {
        let n = b.len();
        b.truncate(n - 1000);
    });
    assert_contains_all(&msg, &[&path.display().to_string(), "truncated"]);

    let (path, msg) = resume_error(root.path(), &data, &good, "flipped", |b| {
        let i = b.len() - 5;
        b[i] ^= 0x40;
    });
    assert_contains_all(&msg, &[&path.display().to_string(), "corrupt", "checksum"]);

    let (path, msg) = resume_error(root.path(), &data, &good, "foreign", |b| {
        let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &w).unwrap();
        *b = safetensors::serialize([("wte.weight", view)], &None).unwrap();
    });
    assert_contains_all(
        &msg,
        &[&path.display().to_string(), "not a nanogpt-rs checkpoint"],
    );

    let (path, msg) = resume_error(root.path(), &data, &good, "text", |b| {
        *b = b"this is not a checkpoint at all\n".to_vec();
    });
    assert_contains_all(&msg, &[&path.display().to_string()]);

    let (path, msg) = resume_error(root.path(), &data, &good, "empty", |b| b.clear());
    assert_contains_all(&msg, &[&path.display().to_string(), "truncated"]);
}

#[test]
fn cli_resume_from_corrupt_checkpoint_exits_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let (data, good) = finished_run(root.path());
    let out = root.path().join("cli_corrupt");
    fs::create_dir_all(&out).unwrap();
    let mut bytes = fs::read(good.join(LATEST_NAME)).unwrap();
    let i = bytes.len() / 2 + 3;
    bytes[i] ^= 0x01;
    fs::write(out.join(LATEST_NAME), &bytes).unwrap();
    let mut args = vec!["train".to_string()];
    args.extend(tiny_train_args(
        &data,
        &out,
        &["--init_from=resume", "--max_iters=12"],
    ));
    let err = expect_clean_failure(&common::run(root.path(), &args));
    assert_contains_all(&err, &["ckpt.safetensors", "corrupt"]);
}

/// Every single-byte change (xor 0xff) in the header and a spread of positions in the data
/// section, and every interesting truncation length, give an error, never a panic or a
/// silently different checkpoint.
#[test]
fn every_header_byte_and_sampled_data_bytes_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let (_, good) = finished_run(root.path());
    let orig = fs::read(good.join(LATEST_NAME)).unwrap();
    let hend = header_end(&orig);
    let path = root.path().join("probe.safetensors");
    let mut positions: Vec<usize> = (0..hend).collect();
    positions.extend((hend..orig.len()).step_by(997));
    positions.push(orig.len() - 1);
    fs::write(&path, &orig).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let poke = |i: usize, byte: u8| file.write_all_at(&[byte], i as u64).unwrap();
    for &i in &positions {
        poke(i, orig[i] ^ 0xff);
        let result = checkpoint::load(&path, true);
        poke(i, orig[i]);
        match result {
            Ok(_) => panic!("byte {i} (header ends at {hend}) flipped, yet the checkpoint loads"),
            Err(e) => {
                if i >= hend {
                    assert!(
                        matches!(e, CheckpointError::Corrupt { .. }),
                        "byte {i}: {e}"
                    );
                }
                assert!(
                    e.to_string().contains(&path.display().to_string()),
                    "byte {i}: {e}"
                );
            }
        }
    }
    let mut lengths = vec![0, 1, 7, 8, 9, 100, hend - 1, hend, hend + 1, hend + 4096];
    lengths.extend([orig.len() / 2, orig.len() - 4, orig.len() - 1]);
    for len in lengths {
        fs::write(&path, &orig[..len]).unwrap();
        let e = checkpoint::load(&path, false).expect_err("a truncated file must not load");
        assert!(
            matches!(e, CheckpointError::Truncated { .. }),
            "truncated to {len} bytes: {e}"
        );
        assert!(
            checkpoint::inspect(&path).is_err(),
            "inspect accepts {len} bytes"
        );
    }
}

/// Files in `out` that a reader might take for a checkpoint: any name ending in
/// `.safetensors`.
fn checkpoint_like_files(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(out)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    v.sort();
    v
}

#[test]
fn sigkill_during_training_never_leaves_a_partial_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = prepare_data(&root.path().join("data"));
    let out = root.path().join("out");
    let latest = out.join(LATEST_NAME);
    // Delays after the first checkpoint of each process appears; they fall at different
    // points of the save / train / eval cycle (one save every 5 iterations).
    let delays_ms = [0u64, 1, 3, 7, 15, 31, 60, 90, 160, 260];
    let mut last_iter = 0u64;
    for (round, &delay) in delays_ms.iter().enumerate() {
        let init = if latest.exists() { "resume" } else { "scratch" };
        let mut args = vec!["train".to_string()];
        args.extend(tiny_train_args(
            &data,
            &out,
            &[
                &format!("--init_from={init}"),
                "--max_iters=1000000",
                "--lr_decay_iters=1000000",
                "--eval_interval=5",
                "--eval_iters=1",
                "--n_embd=64",
                "--always_save_checkpoint=True",
                "--dropout=0.1",
            ],
        ));
        let log = root.path().join(format!("round{round}.log"));
        let mut child = common::nanogpt(root.path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Wait until this process has written a checkpoint of its own (iter_num beyond the
        // one it resumed from), then let it run `delay` ms more and kill it.
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "round {round}: training exited early with {status}:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let advanced = checkpoint::read_state(&latest).is_ok_and(|s| s.iter_num > last_iter);
            if advanced {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "round {round}: no new checkpoint within 60 s:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay));
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: exited before the kill"
        );
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());

        // Every file that looks like a checkpoint is a complete, verified one.
        let files = checkpoint_like_files(&out);
        assert!(files.contains(&latest), "round {round}: {files:?}");
        for f in &files {
            let c = checkpoint::load(f, true)
                .unwrap_or_else(|e| panic!("round {round}: {} does not load: {e}", f.display()));
            assert!(c.state.iter_num > 0 && c.state.iter_num.is_multiple_of(5));
        }
        let temps: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        eprintln!(
            "round {round}: killed {delay} ms after a checkpoint; temporary files left: {temps:?}"
        );
        // No kept checkpoints were asked for, so temporary files must not be listed as such.
        assert_eq!(checkpoint::list_kept(&out).unwrap(), vec![]);
        let it = checkpoint::read_state(&latest).unwrap().iter_num;
        assert!(
            it > last_iter,
            "round {round}: iteration went from {last_iter} to {it}"
        );
        last_iter = it;
    }
    // The surviving checkpoint resumes in-process for a few more iterations.
    let max = format!("--max_iters={}", last_iter + 3);
    let s = train(&tiny_train_args(
        &data,
        &out,
        &[
            "--init_from=resume",
            &max,
            "--eval_interval=5",
            "--eval_iters=1",
            "--n_embd=64",
            "--dropout=0.1",
        ],
    ))
    .unwrap();
    assert_eq!(s.losses.first().map(|l| l.0), Some(last_iter));
    assert_eq!(s.final_iter, last_iter + 4);
}

/// A process killed while writing a checkpoint leaves `.ckpt.safetensors.tmp<pid>` behind,
/// as large as a checkpoint. Runs that later save into the same out_dir should remove such
/// leftovers of processes that no longer exist.
#[test]
fn stale_temporary_checkpoints_are_removed_by_later_runs() {
    let root = tempfile::tempdir().unwrap();
    let (data, out) = finished_run(root.path());
    // A pid above the Linux maximum (2^22), so it cannot belong to a live process.
    let stale = out.join(".ckpt.safetensors.tmp4194399");
    fs::copy(out.join(LATEST_NAME), &stale).unwrap();
    train(&tiny_train_args(
        &data,
        &out,
        &["--init_from=resume", "--max_iters=20"],
    ))
    .unwrap();
    assert!(!stale.exists(), "{} is still there", stale.display());
}

/// A run that diverges (a learning rate far too high: the loss becomes NaN) stops at the
/// first evaluation or step whose loss or gradient norm is not finite, with an error that
/// says so, and saves nothing of that state: the checkpoint that an evaluation with
/// `always_save_checkpoint` would have written over the last good one is the one from the
/// last evaluation whose losses were finite.
#[test]
fn a_diverging_run_stops_without_saving_over_the_last_good_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let (data, out) = finished_run(root.path());
    let err = train(&tiny_train_args(
        &data,
        &out,
        &[
            "--init_from=resume",
            "--max_iters=30",
            "--learning_rate=1e9",
            "--min_lr=1e9",
            "--warmup_iters=0",
            "--grad_clip=0.0",
            "--eval_interval=1",
        ],
    ))
    .expect_err("a learning rate of 1e9 diverges");
    let msg = format!("{err:#}");
    assert_contains_all(
        &msg,
        &[
            "training diverged at iter ",
            "is NaN",
            "Nothing from this point on was saved",
            "Lower learning_rate",
            "init_from=resume",
        ],
    );
    let at: u64 = msg
        .split("diverged at iter ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no iteration in: {msg}"));
    let saved = checkpoint::load(&out.join(LATEST_NAME), true).unwrap();
    let it = saved.state.iter_num;
    assert!(
        it > 10 && it <= at,
        "checkpoint at iter {it}, divergence at {at}"
    );
    assert!(saved.params.iter().all(|p| p.is_finite()));
    // The evaluation the checkpoint was saved at had finite losses (metrics.jsonl writes
    // a non-finite one as null).
    let metrics = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let eval = metrics
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["kind"] == "eval" && r["iter"] == it)
        .unwrap_or_else(|| panic!("no evaluation at iter {it} in metrics.jsonl"));
    assert!(
        eval["val_loss"].as_f64().is_some_and(f64::is_finite),
        "{eval}"
    );
    assert!(
        eval["train_loss"].as_f64().is_some_and(f64::is_finite),
        "{eval}"
    );
}
