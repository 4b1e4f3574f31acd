//! The CUDA driver API (`libcuda.so.1`): devices, primary contexts, memory, modules,
//! kernel launches, streams and events. Only what the doctor and the engine need, with the
//! `_v2` entry points the CUDA headers map the plain names to.

use super::dl::{api, c_str};
use super::CudaError;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::Path;

pub type CuResult = c_int;
pub type CuDevice = c_int;
pub type CuDevicePtr = u64;
pub type CuContext = *mut c_void;
pub type CuModule = *mut c_void;
pub type CuFunction = *mut c_void;
pub type CuStream = *mut c_void;
pub type CuEvent = *mut c_void;

pub const CUDA_ERROR_NO_DEVICE: CuResult = 100;
const ATTR_CLOCK_RATE: c_int = 13;
const ATTR_MULTIPROCESSOR_COUNT: c_int = 16;
const ATTR_PCI_BUS_ID: c_int = 33;
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;
/// cuda.h `CU_STREAM_NON_BLOCKING` (CUstream_flags): a stream that does not synchronize
/// with the legacy default stream.
pub const CU_STREAM_NON_BLOCKING: c_uint = 0x1;
/// cuda.h `CU_EVENT_DISABLE_TIMING` (CUevent_flags): an event for ordering only, cheaper
/// to record and wait on.
pub const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;

api! {
    /// Entry points of `libcuda.so.1`.
    pub struct DriverApi {
        fn cuGetErrorName(e: CuResult, s: *mut *const c_char) -> CuResult;
        fn cuGetErrorString(e: CuResult, s: *mut *const c_char) -> CuResult;
        fn cuDriverGetVersion(v: *mut c_int) -> CuResult;
        fn cuInit(flags: c_uint) -> CuResult;
        fn cuDeviceGetCount(n: *mut c_int) -> CuResult;
        fn cuDeviceGet(d: *mut CuDevice, ordinal: c_int) -> CuResult;
        fn cuDeviceGetName(name: *mut c_char, len: c_int, d: CuDevice) -> CuResult;
        fn cuDeviceTotalMem_v2(bytes: *mut usize, d: CuDevice) -> CuResult;
        fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, d: CuDevice) -> CuResult;
        fn cuDevicePrimaryCtxRetain(ctx: *mut CuContext, d: CuDevice) -> CuResult;
        fn cuDevicePrimaryCtxRelease_v2(d: CuDevice) -> CuResult;
        fn cuCtxSetCurrent(ctx: CuContext) -> CuResult;
        fn cuCtxSynchronize() -> CuResult;
        fn cuMemAlloc_v2(p: *mut CuDevicePtr, bytes: usize) -> CuResult;
        fn cuMemFree_v2(p: CuDevicePtr) -> CuResult;
        fn cuMemcpyHtoD_v2(dst: CuDevicePtr, src: *const c_void, bytes: usize) -> CuResult;
        fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CuDevicePtr, bytes: usize) -> CuResult;
        fn cuMemcpyDtoDAsync_v2(dst: CuDevicePtr, src: CuDevicePtr, bytes: usize, s: CuStream) -> CuResult;
        fn cuMemsetD8_v2(dst: CuDevicePtr, value: u8, n: usize) -> CuResult;
        fn cuMemsetD8Async(dst: CuDevicePtr, value: u8, n: usize, s: CuStream) -> CuResult;
        // cuda.h: `#define cuMemAllocHost cuMemAllocHost_v2`; cuMemFreeHost has no _v2 form.
        fn cuMemAllocHost_v2(p: *mut *mut c_void, bytes: usize) -> CuResult;
        fn cuMemFreeHost(p: *mut c_void) -> CuResult;
        fn cuMemcpyHtoDAsync_v2(dst: CuDevicePtr, src: *const c_void, bytes: usize, s: CuStream) -> CuResult;
        fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: CuDevicePtr, bytes: usize, s: CuStream) -> CuResult;
        fn cuModuleLoadData(m: *mut CuModule, image: *const c_void) -> CuResult;
        fn cuModuleUnload(m: CuModule) -> CuResult;
        fn cuModuleGetFunction(f: *mut CuFunction, m: CuModule, name: *const c_char) -> CuResult;
        fn cuLaunchKernel(
            f: CuFunction,
            gx: c_uint, gy: c_uint, gz: c_uint,
            bx: c_uint, by: c_uint, bz: c_uint,
            shared: c_uint,
            s: CuStream,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CuResult;
        fn cuStreamCreate(s: *mut CuStream, flags: c_uint) -> CuResult;
        fn cuStreamSynchronize(s: CuStream) -> CuResult;
        fn cuStreamDestroy_v2(s: CuStream) -> CuResult;
        fn cuEventCreate(e: *mut CuEvent, flags: c_uint) -> CuResult;
        fn cuEventRecord(e: CuEvent, s: CuStream) -> CuResult;
        fn cuEventSynchronize(e: CuEvent) -> CuResult;
        fn cuEventDestroy_v2(e: CuEvent) -> CuResult;
        // cuda.h: `CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent,
        // unsigned int Flags)` (no _v2 form; _ptsz only with per-thread default streams).
        fn cuStreamWaitEvent(s: CuStream, e: CuEvent, flags: c_uint) -> CuResult;
        // cuda.h: `#define cuMemGetInfo cuMemGetInfo_v2` (size_t free, size_t total).
        fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult;
    }
}

