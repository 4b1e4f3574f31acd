//! The GPU process group: gradients are summed on the GPUs by NCCL, everything else goes
//! through the TCP process group of [`super::tcp`], which this group wraps.
//!
//! Setup: the usual rendezvous and TCP ring come first (launch environment, config
//! fingerprint check, heartbeats and rank 0's failure arbitration all work as with
//! `backend=gloo`); rank 0 then makes an NCCL unique id and broadcasts it over the ring, and
//! every rank creates its communicator on the GPU of its engine (`ncclCommInitRank`, with
//! the engine's primary context current). The host-side collectives of the trainer (loss
//! sums, the initial parameter broadcast, barriers, `finish`) stay on the TCP group; only
//! the gradient all-reduce, reached through [`ProcessGroup::all_reduce_sum_device`], runs
//! on NCCL, in place on the engine's stream; with `zero_stage=1` so do the gradient
//! reduce-scatter and the parameter all-gather
//! ([`ProcessGroup::reduce_scatter_sum_device`], [`ProcessGroup::all_gather_device`]):
//! grouped `ncclReduce` / `ncclBroadcast` calls, one per rank's shard, since the shards may
//! differ in size by a few elements.
//!
//! Which group a run gets ([`select`]): one rank: none at all (the single-process group;
//! the gradients never leave the GPU); `backend=nccl` with an engine whose gradients live on
//! a GPU: this group; `backend=nccl` with the CPU engine: the TCP ring, with a note;
//! `backend=gloo` (or `tcp`): the TCP ring. A missing or unloadable libnccl with
//! `backend=nccl` on GPUs is an error saying what to install and that `backend=gloo`
//! works without it.
//!
//! Failures. An NCCL call must never hang the run:
//! - A peer that exits or crashes closes its TCP connections; the TCP group's watcher
//!   threads (which run beside NCCL) let rank 0 name it and stop every rank within about
//!   a second, whatever NCCL is doing. When NCCL notices first (`ncclCommGetAsyncError`
//!   reports a remote or system error), this group aborts the communicator and waits a
//!   moment for that verdict, so that the message names the rank that failed; only if none
//!   comes does it return NCCL's error.
//! - A peer that is alive but never reaches the all-reduce (its training thread hangs)
//!   keeps sending heartbeats, so only a timeout can catch it: after enqueuing the
//!   all-reduce, this group polls the stream and the communicator's error state and, once
//!   `dist_timeout` has passed, aborts the communicator (`ncclCommAbort`, which stops its
//!   kernels) and returns an error saying so.
//! - The calls that block on the host until every rank joins (`ncclCommInitRank`, and the
//!   first all-reduce, which connects the ranks) run under a watchdog thread: if one of
//!   them has not returned after `dist_timeout`, the watchdog prints what was waited for
//!   and ends the process (a blocked C call cannot be interrupted); the other ranks then
//!   see its connection close and stop as usual.

use super::{DistError, DistOptions, LaunchInfo, ProcessGroup};
use crate::cuda::discover::{LibKind, SearchEnv, SearchPlan};
use crate::cuda::driver::{Context, CuStream, Driver, Event, Stream};
use crate::cuda::nccl::{
    self as api, Communicator, Nccl, RedOp, StreamQuery, UniqueId, CUDA_ERROR_NOT_READY,
    NCCL_IN_PROGRESS, NCCL_SUCCESS, NCCL_UNIQUE_ID_BYTES,
};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ selection

/// The kind of process group a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One rank: every collective is the identity ([`super::SingleProcess`]).
    Single,
    /// The TCP ring ([`super::tcp`]): gradients are summed on the host.
    Tcp,
    /// NCCL for the gradients, the TCP ring for the rest ([`NcclProcessGroup`]).
    Nccl,
}

/// A [`Backend`] and a note for rank 0 to print about the choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub backend: Backend,
    pub note: Option<String>,
}

