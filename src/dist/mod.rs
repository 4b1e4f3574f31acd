//! Distributed data-parallel training: the launch environment ([`mod@env`], [`hostlist`]), the
//! rendezvous of all ranks at rank 0 ([`rendezvous`]), the [`ProcessGroup`] collectives
//! the trainer uses (a TCP ring on CPUs: [`tcp`]; NCCL for the gradients on GPUs: [`nccl`];
//! one process: [`SingleProcess`]), and the local launcher behind `nanogpt launch`
//! ([`launch`]).
//!
//! Failure model: every socket has read and write timeouts (`dist_timeout`), and each rank
//! keeps its rendezvous connection to rank 0 open for the whole run. A rank that exits or
//! crashes closes its connections, and a rank that stalls stops sending heartbeats; rank 0
//! weighs what every rank saw (`failure.rs`) and stops all ranks with a message naming the
//! rank that failed first, within a second of the evidence. The ring's own timeouts are a
//! backstop. No rank ever waits forever.

pub mod env;
mod failure;
pub mod hostlist;
pub mod launch;
pub mod nccl;
pub mod overlap;
pub mod rendezvous;
pub mod tcp;

pub use env::{EnvChoice, LaunchInfo, Launcher};

use std::ops::Range;
use std::time::Duration;

/// Shard boundaries are multiples of this many elements (64 bytes of f32), so that every
/// shard but the last starts on an aligned address.
pub const SHARD_ALIGN: usize = 16;

/// Rank `rank`'s share of a buffer of `len` elements split over `world` ranks (ZeRO-1's
/// optimizer-state shards, and the chunks of the TCP ring's all-reduce): contiguous, in
/// rank order, boundaries at multiples of [`SHARD_ALIGN`], sizes within `SHARD_ALIGN` of
/// each other (a shard may be empty when `len < world * SHARD_ALIGN`). Every element lies
/// in exactly one shard.
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let world = world.max(1);
    let blocks = len.div_ceil(SHARD_ALIGN);
    let bound = |r: usize| {
        if r >= world {
            len
        } else {
            (SHARD_ALIGN * (r * blocks / world)).min(len)
        }
    };
    bound(rank)..bound(rank + 1)
}

/// [`shard_range`] of every rank, in rank order.
pub fn shard_ranges(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world.max(1))
        .map(|r| shard_range(len, world, r))
        .collect()
}

/// Checks that `ranges` splits a buffer of `len` elements into one contiguous piece per
/// rank of `world`, in rank order (what the sharded collectives expect).
pub fn check_ranges(ranges: &[Range<usize>], len: usize, world: usize) -> Result<(), DistError> {
    let bad = |why: String| {
        DistError::Other(format!(
            "sharded collective over {len} values and {world} ranks: {why}; every rank must \
             pass the same split (dist::shard_ranges)"
        ))
    };
    if ranges.len() != world {
        return Err(bad(format!("{} ranges given", ranges.len())));
    }
    let mut at = 0;
    for (r, range) in ranges.iter().enumerate() {
        if range.start != at || range.end < range.start {
            return Err(bad(format!(
                "rank {r}'s range {range:?} does not start at {at}"
            )));
        }
        at = range.end;
    }
    if at != len {
        return Err(bad(format!("the ranges end at {at}")));
    }
    Ok(())
}

/// The ring chunks of `bucket`, a range of a buffer of `total` values reduced over
/// `world` ranks: the whole buffer's [`shard_ranges`] cut to the bucket and made relative
/// to its start (rank `r`'s piece is the part of rank `r`'s shard inside the bucket, empty
/// when they do not meet). Every element keeps its owner, so a bucket reduced with these
/// chunks sums each element exactly as the whole buffer's reduction does.
pub fn bucket_chunks(total: usize, world: usize, bucket: &Range<usize>) -> Vec<Range<usize>> {
    shard_ranges(total, world)
        .into_iter()
        .map(|r| {
            let lo = r.start.clamp(bucket.start, bucket.end) - bucket.start;
            let hi = r.end.clamp(bucket.start, bucket.end) - bucket.start;
            lo..hi
        })
        .collect()
}

