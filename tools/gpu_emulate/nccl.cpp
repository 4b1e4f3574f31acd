// nccl.cpp: a CPU stand-in for NCCL (libnccl.so.2), so that the NCCL process group of
// src/dist/nccl.rs and its tests run on a machine without a GPU (with driver.cpp's
// libcuda.so.1, where a device pointer is a host address and every stream operation is done
// before its call returns). It exports the entry points nanogpt loads (the NcclApi block of
// src/cuda/nccl.rs) with nccl.h's C signatures and does the collectives on the CPU:
//
// - communicators: ncclGetUniqueId names a POSIX shared-memory segment (a random name);
//   ncclCommInitRank maps it, creating it if needed, and returns once all nranks ranks have
//   joined, whether they are threads of one process or processes of their own. The segment
//   is unlinked as soon as every rank has joined (or a join failed), so that a run that
//   crashes leaves nothing in /dev/shm. ncclCommInitAll makes all the communicators of one
//   process at once. A communicator's device is the one whose context is current on the
//   calling thread (cuCtxGetDevice; 0 when none is) or the one InitAll's list gives; two
//   ranks on one device are refused (ncclInvalidUsage), as NCCL refuses them.
// - ncclAllReduce, ncclReduce and ncclBroadcast, with ncclSum, ncclProd, ncclMax, ncclMin and
//   ncclAvg (as NCCL computes it: each input multiplied by 1/nranks, then summed, for
//   floating types; the sum divided by nranks for integers), on ncclInt8 to ncclFloat64 and
//   ncclBfloat16 (16-bit floats rounded after each operation). Each rank copies its input
//   into its own 2 MiB slot of the segment, a chunk at a time; after all ranks have written
//   theirs, each computes its output from the slots, combining the ranks' values in rank
//   order, so that every rank gets the same bits; then all wait again before the slots are
//   reused. In place (send == recv) works. The stream argument is not used: the call returns
//   with the collective complete, so it blocks until every rank has reached the collective.
//   Every rank must call the same collectives in the same order with the same count, type,
//   operation and root; a mismatch fails the collective (ncclInvalidUsage, with both calls
//   named on stderr) rather than hang or mix unrelated data. Buffers must lie inside one
//   allocation of the emulated driver (checked with cuPointerGetAttribute).
// - groups: a call between ncclGroupStart and ncclGroupEnd is checked when it is made and run
//   at the outermost ncclGroupEnd, in call order per communicator, the communicators on
//   threads of their own (the first on the calling thread), so that one thread can drive
//   every rank of an InitAll clique (as `nanogpt doctor` does).
// - failures never hang: a collective, or the join of InitRank, that has waited
//   NCCL_EMULATE_TIMEOUT_S seconds (default 60) for a peer, or finds that a peer's process is
//   gone, that a peer destroyed its communicator or that a peer failed or aborted, gives up:
//   the communicator is marked failed (ncclRemoteError; ncclInvalidUsage for a mismatch), the
//   reason is printed on stderr, and the peers' waits end with ncclRemoteError in turn.
//   ncclCommGetAsyncError then reports the code (a collective call itself returns
//   ncclSuccess, as NCCL reports failures of enqueued work asynchronously) and every later
//   call on the communicator returns it. ncclCommAbort returns at once and ends the peers'
//   waits the same way; ncclCommDestroy waits for nothing, as nothing is ever pending.
//
// Not emulated: the fp8 types, user-defined operations (ncclRedOpCreatePreMulSum), the
// other collectives and point-to-point calls (ncclAllGather, ncclReduceScatter, ncclSend,
// ...), non-blocking communicators and configurations (ncclCommInitRankConfig),
// ncclCommSplit, ranks on different machines (the segment is local), and anything not
// listed in src/cuda/nccl.rs. Communicator handles are checked against a table of live
// ones, so that a destroyed or foreign one is ncclInvalidArgument rather than a crash.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <dlfcn.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int ncclResult_t;
typedef int ncclDataType_t;
typedef int ncclRedOp_t;
typedef void* cudaStream_t;

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
    char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

struct ncclComm;
typedef struct ncclComm* ncclComm_t;

