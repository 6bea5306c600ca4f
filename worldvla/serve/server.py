"""The policy server: many robots, one policy, batched calls.

Each connection reads requests one at a time and answers each in order. `act`
requests from all connections go into one bounded queue; a single batching task
takes the first waiting request, collects more for at most `max_wait_ms` (or until
`max_batch`), and runs them as one `policy.act` call on a dedicated worker thread, so
the event loop keeps answering health checks, metadata and bad requests while the
model computes. Requests that arrive during a call wait for the next one, which is
where most batching happens under load. The server never waits when every robot's
connection (one that has sent 'reset' or 'act') already has a request in the batch: a
lone robot pays no batching delay, whatever monitors are connected (a connection that
resets episodes but never acts still counts as a robot's; one that has stopped answering
the keepalive pings, a robot whose network went silent, no longer does).

What the server needs from a policy (duck-typed; `WorldVLAPolicy` is one):
  * `reset(instructions: list[str])` and `act(images: uint8 [N, H, W, 3]) -> [N, K, D]`;
  * `image_size` (int or (H, W)), `chunk_size`, `action_dim` as attributes or in
    `metadata()`, which should return a plain dict describing the model.

Per-episode history. The server keeps one slot per episode: its instruction and the
last frame it was sent (the "previous image" of the release's two-frame prompt). An
episode belongs to the connection that reset it: another open connection using the same
id is refused, and may take the episode over once that connection has closed, or has
not answered the keepalive pings (`keepalive_s`; a robot reconnecting goes on with its
episode).
  * If `act` takes a `history` argument (frames of the previous step, same shape as
    `images`, or None on an episode's first query), the server passes each episode's
    previous frame explicitly, so any mix of episodes can share a batch. A request may
    carry `previous_image` (the frame of the previous env step, which is what the
    release conditions on); otherwise the frame of the episode's previous `act`
    request is used.
  * Otherwise the policy holds history in its own batch slots: the server calls
    `policy.reset` whenever the set of episodes in a batch changes, or after a call whose
    answer did not reach a robot (timed out), which restarts those episodes' history
    (counted in `stats["history_resets"]`). One robot, or
    robots stepping in lockstep, keep their history.
"""
from __future__ import annotations

import asyncio
import difflib
import errno
import inspect
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .protocol import (PAYLOAD_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, REPLY_LIMITS, REQUEST_LIMITS, ProtocolError,
                       check_image, fit_image, image_size_hw, packb, to_plain, unpackb)
from ..checks import is_count

log = logging.getLogger("worldvla.serve")

_MAX_INSTRUCTION_CHARS = 4096
# Instruction tokens a served policy's engines leave room for beyond the warm-up's instruction ("warm up"):
# task instructions (LIBERO's, Meta-World's: tens of tokens) reuse the warm-up's caches and CUDA graphs, for a
# few hundred more cache slots (about 128 MiB a sequence for a 7B model in bf16).
SERVER_ENGINE_HEADROOM = 256
_MAX_EPISODE_ID_CHARS = 256
_MAX_METADATA_BYTES = 8 * 2**20  # the metadata reply, checked when the server is built
_MAX_FIELD_CHARS, _MAX_FIELDS_LISTED = 40, 8  # an unknown field name shown whole, at most; names listed, at most
# The fields each request type may carry; anything else (a misspelt 'previous_image') is refused.
_COMMON_FIELDS = ("type", "id", "protocol")
REQUEST_FIELDS = {"reset": frozenset(_COMMON_FIELDS + ("episode", "instruction", "client")),
                  "act": frozenset(_COMMON_FIELDS + ("episode", "image", "previous_image", "client")),
                  "metadata": frozenset(_COMMON_FIELDS)}


def check_batching_window(max_wait_ms: float, request_timeout_s: float) -> None:
    """Raise ValueError if a request waiting out the batching window (robots connected but not acting) would time
    out before the policy runs: every such request would fail, with a timeout blaming the policy."""
    if max_wait_ms / 1e3 >= request_timeout_s:
        raise ValueError(f"max_wait_ms ({max_wait_ms:g} ms, --max-wait-ms) must be shorter than request_timeout_s "
                         f"({request_timeout_s:g} s, --timeout-s): a request waiting that long for a batch times out "
                         "before the policy runs; lower --max-wait-ms or raise --timeout-s")


def _address_error(host: str, port: int, e: OSError) -> Exception:
    """The error to raise for a failed bind of host:port, naming the address and the options."""
    if isinstance(e, socket.gaierror):  # "[Errno -2] Name or service not known", naming neither host nor option
        return ValueError(f"host {host!r} (--host) is no address this machine can resolve ({e.strerror}); give an IP "
                          f"address (127.0.0.1: this machine only, 0.0.0.0: every interface) or a resolvable host name")
    # the port in use, an address of another machine: the address named
    why = ("the port is in use (another `worldvla serve`?): stop that process or choose another --port (0 picks a free "
           "one)" if e.errno == errno.EADDRINUSE else f"{e.strerror or e}")
    # OSError(errno, text) prints as "[Errno 99] ...": the number stays on the error, out of the one line printed
    err = OSError(f"cannot listen on {host}:{port} (--host, --port): {why}")
    err.errno = e.errno
    return err


