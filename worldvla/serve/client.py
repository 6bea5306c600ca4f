"""`PolicyClient`: the robot side of the policy server (synchronous, one episode at a time).

    with PolicyClient("ws://gpu-box:8000") as policy:
        policy.reset("put the red block in the drawer")
        while not done:
            chunk = policy.act(frame)               # float32 [K, D]
            print(policy.last_timing)               # server-side milliseconds
            for action in chunk: frame, done = robot.step(action)
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np

from .protocol import PAYLOAD_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, ProtocolError, check_image, packb, unpackb


class PolicyServerError(RuntimeError):
    """The server refused a request (its message is the exception's), closed the connection, sent a reply
    that cannot be decoded, or speaks another protocol version."""


def _connect(url: str, open_timeout: float, max_size: int):
    from websockets.exceptions import InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    # The protocol version travels in the handshake: a server of another version refuses the connection.
    kwargs = dict(open_timeout=open_timeout, max_size=max_size, compression=None, close_timeout=5,
                  additional_headers={PROTOCOL_HEADER: str(PROTOCOL_VERSION)})
    params = inspect.signature(connect).parameters
    if "proxy" in params:
        kwargs["proxy"] = None  # robots talk to the server directly, whatever the environment's proxy says
    if "legacy" in params:
        kwargs["legacy"] = True  # a plain connection object, closed by PolicyClient.close()
    try:
        return connect(url, **kwargs)
    except OSError as e:
        raise ConnectionError(f"cannot connect to the policy server at {url}: {e}; is `worldvla serve` "
                              "running there?") from e
    except InvalidHandshake as e:  # InvalidMessage, InvalidStatus: something else listens on that port, or
        # the server refused: at its limit (503), or a client of another protocol version (it states its own)
        version = _server_version(e.response) if isinstance(e, InvalidStatus) else None
        if version is not None or isinstance(e, InvalidStatus) and e.response.status_code == 503:
            if version is not None and version != PROTOCOL_VERSION:
                raise _other_protocol(url, version) from e
            reason = e.response.body.decode(errors="replace").strip()
            raise ConnectionError(f"the policy server at {url} refused the connection: {reason}") from e
        raise ConnectionError(f"{url} did not answer as a WebSocket server ({type(e).__name__}: {e}); is that "
                              "the host and port of `worldvla serve`?") from e


def _server_version(response):
    """The protocol version a policy server states in its handshake response, None if it states none (a
    server of an older worldvla, or something else)."""
    values = response.headers.get_all(PROTOCOL_HEADER)
    if not values:
        return None
    version = ", ".join(values).strip()
    return int(version) if version.isascii() and version.isdigit() else version


def _server_payload_limit(response) -> int | None:
    """The largest request, in bytes, a policy server states it accepts in its handshake response; None if it
    states none (a server of an older worldvla) or something that is no positive integer."""
    value = ", ".join(response.headers.get_all(PAYLOAD_HEADER)).strip()
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


def _other_protocol(url: str, version) -> PolicyServerError:
    return PolicyServerError(f"the server at {url} speaks protocol {version!r}, this PolicyClient protocol "
                             f"{PROTOCOL_VERSION}: install the same worldvla version on the robot and on the server")


class PolicyClient:
    """Connects to a `worldvla serve` server.

    `reset(instruction)` starts an episode (a fresh id unless one is given); `act(image)`
    returns the action chunk [K, D] float32 for an RGB uint8 [H, W, 3] frame of any size
    (the server resizes it) and stores the server's timing in `last_timing`. Pass
    `previous_image`, the frame of the previous env step, to condition on it as the
    release does; by default the server uses the frame of this episode's previous `act`.
    A refused request raises `PolicyServerError` with the server's message, as does a lost
    connection (the next call reconnects), a failed reconnection, or a reply that cannot be
    decoded; a reply larger than `max_reply_mb` too (it names the option). `timeout` (> 0)
    bounds each call as a whole, a reconnection included: a call not done
    within `timeout` seconds raises `TimeoutError` and closes the connection, which drops the
    request on the server; the next call reconnects. `connect_timeout` bounds opening a
    connection (in the constructor, and within a call's `timeout` when reconnecting). Each new
    connection states the client's protocol version (`protocol.PROTOCOL_VERSION`) in its
    handshake, and the server its own in the answer, without a request of its own: a server of
    another version raises `PolicyServerError` (a server that states none, of an older worldvla,
    is asked for its metadata instead). The server states its payload limit there too (`max_payload_bytes`,
    None until known): a request larger than that raises ValueError before it is sent, where the server would
    refuse it or close the connection. The client sends a token of its own (`client_id`) with
    its requests, so that after a reconnection the server gives it its episode at once, even
    while the lost connection still looks open there. After `close()` (or the end of a `with`
    block) every call raises RuntimeError: build a new client to go on.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000", *, timeout: float = 60.0, connect_timeout: float = 10.0,
                 max_reply_mb: float = 64.0):
        if not isinstance(url, str):
            raise TypeError(f"server url must be a str such as 'ws://gpu-box:8000', got {type(url).__name__} {url!r}")
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"server url must start with ws:// or wss://, got {url!r}")
        for name, value, unit in (("timeout", timeout, "seconds"), ("connect_timeout", connect_timeout, "seconds"),
                                  ("max_reply_mb", max_reply_mb, "MiB")):
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not (number and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number of {unit} > 0, got {value!r}")
        self.url = url
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_reply_mb = float(max_reply_mb)
        self.max_reply_bytes = int(max_reply_mb * 2**20)
        self.episode = None
        self.client_id = uuid.uuid4().hex
        self.last_timing: dict | None = None
        self.max_payload_bytes: int | None = None  # the server's limit on a request, from each new connection
        self._next_id = 0
        self._closed = False
        self._ws = _connect(url, self.connect_timeout, self.max_reply_bytes)
        try:
            self._check_protocol(time.monotonic() + self.timeout)
        except BaseException:
            if self._ws is not None:
                self._drop()
            raise

    # -------------------------------------------------------------- requests
    def request(self, message: dict) -> dict:
        """Send one request map and return the server's reply map; raises `PolicyServerError` if refused.
        The whole call, a reconnection included, takes at most `timeout` seconds (else `TimeoutError`)."""
        self._check_open()
        deadline = time.monotonic() + self.timeout
        if self._ws is None:  # closed after a timeout or a lost connection
            self._reconnect(deadline)
        reply = self._round_trip(message, deadline)
        if not reply.get("ok", False):
            raise PolicyServerError(str(reply.get("error", "request refused without a message")))
        return reply

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this PolicyClient was closed (close(), or the end of its with block); build a new "
                               f"PolicyClient({self.url!r}) to talk to the server again")

    def _reconnect(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        open_timeout = min(self.connect_timeout, remaining)
        try:
            if open_timeout <= 0:
                raise ConnectionError("no time left")
            self._ws = _connect(self.url, open_timeout, self.max_reply_bytes)
        except ConnectionError as e:
            if open_timeout < self.connect_timeout and time.monotonic() >= deadline - 0.01:
                raise TimeoutError(f"could not reconnect to {self.url} within the call's timeout of "
                                   f"{self.timeout:g} s ({e}); the next call tries again") from None
            raise PolicyServerError(f"the connection was lost and reconnecting failed: {e}") from e
        try:
            self._check_protocol(deadline)
        except BaseException:
            if self._ws is not None:
                self._drop()
            raise

    def _check_protocol(self, deadline: float) -> None:
        """A new connection's server must speak this client's protocol version: the version its handshake
        response states, or else (a server that states none) the one its metadata reply does."""
        version = _server_version(self._ws.response)
        self.max_payload_bytes = _server_payload_limit(self._ws.response)
        if version is None:
            reply = self._round_trip({"type": "metadata"}, deadline)
            if not reply.get("ok", False):
                raise PolicyServerError(f"the server at {self.url} refused a metadata request: "
                                        f"{reply.get('error', 'no message')}")
            version = reply.get("protocol")
            server = reply.get("server")
            limit_mb = server.get("max_payload_mb") if isinstance(server, dict) else None
            if isinstance(limit_mb, (int, float)) and not isinstance(limit_mb, bool) and 0 < limit_mb < math.inf:
                self.max_payload_bytes = int(limit_mb * 2**20)
        if type(version) is not int or version != PROTOCOL_VERSION:  # a protocol number: not True, not 1.0
            raise _other_protocol(self.url, version)

    def _round_trip(self, message: dict, deadline: float) -> dict:
        """Send `message` with a fresh id and return the reply with that id, by `deadline`."""
        from websockets.exceptions import ConnectionClosed

        self._next_id += 1
        rid = self._next_id
        data = packb({**message, "id": rid})
        self._check_payload(data, message)
        try:
            self._send(data, deadline)
            while True:
                try:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    raw = self._ws.recv(timeout=remaining)
                except TimeoutError:
                    self._drop(deadline)
                    raise TimeoutError(f"no reply from {self.url} within {self.timeout:g} s; the connection was "
                                       "closed, which drops the request on the server, and the next call "
                                       "reconnects") from None
                try:
                    reply = unpackb(raw)
                except ProtocolError as e:
                    raise PolicyServerError(f"the server's reply to a {message.get('type')!r} request cannot be "
                                            f"decoded: {e}") from None
                if not isinstance(reply, dict):
                    raise PolicyServerError(f"server sent a reply that is not a map: {type(reply).__name__}")
                if reply.get("id", rid) == rid:  # older ids: late replies to requests that timed out here
                    return reply
        except ConnectionClosed as e:
            self._ws = None  # the next call reconnects
            raise self._closed_error(e) from None

    def _check_payload(self, data: bytes, message: dict) -> None:
        """Refuse a request larger than the server's limit before sending it: the server would refuse it, or
        close the connection (code 1009) when it is more than twice as large."""
        limit = self.max_payload_bytes
        if limit is None or len(data) <= limit:
            return
        size = f"{len(data) / 2**20:.2f} MiB ({len(data)} bytes)"
        if message.get("type") == "act":
            shapes = " and ".join(f"{field} {list(np.shape(message[field]))}" for field in ("image", "previous_image")
                                  if field in message)
            raise ValueError(f"this act request ({shapes}) takes {size}, more than the server's payload limit of "
                             f"{limit / 2**20:.2f} MiB ({limit} bytes): send smaller frames (the server resizes "
                             f"every frame to the policy's image_size, metadata()['image_size'], anyway), or start "
                             f"the server with a larger --max-payload-mb")
        raise ValueError(f"this {message.get('type')!r} request takes {size}, more than the server's payload limit "
                         f"of {limit / 2**20:.2f} MiB ({limit} bytes): start the server with a larger "
                         "--max-payload-mb")

    def _send(self, data: bytes, deadline: float) -> None:
        """Send by `deadline`. websockets' send has no deadline, so the socket's timeout bounds it: when
        the server reads nothing, the send fails and websockets closes the connection."""
        from websockets.exceptions import ConnectionClosed

        ws = self._ws
        with contextlib.suppress(OSError):  # a closed socket: send raises ConnectionClosed
            ws.socket.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            ws.send(data)
        except ConnectionClosed as e:
            if not isinstance(e.__cause__, TimeoutError):
                raise
            self._ws = None
            raise TimeoutError(f"could not send the request to {self.url} within {self.timeout:g} s (the server "
                               "is not reading: overloaded or stuck); the connection was closed and the next "
                               "call reconnects") from None
        except BaseException:
            # Interrupted (Ctrl-C) partway through writing the frame: the server would read the next request as the
            # rest of this one, so the connection is dropped and the next call reconnects.
            self._drop()
            raise
        finally:
            with contextlib.suppress(OSError):
                ws.socket.settimeout(None)

    def _closed_error(self, e) -> PolicyServerError:
        close = getattr(e, "rcvd", None)
        code = getattr(close, "code", None)
        reason = getattr(close, "reason", "") or ""
        if code is None and getattr(getattr(e, "sent", None), "code", None) == 1009:  # closed by this client
            return PolicyServerError(f"the server's reply is larger than this client's limit of "
                                     f"{self.max_reply_mb:g} MiB (max_reply_mb): build the PolicyClient "
                                     "with a larger max_reply_mb; the connection was closed and the next call "
                                     "reconnects")
        if code == 1009:
            return PolicyServerError(f"the server closed the connection: message too big ({reason or 'code 1009'});"
                                     " the request exceeds its payload limit (metadata()['server']"
                                     "['max_payload_mb']): send smaller frames")
        if code == 1001:
            return PolicyServerError("the server is shutting down (connection closed with code 1001)")
        return PolicyServerError(f"connection to {self.url} closed (code {code}{', ' + reason if reason else ''})")

    def metadata(self) -> dict:
        """Model and server description: action_dim, chunk_size, image_size [H, W], policy, server limits."""
        reply = self.request({"type": "metadata"})
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    def reset(self, instruction: str, episode=None):
        """Start an episode with a task instruction; returns its id. A refused reset (or one that fails:
        a timeout, a lost connection) ends the previous episode all the same: `act` raises until a reset
        succeeds, rather than going on with the old task."""
        self._check_open()
        self.episode = None
        if isinstance(instruction, (bytes, bytearray)):  # np.bytes_ too: HDF5 datasets give bytes
            raise ValueError(f"reset() takes the task instruction as str, got {type(instruction).__name__} "
                             f"{bytes(instruction[:40])!r}: decode it first (instruction.decode('utf-8'))")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("reset() needs the task instruction as a non-empty string")
        try:
            instruction.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: bytes decoded with errors="surrogateescape"
            raise ValueError(f"reset() takes the task instruction as text that UTF-8 can encode; it holds "
                             f"{e.object[e.start:e.end]!r} at character {e.start}, an undecodable byte: decode the "
                             f"instruction's bytes with their own encoding first") from None
        episode = uuid.uuid4().hex if episode is None else episode
        self.request({"type": "reset", "episode": episode, "instruction": instruction, "client": self.client_id})
        self.episode = episode
        return episode

    def act(self, image: np.ndarray, previous_image: np.ndarray | None = None) -> np.ndarray:
        """Action chunk [K, D] float32 for one RGB uint8 frame [H, W, 3] (an array of its own, writable). A reply
        whose actions are not floating point, or not finite as float32, raises `PolicyServerError`."""
        self._check_open()
        if self.episode is None:
            raise RuntimeError("no episode: call reset(instruction) before act() (a reset that was refused or "
                               "failed ends the previous episode)")
        message = {"type": "act", "episode": self.episode, "client": self.client_id,
                   "image": check_image(np.asarray(image), "image")}
        if previous_image is not None:
            message["previous_image"] = check_image(np.asarray(previous_image), "previous_image")
        reply = self.request(message)
        self.last_timing = reply.get("timing")
        actions = reply.get("actions")
        if not isinstance(actions, np.ndarray) or actions.ndim != 2:
            raise PolicyServerError(f"server reply has no [K, D] 'actions' array: {type(actions).__name__}")
        if actions.dtype.kind != "f":  # whole numbers or booleans are no actions a robot should step through
            raise PolicyServerError(f"server reply's 'actions' have dtype {actions.dtype}, not floating point: "
                                    "expected a float32 [K, D] chunk")
        # float32, as promised, and an array the caller may change in place (decoded arrays are read-only views
        # of the reply's bytes)
        if actions.dtype != np.float32 or not actions.flags.writeable:
            with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused just below
                actions = actions.astype(np.float32)
        bad = ~np.isfinite(actions)
        if bad.any():  # NaN, inf, or a float64 past float32's range: no command a robot can execute
            k, d = np.argwhere(bad)[0]
            raise PolicyServerError(f"server reply's 'actions' hold {int(bad.sum())} value(s) that are not finite "
                                    f"as float32, the first {actions[k, d]} at [{k}, {d}]: refusing the chunk")
        return actions

    def health(self) -> dict:
        """GET /healthz on the same host and port."""
        self._check_open()
        return health(self.url, timeout=self.timeout)

    # -------------------------------------------------------------- lifetime
    def _drop(self, deadline: float | None = None) -> None:
        """Close the connection after a timeout without waiting long for the server's side of the closing
        handshake (at most 0.2 s, and not past `deadline`, the call's: a robot's control loop holds to its
        timeout); the next request opens a new one."""
        ws, self._ws = self._ws, None
        wait = 0.2 if deadline is None else min(0.2, max(deadline - time.monotonic(), 1e-3))
        ws.close_timeout = min(ws.close_timeout, wait)
        ws.close()

    def close(self) -> None:
        """Close the connection; later calls raise RuntimeError (build a new client to go on)."""
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def __del__(self) -> None:
        # A client dropped without close(): its connection's reader thread would keep the connection (and one
        # of the server's --max-connections) open for as long as this process runs, answering the keepalive.
        ws = getattr(self, "_ws", None)  # None too when the constructor failed before connecting
        # At the interpreter's exit the connection closes with the process, and its reader thread (a daemon) no
        # longer runs: the closing handshake would wait for it forever.
        if ws is None or sys.is_finalizing():
            return
        self._ws = None
        with contextlib.suppress(Exception):
            ws.close_timeout = min(ws.close_timeout, 0.2)
            ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def health(url: str, timeout: float = 10.0) -> dict:
    """The server's /healthz JSON (HTTP status 200 while serving, 503 while shutting down), at the host and port
    of `url` (ws://, wss://, http:// or https://), whatever path it names: the server takes WebSocket connections
    on any path and reports its health at /healthz alone."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    http = f"{scheme}://{parts.netloc}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        try:
            with opener.open(http, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 503 while shutting down, with the same JSON
            return json.loads(e.read())
    except (OSError, ValueError) as e:  # URLError, timeouts; JSONDecodeError: not a policy server
        raise ConnectionError(f"no health report from {http}: {type(e).__name__}: {e}; is `worldvla serve` "
                              "running there?") from e