namespace {

// ncclResult_t (nccl.h).
enum : ncclResult_t {
    SUCCESS = 0,
    UNHANDLED_CUDA_ERROR = 1,
    SYSTEM_ERROR = 2,
    INTERNAL_ERROR = 3,
    INVALID_ARGUMENT = 4,
    INVALID_USAGE = 5,
    REMOTE_ERROR = 6,
    IN_PROGRESS = 7,
    TIMEOUT = 8,
};

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

// ncclRedOp_t (the built-in operations).
enum : int { SUM = 0, PROD = 1, MAX = 2, MIN = 3, AVG = 4 };

constexpr int VERSION = 22703;             // NCCL_VERSION_CODE of 2.27.3
constexpr size_t SLOT_BYTES = 2u << 20;    // each rank's share of the segment
constexpr int MAX_RANKS = 4096;
constexpr char ID_MAGIC[8] = {'n', 'c', 'c', 'l', '-', 'e', 'm', 'u'};
constexpr int ID_RANDOM_BYTES = 16;        // after the magic: the segment's name

static_assert(std::atomic<uint32_t>::is_always_lock_free && sizeof(std::atomic<uint32_t>) == 4,
              "the shared words are plain 32-bit words (futexes)");
static_assert(std::atomic<int32_t>::is_always_lock_free && sizeof(std::atomic<int32_t>) == 4);

// ------------------------------------------------------------------ the shared segment
//
// [Header][Peer x nranks] ... page boundary ... [slot of rank 0][slot of rank 1]...
// A new segment is all zero bytes, which is the initial state of every field.

struct Header {
    std::atomic<uint32_t> nranks;      // set by the first rank to map the segment
    std::atomic<uint32_t> attached;    // ranks that have joined (a futex word)
    std::atomic<uint32_t> arrived;     // ranks at the present barrier
    std::atomic<uint32_t> generation;  // barriers completed (a futex word)
    std::atomic<int32_t> poison;       // once a rank failed or aborted: what every wait ends with
    std::atomic<int32_t> poisoned_by;  // that rank
};

// Peer::state.
enum : uint32_t { FREE = 0, JOINED = 1, LEFT = 2 };

// Op::kind.
enum : int32_t { ALL_REDUCE = 1, REDUCE = 2, BROADCAST = 3, JOIN = 4 };

// The collective a rank is in, for the check that all ranks called the same one.
struct OpDesc {
    int32_t kind, dtype, redop, root;
    uint64_t count, seq;
    bool operator==(const OpDesc&) const = default;
};

// What each rank tells the others.
struct Peer {
    std::atomic<uint32_t> state;
    std::atomic<int32_t> pid;
    std::atomic<int32_t> device;
    std::atomic<uint32_t> barriers;  // barriers this rank has reached
    OpDesc op;                       // written before its collective's first barrier
};

constexpr size_t PEERS_OFFSET = 64;
static_assert(sizeof(Header) <= PEERS_OFFSET);

size_t slots_offset(int nranks) {
    return (PEERS_OFFSET + size_t(nranks) * sizeof(Peer) + 4095) & ~size_t(4095);
}

size_t segment_bytes(int nranks) { return slots_offset(nranks) + size_t(nranks) * SLOT_BYTES; }

}  // namespace

struct ncclComm {
    int rank = 0;
    int nranks = 0;
    int device = 0;
    std::string name;  // of the segment
    unsigned char* base = nullptr;
    size_t bytes = 0;
    Header* h = nullptr;
    Peer* peers = nullptr;
    unsigned char* slots = nullptr;
    double timeout_s = 60;
    uint64_t seq = 0;                    // collectives run so far
    std::atomic<int32_t> failed{SUCCESS};  // the asynchronous error
    std::atomic<bool> told{false};       // the failure has been printed

    unsigned char* slot(int r) const { return slots + size_t(r) * SLOT_BYTES; }
};

namespace {

// ------------------------------------------------------------------ helpers

void warn(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "emulated NCCL: %s\n", msg);
}

std::string format(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return msg;
}

double timeout_seconds() {
    const char* v = std::getenv("NCCL_EMULATE_TIMEOUT_S");
    if (v && *v) {
        char* end = nullptr;
        double s = std::strtod(v, &end);
        if (end != v && s > 0) return s;
        warn("NCCL_EMULATE_TIMEOUT_S=%s is not a positive number of seconds: using 60", v);
    }
    return 60;
}

void futex_wait(std::atomic<uint32_t>& word, uint32_t seen, long nanoseconds) {
    timespec ts{0, nanoseconds};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT, seen, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>& word) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE, INT_MAX, nullptr, nullptr,
            0);
}

// True when process `pid` has exited (gone, or a zombie nobody has reaped yet).
bool process_gone(pid_t pid) {
    if (pid <= 0 || pid == getpid()) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return true;
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
    FILE* f = std::fopen(path, "r");
    if (!f) return false;
    char buf[512];
    size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* p = std::strrchr(buf, ')');
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

// An entry point of the CUDA driver loaded in this process (nanogpt loads it RTLD_GLOBAL), or
// null.
void* driver_symbol(const char* name) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) return f;
    static void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return lib ? dlsym(lib, name) : nullptr;
}

// The device whose context is current on this thread; 0 when none is (as cudaGetDevice).
int current_device() {
    auto get = reinterpret_cast<int (*)(int*)>(driver_symbol("cuCtxGetDevice"));
    int d = -1;
    if (get && get(&d) == 0 && d >= 0) return d;
    return 0;
}

