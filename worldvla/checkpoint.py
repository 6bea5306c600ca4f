"""Checkpoints in the release's Hugging Face format.

A model folder holds `config.json` (transformers' Chameleon fields; 4.x `rope_theta` or 5.x
`rope_parameters`) and weights as `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin`. Parameter names are transformers'
Chameleon names; the `vqmodel.*` entries of the release's checkpoints are ignored. The q/k
norms' affine parameters come in either layout: one row per head ([heads, head_dim],
transformers' Chameleon) or the release's [model_parallel_size, head_dim] (one row that every
head shares in its checkpoints); the model keeps the layout it was loaded with
(`ModelConfig.model_parallel_size`), and saving writes it back with `model_parallel_size` in
config.json, with the loaded config.json's other keys (`ModelConfig.hf_extra`: the release's
vocabulary_map, vq_config, architecture name...), so the release's code loads what this package
saves from its checkpoints. A model built here, not loaded from such a folder, has no tokenizer
vocabulary to write back: it gets the part of Chameleon's that its layout names (`vocabulary_map`),
without which transformers' Chameleon cannot build the model.
A model folder is written whole into a temporary sibling folder that then replaces the old
one (`replace_folder`), so a crash never leaves a half-written checkpoint, or one that mixes
an older save's weights with the new ones, behind a valid name. The folders that killed saves
left beside it are removed by the next save there.
"""
from __future__ import annotations

import ctypes
import fnmatch
import functools
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import secrets
import shutil
import sys
from pathlib import Path

import torch

from .devices import torch_device, torch_dtype
from .model import ModelConfig, WorldVLA
from .tokens.layout import VocabLayout

_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "swin_norm", "dropout")
# Keys the package derives from ModelConfig on save (read on load, or dropped: rope_scaling is refused).
_DERIVED_KEYS = (*_CONFIG_KEYS, "rope_theta", "rope_parameters", "rope_scaling", "model_parallel_size",
                 "worldvla_layout", "worldvla_attention")


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; Chameleon's MLP (and WorldVLA's) is SwiGLU "
                         "with 'silu'")
    kw = {k: d[k] for k in _CONFIG_KEYS if k in d and d[k] is not None}
    kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", 32))
    theta = d.get("rope_theta")
    params = d.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5 reads only this: checked whether or not rope_theta is beside it
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported RoPE scaling {params}; WorldVLA uses plain RoPE")
        p_theta = params.get("rope_theta")
        if theta is None:
            theta = p_theta
        elif p_theta is not None and p_theta != theta:
            raise ValueError(f"config.json gives two RoPE bases, rope_theta {theta} and rope_parameters' rope_theta "
                             f"{p_theta} (transformers 5 reads the latter, 4.x the former); make them one")
    if d.get("rope_scaling"):
        raise ValueError(f"unsupported rope_scaling {d['rope_scaling']}; WorldVLA uses plain RoPE")
    if theta is not None:  # a number as a float; anything else as it is, for validate() to name
        kw["rope_theta"] = float(theta) if isinstance(theta, numbers.Real) and not isinstance(theta, bool) else theta
    kw["layout"] = d.get("worldvla_layout")
    kw["attention"] = d.get("worldvla_attention", "chunk")
    kw["hf_extra"] = {k: v for k, v in d.items() if k not in _DERIVED_KEYS} or None
    return ModelConfig(**kw)


_DIGIT_LETTERS = "ABCDEFGHIJ"


def image_token_name(code: int) -> str:
    """Chameleon's tokenizer name of VQ code `code`: "IMGIMG", the code's decimal digits as the letters
    A-J (0 -> A, ..., 9 -> J), then "Z" (code 407 is "IMGIMGEAHZ"). The release's `bpe2img` and
    transformers' ChameleonImageVocabularyMapping read the code back from the name (`tokens.layout`'s
    `_code_from_bpe_name` is the inverse)."""
    return "IMGIMG" + "".join(_DIGIT_LETTERS[int(d)] for d in str(int(code))) + "Z"


