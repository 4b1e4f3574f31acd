// driver.cpp: a CPU stand-in for the NVIDIA driver library (libcuda.so.1), so that the CUDA
// engine and its tests run on a machine without a GPU. It exports the driver entry points
// nanogpt loads (src/cuda/driver.rs) with cuda.h's C signatures and does the work on the
// CPU:
//
// - one device (GPU_EMULATE_DEVICES sets how many), compute capability 9.0 (GPU_EMULATE_CC,
//   e.g. 80), 16 GiB of "device" memory (GPU_EMULATE_MEMORY_MIB sets how much;
//   GPU_EMULATE_UNSEEN_MIB hides some in use from cuMemGetInfo until an allocation fails)
//   that is host memory, counted per process over all devices: a device pointer is a host
//   address. New allocations are filled with 0xff bytes (NaN as floats), as uninitialised
//   GPU memory holds garbage, so that a read of memory nothing wrote shows up; each has
//   guard bytes on both sides, checked after every kernel launch and copy, so that a
//   write out of bounds fails the launch (CUDA_ERROR_ILLEGAL_ADDRESS) and names the kernel.
// - modules: the image NVRTC compiled (cubin or PTX) is kept only to check that a function
//   looked up in it is really there; the functions run the same kernels/*.cu sources
//   compiled for the CPU (kernels.cpp, kernels_flash.cpp; tools/kernel_emulate/shim.h runs
//   the threads of a block as fibers; the blocks first to last or last to first, chosen
//   per launch: emulate_launch). Every pointer parameter of a launch must be null or point
//   into a live allocation.
// - streams and events: every operation completes before its call returns (so ordering
//   between streams always holds), unless recorded into a graph (below); events record the
//   host clock, so the profiler's timings are CPU times. One exception: an asynchronous
//   device-to-host copy takes its data when enqueued but lands in host memory only at the
//   next synchronising call (stream, event or context synchronise, stream query, a
//   synchronous copy, freeing the pinned buffer); until then the host buffer holds 0xff
//   bytes, so a host that reads the result without waiting for it sees NaN.
// - pinned host memory (cuMemAllocHost): asynchronous copies must use it on the host side,
//   as the engine's staging buffers do; a pageable or freed host pointer is refused.
// - stream capture and graphs (cuStreamBeginCapture_v2, cuStreamEndCapture,
//   cuStreamIsCapturing, cuGraphInstantiateWithFlags, cuGraphLaunch, cuGraphExecDestroy,
//   cuGraphDestroy), each capture on one stream, strictly:
//   - A stream made by cuStreamCreate can be captured (the legacy stream cannot: 900,
//     CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; one already capturing: 401, ILLEGAL_STATE).
//     While it captures, what is enqueued on it is recorded in order and not run: kernel
//     launches (every parameter copied by value), cuMemcpyHtoDAsync (the pinned host buffer
//     is read when the graph runs, as the GPU's copy node reads it), cuMemcpyDtoHAsync (its
//     data is taken when the graph runs and lands at the next synchronising call, as above),
//     cuMemcpyDtoDAsync, cuMemsetD8Async (the stream-ordered form of cuMemsetD8, which a
//     capture refuses), and the work of the cuBLAS and cuBLASLt stand-ins given this stream
//     (through gpu_emulate_defer, below). Their arguments are checked when recorded, with the
//     errors of the direct call; a call refused then invalidates the capture.
//   - cuEventRecordWithFlags with CU_EVENT_RECORD_EXTERNAL (1) on a capturing stream is
//     recorded as an event record node: each launch records the event when it reaches the
//     node (the event must still exist then: a destroyed one fails the launch with 400). A
//     launch runs to completion before it returns, so a host wait on such an event cannot
//     show here whether it waits for this launch's record or an earlier one.
//   - cuEventRecord (and cuEventRecordWithFlags without the flag), cuStreamWaitEvent and
//     cuGraphLaunch on a capturing stream are refused (900) and invalidate the capture:
//     cross-stream dependencies and nested graphs are not emulated.
//   - Capture modes: while the calling thread has a capture in progress begun in global (0)
//     or thread-local (1) mode, or any thread one begun in global mode, the calling thread's
//     cuMemAlloc, cuMemFree, cuMemAllocHost, cuMemFreeHost, synchronous copies, cuMemsetD8,
//     cuCtxSynchronize, cuStreamSynchronize, cuStreamQuery and cuEventSynchronize fail with
//     900 and invalidate that capture (every thread's own mode is the default, global;
//     cuThreadExchangeStreamCaptureMode is not emulated). In any mode, relaxed (2) included,
//     synchronising the capturing stream (cuStreamSynchronize, cuStreamQuery) or its context
//     (cuCtxSynchronize on its device) fails with 900, and using the legacy stream on its
//     device while the capturing stream is a blocking one (an operation enqueued on the
//     legacy stream, a synchronous copy or memset) fails with 906,
//     CUDA_ERROR_STREAM_CAPTURE_IMPLICIT; both invalidate the capture. Work on other
//     streams runs at once, as ever.
//   - Once invalidated, operations enqueued on the stream fail with 901
//     (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED), and cuStreamEndCapture returns 901 with a null
//     graph and ends the capture. cuStreamEndCapture on a stream not capturing is 401; from
//     another thread than the one that began a non-relaxed capture, 908
//     (CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD), the capture going on. A capturing stream
//     cannot be destroyed (900).
//   - cuGraphInstantiateWithFlags (flags 0) makes an executable graph sharing the recorded
//     operations, so the graph may be destroyed first. cuGraphLaunch runs them in order
//     before it returns, each with the checks of its direct call: a recorded pointer no
//     longer inside a live allocation (device memory, or pinned host memory for a copy) fails
//     the launch with 700 (CUDA_ERROR_ILLEGAL_ADDRESS), naming the operation on stderr, and
//     guard bytes are checked after each kernel and each cuBLAS product. Graphs and
//     executable graphs are checked against tables of live ones (INVALID_HANDLE otherwise).
//   - gpu_emulate_defer (exported for the cuBLAS stand-ins, which are separate libraries and
//     find it with dlsym): given a stream and a closure (run, drop, ctx), it answers 0 when
//     the stream is not capturing (the caller runs the work now), 1 when it recorded the
//     closure into the stream's capture (run at each launch, dropped with the last graph
//     holding it), or a negative CUresult when the capture refuses work.
//
// Not emulated: several threads per block dimension other than x, more than 48 KiB of
// dynamic shared memory, peer access, graphs built node by node or updated, captures spanning
// streams, and anything not listed in src/cuda/driver.rs and src/cuda/graph.rs. All calls are
// serialised by one lock (a recursive one: a graph launch runs the cuBLAS stand-ins' recorded
// work under it, and that work does not call back into the driver).
#include "../kernel_emulate/shim.h"
#include "registry.h"
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUgraph;
typedef void* CUgraphExec;

