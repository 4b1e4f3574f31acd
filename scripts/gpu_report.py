#!/usr/bin/env python3
"""gpu_report.py: the results of one `scripts/gpu_check.sh OUTDIR` run as Markdown, ready to
go into BENCHMARKS.md: a headline (the default run's tokens/s and MFU, the PyTorch ratio,
each profile's bottleneck), the machine and its measured ceilings, the steps that failed or were
skipped, every benchmark's time, tokens/s and MFU with its ratio to the default bf16 run
(what each switch is worth), the PyTorch reference's ratio, the per-kernel profiles (random
tokens and English prose), the memory sweeps, the attention kernel times and the first-start
and sampling lines.

    python3 scripts/gpu_report.py OUTDIR > OUTDIR/report.md
    python3 scripts/gpu_report.py --ceilings OUTDIR
        (the `nanogpt bench` flags --gemm_tflops=X --copy_gbps=Y that `nanogpt doctor`
        measured, from OUTDIR/doctor.json; nothing when it measured neither)

It reads only the files gpu_check.sh writes; a missing or broken file leaves its part out
with a note, never the whole report. (gpu_check.sh runs it at the end.)
"""
import json
import os
import re
import sys

# (log file, what it measures), in the order of the table; the first is the baseline that
# the ratios are taken against.
BENCHES = [
    ("bench_124m_bf16.log", "GPT-2 124M, bf16, B=8, T=1024 (the default)"),
    ("bench_124m_bf16_v50257.log", "the same, GPT-2's real vocabulary (50257)"),
    ("bench_124m_bf16_accum8.log", "the same, 8 micro-steps per optimizer step"),
    ("bench_124m_bf16_acts_off.log", "NANOGPT_CUDA_DISABLE=bf16_acts"),
    ("bench_124m_bf16_mlp_off.log", "NANOGPT_CUDA_DISABLE=bf16_mlp"),
    ("bench_124m_bf16_logits_off.log", "NANOGPT_CUDA_DISABLE=bf16_logits"),
    ("bench_124m_bf16_attn_off.log", "NANOGPT_CUDA_DISABLE=bf16_attn"),
    ("bench_124m_bf16_dln_off.log", "NANOGPT_CUDA_DISABLE=bf16_dln"),
    ("bench_124m_bf16_fresh_off.log", "NANOGPT_CUDA_DISABLE=fresh_grads"),
    ("bench_124m_bf16_hs64_off.log", "NANOGPT_CUDA_DISABLE=flash_hs64"),
    ("bench_124m_bf16_async_off.log", "NANOGPT_CUDA_DISABLE=flash_async"),
    ("bench_124m_bf16_exp2_off.log", "NANOGPT_CUDA_DISABLE=flash_exp2"),
    ("bench_124m_bf16_residual_off.log", "NANOGPT_CUDA_DISABLE=fused_residual"),
    ("bench_124m_bf16_graphs_off.log", "NANOGPT_CUDA_DISABLE=graphs"),
    ("bench_124m.log", "GPT-2 124M, float32"),
]
SMALL = [
    ("bench_small_bf16.log", "6 x 384, T=256, B=64, bf16"),
    ("bench_small_bf16_graphs_off.log", "the same, NANOGPT_CUDA_DISABLE=graphs"),
    ("bench_small.log", "6 x 384, T=256, B=32, float32"),
]
TORCH = [
    ("torch_ref_124m_bf16.log", "bench_124m_bf16.log", "B=8"),
    ("torch_ref_124m_bf16_accum8.log", "bench_124m_bf16_accum8.log", "B=8 x 8 accumulated"),
]
PROFILES = [
    ("bench_profile_124m_bf16.log", "uniform random tokens"),
    ("bench_profile_124m_bf16_prose.log", "GPT-2 BPE of English prose (--data_dir)"),
]
MEMORY = [
    ("bench_memory_124m_bf16.log", "recompute=0"),
    ("bench_memory_124m_bf16_r2.log", "recompute=2"),
]


