"""Training checkpoints that resume exactly, single-process or under FSDP2.

    <run>/checkpoints/step_00000100/model.pt        full model state dict (gathered on rank 0)
                                    optim.pt        full optimizer state dict, keyed by parameter name
                                    state.json      step, data position, schedule, run settings
                                    rng_rank{r}.pt  every rank's Python / NumPy / torch (/ CUDA) RNG states
    <run>/checkpoints/latest        name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to the disk and renamed into
place, and `latest` is replaced atomically afterwards, so a crash (or a power loss) at any moment
leaves the previous checkpoint usable. Each checkpoint's state.json names the one `latest` named when it was
written (`follows`): a crash between a checkpoint's rename and the pointer's write resumes from the new one, and a
later step left by another run is not taken for this run's. Full (unsharded) state dicts make a checkpoint
loadable at any world size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import exchange_names, fsync_path, write_text_atomic
from . import distributed as dist_utils
from ..checks import is_count

LATEST = "latest"
SET_ASIDE = ".old-"  # prefix of a checkpoint set aside while its step is saved again


def _options(for_load: bool) -> StateDictOptions:
    if not dist_utils.is_distributed():
        return StateDictOptions(full_state_dict=True)
    if for_load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict:
    """Full state dict on rank 0 (empty on the other ranks). Collective under FSDP."""
    sd = get_model_state_dict(model, options=_options(False))
    return {k: v.detach().cpu() for k, v in sd.items()} if dist_utils.is_main() else {}


def load_full_model_state(model, state: dict) -> None:
    """A full state dict, held by rank 0 alone under FSDP (the other ranks pass {}), into every rank's model
    (its shards: broadcast from rank 0). Collective under FSDP."""
    set_model_state_dict(model, state, options=_options(True))


def capture_rng() -> dict:
    """RNG states as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    pv, pstate, pgauss = random.getstate()
    nname, nkeys, npos, nhas, ncached = np.random.get_state()
    state = {"python": {"version": pv, "state": torch.tensor(pstate, dtype=torch.int64), "gauss": pgauss},
             "numpy": {"name": nname, "keys": torch.from_numpy(nkeys.astype(np.int64)), "pos": int(npos),
                       "has_gauss": int(nhas), "cached": float(ncached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only: every visible device's state (get_rng_state_all) could not be restored
        # on a machine that sees fewer devices, and the other devices' generators are not this rank's.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict) -> None:
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda, dev = state["cuda"], torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # saved with every visible device's state: this rank's device's
            if dev >= len(cuda):
                print(f"warning: the checkpoint holds CUDA RNG states for {len(cuda)} device(s), none for this "
                      f"rank's device {dev}; its CUDA RNG state starts fresh")
                return
            cuda = cuda[dev]
        torch.cuda.set_rng_state(cuda, dev)


def save_checkpoint(run_dir, step: int, model, optimizer, state: dict, keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if dist_utils.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    msd = get_model_state_dict(model, options=_options(False))
    osd = get_optimizer_state_dict(model, optimizer, options=_options(False))
    rng_file = tmp / f"rng_rank{dist_utils.rank()}.pt"
    torch.save(capture_rng(), rng_file)
    fsync_path(rng_file)
    if dist_utils.is_main():
        torch.save({k: v.detach().cpu() for k, v in msd.items()}, tmp / "model.pt")
        torch.save(_to_cpu(osd), tmp / "optim.pt")
        follows = latest_checkpoint(run_dir)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": dist_utils.world_size(),
                                                     "follows": follows.name if follows else None}, indent=1))
        for part in ("model.pt", "optim.pt", "state.json", "."):  # on the disk before the folder's name is
            fsync_path(tmp / part)
    dist_utils.barrier()
    if dist_utils.is_main():
        done_with = None  # the older copy of a step saved again, once the new one has its name
        if final.exists():  # this step saved again: the old copy is set aside, not deleted, until the new is in
            old = root / f"{SET_ASIDE}{name}"
            if old.exists():
                shutil.rmtree(old)
            if exchange_names(tmp, final):  # one step: the name is never free; tmp now names the older copy
                done_with = tmp
            else:  # two renames: a kill between them leaves the older copy at `old`, found there until put back
                os.replace(final, old)
                os.replace(tmp, final)
                done_with = old
        else:
            os.replace(tmp, final)
        fsync_path(root)
        write_text_atomic(root / LATEST, name)
        if done_with is not None:
            shutil.rmtree(done_with, ignore_errors=True)
        # Half-written folders of saves killed earlier (this run's or a resumed one's, at other steps): each is
        # a full model and optimizer's size, and a checkpoint newer than any of them is now on disk. An older
        # copy set aside by a save killed between its two renames is the step's only one: it is put back.
        for step_name, folder in _set_aside(root).items():
            os.replace(folder, root / step_name)
        for stale in (*root.glob(".tmp-step_*"), *root.glob(f"{SET_ASIDE}step_*")):
            shutil.rmtree(stale, ignore_errors=True)
        if keep_last > 0:
            # Only checkpoints older than this one are pruned: never the one just written.
            older = sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) < step), key=_step_of)
            for old in older[:max(len(older) - (keep_last - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final


def trim_log(path: Path, step: int) -> None:
    """After a resume: drop the log lines of steps past the checkpoint (they will be redone) and any line
    a crash cut short, rewriting the log atomically."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by a crash (or an empty one)
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def check_resume_settings(saved: dict, args, names: tuple[str, ...], source, normalize=None) -> None:
    """Refuse to resume with other values of the settings `names` than the run was started with (`saved`,
    the checkpoint's record of the run's arguments; names it lacks are not compared). `normalize`: {name: value}
    -> the values as they act on the run (a default as the value it stands for, an unused setting as None): a
    setting is refused only where both its value and what it does differ (a default that follows another setting
    is not named with it)."""
    then, now = dict(saved), dict(vars(args))
    if normalize is not None:
        then, now = normalize(then), normalize(now)
    changed = [n for n in names if n in saved and not _same_setting(saved[n], getattr(args, n, None))
               and not _same_setting(then[n], now.get(n))]
    if changed:
        def opts(values):
            return " ".join(f"--{n.replace('_', '-')} {values(n)}" for n in changed)
        raise ValueError(f"--resume: the run in {source} was started with {opts(saved.get)}, not "
                         f"{opts(lambda n: getattr(args, n))}; its checkpoint continues the learning-rate schedule "
                         f"and the data order only under the run's own settings. Resume with those, or start a "
                         f"new run in another --out")


def check_resume_data(saved: dict, data: dict, source, fix: str) -> None:
    """Refuse to resume on other data than the run was started on. `data`: what identifies this run's data
    ({name: value}: a token store's fingerprint, the demo files' names and sizes, the run's length in steps),
    recorded with the run's settings in its checkpoints; `saved`: a checkpoint's record, which lacks them if it
    was written before they were recorded (then nothing is compared). `fix`: how to resume it instead."""
    changed = [n for n in data if n in saved and not _same_setting(saved[n], data[n])]
    if changed:
        what = "; ".join(f"{n.replace('_', ' ')} {_brief(saved[n])}, not {_brief(data[n])}" for n in changed)
        raise ValueError(f"--resume: the run in {source} was started on other data ({what}); its checkpoint continues "
                         f"the data order and the learning-rate schedule of that data only. {fix}, or start a new run "
                         f"in another --out (or start this one over with --overwrite instead of --resume)")


def _brief(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value[:3])) + (f" and {len(value) - 3} more" if len(value) > 3 else "")
    if isinstance(value, str) and len(value) > 16:  # a digest
        return value[:12] + "..."
    return str(value)


def _same_setting(a, b) -> bool:
    """Equal settings, nan equal to nan (a number that is not equal to itself), numbers equal up to rounding: the
    value a default stands for is computed (--lr / 10 at --lr 3e-4 is 2.9999999999999997e-05), not the 3e-05 typed."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def scalar_args(args) -> dict:
    """The run's command-line settings that a checkpoint records (`check_resume_settings` compares them)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def resume_point(run_dir, args, names: tuple[str, ...], data: dict | None = None, fix=None,
                 normalize=None, kind: str | None = None, require: tuple[str, ...] = ()) -> Path | None:
    """Under --resume, the run's latest checkpoint, refused (before anything is built) if it is another command's
    (`kind`) or lacks a key of `require` (`resumable_checkpoint`), if it was started with other values of the
    settings `names` (compared as `normalize` gives them: `check_resume_settings`), or on other `data`
    (`check_resume_data`; `fix(saved settings)` says how to resume it); None without --resume or without a
    checkpoint."""
    if not args.resume:
        return None
    ck = resumable_checkpoint(run_dir, kind, require)
    if ck is not None:
        saved = read_state(ck).get("args", {})
        check_resume_settings(saved, args, names, run_dir, normalize)
        check_resume_data(saved, data or {}, run_dir, fix(saved) if fix else "Resume on the data it was started on")
    return ck


# The keys of a checkpoint's state.json that tell the commands' runs apart where it does not record its "kind"
# (written before the kind was recorded).
_KIND_KEYS = {"train-vq": ("usage", "restart_rng"), "train": ("scheduler", "model_config")}


def checkpoint_kind(state: dict) -> str | None:
    """The command whose run wrote the checkpoint state `state`: its recorded "kind" ("train", "train-vq"), else the
    one whose keys it holds; None where neither tells."""
    if isinstance(state.get("kind"), str):
        return state["kind"]
    found = [k for k, keys in _KIND_KEYS.items() if any(key in state for key in keys)]
    return found[0] if len(found) == 1 else None


def check_state(state: dict, ck: Path, kind: str | None = None, require: tuple[str, ...] = ()) -> None:
    """Refuse to resume from the checkpoint folder `ck` (whose state.json holds `state`) a run of another command
    than `kind` (named first: nothing else of it would fit), or one whose state lacks a key of `require`."""
    then = checkpoint_kind(state)
    if kind is not None and then is not None and then != kind:
        run_dir = ck.parent.parent
        raise ValueError(f"--resume: {run_dir} holds a `worldvla {then}` run, not a `worldvla {kind}` one (its "
                         f"checkpoint {ck.name}): continue it with `worldvla {then} --resume`, or give this run "
                         f"another --out")
    missing = [key for key in ("step", *require) if key not in state]
    if missing:
        keys = ", ".join(repr(k) for k in missing)
        raise ValueError(f"{ck / 'state.json'}: the checkpoint's state lacks {keys}, which a resume needs (edited by "
                         f"hand, or written by another version); {_older_fix(ck)}")
    step = state["step"]
    if not is_count(step):
        raise ValueError(f"{ck / 'state.json'}: the checkpoint's \"step\" is {step!r}, not a count of steps (edited "
                         f"by hand, or written by another version); {_older_fix(ck)}")


def resumable_checkpoint(run_dir, kind: str | None = None, require: tuple[str, ...] = ()) -> Path | None:
    """The run's latest checkpoint (None without one), refused if it is of another command's run than `kind` or
    its state.json lacks a key of `require` (`check_state`)."""
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        check_state(read_state(ck), ck, kind, require)
    return ck


def _name_of(path: Path) -> str:
    """The step folder's name, also of an older copy set aside under another (`_set_aside`)."""
    return path.name[len(SET_ASIDE):] if path.name.startswith(SET_ASIDE) else path.name


def _step_of(path: Path) -> int:
    try:
        return int(_name_of(path)[len("step_"):])
    except ValueError:
        return -1


def _set_aside(root: Path) -> dict[str, Path]:
    """{step name: folder} of the complete checkpoints that a save of the same step, killed between its two
    renames, left set aside (`SET_ASIDE`) with the step's own name free: each is that step's only copy."""
    return {p.name[len(SET_ASIDE):]: p for p in root.glob(f"{SET_ASIDE}step_*")
            if p.is_dir() and (p / "state.json").is_file() and not os.path.lexists(root / p.name[len(SET_ASIDE):])}


def _complete(root: Path) -> dict[str, Path]:
    """{step name: folder} of the complete checkpoints under `root`, a set-aside copy (`_set_aside`) under its step's
    name: the ones a --resume can take."""
    done = {p.name: p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file()}
    done.update(_set_aside(root))  # found where a killed save of the same step left it, until the next save
    return done


def has_checkpoints(run_dir) -> bool:
    root = Path(run_dir) / "checkpoints"
    return any(root.glob("step_*")) or bool(_set_aside(root))


def check_resume_or_overwrite(resume: bool, overwrite: bool) -> None:
    """--resume and --overwrite together are refused (the one would silently win over the other)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it and starts over: pass one "
                         "of them, not both")


def check_run_dir(run_dir, resume: bool, overwrite: bool, kind: str | None = None, exports=()) -> None:
    """What `prepare_run_dir` refuses, refused before a run reads or builds anything: --resume with --overwrite,
    a fresh run (no --resume) into a folder that holds another run's checkpoints, and a fresh run or a --resume
    (which finds nothing to continue) into one that holds the folders in `exports` of a run whose checkpoints are
    gone, without `overwrite` (`kind`: this command's, to name a run of the other command as such)."""
    run_dir = Path(run_dir)
    check_resume_or_overwrite(resume, overwrite)
    if overwrite:
        return
    if not has_checkpoints(run_dir):
        # A finished run whose checkpoints were deleted to free the disk: its results (and its log, which a new
        # run starts over) are not another run's to take over, also under --resume, which starts a new run where
        # it finds no checkpoint. A log alone is a run stopped before its first checkpoint, which the same
        # command starts over.
        found = [name for name in exports if (run_dir / name).exists()]
        if found:
            what, it = " and ".join(f"{name}/" for name in found), "it" if len(found) == 1 else "them"
            if resume:
                raise FileExistsError(
                    f"--resume: {run_dir} holds the exported {what} of an earlier run but not its checkpoints (they "
                    f"are gone): there is nothing to continue, and a new run would replace {it}. Pass --overwrite "
                    f"instead of --resume to delete {it} and start over in {run_dir}, or choose another --out")
            raise FileExistsError(
                f"{run_dir} holds the exported {what} of an earlier run (its checkpoints are gone). Pass --overwrite "
                f"to delete {it} and start over in {run_dir}, or choose another --out")
        return
    if resume:
        return
    then = None
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        try:
            then = checkpoint_kind(read_state(ck))
        except (OSError, ValueError):  # a damaged state.json: named where a --resume reads it
            then = None
    if kind is not None and then is not None and then != kind:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints of a `worldvla {then}` run. Pass --overwrite to delete them and "
            f"start this `worldvla {kind}` run over in {run_dir}, or choose another --out")
    raise FileExistsError(
        f"{run_dir} already holds checkpoints of an earlier run. Pass --resume to continue it, "
        f"--overwrite to delete them and start over in {run_dir}, or choose another --out")


def prepare_run_dir(run_dir, resume: bool, overwrite: bool, exports=()) -> None:
    """Before a run: a fresh run (no --resume) refuses a folder that holds another run's checkpoints or the
    folders in `exports` (that run's results), unless `overwrite`, which deletes them. Collective: every rank
    calls it."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume, overwrite, exports=exports)
    if resume or not (has_checkpoints(run_dir) or any((run_dir / name).exists() for name in exports)):
        return
    dist_utils.barrier()  # every rank has looked before anything is deleted
    if dist_utils.is_main():
        for name in ("checkpoints", *exports):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    dist_utils.barrier()


SEED_LIMIT = 2 ** 64  # torch.manual_seed takes seeds below it


def seed_int(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**64), the seeds torch takes (a larger one failed at the run's
    start with "Overflow when unpacking long long")."""
    from ..cli import non_negative_int

    value = non_negative_int(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 2**64 ({SEED_LIMIT - 1} at most, the seeds torch "
                                         f"takes), got {value}")
    return value


def check_finite(step: int, values: dict, run_dir, causes: str) -> None:
    """Stop a run at the step whose `values` ({name: the step's value}, numbers the loop has already read back:
    no synchronization of its own) are not all finite: its weights are then garbage, and neither saved nor exported.
    Names the step and the run's last checkpoint, which is kept as it was; `causes`: the run's likely causes."""
    bad = [f"the {name} is {value}" for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return
    ck = latest_checkpoint(run_dir)
    kept = (f"the run's last checkpoint, {ck.name}, is kept as it was (a --resume from it with the same settings "
            f"would likely diverge again)" if ck is not None else "no checkpoint of the run was written")
    raise ValueError(f"step {step}: {' and '.join(bad)} (not finite): the training diverged and stopped; this step's "
                     f"weights are neither saved nor exported, and {kept}. Likely causes: {causes}. Start the run over "
                     f"(--overwrite, or another --out) with other settings")


class StopSignal:
    """SIGTERM during a training run (a scheduler's preemption, `kill`, torchrun passing its own on): noted, not
    acted on at once. The loop reads `flag` at each step's end, agrees on it across ranks in the step's own
    all-reduce (so that every rank stops after the same step), saves a checkpoint of that step and ends, and
    `--resume` continues from it; without this the run died where it stood, losing up to --save-every steps.
    Ctrl-C (SIGINT) still stops at once. Made, it takes SIGTERM over (in the main thread only, where Python
    can set a handler); `restore` hands it back.

    A SIGTERM after the last step's all-reduce (during that step's end, the final save or the export) counts too:
    the loop asks `agreed` once more after them; in one process it looks again once the handler is handed back, so
    that no SIGTERM between the handler's start and its end is lost (after it, SIGTERM acts as it did before the
    run). Under several ranks a SIGTERM during the export, after the ranks' last agreement, lets the run end as
    finished: its work is done."""

    def __init__(self):
        self.received = False
        self._installed, self._before = False, None
        if threading.current_thread() is threading.main_thread():
            self._before, self._installed = signal.signal(signal.SIGTERM, self._note), True

    def _note(self, signum, frame):
        self.received = True

    @property
    def flag(self) -> float:
        return 1.0 if self.received else 0.0

    def agreed(self, stopped: bool, device) -> bool:
        """Whether the run stops: `stopped` (what the ranks agreed on already) or a SIGTERM noted on any rank since;
        collective under several ranks (a float on `device`, as NCCL needs), so every rank gets the same answer."""
        flag = torch.tensor([1.0 if stopped or self.received else 0.0], dtype=torch.float64, device=device)
        return bool(dist_utils.all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        if self._installed:  # a handler set outside Python reads back as None: the default is put back then
            signal.signal(signal.SIGTERM, self._before if self._before is not None else signal.SIG_DFL)
            self._installed, self._before = False, None


def stop_after_message(step: int, total: int) -> str:
    """The line a run that reached --stop-after before its last step ends with: how to go on from there."""
    return (f"stopped at --stop-after, step {step} of {total}: to go on, run the same command with --resume and "
            f"a later --stop-after (or none, to the end)")


def stopped_message(command: str, step: int, checkpoint, args, last: bool = False) -> str:
    """The line a training stopped by SIGTERM ends with: what was saved, and what to run to go on, as a Ctrl-C's
    (`cli.how_to_continue`: with --resume, the same command; after --overwrite, --resume in its place). `last`: the
    step was the run's last, so the resume has nothing left to train."""
    from ..cli import how_to_continue

    how = how_to_continue(argparse.Namespace(**{**vars(args), "command": command}))
    if last:
        return (f"worldvla {command}: stopped by SIGTERM after step {step}, the run's last, checkpoint "
                f"{Path(checkpoint).name} saved (a resume finds nothing left to train and finishes at once, with "
                f"the export); {how}")
    return f"worldvla {command}: stopped by SIGTERM after step {step}, checkpoint {Path(checkpoint).name} saved; {how}"


def add_run_arguments(p, save_every: int, exports: str) -> None:
    """The options of a long run's checkpoints and logging, shared by `worldvla train` and `train-vq`;
    `exports`: what the run writes at its end (named in --overwrite's help)."""
    from ..cli import non_negative_int, positive_int

    p.add_argument("--save-every", type=non_negative_int, default=save_every,
                   help="checkpoint every N steps (0 = only at the end; default: %(default)s)")
    p.add_argument("--keep-last", type=non_negative_int, default=2,
                   help="checkpoints to keep (0 = all; default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (a new run starts there if it holds none)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"start over in an --out that holds an earlier run: delete its checkpoints and exported "
                        f"{exports} first (without --resume or --overwrite such a folder is refused; not with "
                        f"--resume)")
    p.add_argument("--stop-after", type=non_negative_int, default=0,
                   help="stop (with a checkpoint) after this step (default: 0, run to the end)")
    p.add_argument("--log-every", type=positive_int, default=1,
                   help="write a metrics.jsonl line every N steps (default: %(default)s)")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def latest_checkpoint(run_dir) -> Path | None:
    """The run's newest complete checkpoint: the one `latest` names, or a later one written after it (its
    state.json `follows` it) whose pointer write a crash cut off. Without a usable pointer: the highest step. A step
    whose second save was killed between its two renames is found at its older copy's folder (`_set_aside`), which
    the next save puts back."""
    root = Path(run_dir) / "checkpoints"
    done = _complete(root)
    pointer = root / LATEST
    path = done.get(pointer.read_text().strip()) if pointer.is_file() else None
    if path is None:
        return max(done.values(), key=_step_of, default=None)
    while True:  # a chain of more than one link needs more than one crash; followed all the same
        later = [p for p in done.values() if _step_of(p) > _step_of(path) and _follows(p) == _name_of(path)]
        if not later:
            return path
        path = max(later, key=_step_of)


def _follows(ck: Path) -> str | None:
    try:
        return json.loads((ck / "state.json").read_text()).get("follows")
    except (OSError, ValueError, AttributeError):
        return None  # damaged: not taken here; read_state names the damage where it is read


def load_checkpoint(path, model, optimizer=None, restore_rng_state: bool = True, kind: str | None = None,
                    require: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint folder (or a run folder: its latest checkpoint) into model / optimizer,
    restore this rank's RNG states, and return state.json, which is checked first to be of a run of `kind` and to
    hold the keys `require` (`check_state`). Collective under FSDP."""
    path = Path(path)
    if not (path / "state.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/state.json "
                                    f"or a checkpoint folder)")
        path = found
    state = read_state(path)
    check_state(state, path, kind, require)
    main = dist_utils.is_main()
    msd = _read_on_rank_0(path / "model.pt")
    load_full_model_state(model, msd)
    del msd  # rank 0 holds the full model's fp32 weights: not while the optimizer state (twice that) loads
    if optimizer is not None:
        osd = _read_on_rank_0(path / "optim.pt")
        set_optimizer_state_dict(model, optimizer, osd, options=_options(True))
    rng_file = path / f"rng_rank{dist_utils.rank()}.pt"
    if restore_rng_state:
        if rng_file.is_file():
            restore_rng(_read_part(rng_file))
        missing = missing_rng_files(path, dist_utils.world_size())
        if missing and main:  # rank 0 looks for every rank's file: any rank may lack its own
            print(f"warning: {', '.join(missing)} missing (saved by {state.get('world_size', '?')} rank(s), resumed "
                  f"by {dist_utils.world_size()}); the RNG states of those ranks start fresh")
    state["path"] = str(path)
    return state


def read_state(path) -> dict:
    """The state.json of the checkpoint folder `path`; a damaged one (cut short, edited by hand) is refused naming
    it and the older checkpoints to resume from instead."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(_damaged(file, e)) from None
    if not isinstance(state, dict):
        raise ValueError(_damaged(file, ValueError(f"a JSON {type(state).__name__}, not an object")))
    return state


def _read_on_rank_0(file: Path):
    """Rank 0's copy of a checkpoint file that rank 0 alone reads (the others get {} and their shards by
    broadcast); a refusal ends every rank with its reason (`dist_utils.on_rank_0`)."""
    data, _ = dist_utils.on_rank_0(lambda: _read_part(file), f"read {file}")
    return {} if data is None else data


def _read_part(file: Path):
    """A file of a checkpoint; a damaged one (cut short by a full disk, a copy stopped partway) is refused naming
    it and the older checkpoints to resume from instead."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: the checkpoint file is missing (a partial copy of the checkpoint, or a "
                                f"file removed from it); {_older_fix(file.parent)}") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(_damaged(file, e)) from None


def _damaged(file: Path, err: BaseException) -> str:
    """What to say of a checkpoint's damaged `file`: the error, and the complete checkpoints older than its own."""
    return (f"{file}: the checkpoint file cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}); it is damaged or "
            f"cut short; {_older_fix(file.parent)}")


def _older_fix(folder: Path) -> str:
    """How to resume a run whose checkpoint `folder` cannot be: from the complete checkpoints older than it."""
    older = sorted((p for p in _complete(folder.parent).values() if _step_of(p) < _step_of(folder)), key=_step_of)
    if older:
        return (f"resume from an older checkpoint of the run: {', '.join(p.name for p in older[-3:])} (remove "
                f"{folder}, and --resume continues from {older[-1].name})")
    return "the run has no older checkpoint to resume from: start it over (--overwrite)"


def missing_rng_files(path, world: int) -> list[str]:
    """The RNG files of ranks 0..world-1 that the checkpoint folder `path` lacks (it was saved at a smaller world
    size, or they were lost): those ranks' RNG states start fresh on a resume."""
    names = [f"rng_rank{r}.pt" for r in range(world)]
    return [n for n in names if not (Path(path) / n).is_file()]


class CurvePlot:
    """Keeps `<run>/training.png` (the curves of metrics.jsonl) up to date: `update()` after a periodic save
    redraws it once the run or the last drawing is `every_s` old, `update(force=True)` at the run's end (or
    stop, or failure) always, except on Ctrl-C, which is answered at once. A figure that cannot be drawn
    (matplotlib missing, a full disk) is said once on stderr and never stops training: the log it is drawn from
    holds the same numbers."""

    def __init__(self, out, panels, title: str, every_s: float = 60.0):
        self.out, self.panels, self.title, self.every_s = Path(out), panels, title, every_s
        self.last, self.failed = time.monotonic(), False

    def update(self, force: bool = False) -> None:
        if self.failed or (not force and time.monotonic() - self.last < self.every_s):
            return
        if force and isinstance(sys.exc_info()[1], KeyboardInterrupt):  # in a `finally` on Ctrl-C: exit now
            return
        try:
            from ..eval.plots import training_curves

            training_curves(self.out / "metrics.jsonl", self.out / "training.png", self.panels, self.title)
        except Exception as e:  # noqa: BLE001 - a figure is a convenience; the run goes on without it
            self.failed = True
            print(f"note: could not draw {self.out / 'training.png'} ({type(e).__name__}: {e}); "
                  f"{self.out / 'metrics.jsonl'} has the same numbers", file=sys.stderr)
        self.last = time.monotonic()
