"""The WorldVLA chunk attention rule as compact per-token metadata (spec section 3).

Rule of the release (`generate_att_mask_3`): causal attention, except that every
token of an action block that starts after the document's last image end may not
attend to any earlier action block. Two int32 vectors encode it exactly:

    kv_block[j]  = ordinal of the action block holding token j, NO_BLOCK if none
    q_limit[i]   = ordinal of i's block if that block starts after the last EOI, else -1

    may_attend(i, j) = j <= i  and  doc(i) == doc(j)  and  not kv_block[j] < q_limit[i]

Block ordinals grow along the sequence, so "kv_block[j] < q_limit[i]" is exactly
"j lies in an earlier action block". Kernels compare two integers per (i, j) pair,
and a tile is fully masked when max(kv_block) < min(q_limit) over the tile, fully
visible (apart from causality) when min(kv_block) >= max(q_limit).

Training data and the structured decoders take well-formed blocks only (BOA, ids, EOA; none
nested, none closing unopened). The release's free decoding (mode="release") may write one
more thing its mask accepts: `release_pairing=True` admits it (see `chunk_mask_meta`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens.layout import VocabLayout

NO_BLOCK = 1 << 30


@dataclass
class ChunkMaskMeta:
    """Per-token metadata for `worldvla.ops.masked_attention`.

    Padded batch: tensors are [B, L], `cu_seqlens` is None.
    Packed batch: tensors are [T], `cu_seqlens` int32 [n_docs + 1] marks the documents, and `max_seqlen` is at
    least the longest document's length, or 0 for unknown (the fast paths then read `cu_seqlens` on the host:
    a synchronization on a GPU). On the GPU it is trusted, as FlashAttention's varlen `max_seqlen` is: the
    kernels launch row tiles for `max_seqlen` rows per document, so a smaller value leaves the rows past it
    unwritten. `chunk_mask_meta` and `causal_meta` set it; CPU inputs are checked at every call, and `to()`
    checks it when it moves CPU metadata to another device (a free read there). Nor are the values of a GPU
    `cu_seqlens` read: the kernels clamp every document to the T tokens, so wrong boundaries give wrong rows
    but never an access outside the tensors.
    """
    kv_block: torch.Tensor       # int32
    q_limit: torch.Tensor        # int32
    position_ids: torch.Tensor   # int64, restarting at 0 in each document
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device) -> "ChunkMaskMeta":
        cu = self.cu_seqlens
        if cu is not None and cu.device.type == "cpu" and torch.device(device).type != "cpu":
            check_cu_seqlens(self, self.kv_block.shape[0])  # the entry points' check, while the read is free
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)
        return ChunkMaskMeta(mv(self.kv_block), mv(self.q_limit), mv(self.position_ids), mv(self.cu_seqlens), self.max_seqlen)

    def doc_ids(self) -> torch.Tensor:
        """Document index of every token ([T] packed, [B, L] zeros padded)."""
        if not self.packed:
            return torch.zeros_like(self.kv_block)
        tokens = torch.arange(self.kv_block.shape[-1], device=self.kv_block.device, dtype=self.cu_seqlens.dtype)
        # right=True: a token at a boundary starts the next document; empty documents are skipped
        return torch.searchsorted(self.cu_seqlens[1:].contiguous(), tokens, right=True).to(torch.int32)

    def dense_mask(self) -> torch.Tensor:
        """Dense bool mask, True = may attend: [B, L, L] padded or [T, T] packed."""
        kv, ql = self.kv_block, self.q_limit
        L = kv.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool, device=kv.device).tril()
        allowed = causal & ~(kv.unsqueeze(-2) < ql.unsqueeze(-1))
        if self.packed:
            doc = self.doc_ids()
            allowed &= doc.unsqueeze(-1) == doc.unsqueeze(-2)
        return allowed


# Decode steps of up to this many query rows per sequence launch as a one-row step does: the same split of
# the cache (the order in which partial softmaxes merge) and, in Triton, the same row tile. Each row then
# comes out bit for bit as in a one-row step, so that parallel chunk decoding (K rows, one per action block)
# matches sequential decoding as far as attention goes. Larger steps (a prefill through decode attention)
# are planned for their own rows.
DECODE_PLAN_QUERIES = 16


@dataclass
class DecodeMeta:
    """Metadata for `worldvla.ops.decode_attention`: Q query rows per sequence against
    a cache whose slot s holds the token at position s.

    q_pos [B, Q] int32, q_limit [B, Q] int32, kv_block [B, S] int32, kv_len [B] int32.
    Key s is visible to query i iff s <= q_pos[i], s < kv_len and not kv_block[s] < q_limit[i].
    """
    q_pos: torch.Tensor
    q_limit: torch.Tensor
    kv_block: torch.Tensor
    kv_len: torch.Tensor

    def dense_mask(self) -> torch.Tensor:
        """[B, Q, S] bool, True = may attend."""
        S = self.kv_block.shape[-1]
        s = torch.arange(S, device=self.kv_block.device)
        ok = s.view(1, 1, S) <= self.q_pos.unsqueeze(-1)
        ok &= s.view(1, 1, S) < self.kv_len.view(-1, 1, 1)
        ok &= ~(self.kv_block.unsqueeze(1) < self.q_limit.unsqueeze(-1))
        return ok


def _block_metadata(ids: torch.Tensor, doc: torch.Tensor, layout: VocabLayout, release_pairing: bool = False):
    """ids, doc: [N] (one flat stream; documents never straddle rows) -> kv_block, q_limit.
    `release_pairing`: as `chunk_mask_meta`."""
    N = ids.numel()
    is_boa = ids == layout.boa
    is_eoa = ids == layout.eoa
    n_boa = torch.cumsum(is_boa, 0)
    n_eoa_before = torch.cumsum(is_eoa, 0) - is_eoa.long()
    pos = torch.arange(N, device=ids.device)
    # Open-block count per document: an unterminated block at the end of one document (or
    # row) must not leak into the next, so counts restart at each document's first token.
    doc_first = torch.ones(N, dtype=torch.bool, device=ids.device)
    doc_first[1:] = doc[1:] != doc[:-1]
    first = torch.cummax(torch.where(doc_first, pos, torch.zeros_like(pos)), 0).values
    open_before = (n_boa - is_boa.long() - n_eoa_before)[first]
    # Blocks neither nest nor close unopened: the open count of a document stays 0 or 1.
    depth = n_boa - torch.cumsum(is_eoa, 0) - open_before
    if not release_pairing:
        bad = (depth < 0) | (depth > 1)
        if N and bool(bad.any()):
            i = int(bad.nonzero()[0])
            what = "an EOA that closes no open action block" if depth[i] < 0 else "a BOA inside an open action block"
            raise ValueError(f"malformed action blocks: token {i} (of the flattened input) is {what}; every action "
                             f"block is BOA, bins..., EOA (build sequences with SequenceBuilder)")
    elif N:
        # One EOA closing no block (a "stray" one) is a token outside any block, provided a block came before
        # it in its document and no BOA or EOA follows it there (the release's mask drops it, see chunk_mask_meta).
        stray = depth < 0
        n_stray_before = torch.cumsum(stray, 0) - stray.long()
        stray_earlier = (n_stray_before - n_stray_before[first]) > 0          # in this document
        boa_before = n_boa - is_boa.long()
        no_block_yet = (boa_before - boa_before[first]) == 0                  # no BOA earlier in this document
        kinds = (("a BOA inside an open action block", depth > 1),
                 ("an EOA before any action block", stray & is_eoa & no_block_yet & ~stray_earlier),
                 ("a second EOA that closes no open action block", stray & is_eoa & stray_earlier),
                 ("a BOA after an EOA that closed no block (the release would pair it with an earlier EOA, out of "
                  "order, which the chunk rule cannot express)", is_boa & stray_earlier))
        bad = torch.stack([b for _, b in kinds])
        if bool(bad.any()):
            i = int(bad.any(0).nonzero()[0])
            what = next(w for w, b in kinds if bool(b[i]))
            raise ValueError(f"malformed action blocks: token {i} (of the flattened input) is {what}")
    # Inside a block: an opened BOA (of this document) not yet closed by an EOA before this
    # token. An unterminated trailing block (during generation) runs to the document's end.
    in_block = (n_boa - n_eoa_before) > open_before
    ordinal = (n_boa - 1).to(torch.int32)
    kv_block = torch.where(in_block, ordinal, torch.full_like(ordinal, NO_BLOCK))

    # Image blocks are paired as the release pairs them: the chunk rule holds for action blocks that start after
    # the last pair's end, which is the last EOI when the counts match, the document's end when one image is
    # left open (no block is restricted then), and the EOI before the last when there is one EOI too many.
    n_docs = int(doc.max()) + 1 if N else 0
    is_boi, is_eoi = ids == layout.boi, ids == layout.eoi
    # Counts so far in each document: the release rebuilds its mask at every token, and raises at the first
    # one where they differ by two.
    boi_run, eoi_run = torch.cumsum(is_boi, 0), torch.cumsum(is_eoi, 0)
    boi_run, eoi_run = boi_run - (boi_run - is_boi.long())[first], eoi_run - (eoi_run - is_eoi.long())[first]
    unpaired = (boi_run - eoi_run).abs() > 1
    if N and bool(unpaired.any()):
        i = int(unpaired.nonzero()[0])
        raise ValueError(_unpaired_images(i, int(boi_run[i]), int(eoi_run[i])))
    zeros = torch.zeros(n_docs, dtype=torch.long, device=ids.device)
    n_boi = zeros.scatter_add(0, doc.long(), is_boi.long())
    n_eoi = zeros.scatter_add(0, doc.long(), is_eoi.long())
    last_eoi = torch.full((n_docs,), -1, dtype=torch.long, device=ids.device)
    eoi_pos = torch.where(is_eoi, pos, torch.full_like(pos, -1))
    last_eoi = last_eoi.scatter_reduce(0, doc.long(), eoi_pos, reduce="amax", include_self=True)
    before_last = torch.where(is_eoi & (pos != last_eoi[doc.long()]), pos, torch.full_like(pos, -1))
    before_last = torch.full_like(last_eoi, -1).scatter_reduce(0, doc.long(), before_last, reduce="amax",
                                                              include_self=True)
    last_image_end = torch.where(n_boi > n_eoi, torch.full_like(last_eoi, N),
                                 torch.where(n_boi < n_eoi, before_last, last_eoi))
    # Start of the block holding each token: position of the latest BOA at or before it.
    boa_pos = torch.where(is_boa, pos, torch.full_like(pos, -1))
    block_start = torch.cummax(boa_pos, 0).values
    restricted = in_block & (block_start > last_image_end[doc.long()])
    q_limit = torch.where(restricted, ordinal, torch.full_like(ordinal, -1))
    return kv_block, q_limit


def _unpaired_images(token: int, n_boi: int, n_eoi: int) -> str:
    return (f"malformed image blocks: at token {token} a document holds {n_boi} BOI and {n_eoi} EOI so far; image "
            f"blocks pair only while the counts differ by at most one (one image left open, or one EOI too many), "
            f"as in the release's mask")


def cu_seqlens_problem(values: list, total: int, max_seqlen: int = 0) -> str | None:
    """What is wrong with document boundaries `values` (cu_seqlens read on the host) for `total` packed tokens,
    or None: they must rise from 0 to `total`, and no document may be longer than `max_seqlen` when it is set."""
    if len(values) < 2 or values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        return (f"cu_seqlens must rise from 0 to T={total} (document boundaries of the packed tokens), "
                f"got {values[:8]}{'...' if len(values) > 8 else ''}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if max_seqlen > 0 and longest > max_seqlen:
        return (f"max_seqlen={max_seqlen} is shorter than the longest document ({longest} tokens); "
                f"rebuild the metadata (or set max_seqlen 0)")
    return None


def check_cu_seqlens(meta: ChunkMaskMeta, T: int):
    """Packed metadata's document boundaries: 1-D integers rising from 0 to T, no document longer than
    meta.max_seqlen (when set). The shape and the host ints are checked on every device. The values are read
    only from CPU tensors (on CUDA that read would synchronize: the kernels trust the metadata there, which
    chunk_mask_meta and causal_meta build checked), and once per metadata: the result is kept on it, against
    the tensor and its version, so the other layers of a forward and the backward read nothing."""
    from .ops import dispatch  # not at the top: worldvla.ops imports this module

    cu = meta.cu_seqlens
    dispatch.require_integers(cu, "meta.cu_seqlens must hold integers")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"meta.cu_seqlens must be 1-D with n_docs + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    n_docs, max_seqlen = cu.numel() - 1, int(meta.max_seqlen)
    if cu.device.type != "cpu" or not dispatch.values_readable(cu):
        if max_seqlen > 0 and n_docs * max_seqlen < T:  # what the host ints alone tell
            raise ValueError(f"meta.cu_seqlens must rise from 0 to T={T}, but its {n_docs} document(s) of at most "
                             f"max_seqlen={max_seqlen} tokens cannot cover them")
        return
    # Inference tensors (made under torch.inference_mode) have no version counter: checked at every call.
    key = None if cu.is_inference() else (cu._version, T, max_seqlen)
    seen = meta.__dict__.get("_cu_seqlens_checked")
    if key is not None and seen is not None and seen[0] is cu and seen[1] == key:
        return
    problem = cu_seqlens_problem(cu.tolist(), T, max_seqlen)
    if problem:
        raise ValueError(f"meta.{problem}")
    if key is not None:
        meta.__dict__["_cu_seqlens_checked"] = (cu, key)


def _checked_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """cu_seqlens as int64 on `device`, after checking it rises from 0 to `total` (one host sync)."""
    cu_seqlens = torch.as_tensor(cu_seqlens)  # a list or an array of boundaries
    if cu_seqlens.dtype.is_floating_point:
        raise TypeError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    problem = cu_seqlens_problem(cu.tolist() if cu.dim() == 1 else [], total)
    if problem:
        raise ValueError(problem)
    return cu


def chunk_mask_meta(input_ids: torch.Tensor, layout: VocabLayout, cu_seqlens: torch.Tensor | None = None, *,
                    release_pairing: bool = False) -> ChunkMaskMeta:
    """Metadata of the chunk rule for `input_ids` [L], [B, L] (padded) or [T] with `cu_seqlens` (packed).

    Malformed action blocks (a BOA inside an open block, an EOA closing no block) raise ValueError.
    `release_pairing=True`, for the release's free decoding only (mode="release"), admits what the
    release's mask (`generate_att_mask_3`: BOA and EOA positions paired in order, one EOA too many
    dropped from the end) takes as it stands: in each document, ONE EOA closing no block, after at
    least one block and with no BOA or EOA after it, as a token outside any block. Still refused there:
    an EOA before any block (the release's mask drops it, but its parser then raises), a second such
    EOA (its mask raises), a BOA inside an open block (its mask raises), and a BOA after the stray EOA,
    which the release pairs with an earlier EOA, out of order: a block the chunk rule cannot express.

    Image blocks are paired as the release pairs them, in both modes (the same as the last EOI wherever every
    image is closed): the chunk rule applies to action blocks that start after the last image's end, which is
    the document's end while one image is open (no block is restricted then: a BOI the model wrote in free
    decoding) and the EOI before the last when one EOI closes no image. A document whose BOI and EOI counts
    come to differ by two raises ValueError, as the release's mask does."""
    from .ops.dispatch import require_integers  # here: worldvla.ops imports this module

    input_ids = torch.as_tensor(input_ids)  # a list or an array of ids
    require_integers(input_ids, "input_ids must be integer token ids")
    ids = input_ids.long()
    if cu_seqlens is not None:
        if ids.dim() != 1:
            raise ValueError(f"packed input_ids must be 1-D [T] with cu_seqlens, got shape {tuple(ids.shape)}")
        cu = _checked_cu_seqlens(cu_seqlens, ids.numel(), ids.device)
        lens = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(lens.numel(), device=ids.device), lens)
        kv_block, q_limit = _block_metadata(ids, doc, layout, release_pairing)
        pos = torch.arange(ids.numel(), device=ids.device) - cu[:-1][doc]
        return ChunkMaskMeta(kv_block, q_limit, pos, cu.to(torch.int32), int(lens.max()) if lens.numel() else 0)

    squeeze = ids.dim() == 1
    ids2 = ids.unsqueeze(0) if squeeze else ids
    if ids2.dim() != 2:
        raise ValueError(f"input_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
    B, L = ids2.shape
    # One flat stream with a document per row: ordinals stay increasing, doc ids separate rows.
    doc = torch.arange(B, device=ids.device).repeat_interleave(L)
    kv_block, q_limit = _block_metadata(ids2.flatten(), doc, layout, release_pairing)
    kv_block, q_limit = kv_block.view(B, L), q_limit.view(B, L)
    pos = torch.arange(L, device=ids.device).expand(B, L).contiguous()
    if squeeze:
        kv_block, q_limit, pos = kv_block[0], q_limit[0], pos[0]
    return ChunkMaskMeta(kv_block.contiguous(), q_limit.contiguous(), pos, None, L)


class GrowingBlockMeta:
    """The chunk rule's metadata of one sequence that grows a token at a time (free generation, where
    the model, not the decoder, places the action blocks): `push(tok)` returns the token's kv_block and
    q_limit as `chunk_mask_meta` of the whole sequence so far gives them for its last token, which is
    what the release's mask, rebuilt from all ids at every step, hides from that token. O(1) a token.
    A token that makes the blocks malformed raises ValueError, as there (with `release_pairing` as
    there: one stray EOA after a closed block is a token outside any block); image blocks are paired as there."""

    def __init__(self, prompt: torch.Tensor, layout: VocabLayout, release_pairing: bool = False):
        ids = torch.as_tensor(prompt)
        if ids.dim() > 1 and ids.numel() != ids.shape[-1]:  # rows would be read end to end as one sequence
            raise ValueError(f"a growing prompt is one sequence ([L] or [1, L]), got shape {tuple(ids.shape)}; "
                             f"make one GrowingBlockMeta per row")
        ids = ids.flatten()
        # The prompt's own blocks are checked as the whole sequence's are (malformed ones raise here, before any
        # decoding); its metadata is the engine's prefill's to build, not kept.
        chunk_mask_meta(ids, layout, release_pairing=release_pairing)
        ids = ids.long()
        self.layout, self.release_pairing = layout, release_pairing
        self.length, self.n_blocks, self.open, self.start, self.stray = 0, 0, False, -1, False
        self.n_boi, self.n_eoi, self.last_eoi, self.before_last_eoi = 0, 0, -1, -1
        for i, x in enumerate(ids.tolist()):
            if x == layout.boa:
                self.open, self.start, self.n_blocks = True, i, self.n_blocks + 1
            elif x == layout.eoa:
                self.stray |= not self.open
                self.open = False
            elif x == layout.eoi:
                self.n_eoi, self.last_eoi, self.before_last_eoi = self.n_eoi + 1, i, self.last_eoi
            elif x == layout.boi:
                self.n_boi += 1
        self.length = ids.numel()
        if not self.open:
            self.start = -1

    def push(self, tok: int) -> tuple[int, int]:
        lay, p = self.layout, self.length
        if tok == lay.boa:
            if self.open:
                raise ValueError(f"malformed action blocks: token {p} is a BOA inside an open action block")
            if self.stray:  # only reached with release_pairing
                raise ValueError(f"malformed action blocks: token {p} is a BOA after an EOA that closed no block (the "
                                 f"release would pair it with an earlier EOA, out of order, which the chunk rule "
                                 f"cannot express)")
            self.open, self.start, self.n_blocks = True, p, self.n_blocks + 1
        elif tok == lay.eoa and not self.open:
            if not self.release_pairing:
                raise ValueError(f"malformed action blocks: token {p} is an EOA that closes no open action block")
            if self.n_blocks == 0:
                raise ValueError(f"malformed action blocks: token {p} is an EOA before any action block")
            if self.stray:
                raise ValueError(f"malformed action blocks: token {p} is a second EOA that closes no open action "
                                 f"block")
            self.stray = True  # the release's mask drops it: a token outside any block
        elif tok in (lay.eoi, lay.boi):
            n_boi, n_eoi = self.n_boi + (tok == lay.boi), self.n_eoi + (tok == lay.eoi)
            if abs(n_boi - n_eoi) > 1:
                raise ValueError(_unpaired_images(p, n_boi, n_eoi))
            self.n_boi, self.n_eoi = n_boi, n_eoi
            if tok == lay.eoi:
                self.last_eoi, self.before_last_eoi = p, self.last_eoi
        kv, ql = NO_BLOCK, -1
        if self.open:
            kv = self.n_blocks - 1
            image_end = (p if self.n_boi > self.n_eoi else
                         self.before_last_eoi if self.n_boi < self.n_eoi else self.last_eoi)
            ql = kv if self.start > image_end else -1
        if tok == lay.eoa:
            self.open = False
        self.length += 1
        return kv, ql


def causal_meta(shape, device=None, cu_seqlens: torch.Tensor | None = None) -> ChunkMaskMeta:
    """Metadata of plain causal attention (no action blocks)."""
    kv = torch.full(shape, NO_BLOCK, dtype=torch.int32, device=device)
    ql = torch.full(shape, -1, dtype=torch.int32, device=device)
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError(f"packed causal metadata takes shape (T,) with cu_seqlens, got {tuple(shape)}")
        cu = _checked_cu_seqlens(cu_seqlens, shape[0], device)
        lens = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
        pos = torch.arange(shape[-1], device=device) - cu[:-1][doc]
        return ChunkMaskMeta(kv, ql, pos, cu.to(torch.int32), int(lens.max()))
    pos = torch.arange(shape[-1], device=device).expand(*shape).contiguous()
    return ChunkMaskMeta(kv, ql, pos, None, shape[-1])


def chunk_attention_mask(input_ids: torch.Tensor, layout: VocabLayout, *, release_pairing: bool = False) -> torch.Tensor:
    """Dense bool [L, L] (or [B, L, L]) of the chunk rule, True = may attend (`release_pairing`: as
    `chunk_mask_meta`)."""
    return chunk_mask_meta(input_ids, layout, release_pairing=release_pairing).dense_mask()
