"""`worldvla` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args)`; modules are imported only when needed."""
from __future__ import annotations

import argparse
import difflib
import importlib
import math
import os
import select
import shlex
import signal
import sys
from pathlib import Path

COMMANDS = {
    "collect": ("worldvla.data.collect", "collect Meta-World demonstrations with scripted experts into HDF5"),
    "pretokenize": ("worldvla.data.store", "tokenize HDF5 demonstrations into a sharded token store"),
    "train-vq": ("worldvla.train.vq", "train the VQGAN image tokenizer on demonstration frames"),
    "train": ("worldvla.train.trainer", "train WorldVLA (single process or torchrun + FSDP2)"),
    "eval": ("worldvla.eval.metaworld", "closed-loop success rates and world-model metrics on Meta-World"),
    "eval-libero": ("worldvla.eval.libero", "LIBERO evaluation following the release's protocol"),
    "import-release": ("worldvla.inference.from_release",
                       "a policy folder from the release's checkpoint files (model, tokenizer folder)"),
    "imagine": ("worldvla.eval.imagine", "roll the world model out from a frame under actions: frames, scores, GIF"),
    "demo": ("worldvla.demo", "the whole chain on Meta-World: collect, train, evaluate (CPU, 5-15 min)"),
    "serve": ("worldvla.serve", "serve a policy to robots over WebSocket + msgpack"),
    "bench": ("worldvla.bench", "run benchmarks and write benchmarks/results/*.json"),
    "info": ("worldvla.info", "what this machine will run: versions, CPU width, CUDA build, auto order per op"),
}


# WorldVLAPolicy's decoding modes (inference.policy.POLICY_MODES), spelled out so that building a parser imports
# no torch.
POLICY_MODE_CHOICES = ("parallel", "sequential", "causal", "release")
# Where the policy folder a command reads (serve, eval, eval-libero) comes from.
POLICY_FOLDER_HELP = ("policy folder: <run>/policy of `worldvla train`, worldvla_demo/policy of `worldvla demo`, one "
                      "`worldvla import-release` writes from the release's checkpoint, or worldvla.inference.save_policy's")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def seed32(text: str) -> int:
    """argparse type of the --seed of collect, eval and demo: an integer in [0, 2**32), the range the layout
    seeds derive from (a larger one would give the layouts of the seed 2**32 below it)."""
    value = non_negative_int(text)
    if value >= 1 << 32:
        raise argparse.ArgumentTypeError(f"must be < 2**32 ({(1 << 32) - 1} at most; the layout seeds derive from "
                                         f"32 bits), got {value}")
    return value


STOPPED_RC = 128 + signal.SIGTERM  # the exit status of a process that SIGTERM ended


