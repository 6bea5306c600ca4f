from .actions import LIBERO_MAX, LIBERO_MIN, ActionTokenizer
from .layout import VocabLayout
from .sequence import (IGNORE, Sample, SequenceBuilder, codes_from_image_tokens, image_tokens)
from .text import ByteTextTokenizer, ChameleonTextTokenizer, text_tokenizer_for

__all__ = ["VocabLayout", "ActionTokenizer", "LIBERO_MIN", "LIBERO_MAX", "SequenceBuilder", "Sample",
           "IGNORE", "image_tokens", "codes_from_image_tokens", "ByteTextTokenizer",
           "ChameleonTextTokenizer", "text_tokenizer_for"]
