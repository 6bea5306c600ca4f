"""Policy server: protocol, batching across robots, per-episode history, refusal of bad
requests without disturbing other robots, limits, and clean shutdown on SIGTERM.

All traffic stays on 127.0.0.1 with ports picked by the OS."""
from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from worldvla.serve import PolicyClient, PolicyServer, PolicyServerError, ProtocolError, health, packb, unpackb
from worldvla.serve.protocol import REPLY_LIMITS, REQUEST_LIMITS, fit_image

K, D = 3, 5


def _mean(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).astype(np.float64).mean(1)


class HistoryPolicy:
    """Stand-in for WorldVLAPolicy with explicit history. Each action row encodes what
    the policy saw: [current frame mean, previous frame mean (-1 if none),
    len(instruction), row index, batch size]."""

    def __init__(self, image_size=24, delay_s=0.0, fail_on=None):
        self.image_size, self.chunk_size, self.action_dim = image_size, K, D
        self.delay_s, self.fail_on = delay_s, fail_on
        self.instructions: list[str] = []
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def metadata(self):
        return {"name": "history-fake", "history": 2, "action_low": np.full(D, -1.0)}

    def reset(self, instructions):
        self.instructions = list(instructions)

    def act(self, images, history=None):
        n = len(images)
        assert images.dtype == np.uint8 and images.shape == (n, self.image_size, self.image_size, 3)
        assert len(self.instructions) == n
        assert history is None or history.shape == images.shape
        with self.lock:
            self.calls.append(n)
        if self.fail_on is not None and self.fail_on in self.instructions:
            raise RuntimeError("boom")
        time.sleep(self.delay_s)
        out = np.empty((n, K, D), np.float32)
        out[:, :, 0] = _mean(images)[:, None]
        out[:, :, 1] = -1.0 if history is None else _mean(history)[:, None]
        out[:, :, 2] = np.array([len(s) for s in self.instructions])[:, None]
        out[:, :, 3] = np.arange(K)[None]
        out[:, :, 4] = n
        return out



def _robot_handlers(server):
    """Connections of robots whose handlers still run (a dropped one's until its closing timeout ends)."""
    return sum(c.robot for c in list(server._open))  # a copy: the server's loop changes the set


class SlotPolicy:
    """A policy that keeps history in its own batch slots (act has no `history`)."""

    def __init__(self, image_size=16):
        self.image_size, self.chunk_size, self.action_dim = image_size, K, D
        self.previous: list = []

    def metadata(self):
        return {"name": "slot-fake"}

    def reset(self, instructions):
        self.instructions = list(instructions)
        self.previous = [None] * len(instructions)

    def act(self, images):
        assert len(images) == len(self.previous)
        out = np.zeros((len(images), K, D), np.float32)
        out[:, :, 0] = _mean(images)[:, None]
        out[:, :, 1] = np.array([-1.0 if p is None else p.astype(np.float64).mean() for p in self.previous])[:, None]
        self.previous = list(images)
        return out


def _together(fn, arg_tuples, timeout_s: float = 20.0) -> None:
    """fn(*args) for each of `arg_tuples`, each on its own thread, all released at once (a barrier), then joined:
    requests that reach the server together. A thread still running after `timeout_s`, or one that raised, fails
    the test here (with the thread's own exception), not as a confusing assertion later."""
    barrier = threading.Barrier(len(arg_tuples))
    raised = []

    def run(args):
        try:
            barrier.wait(10)
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            raised.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in arg_tuples]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"a request did not end within {timeout_s} s"
    if raised:
        raise raised[0]


def _hold_resizes(server, monkeypatch):
    """Every frame's resize on `server` waits until the returned `release` is set; `started` is set once one is
    waiting (a request held in the server between its arrival and the policy). -> (started, release)"""
    resize = server._resize_pair
    started, release = threading.Event(), threading.Event()

    def slow_resize(image, previous):
        started.set()
        release.wait(20)
        return resize(image, previous)

    monkeypatch.setattr(server, "_resize_pair", slow_resize)
    return started, release

def _act_together(clients, np_rng) -> list[str]:
    """One act per client, all sent together (`_together`); the messages of the PolicyServerErrors they got."""
    errors = []

    def call(client):
        try:
            client.act(_frame(np_rng))
        except PolicyServerError as e:
            errors.append(str(e))

    _together(call, [(c,) for c in clients])
    return errors


def _frame(rng, h=24, w=24):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@contextlib.contextmanager
def _robots(server, n: int):
    """n connected clients, robot i reset with the instruction "robot {i}"; all closed at the end."""
    clients = [PolicyClient(server.url, timeout=20) for _ in range(n)]
    try:
        for i, c in enumerate(clients):
            c.reset(f"robot {i}")
        yield clients
    finally:
        for c in clients:
            c.close()


