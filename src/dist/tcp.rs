//! The CPU process group: a ring over TCP (gloo's role). Each rank holds one connection to
//! the next rank and one from the previous rank. All-reduce is reduce-scatter followed by
//! all-gather, each `world_size - 1` steps in which every rank sends one chunk downstream
//! while receiving another from upstream, so each rank sends `2 (W-1)/W` of the buffer in
//! total whatever the world size. Received data is added in pieces as it arrives. The
//! chunks are [`super::shard_ranges`], so the two phases alone are ZeRO-1's reduce-scatter
//! and all-gather, summing exactly as the all-reduce does.
//!
//! Every socket has read and write timeouts; a peer that closes its socket or stays silent
//! for `dist_timeout` turns into an error naming it. A background thread per rendezvous
//! connection stops the process at once when another rank exits without saying it
//! finished (see [`super`]'s failure model).

use super::failure::{self, Evidence};
use super::rendezvous::{connect_retry, read_frame, write_frame, Rendezvous};
use super::{DistError, ProcessGroup};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Floats received (and reduced) per read.
const PIECE: usize = 1 << 18;
/// Byte a rank sends on its rendezvous connection when it finishes cleanly.
const BYE: u8 = 0xB7;
/// Byte that starts an abort notice (followed by a length-prefixed message): a rank that
/// hit a communication error tells rank 0, and rank 0 tells everyone its verdict, so that
/// every rank names the rank that failed rather than the neighbour that stopped because of
/// it (see [`failure`]).
const ABORT: u8 = 0xAB;
/// Byte every rank sends to rank 0, and rank 0 to every rank, several times per timeout.
const HEARTBEAT: u8 = 0x48;

/// Rendezvous connections shared by the collectives (to send abort notices) and the
/// watcher threads (to relay them).
type Store = Arc<Mutex<Vec<(usize, TcpStream)>>>;

/// Sends an abort notice carrying `msg` on every store connection.
fn send_abort(store: &Store, msg: &str) {
    let Ok(mut conns) = store.lock() else { return };
    for (_, s) in conns.iter_mut() {
        if s.write_all(&[ABORT]).is_ok() {
            let _ = write_frame(s, msg.as_bytes());
        }
    }
}

/// Rank 0, after the grace period that follows the first failure: tells every rank the
/// verdict (the most direct evidence gathered, see [`failure`]) and stops this process.
fn conclude(store: &Store, timeout: Duration) -> ! {
    std::thread::sleep(failure::grace(timeout));
    let msg = failure::verdict().unwrap_or_else(|| "a rank failed".into());
    send_abort(store, &msg);
    eprintln!("error: {msg}; stopping rank 0");
    super::exit_now(1);
}

/// Set once this process finished its job cleanly: peers closing their connections after
/// that is expected.
static FINISHED: AtomicBool = AtomicBool::new(false);

pub struct TcpProcessGroup {
    rank: usize,
    world: usize,
    next: TcpStream,
    /// A second handle on `next`, used to shut it down when a receive fails (which unblocks
    /// a send in progress at once).
    next_ctl: TcpStream,
    prev: TcpStream,
    /// Ring address of every rank (for messages).
    addrs: Vec<String>,
    timeout: Duration,
    store: Store,
    /// `host:port` of rank 0's rendezvous store.
    master: String,
    scratch: Vec<f32>,
    /// Set by [`TcpProcessGroup::watch_peers`]: failures go to rank 0's arbitration.
    watching: bool,
}