/// `x` as three f32 values whose f64 sum is `x` (inf, NaN and values beyond f32's range
/// travel in the first).
fn f64_pieces(x: f64) -> [f32; 3] {
    let hi = x as f32;
    if !hi.is_finite() {
        return [hi, 0.0, 0.0];
    }
    let r1 = x - hi as f64;
    let mid = r1 as f32;
    [hi, mid, (r1 - mid as f64) as f32]
}

/// The sum over all ranks of one f64 per rank, identical on every rank and exact up to
/// f64 rounding: each rank's value travels as three f32 pieces (hi + mid + lo carry all
/// of its 53 bits) in its own slots of an all-reduce, so that the sum adds only zeros to
/// them, and every rank then adds the ranks' values in rank order.
pub fn all_reduce_sum_f64(pg: &mut dyn ProcessGroup, x: f64) -> Result<f64, DistError> {
    let (rank, world) = (pg.rank(), pg.world_size());
    if world == 1 {
        return Ok(x);
    }
    let mut slots = vec![0f32; 3 * world];
    slots[3 * rank..3 * rank + 3].copy_from_slice(&f64_pieces(x));
    pg.all_reduce_sum(&mut slots)?;
    Ok(slots
        .chunks(3)
        .map(|p| p[0] as f64 + p[1] as f64 + p[2] as f64)
        .sum())
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{0}")]
    Env(String),
    #[error("hostlist {list:?} (from SLURM_JOB_NODELIST): {reason}")]
    Hostlist { list: String, reason: String },
    #[error("rendezvous at {addr}: {reason}")]
    Rendezvous { addr: String, reason: String },
    #[error(
        "rank {peer} ({addr}) stopped responding: nothing heard from it for {secs} s; it may \
         have hung, been stopped, or its host is unreachable (the limit follows dist_timeout)"
    )]
    Stalled {
        peer: usize,
        addr: String,
        secs: u64,
    },
    #[error(
        "rank {peer} ({addr}) closed its connection: it exited or crashed (see its output for \
         the cause)"
    )]
    PeerGone { peer: usize, addr: String },
    #[error("network error talking to rank {peer} ({addr}): {source}")]
    Io {
        peer: usize,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Collective operations over all ranks of a job. Every rank must call the same
/// operations in the same order with buffers of the same length. An implementation must
/// never block forever: a peer that is gone or silent for longer than its timeout is an
/// error.
///
/// The CPU implementation is [`tcp::TcpProcessGroup`]; a GPU implementation (NCCL) can
/// bootstrap from it by broadcasting its unique id with [`ProcessGroup::broadcast`].
pub trait ProcessGroup: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank ends with the same result.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Reduce-scatter: afterwards `buf[ranges[rank]]` holds the element-wise sum over all
    /// ranks of that range; the rest of `buf` is unspecified. `ranges` splits `buf` into one
    /// contiguous piece per rank in rank order ([`shard_ranges`]), the same on every rank.
    /// Summing each element in the same order as [`ProcessGroup::all_reduce_sum`] does, so
    /// that sharded and unsharded training agree bit for bit (the TCP ring guarantees it).
    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        ranges: &[Range<usize>],
    ) -> Result<(), DistError> {
        check_ranges(ranges, buf.len(), self.world_size())?;
        self.all_reduce_sum(buf)
    }
    /// All-gather: every rank's `buf[ranges[r]]` is copied from rank `r`'s (see
    /// [`ProcessGroup::reduce_scatter_sum`] for `ranges`).
    fn all_gather(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        check_ranges(ranges, buf.len(), self.world_size())?;
        for (r, range) in ranges.iter().enumerate() {
            self.broadcast_f32(&mut buf[range.clone()], r)?;
        }
        Ok(())
    }
    /// [`ProcessGroup::all_reduce_sum`] whose ring chunks are `chunks` (one contiguous
    /// piece of `buf` per rank, in rank order, as for
    /// [`ProcessGroup::reduce_scatter_sum`]): reducing a bucket of a larger buffer with the
    /// larger buffer's shard ranges cut to the bucket ([`bucket_chunks`]) sums every
    /// element in the same order as reducing the whole buffer at once (the TCP ring
    /// guarantees it), which keeps overlapped and plain reductions bit-identical.
    fn all_reduce_sum_chunks(
        &mut self,
        buf: &mut [f32],
        chunks: &[Range<usize>],
    ) -> Result<(), DistError> {
        check_ranges(chunks, buf.len(), self.world_size())?;
        self.all_reduce_sum(buf)
    }
    /// Element-wise mean over all ranks.
    fn all_reduce_avg(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(buf)?;
        let inv = 1.0 / self.world_size() as f32;
        if self.world_size() > 1 {
            buf.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }
    /// Copies `root`'s bytes into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), DistError>;
    /// [`ProcessGroup::broadcast`] of a float buffer.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        self.broadcast(bytemuck::cast_slice_mut(buf), root)
    }
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), DistError>;
    /// Ends the job cleanly: a last barrier, then peers are told that this rank's exit is
    /// expected (after this, a closed connection is no longer an error).
    fn finish(&mut self) -> Result<(), DistError>;
    /// Short description for logs ("tcp ring, 4 ranks").
    fn describe(&self) -> String;
    /// Element-wise sum over all ranks of `len` f32 values in GPU memory at `ptr`, in
    /// place, ordered on CUDA stream `stream` (a `CUstream`); returns once the sum is
    /// complete. `None`: this group cannot reduce device memory, and the caller uses
    /// [`ProcessGroup::all_reduce_sum`] on a host copy instead. See [`nccl`].
    fn all_reduce_sum_device(
        &mut self,
        _ptr: u64,
        _len: usize,
        _stream: u64,
    ) -> Option<Result<(), DistError>> {
        None
    }
    /// [`ProcessGroup::reduce_scatter_sum`] of `len` f32 values in GPU memory at `ptr`, on
    /// CUDA stream `stream`; `None` when this group cannot reduce device memory.
    fn reduce_scatter_sum_device(
        &mut self,
        _ptr: u64,
        _len: usize,
        _ranges: &[Range<usize>],
        _stream: u64,
    ) -> Option<Result<(), DistError>> {
        None
    }
    /// Whether [`ProcessGroup::enqueue_bucket_device`] works (NCCL): GPU gradients can be
    /// reduced during the backward pass.
    fn overlaps_device(&self) -> bool {
        false
    }
    /// Overlapped reduction of GPU gradients, one bucket at a time: enqueues the sum over
    /// all ranks of the `len` f32 values at `ptr` on this group's own communication
    /// stream, ordered after the work enqueued so far on the compute stream `stream` (so
    /// the backward pass can go on computing other gradients meanwhile), and returns
    /// without waiting. `chunks` splits the bucket into one piece per rank
    /// ([`bucket_chunks`]); with `scatter` only the owner of each piece needs its sum
    /// (ZeRO-1's reduce-scatter), else every rank gets every sum. Call
    /// [`ProcessGroup::finish_buckets_device`] before anything reads the sums. `None`:
    /// this group cannot (the caller reduces after the backward pass instead).
    fn enqueue_bucket_device(
        &mut self,
        _ptr: u64,
        _len: usize,
        _chunks: &[Range<usize>],
        _scatter: bool,
        _stream: u64,
    ) -> Option<Result<(), DistError>> {
        None
    }
    /// Waits (at most the group's timeout, with the failure handling of the blocking
    /// device collectives) for every bucket of [`ProcessGroup::enqueue_bucket_device`] and
    /// orders the compute stream `stream` after them. `None`: nothing to wait for.
    fn finish_buckets_device(&mut self, _stream: u64) -> Option<Result<(), DistError>> {
        None
    }
    /// [`ProcessGroup::all_gather`] of `len` f32 values in GPU memory at `ptr`, on CUDA
    /// stream `stream`; `None` when this group cannot reach device memory.
    fn all_gather_device(
        &mut self,
        _ptr: u64,
        _len: usize,
        _ranges: &[Range<usize>],
        _stream: u64,
    ) -> Option<Result<(), DistError>> {
        None
    }
}

