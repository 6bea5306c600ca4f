"""The torchrun helpers of `worldvla.train.distributed`: in one process, and in a few Gloo ranks on this machine."""
import datetime
import gc
import os
import weakref
from pathlib import Path

import pytest
import torch

from ranks import spawn

from worldvla.train import distributed as dist_utils


def test_on_rank_0_in_one_process_runs_fn_once_and_shares_its_result():
    """Outside a process group `fn` runs once, and the shared value is `share` of its result."""
    calls = []

    def fn():
        calls.append(1)
        return {"layers": 3}

    assert dist_utils.on_rank_0(fn, "read it", share=lambda r: r["layers"] * 2) == ({"layers": 3}, 6)
    assert calls == [1]
    assert dist_utils.on_rank_0(lambda: 5, "read it") == (5, None)  # the default share sends nothing
    with pytest.raises(KeyError):  # one process: fn's own error, unwrapped
        dist_utils.on_rank_0(lambda: {}["x"], "read it")


def test_leave_group_after_leaves_the_group_however_the_body_ends(monkeypatch):
    """The group is left after a body that finished and after one that raised, whose error passes through."""
    left = []
    monkeypatch.setattr(dist_utils, "shutdown", lambda: left.append(1))
    with dist_utils.leave_group_after():
        pass
    assert left == [1]
    with pytest.raises(ZeroDivisionError):
        with dist_utils.leave_group_after():
            1 / 0
    assert left == [1, 1]
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C too
        with dist_utils.leave_group_after():
            raise KeyboardInterrupt
    assert left == [1, 1, 1]


def test_leave_group_after_a_failure_lets_go_of_what_the_failed_frames_held(monkeypatch):
    """The finished frames of a failure's traceback are cleared before the group is left: what they held (the
    sharded model, which holds the group) is freed then, not kept for as long as the traceback is."""
    monkeypatch.setattr(dist_utils, "shutdown", lambda: None)

    class Model:
        pass

    ref = None

    def step():
        nonlocal ref
        model = Model()  # held by this frame alone
        ref = weakref.ref(model)
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed") as failed:
        with dist_utils.leave_group_after():
            step()
    assert failed.value.__traceback__ is not None
    gc.collect()
    assert ref() is None


def test_helpers_outside_a_group_are_those_of_one_process(monkeypatch):
    """Outside a process group: rank 0 of 1, the main process; a sum over ranks and a broadcast give back what
    they were given; barrier and shutdown do nothing."""
    assert not dist_utils.is_distributed()
    assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    obj = {"a": 1}
    assert dist_utils.broadcast_object(obj) is obj
    dist_utils.barrier()
    dist_utils.shutdown()


def test_init_on_gpus_binds_nccl_to_the_local_ranks_gpu(monkeypatch):
    """Under torchrun on GPUs each rank takes its local rank's GPU (modulo the GPUs it sees) and joins by NCCL
    bound to that GPU, with the timeout asked for. (CUDA stood in: 2 devices.)"""
    import torch.distributed as dist

    calls, picked = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_utils.init("cuda", timeout_s=90) == torch.device("cuda", 1)
    assert picked == [torch.device("cuda", 1)]
    assert calls == [{"backend": "nccl", "timeout": datetime.timedelta(seconds=90),
                      "device_id": torch.device("cuda", 1)}]
    # An explicit init_method: its rank stands for the local rank where torchrun set none.
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert dist_utils.init("cuda", init_method="file:///tmp/pg", rank_=1, world=4) == torch.device("cuda", 1)
    assert calls[1]["backend"] == "nccl" and calls[1]["device_id"] == torch.device("cuda", 1)
    assert (calls[1]["rank"], calls[1]["world_size"]) == (1, 4)


