"""A static-cache inference engine: one prefill, then decode steps of a few query rows.

The KV cache is preallocated once ([layers, B, S, Hkv, Dh]); slot s of row b holds the
token at absolute position s of that row's sequence. What a query may see is described
by the `DecodeMeta` buffers the engine owns:

    kv_block [B, S]  action-block ordinal of the token in each slot (NO_BLOCK if none)
    kv_len   [B]     slots below kv_len are valid
    q_pos, q_limit [B, Q]  per query row of a step of Q rows

These are static tensors updated in place, so a decode step has fixed addresses and on
CUDA it is captured once per query count Q in a CUDA graph and replayed afterwards; on
the CPU, where `auto` runs the layers natively, the whole step becomes one native call on
those addresses (`ops.decoder.DecodeStepPlan`).
Prefill (long, variable length) always runs eagerly.

Everything the engine keeps across calls (the cache, the metadata, the step buffers, plans and
graphs) is made outside `torch.inference_mode`, whatever the caller's mode: an inference tensor
could not be updated in place by a later call made outside it.

Rows may have different prompt lengths. A prefill right-pads the shorter rows; the pad
tokens write junk into slots past the row's prompt, which is harmless: every later query
sees only slots <= its own position that belong to the prompt or to its own block, and
each of those is written (by the step that feeds that token) before any query sees it.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..checks import is_count, is_integer
from ..mask import NO_BLOCK, DecodeMeta, chunk_mask_meta
from ..model import KVCache
from ..ops import dispatch
from ..ops.decoder import DECODE_STEP_MAX_QUERIES, DecodeStepPlan, native_step_active
from ..tokens.layout import VocabLayout


def _cuda_autocast() -> tuple:
    """CUDA autocast's state as a captured graph depends on it: (enabled, dtype), the dtype None when off."""
    on = torch.is_autocast_enabled("cuda")
    return (on, torch.get_autocast_dtype("cuda") if on else None)


@dataclass
class StepBuffers:
    """Static inputs and output of a decode step with Q query rows per sequence."""
    ids: torch.Tensor      # [B, Q] int64
    pos: torch.Tensor      # [B, Q] int64 (cache slots = RoPE positions)
    q_pos: torch.Tensor    # [B, Q] int32
    q_limit: torch.Tensor  # [B, Q] int32
    meta: DecodeMeta
    out: torch.Tensor | None = None  # [B, Q, H] hidden states of the last run
    graph: "torch.cuda.CUDAGraph | None" = None
    graph_autocast: tuple | None = None    # CUDA autocast (enabled, dtype) the graph was captured under
    plan: "DecodeStepPlan | None" = None  # the CPU's one-call step (ops.decoder), built on first use
    plan_grad: bool = False                # whether gradients were on when `plan` was built

    def set_positions(self, pos: torch.Tensor) -> None:
        self.pos.copy_(pos)
        self.q_pos.copy_(pos)

    def advance(self, n: int = 1) -> None:
        """Move every query row n positions on (the next token of each sequence)."""
        self.pos.add_(n)
        self.q_pos.add_(n)


@dataclass
class PrefixSnapshot:
    """Cached keys/values of the first `n_slots` slots of every row (a constant prompt prefix)."""
    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int]

    @property
    def n_slots(self) -> int:
        return self.k.shape[2]


