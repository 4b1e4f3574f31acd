//! The launch environment: which rank this process is, how many there are, and where
//! rank 0 listens. Read from the variables that torchrun (and `nanogpt launch`), Slurm's
//! `srun`, and OpenMPI / MPICH `mpirun` set, in that order of precedence.

use super::{hostlist, DistError};
use std::fmt;

/// Port rank 0 listens on when the launcher names none (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// Who launched the processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    None,
    Torchrun,
    Slurm,
    Mpi,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::None => "single process",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "slurm",
            Launcher::Mpi => "mpi",
        })
    }
}

/// Which launcher to trust: `auto` detects in the order torchrun, Slurm, MPI; the others
/// force one (the `dist_env` key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvChoice {
    Auto,
    Torchrun,
    Slurm,
    Mpi,
    None,
}

impl std::str::FromStr for EnvChoice {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self, DistError> {
        Ok(match s {
            "auto" | "" => EnvChoice::Auto,
            "torchrun" => EnvChoice::Torchrun,
            "slurm" => EnvChoice::Slurm,
            "mpi" => EnvChoice::Mpi,
            "none" => EnvChoice::None,
            other => {
                return Err(DistError::Env(format!(
                    "dist_env = {other:?}: expected auto, torchrun, slurm, mpi or none"
                )))
            }
        })
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub launcher: Launcher,
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    /// Ranks on this node (used to share the CPU cores between them).
    pub local_world_size: usize,
    pub node_rank: usize,
    pub num_nodes: usize,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchInfo {
    /// One process, no peers.
    pub fn single() -> LaunchInfo {
        LaunchInfo {
            launcher: Launcher::None,
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            node_rank: 0,
            num_nodes: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
        }
    }

    pub fn is_master(&self) -> bool {
        self.rank == 0
    }
}

/// Reads the real process environment.
pub fn detect(choice: EnvChoice) -> Result<LaunchInfo, DistError> {
    detect_from(choice, &|k| std::env::var(k).ok())
}

/// Detection over any variable lookup (tables in tests).
pub fn detect_from(
    choice: EnvChoice,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<LaunchInfo, DistError> {
    let has = |k: &str| var(k).is_some_and(|v| !v.trim().is_empty());
    let launcher = match choice {
        EnvChoice::None => return Ok(LaunchInfo::single()),
        EnvChoice::Torchrun => Launcher::Torchrun,
        EnvChoice::Slurm => Launcher::Slurm,
        EnvChoice::Mpi => Launcher::Mpi,
        EnvChoice::Auto => {
            if has("RANK") && has("WORLD_SIZE") {
                Launcher::Torchrun
            } else if has("SLURM_PROCID") && has("SLURM_NTASKS") {
                Launcher::Slurm
            } else if has("OMPI_COMM_WORLD_RANK") || has("PMI_RANK") {
                Launcher::Mpi
            } else {
                return Ok(LaunchInfo::single());
            }
        }
    };
    let info = match launcher {
        Launcher::Torchrun => torchrun(var)?,
        Launcher::Slurm => slurm(var)?,
        Launcher::Mpi => mpi(var)?,
        Launcher::None => LaunchInfo::single(),
    };
    check(&info, launcher)?;
    Ok(info)
}

fn get_usize(var: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<usize>, DistError> {
    match var(key) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            DistError::Env(format!(
                "environment variable {key}={v:?} is not a non-negative integer"
            ))
        }),
    }
}

fn require(var: &dyn Fn(&str) -> Option<String>, key: &str, who: &str) -> Result<usize, DistError> {
    get_usize(var, key)?.ok_or_else(|| {
        DistError::Env(format!(
            "{who} launch: environment variable {key} is not set; start the ranks with {who} \
             or set dist_env to the launcher you use"
        ))
    })
}

fn port(var: &dyn Fn(&str) -> Option<String>, default: u16) -> Result<u16, DistError> {
    match var("MASTER_PORT") {
        None => Ok(default),
        Some(v) if v.trim().is_empty() => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                DistError::Env(format!("MASTER_PORT={v:?} is not a TCP port (1-65535)"))
            }),
    }
}

