"""`worldvla` command line: how `cli.main` ends a command (Ctrl-C, a missing dependency, a subcommand that is
unavailable here), the argparse types, the device option and the help texts."""
import argparse
import importlib
from pathlib import Path

import pytest

from worldvla import cli
from worldvla.cli import main


# ---------------------------------------------------------------------- argparse types
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "-1", "-1e-9"])
def test_non_negative_float_refuses_non_finite_and_negative_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.non_negative_float(text)


def test_float_types_accept_ordinary_numbers_and_name_the_bad_ones():
    assert cli.non_negative_float("0") == 0.0 and cli.non_negative_float("1e-8") == 1e-8
    assert cli.finite_float("-2.5") == -2.5
    assert cli.positive_float("3") == 3.0 and cli.unit_float("1") == 1.0
    for fn, text in ((cli.positive_float, "0"), (cli.unit_float, "1.5"), (cli.unit_float, "nan"),
                     (cli.finite_float, "inf"), (cli.finite_float, "x")):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text) if text == "x" else text):
            fn(text)


# ---------------------------------------------------------------------- Ctrl-C
def _interrupt(module, monkeypatch, **done):
    """`module.run` interrupted at once, after setting `done` on args (how far the real one had got)."""
    def interrupted(args):
        vars(args).update(done)
        raise KeyboardInterrupt

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)


def _main_interrupted(argv, capsys) -> str:
    try:
        rc = main(argv)
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped worldvla.cli.main (a 20-line traceback on a terminal)")
    assert rc == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"worldvla {argv[0]}: interrupted; " in err, err
    return err


@pytest.mark.parametrize("command,module,argv", [
    ("pretokenize", "worldvla.data.store", ["d", "--out", "o", "--vqgan", "v"]),
    ("collect", "worldvla.data.collect", ["--out", "o"]),
    ("demo", "worldvla.demo", ["--fast"]),
])
def test_ctrl_c_ends_in_one_line_saying_how_to_continue(command, module, argv, monkeypatch, capsys):
    _interrupt(module, monkeypatch)
    assert "run the same command again to continue" in _main_interrupted([command, *argv], capsys)


@pytest.mark.parametrize("command,module,argv", [("train", "worldvla.train.trainer", ["--store", "s"]),
                                                 ("train-vq", "worldvla.train.vq", ["d"])])
def test_ctrl_c_in_a_training_says_whether_resume_continues_it(command, module, argv, monkeypatch, capsys,
                                                               tmp_path):
    _interrupt(module, monkeypatch)
    out = tmp_path / "run"
    base = [command, *argv, "--out", str(out)]
    assert "no checkpoint was written yet: run the same command again" in _main_interrupted(base, capsys)
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert "add --resume to the same command to continue" in _main_interrupted(base, capsys)
    assert "run the same command again to continue" in _main_interrupted([*base, "--resume"], capsys)
    # stopped before --overwrite removed the earlier run (opening the store, building the model): that run is
    # untouched, and --resume would continue it rather than this one
    assert "before --overwrite removed the earlier run" in _main_interrupted([*base, "--overwrite"], capsys)
    # after it: --resume with --overwrite is refused, so the advice swaps them
    _interrupt(module, monkeypatch, run_dir_ready=True)
    assert "with --resume instead of --overwrite" in _main_interrupted([*base, "--overwrite"], capsys)


def test_ctrl_c_in_imagine_says_to_run_it_again(monkeypatch, capsys):
    """It used to print only "interrupted"."""
    _interrupt("worldvla.eval.imagine", monkeypatch)
    assert "run the same command again" in _main_interrupted(["imagine", "p", "--demos", "d.hdf5"], capsys)


def _stand_in_benchmarks(monkeypatch, interrupted: str) -> None:
    """vq, sampling and cpu_ops as benchmarks that return their JSON's path at once, `interrupted` by Ctrl-C."""
    import sys
    import types

    def bench(name):
        def run(quick, device, out_dir):
            if name == interrupted:
                raise KeyboardInterrupt
            return f"{out_dir}/{name}.json"
        monkeypatch.setitem(sys.modules, f"worldvla.benchmarks.{name}", types.SimpleNamespace(run=run))

    for name in ("vq", "sampling", "cpu_ops"):
        bench(name)


def test_ctrl_c_in_bench_names_what_finished_and_the_command_for_the_rest(monkeypatch, capsys, tmp_path):
    """It used to print only "interrupted"."""
    _stand_in_benchmarks(monkeypatch, interrupted="sampling")
    err = _main_interrupted(["bench", "vq", "sampling", "cpu_ops", "--quick", "--out", str(tmp_path)], capsys)
    assert err.endswith(f"vq finished, results in {tmp_path}; run the rest with: worldvla bench sampling cpu_ops "
                        f"--quick --out {tmp_path}"), err
    err = _main_interrupted(["bench", "sampling", "vq"], capsys)
    assert err.endswith("interrupted; run the same command again to rerun the benchmarks"), err


def test_an_unknown_benchmark_is_one_error_line(capsys):
    assert main(["bench", "vq", "nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("worldvla bench: error: unknown benchmark(s) ['nosuch']; choose from")
    assert "nosuch" not in captured.out


def test_ctrl_c_under_no_resume_says_to_drop_it(monkeypatch, capsys):
    """`eval --no-resume` runs every closed loop again: rerunning the same command would not continue."""
    _interrupt("worldvla.eval.metaworld", monkeypatch)
    err = _main_interrupted(["eval", "--policy", "p", "--tasks", "reach-v3", "--out", "o", "--no-resume"], capsys)
    assert "run it again without --no-resume" in err


def test_ctrl_c_in_demo_force_says_to_drop_it(monkeypatch, capsys):
    """`demo --force` clears every stage: "run the same command again to continue: finished stages are kept"
    started it all over."""
    _interrupt("worldvla.demo", monkeypatch)
    err = _main_interrupted(["demo", "--fast", "--force"], capsys)
    assert err.endswith("interrupted; run it again without --force to keep the finished stages"), err
    assert "run the same command again" in _main_interrupted(["demo", "--fast"], capsys)


def _tiny_store(root: Path) -> Path:
    import numpy as np
    import torch

    from worldvla.data.hdf5 import write_demos
    from worldvla.data.store import build_store
    from worldvla.vqgan import VQGAN, VQGANConfig

    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (T, 4)).astype(np.float32)} for T in (8, 6)]
    write_demos(root / "demos" / "a.hdf5", demos, "push the red block")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64))
    return build_store(root / "demos", root / "store", vq, chunk_size=3, progress=False)


