// nccl_check.cpp: checks the CPU stand-in for NCCL (nccl.cpp) on the emulated driver
// (driver.cpp): ncclAllReduce, ncclReduce and ncclBroadcast with every operation on every type
// against values computed here (in rank order, 16-bit floats rounded after each operation,
// integers wrapping), results known exactly (wrapping, unsigned comparisons, 64-bit integers,
// integer averages, rounding after each addition), results spanning several of the stand-in's
// 2 MiB chunks (in place, out of place, the bytes around them untouched), ZeRO-style groups of
// ncclReduce onto every root then ncclBroadcast from every root, ncclCommInitAll and grouped
// ncclCommInitRank driven from one thread, the arguments it refuses (buffers outside an
// allocation, unknown types, operations and roots, communicators no longer live, a group with
// a refused call running nothing), two ranks on one device, the timeouts of a join and of a
// collective (NCCL_EMULATE_TIMEOUT_S, set to 1 s for them), ncclCommAbort and ncclCommDestroy
// of a peer ending a waiting rank's collective at once, mismatched calls across ranks, ranks
// as processes with one exiting mid-run, and that no shared-memory segment is left in
// /dev/shm. What the library prints on stderr is captured: a check that makes it fail must
// find the failure named there, and every other check must leave it empty.
//
// Ranks are threads of this process, or processes forked from it, on four emulated devices
// (GPU_EMULATE_DEVICES is set here). A run that hangs stops after 120 s with a failure.
//
// Usage: nccl_check DIR (the directory build.sh wrote; libcuda.so.1 and libnccl.so.2 are
// loaded from it). Prints the number of checks and failures; exits non-zero on any failure.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// ------------------------------------------------------------------ nccl.h

struct UniqueId {
    char internal[128];
};
typedef void* Comm;

// ncclResult_t.
enum : int { SUCCESS = 0, INVALID_ARGUMENT = 4, INVALID_USAGE = 5, REMOTE_ERROR = 6 };

// ncclDataType_t.
enum : int {
    INT8 = 0,
    UINT8 = 1,
    INT32 = 2,
    UINT32 = 3,
    INT64 = 4,
    UINT64 = 5,
    FLOAT16 = 6,
    FLOAT32 = 7,
    FLOAT64 = 8,
    BFLOAT16 = 9,
};

// ncclRedOp_t.
enum : int { SUM = 0, PROD = 1, MAX = 2, MIN = 3, AVG = 4 };

const char* const TYPE_NAMES[] = {"int8",   "uint8",   "int32",   "uint32",  "int64",
                                  "uint64", "float16", "float32", "float64", "bfloat16"};
const char* const OP_NAMES[] = {"sum", "prod", "max", "min", "avg"};

// The entry points used, loaded from DIR.
int (*cuInit)(unsigned);
int (*cuDevicePrimaryCtxRetain)(void**, int);
int (*cuCtxSetCurrent)(void*);
int (*cuMemAlloc_v2)(unsigned long long*, size_t);
int (*cuMemFree_v2)(unsigned long long);
int (*ncclGetUniqueId)(UniqueId*);
int (*ncclCommInitRank)(Comm*, int, UniqueId, int);
int (*ncclCommInitAll)(Comm*, int, const int*);
int (*ncclCommDestroy)(Comm);
int (*ncclCommAbort)(Comm);
int (*ncclCommGetAsyncError)(Comm, int*);
int (*ncclCommCount)(Comm, int*);
int (*ncclCommCuDevice)(Comm, int*);
int (*ncclCommUserRank)(Comm, int*);
int (*ncclGroupStart)();
int (*ncclGroupEnd)();
int (*ncclAllReduce)(const void*, void*, size_t, int, int, Comm, void*);
int (*ncclReduce)(const void*, void*, size_t, int, int, int, Comm, void*);
int (*ncclBroadcast)(const void*, void*, size_t, int, int, Comm, void*);

template <class F>
void load(void* lib, F& f, const char* name) {
    f = reinterpret_cast<F>(dlsym(lib, name));
    if (!f) {
        std::printf("missing %s\n", name);
        std::exit(1);
    }
}

#define LOAD(lib, name) load(lib, name, #name)

// ------------------------------------------------------------------ checks

// The counts, in memory shared with the processes forked for the process checks.
struct Tally {
    std::atomic<int> checks;
    std::atomic<int> failures;
};

Tally* tally = nullptr;

__attribute__((format(printf, 4, 5))) void check(bool ok, const char* file, int line,
                                                 const char* fmt, ...) {
    tally->checks++;
    if (ok) return;
    tally->failures++;
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::printf("FAIL %s:%d: %s\n", file, line, msg);
    std::fflush(stdout);
}

#define CHECK(cond, ...) check((cond), __FILE__, __LINE__, __VA_ARGS__)

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

void on_alarm(int) {
    const char msg[] = "nccl_check: no result after 120 s (a collective or join hung)\n";
    ssize_t written = write(1, msg, sizeof msg - 1);
    (void)written;
    _exit(1);
}

// Sends this process's stderr (where the library prints) to a temporary file until finish(),
// which returns what was written there.
class StderrCapture {
  public:
    StderrCapture() {
        std::fflush(stderr);
        file_ = std::tmpfile();
        saved_ = dup(2);
        if (file_) dup2(fileno(file_), 2);
    }

    std::string finish() {
        std::fflush(stderr);
        dup2(saved_, 2);
        close(saved_);
        std::string text;
        if (!file_) return "(stderr could not be captured)";
        std::rewind(file_);
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, file_)) > 0) text.append(buf, n);
        std::fclose(file_);
        return text;
    }

  private:
    FILE* file_ = nullptr;
    int saved_ = -1;
};

// Runs `body` with stderr captured. `expected`: texts stderr must hold (how the stand-in names
// the failures `body` provokes); with none, `body` must print nothing.
void section(const char* name, void (*body)(), std::initializer_list<const char*> expected) {
    const auto start = Clock::now();
    StderrCapture capture;
    body();
    const std::string err = capture.finish();
    if (expected.size() == 0)
        CHECK(err.empty(), "%s: unexpected messages on stderr:\n%s", name, err.c_str());
    for (const char* text : expected)
        CHECK(err.find(text) != std::string::npos, "%s: stderr does not say \"%s\"; it says:\n%s",
              name, text, err.c_str());
    std::printf("%-40s %5.2f s\n", name, seconds_since(start));
    std::fflush(stdout);
}

