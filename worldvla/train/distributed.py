"""Process-group plumbing for `torchrun` + FSDP2, and no-ops in a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init()` reads them
(or takes an explicit init_method, as the tests do) and picks NCCL on GPUs, Gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import traceback
import weakref

import torch
import torch.distributed as dist
# Loaded before any group starts: its functions take `group.WORLD` as their default argument when imported, and
# a first DDP model imports it; imported after the start, they held the group past `shutdown`, and its Gloo
# threads into the interpreter's exit.
import torch.distributed.nn  # noqa: F401

from ..devices import torch_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init(device: str | None = None, init_method: str | None = None, rank_: int | None = None,
         world: int | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group when launched by torchrun (or given init_method/rank/world) and
    return this process's device. A plain `python` launch stays single-process."""
    try:
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of "
                         f"processes: launch with torchrun, which sets it, or unset it to run in one process") from None
    if init_method is not None and (rank_ is None or world is None):
        raise ValueError(f"init_method {init_method!r} needs rank_ (this process's rank) and world (the number of "
                         f"processes), got rank_={rank_}, world={world}")
    if init_method is None and (rank_ is not None or world is not None):
        # Without init_method the group is torchrun's (RANK, WORLD_SIZE): these would be silently ignored.
        raise ValueError(f"rank_={rank_} and world={world} are used with an init_method only: pass init_method "
                         f"too, or neither under torchrun")
    want = init_method is not None or env_world > 1
    dev = torch_device(device)
    if dev.type == "cuda":  # the device first, and NCCL bound to it: a first collective never guesses it
        # A process group's ranks take their local rank's GPU; a single process the one it names (cuda:N).
        if want or "LOCAL_RANK" in os.environ or dev.index is None:
            local = int(os.environ.get("LOCAL_RANK", rank_ if rank_ is not None else rank()))
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if want and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kw.update(device_id=dev)
        if init_method is not None:
            kw.update(init_method=init_method, rank=rank_, world_size=world)
        dist.init_process_group(**kw)
    return dev


# The device meshes shard_model made, for shutdown to empty. By identity: meshes compare equal by their
# layout, so a set would keep only the first of the equal meshes that runs in one process make.
_meshes: list[weakref.ref] = []


def shutdown() -> None:
    """Leave the process group, and let the group itself go while Python still runs.

    A destroyed Gloo group keeps its worker threads while anything references it, and DTensor's caches keep
    FSDP's device mesh, which holds the group. Those threads then lived on into the interpreter's exit, where
    one releasing a finished collective's tensor needs the GIL, and the process aborted ("terminate called
    without an active exception") now and then after a finished run. The meshes forget their groups here, and
    a garbage-collector pass frees what held them, so the group and its threads are gone before the exit.

    The groups' Python handles are held through that pass and dropped after it: torch destroys a group
    through its handle with the GIL released, but a DDP reducer (freed by the pass, the GIL held) that held a
    group last destroyed it with the GIL held, and its destructor waits for the lock a Gloo thread holds while
    that thread, freeing the tensor of a collective that has only just finished, waits for the GIL: the rank
    hung in this pass now and then."""
    if not is_distributed():
        return
    groups = [dist.group.WORLD]
    for ref in _meshes:
        if (mesh := ref()) is not None:
            registry = getattr(mesh, "_pg_registry", {})
            groups += registry.values()
            registry.clear()
    _meshes.clear()
    dist.destroy_process_group()
    gc.collect()
    groups.clear()  # the last references, each group destroyed here with the GIL released


@contextlib.contextmanager
def leave_group_after():
    """The body of a command that may run under torchrun: however it ends, the process then leaves its group
    (`shutdown`). Where it failed, the finished frames of its traceback are cleared first: they hold the
    model, whose FSDP state holds the group, and the group's Gloo threads would otherwise outlive `shutdown`
    for as long as the traceback does, into the interpreter's exit (the abort `shutdown` describes, after the
    error was printed)."""
    try:
        yield
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        shutdown()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns t."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankZeroFailed(ValueError):
    """Rank 0's failure in `on_rank_0`, as the other ranks learn it: a bad input's error (a ValueError), so that the
    command line reports it in one line on every rank, as rank 0 reports its own, not as a traceback."""


def on_rank_0(fn, what: str, share=lambda result: None):
    """(fn()'s result, share(result)) where rank 0 alone runs `fn` (a read every rank needs only rank 0 to do):
    the other ranks get (None, share(result) broadcast from rank 0). Under several ranks every rank learns
    whether rank 0 succeeded, and its failure ends every rank with its reason (the others would otherwise wait
    in the next collective until the group timed out): rank 0 raises it, the others RankZeroFailed("rank 0 could
    not {what}: ..."). In one process, plainly (fn(), share(fn()))."""
    if not is_distributed():
        result = fn()
        return result, share(result)
    result, failure, shared = None, None, None
    if is_main():
        try:
            result = fn()
            shared = share(result)
        except Exception as err:
            failure = err
    sent = broadcast_object(("failed", f"{type(failure).__name__}: {failure}") if failure is not None
                            else ("ok", shared))
    if failure is not None:
        raise failure
    if sent[0] == "failed":
        raise RankZeroFailed(f"rank 0 could not {what}: {sent[1]}")
    return result, sent[1]


def shard_model(model, mixed_precision: torch.dtype | None = None, reshard_after_forward: bool = True,
                device_type: str = "cpu"):
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, lm_head), over the ranks'
    devices of `device_type` (fully_shard's default mesh takes CUDA wherever it is available, so a run with
    --device cpu on a GPU machine would have put its shards on the GPUs).

    `model.loss` is registered as an FSDP forward method so calling it (rather than
    `model(...)`) still gathers the root's parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device_type, (world_size(),))
    _meshes.append(weakref.ref(mesh))
    kw = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
    root_kw = dict(kw)
    if mixed_precision is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        # The root's inputs stay as given: its floating inputs are the loss's fp32 class weights, which the
        # default cast would round (0.04 -> 0.0400390625) against the trainer's fp32 normalizer.
        root_kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **root_kw)
    register_fsdp_forward_method(model, "loss")
    return model


def is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)