def test_ctrl_c_while_the_commands_modules_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first seconds, while a command's modules (torch) load to build its options: one line and
    exit 130, not a traceback; and the command line itself starts without importing torch."""
    import subprocess
    import sys

    def interrupted(chosen):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err.strip() == "worldvla: interrupted"
    probe = "import sys, worldvla.cli; from worldvla import __version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


def test_a_real_sigint_during_training_exits_130_without_a_traceback(tmp_path, interrupt_cli):
    """A terminal's Ctrl-C (SIGINT to the process group) in the middle of `worldvla train`: one line, exit 130,
    and the checkpoint written before it resumes."""
    store = _tiny_store(tmp_path)
    out = tmp_path / "run"
    rc, err = interrupt_cli(["train", "--store", store, "--out", out, "--config", "tiny", "--steps", 100000,
                             "--batch-tokens", 300, "--save-every", 1, "--device", "cpu", "--no-progress"],
                            ready=lambda: (out / "checkpoints" / "latest").is_file())  # training is under way
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "worldvla train: interrupted; add --resume" in err


# ---------------------------------------------------------------------- ImportError
def test_a_missing_dependency_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from worldvla.train import trainer

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    errors = iter([ImportError('Meta-World is not installed; install the simulator extra with: pip install '
                               '"worldvla[sim]"'),
                   ModuleNotFoundError("No module named 'websockets'", name="websockets")])

    def missing(args):
        raise next(errors)

    monkeypatch.setattr(trainer, "run", missing)
    for needle in ("pip install", "No module named 'websockets'"):
        assert main(["train", "--store", "s", "--out", "o"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("worldvla train: error:") and needle in err

    def bug(args):  # a name worldvla's own module does not have: a bug, shown with its traceback
        raise ImportError("cannot import name 'nothing' from 'worldvla.model'", name="worldvla.model")

    monkeypatch.setattr(trainer, "run", bug)
    with pytest.raises(ImportError, match="cannot import name"):
        main(["train", "--store", "s", "--out", "o"])

    def own_module_missing(args):
        raise ModuleNotFoundError("No module named 'worldvla.gone'", name="worldvla.gone")

    monkeypatch.setattr(trainer, "run", own_module_missing)
    with pytest.raises(ModuleNotFoundError):
        main(["train", "--store", "s", "--out", "o"])


# ---------------------------------------------------------------------- a subcommand unavailable here
def test_an_unavailable_subcommand_says_why_whatever_options_are_given(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "collect", ("worldvla._no_such_module_", "collect (test stand-in)"))
    for argv in (["collect"], ["collect", "--out", "x", "--episodes", "3"], ["collect", "pos", "--flag"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "worldvla collect: unavailable here:" in err and "_no_such_module_" in err
    # An available command still refuses arguments it does not know, as argparse does.
    with pytest.raises(SystemExit) as e:
        main(["info", "--no-such-option"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ---------------------------------------------------------------------- --device
def test_an_unknown_device_name_is_one_clear_error():
    from worldvla.devices import torch_device

    for name in ("gpu", "cuda:x", "cuda:0 "):
        with pytest.raises(ValueError, match=r"unknown device .*--device.*cpu, cuda or cuda:N"):
            torch_device(name)
    assert str(torch_device("cpu")) == "cpu"
    # Names torch parses but this package does not run on failed deep inside torch, with a traceback.
    for name in ("mps", "xpu", "meta", "xla"):
        with pytest.raises(ValueError, match=rf"device {name}.* is not one this package runs on: use cpu, cuda"):
            torch_device(name)


def test_cpu_devices_with_an_index():
    """torch parses cpu:N and puts its tensors on `cpu`, which compares unequal to cpu:N, so a check that
    compares devices would refuse tensors on the very device asked for. cpu:0 is `cpu`; other indices name no
    device (cpu:1 was taken as the CPU) and are refused."""
    import torch

    from worldvla.devices import torch_device

    assert torch_device("cpu:0") == torch.device("cpu") == torch_device(torch.device("cpu", 0))
    assert torch.zeros(1, device=torch_device("cpu:0")).device == torch_device("cpu:0")
    for name in ("cpu:1", torch.device("cpu", 3)):
        with pytest.raises(ValueError, match=r"cpu:\d \(--device\): torch has one CPU device, `cpu`"):
            torch_device(name)


def test_bench_with_an_unknown_device_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["bench", "vq", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown device 'gpu' (--device)" in err


# ---------------------------------------------------------------------- help texts
def _help(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command,needles", [
    ("serve", ["TCP port (0 picks a free one; default: 8000)", "(default: 5.0)", "(default: 60.0)"]),
    ("bench", ["relative to the current folder (default: benchmarks/results)"]),
    ("demo", ["any multiple of 32, such as 64 or 128 (default: 64)"]),
    ("collect", ["(default: 50)", "(default: 5)", "episode step limit, at most 500 (default: 200)"]),
    ("pretokenize", ["(K; default: 5)", "frames per VQGAN call (default: 32)", "(default: compact)"]),
    ("train-vq", ["peak learning rate (default: 0.0002)", "commitment weight (default: 0.25)",
                  "(default: 0.99)", "(0 = off; default: 1.0)"]),
    ("eval", ["(layouts are derived from it; default: 0)", "(0 = skip; default: 2)", "no progress bar"]),
    ("eval-libero", ["libero_10 520 (default: libero_spatial)", "(the paper: 50; default: 50)", "no progress bar"]),
    ("imagine", ["(default: unset, every code; needs --temperature > 0)"]),
    ("train", ["peak learning rate (default: 0.0003)", "(default: 0.04)", "AdamW beta2, in [0, 1) (default: 0.95)",
               "(0 = off; default: 4.0)", "checkpoints to keep (0 = all; default: 2)"]),
])
def test_help_states_the_defaults(command, needles, capsys, monkeypatch):
    text = _help(command, capsys, monkeypatch)
    for needle in needles:
        assert needle in text, (command, needle)
    assert "64 or 128 (default" not in text or "multiple of 32" in text


def test_nan_never_parses_as_a_float_option():
    """Every float option of train, train-vq, collect, serve and demo refuses nan and inf (a plain `float`
    took them: `train --alpha nan` trained to a loss of nan and exported it)."""
    for name in ("train", "train-vq", "collect", "serve", "demo"):
        parser = argparse.ArgumentParser()
        importlib.import_module(cli.COMMANDS[name][0]).add_arguments(parser)
        for action in parser._actions:
            assert action.type is not float, (name, action.option_strings)
            if getattr(action.type, "__name__", "").endswith("_float"):
                for text in ("nan", "inf"):
                    with pytest.raises(argparse.ArgumentTypeError):
                        action.type(text)


@pytest.mark.parametrize("command,module", [(["collect", "--tasks", "reach-v3"], "worldvla.data.collect"),
                                            (["train-vq", "x.hdf5"], "worldvla.train.vq"),
                                            (["imagine", "p"], "worldvla.eval.imagine"),
                                            (["bench", "vq"], "worldvla.bench"), (["demo"], "worldvla.demo")])
def test_an_out_that_is_a_file_is_refused_before_any_work(command, module, tmp_path, capsys, monkeypatch):
    """Every --out is a folder; a file there failed with a bare "[Errno 17] File exists" when the first output
    was written (imagine after rendering, bench after its benchmark)."""
    import importlib

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module(module), "run", lambda args: pytest.fail("the command started"))
    f = tmp_path / "afile"
    f.write_text("")
    for out, what in ((f, "is a file"), (f / "sub", "lies under")):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} {what}" in err and "not a folder" in err, err


@pytest.mark.parametrize("command,module", [(["collect", "--tasks", "reach-v3"], "worldvla.data.collect"),
                                            (["train", "--store", "s"], "worldvla.train.trainer"),
                                            (["imagine", "p"], "worldvla.eval.imagine"), (["demo"], "worldvla.demo")])
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_is_refused_before_any_work(command, module, out, tmp_path, capsys, monkeypatch):
    """`--out "$RUN"` with RUN unset wrote into the current folder (and `train --overwrite` deleted its policy/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module(module), "run", lambda args: pytest.fail("the command started"))
    assert main([*command, "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out is empty" in err and "name a folder" in err, err
    assert not any(tmp_path.iterdir())


def test_a_tilde_in_out_is_expanded_for_the_check_and_the_writes(tmp_path, capsys, monkeypatch):
    """`--out=~/x` (the shell leaves that ~ alone) was checked as $HOME/x but written to ./~/x."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    imagine = importlib.import_module("worldvla.eval.imagine")
    monkeypatch.setattr(imagine, "run", lambda args: Path(args.out).mkdir() or (Path(args.out) / "f").write_text(""))
    assert main(["imagine", "p", "--out=~/x"]) == 0
    assert (home / "x" / "f").is_file() and not (cwd / "~").exists()
    (home / "afile").write_text("")
    assert main(["imagine", "p", "--out=~/afile"]) == 2  # the check reads the same folder
    assert f"--out {home / 'afile'} is a file" in capsys.readouterr().err


def test_a_benchmark_named_twice_runs_once_and_all_skipped_is_said(monkeypatch, capsys, tmp_path):
    """`bench vq vq` ran vq twice; a run whose every benchmark was skipped (cannot run here) printed only the
    skips and exited 0 as if it had measured something. Skipping stays exit 0, with a line saying nothing ran."""
    import sys
    import types

    runs = []

    class Unavailable(RuntimeError):
        pass

    def bench(name, skip=False):
        def run(quick, device, out_dir):
            runs.append(name)
            if skip:
                raise Unavailable("no tool here")
            return f"{out_dir}/{name}.json"
        monkeypatch.setitem(sys.modules, f"worldvla.benchmarks.{name}",
                            types.SimpleNamespace(run=run, Unavailable=Unavailable))

    bench("vq"), bench("sampling"), bench("sass", skip=True)
    assert main(["bench", "vq", "sampling", "vq", "--out", str(tmp_path)]) == 0
    assert runs == ["vq", "sampling"]
    assert "nothing ran" not in capsys.readouterr().err
    runs.clear()
    assert main(["bench", "sass", "sass", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert runs == ["sass"] and "-- sass skipped: no tool here" in out
    assert "worldvla bench: nothing ran: every benchmark asked for (sass) cannot run here" in err, err


def test_layout_seeds_are_refused_outside_32_bits(capsys):
    """collect and eval derive their layouts from the seed's low 32 bits: --seed 2**32 repeated --seed 0, and
    --seed -1 the seed 2**32 - 1."""
    for seed in ("-1", str(1 << 32)):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--policy", "p", "--out", "o", "--seed", seed])
        assert e.value.code == 2 and "argument --seed: must be" in capsys.readouterr().err


def test_eval_refuses_an_empty_variant_name(capsys, tmp_path):
    """`--names x,` for two policies gave the second an empty name: a table column without a heading."""
    assert main(["eval", "--policy", "a", "b", "--names", "x,", "--out", str(tmp_path), "--tasks", "reach-v3"]) == 2
    assert "holds an empty name" in capsys.readouterr().err


def test_bench_passes_its_options_and_a_failing_benchmark_fails_the_run(monkeypatch, capsys, tmp_path):
    """Every benchmark gets --quick, --device and --out as given; one that fails does not stop the others but
    makes the exit status 1; one skipped beside others that ran is no "nothing ran"."""
    import sys
    import types

    seen = []

    class Unavailable(RuntimeError):
        pass

    def bench(name, error=None):
        def run(quick, device, out_dir):
            seen.append((name, quick, device, out_dir))
            if error is not None:
                raise error
            return f"{out_dir}/{name}.json"
        monkeypatch.setitem(sys.modules, f"worldvla.benchmarks.{name}",
                            types.SimpleNamespace(run=run, Unavailable=Unavailable))

    bench("vq", error=RuntimeError("wrong answer")), bench("sampling"), bench("sass", error=Unavailable("no nvcc"))
    assert main(["bench", "vq", "sampling", "sass", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
    assert seen == [(n, True, "cpu", str(tmp_path)) for n in ("vq", "sampling", "sass")]
    out, err = capsys.readouterr()
    assert "!! vq failed: RuntimeError: wrong answer" in out and "-- sass skipped: no nvcc" in out
    assert "nothing ran" not in err
    seen.clear()
    assert main(["bench", "sampling", "sass", "--out", str(tmp_path)]) == 0
    assert seen == [("sampling", False, None, str(tmp_path)), ("sass", False, None, str(tmp_path))]
    assert "nothing ran" not in capsys.readouterr().err


def test_unit_open_float_refuses_one():
    assert cli.unit_open_float("0") == 0.0 and cli.unit_open_float("0.999") == 0.999
    for text in ("1", "1.0", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\)"):
            cli.unit_open_float(text)


def test_a_missing_file_is_one_error_line(monkeypatch, capsys):
    """An OSError from a command (a file it was pointed at does not exist) is one line and exit status 2."""
    def run(args):
        raise FileNotFoundError(2, "No such file or directory", "demos.hdf5")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module("worldvla.eval.imagine"), "run", run)
    assert main(["imagine", "p", "--demos", "demos.hdf5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("worldvla imagine: error: ") and "demos.hdf5" in err


def test_a_cuda_device_is_checked_against_the_gpus_torch_sees(monkeypatch):
    """cuda:N is refused by name when torch sees no GPU or fewer than N + 1; no device named takes `default`,
    else CUDA when torch sees a GPU (the counts stood in for: this machine may have none)."""
    import torch

    from worldvla.devices import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match=r"torch sees no CUDA GPU here .*\(--device cpu\)"):
            torch_device(name)
    assert torch_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device(None) == torch.device("cuda")
    assert torch_device(None, default="cpu") == torch.device("cpu")
    assert torch_device("cuda:1") == torch_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert torch_device("cuda") == torch.device("cuda")
    for name in ("cuda:2", "cuda:9"):
        with pytest.raises(ValueError, match=rf"device {name} was asked for, but torch sees 2 CUDA GPU\(s\) "
                                             r"\(cuda:0 to cuda:1\)"):
            torch_device(name)
    for bad in (3.5, ["cuda"]):  # not a name at all: the same clear error, not torch's TypeError
        with pytest.raises(ValueError, match=r"unknown device .*use cpu, cuda or cuda:N"):
            torch_device(bad)


def test_dtype_names_in_any_case_and_only_floating_dtypes():
    import torch

    from worldvla.devices import torch_dtype

    assert torch_dtype(None) is None
    for name, want in (("BF16", torch.bfloat16), ("Float32", torch.float32), ("fp16", torch.float16),
                       (torch.bfloat16, torch.bfloat16)):
        assert torch_dtype(name) is want
    for bad in ("int8", "float64", torch.int8, torch.float64, 16):
        with pytest.raises(ValueError, match=r"dtype must be one of float32, fp32, bfloat16, bf16"):
            torch_dtype(bad)


# ---------------------------------------------------------------------- info
def _fake_gpus(monkeypatch, capabilities, problems):
    """torch sees a GPU of each capability; the native build's problem with each (None: built for it)."""
    import torch

    from worldvla.ops import native_backend as nb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: capabilities[dev])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: f"Test GPU {dev}")
    monkeypatch.setattr(nb, "arch_problem", lambda dev: problems[dev])
    monkeypatch.setattr(nb, "prefill_engines", lambda dev: ["mma", "wgmma"])


