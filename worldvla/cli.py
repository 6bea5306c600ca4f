"""`worldvla` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args)`; modules are imported only when needed."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

COMMANDS = {
    "collect": ("worldvla.data.collect", "collect Meta-World demonstrations with scripted experts into HDF5"),
    "pretokenize": ("worldvla.data.store", "tokenize HDF5 demonstrations into a sharded token store"),
    "train-vq": ("worldvla.train.vq", "train the VQGAN image tokenizer on demonstration frames"),
    "train": ("worldvla.train.trainer", "train WorldVLA (single process or torchrun + FSDP2)"),
    "eval": ("worldvla.eval.metaworld", "closed-loop success rates and world-model metrics on Meta-World"),
    "eval-libero": ("worldvla.eval.libero", "LIBERO evaluation following the release's protocol"),
    "imagine": ("worldvla.eval.imagine", "roll the world model out from a frame under actions: frames, scores, GIF"),
    "demo": ("worldvla.demo", "the whole chain on Meta-World: collect, train, evaluate (CPU, 5-15 min)"),
    "serve": ("worldvla.serve", "serve a policy to robots over WebSocket + msgpack"),
    "bench": ("worldvla.bench", "run benchmarks and write benchmarks/results/*.json"),
    "info": ("worldvla.info", "what this machine will run: versions, CPU width, CUDA build, auto order per op"),
}


# WorldVLAPolicy's decoding modes (inference.policy.POLICY_MODES), spelled out so that building a parser imports
# no torch.
POLICY_MODE_CHOICES = ("parallel", "sequential", "causal", "release")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a number that is neither nan nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (`only`), so one module's
    missing optional dependency never breaks another command."""
    parser = argparse.ArgumentParser(prog="worldvla", description="WorldVLA: an autoregressive action world model.")
    parser.add_argument("--version", action="version", version=f"worldvla {importlib.import_module('worldvla').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            try:
                importlib.import_module(module).add_arguments(p)
            except ImportError as e:
                p.set_defaults(_unavailable=str(e))
        p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"worldvla {args.command}: unavailable here: {args._unavailable}", file=sys.stderr)
        return 2
    # Bad inputs (missing files are OSErrors) get one line; any other error keeps its traceback.
    try:
        rc = importlib.import_module(args._module).run(args)
    except (ValueError, OSError) as e:
        if os.environ.get("WORLDVLA_TRACEBACK"):
            raise
        print(f"worldvla {args.command}: error: {e} (WORLDVLA_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
