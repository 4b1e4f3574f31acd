//! NCCL (`libnccl.so.2`): GPU collectives. The doctor runs a 1-rank all-reduce per GPU and
//! one across all local GPUs; the engine's data-parallel training uses the same calls.

use super::dl::{api, c_str};
use super::driver::{CuDevicePtr, CuStream, Stream};
use super::CudaError;
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;

type NcclResult = c_int;
type Comm = *mut c_void;
pub const NCCL_FLOAT32: c_int = 7;
pub const NCCL_SUM: c_int = 0;

/// `ncclUniqueId`: 128 opaque bytes that ranks exchange to form a communicator.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
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
        fn ncclGroupStart() -> NcclResult;
        fn ncclGroupEnd() -> NcclResult;
        fn ncclAllReduce(
            send: *const c_void, recv: *mut c_void, count: usize,
            dtype: c_int, op: c_int, comm: Comm, stream: CuStream,
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

    pub fn check(&self, r: NcclResult, call: &'static str) -> Result<(), CudaError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: returns a static string.
        let message = c_str(unsafe { (self.api.ncclGetErrorString)(r) });
        Err(CudaError::Nccl {
            call,
            code: r,
            message,
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

    /// A 1-rank communicator on the device whose context is current.
    pub fn comm_single(&self) -> Result<Communicator<'_>, CudaError> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes the id; then the comm handle.
        self.check(
            unsafe { (self.api.ncclGetUniqueId)(&mut id) },
            "ncclGetUniqueId",
        )?;
        let mut comm: Comm = std::ptr::null_mut();
        self.check(
            unsafe { (self.api.ncclCommInitRank)(&mut comm, 1, id, 0) },
            "ncclCommInitRank",
        )?;
        Ok(Communicator { nccl: self, comm })
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
        self.check(
            unsafe {
                (self.api.ncclAllReduce)(
                    send as *const c_void,
                    recv as *mut c_void,
                    count,
                    NCCL_FLOAT32,
                    NCCL_SUM,
                    comm.comm,
                    stream.s,
                )
            },
            "ncclAllReduce",
        )
    }

    pub fn group<F: FnOnce() -> Result<(), CudaError>>(&self, f: F) -> Result<(), CudaError> {
        // SAFETY: group calls bracket the enqueues made by `f`.
        self.check(unsafe { (self.api.ncclGroupStart)() }, "ncclGroupStart")?;
        let r = f();
        let end = self.check(unsafe { (self.api.ncclGroupEnd)() }, "ncclGroupEnd");
        r.and(end)
    }
}

/// A communicator; destroyed on drop.
pub struct Communicator<'a> {
    nccl: &'a Nccl,
    comm: Comm,
}

impl Drop for Communicator<'_> {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: comm came from an init call and is destroyed once.
            unsafe { (self.nccl.api.ncclCommDestroy)(self.comm) };
        }
    }
}
