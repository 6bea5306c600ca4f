"""Wire format of the policy server: msgpack maps in binary WebSocket frames.

NumPy arrays travel as maps ``{"__ndarray__": <raw bytes, C order>, "dtype": <numpy
dtype string such as "|u1" or "<f4">, "shape": [d0, d1, ...]}``. Only plain numeric
dtypes (bool, signed/unsigned integers, floats up to 8 bytes) are accepted, so a
message can never make the receiver build Python objects. NumPy scalars are sent as
plain numbers, tuples as lists.

Everything here is shared by the server and `PolicyClient`; nothing imports torch.
"""
from __future__ import annotations

import numpy as np

import msgpack

from ..checks import is_count

PROTOCOL_VERSION = 1
# HTTP header of the WebSocket handshake carrying the protocol version: `PolicyClient` sends it, the server
# refuses another version at the handshake (HTTP 400, with the reason) and sends its own in every response,
# so the client checks the server's version without a request of its own on each new connection.
PROTOCOL_HEADER = "WorldVLA-Protocol"
# HTTP header of the server's handshake response carrying its payload limit in bytes (--max-payload-mb), so that
# `PolicyClient` refuses a larger request before sending it instead of having its connection closed (code 1009).
PAYLOAD_HEADER = "WorldVLA-Max-Payload-Bytes"
NDARRAY_KEY = "__ndarray__"
_ALLOWED_KINDS = "biuf"  # bool, int, uint, float
_MAX_NDIM = 8
# Largest size of one array dimension, and of the product of an array's non-zero sizes: a zero-size array
# (no data) may otherwise declare sizes NumPy cannot even represent, such as [0, 2**62, 3].
_MAX_ELEMENTS = 2**31 - 1

# Limits enforced while decoding, so that a small message made of millions of tiny objects (a 15 MiB
# array of empty maps takes seconds and a gigabyte to decode) is refused at once. Sizes of maps, arrays,
# strings and ext data are checked by msgpack as it reads each header; `max_containers` bounds the maps
# and arrays of a whole message, which nesting small containers would otherwise multiply. Image bytes
# travel as msgpack bin, bounded only by the message's size.
# A request is a map of a few fields; an ndarray is a map of three, its shape a list of at most 8 sizes.
REQUEST_LIMITS = {"max_map_len": 32, "max_array_len": _MAX_NDIM, "max_str_len": 64 * 1024, "max_ext_len": 0,
                  "max_containers": 32}
