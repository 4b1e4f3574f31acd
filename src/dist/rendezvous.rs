//! The rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT` (a small TCP store), every
//! other rank connects (retrying while rank 0 starts) and says who it is, how large it
//! thinks the world is, where its ring port is, and a fingerprint of its effective config
//! and model shape. Rank 0 checks them all, then sends everyone the table of ring
//! addresses. Mismatches are errors on every rank that name the keys that differ; ranks
//! that never arrive are named when the timeout expires.
//!
//! Wire format: each message is a little-endian u32 length followed by that many bytes of
//! JSON. The connections stay open for the whole run: they carry the "finished" notice and
//! let every rank notice at once when another one exits.

use super::{DistError, DistOptions, LaunchInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &str = "nanogpt-rendezvous-1";
/// Largest message accepted (a hello with its config fingerprint is a few kB).
const MAX_FRAME: usize = 16 << 20;
/// Pause between connection attempts while rank 0 is not listening yet.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Serialize, Deserialize)]
struct Hello {
    magic: String,
    rank: usize,
    world_size: usize,
    host: String,
    ring_port: u16,
    fingerprint_hash: String,
    fingerprint: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    ok: bool,
    error: String,
    /// Ring address (`ip:port`) of every rank.
    ring: Vec<String>,
    /// Host name of every rank.
    hosts: Vec<String>,
}

/// What a completed rendezvous hands to the process group.
#[derive(Debug)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Ring address of every rank.
    pub ring: Vec<String>,
    /// Host name of every rank.
    pub hosts: Vec<String>,
    /// This rank's ring listener (the previous rank connects to it).
    pub ring_listener: TcpListener,
    /// Open rendezvous connections: on rank 0 one per other rank, elsewhere one to rank 0.
    pub store: Vec<(usize, TcpStream)>,
    /// `host:port` of rank 0's store.
    pub master: String,
}

/// SHA-256 of the fingerprint's `key=value` lines.
pub fn fingerprint_hash(fp: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in fp {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("message too large"))?;
    let mut msg = Vec::with_capacity(4 + bytes.len());
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(bytes);
    s.write_all(&msg)?;
    s.flush()
}

