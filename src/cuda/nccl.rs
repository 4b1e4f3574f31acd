//! NCCL (`libnccl.so.2`): GPU collectives. The doctor runs a 1-rank all-reduce per GPU and
//! one across all local GPUs; data-parallel training ([`crate::dist::nccl`]) creates one
//! communicator per rank from a unique id that rank 0 makes and the TCP group broadcasts,
//! then sums the gradients in place on the GPU (or, with ZeRO-1, reduces each rank's shard
//! onto it with `ncclReduce` and gathers the updated parameters with `ncclBroadcast`, each
//! set of calls inside one group), polling for completion so that a stalled
//! peer turns into an error (and an aborted communicator) instead of a hang.
//!
//! Every constant below is the value of the same name in `nccl.h` (NCCL 2.x; the numbering
//! has been stable since 2.0, with `ncclAvg` added in 2.10 and `ncclInProgress` in 2.14).
//! Signatures follow the same header: `ncclComm_t` is an opaque pointer, `ncclResult_t`,
//! `ncclDataType_t` and `ncclRedOp_t` are C enums (`int`), `cudaStream_t` is the driver's
//! `CUstream`, and `ncclUniqueId` is a 128-byte struct passed by value.

use super::dl::{api, c_str};
use super::driver::{CuDevicePtr, CuResult, CuStream, Driver, Stream};
use super::CudaError;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

/// `ncclResult_t`.
pub type NcclResult = c_int;
/// `ncclComm_t`.
pub type Comm = *mut c_void;

/// `ncclSuccess` (nccl.h: `ncclSuccess = 0`).
pub const NCCL_SUCCESS: NcclResult = 0;
/// `ncclInProgress` (nccl.h: `ncclInProgress = 7`): a non-blocking operation is still
/// running; not an error.
pub const NCCL_IN_PROGRESS: NcclResult = 7;
/// `ncclFloat32` (nccl.h: `ncclFloat32 = 7`, also spelled `ncclFloat`).
pub const NCCL_FLOAT32: c_int = 7;
/// `ncclSum` (nccl.h: `ncclSum = 0`).
pub const NCCL_SUM: c_int = 0;
/// `ncclAvg` (nccl.h: `ncclAvg = 4`, NCCL 2.10 and later).
pub const NCCL_AVG: c_int = 4;
/// `NCCL_UNIQUE_ID_BYTES` (nccl.h: 128).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;
/// `CUDA_ERROR_NOT_READY` (cuda.h: 600): `cuStreamQuery` on a stream with work pending.
pub const CUDA_ERROR_NOT_READY: CuResult = 600;

/// The reduction of an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    Sum,
    /// Sum divided by the number of ranks (NCCL 2.10 and later).
    Avg,
}

impl RedOp {
    fn code(self) -> c_int {
        match self {
            RedOp::Sum => NCCL_SUM,
            RedOp::Avg => NCCL_AVG,
        }
    }
}

/// `ncclUniqueId`: 128 opaque bytes that ranks exchange to form a communicator.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

impl UniqueId {
    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; NCCL_UNIQUE_ID_BYTES] {
        self.internal.map(|c| c as u8)
    }

    /// The id received from rank 0.
    pub fn from_bytes(bytes: &[u8; NCCL_UNIQUE_ID_BYTES]) -> UniqueId {
        UniqueId {
            internal: bytes.map(|b| b as c_char),
        }
    }
}

