#!/usr/bin/env python3
"""Checks the hand-written CUDA bindings in src/cuda/ against the real CUDA headers and
libraries, without a GPU.

What it reads (Rust, parsed here with the standard library only):
  * every `api! { pub struct Name { fn sym(args) -> ret; ... } }` block: the symbol we dlsym,
    its parameter types and its return type;
  * every `.sym("name")` lookup followed by a `transmute` to an `extern "C" fn` type;
  * every `resolved_path("name")` lookup (the name must be one we bind);
  * every integer `const` in the binding files (each must appear in CONSTANTS below, or in
    NOT_HEADER_CONSTANTS with the reason it is ours rather than a header value);
  * every `#[repr(C)]` struct (its C layout, computed here).

What it generates: one C++17 translation unit that #includes the real headers and
static_asserts, for every bound function, that
  (a) the symbol we bind is the one the header's API name expands to (binding `cuMemAlloc`
      while cuda.h #defines cuMemAlloc to cuMemAlloc_v2 binds the legacy ABI: that fails);
  (b) the parameter count matches, and each parameter and the return type have the same ABI
      class (pointer / integer of N bytes / float of N bytes / struct of N bytes by value,
      and for pointers to something other than void, the same class of pointee);
and that every constant equals the header's enum or macro, and every #[repr(C)] struct has
the header struct's size, alignment and field offsets. It is compiled with
`g++ -std=c++17 -fsyntax-only` (nothing is linked, no GPU is needed).

Separately it reads the dynamic symbol table of each library given with --lib (ELF parsed
here) and checks that every symbol we bind from it is exported.

Usage:
  ffi_check.py check [--root DIR] [--include DIR ...] [--python-env] [--lib GROUP=PATH ...]
                     [--require all|GROUP,GROUP] [--emit FILE] [--cxx g++]
  ffi_check.py dump [--root DIR]        parsed declarations as JSON
  ffi_check.py selftest                 the parser and generator against fake headers

Exit status of `check`: 0 all checked groups match; 1 a mismatch; 2 usage or environment
error; 3 a group named by --require could not be checked.
"""

import argparse
import glob
import json
import os
import re
import shutil
import struct as _struct
import subprocess
import sys
import sysconfig
import tempfile
import unittest

# ---------------------------------------------------------------------------------------
# The mapping from our code to the headers (keep it readable: one line per item).
# ---------------------------------------------------------------------------------------

# Header group -> (header to include, library stem whose exports we check).
GROUPS = {
    "driver": ("cuda.h", "cuda"),
    "nvrtc": ("nvrtc.h", "nvrtc"),
    "cublas": ("cublas_v2.h", "cublas"),
    "cublaslt": ("cublasLt.h", "cublasLt"),
    "nccl": ("nccl.h", "nccl"),
}

# The files holding bindings (relative to the repository root); src/cuda/*.rs is added.
EXTRA_FILES = ["src/dist/nccl.rs"]

# Files whose `resolved_path("sym")` calls name symbols (must be bound ones).
RESOLVED_PATH_GLOBS = ["src/**/*.rs"]

# api! struct -> header group.
API_STRUCTS = {
    "DriverApi": "driver",
    "GraphApi": "driver",
    "NvrtcApi": "nvrtc",
    "CublasApi": "cublas",
    "CublasGemmApi": "cublas",
    "CublasLtApi": "cublaslt",
    "NcclApi": "nccl",
}

# Symbols looked up one by one with `.sym("name")`: group by name prefix.
SYMBOL_PREFIX_GROUPS = [
    ("cublasLt", "cublaslt"),
    ("cublas", "cublas"),
    ("nvrtc", "nvrtc"),
    ("nccl", "nccl"),
    ("cu", "driver"),
]

