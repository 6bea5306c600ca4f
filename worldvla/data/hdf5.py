"""Demonstrations in the LIBERO / robomimic HDF5 layout.

    data                      attrs: instruction, num_demos, total, upright, [problem_info (LIBERO)]
      demo_0                  attrs: instruction, success, num_samples
        obs/<camera>_rgb      uint8 [T, H, W, 3]
        actions               float32 [T, D]
        dones                 uint8 [T]   (1 on the last step)
      demo_1 ...

Frame t is what the camera saw before action t was taken. LIBERO files keep the
instruction only in `data.attrs["problem_info"]` (JSON, key "language_instruction"),
or (the regenerated ones) in their file name; robomimic files name cameras
`<camera>_image` and keep no instruction (their env_args' env_name is the guess;
`iter_demos(instruction=...)` gives one); both are read as well.

A path given to the writer or a reader may begin with `~` (the user's home folder, as in a shell).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping

import numpy as np


class DemoFormatError(ValueError):
    """An HDF5 file that does not follow the LIBERO / robomimic demo layout."""


@dataclass
class Demo:
    frames: np.ndarray  # uint8 [T, H, W, 3], upright
    actions: np.ndarray  # float64 [T, D]: the file's values, as the release bins them
    instruction: str
    success: bool = True
    name: str = ""
    # Under `iter_demos(drop_noops=True)`: {j: the frame the file holds after step j's action}, for each kept step j
    # whose next step in the file was dropped (frames[j + 1] is then not the frame that action led to). Empty when
    # no step was dropped: frames[j + 1] follows action j.
    next_frames: dict[int, np.ndarray] = field(default_factory=dict)
    # Under `iter_demos(drop_noops=True)`: the file's step of each kept step (row t of actions is the file's step
    # steps[t]), so that a message about a row names the step a user finds in the file. None without drop_noops.
    steps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.actions)


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading and writing demonstrations needs h5py: pip install h5py") from e
    return h5py


def open_demo_file(path):
    """`path` opened read-only with h5py; a file that is not HDF5 (or is cut short) is refused naming it."""
    h5py = _h5py()
    path = Path(path).expanduser()
    if path.is_dir():  # a folder of demo files where one file is read: name a few of them
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".hdf5", ".h5") and p.is_file())
        if not found:
            raise IsADirectoryError(f"{path} is a folder, not a demo file, and holds no .hdf5/.h5 file; give one "
                                    f"HDF5 demo file")
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise IsADirectoryError(f"{path} is a folder, not a demo file; give one of the demo files in it: {shown}")
    if not path.is_file():
        raise FileNotFoundError(f"no demo file at {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if not h5py.is_hdf5(path):
            raise DemoFormatError(f"{path}: not an HDF5 file (h5py: {e}); give HDF5 demo files (*.hdf5, *.h5: "
                                  f"worldvla collect, LIBERO or robomimic)") from None
        if "unable to lock file" in str(e):  # not damaged: HDF5's file locking refuses a file open for writing
            # BlockingIOError (errno 11), as h5py raises it: callers tell it from damage by its kind
            raise BlockingIOError(f"{path}: this HDF5 file is open for writing in another process (h5py: {e}); wait "
                                  f"for it or close it there, then read it again") from None
        raise OSError(f"{path}: cannot read this HDF5 file, it may be damaged or cut short (h5py: {e})") from None


def _raised_in_h5py(e: BaseException) -> bool:
    """Whether `e` was raised inside h5py (its innermost frame is h5py's own code, Python or compiled): h5py turns
    the HDF5 library's errors into plain RuntimeError / KeyError / OSError, which a bug elsewhere may raise too."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "h5py" in Path(tb.tb_frame.f_code.co_filename).parts


def _h5py_message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


@contextmanager
def _damage_named(where):
    """Reads of a file's structure (its groups, links and attributes) inside this block that fail in h5py (a few
    damaged bytes: "bad symbol table node signature", "bad object header version number") are refused naming
    `where` (the file, or the demo) instead of h5py's message alone."""
    try:
        yield
    except (RuntimeError, KeyError, OSError) as e:
        if not _raised_in_h5py(e):
            raise
        raise ValueError(f"{where}: cannot read the file's structure, it is damaged (h5py: {_h5py_message(e)}); "
                         f"collect or copy the file again, or leave it out of the inputs") from None


def _kind(obj) -> str:
    """What an HDF5 object is, in words, for a message about a file of another layout."""
    h5py = _h5py()
    if isinstance(obj, h5py.Dataset):
        return f"a dataset (shape {obj.shape}, dtype {obj.dtype})"
    if isinstance(obj, h5py.Group):
        return f"a group (keys: {sorted(obj.keys())})"
    return f"a {type(obj).__name__}"


def _is_group(obj) -> bool:
    return isinstance(obj, _h5py().Group)


def _is_dataset(obj) -> bool:
    return isinstance(obj, _h5py().Dataset)


def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.size == 1:  # a text attribute written as a list of one: ["open it"]
        return _as_str(value.reshape(()).item())
    return str(value)


def _uint8_advice(frames: np.ndarray) -> str:
    """How to turn `frames` of another dtype into uint8 [0, 255] without losing them: a [0, 1] (or [-1, 1]) image
    cast as it is becomes black, so it is scaled first."""
    try:
        lo, hi = (float(np.nanmin(frames)), float(np.nanmax(frames))) if frames.size else (0.0, 0.0)
    except (TypeError, ValueError):
        return "convert them to uint8 values in [0, 255]"
    if frames.dtype.kind in "fb" and 0.0 <= lo and hi <= 1.0:
        return "they lie in [0, 1]: convert with (x * 255).round().astype(np.uint8)"
    if frames.dtype.kind == "f" and -1.0 <= lo and hi <= 1.0:
        return "they lie in [-1, 1]: convert with ((x + 1) * 127.5).round().astype(np.uint8)"
    return "convert with np.clip(x, 0, 255).astype(np.uint8)"


def _as_array(i: int, value, what: str, shape: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as e:  # rows of different lengths: numpy's message names neither the demo nor the field
        raise ValueError(f"demo {i}: {what} are not one array {shape} (numpy: {e}); give every step's {what[:-1]} "
                         f"the same shape") from None


def _check_demo(i: int, frames, actions) -> tuple[np.ndarray, np.ndarray]:
    frames = _as_array(i, frames, "frames", "[T, H, W, 3]")
    actions = _as_array(i, actions, "actions", "[T, D]")
    if frames.dtype != np.uint8:
        raise ValueError(f"demo {i}: frames must be uint8 [T, H, W, 3], got dtype {frames.dtype}; "
                         f"{_uint8_advice(frames)}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"demo {i}: frames must have shape [T, H, W, 3], got {frames.shape}")
    if 0 in frames.shape[1:3]:
        raise ValueError(f"demo {i}: frames of {frames.shape[1]}x{frames.shape[2]} pixels hold no image; give frames "
                         f"[T, H, W, 3] with H and W of at least one pixel")
    if actions.ndim != 2:
        raise ValueError(f"demo {i}: actions must have shape [T, D], got {actions.shape}")
    if actions.shape[1] == 0:
        raise ValueError(f"demo {i}: actions of shape {actions.shape} have no dimension; give one action vector "
                         f"[D] (D >= 1) per step")
    if actions.dtype.kind not in "biuf":
        raise ValueError(f"demo {i}: actions must be numbers, got dtype {actions.dtype}; give a float array [T, D]")
    if len(frames) != len(actions) or len(actions) == 0:
        raise ValueError(f"demo {i}: need one frame per action and at least one step, "
                         f"got {len(frames)} frames and {len(actions)} actions")
    if not np.all(np.isfinite(actions)):
        raise ValueError(f"demo {i}: actions contain NaN or inf")
    with np.errstate(over="ignore"):  # refused below, with the demo named
        stored = actions.astype(np.float32, copy=False)
    # The file holds float32: a finite value beyond its range (about 3.4e38) would be stored as inf.
    if not np.all(np.isfinite(stored)):
        raise ValueError(f"demo {i}: actions reach {np.abs(actions).max():.3g}, beyond the float32 range the file "
                         f"stores (about 3.4e38), and would be stored as inf; scale or clip them")
    return frames, stored


def _blank(text) -> bool:
    """Whether an instruction is empty or only whitespace: taken as none (a prompt "... take to ?" teaches nothing)."""
    return isinstance(text, str) and not text.strip()


def _check_override(instruction) -> None:
    """An `instruction=` given to a reader prompts every demo of the file: a blank one would teach no task."""
    if instruction is not None and (not isinstance(instruction, str) or _blank(instruction)):
        raise ValueError(f"instruction= prompts every demo of the file, got {instruction!r}: pass the task's "
                         f"instruction as text, or None to read the file's own")


def _check_storable(text, what: str) -> None:
    """Refuse an instruction HDF5 cannot store as text, before any frame is written (h5py's own message names
    neither the text nor where it came from)."""
    if not isinstance(text, str):
        return
    if "\0" in text:
        raise ValueError(f"{what} {text!r} holds a NUL character, which an HDF5 text attribute cannot; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {text!r} is not valid Unicode text ({e.reason}); decode it properly "
                         f"(for example from UTF-8 bytes)") from None


def _own_instruction(i: int, text) -> str | None:
    """A demo's own instruction for `write_demos`; None (the file's instruction) when it has none or a blank one."""
    if text is None or _blank(text):
        return None
    _check_storable(text, f"demo {i}: instruction")
    return text


def _success(i: int, value) -> bool:
    # bool("False") is True: a flag given as text would mark a failed demo successful.
    if isinstance(value, (str, bytes)):
        raise ValueError(f"demo {i}: success must be True or False, got the text {value!r}")
    return bool(value)


def _unpack(i: int, demo) -> tuple[np.ndarray, np.ndarray, str | None, bool]:
    if isinstance(demo, Demo):
        return demo.frames, demo.actions, _own_instruction(i, demo.instruction), _success(i, demo.success)
    if isinstance(demo, Mapping):
        missing = {"frames", "actions"} - set(demo)
        if missing:
            raise ValueError(f"demo {i}: a mapping demo needs keys 'frames' and 'actions', missing {sorted(missing)}")
        return demo["frames"], demo["actions"], _own_instruction(i, demo.get("instruction")), \
            _success(i, demo.get("success", True))
    raise TypeError(f"demo {i}: expected a Demo or a mapping with 'frames' and 'actions', got {type(demo).__name__}")


# The temporary files `write_demos` calls of this process are writing now (`remove_unfinished_writes`).
_UNFINISHED: set[Path] = set()


def remove_unfinished_writes() -> None:
    """Remove the temporary files of the `write_demos` calls this process is in the middle of: for a handler of a
    signal that ends the process (SIGTERM) without running their cleanup. Their targets are left as they were."""
    for tmp in list(_UNFINISHED):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def temp_name(path) -> Path:
    """The hidden file `write_demos(path, ...)` writes before renaming it to `path` (`checkpoint.sibling_name`: it
    names the writing process, so that `remove_stale_temps` can tell a killed writer's file from a running one's)."""
    from ..checkpoint import sibling_name

    return sibling_name(Path(path).expanduser(), "tmp")


def remove_stale_temps(path) -> list[Path]:
    """Remove the temporary files (`temp_name`) that writes of `path` killed partway (SIGKILL, an out-of-memory kill,
    a power loss) left beside it: those of processes that no longer run, and this process's own that no call of it
    is writing (an earlier process's of the same pid). A running process's are kept. Returns the files removed."""
    from ..checkpoint import process_running, sibling_files

    path = Path(path).expanduser()
    removed = []
    for *_, pid, p in sibling_files(path, "tmp"):
        if p not in _UNFINISHED and (pid == os.getpid() or not process_running(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# The `data` attributes `write_demos` writes itself, which its `attrs` may not replace.
OWN_ATTRS = ("instruction", "num_demos", "total", "camera", "upright")


def write_demos(path, demos: Iterable, instruction: str, camera: str = "agentview",
                compression: str | None = "gzip", attrs: Mapping | None = None) -> Path:
    """Write `demos` (Demo objects or mappings with frames/actions[/success/instruction])
    to `path` atomically: the file appears complete or not at all.

    `instruction` goes into `data.attrs` and into every demo that has none of its own (or an empty one); an empty
    or whitespace-only `instruction` is refused.
    `attrs` adds extra attributes on the `data` group (for example the collection settings); it may not name those
    written here (instruction, num_demos, total, camera, upright).
    The temporary files that killed writes of `path` left beside it are removed first (`remove_stale_temps`).
    """
    from ..checkpoint import fsync_path

    h5py = _h5py()
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
    if _blank(instruction):
        raise ValueError(f"instruction must be a non-empty text (the task, e.g. 'open the drawer'), got "
                         f"{instruction!r}: the demos would train prompts without a task; pass the task's instruction")
    _check_storable(instruction, "instruction")
    if not camera or "/" in camera:
        raise ValueError(f"camera must be a plain name like 'agentview', got {camera!r}")
    for key in attrs or {}:
        if not isinstance(key, str) or not key:
            raise ValueError(f"attrs names must be non-empty texts, got {key!r}; name the attribute")
        if key in OWN_ATTRS:  # replacing one would leave the file's counts, instruction or view untrue
            raise ValueError(f"attrs may not set {key!r}, which write_demos writes itself ({', '.join(OWN_ATTRS)}); "
                             f"pass the instruction and camera as arguments, or give the attribute another name")
    if isinstance(demos, (Demo, Mapping)):  # one demo: iterating it would yield its fields (or fail) as demos
        raise TypeError(f"demos must be an iterable of demos, got one {type(demos).__name__}; pass [demo]")
    path = Path(path).expanduser()
    if path.is_dir():  # found before the demos are written, not at the rename after them
        raise IsADirectoryError(f"{path} is a folder; give write_demos a file path such as {path / 'demos.hdf5'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    _UNFINISHED.add(tmp)
    total = 0
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            # The extra attributes first: one h5py cannot store is refused before any demo is written.
            for k, v in (attrs or {}).items():
                try:
                    data.attrs[k] = v
                except (TypeError, ValueError) as e:
                    raise ValueError(f"attrs[{k!r}] = {v!r} cannot be stored as an HDF5 attribute (h5py: {e}); give "
                                     f"a number, a text, or an array of numbers or texts") from None
            n = 0
            for i, demo in enumerate(demos):
                frames, actions, demo_instruction, success = _unpack(i, demo)
                frames, actions = _check_demo(i, frames, actions)
                g = data.create_group(f"demo_{i}")
                t, h, w, _ = frames.shape
                g.create_dataset(f"obs/{camera}_rgb", data=frames, chunks=(min(t, 16), h, w, 3),
                                 compression=compression)
                g.create_dataset("actions", data=actions)
                dones = np.zeros(t, dtype=np.uint8)
                dones[-1] = 1
                g.create_dataset("dones", data=dones)
                g.attrs["instruction"] = demo_instruction if demo_instruction is not None else instruction
                g.attrs["success"] = success
                g.attrs["num_samples"] = t
                total += t
                n = i + 1
            data.attrs["instruction"] = instruction
            data.attrs["num_demos"] = n
            data.attrs["total"] = total
            data.attrs["camera"] = camera
            data.attrs["upright"] = True
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        _UNFINISHED.discard(tmp)
        if tmp.exists():
            tmp.unlink()
    return path


def _demo_names(data) -> list[str]:
    names = [k for k in data.keys() if re.fullmatch(r"demo_\d+", k)]
    return sorted(names, key=lambda k: int(k.split("_")[1]))


_LAYOUT = ("a 'data' group holding one group per demo: data/demo_0/actions [T, D] and "
           "data/demo_0/obs/<camera>_rgb [T, H, W, 3] uint8")


def _open_data(f, path):
    if "data" not in f:
        raise DemoFormatError(f"{path}: no 'data' group, so this is not a LIBERO/robomimic demo file "
                              f"(top-level keys: {sorted(f.keys())})")
    data = f["data"]
    if not _is_group(data):
        raise DemoFormatError(f"{path}: 'data' is {_kind(data)}, not a group, so this is not a LIBERO/robomimic demo "
                              f"file; expected {_LAYOUT}")
    return data


# Where a file's instruction came from (`_file_instruction`): the guesses are said in a line by pretokenize.
FROM_ATTRIBUTE, FROM_PROBLEM_INFO, FROM_FILE_NAME, FROM_ENV_NAME, FROM_NOWHERE, FROM_OPTION = (
    "data.attrs['instruction']", "problem_info", "file name", "env name", "none", "--instruction")
GUESSED = (FROM_FILE_NAME, FROM_ENV_NAME)


def _file_instruction(data, path) -> tuple[str, str]:
    """(instruction, where it came from: one of the FROM_* names) of the file whose `data` group this is;
    ("", FROM_NOWHERE) for a file that holds none and names no task. An empty or whitespace-only instruction is
    none: data.attrs['instruction'] so is passed over, and LIBERO's problem_info without a language_instruction
    (or with a blank one) gives FROM_NOWHERE."""
    if "instruction" in data.attrs and not _blank(_as_str(data.attrs["instruction"])):
        return _as_str(data.attrs["instruction"]), FROM_ATTRIBUTE
    if "problem_info" in data.attrs:
        fix = ("LIBERO's files hold a JSON object with the task's \"language_instruction\" there; rewrite it so, or "
               "write the instruction into data.attrs['instruction'], which is read first")
        try:
            info = json.loads(_as_str(data.attrs["problem_info"]))
        except json.JSONDecodeError as e:
            raise DemoFormatError(f"{path}: data.attrs['problem_info'] is not valid JSON ({e}); {fix}") from None
        if not isinstance(info, dict):
            raise DemoFormatError(f"{path}: data.attrs['problem_info'] is a JSON {type(info).__name__}, not an "
                                  f"object; {fix}")
        lang = info.get("language_instruction", "")
        text = " ".join(map(_as_str, lang)) if isinstance(lang, (list, tuple)) else _as_str(lang)
        return (text, FROM_PROBLEM_INFO) if not _blank(text) else ("", FROM_NOWHERE)
    if _libero_like(data):
        return _task_from_file_name(path), FROM_FILE_NAME
    env = _robomimic_env_name(data)
    if env:
        return env, FROM_ENV_NAME
    return "", FROM_NOWHERE


def _task_from_file_name(path) -> str:
    # LIBERO's regenerated files (256 / 512 px, no-ops filtered) keep no attributes: the release takes the
    # instruction from the task's name, which names the file ("<task name>_demo.hdf5"), "_" -> " ". The
    # names of LIBERO-10/90 tasks start with their scene ("LIVING_ROOM_SCENE2_put_both_..."), which their
    # instruction (the `language` the evaluation prompts with) does not hold: cut, as LIBERO's own reader does.
    stem = Path(path).stem
    stem = stem[:-len("_demo")] if stem.endswith("_demo") else stem
    if stem[:1].isupper():
        stem = re.sub(r"^.*?SCENE\d+_", "", stem, count=1)
    return stem.replace("_", " ").strip()


def _robomimic_env_name(data) -> str:
    """robomimic's files hold no instruction, and one name ("image.hdf5", "low_dim.hdf5") for every task: their
    env_args' env_name ("PickPlaceCan") in words ("pick place can") is the best guess of the task; "" without it."""
    try:
        name = json.loads(_as_str(data.attrs["env_args"])).get("env_name", "")
    except (KeyError, json.JSONDecodeError, AttributeError):
        return ""
    return " ".join(re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", _as_str(name))).lower()


def _frame_key(obs, camera: str | None, where: str) -> str:
    keys = list(obs.keys())
    if camera is not None:
        for key in (f"{camera}_rgb", f"{camera}_image", camera):
            if key in obs:
                return key
        raise DemoFormatError(f"{where}: no frames for camera {camera!r}; obs keys: {sorted(keys)}")
    for key in ("agentview_rgb", "agentview_image"):
        if key in obs:
            return key
    cams = sorted(k for k in keys if k.endswith(("_rgb", "_image")))
    if not cams:
        raise DemoFormatError(f"{where}: no camera frames (keys ending in _rgb or _image); obs keys: {sorted(keys)}")
    return cams[0]


def _read_dataset(group, key: str, where: str) -> np.ndarray:
    """`group[key]` read whole; a dataset h5py cannot decode (a damaged compressed chunk) is refused naming it."""
    ds = group[key]
    if not _is_dataset(ds):
        raise DemoFormatError(f"{where}/{key}: {_kind(ds)}, not a dataset; a demo's '{key}' is one array of one row "
                              f"per step (expected {_LAYOUT})")
    try:
        return np.asarray(ds[()])
    except OSError as e:
        raise ValueError(f"{where}/{key}: cannot read this dataset, the file is damaged (h5py: {e}); collect or copy "
                         f"the file again, or leave it out of the inputs") from None


def check_actions(actions: np.ndarray, where: str, steps=None, total: int | None = None) -> None:
    """Refuse actions that are not finite, naming `where` (the demo) and the first such step. Rows left by
    drop_noops: `steps` (`Demo.steps`) and `total` (the demo's steps in the file) name the step as the file numbers
    it, not its place among the steps kept."""
    bad = ~np.isfinite(actions).all(axis=1)
    if bad.any():
        t = int(np.argmax(bad))
        step, of = (t, len(actions)) if steps is None else (int(steps[t]), total)
        raise DemoFormatError(f"{where}: actions contain NaN or inf (first at step {step} of {of}); collect the demo "
                              f"again or remove it from the file")


def _flag(value, where: str, key: str) -> bool:
    """An attribute `key` (of `where`: the file's `data` group, or a demo) read as True or False: a bool, 0 or 1,
    or the text "true" / "false" in any case, which a file written by hand may hold (bool("False") is True)."""
    if isinstance(value, np.ndarray) and value.size == 1:  # written as a list of one: [True]
        value = value.reshape(())
    if isinstance(value, (np.ndarray, np.generic)) and value.ndim == 0:  # h5py's numpy scalars, as Python's
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif isinstance(value, (int, float)) and value in (0, 1):  # bools too, and 0.0 / 1.0
        return bool(value)
    raise DemoFormatError(f"{where}: attribute {key!r} is {value!r}, neither true nor false; write it as a bool "
                          f"(True / False), or as the text 'true' / 'false'")


def _demo_success(g) -> bool:
    if "success" in g.attrs:
        return _flag(g.attrs["success"], f"{g.file.filename}:{g.name.lstrip('/')}", "success")
    if "dones" in g and _is_dataset(g["dones"]):  # LIBERO keeps only successful replays, their last done flag set
        dones = np.asarray(g["dones"][()])
        return bool(dones[-1]) if len(dones) else False
    return True


def _check_actions_present(g, where: str) -> None:
    """Refuse a demo that is not a group holding an 'actions' dataset, naming it (`where`)."""
    if not _is_group(g):
        raise DemoFormatError(f"{where}: {_kind(g)}, not a group; expected {_LAYOUT}")
    if "actions" not in g:
        raise DemoFormatError(f"{where}: missing the 'actions' dataset (keys: {sorted(g.keys())}); every demo needs "
                              f"its actions [T, D], one per frame: remove the demo from the file, or the file from "
                              f"the inputs")
    actions = g["actions"]
    if not _is_dataset(actions):
        raise DemoFormatError(f"{where}/actions: {_kind(actions)}, not a dataset; every demo's 'actions' is one array "
                              f"[T, D], one row per step (expected {_LAYOUT})")


def _demo_group(data, name: str, path):
    """(group, where) of demo `name`, refused naming it when it lacks `obs` or `actions`."""
    g = data[name]
    where = f"{path}:data/{name}"
    if _is_group(g) and "obs" not in g:
        raise DemoFormatError(f"{where}: missing the 'obs' group (keys: {sorted(g.keys())})")
    _check_actions_present(g, where)
    if not _is_group(g["obs"]):
        raise DemoFormatError(f"{where}/obs: {_kind(g['obs'])}, not a group; expected {_LAYOUT}")
    return g, where


def _settled_frame_key(g, key: str | None, camera: str | None, where: str, first: str) -> str:
    """The obs key of a file's frames: chosen at its first demo (`_frame_key`) and then required of every demo, so
    a demo that lacks that camera is refused instead of being read from another one."""
    if key is None:
        return _frame_key(g["obs"], camera, where)
    if key not in g["obs"]:
        raise DemoFormatError(f"{where}: no obs/{key}, the camera this file's frames are read from (chosen at its "
                              f"first demo, {first}); obs keys: {sorted(g['obs'].keys())}. Every demo of a file is "
                              f"read from one camera: pass --camera with one every demo has, or remove this demo")
    return key


def _check_action_shape(where: str, shape) -> None:
    """Refuse actions (the shape of an array, or of the h5py dataset before it is read) that are not [T, D], D >= 1."""
    if shape is None or len(shape) != 2 or shape[1] == 0:
        raise DemoFormatError(f"{where}: actions must be [T, D] (one row per step, D >= 1), got shape {shape}")


def _check_steps(where: str, frames, actions: np.ndarray) -> None:
    """Refuse a demo whose frames (an array, or the h5py dataset before it is read) and actions do not make one
    uint8 frame [H, W, 3] per action row."""
    shape = frames.shape or ()  # None: an h5py dataset without a dataspace
    if len(shape) != 4 or shape[-1] != 3 or frames.dtype != np.uint8:
        raise DemoFormatError(f"{where}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _check_action_shape(where, actions.shape)
    if frames.shape[0] != len(actions):
        raise DemoFormatError(f"{where}: {frames.shape[0]} frames but {len(actions)} actions")
    if len(actions) == 0:
        raise DemoFormatError(f"{where}: an empty demo (no step); drop it from the file")


def _demo_groups(data, path, camera: str | None):
    """(name, group, where, frame key) of each demo of a file's `data` group, in order: each checked by
    `_demo_group` and its camera key settled at the first demo (`_settled_frame_key`), h5py's errors in doing so
    named by the demo. Reading the group is the caller's, under its own `_damage_named(where)`."""
    names = _demo_names(data)
    key = None
    for name in names:
        where = f"{path}:data/{name}"
        with _damage_named(where):
            g, where = _demo_group(data, name, path)
            key = _settled_frame_key(g, key, camera, where, names[0])
        yield name, g, where, key


def _read_one(g, where: str, key: str, default_instruction: str, turn: str, name: str,
              override: bool = False) -> Demo:
    frames = _read_dataset(g["obs"], key, f"{where}/obs")
    # float64 as the release reads them (its .npy dumps): binned after a float32 round trip, about one value in
    # 600,000 (uniform within LIBERO's bounds) lands in the next bin
    actions = _read_dataset(g, "actions", where).astype(np.float64, copy=False)
    _check_steps(where, frames, actions)
    if turn != NO_TURN:
        frames = np.ascontiguousarray(_TURNS[turn](frames))
    own = _demo_instruction(g) if not override else None
    instruction = own if own is not None else default_instruction
    return Demo(frames=frames, actions=actions, instruction=instruction, success=_demo_success(g), name=name)


def _demo_instruction(g) -> str | None:
    """A demo group's own instruction; None when it has none or an empty (whitespace-only) one: the file's is used."""
    if "instruction" not in g.attrs:
        return None
    text = _as_str(g.attrs["instruction"])
    return None if _blank(text) else text


def _libero_like(data) -> bool:
    """Whether the `data` group looks like one of LIBERO's files: its raw ones (with `problem_info`) or the
    regenerated ones the release trains on (LIBERO's camera keys `<camera>_rgb`, no attributes). Files this
    module writes are marked upright; robomimic's files name their cameras `<camera>_image`."""
    if "upright" in data.attrs and _flag(data.attrs["upright"], f"{data.file.filename}:data", "upright"):
        return False
    if "problem_info" in data.attrs:
        return True
    names = _demo_names(data)
    first = data[names[0]] if names else None
    obs = first.get("obs") if _is_group(first) else None
    return _is_group(obs) and any(k in obs for k in _LIBERO_CAMERAS)


# How `iter_demos` turns a file's frames [T, H, W, C] (`frame_turn`), by the names a token store's manifest records.
ROTATED_180, MIRRORED, NO_TURN = "rotated_180", "mirrored", "none"
_TURNS = {ROTATED_180: lambda x: x[:, ::-1, ::-1], MIRRORED: lambda x: x[:, :, ::-1], NO_TURN: lambda x: x}


def _turn(data, rotate_180: bool | None, path) -> str:
    """How the frames of the file whose `data` group this is are turned: rotate_180 True / False rotate every file's
    by 180 degrees / none. None: LIBERO's files are turned to the view the release trains on, other files read as
    they are. robosuite renders rows bottom-up (OpenGL); LIBERO stores them so (`macros_image_convention` "opengl",
    or no attribute: the regenerated files) and the release rotates them by 180 degrees. A file collected with
    robosuite's IMAGE_CONVENTION "opencv" holds those frames with their rows flipped (a vertical flip) already:
    mirrored left-right, they are the release's view."""
    if rotate_180 is not None:
        return ROTATED_180 if rotate_180 else NO_TURN
    if not _libero_like(data):
        return NO_TURN
    convention = _as_str(data.attrs.get("macros_image_convention", "opengl")).strip().lower()
    if convention not in ("opengl", "opencv"):
        # Guessing would train on frames turned the wrong way, silently.
        raise ValueError(f"{path}: macros_image_convention {convention!r} is neither 'opengl' nor 'opencv', so how "
                         f"its frames are turned is unknown; say it with rotate_180 (pretokenize's --rotate-180 yes "
                         f"/ no), or fix the file's attribute")
    return MIRRORED if convention == "opencv" else ROTATED_180


_LIBERO_CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")


def looks_like_libero(path) -> bool:
    """Whether the demo file at `path` is read as one of LIBERO's: `iter_demos` then turns its frames to the
    release's view (`frame_turn`) unless told not to (rotate_180=False), and pretokenize's `--action-bounds auto`
    gives its 7-D actions the release's fixed LIBERO bounds."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        return _libero_like(_open_data(f, path))


def frame_turn(path, rotate_180: bool | None = None) -> str:
    """How `iter_demos(path, rotate_180=rotate_180)` turns the file's frames: ROTATED_180 (`[:, ::-1, ::-1]`),
    MIRRORED (`[:, :, ::-1]`: LIBERO's files with macros_image_convention "opencv") or NO_TURN."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        return _turn(_open_data(f, path), rotate_180, path)


def _names(files) -> str:
    return ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def rotation_note(files, rotate_180: bool | None = None, option: str = "--rotate-180 no",
                  turns=None) -> str | None:
    """One line naming the `files` whose frames `iter_demos` turns on its own (rotate_180=None, the files look like
    LIBERO's: `frame_turn`), which are rotated by 180 degrees and which mirrored, and `option`, which reads them as
    stored; None when it turns none. A file of one's own robot in LIBERO's layout would otherwise train a model on
    upside-down frames, silently, while the policy at deployment takes frames as it is given them.
    turns: the files' `frame_turn(f)`s, one per file, where the caller has them already (`reading_record`'s
    `rotation`), so the files are not opened again for them."""
    if rotate_180 is not None:
        return None
    files = [Path(f).expanduser() for f in files]
    if turns is None:
        turns = [frame_turn(f) for f in files]
    elif len(turns) != len(files):
        raise ValueError(f"rotation_note: {len(turns)} turns for {len(files)} files")
    rotated = [f for f, t in zip(files, turns) if t == ROTATED_180]
    mirrored = [f for f, t in zip(files, turns) if t == MIRRORED]
    if not (rotated or mirrored):
        return None
    said = []
    if rotated:
        said.append(f"the frames of {len(rotated)} demo file(s) ({_names(rotated)}) are rotated by 180 degrees, as "
                    f"LIBERO's upside-down cameras need")
    if mirrored:
        said.append(f"{'those' if rotated else 'the frames'} of {len(mirrored)} demo file(s) ({_names(mirrored)}) "
                    f"are mirrored left-right, as LIBERO's files of macros_image_convention 'opencv' (rows flipped "
                    f"by robosuite already) need to match the release's rotated view")
    return (f"note: {'; '.join(said)} (the files have problem_info or obs/agentview_rgb / eye_in_hand_rgb, and no "
            f"`upright` attribute); pass {option} if they are stored upright")


def steps_without_noops(actions: np.ndarray, threshold: float = 1e-4) -> np.ndarray:
    """Indices of the steps the release keeps when it regenerates LIBERO's demos: a step is a no-op
    (dropped) when its arm action is near zero (norm of all but the last dimension < threshold) and its
    gripper command equals the last kept step's (the first step: the arm action alone decides)."""
    keep = []
    for t, a in enumerate(actions):
        still = float(np.linalg.norm(a[:-1])) < threshold
        if still and (not keep or a[-1] == actions[keep[-1]][-1]):
            continue
        keep.append(t)
    return np.asarray(keep, dtype=np.int64)


def iter_demos(path, camera: str | None = None, rotate_180: bool | None = None,
               drop_noops: bool = False, instruction: str | None = None, names=None) -> Iterator[Demo]:
    """Yield the demos of `path` one at a time (only one demo's frames in memory).

    camera: which `obs/<camera>_rgb` (or `_image`) to read; None picks agentview or the first camera. The key is
    settled at the file's first demo: a later demo without it is refused.
    rotate_180: None turns LIBERO's files (raw or regenerated) to the release's view (`frame_turn`) and leaves
    other files alone; True / False rotate every file's frames by 180 degrees / none.
    drop_noops: drop the steps the release's regeneration drops (`steps_without_noops`), frames with their
    actions: for LIBERO's raw files, which hold them. The release replays the kept actions in its simulator, so
    each of its frames is the one the kept action before it led to; a file's frames are not replayed here, so after
    a dropped step the next kept frame is not that one: the frame the kept action led to (the file's next one) is
    then in the demo's `next_frames`.
    instruction: every demo's instruction, over what the file holds (robomimic's files hold none).
    names: yield only the demos of these names (the others' frames and actions are not read; their camera is still
    checked, so that the key settles as it does for a read of every demo).
    """
    _check_override(instruction)
    if isinstance(names, (str, bytes)):  # `in` a text matches its substrings: "demo_10" would also yield demo_1
        raise TypeError(f"names= is a collection of demo names, got the text {names!r}; pass {{{names!r}}}")
    if names is not None:
        names = set(names)  # a generator would be used up by the first demo's test
    path = Path(path).expanduser()
    # h5py's errors in reading the file's structure are named by the file, and in a demo's by the demo; the demos
    # are yielded outside the demo's block (what the caller does with one is not the file's doing).
    with open_demo_file(path) as f, _damage_named(path):
        data = _open_data(f, path)
        default = instruction if instruction is not None else _file_instruction(data, path)[0]
        turn = _turn(data, rotate_180, path)
        for name, g, where, key in _demo_groups(data, path, camera):
            if names is not None and name not in names:
                continue
            with _damage_named(where):
                demo = _read_one(g, where, key, default, turn, name, override=instruction is not None)
            if drop_noops:
                demo = _without_noops(demo, where)
                if demo is None:
                    continue
            yield demo


def _without_noops(demo: Demo, where: str) -> Demo | None:
    """`demo` without the steps that `steps_without_noops` drops; where a kept step's next step was dropped, the
    frame its action led to goes into `next_frames`. None (with a warning) when every step is a no-op: nothing is
    left to learn from, as an empty demo has no sample."""
    keep = steps_without_noops(demo.actions)
    if len(keep) == 0:
        warnings.warn(f"{where}: every step is a no-op; the demo is skipped")
        return None
    # keep is increasing: step t + 1 was kept exactly when it is the next kept step.
    led_to = keep + 1
    dropped = np.nonzero((led_to < len(demo.actions)) & ~np.isin(led_to, keep))[0]
    return Demo(frames=demo.frames[keep], actions=demo.actions[keep], instruction=demo.instruction,
                success=demo.success, name=demo.name,
                next_frames={int(j): demo.frames[led_to[j]].copy() for j in dropped}, steps=keep)


def first_demo_shape(path, camera: str | None = None, only_success: bool = False,
                     drop_noops: bool = False) -> tuple[tuple[int, int], int] | None:
    """((H, W), D): the frame size and action width of the first demo that `iter_demos(path, camera=camera,
    drop_noops=drop_noops)` yields (the first successful one if `only_success`), from its frames' dataset shape
    and its actions, without reading frames; None when it yields none. The layout of the demos up to it is checked
    as `iter_demos` checks it (their frames' bytes are not read)."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        data = _open_data(f, path)
        for _, g, where, key in _demo_groups(data, path, camera):
            with _damage_named(where):
                frames = g["obs"][key]
                if not _is_dataset(frames):
                    _read_dataset(g["obs"], key, f"{where}/obs")  # refuses it, as iter_demos does
                actions = _read_dataset(g, "actions", where).astype(np.float64, copy=False)
                _check_steps(where, frames, actions)
                success = _demo_success(g)
            if only_success and not success:
                continue
            if drop_noops and len(steps_without_noops(actions)) == 0:
                continue
            return (int(frames.shape[1]), int(frames.shape[2])), int(actions.shape[1])
    return None


def frame_key(path, camera: str | None = None) -> str | None:
    """The obs key `iter_demos(path, camera=camera)` reads the file's frames from, settled at its first demo
    (`<camera>_rgb`, `<camera>_image` or `<camera>`; without a camera, agentview's or the first camera's); None when
    the file holds no demo. A camera the first demo lacks is refused (DemoFormatError), as `iter_demos` refuses it."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        return next((key for *_, key in _demo_groups(_open_data(f, path), path, camera)), None)


def iter_demo_actions(path, only_success: bool = False, drop_noops: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(name, actions) of the demos of `path` that `iter_demos` yields, with the steps it keeps, without reading
    frames; only_success: only the successful ones. Their actions that are not finite are refused naming the demo."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        data = _open_data(f, path)
        for name in _demo_names(data):
            where = f"{path}:data/{name}"
            with _damage_named(where):
                g = data[name]
                _check_actions_present(g, where)
                if only_success and not _demo_success(g):
                    continue
                actions = _read_dataset(g, "actions", where).astype(np.float64, copy=False)
            _check_action_shape(where, actions.shape)
            check_actions(actions, where)
            if drop_noops:
                actions = actions[steps_without_noops(actions)]
            if len(actions):
                yield name, actions


def read_demos(path, camera: str | None = None, rotate_180: bool | None = None, drop_noops: bool = False,
               instruction: str | None = None) -> list[Demo]:
    """All demos of `path` as a list (see `iter_demos`)."""
    return list(iter_demos(path, camera=camera, rotate_180=rotate_180, drop_noops=drop_noops,
                           instruction=instruction))


def demo_file_info(path) -> dict:
    """Cheap summary of a demo file without reading frames: number of demos, their names (in order: a
    demo's ordinal in its file is its place here), steps, success flags (`success`: one per demo, from its
    attribute, or LIBERO's last `dones` flag), instruction (and where it came from: a FROM_* name) and the `data`
    attributes. Raises like `read_demos` on a bad layout (a demo without actions: naming it) or a damaged file."""
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        data = _open_data(f, path)
        names = _demo_names(data)
        steps, success = [], []
        for n in names:
            where = f"{path}:data/{n}"
            with _damage_named(where):
                g = data[n]
                _check_actions_present(g, where)
                shape = g["actions"].shape
                _check_action_shape(where, shape)
                steps.append(int(shape[0]))
                success.append(_demo_success(g))
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in data.attrs.items()}
        instruction, source = _file_instruction(data, path)
        return {"num_demos": len(names), "names": names, "steps": steps, "success": success,
                "instruction": instruction, "instruction_from": source, "attrs": attrs}


def reading_record(path, rotate_180: bool | None = None, instruction: str | None = None) -> dict:
    """How `iter_demos(path, rotate_180=..., instruction=...)` reads the file, for a token store's manifest:
    `rotation` (`frame_turn`), `instruction` (what demos without their own are prompted with), `instruction_from`
    (a FROM_* name: GUESSED ones are guesses, FROM_NOWHERE none), `uses_file_instruction` (whether some demo takes
    it) and `demo_instructions` ({demo: text} of the demos whose own instruction differs; absent when none)."""
    _check_override(instruction)
    path = Path(path).expanduser()
    with open_demo_file(path) as f, _damage_named(path):
        data = _open_data(f, path)
        if instruction is not None:
            text, source, own = instruction, FROM_OPTION, {}
        else:
            text, source = _file_instruction(data, path)
            own = {n: t for n in _demo_names(data) if (t := _demo_instruction(data[n])) is not None}
        record = {"rotation": _turn(data, rotate_180, path), "instruction": text, "instruction_from": source,
                  "uses_file_instruction": len(own) < len(_demo_names(data))}
        differ = {n: t for n, t in own.items() if t != text}
        if differ:
            record["demo_instructions"] = differ
        return record