/// `cuEventElapsedTime` (resolved on demand, see [`Driver::event_elapsed_ms`]):
/// `CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end)`. CUDA 13's cuda.h
/// maps the name to `cuEventElapsedTime_v2`, which drivers before CUDA 12.8 do not export;
/// the unsuffixed entry point ([`LEGACY_EVENT_ELAPSED`], the same C signature) serves those,
/// so that an older driver can still load the table above.
type CuEventElapsedTime = unsafe extern "C" fn(*mut f32, CuEvent, CuEvent) -> CuResult;

/// The entry point drivers before CUDA 12.8 export for [`CuEventElapsedTime`].
const LEGACY_EVENT_ELAPSED: &str = "cuEventElapsedTime";

/// `cuFuncGetName` (CUDA 12.3 and later; resolved on demand, see [`Driver::function_name`]):
/// `CUresult cuFuncGetName(const char** name, CUfunction hfunc)`.
type CuFuncGetName = unsafe extern "C" fn(*mut *const c_char, CuFunction) -> CuResult;

/// A loaded driver.
pub struct Driver {
    pub api: DriverApi,
    /// The graph entry points, when this driver has them ([`super::graph`]).
    pub graphs: Option<super::graph::GraphApi>,
}

/// Counts allocations and frees of device or pinned memory made through one [`Context`]
/// value (shared with its buffers, which count their own frees): work captured into a graph
/// ([`super::graph`]) holds raw pointers, so a change means a capture may point at memory
/// that is gone.
#[derive(Clone, Default)]
struct MemoryEpoch(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl MemoryEpoch {
    fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn bump(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the doctor reports about one GPU.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
    pub clock_mhz: u32,
    pub pci_bus: u32,
}

impl DeviceInfo {
    /// `sm_90` for compute capability 9.0.
    pub fn sm_arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl Driver {
    pub fn load(path: &Path) -> Result<Driver, CudaError> {
        Ok(Driver {
            api: DriverApi::load(path)?,
            graphs: super::graph::GraphApi::load(path).ok(),
        })
    }

    /// Turns a `CUresult` into a typed error naming the call.
    pub fn check(&self, r: CuResult, call: &'static str) -> Result<(), CudaError> {
        if r == 0 {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        let mut msg: *const c_char = std::ptr::null();
        // SAFETY: both calls only write a pointer to a static string.
        unsafe {
            (self.api.cuGetErrorName)(r, &mut name);
            (self.api.cuGetErrorString)(r, &mut msg);
        }
        Err(CudaError::Driver {
            call,
            code: r,
            name: c_str(name),
            message: c_str(msg),
        })
    }

    /// The CUDA version the driver supports, e.g. 13000 for 13.0 (needs no `cuInit`).
    pub fn version(&self) -> Result<i32, CudaError> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.api.cuDriverGetVersion)(&mut v) },
            "cuDriverGetVersion",
        )?;
        Ok(v)
    }

    /// `cuInit`; returns the raw code so callers can tell "no device" from real failures.
    pub fn init(&self) -> CuResult {
        // SAFETY: no preconditions.
        unsafe { (self.api.cuInit)(0) }
    }

    pub fn device_count(&self) -> Result<usize, CudaError> {
        let mut n = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.api.cuDeviceGetCount)(&mut n) },
            "cuDeviceGetCount",
        )?;
        Ok(n.max(0) as usize)
    }

    fn device(&self, index: usize) -> Result<CuDevice, CudaError> {
        let mut d = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.api.cuDeviceGet)(&mut d, index as c_int) },
            "cuDeviceGet",
        )?;
        Ok(d)
    }

    fn attr(&self, d: CuDevice, attr: c_int) -> Result<u32, CudaError> {
        let mut v = 0;
        // SAFETY: writes one int.
        self.check(
            unsafe { (self.api.cuDeviceGetAttribute)(&mut v, attr, d) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v.max(0) as u32)
    }

    pub fn device_info(&self, index: usize) -> Result<DeviceInfo, CudaError> {
        let d = self.device(index)?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the buffer holds `len` bytes; the driver NUL-terminates.
        self.check(
            unsafe { (self.api.cuDeviceGetName)(name.as_mut_ptr(), name.len() as c_int, d) },
            "cuDeviceGetName",
        )?;
        let mut mem = 0usize;
        // SAFETY: writes one size_t.
        self.check(
            unsafe { (self.api.cuDeviceTotalMem_v2)(&mut mem, d) },
            "cuDeviceTotalMem",
        )?;
        Ok(DeviceInfo {
            index,
            name: c_str(name.as_ptr()),
            memory_bytes: mem as u64,
            compute_capability: (self.attr(d, ATTR_CC_MAJOR)?, self.attr(d, ATTR_CC_MINOR)?),
            sm_count: self.attr(d, ATTR_MULTIPROCESSOR_COUNT)?,
            clock_mhz: self.attr(d, ATTR_CLOCK_RATE)? / 1000,
            pci_bus: self.attr(d, ATTR_PCI_BUS_ID)?,
        })
    }

    /// Milliseconds of GPU time between two recorded and completed events.
    ///
    /// # Safety
    /// `start` and `end` must be live events of this driver, both recorded.
    pub unsafe fn event_elapsed_ms(&self, start: CuEvent, end: CuEvent) -> Result<f32, CudaError> {
        let sym = self
            .api
            .lib
            .sym("cuEventElapsedTime_v2")
            .or_else(|_| self.api.lib.sym(LEGACY_EVENT_ELAPSED))?;
        // SAFETY: cuda.h declares cuEventElapsedTime_v2 (and the legacy entry point) with
        // exactly this signature.
        let elapsed = unsafe { std::mem::transmute::<*mut c_void, CuEventElapsedTime>(sym) };
        let mut ms = 0f32;
        // SAFETY: two live events; writes one float.
        self.check(
            unsafe { elapsed(&mut ms, start, end) },
            "cuEventElapsedTime",
        )?;
        Ok(ms)
    }

    /// The name of a loaded kernel (`extern "C"` kernels: the name in the source), through
    /// `cuFuncGetName`; `None` when this driver predates it (CUDA 12.3) or the call fails.
    ///
    /// # Safety
    /// `f` must be a function of a module that is still loaded.
    pub unsafe fn function_name(&self, f: CuFunction) -> Option<String> {
        let sym = self.api.lib.sym("cuFuncGetName").ok()?;
        // SAFETY: cuda.h declares cuFuncGetName with exactly this signature.
        let get = unsafe { std::mem::transmute::<*mut c_void, CuFuncGetName>(sym) };
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: writes one pointer to a string the driver owns for the module's lifetime.
        let r = unsafe { get(&mut name, f) };
        (r == 0 && !name.is_null()).then(|| c_str(name))
    }

    /// Retains device `index`'s primary context (the one the CUDA runtime inside cuBLASLt
    /// and NCCL also uses) and makes it current on this thread.
    pub fn context(&self, index: usize) -> Result<Context<'_>, CudaError> {
        let dev = self.device(index)?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: writes one handle.
        self.check(
            unsafe { (self.api.cuDevicePrimaryCtxRetain)(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let c = Context {
            epoch: MemoryEpoch::default(),
            drv: self,
            dev,
            ctx,
        };
        c.make_current()?;
        Ok(c)
    }
}

/// A retained primary context; released on drop.
pub struct Context<'a> {
    pub drv: &'a Driver,
    epoch: MemoryEpoch,
    dev: CuDevice,
    ctx: CuContext,
}

impl<'a> Context<'a> {
    pub fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: ctx is a live primary context.
        self.drv.check(
            unsafe { (self.drv.api.cuCtxSetCurrent)(self.ctx) },
            "cuCtxSetCurrent",
        )
    }

    /// Changes whenever device or pinned memory is allocated through this context value
    /// or one of its buffers is freed.
    pub fn memory_epoch(&self) -> u64 {
        self.epoch.get()
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: a context is current.
        self.drv.check(
            unsafe { (self.drv.api.cuCtxSynchronize)() },
            "cuCtxSynchronize",
        )
    }

    /// (free, total) bytes of device memory, as `cuMemGetInfo` reports them for the
    /// context's device (memory used by every process counts as not free).
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        self.make_current()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two size_t values.
        self.drv.check(
            unsafe { (self.drv.api.cuMemGetInfo_v2)(&mut free, &mut total) },
            "cuMemGetInfo",
        )?;
        Ok((free as u64, total as u64))
    }

    /// Allocates `bytes` of device memory in this context.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer<'a>, CudaError> {
        self.make_current()?;
        let mut ptr = 0;
        // SAFETY: writes one device pointer.
        self.drv.check(
            unsafe { (self.drv.api.cuMemAlloc_v2)(&mut ptr, bytes.max(1)) },
            "cuMemAlloc",
        )?;
        self.epoch.bump();
        Ok(DeviceBuffer {
            epoch: self.epoch.clone(),
            drv: self.drv,
            ptr,
            bytes,
        })
    }

    /// Allocates `bytes` of page-locked host memory for asynchronous copies ([`Staging`]).
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer<'a>, CudaError> {
        self.make_current()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer.
        self.drv.check(
            unsafe { (self.drv.api.cuMemAllocHost_v2)(&mut ptr, bytes.max(1)) },
            "cuMemAllocHost",
        )?;
        self.epoch.bump();
        Ok(PinnedBuffer {
            epoch: self.epoch.clone(),
            drv: self.drv,
            ptr: ptr as *mut u8,
            bytes,
        })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer<'a>, CudaError> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    pub fn stream(&self) -> Result<Stream<'a>, CudaError> {
        let mut s: CuStream = std::ptr::null_mut();
        // Flags 0 (CU_STREAM_DEFAULT): the stream is ordered with the legacy default stream,
        // where the memsets and host copies of DeviceBuffer run; the engine relies on that
        // ordering (zeroed gradients before the backward, parameters read after the
        // optimizer step). A non-blocking stream would need explicit stream arguments for
        // those. (The per-micro-step copies go through [`Staging`] on the stream itself.)
        // SAFETY: writes one handle.
        self.drv.check(
            unsafe { (self.drv.api.cuStreamCreate)(&mut s, 0) },
            "cuStreamCreate",
        )?;
        Ok(Stream { drv: self.drv, s })
    }

    /// A stream that does not synchronize with the legacy default stream
    /// ([`CU_STREAM_NON_BLOCKING`]): work on it is ordered against other streams only by
    /// explicit events ([`Stream::wait_event`]). For communication beside the compute
    /// stream.
    pub fn stream_non_blocking(&self) -> Result<Stream<'a>, CudaError> {
        let mut s: CuStream = std::ptr::null_mut();
        // SAFETY: writes one handle.
        self.drv.check(
            unsafe { (self.drv.api.cuStreamCreate)(&mut s, CU_STREAM_NON_BLOCKING) },
            "cuStreamCreate",
        )?;
        Ok(Stream { drv: self.drv, s })
    }

    /// Loads a cubin or NUL-terminated PTX image.
    pub fn load_module(&self, image: &[u8]) -> Result<Module<'a>, CudaError> {
        let mut m: CuModule = std::ptr::null_mut();
        // SAFETY: the image outlives the call; the driver copies what it needs.
        self.drv.check(
            unsafe { (self.drv.api.cuModuleLoadData)(&mut m, image.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        Ok(Module { drv: self.drv, m })
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Driver::context`.
        unsafe { (self.drv.api.cuDevicePrimaryCtxRelease_v2)(self.dev) };
    }
}

/// Device memory; freed on drop.
pub struct DeviceBuffer<'a> {
    drv: &'a Driver,
    epoch: MemoryEpoch,
    pub ptr: CuDevicePtr,
    pub bytes: usize,
}

impl DeviceBuffer<'_> {
    pub fn copy_from_host<T: bytemuck::Pod>(&self, data: &[T]) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(data);
        if bytes > self.bytes {
            return Err(CudaError::Invalid(format!(
                "host data of {bytes} bytes does not fit a {}-byte device buffer",
                self.bytes
            )));
        }
        // SAFETY: `bytes` fit both the host slice and the device buffer.
        self.drv.check(
            unsafe {
                (self.drv.api.cuMemcpyHtoD_v2)(self.ptr, data.as_ptr() as *const c_void, bytes)
            },
            "cuMemcpyHtoD",
        )
    }

    /// Copies the first `out.len()` elements back to the host.
    pub fn copy_to_host<T: bytemuck::Pod>(&self, out: &mut [T]) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.bytes {
            return Err(CudaError::Invalid(format!(
                "a host buffer of {bytes} bytes is larger than the {}-byte device buffer",
                self.bytes
            )));
        }
        // SAFETY: `bytes` fit both buffers.
        self.drv.check(
            unsafe {
                (self.drv.api.cuMemcpyDtoH_v2)(out.as_mut_ptr() as *mut c_void, self.ptr, bytes)
            },
            "cuMemcpyDtoH",
        )
    }

    /// Copies `out.len()` elements starting `offset_bytes` into the buffer to the host.
    pub fn copy_to_host_at<T: bytemuck::Pod>(
        &self,
        offset_bytes: usize,
        out: &mut [T],
    ) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(out);
        if offset_bytes + bytes > self.bytes {
            return Err(CudaError::Invalid(format!(
                "a read of {bytes} bytes at offset {offset_bytes} runs past the {}-byte device buffer",
                self.bytes
            )));
        }
        // SAFETY: the range lies inside the device buffer and the host slice.
        self.drv.check(
            unsafe {
                (self.drv.api.cuMemcpyDtoH_v2)(
                    out.as_mut_ptr() as *mut c_void,
                    self.ptr + offset_bytes as u64,
                    bytes,
                )
            },
            "cuMemcpyDtoH",
        )
    }

    pub fn zero(&self) -> Result<(), CudaError> {
        // SAFETY: writes exactly the buffer.
        self.drv.check(
            unsafe { (self.drv.api.cuMemsetD8_v2)(self.ptr, 0, self.bytes) },
            "cuMemsetD8",
        )
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc and is freed once.
        unsafe { (self.drv.api.cuMemFree_v2)(self.ptr) };
        self.epoch.bump();
    }
}

/// Page-locked host memory (`cuMemAllocHost`); freed on drop.
pub struct PinnedBuffer<'a> {
    drv: &'a Driver,
    epoch: MemoryEpoch,
    ptr: *mut u8,
    bytes: usize,
}

impl Drop for PinnedBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAllocHost and is freed once.
        unsafe { (self.drv.api.cuMemFreeHost)(self.ptr as *mut c_void) };
        self.epoch.bump();
    }
}

/// A pinned host buffer for asynchronous copies between the host and a stream
/// (`cuMemcpyHtoDAsync`, `cuMemcpyDtoHAsync`): the host neither waits for the stream when
/// it hands data over nor when it asks for data back, only when it reads the result. An
/// event recorded after each copy through the buffer keeps the host from rewriting it
/// before an upload has read it, or reading it before a download has landed.
///
/// Inside a graph capture ([`Staging::set_capturing`]) each copy is recorded with the event
/// as a node of the graph right after it (a plain event record during a capture marks
/// nothing at replay), so every launch records the event as soon as its copy is done; after
/// each launch [`Staging::launched`] says so, and [`Staging::fill`] hands the next data over
/// to the recorded upload.
pub struct Staging<'a> {
    buf: PinnedBuffer<'a>,
    done: Event<'a>,
    /// A copy through the buffer was enqueued and `done` recorded after it.
    pending: std::cell::Cell<bool>,
    /// Copies are being recorded into a graph, not enqueued.
    capturing: std::cell::Cell<bool>,
    /// A copy was recorded into a graph with `done` recorded after it inside the graph:
    /// each launch records `done` itself, right after the copy.
    done_in_graph: std::cell::Cell<bool>,
}

impl<'a> Staging<'a> {
    /// A staging buffer of `bytes` in `ctx`.
    pub fn new(ctx: &Context<'a>, bytes: usize) -> Result<Staging<'a>, CudaError> {
        Ok(Staging {
            buf: ctx.alloc_pinned(bytes)?,
            done: Event::untimed(ctx.drv)?,
            pending: std::cell::Cell::new(false),
            capturing: std::cell::Cell::new(false),
            done_in_graph: std::cell::Cell::new(false),
        })
    }

    /// Waits for the last copy through the buffer, then (`on`) records copies into a graph
    /// capture, each with the completion event as a node of the graph right after it
    /// ([`Event::record_in_capture`]), or (`!on`) enqueues them as usual again.
    pub fn set_capturing(&self, on: bool) -> Result<(), CudaError> {
        self.settle()?;
        self.capturing.set(on);
        Ok(())
    }

    /// After a graph was launched on `stream`: when a copy through this buffer was recorded
    /// into a graph with the completion event after it, the launch records the event there,
    /// so the host waits only for the graph's work up to that copy (the loss, not the
    /// backward pass after it; an upload, not the rest of the step). Otherwise the event is
    /// recorded behind the whole launch.
    pub fn launched(&self, stream: &Stream) -> Result<(), CudaError> {
        if !self.done_in_graph.get() {
            self.done.record(stream)?;
        }
        self.pending.set(true);
        Ok(())
    }

    /// Copies `data` into the pinned buffer (after the previous copy through it has
    /// completed), for a graph's recorded upload to `dst` to take at its next launch.
    pub fn fill<T: bytemuck::Pod>(&self, data: &[T], dst: &DeviceBuffer) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(data);
        self.fits(bytes, dst, "an upload")?;
        self.settle()?;
        // SAFETY: the pinned buffer holds at least `bytes` and no copy is using it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, self.buf.ptr, bytes);
        }
        Ok(())
    }

    /// Records `done` after a copy just enqueued, or, for a copy that went into a capture,
    /// into the graph after it.
    fn enqueued(&self, stream: &Stream) -> Result<(), CudaError> {
        if self.capturing.get() {
            self.done.record_in_capture(stream)?;
            self.done_in_graph.set(true);
        } else {
            self.done.record(stream)?;
            self.pending.set(true);
        }
        Ok(())
    }

    /// Waits for the last copy through the buffer (if any) to complete.
    fn settle(&self) -> Result<(), CudaError> {
        if self.pending.get() {
            self.done.synchronize()?;
            self.pending.set(false);
        }
        Ok(())
    }

    fn fits(&self, bytes: usize, dev: &DeviceBuffer, what: &str) -> Result<(), CudaError> {
        if bytes > self.buf.bytes || bytes > dev.bytes {
            return Err(CudaError::Invalid(format!(
                "{what} of {bytes} bytes does not fit the {}-byte staging buffer and the \
                 {}-byte device buffer",
                self.buf.bytes, dev.bytes
            )));
        }
        Ok(())
    }

    /// Enqueues `dst[..data.len()] = data` on `stream`: `data` is copied into the pinned
    /// buffer now (after the previous copy through it has completed) and reaches the GPU
    /// in stream order, without the host waiting for the stream.
    pub fn upload<T: bytemuck::Pod>(
        &self,
        data: &[T],
        dst: &DeviceBuffer,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(data);
        self.fill(data, dst)?;
        // SAFETY: `bytes` fit the pinned buffer and the device buffer; the buffer is not
        // touched again before `done` (recorded below) completes.
        self.buf.drv.check(
            unsafe {
                (self.buf.drv.api.cuMemcpyHtoDAsync_v2)(
                    dst.ptr,
                    self.buf.ptr as *const c_void,
                    bytes,
                    stream.s,
                )
            },
            "cuMemcpyHtoDAsync",
        )?;
        self.enqueued(stream)
    }

    /// Enqueues a copy of the first `bytes` of `src` into the pinned buffer on `stream`;
    /// [`Staging::read`] waits for it and hands the values over.
    pub fn download(
        &self,
        src: &DeviceBuffer,
        bytes: usize,
        stream: &Stream,
    ) -> Result<(), CudaError> {
        self.fits(bytes, src, "a download")?;
        self.settle()?;
        // SAFETY: `bytes` fit both buffers; the host reads the pinned buffer only after
        // `done` (recorded below) has completed.
        self.buf.drv.check(
            unsafe {
                (self.buf.drv.api.cuMemcpyDtoHAsync_v2)(
                    self.buf.ptr as *mut c_void,
                    src.ptr,
                    bytes,
                    stream.s,
                )
            },
            "cuMemcpyDtoHAsync",
        )?;
        self.enqueued(stream)
    }

    /// The first `out.len()` values of the last download, once it has completed.
    pub fn read<T: bytemuck::Pod>(&self, out: &mut [T]) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.buf.bytes {
            return Err(CudaError::Invalid(format!(
                "a read of {bytes} bytes from a {}-byte staging buffer",
                self.buf.bytes
            )));
        }
        self.settle()?;
        // SAFETY: the download has completed; `bytes` fit the pinned buffer and `out`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.buf.ptr, out.as_mut_ptr() as *mut u8, bytes);
        }
        Ok(())
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        // Never free pinned memory a copy may still be using.
        let _ = self.settle();
    }
}

/// A stream; destroyed on drop.
pub struct Stream<'a> {
    drv: &'a Driver,
    pub s: CuStream,
}

impl<'a> Stream<'a> {
    /// The driver this stream belongs to.
    pub fn driver(&self) -> &'a Driver {
        self.drv
    }

    /// Makes work enqueued on this stream from now on wait until `event`'s most recent
    /// record has completed (the event may be recorded again right after this call).
    pub fn wait_event(&self, event: &Event) -> Result<(), CudaError> {
        // SAFETY: a live stream and event of the same context; flags 0 is the only value
        // cuStreamWaitEvent documents for the plain wait.
        self.drv.check(
            unsafe { (self.drv.api.cuStreamWaitEvent)(self.s, event.e, 0) },
            "cuStreamWaitEvent",
        )
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: live stream.
        self.drv.check(
            unsafe { (self.drv.api.cuStreamSynchronize)(self.s) },
            "cuStreamSynchronize",
        )
    }

    /// Zeroes `buf` in stream order (also inside a graph capture, unlike
    /// [`DeviceBuffer::zero`], which goes through the legacy default stream).
    pub fn zero(&self, buf: &DeviceBuffer) -> Result<(), CudaError> {
        // SAFETY: writes exactly the buffer, on a live stream.
        self.drv.check(
            unsafe { (self.drv.api.cuMemsetD8Async)(buf.ptr, 0, buf.bytes, self.s) },
            "cuMemsetD8Async",
        )
    }

    /// Zeroes `bytes` bytes of `buf` from byte `offset` on, in stream order; a range past
    /// the buffer's end is an error, not a write.
    pub fn zero_range(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if offset.checked_add(bytes).is_none_or(|end| end > buf.bytes) {
            return Err(CudaError::Invalid(format!(
                "zeroing {bytes} bytes at offset {offset} exceeds a buffer of {} bytes",
                buf.bytes
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside the buffer (checked above), on a live stream.
        self.drv.check(
            unsafe { (self.drv.api.cuMemsetD8Async)(buf.ptr + offset as u64, 0, bytes, self.s) },
            "cuMemsetD8Async",
        )
    }

    /// Device-to-device copy of `bytes` on this stream.
    pub fn copy_d2d(
        &self,
        dst: &DeviceBuffer,
        src: &DeviceBuffer,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if bytes > dst.bytes || bytes > src.bytes {
            return Err(CudaError::Invalid(format!(
                "copy of {bytes} bytes exceeds a buffer ({} / {} bytes)",
                src.bytes, dst.bytes
            )));
        }
        // SAFETY: both ranges lie inside live allocations.
        self.drv.check(
            unsafe { (self.drv.api.cuMemcpyDtoDAsync_v2)(dst.ptr, src.ptr, bytes, self.s) },
            "cuMemcpyDtoDAsync",
        )
    }

    /// Launches `f` on this stream. `params` points at each kernel argument in order.
    ///
    /// # Safety
    /// The arguments must match the kernel's signature and every device pointer among them
    /// must cover what the kernel reads and writes for this geometry.
    pub unsafe fn launch(
        &self,
        f: CuFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.drv.check(
            (self.drv.api.cuLaunchKernel)(
                f,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                shared_bytes,
                self.s,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
            "cuLaunchKernel",
        )
    }

    /// Runs `work` (which enqueues on this stream) between two events and returns the
    /// elapsed GPU time in milliseconds.
    pub fn time<F>(&self, work: F) -> Result<f64, CudaError>
    where
        F: FnOnce() -> Result<(), CudaError>,
    {
        let api = &self.drv.api;
        let mut start: CuEvent = std::ptr::null_mut();
        let mut end: CuEvent = std::ptr::null_mut();
        // SAFETY: each call writes one handle.
        self.drv.check(
            unsafe { (api.cuEventCreate)(&mut start, 0) },
            "cuEventCreate",
        )?;
        let result = (|| {
            self.drv
                .check(unsafe { (api.cuEventCreate)(&mut end, 0) }, "cuEventCreate")?;
            // SAFETY: live events and stream.
            self.drv.check(
                unsafe { (api.cuEventRecord)(start, self.s) },
                "cuEventRecord",
            )?;
            work()?;
            self.drv
                .check(unsafe { (api.cuEventRecord)(end, self.s) }, "cuEventRecord")?;
            self.drv.check(
                unsafe { (api.cuEventSynchronize)(end) },
                "cuEventSynchronize",
            )?;
            // SAFETY: both events were created and recorded above.
            Ok(unsafe { self.drv.event_elapsed_ms(start, end) }? as f64)
        })();
        // SAFETY: destroying events created above (null ones are skipped).
        unsafe {
            (api.cuEventDestroy_v2)(start);
            if !end.is_null() {
                (api.cuEventDestroy_v2)(end);
            }
        }
        result
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: live stream, destroyed once.
        unsafe { (self.drv.api.cuStreamDestroy_v2)(self.s) };
    }
}

/// A CUDA event with timing enabled (`CU_EVENT_DEFAULT` = 0 in cuda.h's CUevent_flags);
/// destroyed on drop. Events are created in the context current on the calling thread.
pub struct Event<'a> {
    drv: &'a Driver,
    pub e: CuEvent,
}

impl<'a> Event<'a> {
    pub fn new(drv: &'a Driver) -> Result<Event<'a>, CudaError> {
        let mut e: CuEvent = std::ptr::null_mut();
        // SAFETY: writes one handle; flags 0 = CU_EVENT_DEFAULT (timing on).
        drv.check(
            unsafe { (drv.api.cuEventCreate)(&mut e, 0) },
            "cuEventCreate",
        )?;
        Ok(Event { drv, e })
    }

    /// An event for ordering streams only ([`CU_EVENT_DISABLE_TIMING`]).
    pub fn untimed(drv: &'a Driver) -> Result<Event<'a>, CudaError> {
        let mut e: CuEvent = std::ptr::null_mut();
        // SAFETY: writes one handle.
        drv.check(
            unsafe { (drv.api.cuEventCreate)(&mut e, CU_EVENT_DISABLE_TIMING) },
            "cuEventCreate",
        )?;
        Ok(Event { drv, e })
    }

    /// [`Event::record`] on a raw `CUstream` of this event's context (a stream another
    /// component owns, e.g. an engine's compute stream handed out as a handle).
    ///
    /// # Safety
    /// `stream` must be a live stream of the context this event was created in.
    pub unsafe fn record_raw(&self, stream: CuStream) -> Result<(), CudaError> {
        self.drv.check(
            (self.drv.api.cuEventRecord)(self.e, stream),
            "cuEventRecord",
        )
    }

    /// Enqueues the event on `stream`: it completes when the work before it has finished.
    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: live event and stream of the same context.
        self.drv.check(
            unsafe { (self.drv.api.cuEventRecord)(self.e, stream.s) },
            "cuEventRecord",
        )
    }

    /// Blocks until the event has completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: live, recorded event.
        self.drv.check(
            unsafe { (self.drv.api.cuEventSynchronize)(self.e) },
            "cuEventSynchronize",
        )
    }

    /// Milliseconds of GPU time from this event to `end` (both recorded and completed).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, CudaError> {
        // SAFETY: two live events of this driver; the caller has recorded both.
        unsafe { self.drv.event_elapsed_ms(self.e, end.e) }
    }
}

impl Drop for Event<'_> {
    fn drop(&mut self) {
        // SAFETY: live event, destroyed once (the driver defers it until the event completes).
        unsafe { (self.drv.api.cuEventDestroy_v2)(self.e) };
    }
}

/// A loaded module; unloaded on drop.
pub struct Module<'a> {
    drv: &'a Driver,
    m: CuModule,
}

impl Module<'_> {
    pub fn function(&self, name: &str) -> Result<CuFunction, CudaError> {
        let c = super::dl::cstring(name)?;
        let mut f: CuFunction = std::ptr::null_mut();
        // SAFETY: live module, NUL-terminated name.
        self.drv.check(
            unsafe { (self.drv.api.cuModuleGetFunction)(&mut f, self.m, c.as_ptr()) },
            "cuModuleGetFunction",
        )?;
        Ok(f)
    }
}

impl Drop for Module<'_> {
    fn drop(&mut self) {
        // SAFETY: live module, unloaded once.
        unsafe { (self.drv.api.cuModuleUnload)(self.m) };
    }
}