// ------------------------------------------------------------------ devices and communicators

// Makes device `d`'s primary context current on this thread (the device of a communicator
// made next).
void use_device(int d) {
    void* ctx = nullptr;
    CHECK(cuDevicePrimaryCtxRetain(&ctx, d) == 0, "cuDevicePrimaryCtxRetain(%d)", d);
    CHECK(cuCtxSetCurrent(ctx) == 0, "cuCtxSetCurrent(device %d)", d);
}

// A device allocation of n elements of T (a host address; the driver fills new memory with
// 0xff bytes). Freeing it checks the driver's guard bytes around every allocation, so that a
// write past the end of a buffer fails here.
template <class T>
class DeviceArray {
  public:
    explicit DeviceArray(size_t n) : n_(n) {
        unsigned long long p = 0;
        int st = cuMemAlloc_v2(&p, n * sizeof(T));
        if (st != 0) {
            std::printf("cuMemAlloc of %zu bytes: %d\n", n * sizeof(T), st);
            std::exit(1);
        }
        p_ = reinterpret_cast<T*>(p);
    }

    ~DeviceArray() {
        int st = cuMemFree_v2(reinterpret_cast<unsigned long long>(p_));
        CHECK(st == 0, "cuMemFree: %d (guard bytes written)", st);
    }

    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;

    T* get() const { return p_; }
    T& operator[](size_t i) const { return p_[i]; }
    size_t size() const { return n_; }

    // Back to what the driver wrote: 0xff bytes.
    void clear() { std::memset(p_, 0xff, n_ * sizeof(T)); }

  private:
    T* p_ = nullptr;
    size_t n_;
};

// Whether [p, p + bytes) still holds the driver's 0xff bytes.
bool untouched(const void* p, size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < bytes; i++) {
        if (b[i] != 0xff) return false;
    }
    return true;
}

// The /dev/shm file of every unique id made here (nccl.cpp names the segment after the id's
// 16 random bytes, which follow its 8-byte magic).
std::vector<std::string> segments;

std::string segment_file(const UniqueId& id) {
    std::string name = "/dev/shm/nccl-emulate-";
    for (int i = 8; i < 24; i++) {
        unsigned char b = static_cast<unsigned char>(id.internal[i]);
        name += "0123456789abcdef"[b >> 4];
        name += "0123456789abcdef"[b & 15];
    }
    return name;
}

bool segment_exists(const UniqueId& id) { return access(segment_file(id).c_str(), F_OK) == 0; }

UniqueId new_id() {
    UniqueId id{};
    CHECK(ncclGetUniqueId(&id) == 0, "ncclGetUniqueId");
    segments.push_back(segment_file(id));
    return id;
}

// Rank `rank` of `nranks` of the communicator of `id`, on the current device; null after a
// failed check.
Comm join(const UniqueId& id, int nranks, int rank) {
    Comm c = nullptr;
    int st = ncclCommInitRank(&c, nranks, id, rank);
    CHECK(st == SUCCESS && c, "ncclCommInitRank(rank %d of %d): %d", rank, nranks, st);
    return c;
}

int async_error(Comm c) {
    int e = -1;
    int st = ncclCommGetAsyncError(c, &e);
    return st == SUCCESS ? e : -1;
}

// Runs body(rank) for ranks 0..n-1, each on a thread of its own with device `rank` current.
void on_rank_threads(int n, const std::function<void(int)>& body) {
    std::vector<std::thread> threads;
    for (int r = 0; r < n; r++) {
        threads.emplace_back([&body, r] {
            use_device(r);
            body(r);
        });
    }
    for (auto& t : threads) t.join();
}

void wait_for_flag(const std::atomic<bool>& flag) {
    while (!flag.load()) usleep(1000);
}

// ------------------------------------------------------------------ element types

// bfloat16, as its bits.
struct Bf16 {
    uint16_t bits;
};

float bf16_to_float(uint16_t bits) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even (the inputs here are never NaN).
uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t rest = u & 0xffff;
    uint32_t high = u >> 16;
    if (rest > 0x8000 || (rest == 0x8000 && (high & 1))) high++;
    return uint16_t(high);
}

// How the reference computes in a type: in C, stored back to T after every operation (16-bit
// floats are computed in float and rounded after each operation, as NCCL does).
template <class T>
struct Math {
    using C = T;
    static C up(T x) { return x; }
    static T down(C x) { return x; }
};

template <>
struct Math<_Float16> {
    using C = float;
    static float up(_Float16 x) { return float(x); }
    static _Float16 down(float x) { return _Float16(x); }
};

template <>
struct Math<Bf16> {
    using C = float;
    static float up(Bf16 x) { return bf16_to_float(x.bits); }
    static Bf16 down(float x) { return Bf16{float_to_bf16(x)}; }
};

template <class T>
constexpr bool is_float = std::is_floating_point_v<typename Math<T>::C>;

template <class T>
double as_double(T x) {
    return double(Math<T>::up(x));
}

