"""The WorldVLA trainer (spec section 7), one process or `torchrun` + FSDP2.

    worldvla train --store STORE --out RUN --config small --steps 2000 --batch-tokens 8192
    torchrun --nproc_per_node 4 -m worldvla.cli train --store STORE --out RUN --config chameleon_7b \
        --init CHAMELEON_DIR --batch-tokens 32768 --micro-tokens 8192 --grad-checkpointing

Data: the token store's samples are shuffled per epoch by (seed, epoch) and cut greedily into
global batches of at most `--batch-tokens` tokens. A global batch depends on neither the world
size nor the micro-batch size: it is split across ranks and micro-steps into packed sequences
(per-document masks through cu_seqlens) of at most `--micro-tokens` tokens.

Loss: the release's weighted CE plus the z-loss (spec 2.5), taken over the whole global batch,

    L = sum_i w(y_i) CE_i / sum_i w(y_i)  +  z_weight * mean_i lse_i^2     (i over labelled tokens),

which is not a mean of per-micro-batch means. (The release takes this weighted mean on each GPU's batch and
averages the GPUs' gradients: the same when every GPU holds the same mix of action and world-model tokens,
else each GPU's tokens weigh by its own total. Here the objective does not depend on the world size.) Each micro-batch's `model.loss` is therefore
rescaled by its share of the batch's label weight W and count N (and its z weight by the ratio
of the two shares), so that gradients and the logged loss are exactly those of one pass over
the global batch, whatever the world size or the number of micro-steps.

Defaults that differ from the release's fine-tuning (spec 7), chosen for training small models
from scratch: lr 3e-4 with a cosine decay to lr / 10 (the release: a constant 5e-6 after a warm-up of
0.01 epoch from 0; `--lr 5e-6 --schedule constant --warmup N` with N the steps of 0.01 epoch, since a
fraction `--warmup` is of the whole run: its step k takes lr (k + 1) / N, one step ahead of the release's
lr k / N, whose first step does nothing), dropout 0.0 (0.05: `--dropout 0.05`), the image
weight on exactly the image-code ids (the release's slice: `--release-loss-weights`), and one
affine row per head in the q/k norms of a model built here (a release checkpoint loaded with
`--init` keeps its shared row; see worldvla.checkpoint). AdamW (0.9, 0.95, eps 1e-8, weight decay
0.1), gradient clipping at 4.0 and the z-loss weight 1e-5 are the release's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from ..cli import STOPPED_RC, non_negative_float, non_negative_int, positive_float, positive_int, unit_open_float
from .checkpointing import (CurvePlot, StopSignal, add_run_arguments, check_finite, check_run_dir, full_model_state,
                            load_checkpoint, prepare_run_dir, read_state, resume_point, save_checkpoint, scalar_args,
                            seed_int, stop_after_message, stopped_message, trim_log)

CONFIGS = ("tiny", "small", "chameleon_7b")
# What a resumed run must share with its start: the model, the learning-rate schedule and the optimizer's
# hyperparameters (both restored from the checkpoint, so new values would be ignored), the loss and the
# gradient clipping (the run would otherwise continue under another objective than it started with) and the
# data order (a position in it is restored); compared as they act on the run (`_effective_settings`). The token
# store itself is checked by its fingerprint and its shards' digests (`resume_point`'s data). --init is not
# compared: a resumed run's model is the checkpoint's, built from the model config it records
# (`_recorded_config`), and the folder is not read. --micro-tokens, the precision and the kernels may change: they
# do not change the training's result beyond rounding.
RESUME_SETTINGS = ("config", "attention", "max_positions", "dropout", "steps", "epochs", "lr", "min_lr",
                   "warmup", "schedule", "beta1", "beta2", "eps", "weight_decay", "grad_clip", "alpha",
                   "release_loss_weights", "z_weight", "batch_tokens", "seed", "kinds")
# The command's name in its checkpoints ("kind": a resume of another command's run is refused by name), and the keys
# of their state.json that a resume reads.
KIND = "train"
# What a finished run exports into its --out (`_export`): a folder holding either is an earlier run's.
EXPORTS = ("policy", "model")
STATE_KEYS = ("epoch", "batch_in_epoch", "tokens_seen", "scheduler")
# What a loss that is not finite most likely comes from (`check_finite`).
DIVERGENCE_CAUSES = ("a learning rate too high for the model and batch (--lr; a longer --warmup or a lower "
                     "--grad-clip may help), an --eps too small for the gradients, or samples of the token store "
                     "that are damaged")


def _effective_settings(settings: dict) -> dict:
    """`settings` (a run's arguments) as they act on the run: --kinds as the kinds it selects ('' is all of them,
    in any order), --min-lr's default as its value (--lr / 10; None under --schedule constant, which has no floor),
    --epochs as None under --steps (which decides the run's length then)."""
    from ..data.store import KINDS

    s = dict(settings)
    if isinstance(s.get("kinds"), str):
        names = {k.strip() for k in s["kinds"].split(",")} if s["kinds"] else set(KINDS)
        s["kinds"] = [k for k in KINDS if k in names] + sorted(names - set(KINDS))
    if s.get("schedule") == "constant":
        s["min_lr"] = None
    elif s.get("min_lr") is None and isinstance(s.get("lr"), (int, float)):
        s["min_lr"] = s["lr"] * 0.1
    if s.get("steps"):
        s["epochs"] = None
    return s


# ---------------------------------------------------------------------- schedule
class WarmupCosine:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`
    steps, or constant (the release: warm-up 0.01 epoch, then constant 5e-6)."""

    def __init__(self, optimizer, lr: float, total: int, warmup: int = 0, min_lr: float = 0.0,
                 kind: str = "cosine"):
        if kind not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")
        if total < 1 or warmup < 0:
            raise ValueError(f"need total >= 1 and warmup >= 0 steps, got total={total}, warmup={warmup}")
        self.optimizer, self.lr, self.total, self.warmup = optimizer, lr, total, warmup
        self.min_lr, self.kind, self.step_count = min_lr, kind, 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def _apply(self):
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step_count)

    def step(self):
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("lr", "total", "warmup", "min_lr", "kind", "step_count")}

    def load_state_dict(self, d: dict):
        for k, v in d.items():
            setattr(self, k, v)
        self._apply()


# ---------------------------------------------------------------------- data order
def epoch_batches(lengths: np.ndarray, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffle by (seed, epoch), then cut greedily into batches of at most `batch_tokens` tokens."""
    lengths = np.asarray(lengths)
    too_long = np.nonzero(lengths > batch_tokens)[0]
    if len(too_long):
        raise ValueError(f"{len(too_long)} samples are longer than --batch-tokens {batch_tokens} "
                         f"(longest {int(lengths.max())}); raise --batch-tokens")
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    batches, cur, tok = [], [], 0
    for i in perm.tolist():
        n = int(lengths[i])
        if tok + n > batch_tokens:
            batches.append(np.array(cur, dtype=np.int64))
            cur, tok = [], 0
        cur.append(i)
        tok += n
    if cur:
        batches.append(np.array(cur, dtype=np.int64))
    return batches


def split_batch(batch: np.ndarray, lengths: np.ndarray, world: int, micro_tokens: int) -> list[list[list[int]]]:
    """Assign a global batch to [micro_step][rank] bins of at most `micro_tokens` tokens: the first number
    of micro-steps, from the tokens' lower bound up, at which largest sample first into the emptiest bin
    that fits places every sample (balanced loads; a tighter packing may sometimes need one step fewer).
    Every rank gets the same number of micro-steps; a bin may be empty. Deterministic."""
    lens = {int(i): int(lengths[i]) for i in batch}
    if max(lens.values()) > micro_tokens:
        raise ValueError(f"a sample of {max(lens.values())} tokens exceeds --micro-tokens {micro_tokens}")
    order = sorted(lens, key=lambda i: (-lens[i], i))
    steps = max(1, math.ceil(sum(lens.values()) / (world * micro_tokens)))
    while True:
        load = [0] * (steps * world)
        bins: list[list[int]] = [[] for _ in load]
        ok = True
        for i in order:
            fits = [b for b in range(len(load)) if load[b] + lens[i] <= micro_tokens]
            if not fits:
                ok = False
                break
            b = min(fits, key=lambda b: (load[b], b))
            load[b] += lens[i]
            bins[b].append(i)
        if ok:
            pos = {int(i): k for k, i in enumerate(batch)}
            return [[sorted(bins[m * world + r], key=pos.__getitem__) for r in range(world)] for m in range(steps)]
        steps += 1


# ---------------------------------------------------------------------- model
def build_model_config(name: str, layout, dropout: float = 0.0, max_positions: int | None = None,
                       attention: str = "chunk"):
    from ..model import ModelConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {CONFIGS}")
    kw = {"dropout": dropout, "attention": attention}
    if max_positions:
        kw["max_position_embeddings"] = max_positions
    if name == "chameleon_7b":
        if layout.vocab_size != 65536:
            raise ValueError(f"config chameleon_7b needs a store built with --layout chameleon (65536 ids); this "
                             f"store's vocabulary has {layout.vocab_size}. Use --config small or tiny")
        return ModelConfig.chameleon_7b(layout=layout.to_dict(), **kw)
    return getattr(ModelConfig, name)(layout, **kw)


def _precision(args, device) -> torch.dtype | None:
    p = args.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    if p not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {p!r}")
    return torch.bfloat16 if p == "bf16" else None


def _build_model(args, layout, device, fsdp: bool, mixed_precision: torch.dtype | None = None, config=None):
    """The same model on every rank: seeded init or --init weights; sharded (FSDP2) when `fsdp`.

    A sharded model without --init is built on the meta device, sharded, and only then
    allocated and initialized shard by shard, so no rank ever holds the full fp32 model; with
    --init rank 0 alone holds it, to broadcast the shards (`_init_model`). `config`: a resumed run's
    (`_recorded_config`): its model is allocated uninitialized, for the checkpoint's weights to fill, and
    --init is not read."""
    from ..model import WorldVLA

    torch.manual_seed(args.seed)
    attention = getattr(args, "attention", "chunk")
    if args.init and config is None:
        model = _init_model(args, layout, device, fsdp, mixed_precision, attention)
    elif config is not None:
        with torch.device("meta"):
            model = WorldVLA(config)
        if fsdp:
            dist_utils.shard_model(model, mixed_precision=mixed_precision, device_type=device.type)
        model.to_empty(device=device)
    else:
        cfg = build_model_config(args.config, layout, args.dropout, args.max_positions, attention)
        gen = torch.Generator().manual_seed(args.seed)
        if fsdp:
            with torch.device("meta"):
                model = WorldVLA(cfg)
            dist_utils.shard_model(model, mixed_precision=mixed_precision, device_type=device.type)
            model.to_empty(device=device)
            model.init_weights(args.init_std, gen)
        else:
            model = WorldVLA(cfg).init_weights(args.init_std, gen)
    model.attn_backend = args.attn_backend
    model.gradient_checkpointing = bool(args.grad_checkpointing)
    if not fsdp:  # fully_shard moves each rank's shards to the device itself
        model.to(device)
    return model.train()


def _init_model(args, layout, device, fsdp: bool, mixed_precision, attention: str):
    """The --init model. Under FSDP only rank 0 reads the folder (a 7B model is 28 GB in fp32; every rank of an
    8-GPU node reading it held eight copies in host memory); the other ranks build the model on the meta device
    from rank 0's config, and every rank's shards are filled by a broadcast from rank 0's weights."""
    from ..model import WorldVLA
    from .checkpointing import load_full_model_state

    def load():  # its vocabulary and positions were checked against the run's (`_max_positions`)
        return WorldVLA.from_pretrained(args.init, device="cpu", dtype=torch.float32)

    # Under FSDP the other ranks learn rank 0's config, or that it failed (they would wait for it otherwise).
    loaded, cfg = dist_utils.on_rank_0(load, f"load --init {args.init}", share=lambda model: model.config)
    cfg.layout = layout.to_dict()
    cfg.attention = attention
    cfg.dropout = args.dropout  # the fine-tuning's, recorded with the model it trains
    if fsdp:
        with torch.device("meta"):
            model = WorldVLA(cfg)
    else:
        model = loaded
        model.layout = layout
    for m in model.modules():  # --dropout decides, whatever the checkpoint was trained with
        if isinstance(m, torch.nn.Dropout):
            m.p = args.dropout
    if fsdp:
        dist_utils.shard_model(model, mixed_precision=mixed_precision, device_type=device.type)
        model.to_empty(device=device)
        full = loaded.state_dict() if loaded is not None else {}
        del loaded
        load_full_model_state(model, full)
    return model


# ---------------------------------------------------------------------- the loop
def _micro_batches(store, bins_of_rank: list[list[int]], micro_tokens: int, pad_id: int, bos: int):
    from ..data.store import pack

    out = []
    for idx in bins_of_rank:
        if idx:
            out.append(pack([store[i] for i in idx], micro_tokens))
        else:  # an empty bin still runs forward/backward so that every rank joins the collectives
            out.append((torch.tensor([bos, pad_id]), torch.full((2,), -100), torch.tensor([0, 2], dtype=torch.int32)))
    return out


def micro_batch_loss(model, layout, ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, device,
                     autocast=nullcontext(), **loss_kw):
    """`model.loss` of one packed micro-batch (`ids`, `labels`, `cu_seqlens` on the host, as `pack`
    returns them), as a training step runs it: returns (loss, z_mean), on `device`.

    The ids' range check (against `layout`), the attention metadata and the labelled rows (only those
    reach the head) are found on the host, where the batch still is, and cost the device no
    synchronization; then metadata, ids and labels move to `device` and the loss runs under
    `autocast`. `loss_kw`: `model.loss`'s class_weight, z_weight, backend."""
    rows = (labels[1:] != -100).nonzero().squeeze(1)
    layout.check_ids(ids)
    meta = model.attention_meta(ids, cu_seqlens).to(device)
    ids, labels = ids.to(device), labels.to(device)
    with autocast:
        return model.loss(ids, labels, meta, label_rows=rows, check_ids=False, **loss_kw)


def _label_stats(labels: torch.Tensor, class_weight: torch.Tensor) -> tuple[float, float]:
    y = labels[1:]
    y = y[y != -100]
    return float(class_weight[y].double().sum()), float(y.numel())


def _check_backends(args, device, amp_dtype) -> None:
    """An explicit --attn-backend / --loss-backend that cannot train on this device (Triton without CUDA, the
    forward-only native kernels) is refused before the run starts, as the op would refuse it at the first step:
    asked with a few rows of what a step gives it (on `device`, in the step's dtype, needing gradients)."""
    from ..mask import causal_meta
    from ..ops import dispatch

    dtype = amp_dtype or torch.float32
    for opt, op, backend in (("--attn-backend", "masked_attention", args.attn_backend),
                             ("--loss-backend", "linear_cross_entropy", args.loss_backend)):
        if backend == "auto":
            continue
        if op == "masked_attention":
            q = torch.randn(1, 8, 1, 64, device=device, dtype=dtype, requires_grad=True)
            probe = (q, q, q, causal_meta((1, 8), device))
        else:
            h = torch.randn(4, 16, device=device, dtype=dtype, requires_grad=True)
            probe = (h, torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True),
                     torch.zeros(4, dtype=torch.long, device=device), None, 1e-5, -100)
        try:
            dispatch.resolve(op, backend, device.type, *probe)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"{opt} {backend} cannot train on {device}: {err}") from None


def _max_positions(args, layout, config=None) -> int:
    """The positions the run's model will have: a resumed run's recorded `config`'s, else --init's config.json
    (whose vocabulary must be the store's, and which --max-positions cannot resize: both refused here, before
    --overwrite deletes anything), else --config's (with --max-positions). Under FSDP rank 0 alone reads
    --init's config.json."""
    if config is not None:
        return config.max_position_embeddings
    if args.init:
        from ..checkpoint import check_folder, config_from_hf, read_json_file

        def read():
            folder = check_folder(args.init, "model")
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"--init {args.init}: no config.json (expected a model folder: a release "
                                        f"checkpoint, `save_pretrained`, or a run's OUT/model)")
            cfg = config_from_hf(read_json_file(folder / "config.json", "--init model config"))
            if cfg.vocab_size != layout.vocab_size:
                raise ValueError(f"--init model has {cfg.vocab_size} vocabulary entries, the store's layout "
                                 f"{layout.vocab_size}: it was trained on tokens of another VQGAN codebook or "
                                 f"vocabulary. Build the store for it (`worldvla pretokenize` with the VQGAN it was "
                                 f"trained with, a policy's vqgan/ beside its model/, and the same --layout), or drop "
                                 f"--init to train a new model on this store")
            if args.max_positions and args.max_positions != cfg.max_position_embeddings:
                raise ValueError(f"--max-positions {args.max_positions} sizes a model built from --config; the "
                                 f"--init model keeps its checkpoint's {cfg.max_position_embeddings} (drop the option)")
            return cfg.max_position_embeddings

        return dist_utils.on_rank_0(read, f"read --init {args.init}", share=lambda n: n)[1]
    return build_model_config(args.config, layout, args.dropout, args.max_positions).max_position_embeddings


def _init_vqgan_note(init, store) -> str | None:
    """A line when --init is the model of a policy folder whose VQGAN (its `vqgan/` beside `model/`) is not the one
    that encoded the token store: the model's image-code embeddings and head rows were learned for other codes."""
    from ..data.store import _vqgan_folder_digest

    beside = Path(init).expanduser() / ".." / "vqgan"
    want = store.manifest.get("vqgan_sha256")
    got = _vqgan_folder_digest(beside.resolve()) if want else None
    if got is None or got == want:
        return None
    return (f"note: --init {init} was trained with the VQGAN beside it ({beside.resolve()}), not the one that encoded "
            f"{store.path}: its image-code embeddings were learned for other codes and start over in effect; to keep "
            f"them, pretokenize the demos with --vqgan {beside.resolve()}")


def _recorded_config(ck, args):
    """The model config that the checkpoint `ck` records (`model_config`; `model_hf_extra`: the config.json keys of
    an --init folder that the export writes back), which a resumed run builds its model from: the checkpoint holds
    all its weights, so --init is not read (the folder may have moved). None when the record lacks a field of
    ModelConfig (a checkpoint of an older version: the model is then built as at the run's start)."""
    from dataclasses import fields

    from ..model import ModelConfig

    state = read_state(ck)
    rec = state.get("model_config")
    names = [f.name for f in fields(ModelConfig) if f.name != "hf_extra"]
    if not isinstance(rec, dict) or any(n not in rec for n in names):
        return None
    cfg = ModelConfig(**{n: rec[n] for n in names})
    if "model_hf_extra" in state:
        cfg.hf_extra = state["model_hf_extra"]
    elif args.init and dist_utils.is_main():
        # A checkpoint written before the keys were recorded: --init's, for rank 0's export, where the folder still is.
        from ..checkpoint import config_from_hf, read_json_file

        hf = Path(args.init).expanduser() / "config.json"
        if hf.is_file():
            cfg.hf_extra = config_from_hf(read_json_file(hf, "--init model config")).hf_extra
        else:
            print(f"warning: {ck} does not record the config.json keys of the --init model and {hf} is gone: the "
                  f"exported model's config.json gets this package's defaults for them")
    return cfg


def _store_digest(manifest: dict) -> str | None:
    """A digest of the token store's content: its shards' sha256s, as its manifest records them (the fingerprint
    covers settings, VQGAN and the inputs' names and sizes, not what they hold). None for a manifest without them."""
    shards = manifest.get("shards", [])
    if not all(isinstance(e, dict) and "files" in e for e in shards):
        return None
    listed = json.dumps([[e.get("name"), e["files"]] for e in shards], sort_keys=True)
    return hashlib.sha256(listed.encode()).hexdigest()


def _store_fix(started_on, store) -> str:
    """How to resume a run refused on other data: on the store it was started on, or, where that is `store` (rebuilt
    in place since), on that store rebuilt as it was."""
    if started_on is not None and Path(started_on).expanduser().resolve() == Path(store).expanduser().resolve():
        return (f"The token store {store} was rebuilt since the run started: rebuild it from the demos and settings "
                f"the run was started on")
    return f"Resume with --store {started_on}, the token store it was started on"


def _check_sample_lengths(lengths, micro_tokens: int, option: str, positions: int, kind_codes=None,
                          kinds=None) -> None:
    """Refuse samples no micro-step (of `option`'s size) or no model position range can hold, before the run
    (split_batch and the forward would refuse them when their batch came up, hours in). `kind_codes` (the store's
    per sample) and `kinds` (those the run trains on): to name the kinds of the long samples, and how to leave
    them out."""
    from ..data.store import KINDS

    lengths = np.asarray(lengths)
    longest = int(np.max(lengths))
    for limit, what, fix in ((micro_tokens, f"{option} {micro_tokens}", f"raise {option}"),
                             (positions, f"the model's {positions} positions",
                              "raise --max-positions (a --config model), or tokenize with a shorter history "
                              "(`worldvla pretokenize --history 1`)")):
        if longest > limit:
            n = int((lengths > limit).sum())
            drop = ""
            if kind_codes is not None:
                long_kinds = [k for i, k in enumerate(KINDS) if ((np.asarray(kind_codes) == i) & (lengths > limit)).any()]
                fitting = [k for k in (kinds or KINDS) if k not in long_kinds]
                names = " and ".join("world-model" if k == "world" else k for k in long_kinds)
                if fitting:
                    flags = " ".join(f"--no-{k}" for k in long_kinds)
                    drop = (f"; they are {names} samples: train on the others (--kinds {','.join(fitting)}), or "
                            f"build the store without them (`worldvla pretokenize {flags}`)")
                else:
                    drop = f"; they are {names} samples"
            raise ValueError(f"{n} sample(s) of the store are longer than {what} (the longest has {longest} "
                             f"tokens); {fix}" + drop)


def _check_export_inputs(store) -> None:
    """What the policy export (square frames: `_export`) takes from the token store, its VQGAN and (on the Chameleon
    vocabulary) its text_tokenizer.json, checked before the run: the export would refuse them after the whole
    training. Rank 0 alone reads them; a refusal ends every rank."""
    from ..data.store import TEXT_TOKENIZER

    h, w = store.image_size
    if h != w:  # only the model is exported
        return
    instead = "or pass --no-export (the run's checkpoints then hold the model)"

    def check():
        try:
            store.checked_vqgan_path()
        except (OSError, ValueError) as err:
            raise type(err)(f"{err}. The policy this run exports at its end needs that VQGAN: restore it before "
                            f"training, {instead}") from None
        if store.layout.text_base < 0 and store.text_tokenizer_path is None:
            raise FileNotFoundError(f"the token store at {store.path} lacks its {TEXT_TOKENIZER} (its Chameleon "
                                    f"vocabulary encodes text through it), which the policy this run exports at its "
                                    f"end needs: copy the release's {TEXT_TOKENIZER} into {store.path} before "
                                    f"training, {instead}")

    dist_utils.on_rank_0(check, "check the token store's VQGAN and text tokenizer")


def _warmup_steps(args, total: int) -> int:
    """--warmup as steps: a fraction of the run below 1, else whole steps (a fractional count is refused); one that
    would outlast the run (the peak learning rate never reached) is warned of."""
    w = args.warmup
    if w >= 1 and w != int(w):
        raise ValueError(f"--warmup {w}: a value of 1 or more counts steps and must be a whole number (a fraction "
                         f"of the run is given below 1, e.g. --warmup 0.05)")
    # rounded before it is cut: 0.29 * 100 is 28.999999999999996 in floating point, and the run's 29th step counts
    steps = int(round(w * total, 6)) if w < 1 else int(w)
    if dist_utils.is_main():
        if steps > total:  # the warm-up's last step (steps - 1) is the first at --lr
            print(f"warning: --warmup {w} is {steps} steps, more than the run's {total}: the learning rate never "
                  f"reaches --lr {args.lr}; pass fewer warm-up steps or a fraction below 1")
        if args.schedule == "constant" and args.min_lr is not None:
            print(f"warning: --min-lr {args.min_lr} is unused under --schedule constant (it is the cosine's floor)")
    return steps


def train(args) -> dict:
    """Run training as described by `args` (the `worldvla train` namespace). Returns a summary."""
    from tqdm.auto import tqdm

    from ..data.store import TokenStore
    from ..model import loss_class_weights

    device = dist_utils.init(args.device)
    if device.type == "cpu" and not getattr(args, "no_malloc_tuning", False):
        from ..inference.malloc import tune_cpu_malloc

        tune_cpu_malloc(mmap=False)  # the 64 MiB gradients are otherwise faulted in anew every step
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main = rank == 0
    out = Path(args.out)
    # refused before anything is read or deleted; under --schedule constant it is unused (`_warmup_steps` says so)
    if args.schedule == "cosine" and args.min_lr is not None and args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine decay would raise the "
                         f"learning rate; pass a --min-lr of at most --lr (default: --lr / 10)")
    overwrite = getattr(args, "overwrite", False)
    check_run_dir(out, args.resume, overwrite, kind=KIND, exports=EXPORTS)  # before the store is read, the model built
    _check_backends(args, device, _precision(args, device))
    # Everything the command line decides is checked before --overwrite deletes the earlier run.
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    store = TokenStore(args.store, kinds=kinds)
    if len(store) == 0:
        raise ValueError(f"the store {args.store} holds no samples of kinds {store.kinds}")
    if not args.no_export:
        _check_export_inputs(store)
    layout = store.layout
    micro_tokens = args.micro_tokens or args.batch_tokens
    if micro_tokens > args.batch_tokens:
        raise ValueError(f"--micro-tokens {micro_tokens} cannot exceed --batch-tokens {args.batch_tokens} (a micro-step "
                         f"is a part of a step's batch): lower --micro-tokens or raise --batch-tokens")
    # Total steps: --steps, or whole epochs of the store.
    if args.steps:
        total = args.steps
    else:
        total = sum(len(epoch_batches(store.lengths, args.batch_tokens, args.seed, e)) for e in range(args.epochs))
    warmup = _warmup_steps(args, total)
    # The run's data, recorded with its settings: a resume on another store (or one rebuilt from other demos) is
    # refused by name.
    data = {"store_fingerprint": store.manifest.get("fingerprint")}
    content = _store_digest(store.manifest)
    if content is not None:
        data["store_content"] = content
    data["total_steps"] = total
    ck = resume_point(out, args, RESUME_SETTINGS, data,  # refused now, not after the model is built
                      fix=lambda saved: _store_fix(saved.get("store"), args.store), normalize=_effective_settings,
                      kind=KIND, require=STATE_KEYS)
    config = _recorded_config(ck, args) if ck is not None else None
    if config is not None and args.init and main:
        print(f"--resume: the model is the checkpoint's, built from the config it records; --init {args.init} is "
              f"not loaded")
    elif args.init and main:
        note = _init_vqgan_note(args.init, store)
        if note:
            print(note, file=sys.stderr)
    _check_sample_lengths(store.lengths, micro_tokens, "--micro-tokens" if args.micro_tokens else "--batch-tokens",
                          _max_positions(args, layout, config), store.kind_codes, store.kinds)

    # The model (--init's weights read, the seed taken, moved to the device) and the optimizer are built before
    # --overwrite deletes the earlier run: a failure there leaves that run as it was.
    amp_dtype = _precision(args, device)
    fsdp = world > 1
    model = _build_model(args, layout, device, fsdp, mixed_precision=amp_dtype if device.type == "cuda" else None,
                         config=config)
    if rank:  # every rank built the same model from --seed; their dropout masks must differ (rank 0 keeps the
        # single process's stream)
        torch.manual_seed(int(np.random.SeedSequence([args.seed, rank]).generate_state(1)[0]))
    # FSDP on GPU computes in bf16 through its mixed-precision policy; otherwise autocast does.
    autocast = (torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None and not (fsdp and device.type == "cuda") else nullcontext())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            weight_decay=args.weight_decay, foreach=device.type == "cuda" or None)
    min_lr = args.lr * 0.1 if args.min_lr is None else args.min_lr
    sched = WarmupCosine(opt, args.lr, total, warmup, min_lr, args.schedule)
    prepare_run_dir(out, args.resume, overwrite, exports=EXPORTS)
    args.run_dir_ready = True  # what an interrupt's advice reads: --overwrite has removed the earlier run
    if main:
        out.mkdir(parents=True, exist_ok=True)

    step, epoch, pos, tokens_seen = 0, 0, 0, 0
    saved = None  # the step of the newest checkpoint on disk of this run
    if ck is not None:
        st = load_checkpoint(ck, model, opt, kind=KIND, require=STATE_KEYS)
        step, epoch, pos, tokens_seen = st["step"], st["epoch"], st["batch_in_epoch"], st["tokens_seen"]
        sched.load_state_dict(st["scheduler"])
        saved = step
        if main:
            print(f"resumed from {ck} at step {step} (epoch {epoch}, batch {pos})" + (
                f": the run had already finished ({total} steps), nothing is left to train"
                + ("" if args.no_export else "; its final model is exported again") if step >= total else ""))
    elif args.resume and main:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}; a new run starts in {out}")
    log_path = out / "metrics.jsonl"
    if main:
        trim_log(log_path, step)
        (out / "train_args.json").write_text(json.dumps(vars(args), indent=1, default=str))

    class_weight = loss_class_weights(layout, args.alpha, release=args.release_loss_weights)
    cw_device = class_weight.to(device)
    plan = epoch_batches(store.lengths, args.batch_tokens, args.seed, epoch)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not main or args.no_progress,
               dynamic_ncols=True)
    losses: list[float] = []
    t_last, tok_last = time.perf_counter(), 0
    log_f = open(log_path, "a") if main else None
    curves = CurvePlot(out, TRAIN_CURVES, "worldvla train") if main else None
    sigterm, stopped = StopSignal(), False
    try:
        while step < total and not (args.stop_after and step >= args.stop_after) and not stopped:
            if pos >= len(plan):
                epoch, pos = epoch + 1, 0
                plan = epoch_batches(store.lengths, args.batch_tokens, args.seed, epoch)
            batch = plan[pos]
            bins = split_batch(batch, store.lengths, world, micro_tokens)
            micro = _micro_batches(store, [b[rank] for b in bins], micro_tokens, layout.pad, layout.bos)
            stats = torch.tensor([sum(_label_stats(lab, class_weight)[k] for _, lab, _ in micro) for k in (0, 1)],
                                 dtype=torch.float64)
            W, N = dist_utils.all_reduce_sum(stats.to(device)).tolist()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            z_sum = torch.zeros((), dtype=torch.float64, device=device)
            for m, (ids, labels, cu) in enumerate(micro):
                w_m, n_m = _label_stats(labels, class_weight)
                share_w, share_n = w_m / W if W > 0 else 0.0, n_m / N if N > 0 else 0.0
                # The micro-batch's loss is its weighted-CE mean plus z_eff times its z mean; scaled by share_w
                # it adds its part of the global batch's CE and z_weight * share_n times its z mean. With no
                # label weight (only classes weighing 0, e.g. image codes under --alpha 0) its CE term is 0, and
                # its z-loss alone is scaled by share_n.
                z_eff = args.z_weight * share_n / share_w if share_w > 0 else args.z_weight
                scale = share_w if share_w > 0 else share_n
                if fsdp:
                    model.set_requires_gradient_sync(args.reduce_every_micro_step or m == len(micro) - 1)
                loss, z = micro_batch_loss(model, layout, ids, labels, cu, device, autocast, class_weight=cw_device,
                                           z_weight=z_eff, backend=args.loss_backend)
                (loss * (scale * world)).backward()
                loss_sum += loss.detach().double() * scale
                z_sum += z.detach().double() * share_n
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step, pos = step + 1, pos + 1
            n_tok = int(store.lengths[batch].sum())
            tokens_seen += n_tok
            tok_last += n_tok
            red = dist_utils.all_reduce_sum(torch.stack([loss_sum, z_sum, torch.full_like(loss_sum, sigterm.flag)]))
            # One read-back per step, as before: the loss, its z part, whether any rank got SIGTERM and the
            # gradient norm (the same on every rank).
            loss_v, z_v, term_v, gn_v = torch.cat([red, grad_norm.detach().reshape(1).to(red)]).tolist()
            stopped = term_v > 0
            # Before anything is logged or saved: a step whose loss or gradients are not finite leaves garbage weights.
            check_finite(step, {"loss": loss_v, "gradient norm": gn_v}, out, DIVERGENCE_CAUSES)
            losses.append(loss_v)
            if main and (step % args.log_every == 0 or step == total):
                now = time.perf_counter()
                tok_s = tok_last / max(now - t_last, 1e-9)
                rec = {"step": step, "epoch": epoch, "loss": loss_v, "z": z_v, "lr": sched.lr_at(step - 1),
                       "grad_norm": gn_v, "tokens": tokens_seen, "tokens_per_s": tok_s,
                       "samples": len(batch), "time": time.time()}
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{rec['lr']:.2e}")
                t_last, tok_last = now, 0
            bar.update(1)
            if args.save_every and step % args.save_every == 0 and step < total and not stopped:
                t_save = time.perf_counter()
                _save(out, step, model, opt, sched, epoch, pos, tokens_seen, args, data)
                saved = step
                if curves:
                    curves.update()
                t_last += time.perf_counter() - t_save  # tokens_per_s counts training steps, not the save
        # The run's end (or --stop-after): a checkpoint of this step, unless one is on disk already (a
        # periodic save at --stop-after, a resumed run that had ended).
        ckpt = (_save(out, step, model, opt, sched, epoch, pos, tokens_seen, args, data) if step != saved
                else Path(out) / "checkpoints" / f"step_{step:08d}")
        # A SIGTERM noted after the last step's all-reduce (at that step's end, in the final save) stops the run
        # as well, with the export left to the resume (which finds nothing left to train).
        stopped = sigterm.agreed(stopped, device)
        export = None
        if step >= total and not args.no_export and not stopped:
            try:
                export = _export(model, store, out, args)
            except (OSError, ValueError) as e:  # the store's VQGAN or tokenizer gone during the run, a full disk
                raise type(e)(f"{e}. The run's final checkpoint ({ckpt.name}) is saved: once that is fixed, the same "
                              f"command with --resume exports the policy without training again") from e
    finally:
        sigterm.restore()
        bar.close()
        if log_f:
            log_f.close()
        if curves:  # also after a failure: a diverging loss is easier seen than read
            curves.update(force=True)
    if world == 1:  # one during the export, until the handler was handed back
        stopped = stopped or sigterm.received
    # Several ranks agreed at the loop's end already: one more collective here, the group's last before its
    # teardown, left a rank's destroy_process_group hanging now and then (Gloo), so a SIGTERM during their
    # export lets the finished run end as finished.
    summary = {"step": step, "losses": losses, "checkpoint": str(ckpt), "export": export, "stopped": stopped,
               "total": total}
    return summary


# <run>/training.png: (metrics.jsonl key, axis label, log scale, smoothed)
TRAIN_CURVES = [("loss", "loss (weighted CE + z-loss)", True, True), ("grad_norm", "gradient norm", True, True),
                ("lr", "learning rate", False, False), ("tokens_per_s", "tokens / s", False, True)]


def _save(out, step, model, opt, sched, epoch, pos, tokens_seen, args, data):
    state = {"kind": KIND, "epoch": epoch, "batch_in_epoch": pos, "tokens_seen": tokens_seen,
             "scheduler": sched.state_dict(),
             "model_config": model.config.to_dict(), "model_hf_extra": model.config.hf_extra,
             "args": {**scalar_args(args), **data}}
    return save_checkpoint(out, step, model, opt, state, keep_last=args.keep_last)


def _export(model, store, out: Path, args):
    """Rank 0 writes `<out>/policy` (save_policy), or `<out>/model` for non-square frames."""
    from ..model import WorldVLA

    sd = full_model_state(model)
    path = None
    if dist_utils.is_main():
        plain = WorldVLA(model.config)
        plain.load_state_dict(sd)
        plain.eval()
        # The inference package is part of worldvla: an import failure is a bug and must not
        # silently change what gets exported.
        from ..inference.policy import save_policy

        h, w = store.image_size
        if h == w:
            from ..vqgan import VQGAN

            path = out / "policy"
            kw = {}
            if store.text_tokenizer_path is not None:
                kw["text_tokenizer_json"] = store.text_tokenizer_path
            # kinds: those the model was trained on (samples of them in the store), so that an evaluation can
            # tell an action-only model's world-model scores for what they are
            extra = {"store": str(store.path.resolve()), "config": args.config,
                     "kinds": [k for k, n in store.kind_counts().items() if n > 0]}
            # the instructions of its demonstrations: an evaluation can say which tasks the policy never saw
            seen = sorted({text for i in store.manifest.get("inputs", [])
                           for text in [i.get("instruction"), *(i.get("demo_instructions") or {}).values()] if text})
            if seen:
                extra["instructions"] = seen
            if store.manifest.get("sim_camera"):  # the evaluation renders from the camera the demos were
                extra["sim_camera"] = store.manifest["sim_camera"]
            save_policy(path, plain, VQGAN.from_pretrained(store.checked_vqgan_path()), store.action_tokenizer(),
                        store.chunk_size, h, history=int(store.manifest["action"].get("history", 2)),
                        extra=extra, **kw)
        else:
            path = out / "model"
            print(f"worldvla train: frames are {h}x{w}, not square; WorldVLAPolicy needs square frames, "
                  f"so only the model is exported to {path}")
            plain.save_pretrained(path)
    dist_utils.barrier()
    return str(path) if path else None


# ---------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    p.add_argument("--store", required=True, help="token store folder (worldvla pretokenize)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, training.png (its curves), exported policy")
    p.add_argument("--config", default="small", choices=CONFIGS, help="model size (default: %(default)s)")
    p.add_argument("--init", default=None,
                   help="start from this model folder (e.g. the release's or transformers' Chameleon-7B folder). "
                        "A --resume of a run continues from its checkpoint, which holds the model: the folder is "
                        "then not read and may have moved")
    p.add_argument("--steps", type=non_negative_int, default=0,
                   help="optimizer steps (default: 0, --epochs whole epochs)")
    p.add_argument("--epochs", type=positive_int, default=1, help="whole epochs of the store when --steps is 0 "
                   "(default: %(default)s)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192,
                   help="tokens per global batch (all ranks; default: %(default)s)")
    p.add_argument("--micro-tokens", type=non_negative_int, default=0,
                   help="tokens per packed micro-batch per rank (default: 0 = --batch-tokens); gradient accumulation. "
                        "Smaller micro-batches take less memory; on CPU the torch attention runs a packed micro-batch "
                        "document by document")
    p.add_argument("--lr", type=non_negative_float, default=3e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=non_negative_float, default=None,
                   help="cosine floor, at most --lr (default: --lr / 10)")
    p.add_argument("--warmup", type=non_negative_float, default=0.01,
                   help="warm-up steps, or a fraction of the run if < 1 (default: %(default)s)")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"),
                   help="learning-rate schedule after the warm-up (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1,
                   help="AdamW weight decay, on every parameter (norms and embeddings too, as the release "
                        "trains; default: %(default)s)")
    p.add_argument("--beta1", type=unit_open_float, default=0.9, help="AdamW beta1, in [0, 1) (default: %(default)s)")
    p.add_argument("--beta2", type=unit_open_float, default=0.95, help="AdamW beta2, in [0, 1) (default: %(default)s)")
    p.add_argument("--eps", type=positive_float, default=1e-8,
                   help="AdamW epsilon, > 0 (default: %(default)s)")
    p.add_argument("--grad-clip", type=non_negative_float, default=4.0,
                   help="max gradient norm (0 = off; default: %(default)s)")
    p.add_argument("--alpha", type=non_negative_float, default=0.04,
                   help="loss weight of image-code targets (default: %(default)s)")
    p.add_argument("--release-loss-weights", action="store_true",
                   help="put --alpha on the release's id slice (w[3:8195]: <unk> down-weighted, the last image code "
                        "not) instead of exactly the image-code ids, rounded to bfloat16 as the release's FSDP "
                        "casts it (0.04 -> 0.0400390625)")
    p.add_argument("--z-weight", type=non_negative_float, default=1e-5, help="z-loss weight (default: %(default)s)")
    p.add_argument("--dropout", type=unit_open_float, default=0.0, help="dropout probability (default: %(default)s)")
    p.add_argument("--init-std", type=non_negative_float, default=0.02,
                   help="std of the initial weights of a model built here (default: %(default)s)")
    p.add_argument("--max-positions", type=non_negative_int, default=0,
                   help="override max_position_embeddings (default: 0, the config's)")
    p.add_argument("--attention", default="chunk", choices=("chunk", "causal"),
                   help="chunk: the release's chunk mask (an action does not see the earlier actions of its "
                        "chunk); causal: plain causal attention, the paper's ablation (the policy then decodes "
                        "its chunks causally; default: %(default)s)")
    p.add_argument("--kinds", default="", help="sample kinds to train on, e.g. 'action' (default: all in the store)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 autocast on GPU, fp32 on CPU (default: %(default)s)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder layers in backward")
    p.add_argument("--reduce-every-micro-step", action="store_true",
                   help="under FSDP, reduce-scatter the gradients after every micro-step, not only the last: each "
                        "rank then holds only its gradient shards between micro-steps instead of the whole model's "
                        "unsharded fp32 gradients (4 bytes per parameter, 28 GB for 7B), at one gradient "
                        "reduction per micro-step")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "torch", "triton", "native"),
                   help="attention kernels (default: %(default)s: the order `worldvla info` shows; native's are "
                        "forward-only, refused for training)")
    p.add_argument("--loss-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="cross-entropy kernels (default: %(default)s: the order `worldvla info` shows; the fused "
                        "loss has no native kernel)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialization and the data order, in "
                   "[0, 2**64) (default: %(default)s)")
    add_run_arguments(p, save_every=1000, exports="policy / model")
    p.add_argument("--no-export", action="store_true", help="skip the final policy / model export")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="on the CPU, leave glibc's malloc as it is (by default every block comes from the heap "
                        "and is reused: worldvla.tune_cpu_malloc(mmap=False))")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldvla train")
    add_arguments(p)
    return p


def run(args) -> int:
    with dist_utils.leave_group_after():
        s = train(args)
        main = dist_utils.is_main()
        if s["stopped"]:
            if main:
                print(stopped_message("train", s["step"], s["checkpoint"], args, last=s["step"] >= s["total"]),
                      file=sys.stderr, flush=True)
            # No rank leaves before rank 0 has said where the run stopped: torchrun ends the other ranks as soon as
            # one exits with 143, which killed rank 0 before its line.
            dist_utils.barrier()
    if s["stopped"]:
        return STOPPED_RC
    if main and s["losses"]:
        print(f"step {s['step']}: loss {s['losses'][-1]:.4f}; checkpoint {s['checkpoint']}"
              + (f"; exported {s['export']}" if s["export"] else ""))
        if s["step"] < s["total"]:  # --stop-after
            print(stop_after_message(s["step"], s["total"]))
        if s["export"] and Path(s["export"]).name == "policy":
            policy = shlex.quote(str(s["export"]))
            print(f"next: worldvla eval --policy {policy} --tasks <tasks> --out <eval folder>   or   worldvla "
                  f"serve --checkpoint {policy}   (training curves: {Path(args.out) / 'training.png'})")
    elif main:  # a resumed run with nothing left to do
        print(f"step {s['step']}: no steps run; checkpoint {s['checkpoint']}"
              + (f"; exported {s['export']} again" if s["export"] else ""))
    return 0


if __name__ == "__main__":  # `python -m` / torchrun of this module: as `worldvla train`, with its one-line errors
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