# A reply may carry the policy's metadata (nested maps and lists), which `to_plain` keeps within these limits;
# the server also decodes its own metadata reply with them when it starts.
REPLY_LIMITS = {"max_map_len": 4096, "max_array_len": 65536, "max_str_len": 2**20, "max_ext_len": 0,
                "max_containers": 65536}


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not have the expected fields."""


def _encode_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool, integer and float arrays travel")
        if obj.dtype.itemsize > 8:  # every receiver refuses these (`_decode_ndarray`): said here, to the sender
            raise TypeError(f"cannot send an array of dtype {obj.dtype} ({obj.dtype.itemsize} bytes a number): numbers "
                            f"of at most 8 bytes travel; convert it first (.astype(np.float64))")
        # tobytes() writes C order whatever the layout; np.ascontiguousarray would turn a 0-d array into shape [1].
        return {NDARRAY_KEY: obj.tobytes(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: float32 holds its values exactly
            t = t.float()
        return _encode_default(t.numpy())
    if isinstance(obj, int):  # msgpack hands over only the integers its 64 bits cannot hold
        raise TypeError(f"cannot encode the integer {obj} in a message: msgpack integers lie in [-2**63, 2**64); "
                        f"send it as a string or a float")
    raise TypeError(f"cannot encode an object of type {type(obj).__name__} in a message")


def _decode_ndarray(d: dict) -> np.ndarray:
    data, dtype, shape = d.get(NDARRAY_KEY), d.get("dtype"), d.get("shape")
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"array field {NDARRAY_KEY!r} must be binary (msgpack bin), got {type(data).__name__}")
    if not isinstance(dtype, str):
        raise ProtocolError("array needs a 'dtype' string such as '|u1' or '<f4'")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ProtocolError(f"array dtype {dtype!r} is not a NumPy dtype string (use e.g. '|u1' or '<f4')") from None
    if dt.kind not in _ALLOWED_KINDS or dt.itemsize > 8 or dt.fields is not None or dt.subdtype is not None:
        raise ProtocolError(f"array dtype {dtype!r} is not allowed: only bool, integer and float dtypes")
    if (not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ProtocolError(f"array 'shape' must be a list of at most {_MAX_NDIM} non-negative integers, got {shape!r}")
    n, nonzero = 1, 1
    for s in shape:
        if s > _MAX_ELEMENTS:
            raise ProtocolError(f"array 'shape' {list(shape)} is too large: each size must be at most {_MAX_ELEMENTS}")
        n *= s
        nonzero *= max(s, 1)
    if nonzero > _MAX_ELEMENTS:
        raise ProtocolError(f"array 'shape' {list(shape)} is too large: its sizes multiply to more than "
                            f"{_MAX_ELEMENTS} elements")
    if n * dt.itemsize != len(data):
        raise ProtocolError(f"array 'shape' {list(shape)} is inconsistent with its data: dtype {dt.str} needs "
                            f"{n * dt.itemsize} bytes, got {len(data)}")
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    return arr


def packb(obj) -> bytes:
    """Encode a message (maps, lists, numbers, strings, bytes, NumPy arrays)."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def unpackb(data: bytes, limits: dict = REPLY_LIMITS, what: str | None = None):
    """Decode a message within `limits` (the server decodes requests with `REQUEST_LIMITS`); raises
    `ProtocolError` with the reason for anything malformed or beyond the limits. `what` names the message
    in those reasons: "request" with `REQUEST_LIMITS`, "reply" otherwise, unless given. Arrays are
    read-only views of the message's bytes (no copy; `PolicyClient.act` returns a copy): copy one to change it."""
    if what is None:
        what = "request" if limits is REQUEST_LIMITS else "reply"
    shape_of = (f"a {what} is a map of a few fields with short strings, with images as ndarrays of binary data"
                if what == "request" else f"a {what} is a map of at most {REPLY_LIMITS['max_map_len']} fields, with "
                f"lists of at most {REPLY_LIMITS['max_array_len']} items and strings of at most "
                f"{REPLY_LIMITS['max_str_len']} bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("text frames are not accepted: send msgpack-encoded binary frames")
    limits = dict(limits)
    max_containers = limits.pop("max_containers")
    containers = 0

    def count(obj):
        nonlocal containers
        containers += 1
        if containers > max_containers:
            raise ProtocolError(f"{what} holds more than {max_containers} maps and arrays (the protocol's "
                                f"limit): {shape_of}")
        return obj

    def object_hook(d: dict):
        count(d)
        return _decode_ndarray(d) if NDARRAY_KEY in d else d

    try:
        return msgpack.unpackb(data, raw=False, object_hook=object_hook, list_hook=count, strict_map_key=True,
                               **limits)
    except ProtocolError:
        raise
    except ValueError as e:
        if "is not allowed for map key" in str(e):  # msgpack's strict_map_key: "<type> is not allowed for map key"
            raise ProtocolError(f"{what} has a map key of type {str(e).split()[0]}: the protocol's maps are keyed by "
                                f"strings (field names)") from None
        if "exceeds max_" not in str(e):
            raise ProtocolError(f"{what} is not valid msgpack ({_reason(e)})") from None
        raise ProtocolError(f"{what} exceeds the protocol's limits ({e}): {shape_of}") from None
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"{what} is not valid msgpack ({_reason(e)})") from None


# msgpack raises these without a message of their own.
_SILENT_ERRORS = {msgpack.exceptions.FormatError: "a byte that starts no msgpack value, such as the reserved 0xc1",
                  msgpack.exceptions.StackError: "containers nested deeper than the decoder allows"}


def _reason(e: Exception) -> str:
    """'<type>: <why>' for a decoding error, with a reason where msgpack gives none."""
    text = str(e) or _SILENT_ERRORS.get(type(e)) or "no reason given: the bytes are not a msgpack message"
    return f"{type(e).__name__}: {text}"


