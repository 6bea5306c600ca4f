"""Where every kind of token lives in the shared vocabulary.

`VocabLayout.chameleon()` reproduces the release's ids (65,536-token Chameleon
vocabulary, actions on reserved tokens); `VocabLayout.compact()` keeps the same
structure in a small vocabulary for models trained from scratch.
"""
from __future__ import annotations

import functools
import warnings

import json
import os
import re
from dataclasses import dataclass, field

import torch

_LETTER_TO_DIGIT = {c: str(i) for i, c in enumerate("ABCDEFGHIJ")}
_IMG_NAME = re.compile(r"^IMGIMG([A-J]+)[A-Z]$")


def _code_from_bpe_name(name: str) -> int | None:
    """The release's `bpe2img`: strip 'IMGIMG' and the final char, letters A-J are digits."""
    m = _IMG_NAME.match(name)
    if m is None:
        return None
    return int("".join(_LETTER_TO_DIGIT[c] for c in m.group(1)))


@dataclass(frozen=True)
class VocabLayout:
    vocab_size: int
    bos: int
    pad: int
    boi: int
    eoi: int
    sep: int
    newline: int
    res_base: int          # resolution token for n grids of `res_grid` px is res_base + n
    n_res: int
    boa: int
    eoa: int
    bin_base: int          # first action-bin token; bins are bin_base .. bin_base + n_bins - 1
    n_bins: int
    image_code_ids: tuple  # image_code_ids[c] = token id of VQ code c
    text_base: int = -1    # byte-level text: byte b is text_base + b (compact layouts only)
    res_grid: int = 32
    patch: int = 16        # VQ downsampling factor
    name: str = "custom"
    _code_lookup: dict = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ presets
    @classmethod
    def chameleon(cls, tokenizer_json: str | os.PathLike | None = None) -> "VocabLayout":
        """The release's ids (spec section 1).

        Image codes are mapped through the BPE token names of `text_tokenizer.json`
        when it is given; without it the 8192 codes take ids 4..8195 in code order.
        """
        codes = list(range(4, 4 + 8192))
        if tokenizer_json is not None:
            codes = _image_ids_from_tokenizer_json(tokenizer_json, 8192)
        layout = cls(
            vocab_size=65536, bos=0, pad=0, boi=8197, eoi=8196, sep=8710, newline=8803,
            res_base=8804, n_res=64, boa=10004, eoa=15004, bin_base=10006, n_bins=256,
            image_code_ids=tuple(codes), name="chameleon",
        )
        if tokenizer_json is not None:
            problem = layout.image_id_problem()
            if problem:
                raise ValueError(f"{tokenizer_json}: {problem}; expected {_TOKENIZER_JSON}")
        return layout

    @classmethod
    def compact(cls, n_image_codes: int = 512, n_bins: int = 256, n_res: int = 32) -> "VocabLayout":
        """Same structure in a small vocabulary: specials, image codes, resolution
        tokens, action bins, then 256 byte-level text tokens."""
        if n_image_codes < 1 or n_bins < 2:
            raise ValueError(f"compact layout needs n_image_codes >= 1 and n_bins >= 2, got {n_image_codes}, {n_bins}")
        if n_res < 1:  # fewer would start the bins on BOA, EOA or the resolution tokens
            raise ValueError(f"compact layout needs n_res >= 1 resolution tokens (images of 1..n_res grids a side), "
                             f"got {n_res}")
        bos, pad = 0, 1
        img0 = 4
        eoi = img0 + n_image_codes
        boi, sep, newline, boa, eoa = eoi + 1, eoi + 2, eoi + 3, eoi + 4, eoi + 5
        res_base = eoa + 1
        bin_base = res_base + n_res + 1
        text_base = bin_base + n_bins
        vocab = text_base + 256
        return cls(
            vocab_size=vocab, bos=bos, pad=pad, boi=boi, eoi=eoi, sep=sep, newline=newline,
            res_base=res_base, n_res=n_res, boa=boa, eoa=eoa, bin_base=bin_base, n_bins=n_bins,
            image_code_ids=tuple(range(img0, img0 + n_image_codes)), text_base=text_base,
            name=f"compact-{n_image_codes}-{n_bins}",
        )

    # ------------------------------------------------------------------ helpers
    @property
    def n_image_codes(self) -> int:
        return len(self.image_code_ids)

    @property
    def image_id_range(self) -> tuple[int, int]:
        """[lo, hi) spanning every image-code id (constrained sampling range)."""
        return min(self.image_code_ids), max(self.image_code_ids) + 1

    @property
    def bin_range(self) -> tuple[int, int]:
        return self.bin_base, self.bin_base + self.n_bins

    def res_token(self, n_grids: int) -> int:
        if not 0 <= n_grids <= self.n_res:
            raise ValueError(f"resolution of {n_grids} grids is outside this layout's 0..{self.n_res}")
        return self.res_base + n_grids

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        from ..ops.dispatch import require_integers  # here: the ops package imports this module

        codes = torch.as_tensor(codes)  # an array or a list of codes
        require_integers(codes, "image codes must be an integer tensor")
        table = torch.tensor(self.image_code_ids, dtype=torch.long, device=codes.device)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(table)):
            raise ValueError(f"image codes must lie in [0, {len(table)}), got range [{int(codes.min())}, {int(codes.max())}]")
        return table[codes.long()]

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        lo, hi = self.image_id_range
        inv = torch.full((hi - lo,), -1, dtype=torch.long)
        inv[torch.tensor(self.image_code_ids) - lo] = torch.arange(self.n_image_codes)
        from ..ops.dispatch import require_integers

        ids = torch.as_tensor(ids)
        require_integers(ids, "image token ids must be an integer tensor")
        ids = ids.long()
        bad = (ids < lo) | (ids >= hi)
        if bool(bad.any()):
            raise ValueError(f"{int(bad.sum())} token ids are not image codes (expected ids in [{lo}, {hi}))")
        codes = inv.to(ids.device)[ids - lo]
        if bool((codes < 0).any()):
            raise ValueError("token ids inside the image range that are not image codes")
        return codes

    def image_id_problem(self) -> str | None:
        """What keeps the image-code ids from being read back as codes, or None: each must be its own id, inside
        the vocabulary."""
        first = {}
        for code, tok in enumerate(self.image_code_ids):
            if not 0 <= tok < self.vocab_size:
                return f"code {code} has token id {tok}, outside the vocabulary of {self.vocab_size}"
            if tok in first:
                return f"codes {first[tok]} and {code} share token id {tok}"
            first[tok] = code
        return None

    def image_code_weight_mask(self) -> torch.Tensor:
        """Bool [vocab]: True on exactly the image-code ids (the loss weights alpha there)."""
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        m[list(self.image_code_ids)] = True
        return m

    def check_ids(self, ids: torch.Tensor) -> None:
        from ..ops.dispatch import require_integers

        ids = torch.as_tensor(ids)
        require_integers(ids, "token ids must be an integer tensor")
        if not ids.numel():
            return
        lo, hi = (int(x) for x in torch.stack(torch.aminmax(ids)).tolist())  # one read of the values
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids out of range: [{lo}, {hi}] but the vocabulary has {self.vocab_size} "
                             f"entries (layout '{self.name}')")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}
        d["image_code_ids"] = list(self.image_code_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        d = dict(d)
        d["image_code_ids"] = tuple(d["image_code_ids"])
        return cls(**d)


_TOKENIZER_JSON = ("the release's text_tokenizer.json: a tokenizers file whose model.vocab maps token names, "
                   "the image codes' IMGIMG<letters>Z among them, to ids")


def _image_ids_from_tokenizer_json(path, n_codes: int) -> list[int]:
    """The token id of each image code, by the token names of the text tokenizer file at `path`; a file that is not
    one (damaged, or another JSON file such as a model's config.json) is refused naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text tokenizer not found: {path} (expected {_TOKENIZER_JSON})")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e}); the file is damaged or cut short, or not the text "
                         f"tokenizer: expected {_TOKENIZER_JSON}") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        found = (f"top-level keys: {', '.join(sorted(doc)[:8]) or 'none'}{', ...' if len(doc) > 8 else ''}"
                 if isinstance(doc, dict)
                 else f"a JSON {type(doc).__name__}")
        raise ValueError(f"{path}: no model.vocab object, so this is not a text tokenizer file ({found}); expected "
                         f"{_TOKENIZER_JSON}")
    ids = [-1] * n_codes
    for name, tok in vocab.items():
        code = _code_from_bpe_name(name)
        if code is not None and code < n_codes:
            ids[code] = int(tok)
    missing = [c for c, t in enumerate(ids) if t < 0]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {n_codes} image codes have no IMGIMG token (first: "
                         f"{missing[:5]}); expected {_TOKENIZER_JSON}")
    return ids


def with_release_image_ids(layout: VocabLayout, text_tokenizer=None) -> VocabLayout:
    """The layout to tokenize images with. The release's image-code ids are defined by the token names of
    its text_tokenizer.json (spec 1), which a checkpoint's config.json does not carry: a Chameleon layout
    that only assumes code c -> id 4 + c is rebuilt from the text tokenizer's file when there is one
    (`ChameleonTextTokenizer.path`), and otherwise kept with a warning. Other layouts are returned as they are."""
    if layout.name != "chameleon" or layout.image_code_ids != _assumed_chameleon_ids():
        return layout
    path = getattr(text_tokenizer, "path", None)
    if path is not None:
        return VocabLayout.chameleon(path)
    warnings.warn("the Chameleon layout maps image code c to id 4 + c, an assumption: the release defines the "
                  "map by the token names of its text_tokenizer.json; pass text_tokenizer=ChameleonTextTokenizer"
                  "(path) or layout=VocabLayout.chameleon(path)", stacklevel=3)
    return layout


@functools.lru_cache(maxsize=1)
def _assumed_chameleon_ids() -> tuple:
    return VocabLayout.chameleon().image_code_ids
