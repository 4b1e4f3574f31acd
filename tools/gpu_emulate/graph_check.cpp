// graph_check.cpp: checks the emulated driver's stream capture and graphs (driver.cpp) with
// the cuBLASLt and cuBLAS stand-ins: a captured sequence (an upload from pinned memory, a
// device copy, a memset, a kernel, a cublasLtMatmul, a cublasSgemm and two downloads) runs nothing
// while captured and computes the right products at each of two launches with new inputs;
// and an event record node (CU_EVENT_RECORD_EXTERNAL) recorded by each launch after the copy
// before it; and the error paths: unsafe calls and plain event records invalidate a capture,
// 901 afterwards,
// capture modes across threads, the legacy stream, wrong-thread ends, unknown handles, and
// a launch whose recorded memory was freed (700). The cuBLAS libraries are loaded before
// the driver, all privately (RTLD_LOCAL), so they must find it on their own.
//
// Usage: graph_check DIR (the directory build.sh wrote). Prints the number of checks and
// failures; exits non-zero on any failure.
#include <dlfcn.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

typedef int CUresult;
typedef unsigned long long Dptr;
struct Algo { uint64_t data[8]; };

static int failures = 0, checks = 0;
#define CHECK(cond, ...) do { checks++; if (!(cond)) { failures++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)
#define EQ(expr, want) do { int got_ = (expr); CHECK(got_ == (want), "%s = %d, want %d", #expr, got_, (want)); } while (0)

static void* sym(void* lib, const char* name) {
    void* f = dlsym(lib, name);
    if (!f) { printf("missing %s\n", name); exit(1); }
    return f;
}
#define FN(lib, name, ...) auto name = (CUresult(*)(__VA_ARGS__))sym(lib, #name)