template <class T>
bool same_bits(const T& a, const T& b) {
    return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Rank `rank`'s i-th input: small, negative, large and fractional values (floats small enough
// that a product of three stays finite in float16).
template <class T>
T sample(int rank, size_t i) {
    static const int64_t ints[] = {
        0, 1, -1, 2, -3, 7, 100, -100, 127, -128, 255, 1000, -70000, INT32_MAX, INT32_MIN,
        (int64_t(1) << 62) + 5, -(int64_t(1) << 53) - 1, 0x1234567890,
    };
    static const double reals[] = {
        0.0, 1.0, -1.0, 0.5, -2.25, 3.0, 1.0 / 3, -7.1, 19.75, 0.001, -0.3, 12.5, 2.2, -15.0,
        6.0e-5,
    };
    if constexpr (std::is_integral_v<T>) {
        return T(ints[(i * 5 + size_t(rank) * 3) % std::size(ints)]);
    } else {
        double x = reals[(i * 7 + size_t(rank) * 4) % std::size(reals)];
        return Math<T>::down(typename Math<T>::C(x));
    }
}

// a op b; integer arithmetic wraps.
template <class C>
C combine(C a, C b, int op) {
    if constexpr (std::is_floating_point_v<C>) {
        switch (op) {
            case PROD: return a * b;
            case MAX: return std::fmax(a, b);
            case MIN: return std::fmin(a, b);
            default: return a + b;
        }
    } else {
        using U = std::make_unsigned_t<C>;
        switch (op) {
            case PROD: return C(U(a) * U(b));
            case MAX: return std::max(a, b);
            case MIN: return std::min(a, b);
            default: return C(U(a) + U(b));
        }
    }
}

// The reduction of `in` (one value per rank) as NCCL computes it: in rank order, rounded to T
// after each operation; ncclAvg multiplies each input by 1/nranks and sums for floats, sums
// and divides for integers.
template <class T>
T reference(const std::vector<T>& in, int op) {
    using M = Math<T>;
    using C = typename M::C;
    const int nranks = int(in.size());
    const bool premultiply = is_float<T> && op == AVG;
    const C scale = M::up(M::down(C(1.0 / nranks)));
    auto term = [&](T x) { return premultiply ? M::up(M::down(M::up(x) * scale)) : M::up(x); };
    const int combined = op == AVG ? SUM : op;
    T acc = M::down(term(in[0]));
    for (int r = 1; r < nranks; r++) acc = M::down(combine(M::up(acc), term(in[r]), combined));
    if (!is_float<T> && op == AVG) acc = M::down(C(M::up(acc) / C(nranks)));
    return acc;
}

// Checks that out[0..n) holds, bit for bit, the reduction `op` of every rank's samples.
template <class T>
void check_reduction(const T* out, size_t n, int nranks, int dtype, int op, int rank,
                     const char* call) {
    size_t bad = n;
    T want{};
    for (size_t i = 0; i < n && bad == n; i++) {
        std::vector<T> in;
        for (int q = 0; q < nranks; q++) in.push_back(sample<T>(q, i));
        want = reference(in, op);
        if (!same_bits(out[i], want)) bad = i;
    }
    const double got = bad < n ? as_double(out[bad]) : 0;
    CHECK(bad == n, "%s %s %s, rank %d, element %zu: got %g, want %g", TYPE_NAMES[dtype],
          OP_NAMES[op], call, rank, bad, got, as_double(want));
}

// Every operation on type T: out-of-place and in-place all-reduces, reduces onto each root
// (the other ranks passing no recvbuff) and a broadcast (the other ranks passing no sendbuff).
template <class T>
void check_type(Comm c, int rank, int nranks, int dtype) {
    const size_t n = 36;
    DeviceArray<T> send(n);
    DeviceArray<T> recv(n);
    for (size_t i = 0; i < n; i++) send[i] = sample<T>(rank, i);
    for (int op = SUM; op <= AVG; op++) {
        recv.clear();
        int st = ncclAllReduce(send.get(), recv.get(), n, dtype, op, c, nullptr);
        CHECK(st == SUCCESS, "ncclAllReduce %s %s: %d", TYPE_NAMES[dtype], OP_NAMES[op], st);
        check_reduction(recv.get(), n, nranks, dtype, op, rank, "all-reduce");

        const int root = op % nranks;
        recv.clear();
        T* out = rank == root ? recv.get() : nullptr;
        st = ncclReduce(send.get(), out, n, dtype, op, root, c, nullptr);
        CHECK(st == SUCCESS, "ncclReduce %s %s: %d", TYPE_NAMES[dtype], OP_NAMES[op], st);
        if (rank == root) check_reduction(recv.get(), n, nranks, dtype, op, rank, "reduce");
    }

    std::memcpy(recv.get(), send.get(), n * sizeof(T));
    int st = ncclAllReduce(recv.get(), recv.get(), n, dtype, SUM, c, nullptr);
    CHECK(st == SUCCESS, "in-place ncclAllReduce %s: %d", TYPE_NAMES[dtype], st);
    check_reduction(recv.get(), n, nranks, dtype, SUM, rank, "in-place all-reduce");

    const int root = dtype % nranks;
    recv.clear();
    const T* in = rank == root ? send.get() : nullptr;
    st = ncclBroadcast(in, recv.get(), n, dtype, root, c, nullptr);
    CHECK(st == SUCCESS, "ncclBroadcast %s: %d", TYPE_NAMES[dtype], st);
    size_t bad = n;
    for (size_t i = 0; i < n && bad == n; i++) {
        if (!same_bits(recv[i], sample<T>(root, i))) bad = i;
    }
    CHECK(bad == n, "%s broadcast from rank %d, rank %d: element %zu differs", TYPE_NAMES[dtype],
          root, rank, bad);
}

// One in-place all-reduce of rank r's values[r]; every rank must get `want`.
template <class T>
void check_known(Comm c, int rank, int dtype, int op, std::array<T, 3> values, T want,
                 const char* what) {
    DeviceArray<T> buf(1);
    buf[0] = values[rank];
    int st = ncclAllReduce(buf.get(), buf.get(), 1, dtype, op, c, nullptr);
    CHECK(st == SUCCESS && same_bits(buf[0], want), "%s, rank %d: status %d, got %g, want %g",
          what, rank, st, as_double(buf[0]), as_double(want));
}

// ------------------------------------------------------------------ sections

// Three ranks on threads: every type and operation; results known exactly.
void types_and_operations() {
    const UniqueId id = new_id();
    const int R = 3;
    on_rank_threads(R, [&](int rank) {
        Comm c = join(id, R, rank);
        int n = -1;
        int device = -1;
        int me = -1;
        CHECK(ncclCommCount(c, &n) == SUCCESS && n == R, "ncclCommCount: %d", n);
        CHECK(ncclCommCuDevice(c, &device) == SUCCESS && device == rank,
              "rank %d: ncclCommCuDevice %d", rank, device);
        CHECK(ncclCommUserRank(c, &me) == SUCCESS && me == rank, "ncclCommUserRank %d", me);
        CHECK(!segment_exists(id), "the segment is still in /dev/shm after every rank joined");

        check_type<int8_t>(c, rank, R, INT8);
        check_type<uint8_t>(c, rank, R, UINT8);
        check_type<int32_t>(c, rank, R, INT32);
        check_type<uint32_t>(c, rank, R, UINT32);
        check_type<int64_t>(c, rank, R, INT64);
        check_type<uint64_t>(c, rank, R, UINT64);
        check_type<_Float16>(c, rank, R, FLOAT16);
        check_type<float>(c, rank, R, FLOAT32);
        check_type<double>(c, rank, R, FLOAT64);
        check_type<Bf16>(c, rank, R, BFLOAT16);

        check_known<int8_t>(c, rank, INT8, SUM, {100, 100, 100}, 44, "int8 sum wraps");
        check_known<uint8_t>(c, rank, UINT8, PROD, {15, 20, 3}, 132, "uint8 product wraps");
        check_known<uint32_t>(c, rank, UINT32, MAX, {0xfffffff0u, 1, 2}, 0xfffffff0u,
                              "uint32 max compares unsigned");
        check_known<int64_t>(c, rank, INT64, SUM,
                             {(int64_t(1) << 62) + 1, (int64_t(1) << 60) + 1, 1},
                             (int64_t(1) << 62) + (int64_t(1) << 60) + 3,
                             "int64 sum past float64's integers");
        check_known<uint64_t>(c, rank, UINT64, MIN,
                              {(uint64_t(1) << 63) + 1, uint64_t(1) << 63, (uint64_t(1) << 63) + 2},
                              uint64_t(1) << 63, "uint64 min compares unsigned");
        check_known<int32_t>(c, rank, INT32, AVG, {1, 11, 21}, 11, "int32 avg");
        check_known<int32_t>(c, rank, INT32, AVG, {-1, -1, 0}, 0,
                             "int32 avg truncates toward zero");
        // 1 + 2^-8 is a tie in bfloat16 that rounds to 1, twice; rounding only the final sum
        // would give 1 + 2^-7.
        const Bf16 one = Bf16{0x3f80};
        const Bf16 tiny = Bf16{0x3b80};
        check_known<Bf16>(c, rank, BFLOAT16, SUM, {one, tiny, tiny}, one,
                          "bfloat16 sum rounded after each addition");
        // Likewise 2048 + 1 in float16.
        check_known<_Float16>(c, rank, FLOAT16, SUM, {2048, 1, 1}, 2048,
                              "float16 sum rounded after each addition");

        CHECK(async_error(c) == SUCCESS, "async error %d", async_error(c));
        CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
    });
}

// The float inputs of the multi-chunk checks: their sums round.
float chunk_value(int rank, size_t i) {
    return float((i * 2654435761u + size_t(rank) * 40503u) % 65536) / 64.0f - 511.3f;
}

// Three ranks on threads: an all-reduce, a broadcast and a reduce of 3.5 chunks and a bit.
void several_chunks() {
    const UniqueId id = new_id();
    const int R = 3;
    const size_t chunk = (size_t(2) << 20) / sizeof(float);
    const size_t n = 3 * chunk + chunk / 2 + 3;
    on_rank_threads(R, [&](int rank) {
        Comm c = join(id, R, rank);
        // data[1..n] is the buffer; data[0] and data[n + 1] must stay as the driver left them.
        DeviceArray<float> data(n + 2);
        float* buf = data.get() + 1;
        for (size_t i = 0; i < n; i++) buf[i] = chunk_value(rank, i);
        int st = ncclAllReduce(buf, buf, n, FLOAT32, SUM, c, nullptr);
        CHECK(st == SUCCESS, "ncclAllReduce: %d", st);
        size_t bad = n;
        for (size_t i = 0; i < n && bad == n; i++) {
            float want = chunk_value(0, i);
            for (int q = 1; q < R; q++) want += chunk_value(q, i);
            if (!same_bits(buf[i], want)) bad = i;
        }
        CHECK(bad == n, "all-reduce of %zu floats, rank %d: element %zu differs from the sum in "
              "rank order", n, rank, bad);
        CHECK(untouched(&data[0], 4) && untouched(&data[n + 1], 4),
              "all-reduce wrote next to its buffer");

        // A broadcast from rank 1, in place.
        for (size_t i = 0; i < n; i++) buf[i] = rank == 1 ? chunk_value(1, i) : -1.0f;
        st = ncclBroadcast(buf, buf, n, FLOAT32, 1, c, nullptr);
        CHECK(st == SUCCESS, "ncclBroadcast: %d", st);
        bad = n;
        for (size_t i = 0; i < n && bad == n; i++) {
            if (!same_bits(buf[i], chunk_value(1, i))) bad = i;
        }
        CHECK(bad == n, "broadcast of %zu floats, rank %d: element %zu differs", n, rank, bad);

        // A max reduce onto rank 2, out of place: the other ranks' recvbuff is not written.
        for (size_t i = 0; i < n; i++) buf[i] = chunk_value(rank, i);
        DeviceArray<float> out(n);
        st = ncclReduce(buf, out.get(), n, FLOAT32, MAX, 2, c, nullptr);
        CHECK(st == SUCCESS, "ncclReduce: %d", st);
        if (rank == 2) {
            bad = n;
            for (size_t i = 0; i < n && bad == n; i++) {
                float want = chunk_value(0, i);
                for (int q = 1; q < R; q++) want = std::fmax(want, chunk_value(q, i));
                if (!same_bits(out[i], want)) bad = i;
            }
            CHECK(bad == n, "max reduce of %zu floats: element %zu differs", n, bad);
        } else {
            CHECK(untouched(out.get(), n * sizeof(float)),
                  "reduce onto rank 2 wrote rank %d's recvbuff", rank);
        }
        CHECK(async_error(c) == SUCCESS, "async error %d", async_error(c));
        CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
    });
}

// Rank `rank`'s i-th parameter gradient in the ZeRO checks (sums are exact).
float zero_value(int rank, size_t i) {
    return float((i + 7 * size_t(rank)) % 1000) + 1000.0f * float(rank);
}

// Three ranks on threads, as ZeRO-1 runs them: one group of reduces, each shard onto its
// owner, then one group of broadcasts, each shard from its owner. Shards are unequal, the
// first longer than a chunk.
void zero_groups() {
    const UniqueId id = new_id();
    const int R = 3;
    const size_t offsets[R + 1] = {0, 700001, 700001 + 524288, 700001 + 524288 + 5};
    const size_t n = offsets[R];
    on_rank_threads(R, [&](int rank) {
        Comm c = join(id, R, rank);
        DeviceArray<float> grads(n);
        for (size_t i = 0; i < n; i++) grads[i] = zero_value(rank, i);
        CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
        for (int owner = 0; owner < R; owner++) {
            float* shard = grads.get() + offsets[owner];
            size_t len = offsets[owner + 1] - offsets[owner];
            int st = ncclReduce(shard, shard, len, FLOAT32, SUM, owner, c, nullptr);
            CHECK(st == SUCCESS, "grouped ncclReduce onto %d: %d", owner, st);
        }
        CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd");
        size_t bad = n;
        for (size_t i = 0; i < n && bad == n; i++) {
            bool mine = i >= offsets[rank] && i < offsets[rank + 1];
            float want = 0;
            for (int q = 0; q < R; q++) want += zero_value(q, i);
            if (!mine) want = zero_value(rank, i);
            if (grads[i] != want) bad = i;
        }
        CHECK(bad == n, "grouped reduces, rank %d: element %zu is wrong", rank, bad);

        CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
        for (int owner = 0; owner < R; owner++) {
            float* shard = grads.get() + offsets[owner];
            size_t len = offsets[owner + 1] - offsets[owner];
            int st = ncclBroadcast(shard, shard, len, FLOAT32, owner, c, nullptr);
            CHECK(st == SUCCESS, "grouped ncclBroadcast from %d: %d", owner, st);
        }
        CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd");
        bad = n;
        for (size_t i = 0; i < n && bad == n; i++) {
            float want = 0;
            for (int q = 0; q < R; q++) want += zero_value(q, i);
            if (grads[i] != want) bad = i;
        }
        CHECK(bad == n, "grouped broadcasts, rank %d: element %zu is wrong", rank, bad);
        CHECK(async_error(c) == SUCCESS, "async error %d", async_error(c));
        CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
    });
}

// Grouped all-reduces, then ZeRO's grouped reduces and broadcasts, of two communicators driven
// from this thread (buffers longer than a chunk).
void drive_two_ranks(Comm comms[2]) {
    const size_t n = 600000;
    DeviceArray<float> a0(n);
    DeviceArray<float> a1(n);
    float* a[2] = {a0.get(), a1.get()};
    for (int round = 0; round < 3; round++) {
        for (int r = 0; r < 2; r++) {
            for (size_t i = 0; i < n; i++) a[r][i] = float(r + i % 1000 + round);
        }
        CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
        for (int r = 0; r < 2; r++) {
            int st = ncclAllReduce(a[r], a[r], n, FLOAT32, SUM, comms[r], nullptr);
            CHECK(st == SUCCESS, "grouped ncclAllReduce: %d", st);
        }
        CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd");
        size_t bad = n;
        for (size_t i = 0; i < n && bad == n; i++) {
            float want = float(1 + 2 * (i % 1000 + round));
            if (a[0][i] != want || a[1][i] != want) bad = i;
        }
        CHECK(bad == n, "round %d of grouped all-reduces: element %zu is wrong", round, bad);
    }

    const size_t half = n / 2;
    for (int r = 0; r < 2; r++) {
        for (size_t i = 0; i < n; i++) a[r][i] = float(10 * r + i % 7);
    }
    CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
    for (int owner = 0; owner < 2; owner++) {
        for (int r = 0; r < 2; r++) {
            float* shard = a[r] + owner * half;
            int st = ncclReduce(shard, shard, half, FLOAT32, SUM, owner, comms[r], nullptr);
            CHECK(st == SUCCESS, "grouped ncclReduce: %d", st);
        }
    }
    CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd");
    CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
    for (int owner = 0; owner < 2; owner++) {
        for (int r = 0; r < 2; r++) {
            float* shard = a[r] + owner * half;
            int st = ncclBroadcast(shard, shard, half, FLOAT32, owner, comms[r], nullptr);
            CHECK(st == SUCCESS, "grouped ncclBroadcast: %d", st);
        }
    }
    CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd");
    size_t bad = n;
    for (size_t i = 0; i < n && bad == n; i++) {
        float want = float(10 + 2 * (i % 7));
        if (a[0][i] != want || a[1][i] != want) bad = i;
    }
    CHECK(bad == n, "grouped reduces and broadcasts: element %zu is wrong", bad);
    for (int r = 0; r < 2; r++) {
        CHECK(async_error(comms[r]) == SUCCESS, "rank %d: async error %d", r,
              async_error(comms[r]));
    }
}

// ncclCommInitAll, and ncclCommInitRank of both ranks in one group, each driven from this
// thread.
void one_thread_drives_all() {
    Comm comms[2] = {nullptr, nullptr};
    const int devices[2] = {1, 0};
    CHECK(ncclCommInitAll(comms, 2, devices) == SUCCESS, "ncclCommInitAll");
    for (int r = 0; r < 2; r++) {
        int device = -1;
        int me = -1;
        int n = -1;
        CHECK(ncclCommCuDevice(comms[r], &device) == SUCCESS && device == devices[r],
              "InitAll rank %d: device %d, want %d", r, device, devices[r]);
        CHECK(ncclCommUserRank(comms[r], &me) == SUCCESS && me == r, "InitAll rank %d: %d", r, me);
        CHECK(ncclCommCount(comms[r], &n) == SUCCESS && n == 2, "InitAll count %d", n);
    }
    drive_two_ranks(comms);
    for (int r = 0; r < 2; r++) CHECK(ncclCommDestroy(comms[r]) == SUCCESS, "ncclCommDestroy");

    const UniqueId id = new_id();
    CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
    for (int r = 0; r < 2; r++) {
        use_device(r);
        comms[r] = nullptr;
        int st = ncclCommInitRank(&comms[r], 2, id, r);
        CHECK(st == SUCCESS && comms[r], "grouped ncclCommInitRank of rank %d: %d", r, st);
    }
    CHECK(ncclGroupEnd() == SUCCESS, "ncclGroupEnd joining both ranks");
    CHECK(!segment_exists(id), "the segment is still in /dev/shm after both ranks joined");
    for (int r = 0; r < 2; r++) {
        int device = -1;
        CHECK(ncclCommCuDevice(comms[r], &device) == SUCCESS && device == r,
              "grouped InitRank rank %d: device %d", r, device);
    }
    drive_two_ranks(comms);
    for (int r = 0; r < 2; r++) CHECK(ncclCommDestroy(comms[r]) == SUCCESS, "ncclCommDestroy");
}

// A communicator of one rank: the arguments refused, groups, communicators no longer live.
void refused_arguments() {
    const UniqueId id = new_id();
    use_device(0);
    Comm bad = nullptr;
    CHECK(ncclCommInitRank(&bad, 0, id, 0) == INVALID_ARGUMENT, "InitRank of 0 ranks");
    CHECK(ncclCommInitRank(&bad, 2, id, 2) == INVALID_ARGUMENT, "InitRank of rank 2 of 2");
    CHECK(ncclCommInitRank(&bad, 2, id, -1) == INVALID_ARGUMENT, "InitRank of rank -1");
    const UniqueId zeros{};
    CHECK(ncclCommInitRank(&bad, 1, zeros, 0) == INVALID_ARGUMENT, "InitRank of a made-up id");
    CHECK(bad == nullptr, "a refused InitRank set its communicator");

    Comm c = join(id, 1, 0);
    const size_t n = 8;
    DeviceArray<float> a(n);
    DeviceArray<float> b(n);
    float host[n] = {};
    for (size_t i = 0; i < n; i++) a[i] = float(i + 1);

    // One rank: the result is the input.
    int st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == SUCCESS && std::memcmp(a.get(), b.get(), n * 4) == 0, "one-rank all-reduce");
    st = ncclAllReduce(nullptr, nullptr, 0, FLOAT32, SUM, c, nullptr);
    CHECK(st == SUCCESS, "a count of 0 with null buffers: %d", st);

    // Buffers outside an allocation.
    st = ncclAllReduce(a.get(), b.get() + 1, n, FLOAT32, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "recvbuff past its allocation: %d", st);
    st = ncclAllReduce(host, b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "host sendbuff: %d", st);
    st = ncclAllReduce(nullptr, b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "null sendbuff: %d", st);
    st = ncclReduce(a.get(), b.get() + 4, n, FLOAT32, SUM, 0, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "the root's recvbuff past its allocation: %d", st);
    st = ncclBroadcast(a.get() + 1, b.get(), n, FLOAT32, 0, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "the root's sendbuff past its allocation: %d", st);

    // Types, operations and roots.
    st = ncclAllReduce(a.get(), b.get(), n, 10, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "datatype 10 (fp8): %d", st);
    st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, 5, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "reduction operation 5: %d", st);
    st = ncclReduce(a.get(), b.get(), n, FLOAT32, SUM, 1, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "reduce onto root 1 of 1 rank: %d", st);
    st = ncclBroadcast(a.get(), b.get(), n, FLOAT32, -1, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "broadcast from root -1: %d", st);
    CHECK(async_error(c) == SUCCESS, "a refused call set the async error");

    // Nested groups: nothing runs before the outermost ncclGroupEnd.
    b.clear();
    CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
    CHECK(ncclGroupStart() == SUCCESS, "nested ncclGroupStart");
    st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == SUCCESS, "grouped ncclAllReduce: %d", st);
    CHECK(ncclGroupEnd() == SUCCESS, "inner ncclGroupEnd");
    CHECK(untouched(b.get(), n * 4), "a grouped call ran at the inner ncclGroupEnd");
    CHECK(ncclGroupEnd() == SUCCESS, "outer ncclGroupEnd");
    CHECK(std::memcmp(a.get(), b.get(), n * 4) == 0, "the group did not run");

    // A refused call inside a group: ncclGroupEnd returns its error and nothing runs.
    b.clear();
    CHECK(ncclGroupStart() == SUCCESS, "ncclGroupStart");
    st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == SUCCESS, "grouped ncclAllReduce: %d", st);
    st = ncclAllReduce(a.get(), b.get() + 1, n, FLOAT32, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "grouped call past its allocation: %d", st);
    st = ncclGroupEnd();
    CHECK(st == INVALID_ARGUMENT, "ncclGroupEnd of a group with a refused call: %d", st);
    CHECK(untouched(b.get(), n * 4), "a group with a refused call ran");
    CHECK(ncclGroupEnd() == INVALID_USAGE, "ncclGroupEnd without ncclGroupStart");
    st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == SUCCESS && async_error(c) == SUCCESS, "the communicator after a failed group");

    // A communicator no longer live.
    CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
    CHECK(ncclCommDestroy(c) == INVALID_ARGUMENT, "ncclCommDestroy twice");
    CHECK(ncclCommAbort(c) == INVALID_ARGUMENT, "ncclCommAbort after ncclCommDestroy");
    int e = -1;
    CHECK(ncclCommGetAsyncError(c, &e) == INVALID_ARGUMENT, "GetAsyncError of a destroyed one");
    st = ncclAllReduce(a.get(), b.get(), n, FLOAT32, SUM, c, nullptr);
    CHECK(st == INVALID_ARGUMENT, "ncclAllReduce on a destroyed communicator: %d", st);
    CHECK(ncclCommDestroy(nullptr) == SUCCESS, "ncclCommDestroy(NULL)");
}

