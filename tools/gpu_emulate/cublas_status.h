// cublas_status.h: cublasStatus_t (cublas_api.h) and its names, and how work reaches a
// stream (run now, or recorded into the stream's graph capture), shared by the CPU stand-ins
// for cuBLAS (cublas.cpp) and cuBLASLt (cublaslt.cpp).
#pragma once
#include <dlfcn.h>

#include <atomic>
#include <cstddef>
#include <initializer_list>
#include <memory>
#include <utility>

typedef int cublasStatus_t;

namespace {

enum : cublasStatus_t {
    SUCCESS = 0,
    NOT_INITIALIZED = 1,
    ALLOC_FAILED = 3,
    INVALID_VALUE = 7,
    ARCH_MISMATCH = 8,
    MAPPING_ERROR = 11,
    EXECUTION_FAILED = 13,
    INTERNAL_ERROR = 14,
    NOT_SUPPORTED = 15,
    LICENSE_ERROR = 16,
};

const char* status_name(cublasStatus_t s) {
    switch (s) {
    case SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "<unknown>";
    }
}

// gpu_emulate_defer of the emulated driver (driver.cpp): records work into a stream's capture.
using DeferFn = int (*)(void* stream, const char* what, const void* const* pointers,
                        size_t count, void (*run)(void*), void (*drop)(void*), void* ctx);

// The emulated driver's gpu_emulate_defer, found in the process: among the global symbols
// (nanogpt opens the CUDA libraries RTLD_GLOBAL), else in an already loaded libcuda.so.1
// (whatever way it was opened). Looked up again on each call until found, so that this
// library may be loaded before the driver; null while no emulated driver is loaded (then no
// stream can be capturing).
DeferFn driver_defer() {
    static std::atomic<DeferFn> found{nullptr};
    DeferFn f = found.load(std::memory_order_acquire);
    if (f != nullptr) return f;
    void* sym = dlsym(RTLD_DEFAULT, "gpu_emulate_defer");
    if (sym == nullptr) {
        if (void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD)) {
            sym = dlsym(lib, "gpu_emulate_defer");
            dlclose(lib);  // only drops the reference RTLD_NOLOAD took
        }
    }
    f = reinterpret_cast<DeferFn>(sym);
    if (f != nullptr) found.store(f, std::memory_order_release);
    return f;
}

// Does `work` (checked arguments, copied by value: it runs after the call returns when
// recorded) on `stream`: now, as every stream is synchronous here, or, while the stream is
// being captured into a graph, at each launch of the graph, where the driver first checks
// that each of `pointers` is null or inside a live device allocation. EXECUTION_FAILED when
// the stream's capture refuses work (already invalidated, or the legacy stream while a
// blocking stream captures), as a failed kernel launch is reported.
template <class F>
cublasStatus_t run_on_stream(void* stream, const char* what,
                             std::initializer_list<const void*> pointers, F work) {
    DeferFn defer = driver_defer();
    if (defer == nullptr) {
        work();
        return SUCCESS;
    }
    auto* ctx = new F(std::move(work));
    int r = defer(
        stream, what, pointers.begin(), pointers.size(),
        [](void* c) { (*static_cast<F*>(c))(); }, [](void* c) { delete static_cast<F*>(c); },
        ctx);
    if (r == 1) return SUCCESS;  // the graph owns ctx
    std::unique_ptr<F> own(ctx);
    if (r != 0) return EXECUTION_FAILED;
    (*own)();
    return SUCCESS;
}

}  // namespace
