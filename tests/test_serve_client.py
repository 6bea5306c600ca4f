"""`PolicyClient` against stand-in connections: the frames it takes and sends, a chunk it refuses, and its refusal
of an instruction given as bytes."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from worldvla.serve import PolicyServerError

from test_serve import D, K, _FakeConnection, _echo_id, _offline_client


def _chunk_reply(actions=None):
    return _echo_id({"ok": True, "actions": np.zeros((K, D), np.float32) if actions is None else actions})


def test_act_takes_frames_that_convert_to_arrays_such_as_pil_images(monkeypatch, np_rng):
    """A camera frame handed over as an object NumPy converts (a PIL image) is sent as its uint8 [H, W, 3] pixels,
    the previous frame as well."""
    from PIL import Image

    frame, previous = (np_rng.integers(0, 256, (6, 10, 3), dtype=np.uint8) for _ in range(2))
    ws = _FakeConnection([_chunk_reply()])
    client, _ = _offline_client(monkeypatch, ws)
    client.episode = "e"
    assert client.act(Image.fromarray(frame), previous_image=Image.fromarray(previous)).shape == (K, D)
    sent = ws.sent[0]
    assert sent["image"].dtype == np.uint8 and np.array_equal(sent["image"], frame)
    assert np.array_equal(sent["previous_image"], previous)


def test_a_chunk_past_float32s_range_is_refused_without_an_overflow_warning(monkeypatch):
    """A float64 value past float32's range is refused as not finite; casting it raises no RuntimeWarning on
    the way, so a robot running with warnings as errors gets the same refusal."""
    chunk = np.full((K, D), 0.5)
    chunk[0, 1] = -1e39
    client, _ = _offline_client(monkeypatch, _FakeConnection([_chunk_reply(chunk)]))
    client.episode = "e"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PolicyServerError, match=r"hold 1 value\(s\) that are not finite as float32, the first "
                                                    r"-inf at \[0, 1\]"):
            client.act(np.zeros((8, 8, 3), np.uint8))


def test_a_bytes_instruction_is_shown_by_its_first_40_bytes(monkeypatch):
    """The refusal of a bytes instruction quotes its start only: an HDF5 attribute of any length stays one short
    line. It ends the previous episode, and nothing is sent."""
    ws = _FakeConnection([_echo_id({"ok": True})])
    client, _ = _offline_client(monkeypatch, ws)
    client.reset("wave")
    with pytest.raises(ValueError, match=rf"^reset\(\) takes the task instruction as str, got bytes b'{'ab' * 20}': "
                                         r"decode it first \(instruction.decode\('utf-8'\)\)$"):
        client.reset(b"ab" * 200)
    assert client.episode is None and len(ws.sent) == 1