api! {
    /// Entry points of `libnccl.so.2`.
    pub struct NcclApi {
        fn ncclGetVersion(v: *mut c_int) -> NcclResult;
        fn ncclGetErrorString(r: NcclResult) -> *const c_char;
        fn ncclGetUniqueId(id: *mut UniqueId) -> NcclResult;
        fn ncclCommInitRank(comm: *mut Comm, nranks: c_int, id: UniqueId, rank: c_int) -> NcclResult;
        fn ncclCommInitAll(comms: *mut Comm, ndev: c_int, devlist: *const c_int) -> NcclResult;
        fn ncclCommDestroy(comm: Comm) -> NcclResult;
        fn ncclCommAbort(comm: Comm) -> NcclResult;
        fn ncclCommGetAsyncError(comm: Comm, async_error: *mut NcclResult) -> NcclResult;
        fn ncclCommCount(comm: Comm, count: *mut c_int) -> NcclResult;
        fn ncclCommCuDevice(comm: Comm, device: *mut c_int) -> NcclResult;
        fn ncclCommUserRank(comm: Comm, rank: *mut c_int) -> NcclResult;
        fn ncclGroupStart() -> NcclResult;
        fn ncclGroupEnd() -> NcclResult;
        fn ncclAllReduce(
            send: *const c_void, recv: *mut c_void, count: usize,
            dtype: c_int, op: c_int, comm: Comm, stream: CuStream,
        ) -> NcclResult;
        fn ncclReduce(
            send: *const c_void, recv: *mut c_void, count: usize,
            dtype: c_int, op: c_int, root: c_int, comm: Comm, stream: CuStream,
        ) -> NcclResult;
        fn ncclBroadcast(
            send: *const c_void, recv: *mut c_void, count: usize,
            dtype: c_int, root: c_int, comm: Comm, stream: CuStream,
        ) -> NcclResult;
    }
}

pub struct Nccl {
    pub api: NcclApi,
}

impl Nccl {
    pub fn load(path: &Path) -> Result<Nccl, CudaError> {
        Ok(Nccl {
            api: NcclApi::load(path)?,
        })
    }

    /// NCCL's own description of a result code.
    pub fn error_string(&self, r: NcclResult) -> String {
        // SAFETY: returns a static string.
        c_str(unsafe { (self.api.ncclGetErrorString)(r) })
    }