def read(out, name):
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def last_json(text):
    for line in reversed((text or "").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def bench_row(text):
    """(median ms, tokens/s, MFU %) of a `nanogpt bench` log, or None."""
    record = last_json(text)
    if not record or "tokens_per_s" not in record:
        return None
    mfu = re.search(r"mfu ([\d.]+)% of", text)
    return record["median_ms"], record["tokens_per_s"], float(mfu.group(1)) if mfu else None


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def percent(v):
    return "" if v is None else f"{v:.1f}%"


def doctor_ceilings(out):
    """(GEMM TFLOP/s, copy GB/s) that `nanogpt doctor` measured on GPU 0, each or None."""
    try:
        report = json.loads(read(out, "doctor.json") or "")
    except ValueError:
        return None, None
    found = {}
    for check in report.get("checks", []):
        if check.get("gpu") in (0, None) and check.get("status") == "ok":
            if check.get("name") in ("gemm", "copy") and check.get("value") is not None:
                found.setdefault(check["name"], check["value"])
    return found.get("gemm"), found.get("copy")


def section_headline(out, p):
    """The figures the issue asks for, first: the default run, the PyTorch ratios and what
    each profile names as the bottleneck (the details follow in their sections)."""
    p("## Headline")
    what = BENCHES[0][1]
    row = bench_row(read(out, BENCHES[0][0]))
    p(f"- {what}: " + (f"{row[1]:.0f} tokens/s, MFU {percent(row[2]) or '?'}" if row
                       else "no result"))
    for ref_name, ours_name, batch in TORCH:
        ours, ref = bench_row(read(out, ours_name)), last_json(read(out, ref_name))
        if ours and ref and ref.get("tokens_per_s"):
            p(f"- against PyTorch + torch.compile, {batch}: "
              f"{ours[1] / ref['tokens_per_s']:.2f}x")
        else:
            p(f"- against PyTorch + torch.compile, {batch}: no result")
    for name, tokens in PROFILES:
        line = re.search(r"^Bottleneck: .*", read(out, name) or "", re.M)
        p(f"- profile on {tokens}: " + (line.group(0) if line else "no bottleneck line"))


def section_machine(out, p):
    p("## Machine")
    machine = (read(out, "machine.txt") or "").strip()
    p("```\n" + (machine or "(machine.txt missing)") + "\n```")
    gemm, copy = doctor_ceilings(out)
    p(f"Measured by `nanogpt doctor`: bf16 GEMM {fmt(gemm, '.0f') or '?'} TFLOP/s, "
      f"device copy {fmt(copy, '.0f') or '?'} GB/s (read + write).")
    first = re.search(r"compiled .*kernel programs.*", read(out, "first_start.log") or "")
    if first:
        p(f"First start: {first.group(0)}")


def section_steps(out, p):
    summary = read(out, "summary.txt")
    if summary is None:
        p("(summary.txt missing)")
        return
    bad = [line for line in summary.splitlines()
           if re.search(r" rc=[1-9]", line) or "skipped" in line]
    p("## Steps that failed or were skipped")
    p("\n".join(f"- `{line}`" for line in bad) if bad else "None: every step run exited 0.")


def section_throughput(out, p):
    p("## Training throughput")
    p("| run | ms/iter (median) | tokens/s | MFU | vs the default |")
    p("|---|---:|---:|---:|---:|")
    base = bench_row(read(out, BENCHES[0][0]))
    for rows in (BENCHES, SMALL):
        ref = bench_row(read(out, rows[0][0]))
        for name, what in rows:
            row = bench_row(read(out, name))
            if row is None:
                p(f"| {what} (`{name}`) | no result | | | |")
                continue
            against = base if rows is BENCHES else ref
            ratio = row[1] / against[1] if against else None
            p(f"| {what} | {row[0]:.2f} | {row[1]:.0f} | {percent(row[2])} | "
              f"{fmt(ratio, '.3f')}x |")
    p("")
    p("Ratios are tokens/s against the first row of each group (above 1: faster).")
    p("")
    p("## Against PyTorch (same GPU, same invocation)")
    p("| batch | nanogpt tokens/s | PyTorch + torch.compile tokens/s | PyTorch MFU | ratio |")
    p("|---|---:|---:|---:|---:|")
    for ref_name, ours_name, what in TORCH:
        ours, ref = bench_row(read(out, ours_name)), last_json(read(out, ref_name))
        if ours is None or not ref or "tokens_per_s" not in ref:
            p(f"| {what} | no result ({ours_name}, {ref_name}) | | | |")
            continue
        mfu = ref.get("mfu")
        p(f"| {what} | {ours[1]:.0f} | {ref['tokens_per_s']:.0f} | "
          f"{percent(mfu and 100 * mfu)} | {ours[1] / ref['tokens_per_s']:.2f}x |")


def profile_table(text):
    """The Markdown lines of a `bench --profile` log: the table, its summary lines and the
    list of how the bf16 products ran."""
    lines = (text or "").splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("Per-operation profile")), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("bench: profile written")
                or lines[i].startswith("GPU memory in use")), len(lines))
    return "\n".join(lines[start:end]).strip()


