"""How long NVRTC takes to compile the engine's kernels (what a first start with an empty
kernel cache waits for), per program and all together, as the engine compiles them (one
thread per program) and as one program per file would (no KERNEL_PARTS split). No GPU
needed.

    python3 tools/kernel_compile_time.py [--arch sm_90] [--repeat 3]

Programs: every kernels/*.cu the engine loads, after kernels/common.cuh; a file declaring
`#define KERNEL_PARTS n` is compiled n times with -DKERNEL_PART=k, as
src/engine/cuda/kernels.rs does; parts from its `#define KERNEL_PARTS_ON_DEMAND k` on are
compiled only for an engine that runs them (the attention kernels' expf forms: the
flash_exp2 switch off), so a default first start is timed without them as well. NVRTC comes
from the pip package nvidia-cuda-nvrtc.
"""

import argparse
import ctypes
import os
import re
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_registers import find_nvrtc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "kernels")


def engine_files():
    """The kernel files the engine compiles, in its order (src/engine/cuda/kernels.rs)."""
    rs = open(os.path.join(HERE, "..", "src", "engine", "cuda", "kernels.rs")).read()
    table = rs[rs.index("pub const SOURCES"):]
    table = table[: table.index("];")]
    return re.findall(r'kernel_source!\("([\w.]+)"\)', table)


def programs(split, on_demand=True):
    """(name, source, extra options) of each program; without `on_demand`, the on-demand
    parts are left out (what a default engine compiles)."""
    prelude = open(os.path.join(KERNELS, "common.cuh")).read()
    out = []
    for f in engine_files():
        src = prelude + open(os.path.join(KERNELS, f)).read()
        m = re.search(r"^\s*#define KERNEL_PARTS\s+(\d+)", src, re.M)
        d = re.search(r"^\s*#define KERNEL_PARTS_ON_DEMAND\s+(\d+)", src, re.M)
        parts = int(m.group(1)) if m else 0
        if split and m:
            if not on_demand and d:
                parts = min(parts, int(d.group(1)))
            out += [(f"{f} part {k}", src, [f"-DKERNEL_PART={k}"]) for k in range(parts)]
        else:
            out.append((f, src, []))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nvrtc", default=None)
    a = ap.parse_args()
    lib = ctypes.CDLL(a.nvrtc or find_nvrtc())  # ctypes releases the GIL during each call

    def compile_one(name, src, extra):
        prog = ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None):
            sys.exit(f"kernel_compile_time: nvrtcCreateProgram failed for {name}")
        opts = [o.encode() for o in ["--std=c++17", f"--gpu-architecture={a.arch}"] + extra]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        if rc:
            sys.exit(f"kernel_compile_time: {name} failed to compile (see kernel_registers.py)")

    def concurrent(progs):
        start = time.perf_counter()
        threads = [threading.Thread(target=compile_one, args=p) for p in progs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    split = programs(True)
    print(f"NVRTC, {a.arch}, {os.cpu_count()} CPUs, median of {a.repeat}")
    print("| program | seconds alone |")
    print("|---|---:|")
    alone = []
    for p in split:
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            compile_one(*p)
            times.append(time.perf_counter() - t)
        alone.append(statistics.median(times))
        print(f"| {p[0]} | {alone[-1]:.2f} |")
    whole = programs(False)
    t_whole = statistics.median(concurrent(whole) for _ in range(a.repeat))
    t_split = statistics.median(concurrent(split) for _ in range(a.repeat))
    default = programs(True, on_demand=False)
    t_default = statistics.median(concurrent(default) for _ in range(a.repeat))
    print(f"sum of the programs alone: {sum(alone):.2f} s; the longest: {max(alone):.2f} s")
    print(f"all at once, one program per file ({len(whole)} programs): {t_whole:.2f} s")
    print(f"all at once, as the engine compiles them ({len(split)} programs): {t_split:.2f} s")
    print(
        f"a default start, as the engine compiles them without the on-demand parts "
        f"({len(default)} programs): {t_default:.2f} s"
    )


if __name__ == "__main__":
    main()
