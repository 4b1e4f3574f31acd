//! `nanogpt launch`: starts this node's ranks as child processes with torchrun's variables
//! (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT)
//! and forwards their output line by line with a `[rankN]: ` prefix.
//!
//! When one rank fails, the others normally stop on their own within moments (see the
//! failure model in [`super`]); any still running after a grace period are killed.
//! Ctrl-C (SIGINT) or SIGTERM to the launcher is passed on to every rank, and ranks that
//! have not stopped after the grace period are killed. Checkpoints are written to a
//! temporary file and renamed, so an interrupted rank never leaves a half-written one.

use super::DistError;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Subcommands of this binary that `launch` runs directly (`-- train ...`).
const SUBCOMMANDS: [&str; 5] = ["train", "sample", "bench", "prepare", "quickstart"];
/// How long ranks may take to stop after another rank failed or a signal arrived.
const GRACE: Duration = Duration::from_secs(10);

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// `train ...` (a subcommand of this binary), `nanogpt train ...`, or any program.
    pub command: Vec<String>,
}

/// Signal that arrived (0 = none), set by the handler.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn send_signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on a child's pid; the child is not yet reaped, so the pid is ours.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Validates `spec` and returns the program and arguments each rank runs.
fn program(spec: &LaunchSpec) -> Result<(std::path::PathBuf, Vec<String>), DistError> {
    let bad = |m: String| Err(DistError::Env(m));
    if spec.nproc_per_node == 0 {
        return bad("--nproc_per_node must be at least 1".into());
    }
    if spec.nnodes == 0 {
        return bad("--nnodes must be at least 1".into());
    }
    if spec.node_rank >= spec.nnodes {
        return bad(format!(
            "--node_rank={} must be below --nnodes={} (nodes are numbered from 0)",
            spec.node_rank, spec.nnodes
        ));
    }
    if spec.nnodes > 1 && spec.master_addr.is_none() {
        return bad(
            "--nnodes > 1 needs --master_addr=<host name of the node with --node_rank=0>".into(),
        );
    }
    let Some(first) = spec.command.first() else {
        return bad("nothing to launch: give the command after `--`, e.g. \
                    `nanogpt launch --nproc_per_node=2 -- train config.toml`"
            .into());
    };
    let exe = std::env::current_exe()
        .map_err(|e| DistError::Env(format!("cannot find this program's path: {e}")))?;
    let is_self = std::path::Path::new(first)
        .file_name()
        .is_some_and(|n| n == "nanogpt");
    Ok(if SUBCOMMANDS.contains(&first.as_str()) {
        (exe, spec.command.clone())
    } else if is_self {
        (exe, spec.command[1..].to_vec())
    } else {
        (first.into(), spec.command[1..].to_vec())
    })
}

