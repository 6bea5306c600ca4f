"""`worldvla import-release`: a policy folder from the release's checkpoint files, for `WorldVLAPolicy`,
`worldvla serve` and `worldvla eval-libero`.

The release publishes each action model as a Hugging Face Chameleon folder (`model_256/libero_goal`, ...) and
one tokenizer folder (`chameleon/tokenizer`: vqgan.yaml, vqgan.ckpt, text_tokenizer.json). What a policy also
needs, the release fixes in its evaluation scripts rather than in those files (spec sections 1 and 6):

- the action bounds: LIBERO's fixed min/max (`worldvla.tokens.actions.LIBERO_MIN` / `LIBERO_MAX`);
- the chunk size: 5 actions for LIBERO spatial, object and goal, 10 for LIBERO-10 (long);
- the frame size: 256 or 512 px, the folder the model was published in;
- two frames of history (the previous env step's and the current one).

The chunk and frame sizes are read from the model's path (`model_256/libero_10`, or a per-suite mirror named
like `WorldVLA-ActionModel-LIBERO-Goal-512`) unless given; where the path does not say, the command asks for them.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..cli import positive_int
from ..vqgan import UntrustedCheckpoint

# The release's chunk sizes by LIBERO suite (its ck_5 / ck_10 runs).
SUITE_CHUNK = {"spatial": 5, "object": 5, "goal": 5, "10": 10}


def infer_from_path(model_dir) -> dict:
    """What the path of a release model folder says: {"suite", "chunk_size", "image_size"}, each only where a
    path component names it (`model_256`, `libero_goal`, or a mirror's `...-LIBERO-Goal-512`)."""
    found = {}
    for part in Path(model_dir).expanduser().resolve().parts:
        low = part.lower()
        if m := re.fullmatch(r"model_(256|512)", low):
            found["image_size"] = int(m.group(1))
        if m := re.fullmatch(r"libero_(spatial|object|goal|10)", low):
            found["suite"] = m.group(1)
        if m := re.search(r"libero-(spatial|object|goal|10)-(256|512)$", low):
            found["suite"], found["image_size"] = m.group(1), int(m.group(2))
    if "suite" in found:
        found["chunk_size"] = SUITE_CHUNK[found["suite"]]
    return found


def import_release(model_dir, tokenizer_dir, out, *, chunk_size: int | None = None, image_size: int | None = None,
                   dtype=None, trust_checkpoint: bool = False) -> dict:
    """Write the policy folder `out` from the release's model folder and tokenizer folder. Returns what was
    written: {"path", "chunk_size", "image_size", "suite", "sources", "weights"} (`sources`: where each size came
    from; `weights`: "linked" or "copied", the release's files as they are, or "saved" in the `dtype` asked for).
    Refused before anything is written: an `out` that is the model's or the tokenizer's folder or holds one, and
    sizes whose query (two frames and a chunk) the model's positions cannot hold."""
    from ..checkpoint import check_folder, folder_kind, load_release_tokenizer
    from ..devices import torch_dtype
    from ..model import WorldVLA
    from ..tokens import ActionTokenizer
    from .policy import WorldVLAPolicy, save_policy

    model_dir, tokenizer_dir = check_folder(model_dir, "model"), Path(tokenizer_dir).expanduser()
    if folder_kind(model_dir) != "model":  # check_folder lets a folder of no known kind through
        raise ValueError(f"{model_dir}: expected a WorldVLA model folder (the release's model_256/<suite> or "
                         f"model_512/<suite>: a config.json of a Chameleon model and its weights)")
    # The policy folder is written whole in place of `out`: at a source folder, or one around it, the release's
    # files there (its tokenizer, the other suites' models) would be removed.
    out = Path(out).expanduser()  # the folder save_policy writes: `~` is the home folder there too
    target = out.resolve()
    for what, source in (("model", model_dir.resolve()), ("tokenizer", tokenizer_dir.resolve())):
        if target == source or target in source.parents:
            held = "" if target == source else f", which holds the release's {what} folder {source}"
            raise ValueError(f"--out {out} would replace {target}{held}: the policy folder is written whole in "
                             f"place of what is there; give a new folder for it, e.g. "
                             f"policies/{model_dir.resolve().name}")
    dtype = torch_dtype(dtype)  # a bad name refused before any weight is read
    seen = infer_from_path(model_dir)
    sizes, sources = {"chunk_size": chunk_size, "image_size": image_size}, {}
    for name, option in (("chunk_size", "--chunk-size"), ("image_size", "--image-size")):
        if sizes[name] is not None:
            sources[name] = option
        elif name in seen:
            sizes[name], sources[name] = seen[name], f"the path ({model_dir})"
        else:
            what = ("actions per chunk: the release runs 5 for LIBERO spatial, object and goal, 10 for LIBERO-10"
                    if name == "chunk_size" else "frame size in pixels: 256 or 512, the folder the model was "
                    "published in (model_256, model_512)")
            raise ValueError(f"{model_dir}: its path names no LIBERO suite and size, so give {option} ({what})")
    expected = "the release's tokenizer folder, chameleon/tokenizer: vqgan.yaml, vqgan.ckpt, text_tokenizer.json"
    if tokenizer_dir.is_file():
        raise NotADirectoryError(f"{tokenizer_dir} is a file, not a folder (expected {expected}): give the folder "
                                 f"that holds it, {tokenizer_dir.parent}")
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: no such folder (expected {expected})")
    layout, text_tokenizer, vqgan = load_release_tokenizer(tokenizer_dir, trust_checkpoint=trust_checkpoint)
    model = WorldVLA.from_pretrained(model_dir, dtype=dtype)
    if model.layout is None or model.layout.vocab_size != layout.vocab_size:
        raise ValueError(f"{model_dir}: a model of {model.config.vocab_size} ids, not the release's Chameleon "
                         f"vocabulary of {layout.vocab_size}: import-release reads the release's action models")
    # A query (two frames, the chunk, an instruction) must fit the model's positions, or the policy written would
    # refuse every episode: checked on the policy it will be, before anything is written.
    policy = WorldVLAPolicy(model, vqgan, ActionTokenizer(layout), chunk_size=sizes["chunk_size"],
                            image_size=sizes["image_size"], history=2, text_tokenizer=text_tokenizer,
                            tune_malloc=False)
    need, limit = policy._prompt_capacity(policy._prefix("").numel()), model.config.max_position_embeddings
    if need > limit:
        raise ValueError(f"{model_dir}: a query of two {sizes['image_size']} px frames ({policy._image_len} tokens "
                         f"each) and {sizes['chunk_size']} actions needs {need} positions, more than the model's "
                         f"{limit} (max_position_embeddings), with an empty instruction: give a smaller "
                         f"--image-size or --chunk-size")
    # Absolute paths: the policy is served and evaluated from other directories.
    extra = {"source": "release", "model": str(model_dir.resolve()), "tokenizer": str(tokenizer_dir.resolve()),
             "suite": seen.get("suite")}
    # Without a dtype the policy's model is the release's files as they are: linked (or copied), not written again.
    weights = save_policy(out, model, vqgan, ActionTokenizer(layout), chunk_size=sizes["chunk_size"],
                          image_size=sizes["image_size"], history=2, extra=extra,
                          text_tokenizer_json=tokenizer_dir / "text_tokenizer.json",
                          model_folder=model_dir if dtype is None else None)
    return {"path": str(out), **sizes, "suite": seen.get("suite"), "sources": sources, "weights": weights}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.epilog = ("example:\n  worldvla import-release ckpts/model_256/libero_goal --tokenizer ckpts/chameleon/tokenizer "
                "--out policies/libero_goal_256\n  worldvla eval-libero --policy policies/libero_goal_256 --suite "
                "libero_goal")
    p.add_argument("model", help="the release's model folder (a Hugging Face Chameleon folder, e.g. "
                                 "model_256/libero_goal)")
    p.add_argument("--tokenizer", required=True,
                   help="the release's tokenizer folder (chameleon/tokenizer: vqgan.yaml, vqgan.ckpt, "
                        "text_tokenizer.json)")
    p.add_argument("--out", required=True, help="policy folder to write (replaced whole if it exists; the model's "
                                                "or the tokenizer's folder, or one around them, is refused)")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help="actions per chunk (default: from the path, 5 for LIBERO spatial/object/goal, 10 for "
                        "LIBERO-10)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="frame size in pixels (default: from the path, model_256 or model_512)")
    p.add_argument("--dtype", default=None,
                   help="store the weights in this dtype (float32, bfloat16), written anew; default: the "
                        "release's files as they are, hard-linked where the file system allows (no copy)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="let vqgan.ckpt unpickle objects other than tensors (only for files you trust)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        info = import_release(args.model, args.tokenizer, args.out, chunk_size=args.chunk_size,
                              image_size=args.image_size, dtype=args.dtype, trust_checkpoint=args.trust_checkpoint)
    except UntrustedCheckpoint as e:
        # The refusal names the Python keyword (and would end in a traceback): the command's way is its option.
        raise ValueError(f"{Path(args.tokenizer).expanduser() / 'vqgan.ckpt'} holds Python objects besides tensors "
                         f"(trainer state), which the safe loader refuses: if you trust the file, pass "
                         f"--trust-checkpoint") from e
    src = info["sources"]
    weights = {"linked": "the release's weight files hard-linked", "saved": f"the weights in {args.dtype}",
               "copied": "the release's weight files copied (no hard links across file systems)"}[info["weights"]]
    print(f"wrote the policy {info['path']}: {info['chunk_size']} actions a chunk (from {src['chunk_size']}), "
          f"{info['image_size']} px frames (from {src['image_size']}), LIBERO's fixed action bounds, two frames "
          f"of history, {weights}")
    suite = f" --suite libero_{info['suite']}" if info["suite"] else ""
    print(f"next: worldvla eval-libero --policy {info['path']}{suite}   or   worldvla serve --checkpoint "
          f"{info['path']}")
    return 0