    pub fn check(&self, r: NcclResult, call: &'static str) -> Result<(), CudaError> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        Err(CudaError::Nccl {
            call,
            code: r,
            message: self.error_string(r),
        })
    }

    /// The version code, e.g. 22703 for 2.27.3.
    pub fn version(&self) -> Result<i32, CudaError> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.api.ncclGetVersion)(&mut v) },
            "ncclGetVersion",
        )?;
        Ok(v)
    }

    /// A fresh unique id (rank 0 makes it; every rank passes it to [`Nccl::comm_init_rank`]).
    pub fn unique_id(&self) -> Result<UniqueId, CudaError> {
        let mut id = UniqueId {
            internal: [0; NCCL_UNIQUE_ID_BYTES],
        };
        // SAFETY: writes the 128-byte id.
        self.check(
            unsafe { (self.api.ncclGetUniqueId)(&mut id) },
            "ncclGetUniqueId",
        )?;
        Ok(id)
    }

    /// Rank `rank`'s communicator of `nranks` ranks on the device whose context is current
    /// on this thread. Blocks until every rank has called it with the same id.
    pub fn comm_init_rank(
        &self,
        nranks: usize,
        id: &UniqueId,
        rank: usize,
    ) -> Result<Communicator<'_>, CudaError> {
        if rank >= nranks {
            return Err(CudaError::Invalid(format!(
                "NCCL rank {rank} is outside a communicator of {nranks} ranks"
            )));
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: writes the comm handle; the id is passed by value as nccl.h declares.
        self.check(
            unsafe { (self.api.ncclCommInitRank)(&mut comm, nranks as c_int, *id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok(Communicator { nccl: self, comm })
    }

    /// A 1-rank communicator on the device whose context is current.
    pub fn comm_single(&self) -> Result<Communicator<'_>, CudaError> {
        let id = self.unique_id()?;
        self.comm_init_rank(1, &id, 0)
    }

    /// One communicator per listed device, all in this process.
    pub fn comm_all(&self, devices: &[c_int]) -> Result<Vec<Communicator<'_>>, CudaError> {
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has one slot per device.
        self.check(
            unsafe {
                (self.api.ncclCommInitAll)(
                    comms.as_mut_ptr(),
                    devices.len() as c_int,
                    devices.as_ptr(),
                )
            },
            "ncclCommInitAll",
        )?;
        Ok(comms
            .into_iter()
            .map(|comm| Communicator { nccl: self, comm })
            .collect())
    }

    /// Enqueues an all-reduce of `count` f32 values on a raw stream handle (`send == recv`
    /// reduces in place).
    ///
    /// # Safety
    /// `send` and `recv` must each hold `count` floats on the communicator's device, and
    /// `stream` must be a live stream of that device's context.
    pub unsafe fn all_reduce_f32_raw(
        &self,
        send: CuDevicePtr,
        recv: CuDevicePtr,
        count: usize,
        op: RedOp,
        comm: &Communicator,
        stream: CuStream,
    ) -> Result<(), CudaError> {
        self.check(
            (self.api.ncclAllReduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                NCCL_FLOAT32,
                op.code(),
                comm.comm,
                stream,
            ),
            "ncclAllReduce",
        )
    }

    /// Enqueues a sum reduce of `count` f32 values onto rank `root`'s `recv` (`ncclReduce`;
    /// `send == recv` reduces in place; `recv` is only written on the root).
    ///
    /// # Safety
    /// As [`Nccl::all_reduce_f32_raw`]; `root` must be a rank of the communicator.
    pub unsafe fn reduce_sum_f32_raw(
        &self,
        send: CuDevicePtr,
        recv: CuDevicePtr,
        count: usize,
        root: usize,
        comm: &Communicator,
        stream: CuStream,
    ) -> Result<(), CudaError> {
        self.check(
            (self.api.ncclReduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                NCCL_FLOAT32,
                NCCL_SUM,
                root as c_int,
                comm.comm,
                stream,
            ),
            "ncclReduce",
        )
    }

    /// Enqueues a broadcast of `count` f32 values from rank `root`'s `send` into every
    /// rank's `recv` (`ncclBroadcast`; `send == recv` works in place).
    ///
    /// # Safety
    /// As [`Nccl::all_reduce_f32_raw`]; `root` must be a rank of the communicator.
    pub unsafe fn broadcast_f32_raw(
        &self,
        send: CuDevicePtr,
        recv: CuDevicePtr,
        count: usize,
        root: usize,
        comm: &Communicator,
        stream: CuStream,
    ) -> Result<(), CudaError> {
        self.check(
            (self.api.ncclBroadcast)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                NCCL_FLOAT32,
                root as c_int,
                comm.comm,
                stream,
            ),
            "ncclBroadcast",
        )
    }

    /// Enqueues a sum all-reduce of `count` f32 values.
    pub fn all_reduce_sum_f32(
        &self,
        send: CuDevicePtr,
        recv: CuDevicePtr,
        count: usize,
        comm: &Communicator,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        // SAFETY: the buffers hold `count` floats on the communicator's device.
        unsafe { self.all_reduce_f32_raw(send, recv, count, RedOp::Sum, comm, stream.s) }
    }

    pub fn group<F: FnOnce() -> Result<(), CudaError>>(&self, f: F) -> Result<(), CudaError> {
        // SAFETY: group calls bracket the enqueues made by `f`.
        self.check(unsafe { (self.api.ncclGroupStart)() }, "ncclGroupStart")?;
        let r = f();
        let end = self.check(unsafe { (self.api.ncclGroupEnd)() }, "ncclGroupEnd");
        r.and(end)
    }
}

/// A communicator; destroyed on drop unless [`Communicator::abort`] ended it first.
pub struct Communicator<'a> {
    nccl: &'a Nccl,
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `&mut self` on the mutating calls and single ownership ensure that.
unsafe impl Send for Communicator<'_> {}