/// The process group for config key `backend` (`nccl`, `gloo` or `tcp`), an engine whose
/// gradients live on a GPU (`engine_on_gpu`) or on the host, and `world` ranks.
pub fn select(backend: &str, engine_on_gpu: bool, world: usize) -> Result<Selection, DistError> {
    let plain = |backend| Selection {
        backend,
        note: None,
    };
    match backend {
        "nccl" | "gloo" | "tcp" if world <= 1 => Ok(plain(Backend::Single)),
        "gloo" | "tcp" => Ok(plain(Backend::Tcp)),
        "nccl" if engine_on_gpu => Ok(plain(Backend::Nccl)),
        "nccl" => Ok(Selection {
            backend: Backend::Tcp,
            note: Some(
                "backend=nccl needs GPUs, and this run's engine is on the CPU: the ranks sum \
                 their gradients over the TCP ring instead (gloo's role); set backend=gloo to \
                 say so explicitly"
                    .into(),
            ),
        }),
        other => Err(DistError::Env(format!(
            "backend={other:?} is not one of: nccl (GPUs), gloo or tcp (CPU processes)"
        ))),
    }
}

// ------------------------------------------------------------------ loading NCCL

/// Loads NCCL from the first place `plan` finds it, with an error that says what to do
/// when it is missing or broken.
pub fn load_nccl(plan: &SearchPlan) -> Result<Nccl, DistError> {
    let missing = |what: String| {
        DistError::Other(format!(
            "backend=nccl on GPUs needs NCCL (libnccl.so.2), which {what}. Install it: {}; \
             or set backend=gloo, which sums the gradients through the host over TCP and \
             needs no NCCL (slower). `nanogpt doctor` shows where it was looked for",
            LibKind::Nccl.advice()
        ))
    };
    let found = plan.find(LibKind::Nccl).found.ok_or_else(|| {
        missing(format!(
            "was not found in any of the {} library directories searched",
            plan.dirs.len()
        ))
    })?;
    let nccl =
        Nccl::load(&found.path).map_err(|e| missing(format!("could not be loaded ({e})")))?;
    nccl.version()
        .map_err(|e| missing(format!("does not work ({e})")))?;
    Ok(nccl)
}

/// This process's NCCL, found like `nanogpt doctor` finds it; loaded once.
pub fn nccl() -> Result<&'static Nccl, DistError> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(|| {
        load_nccl(&SearchPlan::new(&SearchEnv::from_process())).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| DistError::Other(e.clone()))
}

/// `2.27.3` for NCCL's version code 22703 (codes before 2.9 were `major*1000 + minor*100`).
pub fn version_string(code: i32) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

/// The process group of a multi-rank job whose engine computes on the GPU whose primary
/// context is current on this thread: NCCL is loaded first (so that a missing library is
/// reported before any network setup), then the TCP group is built as by [`super::init`]
/// and the communicator on top of it.
pub fn init(info: &LaunchInfo, opts: &DistOptions) -> Result<Box<dyn ProcessGroup>, DistError> {
    let nccl = nccl()?;
    let stack = crate::engine::cuda::stack::stack()
        .map_err(|e| DistError::Other(format!("backend=nccl: {e}")))?;
    let host = super::init(info, opts)?;
    let pg = NcclProcessGroup::new(host, nccl, &stack.driver, opts.timeout)?;
    Ok(Box::new(pg))
}

// ------------------------------------------------------------------ watchdog

type OnFire = Box<dyn Fn(&str) + Send>;

#[derive(Default)]
struct WatchState {
    /// Deadline and message of the call being watched.
    armed: Option<(Instant, String)>,
    stop: bool,
}

/// A thread that calls `on_fire` with a message when a watched call runs past its
/// deadline (in a run: prints it and ends the process).
pub struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
}

impl Watchdog {
    pub fn new(on_fire: OnFire) -> Watchdog {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            let (lock, cv) = &*s;
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if st.stop {
                    return;
                }
                match st.armed.clone() {
                    None => st = cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                    Some((deadline, msg)) => {
                        let now = Instant::now();
                        if now >= deadline {
                            st.armed = None;
                            on_fire(&msg);
                        } else {
                            st = cv
                                .wait_timeout(st, deadline - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    }
                }
            }
        });
        Watchdog { shared }
    }

    /// The watchdog of a run: on a missed deadline, prints the message and ends the process.
    pub fn exiting() -> Watchdog {
        Watchdog::new(Box::new(|msg: &str| {
            eprintln!("error: {msg}");
            super::exit_now(1);
        }))
    }

    /// Runs `f`, firing with `msg` if it has not returned after `limit`.
    pub fn guard<T>(&self, limit: Duration, msg: String, f: impl FnOnce() -> T) -> T {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).armed = Some((Instant::now() + limit, msg));
        cv.notify_all();
        let out = f();
        lock.lock().unwrap_or_else(|p| p.into_inner()).armed = None;
        cv.notify_all();
        out
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
    }
}

