"""`WorldVLAPolicy`: frames in, continuous action chunks out (spec section 6).

Per query the prompt is `BOS, "What action should the robot take to {instruction}?",
images..., SEP` with the release's "2h_1a_img_only" history: the frame of the previous
env step and the current frame (only the current one on an episode's first query).

The previous frame comes, in order of precedence, from
* `act(images, history=previous)`: the caller passes it (None = first query), or
* the policy's own record: every frame given to `act` or `observe` is remembered, so a
  caller that calls `observe(frame)` for each executed step's frame that did not go to
  `act` gets the release's behaviour. `step(frame)` does this bookkeeping itself: it
  returns one action per call, querying a new chunk when the previous one is used up.

Caches: the VQ codes of recent frames (keyed by content, so the previous frame's codes
are reused whenever it was already encoded, e.g. as the current frame of the last query),
with all missing frames encoded in one VQGAN call; and the keys/values of the constant
prefix (BOS + instruction text), prefilled once per set of instructions (kept across
episodes, a few sets at a time) and copied into the cache at every query, so each query
prefills only the images and the separator. Both follow the weights through their version
counters; writes that bypass them (through `.data`) need `WorldVLAPolicy.clear_caches()`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import link_model_files, read_json_file, replace_folder
from ..devices import torch_device, torch_dtype
from ..tokens import ActionTokenizer, ByteTextTokenizer, SequenceBuilder, VocabLayout, text_tokenizer_for
from ..tokens.layout import with_release_image_ids
from ..tokens.sequence import ACTION_PROMPT, image_tokens
from .chunk import MODES, chunk_length, generate_action_chunk
from .release import RELEASE_MAX_NEW_TOKENS, generate_release_actions
from .engine import InferenceEngine, _model_state, outside_inference_mode
from .frames import (FrameDtypeError, check_frame_sampling, frame_array, frame_layout_hint, generate_frames,
                     mixed_sizes_error, uint8_hint)
from .malloc import tune_cpu_malloc
from ..checks import is_count

POLICY_FILE = "policy.json"
FORMAT_VERSION = 1
_AUTO = object()
_FAILS = object()  # step()'s queue: the release fails the episode here


def check_vqgan_patch(vqgan, layout) -> None:
    """The resolution tokens count a frame's size from its code grid times the layout's `patch`: a VQGAN of
    another factor would give every frame the wrong size tokens."""
    if vqgan.downsample != layout.patch:
        raise ValueError(f"the VQGAN downsamples by {vqgan.downsample} but the model's vocabulary layout counts "
                         f"{layout.patch} px a code (its patch); pair the model with the VQGAN its token store was "
                         f"built with")


def save_policy(path, model, vqgan, action_tokenizer: ActionTokenizer, chunk_size: int, image_size: int,
                history: int = 2, extra: dict | None = None, text_tokenizer_json=None, model_folder=None) -> str:
    """Write a policy folder: `model/`, `vqgan/`, `policy.json` (and `text_tokenizer.json` for the
    Chameleon vocabulary: `text_tokenizer_json` is its path or a ChameleonTextTokenizer).

    `model_folder`: the model folder `model` was loaded from, unchanged (same dtype, no edits); its files then go
    into `model/` as they are, as hard links where the file system allows (no bytes written: a 7B model is 14 GB
    or more), instead of being saved again. Returns how the weights got there: "saved", "linked" or "copied".

    The folder appears complete or not at all: everything is written into a temporary sibling
    folder that is then renamed into place (replacing an older policy)."""
    path = Path(path)
    _check_sizes(chunk_size, image_size)  # int() below would write 2.5 as 2
    _check_history(history)
    _check_extra(extra)
    if model.layout is not None and model.layout.text_base < 0 and text_tokenizer_json is None:
        raise ValueError("a model on the Chameleon vocabulary needs its text_tokenizer.json (text_tokenizer_json=)")
    if model.layout is not None and model.layout.text_base >= 0 and text_tokenizer_json is not None:
        raise ValueError(f"a model on the {model.layout.name} layout encodes text as byte ids; a text_tokenizer.json "
                         f"in its policy folder would encode instructions as it was never trained: drop "
                         f"text_tokenizer_json=")
    down, grid = vqgan.downsample, (model.layout.res_grid if model.layout is not None else 32)
    if model.layout is not None:
        check_vqgan_patch(vqgan, model.layout)
    if image_size % down or image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of the VQGAN factor {down} and of the "
                         f"{grid}-px resolution grid")

    info = json.dumps({"format_version": FORMAT_VERSION, "action_low": action_tokenizer.low.tolist(),
                       "action_high": action_tokenizer.high.tolist(), "chunk_size": int(chunk_size),
                       "action_dim": int(action_tokenizer.action_dim), "image_size": int(image_size),
                       "history": int(history), "extra": extra or {}}, indent=2)
    how = "saved"

    def write(tmp: Path) -> None:
        nonlocal how
        if model_folder is None:
            model.save_pretrained(tmp / "model")
        else:
            how = "linked" if link_model_files(Path(model_folder), tmp / "model") else "copied"
        vqgan.save_pretrained(tmp / "vqgan")
        if hasattr(text_tokenizer_json, "tok"):  # a ChameleonTextTokenizer
            text_tokenizer_json.tok.save(str(tmp / "text_tokenizer.json"))
        elif text_tokenizer_json is not None:
            shutil.copyfile(text_tokenizer_json, tmp / "text_tokenizer.json")
        (tmp / POLICY_FILE).write_text(info)

    replace_folder(path, write)
    return how


POLICY_MODES = MODES + ("release",)


def _check_sizes(chunk_size, image_size) -> None:
    for name, value in (("chunk_size", chunk_size), ("image_size", image_size)):
        if not is_count(value, 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_history(history) -> None:
    # A bool is refused by name: history=True ("use the history") would be 1, the current frame alone.
    if isinstance(history, bool) or not isinstance(history, (int, np.integer)) or history not in (1, 2):
        raise ValueError(f"history must be 1 (current frame) or 2 (previous + current frame, the release), "
                         f"got {history!r}")


def _check_extra(extra) -> None:
    """`extra` goes into policy.json as an object: anything else would be written and then fail every load."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict (policy.json keeps it as a JSON object), got {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must hold JSON values only (str, numbers, bools, None, lists, dicts): {e}; convert "
                         f"NumPy values with .item() or .tolist()") from None