namespace {

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    ILLEGAL_STATE = 401,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    NOT_SUPPORTED = 801,
    STREAM_CAPTURE_UNSUPPORTED = 900,
    STREAM_CAPTURE_INVALIDATED = 901,
    STREAM_CAPTURE_IMPLICIT = 906,
    STREAM_CAPTURE_WRONG_THREAD = 908,
};

// CUstreamCaptureMode.
enum : int { CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2 };

// CUstreamCaptureStatus.
enum : int { CAPTURE_STATUS_NONE = 0, CAPTURE_STATUS_ACTIVE = 1, CAPTURE_STATUS_INVALIDATED = 2 };

// The special stream handles of cuda.h: CU_STREAM_LEGACY and CU_STREAM_PER_THREAD (the null
// stream is the legacy one).
constexpr uintptr_t STREAM_LEGACY = 1;
constexpr uintptr_t STREAM_PER_THREAD = 2;

constexpr size_t GUARD = 256;  // bytes on each side of an allocation
constexpr unsigned char GUARD_BYTE = 0xa5;
constexpr unsigned DYNAMIC_SHARED_LIMIT = 48 << 10;

struct Allocation {
    size_t bytes;
    unsigned char* base;  // GUARD bytes, then the user's bytes, then GUARD bytes
};

struct Module {
    std::string image;
};

struct Event {
    std::chrono::steady_clock::time_point at;
    bool recorded = false;
};

// An asynchronous device-to-host copy not yet landed in host memory.
struct PendingCopy {
    void* dst;
    std::vector<unsigned char> data;
};

// One operation recorded into a graph. `run` does it at a launch, with the checks the direct
// call does at the time of the call (pointers into live allocations, pinned host memory,
// guard bytes); `what` names it in messages.
struct Op {
    std::string what;
    std::function<CUresult()> run;
};

// The operations of a graph, in stream order. A graph and the executable graphs made from it
// share them, so either may be destroyed first.
using Ops = std::vector<std::shared_ptr<const Op>>;

struct Graph {
    Ops ops;
};

struct GraphExec {
    Ops ops;
};

// A capture in progress on a stream (cuStreamBeginCapture_v2 to cuStreamEndCapture).
struct Capture {
    int mode;
    std::thread::id thread;  // the thread that began it
    bool invalidated = false;
    Ops ops;
};

struct Stream {
    int device;     // the device whose context was current when it was created
    bool blocking;  // created without CU_STREAM_NON_BLOCKING: synchronises with the legacy stream
    std::unique_ptr<Capture> capture;  // while capturing
};

// Work of the cuBLAS stand-ins recorded into a graph (gpu_emulate_defer): the library's
// closure, released through its own `drop` when the last graph holding it is destroyed.
struct HostWork {
    void (*run)(void*);
    void (*drop)(void*);
    void* ctx;
    HostWork(void (*r)(void*), void (*d)(void*), void* c) : run(r), drop(d), ctx(c) {}
    HostWork(const HostWork&) = delete;
    HostWork& operator=(const HostWork&) = delete;
    ~HostWork() {
        if (drop) drop(ctx);
    }
};

struct State {
    std::recursive_mutex lock;
    std::map<uintptr_t, size_t> pinned;  // cuMemAllocHost allocations: address -> bytes
    std::vector<PendingCopy> pending;    // cuMemcpyDtoHAsync results, in order
    bool initialised = false;
    int devices = 1;
    int cc = 90;
    std::map<uintptr_t, Allocation> allocations;  // by the user's address
    unsigned long long allocated = 0;
    unsigned long long total_memory = 16ull << 30;  // GPU_EMULATE_MEMORY_MIB
    // GPU_EMULATE_UNSEEN_MIB: memory in use that cuMemGetInfo leaves out until an allocation
    // fails for lack of it, as when another process allocates between the engine's query
    // and its allocation.
    unsigned long long unseen = 0;
    bool unseen_shown = false;
    std::vector<EmuKernel> kernels;
    int contexts[64] = {};  // one primary context per device: its address is the handle
    // Live streams, graphs and executable graphs, so that a destroyed or foreign handle is
    // refused rather than dereferenced; live events, for the event record nodes of graphs.
    std::set<Stream*> streams;
    std::set<Graph*> graphs;
    std::set<GraphExec*> execs;
    std::set<Event*> events;
};

// The device whose context the calling thread has made current (cuCtxSetCurrent).
thread_local int current_device = -1;

State& state() {
    static State s;
    return s;
}

int env_int(const char* name, int fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::atoi(v) : fallback;
}

bool valid_device(CUdevice d) { return d >= 0 && d < state().devices; }

