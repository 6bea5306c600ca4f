"""`worldvla demo`: the whole WorldVLA chain on Meta-World, sized for a 2-core CPU.

    collect     scripted-expert demonstrations, in parallel worker processes  -> <out>/demos/
    train-vq    a small VQGAN image tokenizer on the demo frames              -> <out>/vq/vqgan/
    pretokenize frames -> codes, action-model + world-model samples           -> <out>/store/
    train       a small WorldVLA on both sample kinds (chunk-masked)          -> <out>/train/, <out>/policy/
    evaluate    closed-loop success vs a random policy, world-model PSNR/SSIM -> <out>/eval/, <out>/metrics.json

Each stage records a completion marker (<out>/stages/<stage>.json) holding a key of its
settings and of every stage before it; a second run skips stages whose marker matches
and whose outputs are still there, and redoes a stage (and everything after it) when its
settings changed. An interrupted run loses little: collection and tokenization resume file by
file, the trainings (VQGAN and WorldVLA) from their last checkpoint (a third of the way each),
and the evaluation keeps each finished closed loop. The trained policy in <out>/policy loads with
`WorldVLAPolicy.from_pretrained`, serves with `worldvla serve --checkpoint <out>/policy` and imagines
with `worldvla imagine <out>/policy --demos <out>/demos/<task>.hdf5`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .checks import is_integer
from .cli import positive_float, positive_int, seed32

DEFAULT_TASKS = ("button-press-topdown-v3", "drawer-open-v3", "window-open-v3")


@dataclass
class DemoConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    episodes: int = 30            # expert demonstrations per task
    image_size: int = 64
    seed: int = 0
    workers: int = 2
    collect_max_steps: int = 200
    # VQGAN
    vq_steps: int = 300
    vq_batch: int = 12
    vq_lr: float = 1e-3
    vq_codes: int = 256           # codebook size (image-code ids in the vocabulary)
    # WorldVLA
    chunk_size: int = 5
    model: str = "small"
    train_steps: int = 900
    batch_tokens: int = 1536
    micro_tokens: int = 1536      # one packed micro-batch a step (attention runs per document)
    lr: float = 1e-3
    world: bool = True            # joint action + world training (False: action samples only)
    ablations: bool = False       # also train action-only and no-chunk-mask models, decode without the mask
    # evaluation
    eval_episodes: int = 10
    eval_max_steps: int = 150
    eval_envs: int = 5
    wm_episodes: int = 2          # held-out expert rollouts per task for the world-model metrics
    wm_horizon: int = 8           # imagined steps per rollout
    fast: bool = False

    @classmethod
    def fast_preset(cls, **kw) -> "DemoConfig":
        """Tiny everything: checks the plumbing in 10-20 seconds on 2 cores, learns nothing."""
        base = dict(tasks=("reach-v3",), episodes=2, vq_steps=2, vq_batch=4, model="tiny", train_steps=3,
                    batch_tokens=2048, eval_episodes=2, eval_max_steps=12, eval_envs=2, wm_episodes=1,
                    wm_horizon=2, collect_max_steps=200, fast=True)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        """Refuse settings a stage would refuse (or misread) only after the stages before it ran, naming the demo's
        option where it has one and the DemoConfig field otherwise."""
        import math

        from .sim.metaworld_env import TASKS, check_max_steps, check_tasks

        if not self.tasks:
            raise ValueError(f"--tasks names no task; pass comma-separated Meta-World tasks, such as "
                             f"{','.join(DEFAULT_TASKS)} (the default when --tasks is left out), from: "
                             f"{', '.join(sorted(TASKS))}")
        check_tasks(self.tasks, fix="--tasks")
        _check_whole("image_size", self.image_size)
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"--image-size must be a multiple of 32 (the resolution tokens count 32-px grids), "
                             f"got {self.image_size}; use 64 or 128")
        for name in ("episodes", "vq_steps", "train_steps", "eval_episodes", "chunk_size", "workers", "vq_batch",
                     "vq_codes", "batch_tokens", "eval_envs", "wm_horizon"):
            _check_count(name, getattr(self, name), 1)
        for name in ("micro_tokens", "wm_episodes"):  # 0: the whole batch in one micro-batch; no world-model scores
            _check_count(name, getattr(self, name), 0)
        for name in ("lr", "vq_lr"):  # a learning rate of 0 trains nothing, and says nothing of it
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{_setting(name)} must be a number > 0, got {value!r}")
        check_max_steps(self.collect_max_steps, _setting("collect_max_steps"))
        check_max_steps(self.eval_max_steps, _setting("eval_max_steps"))
        if self.model not in ("tiny", "small"):  # refused by the training stage's parser only after collecting
            raise ValueError(f"--model must be tiny or small, got {self.model!r}")
        _check_whole("seed", self.seed)
        if not 0 <= self.seed < 1 << 32:  # checked before collecting, not by the training stage's parser after it
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")


# The settings `worldvla demo` has an option for; the others are set from Python only.
_OPTION_SETTINGS = ("tasks", "episodes", "eval_episodes", "image_size", "chunk_size", "train_steps", "vq_steps", "model",
                    "lr", "workers", "seed")


def _setting(name: str) -> str:
    return f"--{name.replace('_', '-')}" if name in _OPTION_SETTINGS else f"DemoConfig.{name}"


def _check_whole(name: str, value) -> None:
    if not is_integer(value):  # 2.5 episodes, True steps: no stage reads them right
        raise ValueError(f"{_setting(name)} must be a whole number, got {value!r}")


def _check_count(name: str, value, least: int) -> None:
    _check_whole(name, value)
    if value < least:
        raise ValueError(f"{_setting(name)} must be >= {least}, got {value}")


# Settings each stage depends on (the stage reruns when one of them, or an earlier stage, changes).
STAGE_KEYS = {
    "collect": ("tasks", "episodes", "image_size", "seed", "collect_max_steps"),
    "train-vq": ("vq_steps", "vq_batch", "vq_lr", "vq_codes"),
    "pretokenize": ("chunk_size",),
    "train": ("model", "train_steps", "batch_tokens", "micro_tokens", "lr", "world"),
    "train-action-only": ("ablations",),
    "train-causal": ("ablations",),
    "evaluate": ("eval_episodes", "eval_max_steps", "wm_episodes", "wm_horizon", "eval_envs"),
}
STAGES = tuple(STAGE_KEYS)
ABLATION_STAGES = ("train-action-only", "train-causal")
# The run folder of each training stage under --out.
RUN_DIRS = {"train-vq": "vq", "train": "train", "train-action-only": "train_action_only", "train-causal": "train_causal"}


def stages_for(cfg: DemoConfig) -> tuple[str, ...]:
    # With --action-only the main model is the action-only one: training the ablation's would repeat it exactly.
    skip = set() if cfg.ablations else set(ABLATION_STAGES)
    if not cfg.world:
        skip.add("train-action-only")
    return tuple(s for s in STAGES if s not in skip)


def stage_keys(cfg: DemoConfig) -> dict[str, str]:
    keys, upstream = {}, ""
    for stage, names in STAGE_KEYS.items():
        blob = json.dumps({"up": upstream, **{n: getattr(cfg, n) for n in names}}, sort_keys=True, default=list)
        upstream = keys[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


def _marked_complete(path: Path) -> bool:
    """Whether the JSON file a stage ends with says it is complete; a damaged one (cut short, edited) is named and
    its stage runs again."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("complete", False) is True
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        _say(f"{path} cannot be read ({type(e).__name__}: {e}); its stage runs again")
        return False


