"""The policy server at its edges: what it logs when it refuses or drops a connection, evicts an episode, fails
a policy call or stops; the /healthz response's type; the ids and reasons of its refusals; the order in which
queued robots are served; what a shutting-down server refuses; a request whose connection closed before it was
queued.

All traffic stays on 127.0.0.1 with ports picked by the OS."""
from __future__ import annotations

import logging
import re
import threading

import numpy as np
import pytest

from worldvla.serve import PolicyClient, PolicyServer, PolicyServerError, packb
from worldvla.serve.protocol import PROTOCOL_HEADER

from test_serve import (BulkyMetadataPolicy, HistoryPolicy, RecordingPolicy, _SilentProxy, _ask, _frame,
                        _hold_resizes, _never_reading_client, _raw, _robots, _wait_for)

LOGGER = "worldvla.serve"


def _messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


def test_refused_handshakes_are_logged_with_the_clients_address_and_the_reason(caplog):
    """A handshake refused for another protocol version, or at the connection limit, leaves a warning naming
    the client's address and why: the robot sees the reason, the operator reads it in the server's log."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    caplog.set_level(logging.INFO, logger=LOGGER)
    with PolicyServer(HistoryPolicy(), max_connections=1) as server:
        with pytest.raises(InvalidStatus):
            connect(server.url, proxy=None, additional_headers={PROTOCOL_HEADER: "7"})
        with PolicyClient(server.url, timeout=10):
            _wait_for(lambda: server.health()["connections"] == 1)
            with pytest.raises(ConnectionError, match="1 connections open"):
                PolicyClient(server.url, timeout=10)
    warnings = _messages(caplog)
    assert any(m.startswith("refused a connection from ('127.0.0.1', ") and
               m.endswith("its client speaks protocol 7") for m in warnings), warnings
    assert any(m.startswith("refused a connection from ('127.0.0.1', ") and
               m.endswith(": 1 connections are open, the limit") for m in warnings), warnings


def test_an_evicted_episode_is_logged_by_its_id(caplog):
    """Episodes beyond --max-episodes are dropped least recently used first; each one dropped is logged by its
    id with the limit, so a robot later told 'unknown episode' can be traced."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    with PolicyServer(HistoryPolicy(), max_episodes=2) as server, PolicyClient(server.url, timeout=10) as client:
        for episode in ("first", "second", "third"):
            client.reset("stack the cups", episode=episode)
        assert server.stats["evicted_episodes"] == 1
    assert "episode 'first' evicted (more than 2 episodes)" in _messages(caplog, logging.INFO)
    assert not any("'second' evicted" in m or "'third' evicted" in m for m in _messages(caplog, logging.INFO))


def test_a_client_that_never_reads_is_logged_when_it_is_dropped(caplog):
    """A connection cut off for not reading its replies is logged with its address and the timeout."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with PolicyServer(BulkyMetadataPolicy(), request_timeout_s=0.5) as server:
        sock = _never_reading_client(server.port, 40)
        try:
            _wait_for(lambda: any("has not read its replies" in m for m in _messages(caplog)), timeout=5)
        finally:
            sock.close()
    dropped = [m for m in _messages(caplog) if "has not read its replies" in m]
    assert len(dropped) == 1 and dropped[0].startswith("dropping the connection from ('127.0.0.1', ") and \
        dropped[0].endswith("): it has not read its replies for 0.5 s"), dropped


def test_shutdown_logs_the_requests_left_unanswered_and_the_final_stats(caplog):
    """A shutdown that reaches its drain timeout with a reply still unsent says how many requests it left;
    every shutdown logs the server's counters last."""
    import json

    caplog.set_level(logging.INFO, logger=LOGGER)
    server = PolicyServer(BulkyMetadataPolicy(), request_timeout_s=30, drain_timeout_s=0.5).start_background()
    sock = _never_reading_client(server.port, 40)
    try:
        _wait_for(lambda: server._busy == 1)  # stuck sending a reply
        server.stop_background(timeout=5)
    finally:
        sock.close()
        server.stop_background()
    infos = _messages(caplog, logging.INFO)
    assert "shutting down with 1 requests unanswered after 0.5 s" in infos, infos
    stopped = [m for m in infos if m.startswith("server stopped: ")]
    assert len(stopped) == 1 and infos[-1] == stopped[0], infos
    stats = json.loads(stopped[0][len("server stopped: "):])
    assert stats == server.stats and stats["resets"] == 1