impl TcpProcessGroup {
    /// Builds the ring from a completed rendezvous: connect to the next rank, accept the
    /// previous one, then start watching the rendezvous connections.
    pub fn connect(rdzv: Rendezvous, timeout: Duration) -> Result<TcpProcessGroup, DistError> {
        let (rank, world) = (rdzv.rank, rdzv.world_size);
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let ring_err = |peer: usize, what: String| DistError::Rendezvous {
            addr: rdzv.master.clone(),
            reason: format!(
                "rank {rank} could not build the ring with rank {peer} ({}): {what}",
                rdzv.ring[peer]
            ),
        };
        let (host, port) = split_host_port(&rdzv.ring[next_rank])
            .ok_or_else(|| ring_err(next_rank, "bad address".into()))?;
        let mut next = connect_retry(&host, port, deadline).map_err(|e| ring_err(next_rank, e))?;
        next.write_all(&(rank as u64).to_le_bytes())
            .map_err(|e| ring_err(next_rank, e.to_string()))?;
        rdzv.ring_listener
            .set_nonblocking(true)
            .map_err(|e| ring_err(prev_rank, e.to_string()))?;
        let mut prev = loop {
            match rdzv.ring_listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ring_err(
                            prev_rank,
                            format!("it did not connect within {} s", timeout.as_secs()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ring_err(prev_rank, e.to_string())),
            }
        };
        prev.set_nonblocking(false)
            .map_err(|e| ring_err(prev_rank, e.to_string()))?;
        prev.set_read_timeout(Some(timeout))
            .map_err(|e| ring_err(prev_rank, e.to_string()))?;
        let mut who = [0u8; 8];
        prev.read_exact(&mut who)
            .map_err(|e| ring_err(prev_rank, e.to_string()))?;
        if u64::from_le_bytes(who) != prev_rank as u64 {
            return Err(ring_err(
                prev_rank,
                format!(
                    "rank {} connected instead; another job may be using the same ports",
                    u64::from_le_bytes(who)
                ),
            ));
        }
        // The ring's own timeout is a backstop for a rank whose process is alive but whose
        // training thread hangs; a frozen process is caught sooner by the heartbeats.
        let ring_timeout = 2 * timeout;
        for s in [&next, &prev] {
            s.set_nodelay(true)
                .and_then(|_| s.set_read_timeout(Some(ring_timeout)))
                .and_then(|_| s.set_write_timeout(Some(ring_timeout)))
                .map_err(|e| ring_err(next_rank, e.to_string()))?;
        }
        let next_ctl = next
            .try_clone()
            .map_err(|e| ring_err(next_rank, e.to_string()))?;
        let pg = TcpProcessGroup {
            rank,
            world,
            next,
            next_ctl,
            prev,
            addrs: rdzv.ring.clone(),
            timeout,
            store: Arc::new(Mutex::new(rdzv.store)),
            master: rdzv.master.clone(),
            scratch: vec![0f32; PIECE],
            watching: false,
        };
        Ok(pg)
    }