/// `MASTER_ADDR`, then `MAIN_NODE` (a name some cluster recipes export).
fn master_override(var: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    ["MASTER_ADDR", "MAIN_NODE"]
        .iter()
        .filter_map(|k| var(k))
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

fn torchrun(var: &dyn Fn(&str) -> Option<String>) -> Result<LaunchInfo, DistError> {
    let who = "torchrun";
    let rank = require(var, "RANK", who)?;
    let world_size = require(var, "WORLD_SIZE", who)?;
    let local_rank = get_usize(var, "LOCAL_RANK")?.unwrap_or(rank);
    let local_world_size = get_usize(var, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
    let node_rank = get_usize(var, "GROUP_RANK")?.unwrap_or(rank / local_world_size.max(1));
    let num_nodes = world_size.div_ceil(local_world_size.max(1));
    let master_addr = master_override(var).unwrap_or_else(|| "127.0.0.1".to_string());
    Ok(LaunchInfo {
        launcher: Launcher::Torchrun,
        rank,
        local_rank,
        world_size,
        local_world_size,
        node_rank,
        num_nodes,
        master_addr,
        master_port: port(var, DEFAULT_PORT)?,
    })
}

/// Slurm: one task per rank (`srun --ntasks-per-node=GPUS`). Rank 0 runs on the first host
/// of the step's node list (`SLURM_STEP_NODELIST`, else `SLURM_JOB_NODELIST`); the port
/// defaults to 29500 + job id % 1000 so that jobs sharing a node do not collide.
fn slurm(var: &dyn Fn(&str) -> Option<String>) -> Result<LaunchInfo, DistError> {
    let who = "slurm";
    let rank = require(var, "SLURM_PROCID", who)?;
    let world_size = require(var, "SLURM_NTASKS", who)?;
    let local_rank = get_usize(var, "SLURM_LOCALID")?.unwrap_or(0);
    let node_rank = get_usize(var, "SLURM_NODEID")?.unwrap_or(0);
    let num_nodes = match get_usize(var, "SLURM_JOB_NUM_NODES")? {
        Some(n) => n,
        None => get_usize(var, "SLURM_NNODES")?.unwrap_or(1),
    };
    // SLURM_TASKS_PER_NODE looks like "4(x2)" or "4,3": the first count is this layout's
    // typical ranks per node.
    let local_world_size = [
        "SLURM_NTASKS_PER_NODE",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
    ]
    .iter()
    .filter_map(|k| var(k))
    .find_map(|v| {
        let digits: String = v
            .trim()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse::<usize>().ok().filter(|n| *n > 0)
    })
    .unwrap_or_else(|| world_size.div_ceil(num_nodes.max(1)));
    let master_addr = match master_override(var) {
        Some(a) => a,
        None => {
            let key = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .into_iter()
            .find(|k| has_value(var, k));
            match key {
                Some(k) => hostlist::first_host(&var(k).unwrap_or_default())?,
                None if num_nodes <= 1 => "127.0.0.1".to_string(),
                None => {
                    return Err(DistError::Env(
                        "slurm launch on several nodes, but SLURM_JOB_NODELIST is not set and \
                         neither is MASTER_ADDR; export MASTER_ADDR=<first node's host name>"
                            .into(),
                    ))
                }
            }
        }
    };
    let default_port = match get_usize(var, "SLURM_JOB_ID")? {
        Some(id) => DEFAULT_PORT + (id % 1000) as u16,
        None => DEFAULT_PORT,
    };
    Ok(LaunchInfo {
        launcher: Launcher::Slurm,
        rank,
        local_rank,
        world_size,
        local_world_size,
        node_rank,
        num_nodes,
        master_addr,
        master_port: port(var, default_port)?,
    })
}

fn has_value(var: &dyn Fn(&str) -> Option<String>, k: &str) -> bool {
    var(k).is_some_and(|v| !v.trim().is_empty())
}

/// OpenMPI (`OMPI_COMM_WORLD_*`) or MPICH / Intel MPI (`PMI_RANK`, `PMI_SIZE`,
/// `MPI_LOCALRANKID`). mpirun exports no node list: MASTER_ADDR must name rank 0's host
/// unless every rank runs on this node.
fn mpi(var: &dyn Fn(&str) -> Option<String>) -> Result<LaunchInfo, DistError> {
    let (rank, world_size, local_rank, local_world_size) = if has_value(var, "OMPI_COMM_WORLD_RANK")
    {
        let who = "mpirun (OpenMPI)";
        let rank = require(var, "OMPI_COMM_WORLD_RANK", who)?;
        let world = require(var, "OMPI_COMM_WORLD_SIZE", who)?;
        let local = get_usize(var, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
        let local_size = get_usize(var, "OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(world);
        (rank, world, local, local_size)
    } else {
        let who = "mpirun (PMI)";
        let rank = require(var, "PMI_RANK", who)?;
        let world = require(var, "PMI_SIZE", who)?;
        let local = match get_usize(var, "MPI_LOCALRANKID")? {
            Some(l) => l,
            None => get_usize(var, "PMI_LOCAL_RANK")?.unwrap_or(rank),
        };
        let local_size = match get_usize(var, "MPI_LOCALNRANKS")? {
            Some(l) => l,
            None => get_usize(var, "PMI_LOCAL_SIZE")?.unwrap_or(world),
        };
        (rank, world, local, local_size)
    };
    let master_addr = match master_override(var) {
        Some(a) => a,
        None if local_world_size >= world_size => "127.0.0.1".to_string(),
        None => {
            return Err(DistError::Env(format!(
                "mpirun launch over several nodes ({world_size} ranks, {local_world_size} on this node): \
                 set MASTER_ADDR to rank 0's host name (e.g. `mpirun -x MASTER_ADDR=node1 ...`)"
            )))
        }
    };
    let num_nodes = world_size.div_ceil(local_world_size.max(1));
    Ok(LaunchInfo {
        launcher: Launcher::Mpi,
        rank,
        local_rank,
        world_size,
        local_world_size,
        node_rank: rank / local_world_size.max(1),
        num_nodes,
        master_addr,
        master_port: port(var, DEFAULT_PORT)?,
    })
}

fn check(info: &LaunchInfo, launcher: Launcher) -> Result<(), DistError> {
    if info.world_size == 0 {
        return Err(DistError::Env(format!(
            "{launcher} launch: the world size is 0; it must be at least 1"
        )));
    }
    if info.rank >= info.world_size {
        return Err(DistError::Env(format!(
            "{launcher} launch: rank {} is not below the world size {}; every rank must be \
             started with the same world size",
            info.rank, info.world_size
        )));
    }
    Ok(())
}

/// This machine's host name (for the start-up line of each rank).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect_vars(choice: EnvChoice, vars: &[(&str, &str)]) -> Result<LaunchInfo, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        detect_from(choice, &|k| map.get(k).cloned())
    }

    /// (variables, launcher, rank, local rank, world, local world, node, nodes, addr, port)
    #[allow(clippy::type_complexity)]
    const TABLE: &[(
        &[(&str, &str)],
        Launcher,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        &str,
        u16,
    )] = &[
        (&[], Launcher::None, 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500),
        (
            &[
                ("RANK", "5"),
                ("LOCAL_RANK", "1"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_WORLD_SIZE", "4"),
                ("MASTER_ADDR", "node-a"),
                ("MASTER_PORT", "1234"),
            ],
            Launcher::Torchrun,
            5,
            1,
            8,
            4,
            1,
            2,
            "node-a",
            1234,
        ),
        // torchrun wins over Slurm variables (torchrun started inside an allocation).
        (
            &[
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
            ],
            Launcher::Torchrun,
            1,
            1,
            2,
            2,
            0,
            1,
            "127.0.0.1",
            29500,
        ),
        (
            &[
                ("SLURM_PROCID", "6"),
                ("SLURM_LOCALID", "2"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_NODEID", "1"),
                ("SLURM_JOB_NUM_NODES", "2"),
                ("SLURM_TASKS_PER_NODE", "4(x2)"),
                ("SLURM_JOB_NODELIST", "gpu[001-002]"),
                ("SLURM_JOB_ID", "123456"),
            ],
            Launcher::Slurm,
            6,
            2,
            8,
            4,
            1,
            2,
            "gpu001",
            29956,
        ),
        // MAIN_NODE and MASTER_PORT override; the step's node list wins over the job's.
        (
            &[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_JOB_NUM_NODES", "2"),
                ("SLURM_JOB_NODELIST", "gpu[001-004,007],cpu12"),
                ("MAIN_NODE", "login1"),
                ("MASTER_PORT", "4000"),
            ],
            Launcher::Slurm,
            0,
            0,
            2,
            1,
            0,
            2,
            "login1",
            4000,
        ),
        (
            &[
                ("SLURM_PROCID", "3"),
                ("SLURM_NTASKS", "4"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_NODEID", "1"),
                ("SLURM_JOB_NUM_NODES", "2"),
                ("SLURM_JOB_NODELIST", "gpu[001-004,007],cpu12"),
                ("SLURM_STEP_NODELIST", "gpu[003-004]"),
            ],
            Launcher::Slurm,
            3,
            1,
            4,
            2,
            1,
            2,
            "gpu003",
            29500,
        ),
        (
            &[
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ],
            Launcher::Mpi,
            3,
            3,
            4,
            4,
            0,
            1,
            "127.0.0.1",
            29500,
        ),
        (
            &[
                ("PMI_RANK", "2"),
                ("PMI_SIZE", "4"),
                ("MPI_LOCALRANKID", "0"),
                ("MPI_LOCALNRANKS", "2"),
                ("MASTER_ADDR", "10.0.0.1"),
            ],
            Launcher::Mpi,
            2,
            0,
            4,
            2,
            1,
            2,
            "10.0.0.1",
            29500,
        ),
    ];

    #[test]
    fn detection_table() {
        for (vars, launcher, rank, local, world, local_world, node, nodes, addr, port) in TABLE {
            let got =
                detect_vars(EnvChoice::Auto, vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            let want = LaunchInfo {
                launcher: *launcher,
                rank: *rank,
                local_rank: *local,
                world_size: *world,
                local_world_size: *local_world,
                node_rank: *node,
                num_nodes: *nodes,
                master_addr: addr.to_string(),
                master_port: *port,
            };
            assert_eq!(got, want, "{vars:?}");
        }
    }

    #[test]
    fn forced_choice_and_errors() {
        // dist_env=none ignores every launcher variable.
        let vars = [("RANK", "1"), ("WORLD_SIZE", "2")];
        assert_eq!(
            detect_vars(EnvChoice::None, &vars).unwrap(),
            LaunchInfo::single()
        );
        // Forcing slurm reads Slurm's variables even when torchrun's are present.
        let vars = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "3"),
        ];
        let info = detect_vars(EnvChoice::Slurm, &vars).unwrap();
        assert_eq!(
            (info.launcher, info.rank, info.world_size),
            (Launcher::Slurm, 0, 3)
        );

        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(EnvChoice, Vars, &[&str])] = &[
            (
                EnvChoice::Auto,
                &[("RANK", "2"), ("WORLD_SIZE", "2")],
                &["rank 2", "world size 2"],
            ),
            (
                EnvChoice::Auto,
                &[("RANK", "x"), ("WORLD_SIZE", "2")],
                &["RANK=\"x\""],
            ),
            (
                EnvChoice::Auto,
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                &["MASTER_PORT"],
            ),
            (EnvChoice::Torchrun, &[], &["RANK is not set"]),
            (
                EnvChoice::Auto,
                &[
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "gpu[1-"),
                ],
                &["gpu[1-"],
            ),
            (
                EnvChoice::Auto,
                &[
                    ("OMPI_COMM_WORLD_RANK", "0"),
                    ("OMPI_COMM_WORLD_SIZE", "8"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
                ],
                &["MASTER_ADDR"],
            ),
        ];
        for (choice, vars, needles) in cases {
            let err = detect_vars(*choice, vars)
                .expect_err(&format!("{vars:?}"))
                .to_string();
            for n in *needles {
                assert!(err.contains(n), "{vars:?}: {err}");
            }
        }
        assert!("bogus".parse::<EnvChoice>().is_err());
        assert_eq!("slurm".parse::<EnvChoice>().unwrap(), EnvChoice::Slurm);
    }
}
