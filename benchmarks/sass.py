"""Static report of the CUDA kernels, no GPU needed: what ptxas allotted and what the hot loops hold.

For each kernel of csrc/cuda (compiled here with nvcc for one architecture, sm_90a by default):
registers, shared memory, stack and spills from `ptxas -v`, and from the SASS (`cuobjdump --dump-sass`)
the instruction mix and the innermost loop that issues tensor-core MMAs (`HMMA` from mma.sync, one
warp's 16x8x16; `HGMMA` from wgmma, a warpgroup's 64xNx16): its length in instructions and how many
of them are MMAs. Counts are static: every path through the loop body is
counted once, so a loop with a masked and a mask-free branch shows both. A rising instruction count
per MMA in a kernel's hot loop is the first sign of an issue-bound kernel, before any GPU timing.

    python -m benchmarks.sass [--arch sm_90a] [FILES]      (or: worldvla bench sass)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPCODES = ("HMMA", "HGMMA", "LDSM", "LDGSTS", "LDG", "STG", "LDS", "STS", "SHFL", "MUFU", "BAR", "ATOM", "RED", "LDL", "STL")


class Unavailable(RuntimeError):
    """The CUDA tools are not installed here: `worldvla bench` reports the report as skipped."""


def find_tool(name: str) -> str | None:
    """`name` on PATH, beside nvcc, under /usr/local/cuda, or in Triton's bundled CUDA tools."""
    hits = [shutil.which(name)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        hits.append(str(Path(nvcc).parent / name))
    hits.append(f"/usr/local/cuda/bin/{name}")
    try:
        import triton

        hits.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    return next((h for h in hits if h and os.access(h, os.X_OK)), None)


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names (`c++filt`), without the anonymous-namespace noise."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = {}
    for mangled, readable in zip(names, out.splitlines()):
        readable = re.sub(r"worldvla::\(anonymous namespace\)::", "", readable)
        short[mangled] = re.sub(r"\(.*\)$", "", readable)  # drop the parameter list
    return short


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled kernel: registers, smem, stack, spills (ptxas -v output), and `wgmma_serialized`
    where ptxas reports serializing its wgmma (C7520 and kin: a wait after every wgmma, silently
    undoing the asynchrony)."""
    info, current = {}, None
    for line in log.splitlines():
        m = re.search(r"wgmma\.mma_async instructions are serialized due to (.*?) in the function '(\w+)'", line)
        if m:
            info.setdefault(m.group(2), {})["wgmma_serialized"] = m.group(1)
            continue
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = info.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem_bytes"] = int(sm.group(1)) if sm else 0
    return info


def parse_sass(dump: str) -> dict[str, dict]:
    """Per mangled kernel: opcode counts, and the innermost loop that holds tensor-core MMAs."""
    kernels = {}
    for block in dump.split("Function : ")[1:]:
        name = block.splitlines()[0].strip()
        ins = []
        for line in block.splitlines():
            m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(2)))
        count = lambda body, op: sum(re.search(rf"\b{op}\b", t) is not None for t in body)  # noqa: E731
        row = {"sass_instructions": len(ins), **{op.lower(): count([t for _, t in ins], op) for op in OPCODES}}
        loops = []
        for addr, text in ins:
            m = re.search(r"\bBRA (0x[0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr:  # a backward branch closes a loop
                body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
                if count(body, "HMMA") or count(body, "HGMMA"):
                    loops.append(body)
        if loops:
            body = min(loops, key=len)
            hmma, hgmma = count(body, "HMMA"), count(body, "HGMMA")
            row.update(hot_loop_instructions=len(body), hot_loop_hmma=hmma, hot_loop_hgmma=hgmma,
                       hot_loop_ldsm=count(body, "LDSM"), hot_loop_global_loads=count(body, "LDG") + count(body, "LDGSTS"))
            if hmma:
                row["instructions_per_hmma"] = round(len(body) / hmma, 2)
            if hgmma:
                row["instructions_per_hgmma"] = round(len(body) / hgmma, 2)
        kernels[name] = row
    return kernels


def report(files: list[Path], arch: str = "sm_90a") -> list[dict]:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise Unavailable("the static report needs nvcc and cuobjdump (the CUDA toolkit, or Triton's bundled "
                           f"cuobjdump); found nvcc={nvcc}, cuobjdump={cuobjdump}")
    num = arch.removeprefix("sm_")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in files:
            obj = Path(tmp) / (src.stem + ".o")
            # csrc/ for the checkout's files; the folder above a given file's (its csrc/cuda/x.cu -> csrc/) for others
            includes = list(dict.fromkeys([f"-I{ROOT / 'csrc'}", f"-I{src.resolve().parent.parent}"]))
            cmd = [nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{num},code={arch}", *includes,
                   "-DWORLDVLA_WITH_CUDA=1", f'-DWORLDVLA_CUDA_ARCHS="{num}-real"', "-Xptxas", "-v", "-c", str(src), "-o", str(obj)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{done.stderr[-2000:]}")
            ptxas = parse_ptxas(done.stderr)
            dump = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True)
            if dump.returncode:
                raise RuntimeError(f"cuobjdump failed on {obj.name}:\n{dump.stderr[-2000:]}")
            sass = parse_sass(dump.stdout)
            names = demangle(sorted(ptxas))
            for mangled in sorted(ptxas):
                rows.append({"file": src.name, "kernel": names[mangled], **ptxas[mangled], **sass.get(mangled, {})})
    return rows


def nvcc_version() -> str | None:
    nvcc = find_tool("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def print_rows(rows: list[dict]) -> None:
    cols = [("kernel", 58), ("registers", 5), ("smem_bytes", 7), ("spill_store_bytes", 6), ("hot_loop_instructions", 6),
            ("hot_loop_hmma", 5), ("instructions_per_hmma", 6), ("hot_loop_hgmma", 5), ("instructions_per_hgmma", 6)]
    heads = ["kernel", "regs", "smem", "spill", "loop", "HMMA", "/HMMA", "HGMMA", "/HGMMA"]
    print("  ".join(h.ljust(w) for h, (_, w) in zip(heads, cols)))
    for r in rows:
        cells = []
        for key, width in cols:
            v = r.get(key, "-")
            cells.append((str(v)[:width] if key == "kernel" else str(v)).ljust(width))
        print("  ".join(cells))


def run(quick: bool = False, device=None, out_dir: str | Path = "benchmarks/results", files=None,
        arch: str = "sm_90a") -> Path:
    """Writes <out_dir>/sass-<arch>.json (sass-<arch>-quick.json for a `quick` run, the same report under the name
    that keeps it off the full results, as every --quick run's). `device` is ignored: nothing runs on a GPU."""
    files = [Path(f) for f in files] if files else sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:  # an installed wheel ships the compiled kernels, not their sources
        raise Unavailable(f"no CUDA sources in {ROOT / 'csrc' / 'cuda'}: the static report reads csrc/cuda/*.cu of a "
                          f"source checkout (installed with pip install -e), or the .cu files given as arguments")
    try:
        from .common import package_version
    except ImportError:
        from benchmarks.common import package_version

    rows = report(files, arch)
    print_rows(rows)
    version, commit = package_version()  # the sources compiled: a report is only comparable at its commit
    doc = {"benchmark": "sass", "arch": arch, "nvcc": nvcc_version(), "worldvla": version, "git_commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": "nvcc -O3 -Xptxas -v and cuobjdump --dump-sass; static counts (every path once)",
           "rows": rows}
    from worldvla.checkpoint import write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sass-{arch}{'-quick' if quick else ''}.json"
    # A temporary name of its own, renamed whole: two runs into one folder never take each other's file.
    write_text_atomic(path, json.dumps(doc, indent=2))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'benchmarks.sass'}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="CUDA sources (default: csrc/cuda/*.cu)")
    p.add_argument("--arch", default="sm_90a", help="target architecture (default: sm_90a)")
    p.add_argument("--out", default="benchmarks/results", help="folder for sass-<arch>.json (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        print(run(out_dir=args.out, files=args.files or None, arch=args.arch))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