/// Ends the process at once with `code`, from any thread, after a failure of the job has
/// been reported on stderr: `_exit`, not `exit`, because another thread may be blocked
/// inside a communication library (NCCL, the CUDA runtime) holding locks that exit-time
/// handlers would wait for, which would turn a clean stop into a hang.
pub(crate) fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process without running handlers; nothing is left to clean up
    // that the operating system does not reclaim.
    unsafe { libc::_exit(code) }
}

/// The process group of a job with one process: every collective is the identity.
#[derive(Debug, Default)]
pub struct SingleProcess;

impl ProcessGroup for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        ranges: &[Range<usize>],
    ) -> Result<(), DistError> {
        check_ranges(ranges, buf.len(), 1)
    }
    fn all_gather(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        check_ranges(ranges, buf.len(), 1)
    }
    fn broadcast(&mut self, _buf: &mut [u8], root: usize) -> Result<(), DistError> {
        if root != 0 {
            return Err(DistError::Other(format!(
                "broadcast from rank {root} in a job of one rank"
            )));
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), DistError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// Settings of a process group.
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// How long a collective (or the rendezvous) may wait on a peer.
    pub timeout: Duration,
    /// What the ranks must agree on: the effective config and model shape, as key/value
    /// pairs (compared through a hash; differing keys are named in the error).
    pub fingerprint: Vec<(String, String)>,
}