class Stages:
    """Completion markers under <out>/stages/."""

    def __init__(self, out: Path, cfg: DemoConfig):
        self.dir = out / "stages"
        self.keys = stage_keys(cfg)

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def done(self, stage: str) -> bool:
        p = self._path(stage)
        if not p.is_file():
            return False
        try:
            marker = json.loads(p.read_text())
        except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
            return False
        return isinstance(marker, dict) and marker.get("key") == self.keys[stage]  # JSON, but not a marker's

    def mark(self, stage: str, seconds: float, info: dict | None = None) -> None:
        from .checkpoint import write_text_atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        p = self._path(stage)
        write_text_atomic(p, json.dumps({"key": self.keys[stage], "seconds": seconds, "finished": time.time(),
                                         "info": info or {}}, indent=1, default=str))

    def recorded_seconds(self, stage: str) -> float | None:
        try:
            return float(json.loads(self._path(stage).read_text())["seconds"])
        except (OSError, KeyError, ValueError, TypeError):  # TypeError: JSON that is not a marker's dict
            return None

    def invalidate_from(self, stage: str) -> None:
        for s in STAGES[STAGES.index(stage):]:
            self._path(s).unlink(missing_ok=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for. The simulator workers of collect and evaluate are
    the forkserver's children, not this process's, so their time is not in it."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _say(msg: str) -> None:
    print(f"[worldvla demo] {msg}", flush=True)


def _cli_args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=module.__name__)
    module.add_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- stages