def check_address(host: str, port: int) -> None:
    """Raise what `PolicyServer.start` would for an address it cannot listen on (a host that does not resolve, a
    port in use), binding it for a moment: `worldvla serve` checks before loading and warming up the model, which
    takes minutes for a large one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
    except OSError as e:
        raise _address_error(host, port, e) from None


def _float32(actions) -> np.ndarray:
    """A policy's actions as a float32 array: a torch tensor (on any device, in bfloat16, which NumPy lacks, too),
    an array or nested lists."""
    if hasattr(actions, "detach"):
        actions = actions.detach().float().cpu().numpy()
    return np.asarray(actions, dtype=np.float32)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _Connection:
    """What the server knows of one connection: whether it is a robot's (it has sent 'reset' or 'act'), and
    `closed`, a future done once the connection is lost (it wakes a request waiting for the policy)."""
    robot = False

    def __init__(self, ws):
        self.ws = ws
        self.closed = asyncio.ensure_future(ws.wait_closed())

    @property
    def open(self) -> bool:
        from websockets.protocol import State

        return self.ws.state is State.OPEN and not self.closed.done()

    def abort(self) -> None:
        """Drop the TCP connection at once, without a closing handshake (which a client that reads nothing
        never completes)."""
        self.ws.transport.abort()


def _field_name(name) -> str:
    """repr() of a request's field name, a long one cut short (saying how long it was)."""
    if isinstance(name, (str, bytes)) and len(name) > _MAX_FIELD_CHARS:
        return f"{name[:_MAX_FIELD_CHARS]!r}... ({len(name)} characters)"
    return repr(name)


def _error(message: str) -> dict:
    return {"ok": False, "error": message}


async def _wait_until(condition, deadline: float) -> None:
    """Poll `condition` until it holds or time.monotonic() reaches `deadline`."""
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class _Episode:
    __slots__ = ("key", "instruction", "owner", "client", "previous", "steps", "pending")

    def __init__(self, key, instruction: str, owner: "_Connection | None", client: str | None = None):
        self.key = key
        self.instruction = instruction
        self.owner = owner  # the connection that reset it, or that took it over once its owner closed
        self.client = client  # the PolicyClient's token: the same robot on a new connection takes it over at once
        self.previous: np.ndarray | None = None  # last frame sent, at the model's size
        self.steps = 0
        self.pending = False


class _ActRequest:
    __slots__ = ("episode", "image", "previous", "future", "t_recv", "t_ready", "t_start", "conn")

    def __init__(self, episode, image, previous, future, t_recv, t_ready, conn=None):
        self.episode, self.image, self.previous, self.future = episode, image, previous, future
        self.t_recv, self.t_ready, self.t_start = t_recv, t_ready, None
        self.conn = conn

    @property
    def wanted(self) -> bool:
        """Not timed out, and its connection still open to take the reply."""
        return not self.future.done() and (self.conn is None or self.conn.open)