def section_profiles(out, p):
    wte = {}
    for name, what in PROFILES:
        text = read(out, name)
        p(f"## Per-kernel profile: {what}")
        tokens = re.search(r"bench: tokens from .*", text or "")
        if tokens:
            p(tokens.group(0))
            p("")
        table = profile_table(text)
        p(table if table else f"(no profile in `{name}`)")
        row = re.search(r"^\| embedding_backward_wte \| \d+ \| ([\d.]+) \|", text or "", re.M)
        if row:
            wte[what] = float(row.group(1))
    if wte:
        p("## Token-embedding gradient by token frequency")
        for what, ms in wte.items():
            p(f"- {what}: `embedding_backward_wte` {ms:.3f} ms")


def section_memory(out, p):
    p("## Memory by batch size (T=1024)")
    for name, what in MEMORY:
        text = read(out, name) or ""
        table = [l for l in text.splitlines() if l.startswith("|")]
        p(f"{what} (`{name}`):")
        p("\n".join(table) if table else "(no table)")
        p("")


def section_lines(out, p):
    p("## Attention kernels (gpt2 124M's shape)")
    flash = [l for l in (read(out, "cuda_flash_timing.log") or "").splitlines()
             if l.startswith("attention") or "TFLOP/s" in l]
    p("```\n" + ("\n".join(flash) or "(no timings)") + "\n```")
    p("## Sampling with the KV cache")
    lines = []
    for name in ("sample_cuda_1x2000.log", "sample_cuda_8x1000.log", "sample_cpu_1x200.log"):
        found = re.findall(r"generated .*tokens/s.*", read(out, name) or "")
        lines += [f"{name}: {f}" for f in found] or [f"{name}: no result"]
    p("```\n" + "\n".join(lines) + "\n```")


def main():
    args = sys.argv[1:]
    ceilings = args[:1] == ["--ceilings"]
    if ceilings:
        args = args[1:]
    if len(args) != 1:
        sys.exit("usage: python3 scripts/gpu_report.py [--ceilings] OUTDIR  "
                 "(a scripts/gpu_check.sh output)")
    out = args[0]
    if not os.path.isdir(out):
        sys.exit(f"gpu_report.py: {out} is not a directory (give gpu_check.sh's OUTDIR)")
    if ceilings:
        gemm, copy = doctor_ceilings(out)
        flags = ([f"--gemm_tflops={gemm:.1f}"] if gemm else []) + \
            ([f"--copy_gbps={copy:.0f}"] if copy else [])
        print(" ".join(flags))
        return
    parts = []

    def p(line):
        # A heading starts a block of its own.
        if line.startswith("#") and parts and parts[-1] != "":
            parts.append("")
        parts.append(line)

    for section in (section_headline, section_machine, section_steps, section_throughput, section_profiles,
                    section_memory, section_lines):
        try:
            section(out, p)
        except Exception as e:  # one broken log must not lose the rest of the report
            p(f"({section.__name__}: could not be read: {e})")
        p("")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