// Two ranks on one device, by ncclCommInitRank and by ncclCommInitAll; a device that is not
// there.
void duplicate_devices() {
    const UniqueId id = new_id();
    on_rank_threads(2, [&](int rank) {
        use_device(0);
        Comm c = nullptr;
        int st = ncclCommInitRank(&c, 2, id, rank);
        CHECK(st == INVALID_USAGE && c == nullptr, "rank %d of two on device 0: %d", rank, st);
    });
    CHECK(!segment_exists(id), "the segment of a refused join is still in /dev/shm");
    Comm comms[2] = {nullptr, nullptr};
    const int same[2] = {0, 0};
    CHECK(ncclCommInitAll(comms, 2, same) == INVALID_USAGE, "ncclCommInitAll on devices 0, 0");
    const int missing[2] = {0, 4};
    CHECK(ncclCommInitAll(comms, 2, missing) == INVALID_ARGUMENT,
          "ncclCommInitAll on device 4 of 4");
}

// NCCL_EMULATE_TIMEOUT_S=1: a join and a collective that a peer never reaches give up after
// it; the late peer then fails at once.
void timeouts() {
    setenv("NCCL_EMULATE_TIMEOUT_S", "1", 1);
    const UniqueId lonely = new_id();
    use_device(0);
    Comm c = nullptr;
    auto start = Clock::now();
    int st = ncclCommInitRank(&c, 2, lonely, 0);
    double waited = seconds_since(start);
    CHECK(st == REMOTE_ERROR && c == nullptr, "a join nobody else makes: %d", st);
    CHECK(waited > 0.9 && waited < 3, "a join nobody else makes gave up after %.2f s", waited);
    CHECK(!segment_exists(lonely), "the segment of a join that timed out is still in /dev/shm");

    const UniqueId id = new_id();
    std::atomic<bool> timed_out{false};
    on_rank_threads(2, [&](int rank) {
        Comm comm = join(id, 2, rank);
        DeviceArray<float> v(4);
        if (rank == 0) {
            auto t0 = Clock::now();
            int s = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, comm, nullptr);
            double w = seconds_since(t0);
            CHECK(s == SUCCESS, "a collective that times out returns %d (its failure is "
                  "asynchronous)", s);
            CHECK(w > 0.9 && w < 3, "the collective gave up after %.2f s", w);
            CHECK(async_error(comm) == REMOTE_ERROR, "async error %d", async_error(comm));
            s = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, comm, nullptr);
            CHECK(s == REMOTE_ERROR, "a call after the timeout: %d", s);
            timed_out = true;
            CHECK(ncclCommAbort(comm) == SUCCESS, "ncclCommAbort");
        } else {
            wait_for_flag(timed_out);
            auto t0 = Clock::now();
            int s = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, comm, nullptr);
            CHECK(s == REMOTE_ERROR, "the late rank's collective: %d", s);
            CHECK(seconds_since(t0) < 0.5, "the late rank waited %.2f s", seconds_since(t0));
            CHECK(async_error(comm) == REMOTE_ERROR, "async error %d", async_error(comm));
            CHECK(ncclCommDestroy(comm) == SUCCESS, "ncclCommDestroy");
        }
    });
    setenv("NCCL_EMULATE_TIMEOUT_S", "10", 1);
}

