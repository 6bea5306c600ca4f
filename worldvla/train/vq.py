"""VQGAN trainer: the image tokenizer on demonstration frames.

    worldvla train-vq demos/ --out runs/vq --config small --steps 3000 --batch-size 32
    torchrun --nproc_per_node 4 -m worldvla.train.vq demos/ --out runs/vq --batch-size 64

Loss = l1 * |x - x_hat| + l2 * (x - x_hat)^2 + ||sg[z] - e||^2 + beta * ||z - sg[e]||^2
(no perceptual or adversarial term). Small codebooks tend to collapse onto a few entries, so
codes whose running usage falls below `--restart-threshold` are re-seeded every
`--restart-every` steps with encoder outputs drawn from the current batch, a different one for
each code while the batch has enough (their Adam moments are reset). Checkpoints, exact resume,
progress bar and the JSONL log work as in the WorldVLA trainer; the result is exported to
`<out>/vqgan` (VQGAN.save_pretrained), the folder that `worldvla pretokenize --vqgan` takes.

Under torchrun the run is data-parallel (DDP): each rank encodes its contiguous slice of the
global batch, gradients are averaged, code-usage counts are summed over ranks, and dead codes
are re-seeded from the gathered latents of the whole batch with a generator every rank holds,
so the replicas stay identical and the run follows the single-process one.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import replace_folder
from ..cli import STOPPED_RC, non_negative_float, non_negative_int, positive_int, unit_float, unit_open_float
from ..tokens.layout import VocabLayout
from . import distributed as dist_utils
from .checkpointing import (SEED_LIMIT, CurvePlot, StopSignal, add_run_arguments, check_finite, check_run_dir,
                            load_checkpoint, prepare_run_dir, read_state, resumable_checkpoint, resume_point,
                            save_checkpoint, scalar_args, seed_int, stop_after_message, stopped_message, trim_log)
from ..checks import is_count

# What a resumed run must share with its start: the model, the learning-rate schedule (computed from these
# settings at every step), the optimizer's hyperparameters (restored from the checkpoint), the loss, its
# gradient clipping and the dead-code restarts (the run would otherwise continue under another objective than
# it started with) and the frames and their order (a position in it is restored). The demo files themselves
# are checked by their names and sizes (`resume_point`'s data).
RESUME_SETTINGS = ("config", "n_embed", "steps", "epochs", "batch_size", "lr", "min_lr", "warmup",
                   "beta1", "beta2", "weight_decay", "grad_clip", "l1", "l2", "beta", "restart_every",
                   "restart_threshold", "usage_decay", "seed", "frame_stride", "max_frames", "camera", "rotate_180")
# The command's name in its checkpoints ("kind": a resume of another command's run is refused by name), and the keys
# of their state.json that a resume reads.
KIND = "train-vq"
# What a finished run exports into its --out: a folder holding it is an earlier run's (`check_run_dir`).
EXPORTS = ("vqgan",)
STATE_KEYS = ("epoch", "batch_in_epoch", "usage", "restart_rng")
# What a loss that is not finite most likely comes from (`check_finite`).
DIVERGENCE_CAUSES = ("a learning rate too high (--lr; a longer --warmup or a lower --grad-clip may help), or "
                     "frames of the demo files that are damaged")


def _effective_settings(settings: dict) -> dict:
    """`settings` (a run's arguments) as they act on the run: --epochs as None under --steps (which decides the
    run's length then)."""
    s = dict(settings)
    if s.get("steps"):
        s["epochs"] = None
    return s


def load_frames(inputs, stride: int = 1, max_frames: int = 0, camera=None, rotate_180: bool | None = None,
                announce: bool = False) -> np.ndarray:
    """Every `stride`-th frame of every demo in the HDF5 inputs -> uint8 [N, H, W, 3].
    rotate_180: as `iter_demos` (None: LIBERO's files rotated upright); `announce`: print the line that names
    the files rotated on their own (`hdf5.rotation_note`)."""
    from ..data.hdf5 import iter_demos, rotation_note
    from ..data.store import find_demo_files

    if not is_count(stride, 1):
        raise ValueError(f"frame stride must be an integer >= 1, got {stride!r}")
    if not is_count(max_frames):  # a negative bound cut that many frames off the first demo read
        raise ValueError(f"max_frames must be an integer >= 0 (0: every frame), got {max_frames!r}")
    files = find_demo_files(inputs)
    note = rotation_note(files, rotate_180) if announce else None
    if note:
        print(note)
    chunks, n, shape = [], 0, None
    for path in files:
        for demo in iter_demos(path, camera=camera, rotate_180=rotate_180):
            f = demo.frames[::stride]
            if shape is None:
                shape = f.shape[1:]
            elif f.shape[1:] != shape:
                raise ValueError(f"{path}:{demo.name} has frames of shape {f.shape[1:]}, earlier demos {shape}; "
                                 f"train the VQGAN on one image size")
            chunks.append(f)
            n += len(f)
            if max_frames and n >= max_frames:
                break
        if max_frames and n >= max_frames:
            break
    if not chunks:
        raise ValueError(f"no frames in {', '.join(map(str, files))}: their 'data' groups hold no demo; collect "
                         f"demonstrations into them first (worldvla collect) or give files that hold some")
    frames = np.concatenate(chunks)
    return frames[:max_frames] if max_frames else frames


class CodeUsage:
    """Exponential moving average of how often each code is picked (fraction of a batch's picks)."""

    def __init__(self, n_codes: int, decay: float = 0.99):
        self.ema = torch.full((n_codes,), 1.0 / n_codes, dtype=torch.float64)
        self.decay = decay

    def update(self, codes: torch.Tensor) -> torch.Tensor:
        """Fold in this step's picks (summed over ranks); returns the step's usage fractions."""
        counts = torch.bincount(codes.flatten(), minlength=len(self.ema)).double()
        counts = dist_utils.all_reduce_sum(counts).cpu()
        frac = counts / counts.sum()
        self.ema.mul_(self.decay).add_(frac, alpha=1.0 - self.decay)
        return frac

    def dead(self, threshold: float) -> torch.Tensor:
        """Codes used less than `threshold` times the uniform rate."""
        return torch.nonzero(self.ema < threshold / len(self.ema)).flatten()


@torch.no_grad()
def restart_dead_codes(model, optimizer, usage: CodeUsage, latents: torch.Tensor, threshold: float,
                       generator: torch.Generator) -> int:
    """Re-seed dead codes with randomly chosen distinct encoder outputs of this batch; returns how many.

    Two codes seeded with the same vector stay duplicates: the nearest-code search picks only one of them,
    and the other stays dead (with its usage reset, for hundreds of steps). So each re-seeded code gets
    another *value*: outputs are drawn without replacement among the batch's distinct ones (frames of an
    idle robot or a flat background give bit-identical outputs), and where there are fewer of those than
    dead codes, the first dead codes are re-seeded and the others stay dead, usage untouched, for the next
    restart. `torch.unique` sorts its rows and the draw comes from `generator` alone (the run saves and
    restores its state), so every rank and a resumed run re-seed the same codes with the same vectors."""
    dead = usage.dead(threshold)
    if dead.numel() == 0:
        return 0
    flat = torch.unique(latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), dim=0)
    dead = dead[:flat.shape[0]]
    pick = torch.randperm(flat.shape[0], generator=generator)[:dead.numel()]
    weight = model.quantize.embedding.weight
    dev = dead.to(weight.device)
    weight[dev] = flat[pick.to(flat.device)].to(weight.dtype)
    state = optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dev] = 0
    usage.ema[dead] = 1.0 / len(usage.ema)
    return int(dead.numel())


