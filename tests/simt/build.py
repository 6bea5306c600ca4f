"""Build `worldvla._C` with its CUDA kernels compiled by the host compiler against the SIMT
emulator (simt.h), as a separate module, for the CPU tests of the CUDA kernels.

The module is the real binding file and the real kernel sources: only the inline-assembly
helpers, the launch helpers and the dynamic shared-memory declaration of csrc/cuda/cuda_common.cuh
and csrc/cuda/wgmma.cuh switch to the emulator. Builds are
cached under build/simt/<hash of the sources and flags>/ and reused while nothing changed.

    python tests/simt/build.py        # build (or find) the module and print its path
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class Unavailable(RuntimeError):
    """The emulated module cannot be built here (no C++ compiler, CUDA headers or pybind11)."""


def cuda_include() -> Path:
    """The CUDA toolkit's include folder: its fp16/bf16 headers work with a host compiler."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file():
            return Path(c) / "include"
    raise Unavailable("no CUDA headers (cuda_bf16.h) found; set CUDA_HOME or put nvcc on PATH")


def _sources() -> tuple[list[Path], list[Path]]:
    cuda = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    cpp = [ROOT / "csrc" / "bindings.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp")), HERE / "simt.cpp",
           HERE / "shared_region.cpp"]
    return cuda, cpp


def build(verbose: bool = False) -> Path:
    """Compile (or reuse) the emulated module; returns the path of the shared library."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    objcopy = shutil.which("objcopy")
    if not cxx or not objcopy:
        raise Unavailable("no C++ compiler (g++) or objcopy (binutils) on PATH")
    try:
        import pybind11
    except ImportError as err:
        raise Unavailable("pybind11 is not installed (pip install pybind11)") from err
    inc = cuda_include()
    cuda, cpp = _sources()
    headers = sorted((ROOT / "csrc").rglob("*.h")) + sorted((ROOT / "csrc").rglob("*.cuh")) + [HERE / "simt.h"]
    flags = ["-std=c++17", "-O2", "-fPIC", "-fopenmp", "-w", "-DWORLDVLA_WITH_CUDA=1", "-DWORLDVLA_SIMT=1",
             "-DWORLDVLA_CUDA_ARCHS=\"simt\"",
             f"-I{ROOT / 'csrc'}", f"-I{HERE}", f"-I{inc}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    digest = hashlib.sha256(" ".join([cxx, *flags, "objcopy .bss=simt_shared"]).encode())
    for f in [*cuda, *cpp, *headers]:
        digest.update(f.name.encode() + f.read_bytes())
    out_dir = ROOT / "build" / "simt" / digest.hexdigest()[:16]
    lib = out_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if lib.is_file():
        return lib
    obj_dir = out_dir / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        obj = obj_dir / (src.name + ".o")
        cmd = [cxx, *flags, *(["-x", "c++"] if src.suffix == ".cu" else []), "-c", str(src), "-o", str(obj)]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"compiling {src.relative_to(ROOT)} for the SIMT emulator failed:\n{run.stderr[-4000:]}")
        if src.suffix == ".cu" or src.name == "shared_region.cpp":  # zero-initialized statics -> "simt_shared"
            run = subprocess.run([objcopy, "--rename-section", ".bss=simt_shared", str(obj)], capture_output=True,
                                 text=True)
            if run.returncode:
                raise RuntimeError(f"objcopy on {obj.name} failed:\n{run.stderr[-2000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, [*cuda, *cpp]))
    tmp = lib.with_suffix(".tmp")
    run = subprocess.run([cxx, "-shared", "-fopenmp", *map(str, objs), "-o", str(tmp)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"linking the SIMT module failed:\n{run.stderr[-4000:]}")
    os.replace(tmp, lib)  # a finished build appears whole or not at all
    return lib


def load(path: Path):
    """Import the built library as a module of its own (it does not replace worldvla._C)."""
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build(verbose=True))