// A peer's ncclCommAbort, or its ncclCommDestroy without reaching the collective, ends the
// collective another rank waits in at once (the timeout is 10 s).
void peer_gives_up(bool abort) {
    const UniqueId id = new_id();
    std::atomic<bool> calling{false};
    on_rank_threads(2, [&](int rank) {
        Comm c = join(id, 2, rank);
        if (rank == 0) {
            DeviceArray<float> v(4);
            calling = true;
            auto start = Clock::now();
            int st = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, c, nullptr);
            double waited = seconds_since(start);
            CHECK(st == SUCCESS, "the waiting rank's collective returns %d", st);
            CHECK(waited < 1, "the waiting rank waited %.2f s after its peer's %s", waited,
                  abort ? "ncclCommAbort" : "ncclCommDestroy");
            CHECK(async_error(c) == REMOTE_ERROR, "async error %d", async_error(c));
            st = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, c, nullptr);
            CHECK(st == REMOTE_ERROR, "a later call: %d", st);
            CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
        } else {
            wait_for_flag(calling);
            usleep(200000);
            int st = abort ? ncclCommAbort(c) : ncclCommDestroy(c);
            CHECK(st == SUCCESS, "%s: %d", abort ? "ncclCommAbort" : "ncclCommDestroy", st);
        }
    });
}