# ---------------------------------------------------------------- protocol
def test_codec_round_trip_and_rejects_bad_arrays(np_rng):
    arrays = [np_rng.integers(0, 256, (7, 13, 3), dtype=np.uint8), np_rng.standard_normal((5, 3)).astype(np.float32),
              np_rng.standard_normal(11), np_rng.integers(-9, 9, (2, 1, 3), dtype=np.int64), np.zeros((0, 4)),
              np_rng.standard_normal((3, 4)).astype(np.float16)[:, ::2]]
    msg = {"type": "x", "arrays": arrays, "scalar": np.float32(1.5), "nested": {"a": [np.int64(3)]}}
    back = unpackb(packb(msg))
    for a, b in zip(arrays, back["arrays"]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert back["scalar"] == 1.5 and back["nested"] == {"a": [3]}
    big_endian = unpackb(packb({"__ndarray__": np.arange(3, dtype=">i4").tobytes(), "dtype": ">i4", "shape": [3]}))
    assert big_endian.dtype.isnative and big_endian.tolist() == [0, 1, 2]

    bad = [({"__ndarray__": b"\0" * 8, "dtype": "|O", "shape": [1]}, "not allowed"),
           ({"__ndarray__": b"\0" * 7, "dtype": "<f4", "shape": [2]}, "needs 8 bytes"),
           ({"__ndarray__": b"\0" * 4, "dtype": "nonsense", "shape": [1]}, "not a NumPy dtype"),
           ({"__ndarray__": "text", "dtype": "<f4", "shape": [1]}, "must be binary"),
           ({"__ndarray__": b"\0" * 4, "dtype": "<f4", "shape": [-1]}, "non-negative"),
           ({"__ndarray__": b"\0" * 4, "dtype": "<f4", "shape": "4"}, "shape"),
           ({"__ndarray__": b"\0" * 8, "dtype": "i4,i4", "shape": [1]}, "not allowed")]
    for payload, fragment in bad:
        with pytest.raises(ProtocolError, match=fragment):
            unpackb(packb(payload))
    for garbage in (np_rng.bytes(64), b"\xc1", b"\x92\x01"):
        with pytest.raises(ProtocolError, match="not valid msgpack|the protocol's limit|a map key of type"):
            unpackb(garbage)
    with pytest.raises(ProtocolError, match="text frames"):
        unpackb("{}")


# ---------------------------------------------------------------- round trip
def test_round_trip_history_resize_health(np_rng):
    policy = HistoryPolicy()
    with PolicyServer(policy, max_wait_ms=1.0) as server, PolicyClient(server.url, timeout=10) as client:
        meta = client.metadata()
        assert meta["action_dim"] == D and meta["chunk_size"] == K and meta["image_size"] == [24, 24]
        assert meta["accepts_previous_image"] is True and meta["policy"]["name"] == "history-fake"
        assert meta["policy"]["action_low"] == [-1.0] * D

        instruction = "open the top drawer"
        episode = client.reset(instruction)
        assert client.episode == episode
        f1, f2, f3, f4 = (_frame(np_rng) for _ in range(4))
        a1 = client.act(f1)
        assert a1.dtype == np.float32 and a1.shape == (K, D)
        np.testing.assert_allclose(a1[:, 0], f1.mean(), rtol=1e-6)
        assert np.all(a1[:, 1] == -1) and np.all(a1[:, 2] == len(instruction)) and a1[:, 3].tolist() == [0, 1, 2]
        assert set(client.last_timing) >= {"queue_ms", "policy_ms", "batch_size", "server_ms", "preprocess_ms"}
        assert client.last_timing["server_ms"] >= client.last_timing["policy_ms"] >= 0

        a2 = client.act(f2)  # history: the previous request's frame
        np.testing.assert_allclose(a2[:, 1], f1.mean(), rtol=1e-6)
        a3 = client.act(f3, previous_image=f4)  # history: the frame sent explicitly
        np.testing.assert_allclose(a3[:, [0, 1]], np.broadcast_to([f3.mean(), f4.mean()], (K, 2)), rtol=1e-6)

        odd = _frame(np_rng, 37, 53)  # resized to 24x24 (bilinear) before the policy sees it
        a4 = client.act(odd)
        np.testing.assert_allclose(a4[:, 0], fit_image(odd, (24, 24)).mean(), rtol=1e-6)
        np.testing.assert_allclose(a4[:, 1], f3.mean(), rtol=1e-6)

        client.reset("close it")  # a new episode starts without history
        a5 = client.act(f1)
        assert np.all(a5[:, 1] == -1) and np.all(a5[:, 2] == len("close it"))

        h = health(server.url)
        assert h["status"] == "ok" and h["stats"]["act_ok"] == 5 and h["connections"] == 1


def test_least_recently_used_episode_is_dropped(np_rng):
    with PolicyServer(HistoryPolicy(), max_episodes=2) as server, PolicyClient(server.url, timeout=10) as client:
        first = client.reset("one")
        client.act(_frame(np_rng))
        client.reset("two")
        client.reset("three")
        client.episode = first
        with pytest.raises(PolicyServerError, match="unknown episode"):
            client.act(_frame(np_rng))
        assert server.stats["evicted_episodes"] == 1 and health(server.url)["episodes"] == 2


def test_slot_policy_keeps_history_while_batch_set_is_stable(np_rng):
    with PolicyServer(SlotPolicy(), max_wait_ms=0) as server, PolicyClient(server.url, timeout=10) as client:
        assert client.metadata()["accepts_previous_image"] is False
        client.reset("push the button")
        f1, f2 = _frame(np_rng, 16, 16), _frame(np_rng, 16, 16)
        assert np.all(client.act(f1)[:, 1] == -1)
        np.testing.assert_allclose(client.act(f2)[:, 1], f1.mean(), rtol=1e-6)
        with pytest.raises(PolicyServerError, match="previous_image"):
            client.act(f1, previous_image=f2)
        assert server.stats["history_resets"] == 0
        # another episode in between changes the policy's slots: history restarts, and is counted
        with PolicyClient(server.url, timeout=10) as other:
            other.reset("another robot")
            assert np.all(other.act(f1)[:, 1] == -1)
        assert np.all(client.act(f1)[:, 1] == -1)
        assert server.stats["history_resets"] == 1


# ---------------------------------------------------------------- batching
def test_concurrent_robots_are_batched_and_kept_apart(np_rng):
    policy = HistoryPolicy(delay_s=0.05)
    n_clients, steps = 6, 5
    frames = np_rng.integers(0, 256, (n_clients, steps, 24, 24, 3), dtype=np.uint8)
    failures: list = []
    barrier = threading.Barrier(n_clients)

    def robot(i, url):
        try:
            with PolicyClient(url, timeout=20) as c:
                c.reset("task " + "x" * i)
                barrier.wait()
                for t in range(steps):
                    a = c.act(frames[i, t])
                    assert np.allclose(a[:, 0], frames[i, t].mean(), rtol=1e-6)
                    expected_prev = -1 if t == 0 else frames[i, t - 1].mean()
                    assert np.allclose(a[:, 1], expected_prev, rtol=1e-6), (i, t)
                    assert np.all(a[:, 2] == len("task ") + i)
        except BaseException as e:  # reported below
            failures.append((i, repr(e)))

    with PolicyServer(policy, max_batch=8, max_wait_ms=50.0) as server:
        threads = [threading.Thread(target=robot, args=(i, server.url)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        stats = dict(server.stats)
    assert not failures, failures
    assert stats["act_ok"] == n_clients * steps
    assert stats["policy_calls"] < n_clients * steps / 2, stats
    assert stats["max_batch_seen"] > 1 and set(policy.calls) <= {1, 2, 4, 8}  # padded to powers of two


def test_a_lone_robot_does_not_wait_for_connections_that_never_act(np_rng):
    """A monitor connected for metadata sends no 'reset' or 'act': the batcher does not wait max_wait_ms for it."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_wait_ms=3000.0) as server, PolicyClient(server.url, timeout=20) as monitor, \
            PolicyClient(server.url, timeout=20) as robot:
        assert monitor.metadata()["action_dim"] == D
        robot.reset("alone")
        t0 = time.perf_counter()
        for _ in range(2):
            robot.act(_frame(np_rng))
        assert time.perf_counter() - t0 < 1.5, "the batcher waited for a connection that never acts"
        assert server.health()["connections"] == 2


def test_an_episode_belongs_to_its_connection_until_it_closes(np_rng):
    """Two robots using the same episode id are refused instead of mixing instructions and frames; a robot
    that reconnects goes on with its episode once its old connection has closed."""
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=10) as b:
        a = PolicyClient(server.url, timeout=10)
        a.reset("open the drawer", episode=0)
        fa1, fa2, fa3, fb = (_frame(np_rng) for _ in range(4))
        a.act(fa1)
        with pytest.raises(PolicyServerError, match="belongs to another open connection: each robot needs its own"):
            b.reset("push the red button", episode=0)
        b.episode = 0
        with pytest.raises(PolicyServerError, match="belongs to another open connection"):
            b.act(fb)
        a2 = a.act(fa2)  # a's episode is untouched: its instruction, its previous frame
        np.testing.assert_allclose(a2[:, [1, 2]], np.broadcast_to([fa1.mean(), len("open the drawer")], (K, 2)),
                                   rtol=1e-6)

        a.close()
        with PolicyClient(server.url, timeout=10) as again:  # a, reconnected
            again.episode = 0
            a3 = again.act(fa3)
            np.testing.assert_allclose(a3[:, [1, 2]], np.broadcast_to([fa2.mean(), len("open the drawer")], (K, 2)),
                                       rtol=1e-6)
            with pytest.raises(PolicyServerError, match="belongs to another open connection"):
                b.act(fb)
        b.reset("push the red button", episode=0)  # its owner has gone: b may start a new episode under that id
        np.testing.assert_allclose(b.act(fb)[:, [1, 2]], np.broadcast_to([-1, len("push the red button")], (K, 2)))
        # The same client on a new connection (its token kept across reconnects) takes the episode over at once,
        # while its old connection still looks open (a dropped network sends no close); then b is the other one.
        b2 = PolicyClient(server.url, timeout=10)
        b2.client_id, b2.episode = b.client_id, 0
        fb2 = _frame(np_rng)
        np.testing.assert_allclose(b2.act(fb2)[:, [1, 2]], np.broadcast_to([fb.mean(), len("push the red button")],
                                                                             (K, 2)), rtol=1e-6)
        with PolicyClient(server.url, timeout=10) as c, \
                pytest.raises(PolicyServerError, match="belongs to another open connection"):
            c.reset("push", episode=0)  # another client's token: refused while b2 is open
        b2.close()


# ---------------------------------------------------------------- bad requests
def _raw(url):
    from websockets.sync.client import connect

    return connect(url, compression=None, proxy=None, max_size=None)


def _ask(ws, payload):
    ws.send(payload)
    return unpackb(ws.recv(timeout=10))


def test_malformed_requests_get_errors_and_do_not_disturb_others(np_rng):
    policy = HistoryPolicy(delay_s=0.002)
    stop = threading.Event()
    good: dict = {"ok": 0, "errors": []}

    def steady_robot(url):
        try:
            with PolicyClient(url, timeout=10) as c:
                c.reset("stack the cubes")
                prev = None
                while not stop.is_set() or good["ok"] < 5:
                    f = _frame(np_rng)
                    a = c.act(f)
                    assert np.allclose(a[:, 0], f.mean(), rtol=1e-6)
                    assert np.allclose(a[:, 1], -1 if prev is None else prev.mean(), rtol=1e-6)
                    prev = f
                    good["ok"] += 1
        except BaseException as e:
            good["errors"].append(repr(e))

    img = _frame(np_rng)
    arr = lambda a: {"__ndarray__": a.tobytes(), "dtype": a.dtype.str, "shape": list(a.shape)}  # noqa: E731
    cases = [
        (np_rng.bytes(97), "not valid msgpack|the protocol's limit|a map key of type"),
        (b"\xc1\xc1\xc1", r"not valid msgpack \(FormatError: a byte that starts no msgpack value"),
        ("hello, is this json?", "text frames"),
        (packb([1, 2, 3]), "msgpack map"),
        (packb({"episode": "e1"}), "no 'type' field"),
        (packb({"type": "fly"}), "unknown request type"),
        (packb({"type": "act", "image": img}), "needs an 'episode'"),
        (packb({"type": "act", "episode": "nobody", "image": img}), "unknown episode"),
        (packb({"type": "act", "episode": "e1"}), "needs an 'image'"),
        (packb({"type": "act", "episode": "e1", "image": img.astype(np.float32)}), "dtype uint8"),
        (packb({"type": "act", "episode": "e1", "image": img[:, :, 0]}), r"shape \[H, W, 3\]"),
        (packb({"type": "act", "episode": "e1", "image": np.concatenate([img, img[:, :, :1]], 2)}), "RGB"),
        (packb({"type": "act", "episode": "e1", "image": "pixels"}), "must be an ndarray"),
        (packb({"type": "act", "episode": "e1", "image": {**arr(img), "shape": [24, 24, 4]}}), "needs 2304 bytes"),
        (packb({"type": "act", "episode": "e1", "image": {**arr(img), "dtype": "|O"}}), "not allowed"),
        (packb({"type": "act", "episode": "e1", "image": np.zeros((0, 5, 3), np.uint8)}), "between 1 and"),
        (packb({"type": "act", "episode": "e1", "image": img, "previous_image": img.astype(np.int16)}),
         "'previous_image' must have dtype uint8"),
        (packb({"type": "act", "episode": True, "image": img}), "string or an integer"),
        (packb({"type": "reset", "episode": "e2"}), "non-empty 'instruction'"),
        (packb({"type": "reset", "episode": "e2", "instruction": "   "}), "non-empty 'instruction'"),
        (packb({"type": "reset", "episode": [1], "instruction": "x"}), "string or an integer"),
        (packb({"type": "reset", "instruction": "x"}), "needs an 'episode'"),
        (packb({"type": "metadata", "pad": b"\0" * (2**20 + 1000)}), "exceeds the server's limit"),
    ]
    with PolicyServer(policy, max_payload_mb=1.0, max_wait_ms=1.0) as server:
        robot = threading.Thread(target=steady_robot, args=(server.url,))
        robot.start()
        with _raw(server.url) as ws:
            assert _ask(ws, packb({"type": "reset", "episode": "e1", "instruction": "wipe", "id": 7})) == \
                {"ok": True, "episode": "e1", "id": 7}
            for payload, fragment in cases:
                reply = _ask(ws, payload)
                assert reply["ok"] is False, (fragment, reply)
                assert re.search(fragment, reply["error"]), (fragment, reply["error"])
            reply = _ask(ws, packb({"type": "act", "episode": "e1", "image": img, "id": "last"}))
            assert reply["ok"] and reply["id"] == "last" and reply["actions"].shape == (K, D)
        stop.set()
        robot.join(20)
        assert health(server.url)["status"] == "ok"
    assert not good["errors"], good["errors"]
    assert good["ok"] >= 5


def test_oversized_payload_closes_only_that_connection(np_rng):
    """The server's side, for any client (`PolicyClient` refuses such requests before sending them)."""
    from websockets.exceptions import ConnectionClosed

    def act(big):
        return packb({"type": "act", "episode": "greedy", "image": big})

    with PolicyServer(HistoryPolicy(), max_payload_mb=0.25) as server, \
            PolicyClient(server.url, timeout=10) as other, _raw(server.url) as greedy:
        other.reset("fold the towel")
        assert _ask(greedy, packb({"type": "reset", "episode": "greedy", "instruction": "fold the towel"}))["ok"]
        assert other.metadata()["server"]["max_payload_mb"] == 0.25
        big = _frame(np_rng, 200, 200)  # 117 KiB fits
        assert _ask(greedy, act(big))["actions"].shape == (K, D)
        reply = _ask(greedy, act(_frame(np_rng, 400, 300)))  # 352 KiB: refused, connection kept
        assert not reply["ok"] and "exceeds the server's limit" in reply["error"]
        assert _ask(greedy, act(big))["actions"].shape == (K, D)
        greedy.send(act(_frame(np_rng, 800, 600)))  # 1.4 MiB: beyond 2x the limit, connection closed
        with pytest.raises(ConnectionClosed) as closed:
            greedy.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
        f = _frame(np_rng)
        np.testing.assert_allclose(other.act(f)[:, 0], f.mean(), rtol=1e-6)


def test_the_client_refuses_a_request_over_the_servers_payload_limit_before_sending_it(np_rng):
    """A frame over the server's payload limit was sent anyway: the server refused it, or closed the connection
    (code 1009) when it was more than twice the limit. The server states its limit in the handshake, and the
    client refuses such a request before sending it, naming its size, the limit and the fixes; its connection
    goes on."""
    from worldvla.serve.protocol import PAYLOAD_HEADER

    with PolicyServer(HistoryPolicy(), max_payload_mb=0.25) as server, PolicyClient(server.url, timeout=10) as client:
        assert client._ws.response.headers[PAYLOAD_HEADER] == "262144" and client.max_payload_bytes == 2**18
        client.reset("fold the towel")
        ws = client._ws
        for h, w in ((400, 300), (800, 600)):  # 352 KiB: within 2x the limit; 1.4 MiB: beyond
            with pytest.raises(ValueError, match=(
                    rf"^this act request \(image \[{h}, {w}, 3\]\) takes {h * w * 3 / 2**20:.2f} MiB \(\d+ bytes\), "
                    r"more than the server's payload limit of 0\.25 MiB \(262144 bytes\): send smaller frames \(the "
                    r"server resizes every frame to the policy's image_size, metadata\(\)\['image_size'\], anyway\), "
                    r"or start the server with a larger --max-payload-mb$")):
                client.act(_frame(np_rng, h, w))
        with pytest.raises(ValueError, match=r"\(image \[24, 24, 3\] and previous_image \[400, 300, 3\]\)"):
            client.act(_frame(np_rng), previous_image=_frame(np_rng, 400, 300))
        assert server.stats["act_requests"] == 0  # nothing reached the server
        f = _frame(np_rng, 200, 200)  # 117 KiB fits
        np.testing.assert_allclose(client.act(f)[:, 0], fit_image(f, (24, 24)).mean(), rtol=1e-6)
        assert client._ws is ws and server.stats["act_ok"] == 1


def test_the_client_takes_the_payload_limit_of_a_server_without_the_header_from_its_metadata(monkeypatch):
    """A server that states no version (an older worldvla) is asked for its metadata, which names its limit."""
    ws = _FakeConnection([_echo_id({"ok": True, "protocol": 1, "server": {"max_payload_mb": 0.001}})], header=None)
    client, _ = _offline_client(monkeypatch, ws)
    assert client.max_payload_bytes == 1048
    client.episode = "e"
    with pytest.raises(ValueError, match=r"takes 0\.00 MiB \(\d+ bytes\), more than the server's payload limit of "
                                         r"0\.00 MiB \(1048 bytes\)"):
        client.act(np.zeros((40, 40, 3), np.uint8))
    assert [m["type"] for m in ws.sent] == ["metadata"]
    assert _offline_client(monkeypatch, _FakeConnection([]))[0].max_payload_bytes is None  # states no limit


def _nested_maps(n_bytes: int, fan: int) -> bytes:
    """A msgpack tree of arrays of `fan` items with empty maps as leaves, about `n_bytes` long."""
    node = b"\x80"
    while len(node) * fan + 1 <= n_bytes:
        node = bytes([0x90 | fan]) + node * fan
    return node


def test_millions_of_tiny_objects_are_refused_at_once(np_rng, monkeypatch):
    """A message under the payload limit made of millions of empty maps (seconds of decoding and a
    gigabyte, with the event loop frozen) is refused as soon as its headers are read, or once the
    limit on maps and arrays is passed, while a camera-sized request still decodes.

    The decoder's work is counted: the maps and arrays it builds (the hooks it calls), none for a bomb
    its headers give away, at most the limit and one for a nested one. The time is taken with the
    garbage collector off: the 65,536 containers a reply may hold set off a full collection of this
    process's objects, half a second in a big loaded pytest process, which is not the decoder's work."""
    from worldvla.serve import protocol

    flat = b"\xdd" + struct.pack(">I", 15 * 2**20) + b"\x80" * (15 * 2**20)  # an array of 15 Mi empty maps
    nested = _nested_maps(8 * 2**20, 8)  # 8-item arrays nested 7 deep: 2 Mi empty maps
    built, real_unpackb = [], protocol.msgpack.unpackb

    def counting_unpackb(data, *, object_hook, list_hook, **kw):
        def counted(hook):
            def call(obj):
                built[-1] += 1
                return hook(obj)
            return call

        built.append(0)
        return real_unpackb(data, object_hook=counted(object_hook), list_hook=counted(list_hook), **kw)

    gc.collect()
    gc.disable()
    try:
        with monkeypatch.context() as m:
            m.setattr(protocol.msgpack, "unpackb", counting_unpackb)
            t0 = time.perf_counter()
            for bomb in (flat, nested):
                for limits in ({}, {"limits": REQUEST_LIMITS}):  # a client's limits for replies, the server's
                    with pytest.raises(ProtocolError, match="protocol's limit"):
                        unpackb(bomb, **limits)
            with pytest.raises(ProtocolError, match="exceeds the protocol's limits"):
                unpackb(packb({"type": "reset", "episode": 1, "instruction": "x" * 2**17}), REQUEST_LIMITS)
            assert time.perf_counter() - t0 < 0.5
    finally:
        gc.enable()
    most = [0, 0, REPLY_LIMITS["max_containers"] + 1, REQUEST_LIMITS["max_containers"] + 1, 0]
    assert len(built) == 5 and all(n <= limit for n, limit in zip(built, most)), built
    image = np_rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    request = {"type": "act", "episode": "e" * 256, "image": image, "previous_image": image[::-1], "id": 3}
    back = unpackb(packb(request), REQUEST_LIMITS)
    assert np.array_equal(back["image"], image) and np.array_equal(back["previous_image"], image[::-1])

    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        t0 = time.perf_counter()
        reply = _ask(ws, flat)
        assert time.perf_counter() - t0 < 2.0 and "exceeds the protocol's limits" in reply["error"], reply
        assert "limit" in _ask(ws, nested)["error"]
        assert _ask(ws, packb({"type": "metadata"}))["ok"]  # the connection carries on



# ---------------------------------------------------------------- limits and failures
def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _never_reading_client(port: int, n_metadata: int) -> socket.socket:
    """A robot (it resets an episode) that then sends `n_metadata` metadata requests and reads none of the
    replies: a WebSocket handshake on a socket with a tiny receive buffer, then unread frames."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0], response

    def frame(message):  # a masked binary frame, with a mask of zeros
        payload = packb(message)
        assert len(payload) < 126
        return bytes([0x82, 0x80 | len(payload)]) + b"\0\0\0\0" + payload

    sock.sendall(frame({"type": "reset", "episode": "stuck", "instruction": "never reads"}))
    sock.sendall(frame({"type": "metadata"}) * n_metadata)
    return sock


class BulkyMetadataPolicy(HistoryPolicy):
    def metadata(self):  # replies of 512 KiB: a few fill the socket buffers of a client that reads nothing
        return {**super().metadata(), "blob": "x" * 2**19}


def test_a_client_that_never_reads_is_cut_off(np_rng):
    """A reply not taken within the request timeout drops its connection, which stops counting as a robot
    (the batcher would otherwise wait for it) and frees the server's buffers."""
    with PolicyServer(BulkyMetadataPolicy(), request_timeout_s=0.5) as server:
        sock = _never_reading_client(server.port, 40)
        try:
            _wait_for(lambda: _robot_handlers(server) == 1)
            _wait_for(lambda: server.health()["connections"] == 0 and _robot_handlers(server) == 0, timeout=5)
            with PolicyClient(server.url, timeout=10) as robot:
                robot.reset("carry on")
                f = _frame(np_rng)
                np.testing.assert_allclose(robot.act(f)[:, 0], f.mean(), rtol=1e-6)
        finally:
            sock.close()


def test_shutdown_drops_connections_still_open_at_the_drain_timeout(np_rng):
    """A client that reads nothing can complete neither its reply nor the closing handshake: shutdown
    drops it at the drain timeout instead of waiting for it forever."""
    server = PolicyServer(BulkyMetadataPolicy(), request_timeout_s=30, drain_timeout_s=0.5).start_background()
    sock = _never_reading_client(server.port, 40)
    try:
        _wait_for(lambda: server._busy == 1 and _robot_handlers(server) == 1)  # stuck sending a reply
        thread, t0 = server._thread, time.monotonic()
        server.stop_background(timeout=5)
        assert not thread.is_alive() and time.monotonic() - t0 < 4
    finally:
        sock.close()
        server.stop_background()


def test_busy_queue_and_policy_failure(np_rng):
    policy = HistoryPolicy(delay_s=0.3, fail_on="explode")
    with PolicyServer(policy, max_batch=1, max_queue=1, max_wait_ms=0, request_timeout_s=20) as server:
        clients = [PolicyClient(server.url, timeout=20) for _ in range(5)]
        for c in clients:
            c.reset("hold still")
        replies: list = [None] * len(clients)

        def call(i):
            try:
                replies[i] = clients[i].act(_frame(np_rng))
            except PolicyServerError as e:
                replies[i] = str(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        busy = [r for r in replies if isinstance(r, str) and "server busy" in r]
        ok = [r for r in replies if isinstance(r, np.ndarray)]
        assert busy and ok and len(busy) + len(ok) == len(clients), replies
        assert server.stats["busy_rejections"] == len(busy)

        clients[1].reset("explode")
        with pytest.raises(PolicyServerError, match="policy failed: RuntimeError: boom"):
            clients[1].act(_frame(np_rng))
        assert clients[2].act(_frame(np_rng)).shape == (K, D)  # the server carries on
        for c in clients:
            c.close()
        assert server.stats["policy_failures"] == 1


def test_one_robots_failure_does_not_fail_its_batch(np_rng):
    """A batch whose policy call fails is run again request by request: only the request that fails
    alone gets the error."""
    policy = HistoryPolicy(delay_s=0.05, fail_on="explode")
    with PolicyServer(policy, max_batch=4, max_wait_ms=2000, request_timeout_s=20) as server:
        good, bad = PolicyClient(server.url, timeout=20), PolicyClient(server.url, timeout=20)
        good.reset("hold still")
        bad.reset("explode")
        replies = {}
        def call(name, client):
            try:
                replies[name] = client.act(_frame(np_rng))
            except PolicyServerError as e:
                replies[name] = str(e)

        _together(call, [("good", good), ("bad", bad)])
        assert policy.calls[0] == 2, policy.calls  # the two requests were batched
        assert isinstance(replies["good"], np.ndarray) and replies["good"].shape == (K, D)
        assert "policy failed: RuntimeError: boom" in replies["bad"]
        assert server.stats["policy_failures"] == 2 and server.stats["act_ok"] == 1
        good.close()
        bad.close()


class SlowFailingPolicy(HistoryPolicy):
    """Fails on `fail_on` after computing for `delay_s`, as a batch that fails deep in the model would."""

    def act(self, images, history=None):
        if self.fail_on in self.instructions:
            with self.lock:
                self.calls.append(len(images))
            time.sleep(self.delay_s)
            raise RuntimeError("boom")
        return super().act(images, history)


def test_the_timing_of_a_request_run_again_after_its_batch_failed(np_rng):
    """A request re-run alone after its batch's call failed reported the failed call as queue_ms and only the
    re-run as policy_ms. Its queue_ms is now the wait for its first call, its policy_ms runs from that call's
    start to the end of the re-run that answered it, and `retried` says so."""
    delay = 0.2
    policy = SlowFailingPolicy(delay_s=delay, fail_on="explode")
    with PolicyServer(policy, max_batch=4, max_wait_ms=2000, request_timeout_s=20, pad_batches=False) as server:
        good, bad = PolicyClient(server.url, timeout=20), PolicyClient(server.url, timeout=20)
        good.reset("hold still")
        bad.reset("explode")
        good.act(_frame(np_rng))
        assert good.last_timing["retried"] is False and good.last_timing["batch_size"] == 1
        good.reset("hold still")  # both episodes fresh: one policy call for the two, not one with history each
        errors = _act_together([good, bad], np_rng)
        assert policy.calls[1] == 2 and len(errors) == 1, (policy.calls, errors)  # batched; bad failed alone
        timing = good.last_timing
        assert timing["retried"] is True and timing["batch_size"] == 1, timing
        assert timing["queue_ms"] < delay * 1e3 / 2, timing  # it waited for no call: the failed one was its own
        assert timing["policy_ms"] >= 2 * delay * 1e3 * 0.9, timing  # the failed batch's call and its re-run
        assert timing["preprocess_ms"] + timing["queue_ms"] + timing["policy_ms"] <= timing["server_ms"] + 0.01
        good.close()
        bad.close()


def test_a_timed_out_client_reconnects_and_its_stale_request_is_dropped(np_rng, monkeypatch):
    """A client that times out closes its connection and reconnects on its next call, going on with its
    episode. Its stale request, still being resized on the server, keeps the episode busy meanwhile (the
    in-flight guard holds across the resize's await), then is dropped without reaching the policy.

    Only the call that must time out has the short timeout: the calls around it must succeed, however
    loaded the machine. The reconnected call waits until the stale request is in the resize."""
    policy = HistoryPolicy()
    with PolicyServer(policy, request_timeout_s=20) as server, PolicyClient(server.url, timeout=20) as client:
        started, release = _hold_resizes(server, monkeypatch)
        client.reset("hold still")
        f0 = _frame(np_rng)
        client.act(f0)
        client.timeout = 0.3
        with pytest.raises(TimeoutError, match="within 0.3 s; the connection was closed.*next call reconnects"):
            client.act(_frame(np_rng, 48, 48))  # held in the resize
        client.timeout = 20
        assert started.wait(10)
        with pytest.raises(PolicyServerError, match="already has an 'act' request in flight.*reconnected"):
            client.act(_frame(np_rng))  # a new connection, which takes the episode over
        release.set()
        _wait_for(lambda: not server._episodes[client.episode].pending)
        f1 = _frame(np_rng)
        a1 = client.act(f1)
        np.testing.assert_allclose(a1[:, [0, 1]], np.broadcast_to([f1.mean(), f0.mean()], (K, 2)), rtol=1e-6)
        assert policy.calls == [1, 1]  # the stale request never reached the policy
        assert server.health()["connections"] == 1 and server.stats["timeouts"] == 0


class RaggedPolicy(HistoryPolicy):
    """Chunks of as many actions as the instruction has words (WorldVLAPolicy's mode="release" returns a
    list of [n_i, D] chunks when their lengths differ)."""

    def act(self, images, history=None):
        full = super().act(images, history)
        return [full[i, :len(s.split())] for i, s in enumerate(self.instructions)]


def test_chunks_of_different_lengths_in_one_batch(np_rng):
    policy = RaggedPolicy()
    with PolicyServer(policy, max_batch=4, max_wait_ms=2000, pad_batches=False, request_timeout_s=20) as server:
        clients = [PolicyClient(server.url, timeout=20) for _ in range(2)]
        clients[0].reset("one")
        clients[1].reset("two words")
        replies = [None, None]
        def call(i):
            replies[i] = clients[i].act(_frame(np_rng))

        _together(call, [(i,) for i in range(2)])
        assert policy.calls == [2] and server.stats["policy_failures"] == 0
        assert [r.shape for r in replies] == [(1, D), (2, D)]
        for c in clients:
            c.close()


def test_a_chunk_of_no_action_is_an_error_for_its_robot_only(np_rng):
    """mode='release' may write no action block for one image: that robot gets an error (as
    `check_chunk` refuses it in process), the other its chunk."""
    class OneFewer(HistoryPolicy):  # a chunk of one action fewer than the instruction's words
        def act(self, images, history=None):
            full = super().act(images, history)
            return [full[i, :len(s.split()) - 1] for i, s in enumerate(self.instructions)]

    policy = OneFewer()
    with PolicyServer(policy, max_batch=4, max_wait_ms=2000, pad_batches=False, request_timeout_s=20) as server:
        clients = [PolicyClient(server.url, timeout=20) for _ in range(2)]
        clients[0].reset("one")  # no action
        clients[1].reset("three more words")
        replies = [None, None]
        def call(i):
            try:
                replies[i] = clients[i].act(_frame(np_rng))
            except PolicyServerError as e:
                replies[i] = str(e)

        _together(call, [(i,) for i in range(2)])
        assert policy.calls == [2]
        assert isinstance(replies[0], str) and "wrote no action block" in replies[0], replies[0]
        assert isinstance(replies[1], np.ndarray) and replies[1].shape == (2, D)
        for c in clients:
            c.close()


def test_episode_dropped_while_its_frame_is_resized(np_rng, monkeypatch):
    """Another robot's reset evicts the episode (max_episodes=1) while the server resizes its frame: the
    request is answered 'reset or dropped' and never reaches the policy."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_episodes=1, request_timeout_s=20) as server:
        started, evicted = _hold_resizes(server, monkeypatch)  # evicted: the other robot's reset has returned
        a, b = PolicyClient(server.url, timeout=20), PolicyClient(server.url, timeout=20)
        a.reset("first robot")
        reply = []
        t = threading.Thread(target=lambda: reply.append(pytest.raises(PolicyServerError, a.act,
                                                                        _frame(np_rng, 48, 48))))
        t.start()
        try:
            assert started.wait(10)
            b.reset("second robot")  # evicts a's episode
        finally:
            evicted.set()
        t.join(20)
        assert "was reset or dropped while its image was being resized" in str(reply[0].value)
        assert policy.calls == [] and server.stats["evicted_episodes"] == 1
        np.testing.assert_allclose(b.act(_frame(np_rng))[:, 2], len("second robot"))  # the server still serves
        a.close()
        b.close()


def test_request_timeout(np_rng):
    policy = HistoryPolicy(delay_s=0.6)
    with PolicyServer(policy, request_timeout_s=0.2) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("slowly")
        with pytest.raises(PolicyServerError, match="timed out after 0.2 s"):
            client.act(_frame(np_rng))
        policy.delay_s = 0.0
        _wait_for(lambda: not server._running_batch)
        f = _frame(np_rng)
        np.testing.assert_allclose(client.act(f)[:, 0], f.mean(), rtol=1e-6)
        assert server.stats["timeouts"] == 1


def test_a_request_that_timed_out_while_running_is_not_the_previous_frame(np_rng):
    """The robot of a timed-out request got no actions and its env did not step: it sends the same frame again,
    and that retry is still the episode's first query (no history), even though the policy ran the first try."""
    policy = HistoryPolicy(delay_s=0.6)
    with PolicyServer(policy, request_timeout_s=0.2) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("slowly")
        f0, f1 = _frame(np_rng), _frame(np_rng)
        with pytest.raises(PolicyServerError, match="timed out after 0.2 s"):
            client.act(f0)
        policy.delay_s = 0.0
        _wait_for(lambda: not server._running_batch)
        assert policy.calls == [1]  # the timed-out request did reach the policy
        retry = client.act(f0)
        np.testing.assert_allclose(retry[:, 0], f0.mean(), rtol=1e-6)
        np.testing.assert_array_equal(retry[:, 1], -1.0)
        assert server._episodes[client.episode].steps == 1
        np.testing.assert_allclose(client.act(f1)[:, 1], f0.mean(), rtol=1e-6)


def test_client_timeout_covers_sending(np_rng):
    """With the server's event loop frozen, a frame larger than the socket buffers cannot be sent: the
    client's timeout bounds the send, and the next call reconnects.

    The loop stays frozen until the call has been timed, so that nothing but the client's timeout can end
    the send: without it the call would last the whole freeze (30 s), ten times the bound. Only that call
    has the short timeout; the calls around it must succeed, however loaded the machine."""
    with PolicyServer(HistoryPolicy(), max_payload_mb=32) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("hold still")
        f0 = _frame(np_rng)
        client.act(f0)
        big = _frame(np_rng, 2400, 2400)  # 17 MB, within the server's limit (the client refuses a larger one)
        frozen, thaw = threading.Event(), threading.Event()

        def freeze():
            frozen.set()
            thaw.wait(30)

        server._loop.call_soon_threadsafe(freeze)  # a frozen event loop: nothing is read
        try:
            assert frozen.wait(10)
            client.timeout = 0.5
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="could not send the request .* within 0.5 s.*next call reconnects"):
                client.act(big)
            assert time.monotonic() - t0 < 3.0
        finally:
            thaw.set()
        client.timeout = 20
        # Once the server has read what the old connection sent (and its end), the episode is the new one's.
        _wait_for(lambda: server.health()["connections"] == 0)
        f1 = _frame(np_rng)
        a1 = client.act(f1)  # on a new connection
        np.testing.assert_allclose(a1[:, [0, 1]], np.broadcast_to([f1.mean(), f0.mean()], (K, 2)), rtol=1e-6)


def test_server_rejects_bad_configuration():
    with pytest.raises(ValueError, match="max_batch"):
        PolicyServer(HistoryPolicy(), max_batch=0)
    with pytest.raises(TypeError, match="act"):
        PolicyServer(object())

    no_size = SlotPolicy()
    no_size.image_size = None
    with pytest.raises(ValueError, match="image_size"):
        PolicyServer(no_size)
    no_size.image_size = (16, 0)
    with pytest.raises(ValueError, match="image_size"):
        PolicyServer(no_size)
    with pytest.raises(ValueError, match="ws://"):
        PolicyClient("http://127.0.0.1:1")
    with pytest.raises(ConnectionError, match="cannot connect"):
        PolicyClient("ws://127.0.0.1:1", connect_timeout=2)
    with pytest.raises(ConnectionError, match="no health report from http://127.0.0.1:1/healthz"):
        health("ws://127.0.0.1:1", timeout=2)


def test_client_says_when_the_url_is_not_a_policy_server():
    import http.server

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{web.server_address[1]}"
    try:
        with pytest.raises(ConnectionError, match=f"{url} did not answer as a WebSocket server"):
            PolicyClient(url, connect_timeout=5)
        with pytest.raises(ConnectionError, match=f"no health report from http{url[2:]}/healthz: JSONDecodeError"):
            health(url, timeout=5)
    finally:
        web.shutdown()
        web.server_close()


def test_cli_arguments():
    import argparse

    from worldvla import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "ckpt", "--port", "0", "--max-batch", "4", "--max-wait-ms", "2.5",
                              "--max-queue", "9", "--max-payload-mb", "3", "--dtype", "bf16"])
    assert (args.checkpoint, args.port, args.max_batch, args.max_wait_ms, args.max_queue, args.max_payload_mb) == \
        ("ckpt", 0, 4, 2.5, 9, 3.0)
    assert args.host == "127.0.0.1" and args.dtype == "bf16" and args.mode is None
    assert parser.parse_args(["--checkpoint", "c", "--mode", "release"]).mode == "release"
    for bad in (["--mode", "beam"], ["--max-batch", "0"], ["--port", "70000"], ["--port", "-1"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--checkpoint", "c", *bad])
    from worldvla.cli import POLICY_MODE_CHOICES
    from worldvla.inference.policy import POLICY_MODES
    assert POLICY_MODE_CHOICES == POLICY_MODES  # the parsers' spelled-out list is the policy's


# ---------------------------------------------------------------- shutdown
_CHILD = textwrap.dedent("""
    import sys, time, logging; logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(message)s")
    import numpy as np
    from worldvla.serve import PolicyServer

    class Slow:
        image_size, chunk_size, action_dim = 8, 2, 3
        def metadata(self): return {}
        def reset(self, instructions): self.n = len(instructions)
        def act(self, images, history=None):
            print("acting", flush=True)
            time.sleep(0.6)
            return np.full((len(images), 2, 3), 7.0, np.float32)

    PolicyServer(Slow(), port=0).serve_forever(on_ready=lambda s: print(s.port, flush=True))
    print("exited cleanly", flush=True)
""")


def _line(proc, timeout=60.0) -> str:
    """The next line a server subprocess prints, or a failure after `timeout` s (the process killed), never a wait
    without end on a server that will not print it."""
    got: list = []
    t = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not got:
        proc.kill()
        raise AssertionError(f"the server printed no line in {timeout} s; its stderr: {proc.communicate(timeout=10)[1]}")
    return got[0]


def test_sigterm_and_sigint_finish_in_flight_request_and_exit_cleanly(np_rng):
    """Two servers in subprocesses (started together to share the start-up time)."""
    signals = (signal.SIGTERM, signal.SIGINT)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in signals]
    try:
        for proc, sig in zip(procs, signals):
            port = int(_line(proc))
            with PolicyClient(f"ws://127.0.0.1:{port}", timeout=10) as client:
                client.reset("wave")
                result: dict = {}

                def act():
                    try:
                        result["actions"] = client.act(_frame(np_rng, 8, 8))
                    except BaseException as e:
                        result["error"] = repr(e)

                t = threading.Thread(target=act)
                t.start()
                assert _line(proc).strip() == "acting"  # the request is inside the policy
                proc.send_signal(sig)
                t.join(10)
                assert "error" not in result, (sig, result)
                assert np.all(result["actions"] == 7.0)
                with pytest.raises(PolicyServerError):  # the server is gone or going
                    client.act(_frame(np_rng, 8, 8))
        for proc, sig in zip(procs, signals):
            assert proc.wait(10) == 0, sig
            assert "exited cleanly" in proc.stdout.read()
            assert "server stopped" in proc.stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_hung_policy_call_does_not_hold_shutdown(np_rng):
    """A policy call that hangs: a draining server gives up on it at the drain timeout and exits with code 1
    without waiting for it (its worker thread would hold the interpreter), and a second SIGINT exits at
    once, as operators expect of a second Ctrl-C. Two servers in subprocesses, started together."""
    hung = _CHILD.replace("time.sleep(0.6)", "time.sleep(60)")
    bounded = hung.replace("port=0)", "port=0, request_timeout_s=0.5, drain_timeout_s=1.0)")
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for child in (bounded, hung)]

    def hang(proc):  # a request inside the policy call
        client = PolicyClient(f"ws://127.0.0.1:{int(_line(proc))}", timeout=30)
        client.reset("wave")
        threading.Thread(target=lambda: pytest.raises(PolicyServerError, client.act, _frame(np_rng, 8, 8)),
                         daemon=True).start()
        assert _line(proc).strip() == "acting"

    try:
        hang(procs[0])
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(10) == 1 and 1.0 <= time.monotonic() - t0 < 5
        err = procs[0].stderr.read()
        assert "has not returned within the drain timeout (1.0 s): exiting without waiting for it" in err, err

        hang(procs[1])
        procs[1].send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert procs[1].poll() is None  # draining: the request is still being answered
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGINT)
        assert procs[1].wait(10) == 1 and time.monotonic() - t0 < 10
        assert "second signal while shutting down" in procs[1].stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the real policy