// The allocation holding [p, p + bytes) (its user address and record), or null.
const std::pair<const uintptr_t, Allocation>* holding(uintptr_t p, size_t bytes) {
    auto& a = state().allocations;
    auto it = a.upper_bound(p);
    if (it == a.begin()) return nullptr;
    --it;
    if (p + bytes <= it->first + it->second.bytes) return &*it;
    return nullptr;
}

// Whether [p, p + bytes) lies in one live pinned host allocation.
bool in_pinned(const void* p, size_t bytes) {
    auto& m = state().pinned;
    auto it = m.upper_bound(reinterpret_cast<uintptr_t>(p));
    if (it == m.begin()) return false;
    --it;
    return reinterpret_cast<uintptr_t>(p) + bytes <= it->first + it->second;
}

// Lands every pending asynchronous device-to-host copy (a synchronising call).
void land_copies() {
    for (auto& c : state().pending) std::memcpy(c.dst, c.data.data(), c.data.size());
    state().pending.clear();
}

// "" when every guard is intact, else which allocation was written out of bounds.
std::string damaged_guards() {
    for (auto& [user, a] : state().allocations) {
        const unsigned char* after = a.base + GUARD + a.bytes;
        for (size_t i = 0; i < GUARD; i++) {
            if (a.base[i] != GUARD_BYTE || after[i] != GUARD_BYTE) {
                char msg[160];
                std::snprintf(msg, sizeof msg,
                              "a write out of bounds of the %zu-byte allocation at %#llx (%s)",
                              a.bytes, (unsigned long long)user,
                              a.base[i] != GUARD_BYTE ? "before its start" : "past its end");
                // Restore the guards, so that one fault is reported once.
                std::memset(a.base, GUARD_BYTE, GUARD);
                std::memset(a.base + GUARD + a.bytes, GUARD_BYTE, GUARD);
                return msg;
            }
        }
    }
    return "";
}

CUresult after_write(const char* what) {
    std::string why = damaged_guards();
    if (why.empty()) return SUCCESS;
    std::fprintf(stderr, "emulated GPU: %s: %s\n", what, why.c_str());
    return ILLEGAL_ADDRESS;
}

// The byte length of a cubin (ELF64) or PTX (NUL-terminated text) image.
size_t image_length(const void* image) {
    const unsigned char* p = static_cast<const unsigned char*>(image);
    if (std::memcmp(p, "\x7f" "ELF", 4) == 0 && p[4] == 2) {
        uint64_t shoff;
        uint16_t shentsize, shnum;
        std::memcpy(&shoff, p + 0x28, 8);
        std::memcpy(&shentsize, p + 0x3a, 2);
        std::memcpy(&shnum, p + 0x3c, 2);
        return shoff + (uint64_t)shentsize * shnum;
    }
    return std::strlen(static_cast<const char*>(image));
}

const char* error_name(CUresult e) {
    switch (e) {
        case SUCCESS: return "CUDA_SUCCESS";
        case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
        case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case STREAM_CAPTURE_IMPLICIT: return "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
        case STREAM_CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return nullptr;
    }
}

const char* error_text(CUresult e) {
    switch (e) {
        case SUCCESS: return "no error";
        case INVALID_VALUE: return "invalid argument";
        case OUT_OF_MEMORY: return "out of memory";
        case NOT_INITIALIZED: return "initialization error";
        case NO_DEVICE: return "no CUDA-capable device is detected";
        case INVALID_DEVICE: return "invalid device ordinal";
        case INVALID_IMAGE: return "device kernel image is invalid";
        case INVALID_CONTEXT: return "invalid device context";
        case INVALID_HANDLE: return "invalid resource handle";
        case ILLEGAL_STATE: return "the operation cannot be performed in the present state";
        case NOT_FOUND: return "named symbol not found";
        case ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
        case NOT_SUPPORTED: return "operation not supported";
        case STREAM_CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
        case STREAM_CAPTURE_INVALIDATED:
            return "operation failed due to a previous error during capture";
        case STREAM_CAPTURE_IMPLICIT:
            return "operation would make the legacy stream depend on a capturing blocking stream";
        case STREAM_CAPTURE_WRONG_THREAD:
            return "attempt to terminate a thread-local capture sequence from another thread";
        default: return nullptr;
    }
}

// ------------------------------------------------------------------ stream capture

bool is_legacy(CUstream s) {
    return s == nullptr || reinterpret_cast<uintptr_t>(s) == STREAM_LEGACY;
}

// The device of the calling thread's current context (0 when none is current).
int this_device() { return std::max(current_device, 0); }

// `s` as a live stream made by cuStreamCreate, or null (the special handles, and handles
// the driver does not know, are not).
Stream* live_stream(CUstream s) {
    auto& t = state().streams;
    auto it = t.find(static_cast<Stream*>(s));
    return it == t.end() ? nullptr : *it;
}

// The capture in progress on `s`, or null.
Capture* capture_of(CUstream s) {
    Stream* st = live_stream(s);
    return st ? st->capture.get() : nullptr;
}

CUresult refuse(Capture* c, CUresult e, const char* what, const char* why) {
    c->invalidated = true;
    std::fprintf(stderr, "emulated GPU: %s: %s; the capture is invalidated\n", what, why);
    return e;
}

// Work on the legacy stream (an asynchronous operation on it, a synchronous copy or memset,
// synchronising it) waits for every blocking stream of the device, which a capturing stream
// cannot be waited for: STREAM_CAPTURE_IMPLICIT, and the capture invalidated, while one of
// the calling thread's device captures.
CUresult legacy_conflict(const char* what) {
    CUresult r = SUCCESS;
    for (Stream* st : state().streams) {
        if (st->capture && st->blocking && st->device == this_device())
            r = refuse(st->capture.get(), STREAM_CAPTURE_IMPLICIT, what,
                       "the legacy stream waits for a blocking stream that is capturing");
    }
    return r;
}