    /// Starts the heartbeat thread and one watcher thread per rendezvous connection. A
    /// connection closed without the "finished" byte means that rank is gone; heartbeats
    /// that stop mean it hangs. Rank 0 weighs such evidence (`dist::failure`) and stops every
    /// rank with a message naming the one that failed; the other ranks stop when rank 0
    /// tells them to, or at once when rank 0 itself is gone. For processes that run one
    /// job; [`super::init`] calls it.
    pub fn watch_peers(&mut self) {
        self.watching = true;
        let master = self.master.as_str();
        let timeout = self.timeout;
        // Heartbeats: a process that is stopped or frozen as a whole stops sending them,
        // which names it exactly (a ring timeout would name whichever neighbour waits).
        let beat = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let hb_store = Arc::clone(&self.store);
        std::thread::spawn(move || {
            while !FINISHED.load(Ordering::SeqCst) {
                if let Ok(mut conns) = hb_store.lock() {
                    for (_, s) in conns.iter_mut() {
                        let _ = s.write_all(&[HEARTBEAT]);
                    }
                }
                std::thread::sleep(beat);
            }
        });
        let Ok(conns) = self.store.lock() else { return };
        for (peer, s) in conns.iter() {
            let Ok(mut s) = s.try_clone() else { continue };
            let _ = s.set_read_timeout(Some(timeout));
            let (me, peer) = (self.rank, *peer);
            let addr = if peer == 0 {
                master.to_string()
            } else {
                s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
            };
            let store = Arc::clone(&self.store);
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                let (evidence, msg) = loop {
                    match s.read(&mut b) {
                        Ok(1) if b[0] == HEARTBEAT => continue,
                        Ok(1) if b[0] == BYE => return,
                        Ok(1) if b[0] == ABORT => {
                            let msg = read_frame(&mut s)
                                .map(|m| String::from_utf8_lossy(&m).into_owned())
                                .unwrap_or_else(|_| format!("rank {peer} ({addr}) failed"));
                            break (Evidence::Report, msg);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            let stalled = DistError::Stalled {
                                peer,
                                addr: addr.clone(),
                                secs: timeout.as_secs(),
                            };
                            break (Evidence::Stalled, stalled.to_string());
                        }
                        _ => {
                            let msg = format!(
                                "rank {peer} ({addr}) exited or lost its connection before the \
                                 run finished (see its output for the cause)"
                            );
                            break (Evidence::Gone, msg);
                        }
                    }
                };
                if FINISHED.load(Ordering::SeqCst) {
                    return;
                }
                if me != 0 {
                    // Rank 0's verdict, or rank 0 itself failing: either way, stop now.
                    eprintln!("error: {msg}; stopping rank {me}");
                    super::exit_now(1);
                }
                if failure::record(evidence, msg) {
                    conclude(&store, timeout);
                }
            });
        }
    }

    /// The error for a failed transfer with `peer`. Outside a watched job it is returned
    /// as is. In a watched job it goes to rank 0 as evidence, and this rank waits for rank
    /// 0's verdict, which stops the process naming the rank that failed first; the error is
    /// returned only if no verdict comes.
    fn err(&self, peer: usize, e: std::io::Error) -> DistError {
        let err = self.classify(peer, e);
        if !self.watching {
            return err;
        }
        let grace = failure::grace(self.timeout);
        if self.rank == 0 {
            if failure::record(Evidence::RingError, err.to_string()) {
                conclude(&self.store, self.timeout);
            }
        } else {
            send_abort(&self.store, &format!("rank {} reports: {err}", self.rank));
        }
        std::thread::sleep(2 * grace + Duration::from_secs(1));
        err
    }

    fn classify(&self, peer: usize, e: std::io::Error) -> DistError {
        let addr = self.addrs[peer].clone();
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => DistError::Stalled {
                peer,
                addr,
                secs: 2 * self.timeout.as_secs(),
            },
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected => DistError::PeerGone { peer, addr },
            _ => DistError::Io {
                peer,
                addr,
                source: e,
            },
        }
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// The ring's chunk `c`: the chunk a rank owns after the reduce-scatter is the one after
    /// its own index, so chunk `c` is rank `c - 1`'s range.
    fn chunk(&self, ranges: &[Range<usize>], c: usize) -> Range<usize> {
        ranges[(c + self.world - 1) % self.world].clone()
    }

    /// The ring's reduce-scatter: `world - 1` steps after which rank r holds the full sum of
    /// `buf[ranges[r]]`. Each element's sum is formed along the ring in an order fixed by
    /// its chunk alone, so [`ProcessGroup::all_reduce_sum`] (this, then [`Self::gather_phase`],
    /// over [`super::shard_ranges`]) and ZeRO-1's reduce-scatter over the same ranges give
    /// bit-identical sums.
    fn scatter_phase(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        let (w, r) = (self.world, self.rank);
        // After step s, chunk (r - s - 1) holds s + 2 ranks' sum here.
        for s in 0..w - 1 {
            let send = self.chunk(ranges, (r + w - s) % w);
            let recv = self.chunk(ranges, (r + 2 * w - s - 1) % w);
            self.exchange(buf, send, recv, true)?;
        }
        Ok(())
    }

    /// The ring's all-gather: rank r starts with its own range (chunk r + 1) final and
    /// passes the ranges around until every rank holds all of them.
    fn gather_phase(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        let (w, r) = (self.world, self.rank);
        for s in 0..w - 1 {
            let send = self.chunk(ranges, (r + 1 + w - s) % w);
            let recv = self.chunk(ranges, (r + w - s) % w);
            self.exchange(buf, send, recv, false)?;
        }
        Ok(())
    }

    /// Sends `buf[send]` downstream while receiving `recv.len()` floats from upstream into
    /// `buf[recv]`, added (`add`) or copied.
    fn exchange(
        &mut self,
        buf: &mut [f32],
        send: Range<usize>,
        recv: Range<usize>,
        add: bool,
    ) -> Result<(), DistError> {
        let (out, inp) = disjoint(buf, send, recv);
        let (next, next_ctl, prev, scratch) = (
            &mut self.next,
            &self.next_ctl,
            &mut self.prev,
            &mut self.scratch,
        );
        let (sent, received) = std::thread::scope(|sc| {
            let sender = sc.spawn(move || next.write_all(bytemuck::cast_slice(out)));
            let mut received = Ok(());
            let mut off = 0;
            while off < inp.len() {
                let m = PIECE.min(inp.len() - off);
                let piece = &mut scratch[..m];
                if let Err(e) = prev.read_exact(bytemuck::cast_slice_mut(piece)) {
                    // Unblock the sender now rather than after its timeout.
                    let _ = next_ctl.shutdown(Shutdown::Both);
                    received = Err(e);
                    break;
                }
                let dst = &mut inp[off..off + m];
                if add {
                    dst.iter_mut().zip(piece.iter()).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(piece);
                }
                off += m;
            }
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            (sent, received)
        });
        if let Err(e) = received {
            return Err(self.err(self.prev_rank(), e));
        }
        if let Err(e) = sent {
            return Err(self.err(self.next_rank(), e));
        }
        Ok(())
    }
}

