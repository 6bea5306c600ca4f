"""Text tokenizers: the release's BPE (`text_tokenizer.json`) or bytes for compact layouts."""
from __future__ import annotations

import os
from pathlib import Path

from .layout import VocabLayout


class ByteTextTokenizer:
    def __init__(self, layout: VocabLayout):
        if layout.text_base < 0:
            raise ValueError(f"layout '{layout.name}' has no byte-level text range; use ChameleonTextTokenizer")
        self.base = layout.text_base

    def encode(self, text: str) -> list[int]:
        return [self.base + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.base for i in ids if self.base <= int(i) < self.base + 256).decode("utf-8", "replace")


class ChameleonTextTokenizer:
    """The release's text tokenizer through the `tokenizers` library (no special tokens added)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"text tokenizer not found: {path} (expected the release's text_tokenizer.json)")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a plain Exception for a file it cannot parse)
            raise ValueError(f"{path}: not a text tokenizer file the tokenizers library can load ({e}); expected the "
                             f"release's text_tokenizer.json") from None
        self.path = Path(path)  # the release's image-code map is read from the same file (VocabLayout.chameleon)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def text_tokenizer_for(layout: VocabLayout, tokenizer_json=None):
    if layout.text_base >= 0:
        return ByteTextTokenizer(layout)
    if tokenizer_json is None:
        raise ValueError("the chameleon layout needs the release's text_tokenizer.json for text: pass its path "
                         "(--tokenizer-json PATH; tokenizer_json= in Python)")
    return ChameleonTextTokenizer(tokenizer_json)