// "" when [p, p + bytes) lies inside one device allocation, else what is wrong with it.
std::string outside_device_memory(const void* p, size_t bytes) {
    if (!p) return "is null";
    auto get = reinterpret_cast<int (*)(void*, int, unsigned long long)>(
        driver_symbol("cuPointerGetAttribute"));
    if (!get) return "";
    unsigned long long start = 0;
    size_t size = 0;
    auto at = reinterpret_cast<unsigned long long>(p);
    // CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE.
    if (get(&start, 11, at) != 0 || get(&size, 12, at) != 0)
        return format("(%p) is not in any device allocation", p);
    if (at + bytes > start + size)
        return format("(%p, %zu bytes) runs %llu bytes past the end of its %zu-byte device "
                      "allocation",
                      p, bytes, at + bytes - (start + size), size);
    return "";
}

size_t type_size(int dtype) {
    switch (dtype) {
        case INT8: case UINT8: return 1;
        case FLOAT16: case BFLOAT16: return 2;
        case INT32: case UINT32: case FLOAT32: return 4;
        case INT64: case UINT64: case FLOAT64: return 8;
        default: return 0;
    }
}

const char* type_name(int dtype) {
    static const char* names[] = {"int8",    "uint8",   "int32",   "uint32",  "int64",
                                  "uint64",  "float16", "float32", "float64", "bfloat16"};
    return dtype >= 0 && dtype <= BFLOAT16 ? names[dtype] : "?";
}

const char* op_name(int redop) {
    static const char* names[] = {"sum", "prod", "max", "min", "avg"};
    return redop >= 0 && redop <= AVG ? names[redop] : "?";
}

const char* call_name(int kind) {
    switch (kind) {
        case ALL_REDUCE: return "ncclAllReduce";
        case REDUCE: return "ncclReduce";
        case BROADCAST: return "ncclBroadcast";
        case JOIN: return "ncclCommInitRank";
        default: return "?";
    }
}

std::string describe(const OpDesc& d) {
    std::string s = format("%s #%llu (count %llu, %s", call_name(d.kind),
                           (unsigned long long)d.seq, (unsigned long long)d.count,
                           type_name(d.dtype));
    if (d.kind != BROADCAST) s += format(", %s", op_name(d.redop));
    if (d.kind != ALL_REDUCE) s += format(", root %d", d.root);
    return s + ")";
}

// ------------------------------------------------------------------ live communicators

std::mutex live_lock;
std::set<ncclComm*> live;

bool is_live(ncclComm* c) {
    std::lock_guard<std::mutex> g(live_lock);
    return c && live.count(c);
}

void add_live(ncclComm* c) {
    std::lock_guard<std::mutex> g(live_lock);
    live.insert(c);
}

bool remove_live(ncclComm* c) {
    std::lock_guard<std::mutex> g(live_lock);
    return live.erase(c) == 1;
}

// ------------------------------------------------------------------ failing and waiting

void say(const ncclComm* c, const std::string& what) {
    std::fprintf(stderr, "emulated NCCL: rank %d of %d (cuda:%d): %s\n", c->rank, c->nranks,
                 c->device, what.c_str());
}

// Marks `c` failed with `code` (the first failure stays), tells the peers (their waits end
// with ncclRemoteError) and prints `why` once; returns the communicator's error.
ncclResult_t fail(ncclComm* c, ncclResult_t code, const std::string& why) {
    int32_t none = SUCCESS;
    c->failed.compare_exchange_strong(none, code);
    none = SUCCESS;
    if (c->h->poison.compare_exchange_strong(none, REMOTE_ERROR)) c->h->poisoned_by.store(c->rank);
    futex_wake(c->h->generation);
    futex_wake(c->h->attached);
    if (!c->told.exchange(true)) say(c, why);
    return c->failed.load();
}

// The ranks `missing(r)` names, as "1, 3".
template <class Missing>
std::string rank_list(const ncclComm* c, Missing missing) {
    std::string s;
    for (int r = 0; r < c->nranks; r++) {
        if (r == c->rank || !missing(r)) continue;
        s += format(s.empty() ? "%d" : ", %d", r);
    }
    return s.empty() ? "?" : s;
}

