//! Multi-process data-parallel training over loopback: 1, 2 and 3 ranks follow the same
//! loss trajectory; `nanogpt launch` starts and prefixes ranks; a killed or stopped rank
//! makes the others exit non-zero with a message naming it within the timeout; mismatched
//! configs and indivisible accumulation are refused; a run resumes on another world size.

mod common;

use common::{nanogpt, prepare_data, tiny_train_args};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Variables of launchers that must not leak into the ranks from the test's environment.
const LAUNCHER_VARS: [&str; 12] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
];

fn free_port() -> u16 {
    nanogpt::dist::test_port()
}

fn clean(cmd: &mut Command) -> &mut Command {
    for v in LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// `nanogpt train <args>` as rank `rank` of `world` with torchrun's variables.
fn rank_cmd(cwd: &Path, rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut cmd = nanogpt(cwd);
    clean(&mut cmd)
        .arg("train")
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `world` ranks to completion; returns their outputs in rank order.
fn run_ranks(cwd: &Path, world: usize, per_rank: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| rank_cmd(cwd, r, world, port, &per_rank(r)).spawn().unwrap())
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// (kind, iter, value) of metrics.jsonl: training losses and eval train/val losses.
fn trajectory(out_dir: &Path) -> Vec<(String, u64, f64)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let mut t = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let it = v["iter"].as_u64().unwrap();
        match v["kind"].as_str().unwrap() {
            "train" => t.push(("loss".into(), it, v["loss"].as_f64().unwrap())),
            "eval" => {
                t.push(("train_loss".into(), it, v["train_loss"].as_f64().unwrap()));
                t.push(("val_loss".into(), it, v["val_loss"].as_f64().unwrap()));
            }
            _ => {}
        }
    }
    t
}

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

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expect_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        stderr(o)
    );
}

/// Arguments of a short run in which every world size 1, 2, 3 divides the accumulation.
fn run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut e = vec![
        "--gradient_accumulation_steps=6",
        "--batch_size=2",
        "--max_iters=6",
        "--eval_interval=3",
        "--eval_iters=3",
        "--log_interval=1",
        "--dropout=0.1",
        "--dist_timeout=20",
    ];
    e.extend_from_slice(extra);
    tiny_train_args(data, out, &e)
}

#[test]
fn one_two_and_three_ranks_follow_the_same_trajectory_and_resume_across_world_sizes() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));

    let one = cwd.join("one");
    let o = clean(&mut nanogpt(cwd))
        .arg("train")
        .args(run_args(&data, &one, &["--dist_env=none"]))
        .output()
        .unwrap();
    expect_ok(&o, "1 rank");
    let reference = trajectory(&one);
    assert_eq!(reference.iter().filter(|r| r.0 == "loss").count(), 7);

    // Two ranks started directly with torchrun's variables.
    let two = cwd.join("two");
    let outs = run_ranks(cwd, 2, |_| run_args(&data, &two, &[]));
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
    assert_same_trajectory(&reference, &trajectory(&two), "2 ranks");

    // Three ranks through `nanogpt launch`, with prefixed output.
    let three = cwd.join("three");
    let mut args = vec![
        "launch".to_string(),
        "--nproc_per_node=3".into(),
        "--".into(),
        "train".into(),
    ];
    args.extend(run_args(&data, &three, &[]));
    let o = clean(&mut nanogpt(cwd)).args(&args).output().unwrap();
    expect_ok(&o, "launch of 3 ranks");
    let err = stderr(&o);
    for r in 0..3 {
        assert!(
            err.contains(&format!("[rank{r}]: rank {r} (local rank {r}) of world 3")),
            "{err}"
        );
    }
    assert_same_trajectory(&reference, &trajectory(&three), "3 ranks");

    // Resume on one rank from the 2-rank run's checkpoint at iteration 3 (ckpt.safetensors
    // also holds iteration 6; keep the 3 copy by training 2 ranks to 3 only).
    let half = cwd.join("half");
    let outs = run_ranks(cwd, 2, |_| run_args(&data, &half, &["--max_iters=3"]));
    outs.iter()
        .for_each(|o| expect_ok(o, "2 ranks to iteration 3"));
    let o = clean(&mut nanogpt(cwd))
        .arg("train")
        .args(run_args(
            &data,
            &half,
            &["--dist_env=none", "--init_from=resume"],
        ))
        .output()
        .unwrap();
    expect_ok(&o, "resume on 1 rank");
    assert!(
        stderr(&o).contains("written by a run of world size 2; continuing on 1"),
        "{}",
        stderr(&o)
    );
    assert_same_trajectory(&reference, &trajectory(&half), "2 ranks then 1 rank");
}

#[test]
fn refuses_indivisible_accumulation_and_mismatched_configs() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let out = cwd.join("out");
    let o = rank_cmd(cwd, 0, 4, free_port(), &run_args(&data, &out, &[]))
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
        run_args(&data, &out, &[bs.as_str()])
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
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let out = cwd.join("out");
    let args = run_args(
        &data,
        &out,
        &[
            "--max_iters=1000000",
            "--eval_interval=1000000",
            "--dist_timeout=3",
        ],
    );
    let port = free_port();
    let mut children: Vec<Child> = (0..3)
        .map(|r| rank_cmd(cwd, r, 3, port, &args).spawn().unwrap())
        .collect();
    // Collect every rank's stderr in the background; signal when rank 0 logs iteration 3.
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    for (r, c) in children.iter_mut().enumerate() {
        let err = c.stderr.take().unwrap();
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if r == 0 && line.starts_with("iter 3:") {
                    let _ = tx.send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        }));
    }
    let started = rx.recv_timeout(Duration::from_secs(60));
    if started.is_err() {
        children.iter_mut().for_each(|c| {
            let _ = c.kill();
        });
        panic!("rank 0 never reached iteration 3");
    }
    fault(&mut children[1]);
    let t0 = Instant::now();
    let mut codes = Vec::new();
    for r in [0usize, 2] {
        loop {
            if let Some(st) = children[r].try_wait().unwrap() {
                codes.push((r, st, t0.elapsed()));
                break;
            }
            if t0.elapsed() > limit + Duration::from_secs(10) {
                children.iter_mut().for_each(|c| {
                    let _ = c.kill();
                });
                panic!("rank {r} still runs {:?} after the fault", t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = children[1].kill();
    let _ = children[1].wait();
    let texts: Vec<String> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, st, took) in codes {
        let text = &texts[r];
        assert!(st.code().is_some_and(|c| c != 0), "rank {r}: {st}\n{text}");
        assert!(
            took <= limit,
            "rank {r} took {took:?} (limit {limit:?})\n{text}"
        );
        assert!(
            text.contains("rank 1") && text.contains(needle),
            "rank {r}:\n{text}"
        );
        assert!(!text.contains("panicked"), "rank {r}:\n{text}");
    }
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