def test_info_without_the_native_extension_or_triton_says_so(monkeypatch, capsys):
    import sys

    import worldvla
    from worldvla import info

    monkeypatch.delattr(worldvla, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "worldvla._C", None)  # the import fails, as for a build without it
    monkeypatch.setitem(sys.modules, "triton", None)
    _fake_gpus(monkeypatch, [(9, 0)], [None])
    report = info.collect()
    assert report["triton"] is None and set(report["native"]) == {"missing"} and "worldvla._C" in \
        report["native"]["missing"]
    # no extension: nothing is said of its kernels on the GPU
    assert report["gpus"] == [{"index": 0, "name": "Test GPU 0", "capability": "9.0"}]
    assert info.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "triton not installed" in out and "native extension: not importable (" in out
    assert "every op runs in torch or Triton" in out
    assert "GPU 0: Test GPU 0 (sm 9.0)\n" in out and "GPU: none visible" not in out


def test_info_says_for_each_gpu_whether_the_build_covers_it(monkeypatch, capsys):
    import worldvla._C as C
    from worldvla import info

    old = "the CUDA kernels need sm_80 or newer"
    _fake_gpus(monkeypatch, [(9, 0), (7, 5)], [None, old])
    monkeypatch.setattr(C, "with_cuda", True)
    monkeypatch.setattr(C, "cuda_archs", "80,90a")
    report = info.collect()
    assert report["native"]["with_cuda"] is True and report["native"]["cuda_archs"] == "80,90a"
    assert report["gpus"] == [
        {"index": 0, "name": "Test GPU 0", "capability": "9.0", "native_kernels": "built for it",
         "prefill_engines": ["mma", "wgmma"]},
        {"index": 1, "name": "Test GPU 1", "capability": "7.5", "native_kernels": old}]
    assert info.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "CUDA kernels for 80,90a" in out
    assert "GPU 0: Test GPU 0 (sm 9.0): native kernels built for it, prefill engines mma, wgmma (auto: mma)" in out
    assert f"GPU 1: Test GPU 1 (sm 7.5): native kernels {old}\n" in out
    # A build without CUDA kernels: no word of them for a GPU, and no empty architecture list.
    monkeypatch.setattr(C, "with_cuda", False)
    monkeypatch.setattr(C, "cuda_archs", "")
    report = info.collect()
    assert report["native"]["cuda_archs"] is None and all("native_kernels" not in g for g in report["gpus"])
    assert info.run(argparse.Namespace(json=False)) == 0
    assert "; no CUDA kernels\n" in capsys.readouterr().out