void peer_aborts() { peer_gives_up(true); }

void peer_destroys() { peer_gives_up(false); }

// Collectives that differ between two ranks: each fails on both with ncclInvalidUsage.
void mismatched_calls() {
    enum Kind { ALL_REDUCE, REDUCE, BROADCAST };
    struct Call {
        Kind kind;
        size_t count;
        int dtype;
        int op;
        int root;
    };
    struct Mismatch {
        const char* what;
        Call calls[2];
    };
    const Mismatch cases[] = {
        {"count", {{ALL_REDUCE, 4, FLOAT32, SUM, 0}, {ALL_REDUCE, 5, FLOAT32, SUM, 0}}},
        {"datatype", {{ALL_REDUCE, 4, FLOAT32, SUM, 0}, {ALL_REDUCE, 4, INT32, SUM, 0}}},
        {"operation", {{ALL_REDUCE, 4, FLOAT32, SUM, 0}, {ALL_REDUCE, 4, FLOAT32, MAX, 0}}},
        {"root", {{REDUCE, 4, FLOAT32, SUM, 0}, {REDUCE, 4, FLOAT32, SUM, 1}}},
        {"collective", {{ALL_REDUCE, 4, FLOAT32, SUM, 0}, {BROADCAST, 4, FLOAT32, SUM, 0}}},
    };
    for (const Mismatch& m : cases) {
        const UniqueId id = new_id();
        on_rank_threads(2, [&](int rank) {
            Comm c = join(id, 2, rank);
            DeviceArray<float> v(8);
            const Call& call = m.calls[rank];
            int st = -1;
            switch (call.kind) {
                case ALL_REDUCE:
                    st = ncclAllReduce(v.get(), v.get(), call.count, call.dtype, call.op, c,
                                       nullptr);
                    break;
                case REDUCE:
                    st = ncclReduce(v.get(), v.get(), call.count, call.dtype, call.op, call.root,
                                    c, nullptr);
                    break;
                case BROADCAST:
                    st = ncclBroadcast(v.get(), v.get(), call.count, call.dtype, call.root, c,
                                       nullptr);
                    break;
            }
            CHECK(st == SUCCESS, "%s mismatch, rank %d: the call returns %d", m.what, rank, st);
            CHECK(async_error(c) == INVALID_USAGE, "%s mismatch, rank %d: async error %d",
                  m.what, rank, async_error(c));
            st = ncclAllReduce(v.get(), v.get(), 4, FLOAT32, SUM, c, nullptr);
            CHECK(st == INVALID_USAGE, "%s mismatch, rank %d: a later call returns %d", m.what,
                  rank, st);
            CHECK(ncclCommDestroy(c) == SUCCESS, "ncclCommDestroy");
        });
    }
}

