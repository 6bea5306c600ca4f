"""HDF5 demonstrations -> a sharded, memory-mapped token store (spec section 2).

Every frame is encoded by the VQGAN once (in batches); the codes then feed both
kinds of training sample:

    action  BOS, prompt, I_{j-1}, I_j, SEP | [BOA bins EOA] x K, SEP     (j + K <= T; one image at j = 0)
    world   BOS, prompt, I_j, [BOA bins EOA], SEP | I_{j+1}, SEP         (j < T - 1)

A world sample's target is the frame its action led to. Under --drop-noops, where the steps after step j were
dropped, that is not the next kept frame I_{j+1} but the file's frame after step j (`Demo.next_frames`), which is
encoded for it; the samples are the release's, j < T - 1 of the kept steps.

Layout on disk:

    <store>/manifest.json        settings, vocabulary layout, action bounds, shards with sha256 of each file
    <store>/vqgan/               the VQGAN that encoded the frames (VQGAN.save_pretrained)
    <store>/text_tokenizer.json  the release's text tokenizer (chameleon vocabulary only)
    <store>/shard_00000/tokens.npy   int32 [N]      every sample's ids, back to back
                        labels.npy   int32 [N]      -100 where there is no loss
                        offsets.npy  int64 [n + 1]  sample i is tokens[offsets[i]:offsets[i + 1]]
                        kinds.npy    uint8 [n]      0 = action, 1 = world
                        index.npy    int32 [n, 2]   (demo ordinal in its file, step j among the steps kept)

A shard is one input file (or a fixed group of its demos). Shards are written into a
temporary folder and renamed into place, and the manifest is rewritten atomically after
each one, so an interrupted build resumes where it stopped: shards whose files match
their recorded checksums are skipped, and their demos' frames not read again. Once a build
has written its own (incomplete) manifest, the shard folders its plan does not name (those
of a store built there before with more shards) are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import (check_folder, folder_kind, fsync_path, fsync_tree, new_sibling, read_json_file,
                          remove_stale, replace_folder, write_atomic, write_text_atomic)
from ..cli import non_negative_int, positive_int
from ..devices import torch_device
from ..tokens import IGNORE, ActionTokenizer, SequenceBuilder, VocabLayout, text_tokenizer_for
from ..tokens.actions import LIBERO_MAX, LIBERO_MIN
from ..tokens.layout import with_release_image_ids
from ..checks import is_count

FORMAT = "worldvla-token-store"
VERSION = 1
KINDS = ("action", "world")
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_ARRAYS = ("tokens", "labels", "offsets", "kinds", "index")
MANIFEST = "manifest.json"
VQGAN_FILES = ("config.json", "model.safetensors")  # VQGAN.save_pretrained
TEXT_TOKENIZER = "text_tokenizer.json"


# ---------------------------------------------------------------------- small utilities
def sha256_file(path, bufsize: int = 1 << 20, bar=None) -> str:
    """sha256 of the file at `path`, read in blocks of `bufsize` bytes (`bar`: a tqdm bar advanced by each)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def _atomic_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _tensors_digest(names, get) -> str:
    h = hashlib.sha256()
    for k in sorted(names):
        h.update(k.encode())
        h.update(get(k).detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_dict_digest(module: torch.nn.Module) -> str:
    sd = module.state_dict()
    return _tensors_digest(sd, sd.__getitem__)


def _vqgan_folder_digest(folder: Path) -> str | None:
    """`_state_dict_digest` of the VQGAN saved in `folder`, read tensor by tensor from its weights
    file (no model is built); None when the folder lacks a file of VQGAN_FILES. A weights file that cannot be
    read (cut short, overwritten) is refused naming it (ValueError)."""
    from safetensors import SafetensorError, safe_open

    if not all((folder / n).is_file() for n in VQGAN_FILES):
        return None
    path = folder / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return _tensors_digest(f.keys(), f.get_tensor)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: the VQGAN's weights file cannot be read ({type(e).__name__}: {e}); it is "
                         f"damaged or cut short") from None


def find_demo_files(inputs) -> list[Path]:
    """Files and folders (searched recursively for *.hdf5 / *.h5) -> sorted list of files."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        p = Path(item).expanduser()  # a ~ the shell left (a quoted path, a Python caller's) is the home folder
        if p.is_dir():
            files += [q for q in p.rglob("*") if q.suffix in (".hdf5", ".h5") and q.is_file()]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"demo input {p} does not exist (give HDF5 files or folders that hold them)")
    files = sorted({f.resolve() for f in files})
    if not files:
        raise FileNotFoundError(f"no HDF5 demo files (*.hdf5, *.h5) found in {list(map(str, inputs))}")
    return files


def _width_error(where, width: int, action_dim: int) -> ValueError:
    """The refusal of a demo whose actions are not as wide as the store's (`where`: file:demo)."""
    return ValueError(f"{where} has {width}-D actions, the store {action_dim}-D (from the first demo it tokenizes); "
                      f"build one store per action width: give only input files whose demos share it")


def _scan_actions(files, only_success: bool = True, drop_noops: bool = False, empty_ok: bool = False,
                  action_dim: int | None = None) -> np.ndarray:
    """The actions of the demos the store tokenizes (the successful ones if `only_success`, without the no-op
    steps under `drop_noops`), without reading frames (for data-derived bounds). None left: refused, or an
    empty array if `empty_ok`. A demo whose actions are not `action_dim` wide (or, without it, as wide as the
    first one's) is refused naming it."""
    from .hdf5 import iter_demo_actions

    out = []
    for path in files:
        for name, a in iter_demo_actions(path, only_success, drop_noops):
            want = action_dim if action_dim is not None else (out[0].shape[1] if out else a.shape[1])
            if a.shape[1] != want:
                raise _width_error(f"{path}:{name}", a.shape[1], want)
            out.append(a.astype(np.float64))
    if not out:
        if empty_ok:
            return np.zeros((0, 0))
        raise ValueError(f"no actions to derive action bounds from in {len(files)} demo files (the store skips "
                         f"failed demos unless --include-failed, and no-op steps under --drop-noops)")
    return np.concatenate(out, axis=0)


# `--action-bounds auto` warns when the LIBERO bounds it chose clip more than this share of a dimension's values.
# LIBERO's own demos lie inside them (the release's bounds are their range), so any share there is a stray
# outlier, which the edge bin absorbs; beyond 1% the bounds do not describe the data (robomimic's 7-D actions
# in [-1, 1] lose half their rotation values).
CLIP_WARN_SHARE = 0.01
# `--action-bounds auto` picks [-1, 1] for actions inside it only when every dimension reaches at least this |a|:
# a dimension of small deltas (+-0.02 m) would use a handful of the 256 bins. The demo's Meta-World experts reach
# 1.0 in every dimension of their pooled actions (measured on 3 episodes each of its three tasks), so they keep [-1, 1].
UNIT_MIN_REACH = 0.5


