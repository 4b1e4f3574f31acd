// driver.cpp: a CPU stand-in for the NVIDIA driver library (libcuda.so.1), so that the CUDA
// engine and its tests run on a machine without a GPU. It exports the driver entry points
// nanogpt loads (src/cuda/driver.rs) with cuda.h's C signatures and does the work on the
// CPU:
//
// - one device (GPU_EMULATE_DEVICES sets how many), compute capability 9.0 (GPU_EMULATE_CC,
//   e.g. 80), 16 GiB of "device" memory that is host memory: a device pointer is a host
//   address. New allocations are filled with 0xff bytes (NaN as floats), as uninitialised
//   GPU memory holds garbage, so that a read of memory nothing wrote shows up; each has
//   guard bytes on both sides, checked after every kernel launch and copy, so that a
//   write out of bounds fails the launch (CUDA_ERROR_ILLEGAL_ADDRESS) and names the kernel.
// - modules: the image NVRTC compiled (cubin or PTX) is kept only to check that a function
//   looked up in it is really there; the functions run the same kernels/*.cu sources
//   compiled for the CPU (kernels.cpp, kernels_flash.cpp; tools/kernel_emulate/shim.h runs
//   the threads of a block as fibers). Every pointer parameter of a launch must be null or
//   point into a live allocation.
// - streams and events: every operation completes before its call returns (so ordering
//   between streams always holds); events record the host clock, so the profiler's
//   timings are CPU times. One exception: an asynchronous device-to-host copy takes its
//   data when enqueued but lands in host memory only at the next synchronising call
//   (stream, event or context synchronise, stream query, a synchronous copy, freeing the
//   pinned buffer); until then the host buffer holds 0xff bytes, so a host that reads the
//   result without waiting for it sees NaN.
// - pinned host memory (cuMemAllocHost): asynchronous copies must use it on the host side,
//   as the engine's staging buffers do; a pageable or freed host pointer is refused.
//
// Not emulated: several threads per block dimension other than x, more than 48 KiB of
// dynamic shared memory, peer access, graphs, and anything not listed in src/cuda/driver.rs.
// All calls are serialised by one lock.
#include "../kernel_emulate/shim.h"
#include "registry.h"
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef void* CUevent;

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
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    NOT_SUPPORTED = 801,
};

constexpr size_t GUARD = 256;  // bytes on each side of an allocation
constexpr unsigned char GUARD_BYTE = 0xa5;
constexpr unsigned long long TOTAL_MEMORY = 16ull << 30;
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

struct State {
    std::recursive_mutex lock;
    std::map<uintptr_t, size_t> pinned;  // cuMemAllocHost allocations: address -> bytes
    std::vector<PendingCopy> pending;    // cuMemcpyDtoHAsync results, in order
    bool initialised = false;
    int devices = 1;
    int cc = 90;
    std::map<uintptr_t, Allocation> allocations;  // by the user's address
    unsigned long long allocated = 0;
    std::vector<EmuKernel> kernels;
    int contexts[64] = {};  // one primary context per device: its address is the handle
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
        case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
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
        case NOT_FOUND: return "named symbol not found";
        case ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
        case NOT_SUPPORTED: return "operation not supported";
        default: return nullptr;
    }
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
    *bytes = TOTAL_MEMORY;
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
    land_copies();
    return SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCKED;
    NEED_INIT;
    State& s = state();
    if (!p || bytes == 0) return INVALID_VALUE;
    if (s.allocated + bytes > TOTAL_MEMORY) return OUT_OF_MEMORY;
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
    *total = TOTAL_MEMORY;
    *free = TOTAL_MEMORY - state().allocated;
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
    if (!holding(dst, bytes) || (bytes && !src)) return INVALID_VALUE;
    land_copies();
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    LOCKED;
    NEED_INIT;
    if (!holding(src, bytes) || (bytes && !dst)) return INVALID_VALUE;
    land_copies();
    std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}

CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    LOCKED;
    NEED_INIT;
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
    auto it = state().pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == state().pinned.end()) return INVALID_VALUE;
    land_copies();
    state().pinned.erase(it);
    std::free(p);
    return SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    LOCKED;
    NEED_INIT;
    if (!holding(dst, bytes) || !in_pinned(src, bytes)) return INVALID_VALUE;
    std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    LOCKED;
    NEED_INIT;
    if (!holding(src, bytes) || !in_pinned(dst, bytes)) return INVALID_VALUE;
    auto* from = reinterpret_cast<const unsigned char*>(src);
    state().pending.push_back(PendingCopy{dst, std::vector<unsigned char>(from, from + bytes)});
    std::memset(dst, 0xff, bytes);
    return SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    LOCKED;
    NEED_INIT;
    if (!holding(dst, bytes) || !holding(src, bytes)) return INVALID_VALUE;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    LOCKED;
    NEED_INIT;
    if (!holding(dst, n)) return INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(dst), value, n);
    return SUCCESS;
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

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream,
                        void** params, void** extra) {
    LOCKED;
    NEED_INIT;
    if (!f) return INVALID_HANDLE;
    auto* k = static_cast<EmuKernel*>(f);
    if (extra) return NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) return INVALID_VALUE;
    if (by != 1 || bz != 1) {
        std::fprintf(stderr, "emulated GPU: %s: only one-dimensional blocks are emulated\n",
                     k->name.c_str());
        return NOT_SUPPORTED;
    }
    if (bx > 1024 || gy > 65535 || gz > 65535) return INVALID_VALUE;
    if (shared > DYNAMIC_SHARED_LIMIT) return INVALID_VALUE;
    if (!params) return INVALID_VALUE;
    std::string bad = k->check_pointers(params);
    if (!bad.empty()) {
        std::fprintf(stderr, "emulated GPU: launch of %s: %s\n", k->name.c_str(), bad.c_str());
        return ILLEGAL_ADDRESS;
    }
    emu_current = k->name;
    emulate(dim3{gx, gy, gz}, bx, [&] { k->body(params); });
    return after_write(k->name.c_str());
}

CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    LOCKED;
    NEED_INIT;
    if (!s || flags > 1) return INVALID_VALUE;
    *s = new int(0);
    return SUCCESS;
}

CUresult cuStreamSynchronize(CUstream) {
    LOCKED;
    NEED_INIT;
    land_copies();
    return SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    LOCKED;
    NEED_INIT;
    if (!s) return INVALID_HANDLE;
    delete static_cast<int*>(s);
    return SUCCESS;
}

CUresult cuStreamQuery(CUstream) {
    LOCKED;
    NEED_INIT;
    land_copies();
    return SUCCESS;  // all work is done before each call returns
}

CUresult cuStreamWaitEvent(CUstream, CUevent e, unsigned flags) {
    LOCKED;
    NEED_INIT;
    if (!e) return INVALID_HANDLE;
    return flags == 0 ? SUCCESS : INVALID_VALUE;
}

CUresult cuEventCreate(CUevent* e, unsigned flags) {
    LOCKED;
    NEED_INIT;
    if (!e || flags > 0xf) return INVALID_VALUE;
    *e = new Event{};
    return SUCCESS;
}

CUresult cuEventRecord(CUevent e, CUstream) {
    LOCKED;
    NEED_INIT;
    if (!e) return INVALID_HANDLE;
    auto* ev = static_cast<Event*>(e);
    ev->at = std::chrono::steady_clock::now();
    ev->recorded = true;
    return SUCCESS;
}

CUresult cuEventSynchronize(CUevent e) {
    LOCKED;
    NEED_INIT;
    if (!e) return INVALID_HANDLE;
    land_copies();
    return SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent e) {
    LOCKED;
    NEED_INIT;
    if (!e) return INVALID_HANDLE;
    delete static_cast<Event*>(e);
    return SUCCESS;
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

}  // extern "C"
#pragma GCC visibility pop