def check_image(value, field: str = "image", max_side: int = 8192) -> np.ndarray:
    """An RGB camera frame: uint8 [H, W, 3]."""
    if not isinstance(value, np.ndarray):
        raise ProtocolError(f"{field!r} must be an ndarray (uint8 [H, W, 3]), got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise ProtocolError(f"{field!r} must have dtype uint8, got {value.dtype}; send RGB frames as uint8 0..255")
    if value.ndim != 3 or value.shape[2] != 3:
        raise ProtocolError(f"{field!r} must have shape [H, W, 3] (RGB), got {list(value.shape)}")
    h, w = value.shape[:2]
    if not (1 <= h <= max_side and 1 <= w <= max_side):
        raise ProtocolError(f"{field!r} sides must be between 1 and {max_side} pixels, got {h}x{w}")
    return value


def fit_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a camera frame to the model's input size.

    Frames already at the model's size pass through untouched. Others are resized to
    exactly (H, W) with PIL's bilinear filter (antialiased when shrinking), without
    cropping: a frame of a different aspect ratio is stretched, so robots should send
    frames with the aspect ratio the model was trained on (square for WorldVLA).
    """
    h, w = size_hw
    if image.shape[0] == h and image.shape[1] == w:
        return image
    from PIL import Image

    out = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def image_size_hw(value) -> tuple[int, int]:
    """`image_size` as (H, W) from an int or a pair."""
    if is_count(value, 1):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            is_count(v, 1) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {value!r}")


def _short_str(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (msgpack's string limit counts bytes), saying so. Lone
    surrogates (bytes a file name could not decode, kept by Python's surrogateescape) are no UTF-8, so msgpack
    cannot send them: they become their escapes (``\\udcff``)."""
    n = len(text)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    note = f"... [cut: {n} characters in all]"
    return raw[:max_bytes - len(note.encode())].decode("utf-8", "ignore") + note


def _contain(count: list, n: int) -> None:
    """Count `n` more maps and lists of a metadata value: past the limit the client decodes a reply with
    (`REPLY_LIMITS`, which the server checks its metadata reply against), the value is refused at once."""
    count[0] += n
    most = REPLY_LIMITS["max_containers"]
    if count[0] > most:
        raise ValueError(f"the policy's metadata() cannot be sent to clients: reply holds more than {most} maps and "
                         f"arrays (the protocol's limit, REPLY_LIMITS['max_containers']); keep it to a description of "
                         "the model")


def to_plain(obj, _depth: int = 0, _count: list | None = None):
    """Make an arbitrary metadata value msgpack-safe (numbers, strings, lists, maps) and within
    `REPLY_LIMITS`, which `PolicyClient` decodes replies with: arrays of more than 4096 numbers, lists
    longer than `max_array_len` and maps larger than `max_map_len` become a short description
    (``"<list of 70000 items>"``), strings are cut to `max_str_len` bytes. A value of more than
    `max_containers` maps and lists in all, or a map whose keys become the same string (``{1: "a", "1": "b"}``),
    is refused (ValueError): no description keeps what it says."""
    count = [0] if _count is None else _count  # maps and lists so far, of the whole value
    if _depth > 16:
        return _short_str(str(obj), 4096)
    if isinstance(obj, str):
        return _short_str(obj, REPLY_LIMITS["max_str_len"])
    if obj is None or isinstance(obj, (bool, int, float, bytes)):
        if isinstance(obj, int) and not isinstance(obj, bool) and not -2**63 <= obj < 2**64:
            return str(obj)  # msgpack integers are 64-bit
        return obj
    if isinstance(obj, np.generic):
        return to_plain(obj.item(), _depth + 1, count)
    if isinstance(obj, np.ndarray):
        if obj.size > 4096:
            return f"<array {obj.dtype} {list(obj.shape)}>"
        # Numbers are msgpack-safe as they are (tolist() nests a list for each index of every axis but the
        # last); other arrays' items (objects, complex numbers, dates, long strings) are made so one by one.
        if obj.dtype.kind not in _ALLOWED_KINDS:
            return to_plain(obj.tolist(), _depth + 1, count)
        _contain(count, sum(int(np.prod(obj.shape[:k])) for k in range(obj.ndim)))
        return obj.tolist()
    if isinstance(obj, dict):
        if len(obj) > REPLY_LIMITS["max_map_len"]:
            return f"<map of {len(obj)} items>"
        _contain(count, 1)
        out, given = {}, {}
        for k, v in obj.items():
            key = _short_str(str(k), 4096)
            if key in out:  # one value would be dropped without a word
                raise ValueError(f"the policy's metadata() cannot be sent to clients: its map keys {given[key]!r:.80} "
                                 f"and {k!r:.80} both become the string {key!r:.80} (the protocol's maps are keyed "
                                 "by strings); give them distinct string keys")
            given[key], out[key] = k, to_plain(v, _depth + 1, count)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        if len(obj) > REPLY_LIMITS["max_array_len"]:
            return f"<{type(obj).__name__} of {len(obj)} items>"
        _contain(count, 1)
        return [to_plain(v, _depth + 1, count) for v in obj]
    if hasattr(obj, "tolist"):
        return to_plain(obj.tolist(), _depth + 1, count)
    return _short_str(str(obj), REPLY_LIMITS["max_str_len"])