def _clipped_share(acts: np.ndarray, low, high) -> np.ndarray:
    """Per dimension, the share of `acts` outside [low, high] (the tokenizer clips them to the bound). A value
    within 1e-6 of the range of its bound is not counted: float32 rounding of a bound itself."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    tol = 1e-6 * (high - low)
    return ((acts < low - tol) | (acts > high + tol)).mean(0)


def action_bounds(mode: str, files, action_dim: int, only_success: bool = True,
                  drop_noops: bool = False) -> tuple[list[float], list[float]]:
    """`libero`: the release's fixed 7-D bounds; `unit`: [-1, 1] per dimension (Meta-World);
    `data`: per-dimension min/max over the demos; `auto`: libero for the 7-D actions of LIBERO's files
    (every file `hdf5.looks_like_libero`: raw or regenerated, as the release trains on them), unit when every
    action lies in [-1, 1] and every dimension reaches |a| >= UNIT_MIN_REACH, data otherwise. Under `auto` a line
    is printed when the LIBERO bounds clip more than CLIP_WARN_SHARE of a dimension's values, naming `data` (and
    `libero`, which keeps them without it), and when it takes data over unit for a dimension of small values. `data`
    and `auto` look at the demos the store tokenizes: the successful ones only if `only_success`, without their
    no-op steps under `drop_noops`."""
    from .hdf5 import looks_like_libero

    if mode == "libero":
        if action_dim != 7:
            raise ValueError(f"the LIBERO bounds are 7-D but the demos have {action_dim}-D actions; "
                             f"use --action-bounds unit or data")
        return list(LIBERO_MIN), list(LIBERO_MAX)
    if mode == "auto" and action_dim == 7 and all(looks_like_libero(f) for f in files):
        acts = _scan_actions(files, only_success, drop_noops, empty_ok=True, action_dim=action_dim)  # none: refused
        share = _clipped_share(acts, LIBERO_MIN, LIBERO_MAX) if len(acts) else np.zeros(7)
        if share.max() > CLIP_WARN_SHARE:
            print(f"warning: --action-bounds auto chose the release's LIBERO bounds (the files look like LIBERO's), "
                  f"which clip this share of the actions' values per dimension: "
                  f"{' '.join(f'{x:.1%}' for x in share)}; pass --action-bounds data to fit the bounds to the "
                  f"demos (or --action-bounds libero to keep these without this warning)")
        return list(LIBERO_MIN), list(LIBERO_MAX)
    if mode in ("auto", "data"):
        acts = _scan_actions(files, only_success, drop_noops, action_dim=action_dim)
        lo, hi = acts.min(0), acts.max(0)
        if mode == "auto" and lo.min() >= -1.0 and hi.max() <= 1.0:
            reach = np.maximum(-lo, hi)
            small = np.nonzero(reach < UNIT_MIN_REACH)[0]
            if not len(small):
                return [-1.0] * action_dim, [1.0] * action_dim
            print(f"note: --action-bounds auto chose the demos' min/max per dimension (data), not [-1, 1]: every "
                  f"action lies in [-1, 1], but dimension(s) {', '.join(map(str, small))} reach only max |a| "
                  f"{', '.join(f'{x:.3g}' for x in reach[small])} (< {UNIT_MIN_REACH}), which [-1, 1] would give a few "
                  f"of the bins; pass --action-bounds unit to keep [-1, 1]")
        flat = hi - lo < 1e-6  # a constant dimension still needs a non-empty range
        lo, hi = np.where(flat, lo - 1.0, lo), np.where(flat, hi + 1.0, hi)
        return lo.tolist(), hi.tolist()
    if mode == "unit":
        return [-1.0] * action_dim, [1.0] * action_dim
    raise ValueError(f"unknown action bounds {mode!r}; choose auto, libero, unit or data")


# ---------------------------------------------------------------------- building
@dataclass
class StoreSettings:
    chunk_size: int = 5
    history: int = 2
    action: bool = True
    world: bool = True
    demos_per_shard: int = 0       # 0 = one shard per input file
    only_success: bool = True
    camera: str | None = None
    rotate_180: bool | None = None  # None: LIBERO's files turned as the release turns them, others as they are
    drop_noops: bool = False        # the release's no-op filter (data.hdf5.steps_without_noops)
    instruction: str | None = None  # every demo's instruction, over the files' (not in the fingerprint: see below)

    def check(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk size K must be >= 1, got {self.chunk_size}")
        if self.history not in (1, 2):
            raise ValueError(f"history must be 1 or 2 frames (the release uses 2), got {self.history}")
        if not (self.action or self.world):
            raise ValueError("nothing to build: both action and world samples are switched off")
        if self.demos_per_shard < 0:
            raise ValueError(f"demos_per_shard must be >= 0 (0 = one shard per file), got {self.demos_per_shard}")
        if self.instruction is not None and (not isinstance(self.instruction, str) or not self.instruction.strip()):
            raise ValueError(f"--instruction must be a non-empty text, got {self.instruction!r}")


def _encode_frames(vqgan, frames: np.ndarray, batch: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> codes [T, h, w] int32, in batches of `batch` frames."""
    out = []
    for s in range(0, len(frames), batch):
        out.append(vqgan.encode_images(frames[s:s + batch]).to(torch.int32).cpu())
    return torch.cat(out).numpy()


def demo_samples(builder: SequenceBuilder, codes: np.ndarray, actions: np.ndarray, instruction: str,
                 settings: StoreSettings, next_codes: dict | None = None):
    """Yield (sample, j) for one demo from its frame codes [T, h, w] and actions [T, D].
    next_codes: {j: codes [h, w] of the frame step j's action led to}, where that is not frame j + 1 (steps
    dropped after it: `Demo.next_frames`); its world sample takes them as its target."""
    T = len(actions)
    codes_t = torch.from_numpy(codes).long()
    K = settings.chunk_size
    if settings.action:
        for j in range(0, T - K + 1):
            hist = [codes_t[i] for i in range(max(0, j - settings.history + 1), j + 1)]
            yield builder.action_sample(instruction, hist, actions[j:j + K]), j
    if settings.world:
        after = {j: torch.from_numpy(c).long() for j, c in (next_codes or {}).items()}
        for j in range(T - 1):
            yield builder.world_sample(codes_t[j], actions[j], after[j] if j in after else codes_t[j + 1]), j