def _tiny_policy_folder(path):
    import dataclasses

    import torch

    policy_mod = pytest.importorskip("worldvla.inference.policy",
                                     reason="worldvla.inference.policy (WorldVLAPolicy, save_policy) not available")
    if not hasattr(policy_mod, "save_policy"):
        pytest.skip("worldvla.inference.policy has no save_policy; cannot build a tiny checkpoint")
    from worldvla.model import ModelConfig, WorldVLA
    from worldvla.tokens import ActionTokenizer, VocabLayout
    from worldvla.vqgan import VQGAN, VQGANConfig

    layout = VocabLayout.compact(n_image_codes=64)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = WorldVLA(ModelConfig.tiny(layout))
    model.init_weights(0.02, torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little")))
    vqgan = VQGAN(dataclasses.replace(VQGANConfig.small(), n_embed=64))
    policy_mod.save_policy(path, model, vqgan, ActionTokenizer(layout), chunk_size=3, image_size=32, history=2)
    return policy_mod.WorldVLAPolicy


def test_real_policy_on_tiny_random_checkpoint(tmp_path, np_rng):
    WorldVLAPolicy = _tiny_policy_folder(tmp_path / "policy")
    served = WorldVLAPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    reference = WorldVLAPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    low, high = np.array(reference.metadata()["action_low"]), np.array(reference.metadata()["action_high"])
    with PolicyServer(served, max_wait_ms=20.0) as server:
        with PolicyClient(server.url, timeout=60) as client:
            meta = client.metadata()
            assert (meta["action_dim"], meta["chunk_size"], meta["image_size"]) == (7, 3, [32, 32])
            assert meta["accepts_previous_image"] and meta["policy"]["model"]["num_hidden_layers"] == 2

            # one robot: the served chunks are the in-process ones for the same frames and history
            instruction = "put the bowl on the plate"
            f1, f2, f3 = _frame(np_rng, 32, 32), _frame(np_rng, 48, 40), _frame(np_rng, 32, 32)
            client.reset(instruction)
            reference.reset([instruction])
            a1 = client.act(f1)
            np.testing.assert_array_equal(a1, reference.act(f1[None], history=None)[0])
            a2 = client.act(f2)  # camera-sized: resized by the server
            np.testing.assert_array_equal(a2, reference.act(fit_image(f2, (32, 32))[None], history=f1[None])[0])
            a3 = client.act(f3, previous_image=f1)
            np.testing.assert_array_equal(a3, reference.act(f3[None], history=f1[None])[0])
            assert a1.shape == (3, 7) and np.all((a1 >= low - 1e-6) & (a1 <= high + 1e-6))
            # an instruction too long for the model's context is refused at reset, not in a batch
            with pytest.raises(PolicyServerError, match="instruction is too long"):
                client.reset("x" * 1200)

        # several robots at once share policy calls; each gets a valid chunk
        results, errors = [], []
        barrier = threading.Barrier(3)

        def robot(i):
            try:
                with PolicyClient(server.url, timeout=60) as c:
                    c.reset(f"task number {i}")
                    barrier.wait(30)
                    for _ in range(3):
                        results.append(c.act(_frame(np_rng, 32, 32)))
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=robot, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(results) == 9 and all(r.shape == (3, 7) and np.isfinite(r).all() for r in results)
        assert server.stats["batches"] < server.stats["act_ok"]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_served_chunks_are_the_policys_own_one_episode_at_a_time(tmp_path, np_rng, mode):
    """Robots acting at once, batched on the server (padded batch sizes; an episode's first request and later
    ones in separate calls), get bit for bit the chunks of WorldVLAPolicy called in-process on the same frames
    and history, one episode at a time: 4 robots x 2 episodes x 3 steps, one robot resetting its episode id
    mid-run (which starts it again without history), frames of the model's size and camera-sized ones, the
    history sent as previous_image or taken from the episode's previous act."""
    WorldVLAPolicy = _tiny_policy_folder(tmp_path / "policy")
    served = WorldVLAPolicy.from_pretrained(tmp_path / "policy", device="cpu", mode=mode)
    reference = WorldVLAPolicy.from_pretrained(tmp_path / "policy", device="cpu", mode=mode)
    n_robots, n_steps = 4, 3
    step = threading.Barrier(n_robots)
    rngs = [np.random.default_rng(np_rng.integers(2**32)) for _ in range(n_robots)]  # one per thread
    runs: list = [[] for _ in range(n_robots)]  # each robot's episodes: (instruction, [(frame, history, chunk)])

    def robot(i):
        rng = rngs[i]
        with PolicyClient(server.url, timeout=60) as client:
            for e in range(2):
                instruction, previous = f"robot {i} task {e}", None
                client.reset(instruction)
                runs[i].append((instruction, []))
                for t in range(n_steps):
                    step.wait(30)
                    if (i, e, t) == (0, 0, 2):  # the same episode id again, with another task
                        instruction, previous = "robot 0 task 0 once more", None
                        client.reset(instruction, episode=client.episode)
                        runs[i].append((instruction, []))
                    frame = _frame(rng, 32, 32) if (i + t) % 2 else _frame(rng, 48, 40)
                    explicit = previous is not None and i % 2 == 1
                    chunk = client.act(frame, previous_image=previous if explicit else None)
                    history = None if previous is None else fit_image(previous, (32, 32))
                    runs[i][-1][1].append((fit_image(frame, (32, 32)), history, chunk))
                    previous = frame

    with PolicyServer(served, max_wait_ms=50.0) as server:
        _together(robot, [(i,) for i in range(n_robots)], timeout_s=120)
        stats = dict(server.stats)
    assert stats["act_ok"] == n_robots * 2 * n_steps and stats["max_batch_seen"] > 1
    assert stats["batches"] < stats["act_ok"]
    compared = 0
    for episodes in runs:
        for instruction, steps in episodes:
            reference.reset([instruction])
            for frame, history, chunk in steps:
                expected = reference.act(frame[None], history=None if history is None else history[None])[0]
                np.testing.assert_array_equal(chunk, expected, err_msg=f"{instruction!r}, step {compared}")
                compared += 1
    assert compared == n_robots * 2 * n_steps


def test_a_lost_connection_is_reopened_by_the_next_call(np_rng):
    """A connection the server closed was used again by every later call (each raising); the next call now
    reconnects, and one that cannot raises PolicyServerError as a lost connection does (robot loops catch
    PolicyServerError and TimeoutError), not ConnectionError."""
    with PolicyServer(HistoryPolicy()) as server:
        url = server.url
        client = PolicyClient(url, timeout=10)
        client.reset("open the drawer")
        client.act(_frame(np_rng))
    with pytest.raises(PolicyServerError, match="shutting down|closed"):
        client.act(_frame(np_rng))
    with pytest.raises(PolicyServerError, match="reconnecting failed: cannot connect"):
        client.act(_frame(np_rng))


# ---------------------------------------------------------------- keepalive, strict fields, reply limits
class _SilentProxy:
    """A TCP proxy that can stop forwarding while holding both sockets open: a robot whose network went
    silent (no FIN, no RST), as a pulled cable or a powered-off robot looks to the server."""

    def __init__(self, port: int):
        self.target, self.silent, self.stop = ("127.0.0.1", port), threading.Event(), threading.Event()
        self.sockets: list = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.sockets += [a, b]
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        import select

        while not self.stop.is_set():
            if self.silent.is_set():
                time.sleep(0.05)  # read nothing, send nothing
                continue
            try:
                for s in select.select([a, b], [], [], 0.05)[0]:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
            except OSError:
                return

    def close(self):
        self.stop.set()
        for s in [self.listener, *self.sockets]:
            s.close()


def test_a_robot_whose_network_went_silent_is_dropped_by_the_keepalive(np_rng):
    """A robot's connection lost without a FIN held its episode id for ~40 s (websockets' default keepalive)
    and made every batch of a lone robot wait max_wait_ms for it. With keepalive_s=0.5 another connection
    takes the episode over within about 2 x 0.5 s, the refusal until then says so and what to do, and the
    lone robot's batches stop waiting as soon as the dead connection fails its ping (before its handler ends)."""
    with PolicyServer(HistoryPolicy(), max_wait_ms=3000.0, keepalive_s=0.5) as server:
        assert server.metadata()["server"]["keepalive_s"] == 0.5
        proxy = _SilentProxy(server.port)
        lone, arm, restarted = None, None, None
        try:
            lone = PolicyClient(server.url, timeout=20)
            lone.reset("alone")
            arm = PolicyClient(f"ws://127.0.0.1:{proxy.port}", timeout=20)
            arm.reset("pick", episode="arm-1")  # a robot from here, whose requests batches may wait for
            proxy.silent.set()
            t0 = time.monotonic()
            restarted = PolicyClient(server.url, timeout=20)  # the robot's process restarted: a new client token
            with pytest.raises(PolicyServerError, match=r"belongs to another open connection: each robot needs its "
                               r"own.*drops it within \d+\.\d s if it has gone silent \(keepalive pings every 0.5 s, "
                               r"--keepalive-s\): retry then"):
                restarted.reset("pick", episode="arm-1")
            while True:
                try:
                    restarted.reset("pick", episode="arm-1")
                    break
                except PolicyServerError:
                    assert time.monotonic() - t0 < 3.0, "the silent connection still holds its episode"
                    time.sleep(0.05)
            assert _robot_handlers(server) == 3  # the dead connection's handler waits out its closing timeout
            restarted.close()
            t1 = time.perf_counter()
            for _ in range(2):
                lone.act(_frame(np_rng))
            assert time.perf_counter() - t1 < 1.5, "the batcher waited for a connection known to be dead"
        finally:
            proxy.close()
            for c in (lone, arm, restarted):
                if c is not None:
                    c.close()


def test_unknown_fields_protocol_versions_and_bad_ids_are_refused(np_rng):
    """A misspelt field ('previous_img') was ignored, so the policy got the stale previous frame; a request
    claiming protocol 99 was served; a float id was accepted and silently not echoed."""
    policy = HistoryPolicy()
    f1, f2, f3 = (_frame(np_rng) for _ in range(3))
    with PolicyServer(policy, max_wait_ms=1.0) as server, _raw(server.url) as ws:
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe", "client": "me", "id": 1,
                               "protocol": 1})) == {"ok": True, "episode": "e", "id": 1}
        assert _ask(ws, packb({"type": "act", "episode": "e", "image": f1}))["ok"]
        calls = len(policy.calls)
        reply = _ask(ws, packb({"type": "act", "episode": "e", "image": f2, "previous_img": f3, "id": 2}))
        assert reply["ok"] is False and reply["id"] == 2
        assert ("unknown field 'previous_img' in an 'act' request (did you mean 'previous_image'?); an 'act' request "
                "may carry 'client', 'episode', 'id', 'image', 'previous_image', 'protocol', 'type'") in reply["error"]
        assert len(policy.calls) == calls  # refused before the policy
        reply = _ask(ws, packb({"type": "metadata", "episode": "e", "pad": 0}))
        assert "unknown fields 'episode', 'pad' in a 'metadata' request" in reply["error"]
        for version in (99, "1", True, 1.0):
            reply = _ask(ws, packb({"type": "act", "episode": "e", "image": f2, "protocol": version}))
            assert reply["ok"] is False and "this server speaks protocol 1" in reply["error"], reply
        for bad_id in (1.5, True, [1], None):
            reply = _ask(ws, packb({"type": "metadata", "id": bad_id}))
            assert reply["ok"] is False and "'id' must be an integer or a string" in reply["error"], reply
            assert "id" not in reply
        assert len(policy.calls) == calls
        # the documented request format, every optional field included
        reply = _ask(ws, packb({"type": "act", "episode": "e", "image": f2, "previous_image": f3, "client": "me",
                                "id": "x", "protocol": 1}))
        assert reply["ok"] and reply["id"] == "x"
        np.testing.assert_allclose(reply["actions"][:, [0, 1]], np.broadcast_to([f2.mean(), f3.mean()], (K, 2)),
                                   rtol=1e-6)
        assert _ask(ws, packb({"type": "metadata", "protocol": 1}))["protocol"] == 1


def test_client_checks_the_servers_protocol_version(np_rng, monkeypatch):
    """PolicyClient never looked at the server's protocol number: it now asks on each new connection."""
    import worldvla.serve.server as server_mod

    with PolicyServer(HistoryPolicy()) as server:
        client = PolicyClient(server.url, timeout=10)
        client.reset("wave")
        client.act(_frame(np_rng))
        monkeypatch.setattr(server_mod, "PROTOCOL_VERSION", 2)  # a server of another worldvla version
        with pytest.raises(PolicyServerError, match=r"speaks protocol 2, this PolicyClient protocol 1: install the "
                                                    r"same worldvla version") as refused:
            PolicyClient(server.url, timeout=10)
        assert refused.value.__cause__.response.status_code == 400  # refused at the handshake
        client._drop()  # lost (not closed by the caller): the next call reconnects, and checks again
        with pytest.raises(PolicyServerError, match="speaks protocol 2"):
            client.act(_frame(np_rng))
        assert server.stats["act_ok"] == 1


def _count_metadata_requests(server) -> list:
    served, metadata = [], server.metadata
    server.metadata = lambda: served.append(1) or metadata()  # what the server answers a 'metadata' request with
    return served


def test_the_protocol_version_travels_in_the_handshake(np_rng, monkeypatch):
    """Each new connection cost a metadata round trip before its first request (the version check): the
    version now travels in the handshake, so a client asks nothing of its own, a client of another version is
    refused there with the reason, and a client that states none (any msgpack client) is let in."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    import worldvla.serve.client as client_mod
    from worldvla.serve.protocol import PROTOCOL_HEADER

    with PolicyServer(HistoryPolicy()) as server:
        served = _count_metadata_requests(server)
        with PolicyClient(server.url, timeout=10) as client:
            client.reset("wave")
            client.act(_frame(np_rng))
            client._ws.close()
            client._ws = None  # lost: the next call reconnects, and checks the version again
            client.act(_frame(np_rng))
            assert served == [] and server.stats["act_ok"] == 2
            assert client.metadata()["protocol"] == 1 and served == [1]
        with _raw(server.url) as ws:  # a client that states no version; the server states its own
            assert ws.response.headers[PROTOCOL_HEADER] == "1"
            assert _ask(ws, packb({"type": "metadata"}))["protocol"] == 1
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url, proxy=None, additional_headers={PROTOCOL_HEADER: "2"})
        response = refused.value.response
        assert response.status_code == 400 and response.headers[PROTOCOL_HEADER] == "1"
        assert "this server speaks protocol 1, the client protocol 2 (WorldVLA-Protocol header)" in \
            response.body.decode()
        monkeypatch.setattr(client_mod, "PROTOCOL_VERSION", 2)  # a robot of a newer worldvla
        with pytest.raises(PolicyServerError, match="speaks protocol 1, this PolicyClient protocol 2"):
            PolicyClient(server.url, timeout=10)
        assert served == [1, 1] and server.health()["connections"] == 0


def test_a_server_that_states_no_protocol_version_is_asked_for_its_metadata(np_rng, monkeypatch):
    """A server of an older worldvla neither checks nor states the version at the handshake: the client asks
    for its metadata, as it did on each connection before, and still refuses a server of another version.
    One that states another version, or an unreadable one, is refused without a request."""
    import worldvla.serve.server as server_mod

    with monkeypatch.context() as m:
        m.setattr(server_mod, "PROTOCOL_HEADER", "X-Unread")  # an older server: no header it reads or sends
        with PolicyServer(HistoryPolicy()) as server:
            served = _count_metadata_requests(server)
            with PolicyClient(server.url, timeout=10) as client:
                assert served == [1]
                client.reset("wave")
                assert client.act(_frame(np_rng)).shape == (K, D)
            m.setattr(server_mod, "PROTOCOL_VERSION", 2)
            with pytest.raises(PolicyServerError, match=r"speaks protocol 2, this PolicyClient protocol 1"):
                PolicyClient(server.url, timeout=10)
            assert served == [1, 1]
    for stated, shown in (("2", "2"), ("two", "'two'")):
        with monkeypatch.context() as m:
            m.setattr(PolicyServer, "_process_response",
                      staticmethod(lambda conn, request, response: response.headers.update({"WorldVLA-Protocol":
                                                                                             stated})))
            with PolicyServer(HistoryPolicy()) as server:
                served = _count_metadata_requests(server)
                with pytest.raises(PolicyServerError, match=f"speaks protocol {shown}, this PolicyClient protocol 1"):
                    PolicyClient(server.url, timeout=10)
                assert served == []


class _ExtraMetadataPolicy(HistoryPolicy):
    def __init__(self, extra):
        super().__init__()
        self.extra = extra

    def metadata(self):
        return {**super().metadata(), "extra": self.extra}


def test_metadata_replies_stay_within_the_clients_limits(monkeypatch):
    """A policy whose metadata held a list of 70,000 numbers or a 1.5 MB string made the server send replies
    its own client refused, with a ProtocolError about a *request*."""
    extra = {"per_step": [0.5] * 70000, "notes": "é" * (3 * 2**18), "table": {str(i): i for i in range(5000)},
             "fine": [1, 2, 3]}
    with PolicyServer(_ExtraMetadataPolicy(extra)) as server, PolicyClient(server.url, timeout=10) as client:
        got = client.metadata()["policy"]["extra"]
        assert got["per_step"] == "<list of 70000 items>" and got["table"] == "<map of 5000 items>"
        assert got["fine"] == [1, 2, 3]
        assert len(got["notes"].encode()) <= 2**20 and got["notes"].endswith("[cut: 786432 characters in all]")
        assert got["notes"].startswith("éé")
        # A reply the client cannot decode is the server's fault, reported as such.
        monkeypatch.setattr(server, "metadata", lambda: {"ok": True, "blob": [0] * 70000})
        with pytest.raises(PolicyServerError, match=r"reply to a 'metadata' request cannot be decoded: reply "
                                                    r"exceeds the protocol's limits"):
            client.metadata()
    # what shortening cannot fix is refused when the server is built, not at the first metadata request
    with pytest.raises(ValueError, match=r"metadata\(\) cannot be sent to clients: reply holds more than 65536"):
        PolicyServer(_ExtraMetadataPolicy({"a": [[i] for i in range(40000)], "b": [[i] for i in range(40000)]}))


def test_array_shapes_too_large_or_inconsistent_with_their_data():
    """[0, 2**62, 3] (no data) was reported as 'not valid msgpack (ValueError: array is too big...)'."""
    cases = [([0, 2**62, 3], r"array 'shape' \[0, 4611686018427387904, 3\] is too large: each size must be at most"),
             ([2**62, 2**62, 0], "array 'shape' .* is too large"),
             ([0, 2**20, 2**20, 2**20], r"array 'shape' .* is too large: its sizes multiply to more than"),
             ([5, 3], r"array 'shape' \[5, 3\] is inconsistent with its data: dtype \|u1 needs 15 bytes, got 0")]
    for shape, fragment in cases:
        with pytest.raises(ProtocolError, match=fragment):
            unpackb(packb({"__ndarray__": b"", "dtype": "|u1", "shape": shape}), REQUEST_LIMITS)
    assert unpackb(packb({"__ndarray__": b"", "dtype": "|u1", "shape": [0, 2**31 - 1]})).shape == (0, 2**31 - 1)
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe"}))
        reply = _ask(ws, packb({"type": "act", "episode": "e",
                                "image": {"__ndarray__": b"", "dtype": "|u1", "shape": [0, 2**62, 3]}}))
        assert reply["ok"] is False and "array 'shape' [0, 4611686018427387904, 3] is too large" in reply["error"]


def test_client_timeout_bounds_a_call_that_reconnects(np_rng):
    """The call's deadline started after the reconnection, so one call could take connect_timeout + timeout."""
    silent = socket.create_server(("127.0.0.1", 0))  # completes TCP handshakes, never answers the WebSocket one
    try:
        with PolicyServer(HistoryPolicy()) as server:
            client = PolicyClient(server.url, timeout=0.5, connect_timeout=3)
            client.reset("wave")
            client._drop()  # lost (not closed by the caller)
            client.url = f"ws://127.0.0.1:{silent.getsockname()[1]}"  # and the server moved
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"could not reconnect .* within the call's timeout of 0.5 s"):
                client.act(_frame(np_rng))
            assert time.monotonic() - t0 < 1.5
            client.url = server.url
            assert client.act(_frame(np_rng)).shape == (K, D)  # the next call reconnects
            client.close()
    finally:
        silent.close()


def test_cli_keepalive_option(monkeypatch):
    import argparse

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert parser.parse_args(["--checkpoint", "c"]).keepalive_s == 5.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--checkpoint", "c", "--keepalive-s", bad])
    seen = {}
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained", staticmethod(lambda *a, **k: HistoryPolicy()))
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, **k: seen.setdefault("keepalive_s", self.keepalive_s)
                        and 0)
    assert serve.run(parser.parse_args(["--checkpoint", "c", "--port", "0", "--no-warmup", "--keepalive-s", "1.5"])) == 0
    assert seen["keepalive_s"] == 1.5


def test_codec_refuses_wide_floats_extra_bytes_deep_shapes_and_too_many_containers():
    arr = lambda data, dtype, shape: {"__ndarray__": data, "dtype": dtype, "shape": shape}
    with pytest.raises(ProtocolError, match="not allowed|not a NumPy dtype"):
        unpackb(packb(arr(b"\0" * 16, "<f16", [1])))  # long double (16 bytes) where NumPy has one
    with pytest.raises(ProtocolError, match="needs 8 bytes, got 12"):
        unpackb(packb(arr(b"\0" * 12, "<f4", [2])))  # extra bytes are refused, not reshaped
    with pytest.raises(ProtocolError, match="at most 8"):
        unpackb(packb(arr(b"\0", "|u1", [1] * 9)))
    unpackb(packb({f"k{i}": [] for i in range(31)}), REQUEST_LIMITS)  # 32 maps and arrays: the limit
    with pytest.raises(ProtocolError, match="more than 32 maps and arrays"):
        unpackb(packb({f"k{i}": [] for i in range(32)}), REQUEST_LIMITS)


def test_frames_resize_to_height_by_width_and_image_size_must_be_positive(np_rng):
    from worldvla.serve.protocol import image_size_hw

    out = fit_image(_frame(np_rng, 10, 20), (24, 32))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert image_size_hw(24) == (24, 24) and image_size_hw((24, 32)) == (24, 32)
    for bad in (0, -3, True, (24,), (0, 5)):
        with pytest.raises(ValueError, match="image_size"):
            image_size_hw(bad)


def test_connections_without_a_client_token_cannot_take_over_an_open_episode():
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as a, _raw(server.url) as b:
        assert _ask(a, packb({"type": "reset", "episode": "e", "instruction": "open"}))["ok"]
        reply = _ask(b, packb({"type": "reset", "episode": "e", "instruction": "push"}))
        assert not reply["ok"] and "belongs to another open connection" in reply["error"]


class CheckingPolicy(HistoryPolicy):
    """Refuses instructions at reset, as WorldVLAPolicy refuses one too long for the model's context."""

    def check_instruction(self, instruction):
        if "forbidden" in instruction:
            raise ValueError("the instruction is too long: shorten it")


