//! CUDA graphs (`libcuda.so.1`): the work a stream is given between
//! `cuStreamBeginCapture` and `cuStreamEndCapture` is recorded instead of run, instantiated
//! once, and then replayed as a whole with one `cuGraphLaunch`: one launch from the host
//! instead of hundreds, with the same kernels, arguments and pointers every time.
//!
//! The entry points are optional ([`GraphApi`] is `None` on [`super::driver::Driver`] when
//! the driver lacks them): a caller without them runs its work launch by launch.
//!
//! What a captured graph holds is fixed at capture: kernel arguments by value, device and
//! pinned host pointers, cuBLAS scalars. A replay reads the pinned host buffers of its
//! copies when it runs, so the host refreshes their contents before each launch; every
//! other change (a different shape, a reallocated buffer) needs a new capture
//! ([`super::driver::Context::memory_epoch`] tells when buffers have come and gone).

use super::dl::api;
use super::driver::{CuEvent, CuResult, CuStream, Driver, Event, Stream};
use super::CudaError;
use std::ffi::{c_int, c_uint, c_void};

pub type CuGraph = *mut c_void;
pub type CuGraphExec = *mut c_void;

/// cuda.h `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL` (CUstreamCaptureMode): while this thread
/// captures, calls that could synchronise with the captured work behind its back
/// (allocations, synchronous copies and memsets, synchronising a stream or the context)
/// fail and invalidate the capture instead of silently running outside the graph.
pub const CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: c_int = 1;

/// cuda.h `CU_EVENT_RECORD_EXTERNAL` (CUevent_record_flags): an event recorded on a
/// capturing stream with this flag becomes a node of the graph, and every launch of the
/// graph records the event when the work before the node has run.
pub const CU_EVENT_RECORD_EXTERNAL: c_uint = 1;

api! {
    /// The graph entry points of `libcuda.so.1` (CUDA 11.4 and later), and the event record
    /// that a capture turns into a node of its graph.
    pub struct GraphApi {
        fn cuStreamBeginCapture_v2(s: CuStream, mode: c_int) -> CuResult;
        fn cuStreamEndCapture(s: CuStream, graph: *mut CuGraph) -> CuResult;
        fn cuGraphInstantiateWithFlags(exec: *mut CuGraphExec, graph: CuGraph, flags: u64) -> CuResult;
        fn cuGraphLaunch(exec: CuGraphExec, s: CuStream) -> CuResult;
        fn cuGraphExecDestroy(exec: CuGraphExec) -> CuResult;
        fn cuGraphDestroy(graph: CuGraph) -> CuResult;
        fn cuEventRecordWithFlags(e: CuEvent, s: CuStream, flags: c_uint) -> CuResult;
    }
}

/// An instantiated graph, ready to launch; destroyed on drop.
pub struct GraphExec<'a> {
    drv: &'a Driver,
    exec: CuGraphExec,
}

impl Driver {
    fn graph_api(&self) -> Result<&GraphApi, CudaError> {
        self.graphs.as_ref().ok_or_else(|| {
            CudaError::Invalid(
                "this CUDA driver has no graph entry points (cuStreamBeginCapture_v2, \
                 cuGraphInstantiateWithFlags: CUDA 11.4 or later)"
                    .into(),
            )
        })
    }
}

impl<'a> Stream<'a> {
    /// Starts recording the work enqueued on this stream into a graph: until
    /// [`Stream::end_capture`], nothing enqueued here runs. Fails (and nothing is being
    /// recorded) when the driver has no graphs.
    pub fn begin_capture(&self) -> Result<(), CudaError> {
        let drv = self.driver();
        let api = drv.graph_api()?;
        // SAFETY: a live stream; mode is a CUstreamCaptureMode value.
        drv.check(
            unsafe { (api.cuStreamBeginCapture_v2)(self.s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) },
            "cuStreamBeginCapture",
        )
    }

    /// Ends the capture begun by [`Stream::begin_capture`] and instantiates what was
    /// recorded, given how recording went (`recorded`: the caller's own result while it
    /// enqueued the work). On any failure the capture is discarded and the error returned;
    /// the stream is then as before the capture (none of the work ran).
    pub fn end_capture(&self, recorded: Result<(), CudaError>) -> Result<GraphExec<'a>, CudaError> {
        let drv = self.driver();
        let api = drv.graph_api()?;
        let mut graph: CuGraph = std::ptr::null_mut();
        // SAFETY: ends the capture of this stream (also after a failure while recording,
        // which leaves the capture invalidated); writes one handle (null when invalidated).
        let ended = drv.check(
            unsafe { (api.cuStreamEndCapture)(self.s, &mut graph) },
            "cuStreamEndCapture",
        );
        let instantiated = recorded.and(ended).and_then(|()| {
            let mut exec: CuGraphExec = std::ptr::null_mut();
            // SAFETY: a graph just captured; writes one handle; flags 0.
            drv.check(
                unsafe { (api.cuGraphInstantiateWithFlags)(&mut exec, graph, 0) },
                "cuGraphInstantiateWithFlags",
            )
            .map(|()| GraphExec { drv, exec })
        });
        if !graph.is_null() {
            // SAFETY: the executable graph keeps what it needs; the template is not used
            // again.
            unsafe { (api.cuGraphDestroy)(graph) };
        }
        instantiated
    }
}

impl Event<'_> {
    /// Records this event into the capture going on on `stream`, as a node of the graph
    /// ([`CU_EVENT_RECORD_EXTERNAL`]): each launch of the graph then records the event when
    /// the work captured before it has run, so the host can wait for part of a launch.
    pub fn record_in_capture(&self, stream: &Stream) -> Result<(), CudaError> {
        let drv = stream.driver();
        let api = drv.graph_api()?;
        // SAFETY: a live event and a capturing stream of the same context.
        drv.check(
            unsafe { (api.cuEventRecordWithFlags)(self.e, stream.s, CU_EVENT_RECORD_EXTERNAL) },
            "cuEventRecordWithFlags",
        )
    }
}

impl GraphExec<'_> {
    /// Enqueues the whole graph on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<(), CudaError> {
        let api = self.drv.graph_api()?;
        // SAFETY: a live executable graph and stream of the same context.
        self.drv.check(
            unsafe { (api.cuGraphLaunch)(self.exec, stream.s) },
            "cuGraphLaunch",
        )
    }
}

impl Drop for GraphExec<'_> {
    fn drop(&mut self) {
        if let Ok(api) = self.drv.graph_api() {
            // SAFETY: destroyed once; a launch already enqueued completes regardless.
            unsafe { (api.cuGraphExecDestroy)(self.exec) };
        }
    }
}
