"""`worldvla info`: what this machine will run. Versions, the CPU's vector width, what the compiled
extension holds (C++ paths, CUDA kernels and their architectures), each GPU and whether the build
covers it, and, per op, the backends installed and the order `backend="auto"` tries them in."""
from __future__ import annotations

import json
import platform

def collect() -> dict:
    import torch

    import worldvla
    from worldvla.ops import dispatch

    info = {"worldvla": worldvla.__version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["cpu"] = {"threads": torch.get_num_threads(), "torch_capability": dispatch.cpu_capability(),
                   "vendor": dispatch.cpu_vendor()}
    try:
        from worldvla import _C
        from worldvla.ops import native_backend as nb

        info["native"] = {"cpu_vector_width": _C.cpu_vector_width(), "with_cuda": bool(_C.with_cuda),
                          "cuda_archs": _C.cuda_archs or None}
    except ImportError as err:
        nb = None
        info["native"] = {"missing": str(err)}
    gpus = []
    if torch.cuda.is_available():
        for dev in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(dev)
            gpu = {"index": dev, "name": torch.cuda.get_device_name(dev), "capability": f"{major}.{minor}"}
            if nb is not None and info["native"].get("with_cuda"):
                gpu["native_kernels"] = nb.arch_problem(dev) or "built for it"
                if not nb.arch_problem(dev):
                    gpu["prefill_engines"] = nb.prefill_engines(dev)
            gpus.append(gpu)
    info["gpus"] = gpus
    ops = {}
    for op in dispatch.registered_ops():
        have = dispatch.available(op)
        order = {dev: [b for b in dispatch.AUTO_ORDER.get((op, dev)) or dispatch.AUTO_ORDER.get(dev, ("torch",))
                       if b in have] for dev in ("cpu", "cuda")}
        ops[op] = {"installed": have, "auto_order": order}
    info["ops"] = ops
    from worldvla.ops import decoder
    # How the engine runs a decode step on the CPU (a CUDA device captures it in a CUDA graph).
    info["cpu_decode_step"] = ("one native call a step (float32 and bfloat16 models)" if decoder.native_step_active()
                               else "each layer by the decoder_layer order above")
    return info


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    native = info["native"]
    print(f"worldvla {info['worldvla']}  python {info['python']}  torch {info['torch']}  "
          f"triton {info['triton'] or 'not installed'}")
    print(f"CPU: {info['cpu']['vendor'] or 'vendor unknown'}, {info['cpu']['threads']} threads, "
          f"torch kernels at {info['cpu']['torch_capability']}")
    if "missing" in native:
        print(f"native extension: not importable ({native['missing']}); every op runs in torch or Triton")
    else:
        cuda = f"CUDA kernels for {native['cuda_archs']}" if native["with_cuda"] else "no CUDA kernels"
        print(f"native extension: C++ CPU paths {native['cpu_vector_width']} floats per vector; {cuda}")
    for gpu in info["gpus"]:
        note = f": native kernels {gpu['native_kernels']}" if "native_kernels" in gpu else ""
        if gpu.get("prefill_engines"):
            note += f", prefill engines {', '.join(gpu['prefill_engines'])} (auto: mma)"
        print(f"GPU {gpu['index']}: {gpu['name']} (sm {gpu['capability']}){note}")
    if not info["gpus"]:
        print("GPU: none visible to torch")
    print("op                    installed                 auto order on CPU       auto order on CUDA")
    for op, o in info["ops"].items():
        print(f"{op:21s} {', '.join(o['installed']):25s} {' > '.join(o['auto_order']['cpu']):23s} "
              f"{' > '.join(o['auto_order']['cuda'])}")
    print("(auto takes the first backend in its order that accepts the inputs: device, dtype, shape, gradients)")
    print(f"inference engine's decode steps: {info['cpu_decode_step']} on the CPU, a CUDA graph on CUDA")
    return 0