def test_a_refused_reset_ends_the_episode_on_the_client_and_the_server(np_rng):
    """A refused reset left PolicyClient.episode and the server's episode as they were: the next act ran the
    old task, with the old episode's previous frame. Now both end it, as WorldVLAPolicy.reset does; a reset
    refused because the episode belongs to another connection leaves that connection's episode alone."""
    with PolicyServer(CheckingPolicy(), max_wait_ms=1.0) as server:
        with PolicyClient(server.url, timeout=10) as client:
            for bad, error in (("forbidden task", PolicyServerError), ("x" * 4097, PolicyServerError),
                               ("   ", ValueError)):
                old = client.reset("wipe the table")
                client.act(_frame(np_rng))
                with pytest.raises(error):
                    client.reset(bad, episode=None if bad.strip() else old)
                assert client.episode is None
                with pytest.raises(RuntimeError, match=r"no episode: call reset\(instruction\) before act\(\)"):
                    client.act(_frame(np_rng))
            client.reset("push")
            a = client.act(_frame(np_rng))
            assert np.all(a[:, 1] == -1) and np.all(a[:, 2] == len("push"))

        with _raw(server.url) as ws, _raw(server.url) as other:
            img = _frame(np_rng)
            for bad in ("forbidden task", "x" * 4097, "   "):
                assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe"}))["ok"]
                assert _ask(ws, packb({"type": "act", "episode": "e", "image": img}))["ok"]
                assert not _ask(ws, packb({"type": "reset", "episode": "e", "instruction": bad}))["ok"]
                reply = _ask(ws, packb({"type": "act", "episode": "e", "image": img}))
                assert not reply["ok"] and "unknown episode 'e'" in reply["error"], reply
            assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe"}))["ok"]
            reply = _ask(other, packb({"type": "reset", "episode": "e", "instruction": "forbidden task"}))
            assert not reply["ok"] and "belongs to another open connection" in reply["error"]
            reply = _ask(ws, packb({"type": "act", "episode": "e", "image": img}))
            assert reply["ok"] and np.all(reply["actions"][:, 2] == len("wipe"))


def test_an_instruction_over_the_limit_is_refused():
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        reply = _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "x" * 4097}))
        assert not reply["ok"] and "longer than 4096 characters" in reply["error"]
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "x" * 4096}))["ok"]


def test_acting_keeps_an_episode_from_eviction(np_rng):
    with PolicyServer(HistoryPolicy(), max_episodes=2) as server, PolicyClient(server.url, timeout=10) as client:
        first = client.reset("one")
        client.reset("two")
        client.episode = first
        client.act(_frame(np_rng))  # "one" is now the most recently used episode
        client.reset("three")  # evicts "two"
        client.episode = first
        client.act(_frame(np_rng))
        assert server.stats["evicted_episodes"] == 1


class OneFramePolicy(HistoryPolicy):
    def metadata(self):
        return {"name": "one-frame", "history": 1}


class NoHistoryKeyPolicy(HistoryPolicy):
    def metadata(self):
        return {"name": "no-history-key"}


def test_previous_frames_follow_the_policys_history_setting(np_rng):
    f1, f2 = _frame(np_rng), _frame(np_rng)
    with PolicyServer(OneFramePolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        client.act(f1)
        assert np.all(client.act(f2)[:, 1] == -1)  # history=1: never sent a previous frame
    with PolicyServer(NoHistoryKeyPolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        client.act(f1)
        np.testing.assert_allclose(client.act(f2)[:, 1], f1.mean(), rtol=1e-6)  # unsaid: two frames, the release's


class ResetCountingPolicy(HistoryPolicy):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.resets = []

    def reset(self, instructions):
        self.resets.append(list(instructions))
        super().reset(instructions)


def test_a_fresh_episode_resets_the_policy_even_with_the_same_instruction(np_rng):
    policy = ResetCountingPolicy()
    with PolicyServer(policy) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        client.act(_frame(np_rng))
        client.act(_frame(np_rng))
        n = len(policy.resets)
        client.reset("push")  # a new episode of the same task
        client.act(_frame(np_rng))
        assert len(policy.resets) == n + 1


def test_slot_policy_rows_follow_their_slots_whatever_the_arrival_order(np_rng):
    from worldvla.serve.server import _ActRequest, _Episode

    server = PolicyServer(SlotPolicy())
    a, b = _Episode("a", "one", None), _Episode("b", "two", None)
    fa1, fb1, fa2, fb2 = (_frame(np_rng, 16, 16) for _ in range(4))
    req = lambda ep, img: _ActRequest(ep, img, None, None, 0.0, 0.0)
    server._call_with_slots([req(a, fa1), req(b, fb1)])
    out, _ = server._call_with_slots([req(b, fb2), req(a, fa2)])  # the same episodes, the other way round
    np.testing.assert_allclose(out[0][:, [0, 1]], np.broadcast_to([fb2.mean(), fb1.mean()], (K, 2)), rtol=1e-6)
    np.testing.assert_allclose(out[1][:, [0, 1]], np.broadcast_to([fa2.mean(), fa1.mean()], (K, 2)), rtol=1e-6)
    assert server.stats["history_resets"] == 0


def test_connections_beyond_the_limit_are_refused_with_the_reason():
    """Each connection may hold a request of up to the payload limit: without a cap, a thousand robots (or a
    misbehaving script) held gigabytes. One connection over --max-connections is refused at its handshake,
    and the client says why; once one closes, another is let in, and health checks still answer."""
    with PolicyServer(HistoryPolicy(), max_connections=2) as server:
        first, second = PolicyClient(server.url), PolicyClient(server.url)
        try:
            _wait_for(lambda: server.health()["connections"] == 2)
            with pytest.raises(ConnectionError, match=r"refused the connection: .*2 connections open.*--max-conn"):
                PolicyClient(server.url)
            assert health(server.url)["stats"]["refused_connections"] == 1
            first.close()
            _wait_for(lambda: server.health()["connections"] == 1)
            with PolicyClient(server.url) as third:
                third.reset("hold still")
                assert third.act(np.zeros((8, 8, 3), np.uint8)).shape == (K, D)
            assert second.metadata()["server"]["max_connections"] == 2
        finally:
            first.close()
            second.close()
    with pytest.raises(ValueError, match="max_connections must be an integer >= 1"):
        PolicyServer(HistoryPolicy(), max_connections=0)


def test_concurrent_handshakes_do_not_pass_the_connection_limit():
    """The limit is checked at each handshake and counted when the connection opens: a pause between the two
    (in a websockets release to come) would let handshakes that arrive together all pass the check. Twelve at
    once against a limit of 3: exactly 3 are let in, whatever order they arrive in."""
    import threading

    start = threading.Barrier(12)
    opened, refused, lock = [], [], threading.Lock()

    def connect(url):
        start.wait()
        try:
            client = PolicyClient(url)
        except ConnectionError as err:
            with lock:
                refused.append(str(err))
        else:
            with lock:
                opened.append(client)

    with PolicyServer(HistoryPolicy(), max_connections=3) as server:
        threads = [threading.Thread(target=connect, args=(server.url,)) for _ in range(12)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(opened) == 3 and len(refused) == 9, (len(opened), refused)
            assert all("3 connections open" in r for r in refused), refused
            assert server.health()["connections"] == 3
        finally:
            for c in opened:
                c.close()


def test_a_host_that_does_not_resolve_or_a_taken_port_is_named():
    """`--host 999.1.1.1` failed with "[Errno -2] Name or service not known", naming neither the host nor the
    option; a port in use is named with its host."""
    with pytest.raises(ValueError, match=r"host '999\.1\.1\.1' \(--host\) is no address this machine can resolve"):
        PolicyServer(HistoryPolicy(), host="999.1.1.1").start_background()
    with PolicyServer(HistoryPolicy()) as server:
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{server.port} \(--host, --port\): the "
                                          r"port is in use .* choose another --port \(0 picks a free one\)$") as e:
            PolicyServer(HistoryPolicy(), port=server.port).start_background()
    # The one line printed starts with what failed ("[Errno 98] cannot listen ..." before); the number stays on it.
    assert str(e.value).startswith("cannot listen on 127.0.0.1:") and e.value.errno == errno.EADDRINUSE


def test_a_reset_refused_for_any_reason_ends_the_episode(np_rng):
    """A reset refused for a misspelt or unknown field, a bad 'client' token, a protocol mismatch or a bad id
    left the connection's episode running: the next act ran the old task. Each now ends it, as a refused
    instruction does; another connection's refused reset leaves the episode alone."""
    img = _frame(np_rng)
    reset = {"type": "reset", "episode": "e", "instruction": "new task"}
    with PolicyServer(HistoryPolicy(), max_wait_ms=1.0) as server, _raw(server.url) as ws, \
            _raw(server.url) as other:
        for extra in ({"instrucion": "new task"}, {"seed": 3}, {"client": ""}, {"client": 7}, {"protocol": 99},
                      {"id": 1.5}):
            assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "old task"}))["ok"]
            assert _ask(ws, packb({"type": "act", "episode": "e", "image": img}))["ok"]
            assert not _ask(other, packb({**reset, **extra}))["ok"]  # not its episode: nothing ends
            assert _ask(ws, packb({"type": "act", "episode": "e", "image": img}))["ok"]
            refused = _ask(ws, packb({**reset, **extra}))
            assert not refused["ok"], extra
            reply = _ask(ws, packb({"type": "act", "episode": "e", "image": img}))
            assert not reply["ok"] and "unknown episode 'e'" in reply["error"], (extra, refused, reply)


def test_act_returns_a_chunk_the_caller_may_change(np_rng):
    """PolicyClient.act returned a read-only view of the reply's bytes: in-place post-processing raised."""
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("open the drawer")
        chunk = client.act(_frame(np_rng))
        assert chunk.flags.writeable
        chunk[:, -1] = np.sign(chunk[:, -1])  # a gripper's post-processing
        assert np.all(chunk[:, -1] == 1)


def test_a_server_that_has_shut_down_refuses_to_start_again(np_rng):
    """A second `with server:` refused every request as shutting down, left its listening socket open, and
    request_stop() then raised "Event loop is closed"."""
    server = PolicyServer(HistoryPolicy())
    with server:
        with PolicyClient(server.url, timeout=10) as client:
            client.reset("wave")
            client.act(_frame(np_rng))
    with pytest.raises(RuntimeError, match="shut down and cannot start again: build a new PolicyServer"):
        with server:
            pass
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # nothing listens there
    server.request_stop()  # a no-op once stopped
    server.stop_background()
    with PolicyServer(HistoryPolicy()) as fresh, PolicyClient(fresh.url, timeout=10) as client:
        client.reset("wave")
        assert client.act(_frame(np_rng)).shape == (K, D)


def test_unknown_fields_with_long_names_get_a_reply_the_client_can_read():
    """Every unknown field's name was repeated in full: 20 names of 60000 characters made an error the
    client could not decode (its strings stop at 1 MiB)."""
    request = {"type": "metadata", **{"k" * 60000 + str(i): 1 for i in range(20)}}
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        reply = _ask(ws, packb(request))  # decoded within the client's limits
        assert not reply["ok"] and len(reply["error"]) < 2000, len(reply["error"])
        assert reply["error"].startswith("unknown fields '" + "k" * 40 + "'... (60001 characters), ")
        assert " and 12 more in a 'metadata' request" in reply["error"]


def test_the_timing_of_a_batch_split_in_two_policy_calls(np_rng):
    """An episode's first request and another's later one share a batch but not a policy call: both replies
    said batch_size 2 and the end of both calls. Each now says its own call's size and end."""
    delay = 0.1
    policy = HistoryPolicy(delay_s=delay)
    with PolicyServer(policy, max_wait_ms=2000, request_timeout_s=20) as server:
        a, b = PolicyClient(server.url, timeout=20), PolicyClient(server.url, timeout=20)
        a.reset("first")
        b.reset("later")
        b.act(_frame(np_rng))  # b now has a previous frame
        calls, batches = len(policy.calls), server.stats["batches"]
        def act(client):
            client.act(_frame(np_rng))

        _together(act, [(c,) for c in (a, b)])
        assert server.stats["batches"] == batches + 1 and policy.calls[calls:] == [1, 1]  # one batch, two calls
        first, later = a.last_timing, b.last_timing
        assert first["batch_size"] == later["batch_size"] == 1, (first, later)
        assert later["policy_ms"] - first["policy_ms"] >= delay * 1e3 * 0.9, (first, later)  # the second call
        a.close()
        b.close()


def test_a_closed_client_refuses_calls_and_timeouts_must_be_positive(np_rng):
    """After close() the first call raised "closed (code 1000)" and the next silently reconnected;
    timeout=None gave a bare TypeError, and timeout=0 was accepted with every call timing out."""
    with PolicyServer(HistoryPolicy()) as server:
        client = PolicyClient(server.url, timeout=10)
        client.reset("wave")
        client.close()
        for _ in range(2):
            with pytest.raises(RuntimeError, match=r"this PolicyClient was closed .*build a new PolicyClient"):
                client.act(_frame(np_rng))
        client.close()
        _wait_for(lambda: not server._open)  # no connection was reopened
        for name, value in (("timeout", None), ("timeout", 0), ("timeout", -1.0), ("timeout", float("nan")),
                            ("connect_timeout", 0), ("max_reply_mb", 0)):
            with pytest.raises(ValueError, match=rf"{name} must be a finite number of \w+ > 0, got"):
                PolicyClient(server.url, **{name: value})


def test_a_reply_over_the_clients_limit_names_max_reply_mb():
    """A reply larger than the client's max_reply_mb was reported as "connection ... closed (code None)"."""
    policy = _ExtraMetadataPolicy({"notes": "x" * 200000})
    with PolicyServer(policy) as server:
        client = PolicyClient(server.url, timeout=10, max_reply_mb=0.1)
        with pytest.raises(PolicyServerError, match=r"larger than this client's limit of 0\.1 MiB \(max_reply_mb\)"):
            client.metadata()
        client.close()
        with PolicyClient(server.url, timeout=10) as roomy:
            assert roomy.metadata()["policy"]["extra"]["notes"] == "x" * 200000


def test_the_time_spent_resizing_counts_against_the_request_timeout(np_rng, monkeypatch):
    """The request timeout bounds the whole request, from its arrival: a frame whose resize took most of it
    has only the rest left to wait for the policy, not a full timeout again (a robot would wait up to twice
    --timeout-s for its actions)."""
    policy = HistoryPolicy(delay_s=0.4)
    with PolicyServer(policy, request_timeout_s=1.0) as server, PolicyClient(server.url, timeout=20) as client:
        resize = server._resize_pair

        def slow_resize(image, previous):
            time.sleep(0.8)  # 0.2 s of the timeout left for a policy call of 0.4 s
            return resize(image, previous)

        monkeypatch.setattr(server, "_resize_pair", slow_resize)
        client.reset("slowly")
        with pytest.raises(PolicyServerError, match="timed out after 1 s"):
            client.act(_frame(np_rng, 48, 48))
        assert server.stats["timeouts"] == 1 and server.stats["act_ok"] == 0
        _wait_for(lambda: not server._running_batch)


# ---------------------------------------------------------------- client against a stand-in connection
class _FakeConnection:
    """A WebSocket connection of websockets' sync client, stood in: `replies` answer the requests in order (a
    dict as is, a callable of the request); what the client sent is in `sent`."""

    def __init__(self, replies, header="1"):
        from types import SimpleNamespace

        from websockets.datastructures import Headers

        self.replies, self.sent, self.closed, self.close_timeout = list(replies), [], False, 5
        self.response = SimpleNamespace(headers=Headers({"WorldVLA-Protocol": header} if header else {}))
        self.socket = SimpleNamespace(settimeout=lambda t: None)

    def send(self, data):
        self.sent.append(unpackb(data))

    def recv(self, timeout=None):
        reply = self.replies.pop(0)
        return packb(reply(self.sent[-1]) if callable(reply) else reply)

    def close(self):
        self.closed = True


def _offline_client(monkeypatch, *connections, **kw):
    """A PolicyClient whose connections (the constructor's, then each reconnection's) are `connections`; the
    arguments `_connect` got are appended to the list returned with it."""
    import worldvla.serve.client as client_mod

    pending, opened = list(connections), []
    monkeypatch.setattr(client_mod, "_connect", lambda url, open_timeout, max_size: opened.append(
        (url, open_timeout, max_size)) or pending.pop(0))
    return PolicyClient("ws://robot-server:8000", **kw), opened


def _echo_id(reply):
    return lambda request: {**reply, "id": request["id"]}


def test_client_refuses_a_mistyped_url_and_timeouts_that_are_not_numbers():
    for url in ("ws:/127.0.0.1:8000", "http://127.0.0.1:8000", "127.0.0.1:8000"):
        with pytest.raises(ValueError, match="server url must start with ws:// or wss://, got"):
            PolicyClient(url)
    for name in ("timeout", "connect_timeout", "max_reply_mb"):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number of \w+ > 0, got True"):
            PolicyClient("ws://127.0.0.1:1", **{name: True})


def test_client_opens_its_connection_with_its_limits_in_mebibytes(monkeypatch):
    client, opened = _offline_client(monkeypatch, _FakeConnection([]), connect_timeout=2.5, max_reply_mb=0.5)
    assert opened == [("ws://robot-server:8000", 2.5, 2**19)] and client.max_reply_bytes == 2**19


def test_client_skips_late_replies_to_earlier_requests(monkeypatch):
    """A reply carrying an earlier request's id (one the client gave up on) is not taken for the current one's."""
    ws = _FakeConnection([{"ok": True, "id": 1, "actions": np.zeros((3, 5), np.float32)},
                          _echo_id({"ok": True, "actions": np.ones((3, 5), np.float32)})])
    client, _ = _offline_client(monkeypatch, ws)
    client.episode, client._next_id = "e", 1
    np.testing.assert_array_equal(client.act(np.zeros((8, 8, 3), np.uint8)), np.ones((3, 5)))
    assert [m["id"] for m in ws.sent] == [2]


@pytest.mark.parametrize("version", [True, 1.0])
def test_client_refuses_a_server_whose_metadata_states_a_non_integer_protocol(monkeypatch, version):
    """A server that states no version at the handshake is asked for its metadata: `True` or `1.0` there is no
    protocol number, though each compares equal to 1."""
    ws = _FakeConnection([_echo_id({"ok": True, "protocol": version})], header=None)
    with pytest.raises(PolicyServerError, match=f"speaks protocol {version}, this PolicyClient protocol 1"):
        _offline_client(monkeypatch, ws)
    assert ws.sent[0]["type"] == "metadata" and ws.closed


def test_client_refuses_bytes_instructions_and_replies_without_a_chunk(monkeypatch):
    ws = _FakeConnection([_echo_id({"ok": True}), _echo_id({"ok": True, "actions": np.zeros(5, np.float32)})])
    client, _ = _offline_client(monkeypatch, ws)
    with pytest.raises(ValueError, match=r"reset\(\) takes the task instruction as str, got bytes b'wave': decode it"):
        client.reset(b"wave")
    assert ws.sent == [] and client.episode is None
    client.reset("wave")
    with pytest.raises(PolicyServerError, match=r"server reply has no \[K, D\] 'actions' array: ndarray"):
        client.act(np.zeros((8, 8, 3), np.uint8))


def test_health_reads_the_report_at_healthz_also_while_the_server_shuts_down():
    """The WebSocket URL, with or without a trailing slash or /healthz, names the HTTP report's; a server
    shutting down answers 503 with the same JSON."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    paths = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.requestline.split()[1])  # as sent (self.path folds a leading "//")
            body = json.dumps({"status": "stopping" if len(paths) == 3 else "ok"}).encode()
            self.send_response(503 if len(paths) == 3 else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"ws://127.0.0.1:{httpd.server_address[1]}"
        assert health(url) == {"status": "ok"}
        assert health(url + "/") == {"status": "ok"}
        assert health(url + "/healthz") == {"status": "stopping"}
        assert paths == ["/healthz"] * 3
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_client_metadata_is_the_servers_description_alone(monkeypatch):
    ws = _FakeConnection([_echo_id({"ok": True, "action_dim": D, "chunk_size": K, "protocol": 1})])
    client, _ = _offline_client(monkeypatch, ws)
    assert client.metadata() == {"action_dim": D, "chunk_size": K, "protocol": 1}


def test_client_names_a_server_that_shut_down_and_closes_a_silent_connection_without_waiting(monkeypatch):
    """A connection the server closed with 1001 (going away) is reported as its shutdown; a call that timed out
    drops its connection with a short closing handshake (the server may not answer that either)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    def going_away(request):
        raise ConnectionClosed(Close(1001, "going away"), None)

    def silent(request):
        raise TimeoutError

    first, second = _FakeConnection([going_away]), _FakeConnection([silent])
    client, opened = _offline_client(monkeypatch, first, second, timeout=5)
    with pytest.raises(PolicyServerError, match=r"^the server is shutting down \(connection closed with code 1001\)$"):
        client.metadata()
    with pytest.raises(TimeoutError, match="no reply from ws://robot-server:8000 within 5 s"):
        client.metadata()  # on a new connection
    assert len(opened) == 2 and second.closed and second.close_timeout == 0.2 and client._ws is None


def test_a_robot_reaches_the_server_directly_whatever_proxy_its_environment_names(np_rng, monkeypatch):
    """Robots talk to the policy server directly: a proxy named by the environment (one that is not there) is
    not used, neither by the WebSocket connection nor by the health report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "WS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "ws_proxy"):
        monkeypatch.setenv(name, nowhere)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("wave")
        assert client.act(_frame(np_rng)).shape == (K, D)
        assert health(server.url)["status"] == "ok"


def test_a_request_that_timed_out_while_queued_never_reaches_the_policy(np_rng):
    """A request that timed out while it waited behind a slow call got its error reply: the batcher drops it
    instead of spending a policy call on a reply nobody reads (and the robot's retry is still its first query)."""
    policy = HistoryPolicy(delay_s=0.8)
    with PolicyServer(policy, max_batch=1, request_timeout_s=0.4) as server, \
            PolicyClient(server.url, timeout=20) as a, PolicyClient(server.url, timeout=20) as b:
        a.reset("slow robot")
        b.reset("queued robot")
        errors = []

        def slow():
            with pytest.raises(PolicyServerError, match="timed out") as e:
                a.act(_frame(np_rng))
            errors.append(str(e.value))

        t = threading.Thread(target=slow)
        t.start()
        _wait_for(lambda: server._running_batch)  # a's call runs for 0.8 s: b's request waits in the queue
        with pytest.raises(PolicyServerError, match="timed out after 0.4 s"):
            b.act(_frame(np_rng))
        t.join(20)
        assert len(errors) == 1
        _wait_for(lambda: server._queue.empty() and not server._running_batch)
        assert policy.calls == [1], policy.calls  # a's call only
        assert server.stats["timeouts"] == 2 and server.stats["batched_requests"] == 1
        policy.delay_s = 0.0
        f = _frame(np_rng)
        retry = b.act(f)
        np.testing.assert_allclose(retry[:, 0], f.mean(), rtol=1e-6)
        np.testing.assert_array_equal(retry[:, 1], -1.0)


def test_the_stats_count_a_padded_batch_and_its_policy_call(np_rng):
    """Three robots batched together with max_batch=4: one policy call of 4 rows (one padding row), three
    requests answered; the stats the health check reports say so."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=4, max_wait_ms=3000, request_timeout_s=20) as server:
        with _robots(server, 3) as clients:
            frames = [_frame(np_rng) for _ in clients]
            replies = {}

            def call(i):
                replies[i] = clients[i].act(frames[i])

            _together(call, [(i,) for i in range(3)])
            for i in range(3):
                np.testing.assert_allclose(replies[i][:, 0], frames[i].mean(), rtol=1e-6)
                np.testing.assert_array_equal(replies[i][:, 4], 4)  # the policy saw a padded batch of 4
            stats = server.health()["stats"]
            assert policy.calls == [4]
            assert stats["padded_rows"] == 1 and stats["batches"] == 1 and stats["policy_calls"] == 1
            assert stats["batched_requests"] == 3 and stats["max_batch_seen"] == 3 and stats["act_ok"] == 3
            clients[0].act(frames[0])  # alone: a batch of one, nothing padded, the largest batch still 3
            stats = server.health()["stats"]
            assert policy.calls == [4, 1]
            assert stats["padded_rows"] == 1 and stats["batches"] == 2 and stats["policy_calls"] == 2
            assert stats["batched_requests"] == 4 and stats["max_batch_seen"] == 3


def test_a_slot_policy_answers_each_robot_from_its_own_slot_whatever_the_arrival_order(np_rng):
    """A policy that keeps history in its batch slots gets the robots in its slots' order; the requests of a
    batch that arrived in another order (here rotated) each get their own slot's actions back."""
    with PolicyServer(SlotPolicy(), max_batch=4, max_wait_ms=3000, request_timeout_s=20) as server:
        with _robots(server, 3) as clients:
            first = [_frame(np_rng, 16, 16) for _ in clients]
            _together(lambda i: clients[i].act(first[i]), [(i,) for i in range(3)])
            by_episode = {c.episode: i for i, c in enumerate(clients)}
            slots = [by_episode[e.key] for e in server._layout]
            order = slots[1:] + slots[:1]  # arrival order: the slots rotated by one
            second = [_frame(np_rng, 16, 16) for _ in clients]
            replies, threads = {}, []
            for k, i in enumerate(order):
                def call(i=i):
                    replies[i] = clients[i].act(second[i])
                threads.append(threading.Thread(target=call))
                threads[-1].start()
                if k < 2:  # the batch waits for the third robot: the first ones stay in flight until then
                    _wait_for(lambda k=k: server._busy == k + 1)  # received, hence queued, in this order
            for t in threads:
                t.join(20)
            assert len(replies) == 3
            assert server.stats["history_resets"] == 0 and server.stats["batches"] == 2
            for i in range(3):
                np.testing.assert_allclose(replies[i][:, 0], second[i].mean(), rtol=1e-6)
                np.testing.assert_allclose(replies[i][:, 1], first[i].mean(), rtol=1e-6)


def test_a_batch_split_in_two_policy_calls_counts_both_calls(np_rng):
    """One robot's first query and another's later one share a batch but not a policy call (one has no
    history frame): the stats count one batch of two requests and two policy calls."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=4, max_wait_ms=3000, request_timeout_s=20, pad_batches=False) as server, \
            PolicyClient(server.url, timeout=20) as a, PolicyClient(server.url, timeout=20) as b:
        a.reset("robot with history")
        a.act(_frame(np_rng))
        b.reset("fresh robot")
        _together(lambda c: c.act(_frame(np_rng)), [(a,), (b,)])
        assert policy.calls == [1, 1, 1]
        stats = server.stats
        assert stats["batches"] == 2 and stats["policy_calls"] == 3, stats
        assert stats["batched_requests"] == 3 and stats["max_batch_seen"] == 2, stats


def test_cli_options_reach_the_server(monkeypatch):
    """Every `worldvla serve` limit is the server's, not its default."""
    import argparse

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    built = []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained", staticmethod(lambda *a, **k: HistoryPolicy()))
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, **k: built.append(self) or 0)
    args = ["--checkpoint", "c", "--port", "0", "--no-warmup", "--max-connections", "3", "--max-batch", "2", "--max-wait-ms", "7",
            "--max-queue", "5", "--max-payload-mb", "2", "--timeout-s", "9", "--max-episodes", "11",
            "--no-pad-batches"]
    assert serve.run(parser.parse_args(args)) == 0
    s = built[0]
    assert (s.max_connections, s.max_batch, s.max_wait_ms, s.max_queue) == (3, 2, 7.0, 5)
    assert (s.max_payload_bytes, s.request_timeout_s, s.max_episodes, s.pad_batches) == (2 * 2**20, 9.0, 11, False)