def test_tcp_port_takes_0_to_65535():
    from worldvla.serve import tcp_port

    assert [tcp_port(t) for t in ("0", "8000", "65535")] == [0, 8000, 65535]
    for text, match in (("65536", "a TCP port is 0 to 65535 .*got 65536"), ("-1", "got -1"),
                        ("80.5", "expected an integer, got '80.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            tcp_port(text)


def test_info_lists_per_op_the_auto_order_of_the_backends_installed(monkeypatch, capsys):
    """An op's own order (linear on CUDA: torch alone) wins over its device's; a backend in the order that the op
    does not have installed is left out, as `backend="auto"` skips it."""
    from worldvla import info
    from worldvla.ops import dispatch

    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": ("torch",), "cuda": ("triton", "native", "torch"),
                                                 ("linear", "cpu"): ("native", "torch"), ("linear", "cuda"): ("torch",)})
    monkeypatch.setattr(dispatch, "registered_ops", lambda: ["linear", "masked_attention"])
    installed = {"linear": ["native", "torch", "triton"], "masked_attention": ["torch", "triton"]}
    real = dispatch.available  # other ops' answers stay real: the engine's decode step asks for its own
    monkeypatch.setattr(dispatch, "available", lambda op: installed[op] if op in installed else real(op))
    report = info.collect()
    assert report["ops"] == {
        "linear": {"installed": installed["linear"], "auto_order": {"cpu": ["native", "torch"], "cuda": ["torch"]}},
        "masked_attention": {"installed": installed["masked_attention"],
                             "auto_order": {"cpu": ["torch"], "cuda": ["triton", "torch"]}}}
    assert info.run(argparse.Namespace(json=False)) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("linear", "masked_"))]
    assert rows == [["linear", "native,", "torch,", "triton", "native", ">", "torch", "torch"],
                    ["masked_attention", "torch,", "triton", "torch", "triton", ">", "torch"]]


def test_a_misspelt_command_is_answered_with_the_likely_one(capsys):
    """`worldvla trian` listed every command without pointing at `train`; a name like no command keeps that list."""
    with pytest.raises(SystemExit) as e:
        main(["trian", "--store", "s"])
    assert e.value.code == 2
    assert "worldvla: error: unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["xyzzy"])
    assert "invalid choice: 'xyzzy' (choose from 'collect'" in capsys.readouterr().err


def test_a_misspelt_option_is_answered_by_its_command_with_the_likely_option(capsys):
    """`worldvla demo --fats` printed the top-level usage and `worldvla: error: unrecognized arguments: --fats`,
    naming neither the command whose option it was meant to be nor the option."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--fats", "--outt", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: worldvla demo ")
    assert ("worldvla demo: error: unrecognized arguments: --fats --outt x (--fats: did you mean --fast?; --outt: "
            "did you mean --out?); `worldvla demo --help` lists its options") in err
    # `--name=value` is matched by its name; an argument like no option gets no guess.
    with pytest.raises(SystemExit):
        main(["info", "--jsn=1", "extra"])
    err = capsys.readouterr().err
    assert ("worldvla info: error: unrecognized arguments: --jsn=1 extra (--jsn=1: did you mean --json?); "
            "`worldvla info --help` lists its options") in err
    with pytest.raises(SystemExit):
        main(["info", "--zzzzzz"])
    assert "worldvla info: error: unrecognized arguments: --zzzzzz; `worldvla info --help`" in capsys.readouterr().err


def test_a_misspelt_option_with_a_long_value_is_matched_by_its_name(capsys):
    """`--outt=/a/long/path` is matched as `--outt`: the value would make the argument unlike any option."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--outt=/data/experiments/worldvla/demo_runs/first"])
    assert e.value.code == 2
    assert ("(--outt=/data/experiments/worldvla/demo_runs/first: did you mean --out?)"
            in capsys.readouterr().err)


def test_an_empty_device_name_is_refused_not_taken_for_the_default():
    """`--device "$DEV"` with DEV unset is a mistake to name, not a request for the default device."""
    from worldvla.devices import torch_device

    for name in ("", " "):
        with pytest.raises(ValueError, match=rf"unknown device {name!r} \(--device\): use cpu, cuda or cuda:N"):
            torch_device(name)
        with pytest.raises(ValueError, match="unknown device"):
            torch_device(name, default="cpu")


def test_info_json_prints_the_report_alone_as_json(capsys):
    """`worldvla info --json` is read by scripts: its output is the report as JSON and nothing else."""
    import json

    from worldvla import info

    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(info.collect()))
    assert "op                    installed" not in out