// A potentially unsafe call (an allocation, a free, a synchronous copy or memset, a
// synchronisation): STREAM_CAPTURE_UNSUPPORTED, and the captures that forbid it invalidated,
// while this thread has a capture in progress begun in global or thread-local mode, or another
// thread one begun in global mode (every thread's own capture mode is the default, global).
CUresult unsafe_call(const char* what) {
    const std::thread::id me = std::this_thread::get_id();
    CUresult r = SUCCESS;
    for (Stream* st : state().streams) {
        Capture* c = st->capture.get();
        if (c == nullptr || c->mode == CAPTURE_RELAXED) continue;
        if (c->thread == me || c->mode == CAPTURE_GLOBAL)
            r = refuse(c, STREAM_CAPTURE_UNSUPPORTED, what,
                       c->thread == me ? "not permitted while this thread captures a stream"
                                       : "not permitted while another thread captures a "
                                         "stream in global mode");
    }
    return r;
}

// Synchronising with `s`: refused (and the capture invalidated) when `s` is capturing, or is
// the legacy stream while a blocking stream of this device captures.
CUresult sync_with(CUstream s, const char* what) {
    if (is_legacy(s)) return legacy_conflict(what);
    if (Capture* c = capture_of(s))
        return refuse(c, STREAM_CAPTURE_UNSUPPORTED, what, "the stream is capturing");
    return SUCCESS;
}

// Where an asynchronous operation on `s` goes: *cap is the capture to record it into, or null
// to run it now; an error when it may not be enqueued (a capture already invalidated, or
// the legacy stream while a blocking stream captures).
CUresult enqueue_on(CUstream s, const char* what, Capture** cap) {
    *cap = nullptr;
    if (is_legacy(s)) return legacy_conflict(what);
    Capture* c = capture_of(s);
    if (c == nullptr) return SUCCESS;
    if (c->invalidated) return STREAM_CAPTURE_INVALIDATED;
    *cap = c;
    return SUCCESS;
}

// An operation refused while recording into `cap` (if any) invalidates the capture, as a
// failed call invalidates a real capture sequence.
CUresult failed(Capture* cap, CUresult e) {
    if (cap) cap->invalidated = true;
    return e;
}

void record(Capture* cap, std::string what, std::function<CUresult()> run) {
    cap->ops.push_back(std::make_shared<const Op>(Op{std::move(what), std::move(run)}));
}

// An asynchronous operation whose arguments were checked: recorded into `cap` when the
// stream captures, else done now. `op` checks its memory again (a replay may find it gone:
// replay_fault; now it is there) and does the work.
CUresult run_or_record(Capture* cap, const char* what, std::function<CUresult()> op) {
    if (!cap) return op();
    record(cap, what, std::move(op));
    return SUCCESS;
}

// A recorded operation that finds its memory gone at a launch (what the GPU reports as an
// illegal address).
CUresult replay_fault(const std::string& what, const std::string& why) {
    std::fprintf(stderr, "emulated GPU: graph launch: %s: %s\n", what.c_str(), why.c_str());
    return ILLEGAL_ADDRESS;
}

std::string not_device(uintptr_t p, size_t bytes, const char* role) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "the %s [%#llx, +%zu) is not inside a live device allocation",
                  role, (unsigned long long)p, bytes);
    return msg;
}

std::string not_pinned(const void* p, size_t bytes, const char* role) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "the %s [%p, +%zu) is not inside a live pinned allocation",
                  role, p, bytes);
    return msg;
}

// The device-to-host copy of cuMemcpyDtoHAsync, as it runs: the data is taken now and lands at
// the next synchronising call.
void copy_to_host_later(void* dst, CUdeviceptr src, size_t bytes) {
    auto* from = reinterpret_cast<const unsigned char*>(src);
    state().pending.push_back(PendingCopy{dst, std::vector<unsigned char>(from, from + bytes)});
    std::memset(dst, 0xff, bytes);
}

// Deletes `handle` if it is one of the live objects in `live`.
template <class T>
CUresult destroy_live(std::set<T*>& live, void* handle) {
    auto it = live.find(static_cast<T*>(handle));
    if (it == live.end()) return INVALID_HANDLE;
    T* object = *it;
    live.erase(it);
    delete object;
    return SUCCESS;
}

}  // namespace

std::string emu_check_device_pointer(const void* p) {
    if (p == nullptr) return "";
    if (holding(reinterpret_cast<uintptr_t>(p), 0)) return "";
    char msg[96];
    std::snprintf(msg, sizeof msg, "%p is not in any device allocation", p);
    return msg;
}

#define LOCKED std::lock_guard<std::recursive_mutex> guard(state().lock)
#define NEED_INIT \
    if (!state().initialised) return NOT_INITIALIZED

// Only the driver's entry points are exported (build.sh hides everything else, so that no
// symbol of the emulator stands in for one of another library in the process).
#pragma GCC visibility push(default)
extern "C" {

CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    *s = error_name(e);
    return *s ? SUCCESS : INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    *s = error_text(e);
    return *s ? SUCCESS : INVALID_VALUE;
}

// Other NVIDIA libraries loaded in the same process (NVRTC among them) look for the
// driver's private tables here; the emulation has none.
CUresult cuGetExportTable(const void** table, const void* uuid) {
    if (!table || !uuid) return INVALID_VALUE;
    *table = nullptr;
    return NOT_SUPPORTED;
}

CUresult cuDriverGetVersion(int* v) {
    if (!v) return INVALID_VALUE;
    *v = 13000;
    return SUCCESS;
}

