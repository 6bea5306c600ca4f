"""The device a user names (`--device`, `device=`), checked against what torch sees here, so that a GPU
that is not there is refused by name instead of failing deep inside torch; and the model dtype a user
names (`--dtype`, `dtype=`)."""
from __future__ import annotations

import torch


def torch_device(device=None, *, default: str | None = None) -> torch.device:
    """`device` (a name such as "cuda", "cuda:1", "cpu", or a torch.device) as a torch.device; None takes
    `default`, else CUDA when torch sees a GPU and the CPU otherwise. Raises ValueError for a CUDA device
    torch does not see, for a name that is no device, and for other device types (mps, xpu, meta, ...): the
    package's kernels, and its tests, are for CPUs and CUDA GPUs."""
    if device is None:
        device = default or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r} (--device): use cpu, cuda or cuda:N (N counts from 0)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {dev} (--device) is not one this package runs on: use cpu, cuda or cuda:N")
    if dev.type == "cpu" and dev.index is not None:
        # torch puts cpu:N's tensors on `cpu`, which then compares unequal to the device asked for.
        if dev.index != 0:
            raise ValueError(f"device {dev} (--device): torch has one CPU device, `cpu` (threads: torch.set_num_threads)")
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} was asked for, but torch sees no CUDA GPU here (a CPU build of torch, "
                             f"or no driver); use the CPU (--device cpu)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {dev} was asked for, but torch sees {n} CUDA GPU(s) (cuda:0 to cuda:{n - 1})")
    return dev


# The model dtypes a user may name, short names included (the command lines' `--dtype` choices).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(dtype=None) -> torch.dtype | None:
    """`dtype` (a name of DTYPES or a floating torch.dtype) as a torch.dtype; None stays None (a loaded
    model keeps the dtype it was saved in). Raises ValueError for anything else."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or the torch.dtype), got {dtype!r}")