def demo_files(cfg: DemoConfig, out: Path) -> list[Path]:
    """The demo files of this run's tasks: a folder shared with an earlier run (`--fast`, other --tasks) may
    hold other tasks' files, which must not reach the VQGAN or the model."""
    return [out / "demos" / f"{task}.hdf5" for task in cfg.tasks]


class CollectionFailed(ValueError):
    """The collect stage got fewer demonstrations than asked for. A ValueError, so that the command reports it in
    one line, as it does a bad setting: its message says what to change."""


def stage_collect(cfg: DemoConfig, out: Path, progress: bool, fresh: bool = False) -> dict:
    """`fresh` (--force): the task files are collected anew (collect keeps a complete file of the same settings)."""
    from .data.collect import collect

    if fresh:
        for t in cfg.tasks:
            (out / "demos" / f"{t}.hdf5").unlink(missing_ok=True)

    summary = collect(list(cfg.tasks), cfg.episodes, out / "demos", image_size=cfg.image_size, seed=cfg.seed,
                      workers=min(cfg.workers, len(cfg.tasks) * cfg.episodes), max_steps=cfg.collect_max_steps,
                      progress=progress, overwrite=True)  # files of other settings: the stage's key changed
    if summary["incomplete"] and summary["errors"]:  # attempts that raised: their cause, not the expert's luck
        errors = summary["errors"]
        raise CollectionFailed(f"fewer episodes than asked for: {summary['incomplete']}; {len(errors)} attempt(s) "
                               f"raised errors ({'; '.join(errors[:3])}{'; ...' if len(errors) > 3 else ''}): fix "
                               f"their cause, then run the same command again (finished task files are kept)")
    if summary["incomplete"]:
        raise CollectionFailed(f"the scripted experts failed too often on {summary['incomplete']}; the layouts are "
                               f"fixed by --seed, so a rerun fails the same way: choose another --seed or other "
                               f"--tasks")
    return {t: {k: v for k, v in s.items() if k != "path"} for t, s in summary["tasks"].items()}


def _check_not_stopped(stage: str, summary: dict) -> None:
    """A training that SIGTERM ended after a saved step: the demo ends there too (the stage resumes from
    that checkpoint on the next run)."""
    if summary.get("stopped"):
        from .cli import Stopped

        raise Stopped(f"stopped by SIGTERM in {stage} after step {summary['step']}, which is saved")