def test_init_of_a_world_of_one_joins_no_group(monkeypatch):
    """WORLD_SIZE=1 (torchrun --nproc-per-node 1, or a plain launch) stays a single process: no group is joined."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("no group may be joined"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dist_utils.init("cpu") == torch.device("cpu")


def _collectives_worker(rank, world, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert dist_utils.is_distributed()
        assert (dist_utils.rank(), dist_utils.world_size(), dist_utils.is_main()) == (rank, world, rank == 0)
        t = torch.tensor([1.0, float(rank)])
        assert dist_utils.all_reduce_sum(t) is t and t.tolist() == [2.0, 1.0]
        # From the rank named: rank 1's object reaches rank 0.
        assert dist_utils.broadcast_object({"from": rank}, src=1) == {"from": 1}
        assert dist_utils.broadcast_object(f"rank {rank}") == "rank 0"
        # Rank 0 alone runs fn; every rank gets what share makes of its result.
        ran = []

        def read():
            ran.append(rank)
            return {"layers": 3}

        result, shared = dist_utils.on_rank_0(read, "read it", share=lambda r: r["layers"] + 1)
        assert ran == ([0] if rank == 0 else [])
        assert result == ({"layers": 3} if rank == 0 else None) and shared == 4
        # Rank 0's failure ends every rank: its own error there, its reason on the others.
        with pytest.raises(ValueError) as failed:
            dist_utils.on_rank_0(lambda: (_ for _ in ()).throw(ValueError("no config.json")), "read --init x")
        if rank == 0:
            assert type(failed.value) is ValueError and str(failed.value) == "no config.json"
        else:
            assert type(failed.value) is dist_utils.RankZeroFailed
            assert str(failed.value) == "rank 0 could not read --init x: ValueError: no config.json"
        del failed  # its frames are let go with the group
        # A failure of share is rank 0's failure too.
        with pytest.raises(KeyError if rank == 0 else dist_utils.RankZeroFailed, match="'k'") as failed:
            dist_utils.on_rank_0(lambda: 1, "share it", share=lambda r: {}["k"])
        del failed
        dist_utils.barrier()
    finally:
        dist_utils.shutdown()
    assert not dist_utils.is_distributed()


def test_collectives_and_rank_0_work_across_two_ranks(tmp_path):
    """Sums over ranks, broadcasts from the rank named, and `on_rank_0`'s result, shared value and failures, as
    each of two Gloo ranks sees them; after `shutdown` no rank is in a group."""
    spawn(_collectives_worker, 2, (str(tmp_path / "pg_init"),), timeout_s=60)


def _first_ddp_worker(rank, world, init_file):
    from ranks import gloo_threads

    dist_utils.init("cpu", init_method=f"file://{init_file}", rank_=rank, world=world)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    del model
    dist_utils.shutdown()
    assert not gloo_threads(), gloo_threads()


def test_a_group_joined_by_init_goes_at_shutdown_after_a_ddp_model(tmp_path):
    """The first DDP model of a process imports `torch.distributed.nn`, whose functions take the running group as
    their default argument: imported after the group started, they kept it (and its Gloo threads) past
    `shutdown`, into the interpreter's exit. `worldvla.train.distributed` imports it before any group starts."""
    spawn(_first_ddp_worker, 2, (str(tmp_path / "pg_init"),), timeout_s=60)


def _busy_worker_shutdown(rank, world, init_file, out):
    """Rank 0 leaves a group whose last owner is a DDP reducer (a C++ object, freed by the garbage collector) while
    one of its Gloo threads is still busy: a collective rank 1 never joins, until the group's 3 s timeout. `out`
    gets how long the shutdown took and the longest time another Python thread waited for the GIL meanwhile."""
    import json
    import threading
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist_utils.init("cpu", init_method=f"file://{init_file}", rank_=rank, world=world, timeout_s=3)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    cycle = {"model": model}
    cycle["self"] = cycle  # the reducer goes with the garbage collector's pass, as a trainer's model does
    del model, cycle
    dist.barrier()
    if rank == 1:
        time.sleep(5)  # in the group, not joining rank 0's collective, until rank 0's has timed out
        dist_utils.shutdown()
        return
    dist.all_reduce(torch.ones(3), async_op=True)
    gaps, done = [], threading.Event()

    def tick():
        last = time.monotonic()
        while not done.wait(0.01):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    t0 = time.monotonic()
    dist_utils.shutdown()
    took = time.monotonic() - t0
    done.set()
    ticker.join()
    Path(out).write_text(json.dumps({"took": took, "longest_gil_wait": max(gaps)}))