// ------------------------------------------------------------------ waiting on the GPU

/// One look at an operation in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Poll {
    Done,
    Pending,
    /// The operation failed; the message says how.
    Failed(String),
}

/// Why [`wait_until_done`] gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    TimedOut,
    Failed(String),
}

/// Polls until `poll` says done or failed, or `timeout` has passed, pausing `pause`
/// between looks (a short spin first, so fast operations are not delayed).
pub fn wait_until_done(
    timeout: Duration,
    pause: Duration,
    mut poll: impl FnMut() -> Poll,
) -> Result<(), WaitEnd> {
    let start = Instant::now();
    let mut looks = 0u32;
    loop {
        match poll() {
            Poll::Done => return Ok(()),
            Poll::Failed(msg) => return Err(WaitEnd::Failed(msg)),
            Poll::Pending => {}
        }
        if start.elapsed() >= timeout {
            return Err(WaitEnd::TimedOut);
        }
        looks += 1;
        if looks < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
        }
    }
}

// ------------------------------------------------------------------ the process group

/// NCCL for device buffers, a host process group (the TCP ring) for everything else.
/// See the module documentation.
pub struct NcclProcessGroup {
    // The communicator first: fields drop in order, and it must go while the context
    // (retained here, so it outlives the engine's own handle) is alive.
    comm: Option<Communicator<'static>>,
    /// The communication stream and ordering event of overlapped bucket reductions
    /// (created on first use; dropped before the context).
    overlap: Option<(Stream<'static>, Event<'static>)>,
    /// Floats enqueued by overlapped bucket reductions not yet waited for.
    overlap_pending: usize,
    ctx: Context<'static>,
    host: Box<dyn ProcessGroup>,
    nccl: &'static Nccl,
    driver: &'static Driver,
    query: StreamQuery,
    device: usize,
    timeout: Duration,
    watchdog: Watchdog,
    /// The first device all-reduce connects the ranks and may block on the host.
    connected: bool,
    /// Why the communicator was aborted, once it was.
    broken: Option<String>,
    version: String,
}

// SAFETY: the group owns its communicator and context handle exclusively and is used from
// one thread at a time (`&mut self`); NCCL communicators and CUDA contexts may move between
// threads, and every call that touches the GPU makes the context current first.
unsafe impl Send for NcclProcessGroup {}