// Rank `rank` of the process checks: a float64 all-reduce of four chunks; then rank 1 exits
// without a word while rank 0 waits for it in the next collective.
void process_rank(const UniqueId& id, int rank) {
    use_device(rank);
    Comm c = join(id, 2, rank);
    const size_t n = size_t(1) << 20;
    DeviceArray<double> v(n);
    for (size_t i = 0; i < n; i++) v[i] = double(i) * (rank + 1) * 0.5;
    int st = ncclAllReduce(v.get(), v.get(), n, FLOAT64, SUM, c, nullptr);
    CHECK(st == SUCCESS, "process rank %d: ncclAllReduce %d", rank, st);
    size_t bad = n;
    for (size_t i = 0; i < n && bad == n; i++) {
        if (v[i] != double(i) * 1.5) bad = i;
    }
    CHECK(bad == n, "process rank %d: element %zu is wrong", rank, bad);
    if (rank == 1) return;
    auto start = Clock::now();
    st = ncclAllReduce(v.get(), v.get(), 4, FLOAT64, SUM, c, nullptr);
    double waited = seconds_since(start);
    CHECK(st == SUCCESS, "the collective whose peer exited returns %d", st);
    CHECK(async_error(c) == REMOTE_ERROR, "async error %d", async_error(c));
    CHECK(waited < 2, "the collective whose peer exited waited %.2f s", waited);
    CHECK(ncclCommAbort(c) == SUCCESS, "ncclCommAbort");
}

