"""`worldvla imagine`: roll a policy's world model out from one frame under a sequence of actions, and
look at what it imagines.

From a demonstration (an HDF5 file's episode, its frame at --start and the actions recorded from there)
the imagined frames stand beside the recorded ones, with PSNR and SSIM at every step against the
recorded frame, beside those of keeping the first frame (a model that has learned nothing about motion
does no better) and of the VQGAN's reconstruction of the recorded frame (the best a world model over
those codes can do). From an image and an actions file, the imagined frames stand alone. --samples
draws several futures at once (with --temperature > 0; the draws come from --seed).

Written into --out: rollout.png (rows of frames: recorded, then each imagined future), rollout.gif
(recorded | imagined), scores.png (PSNR / SSIM over the steps, with a demonstration), rollout.json
(the input, the settings, the scores, the time a frame) and rollout.npz (codes and frames). They replace
an earlier run's together, at the end: a run stopped before leaves the earlier ones as they were.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from ..cli import finite_float, non_negative_float, non_negative_int, positive_int
from ..devices import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..data.store import ROTATE_180

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("policy", help="policy folder (what `worldvla train` or worldvla.inference.save_policy writes)")
    src = p.add_argument_group("input: a demonstration, or an image and actions")
    src.add_argument("--demos", metavar="HDF5", help="demonstrations: worldvla collect's, LIBERO's or robomimic's HDF5")
    src.add_argument("--demo", type=non_negative_int, default=0,
                     help="the episode's index in --demos (default 0; --demos only)")
    src.add_argument("--start", type=non_negative_int, default=0,
                     help="the episode's frame to start from (default 0; --demos only); its recorded actions "
                          "follow")
    src.add_argument("--camera", help="the camera of --demos (default: agentview, else the first; --demos only)")
    src.add_argument("--rotate-180", default="auto", choices=tuple(ROTATE_180),
                     help="rotate --demos' frames by 180 degrees, as pretokenize does (auto: LIBERO's files, which "
                          "store their cameras upside down, with a line saying so; default: %(default)s; --demos only)")
    src.add_argument("--image", help="a frame to start from (PNG, JPEG: anything Pillow reads)")
    src.add_argument("--actions", help="with --image: continuous actions [T, D] as .npy, or text (.csv with "
                                       "commas, else whitespace), one action a line")
    p.add_argument("--steps", type=positive_int, default=8,
                   help="frames to imagine (default 8; at most the actions there are)")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="futures drawn together (default 1; more than one needs --temperature > 0)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 (default): greedy codes; above: a draw from softmax(logits / T)")
    p.add_argument("--top-k", type=positive_int,
                   help="draw among the k most likely codes only (default: unset, every code; needs --temperature > 0)")
    p.add_argument("--cfg-scale", type=finite_float, help="classifier-free guidance on the action (1 or unset: none)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the draws' seed (default 0)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=list(DTYPES), help="the model's dtype (default: as saved)")
    p.add_argument("--out", default="imagine", help="folder for the outputs (default ./imagine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_actions(path, action_dim: int) -> np.ndarray:
    """Actions [T, action_dim] float64 from .npy or a text file (commas for .csv, else whitespace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no actions file at {path}")
    suffix = path.suffix.lower()  # ACTIONS.CSV is a .csv file too
    if suffix == ".npy":
        try:
            acts = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:  # object arrays, or not a .npy file at all
            raise ValueError(f"{path}: not a numeric .npy array (np.save of a float array [T, {action_dim}]): "
                             f"{e}") from None
        # np.load also opens .npz archives (several arrays), whatever the file's name
        if not isinstance(acts, np.ndarray):
            acts.close()
            raise ValueError(f"{path}: an .npz archive of several arrays, not one .npy array; np.save the actions "
                             f"[T, {action_dim}] alone")
        # complex actions would lose their imaginary parts in the conversion to float64, strings be parsed
        if acts.dtype.kind not in "biuf":
            raise ValueError(f"{path}: not a numeric .npy array (dtype {acts.dtype}); np.save a float array "
                             f"[T, {action_dim}]")
    else:
        try:
            # utf-8-sig: spreadsheets save CSV files with a byte-order mark, which would be read into the first number
            acts = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2, encoding="utf-8-sig")
        except ValueError as e:
            raise ValueError(f"{path}: not a table of numbers ({e}); a .csv file's values are separated by commas, "
                             f"any other text file's by spaces or tabs") from None
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim == 1 and acts.size == action_dim:
        acts = acts[None]
    if acts.ndim != 2 or acts.shape[1] != action_dim or len(acts) == 0:
        raise ValueError(f"{path}: actions must be [T, {action_dim}] for this policy (one action of "
                         f"{action_dim} values a line), got shape {acts.shape}")
    if not np.isfinite(acts).all():
        raise ValueError(f"{path}: actions hold NaN or infinite values")
    return acts