CUresult cuInit(unsigned flags) {
    LOCKED;
    if (flags != 0) return INVALID_VALUE;
    State& s = state();
    if (!s.initialised) {
        s.devices = std::clamp(env_int("GPU_EMULATE_DEVICES", 1), 0, 64);
        s.cc = env_int("GPU_EMULATE_CC", 90);
        if (int mib = env_int("GPU_EMULATE_MEMORY_MIB", 0); mib > 0)
            s.total_memory = (unsigned long long)mib << 20;
        s.unseen = (unsigned long long)std::max(env_int("GPU_EMULATE_UNSEEN_MIB", 0), 0) << 20;
        s.kernels = emu_kernels_main();
        for (auto& k : emu_kernels_flash()) s.kernels.push_back(std::move(k));
        s.initialised = true;
    }
    return s.devices > 0 ? SUCCESS : NO_DEVICE;
}

CUresult cuDeviceGetCount(int* n) {
    LOCKED;
    NEED_INIT;
    if (!n) return INVALID_VALUE;
    *n = state().devices;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    LOCKED;
    NEED_INIT;
    if (!d) return INVALID_VALUE;
    if (!valid_device(ordinal)) return INVALID_DEVICE;
    *d = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    LOCKED;
    NEED_INIT;
    if (!name || len <= 0) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    std::snprintf(name, len, "CPU emulation of a CUDA GPU (sm_%d)", state().cc);
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    LOCKED;
    NEED_INIT;
    if (!bytes) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    *bytes = state().total_memory;
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    LOCKED;
    NEED_INIT;
    if (!v) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                  // MAX_THREADS_PER_BLOCK
        case 8: *v = DYNAMIC_SHARED_LIMIT; break;  // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                   // WARP_SIZE
        case 13: *v = 1980000; break;              // CLOCK_RATE (kHz)
        case 16: *v = 132; break;                  // MULTIPROCESSOR_COUNT
        case 33: *v = d; break;                    // PCI_BUS_ID
        case 75: *v = state().cc / 10; break;      // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = state().cc % 10; break;      // COMPUTE_CAPABILITY_MINOR
        case 97: *v = 227 << 10; break;            // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        default: *v = 0; break;
    }
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    LOCKED;
    NEED_INIT;
    if (!ctx) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    *ctx = &state().contexts[d];
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    LOCKED;
    NEED_INIT;
    return valid_device(d) ? SUCCESS : INVALID_DEVICE;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    LOCKED;
    NEED_INIT;
    int* c = static_cast<int*>(ctx);
    State& s = state();
    if (c == nullptr) {
        current_device = -1;
        return SUCCESS;
    }
    if (c < s.contexts || c >= s.contexts + s.devices) return INVALID_VALUE;
    current_device = int(c - s.contexts);
    return SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* d) {
    LOCKED;
    NEED_INIT;
    if (!d) return INVALID_VALUE;
    if (current_device < 0) return INVALID_CONTEXT;
    *d = current_device;
    return SUCCESS;
}

CUresult cuCtxSynchronize() {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuCtxSynchronize")) return r;
    // It waits for every stream of the context, a capturing one too.
    CUresult r = SUCCESS;
    for (Stream* st : state().streams) {
        if (st->capture && st->device == this_device())
            r = refuse(st->capture.get(), STREAM_CAPTURE_UNSUPPORTED, "cuCtxSynchronize",
                       "a stream of the context is capturing");
    }
    if (r != SUCCESS) return r;
    land_copies();
    return SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemAlloc")) return r;
    State& s = state();
    if (!p || bytes == 0) return INVALID_VALUE;
    if (s.allocated + s.unseen + bytes > s.total_memory) {
        s.unseen_shown = true;
        return OUT_OF_MEMORY;
    }
    // 256-byte aligned user addresses, as cuMemAlloc's.
    size_t total = GUARD + ((bytes + 255) & ~size_t(255)) + GUARD;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(256, total));
    if (!base) return OUT_OF_MEMORY;
    std::memset(base, GUARD_BYTE, total);
    std::memset(base + GUARD, 0xff, bytes);
    uintptr_t user = reinterpret_cast<uintptr_t>(base + GUARD);
    s.allocations[user] = Allocation{bytes, base};
    s.allocated += bytes;
    *p = user;
    return SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemFree")) return r;
    State& s = state();
    auto it = s.allocations.find(p);
    if (it == s.allocations.end()) return INVALID_VALUE;
    CUresult r = after_write("cuMemFree");
    s.allocated -= it->second.bytes;
    std::free(it->second.base);
    s.allocations.erase(it);
    return r;
}

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    LOCKED;
    NEED_INIT;
    if (!free || !total) return INVALID_VALUE;
    const State& s = state();
    unsigned long long used = s.allocated + (s.unseen_shown ? s.unseen : 0);
    *total = s.total_memory;
    *free = used < s.total_memory ? s.total_memory - used : 0;
    return SUCCESS;
}

// Of a pointer into a live allocation: CU_POINTER_ATTRIBUTE_MEMORY_TYPE (2: always
// CU_MEMORYTYPE_DEVICE), _RANGE_START_ADDR (11) and _RANGE_SIZE (12), the allocation's start
// and byte size (the NCCL stand-in, nccl.cpp, checks its buffers with them); any other
// pointer is INVALID_VALUE, as host memory the driver does not know is.
CUresult cuPointerGetAttribute(void* data, int attribute, CUdeviceptr p) {
    LOCKED;
    NEED_INIT;
    if (!data) return INVALID_VALUE;
    // A pointer inside the allocation (one past its end is not).
    auto it = holding(p, 1);
    if (!it) return INVALID_VALUE;
    switch (attribute) {
        case 2: *static_cast<unsigned*>(data) = 2; return SUCCESS;
        case 11: *static_cast<CUdeviceptr*>(data) = it->first; return SUCCESS;
        case 12: *static_cast<size_t*>(data) = it->second.bytes; return SUCCESS;
        default: return NOT_SUPPORTED;
    }
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemcpyHtoD")) return r;
    if (CUresult r = legacy_conflict("cuMemcpyHtoD")) return r;
    if (!holding(dst, bytes) || (bytes && !src)) return INVALID_VALUE;
    land_copies();
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemcpyDtoH")) return r;
    if (CUresult r = legacy_conflict("cuMemcpyDtoH")) return r;
    if (!holding(src, bytes) || (bytes && !dst)) return INVALID_VALUE;
    land_copies();
    std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}

CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemAllocHost")) return r;
    if (!p || bytes == 0) return INVALID_VALUE;
    void* m = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!m) return OUT_OF_MEMORY;
    std::memset(m, 0xff, bytes);
    state().pinned[reinterpret_cast<uintptr_t>(m)] = bytes;
    *p = m;
    return SUCCESS;
}

CUresult cuMemFreeHost(void* p) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemFreeHost")) return r;
    auto it = state().pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == state().pinned.end()) return INVALID_VALUE;
    land_copies();
    state().pinned.erase(it);
    std::free(p);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuMemcpyHtoDAsync", &cap)) return r;
    if (!holding(dst, bytes) || !in_pinned(src, bytes)) return failed(cap, INVALID_VALUE);
    // The host buffer is read when the copy runs, as the GPU's copy node reads it.
    return run_or_record(cap, "cuMemcpyHtoDAsync", [dst, src, bytes]() -> CUresult {
        const char* what = "cuMemcpyHtoDAsync";
        if (!holding(dst, bytes)) return replay_fault(what, not_device(dst, bytes, "destination"));
        if (!in_pinned(src, bytes)) return replay_fault(what, not_pinned(src, bytes, "source"));
        std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
        return SUCCESS;
    });
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuMemcpyDtoHAsync", &cap)) return r;
    if (!holding(src, bytes) || !in_pinned(dst, bytes)) return failed(cap, INVALID_VALUE);
    return run_or_record(cap, "cuMemcpyDtoHAsync", [dst, src, bytes]() -> CUresult {
        const char* what = "cuMemcpyDtoHAsync";
        if (!holding(src, bytes)) return replay_fault(what, not_device(src, bytes, "source"));
        if (!in_pinned(dst, bytes)) return replay_fault(what, not_pinned(dst, bytes, "destination"));
        copy_to_host_later(dst, src, bytes);
        return SUCCESS;
    });
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuMemcpyDtoDAsync", &cap)) return r;
    if (!holding(dst, bytes) || !holding(src, bytes)) return failed(cap, INVALID_VALUE);
    return run_or_record(cap, "cuMemcpyDtoDAsync", [dst, src, bytes]() -> CUresult {
        const char* what = "cuMemcpyDtoDAsync";
        if (!holding(src, bytes)) return replay_fault(what, not_device(src, bytes, "source"));
        if (!holding(dst, bytes)) return replay_fault(what, not_device(dst, bytes, "destination"));
        std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
        return SUCCESS;
    });
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuMemsetD8")) return r;
    if (CUresult r = legacy_conflict("cuMemsetD8")) return r;
    if (!holding(dst, n)) return INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(dst), value, n);
    return SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream s) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuMemsetD8Async", &cap)) return r;
    if (!holding(dst, n)) return failed(cap, INVALID_VALUE);
    return run_or_record(cap, "cuMemsetD8Async", [dst, value, n]() -> CUresult {
        if (!holding(dst, n))
            return replay_fault("cuMemsetD8Async", not_device(dst, n, "destination"));
        std::memset(reinterpret_cast<void*>(dst), value, n);
        return SUCCESS;
    });
}

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    LOCKED;
    NEED_INIT;
    if (!m || !image) return INVALID_VALUE;
    size_t len = image_length(image);
    if (len == 0) return INVALID_IMAGE;
    *m = new Module{std::string(static_cast<const char*>(image), len)};
    return SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) {
    LOCKED;
    NEED_INIT;
    if (!m) return INVALID_HANDLE;
    delete static_cast<Module*>(m);
    return SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    LOCKED;
    NEED_INIT;
    if (!f || !m || !name) return INVALID_VALUE;
    // The compiled image names its entry points (PTX `.entry name`, cubin symbol table).
    if (static_cast<Module*>(m)->image.find(name) == std::string::npos) return NOT_FOUND;
    for (auto& k : state().kernels) {
        if (k.name == name) {
            *f = &k;
            return SUCCESS;
        }
    }
    std::fprintf(stderr,
                 "emulated GPU: kernel %s is compiled but not emulated: add it to "
                 "tools/gpu_emulate/kernels.cpp\n",
                 name);
    return NOT_FOUND;
}

CUresult cuFuncGetName(const char** name, CUfunction f) {
    LOCKED;
    NEED_INIT;
    if (!name || !f) return INVALID_VALUE;
    *name = static_cast<EmuKernel*>(f)->name.c_str();
    return SUCCESS;
}