class PolicyServer:
    """Serve `policy` over WebSocket + msgpack (protocol in `worldvla.serve`).

    Use `serve_forever()` (blocking, stops cleanly on SIGTERM/SIGINT), `await start()`
    / `await shutdown()` inside an event loop, or `with PolicyServer(...) as server:`
    to run it on a background thread (tests, notebooks); `server.url` is then live. A server
    runs once: after it has shut down, starting it again raises RuntimeError (build a new one).

    `port=0` picks a free port. `max_payload_mb` bounds a request: larger requests up
    to twice the limit get an error reply; beyond that the connection is closed with
    code 1009 (message too big) before the message is read into memory. The limit travels
    in every handshake response (`protocol.PAYLOAD_HEADER`), and `PolicyClient` refuses a
    larger request before sending it.

    `keepalive_s`: the server pings each connection every `keepalive_s` seconds and drops
    one that has not answered within `keepalive_s` more, so a robot whose network went
    silent (no close, no FIN) stops counting within 2 x `keepalive_s`: batches stop
    waiting for it and another connection may take its episodes over.

    `max_connections`: connections open at once. Each may have a request of up to
    `max_payload_mb` in flight, so this bounds the memory requests can hold; one more is
    refused at its handshake (HTTP 503, which `PolicyClient` reports with the reason).
    """

    def __init__(self, policy, host: str = "127.0.0.1", port: int = 0, *, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_queue: int = 64, max_payload_mb: float = 16.0,
                 request_timeout_s: float = 60.0, max_episodes: int = 256, drain_timeout_s: float | None = None,
                 pad_batches: bool = True, keepalive_s: float = 5.0, max_connections: int = 64):
        for name, value, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                ("max_episodes", max_episodes, 1), ("max_connections", max_connections, 1)):
            if not is_count(value, lo):  # True would be a 1
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not isinstance(host, str) or not host.strip():
            # asyncio would bind every interface for None or "", each on its own port when port is 0, and the
            # server's url would name no host
            raise ValueError(f"host must name an address, such as '127.0.0.1' (this machine only) or '0.0.0.0' "
                             f"(every IPv4 interface), got {host!r}")
        if port is None:  # as asyncio takes it: a free port
            port = 0
        if not (is_count(port) and port <= 65535):
            # True would bind port 1; asyncio names neither the option nor the range of a port out of range
            raise ValueError(f"port must be an integer from 0 to 65535 (0 picks a free one), got {port!r}")
        port = int(port)
        for name, value in (("max_wait_ms", max_wait_ms), ("max_payload_mb", max_payload_mb),
                            ("request_timeout_s", request_timeout_s), ("keepalive_s", keepalive_s),
                            ("drain_timeout_s", 0.0 if drain_timeout_s is None else drain_timeout_s)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if max_payload_mb <= 0 or request_timeout_s <= 0 or keepalive_s <= 0:
            raise ValueError("max_payload_mb, request_timeout_s and keepalive_s must be > 0")
        check_batching_window(max_wait_ms, request_timeout_s)
        for method in ("reset", "act"):
            if not callable(getattr(policy, method, None)):
                raise TypeError(f"policy {type(policy).__name__} has no {method}() method; the server needs "
                                "reset(instructions: list[str]) and act(images [N,H,W,3] uint8) -> [N,K,D]")
        self.policy = policy
        self.host, self.port = host, port
        self.max_batch, self.max_wait_ms, self.max_queue = max_batch, float(max_wait_ms), max_queue
        self.max_payload_bytes = int(max_payload_mb * 2**20)
        self.request_timeout_s = float(request_timeout_s)
        self.max_episodes = max_episodes
        self.max_connections = max_connections
        self.keepalive_s = float(keepalive_s)
        self.drain_timeout_s = float(drain_timeout_s) if drain_timeout_s is not None else self.request_timeout_s + 5.0

        meta = policy.metadata() if callable(getattr(policy, "metadata", None)) else {}
        self.policy_metadata = to_plain(meta if isinstance(meta, dict) else {"metadata": meta})

        def attr(name):
            value = getattr(policy, name, None)
            return value if value is not None else self.policy_metadata.get(name)

        if attr("image_size") is None:
            raise ValueError("the policy declares no image_size (attribute or metadata()['image_size']): "
                             "the server needs it to resize camera frames")
        self.image_hw = image_size_hw(attr("image_size"))
        frame_bytes = self.image_hw[0] * self.image_hw[1] * 3
        if self.max_payload_bytes < frame_bytes:  # such a server refuses every frame of the model's size, or all
            raise ValueError(f"max_payload_mb ({max_payload_mb:g} MiB, {self.max_payload_bytes} bytes) is smaller than "
                             f"one frame of the model's size ({self.image_hw[0]}x{self.image_hw[1]}x3: {frame_bytes} "
                             "bytes), so robots could not send one; raise --max-payload-mb (16 by default)")
        self.chunk_size, self.action_dim = attr("chunk_size"), attr("action_dim")
        self.explicit_history = _accepts(policy.act, "history")
        self.history_frames = int(self.policy_metadata.get("history", 2) or 1)
        # Batch sizes the policy sees: powers of two up to max_batch, and max_batch. A policy
        # that builds state per batch size (static KV caches, CUDA graphs) then keeps a few
        # warm instead of rebuilding for every size; the padding rows repeat the last request.
        # Only with explicit history: padding rows would occupy slots of a slot-keeping policy.
        self.pad_batches = bool(pad_batches) and self.explicit_history
        self.batch_sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
        if self.pad_batches and isinstance(getattr(policy, "max_engines", None), int):
            policy.max_engines = max(policy.max_engines, len(self.batch_sizes))  # one warm engine per size
        if isinstance(getattr(policy, "max_prefixes", None), int):  # each episode's instruction stays prefilled
            policy.max_prefixes = max(policy.max_prefixes, max_episodes)
        if isinstance(getattr(policy, "engine_headroom", None), int):
            # Engines (caches, CUDA graphs) with room for SERVER_ENGINE_HEADROOM more instruction tokens than the
            # warm-up's: those it builds serve the robots' instructions, none is rebuilt on a request.
            policy.engine_headroom = max(policy.engine_headroom, SERVER_ENGINE_HEADROOM)

        self.stats = {"act_requests": 0, "act_ok": 0, "errors": 0, "batches": 0, "policy_calls": 0,
                      "batched_requests": 0, "max_batch_seen": 0, "busy_rejections": 0, "timeouts": 0,
                      "policy_failures": 0, "history_resets": 0, "resets": 0, "evicted_episodes": 0, "padded_rows": 0,
                      "refused_connections": 0}
        self._episodes: OrderedDict = OrderedDict()
        self._layout: list | None = None  # episodes bound to the policy's slots (policies without `history`)
        self._last_reset: tuple | None = None
        self._busy = 0
        self._open: set = set()  # the _Connection of every open connection
        self._signalled = False  # a SIGTERM/SIGINT has asked serve_forever to stop
        self._running_batch = False
        self._policy_since = None  # time.monotonic() when the running policy call started, on the worker thread
        self.exit_code = 0  # 1 when shutdown gave up waiting for a policy call that did not return
        self._draining = False
        self._closed = False
        self._started_at = None
        self._ws = None
        self._loop = None
        self._queue = None
        self._stop_event = None
        self._batcher = None
        self._executor = None
        self._thread = None
        self._check_metadata_reply()

    def _check_metadata_reply(self) -> None:
        """Refuse at once a policy whose metadata reply `PolicyClient` could not decode (`to_plain` shortens
        long lists and strings; what is left may still be too large as a whole)."""
        try:
            data = packb(self.metadata())
        except (TypeError, ValueError) as e:
            raise ValueError(f"the policy's metadata() cannot be encoded for clients: {e}") from None
        if len(data) > _MAX_METADATA_BYTES:
            raise ValueError(f"the policy's metadata() takes {len(data) / 2**20:.1f} MiB as a reply, more than "
                             f"{_MAX_METADATA_BYTES / 2**20:g} MiB: keep it to a description of the model")
        try:
            unpackb(data, REPLY_LIMITS)
        except ProtocolError as e:
            raise ValueError(f"the policy's metadata() cannot be sent to clients: {e}; keep it to a description "
                             "of the model") from None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving (inside a running event loop). A server runs once: after `shutdown` (the end
        of a `with` block, of `serve_forever`) it refuses to start again."""
        from websockets.asyncio.server import serve

        if self._closed:
            raise RuntimeError("this PolicyServer has been shut down and cannot start again: build a new "
                               "PolicyServer to serve again")
        if self._ws is not None:
            raise RuntimeError("this PolicyServer is already serving")
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.max_queue)
        self._stop_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="worldvla-policy")
        # max_queue: a connection's requests are answered one at a time, so a client that sends ahead is
        # held back by TCP rather than buffered (websockets keeps 16 messages of up to max_size by default).
        try:
            self._ws = await serve(self._handler, self.host, self.port, process_request=self._process_request,
                                   process_response=self._process_response,
                                   max_size=2 * self.max_payload_bytes + 65536, max_queue=2, compression=None,
                                   close_timeout=5, server_header=None,
                                   # a connection lost without a close (a robot's network gone) is dropped within
                                   # 2 x keepalive_s instead of websockets' default 40 s
                                   ping_interval=self.keepalive_s, ping_timeout=self.keepalive_s)
        except OSError as e:
            self._executor.shutdown(wait=False)
            raise _address_error(self.host, self.port, e) from None
        self.port = self._ws.sockets[0].getsockname()[1]
        self._batcher = asyncio.create_task(self._batch_loop())
        self._started_at = time.monotonic()
        log.info("serving %s on %s (max_batch=%d, max_wait_ms=%g, keepalive_s=%g, history=%s)",
                 type(self.policy).__name__, self.url, self.max_batch, self.max_wait_ms, self.keepalive_s,
                 "explicit" if self.explicit_history else "policy slots")

    def request_stop(self) -> None:
        """Ask a running server to shut down (thread-safe, signal-safe); nothing once it has stopped."""
        loop = self._loop
        if loop is None or self._stop_event is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._stop_event.set)
        except RuntimeError:  # the loop closed meanwhile: the server has stopped
            pass

    async def wait_stopped(self) -> None:
        if self._ws is None and not self._closed:
            raise RuntimeError("this PolicyServer is not serving: await start() first")
        await self._stop_event.wait()

    async def shutdown(self) -> None:
        """Refuse new work, finish queued and running requests, send their replies, close. Takes at most
        the drain timeout (plus a second): connections that have not closed by then are dropped, and a
        policy call still running is left behind (`exit_code` 1)."""
        if self._closed or self._ws is None:  # never started, or its start failed: nothing to shut down
            return
        self._closed = True
        self._draining = True
        deadline = time.monotonic() + self.drain_timeout_s
        await _wait_until(lambda: not (self._busy > 0 or self._running_batch or not self._queue.empty()), deadline)
        if self._busy > 0:
            log.warning("shutting down with %d requests unanswered after %.1f s", self._busy, self.drain_timeout_s)
        self._ws.close()  # close frames with 1001 (going away) to every client
        try:
            await asyncio.wait_for(self._ws.wait_closed(), max(deadline - time.monotonic(), 1.0))
        except asyncio.TimeoutError:  # clients that read nothing never complete the closing handshake
            log.warning("dropping %d connection(s) still open after the drain timeout", len(self._open))
            for conn in list(self._open):
                conn.abort()
            try:
                await asyncio.wait_for(self._ws.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)
        await _wait_until(lambda: self._policy_since is None, deadline)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._policy_since is not None:
            log.error("a policy call started %.1f s ago has not returned within the drain timeout (%.1f s): "
                      "exiting without waiting for it", time.monotonic() - self._policy_since, self.drain_timeout_s)
            self.exit_code = 1
        log.info("server stopped: %s", json.dumps(self.stats))

    def _on_signal(self) -> None:
        if self._signalled:  # a second signal while draining: whoever sent it wants out now
            log.warning("second signal while shutting down: exiting without waiting for %d request(s) in flight",
                        self._busy)
            os._exit(1)
        self._signalled = True
        log.info("shutting down: finishing the requests in flight (a second signal exits at once)")
        self._stop_event.set()

    def serve_forever(self, install_signal_handlers: bool = True, on_ready=None) -> int:
        """Serve until SIGTERM/SIGINT (or `request_stop()`), then shut down cleanly: queued and running
        requests are answered first (up to the drain timeout). A second signal exits at once. Returns 0;
        exits the process with code 1 if a policy call is still running at the drain timeout."""

        if install_signal_handlers and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve_forever() installs SIGTERM/SIGINT handlers, which only the main thread may: "
                               "call it there, pass install_signal_handlers=False, or use start_background()")

        async def main():
            await self.start()
            try:  # a failing on_ready must not leave the port bound with nobody serving it
                if install_signal_handlers:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        self._loop.add_signal_handler(sig, self._on_signal)
                if on_ready is not None:
                    on_ready(self)
                await self._stop_event.wait()
            finally:
                await self.shutdown()

        asyncio.run(main())
        if self.exit_code:  # the policy's worker thread (not a daemon) would hold the interpreter at exit
            logging.shutdown()
            sys.stdout.flush()
            os._exit(self.exit_code)
        return 0

    def start_background(self, timeout: float = 30.0) -> "PolicyServer":
        """Run the server on its own thread and event loop; returns once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def main():
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # surfaced to the caller below
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._stop_event.wait())
                loop.run_until_complete(self.shutdown())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="worldvla-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop_background(self, timeout: float | None = None) -> None:
        if self._thread is None:
            return
        self.request_stop()
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "PolicyServer":
        return self.start_background()

    def __exit__(self, *exc) -> None:
        self.stop_background()

    def warmup(self) -> None:
        """Policy calls with random frames before serving (compilation, allocation, CUDA graphs):
        every padded batch size, with and without a history frame. A policy with `engine_headroom`
        (`WorldVLAPolicy`; the server sets SERVER_ENGINE_HEADROOM) builds engines here with room for
        instructions that many tokens longer than the warm-up's, so the robots' requests reuse them."""
        if self._ws is not None and not self._closed:
            # its calls would run on this thread alongside the worker's, resetting the policy under robots' requests
            raise RuntimeError("warmup() runs before serving: call it before start() (or the `with` block), not "
                               "while the server answers robots")
        h, w = self.image_hw
        rng = np.random.default_rng()
        for n in self.batch_sizes if self.pad_batches else [1]:
            images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
            self.policy.reset(["warm up"] * n)
            if self.explicit_history:
                self.policy.act(images, history=None)
                if self.history_frames > 1:
                    self.policy.act(images, history=images[::-1].copy())
            else:
                self.policy.act(images)
        self._layout, self._last_reset = None, None

    # ------------------------------------------------------------------ HTTP + WebSocket
    def health(self) -> dict:
        return {"status": "draining" if self._draining else "ok", "protocol": PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0,
                "connections": len(self._open), "episodes": len(self._episodes),
                "queued": self._queue.qsize() if self._queue is not None else 0, "stats": dict(self.stats)}

    def _process_request(self, connection, request):
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = self.health()
            response = connection.respond(503 if self._draining else 200, json.dumps(body) + "\n")
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        versions = [v.strip() for v in request.headers.get_all(PROTOCOL_HEADER)]
        if versions and versions != [str(PROTOCOL_VERSION)]:  # a client that says none is not checked here
            log.warning("refused a connection from %s: its client speaks protocol %s", connection.remote_address,
                        ", ".join(versions))
            return connection.respond(400, f"this server speaks protocol {PROTOCOL_VERSION}, the client protocol "
                                           f"{', '.join(versions)} ({PROTOCOL_HEADER} header): use a client of the "
                                           "same worldvla version as the server\n")
        if len(self._open) >= self.max_connections:
            self.stats["refused_connections"] += 1
            log.warning("refused a connection from %s: %d connections are open, the limit", connection.remote_address,
                        len(self._open))
            return connection.respond(503, f"the policy server has {len(self._open)} connections open, its limit "
                                           "(--max-connections): close one, or start the server with a higher "
                                           "--max-connections\n")
        return None  # a WebSocket handshake (websockets answers 426 to anything else)

    def _process_response(self, connection, request, response):
        """Every response says the server's protocol version, which `PolicyClient` checks at the handshake, and
        its payload limit, so that the client refuses a larger request before sending it."""
        response.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        response.headers[PAYLOAD_HEADER] = str(self.max_payload_bytes)
        return None

    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        conn = _Connection(ws)
        self._open.add(conn)
        try:
            async for message in ws:
                t_recv = time.perf_counter()
                self._busy += 1
                try:
                    reply = await self._handle_message(message, t_recv, conn)
                    if not reply.get("ok"):
                        self.stats["errors"] += 1
                    if not await self._send(conn, reply):
                        break
                finally:
                    self._busy -= 1
        except ConnectionClosed:
            pass
        finally:
            self._open.discard(conn)
            conn.closed.cancel()

    async def _send(self, conn: _Connection, reply: dict) -> bool:
        """Send a reply; False if the client has not taken it within the request timeout. Such a client
        (one that sends requests and never reads the replies) is cut off: it would otherwise hold this
        handler, and the server's shutdown, for as long as it stays connected."""
        try:
            await asyncio.wait_for(conn.ws.send(packb(reply)), self.request_timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("dropping the connection from %s: it has not read its replies for %g s",
                        conn.ws.remote_address, self.request_timeout_s)
            conn.abort()
            return False

    async def _handle_message(self, message, t_recv: float, conn: "_Connection | None" = None) -> dict:
        if isinstance(message, str):
            return _error("text frames are not accepted: send msgpack-encoded requests in binary frames")
        if len(message) > self.max_payload_bytes:
            return _error(f"payload of {len(message) / 2**20:.2f} MiB exceeds the server's limit of "
                          f"{self.max_payload_bytes / 2**20:.2f} MiB (--max-payload-mb); send smaller frames")
        request_id = msg = None
        try:
            msg = unpackb(message, REQUEST_LIMITS)
            if not isinstance(msg, dict):
                raise ProtocolError(f"a request must be a msgpack map with a 'type' field, got {type(msg).__name__}")
            request_id = msg.get("id")
            if msg.get("type") == "act":  # every 'act', also one refused before its episode is looked up
                self.stats["act_requests"] += 1
            kind = self._check_fields(msg)
            if kind in ("act", "reset") and conn is not None and not conn.robot:
                conn.robot = True  # a robot: the batcher may wait for its requests
            if kind == "act":
                reply = await self._act(msg, t_recv, conn)
            elif kind == "reset":
                reply = self._reset(msg, conn)
            else:
                reply = self.metadata()
        except ProtocolError as e:
            reply = _error(str(e))
        except Exception as e:  # a bug must not take the connection down
            log.exception("internal error while handling a request")
            reply = _error(f"internal server error: {type(e).__name__}: {e}")
        if not reply.get("ok") and isinstance(msg, dict) and msg.get("type") == "reset":
            self._end_refused_reset(msg, conn)
        if isinstance(request_id, (int, str)) and not isinstance(request_id, bool):
            reply["id"] = request_id
        return reply

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _check_fields(msg: dict) -> str:
        """The request's type, once its 'id', 'protocol' and the names of its fields have been checked."""
        request_id = msg.get("id")
        if "id" in msg and (isinstance(request_id, bool) or not isinstance(request_id, (int, str))):
            raise ProtocolError(f"'id' must be an integer or a string (it is echoed in the reply), got "
                                f"{type(request_id).__name__}")
        kind = msg.get("type")
        if kind is None:
            raise ProtocolError("request has no 'type' field; expected 'reset', 'act' or 'metadata'")
        if not isinstance(kind, str) or kind not in REQUEST_FIELDS:
            raise ProtocolError(f"unknown request type {kind!r}; expected 'reset', 'act' or 'metadata'")
        if "protocol" in msg:
            version = msg["protocol"]
            if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0: an integer
                raise ProtocolError(f"this server speaks protocol {PROTOCOL_VERSION}, the request asks for protocol "
                                    f"{version!r}: use a client of the same worldvla version as the server (or "
                                    "send no 'protocol' field)")
        allowed = REQUEST_FIELDS[kind]
        unknown = sorted((k for k in msg if k not in allowed), key=repr)
        if unknown:
            first = unknown[0]
            close = (difflib.get_close_matches(first, allowed, n=1)
                     if isinstance(first, str) and len(first) <= _MAX_FIELD_CHARS else [])
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            a = "an" if kind[0] in "aeiou" else "a"
            # Names cut short and at most a few listed: the reply must stay within the client's string limit.
            names = ", ".join(_field_name(k) for k in unknown[:_MAX_FIELDS_LISTED])
            if len(unknown) > _MAX_FIELDS_LISTED:
                names += f" and {len(unknown) - _MAX_FIELDS_LISTED} more"
            raise ProtocolError(f"unknown field{'s' if len(unknown) > 1 else ''} {names} in "
                                f"{a} {kind!r} request{hint}; {a} {kind!r} request may carry "
                                f"{', '.join(map(repr, sorted(allowed)))}")
        return kind

    def metadata(self) -> dict:
        return {"ok": True, "protocol": PROTOCOL_VERSION, "action_dim": to_plain(self.action_dim),
                "chunk_size": to_plain(self.chunk_size), "image_size": list(self.image_hw),
                "accepts_previous_image": self.explicit_history, "policy": self.policy_metadata,
                "server": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms,
                           "max_queue": self.max_queue, "max_payload_mb": self.max_payload_bytes / 2**20,
                           "request_timeout_s": self.request_timeout_s, "max_episodes": self.max_episodes,
                           "max_connections": self.max_connections, "keepalive_s": self.keepalive_s,
                           "policy_batch_sizes": self.batch_sizes if self.pad_batches else None,
                           "resize": "bilinear to image_size, no crop"}}

    @staticmethod
    def _episode_key(msg: dict):
        if "episode" not in msg:
            raise ProtocolError(f"{msg.get('type')!r} request needs an 'episode' field (a string or integer id)")
        key = msg["episode"]
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ProtocolError(f"'episode' must be a string or an integer, got {type(key).__name__}")
        if isinstance(key, str) and not (1 <= len(key) <= _MAX_EPISODE_ID_CHARS):
            raise ProtocolError(f"'episode' strings must have 1 to {_MAX_EPISODE_ID_CHARS} characters")
        return key

    @staticmethod
    def _client_token(msg: dict) -> str | None:
        token = msg.get("client")
        if token is not None and (not isinstance(token, str) or not 1 <= len(token) <= _MAX_EPISODE_ID_CHARS):
            raise ProtocolError(f"'client' must be a string of 1 to {_MAX_EPISODE_ID_CHARS} characters")
        return token

    def _check_owner(self, key, episode: "_Episode | None", conn: "_Connection | None", client: str | None) -> None:
        """An episode belongs to the connection that reset it: another open connection using its id is
        refused (two robots would mix their instructions and frames). The same client (its `client`
        token: a PolicyClient keeps one across reconnects) takes it over at once on a new connection,
        even while a connection lost without a close (a dropped network) still looks open; any other
        connection may take it over once the owner has closed, or has failed to answer the keepalive
        pings (within 2 x keepalive_s of going silent)."""
        if episode is None or conn is None or episode.owner is conn:
            return
        same_client = client is not None and client == episode.client
        if not same_client and episode.owner is not None and episode.owner.open:
            raise ProtocolError(
                f"episode {key!r} belongs to another open connection: each robot needs its own episode ids "
                "(PolicyClient.reset() without episode= picks a fresh one). If that connection is this robot's "
                "own, lost without a close (a dropped network, a restarted robot), the server drops it within "
                f"{self._drop_within(episode.owner):.1f} s if it has gone silent (keepalive pings every "
                f"{self.keepalive_s:g} s, --keepalive-s): retry then, or reset under a new episode id")
        episode.owner, episode.client = conn, client

    def _drop_within(self, conn: _Connection) -> float:
        """Seconds until the keepalive drops `conn` if it answers nothing from now on (an upper bound)."""
        bound = 2 * self.keepalive_s
        try:  # a keepalive ping already unanswered: the connection is dropped `keepalive_s` after it was sent
            sent = [t for waiter, t in conn.ws.pending_pings.values() if not waiter.done()]
        except (AttributeError, TypeError, ValueError):  # another websockets version
            sent = []
        if sent:
            bound = min(bound, max(min(sent) + self.keepalive_s - self._loop.time(), 0.0))
        return bound

    def _end_refused_reset(self, msg: dict, conn: "_Connection | None") -> None:
        """A refused 'reset', whatever the reason (a misspelt field, a bad 'client' token or 'protocol'), ends
        the episode it names when the reset could have taken it (its owner's, `_check_owner`), so that an
        'act' is not run on the old task."""
        try:
            key = self._episode_key(msg)
            episode = self._episodes.get(key)
            if episode is None:
                return
            try:
                client = self._client_token(msg)
            except ProtocolError:  # a bad token proves nothing: only the owning connection ends it
                client = None
            self._check_owner(key, episode, conn, client)
        except ProtocolError:  # no valid episode id, or another open connection's episode
            return
        self._episodes.pop(key, None)

    def _reset(self, msg: dict, conn: "_Connection | None" = None) -> dict:
        key = self._episode_key(msg)
        client = self._client_token(msg)
        self._check_owner(key, self._episodes.get(key), conn, client)
        # A reset by the episode's owner ends its previous run, refused or not (as WorldVLAPolicy.reset does):
        # after a refused instruction an 'act' is refused as an unknown episode, not run on the old task.
        self._episodes.pop(key, None)
        instruction = msg.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ProtocolError("'reset' needs a non-empty 'instruction' string (the task in words)")
        if len(instruction) > _MAX_INSTRUCTION_CHARS:
            raise ProtocolError(f"'instruction' is longer than {_MAX_INSTRUCTION_CHARS} characters")
        if self._draining:
            return _error("server is shutting down; connect to another server")
        check = getattr(self.policy, "check_instruction", None)
        if callable(check):  # refused here, not in a batch with other robots' requests
            try:
                check(instruction)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
        # A new object, so a request still running for the old episode cannot touch the new one.
        self._episodes[key] = _Episode(key, instruction, conn, client)
        self._episodes.move_to_end(key)
        self.stats["resets"] += 1
        while len(self._episodes) > self.max_episodes:
            old_key = next(iter(self._episodes))
            del self._episodes[old_key]
            self.stats["evicted_episodes"] += 1
            log.info("episode %r evicted (more than %d episodes)", old_key, self.max_episodes)
        return {"ok": True, "episode": key}

    async def _act(self, msg: dict, t_recv: float, conn: "_Connection | None" = None) -> dict:
        key = self._episode_key(msg)
        episode = self._episodes.get(key)
        if episode is None:
            raise ProtocolError(f"unknown episode {key!r}: send {{'type': 'reset', 'episode': ..., "
                                "'instruction': ...} first (episodes are also dropped when the server holds more "
                                f"than {self.max_episodes})")
        self._check_owner(key, episode, conn, self._client_token(msg))
        if "image" not in msg:
            raise ProtocolError("'act' needs an 'image' field: uint8 ndarray [H, W, 3]")
        image = check_image(msg["image"], "image")
        previous = msg.get("previous_image")
        if previous is not None:
            if not self.explicit_history:
                raise ProtocolError("this policy does not take explicit history frames (its act() has no "
                                    "'history' argument); omit 'previous_image'")
            previous = check_image(previous, "previous_image")
        if self._draining:
            return _error("server is shutting down; connect to another server")
        if episode.pending:
            return _error(f"episode {key!r} already has an 'act' request in flight; wait for its reply (a robot "
                          "that reconnected after a timeout: its previous request is still running, retry shortly)")
        episode.pending = True  # before the first await: a second request for the episode sees it
        self._episodes.move_to_end(key)  # the most recently used from here: other robots' resets evict others first
        try:
            return await self._queue_act(key, episode, image, previous, t_recv, conn)
        finally:
            episode.pending = False

    async def _queue_act(self, key, episode, image, previous, t_recv: float, conn: "_Connection | None") -> dict:
        if image.shape[:2] != self.image_hw or (previous is not None and previous.shape[:2] != self.image_hw):
            image, previous = await asyncio.to_thread(self._resize_pair, image, previous)
            if self._episodes.get(key) is not episode:  # reset or evicted by other requests meanwhile
                return _error(f"episode {key!r} was reset or dropped while its image was being resized (more than "
                              f"{self.max_episodes} episodes, or a reset of the same id); send 'reset' again")
        if conn is not None and not conn.open:  # lost while the frame was being resized: nobody reads the reply
            return _error("connection closed")
        t_ready = time.perf_counter()
        request = _ActRequest(episode, image, previous, self._loop.create_future(), t_recv, t_ready, conn)
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.stats["busy_rejections"] += 1
            return _error(f"server busy: {self.max_queue} requests already queued (--max-queue); retry shortly")
        remaining = self.request_timeout_s - (time.perf_counter() - t_recv)
        # Also woken when the connection is lost: a request nobody will read is dropped from the queue.
        await asyncio.wait({request.future} if conn is None else {request.future, conn.closed},
                           timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED)
        if not request.future.done():
            request.future.cancel()  # the batcher skips it unless it is already running
            if conn is not None and conn.closed.done():
                return _error("connection closed")
            self.stats["timeouts"] += 1
            return _error(f"request timed out after {self.request_timeout_s:g} s (server overloaded or policy too "
                          "slow); retry or raise --timeout-s")
        outcome = request.future.result()
        if outcome[0] != "ok":
            return _error(outcome[1])
        actions, timing = outcome[1], outcome[2]
        timing["server_ms"] = round((time.perf_counter() - t_recv) * 1e3, 3)
        self.stats["act_ok"] += 1
        return {"ok": True, "episode": key, "actions": actions, "timing": timing}

    def _resize_pair(self, image, previous):
        return fit_image(image, self.image_hw), (None if previous is None else fit_image(previous, self.image_hw))

    # ------------------------------------------------------------------ batching
    def _live_robots(self) -> int:
        """Robots' connections still open: one that failed its keepalive (or is closing) is no longer waited
        for, though its handler has not finished yet."""
        return sum(1 for c in self._open if c.robot and c.open)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.max_wait_ms / 1e3
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                # A connection has at most one request in flight: once every robot's connection (one
                # that has sent 'reset' or 'act') has one queued, nothing else can join this batch, so
                # waiting only adds latency (a monitor asking for metadata is not counted).
                remaining = deadline - loop.time()
                if remaining <= 0 or len(batch) >= self._live_robots():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [r for r in batch if r.wanted]  # timed out while queued, or its connection lost
            if batch:
                self._running_batch = True
                try:
                    await self._run_batch(batch)
                finally:
                    self._running_batch = False

    async def _run_batch(self, batch: list, retried: bool = False) -> None:
        t_start = time.perf_counter()
        for r in batch:
            if r.t_start is None:  # a re-run keeps its first call's start: its policy_ms covers the failed call
                r.t_start = t_start
        try:
            actions, answered = await self._loop.run_in_executor(self._executor, self._call_policy, batch)
        except Exception as e:
            log.exception("policy call failed for a batch of %d", len(batch))
            self.stats["policy_failures"] += 1
            if len(batch) > 1:  # one robot's bad request must not fail the others': each alone again
                for r in batch:
                    if not r.future.done():
                        await self._run_batch([r], retried=True)
                return
            message = f"policy failed: {type(e).__name__}: {e}"
            for r in batch:
                if not r.future.done():
                    r.future.set_result(("error", message))
            return
        self.stats["batches"] += 1
        self.stats["policy_calls"] += len({id(call) for call in answered})  # one tuple per call
        self.stats["batched_requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        for r, a, (t_end, size) in zip(batch, actions, answered):
            # A request that timed out while its call ran, or whose chunk is refused, reached no robot: its env
            # did not step, so its frame is not the episode's previous one (a retry sends the same frame).
            # A policy keeping history in its slots has taken that frame all the same: its slots are reset before
            # the next call, restarting the history rather than conditioning the next step on it.
            if r.future.done():
                if not self.explicit_history:
                    self._layout = None
                continue
            if len(a) == 0:  # mode='release': the model wrote no (well-formed) action block; `check_chunk` alike
                r.future.set_result(("error", "the model wrote no action block, or malformed ones (mode='release' "
                                              "decodes freely; the release's loop fails the episode here)"))
                if not self.explicit_history:
                    self._layout = None
                continue
            r.episode.previous = r.image
            r.episode.steps += 1
            # the policy call that answered this request: its end and its requests (a batch mixing episodes'
            # first requests with later ones makes two calls)
            timing = {"preprocess_ms": round((r.t_ready - r.t_recv) * 1e3, 3),
                      "queue_ms": round((r.t_start - r.t_ready) * 1e3, 3),
                      "policy_ms": round((t_end - r.t_start) * 1e3, 3), "batch_size": size,
                      "retried": retried}
            r.future.set_result(("ok", a, timing))

    # Runs on the worker thread: the only place the policy is called while serving. Returns each request's
    # actions and (end time, number of requests) of the policy call that answered it.
    def _call_policy(self, batch: list) -> tuple[list, list]:
        self._policy_since = time.monotonic()
        try:
            if self.explicit_history:
                return self._call_with_history(batch)
            return self._call_with_slots(batch)
        except Exception:
            # A failed reset or act may have cleared the policy's instructions or slots (WorldVLAPolicy.reset ends
            # the previous episode even when it refuses): the next call resets it rather than trusting them.
            self._last_reset, self._layout = None, None
            raise
        finally:
            self._policy_since = None

    def _call_with_history(self, batch: list) -> tuple[list, list]:
        out: list = [None] * len(batch)
        answered: list = [None] * len(batch)
        use_history = self.history_frames > 1
        prev = [(r.previous if r.previous is not None else r.episode.previous) if use_history else None
                for r in batch]
        first = [i for i, p in enumerate(prev) if p is None]
        later = [i for i, p in enumerate(prev) if p is not None]
        for idx, history in ((first, False), (later, True)):
            if not idx:
                continue
            rows = list(idx)
            if self.pad_batches:
                size = next(b for b in self.batch_sizes if b >= len(rows))
                self.stats["padded_rows"] += size - len(rows)
                rows += [rows[-1]] * (size - len(rows))
            instructions = tuple(batch[i].episode.instruction for i in rows)
            # Fresh episodes always get a reset, in case the policy also keeps frames of its own.
            if not history or instructions != self._last_reset:
                self.policy.reset(list(instructions))
                self._last_reset = instructions
            images = np.stack([batch[i].image for i in rows])
            hist = np.stack([prev[i] for i in rows]) if history else None
            result = self._check_actions(self.policy.act(images, history=hist), len(rows))
            call = (time.perf_counter(), len(idx))
            for j, i in enumerate(idx):
                out[i], answered[i] = result[j], call
        return out, answered

    def _call_with_slots(self, batch: list) -> tuple[list, list]:
        episodes = [r.episode for r in batch]
        layout = self._layout
        if layout is not None and len(layout) == len(episodes) and {id(e) for e in layout} == {id(e) for e in episodes}:
            position = {id(e): j for j, e in enumerate(layout)}
            order = sorted(range(len(batch)), key=lambda i: position[id(episodes[i])])
        else:
            order = list(range(len(batch)))
            self.stats["history_resets"] += sum(1 for e in episodes if e.steps > 0)
            self.policy.reset([episodes[i].instruction for i in order])
            self._layout = [episodes[i] for i in order]
        images = np.stack([batch[i].image for i in order])
        result = self._check_actions(self.policy.act(images), len(batch))
        out: list = [None] * len(batch)
        for j, i in enumerate(order):
            out[i] = result[j]
        return out, [(time.perf_counter(), len(batch))] * len(batch)

    def _check_actions(self, result, n: int) -> np.ndarray:
        if isinstance(result, (list, tuple)) and all(np.ndim(a) == 2 for a in result):
            # chunks of different lengths, one per image (WorldVLAPolicy's mode="release"); a count that is not the
            # images' is named here, where NumPy would fail on their lengths with a message naming neither count
            if len(result) != n:
                raise RuntimeError(f"policy.act returned a list of {len(result)} chunks for {n} images; expected one "
                                   "per image")
            return [np.ascontiguousarray(_float32(a)) for a in result]
        result = _float32(result)
        if result.ndim == 2 and n == 1:
            result = result[None]
        if result.ndim != 3 or result.shape[0] != n:
            raise RuntimeError(f"policy.act returned shape {list(result.shape)} for {n} images; expected [N, K, D]")
        return np.ascontiguousarray(result)