/// The process group for `info`: [`SingleProcess`] for one rank, otherwise a rendezvous
/// at `info.master_addr:master_port` followed by a TCP ring.
pub fn init(info: &LaunchInfo, opts: &DistOptions) -> Result<Box<dyn ProcessGroup>, DistError> {
    if info.world_size <= 1 {
        return Ok(Box::new(SingleProcess));
    }
    let rdzv = rendezvous::rendezvous(info, opts)?;
    let mut pg = tcp::TcpProcessGroup::connect(rdzv, opts.timeout)?;
    pg.watch_peers();
    Ok(Box::new(pg))
}

/// The process group for `info` given config key `backend` and whether the engine keeps
/// its gradients on a GPU (see [`nccl::select`]): one rank: [`SingleProcess`]; `nccl` on
/// GPUs: [`nccl::NcclProcessGroup`] (the engine's context must be current on this thread);
/// otherwise the TCP ring of [`init`]. Rank 0 prints a note when `nccl` falls back to TCP.
pub fn init_for_backend(
    info: &LaunchInfo,
    opts: &DistOptions,
    backend: &str,
    engine_on_gpu: bool,
) -> Result<Box<dyn ProcessGroup>, DistError> {
    let sel = nccl::select(backend, engine_on_gpu, info.world_size)?;
    if let Some(note) = sel.note.as_ref().filter(|_| info.is_master()) {
        eprintln!("note: {note}");
    }
    // Ranks that chose different process groups (say one rank's GPU failed `device=auto`'s
    // check) would speak different protocols: the rendezvous names the difference instead.
    let mut opts = opts.clone();
    let group = match sel.backend {
        nccl::Backend::Nccl => "nccl (GPU gradients)",
        _ => "tcp ring (host gradients)",
    };
    opts.fingerprint
        .push(("gradient all-reduce".into(), group.into()));
    match sel.backend {
        nccl::Backend::Single | nccl::Backend::Tcp => init(info, &opts),
        nccl::Backend::Nccl => nccl::init(info, &opts),
    }
}

