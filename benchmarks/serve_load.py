"""Load test of the policy server: robots on loopback, valid and malformed traffic mixed.

    python -m benchmarks.serve_load                      # random small WorldVLA policy if available
    python -m benchmarks.serve_load --policy synthetic   # a torch MLP stand-in (no model code needed)
    python -m benchmarks.serve_load --checkpoint runs/policy --clients 8 --duration-s 60

The server runs in a subprocess (its own interpreter, as in deployment) built from the
same policy as the one timed in process here, so the numbers compare like with like:
  1. in-process `policy.act` on one frame (the floor);
  2. one robot, sequential requests: round-trip p50/p99 and the overhead over the policy: the
     percentiles of each request's round trip minus the policy time the server measured for that
     same request (`rtt_minus_policy_p50_ms`, `..._p99_ms`), with (1) beside it as the floor;
  3. `--clients` robots at once (some sending camera-sized frames the server resizes,
     some starting new episodes) plus `--bad-clients` sending malformed requests
     (garbage bytes, text frames, wrong dtypes and shapes, unknown episodes, payloads
     over the limit and over twice the limit): latency percentiles and throughput of the
     valid requests served, batch sizes, and the count of valid requests that failed
     (must be 0; not in the latencies) and of malformed ones not refused (must be 0);
  4. the server must still answer /healthz, then exit 0 on SIGTERM.
Every phase is bounded by a request count and a time limit. Writes
benchmarks/results/serve_load-<device>.json (serve_load-<device>-quick.json with --quick) and a
PNG beside it: each phase's latency percentiles, with the in-process floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from worldvla.cli import non_negative_float, non_negative_int, positive_float, positive_int
from worldvla.serve import PolicyClient, PolicyServer, PolicyServerError, health, packb, unpackb

# ---------------------------------------------------------------------------- policies


class SyntheticPolicy:
    """A stand-in with the policy interface and a model-like cost profile: a torch MLP
    over a pooled frame and the previous frame, whose cost is dominated by reading its
    weights (like token-by-token decoding), so batching pays off as it does for the model."""

    def __init__(self, image_size=64, chunk_size=5, action_dim=7, width=1024, layers=8, seed=0, device="cpu"):
        import torch

        self.torch = torch
        self.image_size, self.chunk_size, self.action_dim = image_size, chunk_size, action_dim
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        dims = [2 * 3 * 8 * 8] + [width] * layers + [chunk_size * action_dim]
        self.weights = [(torch.randn(a, b, generator=g) / a**0.5).to(self.device) for a, b in zip(dims[:-1], dims[1:])]
        self.config = dict(kind="synthetic", image_size=image_size, chunk_size=chunk_size, action_dim=action_dim,
                           width=width, layers=layers, seed=seed, device=str(self.device))
        self.instructions: list[str] = []

    def metadata(self):
        return {**self.config, "history": 2}

    def reset(self, instructions):
        self.instructions = list(instructions)

    @staticmethod
    def _pool(torch, frames, device):
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)

    def act(self, images, history=None):
        torch = self.torch
        with torch.inference_mode():
            cur = self._pool(torch, images, self.device)
            prev = self._pool(torch, history, self.device) if history is not None else torch.zeros_like(cur)
            h = torch.cat([cur, prev], 1)
            for i, w in enumerate(self.weights):
                h = h @ w
                if i < len(self.weights) - 1:
                    h = torch.nn.functional.gelu(h)
            out = torch.tanh(h).reshape(len(images), self.chunk_size, self.action_dim)
            return out.float().cpu().numpy()


def build_policy(spec: dict):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "synthetic":
        return SyntheticPolicy(**{k: v for k, v in spec.items() if k not in ("kind", "threads")})

    from worldvla.inference.policy import WorldVLAPolicy

    return WorldVLAPolicy.from_pretrained(spec["path"], device=spec.get("device"), dtype=spec.get("dtype"))


def random_checkpoint(size: str, out_dir: str, image_size: int, chunk_size: int, seed: int = 0) -> str:
    """A randomly initialised WorldVLA policy folder (tiny or small), written by save_policy."""
    import dataclasses

    import torch

    from worldvla.inference.policy import save_policy
    from worldvla.model import ModelConfig, WorldVLA
    from worldvla.tokens import ActionTokenizer, VocabLayout
    from worldvla.vqgan import VQGAN, VQGANConfig

    n_codes = 64 if size == "tiny" else 512
    layout = VocabLayout.compact(n_image_codes=n_codes)
    cfg = (ModelConfig.tiny if size == "tiny" else ModelConfig.small)(layout)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = WorldVLA(cfg)
    model.init_weights(0.02, g)
    vqgan = VQGAN(dataclasses.replace(VQGANConfig.small(), n_embed=n_codes))
    path = os.path.join(out_dir, f"random-{size}")
    save_policy(path, model.eval(), vqgan.eval(), ActionTokenizer(layout), chunk_size=chunk_size,
                image_size=image_size, history=2, extra={"random": True, "size": size})
    return path


def child_main(argv=None) -> int:
    """The server process: `<python> -c '...child_main()' SPEC_JSON SERVER_KWARGS_JSON`."""
    argv = sys.argv[1:] if argv is None else argv
    spec, kwargs = json.loads(argv[0]), json.loads(argv[1])
    policy = build_policy(spec)
    server = PolicyServer(policy, "127.0.0.1", 0, **kwargs)
    server.warmup()
    return server.serve_forever(on_ready=lambda s: print(f"PORT {s.port}", flush=True))


# ---------------------------------------------------------------------------- traffic


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


def _summary(latencies_ms: list[float], wall_s: float) -> dict:
    return {"requests": len(latencies_ms), "p50_ms": _pct(latencies_ms, 50), "p90_ms": _pct(latencies_ms, 90),
            "p99_ms": _pct(latencies_ms, 99), "max_ms": max(latencies_ms) if latencies_ms else None,
            "throughput_rps": len(latencies_ms) / wall_s if wall_s > 0 else None}


def single_robot_row(lat, policy_ms, server_ms, inproc, served_s: float, failed: int) -> dict:
    """The single-robot phase's row: round-trip percentiles, the in-process floor, and the overhead per
    request: each round trip (`lat`, ms) less the policy time the server measured for that same request
    (`policy_ms`, in the same order). (A p99 of the round trips less a p99 of separate in-process calls
    subtracted percentiles of two distributions, and came out negative.)"""
    transport = [x - y for x, y in zip(lat, policy_ms, strict=True)]
    return {"phase": "single-robot", "clients": 1, "bad_clients": 0, **_summary(lat, served_s),
            "inproc_p50_ms": _pct(inproc, 50), "inproc_p99_ms": _pct(inproc, 99),
            "served_policy_p50_ms": _pct(policy_ms, 50), "server_side_p50_ms": _pct(server_ms, 50),
            "rtt_minus_policy_p50_ms": _pct(transport, 50), "rtt_minus_policy_p99_ms": _pct(transport, 99),
            "failed_valid": failed}


def _bad_payloads(rng, size: int, limit_bytes: int, episode: str):
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    nd = {"__ndarray__": img.tobytes(), "dtype": "|u1", "shape": [size, size, 3]}
    return [
        ("garbage", lambda: rng.bytes(int(rng.integers(1, 300)))),
        ("text", lambda: "not msgpack"),
        ("not-a-map", lambda: packb([1, "two", 3.0])),
        ("no-type", lambda: packb({"episode": 1})),
        ("unknown-type", lambda: packb({"type": "teleport"})),
        ("unknown-episode", lambda: packb({"type": "act", "episode": "ghost-" + rng.bytes(4).hex(), "image": img})),
        ("float-image", lambda: packb({"type": "act", "episode": episode, "image": img.astype(np.float32)})),
        ("gray-image", lambda: packb({"type": "act", "episode": episode, "image": img[:, :, 0]})),
        ("short-bytes", lambda: packb({"type": "act", "episode": episode, "image": {**nd, "shape": [size, size, 4]}})),
        ("object-dtype", lambda: packb({"type": "act", "episode": episode, "image": {**nd, "dtype": "|O"}})),
        ("reset-no-instruction", lambda: packb({"type": "reset", "episode": episode})),
        ("over-limit", lambda: packb({"type": "metadata", "pad": b"\1" * (limit_bytes + 1024)})),
        ("over-2x-limit", lambda: packb({"type": "metadata", "pad": b"\1" * (2 * limit_bytes + 200_000)})),
    ]


def _connect_raw(url):
    import inspect

    from websockets.sync.client import connect

    kwargs = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
    return connect(url, compression=None, proxy=None, max_size=None, open_timeout=10, **kwargs)


def _open_episode(url, episode):
    """A raw connection with `episode` open on it: the malformed act requests name it, so that the server's frame
    checks, not its episode lookup, are what refuses them."""
    ws = _connect_raw(url)
    ws.send(packb({"type": "reset", "episode": episode, "instruction": "misbehave"}))
    reply = unpackb(ws.recv(timeout=30))
    if not (isinstance(reply, dict) and reply.get("ok")):
        ws.close()
        raise RuntimeError(f"the server refused the bad client's reset of episode {episode!r}: {reply!r}")
    return ws


def _bad_client(url, rng, size, limit_bytes, stop, max_requests, record):
    episode = "bad-" + rng.bytes(4).hex()  # its own: an episode belongs to one open connection
    payloads = _bad_payloads(rng, size, limit_bytes, episode)
    ws = _open_episode(url, episode)
    sent = 0
    try:
        while not stop.is_set() and sent < max_requests:
            kind, make = payloads[sent % len(payloads)]
            sent += 1
            record["sent"] += 1
            try:
                ws.send(make())
                reply = unpackb(ws.recv(timeout=30))
                error = reply.get("error") if isinstance(reply, dict) and reply.get("ok") is False else None
                if error and f"unknown episode {episode!r}" in str(error):  # the episode was lost: no frame checked
                    record["not_refused"].append(f"{kind}: refused for its lost episode, not its malformation")
                elif error:
                    record["refused"] += 1
                else:
                    record["not_refused"].append(kind)
            except Exception as e:
                if kind == "over-2x-limit" and getattr(getattr(e, "rcvd", None), "code", None) == 1009:
                    record["refused"] += 1  # closed with 1009 "message too big", as documented
                else:
                    record["not_refused"].append(f"{kind}: {type(e).__name__}: {e}")
                ws.close()
                ws = _open_episode(url, episode)  # a new connection holds no episode: open it again
            time.sleep(0.002)
    finally:
        ws.close()


def _robot(url, rng, size, camera_hw, steps_per_episode, stop, max_requests, lat, failures, barrier, native):
    h, w = (size, size) if native else camera_hw
    frames = rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8)
    try:
        with PolicyClient(url, timeout=120) as client:
            barrier.wait(60)
            n = 0
            while not stop.is_set() and n < max_requests:
                if n % steps_per_episode == 0:
                    client.reset(f"task {int(rng.integers(1000))}: move the block")
                t0 = time.perf_counter()
                try:
                    a = client.act(frames[n % len(frames)])
                    ms = (time.perf_counter() - t0) * 1e3
                    if not (a.dtype == np.float32 and a.ndim == 2 and np.isfinite(a).all()):
                        failures.append(f"bad actions {a.dtype} {a.shape}")
                    else:  # only requests served: a refusal or a timeout is a failure, not a latency
                        lat.append(ms)
                except (PolicyServerError, TimeoutError) as e:
                    failures.append(f"{type(e).__name__}: {e}")
                n += 1
    except Exception as e:
        failures.append(f"robot crashed: {type(e).__name__}: {e}")


def in_process_latency(policy, size, repeats, rng, batch=1) -> list[float]:
    import inspect

    takes_history = "history" in inspect.signature(policy.act).parameters
    frames = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    prev = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    policy.reset([f"task {i}: move the block" for i in range(batch)])
    call = (lambda: policy.act(frames, history=prev)) if takes_history else (lambda: policy.act(frames))
    for _ in range(3):
        call()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# ---------------------------------------------------------------------------- main


def run(quick: bool = False, device: str | None = None, out_dir: str = "benchmarks/results") -> Path:
    """Entry point in the style of the other benchmarks (`worldvla bench` can register it)."""
    args = parse_args(["--quick"] if quick else [])
    if device:
        args.device = device
    import torch

    threads = torch.get_num_threads()  # the in-process policy sets its own; the next benchmark gets them back
    try:
        return _main(args, out_dir)
    finally:
        torch.set_num_threads(threads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'benchmarks.serve_load'}", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", choices=["auto", "small", "tiny", "synthetic"], default="auto",
                   help="random WorldVLA policy (small/tiny; auto = small if save_policy exists, else synthetic; "
                        "default: %(default)s)")
    p.add_argument("--checkpoint", help="serve this policy folder instead of a random one")
    p.add_argument("--device", default=None, help="policy device (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="policy dtype for WorldVLA policies (float32, bfloat16; default: the saved weights' dtype, float32 "
                        "for the random ones)")
    p.add_argument("--torch-threads", type=positive_int, default=None,
                   help="torch CPU threads in both processes (default: 1 on CPU, where a busy machine makes "
                        "multi-threaded timings erratic; torch's default on CUDA)")
    p.add_argument("--image-size", type=positive_int, default=64,
                   help="model image size of random policies (default: %(default)s)")
    p.add_argument("--chunk-size", type=positive_int, default=5,
                   help="actions per chunk of random policies (default: %(default)s)")
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent valid robots (default: %(default)s; --quick: 3)")
    p.add_argument("--bad-clients", type=non_negative_int, default=2,
                   help="concurrent clients sending malformed requests (default: %(default)s; --quick: 1)")
    p.add_argument("--requests", type=positive_int, default=200,
                   help="at most this many requests per client in the load phase (default: %(default)s; --quick: 40)")
    p.add_argument("--sequential", type=positive_int, default=100,
                   help="requests of the single-robot phase (default: %(default)s; --quick: 30)")
    p.add_argument("--duration-s", type=positive_float, default=30.0,
                   help="time limit of the load phase (default: %(default)s; --quick: 5.0)")
    p.add_argument("--camera", type=camera_size, default="480x640",
                   help="HxW of frames sent by every other robot (resized by the server; default: %(default)s)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="the server's most act requests in one policy call, and the in-process batch compared "
                        "(default: %(default)s)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="how long the idle server waits for more requests before running a batch "
                        "(default: %(default)s)")
    p.add_argument("--max-payload-mb", type=positive_float, default=2.0,
                   help="the server's largest request, in MiB; one of the bad clients' requests is twice "
                        "that (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random policy's weights and the robots' frames (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for serve_load-<device>.json (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="3 robots, 1 bad client, 5 s, 40 requests each, 30 sequential (each unless given); "
                        "writes serve_load-<device>-quick.json")
    args = p.parse_args(argv)
    if args.quick:  # defaults, not overrides: `--quick --clients 16` ran 3 robots
        p.set_defaults(clients=3, bad_clients=1, duration_s=5.0, requests=40, sequential=30)
        args = p.parse_args(argv)
    h, w = args.camera
    limit = int(args.max_payload_mb * 2**20)  # as the server counts a request
    size = h * w * 3 if h * w * 3 > limit else act_request_bytes(h, w)
    if size > limit:  # the server would refuse every camera robot's request
        p.error(f"--camera {h}x{w} frames make act requests of {size} bytes, over --max-payload-mb "
                f"{args.max_payload_mb:g} ({limit} bytes): the server would refuse every request of the camera "
                "robots; raise --max-payload-mb or give a smaller --camera")
    return args


def act_request_bytes(h: int, w: int) -> int:
    """Bytes of a PolicyClient act request carrying one HxW frame, as the server receives it."""
    import uuid

    from worldvla.serve.protocol import packb

    ids = uuid.uuid4().hex  # the episode's and the client's; the request id at its widest (a uint32)
    return len(packb({"type": "act", "episode": ids, "client": ids, "image": np.zeros((h, w, 3), np.uint8),
                      "id": 2**32 - 1}))


def camera_size(text: str) -> tuple[int, int]:
    """argparse type of --camera: HxW, two integers >= 1 (a bare "480" crashed every camera robot mid-run)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(v.strip().isdecimal() and int(v) >= 1 for v in parts):
        raise argparse.ArgumentTypeError(f"expected HxW, two integers >= 1 such as 480x640, got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv=None) -> Path:
    args = parse_args(argv)
    path = _main(args, args.out)
    print(f"-> {path}")  # here, not in _main: `worldvla bench` prints the path of what run() returns
    return path


def _policy_spec(args, tmp: str) -> tuple[dict, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.torch_threads or (1 if device == "cpu" else None)
    if args.checkpoint:
        return {"kind": "checkpoint", "path": args.checkpoint, "device": device, "dtype": args.dtype,
                "threads": threads}, "checkpoint"
    kind = args.policy
    if kind == "auto":
        try:
            from worldvla.inference.policy import save_policy  # noqa: F401

            kind = "small"
        except ImportError:
            kind = "synthetic"
    if kind == "synthetic":
        return {"kind": "synthetic", "image_size": args.image_size, "chunk_size": args.chunk_size, "action_dim": 7,
                "seed": args.seed, "device": device, "threads": threads}, "synthetic-mlp"
    path = random_checkpoint(kind, tmp, args.image_size, args.chunk_size, args.seed)
    return {"kind": "checkpoint", "path": path, "device": device, "dtype": args.dtype,
            "threads": threads}, f"random-{kind}"


def _main(args, out_dir: str) -> Path:
    import msgpack
    import websockets

    try:
        from .common import load_average, write_results
    except ImportError:
        from benchmarks.common import load_average, write_results

    load0 = load_average()
    rng = np.random.default_rng(args.seed)
    camera_hw = args.camera
    tmp = tempfile.mkdtemp(prefix="serve_load-")
    spec, policy_name = _policy_spec(args, tmp)
    print(f"policy: {policy_name} ({spec})")

    # 1. the same policy in process, for the floor (kept alive to interleave with phase 2)
    policy = build_policy(spec)
    size = policy.image_size if isinstance(policy.image_size, int) else policy.image_size[0]
    inproc_batch = in_process_latency(policy, size, max(5, args.sequential // 4), rng, batch=args.max_batch)

    server_kwargs = {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "max_queue": 64,
                     "max_payload_mb": args.max_payload_mb, "request_timeout_s": 120.0}
    module = __spec__.name if __spec__ is not None else "benchmarks.serve_load"
    proc = subprocess.Popen([sys.executable, "-c", f"import {module} as m, sys; sys.exit(m.child_main())",
                             json.dumps(spec), json.dumps(server_kwargs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows, extra = [], {}
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server failed to start: {line}{proc.stderr.read()[-3000:]}")
        url = f"ws://127.0.0.1:{int(line.split()[1])}"

        # 2. one robot, sequential, in blocks alternating with in-process calls so that both
        # see the same machine load
        inproc, lat, policy_ms, server_ms, failures = [], [], [], [], []
        frames = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
        t_served = 0.0
        with PolicyClient(url, timeout=120) as c:
            c.reset("single robot: move the block")
            c.act(frames[0])
            n = 0
            while n < args.sequential:
                inproc += in_process_latency(policy, size, 10, rng)
                for _ in range(min(10, args.sequential - n)):
                    t0 = time.perf_counter()
                    try:
                        c.act(frames[n % len(frames)])
                    except (PolicyServerError, TimeoutError) as e:
                        failures.append(f"{type(e).__name__}: {e}")
                        continue
                    finally:
                        n += 1
                    dt = time.perf_counter() - t0
                    t_served += dt
                    lat.append(dt * 1e3)
                    policy_ms.append(c.last_timing["policy_ms"])
                    server_ms.append(c.last_timing["server_ms"])
        del policy
        rows.append(single_robot_row(lat, policy_ms, server_ms, inproc, t_served, len(failures)))
        print(json.dumps(rows[-1]))

    # 3. many robots + malformed traffic
        before = health(url)["stats"]
        stop = threading.Event()
        lat, failures = [], []
        bads = [{"sent": 0, "refused": 0, "not_refused": []} for _ in range(args.bad_clients)]  # one each: no shared +=
        barrier = threading.Barrier(args.clients)
        threads = [threading.Thread(target=_robot, args=(url, np.random.default_rng(args.seed + 1 + i), size,
                                                         camera_hw, 25, stop, args.requests, lat, failures, barrier,
                                                         i % 2 == 0)) for i in range(args.clients)]
        threads += [threading.Thread(target=_bad_client, args=(url, np.random.default_rng(args.seed + 100 + i), size,
                                                               int(args.max_payload_mb * 2**20), stop, args.requests,
                                                               bads[i])) for i in range(args.bad_clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        deadline = t0 + args.duration_s
        for t in threads[: args.clients]:
            t.join(max(0.0, deadline - time.perf_counter()))
        stop.set()
        for t in threads:
            t.join(150)
        wall = time.perf_counter() - t0
        bad = {"sent": sum(b["sent"] for b in bads), "refused": sum(b["refused"] for b in bads),
               "not_refused": [kind for b in bads for kind in b["not_refused"]]}
        after = health(url)
        batches = after["stats"]["batches"] - before["batches"]
        batched = after["stats"]["batched_requests"] - before["batched_requests"]
        calls = after["stats"]["policy_calls"] - before["policy_calls"]
        padded = after["stats"]["padded_rows"] - before["padded_rows"]
        load = _summary(lat, wall)
        rows.append({"phase": "load", "clients": args.clients, "bad_clients": args.bad_clients, **load,
                     "inproc_p50_ms": _pct(inproc, 50), f"inproc_batch{args.max_batch}_p50_ms": _pct(inproc_batch, 50),
                     "failed_valid": len(failures), "malformed_sent": bad["sent"], "malformed_refused": bad["refused"],
                     "malformed_not_refused": len(bad["not_refused"]), "batches": batches,
                     "mean_batch": batched / batches if batches else None, "policy_calls": calls,
                     "padded_rows": padded,
                     "max_batch_seen": after["stats"]["max_batch_seen"]})
        print(json.dumps(rows[-1]))
        if failures or bad["not_refused"]:
            print("valid failures:", failures[:10], "\nmalformed not refused:", bad["not_refused"][:10])

        # 4. alive, then a clean stop
        alive = health(url)["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        extra = {"load_average_start": load0,
                 "overhead": "rtt_minus_policy_p50_ms / _p99_ms: percentiles over the single robot's requests of "
                             "each round trip minus the policy time the server measured for that request",
                 "policy": policy_name, "policy_spec": spec, "server": server_kwargs, "camera_hw": list(camera_hw),
                 "server_alive_at_end": alive, "sigterm_exit_code": rc, "duration_limit_s": args.duration_s,
                 "requests_limit_per_client": args.requests, "websockets": websockets.__version__,
                 "msgpack": ".".join(map(str, msgpack.version)), "numpy": np.__version__,
                 "valid_failures_sample": failures[:10], "malformed_not_refused_sample": bad["not_refused"][:10],
                 "load_wall_s": wall, "cpu_count": os.cpu_count()}
        print(f"server alive at end: {alive}; exit code after SIGTERM: {rc}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    path = write_results("serve_load", rows, device=spec["device"], out_dir=out_dir, extra=extra, quick=args.quick)
    plot_latencies(rows, path.with_suffix(".png"), title=f"serve_load ({path.stem.split('-', 1)[1]})")
    return path


def plot_latencies(rows: list[dict], path, title: str) -> None:
    """Bars of each phase's p50 / p90 / p99 round trip, and the in-process p50 (the floor) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worldvla.checkpoint import write_atomic

    stats = ("p50_ms", "p90_ms", "p99_ms")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(stats)
    for i, key in enumerate(stats):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(key) or 0.0 for r in rows], width,
               label=key.replace("_ms", ""))
    floor = next((r["inproc_p50_ms"] for r in rows if r.get("inproc_p50_ms") is not None), None)
    if floor is not None:
        ax.axhline(floor, color="black", linewidth=1, linestyle="--", label="in-process act p50")
    ax.set_xticks([j + width for j in range(len(rows))],
                  [f"{r['phase']} ({r['clients']} robot{'s' * (r['clients'] != 1)})" for r in rows], fontsize=8)
    ax.set_ylabel("round trip (ms)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:  # whole or not at all, under a temporary name of its own: a failed save keeps the last good plot
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