def _epoch_order(n: int, batch: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[: (n // batch) * batch].reshape(-1, batch)


def _build(args, recorded: dict | None = None):
    """The VQGAN to train: under --resume, built from the config its checkpoint records (`recorded`; the
    checkpoint holds all its weights, so --init is not read: the folder may have moved); else from --init or
    --config / --n-embed."""
    from ..vqgan import VQGAN, VQGANConfig

    torch.manual_seed(args.seed)
    if recorded is not None:
        return VQGAN(VQGANConfig.from_dict(recorded)).train()
    if args.init:
        return VQGAN.from_pretrained(args.init).float().train()
    cfg = VQGANConfig.chameleon() if args.config == "chameleon" else VQGANConfig.small()
    if args.n_embed:
        cfg.n_embed = args.n_embed
    return VQGAN(cfg).train()


def _gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's slice of a batch in rank order (the whole batch in one process)."""
    if not dist_utils.is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist_utils.world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _resolve_min_lr(args, out: Path) -> None:
    """--min-lr's default, --lr / 10 (as `worldvla train`), set on `args` (which the checkpoints record). A
    resumed run keeps the floor its checkpoint records: a run started when the default was a fixed 2e-5 resumes
    on its own schedule. A --min-lr above --lr (a "decay" that raises the rate) is refused."""
    inherited = False
    if args.min_lr is None:
        saved = None
        ck = resumable_checkpoint(out, KIND, STATE_KEYS) if args.resume else None  # another command's run: refused
        if ck is not None:
            saved = read_state(ck).get("args", {}).get("min_lr")
        inherited = saved is not None
        args.min_lr = saved if inherited else args.lr * 0.1
    if args.min_lr > args.lr and not inherited:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine decay would raise the "
                         f"learning rate; pass a --min-lr of at most --lr (default: --lr / 10)")


def train_vq(args) -> dict:
    from tqdm.auto import tqdm

    from ..data.store import ROTATE_180, find_demo_files
    from ..vqgan import preprocess

    device = dist_utils.init(args.device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over {world} ranks")
    local = args.batch_size // world
    out = Path(args.out)
    # before anything is read
    check_run_dir(out, args.resume, getattr(args, "overwrite", False), kind=KIND, exports=EXPORTS)
    if args.init and (args.n_embed or args.config != "small"):  # refused before any frame is read
        raise ValueError("--init starts from that VQGAN's own architecture and codebook: drop --n-embed and "
                         "--config (or drop --init to build a new VQGAN)")
    _resolve_min_lr(args, out)
    # Everything the command line decides is checked before --overwrite deletes the earlier run.
    files = find_demo_files(args.inputs)
    # The run's data, recorded with its settings: a resume on other demo files is refused by name.
    data = {"demo_files": [f"{f.name} ({f.stat().st_size} bytes)" for f in files]}
    ck = resume_point(out, args, RESUME_SETTINGS, data,  # refused now, not after the frames are read
                      fix=lambda saved: "Resume with the demo files it was started on", normalize=_effective_settings,
                      kind=KIND, require=STATE_KEYS)
    frames = load_frames(files, args.frame_stride, args.max_frames, args.camera,
                         ROTATE_180[getattr(args, "rotate_180", "auto")], announce=main)
    if len(frames) < args.batch_size:
        raise ValueError(f"only {len(frames)} frames for a batch of {args.batch_size}; lower --batch-size")
    vq = _build(args, read_state(ck).get("config") if ck is not None else None).to(device)
    f = vq.downsample
    if frames.shape[1] % f or frames.shape[2] % f:
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, not a multiple of the VQGAN factor {f}")
    grid = VocabLayout.res_grid
    if frames.shape[1] % grid or frames.shape[2] % grid:  # checked before training, not after it by pretokenize
        raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}: a frame's tokens need sides that are "
                         f"multiples of {grid} px (the resolution tokens count {grid}-px grids), which pretokenize "
                         f"would refuse after this training; collect or resize the demos at such a size (collect "
                         f"--image-size)")
    prepare_run_dir(out, args.resume, getattr(args, "overwrite", False), exports=EXPORTS)
    args.run_dir_ready = True  # what an interrupt's advice reads: --overwrite has removed the earlier run
    if main:
        out.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    model = vq
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(vq, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(vq.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                            weight_decay=args.weight_decay)
    steps_per_epoch = len(frames) // args.batch_size
    total = args.steps or args.epochs * steps_per_epoch
    usage = CodeUsage(vq.config.n_embed, args.usage_decay)
    gen = torch.Generator().manual_seed((args.seed + 1) % SEED_LIMIT)  # --seed 2**64 - 1 too

    step, epoch, pos = 0, 0, 0
    ckpt = ck  # the run's newest checkpoint: the one resumed from until this run saves one
    if ck is not None:
        st = load_checkpoint(ck, model, opt, kind=KIND, require=STATE_KEYS)
        step, epoch, pos = st["step"], st["epoch"], st["batch_in_epoch"]
        usage.ema = torch.tensor(st["usage"], dtype=torch.float64)
        gen.set_state(torch.tensor(st["restart_rng"], dtype=torch.uint8))
        if main:
            print(f"resumed from {st['path']} at step {step}" + (
                f": the run had already finished ({total} steps), nothing is left to train; its VQGAN is exported "
                f"again" if step >= total else ""))
    elif args.resume and main:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}; a new run starts in {out}")
    log_path = out / "metrics.jsonl"
    if main:
        trim_log(log_path, step)

    latents = {}
    hook = vq.quant_conv.register_forward_hook(lambda m, i, o: latents.__setitem__("z", o.detach()))
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
           or (args.precision == "auto" and device.type == "cuda") else nullcontext())
    order = _epoch_order(len(frames), args.batch_size, args.seed, epoch)
    bar = tqdm(total=total, initial=step, desc="train-vq", unit="step", disable=args.no_progress or not main,
               dynamic_ncols=True)
    losses, t0, start = [], time.perf_counter(), step

    def lr_at(s):
        warm = args.warmup
        if s < warm:
            return args.lr * (s + 1) / warm
        t = min(1.0, (s - warm) / max(1, total - warm))
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))

    log = open(log_path, "a") if main else None
    curves = CurvePlot(out, VQ_CURVES, "worldvla train-vq") if main else None
    sigterm, stopped, export = StopSignal(), False, None
    try:
        while step < total and not (args.stop_after and step >= args.stop_after) and not stopped:
            if pos >= len(order):
                epoch, pos = epoch + 1, 0
                order = _epoch_order(len(frames), args.batch_size, args.seed, epoch)
            px = preprocess(frames[order[pos][rank * local:(rank + 1) * local]]).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with amp:
                recon, vq_loss, codes = model(px, beta=args.beta)
            recon = recon.float()
            l1, l2 = (recon - px).abs().mean(), F.mse_loss(recon, px)
            loss = args.l1 * l1 + args.l2 * l2 + vq_loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of the equal slices: the global batch's mean
            gn = torch.nn.utils.clip_grad_norm_(vq.parameters(), args.grad_clip if args.grad_clip > 0
                                                else float("inf"))
            opt.step()
            frac = usage.update(codes)
            step, pos = step + 1, pos + 1
            restarted = 0
            if args.restart_every and step % args.restart_every == 0:
                restarted = restart_dead_codes(vq, opt, usage, _gather_batch(latents["z"]),
                                               args.restart_threshold, gen)
            used = frac > 0
            p = frac[used]
            parts = torch.stack([loss.detach(), l1.detach(), l2.detach(), vq_loss.detach().float(),
                                 torch.full_like(loss, sigterm.flag)]).double()
            # whether any rank got SIGTERM rides along: every rank then stops after this step
            loss_v, l1_v, l2_v, vq_v, term_v = (dist_utils.all_reduce_sum(parts) / world).tolist()
            stopped = term_v > 0
            gn_v = float(gn)
            # Before anything is logged or saved: a step whose loss or gradients are not finite leaves garbage weights.
            check_finite(step, {"loss": loss_v, "gradient norm": gn_v}, out, DIVERGENCE_CAUSES)
            rec = {"step": step, "epoch": epoch, "loss": loss_v, "l1": l1_v, "l2": l2_v, "vq": vq_v,
                   "psnr": float(10 * math.log10(4.0 / max(l2_v, 1e-10))),
                   "perplexity": float(torch.exp(-(p * p.log()).sum())), "codes_used": int(used.sum()),
                   "restarted": restarted, "grad_norm": gn_v, "lr": lr_at(step - 1),
                   "frames_per_s": args.batch_size * (step - start) / max(time.perf_counter() - t0, 1e-9),
                   "time": time.time()}
            losses.append(rec["loss"])
            if main and (step % args.log_every == 0 or step == total):
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.1f}", codes=rec["codes_used"])
            bar.update(1)
            if ((args.save_every and step % args.save_every == 0) or step == total or step == args.stop_after
                    or stopped):
                ckpt = save_checkpoint(out, step, model, opt,
                                       {"kind": KIND, "epoch": epoch, "batch_in_epoch": pos,
                                        "usage": usage.ema.tolist(), "restart_rng": gen.get_state().tolist(),
                                        "config": vq.config.to_dict(), "args": {**scalar_args(args), **data}},
                                       keep_last=args.keep_last)
                if curves:
                    curves.update()
        # A SIGTERM noted after the last step's all-reduce (at that step's end, in the final save) stops the run
        # as well, with the export left to the resume (which finds nothing left to train).
        stopped = sigterm.agreed(stopped, device)
        if step >= total and not stopped:
            if main:
                # Written whole or not at all (a temporary sibling renamed in): an export stopped or killed partway
                # leaves the earlier folder or none, never weights without their config, and no temporary file inside.
                replace_folder(out / "vqgan", vq.eval().save_pretrained)
            dist_utils.barrier()
            export = str(out / "vqgan")
    finally:
        sigterm.restore()
        hook.remove()
        bar.close()
        if log:
            log.close()
        if curves:  # also after a stop or a failure: the curves up to it
            curves.update(force=True)
    if world == 1:  # one during the export, until the handler was handed back
        stopped = stopped or sigterm.received
    # Several ranks agreed at the loop's end already: one more collective here, the group's last before its
    # teardown, left a rank's destroy_process_group hanging now and then (Gloo), so a SIGTERM during their
    # export lets the finished run end as finished.
    return {"step": step, "losses": losses, "export": export, "stopped": stopped, "total": total,
            "checkpoint": None if ckpt is None else str(ckpt)}