impl NcclProcessGroup {
    /// Creates this rank's communicator on the GPU whose context is current on this thread
    /// (the engine's: [`crate::engine::Engine::device_grads`] makes it current). `host`
    /// carries rank 0's unique id to the others and every host-side collective. Blocks until
    /// all ranks have joined, at most `timeout` (see the module docs).
    pub fn new(
        mut host: Box<dyn ProcessGroup>,
        nccl: &'static Nccl,
        driver: &'static Driver,
        timeout: Duration,
    ) -> Result<NcclProcessGroup, DistError> {
        let (rank, world) = (host.rank(), host.world_size());
        let cuda = |what: &str, e: crate::cuda::CudaError| {
            DistError::Other(format!("rank {rank}: NCCL setup: {what}: {e}"))
        };
        let device = api::current_device(driver)
            .map_err(|e| cuda("no CUDA context is current (create the engine first)", e))?;
        let ctx = driver
            .context(device)
            .map_err(|e| cuda(&format!("cannot use cuda:{device}"), e))?;
        let query = api::stream_query_fn(driver).map_err(|e| cuda("the driver", e))?;
        let version = version_string(nccl.version().map_err(|e| cuda("ncclGetVersion", e))?);
        let mut id_bytes = [0u8; NCCL_UNIQUE_ID_BYTES];
        if rank == 0 {
            id_bytes = nccl
                .unique_id()
                .map_err(|e| cuda("ncclGetUniqueId", e))?
                .to_bytes();
        }
        host.broadcast(&mut id_bytes, 0)?;
        let id = UniqueId::from_bytes(&id_bytes);
        let watchdog = Watchdog::exiting();
        let comm = watchdog
            .guard(
                timeout,
                format!(
                    "rank {rank}: NCCL communicator setup (ncclCommInitRank, {world} ranks, \
                     cuda:{device}) did not finish within {} s (dist_timeout): another rank did \
                     not join, or the ranks cannot reach each other over NCCL's network (set \
                     NCCL_DEBUG=INFO, and NCCL_SOCKET_IFNAME to the interface the ranks share)",
                    timeout.as_secs()
                ),
                || nccl.comm_init_rank(world, &id, rank),
            )
            .map_err(|e| {
                cuda(
                    &format!("ncclCommInitRank ({world} ranks, cuda:{device})"),
                    e,
                )
            })?;
        let (n, d) = (
            comm.count().map_err(|e| cuda("ncclCommCount", e))?,
            comm.device().map_err(|e| cuda("ncclCommCuDevice", e))?,
        );
        if n != world || d != device {
            return Err(DistError::Other(format!(
                "rank {rank}: the NCCL communicator has {n} ranks on cuda:{d}, expected {world} \
                 on cuda:{device}; each rank needs its own GPU"
            )));
        }
        Ok(NcclProcessGroup {
            comm: Some(comm),
            overlap: None,
            overlap_pending: 0,
            ctx,
            host,
            nccl,
            driver,
            query,
            device,
            timeout,
            watchdog,
            connected: world == 1,
            broken: None,
            version,
        })
    }

    /// The CUDA device the communicator runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Aborts the communicator (never waits on a peer) and remembers why.
    fn abort(&mut self, why: &str) {
        if let Some(comm) = self.comm.take() {
            let _ = comm.abort();
        }
        self.broken = Some(why.to_string());
    }

    fn all_reduce_device(&mut self, ptr: u64, len: usize, stream: u64) -> Result<(), DistError> {
        self.device_op("gradient all-reduce", len, stream, |nccl, comm, stream| {
            // SAFETY: the engine hands out its own gradient buffer of `len` floats on this
            // device and its own live stream (Engine::device_grads); in place is allowed.
            unsafe { nccl.all_reduce_f32_raw(ptr, ptr, len, RedOp::Sum, comm, stream) }
        })
    }