def _digest(frame: np.ndarray) -> tuple:
    return frame.shape, hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16).digest()


def _count_error(n_instructions: int, call: str, n_frames: int) -> str:
    """A call's frames that are not one per environment of the episode's instructions."""
    return (f"reset() got {n_instructions} instruction{'s' if n_instructions != 1 else ''} but {call}() got {n_frames} "
            f"frame{'s' if n_frames != 1 else ''}; pass one frame per environment (or reset with a single instruction)")


class WorldVLAPolicy:
    """Action chunks from camera frames for one or several environments.

    `act(image [H, W, 3])` -> [K, D]; `act(images [N, H, W, 3])` -> [N, K, D] (float32,
    de-normalized with the action tokenizer's bounds). Frames of another size are resized
    to `image_size` x `image_size` (bilinear; a non-square frame is stretched, not cropped: crop
    it first to keep its aspect ratio as the training frames had it). `mode`: chunk decoding,
    "parallel" or "sequential" under the chunk mask, or "causal" (nothing hidden); the default is "parallel", or "causal" for a model trained
    with plain causal attention (`config.attention == "causal"`), which allows nothing else.
    These three force the chunk's structure and choose each bin among the bin ids. "release"
    decodes as the release does (inference/release.py): greedy over the whole vocabulary until
    the separator or `max_new_tokens`, every BOA..EOA block found becoming an action, so a chunk
    has as many actions as the model wrote ([n, D]; a batch whose chunks differ in length is a
    list of arrays), parsed as the release parses and executes them (`parse_release_actions`: a
    block of more than D ids keeps its first D, a block of one id is broadcast to D; an EOA closing
    no block after a closed one is skipped). Output that fails the release's episode gives no
    action, which the harnesses count as a failed episode: malformed blocks (`Generated.malformed`:
    an EOA before any block, on which the release's parser raises; a BOA inside an open block or a
    second EOA closing no block, on which its mask raises), and a chunk holding a block of 0 or
    2..D-1 ids (`Generated.fails_after`), on which the release fails only when it executes that
    block: `step()` returns the actions before it first, then raises. Two differences are left:
    `act()` (the harnesses' and the server's call) returns none of such a chunk's actions, where the
    release executes those before the short block first (an episode succeeding during them counts
    as a success there); and a BOA after an EOA closing no block is malformed here too (no action),
    where the release goes on with that BOA paired to an earlier EOA, out of order, which the chunk
    rule cannot express.
    `tune_malloc`: fix glibc's malloc thresholds for the process (`tune_cpu_malloc`: CPU forwards
    stop faulting their temporaries' pages in anew at every call); None does it when the model
    is on the CPU. `engine_headroom` (attribute, tokens, default 0; `PolicyServer` sets `SERVER_ENGINE_HEADROOM`):
    each batch size's engine is built with room for that many more instruction tokens than the query that
    builds it, so that longer instructions (a warm-up's short one, then the robots') reuse it and its CUDA
    graphs. `max_prefixes` (32) instructions keep their prefilled prefix (a server: its max_episodes).

    The caches computed from the weights (instruction prefixes, VQ codes, the engines' plans) notice a
    model or VQGAN replaced, converted, or updated in place through its tensors (load_state_dict, an
    optimizer step) by the tensors' version counters. Writes that bypass the counters (through `.data`,
    as an EMA or a weight sync may write, or a NumPy/DLPack view) are not seen: call `clear_caches()`
    after them.
    """

    def __init__(self, model, vqgan, action_tokenizer: ActionTokenizer, *, chunk_size: int, image_size: int,
                 history: int = 2, text_tokenizer=None, mode: str | None = None, extra: dict | None = None,
                 max_new_tokens: int = RELEASE_MAX_NEW_TOKENS, layout: VocabLayout | None = None,
                 code_cache_size: int = 64, tune_malloc: bool | None = None):
        if model.layout is None:
            raise ValueError("the model has no vocabulary layout (ModelConfig.layout); a policy needs one")
        causal_model = model.config.attention == "causal"
        mode = mode or ("causal" if causal_model else "parallel")
        if mode not in POLICY_MODES:
            raise ValueError(f"mode must be one of {POLICY_MODES}, got {mode!r}")
        if causal_model and mode != "causal":
            raise ValueError(f"this model was trained with plain causal attention; its chunks decode with "
                             f"mode='causal', not {mode!r}")
        _check_history(history)
        # As save_policy refuses them: a chunk of no action fails only at the first query, and an image size
        # below 1 px in the frames' resize.
        _check_sizes(chunk_size, image_size)
        if extra is not None and not isinstance(extra, dict):  # dict() would fail on it, or take its pairs
            raise ValueError(f"extra must be a dict (policy.json keeps it as a JSON object), got "
                             f"{type(extra).__name__}")
        # An int() of them would take 2.5 as 2 and True as 1.
        if not is_count(max_new_tokens, 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1 (tokens a mode='release' query generates at "
                             f"most), got {max_new_tokens!r}")
        if not is_count(code_cache_size):
            raise ValueError(f"code_cache_size must be an integer >= 0 (frames whose VQ codes are kept; 0 keeps "
                             f"none), got {code_cache_size!r}")
        # Refused here: text_tokenizer_for's error names the command line's option and another function's keyword.
        if (layout or model.layout).text_base < 0 and text_tokenizer is None:
            raise ValueError("a model on the Chameleon vocabulary encodes instructions with the release's "
                             "text_tokenizer.json: pass text_tokenizer=ChameleonTextTokenizer(path) (worldvla.tokens)")
        self.model, self.vqgan = model.eval(), vqgan.eval()
        self.layout = with_release_image_ids(layout or model.layout, text_tokenizer)
        if self.layout.vocab_size != model.config.vocab_size:
            raise ValueError(f"the layout has {self.layout.vocab_size} ids, the model {model.config.vocab_size}")
        # The tokenizer turns the model's bin ids into actions (and actions into ids, for imagine): bins of
        # another layout would shift every action without a word.
        ours = (self.layout.bin_range, self.layout.boa, self.layout.eoa)
        theirs = (action_tokenizer.layout.bin_range, action_tokenizer.layout.boa, action_tokenizer.layout.eoa)
        if theirs != ours:
            raise ValueError(f"the action tokenizer's layout ({action_tokenizer.layout.name}) has its bins at ids "
                             f"{list(theirs[0])}, the model's layout ({self.layout.name}) at {list(ours[0])}: build "
                             f"it on the model's layout, ActionTokenizer(model.layout, low, high)")
        if self.layout.text_base >= 0 and text_tokenizer is not None:
            sample = ACTION_PROMPT.format(instruction="x")  # as save_policy refuses its text_tokenizer.json
            if list(text_tokenizer.encode(sample)) != ByteTextTokenizer(self.layout).encode(sample):
                raise ValueError(f"a model on the {self.layout.name} layout encodes text as byte ids; this "
                                 f"text_tokenizer encodes instructions as the model was never trained: drop "
                                 f"text_tokenizer=")
        self.action_tokenizer = action_tokenizer
        self.text_tokenizer = text_tokenizer or text_tokenizer_for(self.layout)
        self.builder = SequenceBuilder(self.layout, self.text_tokenizer, action_tokenizer)
        self.chunk_size, self.image_size, self.history = int(chunk_size), int(image_size), int(history)
        self.action_dim = action_tokenizer.action_dim
        self.mode, self.extra = mode, dict(extra or {})
        self.max_new_tokens = int(max_new_tokens)
        check_vqgan_patch(vqgan, self.layout)
        down = vqgan.downsample
        if self.image_size % down or (self.image_size // down) % (self.layout.res_grid // self.layout.patch):
            raise ValueError(f"image_size {self.image_size} must be a multiple of {self.layout.res_grid} px "
                             f"(VQGAN factor {down}, resolution grids of {self.layout.res_grid} px)")
        self.grid = self.image_size // down
        self._image_len = image_tokens(torch.zeros(self.grid, self.grid, dtype=torch.long), self.layout).numel()
        self.device = next(model.parameters()).device
        if tune_malloc or (tune_malloc is None and self.device.type == "cpu"):
            tune_cpu_malloc()
        self._codes: OrderedDict = OrderedDict()      # frame digest -> VQ codes
        self._codes_state = None                      # the VQGAN's state the codes were made with (clear_caches)
        self._code_cache_size = int(code_cache_size)
        self._engines: OrderedDict = OrderedDict()   # batch size -> InferenceEngine
        self._instructions: list[str] | None = None
        self._broadcast = True
        self._prefixes: OrderedDict = OrderedDict()   # instruction -> keys, values of BOS + its text
        self._prefix_state = None                     # the model's state the prefixes were computed on (clear_caches)
        self.max_prefixes = 32                        # instructions whose prefixes are kept (a PolicyServer
                                                      # raises it to its max_episodes)
        self.max_engines = 4                          # engines kept, one per batch size (a server sets more)
        # Instruction tokens an engine leaves room for beyond the query that builds it (a PolicyServer sets
        # SERVER_ENGINE_HEADROOM, so that its warm-up's engines and CUDA graphs serve the robots' instructions).
        self.engine_headroom = 0
        self._last: np.ndarray | None = None          # most recent frame(s) seen, [N, H, W, 3]
        self._queue: list = []
        self._queue_envs = 0                          # environments the queued actions are for (step)

    @property
    def code_cache_size(self) -> int:
        """How many frames' VQ codes are kept (the least recently used go first)."""
        return self._code_cache_size

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kw) -> "WorldVLAPolicy":
        """The policy in a folder `save_policy` wrote. `kw` goes to the constructor (mode=, ...) and overrides
        what policy.json holds (chunk_size=, image_size=, history=, extra=)."""
        from ..checkpoint import check_folder
        from ..model import WorldVLA
        from ..tokens import ChameleonTextTokenizer
        from ..vqgan import VQGAN

        path = check_folder(path, "policy")  # `~` expanded; nothing there, or a model/VQGAN/run folder, named
        if not (path / POLICY_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a policy folder: {POLICY_FILE} is missing (`worldvla train` "
                                    f"and `worldvla demo` write one, as does worldvla.inference.save_policy)")
        info = read_json_file(path / POLICY_FILE, "policy file")
        missing = [k for k in ("action_low", "action_high", "chunk_size", "image_size") if k not in info]
        if missing:
            raise ValueError(f"{path / POLICY_FILE}: keys {missing} are missing; the file is damaged or was not "
                             f"written by worldvla.inference.save_policy")
        device, dtype = torch_device(device), torch_dtype(dtype)
        model = WorldVLA.from_pretrained(path / "model", device=device, dtype=dtype)
        vqgan = VQGAN.from_pretrained(path / "vqgan", map_location=device)
        if model.layout is None:
            raise ValueError(f"{path / 'model'}: config.json has no worldvla_layout and is not the Chameleon "
                             f"vocabulary")
        text = None
        if model.layout.text_base < 0 and (path / "text_tokenizer.json").is_file():  # byte-text layouts need none
            text = ChameleonTextTokenizer(path / "text_tokenizer.json")
        elif model.layout.text_base < 0 and kw.get("text_tokenizer") is None:
            raise FileNotFoundError(f"{path / 'text_tokenizer.json'} is missing: a model on the Chameleon vocabulary "
                                    f"encodes instructions with it; copy the release's text_tokenizer.json there (or "
                                    f"pass text_tokenizer=)")
        at = ActionTokenizer(model.layout, info["action_low"], info["action_high"])
        if at.action_dim != info.get("action_dim", at.action_dim):
            raise ValueError(f"{path / POLICY_FILE}: action_dim {info['action_dim']!r} disagrees with the "
                             f"{at.action_dim} bounds")  # repr: a "4" written as a string is not 4
        saved = {"chunk_size": info["chunk_size"], "image_size": info["image_size"], "history": info.get("history", 2),
                 "extra": info.get("extra"), "text_tokenizer": text}
        return cls(model, vqgan, at, **{**saved, **kw})

    def save(self, path) -> None:
        text = self.text_tokenizer if hasattr(self.text_tokenizer, "tok") else None
        save_policy(path, self.model, self.vqgan, self.action_tokenizer, self.chunk_size, self.image_size,
                    self.history, self.extra, text_tokenizer_json=text)

    def metadata(self) -> dict:
        cfg = self.model.config
        return {
            "image_size": self.image_size, "chunk_size": self.chunk_size, "action_dim": self.action_dim,
            "history": self.history, "mode": self.mode,
            "action_low": self.action_tokenizer.low.tolist(), "action_high": self.action_tokenizer.high.tolist(),
            "layout": self.layout.name, "vocab_size": cfg.vocab_size,
            "model": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                      "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                      "num_key_value_heads": cfg.num_key_value_heads, "parameters": self.model.num_parameters(),
                      "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")},
            "vqgan": {"downsample": self.vqgan.downsample, "codebook_size": self.vqgan.config.n_embed},
            "device": str(self.device), "extra": self.extra,
        }

    # ------------------------------------------------------------------ episode state
    def reset(self, instruction) -> None:
        """Start an episode: one instruction for every environment, or a list with one per environment.
        Instructions are str: bytes (as HDF5 datasets return them) are refused, to be decoded by the caller.
        A refused instruction ends the previous episode all the same: nothing of it (queued actions, the
        previous frame) reaches a later query, and act/observe/step refuse to run until a reset succeeds."""
        self._instructions, self._last, self._queue = None, None, []
        # Refused as PolicyClient.reset refuses them: an empty prompt (or str(None)) would run without a task.
        if isinstance(instruction, (bytes, bytearray)):  # np.bytes_ too; iterated, they would be numbers
            raise ValueError(_bytes_hint(instruction, "the task instruction"))
        if isinstance(instruction, str):
            if not instruction.strip():
                raise ValueError("reset() needs the task instruction as a non-empty string")
            instructions, broadcast = [instruction], True
        else:
            try:
                instruction = list(instruction)
            except TypeError:  # None, a number: nothing to iterate
                raise ValueError(f"reset() needs the task instruction as a non-empty string (or a list of them, one "
                                 f"per environment), got {type(instruction).__name__}") from None
            bad = [i for i, s in enumerate(instruction) if not isinstance(s, str) or not s.strip()]
            if bad and isinstance(instruction[bad[0]], (bytes, bytearray)):
                raise ValueError(_bytes_hint(instruction[bad[0]], f"entry {bad[0]} of the instructions"))
            if bad:
                raise ValueError(f"reset() needs each environment's task instruction as a non-empty string; "
                                 f"entry {bad[0]} is {instruction[bad[0]]!r}")
            instructions, broadcast = [str(s) for s in instruction], False
            if not instructions:
                raise ValueError("reset got an empty list of instructions")
        for ins in dict.fromkeys(instructions):
            self.check_instruction(ins)
        self._instructions, self._broadcast = instructions, broadcast

    def check_instruction(self, instruction: str) -> None:
        """Raise ValueError if a query with `instruction` (its prompt with the full history and the chunk)
        would not fit the model's context (max_position_embeddings)."""
        prefix = self._prefix(instruction).numel()
        n = self._prompt_capacity(prefix)
        limit = self.model.config.max_position_embeddings
        if n <= limit:
            return
        least = self._prompt_capacity(self._prefix("").numel())
        if least >= limit:  # an empty query fills the context (reset refuses empty ones): shortening is no fix
            fewer = " or history=1" if self.history == 2 else ""
            tokens = "max_new_tokens" if self.mode == "release" else "chunk_size"
            raise ValueError(f"no instruction fits the model's {limit} positions: a query needs {least} with an empty "
                             f"one ({self.history} frame(s) of {self.image_size} px, {self._image_len} tokens each, "
                             f"and {self._new_tokens()} generated tokens) and more with any other; use a smaller "
                             f"image_size{fewer}, or a smaller {tokens}")
        raise ValueError(f"the instruction is too long: a query with it needs {n} positions (instruction {prefix} "
                         f"tokens, {self.history} frame(s) and {self._new_tokens()} generated tokens), more than the "
                         f"model's {limit}; shorten it")

    def _prefix(self, instruction: str) -> torch.Tensor:
        """BOS + the instruction's text: the prompt's constant prefix, cached per set of instructions."""
        ids = self.text_tokenizer.encode(ACTION_PROMPT.format(instruction=instruction))
        return torch.tensor([self.layout.bos] + list(ids))

    def _prompt_capacity(self, prefix_len: int) -> int:
        """Cache slots of the longest query a prefix of `prefix_len` tokens can produce (full history)."""
        return prefix_len + self.history * self._image_len + 1 + self._new_tokens()

    def _new_tokens(self) -> int:
        """Tokens a query generates at most: a chunk, or the release's `max_new_tokens`."""
        return self.max_new_tokens if self.mode == "release" else chunk_length(self.chunk_size, self.action_dim)

    def observe(self, image) -> None:
        """Record the frame(s) of an executed env step that was not given to `act`: one per environment
        after `reset` with a list of instructions."""
        self._require_reset()
        frames, _ = self._frames(image)
        # Checked as act checks it: a wrong count recorded here would fail only at the next act, naming history.
        if not self._broadcast and frames.shape[0] != len(self._instructions):
            raise ValueError(_count_error(len(self._instructions), "observe", frames.shape[0]))
        self._last = frames.copy()  # the caller may reuse its frame buffer

    def step(self, image) -> np.ndarray:
        """One action per call ([D], or [N, D] for a batch), querying a chunk when the last one is used up.
        RuntimeError where the release's loop fails the episode (mode='release': a chunk without an action, or
        the call that reaches a block of 0 or 2..D-1 ids, after the chunk's actions before it)."""
        self._require_reset()
        if not self._queue:
            out, fails_after = self._act(image, _AUTO, keep_before_failure=True, caller="step")
            chunk = check_chunk(out)
            self._queue = list(np.moveaxis(chunk, -2, 0))  # K entries of [D] or [N, D]
            self._queue_envs = 1 if chunk.ndim == 2 else chunk.shape[0]
            if fails_after:  # mode='release': a block the release fails on comes after these actions
                self._queue.append(_FAILS)
        else:
            # The queued actions are for the environments of the chunk's query: another count would get them
            # without a word (one frame, two environments' actions).
            frames, single = self._frames(image)
            if frames.shape[0] != self._queue_envs:
                plural = "s" if self._queue_envs > 1 else ""
                raise ValueError(f"step() got {frames.shape[0]} frame(s) but the chunk under way is for "
                                 f"{self._queue_envs} environment{plural}: pass one frame per environment until "
                                 f"its actions are used up, or reset() to start again")
            self._last = frames.copy()  # as observe() records it
            if self._queue_envs == 1 and self._queue[0] is not _FAILS:  # shaped for this call: [D] for a frame
                # [H, W, 3], [1, D] for a batch of one, whichever the chunk's query had
                self._queue[0] = self._queue[0].reshape(self.action_dim if single else (1, self.action_dim))
        action = self._queue.pop(0)
        if action is _FAILS:
            self._queue = []
            raise RuntimeError("the chunk's next action block is malformed: it holds 0 or 2..D-1 ids (mode='release'; "
                               "the release fails the episode on executing it)")
        return action

    def act(self, image, history=_AUTO) -> np.ndarray:
        """Action chunk(s) for the current frame(s): [K, D] for [H, W, 3], [N, K, D] for [N, H, W, 3].

        `history`: the previous env step's frame(s) (same layout as `image`), or None on the first
        query of an episode; omitted, the policy uses the last frame it was given (act/observe).
        Frames not `image_size` square are resized to it (stretched if not square)."""
        return self._act(image, history)[0]

    def _act(self, image, history, keep_before_failure: bool = False, caller: str = "act"):
        """(`act`'s chunk(s), fails_after). mode='release' with `keep_before_failure`: a chunk holding a block
        the release fails on keeps the actions before it, and fails_after says one of them (any environment's)
        does; otherwise such a chunk has no action and fails_after is False. `caller`: the call the errors name."""
        self._require_reset()
        frames, single = self._frames(image)
        N = frames.shape[0]
        instructions = self._instructions * N if self._broadcast else self._instructions
        if len(instructions) != N:
            raise ValueError(_count_error(len(self._instructions), caller, N))
        if history is _AUTO:
            prev = self._last if self.history >= 2 else None  # a one-frame policy never reads it
            if prev is not None and prev.shape[0] != N:
                fix = ("pass history= explicitly when querying a subset of the environments" if caller == "act" else
                       "step() takes no history=: pass one frame per environment as before, or reset() to start "
                       "again")
                raise ValueError(f"the recorded previous frames are for {prev.shape[0]} environments but {caller}() "
                                 f"got {N}; {fix}")
        elif history is None:
            prev = None
        else:
            if isinstance(history, (list, tuple)) and any(h is None for h in history):
                i = next(i for i, h in enumerate(history) if h is None)
                raise ValueError(f"history= holds None for environment {i}: a batch's history is a frame for every "
                                 f"environment, or history=None for all; query the environments without a previous "
                                 f"frame (a new episode) in their own act() call")
            prev, _ = self._frames(history, "history")
            if prev.shape[0] != N:
                raise ValueError(f"history holds {prev.shape[0]} frames for {N} current frames")
        use_prev = prev is not None and self.history >= 2
        codes = self._encode(list(prev) + list(frames) if use_prev else list(frames))
        cur = codes[-N:]
        hist = [[codes[i], cur[i]] if use_prev else [cur[i]] for i in range(N)]
        ids = self._query(instructions, hist)
        self._last = frames.copy()
        if self.mode == "release":  # as many actions as the release executes from each chunk; none where it
            # fails the episode (malformed blocks; a short block too unless `keep_before_failure`: see the class)
            drop = [g.malformed or (g.fails_after and not keep_before_failure) for g in ids]
            chunks = [self.action_tokenizer.decode((g.actions[:0] if d else g.actions).numpy()).astype(np.float32)
                      for g, d in zip(ids, drop)]
            fails_after = any(g.fails_after and not d for g, d in zip(ids, drop))
            if single:
                return chunks[0], fails_after
            return (np.stack(chunks) if len({c.shape[0] for c in chunks}) == 1 else chunks), fails_after
        actions = self.action_tokenizer.decode(ids.numpy()).astype(np.float32)  # [N, K, D]
        return (actions[0] if single else actions), False

    def __call__(self, image, history=_AUTO) -> np.ndarray:
        return self.act(image, history)

    # ------------------------------------------------------------------ world model
    @torch.no_grad()
    def imagine(self, image, actions, *, temperature: float = 0.0, top_k: int | None = None,
                cfg_scale: float | None = None, generator=None, progress: bool = False):
        """The world model's rollout from `image` (uint8 [H, W, 3], or [N, H, W, 3]; resized to
        `image_size`) under continuous `actions` ([T, D], or [N, T, D] for N images: [N, 1, D] for one step
        of each, a 2-D array being refused for a batch): `generate_frames` with this
        policy's model, VQGAN, layout and tokenizers (a FrameRollout: codes and uint8 frames). Needs no
        `reset`: the world-model prompt holds no instruction."""
        check_frame_sampling(temperature, top_k)  # before the frames are resized
        frames, single = self._frames(image)
        return generate_frames(self.model, self.vqgan, frames[0] if single else frames, actions, layout=self.layout,
                               action_tokenizer=self.action_tokenizer, text_tokenizer=self.text_tokenizer,
                               temperature=temperature, top_k=top_k, cfg_scale=cfg_scale, generator=generator,
                               progress=progress)

    # ------------------------------------------------------------------ caches
    def clear_caches(self) -> None:
        """Drop everything computed from the weights: the instructions' prefixes, the frames' VQ codes and the
        engines' native plans that hold weight copies; and bump the version counters of the model's and the
        VQGAN's tensors, so that the copies kept by the native kernels (`ops.native_backend`: bfloat16 copies
        of projections, the screened sampler's tables), keyed by them, are remade too. Needed after writes the
        version counters do not show (through `.data`); the next query is then a fresh policy's."""
        for module in (self.model, self.vqgan):
            for t in itertools.chain(module.parameters(), module.buffers()):
                if not t.is_inference():  # no version counter, and nothing keyed by one
                    torch.autograd.graph.increment_version(t)
        self._prefixes.clear()
        self._codes.clear()
        self._prefix_state = self._codes_state = None
        for eng in self._engines.values():
            eng.drop_weight_copies()

    # ------------------------------------------------------------------ internals
    def _require_reset(self):
        if self._instructions is None:
            raise RuntimeError("call policy.reset(instruction) before act/observe/step")

    def _frames(self, image, what: str = "frames") -> tuple[np.ndarray, bool]:
        """`what`: the argument the errors name (act's `history=` is checked as its frames are)."""
        tensor = isinstance(image, torch.Tensor)  # the errors' conversions are then torch calls
        try:
            a, dtype_name = frame_array(image)
        except ValueError:  # NumPy's "inhomogeneous shape": frames of different sizes
            raise mixed_sizes_error(image, what, f"resize them to {self.image_size}x{self.image_size} (image_size) "
                                                 "first") from None
        if a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise ValueError(f"{what} must be RGB uint8 [H, W, 3] or [N, H, W, 3], got shape {a.shape}"
                             f"{frame_layout_hint(a, tensor)}")
        if a.dtype != np.uint8:
            raise FrameDtypeError(f"{what} must be uint8 in [0, 255], got {uint8_hint(a, tensor, dtype_name)}")
        single = a.ndim == 3
        a = a[None] if single else a
        if a.shape[0] == 0 or 0 in a.shape[1:3]:
            raise ValueError(f"{what} must be non-empty, got shape {a.shape}")
        if a.shape[1:3] != (self.image_size, self.image_size):
            a = np.stack([_resize(f, self.image_size) for f in a])
        return a, single

    @torch.no_grad()
    def _encode(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """VQ codes [h, w] per frame; frames not in the cache are encoded in one VQGAN call."""
        state = _model_state(self.vqgan)  # codes of another VQGAN (replaced, or new weights) are dropped
        if state != self._codes_state:
            self._codes.clear()
            self._codes_state = state
        keys = [_digest(f) for f in frames]
        todo = {}
        for k, f in zip(keys, frames):
            if k not in self._codes and k not in todo:
                todo[k] = f
        if todo:
            new = self.vqgan.encode_images(np.stack(list(todo.values()))).cpu()
            if new.is_inference():  # kept for later queries, which may run outside inference mode
                with outside_inference_mode():
                    new = new.clone()
            if int(new.max()) >= self.layout.n_image_codes:
                raise ValueError(f"the VQGAN emits codes up to {int(new.max())} but the layout has only "
                                 f"{self.layout.n_image_codes} image ids")
            for k, c in zip(todo, new):
                self._codes[k] = c
        out = []
        for k in keys:
            self._codes.move_to_end(k)
            out.append(self._codes[k])
        while len(self._codes) > self._code_cache_size:
            self._codes.popitem(last=False)
        return out

    def _engine(self, N: int, max_len: int):
        eng = self._engines.get(N)
        if eng is None or eng.max_len < max_len or eng.mismatch(self.model):  # a new model, or moved/converted
            room = min(max_len + max(int(self.engine_headroom), 0), self.model.config.max_position_embeddings)
            eng = InferenceEngine(self.model, N, max(room, max_len), layout=self.layout)
            self._engines[N] = eng
            while len(self._engines) > max(self.max_engines, 1):  # the engine of this query stays, whatever the limit
                self._engines.popitem(last=False)
        self._engines.move_to_end(N)
        return eng

    def _prefix_kv(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a prompt prefix (BOS + instruction), computed on a one-row engine: the same
        numbers whichever batch first needs them (a batched prefill's rows round with the batch's shape)."""
        eng = InferenceEngine(self.model, 1, prefix.numel(), layout=self.layout, cuda_graphs=False)
        eng.prefill([prefix])
        return eng.row_prefix(0, prefix.numel())

    def _query(self, instructions: list[str], hist: list[list[torch.Tensor]]) -> torch.Tensor:
        lay, K, D = self.layout, self.chunk_size, self.action_dim
        N = len(instructions)
        prompts, prefix_lens = [], []
        for ins, h in zip(instructions, hist):
            prefix = self._prefix(ins)
            prompt = self.builder.action_prompt(ins, h)
            if not torch.equal(prompt[:prefix.numel()], prefix):
                raise RuntimeError("the action prompt no longer starts with BOS + instruction text; the prefix "
                                   "cache of WorldVLAPolicy must follow SequenceBuilder.action_prompt")
            prefix_lens.append(prefix.numel())
            prompts.append(prompt)
        # Size the cache for the longest prompt this episode can produce (full history).
        max_len = max(self._prompt_capacity(max(prefix_lens)), max(p.numel() for p in prompts) + self._new_tokens())
        eng = self._engine(N, max_len)
        # The prefixes' keys and values are the model's as it was: dropped when it changes (new weights
        # loaded in place, a module replaced), as the engine drops its plans.
        state = _model_state(self.model)
        if state != self._prefix_state:
            self._prefixes.clear()
            self._prefix_state = state
        # Each instruction's prefix is computed once, alone, and kept by instruction: whichever robots share a
        # batch, and in whatever order, their rows restore it (keys by batch would miss on every new mix).
        for b, (ins, prompt, n) in enumerate(zip(instructions, prompts, prefix_lens)):
            kv = self._prefixes.get(ins)
            if kv is None:
                kv = self._prefixes[ins] = self._prefix_kv(prompt[:n])
            self._prefixes.move_to_end(ins)
            eng.set_row_prefix(b, *kv)
        while len(self._prefixes) > max(self.max_prefixes, len(set(instructions))):
            self._prefixes.popitem(last=False)
        if self.mode == "release":
            return generate_release_actions(self.model, prompts, lay, D, self.max_new_tokens, engine=eng,
                                            skip=prefix_lens)
        return generate_action_chunk(self.model, prompts, lay, K, D, mode=self.mode, engine=eng, skip=prefix_lens)


class NoActionWritten(RuntimeError):
    """mode='release': the model wrote no action block (or only malformed ones). The release's loop fails the
    episode here: a harness counts it as a failure, not as an error of the policy or the simulator."""


def check_chunk(chunk):
    """An action chunk a harness can execute in order: [K, D] or [N, K, D] with K >= 1. mode='release'
    returns a list where the environments' chunks differ in length, and may return no action at all
    (the model wrote no block): both are refused here, by name, for every caller (`step`, the
    evaluation harnesses' `ChunkQuery`)."""
    if isinstance(chunk, list):
        raise ValueError("the environments' chunks differ in length (mode='release' decodes as many actions as the "
                         "model wrote); call act() and run each environment's chunk, or one environment at a time")
    if chunk.shape[-2] == 0:
        raise NoActionWritten("the model wrote no action block, or malformed ones (mode='release'; the release's "
                              "loop fails the episode here)")
    return chunk


def _bytes_hint(value, what: str) -> str:
    return (f"reset() takes each task instruction as str, but {what} is {type(value).__name__} "
            f"{bytes(value[:40])!r}: decode it first (instruction.decode('utf-8'); HDF5 datasets return bytes)")


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


__all__ = ["WorldVLAPolicy", "save_policy", "check_chunk", "uint8_hint", "POLICY_FILE", "POLICY_MODES"]