def test_limits_that_would_refuse_every_request_are_refused_at_construction():
    """A zero payload limit, request timeout or keepalive would refuse (or drop) every request: refused when the
    server is built, naming the option; a NaN or a negative wait alike."""
    for kw in ({"max_payload_mb": 0}, {"request_timeout_s": 0}, {"keepalive_s": 0}):
        with pytest.raises(ValueError, match="max_payload_mb, request_timeout_s and keepalive_s must be > 0"):
            PolicyServer(HistoryPolicy(), **kw)
    for kw in ({"max_wait_ms": float("nan")}, {"max_wait_ms": -1}, {"request_timeout_s": float("inf")},
               {"max_payload_mb": "16"}, {"max_wait_ms": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a finite number >= 0"):
            PolicyServer(HistoryPolicy(), **kw)
    for kw in ({"max_queue": 0}, {"max_episodes": 0}, {"max_connections": 0}, {"max_batch": 2.0},
               {"max_batch": True}):  # a bool is no count (True would batch one request at a time)
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be an integer >= 1"):
            PolicyServer(HistoryPolicy(), **kw)
    assert PolicyServer(HistoryPolicy(), max_wait_ms=0).max_wait_ms == 0.0  # no batching window: allowed


def test_batch_sizes_include_a_max_batch_that_is_no_power_of_two(np_rng):
    """max_batch=3: the policy sees batches of 1, 2 or 3 (a full batch is not padded past max_batch), and the
    metadata says so; a policy keeping history in its slots is never padded and says none."""
    assert PolicyServer(HistoryPolicy(), max_batch=6).metadata()["server"]["policy_batch_sizes"] == [1, 2, 4, 6]
    slots = SlotPolicy()
    slots.max_engines = 1
    server = PolicyServer(slots, max_batch=4)
    assert not server.pad_batches and server.metadata()["server"]["policy_batch_sizes"] is None
    assert slots.max_engines == 1  # no engine per padded size for a policy that is never padded
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=3, max_wait_ms=3000, request_timeout_s=20) as server:
        with _robots(server, 3) as clients:
            replies = {}
            _together(lambda i: replies.__setitem__(i, clients[i].act(_frame(np_rng))), [(i,) for i in range(3)])
            assert policy.calls == [3] and server.stats["padded_rows"] == 0
            for i in range(3):
                np.testing.assert_array_equal(replies[i][:, 4], 3)


def test_a_batch_never_holds_more_than_max_batch_requests(np_rng):
    """Three robots at once with max_batch=2: two policy calls, neither of more than two rows."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=2, max_wait_ms=500, request_timeout_s=20, pad_batches=False) as server:
        with _robots(server, 3) as clients:
            _together(lambda c: c.act(_frame(np_rng)), [(c,) for c in clients])
            assert sorted(policy.calls) == [1, 2], policy.calls
            stats = server.stats
            assert stats["batches"] == 2 and stats["max_batch_seen"] == 2 and stats["act_ok"] == 3, stats


def test_the_stats_count_refused_requests_and_resets(np_rng):
    """`errors` counts every refused request, `act_requests` every 'act' (refused or not), `resets` those that
    succeeded: what the health report shows of a robot that forgot its reset once."""
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        img = _frame(np_rng)
        assert not _ask(ws, packb({"type": "act", "episode": "e", "image": img}))["ok"]  # no reset yet
        assert not _ask(ws, packb({"type": "reset", "episode": "e", "instruction": " "}))["ok"]
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "stack"}))["ok"]
        assert _ask(ws, packb({"type": "metadata"}))["ok"]
        assert _ask(ws, packb({"type": "act", "episode": "e", "image": img}))["ok"]
        stats = health(server.url)["stats"]
        assert (stats["errors"], stats["act_requests"], stats["act_ok"], stats["resets"]) == (2, 2, 1, 1), stats
        # Refused before any episode is looked up: no episode field, an unknown field. Still 'act' requests.
        assert not _ask(ws, packb({"type": "act", "image": img}))["ok"]
        assert not _ask(ws, packb({"type": "act", "episode": "e", "imagee": img}))["ok"]
        stats = health(server.url)["stats"]
        assert (stats["errors"], stats["act_requests"], stats["act_ok"]) == (4, 4, 1), stats


def test_the_server_raises_a_policys_engine_limits_to_what_serving_needs():
    """A policy's cache limits are raised to what serving needs (a prefix per episode, room for longer
    instructions than the warm-up's), never lowered."""
    class Limited(HistoryPolicy):
        max_engines, max_prefixes, engine_headroom = 1, 4, 0

    small = Limited()
    server = PolicyServer(small, max_batch=8, max_episodes=100)
    assert (small.max_engines, small.max_prefixes, small.engine_headroom) == (len(server.batch_sizes), 100, 256)
    assert server.batch_sizes == [1, 2, 4, 8]
    large = Limited()
    large.max_engines, large.max_prefixes, large.engine_headroom = 16, 1000, 512
    PolicyServer(large, max_batch=8, max_episodes=100)
    assert (large.max_engines, large.max_prefixes, large.engine_headroom) == (16, 1000, 512)


def test_the_batching_window_counts_from_the_first_request(np_rng):
    """max_wait_ms bounds the wait of a batch's first request: requests arriving one after another (each
    within the window of the one before) do not keep a batch open. Four robots, one idle; with a 2 s window,
    three act at 0, 1.0 and 2.6 s: the first two share a batch, the third gets the next one (a window restarted
    at each arrival would still be open at 2.6 s). Every margin is 0.6 s or more, for loaded machines."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=8, max_wait_ms=2000, request_timeout_s=20, pad_batches=False) as server:
        with _robots(server, 4) as clients:

            def late_act(i):
                time.sleep((0.0, 1.0, 2.6)[i])
                clients[i].act(_frame(np_rng))

            _together(late_act, [(i,) for i in range(3)])
            assert policy.calls == [2, 1], policy.calls
            assert server.stats["max_batch_seen"] == 2


def test_episode_ids_and_client_tokens_must_have_1_to_256_characters():
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        for episode in ("", "e" * 257):
            reply = _ask(ws, packb({"type": "reset", "episode": episode, "instruction": "push"}))
            assert not reply["ok"] and "'episode' strings must have 1 to 256 characters" in reply["error"], reply
        for client in ("", "c" * 257, 7):
            reply = _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "push", "client": client}))
            assert not reply["ok"] and "'client' must be a string of 1 to 256 characters" in reply["error"], reply
        assert _ask(ws, packb({"type": "reset", "episode": "e" * 256, "instruction": "push", "client": "c" * 256}))["ok"]
        assert server.stats["resets"] == 1 and list(server._episodes) == ["e" * 256]


class MiscountingPolicy(HistoryPolicy):
    """Returns one chunk more than it was given images (a policy bug)."""

    def act(self, images, history=None):
        out = super().act(images, history)
        return np.concatenate([out, out[-1:]])


def test_a_policy_answering_with_the_wrong_number_of_chunks_is_an_error_naming_the_shapes(np_rng):
    """A chunk per image or an error: a policy's extra (or missing) row must not hand a robot another's chunk."""
    with PolicyServer(MiscountingPolicy(), pad_batches=False) as server, \
            PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        with pytest.raises(PolicyServerError, match=r"policy failed: RuntimeError: policy.act returned shape "
                                                    r"\[2, 3, 5\] for 1 images; expected \[N, K, D\]"):
            client.act(_frame(np_rng))
        assert server.stats["policy_failures"] == 1 and server.stats["act_ok"] == 0


def test_a_draining_server_refuses_new_resets_and_acts_and_reports_it(np_rng):
    """While a server drains (shutting down, answering what it already queued), a new 'reset' or 'act' is refused
    with a reason the robot can act on, and /healthz answers 503 'draining' (also with a query string)."""
    import http.client
    import json

    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "push"}))["ok"]
        server._draining = True  # as shutdown() sets it before it waits for the requests in flight
        reset = _ask(ws, packb({"type": "reset", "episode": "f", "instruction": "pull"}))
        act = _ask(ws, packb({"type": "act", "episode": "e", "image": _frame(np_rng)}))
        for reply in (reset, act):
            assert reply == {"ok": False, "error": "server is shutting down; connect to another server"}, reply
        assert "f" not in server._episodes and server.stats["resets"] == 1 and server.stats["act_ok"] == 0
        for draining, status, code in ((True, "draining", 503), (False, "ok", 200)):
            server._draining = draining
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/healthz?verbose=1")
            response = conn.getresponse()
            assert response.status == code and json.loads(response.read())["status"] == status
            conn.close()


def test_the_default_drain_timeout_outlasts_a_request_timeout():
    """Shutdown waits, by default, long enough for a request that has just arrived to be answered or time out."""
    assert PolicyServer(HistoryPolicy(), request_timeout_s=30).drain_timeout_s == 35.0
    assert PolicyServer(HistoryPolicy(), request_timeout_s=30, drain_timeout_s=2).drain_timeout_s == 2.0


def test_a_previous_image_of_another_size_is_resized_like_the_frame(np_rng, monkeypatch):
    """A previous_image that is not at the model's size is resized (as the frame is, or not) before it reaches the
    policy; and `timing` puts the resize in preprocess_ms, not in queue_ms."""
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("push")
        frame, previous = _frame(np_rng), _frame(np_rng, 48, 32)
        actions = client.act(frame, previous_image=previous)  # the frame at the model's size, the previous not
        np.testing.assert_allclose(actions[:, 0], frame.mean(), rtol=1e-6)
        np.testing.assert_allclose(actions[:, 1], fit_image(previous, (24, 24)).mean(), rtol=1e-6)
        resize = server._resize_pair

        def slow_resize(image, previous):
            time.sleep(0.5)
            return resize(image, previous)

        monkeypatch.setattr(server, "_resize_pair", slow_resize)
        client.act(_frame(np_rng, 48, 48))
        timing = client.last_timing
        assert timing["preprocess_ms"] >= 500 and timing["queue_ms"] < 250, timing


def test_serve_warms_the_policy_up_unless_told_not_to_and_passes_the_mode(monkeypatch):
    import argparse

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    loaded, warmed = [], []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained",
                        staticmethod(lambda *a, **k: loaded.append(k) or HistoryPolicy()))
    monkeypatch.setattr(PolicyServer, "warmup", lambda self: warmed.append(self))
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, **k: 0)
    assert serve.run(parser.parse_args(["--checkpoint", "c", "--port", "0", "--mode", "release", "--device", "cpu"])) == 0
    assert len(warmed) == 1 and loaded[-1] == {"device": "cpu", "dtype": None, "mode": "release"}
    assert serve.run(parser.parse_args(["--checkpoint", "c", "--port", "0", "--no-warmup"])) == 0
    assert len(warmed) == 1 and loaded[-1] == {"device": None, "dtype": None}  # the checkpoint's own mode


def test_serve_says_what_it_serves_once_listening(tmp_path, monkeypatch, capsys):
    """An operator saw the address alone: which chunk, frame size, decoding mode, dtype and device the robots get
    was for them to find out. Stubs without `metadata()` keep the address line alone."""
    import argparse

    from worldvla import serve

    _tiny_policy_folder(tmp_path / "policy")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, on_ready=None, **k: on_ready(self) or 0)
    monkeypatch.setattr(PolicyServer, "url", "ws://127.0.0.1:9")
    assert serve.run(parser.parse_args(["--checkpoint", str(tmp_path / "policy"), "--port", "0", "--no-warmup", "--device",
                                        "cpu", "--mode", "sequential"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "worldvla serve: listening on ws://127.0.0.1:9 (health: http://127.0.0.1:9/healthz)"
    assert out[1].startswith(f"worldvla serve: {tmp_path / 'policy'}: chunks of 3 actions x 7 dims, 32 px frames, "
                             f"2 frame(s) of history, sequential decoding; ")
    assert out[1].endswith("M parameters in float32 on cpu")
    assert serve._policy_summary(HistoryPolicy()) is None


def test_the_serve_summary_says_what_the_policy_metadata_says(tmp_path):
    """The line gives the policy's own numbers (its parameters in millions, its dtype and device); a policy without
    `metadata()`, or whose metadata is no dict, gets no line, and metadata without the model's entry still gets its
    chunk line: the summary is printed once the server listens and must not fail it."""
    from types import SimpleNamespace

    from worldvla import serve

    meta = {"chunk_size": 4, "action_dim": 7, "image_size": 256, "history": 2, "mode": "parallel", "device": "cuda:1",
            "model": {"parameters": 7_061_000_000, "dtype": "bfloat16"}}
    assert serve._policy_summary(SimpleNamespace(metadata=lambda: meta)) == (
        "chunks of 4 actions x 7 dims, 256 px frames, 2 frame(s) of history, parallel decoding; 7061.0M parameters "
        "in bfloat16 on cuda:1")
    bare = {k: v for k, v in meta.items() if k != "model"}
    assert serve._policy_summary(SimpleNamespace(metadata=lambda: bare)).startswith("chunks of 4 actions x 7 dims")
    assert serve._policy_summary(SimpleNamespace(metadata=lambda: None)) is None
    assert serve._policy_summary(object()) is None


def test_a_client_dropped_without_close_releases_its_connection(np_rng):
    """A PolicyClient dropped without close() kept its connection open for the life of the process (its reader
    thread answering the keepalive), so a robot making a client per episode used up --max-connections."""
    with PolicyServer(HistoryPolicy(), max_connections=2) as server:
        for _ in range(3):  # more clients than the limit, one after the other
            client = PolicyClient(server.url, timeout=10)
            client.reset("open the drawer")
            assert client.act(_frame(np_rng)).shape == (K, D)
            del client
            gc.collect()
            _wait_for(lambda: not server._open, timeout=5.0)
        assert server.stats["refused_connections"] == 0


def test_the_unknown_episode_error_shows_the_reset_request_as_one_map(np_rng):
    """The reply spelt the reset request it asks for with a doubled closing brace ("...: ...}} first")."""
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        reply = client._round_trip({"type": "act", "episode": "never reset", "image": _frame(np_rng)},
                                   time.monotonic() + 10)
    assert not reply["ok"]
    assert "send {'type': 'reset', 'episode': ..., 'instruction': ...} first" in reply["error"], reply["error"]


def test_a_call_that_times_out_on_a_silent_server_returns_within_its_timeout(np_rng):
    """A call's timeout bounded its wait for the reply, and then closing the connection waited up to 0.2 s more
    for a server that answers nothing: a robot with a 50 ms budget got its TimeoutError after 250 ms."""
    with PolicyServer(HistoryPolicy()) as server:
        proxy = _SilentProxy(server.port)  # the server's host frozen, or the network gone silent
        client = PolicyClient(f"ws://127.0.0.1:{proxy.port}", timeout=10)
        try:
            client.reset("wave")
            client.timeout = 0.3
            proxy.silent.set()
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"no reply from .* within 0.3 s"):
                client.act(_frame(np_rng))
            elapsed = time.monotonic() - t0
            assert 0.3 <= elapsed < 0.42, elapsed  # closing waited 0.2 s past the deadline
        finally:
            proxy.close()
            client.close()


def test_a_process_exits_with_its_client_still_open():
    """Closing a dropped client's connection must not hold the interpreter's exit: there its reader thread no
    longer runs to complete the closing handshake."""
    child = textwrap.dedent("""
        import sys
        import numpy as np
        sys.path.insert(0, %r)
        from test_serve import HistoryPolicy
        from worldvla.serve import PolicyClient, PolicyServer

        server = PolicyServer(HistoryPolicy()).start_background()
        client = PolicyClient(server.url, timeout=10)  # a module global: dropped only as the interpreter exits
        client.reset("wave")
        client.act(np.zeros((24, 24, 3), np.uint8))
        print("done", flush=True)
    """) % os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr


def _limited(limit, replies=()):
    """A fake connection whose handshake states the payload limit `limit` (a header value; None: no header)."""
    ws = _FakeConnection(list(replies))
    if limit is not None:
        ws.response.headers["WorldVLA-Max-Payload-Bytes"] = limit
    return ws


def test_the_client_takes_only_a_positive_integer_payload_limit_from_the_handshake(monkeypatch):
    """A header that is no positive integer (a zero, a sign, a word) states no limit: the client sends as a client
    of a server without the header does, rather than refusing every request or failing to connect."""
    for value in ("0", "-5", "1e6", "lots", "", " "):
        assert _offline_client(monkeypatch, _limited(value))[0].max_payload_bytes is None, value
    assert _offline_client(monkeypatch, _limited("2048"))[0].max_payload_bytes == 2048


@pytest.mark.parametrize("limit_mb", [0, True, float("inf"), float("nan"), "16", -1])
def test_a_metadata_payload_limit_that_is_no_positive_number_states_none(monkeypatch, limit_mb):
    """An older server's metadata naming a limit of no use (zero, a bool, inf, NaN, a string) is taken as no
    limit: the client neither refuses every request nor fails to connect."""
    ws = _FakeConnection([_echo_id({"ok": True, "protocol": 1, "server": {"max_payload_mb": limit_mb}})], header=None)
    client, _ = _offline_client(monkeypatch, ws)
    assert client.max_payload_bytes is None


def test_a_request_of_exactly_the_payload_limit_is_sent_and_one_byte_more_refused(monkeypatch):
    """The limit is the largest request the server takes: a request of that many bytes goes out."""
    from worldvla.serve.protocol import packb

    reply = _echo_id({"ok": True, "actions": np.zeros((3, 5), np.float32)})
    probe, _ = _offline_client(monkeypatch, _limited(None, [reply]))
    probe.episode = "e"
    probe.act(np.zeros((8, 8, 3), np.uint8))
    size = len(packb(probe._ws.sent[0]))  # the same request, from a client with another token of the same length
    for limit, sent in ((size, 1), (size - 1, 0)):
        client, _ = _offline_client(monkeypatch, _limited(str(limit), [reply]))
        client.episode = "e"
        if sent:
            client.act(np.zeros((8, 8, 3), np.uint8))
        else:
            with pytest.raises(ValueError, match=rf"more than the server's payload limit of .* \({limit} bytes\)"):
                client.act(np.zeros((8, 8, 3), np.uint8))
        assert len(client._ws.sent) == sent


def test_a_reconnection_takes_the_payload_limit_of_the_new_connection(monkeypatch):
    """A server restarted with another --max-payload-mb states its new limit: the client follows it after
    reconnecting, instead of refusing (or sending) requests by the old server's limit."""
    reply = _echo_id({"ok": True, "actions": np.zeros((3, 5), np.float32)})
    client, _ = _offline_client(monkeypatch, _limited("100"), _limited("1000000", [reply]))
    assert client.max_payload_bytes == 100
    client.episode = "e"
    with pytest.raises(ValueError, match=r"payload limit of .* \(100 bytes\)"):
        client.act(np.zeros((8, 8, 3), np.uint8))
    client._drop()  # lost: the next call reconnects, to the restarted server
    assert client.act(np.zeros((8, 8, 3), np.uint8)).shape == (3, 5)
    assert client.max_payload_bytes == 1000000


def test_arrays_of_either_byte_order_travel_with_their_values():
    """An array read from a big-endian file (HDF5, a `>f4` recording) is sent with its byte order, and arrives with
    the same values in the receiver's own byte order."""
    for dtype in (">i4", ">f4", "<f8", ">u2"):
        sent = np.arange(-2, 4).astype(dtype).reshape(2, 3) if dtype[1] != "u" else np.arange(6, dtype=dtype)
        got = unpackb(packb({"a": sent}))["a"]
        assert got.dtype.isnative and got.dtype.kind == sent.dtype.kind and got.shape == sent.shape, dtype
        np.testing.assert_array_equal(got, sent)


def test_frames_of_exactly_the_largest_side_are_taken():
    """`max_side` is the largest side accepted: a 8192-pixel-wide panorama strip passes, one pixel more is refused."""
    from worldvla.serve.protocol import check_image

    for h, w in ((8192, 1), (1, 8192), (1, 1)):
        frame = np.zeros((h, w, 3), np.uint8)
        assert check_image(frame) is frame
    for h, w in ((8193, 1), (1, 8193), (0, 4)):
        with pytest.raises(ProtocolError, match=rf"'image' sides must be between 1 and 8192 pixels, got {h}x{w}"):
            check_image(np.zeros((h, w, 3), np.uint8))
    assert check_image(np.zeros((48, 64, 3), np.uint8), max_side=64).shape == (48, 64, 3)
    with pytest.raises(ProtocolError, match="between 1 and 63 pixels, got 48x64"):
        check_image(np.zeros((48, 64, 3), np.uint8), max_side=63)


def test_maps_with_keys_other_than_strings_are_refused():
    """Field names are strings: a map keyed by numbers (a robot written in another language), which a decoder
    would otherwise hash whatever their number, is refused with the key's type, and the server answers with it."""
    for keys, kind in (({1: "reset"}, "int"), ({"type": "act", "image": {0.5: b""}}, "float")):
        with pytest.raises(ProtocolError, match=rf"^request has a map key of type {kind}: the protocol's maps are "
                                                r"keyed by strings"):
            unpackb(packb(keys), REQUEST_LIMITS)
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        reply = _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe", 7: "x"}))
        assert reply["ok"] is False and "a map key of type int" in reply["error"]
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe"}))["ok"]


def test_a_frame_of_the_right_height_but_another_width_is_resized(np_rng):
    """Only a frame of the model's height and width passes through untouched: one of the same height and another
    width (a 16:9 camera at the model's height) is resized like any other."""
    for h, w in ((24, 40), (30, 32), (24, 32)):
        frame = _frame(np_rng, h, w)
        out = fit_image(frame, (24, 32))
        assert out.shape == (24, 32, 3) and out.dtype == np.uint8, (h, w)
        assert (out is frame) == ((h, w) == (24, 32))


def test_metadata_strings_are_cut_only_past_the_clients_string_limit():
    """A string of exactly the reply's string limit fits and travels whole; one byte more is cut, to at most the
    limit in UTF-8 (multi-byte characters counted by their bytes), saying how long it was."""
    from worldvla.serve.protocol import to_plain

    limit = REPLY_LIMITS["max_str_len"]
    assert to_plain("x" * limit) == "x" * limit
    assert to_plain({"notes": "é" * (limit // 2)}) == {"notes": "é" * (limit // 2)}
    for text in ("x" * (limit + 1), "é" * (limit // 2) + "x", "€" * limit):
        cut = to_plain(text)
        assert len(cut.encode()) <= limit and cut.endswith(f"... [cut: {len(text)} characters in all]")
        assert text.startswith(cut.split("... [cut")[0])
        unpackb(packb({"notes": cut}))  # within what a client decodes


def test_metadata_values_become_what_a_client_decodes():
    """`to_plain` keeps what a reply can carry and describes the rest: 64-bit integers stay numbers and larger ones
    become text, bytes stay bytes, keys become strings, arrays of up to 4096 numbers, maps of up to 4096 items and
    lists of up to 65536 stay whole, larger ones are described; a map that holds itself ends in text. Every result
    is a reply the client decodes."""
    from worldvla.serve.protocol import to_plain

    loop = {"name": "cfg"}
    loop["self"] = loop
    cases = [(2**64 - 1, 2**64 - 1), (2**64, str(2**64)), (-2**63, -2**63), (-2**63 - 1, str(-2**63 - 1)),
             (b"\x00\xff", b"\x00\xff"), ({1: "a", (2, 3): "b"}, {"1": "a", "(2, 3)": "b"}),
             (np.arange(4096), list(range(4096))), (np.zeros(4097, np.float32), "<array float32 [4097]>"),
             ({str(i): i for i in range(4096)}, {str(i): i for i in range(4096)}),
             ({str(i): i for i in range(4097)}, "<map of 4097 items>"),
             ([0] * 65536, [0] * 65536), ((0,) * 65537, "<tuple of 65537 items>")]
    for value, want in cases:
        got = to_plain(value)
        assert got == want, repr(value)[:60]
        assert unpackb(packb({"meta": got}))["meta"] == want
    plain = to_plain(loop)
    depth = 0
    while isinstance(plain, dict):
        assert plain["name"] == "cfg"
        plain, depth = plain["self"], depth + 1
    assert isinstance(plain, str) and plain.startswith("{'name': 'cfg', 'self': {") and depth == 17
    unpackb(packb(to_plain(loop)))


def test_a_reply_that_does_not_say_ok_is_a_refusal(monkeypatch):
    """Only a reply with "ok": true is an answer: one without the field (something else answering on that port) is
    reported as refused, not returned as the server's description or a reset that took."""
    ws = _FakeConnection([_echo_id({"action_dim": D}), _echo_id({"ok": False}), _echo_id({"ok": True, "action_dim": D})])
    client, _ = _offline_client(monkeypatch, ws)
    for _ in range(2):
        with pytest.raises(PolicyServerError, match="^request refused without a message$"):
            client.metadata()
    assert client.metadata() == {"action_dim": D}


def test_a_reply_without_an_id_answers_the_request_sent(monkeypatch):
    """A server that echoes no ids (one of an older worldvla) is answered in order: its reply is the current
    request's, not skipped while the call waits for its timeout."""
    ws = _FakeConnection([{"ok": True, "action_dim": D}, {"ok": True, "actions": np.ones((3, 5), np.float32)}])
    client, _ = _offline_client(monkeypatch, ws, timeout=5)
    assert client.metadata() == {"action_dim": D}
    client.episode = "e"
    np.testing.assert_array_equal(client.act(np.zeros((8, 8, 3), np.uint8)), np.ones((3, 5)))


def test_a_reconnection_to_a_server_of_another_protocol_is_closed_and_tried_again(monkeypatch):
    """The server was replaced by one of another version: the call that reconnects names the versions and closes
    that connection; the next call reconnects (to the right server, once it is back)."""
    reply = _echo_id({"ok": True, "actions": np.zeros((3, 5), np.float32)})
    other, back = _FakeConnection([], header="2"), _FakeConnection([reply])
    client, opened = _offline_client(monkeypatch, _FakeConnection([]), other, back)
    client.episode = "e"
    client._drop()  # lost
    with pytest.raises(PolicyServerError, match="speaks protocol 2, this PolicyClient protocol 1"):
        client.act(np.zeros((8, 8, 3), np.uint8))
    assert other.closed and other.sent == [] and client._ws is None
    assert client.act(np.zeros((8, 8, 3), np.uint8)).shape == (3, 5)
    assert len(opened) == 3 and len(back.sent) == 1


def test_a_request_over_the_servers_limit_is_not_taken_for_a_reply_over_the_clients(monkeypatch):
    """The server closes a connection whose request is too big with code 1009, and the client's side of the
    closing handshake echoes it: that is the server's limit. The client's own limit on replies is the case where
    the client closed with 1009 and received no close at all."""
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    def server_closed(request):
        raise ConnectionClosed(Close(1009, "frame too big"), Close(1009, "frame too big"), True)

    def client_closed(request):
        raise ConnectionClosed(None, Close(1009, "over size limit"))

    client, _ = _offline_client(monkeypatch, _FakeConnection([server_closed]), _FakeConnection([client_closed]))
    with pytest.raises(PolicyServerError, match=r"^the server closed the connection: message too big \(frame too "
                                                r"big\); the request exceeds its payload limit"):
        client.metadata()
    with pytest.raises(PolicyServerError, match=r"reply is larger than this client's limit of 64 MiB \(max_reply_mb\)"):
        client.metadata()


def test_the_client_checks_the_previous_frame_before_sending(monkeypatch):
    """A previous frame that is no RGB uint8 [H, W, 3] is named by its field on the robot, before anything is
    sent, as the current frame is."""
    client, _ = _offline_client(monkeypatch, ws := _FakeConnection([]))
    client.episode = "e"
    frame = np.zeros((8, 8, 3), np.uint8)
    for bad, fragment in ((np.zeros((8, 8, 4), np.uint8), r"must have shape \[H, W, 3\] \(RGB\), got \[8, 8, 4\]"),
                          (np.zeros((8, 8, 3), np.float32), "must have dtype uint8, got float32")):
        with pytest.raises(ProtocolError, match=rf"^'previous_image' {fragment}"):
            client.act(frame, previous_image=bad)
    assert ws.sent == []


def test_a_server_at_its_connection_limit_that_states_no_version_is_named_with_its_reason(monkeypatch):
    """A server of an older worldvla refuses a connection over --max-connections with HTTP 503 and its reason,
    without a protocol header: the client says it refused and why, not that no WebSocket server answers there."""
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response
    from websockets.sync import client as ws_client

    def refuse(url, **kw):
        raise InvalidStatus(Response(503, "Service Unavailable", Headers(), b"2 connections open (--max-connections)\n"))

    monkeypatch.setattr(ws_client, "connect", refuse)
    with pytest.raises(ConnectionError, match=r"^the policy server at ws://127\.0\.0\.1:9 refused the connection: "
                                              r"2 connections open \(--max-connections\)$"):
        PolicyClient("ws://127.0.0.1:9")

    def not_found(url, **kw):
        raise InvalidStatus(Response(404, "Not Found", Headers(), b"no such page"))

    monkeypatch.setattr(ws_client, "connect", not_found)
    with pytest.raises(ConnectionError, match=r"did not answer as a WebSocket server \(InvalidStatus"):
        PolicyClient("ws://127.0.0.1:9")


def test_a_protocol_header_of_other_digits_is_no_version(monkeypatch):
    """A header value such as '¹' (a digit to str.isdigit, not to int) is another protocol, named as such, not a
    ValueError from the constructor."""
    for header in ("\u00b9", "\u00b2"):  # superscript one and two
        ws = _FakeConnection([], header=header)
        with pytest.raises(PolicyServerError, match=f"speaks protocol '{header}', this PolicyClient protocol 1"):
            _offline_client(monkeypatch, ws)
        assert ws.closed


def test_arrays_of_up_to_eight_dimensions_travel():
    """Eight dimensions is the most an array may have: one of eight arrives whole, one of nine is refused."""
    sent = np.arange(2**8, dtype=np.int16).reshape((2,) * 8)
    got = unpackb(packb({"a": sent}), REQUEST_LIMITS)["a"]
    assert got.shape == (2,) * 8 and np.array_equal(got, sent)
    with pytest.raises(ProtocolError, match="a list of at most 8 non-negative integers"):
        unpackb(packb({"a": sent.reshape((2,) * 7 + (1, 2))}))


# ---------------------------------------------------------------- lifecycle, ownership, failures: edge cases
def test_a_serving_server_refuses_a_second_start_and_a_never_started_one_stops_quietly():
    """A second `start()` while serving bound a second socket and ran a second batcher over the same queue;
    `request_stop()` on a server never started must do nothing, as it does once the server has stopped."""
    import asyncio

    idle = PolicyServer(HistoryPolicy())
    idle.request_stop()
    idle.stop_background()

    async def main():
        server = PolicyServer(HistoryPolicy())
        await server.start()
        port = server.port
        try:
            with pytest.raises(RuntimeError, match="already serving"):
                await server.start()
            assert server.port == port and {s.getsockname()[1] for s in server._ws.sockets} == {port}
        finally:
            await server.shutdown()

    asyncio.run(main())


def test_a_request_of_exactly_the_payload_limit_is_served_and_one_byte_more_is_refused(np_rng):
    """The server's side of the limit `PolicyClient` checks: a request of exactly --max-payload-mb is taken."""
    limit = int(0.25 * 2**20)
    img = np_rng.integers(0, 256, (290, 290, 3), dtype=np.uint8)  # 252300 bytes, resized to the model's 24x24

    def act(size):
        base = {"type": "act", "episode": "e", "image": img}
        pad = size - len(packb({**base, "id": ""}))
        msg = packb({**base, "id": "x" * pad})
        if len(msg) > size:  # the id's string header grew by a byte or two
            msg = packb({**base, "id": "x" * (pad - (len(msg) - size))})
        assert len(msg) == size
        return msg

    with PolicyServer(HistoryPolicy(), max_payload_mb=0.25) as server, _raw(server.url) as ws:
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "wipe"}))["ok"]
        reply = _ask(ws, act(limit))
        assert reply["ok"], reply
        np.testing.assert_allclose(reply["actions"][:, 0], fit_image(img, (24, 24)).mean(), rtol=1e-6)
        reply = _ask(ws, act(limit + 1))
        assert not reply["ok"] and "exceeds the server's limit of 0.25 MiB" in reply["error"], reply


def test_an_episode_taken_over_by_another_robot_is_not_taken_back_while_that_robot_is_connected(np_rng):
    """Robot A's connection closes and robot B takes A's episode id over: B now owns it, with B's client token.
    A, reconnecting with its own token, is another robot's connection from then on: refused while B is open."""
    img = _frame(np_rng)
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as b:
        with _raw(server.url) as a:
            assert _ask(a, packb({"type": "reset", "episode": "e", "instruction": "open", "client": "robot-a"}))["ok"]
            assert _ask(a, packb({"type": "act", "episode": "e", "image": img, "client": "robot-a"}))["ok"]
        _wait_for(lambda: server.health()["connections"] == 1)
        assert _ask(b, packb({"type": "act", "episode": "e", "image": img, "client": "robot-b"}))["ok"]
        with _raw(server.url) as a_again:
            reply = _ask(a_again, packb({"type": "act", "episode": "e", "image": img, "client": "robot-a"}))
            assert not reply["ok"] and "belongs to another open connection" in reply["error"], reply
            reply = _ask(a_again, packb({"type": "reset", "episode": "e", "instruction": "x", "client": "robot-a"}))
            assert not reply["ok"] and "belongs to another open connection" in reply["error"], reply
        reply = _ask(b, packb({"type": "act", "episode": "e", "image": img, "client": "robot-b"}))
        assert reply["ok"] and np.all(reply["actions"][:, 2] == len("open"))


def test_an_internal_error_while_acting_does_not_leave_the_episode_busy(np_rng, monkeypatch):
    """A request that fails inside the server (here: its frame's resize) gets an 'internal server error' reply;
    the episode's next request is served, not refused as one already in flight."""
    with PolicyServer(HistoryPolicy()) as server, PolicyClient(server.url, timeout=10) as client:
        resize = server._resize_pair
        failures = [RuntimeError("resize failed")]

        def flaky_resize(image, previous):
            if failures:
                raise failures.pop()
            return resize(image, previous)

        monkeypatch.setattr(server, "_resize_pair", flaky_resize)
        client.reset("push")
        with pytest.raises(PolicyServerError, match="internal server error: RuntimeError: resize failed"):
            client.act(_frame(np_rng, 32, 32))
        f = _frame(np_rng, 32, 32)
        a = client.act(f)
        np.testing.assert_allclose(a[:, 0], fit_image(f, (24, 24)).mean(), rtol=1e-6)
        np.testing.assert_array_equal(a[:, 1], -1.0)  # the failed request was no step of the episode


def test_a_request_whose_connection_closed_is_no_timeout(np_rng):
    """A robot that closes its connection while its request runs gets no reply, and the health report does not
    count a timeout for it (timeouts say the server is overloaded or the policy too slow)."""
    policy = HistoryPolicy(delay_s=0.5)
    with PolicyServer(policy, request_timeout_s=20) as server, _raw(server.url) as ws:
        assert _ask(ws, packb({"type": "reset", "episode": "e", "instruction": "push"}))["ok"]
        ws.send(packb({"type": "act", "episode": "e", "image": _frame(np_rng)}))
        _wait_for(lambda: policy.calls == [1])  # its call is running
        ws.close()
        _wait_for(lambda: server._busy == 0 and not server._running_batch and server.health()["connections"] == 0)
        assert server.stats["timeouts"] == 0 and server.stats["act_ok"] == 0, server.stats
        assert server._episodes["e"].previous is None  # its frame reached no robot


class EmptyChunkPolicy(HistoryPolicy):
    """Writes no action block while `empty` is set (mode='release' may do so for a frame)."""
    empty = False

    def act(self, images, history=None):
        full = super().act(images, history)
        return [full[i, :0] for i in range(len(full))] if self.empty else full


def test_a_frame_answered_with_no_action_is_not_the_next_previous_frame(np_rng):
    """A request answered with an error (no action block) moved no robot: the episode's previous frame stays the
    one of its last answered request."""
    policy = EmptyChunkPolicy()
    with PolicyServer(policy, pad_batches=False) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        f1, f2, f3 = (_frame(np_rng) for _ in range(3))
        client.act(f1)
        policy.empty = True
        with pytest.raises(PolicyServerError, match="wrote no action block"):
            client.act(f2)
        policy.empty = False
        a3 = client.act(f3)
        np.testing.assert_allclose(a3[:, [0, 1]], np.broadcast_to([f3.mean(), f1.mean()], (K, 2)), rtol=1e-6)
        assert server._episodes[client.episode].steps == 2


def test_requests_that_timed_out_during_a_failed_batch_are_not_run_again(np_rng):
    """A batch whose call failed is run again request by request, but only for requests still waiting: those
    that timed out during the failed call get no second policy call."""
    policy = SlowFailingPolicy(delay_s=1.0, fail_on="explode")
    with PolicyServer(policy, max_batch=4, max_wait_ms=350, request_timeout_s=0.4, pad_batches=False) as server:
        good, bad = PolicyClient(server.url, timeout=20), PolicyClient(server.url, timeout=20)
        good.reset("hold still")
        bad.reset("explode")
        errors = _act_together([good, bad], np_rng)
        assert len(errors) == 2 and all("timed out after 0.4 s" in e for e in errors), errors
        _wait_for(lambda: server.stats["policy_failures"] == 1 and not server._running_batch)
        time.sleep(0.2)
        assert policy.calls == [2], policy.calls
        assert server.stats["policy_failures"] == 1 and server.stats["act_ok"] == 0
        good.close()
        bad.close()


def test_later_queries_of_an_episode_do_not_reset_the_policy_again(np_rng):
    """The policy is reset for an episode's first query; the later ones, with the same episodes in the call, go on
    without (WorldVLAPolicy.reset re-checks every instruction against the model's context)."""
    policy = ResetCountingPolicy()
    with PolicyServer(policy) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("push")
        for _ in range(3):
            client.act(_frame(np_rng))
        assert policy.resets == [["push"]] and server.stats["act_ok"] == 3


def test_the_timing_batch_size_counts_requests_not_padding_rows(np_rng):
    """Three robots answered by one padded call of four rows: each reply's timing says a batch of 3 requests."""
    policy = HistoryPolicy()
    with PolicyServer(policy, max_batch=4, max_wait_ms=3000, request_timeout_s=20) as server:
        with _robots(server, 3) as clients:
            timings = {}

            def call(i):
                clients[i].act(_frame(np_rng))
                timings[i] = clients[i].last_timing

            _together(call, [(i,) for i in range(3)])
            assert policy.calls == [4]
            assert [timings[i]["batch_size"] for i in range(3)] == [3, 3, 3], timings


def test_warmup_runs_every_padded_batch_size_with_and_without_a_previous_frame():
    """Warm-up calls the policy at each batch size the server will use, once without history and once with it;
    a policy of one frame gets no history call (it never gets one while serving)."""
    class Recording(HistoryPolicy):
        def act(self, images, history=None):
            self.seen.append((len(images), history is not None))
            return super().act(images, history)

    policy = Recording()
    policy.seen = []
    PolicyServer(policy, max_batch=4).warmup()
    assert policy.seen == [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]

    class OneFrame(Recording):
        def metadata(self):
            return {"name": "one-frame", "history": 1}

    policy = OneFrame()
    policy.seen = []
    PolicyServer(policy, max_batch=4).warmup()
    assert policy.seen == [(1, False), (2, False), (4, False)]


def test_a_policy_returning_another_number_of_chunks_in_a_list_is_an_error_naming_the_counts(np_rng):
    """A list of chunks (mode='release') with one chunk too many or too few: no robot may get another's chunk, and
    the error says what the policy returned, as for an array of the wrong shape."""
    class ExtraChunk(RaggedPolicy):
        def act(self, images, history=None):
            chunks = super().act(images, history)
            return chunks + [chunks[-1][:1]]

    class MissingChunk(RaggedPolicy):
        def act(self, images, history=None):
            return super().act(images, history)[:-1]

    for policy, returned in ((ExtraChunk(), 2), (MissingChunk(), 0)):
        with PolicyServer(policy, pad_batches=False) as server, PolicyClient(server.url, timeout=10) as client:
            client.reset("two words")
            with pytest.raises(PolicyServerError, match=rf"policy failed: RuntimeError: policy.act returned a list of "
                                                        rf"{returned} chunks for 1 images; expected one per image"):
                client.act(_frame(np_rng))
            assert server.stats["policy_failures"] == 1 and server.stats["act_ok"] == 0

    class NestedLists(RaggedPolicy):  # one image's [K, D] chunk as a list of K actions: no list of chunks
        def act(self, images, history=None):
            self.returned = np.asarray(super().act(images, history)[0]).tolist()
            return self.returned

    policy = NestedLists()
    with PolicyServer(policy, pad_batches=False) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("two words")
        actions = client.act(_frame(np_rng))
        assert len(policy.returned) == 2 and np.array_equal(actions, np.asarray(policy.returned, dtype=np.float32))


def test_a_request_whose_episode_was_reset_during_its_resize_never_reaches_the_policy(np_rng, monkeypatch):
    """A robot restarted while its old connection still looks open (a dropped network) resets its episode id on a
    new connection, with its client token, while the old connection's last frame is being resized: that stale
    request is refused as of a reset episode, not run on the policy."""
    policy = HistoryPolicy()
    with PolicyServer(policy, request_timeout_s=20) as server, _raw(server.url) as old, _raw(server.url) as new:
        started, release = _hold_resizes(server, monkeypatch)
        assert _ask(old, packb({"type": "reset", "episode": "e", "instruction": "open", "client": "r"}))["ok"]
        old.send(packb({"type": "act", "episode": "e", "image": _frame(np_rng, 48, 48), "client": "r"}))
        assert started.wait(10)
        assert _ask(new, packb({"type": "reset", "episode": "e", "instruction": "close", "client": "r"}))["ok"]
        release.set()
        reply = unpackb(old.recv(timeout=10))
        assert not reply["ok"] and "was reset or dropped while its image was being resized" in reply["error"], reply
        assert policy.calls == []
        reply = _ask(new, packb({"type": "act", "episode": "e", "image": _frame(np_rng), "client": "r"}))
        assert reply["ok"] and np.all(reply["actions"][:, 1] == -1) and np.all(reply["actions"][:, 2] == len("close"))


# ---------------------------------------------------------------- codec, metadata and client: edge cases
def test_a_zero_dimensional_array_keeps_its_shape():
    """np.ascontiguousarray made a 0-d array (a reduction's result) shape [1] on the wire."""
    got = unpackb(packb({"mean": np.array(3.5, np.float32), "count": np.array(7)}))
    assert got["mean"].shape == () and got["mean"].dtype == np.float32 and got["mean"] == 3.5
    assert got["count"].shape == () and got["count"] == 7


def test_the_encoder_names_what_it_cannot_send_and_sends_bfloat16_tensors_as_float32():
    """A long-double array was sent and refused by its receiver as "not a float"; an integer past 64 bits was
    called "an object of type int"; a bfloat16 tensor failed with torch's "unsupported ScalarType BFloat16"."""
    import torch

    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(TypeError, match=r"dtype float128 \(16 bytes a number\): numbers of at most 8 bytes "
                                            r"travel; convert it first \(\.astype\(np\.float64\)\)"):
            packb({"a": np.zeros(2, np.longdouble)})
    with pytest.raises(TypeError, match=r"cannot encode the integer 1180591620717411303424 in a message: msgpack "
                                        r"integers lie in \[-2\*\*63, 2\*\*64\); send it as a string or a float"):
        packb({"n": 2**70})
    values = torch.tensor([[1.5, -2.0], [0.1, 3e38]], dtype=torch.bfloat16)
    got = unpackb(packb({"t": values}))["t"]
    assert got.dtype == np.float32 and got.shape == (2, 2)
    assert np.array_equal(got, values.float().numpy())


def test_metadata_with_arrays_of_objects_and_undecodable_file_names_reaches_the_client():
    """`to_plain` returned small arrays of objects, complex numbers or dates as their items and kept strings with
    lone surrogates (a file name's undecodable bytes): the server refused such a policy as not encodable."""
    from pathlib import Path

    from worldvla.serve.protocol import to_plain

    name = os.fsdecode(b"/data/caf\xe9/policy")  # "/data/caf\udce9/policy"
    meta = {"checkpoint": name, "files": np.array([Path("a.pt"), 3], dtype=object), "poles": np.array([1 + 2j]),
            "day": np.array(["2024-05-01"], dtype="M8[D]"), "labels": np.array(["x" * 3, "y"]),
            name: 1, "long": name * 100_000}
    plain = to_plain(meta)
    assert plain["checkpoint"] == "/data/caf\\udce9/policy" and plain["/data/caf\\udce9/policy"] == 1
    assert plain["files"] == ["a.pt", 3] and plain["poles"] == ["(1+2j)"] and plain["day"] == ["2024-05-01"]
    assert plain["labels"] == ["xxx", "y"]
    assert plain["long"].startswith("/data/caf\\udce9/policy") and plain["long"].endswith(
        f"... [cut: {len(name) * 100_000} characters in all]")
    assert unpackb(packb(plain)) == plain

    class Described(HistoryPolicy):
        def metadata(self):
            return meta

    server = PolicyServer(Described())  # refused at construction before
    assert unpackb(packb(server.metadata()))["policy"]["checkpoint"] == "/data/caf\\udce9/policy"


def test_an_image_size_pair_holding_a_bool_is_refused():
    from worldvla.serve.protocol import image_size_hw

    for bad in ((True, 24), (24, True), [False, 1]):
        with pytest.raises(ValueError, match="image_size must be a positive int or an"):
            image_size_hw(bad)
    assert image_size_hw((np.int64(24), 32)) == (24, 32)


def test_a_request_interrupted_while_sending_is_not_read_with_the_next_one(np_rng):
    """Ctrl-C partway through writing a frame left half a message on the connection: the server read the next
    request as its rest, and that call failed with "closed (code 1002, invalid opcode)"."""
    with PolicyServer(HistoryPolicy(), max_wait_ms=1.0) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("wave")
        sock = client._ws.socket

        class HalfThenInterrupt:
            armed = True

            def __getattr__(self, name):
                return getattr(sock, name)

            def sendall(self, data):
                if HalfThenInterrupt.armed:
                    HalfThenInterrupt.armed = False
                    sock.sendall(data[:len(data) // 2])
                    raise KeyboardInterrupt
                return sock.sendall(data)

        client._ws.socket = HalfThenInterrupt()
        with pytest.raises(KeyboardInterrupt):
            client.act(_frame(np_rng))
        frames = [_frame(np_rng) for _ in range(2)]
        first = client.act(frames[0])  # on a new connection, the same episode
        np.testing.assert_allclose(first[:, 0], frames[0].mean(), rtol=1e-6)
        assert np.all(first[:, 1] == -1)  # the interrupted frame never arrived
        second = client.act(frames[1])
        np.testing.assert_allclose(second[:, [0, 1]], np.broadcast_to([frames[1].mean(), frames[0].mean()], (K, 2)),
                                   rtol=1e-6)


def test_health_asks_the_servers_host_and_port_whatever_path_the_url_names():
    """The server takes WebSocket connections on any path but reports its health at /healthz alone: a client
    connected at ws://host:port/robots asked /robots/healthz and was told no policy server runs there."""
    with PolicyServer(HistoryPolicy()) as server:
        assert health(server.url + "/robots/7?arm=left")["status"] == "ok"
        with PolicyClient(server.url + "/robots", timeout=10) as client:
            assert client.metadata()["action_dim"] == D and client.health()["status"] == "ok"


def test_a_closed_client_refuses_every_call_health_and_reset_included(monkeypatch):
    """After close() health() still asked the server, reset("") complained about the instruction and act() without
    an episode asked for a reset: the class says every call raises RuntimeError."""
    client, _ = _offline_client(monkeypatch, _FakeConnection([]))
    client.close()
    for call in (client.health, lambda: client.reset(""), lambda: client.reset("wave"),
                 lambda: client.act(np.zeros((8, 8, 3), np.uint8)), client.metadata):
        with pytest.raises(RuntimeError, match=r"this PolicyClient was closed .*build a new PolicyClient"):
            call()


def test_a_url_that_is_no_string_is_refused_naming_its_type():
    """bytes gave "a bytes-like object is required, not 'str'", None an AttributeError."""
    for url, shown in ((b"ws://127.0.0.1:1", "bytes b'ws://127.0.0.1:1'"), (None, "NoneType None")):
        with pytest.raises(TypeError, match=re.escape(f"server url must be a str such as 'ws://gpu-box:8000', got "
                                                      f"{shown}")):
            PolicyClient(url)


def test_an_instruction_with_an_undecodable_byte_is_refused_before_sending(monkeypatch):
    """A lone surrogate (bytes decoded with errors="surrogateescape") gave msgpack's bare UnicodeEncodeError."""
    ws = _FakeConnection([_echo_id({"ok": True})])
    client, _ = _offline_client(monkeypatch, ws)
    with pytest.raises(ValueError, match=r"UTF-8 can encode; it holds '\\udcff' at character 5, an undecodable byte: "
                                         r"decode the instruction's bytes with their own encoding first"):
        client.reset(b"open \xff drawer".decode("utf-8", "surrogateescape"))
    assert ws.sent == [] and client.episode is None
    client.reset("open the drawer")
    assert ws.sent[0]["instruction"] == "open the drawer"


def test_shutting_down_a_server_that_never_served_does_nothing():
    """`shutdown()` in a `finally` after a `start()` that failed (its port taken), or on a server never started,
    raised AttributeError on the missing WebSocket server; `wait_stopped()` before `start()` alike."""
    import asyncio

    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = PolicyServer(HistoryPolicy(), port=taken.getsockname()[1])
            with pytest.raises(OSError, match="the port is in use"):
                await server.start()
            await server.shutdown()
        await PolicyServer(HistoryPolicy()).shutdown()
        with pytest.raises(RuntimeError, match=r"not serving: await start\(\) first"):
            await PolicyServer(HistoryPolicy()).wait_stopped()

    asyncio.run(main())


def test_serve_forever_off_the_main_thread_is_refused_and_a_failing_on_ready_frees_the_port():
    """Off the main thread serve_forever failed on asyncio's "set_wakeup_fd only works in main thread" once it was
    listening, and an `on_ready` that raised alike left the port bound with nobody serving it."""
    server = PolicyServer(HistoryPolicy())
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(RuntimeError, server.serve_forever)))
    thread.start()
    thread.join(20)
    assert "only the main thread may" in str(raised[0].value) and "install_signal_handlers=False" in str(raised[0].value)
    assert server.port == 0  # refused before binding anything

    def failing(s):
        raise KeyError("on_ready failed")

    server = PolicyServer(HistoryPolicy())
    with pytest.raises(KeyError, match="on_ready failed"):
        server.serve_forever(on_ready=failing)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # nothing listens there any more


def test_a_batching_window_as_long_as_the_request_timeout_is_refused(monkeypatch):
    """max_wait_ms=3000 with request_timeout_s=2: with a robot connected that did not act, every request waited out
    the window and timed out ("server overloaded or policy too slow") without reaching the policy. Refused when the
    server is built, and by `worldvla serve` before it loads the model."""
    import argparse

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    with pytest.raises(ValueError, match=r"max_wait_ms \(3000 ms, --max-wait-ms\) must be shorter than "
                                         r"request_timeout_s \(2 s, --timeout-s\)"):
        PolicyServer(HistoryPolicy(), max_wait_ms=3000, request_timeout_s=2)
    with pytest.raises(ValueError, match="must be shorter"):
        PolicyServer(HistoryPolicy(), max_wait_ms=2000, request_timeout_s=2)
    assert PolicyServer(HistoryPolicy(), max_wait_ms=1999, request_timeout_s=2).max_wait_ms == 1999.0

    loaded = []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained",
                        staticmethod(lambda *a, **k: loaded.append(k) or HistoryPolicy()))
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with pytest.raises(ValueError, match="lower --max-wait-ms or raise --timeout-s"):
        serve.run(parser.parse_args(["--checkpoint", "c", "--max-wait-ms", "70000"]))
    assert loaded == []


class StrictResetPolicy(HistoryPolicy):
    """As WorldVLAPolicy: a reset that raises ends the previous episode, and act refuses to run until a reset
    succeeds."""

    def reset(self, instructions):
        self.instructions = None
        if "refused" in instructions:
            raise ValueError("reset refused")
        self.instructions = list(instructions)

    def act(self, images, history=None):
        if self.instructions is None:
            raise ValueError("call reset() first")
        return super().act(images, history)


class StrictResetSlotPolicy(SlotPolicy):
    def reset(self, instructions):
        self.previous = []
        if "refused" in instructions:
            raise ValueError("reset refused")
        super().reset(instructions)


@pytest.mark.parametrize("policy_cls", [StrictResetPolicy, StrictResetSlotPolicy])
def test_a_policy_reset_that_failed_does_not_fail_later_requests(np_rng, policy_cls):
    """One robot's batch whose policy.reset raised left the server sure that the policy still held the instructions
    (or slots) of the call before: every later request of the robot of that call ran without a reset and failed
    ("call reset() first"), for good."""
    policy = policy_cls()
    size = policy.image_size
    with PolicyServer(policy, max_wait_ms=0) as server, _robots(server, 2) as (good, bad):
        good.act(_frame(np_rng, size, size))
        bad.reset("refused")
        with pytest.raises(PolicyServerError, match="policy failed: ValueError: reset refused"):
            bad.act(_frame(np_rng, size, size))
        for _ in range(2):
            assert good.act(_frame(np_rng, size, size)).shape == (K, D)


def test_ports_and_drain_timeouts_that_are_no_such_values_are_refused():
    """port=True bound port 1 and port=70000 gave asyncio's bare OverflowError at start; a NaN or negative
    drain_timeout_s dropped the requests in flight at once (their replies lost), and "abc" gave float()'s error."""
    for port in (True, 70000, -1, "8000", 80.0):
        with pytest.raises(ValueError, match=re.escape(f"port must be an integer from 0 to 65535 (0 picks a free "
                                                       f"one), got {port!r}")):
            PolicyServer(HistoryPolicy(), port=port)
    assert PolicyServer(HistoryPolicy(), port=np.int64(8000)).port == 8000
    assert PolicyServer(HistoryPolicy(), port=None).port == 0
    for drain in (float("nan"), -5.0, "abc", True):
        with pytest.raises(ValueError, match=re.escape(f"drain_timeout_s must be a finite number >= 0, got {drain!r}")):
            PolicyServer(HistoryPolicy(), drain_timeout_s=drain)
    assert PolicyServer(HistoryPolicy(), drain_timeout_s=0).drain_timeout_s == 0.0


def test_a_payload_limit_below_one_frame_of_the_models_size_is_refused():
    """max_payload_mb=1e-7 (0 bytes) was taken, and the server then refused every request, even a reset ("payload of
    0.00 MiB exceeds the server's limit of 0.00 MiB")."""
    for mb in (1e-7, 1e-3):
        with pytest.raises(ValueError, match=re.escape("is smaller than one frame of the model's size (24x24x3: "
                                                       "1728 bytes), so robots could not send one; raise "
                                                       "--max-payload-mb")):
            PolicyServer(HistoryPolicy(), max_payload_mb=mb)
    assert PolicyServer(HistoryPolicy(), max_payload_mb=1728 / 2**20).max_payload_bytes == 1728


def test_a_host_that_names_no_address_is_refused():
    """host=None bound every interface, then failed in `url` (TypeError) with the port left bound; host="" served
    at "ws://:PORT", an address no client can open, its IPv6 socket on another port than `server.port`."""
    import argparse

    from worldvla import serve

    for host in (None, "", " ", 8000):
        with pytest.raises(ValueError, match=re.escape(f"host must name an address, such as '127.0.0.1' (this machine "
                                                       f"only) or '0.0.0.0' (every IPv4 interface), got {host!r}")):
            PolicyServer(HistoryPolicy(), host=host)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "c", "--host", ""])
    assert parser.parse_args(["--checkpoint", "c", "--host", "0.0.0.0"]).host == "0.0.0.0"