def _write_shard(folder: Path, samples) -> dict:
    """samples: list of (Sample, demo ordinal, j). Written to a temp folder, flushed to the disk and renamed
    into place (a power loss leaves the shard whole or absent, never renamed in with empty files). The temp
    folder is named by this process (`new_sibling`), so that a build killed before the rename leaves one that the
    next build removes (`remove_stale`)."""
    tmp = new_sibling(folder, "tmp")
    lengths = np.array([s.input_ids.numel() for s, _, _ in samples], dtype=np.int64)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if samples:
        tokens = torch.cat([s.input_ids for s, _, _ in samples]).numpy().astype(np.int32)
        labels = torch.cat([s.labels for s, _, _ in samples]).numpy().astype(np.int32)
    else:
        tokens = labels = np.zeros(0, dtype=np.int32)
    arrays = {
        "tokens": tokens, "labels": labels, "offsets": offsets,
        "kinds": np.array([_KIND_CODE[s.kind] for s, _, _ in samples], dtype=np.uint8),
        "index": np.array([[d, j] for _, d, j in samples], dtype=np.int32).reshape(-1, 2),
    }
    files = {}
    for name, arr in arrays.items():
        p = tmp / f"{name}.npy"
        np.save(p, arr)
        files[p.name] = sha256_file(p)
    with open(tmp / "done", "w"):
        pass
    fsync_tree(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync_path(folder.parent)
    kinds = arrays["kinds"]
    return {"n_samples": len(samples), "n_tokens": int(offsets[-1]), "files": files,
            "n_action": int((kinds == 0).sum()), "n_world": int((kinds == 1).sum()),
            "n_label_tokens": int((labels != IGNORE).sum())}


_SHARD_NAME = re.compile(r"shard_\d+")
_SHARD_FILES = {f"{n}.npy" for n in _ARRAYS} | {"done"}  # what `_write_shard` puts in a shard's folder


def _remove_stale_shards(out: Path, keep: set[str]) -> list[str]:
    """Remove the shard folders in `out` that `keep` (the build's plan) does not name; only folders named as shards
    that hold nothing but a shard's files (`_SHARD_FILES`) are taken for the store's own. Returns their names."""
    removed = []
    for p in sorted(out.iterdir()):
        if p.name in keep or not _SHARD_NAME.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        if all(q.name in _SHARD_FILES and q.is_file() and not q.is_symlink() for q in p.iterdir()):
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def verify_shard(root: Path, entry: dict) -> bool:
    folder = root / entry["name"]
    try:
        return all(sha256_file(folder / f) == h for f, h in entry["files"].items())
    except FileNotFoundError:
        return False


def _check_vqgan_folder(folder) -> None:
    folder = Path(folder)
    if folder.is_file():
        holder = folder.parent
        hint = (f": {holder}, which holds it, is one" if folder.name in VQGAN_FILES and
                all((holder / n).is_file() for n in VQGAN_FILES) else "")
        raise NotADirectoryError(f"the VQGAN path {folder} is a file, not a folder; pass the folder that holds "
                                 f"{' and '.join(VQGAN_FILES)} (the vqgan/ folder `worldvla train-vq` exported, "
                                 f"<run>/vqgan){hint}")
    if not folder.is_dir():
        raise FileNotFoundError(f"the VQGAN folder {folder} is missing; pass the vqgan/ folder that "
                                f"`worldvla train-vq` exported (<run>/vqgan) or a VQGAN.save_pretrained folder")
    missing = [n for n in VQGAN_FILES if not (folder / n).is_file()]
    if missing and folder_kind(folder) == "run" and folder_kind(folder / "vqgan") != "vqgan":
        raise FileNotFoundError(f"{folder} is a training run's folder, not a VQGAN folder, and holds no exported VQGAN "
                                f"(<run>/vqgan, which `worldvla train-vq` writes when the run ends; --resume ends a "
                                f"stopped one): pass a VQGAN folder")
    if missing:
        # A train-vq run's folder (its VQGAN in vqgan/), a policy's or a model's: named as such, with the folder
        # to pass instead.
        check_folder(folder, "vqgan")
        inside = folder / "vqgan"
        hint = f"; {inside}, inside it, is one: pass that" if folder_kind(inside) == "vqgan" else ""
        raise FileNotFoundError(f"{folder} is not a complete VQGAN folder: {', '.join(missing)} missing (expected "
                                f"{' and '.join(VQGAN_FILES)}, as `worldvla train-vq` exports them){hint}")


def _uses_text_tokenizer_json(layout: VocabLayout) -> bool:
    """Whether the layout's text goes through text_tokenizer.json (as text_tokenizer_for decides):
    the chameleon vocabulary; compact layouts encode text as byte ids."""
    return layout.text_base < 0


def _demo_infos(files) -> dict:
    """`hdf5.demo_file_info` of each file, by path: read once per build and handed to what uses it (the chunk
    check, the shard plan, the sim camera, the demos' ordinals), not read again by each."""
    from .hdf5 import demo_file_info

    return {f: demo_file_info(f) for f in files}


def _fingerprint_differences(old: dict, terms: dict) -> list[str]:
    """What differs between a store's manifest and the fingerprint terms of a build now, in words (the settings by
    name), so that a refusal says which of them changed; empty when the manifest does not tell."""
    what = []
    old_settings = old.get("settings") or {}
    for k, v in terms["settings"].items():
        if k in old_settings and old_settings[k] != v:
            what.append(f"{k} {old_settings[k]!r} then, {v!r} now")
    if old.get("vqgan_sha256") not in (None, terms["vqgan"]):
        what.append("another VQGAN (its weights' digest differs)")
    old_inputs = [(Path(r.get("path", "")).name, r.get("size")) for r in old.get("inputs") or []]
    if old_inputs and old_inputs != terms["inputs"]:
        gone = sorted({n for n, _ in old_inputs} - {n for n, _ in terms["inputs"]})
        new = sorted({n for n, _ in terms["inputs"]} - {n for n, _ in old_inputs})
        resized = sorted({n for n, _ in set(old_inputs) - set(terms["inputs"])} - set(gone))
        parts = ([f"{', '.join(gone)} no longer given"] if gone else []) + \
                ([f"{', '.join(new)} added"] if new else []) + ([f"{', '.join(resized)} changed size"] if resized else [])
        what.append("other input files (" + ("; ".join(parts) or "another order") + ")")
    old_action = old.get("action") or {}
    if "low" in old_action and (old_action["low"] != terms["low"] or old_action.get("high") != terms["high"]):
        what.append("other action bounds")
    if old.get("layout") not in (None, terms["layout"]):
        what.append("another vocabulary layout")
    if not what and "world_target" in terms and old_settings.get("drop_noops") and old_settings.get("world"):
        # The one term no manifest records: an earlier version's world samples under --drop-noops.
        what.append("world samples under --drop-noops built by an earlier version, whose targets were the next kept "
                    "frames, not the frames their actions led to")
    return what


def _check_some_demos(files, infos: dict) -> None:
    """Refuse inputs whose `data` groups hold no demo at all, naming the files: the checks after would blame the
    chunk size (no demo is K steps long) or the success flags instead."""
    if any(infos[f]["num_demos"] for f in files):
        return
    names = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    raise ValueError(f"{names} holds no demo (the 'data' group has no data/demo_0, data/demo_1, ...): collect "
                     f"demonstrations into it first (worldvla collect) or give files that hold some")


def _check_some_success(files, infos: dict) -> None:
    """Only successful demos are tokenized (only_success): refuse inputs that hold none, before any slow work."""
    n = sum(infos[f]["num_demos"] for f in files)
    if n and not any(ok for f in files for ok in infos[f]["success"]):
        raise ValueError(f"none of the {n} demos in {len(files)} demo file(s) is marked successful (the demos' "
                         f"`success` attribute, or LIBERO's last `dones` flag), and only successful demos are "
                         f"tokenized: pass --include-failed (only_success=False from Python) to tokenize them too")


def _check_chunk_fits(files, chunk_size: int, infos: dict, only_success: bool = True,
                      drop_noops: bool = False) -> None:
    """Action samples need demos of at least K steps: refuse a K longer than every demo the store tokenizes (the
    successful ones if `only_success`; under `drop_noops`, counting the steps it keeps, read from the actions alone),
    before any slow work and before --overwrite replaces a store."""
    steps = [(n, ok) for f in files for n, ok in zip(infos[f]["steps"], infos[f]["success"])]
    longest = max((n for n, _ in steps), default=0)
    if chunk_size > longest:
        raise ValueError(f"--chunk-size/-K {chunk_size} is longer than every demo (the longest has {longest} steps), "
                         f"so no action sample fits; choose -K <= {longest}")
    used = max((n for n, ok in steps if ok or not only_success), default=0)
    if chunk_size > used:
        raise ValueError(f"--chunk-size/-K {chunk_size} is longer than every successful demo (the longest has {used} "
                         f"steps; failed demos, up to {longest} steps long, are tokenized only with --include-failed), "
                         f"so no action sample fits; choose -K <= {used}, or pass --include-failed "
                         f"(only_success=False from Python)")
    if not drop_noops:
        return
    from .hdf5 import iter_demo_actions

    kept = max((len(a) for f in files for _, a in iter_demo_actions(f, only_success, drop_noops=True)), default=0)
    if 0 < kept < chunk_size:  # 0: no demo keeps a step, which the build refuses as such
        failed = only_success and not all(ok for _, ok in steps)
        raise ValueError(f"--chunk-size/-K {chunk_size} is longer than every {'successful ' * only_success}demo once "
                         f"--drop-noops has dropped its no-op steps (the longest keeps {kept} steps"
                         f"{'; failed demos are tokenized only with --include-failed' if failed else ''}), so no "
                         f"action sample fits; choose -K <= {kept}"
                         f"{', pass --include-failed (only_success=False from Python)' if failed else ''}, or leave "
                         f"out --drop-noops")


def _camera_spellings(files, camera: str | None) -> list:
    """The spellings of `camera` that read the same frames of every input, the one a store records first. The reader
    (`hdf5.frame_key`) tries obs/<camera>_rgb, <camera>_image, then <camera>, and without a camera agentview's or the
    first camera's: `agentview`, `agentview_rgb` and no camera all read LIBERO's obs/agentview_rgb, and a rerun with
    any finds the store built with another. Read at each file's first demo, where the reader settles its camera;
    [camera] when it reads no frames of some input (the build refuses it then, as before). No camera is recorded as
    None, as before (a store built so keeps its fingerprint), and stays apart where inputs settle on other cameras."""
    from .hdf5 import frame_key

    try:
        keys = {path: frame_key(path, camera) for path in files}
    except ValueError:  # DemoFormatError, or a damaged file: named by the build
        return [camera]
    keys = {path: key for path, key in keys.items() if key is not None}  # a file without demos: no frames to read
    if not keys:
        return [camera]
    base = re.sub(r"_(rgb|image)$", "", camera if camera is not None else next(iter(keys.values())))
    named = [base, f"{base}_rgb", f"{base}_image"]
    spellings = list(dict.fromkeys([None] + named if camera is None else named + [camera, None]))

    def same(s) -> bool:
        try:
            return all(frame_key(path, s) == key for path, key in keys.items())
        except ValueError:  # DemoFormatError: this spelling reads no frames there
            return False

    return [s for s in spellings if s == camera or same(s)]


def _plan_shards(files, settings: StoreSettings, infos: dict):
    plan = []
    for fi, path in enumerate(files):
        n = infos[path]["num_demos"]
        per = settings.demos_per_shard or max(n, 1)
        for a in range(0, max(n, 1), per):
            plan.append({"name": f"shard_{len(plan):05d}", "file": fi, "demos": [a, min(a + per, n)]})
    return plan


def _sim_camera(files, infos: dict) -> str | None:
    """The simulator camera the demo files were rendered from (`worldvla collect` records it; the
    evaluation renders from it), when they all name the same one; None otherwise."""
    # An attribute written as a fixed-length HDF5 string reads as bytes: str() would record "b'corner'".
    cams = {infos[f]["attrs"].get("sim_camera") for f in files}
    cams = {c.decode("utf-8") if isinstance(c, bytes) else c for c in cams}
    cam = cams.pop() if len(cams) == 1 else None
    return str(cam) if cam is not None else None


# Inputs are hashed in blocks of this many bytes, with a progress bar when they add up to more than HASH_BAR_BYTES.
HASH_BLOCK = 8 << 20
HASH_BAR_BYTES = 1 << 30


def _input_records(files, stats, readings, known, progress: bool) -> list[dict]:
    """The manifest's record of each input file: path, size, mtime_ns, sha256 of its content and how it is read
    (`hdf5.reading_record`: its frames' rotation, its instruction). `known`: the records of the same files (by
    place) in the manifest of the build being resumed, or None; their digest is taken as it is while a file's size
    and mtime_ns match its record, so a file is hashed once, and a folder copied elsewhere once more."""
    from tqdm.auto import tqdm

    records = []
    for i, (f, st, r) in enumerate(zip(files, stats, readings)):
        was = known[i] if known and i < len(known) else {}
        same = was.get("size") == st.st_size and was.get("mtime_ns") == st.st_mtime_ns
        records.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "sha256": was.get("sha256") if same else None,
                        **{k: v for k, v in r.items() if k != "uses_file_instruction"}})
    todo = [(rec, f) for rec, f in zip(records, files) if rec["sha256"] is None]
    total = sum(rec["size"] for rec, _ in todo)
    with tqdm(total=total, desc="hash inputs", unit="B", unit_scale=True,
              disable=not progress or total <= HASH_BAR_BYTES) as bar:
        for rec, f in todo:
            rec["sha256"] = sha256_file(f, HASH_BLOCK, bar)
    return records