pub(crate) fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("message of {len} bytes is larger than the {MAX_FRAME} allowed"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Meets every other rank at `info.master_addr:info.master_port` within `opts.timeout`.
pub fn rendezvous(info: &LaunchInfo, opts: &DistOptions) -> Result<Rendezvous, DistError> {
    let master = format!("{}:{}", info.master_addr, info.master_port);
    let err = |reason: String| DistError::Rendezvous {
        addr: master.clone(),
        reason,
    };
    let ring_listener = TcpListener::bind(("0.0.0.0", 0))
        .map_err(|e| err(format!("cannot open a listening socket for the ring: {e}")))?;
    let ring_port = ring_listener
        .local_addr()
        .map_err(|e| err(format!("cannot read the ring socket's address: {e}")))?
        .port();
    let hello = Hello {
        magic: MAGIC.into(),
        rank: info.rank,
        world_size: info.world_size,
        host: super::env::hostname(),
        ring_port,
        fingerprint_hash: fingerprint_hash(&opts.fingerprint),
        fingerprint: opts.fingerprint.clone(),
    };
    let deadline = Instant::now() + opts.timeout;
    let (ring, hosts, store) = if info.rank == 0 {
        serve(info, &hello, deadline, opts.timeout, &err)?
    } else {
        join(info, &hello, deadline, opts.timeout, &err)?
    };
    Ok(Rendezvous {
        rank: info.rank,
        world_size: info.world_size,
        ring,
        hosts,
        ring_listener,
        store,
        master,
    })
}

type Joined = (Vec<String>, Vec<String>, Vec<(usize, TcpStream)>);

/// Rank 0: accept `world_size - 1` ranks, check them, send the ring table.
fn serve(
    info: &LaunchInfo,
    me: &Hello,
    deadline: Instant,
    timeout: Duration,
    err: &dyn Fn(String) -> DistError,
) -> Result<Joined, DistError> {
    let w = info.world_size;
    let listener = TcpListener::bind(("0.0.0.0", info.master_port)).map_err(|e| {
        err(format!(
            "rank 0 cannot listen on port {}: {e}; another job (or a leftover rank) may be using it: \
             set MASTER_PORT to a free port on every rank",
            info.master_port
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(format!("cannot configure the listening socket: {e}")))?;
    let mut peers: BTreeMap<usize, (TcpStream, SocketAddr, Hello)> = BTreeMap::new();
    let fail = |peers: &mut BTreeMap<usize, (TcpStream, SocketAddr, Hello)>,
                extra: Option<&mut TcpStream>,
                reason: String|
     -> DistError {
        let reply = Reply {
            ok: false,
            error: reason.clone(),
            ring: vec![],
            hosts: vec![],
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        for (s, _, _) in peers.values_mut() {
            let _ = write_frame(s, &bytes);
        }
        if let Some(s) = extra {
            let _ = write_frame(s, &bytes);
        }
        err(reason)
    };
    while peers.len() < w - 1 {
        let (mut stream, addr) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..w)
                        .filter(|r| !peers.contains_key(r))
                        .map(|r| r.to_string())
                        .collect();
                    return Err(fail(
                        &mut peers,
                        None,
                        format!(
                            "timed out after {} s waiting for rank(s) {} of a world of {w}; check that \
                             every rank was started (with WORLD_SIZE={w}) and can reach this host and \
                             port (if nanogpt ran inside an sbatch script without srun, start it with \
                             srun; raise dist_timeout if ranks start slowly)",
                            timeout.as_secs(),
                            missing.join(", ")
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(fail(&mut peers, None, format!("accept failed: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_write_timeout(Some(timeout));
        let hello: Hello = match read_frame(&mut stream)
            .ok()
            .and_then(|b| serde_json::from_slice::<Hello>(&b).ok())
            .filter(|h| h.magic == MAGIC)
        {
            Some(h) => h,
            None => {
                eprintln!(
                    "note: ignored a connection from {addr} to the rendezvous port that is not a nanogpt rank"
                );
                continue;
            }
        };
        let r = hello.rank;
        let problem = if hello.world_size != w {
            Some(format!(
                "rank {r} on {} was started with a world size of {}, but rank 0 has {w}; start every \
                 rank with the same WORLD_SIZE (or the same srun --ntasks)",
                hello.host, hello.world_size
            ))
        } else if r == 0 || r >= w {
            Some(format!(
                "a process on {} says it is rank {r}, which is not in 1..{w}; check RANK / SLURM_PROCID",
                hello.host
            ))
        } else if peers.contains_key(&r) {
            Some(format!(
                "two processes say they are rank {r} (on {} and {}); each rank must be started once",
                peers[&r].2.host, hello.host
            ))
        } else if hello.fingerprint_hash != me.fingerprint_hash {
            Some(format!(
                "rank {r} on {} has a different config or model shape than rank 0 (fingerprint {} vs {}): {}; \
                 start every rank with the same config files and overrides",
                hello.host,
                hello.fingerprint_hash,
                me.fingerprint_hash,
                describe_diff(&me.fingerprint, &hello.fingerprint, r)
            ))
        } else {
            None
        };
        if let Some(reason) = problem {
            return Err(fail(&mut peers, Some(&mut stream), reason));
        }
        peers.insert(r, (stream, addr, hello));
    }
    let mut ring = vec![format!("{}:{}", info.master_addr, me.ring_port)];
    let mut hosts = vec![me.host.clone()];
    for (_, addr, h) in peers.values() {
        ring.push(SocketAddr::new(addr.ip(), h.ring_port).to_string());
        hosts.push(h.host.clone());
    }
    let reply = Reply {
        ok: true,
        error: String::new(),
        ring: ring.clone(),
        hosts: hosts.clone(),
    };
    let bytes = serde_json::to_vec(&reply).unwrap_or_default();
    let mut store = Vec::new();
    for (r, (mut s, addr, _)) in peers {
        write_frame(&mut s, &bytes).map_err(|e| {
            err(format!(
                "cannot send the ring table to rank {r} ({addr}): {e}"
            ))
        })?;
        store.push((r, s));
    }
    Ok((ring, hosts, store))
}

/// Keys whose values differ between rank 0's fingerprint and rank `r`'s.
fn describe_diff(a: &[(String, String)], b: &[(String, String)], r: usize) -> String {
    let am: BTreeMap<&str, &str> = a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let bm: BTreeMap<&str, &str> = b.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut keys: Vec<&str> = am.keys().chain(bm.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| am.get(k) != bm.get(k))
        .map(|k| {
            format!(
                "{k} = {} on rank 0 but {} on rank {r}",
                am.get(k).copied().unwrap_or("(unset)"),
                bm.get(k).copied().unwrap_or("(unset)")
            )
        })
        .collect();
    if diffs.is_empty() {
        "the fingerprints differ".into()
    } else if diffs.len() > 6 {
        format!("{} and {} more", diffs[..6].join(", "), diffs.len() - 6)
    } else {
        diffs.join(", ")
    }
}

/// Ranks 1..: connect to rank 0 (retrying until the deadline), say hello, read the table.
fn join(
    info: &LaunchInfo,
    me: &Hello,
    deadline: Instant,
    timeout: Duration,
    err: &dyn Fn(String) -> DistError,
) -> Result<Joined, DistError> {
    let mut stream = connect_retry(&info.master_addr, info.master_port, deadline).map_err(|e| {
        err(format!(
            "rank {} could not reach rank 0 within {} s: {e}; check that rank 0 runs and that \
             MASTER_ADDR/MASTER_PORT name its host and a port open between the nodes",
            info.rank,
            timeout.as_secs()
        ))
    })?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(timeout));
    // Rank 0 answers once every rank has arrived, which may take up to its own timeout.
    let _ = stream.set_read_timeout(Some(timeout + Duration::from_secs(5)));
    let bytes = serde_json::to_vec(me).map_err(|e| err(format!("cannot encode hello: {e}")))?;
    write_frame(&mut stream, &bytes)
        .map_err(|e| err(format!("cannot send this rank's hello to rank 0: {e}")))?;
    let reply = match read_frame(&mut stream) {
        Ok(b) => serde_json::from_slice::<Reply>(&b)
            .map_err(|e| err(format!("unreadable answer from rank 0: {e}")))?,
        Err(e) if is_timeout(&e) => {
            return Err(err(format!(
                "rank 0 did not complete the rendezvous within {} s; some ranks probably never \
                 started (rank 0's output names them)",
                timeout.as_secs()
            )))
        }
        Err(e) => {
            return Err(err(format!(
                "rank 0 closed the rendezvous ({e}); its output says why"
            )))
        }
    };
    if !reply.ok {
        return Err(err(format!("rank 0 refused the job: {}", reply.error)));
    }
    if reply.ring.len() != info.world_size || reply.hosts.len() != info.world_size {
        return Err(err(format!(
            "rank 0 sent a table of {} ranks for a world of {}",
            reply.ring.len(),
            info.world_size
        )));
    }
    Ok((reply.ring, reply.hosts, vec![(0, stream)]))
}

/// Connects to `host:port`, retrying refused or unresolvable addresses until `deadline`.
pub(crate) fn connect_retry(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no attempt made");
    loop {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let t = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
                    match TcpStream::connect_timeout(&a, t) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = format!("connecting to {a}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve {host}: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(fp: &[(&str, &str)], secs: u64) -> DistOptions {
        DistOptions {
            timeout: Duration::from_secs(secs),
            fingerprint: fp
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn info(rank: usize, world: usize, port: u16) -> LaunchInfo {
        LaunchInfo {
            rank,
            world_size: world,
            local_world_size: world,
            local_rank: rank,
            master_port: port,
            ..LaunchInfo::single()
        }
    }

    fn free_port() -> u16 {
        crate::dist::test_port()
    }

    #[test]
    fn three_ranks_meet_and_get_the_ring_table() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    rendezvous(&info(r, 3, port), &opts(&[("batch_size", "4")], 10))
                })
            })
            .collect();
        let results: Vec<Rendezvous> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        for (r, rd) in results.iter().enumerate() {
            assert_eq!((rd.rank, rd.world_size, rd.ring.len()), (r, 3, 3));
            assert_eq!(rd.ring, results[0].ring);
            assert_eq!(rd.store.len(), if r == 0 { 2 } else { 1 });
        }
    }

    #[test]
    fn mismatched_world_size_and_config_are_named_on_both_sides() {
        let port = free_port();
        let a = std::thread::spawn(move || rendezvous(&info(0, 2, port), &opts(&[], 10)));
        let b = rendezvous(&info(1, 3, port), &opts(&[], 10))
            .unwrap_err()
            .to_string();
        let a = a.join().unwrap().unwrap_err().to_string();
        for msg in [&a, &b] {
            assert!(
                msg.contains("world size of 3") && msg.contains("rank 0 has 2"),
                "{msg}"
            );
        }

        let port = free_port();
        let fp0 = [("batch_size", "4"), ("n_layer", "2")];
        let fp1 = [("batch_size", "8"), ("n_layer", "2")];
        let a = std::thread::spawn(move || rendezvous(&info(0, 2, port), &opts(&fp0, 10)));
        let b = rendezvous(&info(1, 2, port), &opts(&fp1, 10))
            .unwrap_err()
            .to_string();
        let a = a.join().unwrap().unwrap_err().to_string();
        for msg in [&a, &b] {
            assert!(
                msg.contains("batch_size = 4 on rank 0 but 8 on rank 1"),
                "{msg}"
            );
            assert!(!msg.contains("n_layer"), "{msg}");
        }
    }

    #[test]
    fn missing_ranks_time_out_with_their_numbers() {
        let port = free_port();
        let t0 = Instant::now();
        let a = std::thread::spawn(move || rendezvous(&info(0, 3, port), &opts(&[], 1)));
        let b = std::thread::spawn(move || rendezvous(&info(1, 3, port), &opts(&[], 1)));
        let a = a.join().unwrap().unwrap_err().to_string();
        let b = b.join().unwrap().unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(a.contains("rank(s) 2 of a world of 3"), "{a}");
        assert!(
            b.contains("rank(s) 2") || b.contains("did not complete"),
            "{b}"
        );
        // Nobody listening: a bounded wait and a message naming the address.
        let port = free_port();
        let err = rendezvous(&info(1, 2, port), &opts(&[], 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{port}")) && err.contains("could not reach rank 0"),
            "{err}"
        );
    }
}