// Runs a launch's blocks first to last or last to first, chosen per launch by a hash of the
// launch count (a GPU may run blocks in either order), so that the same work launched twice
// is likely to see both orders: a kernel whose result depends on the order of its blocks
// (atomics adding into one place) then gives different bits from run to run here as on a
// GPU, and tests/cuda_engine.rs's determinism test fails. GPU_EMULATE_BLOCK_ORDER=forward
// keeps the natural order.
void emulate_launch(dim3 grid, unsigned bx, const std::function<void()>& body) {
    static unsigned long long launches = 0;
    static const bool mixed = [] {
        const char* v = std::getenv("GPU_EMULATE_BLOCK_ORDER");
        return !(v && std::strcmp(v, "forward") == 0);
    }();
    unsigned long long h = ++launches * 0x9E3779B97F4A7C15ull;
    emu_blocks_reversed = mixed && (h >> 63) != 0;
    emulate(grid, bx, body);
    emu_blocks_reversed = false;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream s,
                        void** params, void** extra) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuLaunchKernel", &cap)) return r;
    if (!f) return failed(cap, INVALID_HANDLE);
    auto* k = static_cast<EmuKernel*>(f);
    if (extra) return failed(cap, NOT_SUPPORTED);
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0)
        return failed(cap, INVALID_VALUE);
    if (by != 1 || bz != 1) {
        std::fprintf(stderr, "emulated GPU: %s: only one-dimensional blocks are emulated\n",
                     k->name.c_str());
        return failed(cap, NOT_SUPPORTED);
    }
    if (bx > 1024 || gy > 65535 || gz > 65535) return failed(cap, INVALID_VALUE);
    if (shared > DYNAMIC_SHARED_LIMIT) return failed(cap, INVALID_VALUE);
    if (!params) return failed(cap, INVALID_VALUE);
    if (cap) {
        // The parameters are copied now; their pointers are checked when the graph runs.
        std::shared_ptr<const EmuBoundParams> bound = k->bind(params);
        dim3 grid{gx, gy, gz};
        record(cap, k->name, [k, bound, grid, bx]() -> CUresult {
            void** p = const_cast<void**>(bound->params.data());
            std::string bad = k->check_pointers(p);
            if (!bad.empty()) return replay_fault("launch of " + k->name, bad);
            emu_current = k->name;
            emulate_launch(grid, bx, [&] { k->body(p); });
            return after_write(k->name.c_str());
        });
        return SUCCESS;
    }
    std::string bad = k->check_pointers(params);
    if (!bad.empty()) {
        std::fprintf(stderr, "emulated GPU: launch of %s: %s\n", k->name.c_str(), bad.c_str());
        return ILLEGAL_ADDRESS;
    }
    emu_current = k->name;
    emulate_launch(dim3{gx, gy, gz}, bx, [&] { k->body(params); });
    return after_write(k->name.c_str());
}

CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    LOCKED;
    NEED_INIT;
    if (!s || flags > 1) return INVALID_VALUE;
    auto* st = new Stream{this_device(), flags == 0, nullptr};
    state().streams.insert(st);
    *s = st;
    return SUCCESS;
}

CUresult cuStreamSynchronize(CUstream s) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuStreamSynchronize")) return r;
    if (CUresult r = sync_with(s, "cuStreamSynchronize")) return r;
    land_copies();
    return SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    LOCKED;
    NEED_INIT;
    Stream* st = live_stream(s);
    if (!st) return INVALID_HANDLE;
    if (st->capture) {
        std::fprintf(stderr, "emulated GPU: cuStreamDestroy: the stream is capturing (end the "
                             "capture first)\n");
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    state().streams.erase(st);
    delete st;
    return SUCCESS;
}

CUresult cuStreamQuery(CUstream s) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuStreamQuery")) return r;
    if (CUresult r = sync_with(s, "cuStreamQuery")) return r;
    land_copies();
    return SUCCESS;  // all work is done before each call returns
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuStreamWaitEvent", &cap)) return r;
    if (cap)
        return refuse(cap, STREAM_CAPTURE_UNSUPPORTED, "cuStreamWaitEvent",
                      "event waits on a capturing stream are not emulated");
    if (!e) return INVALID_HANDLE;
    return flags == 0 ? SUCCESS : INVALID_VALUE;
}

CUresult cuEventCreate(CUevent* e, unsigned flags) {
    LOCKED;
    NEED_INIT;
    if (!e || flags > 0xf) return INVALID_VALUE;
    auto* ev = new Event{};
    state().events.insert(ev);
    *e = ev;
    return SUCCESS;
}

// cuda.h CU_EVENT_RECORD_EXTERNAL.
constexpr unsigned EVENT_RECORD_EXTERNAL = 1;

CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned flags) {
    LOCKED;
    NEED_INIT;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuEventRecordWithFlags", &cap)) return r;
    if (flags > EVENT_RECORD_EXTERNAL) return failed(cap, INVALID_VALUE);
    if (cap && flags != EVENT_RECORD_EXTERNAL)
        return refuse(cap, STREAM_CAPTURE_UNSUPPORTED, "cuEventRecord",
                      "event records on a capturing stream without CU_EVENT_RECORD_EXTERNAL "
                      "(cross-stream dependencies) are not emulated");
    if (!e) return failed(cap, INVALID_HANDLE);
    auto* ev = static_cast<Event*>(e);
    auto mark = [ev]() -> CUresult {
        if (!state().events.count(ev)) {
            std::fprintf(stderr, "emulated GPU: a graph's event record node names an event "
                                 "that was destroyed\n");
            return INVALID_HANDLE;
        }
        ev->at = std::chrono::steady_clock::now();
        ev->recorded = true;
        return SUCCESS;
    };
    return run_or_record(cap, "cuEventRecordWithFlags", mark);
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    return cuEventRecordWithFlags(e, s, 0);
}

CUresult cuEventSynchronize(CUevent e) {
    LOCKED;
    NEED_INIT;
    if (CUresult r = unsafe_call("cuEventSynchronize")) return r;
    if (!e) return INVALID_HANDLE;
    land_copies();
    return SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    LOCKED;
    NEED_INIT;
    if (!e) return INVALID_HANDLE;
    return destroy_live(state().events, e);
}

CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    LOCKED;
    NEED_INIT;
    if (!ms) return INVALID_VALUE;
    if (!start || !end) return INVALID_HANDLE;
    auto *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
    if (!a->recorded || !b->recorded) return INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    return cuEventElapsedTime_v2(ms, start, end);
}