def test_shutdown_joins_the_group_threads_with_the_gil_released(tmp_path):
    """The group's Gloo threads are joined with the GIL released, whichever object held the group last. A DDP
    reducer (freed by `gc.collect` in `shutdown`) destroyed it with the GIL held, and a Gloo thread that was
    letting go of a finished collective's tensor needs the GIL while holding the lock the group's destructor
    takes: the rank hung in `shutdown` now and then. Here a busy Gloo thread keeps the destructor waiting
    for seconds, which shows as the longest time another thread waited for the GIL."""
    import json

    out = tmp_path / "rank0.json"
    spawn(_busy_worker_shutdown, 2, (str(tmp_path / "pg_init"), str(out)), timeout_s=60)
    r = json.loads(out.read_text())
    assert r["took"] > 1.5, r  # the group was destroyed in shutdown, waiting for its busy thread
    assert r["longest_gil_wait"] < 1.0, r


def _fsdp_settings(model):
    """(each layer's (param dtype, reduce dtype, casts inputs, reshards after forward, mesh device type), the root's
    (param dtype, reduce dtype, casts inputs)), as plain values: nothing of the sharded model is kept."""
    layers = []
    for layer in model.model.layers:
        state = layer._get_fsdp_state()
        mp, group = state._mp_policy, state._fsdp_param_group
        layers.append((mp.param_dtype, mp.reduce_dtype, mp.cast_forward_inputs,
                       group.post_forward_mesh_info is not None, group.mesh_info.mesh.device_type))
    root = model._get_fsdp_state()._mp_policy
    return layers, (root.param_dtype, root.reduce_dtype, root.cast_forward_inputs)


def _shard_policy_worker(rank, world, init_file):
    import torch.distributed as dist

    import worldvla.train.checkpointing  # noqa: F401  (loaded, as in the trainer's processes that shard models)
    from worldvla.model import ModelConfig, WorldVLA

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = None
    try:
        model = WorldVLA(ModelConfig.tiny(num_hidden_layers=2)).init_weights(generator=torch.Generator().manual_seed(0))
        assert dist_utils.shard_model(model, mixed_precision=torch.bfloat16, reshard_after_forward=False) is model
        layers, root = _fsdp_settings(model)
        # Gathered in bf16, gradients reduced in fp32, kept gathered after the forward, on the CPU mesh.
        assert layers == [(torch.bfloat16, torch.float32, True, False, "cpu")] * 2, layers
        assert root == (torch.bfloat16, torch.float32, False), root  # the root's inputs stay as given
        assert len(dist_utils._meshes) == 1
    finally:
        model = None
        dist_utils.shutdown()
    assert dist_utils._meshes == []


def test_shard_model_applies_the_precision_and_resharding_asked_for(tmp_path):
    """With mixed precision the layers gather in that dtype and reduce gradients in float32 (the root keeps its
    inputs as given); reshard_after_forward=False keeps the layers gathered; the shards are on the CPU mesh asked
    for; shutdown forgets the meshes it made."""
    spawn(_shard_policy_worker, 1, (str(tmp_path / "pg_init"),), timeout_s=60)


def test_native_threads_lists_every_thread_with_its_state():
    """A hung rank's report names its threads as the kernel sees them, those without a Python frame included."""
    import threading
    import time

    from ranks import native_threads

    started, release, tid = threading.Event(), threading.Event(), []

    def wait():
        tid.append(threading.get_native_id())
        started.set()
        release.wait()

    t = threading.Thread(target=wait)
    t.start()
    started.wait()
    deadline = time.monotonic() + 10
    try:
        while True:  # the other thread may not have gone to sleep on its event yet
            rows = {ln.split()[0]: ln.split()[1:] for ln in native_threads(os.getpid()).splitlines()[1:]}
            if rows[str(tid[0])][1] == "S" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        release.set()
        t.join()
    assert str(os.getpid()) in rows and rows[str(os.getpid())][1] == "R"  # this thread, running
    assert rows[str(tid[0])][1] == "S"  # the other, asleep on its event