def test_a_failed_policy_call_is_logged_with_its_traceback_and_batch_size(np_rng, caplog):
    """A policy that raises is logged with the size of the batch that failed and the policy's own traceback,
    while the robot gets the error in its reply."""
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with PolicyServer(HistoryPolicy(fail_on="explode")) as server, PolicyClient(server.url, timeout=10) as client:
        client.reset("explode")
        with pytest.raises(PolicyServerError, match="policy failed: RuntimeError: boom"):
            client.act(_frame(np_rng))
    failed = [r for r in caplog.records if r.name == LOGGER and r.getMessage() == "policy call failed for a batch of 1"]
    assert len(failed) == 1 and failed[0].exc_info is not None and failed[0].exc_info[0] is RuntimeError


def test_healthz_answers_json_with_one_content_type():
    """/healthz is an HTTP report for load balancers and monitors: its body is the health JSON and it says so in
    a single Content-Type header, not websockets' text/plain (nor both)."""
    import http.client
    import json

    with PolicyServer(HistoryPolicy()) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            assert response.headers.get_all("Content-Type") == ["application/json"]
            report = json.loads(body)
            assert report["status"] == "ok" and report["connections"] == 0 and body.endswith(b"\n")
        finally:
            conn.close()


def test_an_internal_error_reply_echoes_the_request_id_and_is_logged(monkeypatch, caplog):
    """A request that fails inside the server gets an 'internal server error' reply carrying its id (a client
    matches replies by id), counts as an error, and is logged with its traceback."""
    caplog.set_level(logging.ERROR, logger=LOGGER)
    with PolicyServer(HistoryPolicy()) as server, _raw(server.url) as ws:
        def broken():
            raise KeyError("image_size")

        monkeypatch.setattr(server, "metadata", broken)
        reply = _ask(ws, packb({"type": "metadata", "id": "m-7"}))
        assert reply == {"ok": False, "error": "internal server error: KeyError: 'image_size'", "id": "m-7"}, reply
        assert server.stats["errors"] == 1
    logged = [r for r in caplog.records
              if r.name == LOGGER and r.getMessage() == "internal error while handling a request"]
    assert len(logged) == 1 and logged[0].exc_info[0] is KeyError


def test_the_refusal_of_another_connections_episode_says_when_a_silent_owner_is_dropped():
    """While the owner answers its keepalive pings (none unanswered), the refusal bounds the wait by two
    keepalive periods: a silent owner is pinged within keepalive_s and dropped keepalive_s later."""
    with PolicyServer(HistoryPolicy(), keepalive_s=30.0) as server, _raw(server.url) as owner, \
            _raw(server.url) as other:
        assert _ask(owner, packb({"type": "reset", "episode": 3, "instruction": "wipe"}))["ok"]
        reply = _ask(other, packb({"type": "reset", "episode": 3, "instruction": "pour"}))
        assert not reply["ok"] and ("the server drops it within 60.0 s if it has gone silent (keepalive pings every "
                                    "30 s, --keepalive-s): retry then, or reset under a new episode id") in \
            reply["error"], reply
        assert server._episodes[3].instruction == "wipe"


def test_the_refusal_counts_down_from_an_unanswered_keepalive_ping():
    """Once the owner has left a keepalive ping unanswered (its network went silent), it is dropped keepalive_s
    after that ping was sent: the refusal names that nearer bound, not two full keepalive periods."""
    with PolicyServer(HistoryPolicy(), keepalive_s=2.0) as server:
        proxy = _SilentProxy(server.port)
        arm = None
        try:
            arm = PolicyClient(f"ws://127.0.0.1:{proxy.port}", timeout=20)
            arm.reset("pick", episode="arm-1")
            proxy.silent.set()

            def unanswered():
                return any(not waiter.done() for c in list(server._open)
                           for waiter, _ in list(c.ws.pending_pings.values()))

            _wait_for(unanswered, timeout=5)
            with _raw(server.url) as other:
                reply = _ask(other, packb({"type": "reset", "episode": "arm-1", "instruction": "place"}))
            assert not reply["ok"], reply
            within = float(re.search(r"drops it within (\d+\.\d) s if it has gone silent", reply["error"]).group(1))
            assert within <= 2.0, reply["error"]
        finally:
            proxy.close()
            if arm is not None:
                arm.close()