// Waits until `done()`, sleeping on the futex `word` between looks; ends with an error when a
// peer failed, aborted, left or exited, or after the timeout. `missing(r)`: whether rank r is
// one of those waited for (for the messages).
template <class Done, class Missing>
ncclResult_t wait_for(ncclComm* c, std::atomic<uint32_t>& word, Done done, Missing missing,
                      const std::string& what) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    auto next_look = start;
    for (int spins = 0;; spins++) {
        uint32_t seen = word.load();
        if (done()) return SUCCESS;
        // Every failure below is checked again against done(): a peer that completed the wait
        // and then left, exited or aborted must not fail it.
        if (int32_t p = c->h->poison.load()) {
            if (done()) return SUCCESS;
            return fail(c, p,
                        format("%s: rank %d failed or aborted its communicator", what.c_str(),
                               c->h->poisoned_by.load()));
        }
        if (spins < 64) {
            sched_yield();
            continue;
        }
        auto now = clock::now();
        if (now >= next_look) {
            next_look = now + std::chrono::milliseconds(100);
            for (int r = 0; r < c->nranks; r++) {
                if (r == c->rank) continue;
                uint32_t state = c->peers[r].state.load();
                int32_t pid = c->peers[r].pid.load();
                std::string why;
                if (state == LEFT)
                    why = format("rank %d destroyed or aborted its communicator without "
                                 "reaching it",
                                 r);
                else if (state == JOINED && process_gone(pid))
                    why = format("the process of rank %d (pid %d) has exited", r, int(pid));
                if (why.empty()) continue;
                if (done()) return SUCCESS;
                return fail(c, REMOTE_ERROR, what + ": " + why);
            }
            double waited = std::chrono::duration<double>(now - start).count();
            if (waited >= c->timeout_s) {
                if (done()) return SUCCESS;
                return fail(c, REMOTE_ERROR,
                            format("%s: waited %.0f s (NCCL_EMULATE_TIMEOUT_S) for rank(s) %s, "
                                   "which never arrived",
                                   what.c_str(), waited, rank_list(c, missing).c_str()));
            }
        }
        futex_wait(word, seen, 2000000);
    }
}

// All ranks meet; SUCCESS, or the communicator's error.
ncclResult_t barrier(ncclComm* c, const std::string& what) {
    Header* h = c->h;
    uint32_t mine = c->peers[c->rank].barriers.fetch_add(1) + 1;
    uint32_t g = h->generation.load();
    if (h->arrived.fetch_add(1) + 1 == uint32_t(c->nranks)) {
        h->arrived.store(0);
        h->generation.store(g + 1);
        futex_wake(h->generation);
        return SUCCESS;
    }
    return wait_for(
        c, h->generation, [&] { return h->generation.load() != g; },
        [&](int r) { return c->peers[r].barriers.load() < mine; }, what);
}

// ------------------------------------------------------------------ reductions

struct Bf16 {
    uint16_t bits;
};

// How a type is combined: loaded into a computation type C and stored back after each
// operation (so that 16-bit floats are rounded after each, as on the GPU).
template <class T>
struct Elem {
    using C = T;
    static C load(T x) { return x; }
    static T store(C x) { return x; }
};

template <>
struct Elem<_Float16> {
    using C = float;
    static float load(_Float16 x) { return float(x); }
    static _Float16 store(float x) { return _Float16(x); }
};

template <>
struct Elem<Bf16> {
    using C = float;
    static float load(Bf16 x) {
        uint32_t u = uint32_t(x.bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static Bf16 store(float f) {  // round to nearest even; NaN stays NaN
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40)};
        u += 0x7fffu + ((u >> 16) & 1);
        return Bf16{uint16_t(u >> 16)};
    }
};

template <class C>
C combine(C a, C b, int redop) {
    if constexpr (std::is_floating_point_v<C>) {
        switch (redop) {
            case PROD: return a * b;
            case MAX: return std::fmax(a, b);
            case MIN: return std::fmin(a, b);
            default: return a + b;
        }
    } else {
        using U = std::make_unsigned_t<C>;  // wrapping arithmetic, as on the GPU
        switch (redop) {
            case PROD: return C(U(a) * U(b));
            case MAX: return std::max(a, b);
            case MIN: return std::min(a, b);
            default: return C(U(a) + U(b));
        }
    }
}

// out[i] = in[0][i] op in[1][i] op ... op in[nranks-1][i], left to right.
template <class T>
void reduce_typed(unsigned char* out_bytes, unsigned char* const* in_bytes, int nranks, size_t n,
                  int redop) {
    using E = Elem<T>;
    using C = typename E::C;
    T* out = reinterpret_cast<T*>(out_bytes);
    constexpr bool floating = std::is_floating_point_v<C>;
    // ncclAvg: floating types multiply each input by 1/nranks (in the type) and sum; integers
    // sum and divide.
    const bool premul = floating && redop == AVG;
    const C scale = E::load(E::store(C(1.0 / nranks)));
    const int op = redop == AVG ? SUM : redop;
    auto pre = [&](T x) { return premul ? E::load(E::store(E::load(x) * scale)) : E::load(x); };
    const T* first = reinterpret_cast<const T*>(in_bytes[0]);
    for (size_t i = 0; i < n; i++) out[i] = E::store(pre(first[i]));
    for (int r = 1; r < nranks; r++) {
        const T* x = reinterpret_cast<const T*>(in_bytes[r]);
        for (size_t i = 0; i < n; i++) out[i] = E::store(combine(E::load(out[i]), pre(x[i]), op));
    }
    if constexpr (!floating) {
        if (redop == AVG)
            for (size_t i = 0; i < n; i++) out[i] = C(out[i] / C(nranks));
    }
}

