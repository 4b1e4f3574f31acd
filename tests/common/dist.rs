//! Helpers of the data-parallel tests: `nanogpt train` ranks started with torchrun's
//! variables on a loopback rendezvous port (to completion, or until a fault in one rank
//! stops the others), TCP rings of threads in the test process, the losses a run logs in
//! metrics.jsonl, and the comparison of two runs' checkpoints.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nanogpt::dist::{rendezvous, tcp::TcpProcessGroup, DistOptions, LaunchInfo};
use nanogpt::train::checkpoint::{self, Checkpoint};

use super::{nanogpt, prepare_data, tiny_train_args};

/// Variables of launchers that must not leak into the ranks from the test's environment.
pub const LAUNCHER_VARS: [&str; 12] = [
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

/// Removes every launcher variable from `cmd`'s environment.
pub fn clean(cmd: &mut Command) -> &mut Command {
    for v in LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd
}

/// Arguments of a short run of the tiny model in which 1, 2 and 3 ranks divide the
/// accumulation (6 micro-steps of batch 2 per iteration), 6 iterations, evaluation every 3,
/// dropout on, every loss logged; then `extra`.
pub fn short_run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
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

/// Runs `nanogpt train <args>` as one process without any launcher variable.
pub fn train_alone(cwd: &Path, args: &[String]) -> Output {
    clean(&mut nanogpt(cwd))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

/// `nanogpt train <args>` as rank `rank` of `world` with torchrun's variables, stdin closed
/// and output captured.
pub fn rank_cmd(cwd: &Path, rank: usize, world: usize, port: u16, args: &[String]) -> Command {
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

/// Runs `world` ranks, rank `r` with the arguments `per_rank(r)`, to completion; returns
/// their outputs in rank order.
pub fn run_ranks(cwd: &Path, world: usize, per_rank: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let port = nanogpt::dist::test_port();
    let children: Vec<Child> = (0..world)
        .map(|r| rank_cmd(cwd, r, world, port, &per_rank(r)).spawn().unwrap())
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// Runs `world` ranks with the same arguments to completion (each must succeed); returns
/// rank 0's stderr.
pub fn run_ranks_ok(cwd: &Path, world: usize, args: &[String]) -> String {
    let outs = run_ranks(cwd, world, |_| args.to_vec());
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} of {world} failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&outs[0].stderr).into_owned()
}

/// (kind, iter, value) of `out_dir`'s metrics.jsonl: every training loss ("loss") and, for
/// every evaluation, "train_loss" then "val_loss".
pub fn metrics(out_dir: &Path) -> Vec<(String, u64, f64)> {
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

/// [`metrics`] with each value as the bits of the logged f32, for exact comparison.
pub fn loss_bits(out_dir: &Path) -> Vec<(String, u64, u32)> {
    metrics(out_dir)
        .into_iter()
        .map(|(k, it, v)| (k, it, (v as f32).to_bits()))
        .collect()
}

/// The latest checkpoints of `a` and `b` hold the same iteration, parameters, AdamW step
/// and moments, bit for bit; returns them for further checks.
pub fn assert_same_checkpoint(a: &Path, b: &Path, what: &str) -> (Checkpoint, Checkpoint) {
    let load = |d: &Path| checkpoint::load(&d.join("ckpt.safetensors"), true).unwrap();
    let (x, y) = (load(a), load(b));
    assert_eq!(x.state.iter_num, y.state.iter_num, "{what}");
    assert!(x.params == y.params, "{what}: parameters differ");
    let (ox, oy) = (x.optimizer.as_ref().unwrap(), y.optimizer.as_ref().unwrap());
    assert_eq!(ox.step, oy.step, "{what}");
    assert!(ox.m == oy.m, "{what}: first moments differ");
    assert!(ox.v == oy.v, "{what}: second moments differ");
    (x, y)
}

/// How ranks 0 and 2 of [`fault_in_rank_1`] ended.
pub struct AfterFault {
    /// (rank, exit status, time from the fault to the exit) of ranks 0 and 2.
    pub exits: Vec<(usize, ExitStatus, Duration)>,
    /// Every rank's stderr.
    pub stderr: Vec<String>,
}

/// Training flags that keep a run going until a fault stops it, with a 3 s timeout of the
/// collectives.
pub const UNTIL_A_FAULT: [&str; 3] = [
    "--max_iters=1000000",
    "--eval_interval=1000000",
    "--dist_timeout=3",
];

/// In a temporary directory with prepared data, starts 3 long-running ranks with the
/// arguments `args(data dir, out dir)`, waits until rank 0 has logged iteration 3, applies
/// `fault` to rank 1 and waits for ranks 0 and 2 to exit (at most `limit` + 10 s).
pub fn fault_in_rank_1(
    args: impl FnOnce(&Path, &Path) -> Vec<String>,
    fault: impl Fn(&mut Child),
    limit: Duration,
) -> AfterFault {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    let data = prepare_data(&cwd.join("data"));
    let args = args(&data, &cwd.join("out"));
    let port = nanogpt::dist::test_port();
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
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        children.iter_mut().for_each(|c| {
            let _ = c.kill();
        });
        panic!("rank 0 never reached iteration 3");
    }
    fault(&mut children[1]);
    let t0 = Instant::now();
    let mut exits = Vec::new();
    for r in [0usize, 2] {
        loop {
            if let Some(st) = children[r].try_wait().unwrap() {
                exits.push((r, st, t0.elapsed()));
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
    let stderr = readers.into_iter().map(|h| h.join().unwrap()).collect();
    AfterFault { exits, stderr }
}

/// Ranks 0 and 2 exited non-zero within `limit`, without a panic, with a message naming
/// rank 1 and containing `needle`.
pub fn assert_stopped_naming_rank_1(after: &AfterFault, needle: &str, limit: Duration) {
    for &(r, st, took) in &after.exits {
        let text = &after.stderr[r];
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

/// Rank `rank` of a `world`-rank TCP ring on loopback `port`.
pub fn tcp_rank(rank: usize, world: usize, port: u16, timeout: Duration) -> TcpProcessGroup {
    let info = LaunchInfo {
        rank,
        world_size: world,
        local_world_size: world,
        local_rank: rank,
        master_port: port,
        ..LaunchInfo::single()
    };
    let opts = DistOptions {
        timeout,
        fingerprint: vec![],
    };
    let rd = rendezvous::rendezvous(&info, &opts).unwrap();
    TcpProcessGroup::connect(rd, opts.timeout).unwrap()
}

/// Runs `f(rank, group)` on `world` threads joined by a TCP ring on a fresh loopback port;
/// returns the results in rank order.
pub fn on_ring<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, TcpProcessGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = nanogpt::dist::test_port();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(r, tcp_rank(r, world, port, timeout)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