/// `(&buf[a], &mut buf[b])` for disjoint ranges.
fn disjoint(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&[f32], &mut [f32]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "ring chunks {a:?} and {b:?} must not overlap"
    );
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (h, p) = addr.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?))
}

impl ProcessGroup for TcpProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        if self.world == 1 {
            return Ok(());
        }
        let ranges = super::shard_ranges(buf.len(), self.world);
        self.scatter_phase(buf, &ranges)?;
        self.gather_phase(buf, &ranges)
    }

    fn all_reduce_sum_chunks(
        &mut self,
        buf: &mut [f32],
        chunks: &[Range<usize>],
    ) -> Result<(), DistError> {
        super::check_ranges(chunks, buf.len(), self.world)?;
        if self.world == 1 {
            return Ok(());
        }
        self.scatter_phase(buf, chunks)?;
        self.gather_phase(buf, chunks)
    }

    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        ranges: &[Range<usize>],
    ) -> Result<(), DistError> {
        super::check_ranges(ranges, buf.len(), self.world)?;
        if self.world == 1 {
            return Ok(());
        }
        self.scatter_phase(buf, ranges)
    }

    fn all_gather(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        super::check_ranges(ranges, buf.len(), self.world)?;
        if self.world == 1 {
            return Ok(());
        }
        self.gather_phase(buf, ranges)
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), DistError> {
        if root >= self.world {
            return Err(DistError::Other(format!(
                "broadcast from rank {root} in a world of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        let (next, prev) = (self.next_rank(), self.prev_rank());
        if self.rank == root {
            return self.next.write_all(buf).map_err(|e| self.err(next, e));
        }
        const BYTES: usize = 4 * PIECE;
        for piece in buf.chunks_mut(BYTES) {
            if let Err(e) = self.prev.read_exact(piece) {
                let _ = self.next_ctl.shutdown(Shutdown::Both);
                return Err(self.err(prev, e));
            }
            if next != root {
                self.next.write_all(piece).map_err(|e| self.err(next, e))?;
            }
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        // One float per rank: every rank's result depends on every rank having arrived.
        let mut v = vec![1f32; self.world];
        self.all_reduce_sum(&mut v)?;
        if v.iter().any(|&x| x != self.world as f32) {
            return Err(DistError::Other(format!(
                "barrier: the ranks disagree on the world size ({v:?}); all ranks must run the same program"
            )));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DistError> {
        self.barrier()?;
        FINISHED.store(true, Ordering::SeqCst);
        if let Ok(mut conns) = self.store.lock() {
            for (_, s) in conns.iter_mut() {
                let _ = s.write_all(&[BYE]);
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("tcp ring, {} ranks", self.world)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{rendezvous, DistOptions, LaunchInfo};
    use super::*;

    /// Runs `f` on `world` ranks (threads) joined by a real loopback ring.
    fn with_ring<T: Send + 'static>(
        world: usize,
        f: impl Fn(&mut TcpProcessGroup) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let port = crate::dist::test_port();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let info = LaunchInfo {
                        rank: r,
                        world_size: world,
                        local_world_size: world,
                        local_rank: r,
                        master_port: port,
                        ..LaunchInfo::single()
                    };
                    let opts = DistOptions {
                        timeout: Duration::from_secs(10),
                        fingerprint: vec![],
                    };
                    let rd = rendezvous::rendezvous(&info, &opts).unwrap();
                    let mut pg = TcpProcessGroup::connect(rd, opts.timeout).unwrap();
                    f(&mut pg)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_broadcast_and_barrier_on_2_3_and_4_ranks() {
        for world in [2usize, 3, 4] {
            // Lengths around the chunk boundaries, shorter than the world, and over a piece.
            for n in [0usize, 1, 2, 5, 7, 1000, PIECE + 3] {
                let out = with_ring(world, move |pg| {
                    let r = pg.rank();
                    let mut v: Vec<f32> = (0..n).map(|i| (i * 10 + r) as f32).collect();
                    pg.all_reduce_sum(&mut v).unwrap();
                    let mut avg: Vec<f32> = (0..n).map(|i| (i + r) as f32).collect();
                    pg.all_reduce_avg(&mut avg).unwrap();
                    let mut b: Vec<u8> = (0..n).map(|i| if r == 1 { i as u8 } else { 0 }).collect();
                    pg.broadcast(&mut b, 1).unwrap();
                    pg.barrier().unwrap();
                    (v, avg, b)
                });
                let rsum: usize = (0..world).sum();
                for (v, avg, b) in out {
                    for i in 0..n {
                        assert_eq!(v[i], (i * 10 * world + rsum) as f32, "w{world} n{n} i{i}");
                        let want = i as f32 + rsum as f32 / world as f32;
                        assert!((avg[i] - want).abs() < 1e-4, "avg w{world} n{n}");
                        assert_eq!(b[i], i as u8);
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_all_gather_over_3_ranks_match_the_all_reduce_bit_for_bit() {
        // Lengths shorter than world * SHARD_ALIGN (empty shards), uneven, and over a piece.
        for n in [0usize, 1, 5, 17, 47, 48, 49, 1001, PIECE + 37] {
            let out = with_ring(3, move |pg| {
                let r = pg.rank();
                // Values whose sums round differently in different orders.
                let vals: Vec<f32> = (0..n)
                    .map(|i| {
                        ((i * 7919 + r * 104_729) % 1000) as f32 * 0.001_37 + 1e-3 / (r + 1) as f32
                    })
                    .collect();
                let ranges = crate::dist::shard_ranges(n, 3);
                let mut all = vals.clone();
                pg.all_reduce_sum(&mut all).unwrap();
                let mut rs = vals.clone();
                pg.reduce_scatter_sum(&mut rs, &ranges).unwrap();
                let mine = rs[ranges[r].clone()].to_vec();
                // All-gather of values only each owner knows.
                let mut g = vec![-1f32; n];
                g[ranges[r].clone()]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| {
                        *x = (ranges[r].start + i) as f32 * 2.0 + 0.5;
                    });
                pg.all_gather(&mut g, &ranges).unwrap();
                let bad = pg.all_gather(&mut g, &ranges[..2]).unwrap_err().to_string();
                (vals, all, mine, g, ranges[r].clone(), bad)
            });
            let mut total = vec![0f32; n];
            for (vals, ..) in &out {
                total.iter_mut().zip(vals).for_each(|(t, v)| *t += v);
            }
            for (r, (_, all, mine, g, range, bad)) in out.iter().enumerate() {
                for i in 0..n {
                    assert!(
                        (all[i] - total[i]).abs() <= 1e-5 * total[i].abs(),
                        "n{n} i{i}"
                    );
                    assert_eq!(g[i], i as f32 * 2.0 + 0.5, "gather n{n} rank {r} i{i}");
                }
                let want: Vec<u32> = all[range.clone()].iter().map(|x| x.to_bits()).collect();
                let got: Vec<u32> = mine.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "reduce-scatter vs all-reduce, n{n} rank {r}");
                assert!(bad.contains("2 ranges given"), "{bad}");
            }
        }
    }

    #[test]
    fn a_silent_peer_is_an_error_naming_it_within_the_timeout() {
        let port = crate::dist::test_port();
        let mk = move |r: usize| {
            std::thread::spawn(move || {
                let info = LaunchInfo {
                    rank: r,
                    world_size: 2,
                    local_world_size: 2,
                    local_rank: r,
                    master_port: port,
                    ..LaunchInfo::single()
                };
                let opts = DistOptions {
                    timeout: Duration::from_secs(1),
                    fingerprint: vec![],
                };
                let rd = rendezvous::rendezvous(&info, &opts).unwrap();
                TcpProcessGroup::connect(rd, opts.timeout).unwrap()
            })
        };
        let (a, b) = (mk(0), mk(1));
        let mut a = a.join().unwrap();
        let b = b.join().unwrap(); // rank 1 never calls the collective
        let t0 = Instant::now();
        let err = a.all_reduce_sum(&mut [1.0; 64]).unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        assert!(
            err.contains("rank 1") && err.contains("stopped responding"),
            "{err}"
        );
        drop(b);
    }
}
