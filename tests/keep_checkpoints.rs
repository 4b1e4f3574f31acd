//! `keep_checkpoints_at`: which iterations keep a checkpoint for good, that later saves of
//! the latest checkpoint never change a kept one (they may share a file through hard
//! links), and `nanogpt sample --checkpoints=...` over the kept files.

mod common;

use common::{assert_contains_all, expect_clean_failure, expect_ok, split_samples, trained_run};
use nanogpt::train::checkpoint::{self, CheckpointPaths};
use std::path::Path;

/// Trains 0..=45 with kept checkpoints at 10 and every 20, evaluating (and saving the
/// latest checkpoint) every 10 iterations.
fn kept_run(root: &Path) -> std::path::PathBuf {
    trained_run(
        root,
        45,
        &["--keep_checkpoints_at=10,every 20", "--eval_interval=10"],
    )
}

/// One sample of 12 tokens after "the", with `extra` arguments.
fn sample(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--num_samples=1", "--max_new_tokens=12", "--start=the"];
    args.extend_from_slice(extra);
    common::sample_cpu(root, out, &args)
}

/// The checkpoint header lines of `nanogpt sample` output.
fn headers(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("=== iter "))
        .collect()
}

#[test]
fn keep_schedule_keeps_listed_and_every_nth_iterations() {
    let root = tempfile::tempdir().unwrap();
    let out = kept_run(root.path());
    let paths = CheckpointPaths::new(&out);
    let kept: Vec<u64> = paths
        .list_kept()
        .unwrap()
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        kept,
        vec![10, 20, 40],
        "kept checkpoints (30 is not in the schedule)"
    );
    assert!(!paths.kept(30).exists());
    assert!(!paths.kept(0).exists(), "iteration 0 is never kept");
    // Each kept file still holds its own iteration although ckpt.safetensors was saved
    // again at 20, 30 and 40.
    for it in [10, 20, 40] {
        let c = checkpoint::load(&paths.kept(it), true).unwrap();
        assert_eq!(c.state.iter_num, it, "ckpt_{it:06}");
        assert_eq!(
            c.state.optimizer_step, it,
            "AdamW steps before iteration {it}"
        );
    }
    let latest = checkpoint::load(&paths.latest(), false).unwrap();
    assert_eq!(latest.state.iter_num, 40, "the last evaluation was at 40");
    let ten = checkpoint::load(&paths.kept(10), false).unwrap();
    assert_ne!(
        ten.params, latest.params,
        "weights at 10 and 40 must differ"
    );
}

#[test]
fn sample_all_kept_checkpoints_in_iteration_order() {
    let root = tempfile::tempdir().unwrap();
    let out = kept_run(root.path());
    let stdout = expect_ok(&sample(root.path(), &out, &["--checkpoints=all"]));
    let kept = headers(&stdout);
    assert_eq!(kept.len(), 3, "one header per kept checkpoint:\n{stdout}");
    for (h, it) in kept.iter().zip([10, 20, 40]) {
        assert!(
            h.starts_with(&format!("=== iter {it} ("))
                && h.contains(&format!("ckpt_{it:06}.safetensors")),
            "header {h:?} for iteration {it}"
        );
    }
    let samples = split_samples(&stdout);
    assert_eq!(samples.len(), 3);
    for s in &samples {
        assert!(s.starts_with("the"), "sample keeps the prompt: {s:?}");
        assert_eq!(
            s.chars().count(),
            3 + 12,
            "prompt + 12 new characters: {s:?}"
        );
    }
}

#[test]
fn sample_selected_kept_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let out = kept_run(root.path());
    let one = expect_ok(&sample(root.path(), &out, &["--checkpoints=20"]));
    let kept = headers(&one);
    assert_eq!(kept.len(), 1, "{one}");
    assert!(kept[0].starts_with("=== iter 20 ("), "{one}");
    assert_eq!(split_samples(&one).len(), 1);

    // A list is read in the order given; the same seed gives the same text per checkpoint.
    let two = expect_ok(&sample(root.path(), &out, &["--checkpoints=40,20"]));
    let kept = headers(&two);
    assert_eq!(kept.len(), 2, "{two}");
    assert!(kept[0].starts_with("=== iter 40 ("));
    assert!(kept[1].starts_with("=== iter 20 ("));
    assert_eq!(split_samples(&two)[1], split_samples(&one)[0]);
}

#[test]
fn sample_missing_kept_iteration_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = kept_run(root.path());
    let err = expect_clean_failure(&sample(root.path(), &out, &["--checkpoints=30"]));
    assert_contains_all(&err, &["ckpt_000030.safetensors", "no checkpoint"]);
    let err = expect_clean_failure(&sample(root.path(), &out, &["--checkpoints=ten"]));
    assert_contains_all(&err, &["checkpoints", "ten"]);
}

/// The message for a missing kept iteration should speak about sampling: it names the
/// iterations that do exist and does not tell the user to set a training option.
#[test]
fn sample_missing_kept_iteration_lists_available_ones() {
    let root = tempfile::tempdir().unwrap();
    let out = kept_run(root.path());
    let err = expect_clean_failure(&sample(root.path(), &out, &["--checkpoints=30"]));
    assert!(!err.contains("init_from=scratch"), "{err}");
    assert_contains_all(&err, &["10", "20", "40"]);
}

#[test]
fn sample_all_without_kept_checkpoints_explains_keep_checkpoints_at() {
    let root = tempfile::tempdir().unwrap();
    let out = trained_run(root.path(), 10, &[]);
    let err = expect_clean_failure(&sample(root.path(), &out, &["--checkpoints=all"]));
    assert_contains_all(&err, &["keep_checkpoints_at", &out.display().to_string()]);
}