def _changed_inputs(old: dict, inputs: list[dict], tokenizer_digest, tokenizer_json) -> list[str]:
    """What a rerun would tokenize otherwise than the store at hand (`old`: its manifest, of the same fingerprint)
    was: each input whose content, frame rotation or instruction differ from its record, and another text
    tokenizer file. A field a record lacks (a manifest written before it was kept) is not compared."""
    changed = []
    for was, now in zip(old.get("inputs", []), inputs):
        why = []
        if was.get("sha256") not in (None, now["sha256"]):
            why.append("its content changed")
        if was.get("rotation") not in (None, now["rotation"]):
            why.append(f"its frames {was['rotation']} then, {now['rotation']} now")
        if "instruction" in was and was["instruction"] != now["instruction"]:
            why.append(f"its instruction {was['instruction']!r} then, {now['instruction']!r} now")
        elif "instruction" in was and was.get("demo_instructions") != now.get("demo_instructions"):
            # the file's instruction is the same (an --instruction equal to it then, none now): name the demos
            then, own = was.get("demo_instructions") or {}, now.get("demo_instructions") or {}
            names = sorted(n for n in {*then, *own} if then.get(n) != own.get(n))
            why.append(f"its demo(s) {', '.join(names)} prompted with other instructions than then")
        if why:
            changed.append(f"{now['path']} ({'; '.join(why)})")
    want = old.get("text_tokenizer_sha256")
    if want is not None and tokenizer_digest is not None and want != tokenizer_digest:
        changed.append(f"{tokenizer_json} (the text tokenizer: not the file the store's text was tokenized with)")
    return changed


def _instruction_lines(files, readings) -> list[str]:
    """One line per file whose demos are prompted with a guessed instruction (`hdf5.GUESSED`: the file name, which
    is the task's for LIBERO's regenerated files, or robomimic's env name); a file with none is refused."""
    from .hdf5 import FROM_FILE_NAME, FROM_NOWHERE, GUESSED

    lines, by_name = [], []
    for f, r in zip(files, readings):
        if not r["uses_file_instruction"]:
            continue
        if r["instruction_from"] == FROM_FILE_NAME:  # LIBERO's regenerated files, as many as a suite's tasks: one line
            by_name.append((f, r["instruction"]))
            continue
        if r["instruction_from"] == FROM_NOWHERE:
            raise ValueError(f"{f} holds no instruction (no data.attrs['instruction'], no LIBERO problem_info "
                             f"language_instruction or robomimic env_args, or only empty ones, and it is not read as "
                             f"one of LIBERO's files, whose name is their task); pass --instruction TEXT (every input "
                             f"file's demos are prompted with it), or write the task's instruction into the file's "
                             f"data.attrs['instruction']")
        if r["instruction_from"] in GUESSED:
            lines.append(f"note: {f} holds no instruction: its demos are prompted with {r['instruction']!r}, from its "
                         f"{r['instruction_from']} (a guess); pass --instruction TEXT to prompt every input file's "
                         f"demos with TEXT instead")
    if by_name:
        (f, ins), more = by_name[0], len(by_name) - 1
        lines.insert(0, f"note: {len(by_name)} LIBERO file(s) hold no instruction: their demos are prompted with their "
                        f"task's name, from the file name, as the release does ({Path(f).name} -> {ins!r}"
                        f"{f' and {more} more' if more else ''}); --instruction TEXT would prompt every file's demos "
                        f"with TEXT instead")
    return lines