# <run>/training.png: (metrics.jsonl key, axis label, log scale, smoothed)
VQ_CURVES = [("loss", "loss (L1 + L2 + VQ)", True, True), ("psnr", "reconstruction PSNR (dB)", False, True),
             ("codes_used", "codes used", False, False), ("perplexity", "code perplexity", False, True)]


def add_arguments(p) -> None:
    from ..data.store import CAMERA_HELP, ROTATE_180, ROTATE_HELP

    p.add_argument("inputs", nargs="+", help="HDF5 demo files or folders")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, training.png (its curves), vqgan/)")
    p.add_argument("--config", default="small", choices=("small", "chameleon"),
                   help="VQGAN architecture (default: %(default)s)")
    p.add_argument("--init", default=None, help="start from a VQGAN folder (VQGAN.save_pretrained), its "
                                                "architecture and codebook size included (no --config, --n-embed)")
    p.add_argument("--n-embed", type=non_negative_int, default=0,
                   help="codebook size override (default: 0, the config's)")
    p.add_argument("--steps", type=non_negative_int, default=0, help="optimizer steps (default: 0, --epochs)")
    p.add_argument("--epochs", type=positive_int, default=10,
                   help="passes over the frames when --steps is 0 (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="frames per step (all ranks together; default: %(default)s)")
    p.add_argument("--lr", type=non_negative_float, default=2e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=non_negative_float, default=None,
                   help="learning rate at the end of the cosine decay, at most --lr (default: --lr / 10; a resumed "
                        "run keeps its own)")
    p.add_argument("--warmup", type=non_negative_int, default=100, help="warm-up steps (default: %(default)s)")
    p.add_argument("--beta1", type=unit_open_float, default=0.5, help="AdamW beta1, in [0, 1) (default: %(default)s)")
    p.add_argument("--beta2", type=unit_open_float, default=0.9, help="AdamW beta2, in [0, 1) (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="max gradient norm (0 = off; default: %(default)s)")
    p.add_argument("--l1", type=non_negative_float, default=1.0,
                   help="weight of the L1 reconstruction term (default: %(default)s)")
    p.add_argument("--l2", type=non_negative_float, default=1.0,
                   help="weight of the L2 reconstruction term (default: %(default)s)")
    p.add_argument("--beta", type=non_negative_float, default=0.25, help="commitment weight (default: %(default)s)")
    p.add_argument("--restart-every", type=non_negative_int, default=50,
                   help="dead-code restart period in steps (0 = off; default: %(default)s)")
    p.add_argument("--restart-threshold", type=non_negative_float, default=0.03,
                   help="a code is dead below this fraction of the uniform usage rate (default: %(default)s)")
    p.add_argument("--usage-decay", type=unit_float, default=0.99,
                   help="decay of the running code-usage average, in [0, 1] (default: %(default)s)")
    p.add_argument("--frame-stride", type=positive_int, default=1, help="use every n-th frame (default: %(default)s)")
    p.add_argument("--max-frames", type=non_negative_int, default=0,
                   help="frames to train on at most (default: 0, all)")
    p.add_argument("--camera", default=None, help=CAMERA_HELP)
    p.add_argument("--rotate-180", default="auto", choices=tuple(ROTATE_180), help=ROTATE_HELP)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 autocast on GPU, fp32 on CPU (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the initialization and the frame order, in [0, 2**64) (default: %(default)s)")
    add_run_arguments(p, save_every=500, exports="vqgan/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldvla train-vq")
    add_arguments(p)
    return p


def run(args) -> int:
    with dist_utils.leave_group_after():
        s = train_vq(args)
        main = dist_utils.is_main()
        if s["stopped"]:
            if main:
                print(stopped_message("train-vq", s["step"], s["checkpoint"], args, last=s["step"] >= s["total"]),
                      file=sys.stderr, flush=True)
            # No rank leaves before rank 0 has said where the run stopped: torchrun ends the other ranks as soon as
            # one exits with 143, which killed rank 0 before its line.
            dist_utils.barrier()
    if s["stopped"]:
        return STOPPED_RC
    if main and s["losses"]:
        print(f"step {s['step']}: loss {s['losses'][-1]:.4f}" + (f"; exported {s['export']}" if s["export"] else ""))
        if s["step"] < s["total"]:  # --stop-after
            print(stop_after_message(s["step"], s["total"]))
        if s["export"]:
            demos = " ".join(shlex.quote(str(i)) for i in args.inputs)  # the demos it trained on, as given
            print(f"next: worldvla pretokenize {demos} --vqgan {shlex.quote(s['export'])} --out <store>   (training "
                  f"curves: {Path(args.out) / 'training.png'})")
    elif main:  # a resumed run with nothing left to do
        print(f"step {s['step']}: no steps run" + (f"; exported {s['export']} again" if s["export"] else ""))
    return 0


if __name__ == "__main__":  # `python -m` / torchrun of this module: as `worldvla train-vq`, with its one-line errors
    from ..cli import main

    sys.exit(main(["train-vq", *sys.argv[1:]]))