def stage_train_vq(cfg: DemoConfig, out: Path, progress: bool, resume: bool) -> dict:
    from .train import vq as train_vq
    from .train.checkpointing import has_checkpoints

    run_dir = out / "vq"
    # --resume only where there is a checkpoint to continue: the user passed no --resume, so its "no checkpoint,
    # a new run starts" line would only puzzle. Otherwise the stage starts over in an emptied folder: what an
    # earlier run left there without its checkpoints (its export) is the demo's own, not a run to protect.
    resume = resume and has_checkpoints(run_dir)
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    argv = [*map(str, demo_files(cfg, out)), "--out", str(run_dir), "--config", "small", "--steps", str(cfg.vq_steps),
            "--batch-size", str(cfg.vq_batch), "--lr", str(cfg.vq_lr), "--min-lr", str(cfg.vq_lr / 10),
            "--warmup", str(max(1, min(100, cfg.vq_steps // 10))), "--seed", str(cfg.seed), "--device", "cpu",
            "--save-every", str(max(cfg.vq_steps // 3, 50)), "--keep-last", "1", "--log-every", "10",
            "--n-embed", str(cfg.vq_codes), *(["--resume"] if resume else []),
            # A short run never lets the default usage average (decay 0.99) call a code dead:
            # a faster average and frequent restarts keep the small codebook in use.
            "--usage-decay", "0.9", "--restart-every", "20"]
    if not progress:
        argv.append("--no-progress")
    summary = train_vq.train_vq(_cli_args(train_vq, argv))
    _check_not_stopped("train-vq", summary)
    if not summary.get("export"):
        raise RuntimeError(f"train-vq finished without exporting a VQGAN (summary: {summary})")
    last = {}
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        if lines:
            rec = json.loads(lines[-1])
            last = {k: rec.get(k) for k in ("psnr", "codes_used", "perplexity", "loss")}
    return last


def stage_pretokenize(cfg: DemoConfig, out: Path, progress: bool, fresh: bool = False) -> dict:
    """`fresh` (--force): the store is built anew (build_store keeps the shards its fingerprint still matches)."""
    from .data.store import MANIFEST, build_store

    if fresh:
        shutil.rmtree(out / "store", ignore_errors=True)

    store = build_store(demo_files(cfg, out), out / "store", out / "vq" / "vqgan", chunk_size=cfg.chunk_size, history=2,
                        action=True, world=True, bounds="unit", overwrite=True, progress=progress)
    m = json.loads((store / MANIFEST).read_text())
    return {k: m[k] for k in ("n_samples", "n_action", "n_world", "n_tokens")}


def stage_train(cfg: DemoConfig, out: Path, progress: bool, resume: bool, action_only: bool = False,
                run_name: str = "train", policy_name: str = "policy", attention: str = "chunk") -> dict:
    from .train import trainer
    from .train.checkpointing import has_checkpoints

    run_dir = out / run_name
    resume = resume and has_checkpoints(run_dir)  # as in stage_train_vq
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["--store", str(out / "store"), "--out", str(run_dir), "--config", cfg.model,
            "--steps", str(cfg.train_steps), "--batch-tokens", str(cfg.batch_tokens),
            "--micro-tokens", str(min(cfg.micro_tokens, cfg.batch_tokens)), "--lr", str(cfg.lr),
            "--warmup", "0.05", "--seed", str(cfg.seed), "--device", "cpu", "--log-every", "1",
            "--save-every", str(max(cfg.train_steps // 3, 50)), "--keep-last", "1",
            "--attention", attention, *(["--resume"] if resume else [])]
    if action_only:
        argv += ["--kinds", "action"]
    if not progress:
        argv.append("--no-progress")
    try:
        summary = trainer.train(_cli_args(trainer, argv))
    except ValueError as e:
        if "training diverged" not in str(e):
            raise
        # The trainer's advice names its own options (--warmup, --grad-clip, --overwrite), which the demo does not take.
        raise ValueError(f"{run_name}: {e}. In `worldvla demo`: run it again with a lower --lr (its trainings then "
                         f"start over)") from None
    _check_not_stopped(run_name, summary)
    if not summary.get("export"):
        raise RuntimeError(f"training finished without exporting a policy (summary: {summary})")
    exported = Path(summary["export"])
    if not (exported / "policy.json").is_file():
        raise RuntimeError(f"training exported {exported} without a policy.json: worldvla.inference.policy could "
                           "not be imported by the trainer; check `python -c 'import worldvla.inference.policy'`")
    policy = out / policy_name
    shutil.rmtree(policy, ignore_errors=True)
    shutil.copytree(exported, policy)
    # From the run's log, which a resumed run appends to: this process's losses start at the checkpoint it
    # resumed from (none at all when that was the final one).
    log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    first = next((r["loss"] for r in log if r["step"] == 1), None)
    final = next((r["loss"] for r in reversed(log) if r["step"] == cfg.train_steps), None)
    return {"final_loss": final, "first_loss": first, "action_only": action_only, "attention": attention}


def stage_evaluate(cfg: DemoConfig, out: Path, progress: bool, reuse: bool = True) -> dict:
    """`reuse`: take the closed loops an earlier run saved for the same policy files and settings (--force
    runs them again: the policy files can be the same while the decoding code has changed)."""
    from .eval.metaworld import evaluate

    main = "WorldVLA" if cfg.world else "WorldVLA (action-only)"
    policies, names = [out / "policy"], [main]
    if cfg.ablations:
        if "train-action-only" in stages_for(cfg):
            policies, names = policies + [out / "policy_action_only"], names + ["action-only"]
        policies, names = policies + [out / "policy_causal"], names + ["trained without chunk mask"]
    return evaluate(policies, list(cfg.tasks), cfg.eval_episodes, out / "eval", seed=cfg.seed,
                    max_steps=cfg.eval_max_steps, n_envs=cfg.eval_envs, random_baseline=True,
                    # an action-only model never saw a world-model sample: no world-model scores for it
                    wm_episodes=cfg.wm_episodes if cfg.world else 0, wm_horizon=cfg.wm_horizon, progress=progress,
                    variant_names=names, causal_variant=cfg.ablations, env_workers=cfg.workers, resume=reuse)


# ---------------------------------------------------------------------- driver
# What the demo writes into --out, replacing what is there under these names.
DEMO_OUTPUTS = ("demos", "vq", "store", "train", "train_action_only", "train_causal", "policy", "policy_action_only",
                "policy_causal", "eval", "metrics.json")


def check_out_folder(out: Path) -> None:
    """Refuse an --out that is not a demo's folder (no demo_config.json, no stages/) but holds names the demo
    writes: a training run's policy/ or an evaluation's metrics.json there would be replaced without a word."""
    if not out.is_dir() or (out / "demo_config.json").is_file() or (out / "stages").is_dir():
        return
    clash = sorted(name for name in DEMO_OUTPUTS if (out / name).exists())
    if clash:
        raise ValueError(f"--out {out} holds files that are not a worldvla demo's ({', '.join(clash)}), which the "
                         f"demo would replace: choose a new or empty folder for the demo")


def load_kernels_first() -> None:
    """Import the optional kernel backends (Triton) before anything renders with MuJoCo:
    Triton's LLVM clashes with the LLVM of Mesa's software renderer when it is loaded
    second, and the process crashes."""
    from .ops import dispatch

    dispatch.available("masked_attention")


def run_demo(cfg: DemoConfig, out, progress: bool = True, force: bool = False) -> dict:
    cfg.check()
    load_kernels_first()
    from .checkpoint import write_text_atomic

    out = Path(out)
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's results must not stand beside these settings as theirs: written again when this run ends.
    (out / "metrics.json").unlink(missing_ok=True)
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(cfg), indent=1))
    stages = Stages(out, cfg)
    if force:
        stages.invalidate_from(STAGES[0])
    active = stages_for(cfg)
    outputs_ok = {
        "collect": lambda: all((out / "demos" / f"{t}.hdf5").is_file() for t in cfg.tasks),
        "train-vq": lambda: (out / "vq" / "vqgan" / "config.json").is_file(),
        "pretokenize": lambda: _marked_complete(out / "store" / "manifest.json"),
        "train": lambda: (out / "policy" / "policy.json").is_file(),
        "train-action-only": lambda: (out / "policy_action_only" / "policy.json").is_file(),
        "train-causal": lambda: (out / "policy_causal" / "policy.json").is_file(),
        "evaluate": lambda: _marked_complete(out / "eval" / "metrics.json"),
    }
    results: dict = {"config": asdict(cfg), "stages": {}}
    t_total = time.perf_counter()
    rerun = False  # once a stage reruns, every later stage does too
    for stage in active:
        if not rerun and stages.done(stage) and outputs_ok[stage]():
            secs = stages.recorded_seconds(stage)
            results["stages"][stage] = {"cached": True, "seconds": 0.0, "original_seconds": secs}
            _say(f"{stage}: cached ({secs:.0f} s when it ran)" if secs is not None else f"{stage}: cached")
            continue
        rerun = True
        started = out / "stages" / f"{stage}.started"
        # --force redoes everything: an interrupted training starts over instead of resuming.
        resume = (not force and stage in ("train-vq", "train", *ABLATION_STAGES) and started.is_file()
                  and started.read_bytes() == stages.keys[stage].encode())  # bytes: a damaged marker is no match
        stages.invalidate_from(stage)
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(stages.keys[stage])
        _say(f"{stage} ...")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        if stage == "collect":
            info = stage_collect(cfg, out, progress, fresh=force)
        elif stage == "train-vq":
            info = stage_train_vq(cfg, out, progress, resume)
        elif stage == "pretokenize":
            info = stage_pretokenize(cfg, out, progress, fresh=force)
        elif stage == "train":
            info = stage_train(cfg, out, progress, resume, action_only=not cfg.world)
        elif stage == "train-action-only":
            info = stage_train(cfg, out, progress, resume, action_only=True, run_name="train_action_only",
                               policy_name="policy_action_only")
        elif stage == "train-causal":
            info = stage_train(cfg, out, progress, resume, action_only=not cfg.world, run_name="train_causal",
                               policy_name="policy_causal", attention="causal")
        else:
            info = stage_evaluate(cfg, out, progress, reuse=not force)
        secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        stages.mark(stage, secs, info if stage != "evaluate" else {})
        started.unlink(missing_ok=True)
        results["stages"][stage] = {"cached": False, "seconds": secs, "main_process_cpu_seconds": cpu, "info": info
                                    if stage != "evaluate" else {}}
        _say(f"{stage}: done in {secs:.1f} s ({cpu:.0f} CPU-s in this process"
             + ("; the simulator workers' not counted)" if stage in ("collect", "evaluate") else ")"))
    results["total_seconds"] = time.perf_counter() - t_total
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    results["eval"] = metrics
    results["policy"] = str(out / "policy")
    write_text_atomic(out / "metrics.json", json.dumps(results, indent=1, default=str))
    return results


def print_table(results: dict) -> None:
    from .eval.metaworld import format_results

    print(format_results(results["eval"]))
    st = results["stages"]
    parts = [f"{s} " + ("cached" if v["cached"] else f"{v['seconds']:.0f} s") for s, v in st.items()]
    print(f"stages: {', '.join(parts)}; total {results['total_seconds']:.0f} s")
    print(f"policy: {results['policy']}  (worldvla serve --checkpoint {results['policy']})")
    out = Path(results["policy"]).parent
    # The curves of this run's trainings only: the folder may hold those of an earlier run's other stages.
    runs = [RUN_DIRS[s] for s in st if s in RUN_DIRS]
    curves = sorted(str(out / r / "training.png") for r in runs if (out / r / "training.png").is_file())
    print(f"figures: {out / 'eval'} (success, world model, GIFs)"
          + (f"; training curves: {', '.join(curves)}" if curves else ""))


EPILOG = """\
defaults: 3 tasks x 30 expert demos at 64x64 px, a 256-code VQGAN (300 steps of 12 frames), the
`small` WorldVLA (3.6M parameters with the 811-token vocabulary, 900 steps of 1,536 tokens, chunks
of K=5), 10 evaluation episodes per task on held-out layouts (150 steps max) next to a uniform-random
policy on the same layouts, world-model PSNR/SSIM and VQ-code accuracy on 2 held-out expert rollouts
per task (8 imagined steps). The latest run alone in the source repository's benchmarks/NOTES.md (Demo runs), on a 2-core AMD EPYC
with AVX-512: collect 35 s, train-vq 89 s, pretokenize 20 s, train 240 s, evaluate 52 s (7 min 18 s);
4 min 43 s to 18 min 21 s across the runs there (the longest with other jobs on the cores; 1 h 17 min once
with test runs on both cores throughout).
A second run reuses every stage.

examples:
  worldvla demo                                  # the default run into ./worldvla_demo
  worldvla demo --fast --out /tmp/smoke          # plumbing check, 10-20 seconds
  worldvla demo --ablations                      # + action-only and no-chunk-mask models (the paper's ablations)
  worldvla eval --policy worldvla_demo/policy --tasks drawer-open-v3 --episodes 50 --out eval50
  worldvla serve --checkpoint worldvla_demo/policy
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = DemoConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.epilog = EPILOG
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated Meta-World tasks (default: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--out", default="./worldvla_demo", help="output folder; stages cached there (default: %(default)s)")
    parser.add_argument("--episodes", type=positive_int, default=None,
                        help=f"expert demonstrations per task (default: {d.episodes})")
    parser.add_argument("--eval-episodes", type=positive_int, default=None,
                        help=f"closed-loop evaluation episodes per task (default: {d.eval_episodes})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"square frame size in pixels: any multiple of 32, such as 64 or 128 "
                             f"(default: {d.image_size})")
    parser.add_argument("--chunk-size", type=positive_int, default=None, help=f"actions per chunk K (default: {d.chunk_size})")
    parser.add_argument("--train-steps", type=positive_int, default=None, help=f"WorldVLA optimizer steps (default: {d.train_steps})")
    parser.add_argument("--vq-steps", type=positive_int, default=None, help=f"VQGAN optimizer steps (default: {d.vq_steps})")
    parser.add_argument("--model", default=None, choices=("tiny", "small"), help=f"model size (default: {d.model})")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"WorldVLA peak learning rate (default: {d.lr})")
    parser.add_argument("--action-only", action="store_true",
                        help="train the policy on action samples only (no world-model samples)")
    parser.add_argument("--ablations", action="store_true",
                        help="the paper's ablations: also train an action-only model and a model without the "
                             "chunk mask (plain causal attention in training and decoding), both with the same "
                             "steps and token budget, and evaluate chunk-mask models decoded without the mask; "
                             "about triples training time and evaluation time (with --action-only, whose model is the "
                             "action-only one, only the model without the chunk mask is added)")
    parser.add_argument("--workers", type=positive_int, default=None, help="collection and evaluation worker processes (default: 2)")
    parser.add_argument("--seed", type=seed32, default=None, help=f"seed of the layouts, the models and the "
                        f"evaluation (default: {d.seed})")
    parser.add_argument("--fast", action="store_true",
                        help="tiny sizes (1 task, 2 demos, a few steps): checks the pipeline in 10-20 seconds")
    parser.add_argument("--force", action="store_true", help="ignore cached stages and redo everything")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig.fast_preset() if args.fast else DemoConfig()
    # --tasks "" is an empty list (refused by DemoConfig.check), not the default tasks; a task named twice is one
    # task (every stage runs it once), and the stages' keys must not tell `a,a` from `a`
    tasks = None if args.tasks is None else tuple(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    over = {"tasks": tasks,
            "episodes": args.episodes, "eval_episodes": args.eval_episodes, "image_size": args.image_size,
            "chunk_size": args.chunk_size, "train_steps": args.train_steps, "vq_steps": args.vq_steps,
            "model": args.model, "lr": args.lr, "workers": args.workers, "seed": args.seed}
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.action_only:
        cfg = replace(cfg, world=False)
    if args.ablations:
        cfg = replace(cfg, ablations=True)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        results = run_demo(cfg, args.out, progress=not args.no_progress, force=args.force)
    except (ValueError, ImportError) as e:
        print(f"worldvla demo: {e}", file=sys.stderr)
        return 2
    print_table(results)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="worldvla demo"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