void reduce(int dtype, unsigned char* out, unsigned char* const* in, int nranks, size_t n,
            int redop) {
    switch (dtype) {
        case INT8: return reduce_typed<int8_t>(out, in, nranks, n, redop);
        case UINT8: return reduce_typed<uint8_t>(out, in, nranks, n, redop);
        case INT32: return reduce_typed<int32_t>(out, in, nranks, n, redop);
        case UINT32: return reduce_typed<uint32_t>(out, in, nranks, n, redop);
        case INT64: return reduce_typed<int64_t>(out, in, nranks, n, redop);
        case UINT64: return reduce_typed<uint64_t>(out, in, nranks, n, redop);
        case FLOAT16: return reduce_typed<_Float16>(out, in, nranks, n, redop);
        case FLOAT32: return reduce_typed<float>(out, in, nranks, n, redop);
        case FLOAT64: return reduce_typed<double>(out, in, nranks, n, redop);
        case BFLOAT16: return reduce_typed<Bf16>(out, in, nranks, n, redop);
    }
}

// ------------------------------------------------------------------ operations

struct Op {
    int32_t kind;
    ncclComm* comm;
    const void* send = nullptr;
    void* recv = nullptr;
    size_t count = 0;
    int dtype = 0;
    int redop = 0;
    int root = -1;
};

// Waits until every rank has joined `c`'s segment; then checks that no two share a device.
ncclResult_t join(ncclComm* c) {
    Header* h = c->h;
    const uint32_t n = uint32_t(c->nranks);
    ncclResult_t r = wait_for(
        c, h->attached, [&] { return h->attached.load() >= n; },
        [&](int p) { return c->peers[p].state.load() == FREE; },
        format("ncclCommInitRank (%d ranks)", c->nranks));
    if (r != SUCCESS) return r;
    for (int a = 0; a < c->nranks; a++) {
        for (int b = a + 1; b < c->nranks; b++) {
            int d = c->peers[a].device.load();
            if (d == c->peers[b].device.load())
                return fail(c, INVALID_USAGE,
                            format("ncclCommInitRank: duplicate GPU: ranks %d and %d are both on "
                                   "cuda:%d",
                                   a, b, d));
        }
    }
    return SUCCESS;
}

// Runs one operation to completion (all ranks take part); SUCCESS or the communicator's error.
ncclResult_t run(const Op& op) {
    ncclComm* c = op.comm;
    if (op.kind == JOIN) return join(c);
    if (int32_t e = c->failed.load()) return e;
    if (op.count == 0) return SUCCESS;
    const size_t es = type_size(op.dtype);
    const size_t chunk = SLOT_BYTES / es;
    Peer& me = c->peers[c->rank];
    me.op = OpDesc{op.kind, op.dtype, op.kind == BROADCAST ? 0 : op.redop,
                   op.kind == ALL_REDUCE ? -1 : op.root, op.count, c->seq++};
    const std::string what = describe(me.op);
    // The output of a chunk is computed here, then copied out (any alignment of recv works).
    thread_local std::vector<uint64_t> scratch(SLOT_BYTES / sizeof(uint64_t));
    std::vector<unsigned char*> in(c->nranks);
    for (int r = 0; r < c->nranks; r++) in[r] = c->slot(r);
    const bool root = c->rank == op.root;
    for (size_t off = 0; off < op.count; off += chunk) {
        const size_t n = std::min(chunk, op.count - off), bytes = n * es;
        // (A broadcast's sendbuff off the root and a reduce's recvbuff may be null.)
        const auto* send = op.send ? static_cast<const unsigned char*>(op.send) + off * es
                                   : nullptr;
        auto* recv = op.recv ? static_cast<unsigned char*>(op.recv) + off * es : nullptr;
        if (op.kind != BROADCAST || root) std::memcpy(c->slot(c->rank), send, bytes);
        if (ncclResult_t r = barrier(c, what)) return r;
        if (off == 0) {
            for (int r = 0; r < c->nranks; r++) {
                if (c->peers[r].op == me.op) continue;
                return fail(c, INVALID_USAGE,
                            format("the ranks called different collectives: rank %d %s, rank %d "
                                   "%s",
                                   c->rank, what.c_str(), r, describe(c->peers[r].op).c_str()));
            }
        }
        auto* out = reinterpret_cast<unsigned char*>(scratch.data());
        switch (op.kind) {
            case ALL_REDUCE:
                reduce(op.dtype, out, in.data(), c->nranks, n, op.redop);
                std::memcpy(recv, out, bytes);
                break;
            case REDUCE:
                if (root) {
                    reduce(op.dtype, out, in.data(), c->nranks, n, op.redop);
                    std::memcpy(recv, out, bytes);
                }
                break;
            case BROADCAST:
                if (!root)
                    std::memcpy(recv, c->slot(op.root), bytes);
                else if (recv != send)
                    std::memmove(recv, send, bytes);
                break;
        }
        // Nobody writes a slot again before everyone has read this chunk.
        if (ncclResult_t r = barrier(c, what)) return r;
    }
    return SUCCESS;
}

// ------------------------------------------------------------------ groups (per thread)

thread_local int group_depth = 0;
thread_local std::vector<Op> group_ops;
thread_local ncclResult_t group_error = SUCCESS;