class Stopped(Exception):
    """A command's work ended early on SIGTERM, its finished part saved (a training inside `worldvla demo`);
    `main` prints the message and how to continue, and returns SIGTERM's exit status."""


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def unit_open_float(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
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
                # Its --help, which lists no options then, says why instead of looking like a command without any.
                p.epilog = f"unavailable here: {e}"
        p.set_defaults(_module=module)
    return parser


# How an interrupted command continues (Ctrl-C): what it finished is kept.
_CONTINUE = {
    "collect": "run the same command again to continue: finished task files are kept",
    "pretokenize": "run the same command again to continue: finished shards are kept",
    "eval": "run the same command again to continue: finished closed loops are kept",
    "eval-libero": "run the same command again to continue: finished episodes are kept",
    "demo": "run the same command again to continue: finished stages are kept",
    "imagine": "run the same command again to imagine the frames anew (a rollout is written only when it ends)",
}


def how_to_continue(args) -> str | None:
    """What to run to go on with a command that stopped early (Ctrl-C, SIGTERM), from its arguments."""
    if args.command == "bench":
        return _bench_continue(args)
    if args.command not in ("train", "train-vq"):
        if getattr(args, "no_resume", False):  # the same command would run everything again
            return "run it again without --no-resume to keep what it finished"
        if args.command == "demo" and getattr(args, "force", False):  # --force clears every stage again
            return "run it again without --force to keep the finished stages"
        return _CONTINUE.get(args.command)
    from .train.checkpointing import has_checkpoints  # the command imported it (and torch) already

    out = getattr(args, "out", None)
    if out is None or not has_checkpoints(out):
        return "no checkpoint was written yet: run the same command again to start over"
    if getattr(args, "resume", False):
        return "run the same command again to continue from its last checkpoint"
    if getattr(args, "overwrite", False) and not getattr(args, "run_dir_ready", False):
        return ("stopped before --overwrite removed the earlier run, whose checkpoints are untouched: run the same "
                "command again to start over")
    if getattr(args, "overwrite", False):  # --resume with --overwrite is refused
        return "run the same command with --resume instead of --overwrite to continue from its last checkpoint"
    return "add --resume to the same command to continue from its last checkpoint"


def _bench_continue(args) -> str:
    """Which benchmarks finished (worldvla.bench.run records them on `args`) and the command for the rest."""
    finished, left = getattr(args, "finished", []), getattr(args, "remaining", None)
    done = f"{', '.join(finished)} finished, results in {args.out}; " if finished else ""
    if not finished or not left:
        return done + "run the same command again to rerun the benchmarks"
    opts = (" --quick" if args.quick else "") + (f" --device {args.device}" if args.device else "")
    # Quoted as a shell takes it: an --out with a space or a quote is one word when the line is pasted back.
    opts += f" --out {shlex.quote(args.out)}" if args.out != "benchmarks/results" else ""  # bench's default
    return done + f"run the rest with: worldvla bench {' '.join(left)}{opts}"


def _missing_dependency(e: ImportError) -> bool:
    """An ImportError that says what to install (an optional dependency or extra missing here), or a
    module outside worldvla that is not installed. Any other (a name that worldvla's own modules do not
    have, a worldvla module missing) is a bug or a broken install, and keeps its traceback."""
    if "pip install" in str(e) or "apt-get install" in str(e):  # a package, or a system library (OpenGL's)
        return True
    name = getattr(e, "name", None)
    return isinstance(e, ModuleNotFoundError) and bool(name) and name.split(".")[0] != "worldvla"


def _out_folder_problem(out) -> str | None:
    """Why the folder `out` (--out) cannot be made or written into, if the path says so already: it, or a
    folder above it, is a file, or it is empty."""
    if out is None:
        return None
    if not str(out).strip():  # `--out "$RUN"` with RUN unset: Path("") is the current folder, written into unasked
        return "--out is empty: name a folder (it is created if missing)"
    path = Path(out).expanduser()
    try:
        for p in (path, *path.parents):
            if p.is_symlink() and not p.exists():  # a dangling link: making the folder fails only at the first write
                where = "is a link" if p == path else f"lies under {p}, a link"
                return (f"--out {out} {where} to {os.readlink(p)}, which does not exist: create that folder, or "
                        f"name another")
            if p.exists():
                if p.is_dir():
                    return None
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                return f"--out {out} {what}, not a folder: name a folder (it is created if missing)"
    except OSError as e:  # a name too long for the file system, a folder above it that cannot be read: a traceback
        return f"--out {out} cannot be used ({e.strerror or e}): name another folder"
    return None


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    """The parser of `command` (a subcommand), or None for no command or one the parser does not have."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs[0].choices.get(command) if subs and command else None


def _refuse_unknown(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]) -> None:
    """Exit on arguments the command does not take, as argparse does, but from the command's own parser (its
    usage, `worldvla demo: error:`) and with the likely option for each misspelt one (`--fats`: `--fast`)."""
    sub = _command_parser(parser, command)
    if sub is None:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0], options, n=1) if arg.startswith("--") else []
        if close:
            hints.append(f"{arg}: did you mean {close[0]}?")
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
              + f"; `worldvla {command} --help` lists its options")


def _misspelt_required(parser: argparse.ArgumentParser, command: str | None, words: list[str]) -> list[str]:
    """The words after `command` that name none of its long options, where one of its required options is missing:
    argparse reports only the missing one (`train --stroe s`: "the following arguments are required: --store"),
    before any word it does not know, so the misspelling that caused it goes unnamed. Empty otherwise."""
    sub = _command_parser(parser, command)
    if sub is None or sub.get_default("_unavailable"):
        return []
    words = words[:words.index("--")] if "--" in words else words  # after `--`, every word is a value
    named = {w: w.split("=", 1)[0] for w in words if w.startswith("--")}  # `--out=x` names --out

    def means(name: str, option: str) -> bool:  # as argparse matches a long option: whole, or a prefix of it
        return option == name or (sub.allow_abbrev and option.startswith(name))

    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    missing = [a for a in sub._actions if a.required and a.option_strings
               and not any(means(n, o) for n in named.values() for o in a.option_strings)]
    unknown = [w for w, n in named.items() if not any(means(n, o) for o in options)]
    return unknown if missing else []


def _speaker(command: str) -> str:
    """Who a closing line speaks for: `worldvla train`, and under torchrun its rank (`worldvla train (rank 1 of
    2)`), since every rank prints its own: two like lines are then two ranks failing alike, and a line of one
    rank alone names the rank that failed."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    many = rank is not None and world.isdigit() and int(world) > 1
    return f"worldvla {command}" + (f" (rank {rank} of {world})" if many else "")


