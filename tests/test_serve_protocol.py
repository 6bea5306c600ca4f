"""The policy server's wire format: array shapes in messages, the frames a message decodes from, and the reasons
given for bytes that are not msgpack."""
from __future__ import annotations

import re

import numpy as np
import pytest

from worldvla.serve.protocol import REQUEST_LIMITS, ProtocolError, image_size_hw, packb, unpackb


def _nd(data: bytes, dtype: str, shape) -> dict:
    return {"__ndarray__": data, "dtype": dtype, "shape": shape}


def test_an_array_shape_of_booleans_is_refused():
    """True and False are ints to Python but no sizes: a shape [True, 3] is refused, not read as [1, 3]."""
    for shape in ([True, 3], [3, False], [False]):
        with pytest.raises(ProtocolError, match=r"array 'shape' must be a list of at most 8 non-negative integers"):
            unpackb(packb(_nd(b"\0" * 3, "|u1", shape)), REQUEST_LIMITS)
    assert unpackb(packb(_nd(b"\0" * 3, "|u1", [1, 3])), REQUEST_LIMITS).shape == (1, 3)


def test_a_message_decodes_from_a_memoryview_as_from_bytes():
    """A binary frame handed over as a memoryview (or bytearray) decodes as its bytes do; only text is refused."""
    msg = {"type": "act", "image": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)}
    raw = packb(msg)
    for data in (raw, bytearray(raw), memoryview(raw)):
        back = unpackb(data, REQUEST_LIMITS)
        assert back["type"] == "act" and back["image"].tolist() == msg["image"].tolist()
    with pytest.raises(ProtocolError, match="text frames are not accepted"):
        unpackb(raw.decode("latin-1"), REQUEST_LIMITS)


def test_msgpack_errors_without_a_message_are_given_a_reason():
    """msgpack raises FormatError and StackError with no message: the refusal says what is wrong instead of
    ending with an empty reason; other errors keep msgpack's own message."""
    with pytest.raises(ProtocolError) as e:
        unpackb(b"\xc1", REQUEST_LIMITS)
    assert str(e.value) == ("request is not valid msgpack (FormatError: a byte that starts no msgpack value, such as "
                            "the reserved 0xc1)")
    with pytest.raises(ProtocolError) as e:
        unpackb(b"\x91" * 5000)
    assert str(e.value) == "reply is not valid msgpack (StackError: containers nested deeper than the decoder allows)"
    with pytest.raises(ProtocolError) as e:
        unpackb(b"\x92\x01", REQUEST_LIMITS)
    assert str(e.value) == "request is not valid msgpack (ValueError: Unpack failed: incomplete input)"


def test_an_image_size_is_an_int_or_a_pair_and_nothing_longer():
    """A frame shape (H, W, 3) or a one-item list is no image_size: it is refused by value, not read as its
    first two sizes."""
    for bad in ((24, 32, 3), [24, 32, 3, 1], [24], ()):
        with pytest.raises(ValueError, match=r"image_size must be a positive int or an \(H, W\) pair, got "
                                             + re.escape(repr(bad))):
            image_size_hw(bad)
    assert image_size_hw([24, 32]) == (24, 32) and image_size_hw(24) == (24, 24)