/// A port for a test's rendezvous. Ports handed out by the kernel for `bind(:0)` come from the
/// ephemeral range, where every outgoing connection of a parallel test can take them again
/// before the test binds; these come from below that range (20000-31999), distinct per call,
/// checked to be free, and claimed for the life of the process with an advisory lock on a
/// file named after the port (in the temp directory), so that test processes running side by
/// side never pick the same port between the check and the bind.
#[doc(hidden)]
pub fn test_port() -> u16 {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Mutex;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static CLAIMED: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("nanogpt-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let start = (std::process::id() % 1000) as u16 * 12;
    loop {
        let port = 20_000 + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        // The lock is released when the process exits, however it exits. Without a usable
        // temp directory the bind check alone has to do.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .ok();
        if let Some(f) = &file {
            // SAFETY: flock on a file descriptor this process owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
        }
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            CLAIMED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(file);
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_element_once_aligned_and_nearly_equal() {
        for world in 1..=9usize {
            for len in (0..200).chain([1000, 4097, 124_475_904, 124_475_905]) {
                let ranges = shard_ranges(len, world);
                check_ranges(&ranges, len, world).unwrap();
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                assert_eq!(sizes.iter().sum::<usize>(), len, "w{world} n{len}");
                for (r, range) in ranges.iter().enumerate() {
                    assert_eq!(*range, shard_range(len, world, r));
                    if range.start < len {
                        assert_eq!(range.start % SHARD_ALIGN, 0, "w{world} n{len} r{r}");
                    }
                }
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= SHARD_ALIGN, "w{world} n{len}: {sizes:?}");
            }
        }
        assert_eq!(shard_ranges(20, 3), vec![0..0, 0..16, 16..20]);
        assert_eq!(shard_ranges(100, 2), vec![0..48, 48..100]);
        assert_eq!(shard_range(10, 1, 0), 0..10);
    }

    #[test]
    fn bucket_chunks_partition_the_bucket_and_keep_every_owner() {
        for world in 1..=5usize {
            for total in [0usize, 7, 100, 1001] {
                let shards = shard_ranges(total, world);
                for (a, b) in [(0, total), (0, total / 3), (total / 3, total), (5, 9)] {
                    if a > b || b > total {
                        continue;
                    }
                    let chunks = bucket_chunks(total, world, &(a..b));
                    check_ranges(&chunks, b - a, world).unwrap();
                    for (r, c) in chunks.iter().enumerate() {
                        for i in c.clone() {
                            assert!(shards[r].contains(&(a + i)), "w{world} n{total} {a}..{b}");
                        }
                    }
                }
            }
        }
        assert_eq!(bucket_chunks(100, 2, &(40..60)), vec![0..8, 8..20]);
        assert_eq!(bucket_chunks(100, 2, &(60..100)), vec![0..0, 0..40]);
    }

    #[test]
    fn bad_ranges_are_refused_with_the_reason() {
        let e = check_ranges(&[0..4, 5..10], 10, 2).unwrap_err().to_string();
        assert!(
            e.contains("rank 1's range 5..10 does not start at 4"),
            "{e}"
        );
        assert!(check_ranges(&shard_ranges(10, 1), 10, 2).is_err());
        assert!(check_ranges(&[0..4, 4..9], 10, 2).is_err());
    }

    #[test]
    fn single_process_sharded_collectives_are_identities() {
        let mut pg = SingleProcess;
        let mut v = vec![1.5f32, 2.5, 3.5];
        pg.reduce_scatter_sum(&mut v, &shard_ranges(3, 1)).unwrap();
        pg.all_gather(&mut v, &shard_ranges(3, 1)).unwrap();
        assert_eq!(v, vec![1.5, 2.5, 3.5]);
        assert_eq!(all_reduce_sum_f64(&mut pg, 0.1).unwrap(), 0.1);
    }

    #[test]
    fn an_f64_splits_into_three_f32_pieces_exactly() {
        for x in [
            0.1f64,
            1.0 / 3.0,
            12345.678901234567,
            7.3e-12,
            2.0f64.powi(100) / 3.0,
        ] {
            let [hi, mid, lo] = f64_pieces(x);
            assert_eq!(hi as f64 + mid as f64 + lo as f64, x, "{x}");
        }
        assert_eq!(f64_pieces(f64::INFINITY), [f32::INFINITY, 0.0, 0.0]);
    }
}