// An argument error of a call: inside a group it is also the group's result.
ncclResult_t refuse(ncclResult_t code, const char* call, const std::string& why) {
    if (group_depth > 0 && group_error == SUCCESS) group_error = code;
    if (!why.empty()) warn("%s: %s", call, why.c_str());
    return code;
}

// Checks a collective's arguments as NCCL does, then runs it (queues it inside a group).
ncclResult_t submit(const Op& op) {
    const char* call = call_name(op.kind);
    ncclComm* c = op.comm;
    if (!is_live(c))
        return refuse(INVALID_ARGUMENT, call,
                      format("comm %p is not a live communicator", static_cast<void*>(c)));
    if (int32_t e = c->failed.load()) return refuse(e, call, "");
    if (int32_t p = c->h->poison.load()) {
        fail(c, p, format("%s: rank %d failed or aborted its communicator", call,
                          c->h->poisoned_by.load()));
        return refuse(c->failed.load(), call, "");
    }
    const size_t es = type_size(op.dtype);
    if (es == 0)
        return refuse(INVALID_ARGUMENT, call,
                      format("datatype %d is not emulated (ncclInt8 to ncclBfloat16 are)",
                             op.dtype));
    if (op.kind != BROADCAST && (op.redop < SUM || op.redop > AVG))
        return refuse(INVALID_ARGUMENT, call,
                      format("reduction operation %d is not a built-in one", op.redop));
    if (op.kind != ALL_REDUCE && (op.root < 0 || op.root >= c->nranks))
        return refuse(INVALID_ARGUMENT, call,
                      format("root %d is not a rank of %d", op.root, c->nranks));
    if (op.count > SIZE_MAX / es)
        return refuse(INVALID_ARGUMENT, call, format("count %zu is too large", op.count));
    if (op.count > 0) {
        const size_t bytes = op.count * es;
        const bool root = c->rank == op.root;
        if (op.kind != BROADCAST || root) {
            std::string bad = outside_device_memory(op.send, bytes);
            if (!bad.empty()) return refuse(INVALID_ARGUMENT, call, "sendbuff " + bad);
        }
        if (op.kind != REDUCE || root) {
            std::string bad = outside_device_memory(op.recv, bytes);
            if (!bad.empty()) return refuse(INVALID_ARGUMENT, call, "recvbuff " + bad);
        }
    }
    if (group_depth > 0) {
        group_ops.push_back(op);
        return SUCCESS;
    }
    run(op);  // a failure is the communicator's asynchronous error
    return SUCCESS;
}

// ------------------------------------------------------------------ communicators

// The segment's name in a unique id, or "" when the id was not made by ncclGetUniqueId.
std::string segment_name(const ncclUniqueId& id) {
    if (std::memcmp(id.internal, ID_MAGIC, sizeof ID_MAGIC) != 0) return "";
    std::string name = "/nccl-emulate-";
    for (int i = 0; i < ID_RANDOM_BYTES; i++) {
        unsigned char b = static_cast<unsigned char>(id.internal[sizeof ID_MAGIC + i]);
        name += "0123456789abcdef"[b >> 4];
        name += "0123456789abcdef"[b & 15];
    }
    return name;
}

// Maps the segment `name` (creating it if needed) and joins it as `rank` of `nranks` on
// `device`, without waiting for the others.
ncclResult_t attach(const std::string& name, int nranks, int rank, int device, ncclComm** out) {
    const char* call = "ncclCommInitRank";
    const size_t total = segment_bytes(nranks);
    int fd = shm_open(name.c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0) return refuse(SYSTEM_ERROR, call, format("shm_open(%s): %s", name.c_str(),
                                                         std::strerror(errno)));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return refuse(SYSTEM_ERROR, call, format("fstat(%s): %s", name.c_str(),
                                                 std::strerror(errno)));
    }
    if (st.st_size != 0 && size_t(st.st_size) != total) {
        close(fd);
        return refuse(INVALID_USAGE, call,
                      format("rank %d was given %d ranks, and an earlier rank another number",
                             rank, nranks));
    }
    // Every rank sizes it (the same size), so that none can map it before it is sized.
    if (ftruncate(fd, off_t(total)) != 0) {
        close(fd);
        return refuse(SYSTEM_ERROR, call, format("ftruncate(%s): %s", name.c_str(),
                                                 std::strerror(errno)));
    }
    // Reserve the memory now: a full /dev/shm is an error here, not a SIGBUS later.
    int e = posix_fallocate(fd, 0, off_t(total));
    if (e == ENOSPC || e == EFBIG) {
        close(fd);
        shm_unlink(name.c_str());
        return refuse(SYSTEM_ERROR, call,
                      format("cannot reserve %zu bytes of shared memory in /dev/shm: %s", total,
                             std::strerror(e)));
    }
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED)
        return refuse(SYSTEM_ERROR, call, format("mmap(%s): %s", name.c_str(),
                                                 std::strerror(errno)));
    auto* c = new ncclComm;
    c->rank = rank;
    c->nranks = nranks;
    c->device = device;
    c->name = name;
    c->base = static_cast<unsigned char*>(base);
    c->bytes = total;
    c->h = reinterpret_cast<Header*>(c->base);
    c->peers = reinterpret_cast<Peer*>(c->base + PEERS_OFFSET);
    c->slots = c->base + slots_offset(nranks);
    c->timeout_s = timeout_seconds();
    auto give_up = [&](ncclResult_t code, const std::string& why) {
        munmap(c->base, c->bytes);
        delete c;
        return refuse(code, call, why);
    };
    uint32_t seen = 0;
    if (!c->h->nranks.compare_exchange_strong(seen, uint32_t(nranks)) &&
        seen != uint32_t(nranks))
        return give_up(INVALID_USAGE, format("rank %d was given %d ranks, another rank %u", rank,
                                             nranks, seen));
    uint32_t free = FREE;
    if (!c->peers[rank].state.compare_exchange_strong(free, JOINED))
        return give_up(INVALID_USAGE, format("rank %d of the unique id joined twice", rank));
    c->peers[rank].pid.store(int32_t(getpid()));
    c->peers[rank].device.store(device);
    // The last rank to join unlinks the name: the segment lives on while mapped.
    if (c->h->attached.fetch_add(1) + 1 == uint32_t(nranks)) shm_unlink(name.c_str());
    futex_wake(c->h->attached);
    *out = c;
    return SUCCESS;
}