impl Communicator<'_> {
    fn int_query(
        &self,
        f: unsafe extern "C" fn(Comm, *mut c_int) -> NcclResult,
        call: &'static str,
    ) -> Result<usize, CudaError> {
        let mut v: c_int = -1;
        // SAFETY: live communicator; writes one int.
        self.nccl.check(unsafe { f(self.comm, &mut v) }, call)?;
        Ok(v.max(0) as usize)
    }

    /// Number of ranks (`ncclCommCount`).
    pub fn count(&self) -> Result<usize, CudaError> {
        self.int_query(self.nccl.api.ncclCommCount, "ncclCommCount")
    }

    /// This rank (`ncclCommUserRank`).
    pub fn rank(&self) -> Result<usize, CudaError> {
        self.int_query(self.nccl.api.ncclCommUserRank, "ncclCommUserRank")
    }

    /// The CUDA device ordinal the communicator runs on (`ncclCommCuDevice`).
    pub fn device(&self) -> Result<usize, CudaError> {
        self.int_query(self.nccl.api.ncclCommCuDevice, "ncclCommCuDevice")
    }

    /// `ncclCommGetAsyncError`: `Ok(NCCL_SUCCESS)` while healthy, `Ok(NCCL_IN_PROGRESS)`
    /// while a non-blocking call runs, another code once the communicator failed (a peer's
    /// connection broke, a remote error, ...).
    pub fn async_error(&self) -> Result<NcclResult, CudaError> {
        let mut r: NcclResult = NCCL_SUCCESS;
        // SAFETY: live communicator; writes one int.
        self.nccl.check(
            unsafe { (self.nccl.api.ncclCommGetAsyncError)(self.comm, &mut r) },
            "ncclCommGetAsyncError",
        )?;
        Ok(r)
    }

    /// The raw handle (for [`Nccl::all_reduce_f32_raw`]).
    pub fn handle(&self) -> Comm {
        self.comm
    }

    /// `ncclCommAbort`: stops the communicator's kernels and frees it without waiting for
    /// any peer. The communicator cannot be used afterwards.
    pub fn abort(mut self) -> Result<(), CudaError> {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        // SAFETY: comm came from an init call; nulling it above keeps drop from freeing it
        // a second time.
        self.nccl.check(
            unsafe { (self.nccl.api.ncclCommAbort)(comm) },
            "ncclCommAbort",
        )
    }

    /// `ncclCommDestroy`: waits for the communicator's pending work, then frees it.
    pub fn destroy(mut self) -> Result<(), CudaError> {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        // SAFETY: as in `abort`.
        self.nccl.check(
            unsafe { (self.nccl.api.ncclCommDestroy)(comm) },
            "ncclCommDestroy",
        )
    }
}

impl Drop for Communicator<'_> {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: comm came from an init call and is destroyed once.
            unsafe { (self.nccl.api.ncclCommDestroy)(self.comm) };
        }
    }
}

/// `cuStreamQuery` (`CUresult cuStreamQuery(CUstream)`, no `_v2` form), resolved from the
/// loaded driver: `0` when all work on the stream is done, [`CUDA_ERROR_NOT_READY`] while
/// some is pending, another code when the stream failed.
pub type StreamQuery = unsafe extern "C" fn(CuStream) -> CuResult;

/// Resolves [`StreamQuery`] from `drv`'s library.
pub fn stream_query_fn(drv: &Driver) -> Result<StreamQuery, CudaError> {
    let ptr = drv.api.lib.sym("cuStreamQuery")?;
    // SAFETY: cuda.h declares `CUresult cuStreamQuery(CUstream hStream)`.
    Ok(unsafe { std::mem::transmute::<*mut c_void, StreamQuery>(ptr) })
}

/// The device ordinal of the context current on this thread (`cuCtxGetDevice`, resolved
/// from `drv`'s library; a `CUdevice` from `cuDeviceGet` is the ordinal itself).
pub fn current_device(drv: &Driver) -> Result<usize, CudaError> {
    let ptr = drv.api.lib.sym("cuCtxGetDevice")?;
    // SAFETY: cuda.h declares `CUresult cuCtxGetDevice(CUdevice *device)` (CUdevice = int).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_int) -> CuResult>(ptr)
    };
    let mut d: c_int = -1;
    // SAFETY: writes one int.
    drv.check(unsafe { f(&mut d) }, "cuCtxGetDevice")?;
    Ok(d.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_round_trips_through_bytes_and_has_the_header_size() {
        assert_eq!(std::mem::size_of::<UniqueId>(), 128);
        let bytes: [u8; 128] = std::array::from_fn(|i| (i * 7 + 200) as u8);
        let id = UniqueId::from_bytes(&bytes);
        assert_eq!(id.to_bytes(), bytes);
    }

    #[test]
    fn constants_match_nccl_h() {
        assert_eq!(
            (
                NCCL_SUCCESS,
                NCCL_IN_PROGRESS,
                NCCL_FLOAT32,
                NCCL_SUM,
                NCCL_AVG
            ),
            (0, 7, 7, 0, 4)
        );
        assert_eq!(RedOp::Sum.code(), 0);
        assert_eq!(RedOp::Avg.code(), 4);
        assert_eq!(CUDA_ERROR_NOT_READY, 600);
    }
}