class SlowSlotPolicy(SlotPolicy):
    delay_s = 0.0

    def act(self, images):
        time.sleep(self.delay_s)
        return super().act(images)


def test_a_slot_policy_restarts_the_history_of_a_request_that_timed_out_while_running(np_rng):
    """A policy keeping history in its slots took the frame of a request that timed out during its call (no robot
    acted on it) as the next request's previous frame; the server now resets the slots instead, as it does for any
    history it cannot keep (counted in history_resets)."""
    policy = SlowSlotPolicy()
    with PolicyServer(policy, request_timeout_s=0.5) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("stack the cups")
        first, lost, third = (_frame(np_rng, 16, 16) for _ in range(3))
        assert client.act(first)[0, 1] == -1.0
        policy.delay_s = 1.0
        with pytest.raises(PolicyServerError, match="timed out after 0.5 s"):
            client.act(lost)
        _wait_for(lambda: not server._running_batch and np.array_equal(policy.previous[0], lost))
        policy.delay_s = 0.0
        np.testing.assert_array_equal(client.act(third)[:, 1], -1.0)  # not the mean of `lost`
        assert server.stats["history_resets"] == 1
        assert client.act(first)[0, 1] == np.float32(third.astype(np.float64).mean())  # kept from here on


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading_the_model(monkeypatch):
    """A port in use (or a host that does not resolve) was found only once the model had loaded and warmed up
    (minutes for a large one): `worldvla serve` now checks the address first, with the errors the server gives."""
    import argparse

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    loaded = []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained",
                        staticmethod(lambda *a, **k: loaded.append(k) or HistoryPolicy()))
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=re.escape(f"cannot listen on 127.0.0.1:{port} (--host, --port): the port "
                                                    "is in use")):
            serve.run(parser.parse_args(["--checkpoint", "c", "--port", str(port)]))
    with pytest.raises(ValueError, match="host 'no-such-host.invalid' \\(--host\\) is no address this machine can "
                                         "resolve"):
        serve.run(parser.parse_args(["--checkpoint", "c", "--host", "no-such-host.invalid"]))
    assert loaded == []
    serve.check_address("127.0.0.1", 0)  # a free port: nothing to refuse