void processes() {
    const UniqueId id = new_id();
    pid_t children[2];
    for (int rank = 0; rank < 2; rank++) {
        std::fflush(stdout);
        std::fflush(stderr);
        children[rank] = fork();
        if (children[rank] == 0) {
            alarm(30);
            process_rank(id, rank);
            std::fflush(stdout);
            _exit(0);
        }
        CHECK(children[rank] > 0, "fork");
    }
    for (int rank = 0; rank < 2; rank++) {
        if (children[rank] <= 0) continue;
        int status = 0;
        waitpid(children[rank], &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "the process of rank %d ended with status 0x%x", rank, status);
    }
    CHECK(!segment_exists(id), "the segment of the process ranks is still in /dev/shm");
}

void nothing_left() {
    for (const std::string& file : segments) {
        CHECK(access(file.c_str(), F_OK) != 0, "%s is still there", file.c_str());
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::printf("usage: nccl_check DIR\n");
        return 2;
    }
    void* shared = mmap(nullptr, sizeof(Tally), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                        -1, 0);
    if (shared == MAP_FAILED) {
        std::printf("mmap failed\n");
        return 1;
    }
    tally = new (shared) Tally{};
    signal(SIGALRM, on_alarm);
    alarm(120);

    const std::string dir = argv[1];
    void* cuda = dlopen((dir + "/libcuda.so.1").c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!cuda) {
        std::printf("dlopen: %s\n", dlerror());
        return 1;
    }
    void* nccl = dlopen((dir + "/libnccl.so.2").c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!nccl) {
        std::printf("dlopen: %s\n", dlerror());
        return 1;
    }
    LOAD(cuda, cuInit);
    LOAD(cuda, cuDevicePrimaryCtxRetain);
    LOAD(cuda, cuCtxSetCurrent);
    LOAD(cuda, cuMemAlloc_v2);
    LOAD(cuda, cuMemFree_v2);
    LOAD(nccl, ncclGetUniqueId);
    LOAD(nccl, ncclCommInitRank);
    LOAD(nccl, ncclCommInitAll);
    LOAD(nccl, ncclCommDestroy);
    LOAD(nccl, ncclCommAbort);
    LOAD(nccl, ncclCommGetAsyncError);
    LOAD(nccl, ncclCommCount);
    LOAD(nccl, ncclCommCuDevice);
    LOAD(nccl, ncclCommUserRank);
    LOAD(nccl, ncclGroupStart);
    LOAD(nccl, ncclGroupEnd);
    LOAD(nccl, ncclAllReduce);
    LOAD(nccl, ncclReduce);
    LOAD(nccl, ncclBroadcast);

    setenv("GPU_EMULATE_DEVICES", "4", 1);
    setenv("NCCL_EMULATE_TIMEOUT_S", "10", 1);  // a rank that fails early stalls no one long
    if (cuInit(0) != 0) {
        std::printf("cuInit failed\n");
        return 1;
    }

    section("every type and operation, 3 ranks", types_and_operations, {});
    section("several chunks, 3 ranks", several_chunks, {});
    section("ZeRO groups, 3 ranks", zero_groups, {});
    section("one thread drives both ranks", one_thread_drives_all, {});
    section("refused arguments, 1 rank", refused_arguments,
            {"is not in any device allocation", "runs 4 bytes past the end",
             "is not emulated", "is not a built-in one", "root 1 is not a rank of 1",
             "is not a live communicator", "no ncclGroupStart to end",
             "was not made by ncclGetUniqueId"});
    section("two ranks on one device", duplicate_devices,
            {"duplicate GPU: ranks 0 and 1 are both on cuda:0", "device 4 is not one of the 4"});
    section("timeouts (1 s)", timeouts, {"NCCL_EMULATE_TIMEOUT_S", "never arrived"});
    section("a peer's ncclCommAbort", peer_aborts, {"rank 1 failed or aborted"});
    section("a peer's ncclCommDestroy", peer_destroys,
            {"rank 1 destroyed or aborted its communicator without reaching it"});
    section("mismatched calls", mismatched_calls,
            {"the ranks called different collectives", "ncclAllReduce #0 (count 4, float32, sum)",
             "ncclAllReduce #0 (count 5, float32, sum)"});
    section("processes, one exiting mid-run", processes, {"(pid", "has exited"});
    section("nothing left in /dev/shm", nothing_left, {});

    std::printf("%d checks, %d failures\n", tally->checks.load(), tally->failures.load());
    return tally->failures.load() ? 1 : 0;
}