@contextmanager
def outside_inference_mode():
    """Make tensors kept across calls as normal tensors: an inference tensor (made under
    `torch.inference_mode`) cannot be updated in place by a later call outside it. The grad mode is kept:
    `torch.inference_mode(False)` alone turns gradients on."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def _unwrapped(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the module it runs


def _model_state(model) -> tuple:
    """Everything about `model` a decode step's native plan or CUDA graph fixes when it is made, and the
    weights' version counters apart: every module (identity, class, training mode, forward hooks),
    every parameter and buffer (identity, address, dtype, shape), torch's global forward hooks; then
    the version counters (in-place updates, which only copies of the weights miss). A walk of the
    modules' dictionaries (about 0.3 ms for the 7B config's 900 modules and tensors, 40 us for the
    small one; a walk by `named_modules` took 1.1 ms)."""
    from torch.nn.modules import module as M
    items, versions = [], []
    add = items.append
    stack = [model]
    while stack:
        m = stack.pop()
        d = m.__dict__  # a wrapper (torch.compile's OptimizedModule) forwards `training` to what it wraps
        hooks, pre = d.get("_forward_hooks"), d.get("_forward_pre_hooks")
        add((id(m), type(m), d["training"] if "training" in d else m.training, tuple(hooks) if hooks else None,
             tuple(pre) if pre else None))
        for group in (d.get("_parameters", {}), d.get("_buffers", {})):
            for t in group.values():
                if t is not None:
                    add((id(t), t.data_ptr(), t.dtype, t.shape))
                    versions.append(None if t.is_inference() else t._version)
        stack.extend(d.get("_modules", {}).values())
    return (tuple(items), tuple(M._global_forward_hooks), tuple(M._global_forward_pre_hooks)), tuple(versions)


class InferenceEngine:
    """Prefill + decode on a preallocated cache for `batch_size` sequences of up to `max_len` tokens.

    `cuda_graphs`: None = on for CUDA models, off otherwise. `backend`: attention backend
    ("auto" = the model's `attn_backend`).
    """

    def __init__(self, model, batch_size: int, max_len: int, *, layout: VocabLayout | None = None,
                 cuda_graphs: bool | None = None, backend: str = "auto"):
        for name, x in (("batch_size", batch_size), ("max_len", max_len)):
            if not is_integer(x):  # sizes of the preallocated tensors
                raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
        batch_size, max_len = int(batch_size), int(max_len)
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} slots exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}; shorten the prompt or raise max_position_embeddings")
        p = next(model.parameters())
        self.model = model
        self.layout = layout or model.layout
        if self.layout is None:
            raise ValueError("the model has no vocabulary layout; pass layout= (a VocabLayout)")
        self.device, self.dtype = p.device, p.dtype
        self.batch_size, self.max_len = batch_size, max_len
        self.backend = model.attn_backend if backend == "auto" else backend
        with outside_inference_mode():  # updated in place by every call, in inference mode or not
            self.cache = KVCache(cfg, batch_size, max_len, device=self.device, dtype=self.dtype)
            self.kv_block = torch.full((batch_size, max_len), NO_BLOCK, dtype=torch.int32, device=self.device)
            self.kv_len = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a model on a CUDA device; use cuda_graphs=None or False on CPU")
        self.cuda_graphs = bool(cuda_graphs)
        self._steps: dict[int, StepBuffers] = {}
        self._pool = None
        self._capture_stream = None  # every capture of this engine's graphs, which share `_pool`, on one stream
        self._model_state = self._versions = None  # the model the steps' plans and graphs were made for

    # ------------------------------------------------------------------ the model's state
    def mismatch(self, model=None) -> str | None:
        """Why this engine cannot run `model` (default: its own), or None: another model than the one
        it was built for (a torch.compile wrapper of that one is the same), or that model moved or
        converted (`model.to(...)`) since the cache was allocated in the old dtype and device."""
        if model is not None and _unwrapped(model) is not _unwrapped(self.model):
            return "this engine was built for another model; build one for this model (or pass no engine)"
        p = next(self.model.parameters())
        if (p.device, p.dtype) != (self.device, self.dtype):
            return (f"the model is now {p.dtype} on {p.device} but this engine's cache was allocated for "
                    f"{self.dtype} on {self.device}; build a new engine after model.to(...)")
        return None

    def check_serves(self, model) -> None:
        """Raise ValueError if this engine cannot run `model` (`mismatch`)."""
        why = self.mismatch(model)
        if why:
            raise ValueError(why)

    def check_model(self) -> bool:
        """Drop the decode steps' native plans and CUDA graphs if the model changed since they were made
        (they are rebuilt on first use); returns whether it had. Both hold the model's weights by
        address and run its modules as they were: a change is a module replaced or subclassed (an
        adapter), a weight replaced, moved or converted (`model.to(...)`), a forward hook added or
        removed, or the training mode. Weights updated in place (`load_state_dict`, an optimizer step)
        are read as they are, except by plans holding copies of some weights (bfloat16 copies of a
        float32 model's projections, ops.decoder.BF16_EXACT_WEIGHTS; float32 copies of a bfloat16
        model's norms; the release's shared head-norm rows repeated per head), which are dropped then; updates through `.data`, which bypass the version
        counters, are not seen by those.

        `prefill` calls it, so every generation starts on the model as it is; steps that continue a
        prefill do not check again (about 50 us a step on a CPU): call it yourself after changing the
        model between a prefill and the steps that follow it. After writes through `.data`, bump the
        weights' version counters (`torch.autograd.graph.increment_version`), which the native kernels'
        own copies follow too, or for inference tensors, which have none, call `drop_weight_copies`
        (`WorldVLAPolicy.clear_caches` does both). A model moved or converted since the engine was
        built is refused (ValueError): the cache holds the old dtype and device."""
        self.check_serves(self.model)
        structure, versions = _model_state(self.model)
        if structure != self._model_state:
            for buf in self._steps.values():
                buf.plan = buf.graph = None
        elif versions != self._versions:
            for buf in self._steps.values():
                if buf.plan is not None and buf.plan.copies:
                    buf.plan = None
        else:
            return False
        self._model_state, self._versions = structure, versions
        return True

    def drop_weight_copies(self) -> None:
        """Drop the native plans that hold copies of weights (`check_model`; rebuilt on first use): after
        weights were written where their version counters do not show it (through `.data`). A rebuilt plan
        of a float32 model takes its bfloat16 copies from `ops.native_backend.bf16_projections`, keyed by the
        version counters: bump them too (`check_model`)."""
        for buf in self._steps.values():
            if buf.plan is not None and buf.plan.copies:
                buf.plan = None

    # ------------------------------------------------------------------ forward
    def _on_device(self):
        """The engine's GPU as the current device: Triton launches its kernels on the current device, and a
        capture records the current device's work, whichever device the tensors are on (a model on cuda:1)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def _forward(self, ids, pos, meta: DecodeMeta) -> torch.Tensor:
        """The model's cached forward: no host synchronization, so capturable in a CUDA graph."""
        return self.model.hidden_states(ids, cache=self.cache, position_ids=pos, decode_meta=meta, backend=self.backend)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompts, skip=None, *, return_all: bool = False, release: bool = False) -> torch.Tensor:
        """Write `prompts` (one 1-D id tensor per row, lengths may differ) into the cache.

        `skip[b]` leading tokens of row b are already cached (a restored prefix) and are not
        recomputed. The chunk-rule metadata of the whole prompt fills `kv_block` (for a model
        trained with plain causal attention, nothing is hidden); slots past the prompt get NO_BLOCK. Returns
        the final hidden state of each row's last token [B, H] (or every computed row [B, Lq, H] padded, with
        `return_all`). `release`: each prompt
        as the release's free decoding prefills it (`generate_release_actions`): its action blocks paired as the
        release's mask pairs them (`chunk_mask_meta(..., release_pairing=True)`), and every row under the mask's
        last row (causal, and what the last token may see), not the chunk rule row by row. The two differ only
        where a row of the prompt hides an earlier block (a block after the last image with one before it); the
        prompts are then computed whole, cached prefixes included.
        """
        B = self.batch_size
        if len(prompts) != B:
            raise ValueError(f"this engine holds {B} sequences but got {len(prompts)} prompts")
        if self.model.training and self.model.config.dropout > 0:
            warnings.warn(f"decoding a model in training mode: its dropout ({self.model.config.dropout}) makes "
                          f"the output random; call model.eval() first",
                          RuntimeWarning, stacklevel=3)
        self.check_model()
        skip = [0] * B if skip is None else list(skip)
        if len(skip) != B:
            raise ValueError(f"skip gives cached prefixes for {len(skip)} rows; this engine holds {B}")
        for b, s in enumerate(skip):
            if isinstance(s, bool) or int(s) != s:  # int() would truncate a fraction to another prefix
                raise ValueError(f"skip[{b}] must be a whole number of tokens, got {s}")
        skip = [int(s) for s in skip]
        prompts = [torch.as_tensor(p) for p in prompts]
        for b, p in enumerate(prompts):  # before the cast, which would truncate fractions and wrap bools to ids
            dispatch.require_integers(p, f"prompt {b}: token ids must be integers")
        prompts = [p.long().flatten().cpu() for p in prompts]
        lens = [int(p.numel()) for p in prompts]
        for b, (L, s) in enumerate(zip(lens, skip)):
            if not 0 <= s < L:
                raise ValueError(f"row {b}: {s} cached prefix tokens for a prompt of {L} tokens; a prompt must "
                                 f"have at least one token past its cached prefix")
            self.layout.check_ids(prompts[b])
        chunk_rule = self.model.config.attention == "chunk"  # a causal model keeps q_limit -1: nothing hidden
        metas = [chunk_mask_meta(p, self.layout, release_pairing=release) if chunk_rule else None for p in prompts]
        whole = [release and chunk_rule and int(m.q_limit.max()) >= 1 for m in metas]
        for b in (b for b, w in enumerate(whole) if w):
            metas[b].q_limit.fill_(int(metas[b].q_limit[-1]))
        if any(whole):  # rows are padded to the longest uncached part: a whole one might not fit beside a prefix
            skip = [0] * B
        Lq = max(L - s for L, s in zip(lens, skip))
        if max(lens) > self.max_len:
            raise ValueError(f"prompts of up to {max(lens)} tokens do not fit a cache of {self.max_len} slots; "
                             f"build the engine with a larger max_len")
        if max(s + Lq for s in skip) > self.max_len:  # the rows are padded to the longest uncached part
            b = max(range(B), key=lambda b: skip[b])
            raise ValueError(f"row {b}'s cached prefix of {skip[b]} tokens and the batch's longest uncached part "
                             f"({Lq} tokens, to which every row is padded) need {skip[b] + Lq} cache slots; the "
                             f"engine has {self.max_len}: build it with a larger max_len")
        ids = torch.full((B, Lq), self.layout.pad, dtype=torch.long)
        q_limit = torch.full((B, Lq), -1, dtype=torch.int32)
        kv_block = torch.full((B, self.max_len), NO_BLOCK, dtype=torch.int32)
        for b, (p, L, s, meta) in enumerate(zip(prompts, lens, skip, metas)):
            ids[b, :L - s] = p[s:]
            if chunk_rule:
                q_limit[b, :L - s] = meta.q_limit[s:]
                kv_block[b, :L] = meta.kv_block
        pos = torch.tensor(skip).view(B, 1) + torch.arange(Lq).view(1, Lq)
        dev = self.device
        self.kv_block.copy_(kv_block)
        self.kv_len.copy_(torch.tensor(lens, dtype=torch.int32))
        ids, pos = ids.to(dev), pos.to(dev)
        meta = DecodeMeta(pos.to(torch.int32), q_limit.to(dev), self.kv_block, self.kv_len)
        with self._on_device():
            h = self._forward(ids, pos, meta)
        if return_all:
            return h
        last = torch.tensor([L - s - 1 for L, s in zip(lens, skip)], device=dev)
        return h[torch.arange(B, device=dev), last]

    # ------------------------------------------------------------------ decode steps
    def buffers(self, n_queries: int) -> StepBuffers:
        """The static buffers of a step with `n_queries` rows per sequence (created on first use)."""
        buf = self._steps.get(n_queries)
        if buf is None:
            if n_queries < 1:
                raise ValueError(f"a decode step has at least one query row per sequence, got {n_queries}")
            B, dev = self.batch_size, self.device
            with outside_inference_mode():  # written in place by every later step
                pos = torch.zeros(B, n_queries, dtype=torch.long, device=dev)
                q_pos = torch.zeros(B, n_queries, dtype=torch.int32, device=dev)
                q_limit = torch.full((B, n_queries), -1, dtype=torch.int32, device=dev)
                ids = torch.full((B, n_queries), self.layout.pad, dtype=torch.long, device=dev)
            buf = StepBuffers(ids, pos, q_pos, q_limit, DecodeMeta(q_pos, q_limit, self.kv_block, self.kv_len))
            self._steps[n_queries] = buf
        return buf

    @torch.no_grad()
    def run(self, buf: StepBuffers) -> torch.Tensor:
        """One decode step on the buffers' current contents -> hidden [B, Q, H].

        The returned tensor is the step's static output on CUDA-graph engines and where the
        CPU runs the step as one native call (a DecodeStepPlan): it is overwritten by the next
        run with the same Q, and on CUDA-graph engines by a run with any Q (the graphs of every
        step size share one memory pool), so consume (or copy) it before the next run.
        The caller guarantees that every position in `buf.pos` lies below `max_len`.
        """
        if self._model_state is None:  # steps before any prefill
            self.check_model()
        with self._on_device():
            return self._run(buf)

    def _run(self, buf: StepBuffers) -> torch.Tensor:
        if not self.cuda_graphs:
            plan = self._plan(buf)
            buf.out = plan() if plan is not None else self._forward(buf.ids, buf.pos, buf.meta)
            return buf.out
        if buf.graph is not None and buf.graph_autocast != _cuda_autocast():
            buf.graph = None  # captured with other casts (autocast turned on, off or to another dtype since)
        if buf.graph is None:
            try:
                self._capture(buf)
            except Exception as err:  # a backend that syncs or allocates on the host cannot be captured
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(err).__name__}: {err}); "
                              f"running eagerly instead", RuntimeWarning, stacklevel=3)
                self.cuda_graphs = False
                torch.cuda.synchronize(self.device)
                buf.out = self._forward(buf.ids, buf.pos, buf.meta)
                return buf.out
        buf.graph.replay()
        return buf.out

    def step_plan(self, n_queries: int):
        """The native plan the CPU runs steps of `n_queries` rows per sequence with now (a DecodeStepPlan
        with a step), else None."""
        return self._plan(self.buffers(n_queries))

    def max_step_rows(self) -> int | None:
        """The most query rows per sequence one step may run while each row comes out bit for bit as in a
        one-row step (parallel chunk decoding then gives the sequential tokens exactly), or None where any
        number is taken to. On the CPU the one-call step (DecodeStepPlan) computes each row alike up to
        DECODE_STEP_MAX_QUERIES rows; a bigger step goes layer by layer, and the layer-by-layer path is not
        row-invariant at all (torch's GEMM takes another kernel for one row than for several: about 4e-6 apart
        in float32, enough to flip a near-tie between two bins), so there it is 1. On CUDA the decode attention
        kernels launch steps of up to DECODE_PLAN_QUERIES rows as one row (worldvla.mask); the projections'
        (cuBLAS) row invariance has not been measured (tests/test_inference.py's GPU tests check both)."""
        if self.device.type != "cpu":
            return None
        return DECODE_STEP_MAX_QUERIES if self.backend == "auto" and native_step_active(self.dtype) else 1

    def _plan(self, buf: StepBuffers):
        """The step's native plan where one runs it now (the CPU; ops.decoder.DecodeStepPlan), else None.
        Built on first use, and again after `check_model` found the model changed."""
        if self.device.type != "cpu" or self.backend != "auto" or not native_step_active(self.dtype):
            return None
        # Built only while active: not under a dispatch mode, which it would refuse. A plan refused while
        # gradients were on (weights that need them) is tried again once they are off.
        if buf.plan is None or (buf.plan.step is None and buf.plan_grad and not torch.is_grad_enabled()):
            with outside_inference_mode():  # its static output and weight copies outlive this call
                buf.plan = DecodeStepPlan(self.model, self.cache, buf.ids, buf.pos, buf.meta)
            buf.plan_grad = torch.is_grad_enabled()
        return buf.plan if buf.plan.step is not None else None

    def _capture(self, buf: StepBuffers) -> None:
        """Capture the step on the buffers' current (real) inputs. The warm-up runs write the
        same keys/values the step itself writes, so capturing mid-generation is harmless.
        Under autocast the weights' casts are not cached: a graph would read the cached copies by address
        after the caller's autocast block freed them (torch's make_graphed_callables refuses that cache)."""
        state = _cuda_autocast()
        amp = torch.autocast("cuda", dtype=state[1], cache_enabled=False) if state[0] else nullcontext()
        with outside_inference_mode(), amp:  # the graph's output is kept for every later replay
            torch.cuda.synchronize(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(buf.ids, buf.pos, buf.meta)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # torch's default capture stream is made once per process, on the device current then: a stream of
            # the engine's own device instead, the same for every graph sharing the pool (as torch asks).
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (a server's request handling) during the capture is theirs,
            # not an error of this capture (the default, global, fails the capture for it)
            with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream,
                                  capture_error_mode="thread_local"):
                out = self._forward(buf.ids, buf.pos, buf.meta)
        buf.graph, buf.out, buf.graph_autocast = graph, out, state

    # ------------------------------------------------------------------ metadata helpers
    def set_kv_len(self, lengths) -> None:
        """Slots below lengths[b] of row b are valid (one number: the same for every row)."""
        t = torch.as_tensor(lengths, dtype=torch.int32)
        if t.numel() not in (1, self.batch_size):
            raise ValueError(f"kv lengths take one length per row ({self.batch_size}) or one for every row, got "
                             f"{t.numel()}")
        self.kv_len.copy_(t.reshape(-1))

    # ------------------------------------------------------------------ prefix cache
    @torch.no_grad()
    def snapshot_prefix(self, lengths) -> PrefixSnapshot:
        """Copy the keys/values of the first max(lengths) slots of every row (`lengths`: one per row)."""
        lengths = list(lengths)
        if not all(is_integer(x) for x in lengths):  # int() cut 2.5 to a prefix of 2 slots without a word
            raise ValueError(f"prefix lengths must be integers (slots), got {lengths}")
        lengths = [int(x) for x in lengths]
        if len(lengths) != self.batch_size:
            raise ValueError(f"a prefix snapshot takes one length per row ({self.batch_size}), got {len(lengths)}")
        if not all(0 <= x <= self.max_len for x in lengths):  # a negative one would slice from the end
            raise ValueError(f"prefix lengths must lie in [0, {self.max_len}] (the engine's slots), got {lengths}")
        n = max(lengths)
        with outside_inference_mode():  # kept by the caller, maybe past an inference_mode block
            return PrefixSnapshot(self.cache.k[:, :, :n].clone(), self.cache.v[:, :, :n].clone(), lengths)

    @torch.no_grad()
    def restore_prefix(self, snap: PrefixSnapshot) -> None:
        if snap.k.shape[1] != self.batch_size:
            raise ValueError(f"a prefix snapshot of {snap.k.shape[1]} rows does not fit an engine of {self.batch_size}")
        n = snap.n_slots
        if n > self.max_len:
            raise ValueError(f"a prefix snapshot of {n} slots does not fit an engine of {self.max_len}")
        self._check_kv("a prefix snapshot", snap.k, snap.v, self.cache.k[:, :, :n])
        self.cache.k[:, :, :n].copy_(snap.k)
        self.cache.v[:, :, :n].copy_(snap.v)


    def row_prefix(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of row `row`'s first `n` slots, [layers, n, Hkv, Dh] each (made
        outside inference mode: a caller keeps them)."""
        self._check_row(row)
        if not is_integer(n) or not 0 <= n <= self.max_len:
            raise ValueError(f"n must be an integer in [0, {self.max_len}] (the engine's slots), got {n!r}")
        with outside_inference_mode():
            return self.cache.k[:, row, :n].clone(), self.cache.v[:, row, :n].clone()

    @staticmethod
    def _check_kv(what: str, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Keys and values to write into `slots` (a view of the cache) must have its shape: a model with other
        layers, heads or head size wrote them otherwise."""
        if k.shape != v.shape:
            raise ValueError(f"{what}'s keys ({k.shape[-3]} slots) and values ({v.shape[-3]} slots) differ: shapes "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape != slots.shape:
            raise ValueError(f"{what} of shape {tuple(k.shape)} does not fit this engine's cache, which takes "
                             f"{tuple(slots.shape)} ([layers, ..., slots, kv heads, head dim]): take it from an engine "
                             f"of the same model")

    def _check_row(self, row: int) -> None:
        if not is_integer(row) or not 0 <= row < self.batch_size:  # a negative row would name another row's slots
            raise ValueError(f"row must be an integer in [0, {self.batch_size}) (the engine's batch rows), got {row!r}")

    @torch.no_grad()
    def set_row_prefix(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values from `row_prefix` (of this model) into row `row`'s first slots."""
        n = k.shape[1]
        self._check_row(row)
        if n > self.max_len:
            raise ValueError(f"a prefix of {n} slots does not fit an engine of {self.max_len}")
        self._check_kv("a row prefix", k, v, self.cache.k[:, row, :n])
        self.cache.k[:, row, :n].copy_(k)
        self.cache.v[:, row, :n].copy_(v)


def engine_for(model, prompts, new_tokens: int, *, layout: VocabLayout | None = None, backend: str = "auto",
               cuda_graphs: bool | None = None) -> InferenceEngine:
    """An engine with a row per prompt and room for the longest prompt plus `new_tokens`."""
    if len(prompts) == 0:
        raise ValueError("an engine needs at least one prompt (one cache row each), got none")
    if not is_count(new_tokens, 0):  # fewer slots than the longest prompt were refused only at its prefill
        raise ValueError(f"new_tokens must be an integer >= 0, got {new_tokens!r}")
    longest = max(int(torch.as_tensor(p).numel()) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + new_tokens > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) and the {new_tokens} tokens to generate need "
                         f"{longest + new_tokens} positions, more than the model's max_position_embeddings {limit}; "
                         f"generate fewer tokens (fewer actions, a smaller max_new_tokens) or shorten the prompt")
    max_len = longest + new_tokens
    return InferenceEngine(model, len(prompts), max_len, layout=layout, backend=backend, cuda_graphs=cuda_graphs)


__all__ = ["InferenceEngine", "StepBuffers", "PrefixSnapshot", "engine_for"]