class EmptyChunkSlotPolicy(SlotPolicy):
    empty = False

    def act(self, images):
        out = super().act(images)
        return [chunk[:0] for chunk in out] if self.empty else out


def test_a_slot_policy_restarts_the_history_of_a_frame_answered_with_no_action(np_rng):
    """A chunk of no action (mode='release') reaches the robot as an error, its env does not step: a policy keeping
    history in its slots must not condition the next step on that frame."""
    policy = EmptyChunkSlotPolicy()
    with PolicyServer(policy) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("stack the cups")
        client.act(_frame(np_rng, 16, 16))
        policy.empty = True
        with pytest.raises(PolicyServerError, match="the model wrote no action block"):
            client.act(_frame(np_rng, 16, 16))
        policy.empty = False
        np.testing.assert_array_equal(client.act(_frame(np_rng, 16, 16))[:, 1], -1.0)
        assert server.stats["history_resets"] == 1


class TorchChunksPolicy(HistoryPolicy):
    """Answers with one bfloat16 torch tensor per image, as a policy writing chunks of different lengths may."""

    def act(self, images, history=None):
        import torch

        return [torch.from_numpy(chunk).to(torch.bfloat16) for chunk in super().act(images, history)]


def test_chunks_answered_as_a_list_of_bfloat16_tensors_are_served(np_rng):
    """A single bfloat16 tensor was served, a list of them failed every request ("policy failed: TypeError: Got
    unsupported ScalarType BFloat16")."""
    torch = pytest.importorskip("torch")
    with PolicyServer(TorchChunksPolicy()) as server, PolicyClient(server.url, timeout=20) as client:
        client.reset("wave")
        frame = _frame(np_rng)
        actions = client.act(frame)
        assert actions.dtype == np.float32 and actions.shape == (K, D)
        expected = torch.tensor(_mean(frame[None])[0], dtype=torch.float32).to(torch.bfloat16).float().item()
        np.testing.assert_array_equal(actions[:, 0], expected)
        np.testing.assert_array_equal(actions[:, 1], -1.0)


def test_warmup_is_refused_while_serving(np_rng):
    """`warmup()` while serving ran its calls on the caller's thread alongside the worker's: it reset the policy's
    instructions under robots' requests (15 overlapping policy calls in 10 acts)."""
    policy = HistoryPolicy()
    server = PolicyServer(policy)
    server.warmup()  # before serving: every padded batch size
    assert policy.calls == [1, 1, 2, 2, 4, 4, 8, 8]
    with server, PolicyClient(server.url, timeout=20) as client:
        client.reset("wave")
        with pytest.raises(RuntimeError, match=re.escape("warmup() runs before serving: call it before start()")):
            server.warmup()
        assert policy.instructions == ["warm up"] * 8  # untouched by the refused call
        assert client.act(_frame(np_rng)).shape == (K, D)


def test_metadata_of_too_many_maps_and_lists_or_of_keys_that_become_one_string_is_refused_by_to_plain():
    """`to_plain` bounded each list and map but not their count: metadata of 80,000 small lists passed it (to be
    refused by the server's own check of its reply), and keys that become the same string ({1: "a", "1": "b"})
    kept one value without a word. Both are refused by name now; a value at the client's limit passes, counted
    as the client's decoder counts it (numeric arrays nest a list for each index of every axis but the last)."""
    from worldvla.serve.protocol import to_plain

    most = REPLY_LIMITS["max_containers"]
    arrays = [np.zeros((16, 255, 1), np.float32)] * 15  # 1 + 16 + 16 * 255 lists each
    for fits in ([[] for _ in range(most - 1)], arrays + [[] for _ in range(most - 1 - 15 * 4097)]):
        plain = to_plain(fits)
        assert len(plain) == len(fits) and unpackb(packb(plain)) == plain  # exactly the limit: the client decodes it
        with pytest.raises(ProtocolError, match=rf"reply holds more than {most} maps and arrays"):
            unpackb(packb(plain + [[]]))
        with pytest.raises(ValueError, match=rf"^the policy's metadata\(\) cannot be sent to clients: reply holds "
                                             rf"more than {most} maps and arrays \(the protocol's limit"):
            to_plain(fits + [[]])
    for value, keys in (({1: "a", "1": "b"}, "map keys 1 and '1' both become the string '1'"),
                        ({"cfg": {None: 0, "None": 1}}, "map keys None and 'None' both become the string 'None'")):
        with pytest.raises(ValueError, match=re.escape(f"cannot be sent to clients: its {keys} (the protocol's maps "
                                                       "are keyed by strings); give them distinct string keys")):
            to_plain(value)
    with pytest.raises(ValueError, match="map keys 1 and '1' both become the string '1'"):
        PolicyServer(_ExtraMetadataPolicy({1: "a", "1": "b"}))
    assert to_plain({1: "a", "2": "b"}) == {"1": "a", "2": "b"}


def test_health_counts_the_episodes_held_and_the_requests_queued(np_rng):
    """The report's 'episodes' is the number of episodes the server holds (below max_episodes too: a reset adds
    one, a refused reset of one's own episode ends it), and 'queued' the requests waiting for the policy."""
    with PolicyServer(HistoryPolicy(), max_episodes=4, max_wait_ms=1.0) as server, \
            PolicyClient(server.url, timeout=10) as client:
        report = health(server.url)
        assert (report["episodes"], report["queued"], report["connections"]) == (0, 0, 1)
        client.reset("one")
        client.act(_frame(np_rng))
        kept = client.reset("two")
        assert health(server.url)["episodes"] == 2
        with pytest.raises(PolicyServerError, match="non-empty 'instruction'"):
            client.request({"type": "reset", "episode": kept, "instruction": "   "})
        report = health(server.url)
        assert (report["episodes"], report["queued"], report["stats"]["resets"]) == (1, 0, 2)
    policy = HistoryPolicy(delay_s=0.5)
    with PolicyServer(policy, max_batch=1, max_wait_ms=1.0) as server, _robots(server, 2) as (a, b):
        running = threading.Thread(target=a.act, args=(_frame(np_rng),))
        running.start()
        _wait_for(lambda: server._running_batch)
        waiting = threading.Thread(target=b.act, args=(_frame(np_rng),))
        waiting.start()
        _wait_for(lambda: health(server.url)["queued"] == 1)  # b's request, behind a's call
        running.join(10)
        waiting.join(10)
        assert health(server.url)["queued"] == 0 and policy.calls == [1, 1]


# ---------------------------------------------------------------- client: health, reply shapes, deadlines
def test_health_asks_https_for_a_wss_server_within_the_clients_timeout(monkeypatch):
    """A wss:// server reports its health over https at the same host and port, and `PolicyClient.health()` waits
    no longer than the client's own `timeout` (a robot's control loop holds to it)."""
    import io
    import urllib.request

    asked = []

    class Opener:
        def open(self, url, timeout):
            asked.append((url, timeout))
            return io.BytesIO(b'{"status": "ok"}')

    monkeypatch.setattr(urllib.request, "build_opener", lambda *handlers: Opener())
    assert health("wss://gpu-box:8443/robots") == {"status": "ok"}
    client, _ = _offline_client(monkeypatch, _FakeConnection([]), timeout=2.5)
    assert client.health() == {"status": "ok"}
    assert asked == [("https://gpu-box:8443/healthz", 10.0), ("http://robot-server:8000/healthz", 2.5)]


def test_a_reply_whose_actions_are_no_k_by_d_chunk_is_refused(monkeypatch):
    """Only a [K, D] array is an action chunk: a reply with a batch axis left on ([1, K, D]) or a flat row is an
    error, not a chunk whose rows the robot would step through as actions."""
    replies = [_echo_id({"ok": True, "actions": np.zeros(shape, np.float32)}) for shape in ((1, K, D), (K * D,))]
    client, _ = _offline_client(monkeypatch, _FakeConnection([_echo_id({"ok": True}), *replies]))
    client.reset("wave")
    for _ in replies:
        with pytest.raises(PolicyServerError, match=r"server reply has no \[K, D\] 'actions' array"):
            client.act(np.zeros((8, 8, 3), np.uint8))


def test_a_call_that_reconnects_sends_and_waits_only_for_what_is_left_of_its_timeout(monkeypatch):
    """The call's deadline starts before the reconnection: a slow reconnection leaves that much less time to send
    the request (the socket's timeout while sending) and to wait for the reply, so the call as a whole takes at
    most `timeout`, not a reconnection plus a whole `timeout`. The socket's timeout is lifted after sending: the
    connection's reader would otherwise time out on it while the robot does not call."""
    from types import SimpleNamespace

    import worldvla.serve.client as client_mod

    waits, socket_timeouts = [], []

    class Timed(_FakeConnection):
        def recv(self, timeout=None):
            waits.append(timeout)
            return super().recv(timeout)

    client, _ = _offline_client(monkeypatch, _FakeConnection([]), timeout=1.0)
    slow = Timed([_echo_id({"ok": True, "action_dim": D})])
    slow.socket = SimpleNamespace(settimeout=socket_timeouts.append)
    monkeypatch.setattr(client_mod, "_connect", lambda url, open_timeout, max_size: time.sleep(0.6) or slow)
    client._drop()  # lost: the next call reconnects, which takes 0.6 s of its 1 s
    assert client.metadata() == {"action_dim": D}
    assert len(waits) == 1 and 0 < waits[0] <= 0.4, waits
    assert len(socket_timeouts) == 2 and 0 < socket_timeouts[0] <= 0.4 and socket_timeouts[1] is None, socket_timeouts


def test_a_reconnection_cut_short_by_the_calls_timeout_is_a_timeout(monkeypatch):
    """Opening a connection with the time left of the call may give up a few milliseconds before the deadline (the
    handshake's own timer): that is the call's timeout, not a failed reconnection to report as the server's."""
    import worldvla.serve.client as client_mod

    client, _ = _offline_client(monkeypatch, _FakeConnection([]), timeout=0.3, connect_timeout=5)
    client.episode = "e"

    def gives_up_early(url, open_timeout, max_size):
        time.sleep(open_timeout - 0.005)
        raise ConnectionError("timed out during opening handshake")

    monkeypatch.setattr(client_mod, "_connect", gives_up_early)
    client._drop()
    with pytest.raises(TimeoutError, match=r"could not reconnect to ws://robot-server:8000 within the call's timeout "
                                           r"of 0.3 s \(timed out during opening handshake\)"):
        client.act(np.zeros((8, 8, 3), np.uint8))
    assert client.episode == "e"  # the episode goes on once the server answers again