// Leaves the segment and frees `c`; an abort also fails the peers' waits.
void release(ncclComm* c, bool abort) {
    if (abort) {
        int32_t none = SUCCESS;
        if (c->h->poison.compare_exchange_strong(none, REMOTE_ERROR))
            c->h->poisoned_by.store(c->rank);
    }
    c->peers[c->rank].state.store(LEFT);
    futex_wake(c->h->generation);
    futex_wake(c->h->attached);
    // Not every rank joined: nobody else will unlink the name.
    if (c->h->attached.load() < uint32_t(c->nranks)) shm_unlink(c->name.c_str());
    munmap(c->base, c->bytes);
    delete c;
}

}  // namespace

// Only NCCL's entry points are exported (build.sh hides everything else).
#pragma GCC visibility push(default)
extern "C" {

ncclResult_t ncclGetVersion(int* version) {
    if (!version) return INVALID_ARGUMENT;
    *version = VERSION;
    return SUCCESS;
}

const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case SUCCESS: return "no error";
        case UNHANDLED_CUDA_ERROR:
            return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case SYSTEM_ERROR: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case INTERNAL_ERROR:
            return "internal error - please report this issue to the NCCL developers";
        case INVALID_ARGUMENT: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case INVALID_USAGE: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case REMOTE_ERROR: return "remote process exited or there was a network error";
        case IN_PROGRESS: return "NCCL operation in progress";
        case TIMEOUT: return "operation timed out";
        default: return "unknown result code";
    }
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return INVALID_ARGUMENT;
    std::memset(id->internal, 0, sizeof id->internal);
    std::memcpy(id->internal, ID_MAGIC, sizeof ID_MAGIC);
    char* random = id->internal + sizeof ID_MAGIC;
    if (getrandom(random, ID_RANDOM_BYTES, 0) != ID_RANDOM_BYTES) {
        // No entropy source: the clock, the process and a counter still make the name unique.
        static std::atomic<uint64_t> counter{0};
        uint64_t words[2] = {
            uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()),
            (uint64_t(getpid()) << 32) ^ counter.fetch_add(1)};
        std::memcpy(random, words, ID_RANDOM_BYTES);
    }
    return SUCCESS;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank) {
    const char* call = "ncclCommInitRank";
    if (!comm) return refuse(INVALID_ARGUMENT, call, "comm is null");
    *comm = nullptr;
    if (nranks < 1 || nranks > MAX_RANKS)
        return refuse(INVALID_ARGUMENT, call, format("nranks %d is not in 1..%d", nranks,
                                                     MAX_RANKS));
    if (rank < 0 || rank >= nranks)
        return refuse(INVALID_ARGUMENT, call, format("rank %d is not in 0..%d", rank, nranks - 1));
    std::string name = segment_name(commId);
    if (name.empty())
        return refuse(INVALID_ARGUMENT, call, "the unique id was not made by ncclGetUniqueId");
    ncclComm* c = nullptr;
    if (ncclResult_t r = attach(name, nranks, rank, current_device(), &c)) return r;
    add_live(c);
    if (group_depth > 0) {  // joined at ncclGroupEnd
        group_ops.push_back(Op{JOIN, c});
        *comm = c;
        return SUCCESS;
    }
    if (ncclResult_t r = join(c)) {
        remove_live(c);
        release(c, false);
        return r;
    }
    *comm = c;
    return SUCCESS;
}