    /// ZeRO-1's gradient reduce-scatter: one `ncclReduce` per rank's range onto that rank,
    /// in one group (NCCL's reduce-scatter needs equal counts; the ranges may differ).
    fn reduce_scatter_device(
        &mut self,
        ptr: u64,
        len: usize,
        ranges: &[Range<usize>],
        stream: u64,
    ) -> Result<(), DistError> {
        super::check_ranges(ranges, len, self.world_size())?;
        self.device_op(
            "gradient reduce-scatter",
            len,
            stream,
            |nccl, comm, stream| {
                nccl.group(|| {
                    for (root, r) in ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                        let p = ptr + 4 * r.start as u64;
                        // SAFETY: `r` lies inside the caller's buffer of `len` floats on this
                        // device (checked above); in place is allowed.
                        unsafe { nccl.reduce_sum_f32_raw(p, p, r.len(), root, comm, stream)? };
                    }
                    Ok(())
                })
            },
        )
    }

    /// ZeRO-1's parameter all-gather: one `ncclBroadcast` per rank's range from that rank,
    /// in one group.
    fn all_gather_device_inner(
        &mut self,
        ptr: u64,
        len: usize,
        ranges: &[Range<usize>],
        stream: u64,
    ) -> Result<(), DistError> {
        super::check_ranges(ranges, len, self.world_size())?;
        self.device_op("parameter all-gather", len, stream, |nccl, comm, stream| {
            nccl.group(|| {
                for (root, r) in ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                    let p = ptr + 4 * r.start as u64;
                    // SAFETY: as in `reduce_scatter_device`.
                    unsafe { nccl.broadcast_f32_raw(p, p, r.len(), root, comm, stream)? };
                }
                Ok(())
            })
        })
    }

    /// The communication stream and event of overlapped reductions, created on first use
    /// in the group's context (made current here); returns their raw handles.
    fn overlap_handles(&mut self) -> Result<(CuStream, crate::cuda::driver::CuEvent), DistError> {
        let (rank, device) = (self.rank(), self.device);
        let cuda = |e: crate::cuda::CudaError| {
            DistError::Other(format!(
                "rank {rank}: cuda:{device}: the communication stream of overlap_grad_reduce: {e}"
            ))
        };
        self.ctx.make_current().map_err(cuda)?;
        if self.overlap.is_none() {
            let stream = self.ctx.stream_non_blocking().map_err(cuda)?;
            let event = Event::untimed(self.driver).map_err(cuda)?;
            self.overlap = Some((stream, event));
        }
        let (stream, event) = self
            .overlap
            .as_ref()
            .expect("the overlap stream was created just above");
        Ok((stream.s, event.e))
    }

    /// One bucket of an overlapped reduction (see [`ProcessGroup::enqueue_bucket_device`]):
    /// the communication stream waits for the compute stream's present position, then
    /// runs the bucket's all-reduce, or with `scatter` one `ncclReduce` per rank's piece
    /// onto that rank (grouped), without waiting on the host.
    fn enqueue_bucket(
        &mut self,
        ptr: u64,
        len: usize,
        chunks: &[Range<usize>],
        scatter: bool,
        compute: u64,
    ) -> Result<(), DistError> {
        super::check_ranges(chunks, len, self.world_size())?;
        let (comm_stream, _) = self.overlap_handles()?;
        let (rank, device) = (self.rank(), self.device);
        let ordered = self.overlap.as_ref().map(|(stream, event)| {
            // SAFETY: `compute` is the engine's live compute stream in this group's context
            // (the engine's primary context; Engine::device_grads hands it out).
            unsafe { event.record_raw(compute as usize as CuStream) }
                .and_then(|_| stream.wait_event(event))
        });
        if let Some(Err(e)) = ordered {
            return Err(DistError::Other(format!(
                "rank {rank}: cuda:{device}: ordering a gradient bucket after the backward pass: {e}"
            )));
        }
        let what = if scatter {
            "gradient reduce-scatter (overlapped bucket)"
        } else {
            "gradient all-reduce (overlapped bucket)"
        };
        self.enqueue_op(what, comm_stream as u64, |nccl, comm, stream| {
            if !scatter {
                // SAFETY: the engine's gradient bucket of `len` floats on this device; in
                // place is allowed.
                return unsafe { nccl.all_reduce_f32_raw(ptr, ptr, len, RedOp::Sum, comm, stream) };
            }
            nccl.group(|| {
                for (root, r) in chunks.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                    let p = ptr + 4 * r.start as u64;
                    // SAFETY: `r` lies inside the bucket of `len` floats (checked above).
                    unsafe { nccl.reduce_sum_f32_raw(p, p, r.len(), root, comm, stream)? };
                }
                Ok(())
            })
        })?;
        self.overlap_pending += len;
        Ok(())
    }

    /// Waits for every bucket of [`Self::enqueue_bucket`] (under `dist_timeout`, as
    /// [`Self::device_op`] waits) and orders the compute stream after them.
    fn finish_buckets(&mut self, compute: u64) -> Result<(), DistError> {
        if self.overlap_pending == 0 {
            return Ok(());
        }
        let (comm_stream, _) = self.overlap_handles()?;
        let pending = std::mem::take(&mut self.overlap_pending);
        self.wait_op("overlapped gradient reduction", pending, comm_stream as u64)?;
        let (rank, device) = (self.rank(), self.device);
        // The host has seen the communication stream finish; the stream wait also orders
        // the device side explicitly (cheap, and right even if the wait above changes).
        let ordered = self.overlap.as_ref().map(|(stream, event)| {
            event.record(stream).and_then(|_| {
                // SAFETY: the engine's live compute stream of this context, and our event.
                self.driver.check(
                    unsafe {
                        (self.driver.api.cuStreamWaitEvent)(
                            compute as usize as CuStream,
                            event.e,
                            0,
                        )
                    },
                    "cuStreamWaitEvent",
                )
            })
        });
        match ordered {
            Some(Err(e)) => Err(DistError::Other(format!(
                "rank {rank}: cuda:{device}: ordering the optimizer step after the gradient \
                 reduction: {e}"
            ))),
            _ => Ok(()),
        }
    }

    /// Runs one collective on the GPU: `enqueue` puts its NCCL calls on `stream`, then this
    /// waits for completion under `dist_timeout`, aborting the communicator on a failure
    /// (see the module docs). `what` names it in messages; `len` floats are involved.
    fn device_op(
        &mut self,
        what: &str,
        len: usize,
        stream: u64,
        enqueue: impl FnOnce(&Nccl, &Communicator, CuStream) -> Result<(), crate::cuda::CudaError>,
    ) -> Result<(), DistError> {
        self.enqueue_op(what, stream, enqueue)?;
        self.wait_op(what, len, stream)
    }

    /// The first half of [`Self::device_op`]: puts the NCCL calls of `enqueue` on `stream`
    /// (under the watchdog while the ranks are not connected yet) and returns.
    fn enqueue_op(
        &mut self,
        what: &str,
        stream: u64,
        enqueue: impl FnOnce(&Nccl, &Communicator, CuStream) -> Result<(), crate::cuda::CudaError>,
    ) -> Result<(), DistError> {
        let (rank, device, secs) = (self.rank(), self.device, self.timeout.as_secs());
        if let Some(why) = &self.broken {
            return Err(DistError::Other(format!(
                "rank {rank}: the NCCL communicator was aborted earlier ({why})"
            )));
        }
        let Some(comm) = self.comm.as_ref() else {
            return Err(DistError::Other(format!(
                "rank {rank}: NCCL {what} after finish()"
            )));
        };
        let stream = stream as usize as CuStream;
        let nccl = self.nccl;
        self.ctx
            .make_current()
            .map_err(|e| DistError::Other(format!("rank {rank}: cuda:{device}: {e}")))?;
        let enqueue = || enqueue(nccl, comm, stream);
        let enqueued = if self.connected {
            enqueue()
        } else {
            self.watchdog.guard(
                self.timeout,
                format!(
                    "rank {rank}: the first NCCL {what} (which connects the ranks) did not \
                     return within {secs} s (dist_timeout): another rank did not reach it, or \
                     the ranks cannot reach each other over NCCL's network (set NCCL_DEBUG=INFO)"
                ),
                enqueue,
            )
        };
        if let Err(e) = enqueued {
            let msg = format!("rank {rank}: NCCL {what} on cuda:{device}: {e}");
            self.abort(&msg);
            return Err(DistError::Other(msg));
        }
        self.connected = true;
        Ok(())
    }

    /// The second half of [`Self::device_op`]: waits for `stream` under `dist_timeout`,
    /// watching the communicator's error state (see the module docs).
    fn wait_op(&mut self, what: &str, len: usize, stream: u64) -> Result<(), DistError> {
        let (rank, device, secs) = (self.rank(), self.device, self.timeout.as_secs());
        let Some(comm) = self.comm.as_ref() else {
            return Err(DistError::Other(format!(
                "rank {rank}: NCCL {what}: the communicator was aborted"
            )));
        };
        let mib = (len * 4) as f64 / (1 << 20) as f64;
        let stream = stream as usize as CuStream;
        let nccl = self.nccl;
        let (query, driver) = (self.query, self.driver);
        // Set when NCCL itself reports nothing but the stream holds a CUDA error: a fault of
        // this rank's GPU work (the all-reduce or a kernel queued before it), not a peer's.
        let local_fault = std::cell::Cell::new(false);
        let waited = wait_until_done(self.timeout, Duration::from_micros(50), || {
            match comm.async_error() {
                Ok(NCCL_SUCCESS | NCCL_IN_PROGRESS) => {}
                Ok(code) => return Poll::Failed(format!("{} ({code})", nccl.error_string(code))),
                Err(e) => return Poll::Failed(e.to_string()),
            }
            // SAFETY: a live stream of the current context.
            match unsafe { query(stream) } {
                0 => Poll::Done,
                CUDA_ERROR_NOT_READY => Poll::Pending,
                code => {
                    local_fault.set(true);
                    Poll::Failed(
                        driver
                            .check(code, "cuStreamQuery")
                            .err()
                            .map_or_else(|| format!("CUDA error {code}"), |e| e.to_string()),
                    )
                }
            }
        });
        match waited {
            Ok(()) => Ok(()),
            Err(WaitEnd::TimedOut) => {
                let msg = format!(
                    "rank {rank}: the NCCL {what} ({mib:.1} MiB on cuda:{device}) \
                     did not complete within {secs} s (dist_timeout): another rank did not \
                     reach it (its training step hangs, or runs much slower than this one) or \
                     the GPUs stopped reaching each other; the NCCL communicator was aborted. \
                     Set NCCL_DEBUG=WARN to see NCCL's view; if steps are just slow, raise \
                     dist_timeout"
                );
                self.abort(&msg);
                Err(DistError::Other(msg))
            }
            Err(WaitEnd::Failed(e)) if local_fault.get() => {
                let msg = format!(
                    "rank {rank}: a CUDA error on cuda:{device} surfaced while waiting for the \
                     {what}: {e}; NCCL reported no problem, so the fault is in \
                     this rank's own GPU work (the {what} or a kernel queued before it). \
                     Rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel, or on one GPU \
                     (and with NANOGPT_CUDA_DISABLE=all) to narrow it down; the NCCL \
                     communicator was aborted"
                );
                self.abort(&msg);
                Err(DistError::Other(msg))
            }
            Err(WaitEnd::Failed(e)) => {
                let msg = format!(
                    "rank {rank}: NCCL failed during the {what} on cuda:{device}: \
                     {e}; a peer has probably exited or its connection broke (see the other \
                     ranks' output; NCCL_DEBUG=WARN shows more); the NCCL communicator was \
                     aborted"
                );
                self.abort(&msg);
                // The TCP group's watchers usually name the rank that failed within a
                // moment and stop this process; give them that moment first.
                if self.world_size() > 1 {
                    std::thread::sleep(
                        2 * super::failure::grace(self.timeout) + Duration::from_secs(1),
                    );
                }
                Err(DistError::Other(msg))
            }
        }
    }
}