def _traceback_wanted() -> bool:
    """Whether WORLDVLA_TRACEBACK asks for tracebacks: set to anything but empty, 0, false, no or off."""
    return os.environ.get("WORLDVLA_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`worldvla info | head -1`), as against a broken
    pipe of the command's own (a worker's, a socket's). False where it cannot tell (no poll, no file)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):
        return False
    poller.register(fd, select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


def _reparse_intermixed(parser: argparse.ArgumentParser, argv: list[str], args, unknown: list[str]):
    """`worldvla bench vq --quick sampling`: argparse gives a list positional (bench's names, pretokenize's
    inputs) only the words before the first option and leaves the later ones unknown; the command's own
    parser takes them wherever they stand. Anything else stays as parse_known_args left it."""
    sub = _command_parser(parser, args.command)
    if (sub is None or all(a.startswith("-") for a in unknown)
            or not any(not a.option_strings and a.nargs in ("*", "+") for a in sub._actions)):
        return args, unknown
    at = argv.index(args.command)
    # Unknown options stay out of the second parse, which would stop at the first one and leave every word after
    # it unknown too (`bench vq --quik sampling` named `sampling` unrecognized); they are refused as before.
    bad, rest = [a for a in unknown if a.startswith("-")], []
    pending = list(bad)
    for a in argv[at + 1:]:
        if a in pending:
            pending.remove(a)
        else:
            rest.append(a)
    try:
        args, later = sub.parse_known_intermixed_args(rest, argparse.Namespace(command=args.command))
    except TypeError:  # a parser argparse cannot parse intermixed
        return args, unknown
    return args, [*bad, *later]  # the words before the command are options, the unknown of them in `bad`


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while the command's modules load (torch: a second or two)
        if _traceback_wanted():
            raise
        print("\nworldvla: interrupted", file=sys.stderr)
        return 130


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    close = difflib.get_close_matches(chosen, COMMANDS, n=1) if chosen and chosen not in COMMANDS else []
    if close:  # `worldvla trian`: argparse would list every command without pointing at the likely one
        parser.error(f"unknown command {chosen!r} (did you mean {close[0]!r}?); `worldvla --help` lists them all")
    if chosen in COMMANDS:  # a misspelt required option is named, not only the required one it left missing
        misspelt = _misspelt_required(parser, chosen, argv[argv.index(chosen) + 1:])
        if misspelt:
            _refuse_unknown(parser, chosen, misspelt)
    # parse_known_args: a subcommand whose module failed to import has no options, and its reason must show
    # whatever options were given; every other subcommand refuses unknown arguments as parse_args does.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args, unknown = _reparse_intermixed(parser, argv, args, unknown)
    if getattr(args, "_unavailable", None):
        print(f"worldvla {args.command}: unavailable here: {args._unavailable}", file=sys.stderr)
        return 2
    if unknown:
        _refuse_unknown(parser, args.command, unknown)
    if args.command is None:
        parser.print_help()
        return 2
    if isinstance(getattr(args, "out", None), str):
        # `--out=~/x` reaches us unexpanded (the shell expands only a word-initial ~): expanded once, here, so that
        # the check below and every file the command writes name the same folder, not ./~/x.
        args.out = os.path.expanduser(args.out)
    out_problem = _out_folder_problem(getattr(args, "out", None))
    if out_problem:  # every command's --out is a folder: refused before any work, not when the first file is written
        print(f"{_speaker(args.command)}: error: {out_problem}", file=sys.stderr)
        return 2
    # Bad inputs (missing files are OSErrors) and a missing optional dependency get one line; any other error
    # keeps its traceback.
    try:
        rc = importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        if _traceback_wanted():
            raise
        how = how_to_continue(args)
        print(f"\n{_speaker(args.command)}: interrupted" + (f"; {how}" if how else ""), file=sys.stderr)
        return 130
    except Stopped as e:
        how = how_to_continue(args)
        print(f"{_speaker(args.command)}: {e}" + (f"; {how}" if how else ""), file=sys.stderr)
        return STOPPED_RC
    except (ValueError, OSError, ImportError) as e:
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            # The reader took what it wanted: end quietly, as a command that SIGPIPE ended, with stdout on
            # /dev/null so that the interpreter's last flush does not fail on the pipe again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 128 + signal.SIGPIPE
        if _traceback_wanted() or (isinstance(e, ImportError) and not _missing_dependency(e)):
            raise
        print(f"{_speaker(args.command)}: error: {e} (WORLDVLA_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