def load_image(path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from ..vqgan import whiten_transparency

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        with Image.open(path) as img:  # transparency onto white, as the release's tokenizer takes images
            return np.asarray(whiten_transparency(img).convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image Pillow can read") from None
    except ValueError as e:  # a 16-bit or float image, which 8-bit RGB cannot hold
        raise ValueError(f"{path}: {e}") from None
    except OSError as e:  # Pillow reads the pixels of a file cut short up to where it ends
        raise ValueError(f"{path}: the image cannot be read ({e}); it is damaged or was cut short: save or copy it "
                         f"again") from None


def demo_segment(path, index: int, start: int, steps: int, camera=None, rotate_180: bool | None = None):
    """(first frame, actions [S, D], recorded next frames [S, ...], instruction) of episode `index` of
    `path` from frame `start`, S = min(steps, the frames recorded after it). Frames are turned as
    pretokenize turns them (`rotate_180`: None = LIBERO's files, said in one line)."""
    from ..data.hdf5 import check_actions, demo_file_info, iter_demos, rotation_note

    note = rotation_note([path], rotate_180)
    if note:
        print(note)
    names = demo_file_info(path)["names"]
    if not names:
        raise ValueError(f"{path} holds no episodes")
    if not 0 <= index < len(names):
        raise ValueError(f"{path} holds {len(names)} episode(s); --demo {index} is not one of them "
                         f"(0..{len(names) - 1})")
    # Only that episode's frames are read (the others' cameras are still checked, as a read of every one checks them).
    reader = iter_demos(path, camera=camera, rotate_180=rotate_180, names={names[index]})
    try:
        demo = next(reader)
    finally:
        reader.close()
    T = len(demo.frames)
    if T < 2:
        raise ValueError(f"episode {index} of {path} has {T} frame(s): nothing recorded to imagine against")
    if T - 1 - start < 1:  # no recorded frame after `start`
        raise ValueError(f"episode {index} of {path} has {T} frames; --start {start} leaves no recorded frame "
                         f"after it (use --start {T - 2} or less)")
    after = T - 1 - start
    S = min(steps, after, len(demo.actions) - start)
    actions = demo.actions[start:start + S]
    # a NaN reached the action tokenizer, whose error names no file or episode
    check_actions(actions, f"{path}: episode {index}, steps {start}..{start + S - 1}")
    return demo.frames[start], actions, demo.frames[start + 1:start + 1 + S], demo.instruction


def _scores(imagined: np.ndarray, real: np.ndarray, first: np.ndarray, recon: np.ndarray) -> dict:
    """imagined [M, S, H, W, 3], real and recon [S, H, W, 3], first [H, W, 3] -> per-step PSNR / SSIM
    lists of the imagined frames (mean over the M futures, and each), of the first frame kept and of the
    VQGAN's reconstruction, each against the recorded frames."""
    from .metaworld import PSNR_CAP_DB, _scores as psnr_ssim

    def scores(frames):  # per step, PSNR capped as the demo's means cap it
        p, q = psnr_ssim(frames, real)
        return [min(float(x), PSNR_CAP_DB) for x in p], [float(x) for x in q]

    per_sample = [scores(f) for f in imagined]
    per_sample_psnr, per_sample_ssim = [p for p, _ in per_sample], [q for _, q in per_sample]
    (first_psnr, first_ssim), (recon_psnr, recon_ssim) = scores(np.broadcast_to(first, real.shape)), scores(recon)
    return {"psnr_per_step": np.mean(per_sample_psnr, axis=0).tolist(),
            "ssim_per_step": np.mean(per_sample_ssim, axis=0).tolist(),
            "copy_first_psnr_per_step": first_psnr, "copy_first_ssim_per_step": first_ssim,
            "vqgan_recon_psnr_per_step": recon_psnr, "vqgan_recon_ssim_per_step": recon_ssim,
            "psnr_per_sample": per_sample_psnr, "ssim_per_sample": per_sample_ssim,
            "psnr_cap_db": PSNR_CAP_DB}


def imagine(policy, first: np.ndarray, actions: np.ndarray, *, samples: int = 1, temperature: float = 0.0,
            top_k=None, cfg_scale=None, seed: int = 0, progress: bool = False):
    """`samples` futures of the policy's world model from `first` (uint8 [H, W, 3]) under `actions`
    [S, D], drawn from `seed`: (FrameRollout with a leading batch of `samples`, seconds a frame)."""
    import torch

    device = next(policy.model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    out = policy.imagine(np.repeat(first[None], samples, axis=0),
                         np.repeat(np.asarray(actions, dtype=np.float64)[None], samples, axis=0),
                         temperature=temperature, top_k=top_k, cfg_scale=cfg_scale, generator=gen, progress=progress)
    return out, (time.perf_counter() - t0) / len(actions)


# What a run writes into --out, rollout.json last: it says that the files beside it are one run's complete set.
OUTPUTS = ("rollout.png", "rollout.gif", "scores.png", "rollout.npz", "rollout.json")
STAGE = "rollout"  # the outputs are written into `.rollout.tmp-<pid>-<hex>` in --out first (`_publish`)


def _publish(stage: Path, folder: Path) -> None:
    """Move the outputs written into `stage` into `folder` in place of an earlier run's. Every earlier output
    goes first (rollout.json first of all), then the new ones come in (rollout.json last), so that the folder
    never holds files of two runs: a stop between the renames leaves part of one run's set without its
    rollout.json."""
    from ..checkpoint import fsync_path, fsync_tree

    fsync_tree(stage)  # on the disk before their names are
    for name in reversed(OUTPUTS):
        (folder / name).unlink(missing_ok=True)
    for name in OUTPUTS:
        if (stage / name).exists():
            os.replace(stage / name, folder / name)
    fsync_path(folder)


def _write_npz(path: Path, **arrays) -> None:
    from ..checkpoint import write_atomic

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import new_sibling, remove_stale, write_text_atomic
    from ..data.store import ROTATE_180
    from ..inference.policy import WorldVLAPolicy
    from . import plots

    if (args.demos is None) == (args.image is None):
        raise ValueError("give one input: --demos FILE (a recorded episode) or --image FILE with --actions FILE")
    if args.image is not None and args.actions is None:
        raise ValueError("--image needs --actions FILE: the actions to imagine the frames under")
    if args.demos is not None and args.actions is not None:
        raise ValueError("--actions goes with --image; with --demos the episode's recorded actions are used")
    if args.image is not None:
        # The options that pick and turn a demonstration's frame would be ignored: refused when given (not at
        # their defaults), as --actions with --demos is.
        defaults = add_arguments(argparse.ArgumentParser())
        demo_only = [f"--{name.replace('_', '-')}" for name in ("demo", "start", "camera", "rotate_180")
                     if getattr(args, name, defaults.get_default(name)) != defaults.get_default(name)]
        if demo_only:
            raise ValueError(f"{', '.join(demo_only)} {'goes' if len(demo_only) == 1 else 'go'} with --demos (they "
                             f"pick and turn a recorded episode's frame); with --image they have no effect: drop "
                             f"{'it' if len(demo_only) == 1 else 'them'}")
    if args.samples > 1 and args.temperature <= 0.0:
        raise ValueError(f"--samples {args.samples} with greedy codes would draw the same future {args.samples} "
                         f"times; set --temperature above 0 (e.g. 1.0)")
    if args.top_k is not None and args.temperature <= 0.0:
        raise ValueError("--top-k applies to draws; set --temperature above 0")
    if not math.isfinite(args.temperature):
        raise ValueError(f"--temperature must be finite, got {args.temperature}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    # The frame is read before the policy is loaded (minutes for a large model): a damaged image or a missing
    # episode is refused at once. The actions file needs the policy's action size.
    real = None
    if args.demos is not None:
        first, actions, real, _ = demo_segment(args.demos, args.demo, args.start, args.steps, args.camera,
                                               ROTATE_180[getattr(args, "rotate_180", "auto")])
        source = {"demos": str(args.demos), "demo": args.demo, "start": args.start, "camera": args.camera,
                  "rotate_180": getattr(args, "rotate_180", "auto")}
    else:
        first = load_image(args.image)
        source = {"image": str(args.image), "actions": str(args.actions)}
    policy = WorldVLAPolicy.from_pretrained(args.policy, device=args.device, dtype=args.dtype)
    if args.image is not None:
        actions = load_actions(args.actions, policy.action_dim)[:args.steps]
    first = policy._frames(first)[0][0]  # resized as act resizes frames
    if actions.shape[1] != policy.action_dim:
        raise ValueError(f"the episode's actions have {actions.shape[1]} values, the policy's {policy.action_dim}")
    out, per_frame = imagine(policy, first, actions, samples=args.samples, temperature=args.temperature,
                             top_k=args.top_k, cfg_scale=args.cfg_scale, seed=args.seed,
                             progress=not args.no_progress)
    imagined = np.concatenate([np.repeat(first[None, None], args.samples, axis=0), out.frames], axis=1)

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    result = {"policy": str(args.policy), "source": source, "steps": int(len(actions)), "samples": args.samples,
              "temperature": args.temperature, "top_k": args.top_k, "cfg_scale": args.cfg_scale, "seed": args.seed,
              "image_size": policy.image_size, "seconds_per_frame": per_frame,
              "device": str(next(policy.model.parameters()).device), "actions": np.asarray(actions).tolist()}
    rows = list(imagined)
    labels = ["imagined"] if args.samples == 1 else [f"sample {m + 1}" for m in range(args.samples)]
    arrays = {"codes": out.codes.numpy(), "imagined": out.frames, "first": first}
    # Written into a hidden folder beside the outputs, then moved into place together (`_publish`): a run
    # stopped while it writes (Ctrl-C, an error) leaves the earlier run's outputs as they were, not some of
    # them replaced. A run without a demonstration writes no scores.png, and an earlier run's goes.
    remove_stale(folder, re.escape(STAGE), ("tmp",))  # the staging folders of killed runs
    stage = new_sibling(folder / STAGE, "tmp")
    try:
        if real is not None:
            real = policy._frames(real)[0]
            recon = policy.vqgan.decode_images(policy.vqgan.encode_images(real))  # every code right: the ceiling
            result["scores"] = sc = _scores(out.frames, real, first, recon)
            rows = [np.concatenate([first[None], real])] + rows
            labels = ["recorded"] + labels
            arrays["recorded"] = real
            curves = {"imagined": ("psnr_per_step", "ssim_per_step"),
                      "first frame kept": ("copy_first_psnr_per_step", "copy_first_ssim_per_step"),
                      "VQGAN reconstruction": ("vqgan_recon_psnr_per_step", "vqgan_recon_ssim_per_step")}
            plots.horizon_curves({name: {"psnr": sc[p], "ssim": sc[q]} for name, (p, q) in curves.items()},
                                 stage / "scores.png", title="imagined frames against the recorded ones")
        plots.frame_grid(rows, stage / "rollout.png", labels=labels)
        gif = imagined[0] if real is None else plots.side_by_side(rows[0], imagined[0])
        plots.save_gif(gif, stage / "rollout.gif", fps=4)
        _write_npz(stage / "rollout.npz", **arrays)
        write_text_atomic(stage / "rollout.json", json.dumps(result, indent=1))
        _publish(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    print(f"imagined {len(actions)} frame(s) x {args.samples} at {per_frame:.3f} s a frame "
          f"({result['device']}); written to {folder}/")
    if real is not None:
        print("PSNR dB / SSIM against the recorded frames (reconstruction: the VQGAN's, every code right)")
        print("step  imagined        first kept      reconstruction")
        for k in range(len(actions)):
            print(f"{k + 1:>4}  {sc['psnr_per_step'][k]:>6.2f} / {sc['ssim_per_step'][k]:.3f}  "
                  f"{sc['copy_first_psnr_per_step'][k]:>6.2f} / {sc['copy_first_ssim_per_step'][k]:.3f}  "
                  f"{sc['vqgan_recon_psnr_per_step'][k]:>6.2f} / {sc['vqgan_recon_ssim_per_step'][k]:.3f}")
    return 0