impl ProcessGroup for NcclProcessGroup {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world_size(&self) -> usize {
        self.host.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.host.all_reduce_sum(buf)
    }
    fn all_reduce_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
        stream: u64,
    ) -> Option<Result<(), DistError>> {
        Some(self.all_reduce_device(ptr, len, stream))
    }
    fn reduce_scatter_sum(
        &mut self,
        buf: &mut [f32],
        ranges: &[Range<usize>],
    ) -> Result<(), DistError> {
        self.host.reduce_scatter_sum(buf, ranges)
    }
    fn all_gather(&mut self, buf: &mut [f32], ranges: &[Range<usize>]) -> Result<(), DistError> {
        self.host.all_gather(buf, ranges)
    }
    fn reduce_scatter_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
        ranges: &[Range<usize>],
        stream: u64,
    ) -> Option<Result<(), DistError>> {
        Some(self.reduce_scatter_device(ptr, len, ranges, stream))
    }
    fn all_gather_device(
        &mut self,
        ptr: u64,
        len: usize,
        ranges: &[Range<usize>],
        stream: u64,
    ) -> Option<Result<(), DistError>> {
        Some(self.all_gather_device_inner(ptr, len, ranges, stream))
    }
    fn overlaps_device(&self) -> bool {
        true
    }
    fn enqueue_bucket_device(
        &mut self,
        ptr: u64,
        len: usize,
        chunks: &[Range<usize>],
        scatter: bool,
        stream: u64,
    ) -> Option<Result<(), DistError>> {
        Some(self.enqueue_bucket(ptr, len, chunks, scatter, stream))
    }
    fn finish_buckets_device(&mut self, stream: u64) -> Option<Result<(), DistError>> {
        Some(self.finish_buckets(stream))
    }
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), DistError> {
        self.host.broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.host.barrier()
    }
    fn finish(&mut self) -> Result<(), DistError> {
        // Every rank is here and alive before the communicator goes; the host group says
        // goodbye last, so that a rank dying during the teardown is still named.
        self.host.barrier()?;
        if let Some(comm) = self.comm.take() {
            let (rank, secs) = (self.rank(), self.timeout.as_secs());
            let _ = self.ctx.make_current();
            let r = self.watchdog.guard(
                self.timeout,
                format!("rank {rank}: NCCL communicator teardown did not finish within {secs} s"),
                || comm.destroy(),
            );
            if let Err(e) = r {
                eprintln!("warning: rank {rank}: NCCL teardown: {e}");
            }
        }
        self.host.finish()
    }
    fn describe(&self) -> String {
        format!(
            "nccl {} on cuda:{}, {} ranks; host collectives over the {}",
            self.version,
            self.device,
            self.world_size(),
            self.host.describe()
        )
    }
}