def build_store(inputs, out, vqgan, *, layout: VocabLayout | str | None = None, tokenizer_json=None,
                chunk_size: int = 5, history: int = 2, action: bool = True, world: bool = True,
                bounds: str = "auto", demos_per_shard: int = 0, only_success: bool = True, camera=None,
                rotate_180: bool | None = None, drop_noops: bool = False, encode_batch: int = 32, device=None,
                overwrite: bool = False, progress: bool = True, instruction: str | None = None) -> Path:
    """Pretokenize HDF5 demos into a token store at `out` (resumable; see the module doc).

    vqgan: a `worldvla.vqgan.VQGAN` or a folder written by `VQGAN.save_pretrained`.
    layout: a VocabLayout, "chameleon" (needs `tokenizer_json`), or None / "compact" for a compact
    vocabulary sized to the VQGAN's codebook.
    instruction: every demo's instruction, over what the files hold (a line names each file whose instruction
    is guessed from its name or robomimic's env name; a file with none is refused without it).
    A rerun resumes the store in `out` only if its inputs (by sha256), the frames' rotation, the instructions and
    the text tokenizer file are those it was built from; otherwise it is refused unless `overwrite`.
    """
    from tqdm.auto import tqdm

    from ..vqgan import VQGAN
    from .hdf5 import check_actions, first_demo_shape, iter_demos, reading_record, rotation_note

    settings = StoreSettings(chunk_size, history, action, world, demos_per_shard, only_success, camera, rotate_180,
                             drop_noops, instruction)
    read = dict(camera=camera, rotate_180=rotate_180, drop_noops=drop_noops, instruction=instruction)
    settings.check()
    # range(0, T, 0) and an empty list of batches would fail deep inside the first encode, with the store half made.
    if not is_count(encode_batch, 1):
        raise ValueError(f"encode_batch (--encode-batch) is the number of frames per VQGAN call: a whole number "
                         f">= 1, got {encode_batch!r}")
    # Paths as VQGAN.from_pretrained takes them: `--vqgan=~/x` reaches us unexpanded (the shell expands only a
    # word-initial ~).
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the token store's folder {out} (--out) is a file, not a folder: name a folder "
                                 f"(it is created if missing)")
    if tokenizer_json is not None:
        tokenizer_json = Path(tokenizer_json).expanduser()
    # The VQGAN folder and the text tokenizer file are checked before any demo file is read.
    if not isinstance(vqgan, VQGAN):
        vqgan = Path(vqgan).expanduser()
        _check_vqgan_folder(vqgan)
    builder_text = None
    if isinstance(layout, str) and layout == "chameleon":
        layout = VocabLayout.chameleon(tokenizer_json)
        builder_text = text_tokenizer_for(layout, tokenizer_json)
    elif isinstance(layout, VocabLayout) and _uses_text_tokenizer_json(layout) and tokenizer_json is not None:
        # A VocabLayout.chameleon() object assumes code c -> id 4 + c; the policy rebuilds the map from the
        # store's text_tokenizer.json (`with_release_image_ids`), so the store's images must take the same ids.
        builder_text = text_tokenizer_for(layout, tokenizer_json)
        layout = with_release_image_ids(layout, builder_text)
    elif not (layout is None or layout == "compact" or isinstance(layout, VocabLayout)):
        raise ValueError(f"layout must be a VocabLayout, 'compact' or 'chameleon', got {layout!r}")
    elif tokenizer_json is not None:
        # A byte-text layout (the default) never reads the file: its user meant the release's vocabulary.
        raise ValueError(f"--tokenizer-json {tokenizer_json} is read only with --layout chameleon (the "
                         f"{getattr(layout, 'name', 'compact')} layout encodes text as byte ids): add --layout "
                         f"chameleon (layout='chameleon' from Python) for the release's vocabulary, or drop "
                         f"--tokenizer-json")
    # The temporary shard folders that builds killed before their rename left: those of processes that no longer
    # run, or of this one (an interrupted earlier call). Builds into one folder are not refused, so another running
    # build's folder is kept.
    remove_stale(out, r"shard_\d+", own=True)
    files = find_demo_files(inputs)
    infos = _demo_infos(files)
    _check_some_demos(files, infos)
    if only_success:
        _check_some_success(files, infos)
    if action:
        _check_chunk_fits(files, chunk_size, infos, only_success, drop_noops)  # before any slow work
    readings = [reading_record(f, rotate_180, instruction) for f in files]
    instruction_lines = _instruction_lines(files, readings)
    device = torch_device(device, default="cpu")
    if not isinstance(vqgan, VQGAN):
        vqgan = VQGAN.from_pretrained(vqgan)
    vqgan = vqgan.to(device).eval()
    n_codes = vqgan.config.n_embed
    if not isinstance(layout, VocabLayout):  # None or "compact" (checked above): sized to the VQGAN
        layout = VocabLayout.compact(n_image_codes=n_codes)
    if layout.n_image_codes < n_codes:
        raise ValueError(f"the VQGAN has {n_codes} codes but layout '{layout.name}' only {layout.n_image_codes} "
                         f"image ids; use VocabLayout.compact(n_image_codes={n_codes})")
    if builder_text is None:
        builder_text = text_tokenizer_for(layout, tokenizer_json)

    # The store's frame size and action width are those of the first demo it tokenizes, not of a failed one it skips
    # (read from the datasets' shapes: a resumed build reads no frames of the demos of its finished shards).
    first = next((s for f in files if (s := first_demo_shape(f, camera, only_success, drop_noops)) is not None),
                 None)
    if first is None:
        raise ValueError(f"none of the {len(files)} demo files holds a demo to tokenize (failed demos are skipped "
                         f"unless --include-failed, and demos left without steps by --drop-noops)")
    note = rotation_note(files, rotate_180, turns=[r["rotation"] for r in readings])
    if note:
        print(note)
    for line in instruction_lines:
        print(line)
    image_hw, action_dim = list(first[0]), first[1]
    low, high = action_bounds(bounds, files, action_dim, only_success, drop_noops)
    act_tok = ActionTokenizer(layout, low, high)
    builder = SequenceBuilder(layout, builder_text, act_tok)

    # One recorded form of the camera: its spellings that read the same frames make one store.
    cameras = _camera_spellings(files, camera)
    settings.camera = cameras[0]
    vq_digest = _state_dict_digest(vqgan)
    settings_d = dict(settings.__dict__)
    # The fingerprint keeps the terms of the stores built before the instruction override (a trainer resuming a run
    # compares it): the instruction reaches the store through each input's record, which a rerun checks.
    fp_settings = {k: v for k, v in settings_d.items() if k != "instruction"}
    stats = [f.stat() for f in files]
    terms = {"version": VERSION, "settings": fp_settings, "layout": layout.to_dict(), "low": low, "high": high,
             "vqgan": vq_digest, "inputs": [(f.name, st.st_size) for f, st in zip(files, stats)]}
    if drop_noops and world:
        # World samples under drop_noops target the frames their actions led to (the next kept frames before): a
        # store built so before is rebuilt (--overwrite), not resumed with shards of both; the others keep theirs.
        terms["world_target"] = "frame_after_action"
    fingerprint = hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).hexdigest()

    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST
    old = {}
    if mpath.is_file():
        try:
            old = read_json_file(mpath, "token store manifest")
        except ValueError as e:
            if not overwrite:
                raise ValueError(f"{e}; pass --overwrite (overwrite=True from Python) to rebuild the store in "
                                 f"{out}") from None
            old = {}  # replaced whole: what it held does not matter
        # A manifest that records no camera (unreadable, replaced under --overwrite) has no spelling to keep.
        old_camera = old["settings"].get("camera", settings.camera) if isinstance(old.get("settings"), dict) \
            else settings.camera
        if old_camera != settings.camera and old_camera in cameras:
            # Built under another spelling of the same camera (by an earlier version, or with no camera): that store,
            # kept as recorded, fingerprint included (a trainer resuming a run compares it).
            settings.camera = settings_d["camera"] = fp_settings["camera"] = old_camera
            fingerprint = hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).hexdigest()
        if old.get("fingerprint") != fingerprint and not overwrite:
            what = _fingerprint_differences(old, terms)
            raise FileExistsError(
                f"{out} holds a token store built with other settings, inputs or VQGAN"
                f"{(': ' + '; '.join(what)) if what else ''}; pass --overwrite (overwrite=True from Python) "
                f"to rebuild it, or choose another output folder")
    resumed = old.get("fingerprint") == fingerprint
    # The text tokenizer's vocabulary is not in the layout (only its image ids are): its file is checked as inputs are.
    tok_digest = sha256_file(tokenizer_json, HASH_BLOCK) \
        if _uses_text_tokenizer_json(layout) and tokenizer_json is not None else None
    inputs_d = _input_records(files, stats, readings, old.get("inputs") if resumed else None, progress)
    changed = _changed_inputs(old, inputs_d, tok_digest, tokenizer_json) if resumed else []
    if changed and not overwrite:
        raise FileExistsError(
            f"{out} holds a token store tokenized otherwise than these inputs would be now: {', '.join(changed)}; "
            f"pass --overwrite (overwrite=True from Python) to rebuild it, or choose another output folder")
    # A shard entry that lacks a key (a hand-edited manifest) is not taken as done: its shard is built again.
    done: dict[str, dict] = {e["name"]: e for e in old.get("shards", []) if _shard_entry_problem(e) is None} \
        if resumed and not changed else {}
    plan = _plan_shards(files, settings, infos)
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "complete": False,
        "layout": layout.to_dict(), "kinds": list(KINDS),
        "action": {"low": low, "high": high, "dim": action_dim, "chunk_size": chunk_size,
                   "history": history, "bounds": bounds},
        "image_size": image_hw, "code_grid": [image_hw[0] // vqgan.downsample, image_hw[1] // vqgan.downsample],
        "settings": settings_d, "vqgan": "vqgan", "vqgan_sha256": vq_digest, "inputs": inputs_d,
        "text_tokenizer_sha256": tok_digest,
        "sim_camera": _sim_camera(files, infos),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": [],
    }
    todo = []
    for entry in plan:
        old = done.get(entry["name"])
        if old is not None and old["file"] == entry["file"] and old["demos"] == entry["demos"] \
                and verify_shard(out, old):
            manifest["shards"].append(old)
        else:
            todo.append(entry)
    # The manifest is rewritten incomplete before the VQGAN and the text tokenizer are replaced: a build killed
    # between them leaves a store the reader refuses, not an old complete manifest beside new files.
    _atomic_json(mpath, manifest)
    # From here the folder holds this build's store, whose manifest names only shards of its plan: the shard folders
    # of a store built before with more of them (--overwrite with fewer files or demos per shard) go now.
    _remove_stale_shards(out, {e["name"] for e in plan})
    # Checked against the weights themselves, not the manifest: a folder left without its manifest
    # (an interrupted first build, a cleaned folder) may hold another VQGAN.
    try:
        have = None if overwrite else _vqgan_folder_digest(out / "vqgan")
    except ValueError:  # a damaged copy: replaced like another VQGAN's
        have = None
    if have != vq_digest:
        # Written whole, as a folder renamed in: a build killed during the copy leaves no weights-sized temporary
        # file inside it for good (`replace_folder` removes the folders killed copies left beside it).
        replace_folder(out / "vqgan", vqgan.save_pretrained)
    if _uses_text_tokenizer_json(layout):
        if Path(tokenizer_json).resolve() != (out / TEXT_TOKENIZER).resolve():
            write_atomic(out / TEXT_TOKENIZER, lambda p: shutil.copyfile(tokenizer_json, p))
    else:
        # A byte-text layout: a copy left by an earlier chameleon build would make the exported
        # policy encode instructions with a tokenizer the model never saw.
        (out / TEXT_TOKENIZER).unlink(missing_ok=True)

    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="pretokenize", unit="shard",
               disable=not progress)
    n_frames = 0
    by_file: dict[int, list[dict]] = {}
    for entry in todo:
        by_file.setdefault(entry["file"], []).append(entry)
    for fi, entries in by_file.items():
        wanted = {d: e for e in entries for d in range(*e["demos"])}
        pending = {e["name"]: [] for e in entries}
        remaining = {e["name"]: e["demos"][1] - e["demos"][0] for e in entries}
        # A demo's ordinal is its place among the file's demos, whether or not iter_demos skips some (no-ops only).
        ordinal = {name: d for d, name in enumerate(infos[files[fi]]["names"])}
        # Only the demos of unfinished shards are read: a resumed build reads no frames of its finished ones.
        for demo in iter_demos(files[fi], names={n for n, d in ordinal.items() if d in wanted}, **read):
            d = ordinal[demo.name]
            entry = wanted[d]
            if demo.success or not only_success:  # the size and width of a demo the store skips do not matter
                if list(demo.frames.shape[1:3]) != image_hw:
                    raise ValueError(f"{files[fi]}:{demo.name} has {demo.frames.shape[1]}x{demo.frames.shape[2]} "
                                     f"frames but the store uses {image_hw[0]}x{image_hw[1]}; resize all demos to one "
                                     f"size")
                if demo.actions.shape[1] != action_dim:
                    raise _width_error(f"{files[fi]}:{demo.name}", demo.actions.shape[1], action_dim)
                # under --drop-noops the step named is the file's (`Demo.steps`), not its place among those kept
                check_actions(demo.actions, f"{files[fi]}:data/{demo.name}", demo.steps, infos[files[fi]]["steps"][d])
                codes = _encode_frames(vqgan, demo.frames, encode_batch)
                n_frames += len(codes)
                next_codes = {}
                # where the no-ops after a step were dropped; world samples are j < T - 1 (see the top)
                steps = sorted(j for j in demo.next_frames if j < len(demo.actions) - 1) if settings.world else []
                if steps:
                    after = _encode_frames(vqgan, np.stack([demo.next_frames[j] for j in steps]), encode_batch)
                    next_codes = dict(zip(steps, after))
                    n_frames += len(after)
                pending[entry["name"]] += [(s, d, j) for s, j in demo_samples(builder, codes, demo.actions,
                                                                              demo.instruction, settings, next_codes)]
            remaining[entry["name"]] -= 1
            if remaining[entry["name"]] == 0:
                info = _write_shard(out / entry["name"], pending.pop(entry["name"]))
                manifest["shards"].append({**entry, **info})
                manifest["shards"].sort(key=lambda e: e["name"])
                _atomic_json(mpath, manifest)
                bar.update(1)
                bar.set_postfix(frames=n_frames)
        for name in list(pending):  # the shards of a file with no demos, or of demos iter_demos skipped
            entry = next(e for e in entries if e["name"] == name)
            manifest["shards"].append({**entry, **_write_shard(out / name, pending.pop(name))})
            manifest["shards"].sort(key=lambda e: e["name"])
            _atomic_json(mpath, manifest)  # recorded now, as the others: a stop in a later file keeps it
            bar.update(1)
    bar.close()
    manifest["shards"].sort(key=lambda e: e["name"])
    for key in ("n_samples", "n_tokens", "n_action", "n_world", "n_label_tokens"):
        manifest[key] = sum(e[key] for e in manifest["shards"])
    if manifest["n_samples"] == 0:
        raise ValueError(f"no samples were built from {len(files)} files: the demos tokenized may all be too short "
                         f"(under --chunk-size/-K {chunk_size} steps for action samples, under 2 for world samples), "
                         f"or every demo may be a failure or left without steps by --drop-noops (failed demos are "
                         f"tokenized only with --include-failed, only_success=False from Python)")
    if action and manifest["n_action"] == 0:
        raise ValueError(f"no action samples were built: every demo used is shorter than --chunk-size/-K "
                         f"{chunk_size} (failed demos are skipped unless --include-failed); lower -K")
    manifest["complete"] = True
    _atomic_json(mpath, manifest)
    return out