int main(int argc, char** argv) {
    if (argc != 2) { printf("usage: graph_check DIR\n"); return 2; }
    std::string dir = argv[1];
    void* lt = dlopen((dir + "/libcublasLt.so.13").c_str(), RTLD_NOW | RTLD_LOCAL);
    void* cb = dlopen((dir + "/libcublas.so.13").c_str(), RTLD_NOW | RTLD_LOCAL);
    void* cu = dlopen((dir + "/libcuda.so.1").c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lt || !cb || !cu) { printf("dlopen: %s\n", dlerror()); return 1; }
    FN(cu, cuInit, unsigned); FN(cu, cuDevicePrimaryCtxRetain, void**, int); FN(cu, cuCtxSetCurrent, void*);
    FN(cu, cuMemAlloc_v2, Dptr*, size_t); FN(cu, cuMemFree_v2, Dptr); FN(cu, cuMemAllocHost_v2, void**, size_t);
    FN(cu, cuMemcpyHtoD_v2, Dptr, const void*, size_t); FN(cu, cuMemcpyDtoH_v2, void*, Dptr, size_t);
    FN(cu, cuMemcpyHtoDAsync_v2, Dptr, const void*, size_t, void*); FN(cu, cuMemcpyDtoHAsync_v2, void*, Dptr, size_t, void*);
    FN(cu, cuMemcpyDtoDAsync_v2, Dptr, Dptr, size_t, void*); FN(cu, cuMemsetD8Async, Dptr, unsigned char, size_t, void*); FN(cu, cuStreamCreate, void**, unsigned);
    FN(cu, cuStreamSynchronize, void*); FN(cu, cuStreamDestroy_v2, void*); FN(cu, cuEventCreate, void**, unsigned);
    FN(cu, cuEventRecord, void*, void*); FN(cu, cuModuleLoadData, void**, const void*);
    FN(cu, cuEventRecordWithFlags, void*, void*, unsigned); FN(cu, cuEventDestroy_v2, void*);
    FN(cu, cuEventSynchronize, void*);
    FN(cu, cuModuleGetFunction, void**, void*, const char*);
    FN(cu, cuLaunchKernel, void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
    FN(cu, cuStreamBeginCapture_v2, void*, int); FN(cu, cuStreamEndCapture, void*, void**);
    FN(cu, cuStreamIsCapturing, void*, int*); FN(cu, cuGraphInstantiateWithFlags, void**, void*, unsigned long long);
    FN(cu, cuGraphLaunch, void*, void*); FN(cu, cuGraphExecDestroy, void*); FN(cu, cuGraphDestroy, void*);
    FN(lt, cublasLtCreate, void**); FN(lt, cublasLtMatmulDescCreate, void**, int, int);
    FN(lt, cublasLtMatmulDescDestroy, void*); FN(lt, cublasLtMatrixLayoutCreate, void**, int, uint64_t, uint64_t, int64_t);
    FN(lt, cublasLtMatrixLayoutDestroy, void*);
    FN(lt, cublasLtMatmul, void*, void*, const void*, const void*, void*, const void*, void*, const void*, const void*, void*, void*, void*, const Algo*, void*, size_t, void*);
    FN(cb, cublasCreate_v2, void**); FN(cb, cublasSetStream_v2, void*, void*);
    FN(cb, cublasSgemm_v2, void*, int, int, int, int, int, const float*, const float*, int, const float*, int, const float*, float*, int);

    void* ctx;
    EQ(cuInit(0), 0);
    EQ(cuDevicePrimaryCtxRetain(&ctx, 0), 0);
    EQ(cuCtxSetCurrent(ctx), 0);
    void *s, *blocking, *ev, *mod, *add, *lth, *cbh;
    EQ(cuStreamCreate(&s, 1), 0);
    EQ(cuStreamCreate(&blocking, 0), 0);
    EQ(cuEventCreate(&ev, 0), 0);
    // The emulated driver only looks for the name in the compiled image.
    EQ(cuModuleLoadData(&mod, "// .entry add_inplace"), 0);
    EQ(cuModuleGetFunction(&add, mod, "add_inplace"), 0);
    EQ(cublasLtCreate(&lth), 0);
    EQ(cublasCreate_v2(&cbh), 0);
    EQ(cublasSetStream_v2(cbh, s), 0);

    // D = A B (cuBLASLt) and E = 2 A B (cuBLAS), column-major, A m x k, B = X + 1 k x n.
    const int m = 8, n = 6, k = 5;
    const size_t fa = m * k * 4, fb = k * n * 4, fd = m * n * 4;
    Dptr dA, dB, dX, dOne, dD, dE;
    for (auto [p, b] : {std::pair{&dA, fa}, {&dB, fb}, {&dX, fb}, {&dOne, fb}, {&dD, fd}, {&dE, fd}})
        EQ(cuMemAlloc_v2(p, b), 0);
    float *hin, *hD, *hE;
    EQ(cuMemAllocHost_v2((void**)&hin, fa), 0);
    EQ(cuMemAllocHost_v2((void**)&hD, fd), 0);
    EQ(cuMemAllocHost_v2((void**)&hE, fd), 0);
    std::vector<float> ones(k * n, 1.0f);
    EQ(cuMemcpyHtoD_v2(dOne, ones.data(), fb), 0);
    for (int i = 0; i < m * n; i++) hD[i] = hE[i] = 0.0f;

    void *op, *la, *lb, *ld;
    EQ(cublasLtMatmulDescCreate(&op, 68, 0), 0);
    EQ(cublasLtMatrixLayoutCreate(&la, 0, m, k, m), 0);
    EQ(cublasLtMatrixLayoutCreate(&lb, 0, k, n, k), 0);
    EQ(cublasLtMatrixLayoutCreate(&ld, 0, m, n, m), 0);

    EQ(cuStreamBeginCapture_v2(nullptr, 1), 900);
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    EQ(cuStreamBeginCapture_v2(s, 1), 401);
    int status = -1;
    EQ(cuStreamIsCapturing(s, &status), 0);
    EQ(status, 1);
    EQ(cuMemcpyHtoDAsync_v2(dA, hin, fa, s), 0);
    EQ(cuMemcpyDtoDAsync_v2(dB, dX, fb, s), 0);
    EQ(cuMemsetD8Async(dE, 0, fd, s), 0);
    Dptr kdst = dB, ksrc = dOne;
    long long kn = k * n;
    void* params[] = {&kdst, &ksrc, &kn};
    EQ(cuLaunchKernel(add, 1, 1, 1, 256, 1, 1, 0, s, params, nullptr), 0);
    kdst = ksrc = 0, kn = -1;  // the launch kept its own copies
    float one = 1.0f, two = 2.0f, zero = 0.0f;
    EQ(cublasLtMatmul(lth, op, &one, (void*)dA, la, (void*)dB, lb, &zero, (void*)dD, ld, (void*)dD, ld,
                      nullptr, nullptr, 0, s), 0);
    EQ(cublasSgemm_v2(cbh, 0, 0, m, n, k, &two, (float*)dA, m, (float*)dB, k, &one, (float*)dE, m), 0);
    two = 3.0f;  // alpha was taken at the call; beta 1 adds to E, zeroed above
    EQ(cuMemcpyDtoHAsync_v2(hD, dD, fd, s), 0);
    EQ(cuMemcpyDtoHAsync_v2(hE, dE, fd, s), 0);
    void* graph = nullptr;
    EQ(cuStreamEndCapture(s, &graph), 0);
    CHECK(graph != nullptr, "graph");
    EQ(cuStreamIsCapturing(s, &status), 0);
    EQ(status, 0);
    // Nothing ran: D holds the 0xff bytes of a new allocation, the host buffers their zeros.
    std::vector<uint32_t> raw(m * n);
    EQ(cuMemcpyDtoH_v2(raw.data(), dD, fd), 0);
    CHECK(raw[0] == 0xffffffffu && raw[m * n - 1] == 0xffffffffu, "D written during capture");
    EQ(cuMemcpyDtoH_v2(raw.data(), dE, fd), 0);
    CHECK(raw[0] == 0xffffffffu, "E zeroed during capture");
    CHECK(hD[0] == 0.0f && hE[0] == 0.0f, "host written during capture");
    // The descriptors may go; the graph may go before its executable form.
    void* exec = nullptr;
    EQ(cuGraphInstantiateWithFlags(&exec, graph, 1), 1);
    EQ(cuGraphInstantiateWithFlags(&exec, graph, 0), 0);
    EQ(cuGraphDestroy(graph), 0);
    EQ(cuGraphDestroy(graph), 400);
    EQ(cublasLtMatmulDescDestroy(op), 0);
    EQ(cublasLtMatrixLayoutDestroy(lb), 0);

    for (int round = 0; round < 2; round++) {
        std::vector<float> a(m * k), x(k * n);
        for (int i = 0; i < m * k; i++) hin[i] = a[i] = std::sin(1.0f + i * (round + 1.3f));
        for (int i = 0; i < k * n; i++) x[i] = std::cos(2.0f + i * (round + 0.7f));
        EQ(cuMemcpyHtoD_v2(dX, x.data(), fb), 0);
        EQ(cuGraphLaunch(exec, s), 0);
        EQ(cuStreamSynchronize(s), 0);
        double worst = 0;
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double ref = 0;
                for (int q = 0; q < k; q++) ref += double(a[i + q * m]) * (double(x[q + j * k]) + 1.0);
                worst = std::max({worst, std::fabs(hD[i + j * m] - ref), std::fabs(hE[i + j * m] - 2 * ref)});
            }
        CHECK(worst < 1e-5, "round %d: products off by %g", round, worst);
    }
    EQ(cuGraphLaunch(exec, nullptr), 0);  // launches on other streams are fine too
    EQ(cuStreamSynchronize(nullptr), 0);

    // Unsafe calls during a thread-local capture fail, invalidate it, and 901 follows.
    Dptr tmp;
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    EQ(cuMemAlloc_v2(&tmp, 64), 900);
    EQ(cuStreamIsCapturing(s, &status), 0);
    EQ(status, 2);
    EQ(cuMemcpyDtoDAsync_v2(dB, dX, fb, s), 901);
    EQ(cublasSgemm_v2(cbh, 0, 0, m, n, k, &two, (float*)dA, m, (float*)dB, k, &zero, (float*)dE, m), 13);
    graph = (void*)1;
    EQ(cuStreamEndCapture(s, &graph), 901);
    CHECK(graph == nullptr, "invalidated graph");
    EQ(cuStreamEndCapture(s, &graph), 401);
    for (auto call : {0, 1, 2}) {  // cuStreamSynchronize, cuEventRecord, cuMemcpyDtoH
        EQ(cuStreamBeginCapture_v2(s, 1), 0);
        EQ(call == 0 ? cuStreamSynchronize(nullptr) : call == 1 ? cuEventRecord(ev, s)
                     : cuMemcpyDtoH_v2(raw.data(), dD, fd), 900);
        EQ(cuStreamEndCapture(s, &graph), 901);
    }
    // Relaxed: allocations are allowed, synchronising the capturing stream is not.
    EQ(cuStreamBeginCapture_v2(s, 2), 0);
    EQ(cuMemAlloc_v2(&tmp, 64), 0);
    EQ(cuMemFree_v2(tmp), 0);
    EQ(cuStreamSynchronize(s), 900);
    EQ(cuStreamEndCapture(s, &graph), 901);
    // A blocking stream's capture and the legacy stream.
    EQ(cuStreamBeginCapture_v2(blocking, 2), 0);
    EQ(cuMemcpyDtoDAsync_v2(dB, dX, fb, nullptr), 906);
    EQ(cuStreamEndCapture(blocking, &graph), 901);
    // Threads: thread-local ignores other threads, global does not; ends from the capturing
    // thread only.
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    std::thread([&] {
        EQ(cuMemAlloc_v2(&tmp, 64), 0);
        EQ(cuMemFree_v2(tmp), 0);
        EQ(cuStreamEndCapture(s, &graph), 908);
    }).join();
    EQ(cuStreamEndCapture(s, &graph), 0);
    EQ(cuGraphDestroy(graph), 0);
    EQ(cuStreamBeginCapture_v2(s, 0), 0);
    std::thread([&] { EQ(cuMemAlloc_v2(&tmp, 64), 900); }).join();
    EQ(cuStreamEndCapture(s, &graph), 901);
    // A capturing stream cannot be destroyed, nor a graph launched into it.
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    EQ(cuStreamDestroy_v2(s), 900);
    EQ(cuGraphLaunch(exec, s), 900);
    EQ(cuStreamEndCapture(s, &graph), 901);

    // An event recorded with CU_EVENT_RECORD_EXTERNAL during a capture is a node of the graph,
    // recorded by each launch (a copy lands, the host waits for the event and reads it);
    // without the flag it is refused; a launch whose event was destroyed fails with 400.
    {
        void* node_ev = nullptr;
        EQ(cuEventCreate(&node_ev, 2), 0);
        float* landing = nullptr;
        EQ(cuMemAllocHost_v2((void**)&landing, fb), 0);
        EQ(cuStreamBeginCapture_v2(s, 1), 0);
        EQ(cuMemcpyDtoHAsync_v2(landing, dX, fb, s), 0);
        EQ(cuEventRecordWithFlags(node_ev, s, 1), 0);
        EQ(cuStreamEndCapture(s, &graph), 0);
        void* exec3 = nullptr;
        EQ(cuGraphInstantiateWithFlags(&exec3, graph, 0), 0);
        EQ(cuGraphDestroy(graph), 0);
        std::memset(landing, 0, fb);
        EQ(cuGraphLaunch(exec3, s), 0);
        EQ(cuEventSynchronize(node_ev), 0);
        std::vector<float> want(fb / sizeof(float));
        EQ(cuMemcpyDtoH_v2(want.data(), dX, fb), 0);
        CHECK(std::memcmp(landing, want.data(), fb) == 0, "the copy before the event node landed");
        EQ(cuStreamBeginCapture_v2(s, 1), 0);
        EQ(cuEventRecordWithFlags(node_ev, s, 0), 900);
        EQ(cuStreamEndCapture(s, &graph), 901);
        EQ(cuEventRecordWithFlags(node_ev, s, 2), 1);
        EQ(cuEventDestroy_v2(node_ev), 0);
        EQ(cuGraphLaunch(exec3, s), 400);
        EQ(cuEventDestroy_v2(node_ev), 400);
        EQ(cuGraphExecDestroy(exec3), 0);
    }

    // Memory freed after the capture: the launch fails with 700 and names the operation.
    EQ(cuMemAlloc_v2(&tmp, fb), 0);
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    EQ(cuMemcpyDtoDAsync_v2(dX, tmp, fb, s), 0);
    EQ(cuStreamEndCapture(s, &graph), 0);
    void* exec2 = nullptr;
    EQ(cuGraphInstantiateWithFlags(&exec2, graph, 0), 0);
    EQ(cuMemFree_v2(tmp), 0);
    EQ(cuGraphLaunch(exec2, s), 700);
    EQ(cuGraphExecDestroy(exec2), 0);
    EQ(cuGraphExecDestroy(exec2), 400);
    EQ(cuGraphDestroy(graph), 0);
    EQ(cuMemAlloc_v2(&tmp, fd), 0);
    EQ(cuStreamBeginCapture_v2(s, 1), 0);
    EQ(cublasLtMatmul(lth, op, &one, (void*)dA, la, (void*)dB, la, &zero, (void*)tmp, ld, (void*)tmp, ld,
                      nullptr, nullptr, 0, s), 7);  // destroyed descriptors: refused, capture goes on
    void *op2, *lb2;
    EQ(cublasLtMatmulDescCreate(&op2, 68, 0), 0);
    EQ(cublasLtMatrixLayoutCreate(&lb2, 0, k, n, k), 0);
    EQ(cublasLtMatmul(lth, op2, &one, (void*)dA, la, (void*)dB, lb2, &zero, (void*)tmp, ld, (void*)tmp, ld,
                      nullptr, nullptr, 0, s), 0);
    EQ(cuStreamEndCapture(s, &graph), 0);
    EQ(cuGraphInstantiateWithFlags(&exec2, graph, 0), 0);
    EQ(cuGraphDestroy(graph), 0);
    EQ(cuMemFree_v2(tmp), 0);
    EQ(cuGraphLaunch(exec2, s), 700);
    EQ(cuGraphExecDestroy(exec2), 0);
    EQ(cuGraphExecDestroy(exec), 0);
    EQ(cuStreamDestroy_v2(s), 0);

    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