def test_a_reconnection_to_a_server_that_states_no_payload_limit_drops_the_old_one(monkeypatch):
    """The payload limit is the current connection's: after reconnecting to a server that states none, the old
    server's limit no longer refuses requests before they are sent."""
    reply = _echo_id({"ok": True, "actions": np.zeros((3, 5), np.float32)})
    client, _ = _offline_client(monkeypatch, _limited("100"), _limited(None, [reply]))
    client.episode = "e"
    client._drop()  # lost: the next call reconnects, to a server that states no limit
    assert client.act(np.zeros((8, 8, 3), np.uint8)).shape == (3, 5)
    assert client.max_payload_bytes is None and len(client._ws.sent) == 1


def test_arrays_in_fortran_order_or_transposed_travel_with_their_values():
    """An array is sent as C-order bytes whatever its memory layout: a frame in Fortran order (from a library that
    keeps images column-major) or a transposed chunk arrives with the values at the same indices."""
    frame = np.asfortranarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    chunk = np.arange(15, dtype=np.float32).reshape(5, 3).T
    assert frame.flags.f_contiguous and chunk.flags.f_contiguous
    got = unpackb(packb({"image": frame, "actions": chunk}))
    assert got["image"].shape == (4, 5, 3) and got["actions"].shape == (3, 5)
    np.testing.assert_array_equal(got["image"], frame)
    np.testing.assert_array_equal(got["actions"], chunk)


def test_frames_of_another_one_byte_dtype_are_refused():
    """Only uint8 is an RGB frame: int8 (values from -128) or bool frames are refused naming the dtype, not taken
    for one because they too have one byte a number."""
    from worldvla.serve.protocol import check_image

    for dtype in (np.int8, np.bool_):
        with pytest.raises(ProtocolError, match=rf"^'image' must have dtype uint8, got {np.dtype(dtype)}; send RGB "
                                                r"frames as uint8 0\.\.255$"):
            check_image(np.zeros((4, 4, 3), dtype))


def test_a_reply_whose_actions_are_not_floating_point_is_refused_naming_the_dtype(monkeypatch):
    """`act` returns float32 chunks: a reply of whole numbers or booleans is refused naming its dtype (a robot would
    step through them as if they were actions), and float64 or float16 chunks come back as float32 with their
    values."""
    chunk = np.arange(K * D, dtype=np.float64).reshape(K, D) / 7
    replies = [_echo_id({"ok": True, "actions": np.zeros((K, D), dtype)}) for dtype in (np.int64, np.uint8, np.bool_)]
    floats = [_echo_id({"ok": True, "actions": chunk.astype(dtype)}) for dtype in (np.float64, np.float16)]
    client, _ = _offline_client(monkeypatch, _FakeConnection([_echo_id({"ok": True}), *replies, *floats]))
    client.reset("wave")
    for dtype in ("int64", "uint8", "bool"):
        with pytest.raises(PolicyServerError, match=rf"server reply's 'actions' have dtype {dtype}, not floating point"):
            client.act(np.zeros((8, 8, 3), np.uint8))
    for dtype in (np.float64, np.float16):
        got = client.act(np.zeros((8, 8, 3), np.uint8))
        assert got.dtype == np.float32 and got.shape == (K, D) and got.flags.writeable
        np.testing.assert_array_equal(got, chunk.astype(dtype).astype(np.float32))


def test_a_reply_whose_actions_are_not_finite_is_refused_naming_the_first(monkeypatch):
    """A chunk holding NaN or inf, or a float64 value past float32's range (which the cast would make inf), is
    refused with the count and the first place: a robot must not be handed a command it cannot execute. The
    largest finite float32 passes."""
    big = float(np.finfo(np.float32).max)
    chunks = []
    for value, dtype in ((np.nan, np.float32), (-np.inf, np.float16), (1e39, np.float64), (big, np.float64)):
        chunk = np.full((K, D), 0.25, dtype)
        chunk[1, 2] = chunk[K - 1, 0] = value
        chunks.append(chunk)
    client, _ = _offline_client(monkeypatch, _FakeConnection(
        [_echo_id({"ok": True}), *(_echo_id({"ok": True, "actions": c}) for c in chunks)]))
    client.reset("wave")
    for first in ("nan", "-inf", "inf"):
        with pytest.raises(PolicyServerError, match=rf"^server reply's 'actions' hold 2 value\(s\) that are not "
                                                    rf"finite as float32, the first {first} at \[1, 2\]: "):
            client.act(np.zeros((8, 8, 3), np.uint8))
    got = client.act(np.zeros((8, 8, 3), np.uint8))
    assert got[1, 2] == got[K - 1, 0] == big and got.dtype == np.float32


# ---------------------------------------------------------------- replies: error texts, timing, health
def test_unknown_field_names_are_shown_whole_up_to_40_characters_and_listed_up_to_eight():
    """A field name of 40 characters is shown whole and one of 41 cut short; eight unknown fields are all listed,
    a ninth is counted ('and 1 more') rather than listed."""
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        reply = _ask(ws, packb({"type": "metadata", "a" * 40: 1, "b" * 41: 2}))
        assert reply["error"].startswith(f"unknown fields '{'a' * 40}', '{'b' * 40}'... (41 characters) in a "
                                         "'metadata' request; "), reply["error"]
        eight = {f"x{i}": i for i in range(8)}
        reply = _ask(ws, packb({"type": "metadata", **eight}))
        listed = ", ".join(repr(k) for k in eight)
        assert reply["error"].startswith(f"unknown fields {listed} in a 'metadata' request; "), reply["error"]
        reply = _ask(ws, packb({"type": "metadata", **eight, "x8": 8}))
        assert reply["error"].startswith(f"unknown fields {listed} and 1 more in a 'metadata' request; "), \
            reply["error"]


def test_a_payload_over_the_limit_is_named_in_mebibytes():
    """The refusal of a request over --max-payload-mb states both sizes in MiB (2**20 bytes), the unit of the
    option."""
    overhead = len(packb({"type": "metadata", "pad": b"\0" * 2**17})) - 2**17
    request = packb({"type": "metadata", "pad": b"\0" * (3 * 2**19 - overhead)})
    assert len(request) == 3 * 2**19
    with PolicyServer(HistoryPolicy(), max_payload_mb=1.0) as server, _raw(server.url) as ws:
        assert _ask(ws, request)["error"] == ("payload of 1.50 MiB exceeds the server's limit of 1.00 MiB "
                                              "(--max-payload-mb); send smaller frames")


def test_the_parts_of_a_requests_timing_add_up_to_its_server_time(np_rng, monkeypatch):
    """'preprocess_ms' is the time from the request's arrival until its frame was ready (a resize), 'queue_ms' the
    wait for the policy after that, 'policy_ms' the call: together no more than 'server_ms', arrival to reply."""

    def parts(t):
        return t["preprocess_ms"] + t["queue_ms"] + t["policy_ms"]

    with PolicyServer(HistoryPolicy(delay_s=0.3), max_batch=1, max_wait_ms=1.0) as server, \
            _robots(server, 2) as (a, b):
        resize = server._resize_pair
        monkeypatch.setattr(server, "_resize_pair", lambda image, previous: time.sleep(0.25) or resize(image, previous))
        a.act(_frame(np_rng, 32, 32))  # resized: a slow preprocess
        t = a.last_timing
        assert t["preprocess_ms"] >= 250 and parts(t) <= t["server_ms"] + 0.01, t
        _together(lambda c: c.act(_frame(np_rng)), [(a,), (b,)])  # one waits for the other's call: a long queue
        timings = [a.last_timing, b.last_timing]
        assert max(t["queue_ms"] for t in timings) >= 200, timings
        assert all(t["preprocess_ms"] < 100 and parts(t) <= t["server_ms"] + 0.01 for t in timings), timings


def test_health_reports_the_uptime_in_seconds():
    t0 = time.monotonic()
    with PolicyServer(HistoryPolicy()) as server:
        time.sleep(0.05)
        uptime = health(server.url)["uptime_s"]
        assert 0.05 <= uptime <= time.monotonic() - t0 + 0.001, uptime  # rounded to milliseconds



def test_a_client_cut_off_for_not_reading_does_not_hold_the_shutdown():
    """The connection of a client that has not read its replies for the request timeout is dropped then, not left
    to a closing handshake the client cannot take part in: a shutdown right after does not wait for it."""
    server = PolicyServer(BulkyMetadataPolicy(), request_timeout_s=0.5).start_background()
    sock = _never_reading_client(server.port, 40)
    try:
        _wait_for(lambda: _robot_handlers(server) == 1)
        _wait_for(lambda: server.health()["connections"] == 0, timeout=5)  # cut off
        thread, t0 = server._thread, time.monotonic()
        server.stop_background(timeout=10)
        assert not thread.is_alive() and time.monotonic() - t0 < 2, time.monotonic() - t0
    finally:
        sock.close()
        server.stop_background()


class RecordingPolicy(HistoryPolicy):
    """Keeps the frames and instructions of every act call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list = []

    def act(self, images, history=None):
        self.seen.append((images.copy(), list(self.instructions)))
        return super().act(images, history)


def test_the_padding_rows_of_a_batch_repeat_its_last_request(np_rng):
    """Three robots batched with max_batch=4: the policy gets four rows, the fourth the third's frame and
    instruction again."""
    policy = RecordingPolicy()
    with PolicyServer(policy, max_batch=4, max_wait_ms=3000, request_timeout_s=20) as server, \
            _robots(server, 3) as clients:
        _together(lambda c: c.act(_frame(np_rng)), [(c,) for c in clients])
    assert policy.calls == [4]
    (images, instructions), = policy.seen
    assert len({images[i].tobytes() for i in range(3)}) == 3 and sorted(instructions[:3]) == ["robot 0", "robot 1",
                                                                                               "robot 2"]
    np.testing.assert_array_equal(images[3], images[2])
    assert instructions[3] == instructions[2]


# ---------------------------------------------------------------- client: urls, limits, handshakes and replies
def test_a_wss_url_is_taken_and_opened_as_given(monkeypatch):
    """A server behind TLS is reached at its wss:// url: the client opens that url, path included."""
    import worldvla.serve.client as client_mod

    opened = []
    monkeypatch.setattr(client_mod, "_connect", lambda url, open_timeout, max_size: opened.append(url)
                        or _FakeConnection([]))
    client = PolicyClient("wss://gpu-box:8443/robots")
    assert opened == ["wss://gpu-box:8443/robots"] and client.url == "wss://gpu-box:8443/robots"


def test_infinite_timeouts_and_reply_limits_are_refused():
    """A timeout or reply limit of inf is no finite number: refused at construction, before connecting."""
    for name in ("timeout", "connect_timeout", "max_reply_mb"):
        for value in (float("inf"), np.float64("inf")):
            with pytest.raises(ValueError,
                               match=rf"^{name} must be a finite number of \w+ > 0, got (np\.float64\()?inf"):
                PolicyClient("ws://127.0.0.1:1", **{name: value})


def test_the_constructors_metadata_request_waits_up_to_the_call_timeout(monkeypatch):
    """A server that states no protocol version is asked for its metadata as the client is built: that request
    waits for its reply up to `timeout`, as every request does; `connect_timeout` bounds only the opening."""
    waits = []

    class Timed(_FakeConnection):
        def recv(self, timeout=None):
            waits.append(timeout)
            return super().recv(timeout)

    ws = Timed([_echo_id({"ok": True, "protocol": 1})], header=None)
    _offline_client(monkeypatch, ws, timeout=30, connect_timeout=1)
    assert len(waits) == 1 and 29 < waits[0] <= 30, waits


def test_a_server_that_states_no_version_and_refuses_its_metadata_request_is_named(monkeypatch):
    """An older server that refuses the metadata request asked at the handshake is reported as refusing it, with
    its message (or none), not as a server of protocol None; that connection is closed."""
    for reply, shown in (({"ok": False, "error": "busy"}, "busy"), ({"ok": False}, "no message"),
                         ({"protocol": 1}, "no message")):
        ws = _FakeConnection([_echo_id(reply)], header=None)
        with pytest.raises(PolicyServerError, match=rf"^the server at ws://robot-server:8000 refused a metadata "
                                                    rf"request: {shown}$"):
            _offline_client(monkeypatch, ws)
        assert [m["type"] for m in ws.sent] == ["metadata"] and ws.closed


def test_a_reply_that_is_no_map_is_refused_naming_its_type(monkeypatch):
    """Something that answers a request with a list or a number, not a map, is a PolicyServerError naming what
    came, not an AttributeError from looking up its fields."""
    ws = _FakeConnection([[1, 2], 7, _echo_id({"ok": True, "action_dim": D})])
    client, _ = _offline_client(monkeypatch, ws)
    for shown in ("list", "int"):
        with pytest.raises(PolicyServerError, match=rf"^server sent a reply that is not a map: {shown}$"):
            client.metadata()
    assert client.metadata() == {"action_dim": D}


def test_a_connection_closed_with_another_code_is_named_with_its_code_and_reason(monkeypatch):
    """A close other than the server's shutdown or a message over a limit names the url, the code and the reason
    the server gave (none when it gave none); a connection lost without any closing handshake (no close received,
    none or another one sent) is no reply over the client's limit."""
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    closes = [(Close(1011, "policy crashed"), Close(1011, "policy crashed"), "1011, policy crashed"),
              (Close(1000, ""), Close(1000, ""), "1000"), (None, None, "None"), (None, Close(1000, "bye"), "None")]

    def closing(rcvd, sent):
        def reply(request):
            raise ConnectionClosed(rcvd, sent, True if rcvd and sent else None)
        return reply

    connections = [_FakeConnection([closing(rcvd, sent)]) for rcvd, sent, _ in closes]
    client, opened = _offline_client(monkeypatch, *connections)
    for _, _, shown in closes:  # each on a new connection
        with pytest.raises(PolicyServerError, match=rf"^connection to ws://robot-server:8000 closed \(code {shown}\)$"):
            client.metadata()
        assert client._ws is None
    assert len(opened) == len(closes)


def test_last_timing_is_the_latest_chunks_own(monkeypatch):
    """`last_timing` is the timing of the reply to the latest act: a reply that states none leaves None there,
    not the timing of an earlier chunk."""
    chunk = np.zeros((K, D), np.float32)
    ws = _FakeConnection([_echo_id({"ok": True}),
                          _echo_id({"ok": True, "actions": chunk, "timing": {"server_ms": 4.5}}),
                          _echo_id({"ok": True, "actions": chunk})])
    client, _ = _offline_client(monkeypatch, ws)
    client.reset("wave")
    assert client.last_timing is None
    client.act(np.zeros((8, 8, 3), np.uint8))
    assert client.last_timing == {"server_ms": 4.5}
    client.act(np.zeros((8, 8, 3), np.uint8))
    assert client.last_timing is None


def test_an_http_error_other_than_503_without_a_version_is_no_policy_server(monkeypatch):
    """A refusal with another HTTP status (a gateway's 502, a server error) and no protocol header comes from
    something other than a policy server: the client says it did not answer as one, not that it refused."""
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response
    from websockets.sync import client as ws_client

    for status in (500, 502, 504):
        def refuse(url, status=status, **kw):
            raise InvalidStatus(Response(status, "Error", Headers(), b"upstream down"))

        monkeypatch.setattr(ws_client, "connect", refuse)
        with pytest.raises(ConnectionError, match=rf"^ws://127\.0\.0\.1:9 did not answer as a WebSocket server "
                                                  rf"\(InvalidStatus: .*{status}"):
            PolicyClient("ws://127.0.0.1:9")


def test_a_handshake_stating_two_protocol_versions_is_another_protocol(monkeypatch):
    """The version is every protocol header the server sent, joined: one that states '1' and '2' is not taken for
    a server of protocol 1."""
    ws = _FakeConnection([])
    ws.response.headers["WorldVLA-Protocol"] = "2"
    assert ws.response.headers.get_all("WorldVLA-Protocol") == ["1", "2"]
    with pytest.raises(PolicyServerError, match=r"speaks protocol '1, 2', this PolicyClient protocol 1"):
        _offline_client(monkeypatch, ws)
    assert ws.sent == [] and ws.closed


def test_each_request_carries_a_new_id_and_a_reply_to_an_earlier_one_is_skipped(monkeypatch):
    """Request ids count up from 1 over the client's life, so that a late reply carrying the id of an earlier
    request is never taken for the current one's."""
    ws = _FakeConnection([_echo_id({"ok": True, "action_dim": 1}), {"ok": True, "id": 1, "action_dim": 1},
                          _echo_id({"ok": True, "action_dim": 2}), _echo_id({"ok": True, "action_dim": 3})])
    client, _ = _offline_client(monkeypatch, ws)
    assert [client.metadata()["action_dim"] for _ in range(3)] == [1, 2, 3]
    assert [m["id"] for m in ws.sent] == [1, 2, 3]


def test_a_payload_limit_header_of_superscript_digits_states_no_limit(monkeypatch):
    """Superscript digits, which str.isdigit takes but int does not, state no limit: the client connects as a
    client of a server without the header does, rather than failing in its constructor."""
    for value in ("\u00b2", "1\u00b3", "\u00b9\u00b2"):
        client, _ = _offline_client(monkeypatch, _limited(value))
        assert client.max_payload_bytes is None, value


def test_a_refusal_at_the_connection_limit_gives_the_servers_reason_without_its_line_break(monkeypatch):
    """The reason a server at --max-connections sends ends with a line break: the error ends with the reason's
    last word, the line break stripped."""
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response
    from websockets.sync import client as ws_client

    def refuse(url, **kw):
        raise InvalidStatus(Response(503, "Service Unavailable", Headers({"WorldVLA-Protocol": "1"}),
                                     b"  4 connections open (--max-connections)\r\n"))

    monkeypatch.setattr(ws_client, "connect", refuse)
    with pytest.raises(ConnectionError) as refused:
        PolicyClient("ws://127.0.0.1:9")
    assert str(refused.value) == ("the policy server at ws://127.0.0.1:9 refused the connection: 4 connections open "
                                  "(--max-connections)")


def test_a_close_for_a_message_too_big_without_a_reason_names_its_code(monkeypatch):
    """The server's 1009 close may carry no reason: the error names the code instead of an empty pair of
    parentheses."""
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    def too_big(request):
        raise ConnectionClosed(Close(1009, ""), Close(1009, ""), True)

    client, _ = _offline_client(monkeypatch, _FakeConnection([too_big]))
    with pytest.raises(PolicyServerError, match=r"^the server closed the connection: message too big \(code 1009\); "
                                                r"the request exceeds its payload limit"):
        client.metadata()


def test_a_dropped_client_closes_its_connection_without_waiting_long_for_the_server(monkeypatch):
    """A client dropped without close() closes its connection, waiting at most 0.2 s for the server's side of the
    closing handshake (a server gone silent would hold the caller for the connection's own 5 s)."""
    client, _ = _offline_client(monkeypatch, ws := _FakeConnection([]))
    del client
    gc.collect()
    assert ws.closed and ws.close_timeout == 0.2


def test_a_client_refused_at_the_handshake_closes_its_connection_while_the_error_is_kept(monkeypatch):
    """A constructor that fails its protocol check closes the connection itself: a caller that keeps the error
    (its traceback holds the half-built client) does not keep a connection to the server open."""
    for ws in (_FakeConnection([], header="2"), _FakeConnection([_echo_id({"ok": False})], header=None)):
        kept = None
        try:
            _offline_client(monkeypatch, ws)
        except PolicyServerError as e:
            kept = e
        assert kept is not None and kept.__traceback__ is not None
        assert ws.closed and ws.close_timeout == 0.2


def _serve_parser():
    import argparse

    from worldvla import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser


def test_serve_defaults_are_the_limits_its_help_states(monkeypatch):
    """`worldvla serve --checkpoint c` alone: 8 requests a batch, a 5 ms wait, 64 queued, 16 MiB requests, a 60 s
    timeout, 256 episodes, a 5 s keepalive, 64 connections, padded batches, warm-up on; and those reach the server."""
    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    args = _serve_parser().parse_args(["--checkpoint", "c"])
    assert (args.host, args.port, args.device, args.dtype, args.mode) == ("127.0.0.1", 8000, None, None, None)
    assert (args.max_batch, args.max_wait_ms, args.max_queue, args.max_payload_mb, args.timeout_s, args.max_episodes,
            args.keepalive_s, args.max_connections) == (8, 5.0, 64, 16.0, 60.0, 256, 5.0, 64)
    assert args.no_pad_batches is False and args.no_warmup is False
    built = []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained", staticmethod(lambda *a, **k: HistoryPolicy()))
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, **k: built.append(self) or 0)
    args.port, args.no_warmup = 0, True
    assert serve.run(args) == 0
    s = built[0]
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.max_payload_bytes, s.request_timeout_s, s.max_episodes) == \
        (8, 5.0, 64, 16 * 2**20, 60.0, 256)
    assert (s.keepalive_s, s.max_connections, s.pad_batches) == (5.0, 64, True)


def test_a_blank_host_is_refused_naming_the_addresses_to_give(capsys):
    """`--host " "` (a variable holding a space) would bind every interface under asyncio: refused like an empty one."""
    parser = _serve_parser()
    for host in ("", " ", "\t"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--checkpoint", "c", "--host", host])
        assert e.value.code == 2
        assert "give an address: 127.0.0.1 (this machine only) or 0.0.0.0" in capsys.readouterr().err


def test_serve_without_the_policy_module_says_why_and_exits_2(monkeypatch, capsys):
    """A policy module that cannot be imported is one line on stderr giving the import error, and exit status 2."""
    from worldvla import serve

    monkeypatch.setitem(sys.modules, "worldvla.inference.policy", None)
    assert serve.run(_serve_parser().parse_args(["--checkpoint", "c", "--port", "0", "--no-warmup"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldvla serve: cannot import WorldVLAPolicy (") and "worldvla.inference.policy" in err, err
    assert len(err.splitlines()) == 1


def test_serve_hands_on_the_dtype_and_the_servers_exit_status_and_quiets_websockets(monkeypatch, capsys):
    """--dtype reaches from_pretrained; the exit status is the server's (1 when a policy call outlived the drain);
    a policy without `metadata()` gets the address line alone; the websockets library logs warnings only (not a
    line per connection)."""
    import logging

    from worldvla import serve
    from worldvla.inference import policy as policy_mod

    loaded = []
    monkeypatch.setattr(policy_mod.WorldVLAPolicy, "from_pretrained",
                        staticmethod(lambda *a, **k: loaded.append((a, k)) or HistoryPolicy()))
    monkeypatch.setattr(PolicyServer, "serve_forever", lambda self, on_ready=None, **k: on_ready(self) or 1)
    monkeypatch.setattr(PolicyServer, "url", "ws://127.0.0.1:9")
    ws_logger = logging.getLogger("websockets")
    level = ws_logger.level
    ws_logger.setLevel(logging.NOTSET)
    try:
        assert serve.run(_serve_parser().parse_args(["--checkpoint", "ck", "--port", "0", "--no-warmup", "--dtype",
                                                     "bf16"])) == 1
        assert ws_logger.level == logging.WARNING
    finally:
        ws_logger.setLevel(level)
    assert loaded == [(("ck",), {"device": None, "dtype": "bf16"})]
    assert capsys.readouterr().out.splitlines() == [
        "worldvla serve: listening on ws://127.0.0.1:9 (health: http://127.0.0.1:9/healthz)"]