/// Copies `from` to our stdout or stderr, one line at a time with `prefix`.
fn forward(
    from: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let mut out = Vec::with_capacity(prefix.len() + line.len());
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&line);
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(&out)
                    } else {
                        std::io::stdout().lock().write_all(&out)
                    };
                }
            }
        }
    })
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Runs the ranks of this node and waits for them. Returns the exit code for the
/// launcher: 0 when every rank succeeded, else the first failing rank's code (1 when it
/// was killed by a signal, 130 after Ctrl-C).
pub fn run(spec: &LaunchSpec) -> Result<i32, DistError> {
    let (exe, args) = program(spec)?;
    let world = spec.nproc_per_node * spec.nnodes;
    let master_addr = spec
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let master_port = match spec.master_port {
        Some(p) => p,
        // One node: a free port, so that several local jobs never collide.
        None if spec.nnodes == 1 => std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(super::env::DEFAULT_PORT),
        None => super::env::DEFAULT_PORT,
    };
    eprintln!(
        "launch: {} rank(s) on this node (node {} of {}), world size {world}, master {master_addr}:{master_port}",
        spec.nproc_per_node, spec.node_rank, spec.nnodes
    );
    install_signal_handlers();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut forwarders = Vec::new();
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let spawned = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("GROUP_RANK", spec.node_rank.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for (_, c) in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(DistError::Env(format!(
                    "cannot start rank {rank} ({}): {e}",
                    exe.display()
                )));
            }
        };
        let prefix = format!("[rank{rank}]: ");
        if let Some(out) = child.stdout.take() {
            forwarders.push(forward(out, prefix.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(forward(err, prefix, true));
        }
        children.push((rank, child));
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut stop_deadline: Option<Instant> = None;
    let mut interrupted = false;
    loop {
        for (k, (rank, child)) in children.iter_mut().enumerate() {
            if statuses[k].is_none() {
                if let Ok(Some(st)) = child.try_wait() {
                    statuses[k] = Some(st);
                    if !st.success() && first_failure.is_none() && !interrupted {
                        eprintln!(
                            "launch: rank {rank} failed ({}); stopping the other ranks",
                            describe(&st)
                        );
                        first_failure = Some((*rank, st));
                        stop_deadline = Some(Instant::now() + GRACE);
                    }
                }
            }
        }
        if statuses.iter().all(|s| s.is_some()) {
            break;
        }
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 && !interrupted {
            interrupted = true;
            eprintln!("launch: interrupted; stopping every rank");
            for (k, (_, child)) in children.iter().enumerate() {
                if statuses[k].is_none() {
                    send_signal(child, sig);
                }
            }
            stop_deadline = Some(Instant::now() + GRACE);
        }
        if stop_deadline.is_some_and(|d| Instant::now() >= d) {
            for (k, (rank, child)) in children.iter_mut().enumerate() {
                if statuses[k].is_none() {
                    eprintln!(
                        "launch: rank {rank} did not stop within {} s; killing it",
                        GRACE.as_secs()
                    );
                    let _ = child.kill();
                }
            }
            stop_deadline = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in forwarders {
        let _ = f.join();
    }
    if interrupted {
        return Ok(130);
    }
    Ok(match first_failure {
        None => 0,
        Some((_, st)) => st.code().filter(|c| *c != 0).unwrap_or(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize, nodes: usize, node: usize, addr: Option<&str>, cmd: &[&str]) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node: n,
            nnodes: nodes,
            node_rank: node,
            master_addr: addr.map(String::from),
            master_port: None,
            command: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn command_forms_and_argument_errors() {
        let (exe, args) = program(&spec(2, 1, 0, None, &["train", "a.toml"])).unwrap();
        assert_eq!(exe, std::env::current_exe().unwrap());
        assert_eq!(args, ["train", "a.toml"]);
        let (_, args) = program(&spec(2, 1, 0, None, &["/usr/bin/nanogpt", "train"])).unwrap();
        assert_eq!(args, ["train"]);
        let (exe, args) = program(&spec(2, 1, 0, None, &["python3", "x.py"])).unwrap();
        assert_eq!(
            (exe.to_str().unwrap(), args),
            ("python3", vec!["x.py".to_string()])
        );
        for (s, needle) in [
            (spec(0, 1, 0, None, &["train"]), "--nproc_per_node"),
            (spec(2, 2, 2, Some("h"), &["train"]), "--node_rank=2"),
            (spec(2, 2, 0, None, &["train"]), "--master_addr"),
            (spec(2, 1, 0, None, &[]), "nothing to launch"),
        ] {
            let err = program(&s).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn runs_ranks_with_torchrun_variables_and_reports_the_first_failure() {
        let ok = spec(
            3,
            1,
            0,
            None,
            &[
                "sh",
                "-c",
                "test $WORLD_SIZE = 3 && test $LOCAL_RANK = $RANK",
            ],
        );
        assert_eq!(run(&ok).unwrap(), 0);
        let fail = spec(
            2,
            1,
            0,
            None,
            &["sh", "-c", "if [ $RANK = 1 ]; then exit 7; fi; sleep 0.2"],
        );
        assert_eq!(run(&fail).unwrap(), 7);
    }
}