@pytest.mark.parametrize("native_step", [True, False])
def test_info_without_a_gpu_says_so_and_how_the_cpu_runs_a_decode_step(native_step, monkeypatch, capsys):
    import torch

    from worldvla import info
    from worldvla.ops import decoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(decoder, "native_step_active", lambda dtype=None: native_step)
    report = info.collect()
    assert report["gpus"] == []
    want = "one native call a step" if native_step else "each layer by the decoder_layer order above"
    assert report["cpu_decode_step"].startswith(want)
    assert info.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "GPU: none visible to torch\n" in out
    assert f"inference engine's decode steps: {want}" in out


def test_info_gives_a_device_without_an_auto_order_torch_alone(monkeypatch):
    """Where neither the op nor its device has an order, `backend="auto"` takes torch (dispatch.resolve): info says
    the same, and says nothing for an op without a torch backend."""
    from worldvla import info
    from worldvla.ops import dispatch

    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": ("native", "torch")})
    monkeypatch.setattr(dispatch, "registered_ops", lambda: ["linear", "vq_search"])
    installed = {"linear": ["native", "torch"], "vq_search": ["triton"]}
    real = dispatch.available
    monkeypatch.setattr(dispatch, "available", lambda op: installed[op] if op in installed else real(op))
    ops = info.collect()["ops"]
    assert ops["linear"]["auto_order"] == {"cpu": ["native", "torch"], "cuda": ["torch"]}
    assert ops["vq_search"]["auto_order"] == {"cpu": [], "cuda": []}


def test_a_benchmark_the_package_lacks_is_taken_from_the_checkouts_benchmarks_folder(monkeypatch):
    """Run from a source checkout, a benchmark the installed package does not hold (an install older than the
    checkout) is the checkout's benchmarks/<name>.py; the package's own benchmark is preferred where both are."""
    import sys
    import types

    from worldvla import bench

    only_here = types.ModuleType("benchmarks.only_in_the_checkout")
    monkeypatch.setitem(sys.modules, "benchmarks.only_in_the_checkout", only_here)
    assert bench.benchmark_module("only_in_the_checkout") is only_here
    assert bench.benchmark_module("vq") is importlib.import_module("worldvla.benchmarks.vq")
    monkeypatch.delitem(sys.modules, "benchmarks.only_in_the_checkout")
    with pytest.raises(ModuleNotFoundError, match="only_in_the_checkout"):
        bench.benchmark_module("only_in_the_checkout")


def test_a_benchmark_without_an_unavailable_class_that_raises_fails_the_run(monkeypatch, capsys, tmp_path):
    """Only a benchmark's own Unavailable error is a skip; any error of a benchmark that declares none is a failure."""
    import sys
    import types

    def run(quick, device, out_dir):
        raise RuntimeError("no result")

    monkeypatch.setitem(sys.modules, "worldvla.benchmarks.vq", types.SimpleNamespace(run=run))
    assert main(["bench", "vq", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "!! vq failed: RuntimeError: no result" in out and "skipped" not in out


def test_ctrl_c_in_bench_quotes_an_out_the_shell_would_split(monkeypatch, capsys, tmp_path):
    """The command for the rest printed `--out /x/my results` bare: pasted back, the shell split it into the
    folder `/x/my` and a benchmark named `results`."""
    import shlex

    _stand_in_benchmarks(monkeypatch, interrupted="sampling")
    out = tmp_path / "my results" / "it's"
    err = _main_interrupted(["bench", "vq", "sampling", "cpu_ops", "--out", str(out)], capsys)
    line = err.split("run the rest with: ", 1)[1]
    assert shlex.split(line) == ["worldvla", "bench", "sampling", "cpu_ops", "--out", str(out)], line


@pytest.mark.parametrize("value,traceback", [("0", False), ("", False), ("false", False), ("off", False),
                                             ("FALSE", False), ("Off", False), ("no", False), (" 0 ", False),
                                             ("1", True), ("yes", True), ("TRUE", True), ("on", True)])
def test_worldvla_traceback_0_keeps_the_one_line_error(value, traceback, monkeypatch, capsys):
    """WORLDVLA_TRACEBACK=0 showed the traceback as =1 does: any value that was set counted as asking for it.
    The words are read in any case (`False`, `Off`), and `no` turns it off too."""
    from worldvla import bench

    def bad(args):
        raise ValueError("bad input: name another")

    monkeypatch.setenv("WORLDVLA_TRACEBACK", value)
    monkeypatch.setattr(bench, "run", bad)
    if traceback:
        with pytest.raises(ValueError, match="bad input"):
            main(["bench", "vq"])
    else:
        assert main(["bench", "vq"]) == 2
        assert capsys.readouterr().err.strip() == ("worldvla bench: error: bad input: name another "
                                                   "(WORLDVLA_TRACEBACK=1 shows where)")


def test_a_reader_that_closes_stdout_ends_the_command_quietly(tmp_path):
    """`worldvla info | head -1` printed "worldvla info: error: [Errno 32] Broken pipe" and exited 2, as if the
    command had failed; it now ends as a command that SIGPIPE ended, saying nothing. A broken pipe of the
    command's own (a worker's) is still an error line."""
    import os
    import signal
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        p = subprocess.run([sys.executable, "-c", "import sys; from worldvla.cli import main; sys.exit(main(['info']))"],
                           stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if k != "WORLDVLA_TRACEBACK"}, timeout=120)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, ""), p.stderr


def test_a_broken_pipe_of_the_commands_own_is_one_error_line(monkeypatch, capsys):
    from worldvla import bench

    def worker_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(bench, "run", worker_gone)
    assert main(["bench", "vq"]) == 2
    assert "worldvla bench: error: [Errno 32] Broken pipe" in capsys.readouterr().err


@pytest.mark.parametrize("command,module", [(["bench", "vq"], "worldvla.bench"),
                                            (["imagine", "p"], "worldvla.eval.imagine")])
def test_an_out_that_is_a_dangling_link_is_refused_before_any_work(command, module, tmp_path, capsys, monkeypatch):
    """A link to a folder that does not exist passed the check: bench ran its benchmark, then failed with a bare
    "[Errno 17] File exists" when it wrote the result."""
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module(module), "run", lambda args: pytest.fail("the command started"))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    for out, what in ((link, "is a link"), (link / "sub", f"lies under {link}, a link")):
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"worldvla {command[0]}: error: --out {out} {what} to {tmp_path / 'gone'}, which does not "
                       f"exist: create that folder, or name another"), err
    (tmp_path / "gone").mkdir()  # a link to a folder is a folder
    monkeypatch.setattr(importlib.import_module(module), "run", lambda args: 0)
    assert main([*command, "--out", str(link)]) == 0