CUresult cuStreamBeginCapture_v2(CUstream s, int mode) {
    LOCKED;
    NEED_INIT;
    if (is_legacy(s)) return STREAM_CAPTURE_UNSUPPORTED;
    Stream* st = live_stream(s);
    if (!st) return INVALID_HANDLE;
    if (mode < CAPTURE_GLOBAL || mode > CAPTURE_RELAXED) return INVALID_VALUE;
    if (st->capture) return ILLEGAL_STATE;
    st->capture = std::make_unique<Capture>();
    st->capture->mode = mode;
    st->capture->thread = std::this_thread::get_id();
    return SUCCESS;
}

CUresult cuStreamEndCapture(CUstream s, CUgraph* graph) {
    LOCKED;
    NEED_INIT;
    if (!graph) return INVALID_VALUE;
    if (is_legacy(s)) return ILLEGAL_STATE;
    Stream* st = live_stream(s);
    if (!st) return INVALID_HANDLE;
    if (!st->capture) return ILLEGAL_STATE;
    Capture& c = *st->capture;
    if (c.mode != CAPTURE_RELAXED && c.thread != std::this_thread::get_id())
        return STREAM_CAPTURE_WRONG_THREAD;  // the capture goes on
    std::unique_ptr<Capture> ended = std::move(st->capture);
    if (ended->invalidated) {
        *graph = nullptr;
        return STREAM_CAPTURE_INVALIDATED;
    }
    auto* g = new Graph{std::move(ended->ops)};
    state().graphs.insert(g);
    *graph = g;
    return SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream s, int* status) {
    LOCKED;
    NEED_INIT;
    if (!status) return INVALID_VALUE;
    if (is_legacy(s)) {
        for (Stream* st : state().streams) {
            if (st->capture && st->blocking && st->device == this_device())
                return STREAM_CAPTURE_IMPLICIT;  // the capture goes on
        }
        *status = CAPTURE_STATUS_NONE;
        return SUCCESS;
    }
    if (reinterpret_cast<uintptr_t>(s) == STREAM_PER_THREAD) {
        *status = CAPTURE_STATUS_NONE;
        return SUCCESS;
    }
    Stream* st = live_stream(s);
    if (!st) return INVALID_HANDLE;
    *status = !st->capture                ? CAPTURE_STATUS_NONE
              : st->capture->invalidated ? CAPTURE_STATUS_INVALIDATED
                                         : CAPTURE_STATUS_ACTIVE;
    return SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long flags) {
    LOCKED;
    NEED_INIT;
    if (!exec) return INVALID_VALUE;
    auto it = state().graphs.find(static_cast<Graph*>(graph));
    if (it == state().graphs.end()) return INVALID_HANDLE;
    if (flags != 0) return INVALID_VALUE;
    auto* e = new GraphExec{(*it)->ops};
    state().execs.insert(e);
    *exec = e;
    return SUCCESS;
}

// Runs the recorded operations in order, now, each with the checks of its direct call; the
// first that fails ends the launch with its error (CUDA_ERROR_ILLEGAL_ADDRESS for memory
// that is gone, named on stderr).
CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    LOCKED;
    NEED_INIT;
    auto it = state().execs.find(static_cast<GraphExec*>(exec));
    if (it == state().execs.end()) return INVALID_HANDLE;
    Capture* cap;
    if (CUresult r = enqueue_on(s, "cuGraphLaunch", &cap)) return r;
    if (cap)
        return refuse(cap, STREAM_CAPTURE_UNSUPPORTED, "cuGraphLaunch",
                      "graph launches into a capture are not emulated");
    for (const auto& op : (*it)->ops) {
        if (CUresult r = op->run()) return r;
    }
    return SUCCESS;
}

CUresult cuGraphExecDestroy(CUgraphExec exec) {
    LOCKED;
    NEED_INIT;
    return destroy_live(state().execs, exec);
}

CUresult cuGraphDestroy(CUgraph graph) {
    LOCKED;
    NEED_INIT;
    return destroy_live(state().graphs, graph);
}

// For the cuBLAS stand-ins (cublas.cpp, cublaslt.cpp; see the top of this file): work `what`
// for `stream`, to be done by run(ctx). Returns 0 when it is to run now (the stream is not
// capturing; the caller runs it and keeps ctx), 1 when it was recorded into the stream's
// capture (the graph owns ctx from then on and calls drop(ctx) when the last graph holding
// it is destroyed; at each launch the `count` pointers are checked to be null or inside live
// allocations, run(ctx) is called and the guard bytes checked), or a negative CUresult
// when it may not be enqueued (-901: the capture was invalidated; -906: the legacy stream
// while a blocking stream captures), ctx then being the caller's.
int gpu_emulate_defer(void* stream, const char* what, const void* const* pointers, size_t count,
                      void (*run)(void*), void (*drop)(void*), void* ctx) {
    LOCKED;
    if (!state().initialised || !what || !run) return 0;
    Capture* cap;
    if (CUresult r = enqueue_on(stream, what, &cap)) return -r;
    if (!cap) return 0;
    auto work = std::make_shared<HostWork>(run, drop, ctx);
    std::vector<const void*> ptrs(pointers, pointers + (pointers ? count : 0));
    record(cap, what, [work, ptrs, name = std::string(what)]() -> CUresult {
        for (size_t i = 0; i < ptrs.size(); i++) {
            std::string why = emu_check_device_pointer(ptrs[i]);
            if (!why.empty())
                return replay_fault(name, "pointer " + std::to_string(i) + ": " + why);
        }
        work->run(work->ctx);
        return after_write(name.c_str());
    });
    return 1;
}

}  // extern "C"
#pragma GCC visibility pop