# Our constant (file:NAME, or NAME when unique) -> (group, header expression).
CONSTANTS = {
    # src/cuda/driver.rs
    "CUDA_ERROR_NO_DEVICE": ("driver", "CUDA_ERROR_NO_DEVICE"),
    "ATTR_CLOCK_RATE": ("driver", "CU_DEVICE_ATTRIBUTE_CLOCK_RATE"),
    "ATTR_MULTIPROCESSOR_COUNT": ("driver", "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT"),
    "ATTR_PCI_BUS_ID": ("driver", "CU_DEVICE_ATTRIBUTE_PCI_BUS_ID"),
    "ATTR_CC_MAJOR": ("driver", "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
    "ATTR_CC_MINOR": ("driver", "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"),
    "CU_STREAM_NON_BLOCKING": ("driver", "CU_STREAM_NON_BLOCKING"),
    "CU_EVENT_DISABLE_TIMING": ("driver", "CU_EVENT_DISABLE_TIMING"),
    # src/cuda/graph.rs
    "CU_STREAM_CAPTURE_MODE_THREAD_LOCAL": ("driver", "CU_STREAM_CAPTURE_MODE_THREAD_LOCAL"),
    "CU_EVENT_RECORD_EXTERNAL": ("driver", "CU_EVENT_RECORD_EXTERNAL"),
    # src/cuda/cublas.rs
    "cublas.rs:CUBLAS_OP_N": ("cublas", "CUBLAS_OP_N"),
    "cublas.rs:CUBLAS_OP_T": ("cublas", "CUBLAS_OP_T"),
    "CUBLAS_DEFAULT_MATH": ("cublas", "CUBLAS_DEFAULT_MATH"),
    # src/cuda/cublaslt.rs
    "CUDA_R_32F": ("cublaslt", "CUDA_R_32F"),
    "CUDA_R_16BF": ("cublaslt", "CUDA_R_16BF"),
    "CUBLAS_COMPUTE_32F": ("cublaslt", "CUBLAS_COMPUTE_32F"),
    "cublaslt.rs:CUBLAS_OP_N": ("cublaslt", "CUBLAS_OP_N"),
    "cublaslt.rs:CUBLAS_OP_T": ("cublaslt", "CUBLAS_OP_T"),
    "DESC_TRANSA": ("cublaslt", "CUBLASLT_MATMUL_DESC_TRANSA"),
    "DESC_TRANSB": ("cublaslt", "CUBLASLT_MATMUL_DESC_TRANSB"),
    "PREF_MAX_WORKSPACE_BYTES": ("cublaslt", "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"),
    "PREF_MIN_ALIGNMENT_A_BYTES": ("cublaslt", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES"),
    "PREF_MIN_ALIGNMENT_B_BYTES": ("cublaslt", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES"),
    "PREF_MIN_ALIGNMENT_C_BYTES": ("cublaslt", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES"),
    "PREF_MIN_ALIGNMENT_D_BYTES": ("cublaslt", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES"),
    "CUBLAS_STATUS_NOT_SUPPORTED": ("cublaslt", "CUBLAS_STATUS_NOT_SUPPORTED"),
    "CUBLAS_STATUS_INVALID_VALUE": ("cublaslt", "CUBLAS_STATUS_INVALID_VALUE"),
    "DESC_EPILOGUE": ("cublaslt", "CUBLASLT_MATMUL_DESC_EPILOGUE"),
    "DESC_BIAS_POINTER": ("cublaslt", "CUBLASLT_MATMUL_DESC_BIAS_POINTER"),
    "DESC_EPILOGUE_AUX_POINTER": ("cublaslt", "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER"),
    "DESC_EPILOGUE_AUX_LD": ("cublaslt", "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD"),
    "DESC_EPILOGUE_AUX_DATA_TYPE": ("cublaslt", "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE"),
    "DESC_BIAS_DATA_TYPE": ("cublaslt", "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE"),
    "EPILOGUE_DEFAULT": ("cublaslt", "CUBLASLT_EPILOGUE_DEFAULT"),
    "EPILOGUE_BIAS": ("cublaslt", "CUBLASLT_EPILOGUE_BIAS"),
    "EPILOGUE_GELU_AUX": ("cublaslt", "CUBLASLT_EPILOGUE_GELU_AUX"),
    "EPILOGUE_GELU_AUX_BIAS": ("cublaslt", "CUBLASLT_EPILOGUE_GELU_AUX_BIAS"),
    "EPILOGUE_DGELU": ("cublaslt", "CUBLASLT_EPILOGUE_DGELU"),
    "EPILOGUE_BGRADA": ("cublaslt", "CUBLASLT_EPILOGUE_BGRADA"),
    "EPILOGUE_BGRADB": ("cublaslt", "CUBLASLT_EPILOGUE_BGRADB"),
    # src/cuda/nccl.rs
    "NCCL_SUCCESS": ("nccl", "ncclSuccess"),
    "NCCL_IN_PROGRESS": ("nccl", "ncclInProgress"),
    "NCCL_FLOAT32": ("nccl", "ncclFloat32"),
    "NCCL_SUM": ("nccl", "ncclSum"),
    "NCCL_AVG": ("nccl", "ncclAvg"),
    "NCCL_UNIQUE_ID_BYTES": ("nccl", "NCCL_UNIQUE_ID_BYTES"),
    "CUDA_ERROR_NOT_READY": ("driver", "CUDA_ERROR_NOT_READY"),
}

# Integer constants in the binding files that are ours, not header values.
NOT_HEADER_CONSTANTS = {}

# Values written inline in calls rather than as named constants: (group, where, header
# expression, the value our code passes or compares with).
INLINE_VALUES = [
    ("driver", "driver.rs: every CUresult is compared with 0", "CUDA_SUCCESS", 0),
    ("driver", "driver.rs: cuStreamCreate(.., 0)", "CU_STREAM_DEFAULT", 0),
    ("driver", "driver.rs: cuEventCreate(.., 0)", "CU_EVENT_DEFAULT", 0),
    ("nvrtc", "nvrtc.rs: every nvrtcResult is compared with 0", "NVRTC_SUCCESS", 0),
    ("cublas", "cublas.rs: cublasGetProperty kind 0", "MAJOR_VERSION", 0),
    ("cublas", "cublas.rs: cublasGetProperty kind 1", "MINOR_VERSION", 1),
    ("cublas", "cublas.rs: cublasGetProperty kind 2", "PATCH_LEVEL", 2),
    ("cublas", "cublas.rs: every cublasStatus_t is compared with 0", "CUBLAS_STATUS_SUCCESS", 0),
    ("cublaslt", "cublaslt.rs: statuses and algo.state compared with 0", "CUBLAS_STATUS_SUCCESS", 0),
]

# cuBLASLt attributes are set through a (pointer, size) pair: the C type of the value our
# code passes for each attribute constant, compared with the type cublasLt.h documents in the
# comment above the enumerator ("int32_t, default: CUBLAS_OP_N").
ATTRIBUTE_VALUE_TYPES = {
    "DESC_TRANSA": "int32_t",  # cublaslt.rs passes an i32 (a cublasOperation_t)
    "DESC_TRANSB": "int32_t",
    "DESC_EPILOGUE": "uint32_t",  # a u32 (a cublasLtEpilogue_t)
    "DESC_EPILOGUE_AUX_LD": "int64_t",  # an i64
    "PREF_MAX_WORKSPACE_BYTES": "uint64_t",  # a u64
    "PREF_MIN_ALIGNMENT_A_BYTES": "uint32_t",  # a u32
    "PREF_MIN_ALIGNMENT_B_BYTES": "uint32_t",
    "PREF_MIN_ALIGNMENT_C_BYTES": "uint32_t",
    "PREF_MIN_ALIGNMENT_D_BYTES": "uint32_t",
}

# #[repr(C)] struct -> (group, header type, {our field: header field}).
STRUCTS = {
    "HeuristicResult": (
        "cublaslt",
        "cublasLtMatmulHeuristicResult_t",
        {
            "algo": "algo",
            "workspace_size": "workspaceSize",
            "state": "state",
            "waves_count": "wavesCount",
            "reserved": "reserved",
        },
    ),
    "UniqueId": ("nccl", "ncclUniqueId", {"internal": "internal"}),
}

# ---------------------------------------------------------------------------------------
# Rust parsing.
# ---------------------------------------------------------------------------------------

# ABI classes, shared with the generated C++ (ffi_check::Abi::kind).
VOID, PTR, INT, FLOAT, STRUCT, INCOMPLETE, FUNCTION = 0, 1, 2, 3, 4, 5, 6
KIND_NAMES = {
    VOID: "void",
    PTR: "pointer",
    INT: "integer",
    FLOAT: "float",
    STRUCT: "struct",
    INCOMPLETE: "opaque type",
    FUNCTION: "function",
}

SCALARS = {
    "c_void": (VOID, 0, 1),
    "()": (VOID, 0, 1),
    "bool": (INT, 1, 1),
    "u8": (INT, 1, 1),
    "i8": (INT, 1, 1),
    "c_char": (INT, 1, 1),
    "c_uchar": (INT, 1, 1),
    "c_schar": (INT, 1, 1),
    "u16": (INT, 2, 2),
    "i16": (INT, 2, 2),
    "c_short": (INT, 2, 2),
    "c_ushort": (INT, 2, 2),
    "u32": (INT, 4, 4),
    "i32": (INT, 4, 4),
    "c_int": (INT, 4, 4),
    "c_uint": (INT, 4, 4),
    "u64": (INT, 8, 8),
    "i64": (INT, 8, 8),
    "usize": (INT, 8, 8),
    "isize": (INT, 8, 8),
    "c_long": (INT, 8, 8),
    "c_ulong": (INT, 8, 8),
    "c_longlong": (INT, 8, 8),
    "c_ulonglong": (INT, 8, 8),
    "f32": (FLOAT, 4, 4),
    "c_float": (FLOAT, 4, 4),
    "f64": (FLOAT, 8, 8),
    "c_double": (FLOAT, 8, 8),
}


class FfiError(Exception):
    """A declaration the parser cannot read, or a mapping that is missing."""


def strip_comments(text):
    """`text` with // and /* */ comments replaced by spaces (line numbers kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "'" and i + 2 < n and (text[i + 2] == "'" or text[i + 1] == "\\"):
            # A char literal ('x' or '\n'); lifetimes ('a) fall through.
            j = text.index("'", i + 2) if text[i + 1] == "\\" else i + 2
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(text, open_idx, open_ch="{", close_ch="}"):
    """Index of the bracket closing the one at `open_idx`."""
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise FfiError("unbalanced %r at offset %d" % (open_ch, open_idx))


def split_top(s, sep=","):
    """`s` split at `sep` outside brackets, parts stripped, empty parts dropped."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def norm_type(t):
    """A Rust type with whitespace normalised and path prefixes dropped."""
    t = " ".join(t.split())
    t = re.sub(r"\b(?:[A-Za-z_]\w*::)+(?=[A-Za-z_])", "", t)
    return t


def parse_fn_type(t):
    """(params, ret) of `unsafe extern "C" fn(a: A, B) -> R`, or None."""
    m = re.match(r'^(?:unsafe\s+)?extern\s+"C"\s+fn\s*\(', t)
    if not m:
        return None
    close = matching(t, m.end() - 1, "(", ")")
    params = []
    for p in split_top(t[m.end() : close]):
        mm = re.match(r"^(\w+)\s*:\s*(.+)$", p, re.S)
        params.append((mm.group(1), norm_type(mm.group(2))) if mm else ("_", norm_type(p)))
    rest = t[close + 1 :].strip()
    ret = norm_type(rest[2:]) if rest.startswith("->") else "()"
    return params, ret


def parse_int(expr):
    e = expr.replace("_", "").strip()
    neg = e.startswith("-")
    e = e.lstrip("-").strip()
    m = re.match(r"^(0x[0-9a-fA-F]+|0b[01]+|0o[0-7]+|\d+)(?:[iu](?:8|16|32|64|size))?$", e)
    if not m:
        return None
    v = int(m.group(1), 0)
    return -v if neg else v


class Source:
    """Everything parsed from the binding files."""

    def __init__(self):
        self.functions = []  # dicts: group, struct, symbol, params, ret, file, line
        self.aliases = {}  # file -> {name: type}
        self.consts = []  # dicts: name, type, value, file, line
        self.structs = {}  # name -> dict: fields [(name, type)], file, line
        self.resolved = []  # (symbol, file, line)

    def to_json(self):
        out = {
            "functions": self.functions,
            "constants": self.consts,
            "structs": {},
            "resolved_path": self.resolved,
        }
        for name, s in self.structs.items():
            size, align, offsets = self.layout(name, s["file"])
            out["structs"][name] = {
                "size": size,
                "align": align,
                "offsets": offsets,
                "file": s["file"],
            }
        return out

    # Types ------------------------------------------------------------------------------

    def resolve(self, t, file, depth=0):
        """`t` with type aliases expanded (the file's own first, then any unique one)."""
        t = norm_type(t)
        if depth > 20:
            raise FfiError("type alias loop at %s in %s" % (t, file))
        if t in SCALARS or t in self.structs:
            return t
        if re.match(r"^\w+$", t):
            own = self.aliases.get(file, {})
            if t in own:
                return self.resolve(own[t], file, depth + 1)
            found = {a[t] for a in self.aliases.values() if t in a}
            found = {norm_type(x) for x in found}
            if len(found) == 1:
                return self.resolve(found.pop(), file, depth + 1)
            if len(found) > 1:
                raise FfiError("type %s is defined differently in several files: %s" % (t, found))
        return t

    def abi(self, t, file):
        """(kind, size, pointee kind or None, pointee size) of Rust type `t`."""
        t = self.resolve(t, file)
        m = re.match(r"^\*\s*(?:mut|const)\s+(.+)$", t)
        if m:
            inner = self.resolve(m.group(1), file)
            if inner == "c_void":
                return (PTR, 8, None, 0)
            k, s, _, _ = self.abi(inner, file)
            return (PTR, 8, k, s)
        if parse_fn_type(t) is not None or t.startswith("Option<"):
            return (PTR, 8, None, 0)
        if t in SCALARS:
            k, s, _ = SCALARS[t]
            return (k, s, None, 0)
        if t in self.structs:
            size, _, _ = self.layout(t, file)
            return (STRUCT, size, None, 0)
        raise FfiError("%s: cannot tell the C ABI class of Rust type `%s`" % (file, t))

    def size_align(self, t, file):
        t = self.resolve(t, file)
        if t.startswith("*") or parse_fn_type(t) is not None:
            return 8, 8
        if t in SCALARS:
            _, s, a = SCALARS[t]
            return s, a
        if t in self.structs:
            s, a, _ = self.layout(t, file)
            return s, a
        m = re.match(r"^\[(.+);\s*(.+)\]$", t)
        if m:
            n = parse_int(m.group(2))
            if n is None:
                n = self.const_value(m.group(2).strip())
            s, a = self.size_align(m.group(1), file)
            return s * n, a
        raise FfiError("%s: cannot lay out Rust type `%s`" % (file, t))

    def const_value(self, name):
        vals = {c["value"] for c in self.consts if c["name"] == name}
        if len(vals) != 1:
            raise FfiError("array length %s is not one integer constant" % name)
        return vals.pop()

    def layout(self, name, file=None):
        """(size, align, {field: offset}) of #[repr(C)] struct `name`."""
        s = self.structs[name]
        off, align, offsets = 0, 1, {}
        for fname, ftype in s["fields"]:
            fs, fa = self.size_align(ftype, s["file"])
            off = (off + fa - 1) // fa * fa
            offsets[fname] = off
            off += fs
            align = max(align, fa)
        size = (off + align - 1) // align * align
        return size, align, offsets


def line_of(text, idx):
    return text.count("\n", 0, idx) + 1


def symbol_group(sym):
    for prefix, group in SYMBOL_PREFIX_GROUPS:
        if sym.startswith(prefix):
            return group
    raise FfiError("symbol %s: no group in SYMBOL_PREFIX_GROUPS" % sym)


def parse_file(src, rel, text):
    """Adds the declarations of one Rust file (path `rel`) to `src`."""
    code = strip_comments(text)
    aliases = src.aliases.setdefault(rel, {})
    for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?type\s+(\w+)\s*=\s*([^;]+);", code, re.M):
        aliases[m.group(1)] = norm_type(m.group(2))
    for m in re.finditer(
        r"^\s*(?:pub(?:\([^)]*\))?\s+)?const\s+(\w+)\s*:\s*([^=]+?)\s*=\s*([^;]+);", code, re.M
    ):
        ty = norm_type(m.group(2))
        value = parse_int(m.group(3))
        if value is None:
            continue  # not an integer literal: not a C value (e.g. an array of kinds)
        src.consts.append(
            {"name": m.group(1), "type": ty, "value": value, "file": rel, "line": line_of(code, m.start(1))}
        )
    for m in re.finditer(r"#\[repr\(C\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?struct\s+(\w+)\s*\{", code):
        body = code[m.end() : matching(code, m.end() - 1)]
        fields = []
        for f in split_top(body):
            fm = re.match(r"^(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*(.+)$", f, re.S)
            if not fm:
                raise FfiError("%s: cannot read field `%s` of struct %s" % (rel, f, m.group(1)))
            fields.append((fm.group(1), norm_type(fm.group(2))))
        src.structs[m.group(1)] = {"fields": fields, "file": rel, "line": line_of(code, m.start(1))}
    for m in re.finditer(r"\bapi!\s*\{", code):
        block = code[m.end() : matching(code, m.end() - 1)]
        sm = re.search(r"pub\s+struct\s+(\w+)\s*\{", block)
        if not sm:
            raise FfiError("%s: api! block without `pub struct Name {`" % rel)
        sname = sm.group(1)
        if sname not in API_STRUCTS:
            raise FfiError(
                "%s: api! struct %s has no header group: add it to API_STRUCTS in %s"
                % (rel, sname, os.path.basename(__file__))
            )
        inner_start = m.end() + sm.end()
        inner = code[inner_start : m.end() + matching(block, sm.end() - 1)]
        for fm in re.finditer(r"\bfn\s+(\w+)\s*\(", inner):
            close = matching(inner, fm.end() - 1, "(", ")")
            semi = inner.index(";", close)
            ret = inner[close + 1 : semi].strip()
            ret = norm_type(ret[2:]) if ret.startswith("->") else "()"
            params = []
            for p in split_top(inner[fm.end() : close]):
                pm = re.match(r"^(\w+)\s*:\s*(.+)$", p, re.S)
                if not pm:
                    raise FfiError("%s: parameter `%s` of %s has no name: type" % (rel, p, fm.group(1)))
                params.append((pm.group(1), norm_type(pm.group(2))))
            src.functions.append(
                {
                    "group": API_STRUCTS[sname],
                    "struct": sname,
                    "symbol": fm.group(1),
                    "params": params,
                    "ret": ret,
                    "file": rel,
                    "line": line_of(code, inner_start + fm.start(1)),
                }
            )
    for m in re.finditer(r'\.sym\(\s*"(\w+)"\s*\)', code):
        # The lookup is given its type by the next transmute::<*mut c_void, TYPE>(..).
        t = re.search(r"transmute::<\s*\*mut\s+c_void\s*,", code[m.end() :])
        if not t:
            raise FfiError("%s: .sym(\"%s\") is not followed by a transmute to its type" % (rel, m.group(1)))
        start = m.end() + t.end()
        depth, j = 0, start
        while True:
            c = code[j]
            if c in "(<[":
                depth += 1
            elif c in ")]":
                depth -= 1
            elif c == ">" and code[j - 1] != "-":
                if depth == 0:
                    break
                depth -= 1
            j += 1
        ftype = src.resolve(code[start:j], rel)
        parsed = parse_fn_type(ftype)
        if parsed is None:
            raise FfiError("%s: .sym(\"%s\") is transmuted to `%s`, not an extern \"C\" fn" % (rel, m.group(1), ftype))
        src.functions.append(
            {
                "group": symbol_group(m.group(1)),
                "struct": None,
                "symbol": m.group(1),
                "params": parsed[0],
                "ret": parsed[1],
                "file": rel,
                "line": line_of(code, m.start(1)),
            }
        )


def parse_tree(root):
    src = Source()
    files = sorted(glob.glob(os.path.join(root, "src", "cuda", "*.rs")))
    files += [os.path.join(root, f) for f in EXTRA_FILES if os.path.exists(os.path.join(root, f))]
    if not files:
        raise FfiError("no binding files under %s/src/cuda" % root)
    texts = {}
    for f in files:
        rel = os.path.relpath(f, root)
        with open(f, encoding="utf-8") as fh:
            texts[rel] = fh.read()
    # Aliases and structs first (a .sym lookup may use an alias of another file).
    pre = Source()
    for rel, text in texts.items():
        code = strip_comments(text)
        for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?type\s+(\w+)\s*=\s*([^;]+);", code, re.M):
            pre.aliases.setdefault(rel, {})[m.group(1)] = norm_type(m.group(2))
    src.aliases = pre.aliases
    for rel, text in texts.items():
        parse_file(src, rel, text)
    for pattern in RESOLVED_PATH_GLOBS:
        for f in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            rel = os.path.relpath(f, root)
            with open(f, encoding="utf-8") as fh:
                code = strip_comments(fh.read())
            for m in re.finditer(r'resolved_path\(\s*"(\w+)"\s*\)', code):
                if "fn resolved_path" in code[max(0, m.start() - 30) : m.start()]:
                    continue
                src.resolved.append((m.group(1), rel, line_of(code, m.start())))
    return src


def constant_mapping(src):
    """[(const, group, header expression)], or FfiError naming unmapped constants."""
    out, missing = [], []
    counts = {}
    for c in src.consts:
        counts[c["name"]] = counts.get(c["name"], 0) + 1
    for c in src.consts:
        qualified = "%s:%s" % (os.path.basename(c["file"]), c["name"])
        key = qualified if qualified in CONSTANTS else c["name"]
        if key in NOT_HEADER_CONSTANTS or qualified in NOT_HEADER_CONSTANTS:
            continue
        if key not in CONSTANTS:
            missing.append("%s:%d %s" % (c["file"], c["line"], c["name"]))
            continue
        if key == c["name"] and counts[c["name"]] > 1 and qualified not in CONSTANTS:
            group, expr = CONSTANTS[key]
        else:
            group, expr = CONSTANTS[key]
        out.append((c, group, expr))
    if missing:
        raise FfiError(
            "integer constants with no header counterpart in CONSTANTS (or reason in "
            "NOT_HEADER_CONSTANTS) of %s: %s" % (os.path.basename(__file__), ", ".join(missing))
        )
    return out


# ---------------------------------------------------------------------------------------
# C++ generation.
# ---------------------------------------------------------------------------------------

PRELUDE = r"""// Generated by tools/ffi_check/ffi_check.py: do not edit. Compile with
// g++ -std=c++17 -fsyntax-only -I<CUDA include dirs>; every static_assert names the Rust
// declaration it checks.
%(includes)s
#include <cstddef>
#include <string_view>
#include <type_traits>

#define FFI_STR2(x) #x
#define FFI_STR(x) FFI_STR2(x)

namespace ffi_check {
// kind: 0 void, 1 pointer, 2 integer (or enum), 3 float, 4 struct, 5 opaque, 6 function.
struct Abi {
  int kind, size, pkind, psize;
};
constexpr bool same_class(Abi h, int kind, int size) { return h.kind == kind && h.size == size; }
template <class T, class = void> struct complete : std::false_type {};
template <class T> struct complete<T, std::void_t<decltype(sizeof(T))>> : std::true_type {};
template <class T> constexpr int kind_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_void_v<U>) return 0;
  else if constexpr (std::is_pointer_v<U>) return 1;
  else if constexpr (std::is_integral_v<U> || std::is_enum_v<U>) return 2;
  else if constexpr (std::is_floating_point_v<U>) return 3;
  else if constexpr (std::is_function_v<U>) return 6;
  else if constexpr (!complete<U>::value) return 5;
  else return 4;
}
template <class T> constexpr int size_of() {
  constexpr int k = kind_of<T>();
  if constexpr (k == 0 || k == 5 || k == 6) return 0;
  else return int(sizeof(T));
}
template <class T> constexpr Abi abi() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<U>) {
    using P = std::remove_pointer_t<U>;
    return Abi{1, int(sizeof(U)), kind_of<P>(), size_of<P>()};
  } else {
    return Abi{kind_of<U>(), size_of<U>(), -1, -1};
  }
}
template <class R, class... A> struct Sig {
  static constexpr int count = int(sizeof...(A));
  static constexpr Abi ret = abi<R>();
  static constexpr Abi params[sizeof...(A) + 1] = {abi<A>()..., Abi{-1, -1, -1, -1}};
  static constexpr Abi param(int j) { return j < count ? params[j] : Abi{-1, -1, -1, -1}; }
};
template <class R, class... A> constexpr Sig<R, A...> sig(R (*)(A...)) { return {}; }
constexpr bool same(std::string_view a, std::string_view b) { return a == b; }
}  // namespace ffi_check
"""


def cxx_escape(s):
    return s.replace("\\", "\\\\").replace('"', '\\"')


def api_name(symbol):
    """The header's API name for a versioned symbol (cuMemAlloc_v2 -> cuMemAlloc)."""
    m = re.match(r"^(\w+?)_v\d+$", symbol)
    return m.group(1) if m else symbol


def describe_abi(kind, size, pkind=None, psize=0):
    d = KIND_NAMES[kind] if kind in (VOID, PTR, INCOMPLETE, FUNCTION) else "%d-byte %s" % (size, KIND_NAMES[kind])
    if kind == PTR and pkind is not None:
        d += " to " + describe_abi(pkind, psize)
    return d


def generate(src, groups, header_of):
    """The C++ translation unit checking `groups` (those whose headers were found)."""
    includes = "\n".join("#include <%s>" % header_of[g] for g in GROUPS if g in groups)
    out = [PRELUDE % {"includes": includes}]
    n_fn = n_const = n_struct = 0
    out.append("// ---- functions ----")
    for i, f in enumerate(src.functions):
        if f["group"] not in groups:
            continue
        n_fn += 1
        sym, where = f["symbol"], "%s:%d" % (f["file"], f["line"])
        hdr = header_of[f["group"]]
        base = api_name(sym)
        sig = "ffi_sig_%d" % i
        out.append("// %s %s" % (where, sym))
        for name in sorted({sym, base}):
            out.append(
                'static_assert(ffi_check::same(FFI_STR(%s), "%s"), "%s: we bind %s but %s '
                "#defines %s to another symbol: bind the symbol the header's API uses "
                '(the legacy entry point has an older ABI or older semantics)");'
                % (name, sym, where, sym, hdr, name)
            )
        out.append("using %s = decltype(ffi_check::sig(&%s));" % (sig, sym))
        out.append(
            'static_assert(%s::count == %d, "%s: %s takes a different number of parameters in %s than our %d");'
            % (sig, len(f["params"]), where, sym, hdr, len(f["params"]))
        )
        n = len(f["params"])
        checks = [("return type", f["ret"], "%s::ret" % sig)]
        for j, (pname, ptype) in enumerate(f["params"]):
            checks.append(("parameter %d (%s: %s)" % (j + 1, pname, ptype), ptype, "%s::param(%d)" % (sig, j)))
        for what, rtype, expr in checks:
            kind, size, pkind, psize = src.abi(rtype, f["file"])
            cond = "ffi_check::same_class(%s, %d, %d)" % (expr, kind, size)
            if pkind is not None:
                cond += " && %s.pkind == %d && %s.psize == %d" % (expr, pkind, expr, psize)
            if what != "return type":
                # A wrong count is reported once, above.
                cond = "%s::count != %d || (%s)" % (sig, n, cond)
            out.append(
                'static_assert(%s, "%s: %s of %s is a %s in Rust but not in %s");'
                % (cond, where, what, sym, cxx_escape(describe_abi(kind, size, pkind, psize)), hdr)
            )
    out.append("// ---- names looked up for the library's path ----")
    bound = {f["symbol"] for f in src.functions}
    for sym, rel, line in src.resolved:
        if symbol_group(sym) in groups:
            out.append(
                'static_assert(%s, "%s:%d: resolved_path(\\"%s\\") names a symbol we do not bind");'
                % ("true" if sym in bound else "false", rel, line, sym)
            )
    out.append("// ---- constants ----")
    for c, group, expr in constant_mapping(src):
        if group not in groups:
            continue
        n_const += 1
        out.append(
            'static_assert(static_cast<long long>(%s) == %dLL, "%s:%d: %s = %d but %s\'s %s has another value");'
            % (expr, c["value"], c["file"], c["line"], c["name"], c["value"], header_of[group], expr)
        )
    for group, where, expr, value in INLINE_VALUES:
        if group not in groups:
            continue
        n_const += 1
        out.append(
            'static_assert(static_cast<long long>(%s) == %dLL, "%s: we pass %d but %s\'s %s has another value");'
            % (expr, value, where, value, header_of[group], expr)
        )
    out.append("// ---- structs ----")
    for name, s in src.structs.items():
        if name not in STRUCTS:
            raise FfiError(
                "%s: #[repr(C)] struct %s has no header counterpart in STRUCTS of %s"
                % (s["file"], name, os.path.basename(__file__))
            )
        group, ctype, fields = STRUCTS[name]
        if group not in groups:
            continue
        n_struct += 1
        size, align, offsets = src.layout(name)
        where = "%s:%d" % (s["file"], s["line"])
        out.append(
            'static_assert(sizeof(%s) == %d, "%s: struct %s is %d bytes but %s is not");'
            % (ctype, size, where, name, size, ctype)
        )
        out.append(
            'static_assert(alignof(%s) == %d, "%s: struct %s is %d-byte aligned but %s is not");'
            % (ctype, align, where, name, align, ctype)
        )
        for fname, ftype in s["fields"]:
            if fname not in fields:
                raise FfiError("%s: field %s of %s is not mapped in STRUCTS" % (where, fname, name))
            cf = fields[fname]
            fsize, _ = src.size_align(ftype, s["file"])
            out.append(
                'static_assert(offsetof(%s, %s) == %d && sizeof(%s::%s) == %d, "%s: field %s of %s '
                '(offset %d, %d bytes) does not sit where %s.%s does");'
                % (ctype, cf, offsets[fname], ctype, cf, fsize, where, fname, name, offsets[fname],
                   fsize, ctype, cf)
            )
    return "\n".join(out) + "\n", (n_fn, n_const, n_struct)


# ---------------------------------------------------------------------------------------
# Running the compiler, and reading ELF dynamic symbols.
# ---------------------------------------------------------------------------------------


def compile_tu(cxx, includes, text, workdir, name="ffi_check.cpp", extra=()):
    path = os.path.join(workdir, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w"] + list(extra)
    for d in includes:
        cmd += ["-I", d]
    cmd.append(path)
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stderr


def preprocess_names(cxx, includes, headers, names, workdir):
    """{name: expansion} of each name after including `headers`."""
    body = "\n".join("#include <%s>" % h for h in headers)
    body += "\n" + "\n".join("ffi_name \"%s\" => %s ;" % (n, n) for n in names) + "\n"
    path = os.path.join(workdir, "names.cpp")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(body)
    cmd = [cxx, "-std=c++17", "-E", "-P", "-w"]
    for d in includes:
        cmd += ["-I", d]
    r = subprocess.run(cmd + [path], capture_output=True, text=True)
    out = {}
    for m in re.finditer(r'ffi_name\s+"(\w+)"\s*=>\s*(.*?)\s*;', r.stdout):
        out[m.group(1)] = " ".join(m.group(2).split())
    return out


def elf_exports(path):
    """Names of the symbols `path` (an ELF64 little-endian shared library) defines."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise FfiError("%s is not a 64-bit little-endian ELF file" % path)
    e_shoff = _struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum = _struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        (_name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link, _info, _align, sh_entsize) = (
            _struct.unpack_from("<IIQQQQIIQQ", data, off)
        )
        sections.append((sh_type, sh_offset, sh_size, sh_link, sh_entsize))
    names = set()
    for sh_type, sh_offset, sh_size, sh_link, sh_entsize in sections:
        if sh_type != 11:  # SHT_DYNSYM
            continue
        str_off = sections[sh_link][1]
        for k in range(sh_size // (sh_entsize or 24)):
            st_name, st_info, _other, st_shndx = _struct.unpack_from("<IBBH", data, sh_offset + k * 24)
            if st_shndx == 0 or st_name == 0:  # undefined, or the null symbol
                continue
            end = data.index(b"\0", str_off + st_name)
            names.add(data[str_off + st_name : end].decode("ascii", "replace"))
    return names


def documented_value_type(header_text, enumerator):
    """The value type cublasLt.h documents for attribute `enumerator`, or None."""
    m = re.search(r"/\*\*((?:(?!\*/).)*)\*/\s*%s\s*=" % re.escape(enumerator), header_text, re.S)
    if not m:
        return None
    for line in m.group(1).splitlines():
        t = re.match(r"^\s*\*?\s*((?:const\s+)?(?:u?int(?:8|16|32|64)_t|float|double|void\s*\*|char\s*\*)(?:\[\])?)\s*[,.]", line)
        if t:
            return " ".join(t.group(1).split())
    return None


def check_attribute_types(src, header_path):
    """Failures where the type we pass for an attribute differs from the documented one."""
    with open(header_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    failures, n = [], 0
    for c in src.consts:
        want = ATTRIBUTE_VALUE_TYPES.get(c["name"])
        if want is None:
            continue
        n += 1
        expr = CONSTANTS[c["name"]][1]
        got = documented_value_type(text, expr)
        if got != want:
            failures.append(
                "%s:%d: we pass a %s for %s but %s documents %s"
                % (c["file"], c["line"], want, expr, header_path, got or "no value type")
            )
    return failures, n


def python_env_includes():
    """site-packages/nvidia/*/include of the running Python (where the pip wheels put them)."""
    out = []
    for key in ("purelib", "platlib"):
        base = sysconfig.get_paths().get(key)
        if base:
            out += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return list(dict.fromkeys(out))


def find_header(includes, header):
    for d in includes:
        if os.path.isfile(os.path.join(d, header)):
            return os.path.join(d, header)
    return None


def check(args):
    root = os.path.abspath(args.root)
    includes = [os.path.abspath(d) for d in args.include if os.path.isdir(d)]
    if args.python_env:
        includes += python_env_includes()
    includes = list(dict.fromkeys(includes))
    cxx = shutil.which(args.cxx)
    if not cxx:
        print("ffi_check: no C++ compiler %r on PATH: checked nothing" % args.cxx)
        return 3 if args.require else 2
    src = parse_tree(root)
    constant_mapping(src)  # unmapped constants are an error even when nothing compiles
    required = set(GROUPS) if args.require == "all" else set(filter(None, (args.require or "").split(",")))
    unknown = required - set(GROUPS)
    if unknown:
        print("ffi_check: unknown group(s) in --require: %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(GROUPS)))
        return 2
    work = tempfile.mkdtemp(prefix="ffi_check.")
    try:
        usable, header_of, notes = [], {}, []
        for g, (hdr, _) in GROUPS.items():
            header_of[g] = hdr
            found = find_header(includes, hdr)
            if not found:
                notes.append("%s: %s not found in %s" % (g, hdr, includes or "no include directory"))
                continue
            rc, err = compile_tu(cxx, includes, "#include <%s>\n" % hdr, work, "probe_%s.cpp" % g)
            if rc != 0:
                first = next((l for l in err.splitlines() if "error" in l), err.strip()[:300])
                notes.append("%s: %s does not compile on its own here: %s" % (g, found, first))
                continue
            usable.append(g)
            print("ffi_check: %s: %s" % (g, found))
        text, (n_fn, n_const, n_struct) = generate(src, set(usable), header_of)
        if args.emit:
            with open(args.emit, "w", encoding="utf-8") as fh:
                fh.write(text)
        failures = []
        if usable:
            # Precise name diagnostics first (the static_asserts repeat them in the TU).
            names = set()
            for f in src.functions:
                if f["group"] in usable:
                    names |= {f["symbol"], api_name(f["symbol"])}
            exp = preprocess_names(cxx, includes, [header_of[g] for g in GROUPS if g in usable], sorted(names), work)
            for f in src.functions:
                if f["group"] not in usable:
                    continue
                sym = f["symbol"]
                for name in sorted({sym, api_name(sym)}):
                    got = exp.get(name)
                    if got is not None and got != sym:
                        failures.append(
                            "%s:%d: we bind %s, but %s maps %s to %s: bind %s"
                            % (f["file"], f["line"], sym, header_of[f["group"]], name, got, got)
                        )
            if "cublaslt" in usable:
                f2, n_attr = check_attribute_types(src, find_header(includes, header_of["cublaslt"]))
                failures += f2
                n_const += n_attr
            rc, err = compile_tu(cxx, includes, text, work)
            if rc != 0:
                msgs = []
                for line in err.splitlines():
                    m = re.search(r"error: (?:static assertion failed: )?(.*)$", line)
                    if m:
                        msgs.append(m.group(1))
                    elif "note: the comparison reduces to" in line:
                        msgs.append("    " + line.split("note: ", 1)[1])
                failures.append("the generated checks do not compile:\n  " + "\n  ".join(msgs or [err[-3000:]]))
        # Exports of the libraries given with --lib.
        libs = {}
        for spec in args.lib:
            g, _, p = spec.partition("=")
            if g not in GROUPS or not p:
                print("ffi_check: --lib wants GROUP=PATH with GROUP one of %s, got %r" % (", ".join(GROUPS), spec))
                return 2
            libs[g] = p
        n_sym = 0
        for g, p in list(libs.items()):
            if not os.path.isfile(p):
                notes.append("%s: %s is not a file, its exports were not checked" % (g, p))
                del libs[g]
                continue
            exports = elf_exports(p)
            for f in src.functions:
                if f["group"] == g:
                    n_sym += 1
                    if f["symbol"] not in exports:
                        failures.append("%s:%d: %s does not export %s" % (f["file"], f["line"], p, f["symbol"]))
            print("ffi_check: %s: exports checked in %s" % (g, p))
        for g in GROUPS:
            if g not in libs and not any(g + ":" in n and "not a file" in n for n in notes):
                notes.append("%s: no library given, its exports were not checked" % g)
        for n in notes:
            print("ffi_check: not checked: %s" % n)
        if failures:
            print("ffi_check: MISMATCH between our bindings and the CUDA headers/libraries:")
            for f in failures:
                print("  " + f)
            return 1
        print(
            "ffi_check: ok: %d functions, %d constants, %d structs checked against the headers of %s; %d symbols against library exports"
            % (n_fn, n_const, n_struct, ", ".join(usable) or "nothing", n_sym)
        )
        print(
            "ffi_check: headers checked: %s; headers not checked: %s"
            % (",".join(usable) or "none", ",".join(g for g in GROUPS if g not in usable) or "none")
        )
        missing = sorted(required - set(usable))
        if missing:
            print("ffi_check: REQUIRED but not checked: %s" % ", ".join(missing))
            return 3
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Self-test: the parser on small inputs, and the generated checks against fake headers.
# ---------------------------------------------------------------------------------------

FAKE_RUST = r'''//! fake bindings
use std::ffi::{c_int, c_void};
pub type FooResult = c_int;
type Handle = *mut c_void; // a comment with fn fake(x: u8);
/// `FOO_OK` (fake.h).
pub const FOO_OK: FooResult = 0;
const FOO_MODE: c_int = 0x1_0;
pub const KINDS: [u8; 2] = [1, 2];
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rec {
    a: [u64; 2],
    n: usize,
    s: c_int,
    f: f32,
}
api! {
    /// doc
    pub struct FooApi {
        fn fooAlloc_v2(p: *mut u64, bytes: usize) -> FooResult;
        fn fooFill(h: Handle, rec: *mut Rec,
                   value: f32) -> FooResult;
        fn fooVersion() -> usize;
        fn fooLog(msg: *const std::ffi::c_char);
    }
}
pub type Query = unsafe extern "C" fn(Handle) -> FooResult;
pub fn q(l: &Lib) -> Query {
    let p = l.sym("fooQuery").unwrap();
    unsafe { std::mem::transmute::<*mut c_void, Query>(p) }
}
'''

FAKE_HEADER = r"""#pragma once
#include <stddef.h>
typedef enum { FOO_OK = 0, FOO_ERR = 3 } fooResult_t;
#define FOO_MODE 16
typedef struct fooHandle_st *fooHandle_t;
typedef struct { unsigned long long a[2]; size_t n; int s; float f; } fooRec_t;
#define fooAlloc fooAlloc_v2
#ifdef __cplusplus
extern "C" {
#endif
fooResult_t fooAlloc_v2(unsigned long long *p, size_t bytes);
fooResult_t fooFill(fooHandle_t h, fooRec_t *rec, float value);
size_t fooVersion(void);
void fooLog(const char *msg);
fooResult_t fooQuery(fooHandle_t h);
#ifdef __cplusplus
}
#endif
"""


class ParserTest(unittest.TestCase):
    def parsed(self, text=FAKE_RUST):
        src = Source()
        API_STRUCTS.setdefault("FooApi", "foo")
        SYMBOL_PREFIX_GROUPS.insert(0, ("foo", "foo"))
        try:
            parse_file(src, "src/cuda/fake.rs", text)
        finally:
            SYMBOL_PREFIX_GROUPS.pop(0)
        return src

    def test_comments_are_stripped_but_strings_kept(self):
        s = strip_comments('a // x "y"\nb "c // d" /* e\n f */ g \'h\'')
        self.assertEqual(s.split("\n")[0].rstrip(), "a")
        self.assertIn('"c // d"', s)
        self.assertNotIn("e", s.replace("\n", " ").split('"c // d"')[1].split("g")[0])
        self.assertEqual(s.count("\n"), 2)

    def test_api_block_functions_and_types(self):
        src = self.parsed()
        fns = {f["symbol"]: f for f in src.functions}
        self.assertEqual(sorted(fns), ["fooAlloc_v2", "fooFill", "fooLog", "fooQuery", "fooVersion"])
        self.assertEqual(fns["fooFill"]["params"], [("h", "Handle"), ("rec", "*mut Rec"), ("value", "f32")])
        self.assertEqual(fns["fooLog"]["ret"], "()")
        self.assertEqual(fns["fooLog"]["params"], [("msg", "*const c_char")])
        self.assertEqual(fns["fooQuery"]["params"][0][1], "Handle")
        self.assertEqual(fns["fooAlloc_v2"]["line"], 20)
        self.assertEqual(src.abi("Handle", "src/cuda/fake.rs"), (PTR, 8, None, 0))
        self.assertEqual(src.abi("*mut u64", "src/cuda/fake.rs"), (PTR, 8, INT, 8))
        self.assertEqual(src.abi("FooResult", "src/cuda/fake.rs"), (INT, 4, None, 0))
        self.assertEqual(src.abi("*mut Rec", "src/cuda/fake.rs"), (PTR, 8, STRUCT, 32))

    def test_constants_and_struct_layout(self):
        src = self.parsed()
        self.assertEqual({c["name"]: c["value"] for c in src.consts}, {"FOO_OK": 0, "FOO_MODE": 16})
        self.assertEqual(src.layout("Rec"), (32, 8, {"a": 0, "n": 16, "s": 24, "f": 28}))

    def test_documented_attribute_types(self):
        text = "/** Transform of A.\n   *\n   * int32_t, default: CUBLAS_OP_N\n   */\n  X_TRANSA = 3,\n" \
               "/** Bytes.\n   *\n   * uint64_t, default: 0\n   */\n  X_WS = 1,\n/** none */\n  X_NONE = 2,\n"
        self.assertEqual(documented_value_type(text, "X_TRANSA"), "int32_t")
        self.assertEqual(documented_value_type(text, "X_WS"), "uint64_t")
        self.assertIsNone(documented_value_type(text, "X_NONE"))

    def test_versioned_names(self):
        self.assertEqual(api_name("cuMemAlloc_v2"), "cuMemAlloc")
        self.assertEqual(api_name("cuCtxCreate_v4"), "cuCtxCreate")
        self.assertEqual(api_name("cuInit"), "cuInit")


class GeneratedCheckTest(unittest.TestCase):
    """The generated C++ against a fake header: correct bindings compile, each kind of
    mistake fails with its message."""

    def setUp(self):
        self.cxx = shutil.which("g++")
        if not self.cxx:
            self.skipTest("no g++")
        self.dir = tempfile.mkdtemp(prefix="ffi_selftest.")
        with open(os.path.join(self.dir, "fake.h"), "w") as fh:
            fh.write(FAKE_HEADER)
        self.saved = (dict(GROUPS), dict(API_STRUCTS), dict(CONSTANTS), dict(STRUCTS), list(INLINE_VALUES), list(SYMBOL_PREFIX_GROUPS))
        GROUPS["foo"] = ("fake.h", "foo")
        API_STRUCTS["FooApi"] = "foo"
        CONSTANTS.clear()
        CONSTANTS.update({"FOO_OK": ("foo", "FOO_OK"), "FOO_MODE": ("foo", "FOO_MODE")})
        STRUCTS.clear()
        STRUCTS["Rec"] = ("foo", "fooRec_t", {"a": "a", "n": "n", "s": "s", "f": "f"})
        INLINE_VALUES[:] = [("foo", "fake.rs: compared with 3", "FOO_ERR", 3)]
        SYMBOL_PREFIX_GROUPS.insert(0, ("foo", "foo"))

    def tearDown(self):
        g, a, c, s, i, p = self.saved
        for d, v in ((GROUPS, g), (API_STRUCTS, a), (CONSTANTS, c), (STRUCTS, s)):
            d.clear()
            d.update(v)
        INLINE_VALUES[:] = i
        SYMBOL_PREFIX_GROUPS[:] = p
        shutil.rmtree(self.dir, ignore_errors=True)

    def run_check(self, rust):
        src = Source()
        parse_file(src, "src/cuda/fake.rs", rust)
        text, counts = generate(src, {"foo"}, {"foo": "fake.h"})
        rc, err = compile_tu(self.cxx, [self.dir], text, self.dir)
        return rc, err, counts

    def test_correct_bindings_pass(self):
        rc, err, counts = self.run_check(FAKE_RUST)
        self.assertEqual(rc, 0, err)
        self.assertEqual(counts, (5, 3, 1))

    def test_each_mistake_fails_with_its_message(self):
        cases = [
            ("fn fooAlloc_v2(p: *mut u64, bytes: usize)", "fn fooAlloc(p: *mut u64, bytes: usize)",
             "we bind fooAlloc but fake.h #defines fooAlloc to another symbol"),
            ("bytes: usize) -> FooResult", "bytes: u32) -> FooResult",
             "parameter 2 (bytes: u32) of fooAlloc_v2 is a 4-byte integer in Rust"),
            ("p: *mut u64, bytes", "p: *mut u32, bytes",
             "parameter 1 (p: *mut u32) of fooAlloc_v2 is a pointer to 4-byte integer"),
            ("value: f32) -> FooResult", "value: f64) -> FooResult", "parameter 3 (value: f64) of fooFill"),
            ("h: Handle, rec: *mut Rec,", "h: Handle,", "fooFill takes a different number of parameters"),
            ("fn fooVersion() -> usize;", "fn fooVersion() -> c_int;", "return type of fooVersion is a 4-byte integer"),
            ("const FOO_MODE: c_int = 0x1_0;", "const FOO_MODE: c_int = 17;", "FOO_MODE = 17 but fake.h's FOO_MODE"),
            ("    f: f32,\n}", "    f: f32,\n    g: u8,\n}", "struct Rec is 40 bytes but fooRec_t is not"),
            ("pub type Query = unsafe extern \"C\" fn(Handle) -> FooResult;",
             "pub type Query = unsafe extern \"C\" fn(Handle, c_int) -> FooResult;",
             "fooQuery takes a different number of parameters"),
        ]
        for old, new, message in cases:
            rust = FAKE_RUST.replace(old, new, 1)
            self.assertNotEqual(rust, FAKE_RUST, old)
            if "g: u8" in new:
                STRUCTS["Rec"][2]["g"] = "f"
            rc, err, _ = self.run_check(rust)
            self.assertNotEqual(rc, 0, "accepted: %s" % new)
            self.assertIn(message, err, "for %s" % new)

    def test_preprocessor_reports_the_mapping(self):
        exp = preprocess_names(self.cxx, [self.dir], ["fake.h"], ["fooAlloc", "fooFill"], self.dir)
        self.assertEqual(exp, {"fooAlloc": "fooAlloc_v2", "fooFill": "fooFill"})

    def test_elf_exports_of_a_built_library(self):
        c = os.path.join(self.dir, "lib.c")
        with open(c, "w") as fh:
            fh.write("int fooAlloc_v2(void) { return 0; }\nstatic int hidden(void) { return 1; }\n"
                     "int use_it(void) { return hidden(); }\nextern int undefined_here(void);\n"
                     "int calls(void) { return undefined_here(); }\n")
        so = os.path.join(self.dir, "libfoo.so")
        r = subprocess.run([self.cxx, "-x", "c", "-shared", "-fPIC", "-o", so, c], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        names = elf_exports(so)
        self.assertIn("fooAlloc_v2", names)
        self.assertIn("calls", names)
        self.assertNotIn("hidden", names)
        self.assertNotIn("undefined_here", names)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    default_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    c = sub.add_parser("check", help="check the bindings against headers and libraries")
    c.add_argument("--root", default=default_root)
    c.add_argument("--include", action="append", default=[], help="a directory holding CUDA headers")
    c.add_argument("--python-env", action="store_true", help="also search site-packages/nvidia/*/include")
    c.add_argument("--lib", action="append", default=[], help="GROUP=PATH of a library whose exports to check")
    c.add_argument("--require", default=None, help="'all' or a comma list of groups that must be checked")
    c.add_argument("--emit", default=None, help="also write the generated C++ to this file")
    c.add_argument("--cxx", default="g++")
    d = sub.add_parser("dump", help="print the parsed declarations as JSON")
    d.add_argument("--root", default=default_root)
    sub.add_parser("selftest", help="test the parser and the generated checks")
    args = p.parse_args(argv)
    try:
        if args.cmd == "check":
            return check(args)
        if args.cmd == "dump":
            src = parse_tree(args.root)
            print(json.dumps(src.to_json(), indent=1))
            return 0
        prog = unittest.main(module=__name__, argv=["ffi_check selftest"], exit=False, verbosity=1)
        return 0 if prog.result.wasSuccessful() else 1
    except FfiError as e:
        print("ffi_check: %s" % e)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
