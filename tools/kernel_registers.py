"""Registers, spills and shared memory per kernel, as ptxas reports them when NVRTC compiles
a kernel file for a GPU architecture (no GPU needed): what decides how many blocks of a
kernel fit on a multiprocessor.

    python3 tools/kernel_registers.py kernels/flash_attention.cu [--arch sm_90] [--filter bf16]

NVRTC comes from the pip package nvidia-cuda-nvrtc (as for the tests), or --nvrtc PATH.
The kernel file is compiled after kernels/common.cuh, as the engine compiles it.
"""

import argparse
import ctypes
import glob
import os
import re
import sys
import sysconfig


def find_nvrtc():
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for root in roots:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            hits = sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p)
            if hits:
                return hits[-1]
    sys.exit("kernel_registers: no NVRTC found; pip install nvidia-cuda-nvrtc, or pass --nvrtc")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel_file")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--nvrtc", default=None)
    a = ap.parse_args()
    lib = ctypes.CDLL(a.nvrtc or find_nvrtc())
    here = os.path.dirname(os.path.abspath(a.kernel_file))
    src = open(os.path.join(here, "common.cuh")).read() + "\n" + open(a.kernel_file).read()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        sys.exit("kernel_registers: nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={a.arch}".encode(), b"--ptxas-options=-v", b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"kernel_registers: compilation failed:\n{log.value.decode()}")
    rows, name, spill = [], None, ""
    for line in log.value.decode().splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name, spill = m.group(1), ""
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = f"{m.group(1)}/{m.group(2)}"
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line)
        if m and name and a.filter in name:
            rows.append((name, int(m.group(1)), spill, int(m.group(2) or 0)))
    print(f"| kernel ({a.arch}) | registers | spill stores/loads (bytes) | static shared bytes |")
    print("|---|---:|---:|---:|")
    for name, regs, spill, smem in sorted(rows):
        print(f"| {name} | {regs} | {spill} | {smem} |")


if __name__ == "__main__":
    main()
