"""Serve a policy to robots: WebSocket + msgpack, batched across robots.

    worldvla serve --checkpoint runs/policy --port 8000

Protocol 1 (msgpack maps in binary frames; arrays as {"__ndarray__": bytes, "dtype": str,
"shape": list}, see `worldvla.serve.protocol`). Every request may carry an "id"
(int or str), echoed in its reply, and "protocol" (an int: a server refuses a version it
does not speak); each connection gets its replies in request order. A request carrying
any other field than these and those below is refused, naming the field.

  {"type": "reset", "episode": id, "instruction": str,
   "client": str (optional)}                                 -> {"ok": true, "episode": id}
  {"type": "act", "episode": id, "image": uint8 [H, W, 3],
   "previous_image": uint8 [H, W, 3] (optional),
   "client": str (optional)}                                 -> {"ok": true, "episode": id,
                                                                "actions": float32 [K, D],
                                                                "timing": {preprocess_ms, queue_ms,
                                                                           policy_ms, batch_size, retried,
                                                                           server_ms}}
  {"type": "metadata"}                                       -> {"ok": true, "protocol": 1, "action_dim",
                                                                "chunk_size", "image_size": [H, W],
                                                                "policy": {...}, "server": {limits}}
  anything refused                                           -> {"ok": false, "error": "what and how to fix"}

A refused 'reset' ends the episode it names all the same, whatever the reason (an instruction,
an unknown field, a bad 'client' or 'protocol'; when sent by the connection that holds it): an
'act' on that id is refused as an unknown episode until a 'reset' succeeds, so a robot never goes
on with its old task. `timing`, in milliseconds: `preprocess_ms` (arrival to queued: decoding,
resizing), `queue_ms` (waiting for the batch's policy work to start), `policy_ms` (from that
start to the end of the policy call that answered: a batch mixing episodes' first requests with
later ones makes two calls, one after the other), `server_ms` (arrival to reply); `batch_size`:
the requests in the answering call. When a batch's call fails, its requests run
again one at a time: the reply of one that succeeds then says `retried: true`, and its policy_ms
covers the failed call and the re-runs up to its own.

Frames of any size up to the payload limit are resized to the model's image size
(bilinear, no crop; send frames with the model's aspect ratio). `previous_image` is the
frame of the previous env step, which the release's two-frame prompt conditions on;
without it the frame of the episode's previous `act` is used. An episode belongs to the
connection that reset it until that connection closes (each robot needs its own episode
ids); `reset` and `act` may carry a "client" string (PolicyClient sends a token of its
own), and a request with the episode's client token takes it over on a new connection at
once (a robot reconnecting after a dropped network, whose old connection still looks open).
The server pings every connection every --keepalive-s seconds and drops one that has not
answered within as long again: a robot whose network went silent stops holding its episodes
(and the batches) within 2 x --keepalive-s. The WebSocket handshake may carry the client's
protocol version in a "WorldVLA-Protocol" header (`PolicyClient` sends it): the server refuses
another version there (HTTP 400, with the reason) and states its own in every response, which
`PolicyClient` checks on each new connection without a request of its own, and its payload
limit in bytes in a "WorldVLA-Max-Payload-Bytes" header: `PolicyClient` refuses a larger
request (ValueError) before sending it. `GET /healthz`
answers 200 with JSON while serving and 503 while shutting down.
SIGTERM/SIGINT: stop taking work, answer queued and running requests, close connections
with code 1001 (dropping those still open at the drain timeout), exit 0; exit 1 if a
policy call has not returned by then; a second signal exits at once (code 1).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..cli import POLICY_FOLDER_HELP, POLICY_MODE_CHOICES, non_negative_float, positive_float, positive_int
from ..devices import DTYPES
from .client import PolicyClient, PolicyServerError, health
from .protocol import ProtocolError, packb, unpackb
from .server import PolicyServer, check_address, check_batching_window

__all__ = ["PolicyServer", "PolicyClient", "PolicyServerError", "ProtocolError", "health", "packb", "unpackb",
           "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help=POLICY_FOLDER_HELP)
    parser.add_argument("--host", type=host_name, default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 to accept robots on the network)")
    parser.add_argument("--port", type=tcp_port, default=8000,
                        help="TCP port (0 picks a free one; default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device for the model: cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="model dtype (default: the dtype the checkpoint was saved in)")
    parser.add_argument("--mode", default=None, choices=POLICY_MODE_CHOICES,
                        help="chunk decoding (default: parallel, or causal for a model trained without the chunk "
                             "mask): parallel / sequential under the chunk mask, causal, or release (the release's "
                             "free greedy decoding over the whole vocabulary; a chunk holds as many actions as the "
                             "model writes)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="most act requests in one policy call (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                        help="how long an idle server waits for more requests before running a batch "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="act requests that may wait; more are refused with 'server busy' (default: %(default)s)")
    parser.add_argument("--max-payload-mb", type=positive_float, default=16.0,
                        help="largest request accepted, in MiB (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=60.0,
                        help="per-request limit, from arrival to reply, in seconds (default: %(default)s)")
    parser.add_argument("--max-episodes", type=positive_int, default=256,
                        help="episodes kept (each holds its last frame); the least recently used is dropped beyond "
                             "(default: %(default)s)")
    parser.add_argument("--keepalive-s", type=positive_float, default=5.0,
                        help="ping each connection every this many seconds and drop one that has not answered "
                             "within as long again, so that a robot whose network went silent (no close) stops "
                             "holding its episode ids and the batches within twice this (default: %(default)s)")
    parser.add_argument("--max-connections", type=positive_int, default=64,
                        help="connections open at once (each may hold a request of up to --max-payload-mb); one more "
                             "is refused at its handshake with the reason (default: %(default)s)")
    parser.add_argument("--no-pad-batches", action="store_true",
                        help="call the policy with the exact batch size instead of padding to a power of two")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up policy calls before serving")


def host_name(text: str) -> str:
    if not text.strip():  # asyncio would take it for every interface, and the server's address would name none
        raise argparse.ArgumentTypeError("give an address: 127.0.0.1 (this machine only) or 0.0.0.0 (every IPv4 "
                                         "interface)")
    return text


def tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535 (0 picks a free one), got {port}")
    return port


def _policy_summary(policy) -> str | None:
    """What a robot operator checks first: what the policy answers with and where it runs (None for a policy
    without `metadata()`)."""
    meta = policy.metadata() if hasattr(policy, "metadata") else None
    if not isinstance(meta, dict) or "chunk_size" not in meta:
        return None
    model = meta.get("model") or {}
    return (f"chunks of {meta['chunk_size']} actions x {meta.get('action_dim')} dims, {meta.get('image_size')} px "
            f"frames, {meta.get('history')} frame(s) of history, {meta.get('mode')} decoding; "
            f"{model.get('parameters', 0) / 1e6:.1f}M parameters in {model.get('dtype')} on {meta.get('device')}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        from ..inference.policy import WorldVLAPolicy
    except ImportError as e:
        print(f"worldvla serve: cannot import WorldVLAPolicy ({e})", file=sys.stderr)
        return 2
    # refused before the model loads and warms up (minutes for a large one), not after
    check_batching_window(args.max_wait_ms, args.timeout_s)
    check_address(args.host, args.port)
    kw = {} if args.mode is None else {"mode": args.mode}
    policy = WorldVLAPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, **kw)
    server = PolicyServer(policy, args.host, args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_queue=args.max_queue, max_payload_mb=args.max_payload_mb,
                          request_timeout_s=args.timeout_s, max_episodes=args.max_episodes,
                          pad_batches=not args.no_pad_batches, keepalive_s=args.keepalive_s,
                          max_connections=args.max_connections)
    if not args.no_warmup:
        server.warmup()

    def ready(s: PolicyServer) -> None:
        print(f"worldvla serve: listening on {s.url} (health: http://{s.url[5:]}/healthz)", flush=True)
        what = _policy_summary(policy)
        if what:
            print(f"worldvla serve: {args.checkpoint}: {what}", flush=True)

    return server.serve_forever(on_ready=ready)