ncclResult_t ncclCommInitAll(ncclComm_t* comms, int ndev, const int* devlist) {
    const char* call = "ncclCommInitAll";
    if (!comms) return refuse(INVALID_ARGUMENT, call, "comms is null");
    if (ndev < 1 || ndev > MAX_RANKS)
        return refuse(INVALID_ARGUMENT, call, format("ndev %d is not in 1..%d", ndev, MAX_RANKS));
    auto count = reinterpret_cast<int (*)(int*)>(driver_symbol("cuDeviceGetCount"));
    int devices = INT_MAX;
    if (count && count(&devices) != 0) devices = INT_MAX;
    for (int i = 0; i < ndev; i++) {
        int d = devlist ? devlist[i] : i;
        if (d < 0 || d >= devices)
            return refuse(INVALID_ARGUMENT, call,
                          format("device %d is not one of the %d devices", d, devices));
    }
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    std::string name = segment_name(id);
    std::vector<ncclComm*> made;
    auto undo = [&](ncclResult_t r) {
        for (ncclComm* c : made) {
            remove_live(c);
            release(c, false);
        }
        return r;
    };
    for (int i = 0; i < ndev; i++) {
        ncclComm* c = nullptr;
        if (ncclResult_t r = attach(name, ndev, i, devlist ? devlist[i] : i, &c)) return undo(r);
        add_live(c);
        made.push_back(c);
    }
    for (ncclComm* c : made) {  // all have joined: this only checks the devices
        if (ncclResult_t r = join(c)) return undo(r);
    }
    std::copy(made.begin(), made.end(), comms);
    return SUCCESS;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return SUCCESS;
    if (!remove_live(comm))
        return refuse(INVALID_ARGUMENT, "ncclCommDestroy",
                      format("comm %p is not a live communicator", static_cast<void*>(comm)));
    release(comm, false);
    return SUCCESS;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return SUCCESS;
    if (!remove_live(comm))
        return refuse(INVALID_ARGUMENT, "ncclCommAbort",
                      format("comm %p is not a live communicator", static_cast<void*>(comm)));
    release(comm, true);
    return SUCCESS;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
    if (!asyncError) return INVALID_ARGUMENT;
    if (!is_live(comm))
        return refuse(INVALID_ARGUMENT, "ncclCommGetAsyncError",
                      format("comm %p is not a live communicator", static_cast<void*>(comm)));
    if (comm->failed.load() == SUCCESS) {
        if (int32_t p = comm->h->poison.load())
            fail(comm, p, format("rank %d failed or aborted its communicator",
                                 comm->h->poisoned_by.load()));
    }
    *asyncError = comm->failed.load();
    return SUCCESS;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    if (!count || !is_live(comm)) return INVALID_ARGUMENT;
    *count = comm->nranks;
    return SUCCESS;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    if (!device || !is_live(comm)) return INVALID_ARGUMENT;
    *device = comm->device;
    return SUCCESS;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    if (!rank || !is_live(comm)) return INVALID_ARGUMENT;
    *rank = comm->rank;
    return SUCCESS;
}

ncclResult_t ncclGroupStart() {
    group_depth++;
    return SUCCESS;
}

ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) {
        warn("ncclGroupEnd: no ncclGroupStart to end");
        return INVALID_USAGE;
    }
    if (--group_depth > 0) return SUCCESS;
    std::vector<Op> ops;
    ops.swap(group_ops);
    ncclResult_t error = group_error;
    group_error = SUCCESS;
    if (error != SUCCESS) return error;  // an argument error: nothing runs
    // Each communicator's operations in call order, each communicator on its own thread.
    std::vector<ncclComm*> comms;
    std::vector<std::vector<Op>> lists;
    for (const Op& op : ops) {
        size_t k = std::find(comms.begin(), comms.end(), op.comm) - comms.begin();
        if (k == comms.size()) {
            comms.push_back(op.comm);
            lists.emplace_back();
        }
        lists[k].push_back(op);
    }
    std::vector<ncclResult_t> joined(comms.size(), SUCCESS);
    auto run_list = [&](size_t k) {
        for (const Op& op : lists[k]) {
            ncclResult_t r = run(op);
            if (op.kind == JOIN && r != SUCCESS) joined[k] = r;  // collectives fail asynchronously
        }
    };
    std::vector<std::thread> threads;
    for (size_t k = 1; k < comms.size(); k++) threads.emplace_back(run_list, k);
    if (!comms.empty()) run_list(0);
    for (auto& t : threads) t.join();
    for (ncclResult_t r : joined)
        if (r != SUCCESS) return r;
    return SUCCESS;
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
    (void)stream;
    return submit(Op{ALL_REDUCE, comm, sendbuff, recvbuff, count, datatype, op, -1});
}

ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    return submit(Op{REDUCE, comm, sendbuff, recvbuff, count, datatype, op, root});
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
    (void)stream;
    return submit(Op{BROADCAST, comm, sendbuff, recvbuff, count, datatype, SUM, root});
}

}  // extern "C"
#pragma GCC visibility pop