def _act_in_thread(client, frame, replies: dict, key):
    def run():
        try:
            replies[key] = client.act(frame)
        except PolicyServerError as e:
            replies[key] = str(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_requests_queued_behind_a_running_call_are_served_in_arrival_order(np_rng):
    """With one request a call, robots whose requests arrive while the policy runs are served first come,
    first served: the robot that asked first is not overtaken by one that asked later."""
    policy = RecordingPolicy(delay_s=0.3)
    with PolicyServer(policy, max_batch=1, max_wait_ms=0) as server, _robots(server, 3) as robots:
        replies: dict = {}
        threads = [_act_in_thread(robots[0], _frame(np_rng), replies, 0)]
        _wait_for(lambda: len(policy.seen) == 1)  # robot 0's call runs
        for i in (1, 2):
            threads.append(_act_in_thread(robots[i], _frame(np_rng), replies, i))
            _wait_for(lambda: server._queue.qsize() == i)  # queued behind it, in this order
        for t in threads:
            t.join(20)
        assert all(isinstance(replies[i], np.ndarray) for i in range(3)), replies
        assert [instructions for _, instructions in policy.seen] == [["robot 0"], ["robot 1"], ["robot 2"]]


def test_a_shutting_down_server_refuses_new_work_while_it_finishes_a_running_call(np_rng):
    """Once shutdown begins, the request in flight is answered, while a new reset from another robot is refused
    with the reason and /healthz answers 503 'draining'."""
    import http.client
    import json

    policy = RecordingPolicy(delay_s=1.0)
    server = PolicyServer(policy, max_wait_ms=0).start_background()
    try:
        with _robots(server, 1) as (robot,), _raw(server.url) as other:
            replies: dict = {}
            thread = _act_in_thread(robot, _frame(np_rng), replies, "robot")
            _wait_for(lambda: len(policy.seen) == 1)  # the call runs
            server.request_stop()
            _wait_for(lambda: server._closed)
            reply = _ask(other, packb({"type": "reset", "episode": "late", "instruction": "wave"}))
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            status, report = response.status, json.loads(response.read())
            conn.close()
            thread.join(20)
            assert reply == {"ok": False, "error": "server is shutting down; connect to another server"}, reply
            assert (status, report["status"]) == (503, "draining")
            assert isinstance(replies["robot"], np.ndarray) and "late" not in server._episodes
    finally:
        server.stop_background(timeout=10)


def test_a_request_whose_connection_closed_during_its_resize_takes_no_place_in_the_queue(np_rng, monkeypatch):
    """A robot that disconnects while its frame is resized is answered 'connection closed' before its request
    is queued: with the queue full it is no busy rejection, and the queued robot is served."""
    policy = RecordingPolicy(delay_s=1.5)  # long enough to fill the queue and disconnect while it runs
    with PolicyServer(policy, max_batch=1, max_queue=1, max_wait_ms=0, request_timeout_s=20) as server, \
            _robots(server, 2) as (running, queued):
        started, release = _hold_resizes(server, monkeypatch)
        replies: dict = {}
        try:
            threads = [_act_in_thread(running, _frame(np_rng), replies, "running")]
            _wait_for(lambda: len(policy.seen) == 1)  # the policy runs the first request
            threads.append(_act_in_thread(queued, _frame(np_rng), replies, "queued"))  # the model's size: no resize
            _wait_for(lambda: server._queue.qsize() == 1)  # the queue is full
            with _raw(server.url) as gone:
                assert _ask(gone, packb({"type": "reset", "episode": "gone", "instruction": "leave"}))["ok"]
                gone.send(packb({"type": "act", "episode": "gone", "image": _frame(np_rng, 32, 32)}))
                assert started.wait(10)  # its frame is being resized
            _wait_for(lambda: any(c.closed.done() for c in list(server._open)))
        finally:
            release.set()
        for t in threads:
            t.join(20)
        _wait_for(lambda: server.health()["connections"] == 2)
        assert all(isinstance(replies[k], np.ndarray) for k in ("running", "queued")), replies
        assert server.stats["busy_rejections"] == 0 and server.stats["act_ok"] == 2, server.stats
        assert [i for _, i in policy.seen] == [["robot 0"], ["robot 1"]]
