//! Multi-process data-parallel training over loopback: 1, 2 and 3 ranks follow the same
//! loss trajectory; `nanogpt launch` starts and prefixes ranks; a killed or stopped rank
//! makes the others exit non-zero with a message naming it within the timeout; mismatched
//! configs and indivisible accumulation are refused; a run resumes on another world size.

mod common;

use common::dist::{
    assert_stopped_naming_rank_1, clean, fault_in_rank_1, metrics, rank_cmd, run_ranks,
    short_run_args, train_alone, UNTIL_A_FAULT,
};
use common::{nanogpt, prepare_data, stderr};
use std::path::Path;
use std::process::{Child, Output};
use std::time::Duration;

fn assert_same_trajectory(a: &[(String, u64, f64)], b: &[(String, u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.0, x.1), (&y.0, y.1), "{what}");
        let rel = (x.2 - y.2).abs() / x.2.abs().max(1e-12);
        assert!(
            rel < 1e-5,
            "{what}: {} at iter {}: {} vs {} (rel {rel:.2e})",
            x.0,
            x.1,
            x.2,
            y.2
        );
    }
}

fn expect_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        stderr(o)
    );
}

#[test]
fn one_two_and_three_ranks_follow_the_same_trajectory_and_resume_across_world_sizes() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));

    let one = cwd.join("one");
    let o = train_alone(cwd, &short_run_args(&data, &one, &["--dist_env=none"]));
    expect_ok(&o, "1 rank");
    let reference = metrics(&one);
    assert_eq!(reference.iter().filter(|r| r.0 == "loss").count(), 7);

    // Two ranks started directly with torchrun's variables.
    let two = cwd.join("two");
    let outs = run_ranks(cwd, 2, |_| short_run_args(&data, &two, &[]));
    for (r, o) in outs.iter().enumerate() {
        expect_ok(o, &format!("rank {r} of 2"));
        let err = stderr(o);
        assert!(
            err.contains(&format!("rank {r} (local rank {r}) of world 2: host")),
            "{err}"
        );
    }
    assert!(stderr(&outs[0]).contains("3 micro-steps per rank"));
    assert!(!stderr(&outs[1]).contains("iter 1:"), "only rank 0 logs");
    assert_same_trajectory(&reference, &metrics(&two), "2 ranks");

    // Three ranks through `nanogpt launch`, with prefixed output.
    let three = cwd.join("three");
    let mut args = vec![
        "launch".to_string(),
        "--nproc_per_node=3".into(),
        "--".into(),
        "train".into(),
    ];
    args.extend(short_run_args(&data, &three, &[]));
    let o = clean(&mut nanogpt(cwd)).args(&args).output().unwrap();
    expect_ok(&o, "launch of 3 ranks");
    let err = stderr(&o);
    for r in 0..3 {
        assert!(
            err.contains(&format!("[rank{r}]: rank {r} (local rank {r}) of world 3")),
            "{err}"
        );
    }
    assert_same_trajectory(&reference, &metrics(&three), "3 ranks");

    // Resume on one rank from the 2-rank run's checkpoint at iteration 3 (ckpt.safetensors
    // also holds iteration 6; keep the 3 copy by training 2 ranks to 3 only).
    let half = cwd.join("half");
    let outs = run_ranks(cwd, 2, |_| short_run_args(&data, &half, &["--max_iters=3"]));
    outs.iter()
        .for_each(|o| expect_ok(o, "2 ranks to iteration 3"));
    let o = train_alone(
        cwd,
        &short_run_args(&data, &half, &["--dist_env=none", "--init_from=resume"]),
    );
    expect_ok(&o, "resume on 1 rank");
    assert!(
        stderr(&o).contains("written by a run of world size 2; continuing on 1"),
        "{}",
        stderr(&o)
    );
    assert_same_trajectory(&reference, &metrics(&half), "2 ranks then 1 rank");
}

#[test]
fn refuses_indivisible_accumulation_and_mismatched_configs() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let out = cwd.join("out");
    let o = rank_cmd(
        cwd,
        0,
        4,
        nanogpt::dist::test_port(),
        &short_run_args(&data, &out, &[]),
    )
    .output()
    .unwrap();
    let err = common::expect_clean_failure(&o);
    common::assert_contains_all(
        &err,
        &[
            "gradient_accumulation_steps = 6",
            "world size 4",
            "multiple of 4",
        ],
    );

    let outs = run_ranks(cwd, 2, |r| {
        let bs = format!("--batch_size={}", 2 + 2 * r);
        short_run_args(&data, &out, &[bs.as_str()])
    });
    for o in &outs {
        let err = common::expect_clean_failure(o);
        common::assert_contains_all(&err, &["batch_size = 2 on rank 0 but 4 on rank 1"]);
    }
}

/// Starts 3 long-running ranks, waits until rank 0 has logged a few iterations, applies
/// `fault` to rank 1, and checks that ranks 0 and 2 exit non-zero within `limit` with a
/// message naming rank 1 and containing `needle`.
fn fault_test(fault: impl Fn(&mut Child), needle: &str, limit: Duration) {
    let args = |data: &Path, out: &Path| short_run_args(data, out, &UNTIL_A_FAULT);
    let after = fault_in_rank_1(args, fault, limit);
    assert_stopped_naming_rank_1(&after, needle, limit);
}

#[test]
fn a_killed_rank_stops_the_others_at_once() {
    fault_test(|c| c.kill().unwrap(), "exited", Duration::from_secs(3));
}

#[test]
fn a_stopped_rank_stops_the_others_within_the_timeout() {
    fault_test(
        |c| {
            // SAFETY: kill(2) with SIGSTOP on our own child process.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGSTOP);
            }
        },
        "stopped responding",
        Duration::from_secs(8),
    );
}