# ---------------------------------------------------------------------- reading
# What each shard entry of a manifest holds (`build_store` writes them; `_write_shard` returns the counts).
_SHARD_KEYS = {"name": str, "file": int, "demos": list, "files": dict, "n_samples": int, "n_tokens": int,
               "n_action": int, "n_world": int, "n_label_tokens": int}
# What the reader takes from a complete manifest, and of which JSON type.
_MANIFEST_KEYS = {"layout": dict, "shards": list, "action": dict, "image_size": list, "vqgan": str}
_ACTION_KEYS = ("low", "high", "chunk_size")


def _shard_entry_problem(entry) -> str | None:
    """What a manifest's shard entry lacks (or holds of another type), in words; None for a whole one."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    for key, kind in _SHARD_KEYS.items():
        if key not in entry:
            return f"has no {key!r}"
        if not isinstance(entry[key], kind) or (kind is int and isinstance(entry[key], bool)):
            want = "a number" if kind is int else kind.__name__
            return f"has a {key!r} of JSON type {type(entry[key]).__name__}, not {want}"
    return None


def _manifest_problem(m: dict) -> str | None:
    """What a complete manifest lacks that the reader takes from it, in words; None when it holds all of it."""
    for key, kind in _MANIFEST_KEYS.items():
        if key not in m:
            return f"has no {key!r}"
        if not isinstance(m[key], kind):
            return f"has a {key!r} of JSON type {type(m[key]).__name__}, not {kind.__name__}"
    missing = [k for k in _ACTION_KEYS if k not in m["action"]]
    if missing:
        return f"has no {missing[0]!r} in its 'action'"
    try:
        VocabLayout.from_dict(m["layout"])
    except (TypeError, KeyError, ValueError) as e:
        return f"has a 'layout' that is not a vocabulary layout ({type(e).__name__}: {e})"
    for i, entry in enumerate(m["shards"]):
        problem = _shard_entry_problem(entry)
        if problem is not None:
            name = f" ({entry['name']})" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else ""
            return f"has a shard entry {i}{name} that {problem}"
    return None


class TokenStore(torch.utils.data.Dataset):
    """Read side of the store: `store[i] -> (ids int64 [L], labels int64 [L], kind)`.

    kinds: keep only these sample kinds (e.g. ("action",) for the action-only ablation).
    verify: check every shard's sha256, and the VQGAN folder's weights, on open.
    Arrays are memory-mapped lazily, so the object is cheap to pickle into data-loader workers.
    """

    def __init__(self, path, kinds=None, verify: bool = False):
        self.path = Path(path).expanduser()  # `--store=~/x` reaches us unexpanded
        mpath = self.path / MANIFEST
        if self.path.name == MANIFEST and self.path.is_file():
            raise NotADirectoryError(f"{self.path} is a token store's manifest, not its folder: pass the folder that "
                                     f"holds it, {self.path.parent}")
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.path} is not a token store (no {MANIFEST}); build one with "
                                    f"`worldvla pretokenize`")
        try:
            self.manifest = read_json_file(mpath, "token store manifest")
        except ValueError as e:
            raise ValueError(f"{e}: rebuild the store by rerunning `worldvla pretokenize` with the same arguments and "
                             f"--overwrite") from None
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath} is not a {FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise ValueError(f"the token store at {self.path} is incomplete (its build did not finish: it was "
                             f"interrupted, or it stopped on an error that it printed); rerun `worldvla pretokenize` "
                             f"with the same arguments to finish it, after fixing that error if there was one")
        problem = _manifest_problem(self.manifest)
        if problem is not None:
            raise ValueError(f"{mpath}: the token store manifest {problem} (edited by hand, or written otherwise "
                             f"than `worldvla pretokenize` writes it); rebuild the store by rerunning `worldvla "
                             f"pretokenize` with the same arguments and --overwrite")
        kinds = tuple(KINDS if kinds is None else ((kinds,) if isinstance(kinds, str) else kinds))
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        self.kinds = kinds
        self.shards = self.manifest["shards"]
        # The ids' bound for `_check_ids`, read once (`layout` builds a VocabLayout at every call).
        self._vocab_size = int(self.manifest["layout"]["vocab_size"])
        if verify:
            self.checked_vqgan_path()
            self.text_tokenizer_path  # refuses a text_tokenizer.json the store's text was not tokenized with
            broken = [e["name"] for e in self.shards if not verify_shard(self.path, e)]
            if broken:
                raise ValueError(f"checksum mismatch in shards {broken} of {self.path}; rebuild them by rerunning "
                                 f"`worldvla pretokenize` with the same arguments")
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        shard_ids, local, lengths, kind_codes = [], [], [], []
        keep = np.array([k in kinds for k in KINDS])
        for si, e in enumerate(self.shards):
            if e["n_samples"] == 0:
                continue
            a = self._shard(si)
            sel = np.nonzero(keep[a["kinds"]])[0]
            shard_ids.append(np.full(len(sel), si, dtype=np.int32))
            local.append(sel.astype(np.int64))
            lengths.append(np.diff(a["offsets"])[sel])
            kind_codes.append(a["kinds"][sel])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        self._shard_of = cat(shard_ids, np.int32)
        self._local = cat(local, np.int64)
        self.lengths = cat(lengths, np.int64)
        self.kind_codes = cat(kind_codes, np.uint8)
        self._arrays.clear()

    def checked_vqgan_path(self) -> Path:
        """`vqgan_path`, once its folder is checked to hold the VQGAN that encoded the tokens (a policy
        exported with another would encode its frames into other codes): one pass over its weights file,
        so it runs where the VQGAN is needed (the trainer's export) and with `verify`, not on every open."""
        want = self.manifest.get("vqgan_sha256")
        if want is None:  # a manifest without the digest: nothing to check against
            return self.vqgan_path
        try:
            got = _vqgan_folder_digest(self.vqgan_path)
        except ValueError as e:
            raise ValueError(f"{e}: the token store at {self.path} holds a damaged copy of its VQGAN; rerun `worldvla "
                             f"pretokenize` with the same arguments and VQGAN to restore it") from None
        if got is None:
            raise FileNotFoundError(f"the token store at {self.path} lacks its VQGAN ({self.vqgan_path} needs "
                                    f"{' and '.join(VQGAN_FILES)}); rerun `worldvla pretokenize` with the same "
                                    f"arguments and VQGAN to restore it")
        if got != want:
            raise ValueError(f"{self.vqgan_path} holds another VQGAN than the one that encoded the token store at "
                             f"{self.path} (its weights do not match the manifest's vqgan_sha256); rerun "
                             f"`worldvla pretokenize` with the same arguments and VQGAN to restore it")
        return self.vqgan_path

    def _shard(self, si: int) -> dict:
        a = self._arrays.get(si)
        if a is None:
            folder = self.path / self.shards[si]["name"]
            a = {n: _load_array(folder / f"{n}.npy") for n in _ARRAYS}
            n = self.shards[si]["n_samples"]
            sizes = (len(a["offsets"]) - 1, len(a["kinds"]), len(a["index"]), n)
            if len(set(sizes)) > 1 or not (int(a["offsets"][-1]) == len(a["tokens"]) == len(a["labels"])):
                raise ValueError(f"the arrays of {folder} do not fit together or its manifest entry ({n} samples): "
                                 f"the shard is damaged; rerun `worldvla pretokenize` with the same arguments to "
                                 f"rebuild it")
            self._arrays[si] = a
        return a

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_arrays"] = {}
        return d

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        i = i % n
        si = int(self._shard_of[i])
        a = self._shard(si)
        k = int(self._local[i])
        s, e = int(a["offsets"][k]), int(a["offsets"][k + 1])
        ids = np.asarray(a["tokens"][s:e], dtype=np.int64)
        labels = np.asarray(a["labels"][s:e], dtype=np.int64)
        self._check_ids(si, k, s, ids, labels)
        return torch.from_numpy(ids), torch.from_numpy(labels), KINDS[int(a["kinds"][k])]

    def _check_ids(self, si: int, k: int, start: int, ids: np.ndarray, labels: np.ndarray) -> None:
        """Refuse a sample whose token ids (or labels, which may also be IGNORE) lie outside the vocabulary,
        naming the shard file, the value and its position: a damaged shard's ids otherwise reach the trainer's
        range check (or the embedding's index error) as a bare range, with no file to rebuild. The fix removes
        the shard's folder: a shard written with such ids matches its checksums, and `pretokenize` with the
        same arguments rebuilds only the shards that are missing or fail them."""
        v = self._vocab_size
        for name, arr in (("tokens", ids), ("labels", labels)):
            bad = (arr < 0) | (arr >= v)
            if name == "labels":
                bad &= arr != IGNORE
            if bad.any():
                p = int(np.argmax(bad))  # the first one
                folder = self.path / self.shards[si]["name"]
                also = f" (or {IGNORE}, no loss)" if name == "labels" else ""
                raise ValueError(
                    f"{folder / f'{name}.npy'}: value {int(arr[p])} at position {start + p} (sample {k} of the shard, "
                    f"its token {p}) is outside the vocabulary's ids [0, {v}){also}: the shard is damaged; rebuild "
                    f"it: remove {folder} and rerun `worldvla pretokenize` with the same arguments")

    # -------------------------------------------------------------- metadata
    @property
    def layout(self) -> VocabLayout:
        return VocabLayout.from_dict(self.manifest["layout"])

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["action"]["chunk_size"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.manifest["image_size"])

    @property
    def vqgan_path(self) -> Path:
        return self.path / self.manifest["vqgan"]

    @property
    def text_tokenizer_path(self) -> Path | None:
        """The release's text_tokenizer.json, copied in when the store uses the chameleon vocabulary, once its
        sha256 is checked against the manifest's text_tokenizer_sha256 (a build killed while it replaced the
        file may leave another beside the manifest). None for a byte-text layout even if a stale copy lies in
        the folder (a store built before such copies were removed): the exported policy must encode text as
        training did."""
        p = self.path / TEXT_TOKENIZER
        if not (_uses_text_tokenizer_json(self.layout) and p.is_file()):
            return None
        want = self.manifest.get("text_tokenizer_sha256")
        if want is not None and sha256_file(p, HASH_BLOCK) != want:
            raise ValueError(f"{p} is not the text tokenizer the token store at {self.path} was tokenized with (its "
                             f"sha256 does not match the manifest's text_tokenizer_sha256; a build may have been "
                             f"killed while it replaced the file): the store must be rebuilt: rerun `worldvla "
                             f"pretokenize` with the text_tokenizer.json you mean and --overwrite")
        return p

    def action_tokenizer(self) -> ActionTokenizer:
        a = self.manifest["action"]
        return ActionTokenizer(self.layout, a["low"], a["high"])

    def kind_counts(self) -> dict:
        return {k: int((self.kind_codes == i).sum()) for i, k in enumerate(KINDS) if k in self.kinds}


def _load_array(path: Path) -> np.ndarray:
    """One array of a shard, memory-mapped; a damaged file (cut short, overwritten) is refused naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the token store is damaged; rerun `worldvla pretokenize` with "
                                f"the same arguments to rebuild its shard") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read this token-store array ({e}); the file is damaged or cut short: rerun "
                         f"`worldvla pretokenize` with the same arguments to rebuild its shard") from None


def pack(samples, max_tokens: int, pad_id: int | None = None):
    """Concatenate samples into one packed sequence for `model.loss(ids, labels, cu_seqlens=cu)`.

    samples: (ids, labels[, kind]) tuples. Returns (input_ids [T] int64, labels [T] int64,
    cu_seqlens int32 [n_docs + 1]). With `pad_id` the sequence is padded to exactly `max_tokens`
    with one extra document of `pad_id` tokens carrying no labels (fixed shapes for compiled code).
    """
    samples = list(samples)  # a generator would be used up by the ids, leaving the labels short
    if not samples:
        raise ValueError("pack needs at least one sample")
    ids = [torch.as_tensor(s[0], dtype=torch.long).flatten() for s in samples]
    labels = [torch.as_tensor(s[1], dtype=torch.long).flatten() for s in samples]
    lens = [x.numel() for x in ids]
    for i, (x, y) in enumerate(zip(ids, labels)):
        if x.numel() != y.numel() or x.numel() == 0:
            raise ValueError(f"sample {i}: ids ({x.numel()}) and labels ({y.numel()}) must have the same, "
                             f"non-zero length")
    total = sum(lens)
    if total > max_tokens:
        raise ValueError(f"{len(samples)} samples hold {total} tokens, more than max_tokens={max_tokens}; "
                         f"raise the token budget or pack fewer samples (longest sample: {max(lens)})")
    if pad_id is not None and total < max_tokens:
        ids.append(torch.full((max_tokens - total,), pad_id, dtype=torch.long))
        labels.append(torch.full((max_tokens - total,), IGNORE, dtype=torch.long))
        lens.append(max_tokens - total)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return torch.cat(ids), torch.cat(labels), cu


# ---------------------------------------------------------------------- command line
# Shared with `worldvla train-vq` and `imagine --demos`, whose frames must be read as pretokenize reads them.
ROTATE_180 = {"auto": None, "yes": True, "no": False}  # --rotate-180 -> iter_demos' rotate_180
CAMERA_HELP = ("camera name: frames from obs/<camera>_rgb (or _image; default: agentview or the first), settled at "
               "each file's first demo (a demo without it is refused). Files without an `upright` attribute that "
               "hold obs/agentview_rgb or eye_in_hand_rgb are read as LIBERO's and their frames rotated by 180 "
               "degrees, with a line saying so (--rotate-180 no keeps them as stored)")
ROTATE_HELP = ("rotate frames by 180 degrees (auto: LIBERO's files, raw or regenerated, which store their cameras "
               "upside down, as the release does, and mirror left-right those whose macros_image_convention is "
               "opencv (rows flipped by robosuite already), with a line naming them; not robomimic's or this "
               "package's; default: %(default)s)")


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="HDF5 demo files or folders holding them")
    p.add_argument("--out", required=True, help="output folder of the token store")
    p.add_argument("--vqgan", required=True, help="VQGAN folder (VQGAN.save_pretrained / worldvla train-vq)")
    p.add_argument("--layout", choices=("compact", "chameleon"), default="compact",
                   help="vocabulary: compact (sized to the VQGAN, byte text) or the release's chameleon ids "
                        "(default: %(default)s)")
    p.add_argument("--tokenizer-json", default=None, help="the release's text_tokenizer.json (chameleon layout)")
    p.add_argument("--chunk-size", "-K", type=positive_int, default=5,
                   help="actions per action-model sample (K; default: %(default)s)")
    p.add_argument("--history", type=int, default=2, choices=(1, 2),
                   help="history frames per action sample (default: %(default)s)")
    p.add_argument("--no-world", action="store_true", help="action samples only (the action-only ablation)")
    p.add_argument("--no-action", action="store_true", help="world-model samples only")
    p.add_argument("--action-bounds", default="auto", choices=("auto", "libero", "unit", "data"),
                   help="min/max used to normalize actions before binning: libero (the release's 7-D bounds), unit "
                        "([-1, 1]), data (the min/max over the demos tokenized: failed ones only with "
                        "--include-failed, no-op steps not under --drop-noops) or auto: libero for 7-D actions of "
                        "LIBERO's files (problem_info, or obs/agentview_rgb / eye_in_hand_rgb without an `upright` "
                        "attribute; a line says so when they clip over 1%% of a dimension's values), unit when "
                        "every action of those lies in [-1, 1] and every dimension reaches |a| >= 0.5, data "
                        "otherwise (with a line when a dimension of small values decided it; default: %(default)s)")
    p.add_argument("--demos-per-shard", type=non_negative_int, default=0,
                   help="demos per shard (default: 0, one shard per file)")
    p.add_argument("--include-failed", action="store_true", help="also tokenize demos not marked successful")
    p.add_argument("--camera", default=None, help=CAMERA_HELP)
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="the instruction every demo of every input file is prompted with, over the files' own "
                        "(robomimic's files hold none: their env name is guessed; LIBERO's regenerated files take "
                        "their file name; a line names each file so read)")
    p.add_argument("--rotate-180", default="auto", choices=tuple(ROTATE_180), help=ROTATE_HELP)
    p.add_argument("--drop-noops", action="store_true",
                   help="drop the steps whose arm action is ~0 and gripper unchanged, as the release's regeneration "
                        "of LIBERO's demos does (for LIBERO's raw files, which keep them); a world sample's target "
                        "stays the frame its action led to, the file's next one")
    p.add_argument("--encode-batch", type=positive_int, default=32, help="frames per VQGAN call (default: %(default)s)")
    p.add_argument("--device", default=None, help="device for the VQGAN: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    out = build_store(args.inputs, args.out, args.vqgan, layout=args.layout, tokenizer_json=args.tokenizer_json,
                      chunk_size=args.chunk_size, history=args.history, action=not args.no_action,
                      world=not args.no_world, bounds=args.action_bounds, demos_per_shard=args.demos_per_shard,
                      only_success=not args.include_failed, camera=args.camera, instruction=args.instruction,
                      rotate_180=ROTATE_180[args.rotate_180],
                      drop_noops=args.drop_noops, encode_batch=args.encode_batch,
                      device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    m = json.loads((out / MANIFEST).read_text())
    print(f"token store {out}: {m['n_samples']} samples ({m['n_action']} action, {m['n_world']} world), "
          f"{m['n_tokens']} tokens in {len(m['shards'])} shards")
    print(f"next: worldvla train --store {shlex.quote(str(out))} --out <run>   (or under torchrun: torchrun ... -m worldvla.cli train)")
    return 0


__all__ = ["build_store", "TokenStore", "pack", "find_demo_files", "action_bounds", "demo_samples",
           "StoreSettings", "verify_shard", "add_arguments", "run"]