impl Drop for NcclProcessGroup {
    fn drop(&mut self) {
        // Not finished cleanly (an error ended the run): abort, which never waits on peers
        // that may be gone, where a destroy could.
        if let Some(comm) = self.comm.take() {
            let _ = self.ctx.make_current();
            let _ = comm.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn selection_by_backend_engine_and_world() {
        let pick = |b, gpu, w| select(b, gpu, w).unwrap().backend;
        for b in ["nccl", "gloo", "tcp"] {
            for gpu in [false, true] {
                assert_eq!(pick(b, gpu, 1), Backend::Single, "{b} gpu={gpu}");
            }
        }
        assert_eq!(pick("nccl", true, 2), Backend::Nccl);
        assert_eq!(pick("nccl", true, 8), Backend::Nccl);
        assert_eq!(pick("nccl", false, 2), Backend::Tcp);
        for b in ["gloo", "tcp"] {
            assert_eq!(pick(b, true, 4), Backend::Tcp);
            assert_eq!(pick(b, false, 4), Backend::Tcp);
        }
        let cpu = select("nccl", false, 3).unwrap().note.unwrap();
        assert!(cpu.contains("CPU") && cpu.contains("backend=gloo"), "{cpu}");
        for (b, gpu, w) in [("nccl", true, 2), ("gloo", false, 2), ("nccl", false, 1)] {
            assert_eq!(select(b, gpu, w).unwrap().note, None, "{b} {gpu} {w}");
        }
        let err = select("mpi", true, 2).unwrap_err().to_string();
        assert!(
            err.contains("backend=\"mpi\"") && err.contains("gloo"),
            "{err}"
        );
    }

    #[test]
    fn version_codes() {
        assert_eq!(version_string(22703), "2.27.3");
        assert_eq!(version_string(21005), "2.10.5");
        assert_eq!(version_string(2804), "2.8.4");
    }

    #[test]
    fn waiting_ends_on_done_failure_or_timeout() {
        let mut n = 0;
        let r = wait_until_done(Duration::from_secs(5), Duration::from_micros(10), || {
            n += 1;
            if n < 150 {
                Poll::Pending
            } else {
                Poll::Done
            }
        });
        assert_eq!((r, n), (Ok(()), 150));
        let r = wait_until_done(Duration::from_secs(5), Duration::ZERO, || {
            Poll::Failed("remote error".into())
        });
        assert_eq!(r, Err(WaitEnd::Failed("remote error".into())));
        let t0 = Instant::now();
        let r = wait_until_done(Duration::from_millis(80), Duration::from_millis(1), || {
            Poll::Pending
        });
        let dt = t0.elapsed();
        assert_eq!(r, Err(WaitEnd::TimedOut));
        assert!(
            dt >= Duration::from_millis(80) && dt < Duration::from_secs(2),
            "{dt:?}"
        );
    }

    #[test]
    fn the_watchdog_fires_once_for_a_late_call_and_never_for_a_prompt_one() {
        let fired = Arc::new(Mutex::new(Vec::<String>::new()));
        let f = Arc::clone(&fired);
        let dog = Watchdog::new(Box::new(move |m: &str| {
            f.lock().unwrap().push(m.to_string())
        }));
        let calls = AtomicUsize::new(0);
        let v = dog.guard(Duration::from_millis(300), "prompt".into(), || {
            calls.fetch_add(1, Ordering::SeqCst);
            7
        });
        assert_eq!(v, 7);
        dog.guard(Duration::from_millis(30), "late call".into(), || {
            std::thread::sleep(Duration::from_millis(250))
        });
        // A later prompt call after the late one: nothing more fires.
        dog.guard(Duration::from_millis(300), "prompt again".into(), || ());
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(*fired.lock().unwrap(), vec!["late call".to_string()]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