def test_an_unavailable_subcommands_help_says_why(monkeypatch, capsys):
    """`worldvla collect --help` of a command whose module did not import listed no options and said nothing
    of why."""
    monkeypatch.setitem(cli.COMMANDS, "collect", ("worldvla._no_such_module_", "collect (test stand-in)"))
    with pytest.raises(SystemExit) as e:
        main(["collect", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "unavailable here: No module named 'worldvla._no_such_module_'" in out, out


def test_list_positionals_are_taken_after_options_too(monkeypatch, capsys, tmp_path):
    """`worldvla bench vq --quick sampling` was refused with "unrecognized arguments: sampling", and
    `pretokenize a.hdf5 --out s --vqgan v b.hdf5` with "unrecognized arguments: b.hdf5": argparse gives a list
    positional only the words before the first option. An extra word is still refused, and a misspelt option
    still named."""
    import sys
    import types

    from worldvla.data import store

    ran = []
    for name in ("vq", "sampling"):
        monkeypatch.setitem(sys.modules, f"worldvla.benchmarks.{name}", types.SimpleNamespace(
            run=lambda quick, device, out_dir, name=name: ran.append((name, quick, device, out_dir))))
    assert main(["bench", "vq", "--quick", "sampling", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert ran == [("vq", True, "cpu", str(tmp_path)), ("sampling", True, "cpu", str(tmp_path))]

    seen = []
    monkeypatch.setattr(store, "run", lambda args: seen.append(args) or 0)
    assert main(["pretokenize", "a.hdf5", "--out", str(tmp_path / "s"), "--vqgan", "v", "b.hdf5"]) == 0
    assert seen[0].inputs == ["a.hdf5", "b.hdf5"] and seen[0].vqgan == "v" and seen[0].command == "pretokenize"

    for argv, says in ((["imagine", "p", "--demos", "d", "extra"], "unrecognized arguments: extra;"),
                       (["bench", "vq", "--quik", "sampling"], "--quik: did you mean --quick?")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_python_m_worldvla_is_the_command(tmp_path):
    """`python -m worldvla` failed ("No module named worldvla.__main__"): it runs the command, exit code included."""
    import subprocess
    import sys

    import worldvla

    ok = subprocess.run([sys.executable, "-m", "worldvla", "--version"], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)
    assert ok.returncode == 0 and worldvla.__version__ in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "worldvla", "no-such-command"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr


def test_ctrl_c_under_worldvla_traceback_keeps_its_traceback(monkeypatch, capsys):
    """WORLDVLA_TRACEBACK=1 asks where a command was when it stopped: Ctrl-C, in the command or while its modules
    load, is raised on, not turned into the one line."""
    _interrupt("worldvla.demo", monkeypatch)
    monkeypatch.setenv("WORLDVLA_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--fast"])

    def interrupted(chosen):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--fast"])
    assert "interrupted" not in capsys.readouterr().err


def test_an_error_that_is_no_bad_input_keeps_its_traceback(monkeypatch, capsys):
    """Only bad inputs (ValueError, OSError) and a missing dependency are one line: any other error is a bug to
    be shown where it happened, not "worldvla bench: error: ..."."""
    from worldvla import bench

    def bug(args):
        raise RuntimeError("a bug in the command")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(bench, "run", bug)
    with pytest.raises(RuntimeError, match="a bug in the command"):
        main(["bench", "vq"])
    assert "error:" not in capsys.readouterr().err


def test_a_system_library_to_install_is_one_line_and_an_outside_modules_missing_name_keeps_its_traceback(
        monkeypatch, capsys):
    """An ImportError that says `apt-get install` (OpenGL's library) is a missing dependency, as one that says
    `pip install` is; a name an installed outside module lacks (a version mismatch) is no missing module."""
    from worldvla import bench

    errors = iter([ImportError("libGL.so.1: cannot open shared object file; install it with: apt-get install "
                               "libgl1"),
                   ImportError("cannot import name 'nothing' from 'numpy'", name="numpy")])

    def failing(args):
        raise next(errors)

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(bench, "run", failing)
    assert main(["bench", "vq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("worldvla bench: error: libGL.so.1") and "apt-get" in err
    with pytest.raises(ImportError, match="cannot import name 'nothing' from 'numpy'"):
        main(["bench", "vq"])


def test_a_bare_tilde_out_is_the_home_folder(tmp_path, monkeypatch):
    """`--out=~` and `--out=~/x` both name folders under $HOME, not ./~."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    outs = []
    monkeypatch.setattr(importlib.import_module("worldvla.eval.imagine"), "run", lambda args: outs.append(args.out))
    for out in ("--out=~", "--out=~/x"):
        assert main(["imagine", "p", out]) == 0
    assert outs == [str(home), str(home / "x")]


def test_no_command_prints_the_help_and_exits_2(capsys):
    """`worldvla` alone did nothing a script could take for success: it lists the commands and exits 2."""
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: worldvla ") and "train-vq" in out and "eval-libero" in out


def test_ctrl_c_in_bench_keeps_the_device_in_the_command_for_the_rest(monkeypatch, capsys, tmp_path):
    _stand_in_benchmarks(monkeypatch, interrupted="sampling")
    err = _main_interrupted(["bench", "vq", "sampling", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert err.endswith(f"run the rest with: worldvla bench sampling --device cpu --out {tmp_path}"), err


def test_bounded_argparse_types_take_their_bounds():
    assert cli.unit_float("0") == 0.0 and cli.unit_open_float("0") == 0.0 and cli.non_negative_int("0") == 0
    assert cli.positive_int("1") == 1 and cli.seed32(str((1 << 32) - 1)) == (1 << 32) - 1
    for fn, text, says in ((cli.positive_int, "0", "must be >= 1, got 0"), (cli.positive_float, "0", "must be > 0"),
                           (cli.non_negative_int, "-1", "must be >= 0, got -1"),
                           (cli.unit_float, "-0.1", r"must be in \[0, 1\]"),
                           (cli.positive_int, "1.5", "expected an integer, got '1.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            fn(text)


def test_is_integer_and_is_count_take_python_and_numpy_integers_only():
    """True would count as 1 and 2.5 be cut to 2 by an int() after the check; NumPy's integers are integers."""
    import numpy as np

    from worldvla.checks import is_count, is_integer

    assert all(is_integer(v) for v in (0, -3, np.int64(5), np.uint8(2), np.int32(-1)))
    assert not any(is_integer(v) for v in (True, False, np.bool_(True), 2.0, 2.5, np.float32(1), "3", None))
    assert is_count(0) and is_count(np.int64(1), 1) and is_count(5, 5)
    assert not any((is_count(-1), is_count(0, 1), is_count(4, 5), is_count(True), is_count(True, 1),
                    is_count(1.0, 1), is_count(np.float64(3))))


def test_a_misspelt_option_before_a_name_leaves_the_name_known(capsys):
    """`bench vq --quik sampling`: the second, intermixed parse stopped at the unknown `--quik` and named the valid
    benchmark `sampling` unrecognized beside it."""
    with pytest.raises(SystemExit) as e:
        main(["bench", "vq", "--quik", "sampling"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "worldvla bench: error: unrecognized arguments: --quik (--quik: did you mean --quick?)" in err, err


def test_an_out_folder_the_system_cannot_check_is_one_line(tmp_path, capsys):
    """An --out whose name is too long for the file system ended in a traceback (OSError: File name too long):
    the --out check ran outside the handling that makes bad input one line."""
    out = tmp_path / ("x" * 300) / "y"
    assert main(["imagine", "p", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"worldvla imagine: error: --out {out} cannot be used (File name too long): name another "
                          f"folder"), err


def test_a_misspelt_required_option_is_named_not_only_the_one_it_left_missing(capsys):
    """`worldvla train --stroe s --out x` printed only "the following arguments are required: --store": argparse
    checks required options before it reports words it does not know, so the misspelling went unnamed (an optional
    one, `--stpes`, was named with its likely option)."""
    for argv, says in ((["train", "--stroe", "s", "--out", "x"], "--stroe (--stroe: did you mean --store?)"),
                       (["pretokenize", "a.hdf5", "--outt=s", "--vqgan", "v"], "--outt=s (--outt=s: did you mean --out?)")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (f"worldvla {argv[0]}: error: unrecognized arguments: {says}; `worldvla {argv[0]} --help` lists its "
                f"options") in err, err
    # Nothing misspelt: argparse's own message; a prefix of the option counts as given (its ambiguity is argparse's);
    # after `--` every word is a value.
    for argv, says in ((["train", "--out", "x"], "the following arguments are required: --store"),
                       (["train", "--sto", "s", "--out", "x"], "ambiguous option: --sto could match --store"),
                       (["train", "--out", "x", "--", "--stroe"], "the following arguments are required: --store")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert says in err and "did you mean" not in err, err


def test_under_torchrun_each_ranks_closing_line_names_its_rank(tmp_path, monkeypatch, capsys):
    """Every rank of `torchrun ... -m worldvla train` prints its own closing line: two identical lines read as one
    error printed twice, and a line of one rank alone did not say which rank failed."""
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    argv = ["train", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    for env, who in (({"RANK": "1", "WORLD_SIZE": "2"}, "worldvla train (rank 1 of 2): error: "),
                     ({"RANK": "0", "WORLD_SIZE": "1"}, "worldvla train: error: "),
                     ({"WORLD_SIZE": "2"}, "worldvla train: error: ")):
        for name in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(who) and err.count("\n") == 1, err


# ---------------------------------------------------------------------- further pins of the command line
def test_a_negative_number_is_refused_naming_the_bound_and_the_text():
    for fn in (cli.non_negative_float, cli.unit_float):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be (>= 0|in \[0, 1\]), got -0.5$"):
            fn("-0.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be >= 0, got -1$"):
        cli.non_negative_float("-1")


def test_only_the_chosen_commands_module_builds_its_options(monkeypatch):
    """`worldvla --help`, `worldvla` alone and an unknown command import no command's module (torch takes seconds
    to load); `worldvla collect ...` imports collect's alone; `build_parser()` with no choice builds every one."""
    import sys
    import types

    built = []
    for name in ("collect", "info"):
        module = f"worldvla._stand_in_{name.replace('-', '_')}"
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(
            add_arguments=lambda p, name=name: built.append(name) or p.add_argument("--flag", action="store_true"),
            run=lambda args: 0))
        monkeypatch.setitem(cli.COMMANDS, name, (module, f"{name} (test stand-in)"))
    for argv in ([], ["--help"], ["xyzzy"]):
        try:
            main(argv)
        except SystemExit:
            pass
    assert built == []
    assert main(["collect", "--flag"]) == 0 and built == ["collect"]
    built.clear()
    parser = cli.build_parser()
    assert sorted(built) == ["collect", "info"]
    assert parser.parse_args(["info", "--flag"]).flag is True


@pytest.mark.parametrize("command,module,argv,says", [
    ("collect", "worldvla.data.collect", ["--out", "o"], "finished task files are kept"),
    ("pretokenize", "worldvla.data.store", ["d", "--out", "o", "--vqgan", "v"], "finished shards are kept"),
    ("eval", "worldvla.eval.metaworld", ["--policy", "p", "--tasks", "reach-v3", "--out", "o"],
     "finished closed loops are kept"),
    ("eval-libero", "worldvla.eval.libero", ["--policy", "p", "--out", "o"], "finished episodes are kept"),
    ("demo", "worldvla.demo", ["--fast"], "finished stages are kept"),
])
def test_ctrl_c_says_what_each_command_keeps(command, module, argv, says, monkeypatch, capsys):
    _interrupt(module, monkeypatch)
    err = _main_interrupted([command, *argv], capsys)
    assert err == f"worldvla {command}: interrupted; run the same command again to continue: {says}", err


def test_ctrl_c_in_a_command_that_keeps_nothing_is_interrupted_alone(monkeypatch, capsys):
    """A command with no way to continue (info, serve) ends on "interrupted", with no advice after it."""
    _interrupt("worldvla.info", monkeypatch)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "worldvla info: interrupted"


def test_ctrl_c_under_torchrun_names_the_rank(monkeypatch, capsys):
    _interrupt("worldvla.demo", monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--fast"]) == 130
    assert capsys.readouterr().err.strip().startswith("worldvla demo (rank 1 of 2): interrupted; run the same")


def test_a_command_stopped_by_sigterm_exits_143_saying_how_to_continue(monkeypatch, capsys):
    """A command that ends its work early on SIGTERM (cli.Stopped) prints its message and the way on, and exits
    with SIGTERM's status, as a process that SIGTERM ended."""
    def stopped(args):
        raise cli.Stopped("stopped by SIGTERM in train after step 7, which is saved")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module("worldvla.demo"), "run", stopped)
    assert main(["demo", "--fast"]) == 143 == cli.STOPPED_RC
    assert capsys.readouterr().err.strip() == ("worldvla demo: stopped by SIGTERM in train after step 7, which is "
                                               "saved; run the same command again to continue: finished stages are "
                                               "kept")


def test_the_command_for_the_rest_of_the_benchmarks(monkeypatch):
    """bench's default --out is left out of the command for the rest; a Ctrl-C after the last benchmark finished
    leaves no rest, and `worldvla bench` with no names would run every benchmark: it says to rerun instead."""
    def how(**kw):
        return cli.how_to_continue(argparse.Namespace(**{"command": "bench", "quick": False, "device": None,
                                                         "out": "benchmarks/results", **kw}))

    assert how(finished=["vq"], remaining=["sampling"]) == ("vq finished, results in benchmarks/results; run the rest "
                                                            "with: worldvla bench sampling")
    assert how(finished=["vq", "sampling"], remaining=[]) == ("vq, sampling finished, results in benchmarks/results; "
                                                              "run the same command again to rerun the benchmarks")


def test_a_module_not_found_error_without_a_name_keeps_its_traceback(monkeypatch):
    """A ModuleNotFoundError that names no module says nothing of what to install: it is shown as raised, not
    turned into an AttributeError of the check."""
    def failing(args):
        raise ModuleNotFoundError("a module is missing")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module("worldvla.info"), "run", failing)
    with pytest.raises(ModuleNotFoundError, match="a module is missing"):
        main(["info"])


def test_an_unknown_option_before_or_without_a_command_is_refused(capsys):
    """An option the top level does not take, alone, is argparse's one error; before a command, the command (whose
    options are known) names it."""
    with pytest.raises(SystemExit) as e:
        main(["--frobnicate"])
    assert e.value.code == 2
    assert "worldvla: error: unrecognized arguments: --frobnicate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--frobnicate", "info", "--json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "worldvla info: error: unrecognized arguments: --frobnicate; `worldvla info --help`" in err, err
    # A command whose list positional takes words after its options (bench's names) parses them again: the unknown
    # option before the command is named once, not once for each parse.
    with pytest.raises(SystemExit) as e:
        main(["--foo", "bench", "vq", "--quick", "sampling"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "worldvla bench: error: unrecognized arguments: --foo (--foo: did you mean --out?)" in err, err


def test_a_misspelt_option_is_named_with_its_value_when_nothing_required_is_missing(capsys):
    """`imagine p --outt x`: the policy (a required positional) is given; argparse's usual refusal names the
    misspelt option and the word after it."""
    with pytest.raises(SystemExit) as e:
        main(["imagine", "p", "--outt", "x"])
    assert e.value.code == 2
    assert ("worldvla imagine: error: unrecognized arguments: --outt x (--outt: did you mean --out?)"
            in capsys.readouterr().err)


def test_required_options_given_as_name_equals_value_count_as_given(monkeypatch, tmp_path):
    """`--out=s --vqgan=v` names --out and --vqgan: the check for a misspelt required option reads the name."""
    from worldvla.data import store

    seen = []
    monkeypatch.setattr(store, "run", lambda args: seen.append(args) or 0)
    assert main(["pretokenize", "a.hdf5", f"--out={tmp_path / 's'}", "--vqgan=v"]) == 0
    assert seen[0].out == str(tmp_path / "s") and seen[0].vqgan == "v"


def test_an_out_is_used_as_named_spaces_included(monkeypatch, tmp_path):
    """Only a blank --out is refused; a name with spaces at its ends names that folder, not a trimmed one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    outs = []
    monkeypatch.setattr(importlib.import_module("worldvla.eval.imagine"), "run", lambda args: outs.append(args.out))
    assert main(["imagine", "p", "--out", " run "]) == 0
    assert outs == [" run "]


def test_a_broken_pipe_of_the_commands_own_with_stdout_open_is_one_error_line(tmp_path):
    """Only a reader that closed stdout ends the command quietly: a broken pipe of the command's own (a worker's),
    with stdout still read, is an error line and exit status 2."""
    import subprocess
    import sys

    probe = ("import sys; from worldvla import bench; from worldvla.cli import main\n"
             "def gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
             "bench.run = gone; sys.exit(main(['bench', 'vq']))")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={k: v for k, v in __import__("os").environ.items() if k != "WORLDVLA_TRACEBACK"})
    assert p.returncode == 2 and "worldvla bench: error: [Errno 32] Broken pipe" in p.stderr, p.stderr


def test_a_world_size_that_is_no_number_names_no_rank(monkeypatch, capsys):
    """RANK set beside a WORLD_SIZE that is empty or no number: the closing line is the plain one, not a
    ValueError raised while it is written."""
    def bad(args):
        raise ValueError("bad input")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(importlib.import_module("worldvla.info"), "run", bad)
    monkeypatch.setenv("RANK", "0")
    for world in ("", "two"):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main(["info"]) == 2
        assert capsys.readouterr().err.startswith("worldvla info: error: bad input"), world


def test_an_error_with_the_stdout_reader_gone_is_still_an_error_line(tmp_path):
    """Only a broken pipe ends quietly when the reader of stdout has gone: a command that fails on a missing file
    meanwhile says so on stderr and exits 2."""
    import os
    import subprocess
    import sys

    probe = ("import sys; from worldvla import bench; from worldvla.cli import main\n"
             "def missing(args): raise FileNotFoundError(2, 'No such file or directory', 'demos.hdf5')\n"
             "bench.run = missing; sys.exit(main(['bench', 'vq']))")
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, "-c", probe], stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if k != "WORLDVLA_TRACEBACK"}, timeout=120)
    finally:
        os.close(write)
    assert p.returncode == 2 and "worldvla bench: error: [Errno 2] No such file or directory: 'demos.hdf5'" in p.stderr, \
        p.stderr


def test_a_misspelt_required_option_before_a_double_dash_is_named(capsys):
    """The words after `--` are values, and `--` itself names no option: a misspelt required option before it is
    named with its likely option, not only as the required one left missing."""
    with pytest.raises(SystemExit) as e:
        main(["pretokenize", "a.hdf5", "--outt=s", "--vqgan", "v", "--", "-b.hdf5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("worldvla pretokenize: error: unrecognized arguments: --outt=s (--outt=s: did you mean --out?)"
            in err), err


def _stand_in_every_benchmark(monkeypatch, errors=None):
    """Every benchmark as one that returns its JSON's path at once (or raises its entry of `errors`); returns the
    list its runs are recorded in."""
    import sys
    import types

    from worldvla import bench

    class Unavailable(RuntimeError):
        pass

    ran = []

    def stand_in(name):
        def run(quick, device, out_dir):
            ran.append(name)
            error = (errors or {}).get(name)
            if error is not None:
                raise Unavailable(error) if error.startswith("skip: ") else RuntimeError(error)
            return f"{out_dir}/{name}.json"
        return types.SimpleNamespace(run=run, Unavailable=Unavailable)

    for name in bench.BENCHMARKS:
        monkeypatch.setitem(sys.modules, f"worldvla.benchmarks.{name}", stand_in(name))
    return ran


def test_bench_without_names_runs_every_benchmark_in_order_saying_what_each_measures(monkeypatch, capsys, tmp_path):
    """Each benchmark starts with a line naming it and what it measures and ends with the path of its result."""
    from worldvla import bench

    ran = _stand_in_every_benchmark(monkeypatch)
    assert main(["bench", "--out", str(tmp_path)]) == 0
    names = ["attention", "vq", "cross_entropy", "sampling", "e2e", "train", "serve_load", "cpu_ops", "sass"]
    assert ran == names == list(bench.BENCHMARKS)
    out = capsys.readouterr().out
    for name in names:
        assert f"\n== {name}: {bench.BENCHMARKS[name]}\n" in out, name
        assert f"\n-> {tmp_path}/{name}.json (" in out, name


def test_an_unknown_benchmark_is_named_with_every_choice(monkeypatch, capsys):
    """Every unknown name is given (not only the first), and the choices are the benchmarks' whole list; nothing runs."""
    ran = _stand_in_every_benchmark(monkeypatch)
    assert main(["bench", "nosuch", "vq", "other"]) == 2
    assert capsys.readouterr().err == (
        "worldvla bench: error: unknown benchmark(s) ['nosuch', 'other']; choose from ['attention', 'vq', "
        "'cross_entropy', 'sampling', 'e2e', 'train', 'serve_load', 'cpu_ops', 'sass']\n")
    assert ran == []


def test_bench_with_one_failed_and_one_skipped_is_a_failure_not_nothing_ran(monkeypatch, capsys, tmp_path):
    """The "nothing ran ... cannot run here" line is for a run whose every benchmark was skipped; one that failed
    beside a skip makes exit status 1 without it."""
    ran = _stand_in_every_benchmark(monkeypatch, errors={"vq": "wrong answer", "sass": "skip: no nvcc"})
    assert main(["bench", "vq", "sass", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert ran == ["vq", "sass"] and "!! vq failed: RuntimeError: wrong answer" in out
    assert "-- sass skipped: skip: no nvcc" in out and "nothing ran" not in err, err


def test_bench_with_an_empty_device_is_refused_before_any_benchmark(monkeypatch, capsys, tmp_path):
    """`--device "$DEV"` with DEV unset is refused as a device name, not run on the default device."""
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    ran = _stand_in_every_benchmark(monkeypatch)
    assert main(["bench", "vq", "--device", "", "--out", str(tmp_path)]) == 2
    assert "unknown device '' (--device)" in capsys.readouterr().err and ran == []


def test_a_dtype_name_with_spaces_is_refused():
    """Names are matched whole (any case), a padded one is no dtype."""
    from worldvla.devices import torch_dtype

    for bad in (" bf16", "fp32 ", ""):
        with pytest.raises(ValueError, match="dtype must be one of"):
            torch_dtype(bad)