def vocabulary_map(layout: VocabLayout | None) -> dict:
    """config.json's `vocabulary_map` for a model built here. A release folder carries its tokenizer's
    whole vocabulary there (written back through `hf_extra`); transformers' Chameleon cannot build a model
    without the key (ChameleonImageVocabularyMapping reads it), and takes from it the id of "<image>" (the
    placeholder it replaces with an image's codes) and the ids named "IMGIMG...": the image codes, which it
    maps VQ codes to and masks out of the generated logits.

    The names are Chameleon's: every image code under its IMGIMG name (`image_token_name`) at the id the
    layout gives it, and the special tokens of the layout under the names Chameleon's tokenizer gives them
    (Chameleon's own code finds them by these names): "<s>" (BOS), "<racm3:break>" (begin image),
    "<eoss>" (end image), "<reserved08706>" (the separator), "<reserved08799>" (end of an image row) and
    "<reserved08800>" + n (n grids of resolution); "<pad>" where the layout has its own padding token. On
    the chameleon layout these are Chameleon's own ids (8197, 8196, 8710, 8803, 8804 + n), and "<image>"
    is its id 8711 (transformers' conversion renames "<reserved08707>"); a compact vocabulary has no id
    to spare for "<image>" (nothing of this package uses it), so it has none there. Left out, as names
    that only the release's text_tokenizer.json could confirm: the text tokens' and the action tokens';
    transformers reads neither. A model without a layout gets an empty map: all that transformers needs,
    with no name that could be wrong."""
    if layout is None:
        return {}
    names = {"<s>": layout.bos, "<racm3:break>": layout.boi, "<eoss>": layout.eoi, "<reserved08706>": layout.sep,
             "<reserved08799>": layout.newline}
    if layout.pad != layout.bos:  # the chameleon layout pads with BOS: Chameleon's "<pad>" is no id of it
        names["<pad>"] = layout.pad
    names.update({f"<reserved{8800 + n:05d}>": layout.res_base + n for n in range(layout.n_res + 1)})
    if layout.name == "chameleon" and layout.vocab_size == 65536:
        names["<image>"] = 8711
    names.update({image_token_name(c): int(i) for c, i in enumerate(layout.image_code_ids)})
    return names


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json of a model: the loaded checkpoint's other keys (`hf_extra`: the release's
    vocabulary_map, vq_config, architectures, ... which its code needs to load the folder) or defaults
    for them, then the model's own shape, RoPE, head-norm layout and chunk rule."""
    layout = cfg.vocab_layout()
    # The end of a turn is the separator (Chameleon's 8710); a compact vocabulary has its own separator id.
    eos = 8710 if cfg.vocab_size == 65536 else layout.sep if layout is not None else 2
    d = dict(model_type="chameleon", architectures=["ChameleonXLLMXForConditionalGeneration"], hidden_act="silu",
             attention_bias=False, torch_dtype="bfloat16", bos_token_id=0, pad_token_id=1,
             eos_token_id=eos)
    d.update(cfg.hf_extra or {})
    if d.get("vocabulary_map") is None:  # a model built here: no tokenizer's vocabulary to write back
        d["vocabulary_map"] = vocabulary_map(layout)
    d.update({k: getattr(cfg, k) for k in _CONFIG_KEYS})
    # This model's head is its own parameter, written out: a loaded folder's "tied" would have a library that
    # ties (transformers 4.x) replace it with the embedding on load.
    d["tie_word_embeddings"] = False
    d.update(rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.model_parallel_size is not None:  # the release's head-norm layout (its config key)
        d["model_parallel_size"] = cfg.model_parallel_size
    if cfg.layout is not None:
        d["worldvla_layout"] = cfg.layout
    d["worldvla_attention"] = cfg.attention
    return d


def fsync_path(path) -> None:
    """Flush a file's data, or a folder's entries (the names renamed into it), to the disk: a rename
    makes a write atomic against a crash of the process; the flushes make it so against a power loss,
    which could otherwise leave the new name on empty or partial files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """`fsync_path` every file and folder under `root` (files first), and `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_atomic(path: Path, write) -> None:
    """Write a file that appears complete or not at all: `write(tmp)` writes a temporary sibling
    (`sibling_name`), which is flushed to the disk and then replaces `path` (a crash or a power loss leaves
    the old file). The temporary files that writes of `path` killed partway left are removed first. A `path`
    that is a symbolic link is written through: its target gets the new contents and the link stays."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    for *_, pid, stale in sibling_files(path, "tmp"):
        if not process_running(pid):
            stale.unlink(missing_ok=True)
    # os.open with 0o666, not mkstemp (0o600): the file gets the umask's mode, as a plain write gives it
    tmp = str(sibling_name(path, "tmp"))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors: 0o600)
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write a text file that appears complete or not at all (a crash leaves the old one)."""
    write_atomic(Path(path), lambda p: Path(p).write_text(text))


# The longest file name, in bytes, that common file systems take (ext4, XFS, Btrfs, APFS: 255).
_NAME_MAX = 255


def _name_digest(name: str) -> str:
    return "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _fitting(name: str, rest: str) -> str:
    """`name`, or where `.{name}{rest}` is longer than _NAME_MAX bytes, as much of its start as fits and a hash of it
    (`_name_digest`): a name of about 230 bytes or more made the temporary name too long to create."""
    if len(os.fsencode(f".{name}{rest}")) <= _NAME_MAX:
        return name
    digest = _name_digest(name)
    room = _NAME_MAX - len(os.fsencode(f".{digest}{rest}"))
    start = name[:room]
    while len(os.fsencode(start)) > room:  # characters of several bytes
        start = start[:-1]
    return start + digest


def sibling_name(path: Path, tag: str) -> Path:
    """`.{name}.{tag}-{pid}-{hex}` beside `path`: a hidden name no other write of `path` takes, which says the
    process that writes it, so that `remove_stale` can tell a killed process's folder from a running one's. A name
    too long for that to fit in _NAME_MAX bytes is cut and ends in a hash of itself (`_fitting`), by which
    `_siblings` finds it."""
    rest = f".{tag}-{os.getpid()}-{secrets.token_hex(6)}"
    return path.with_name(f".{_fitting(path.name, rest)}{rest}")


def new_sibling(path: Path, tag: str) -> Path:
    """A new empty folder at `sibling_name(path, tag)`."""
    # mkdir, not mkdtemp: the folder becomes `path` itself and must get the umask's mode, not 0700
    p = sibling_name(path, tag)
    p.mkdir()
    return p


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine; True where that cannot be told (not POSIX), so that a
    folder another save (or token-store build) may still be writing is kept."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no pid a process can have
        return False
    return True


def _siblings(folder, name: str, tags, files: bool = False) -> list[tuple[str, str, int, Path]]:
    """(name, tag, pid, path) of each `sibling_name` folder (with `files`, file) in `folder` whose name fully
    matches the regular expression `name` and whose tag is one of `tags`. The hex part may be missing: token-store
    builds before `new_sibling` named their shard folders `.shard_<n>.tmp-<pid>`. Where `name` is one name
    (`re.escape(name)`), those of it cut to fit (`_fitting`) are found too, by the hash they end in."""
    tag_re = "|".join(map(re.escape, tags))
    literal = _literal(name)
    cut = "" if literal is None else rf"|(?s:.*){re.escape(_name_digest(literal))}"
    pattern = re.compile(rf"\.(?:(?P<name>{name}){cut})\.(?P<tag>{tag_re})-(?P<pid>\d+)(?:-[0-9a-f]+)?")
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and (p.is_file() if files else p.is_dir()) and not p.is_symlink():
            found.append((literal if m["name"] is None else m["name"], m["tag"], int(m["pid"]), p))
    return found


def _literal(pattern: str) -> str | None:
    """The name the regular expression `pattern` is when it is `re.escape(name)`; None for any other expression."""
    name = re.sub(r"\\(.)", r"\1", pattern, flags=re.S)
    return name if re.escape(name) == pattern else None


def sibling_files(path: Path, tag: str) -> list[tuple[str, str, int, Path]]:
    """(name, tag, pid, path) of each `sibling_name(path, tag)` file beside `path`: the temporary files of writes
    of `path`, each with the process that wrote it."""
    return _siblings(path.parent, re.escape(path.name), (tag,), files=True)


def remove_stale(folder, name: str, tags=("tmp",), *, own: bool = False, restore: str | None = None) -> None:
    """Remove the `sibling_name` folders (of names matching the regular expression `name`, tags in `tags`) that
    processes killed partway (SIGKILL, an out-of-memory kill, a power loss) left in `folder`: those of processes
    that no longer run, and with `own` this process's too (an interrupted earlier call, for a caller that never
    runs two at once); a running process's are kept. A folder tagged `restore` is an older one set aside by a
    save killed between its two renames (where the names cannot be exchanged in one step): while its name is
    free it is the only copy, so the newest is renamed back to its name, not removed."""
    stale = [(n, tag, p) for n, tag, pid, p in _siblings(folder, name, tags)
             if (own and pid == os.getpid()) or not process_running(pid)]
    for n in {n for n, tag, _ in stale if tag == restore}:
        if not os.path.lexists(Path(folder) / n):
            newest = max((p for m, tag, p in stale if m == n and tag == restore), key=lambda p: p.stat().st_mtime)
            os.replace(newest, Path(folder) / n)
            stale = [s for s in stale if s[2] != newest]
    for *_, p in stale:
        shutil.rmtree(p, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_names(a: Path, b: Path) -> bool:
    """Swap the names of two folders in one atomic step (Linux's renameat2 with RENAME_EXCHANGE), so that no
    moment, not even a SIGKILL's, leaves `b`'s name free; False, with nothing changed, where the system or the
    file system cannot (the caller then renames twice)."""
    fn = _renameat2()
    return fn is not None and fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _carry_over(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def replace_folder(path, write, keep=None) -> None:
    """Write a folder that appears complete or not at all: `write(tmp)` fills a temporary sibling
    folder, which then takes the name `path`; an older folder there is removed only after that, and
    is left as it was (at its name) when the save fails or is interrupted (Ctrl-C) before. `keep(name) ->
    bool` picks entries of the older folder to carry over into the new one (hard links where possible)
    when `write` did not write them. The new folder is flushed to the disk before it is renamed in
    (`fsync_tree`). The older folder and the new one exchange their names in one step where Linux can
    (`exchange_names`); elsewhere the older one is renamed aside first, and put back if the second rename
    does not follow. Folders that killed saves left beside `path` are removed first, and an older folder
    such a save set aside is put back (`remove_stale`)."""
    path = Path(path).expanduser()  # the folder `check_folder` (a load) reads back
    if path.is_symlink():  # replace the folder the link names, and keep the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, re.escape(path.name), ("tmp", "old"), restore="old")
    tmp = new_sibling(path, "tmp")
    aside = None  # where the older folder went, when it was renamed aside
    try:
        write(tmp)
        if keep is not None and path.is_dir():
            for entry in path.iterdir():
                if keep(entry.name) and not os.path.lexists(tmp / entry.name):
                    _carry_over(entry, tmp / entry.name)
        fsync_tree(tmp)  # on the disk before its name is
        if not (path.exists() and exchange_names(tmp, path)):  # exchanged: tmp now names the older folder
            if path.exists():
                aside = sibling_name(path, "old")
                os.replace(path, aside)
            os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if aside is not None and os.path.isdir(aside):
            if os.path.lexists(path):  # the new folder has taken the name: the older one is done with
                shutil.rmtree(aside, ignore_errors=True)
            else:  # stopped between the two renames: the older folder back at its name
                os.replace(aside, path)
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder, or after an exchange the older one
        raise
    shutil.rmtree(tmp if aside is None else aside, ignore_errors=True)


# The files a model save writes or that hold an older save's weights (any of them would be read
# by load_model in place of the new ones); everything else in a model folder is the caller's.
MODEL_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in MODEL_FILES)


def read_json_file(path, what: str = "JSON file") -> dict:
    """The JSON object in `path`; a file that is not one (cut short, edited by hand) is refused naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid {what} ({e}); the file is damaged or was cut short") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a valid {what} (a JSON {type(value).__name__}, not an object)")
    return value


# config.json keys only a model's has (transformers' Chameleon fields), and only a VQGAN's (VQGANConfig's).
_MODEL_MARKERS = ("model_type", "hidden_size", "num_hidden_layers", "worldvla_layout")
_VQGAN_MARKERS = ("ch_mult", "n_embed", "z_channels")
_LOADERS = {"policy": "WorldVLAPolicy.from_pretrained", "model": "WorldVLA.from_pretrained",
            "vqgan": "VQGAN.from_pretrained"}
_KINDS = {"policy": ("a policy folder", "policy.json, model/, vqgan/"),
          "model": ("a WorldVLA model folder", "its config.json describes a Chameleon language model"),
          "vqgan": ("a VQGAN folder", "its config.json holds VQGANConfig fields"),
          "run": ("a training run's folder", "checkpoints/")}


def folder_kind(folder) -> str | None:
    """What a folder this package writes holds, by its files: "policy" (policy.json), "model" or "vqgan" (by
    the keys of its config.json), "run" (a `worldvla train` / `train-vq` --out: checkpoints/), else None."""
    folder = Path(folder)
    if (folder / "policy.json").is_file():
        return "policy"
    if (folder / "config.json").is_file():
        try:
            d = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None  # a damaged file: the loader names it
        if isinstance(d, dict) and any(k in d for k in _MODEL_MARKERS):
            return "model"
        if isinstance(d, dict) and all(k in d for k in _VQGAN_MARKERS):
            return "vqgan"
        return None
    if (folder / "checkpoints").is_dir():
        return "run"
    return None


def check_folder(path, want: str) -> Path:
    """`path` with `~` expanded, when it may be a `want` folder ("policy", "model", "vqgan"); else one
    error that says what it is (nothing there, a file, another kind of folder) and what to load instead."""
    folder = Path(path).expanduser()
    if not folder.exists():
        # The newest by time, as the next save puts back (`remove_stale`): names sort by pid, not by age.
        aside = [p for *_, p in _siblings(folder.parent, re.escape(folder.name), ("old",))]
        newest = max(aside, key=lambda p: p.stat().st_mtime) if aside else None
        hint = (f"; a save there was stopped between its two renames and left the older folder at {newest}: "
                f"rename it back to {folder.name} (the next save to {folder} does so)" if aside else "")
        if not hint and want == "policy":
            hint = "; `worldvla train` writes one to <its --out>/policy, `worldvla demo` to worldvla_demo/policy"
        raise FileNotFoundError(f"{folder}: no such folder (expected {_KINDS[want][0]}){hint}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder (expected {_KINDS[want][0]})")
    kind = folder_kind(folder)
    if kind is None or kind == want:
        return folder
    # The `want` folder inside this one, beside it or around it, where there is one (a policy's model/ and
    # vqgan/, a run's policy/; a policy's vqgan/ beside its model/, the policy around either).
    near = {"policy": ("policy",), "model": ("model", "policy/model"), "vqgan": ("vqgan", "policy/vqgan")}[want]
    candidates = [folder / s for s in near] + [folder.parent if want == "policy" else folder.parent / want]
    sub = next((c for c in candidates if folder_kind(c) == want), None)
    if sub is not None:
        fix = f"give {sub}" + (f", or load this folder with {_LOADERS[kind]}" if kind in _LOADERS else "")
    elif kind in _LOADERS:
        fix = f"load it with {_LOADERS[kind]}"
    else:
        fix = f"give the {want} folder inside it"
    if want == "policy" and kind == "model":
        fix += " (or write a policy folder around it with worldvla.inference.save_policy)"
    # A config.json of the other kind is the wrong file; otherwise the file `want` needs is not there.
    error = ValueError if {kind, want} == {"model", "vqgan"} else FileNotFoundError
    raise error(f"{folder} is {_KINDS[kind][0]} ({_KINDS[kind][1]}), not {_KINDS[want][0]}: {fix}")


def read_weights_file(path: Path) -> dict:
    """One weights file; a damaged one (cut short by a full disk or an interrupted copy) is refused naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():  # not damaged: it pickles objects besides tensors
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" (such as {found[1]})" if found else ""
            raise ValueError(f"{path} holds Python objects besides tensors{what}, which the safe loader refuses: "
                             f"save the model's tensors alone, torch.save(model.state_dict(), ...) or "
                             f"save_pretrained") from None
        raise ValueError(f"{path}: the weights file cannot be read ({type(e).__name__}: {e}); it is damaged or "
                         f"cut short: export or copy the model again") from None
    except (SafetensorError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: the weights file cannot be read ({type(e).__name__}: {e}); it is damaged or "
                         f"cut short: export or copy the model again") from None
    # A .bin may hold anything torch.save wrote: a training checkpoint ({"model": state_dict, "step": n}), a list.
    bad = (f"a {type(sd).__name__}" if not isinstance(sd, dict) else
           next((f"{k!r}: a {type(v).__name__}" for k, v in sd.items()
                 if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None))
    if bad is not None:
        inner = next((k for k, v in sd.items() if isinstance(v, dict)), None) if isinstance(sd, dict) else None
        hint = (f"; it looks like a training checkpoint: save its {inner!r} entry alone, "
                f"torch.save(ckpt[{inner!r}], ...)" if inner is not None else "")
        raise ValueError(f"{path}: not a state dict of named tensors (found {bad}){hint}")
    return sd


def weight_files(folder: Path) -> tuple[list[str], str | None, dict]:
    """The weights files a load of `folder` reads, the shard index naming them (or None) and that index. The first
    of these present is read, in transformers' order: model.safetensors, its shard index, pytorch_model.bin, its
    shard index (a stale file of another kind beside it is not read)."""
    files, index = [], {}
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if not (folder / name).is_file():
            continue
        if not name.endswith(".index.json"):
            files = [name]
            break
        index = read_json_file(folder / name, "shard index")
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{folder / name}: no 'weight_map' object; the shard index is damaged")
        bad = next(((k, v) for k, v in index["weight_map"].items() if not isinstance(v, str) or not v), None)
        if bad is not None or not index["weight_map"]:
            named = f"names {bad[1]!r} as the file of {bad[0]}" if bad else "names no tensor"
            raise ValueError(f"{folder / name}: its weight_map {named} (it maps each tensor to a shard's file "
                             f"name); the shard index is damaged: export or copy the model again")
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shards listed in {name} are missing: {missing}")
        break
    if not files:
        raise FileNotFoundError(f"{folder}: no weights found (expected model.safetensors, sharded safetensors with "
                                f"model.safetensors.index.json, or pytorch_model*.bin)")
    return files, (name if index else None), index


def link_model_files(src: Path, dst: Path) -> bool:
    """Put the files a load of the model folder `src` reads (config.json, the weights, their shard index) into
    the new folder `dst`: hard links where the file system allows, copies elsewhere. True where every file was
    linked."""
    files, index_name, _ = weight_files(src)
    dst.mkdir(parents=True)
    linked = True
    for name in ["config.json", *([index_name] if index_name else []), *files]:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)  # a shard index may name files in a subfolder
        try:
            os.link(src / name, dst / name)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(src / name, dst / name)
            linked = False
    return linked


def _load_state_dict(folder: Path) -> tuple[dict, dict]:
    """The folder's tensors, and the file each came from ({name: file name}): the files `weight_files` names."""
    files, _, index = weight_files(folder)
    sd, source = {}, {}
    for f in files:
        part = read_weights_file(folder / f)
        twice = sorted(set(part) & set(sd))
        if twice:  # a stale copy (a shard of another save) would silently replace the one the index names
            k = twice[0]
            named = index.get("weight_map", {}).get(k)
            raise ValueError(f"{folder}: tensors in more than one shard ({len(twice)}), e.g. {k} in both "
                             f"{source[k]} and {f} (the shard index names {named}): the folder mixes two "
                             f"saves; export or copy the model again, or remove the copies the index does not name")
        sd.update(part)
        source.update(dict.fromkeys(part, f))
    return sd, source


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are views of the same elements (not merely of one storage: the tensors of a flat
    buffer share one and are each their own)."""
    return (a.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory a (non-empty) tensor's elements lie in."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _unshare(sd: dict) -> None:
    """Give every tensor of `sd` whose memory overlaps another's (torch.save keeps a tied model's sharing in
    pytorch_model.bin) a copy of its own: loaded with assign=True, overlapping tensors would become one memory
    under two parameters, which an optimizer updates twice and a save refuses.

    Tensors that share a storage without overlapping (the views of one flat buffer that an FSDP save writes)
    stay views of it: copying them all would hold the weights twice while loading, and the first one kept the
    whole buffer alive for as long as the model lived. Views are copied still where their data starts off a
    16-byte boundary (the kernels' vector loads), and where those kept would leave most of their storage unused
    (tensors of it that were not loaded: the rest would stay allocated with the model)."""
    groups = {}
    for k, v in sd.items():
        if v.numel():
            groups.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(k)
    for names in groups.values():
        # Sorted by where they start, a tensor overlaps a kept one exactly when it starts before the end of
        # the furthest-reaching kept one (every kept one starts at or before it).
        names.sort(key=lambda k: _byte_span(sd[k])[0])
        kept, end, kept_bytes = [], None, 0
        for k in names:
            start, stop = _byte_span(sd[k])
            if (end is not None and start < end) or start % 16:
                sd[k] = sd[k].clone()
                continue
            kept.append(k)
            end = stop if end is None else max(end, stop)
            kept_bytes += stop - start
        if kept and 2 * kept_bytes < sd[kept[0]].untyped_storage().nbytes():
            for k in kept:
                sd[k] = sd[k].clone()


def _one_dtype(sd: dict, hf: dict) -> torch.dtype | None:
    """The dtype a checkpoint whose floating tensors hold several (bfloat16 matrices, float32 norms) is loaded
    in, as transformers' dtype="auto" does: config.json's `dtype` (`torch_dtype` before transformers 5), else
    the head's (or the embedding's); None when they hold one (the model keeps the file's tensors as they are)."""
    if len({v.dtype for v in sd.values() if v.is_floating_point()}) < 2:
        return None
    for key in ("dtype", "torch_dtype"):
        try:
            if isinstance(hf.get(key), str) and torch_dtype(hf[key]) is not None:
                return torch_dtype(hf[key])
        except ValueError:  # "auto" or a dtype no model of this package takes
            pass
    head = sd.get("lm_head.weight", sd.get("model.embed_tokens.weight"))
    return head.dtype if head is not None and head.is_floating_point() else torch.float32


def load_model(path, device=None, dtype=None) -> WorldVLA:
    """The model in a Hugging Face folder (see the module doc). `dtype`: a torch.dtype or a name
    (`devices.DTYPES`: "bf16", "float32", ...); None keeps the file's (one dtype for all: `_one_dtype`).
    `device`: a name or a torch.device (`devices.torch_device`); None keeps the CPU. Both are checked before
    any file is read."""
    dtype = torch_dtype(dtype)
    device = None if device is None else torch_device(device)
    folder = check_folder(path, "model")  # a policy, VQGAN or run folder named as such, not by its tensors
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: config.json is missing (expected a Hugging Face model folder)")
    hf = read_json_file(folder / "config.json", "model config")
    cfg = config_from_hf(hf)
    try:  # before the weights are read, naming the folder
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"checkpoint {folder}: its config.json describes no model this package builds: "
                         f"{err}") from None
    sd, source = _load_state_dict(folder)
    sd = {k: v for k, v in sd.items() if not k.startswith(("model.vqmodel.", "vqmodel."))}
    emb = sd.get("model.embed_tokens.weight")
    if hf.get("tie_word_embeddings") and emb is not None and (
            "lm_head.weight" not in sd or _same_tensor(sd["lm_head.weight"], emb)):
        # A tied export (transformers' tie_word_embeddings; torch.save of a tied model stores the head as the
        # embedding's tensor): the head is the embedding. This model's head is its own parameter: it gets a
        # copy, and the folder it saves says so (an untied head, written out: config_to_hf).
        sd["lm_head.weight"] = emb.clone()
        source.setdefault("lm_head.weight", source.get("model.embed_tokens.weight"))
    del emb
    _unshare(sd)  # tensors an untied config.json's file shares (a tied model's torch.save): copies of their own
    qn = sd.get("model.layers.0.self_attn.q_norm.weight")
    if qn is not None and qn.dim() == 2 and qn.shape[0] != cfg.num_attention_heads:
        # the release's layout: [model_parallel_size, head_dim] rows shared by the heads
        cfg.model_parallel_size = int(qn.shape[0])
        try:
            cfg.validate()
        except ValueError as err:
            raise ValueError(f"checkpoint {folder}: its q_norm has {qn.shape[0]} affine rows: {err}") from None
    with torch.device("meta"):
        model = WorldVLA(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [(k, tuple(sd[k].shape), tuple(s), source[k]) for k, s in expected.items()
           if k in sd and sd[k].shape != s]
    if missing or unexpected or bad:
        lines = []
        if missing:
            fix = "export or copy the model again, or give its config.json the shape of these weights"
            if "lm_head.weight" in missing:
                fix += (" (a model whose output head is its embedding needs \"tie_word_embeddings\": true in "
                        "config.json)")
            lines.append(f"missing {len(missing)} tensors: the weights files {sorted(set(source.values()))} lack these "
                         f"of the model its config.json describes, e.g. {missing[:4]}: {fix}")
        if unexpected:
            named = ", ".join(f"{k} (in {source[k]})" for k in unexpected[:4])
            lines.append(f"unexpected {len(unexpected)} tensors, e.g. {named}: they belong to no module of this "
                         f"model; remove them from the checkpoint, or load them separately "
                         f"(safetensors.torch.load_file)")
        if bad:
            lines.append("shape mismatches (name, file, config, weights file): " + "; ".join(map(str, bad[:4])))
        raise ValueError(f"checkpoint {folder}: its weights do not match its config.json: " + " | ".join(lines))
    if dtype is None:
        dtype = _one_dtype(sd, hf)
    model.load_state_dict(sd, assign=True)
    del sd, qn  # the model holds the file's tensors now: a conversion below then keeps one copy, not two
    model = model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
    return model.eval()


def save_model(model: WorldVLA, path, shard_size_gb: float = 5.0) -> None:
    """Write `config.json` and the weights (one file, or shards with an index past `shard_size_gb`, in GB of
    10**9 bytes).

    The folder is replaced whole (`replace_folder`): no weights of an older save survive next to
    the new ones (a stale shard index would win at load), and a failed save leaves the older
    folder as it was. Other files in the folder (a tokenizer, a vqgan/ folder...) are kept. A head tied
    to the embedding is written as a tensor of its own (the folder loads untied, with the same values)."""
    from safetensors.torch import save_file

    # Checked before anything is written: 0 or less put every tensor in a shard of its own (hundreds of files).
    if isinstance(shard_size_gb, bool) or not isinstance(shard_size_gb, numbers.Real) \
            or not math.isfinite(shard_size_gb) or shard_size_gb <= 0:
        raise ValueError(f"shard_size_gb must be a finite number > 0 (GB per weights file; a larger one keeps "
                         f"the model in one file), got {shard_size_gb!r}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # A head tied to the embedding (one tensor under both names), which safetensors refuses to write: each name
    # gets its own copy, as a load gives a tied folder's head one.
    _unshare(sd)
    limit = round(shard_size_gb * 10**9)  # GB as transformers counts them (max_shard_size="5GB"): 10**9 bytes
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    cfg = config_to_hf(model.config)
    # The weights' own dtype (transformers loads with dtype="auto" by default): not a default, nor the stale
    # value of a folder loaded in another dtype.
    cfg["torch_dtype"] = cfg["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")

    def write(folder: Path) -> None:
        # Through write_atomic for the umask's mode: safetensors writes its files 0o600, unreadable to others.
        if len(shards) == 1:
            write_atomic(folder / "model.safetensors", lambda p: save_file(shards[0], p, metadata=meta))
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_atomic(folder / name, lambda p, shard=shard: save_file(shard, p, metadata=meta))
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    replace_folder(path, write, keep=lambda name: not _is_model_file(name))


def load_release_tokenizer(folder, *, trust_checkpoint: bool = False):
    """The release's tokenizer folder: vqgan.yaml, vqgan.ckpt, text_tokenizer.json ->
    (VocabLayout, text tokenizer, VQGAN). `trust_checkpoint`: as `VQGAN.from_release` (a vqgan.ckpt that
    pickles other Python objects than tensors needs it; only for files you trust)."""
    from .tokens import ChameleonTextTokenizer, VocabLayout
    from .vqgan import VQGAN

    folder = Path(folder).expanduser()
    need = ["vqgan.yaml", "vqgan.ckpt", "text_tokenizer.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: tokenizer files missing: {missing} (expected {need})")
    layout = VocabLayout.chameleon(folder / "text_tokenizer.json")
    vqgan = VQGAN.from_release(folder / "vqgan.yaml", folder / "vqgan.ckpt", trust_checkpoint=trust_checkpoint)
    return layout, ChameleonTextTokenizer(folder / "text_tokenizer.json"), vqgan
