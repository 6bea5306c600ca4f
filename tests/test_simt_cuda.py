"""The CUDA kernels of csrc/cuda, run on the CPU by the SIMT emulator of tests/simt.

Machines without a GPU cannot run the CUDA kernels, so the extension is built a second time
with the kernels compiled by the host compiler against an emulation of the CUDA execution
model (every thread a fiber; __syncthreads, warp shuffles, ldmatrix and mma.sync completed
when all participants arrive, wgmma when its warpgroup waits for it; cp.async copies landing at
the wait that covers them; warps
run ahead of each other in a random order; shared memory NaN at every block's start; see
tests/simt/simt.h). The kernels, the binding
file and worldvla/ops/native_backend.py are the real ones: only the device index and stream
the backend passes in are those of an emulated device 0 whose memory is the host's.

Same tolerance rule as the GPU tests (the kernel's error against float64 at most twice the
error of PyTorch at the kernel's precision); outputs and workspaces start as NaN, and inputs
are padded with NaN where the kernels must not read.
"""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("worldvla._C")
sys.path.insert(0, str(Path(__file__).parent))

from simt import build as simt_build  # noqa: E402
from test_native_attention import (LAYOUT, action_ids, assert_close_rule, check_prefill, decode_meta_from,  # noqa: E402
                                   long_blocks_meta, qkv, world_ids)
from test_native_sampling import assert_greedy, nan_of  # noqa: E402
from test_native_vq import assert_nan_rule, assert_nearest, nan_cases, near_ties  # noqa: E402

from worldvla import causal_meta, chunk_mask_meta  # noqa: E402
from worldvla.mask import NO_BLOCK, ChunkMaskMeta, DecodeMeta  # noqa: E402
from worldvla.ops import constrained_sample_ref, decode_attention_ref, vq_gather_ref, vq_quantize_ref  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402


@pytest.fixture(scope="session")
def simt_module():
    try:
        return simt_build.load(simt_build.build())
    except simt_build.Unavailable as err:
        pytest.skip(f"SIMT emulator not available: {err}")


@pytest.fixture
def emulated(simt_module, monkeypatch, poison_empty):
    """native_backend on the emulated CUDA device: CPU tensors take the CUDA code path."""
    assert simt_module.with_cuda
    monkeypatch.setattr(nb, "_C", simt_module)
    monkeypatch.setattr(nb, "_device_index", lambda op, t: 0)
    monkeypatch.setattr(nb, "_stream", lambda dev: 0)
    return simt_module


@pytest.fixture(params=["mma", "wgmma", "wgmma128"])
def engine(request, emulated):
    """The prefill's matrix engines: mma.sync (every GPU) and wgmma with 64 or 128 rows per CTA (sm_90a;
    the emulator runs all three)."""
    emulated.set_cuda_prefill_engine(request.param)
    yield request.param
    emulated.set_cuda_prefill_engine("auto")


def nan_padded(t: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """`t` as a view whose rows are followed by `pad` NaN columns (16-byte aligned rows)."""
    big = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


# --------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_padded(emulated, engine, rng, dtype, D):
    ids = torch.stack([action_ids(rng, 113, chunk=5), torch.cat([action_ids(rng, 100), torch.full((13,), LAYOUT.pad)])])
    meta = chunk_mask_meta(ids, LAYOUT)
    q, k, v = qkv(rng, (2, 113), 4, 2, D, dtype)  # GQA 4:2
    check_prefill(q, k, v, meta, f"simt padded {dtype} D={D}")


def test_prefill_packed_with_length_one_documents(emulated, engine, rng):
    docs = [torch.tensor([LAYOUT.bos]), action_ids(rng, 99), torch.tensor([LAYOUT.bos]), action_ids(rng, 90, chunk=3)]
    lens = [d.numel() for d in docs]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu)
    q, k, v = qkv(rng, (sum(lens),), 2, 1, 64, torch.bfloat16)  # MQA
    out = check_prefill(q, k, v, meta, "simt packed")
    # a one-token document attends only to itself: its output is its own value row
    for row in (0, 100):
        torch.testing.assert_close(out[row], v[row].expand(2, 64), rtol=0, atol=0)


def test_prefill_skipped_tiles_and_nan_padded_rows(emulated, engine, rng):
    """80-token action blocks after the image: whole 64-key tiles hidden from whole query tiles
    (skipped without a load), the rest masked per pair; q, k, v are strided views whose rows
    are followed by NaN, which no read may touch."""
    L, D = 300, 64
    meta = long_blocks_meta(L, 40, 280, 80)
    q, k, v = (nan_padded(t) for t in qkv(rng, (1, L), 2, 1, D, torch.bfloat16))
    assert q.stride(2) == D + 8
    check_prefill(q, k, v, meta, "simt long blocks")


def test_prefill_chunk_rule_that_hides_nothing_is_causal(emulated, engine, rng):
    ids = world_ids(rng, 150).view(1, -1)
    q, k, v = qkv(rng, (1, 150), 2, 2, 64, torch.bfloat16)
    a = nb.masked_attention(q, k, v, chunk_mask_meta(ids, LAYOUT))
    b = nb.masked_attention(q, k, v, causal_meta((1, 150)))
    assert torch.equal(a, b)


def test_prefill_block_limits_differ_between_warpgroups(emulated, engine, rng):
    """Query rows 128-191 (the first warpgroup of a 128-row CTA) see everything, rows 192-255 (the
    second) are an action block hidden from the block at keys 0-63: the CTA's limits must span both
    warpgroups' rows, or key tile 0 (below the diagonal) would skip the per-pair test, or be skipped."""
    L = 300
    kv = torch.full((L,), NO_BLOCK, dtype=torch.int32)
    ql = torch.full((L,), -1, dtype=torch.int32)
    kv[0:64], ql[0:64] = 0, 0
    kv[192:256], ql[192:256] = 1, 1
    meta = ChunkMaskMeta(kv.view(1, L), ql.view(1, L), torch.arange(L).view(1, L), None, L)
    q, k, v = qkv(rng, (1, L), 2, 1, 64, torch.bfloat16)
    check_prefill(q, k, v, meta, f"simt {engine} block limits per warpgroup")


def test_prefill_engines_agree_bitwise(emulated, rng):
    """Both engines round after every 16-wide k step (one fp32 rounding per mma.sync, per wgmma
    k-step in the emulator), so on the emulated device they give the same bits; on a GPU the
    tensor cores' internal order may differ and only the tolerance rule holds."""
    meta = chunk_mask_meta(action_ids(rng, 171, chunk=5).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, 171), 4, 2, 128, torch.bfloat16)
    out = {}
    try:
        for engine in ("mma", "wgmma", "wgmma128"):
            emulated.set_cuda_prefill_engine(engine)
            out[engine] = nb.masked_attention(q, k, v, meta)
    finally:
        emulated.set_cuda_prefill_engine("auto")
    assert torch.isfinite(out["mma"]).all()
    assert torch.equal(out["mma"], out["wgmma"]) and torch.equal(out["mma"], out["wgmma128"])


def test_prefill_engine_setting(emulated):
    assert emulated.cuda_prefill_engine() == "auto"
    with pytest.raises(ValueError, match="expected 'auto', 'mma', 'wgmma' or 'wgmma128'"):
        emulated.set_cuda_prefill_engine("tensor-cores")
    assert emulated.cuda_prefill_engine() == "auto"


# --------------------------------------------------------------------------- decode
def _decode_case(rng, dtype, D, B=3, Q=5, H=8, Hkv=2, S=300):
    q = torch.randn(B, Q, H, D, generator=rng).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=rng).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=rng).to(dtype)
    kv_len = torch.tensor([S, 157, 1][:B], dtype=torch.int32)
    q_pos = torch.minimum(torch.randint(0, S, (B, Q), generator=rng), (kv_len - 1).view(B, 1)).int()
    kv_block = torch.where(torch.rand(B, S, generator=rng) < 0.5, torch.randint(0, 4, (B, S), generator=rng),
                           torch.full((B, S), NO_BLOCK)).int()
    kv_block[torch.arange(B).view(B, 1), q_pos.long()] = NO_BLOCK  # every row sees its own slot
    q_limit = torch.randint(-1, 4, (B, Q), generator=rng).int()
    for b, n in enumerate(kv_len.tolist()):  # slots at or past kv_len are never read
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return q, k, v, DecodeMeta(q_pos, q_limit, kv_block, kv_len)


@pytest.mark.parametrize("dtype,D,n_splits", [(torch.bfloat16, 64, 3), (torch.float16, 64, 1),
                                              (torch.bfloat16, 128, 5), (torch.float16, 128, 2)])
def test_decode_split_kv(emulated, rng, dtype, D, n_splits):
    q, k, v, dm = _decode_case(rng, dtype, D)
    splits, _ = nb.decode_splits(q, k, n_splits)
    assert splits == n_splits
    out = nb.decode_attention(q, k, v, dm, n_splits=n_splits)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731  (the reference reads every slot)
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    same = decode_attention_ref(q, finite(k), finite(v), dm, upcast=False)
    assert_close_rule(out, ref, same, f"simt decode {dtype} D={D} splits={n_splits}")


@pytest.mark.parametrize("Q", [1, 5])
def test_decode_without_grouped_heads(emulated, rng, Q):
    """Chameleon-7B's shape (as many kv heads as q heads): 1 row (ordinary decoding) or 5 rows (a
    parallel chunk) of the CTA's 16; empty splits past a short cache."""
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 128, B=3, Q=Q, H=3, Hkv=3, S=260)
    out = nb.decode_attention(q, k, v, dm, n_splits=4)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, finite(k), finite(v), dm, upcast=False), f"simt Q={Q}")


def test_decode_rows_equal_the_prefill(emulated, rng):
    """The two CUDA kernels agree: decode of rows inside different action blocks == those rows of the prefill."""
    L = 203
    meta = chunk_mask_meta(action_ids(rng, L, chunk=6).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, L), 4, 2, 64, torch.bfloat16)
    full = nb.masked_attention(q, k, v, meta)
    rows = [L - 30, L - 21, L - 12, L - 1]
    out = nb.decode_attention(q[:, rows], k, v, decode_meta_from(meta, rows, L), n_splits=2)
    torch.testing.assert_close(out.float(), full[:, rows].float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("n_splits", [1, 2])
def test_decode_key_tile_inside_the_rows_action_block(emulated, rng, n_splits):
    """Rows decoding inside an 80-token action block see the block's earlier tokens. Key tile 128-191 lies wholly
    in that block: every kv_block there equals the rows' q_limit and none is larger, and the tile is visible
    (a block hides only the blocks before it), so the tile skip must not take it."""
    L = 300
    meta = long_blocks_meta(L, 40, 280, 80)  # action blocks at 40, 120, 200
    q, k, v = qkv(rng, (1, L), 4, 2, 64, torch.bfloat16)
    rows = [150, 190, 199]
    dm = decode_meta_from(meta, rows, L)
    assert (dm.q_limit == 1).all() and (dm.kv_block[0, 128:192] == 1).all()
    out = nb.decode_attention(q[:, rows], k, v, dm, n_splits=n_splits)
    ref = decode_attention_ref(q[:, rows].double(), k.double(), v.double(), dm)
    same = decode_attention_ref(q[:, rows], k, v, dm, upcast=False)
    assert_close_rule(out, ref, same, f"simt decode in an action block, {n_splits} splits")

@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_decode_rows_do_not_depend_on_the_rows_beside_them(emulated, rng, monkeypatch, heads, kv_heads):
    """Parallel chunk decoding's step (K rows, one per action block) must give each row's attention bit for bit
    as the sequential step of that row alone. The kernel computes a CTA's rows independently; the split of the
    cache, chosen from the shapes, decides how the partial softmaxes merge. It counted the rows: with grouped
    heads 10 rows (40 of a KV group, 3 row groups of 16) split the cache 3 ways where one row split it 8 ways
    (on 8 SMs), and the rows differed by up to 4.9e-4 (bf16). The heuristic's default, not n_splits, is used."""
    monkeypatch.setattr(nb, "_sm_count", lambda device: 8)
    B, P, K, D, Dh = 1, 540, 10, 7, 64
    S = P + K * (D + 2) + 1
    k = torch.randn(B, S, kv_heads, Dh, generator=rng).bfloat16()
    v = torch.randn(B, S, kv_heads, Dh, generator=rng).bfloat16()
    q = torch.randn(B, K, heads, Dh, generator=rng).bfloat16()
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    for j in range(K):
        kv_block[:, P + j * (D + 2):P + (j + 1) * (D + 2)] = j
    q_pos = torch.tensor([[P + j * (D + 2) + 4 for j in range(K)]] * B, dtype=torch.int32)
    q_limit = torch.arange(K, dtype=torch.int32).repeat(B, 1)
    kv_len = torch.full((B,), S, dtype=torch.int32)
    assert nb.decode_splits(q, k) == nb.decode_splits(q[:, :1], k) and nb.decode_splits(q, k)[0] > 1
    full = nb.decode_attention(q, k, v, DecodeMeta(q_pos, q_limit, kv_block, kv_len))
    for j in range(K):
        one = nb.decode_attention(q[:, j:j + 1].contiguous(), k, v, DecodeMeta(
            q_pos[:, j:j + 1].contiguous(), q_limit[:, j:j + 1].contiguous(), kv_block, kv_len))
        assert torch.equal(full[:, j:j + 1], one), \
            f"block {j}: differs by {(full[:, j:j + 1].float() - one.float()).abs().max().item():.3g}"


def test_decode_rows_without_keys_and_empty_sequences(emulated, rng):
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=3, H=2, Hkv=1, S=130)
    dm.q_pos[0, 2] = -4  # a row that sees no key
    dm.kv_len[1] = 0     # a sequence with an empty cache
    k[1], v[1] = float("nan"), float("nan")
    out = nb.decode_attention(q, k, v, dm, n_splits=2)
    assert torch.equal(out[0, 2].float(), torch.zeros(2, 64)) and torch.equal(out[1].float(), torch.zeros(3, 2, 64))
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, finite(k), finite(v), dm, upcast=False), "simt empty rows")


# --------------------------------------------------------------------------- VQ
@pytest.mark.parametrize("dtype,code_splits", [(torch.float32, 1), (torch.bfloat16, 2), (torch.float16, 5)])
@pytest.mark.parametrize("C", [44, 72])  # a tail of 12 channels, one value per load; 16-byte loads
def test_vq_quantize(emulated, rng, dtype, code_splits, C):
    z = torch.randn(150, C, generator=rng).to(dtype)  # row and code tiles of 128, a channel tail
    cb = torch.randn(520, C, generator=rng).to(dtype)
    assert nb.vq_code_split(z, cb, code_splits)[0] == code_splits
    idx = nb.vq_quantize(z, cb, code_splits=code_splits)
    assert_nearest(idx, z, cb, vq_quantize_ref(z, cb), f"simt {dtype} {code_splits} splits")


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1), (torch.bfloat16, 4), (torch.bfloat16, 8)])
def test_vq_quantize_row_alignment(emulated, rng, dtype, offset):
    """Rows that start off a 16-byte boundary take the one-value-per-load staging, aligned ones the
    16-byte loads; both give the reference's codes."""
    big = torch.randn(150, 64 + 16, generator=rng).to(dtype)
    z = big[:, offset:offset + 64]  # row stride 80 values; the first row starts `offset` values in
    cb = torch.randn(300, 64, generator=rng).to(dtype)
    assert_nearest(nb.vq_quantize(z, cb, code_splits=2), z, cb, vq_quantize_ref(z, cb), f"offset {offset}")


@pytest.mark.parametrize("code_splits", [1, 3])
def test_vq_quantize_near_ties(emulated, rng, code_splits):
    """fp32 inputs: the tensor cores see bf16 roundings that cannot separate these codes; the
    bound + certify passes must still return the fp32 answer. Rows of NaN read code 0."""
    z, cb, expected = near_ties(rng, 40, 300, 48)
    z[3] = float("nan")
    expected[3] = 0
    assert torch.equal(nb.vq_quantize(z, cb, code_splits=code_splits), expected)
    zb, cbb = z.bfloat16(), cb.bfloat16()
    assert nb.vq_quantize(zb, cbb, code_splits=code_splits)[3].item() == 0


def test_vq_quantize_release_width(emulated, rng):
    """The release's 256 channels (the error bound grows with C) and codebook scale: fp32 near-ties
    still give the fp32 answer, bf16 the reference's distances."""
    z, cb, expected = near_ties(rng, 64, 640, 256)
    assert torch.equal(nb.vq_quantize(z, cb, code_splits=2), expected)
    zb, cbb = z.bfloat16(), cb.bfloat16()
    assert_nearest(nb.vq_quantize(zb, cbb, code_splits=2), zb, cbb, vq_quantize_ref(zb, cbb), "bf16 C256")


@pytest.mark.parametrize("code_splits", [1, 3])
def test_vq_quantize_exact_codes_and_ties(emulated, rng, code_splits):
    cb = torch.randn(300, 24, generator=rng)
    cb[130] = cb[7]  # a duplicate in another code tile (and split): the first index wins, as torch.argmin
    pick = torch.randint(0, 300, (77,), generator=rng)
    idx = nb.vq_quantize(cb[pick].contiguous(), cb, code_splits=code_splits)
    assert torch.equal(idx, torch.where(pick == 130, torch.full_like(pick, 7), pick))
    assert torch.equal(nb.vq_quantize_op(cb[pick].contiguous(), cb), idx)  # the custom op, default split


@pytest.mark.parametrize("dtype,code_splits", [(torch.bfloat16, 1), (torch.float16, 1), (torch.bfloat16, 3)])
def test_vq_quantize_16bit_duplicate_codes_take_the_first(emulated, rng, dtype, code_splits):
    """16-bit inputs take the direct pass, where each thread keeps a running minimum over its codes: duplicates
    give bit-identical distances and the lowest index wins, as in torch.argmin, whether the later copy is the
    same thread's code in a later column tile (11 of 3), in the next code tile (135 of 7, another CTA with 3
    splits) or another lane's (200 of 60)."""
    cb = torch.randn(300, 24, generator=rng).to(dtype)
    first = {11: 3, 135: 7, 200: 60}
    for dup, orig in first.items():
        cb[dup] = cb[orig]
    pick = torch.arange(300)
    expected = pick.clone()
    for dup, orig in first.items():
        expected[dup] = orig
    assert torch.equal(nb.vq_quantize(cb.clone(), cb, code_splits=code_splits), expected)


@pytest.mark.parametrize("dtype,code_splits", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 3),
                                               (torch.float16, 1)])
def test_vq_quantize_takes_the_first_nan(emulated, rng, dtype, code_splits):
    """NaN and inf inputs give the reference's codes: a NaN distance of either sign is below every
    number and the first NaN wins, across code tiles and splits (the kernels had skipped NaN
    distances, and a NaN with the sign bit set would have keyed below the first NaN). fp32 takes the
    bound and certify passes (a NaN approximation is a candidate), 16-bit inputs the direct pass."""
    for name, z, cb, expected in nan_cases(rng, 150, 300, 24, dtype):
        assert_nan_rule(nb.vq_quantize(z, cb, code_splits=code_splits), z, cb, expected, name)


@pytest.mark.parametrize("dtype,code_splits", [(torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float32, 2)])
def test_vq_quantize_distance_of_flt_max(emulated, dtype, code_splits):
    """One code at distance exactly FLT_MAX (z = 0: |e|^2, a sum of exact squares), every other at
    +inf (|e|^2 overflows): the FLT_MAX code wins, in any tile or split; with none, code 0 (the first
    +inf). The running minimum had started at FLT_MAX with code 0, which a distance equal to it
    could not replace."""
    p = 2.0 ** 52
    at_max = torch.tensor([255 * 2.0 ** 56, 255 * p, 255 * p, 27 * p, 6 * p, 0, 0, 0])  # (2^24 - 1) 2^104
    assert at_max.double().square().sum().item() == torch.finfo(torch.float32).max
    z = torch.zeros(3, 8, dtype=dtype)
    for code in (2, 150, 270, None):  # tile 0, tile 1 (split 0), split 1 of two; none
        cb = torch.zeros(300, 8)
        cb[:, 1] = 2.0 ** 64
        if code is not None:
            cb[code] = at_max
        cb = cb.to(dtype)
        expected = vq_quantize_ref(z, cb)
        assert expected.tolist() == [code or 0] * 3
        assert torch.equal(nb.vq_quantize(z, cb, code_splits=code_splits), expected), code


@pytest.mark.parametrize("code_splits", [1, 3])
def test_vq_quantize_rows_near_zero(emulated, rng, code_splits):
    """fp32 rows far shorter than the codes (a latent near zero): the distances |e|^2 - 2 z.e differ from |e|^2
    by a few units in the last place, so the rounding of the final subtraction, not the bf16 error of z.e,
    decides whether the bound pass's key stays above the exact minimum. The error bound's |e|^2 term covers it;
    without it the bound could undercut every exact distance and the row would read code 0."""
    cb = torch.randn(300, 48, generator=rng)
    cb[0] *= 3  # code 0 is never the nearest here
    for scale in (2.0 ** -19, 2.0 ** -20, 2.0 ** -21, 2.0 ** -22):  # a few rows in a few hundred are at risk
        z = torch.randn(400, 48, generator=rng) * scale
        expected = vq_quantize_ref(z, cb)
        assert (expected != 0).all()
        assert torch.equal(nb.vq_quantize(z, cb, code_splits=code_splits), expected), scale


def fp32_overflow_cases():
    """(name, z [1, C], codebook): fp32 inputs whose bf16 roundings or whose |e|^2 - 2 z.e overflow in
    one of the two computations and not in the other. The bound + certify passes had trusted the
    approximation there; the reference's fp32 formula is what counts."""
    t = 2.0 ** -20  # puts a value just past (or short of) a bf16 rounding midpoint
    a, b = (1 + 26 / 128 + 1 / 256 + t) * 2.0 ** 62, (1 + 62 / 128) * 2.0 ** 63
    yield "every approximation +inf, code 1 finite", [[a]], [[-1.5 * 2.0 ** 63], [-b]]
    a, b = (1 + 52 / 128 + 1 / 256 + t) * 2.0 ** 63, (1 + 53 / 128 + 1 / 256 + t) * 2.0 ** 63
    yield "approximation -inf, exact finite", [[a]], [[0.0], [b]]
    a, b = (1 + 2 ** -8 - t) * 2.0 ** 63, (2 - 2 ** -8 - t) * 2.0 ** 63
    yield "exact 2 z.e overflows, approximation finite", [[a, 2.0 ** 63]], [[0.0, 2.0 ** 63], [b, 0.0]]
    # |z||e| = 1.4 2^125, bf16 roundings of both factors at their largest in opposite directions for
    # the two codes: code 0 (the nearer) approximates to +inf, code 1's bound stays finite. Channel 2
    # (z = 0 there) puts both distances just below FLT_MAX.
    p, q = (1 + 2 ** -8 + t) * 2.0 ** 61, (1 + 2 ** -8 - t) * 2.0 ** 61
    x, y = (1 + 2 ** -8 + t) * 2.0 ** 63, (1 + 2 ** -8 - t) * 2.0 ** 63
    dist = (2 ** 24 - 0.9 * 2 ** 15) * 2.0 ** 104
    w0 = math.sqrt(dist - x * x - y * y + 2 * (q * y - p * x))
    w1 = math.sqrt(dist + 0.05 * 2.0 ** 119 - x * x - y * y + 2 * (p * x - q * y))
    yield "approximation +inf, a finite bound", [[p, q, 0.0]], [[-x, y, w0], [x, -y, w1]]


@pytest.mark.parametrize("code_splits", [1, 2])
def test_vq_quantize_near_fp32_overflow(emulated, code_splits):
    """fp32 codes whose approximate or exact distance overflows give the reference's code. Each case's
    codes sit in the first code tile, then in the second (the last split) after 254 codes at +inf."""
    for name, z, cb in fp32_overflow_cases():
        z, cb = torch.tensor(z).repeat(3, 1), torch.tensor(cb)
        far = torch.zeros(254, cb.shape[1])
        far[:, 0] = -(2.0 ** 64)  # |e|^2 = inf, z.e < 0 (z is positive in channel 0): +inf, never NaN
        for codes in (cb, torch.cat([far, cb])):
            expected = vq_quantize_ref(z, codes)
            assert (expected == expected[0]).all() and expected[0] >= codes.shape[0] - 2, name
            assert torch.equal(nb.vq_quantize(z, codes, code_splits=code_splits), expected), name


@pytest.mark.parametrize("dtype,index_dtype", [(torch.bfloat16, torch.int64), (torch.float32, torch.int32)])
def test_vq_gather(emulated, rng, dtype, index_dtype):
    cb = torch.randn(300, 24, generator=rng).to(dtype)
    idx = torch.randint(0, 300, (2, 5, 7), generator=rng).to(index_dtype)
    assert torch.equal(nb.vq_gather_op(idx, cb), vq_gather_ref(idx, cb))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_vq_gather_codes_outside_the_book_give_zeros(emulated, rng, index_dtype):
    """The native op's contract for codes outside [0, K) (the public entry point refuses them before): zeros,
    never a read of the rows around the codebook. The codebook is a view of a larger buffer whose rows
    before and after it are NaN, so code K or -1 read as a row would show as NaN."""
    big = torch.full((302, 24), float("nan"), dtype=torch.bfloat16)
    big[1:301] = torch.randn(300, 24, generator=rng).to(torch.bfloat16)
    cb = big[1:301]
    idx = torch.randint(0, 300, (2, 5, 7), generator=rng)
    bad = torch.tensor([300, -1, 301, 2**31 - 1])
    idx.view(-1)[[0, 13, 34, 69]] = bad
    out = nb.vq_gather_op(idx.to(index_dtype), cb)
    outside = ((idx < 0) | (idx >= 300)).unsqueeze(1).expand_as(out)
    assert int(outside.sum()) == 4 * 24
    assert (out[outside] == 0).all()
    assert torch.equal(out[~outside], vq_gather_ref(idx.clamp(0, 299), cb)[~outside])


# --------------------------------------------------------------------------- constrained decoding
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_range_argmax(emulated, rng, dtype):
    hidden = torch.randn(7, 96, generator=rng).to(dtype)  # 4 hidden rows per pass + a tail of 3
    weight = (torch.randn(400, 96, generator=rng) * 0.1).to(dtype)
    for lo, hi in ((3, 400), (100, 131), (399, 400)):
        ids = nb.range_argmax_op(hidden, weight, lo, hi)
        assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"simt {dtype}")


def test_range_argmax_ties_pick_the_first(emulated, rng):
    hidden = torch.randn(3, 32, generator=rng)
    weight = torch.randn(90, 32, generator=rng)
    weight[70] = weight[12] = hidden[0] * 3.0  # the largest logit of row 0, twice, in different warps
    assert int(nb.range_argmax_op(hidden, weight, 5, 90)[0]) == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_range_argmax_takes_the_first_nan(emulated, rng, dtype):
    """A NaN logit is above every number, +inf included, and the first NaN wins, as in torch.argmax,
    whatever its sign and payload. The key order had put a NaN with the sign bit set below -inf and
    ranked the other NaNs by payload. NaNs of chosen bits come from single weight entries, one more
    from inf - inf (a NaN with the sign bit set on x86); they lie in different warps and CTAs."""
    hidden = torch.randn(6, 32, generator=rng)  # a pass of 4 hidden rows and a tail of 2
    hidden[:, :2] = hidden[:, :2].abs() + 0.5
    weight = torch.randn(100, 32, generator=rng) * 0.1
    weight[[10, 60]] = 0.0
    weight[[10, 60], 0] = float("inf")  # +inf logits
    weight[77, 0] = 100.0  # the largest number after 60
    weight[80, :2] = torch.tensor([float("inf"), float("-inf")])
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    chosen = {20: 0xFFC00000, 30: 0x7FC00000, 50: 0x7FFFFFFF, 70: 0xFFFFFFFF}
    for v, bits in chosen.items():
        weight[v, 5] = nan_of(bits, dtype)[0]
    # the kernel's own logits keep the chosen signs: the cases below do rank NaNs of both signs
    sign_bit = nb.range_logits_op(hidden, weight, 0, 100).view(torch.int32) < 0
    assert sign_bit[:, list(chosen)].tolist() == [[True, False, False, True]] * 6
    logits = hidden.float() @ weight.float().t()
    cases = {(5, 95): 20,  # a NaN with the sign bit set first, positive ones with larger payloads after
             (21, 95): 30,  # the first of two positive NaNs, not the larger payload
             (51, 95): 70,  # +inf (60), then a NaN with the sign bit set and the largest payload
             (71, 95): 80,  # a large number, then inf - inf
             (0, 20): 10}  # +inf, no NaN
    for (lo, hi), want in cases.items():
        ids = nb.range_argmax_op(hidden, weight, lo, hi)
        assert ids.tolist() == [want] * 6, (lo, hi, ids)
        assert torch.equal(ids, logits[:, lo:hi].argmax(1) + lo)


@pytest.mark.parametrize("dtype,H", [(torch.bfloat16, 100), (torch.float32, 98)])
def test_range_kernels_reject_hidden_sizes_off_their_loads(emulated, rng, dtype, H):
    """The kernels read rows 16 bytes at a time. The wrapper's check looks at CUDA tensors only, which
    the emulated device's are not: the launchers raise the same error themselves (the emulator had
    crashed on a misaligned load), for misaligned rows too."""
    hidden = torch.randn(5, H, generator=rng).to(dtype)
    weight = torch.randn(300, H, generator=rng).to(dtype)
    vec = 16 // hidden.element_size()
    for op in (nb.range_argmax_op, nb.range_logits_op):
        with pytest.raises(ValueError, match=f"hidden size to be a multiple of {vec}, got {H}"):
            op(hidden, weight, 10, 290)
        Hv = H // vec * vec
        with pytest.raises(ValueError, match="16-byte boundaries"):
            op(hidden[:, :Hv], weight[:, :Hv].contiguous(), 10, 290)  # rows H values apart
    hidden, weight = hidden[:, :Hv].contiguous(), weight[:, :Hv].contiguous()  # a size the loads allow
    ids = nb.range_argmax_op(hidden, weight, 10, 290)
    assert_greedy(ids, hidden, weight, 10, 290, constrained_sample_ref(hidden, weight, 10, 290), f"simt H={Hv}")


def test_launchers_refuse_sizes_past_32_bits(emulated, rng):
    """The kernels index rows and codes with 32-bit ints: a size past 2^31 - 1 is refused on the host, naming
    it, before any launch (the sizes here are never backed by memory: nothing may be read)."""
    x = torch.randn(8, 64, generator=rng).to(torch.bfloat16)
    ids = torch.zeros(8, dtype=torch.int64)
    big, code = 2**31, nb._DTYPE_CODE[torch.bfloat16]
    with pytest.raises(ValueError, match=r"constrained_argmax \(CUDA\): rows = 2147483648 .*split the call"):
        emulated.range_argmax(0, 0, code, x.data_ptr(), 64, x.data_ptr(), 64, big, 64, 0, 4, ids.data_ptr(),
                              ids.data_ptr())
    with pytest.raises(ValueError, match=r"range_logits \(CUDA\): range size = 2147483648"):
        emulated.range_logits(0, 0, code, x.data_ptr(), 64, x.data_ptr(), 64, 8, 64, 0, big, ids.data_ptr())
    with pytest.raises(ValueError, match=r"vq_quantize \(CUDA\): codes = 2147483648"):
        emulated.vq_quantize(0, 0, code, x.data_ptr(), 64, x.data_ptr(), 64, 8, big, 64, ids.data_ptr(), 2**30)


def test_range_logits(emulated, rng):
    hidden = torch.randn(5, 64, generator=rng).to(torch.bfloat16)
    weight = torch.randn(300, 64, generator=rng).to(torch.bfloat16)
    out = nb.range_logits_op(hidden, weight, 17, 250)
    ref = hidden.double() @ weight[17:250].double().t()
    same = (hidden @ weight[17:250].t()).float()
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert out.shape == (5, 233) and err <= 2 * base, (err, base)


# --------------------------------------------------------------------------- shapes off the tiles
def test_decode_many_row_groups(emulated, rng):
    """Three q heads per kv head and 7 queries: 21 rows per kv head, two row groups of 16 (the
    second partial), a cache length that is not a multiple of the 64-key tile."""
    q, k, v, dm = _decode_case(rng, torch.float16, 64, B=2, Q=7, H=6, Hkv=2, S=201)
    out = nb.decode_attention(q, k, v, dm, n_splits=2)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, finite(k), finite(v), dm, upcast=False), "simt row groups")


def test_prefill_packed_grid_past_the_documents(emulated, engine, rng):
    """Packed documents with max_seqlen unset (0): the grid is sized by the whole batch and CTAs
    past a document's end must exit without writing; documents end inside row tiles."""
    docs = [action_ids(rng, 130, chunk=5), torch.tensor([LAYOUT.bos] * 2), world_ids(rng, 150)]
    lens = [d.numel() for d in docs]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu)
    meta = ChunkMaskMeta(meta.kv_block, meta.q_limit, meta.position_ids, meta.cu_seqlens, 0)
    q, k, v = qkv(rng, (sum(lens),), 2, 2, 128, torch.bfloat16)
    check_prefill(q, k, v, meta, "simt packed, grid past the documents")


@pytest.mark.parametrize("bad", [[0, 130, 330], [-40, 130, 280], [0, 130, 280, 400], [0, 130, 90, 280]])
def test_prefill_packed_boundaries_past_the_tokens_stay_inside(emulated, engine, rng, bad):
    """CUDA does not read cu_seqlens on the host: the kernel clamps every document to the T tokens. Wrong
    boundaries (an end past T, a negative start, a document past T, a falling pair) change which rows a
    document covers but never reach outside the tensors: the rows past T are NaN here, and every row equals
    the call with the same boundaries clamped by hand (rows that two documents cover are written by both, in
    no set order: for them only finiteness is checked)."""
    ids = torch.cat([action_ids(rng, 130, chunk=5), world_ids(rng, 150)])
    T = ids.numel()
    good = chunk_mask_meta(ids, LAYOUT, cu_seqlens=torch.tensor([0, 130, T], dtype=torch.int32))
    big = [torch.full((T + 64, h, 64), float("nan"), dtype=torch.bfloat16) for h in (4, 2, 2)]
    for b, x in zip(big, qkv(rng, (T,), 4, 2, 64, torch.bfloat16)):
        b[:T] = x
    q, k, v = (b[:T] for b in big)
    cu = torch.tensor(bad, dtype=torch.int32)
    meta = ChunkMaskMeta(good.kv_block, good.q_limit, good.position_ids, cu, 0)
    out = nb.masked_attention(q, k, v, meta)
    starts = [min(max(c, 0), T) for c in bad[:-1]]
    ends = [min(max(c, s), T) for c, s in zip(bad[1:], starts)]
    covered = torch.zeros(T, dtype=torch.int32)
    for s, e in zip(starts, ends):
        covered[s:e] += 1
    for s, e in zip(starts, ends):
        if e > s:  # each clamped document on its own
            one = ChunkMaskMeta(good.kv_block[s:e], good.q_limit[s:e], good.position_ids[s:e],
                                torch.tensor([0, e - s], dtype=torch.int32), e - s)
            alone, once = nb.masked_attention(q[s:e], k[s:e], v[s:e], one), covered[s:e] == 1
            assert torch.equal(out[s:e][once], alone[once]), (bad, s, e)
    assert out[covered > 0].isfinite().all()


@pytest.mark.parametrize("seed", ["1", "2"])
def test_kernels_under_other_schedules(emulated, engine, rng, monkeypatch, seed):
    """The emulator's thread and warp order comes from WORLDVLA_SIMT_SEED: other orders, same results."""
    monkeypatch.setenv("WORLDVLA_SIMT_SEED", seed)
    meta = chunk_mask_meta(action_ids(rng, 140, chunk=5).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, 140), 2, 1, 64, torch.float16)
    check_prefill(q, k, v, meta, f"simt prefill, schedule {seed}")
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=5, H=4, Hkv=2, S=200)
    out = nb.decode_attention(q, k, v, dm, n_splits=3)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, finite(k), finite(v), dm, upcast=False), f"schedule {seed}")


# --------------------------------------------------------------------------- non-finite inputs
def _nan_rows_check(out, clean, expected, name):
    """The rule of worldvla/ops/attention.py for a NaN: exactly the `expected` [..., H] rows are non-finite, NaN
    throughout, and every other row has the bits of the same call on clean inputs."""
    bad = ~out.float().isfinite().all(-1)
    assert torch.equal(bad, expected), (f"{name}: non-finite rows {bad.nonzero().tolist()}, "
                                        f"expected {expected.nonzero().tolist()}")
    assert out[expected].float().isnan().all(), f"{name}: a row the rule makes NaN is not NaN throughout"
    assert torch.equal(out[~expected], clean[~expected]), f"{name}: a row that must not change changed"


def test_prefill_nan_reaches_exactly_the_rows_that_see_it(emulated, engine, rng):
    """A NaN in a key inside an action block (earlier rows, later blocks and the other document may not see it)
    and one in a query of the other document. The kernels' documented gaps (an infinity that makes a score
    -inf, a hidden value's NaN within a tile) are not tested here."""
    docs = [action_ids(rng, 99), action_ids(rng, 90, chunk=3)]
    cu = torch.tensor([0, 99, 189], dtype=torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu)
    q, k, v = qkv(rng, (189,), 4, 2, 64, torch.bfloat16)
    clean = nb.masked_attention(q, k, v, meta)
    mask = meta.dense_mask()
    j = int((meta.kv_block == 1).nonzero()[0])  # document 0's second action block
    assert mask[:, j].any() and (~mask[j + 1:, j]).any()
    q2, k2 = q.clone(), k.clone()
    k2[j, 0, 7] = float("nan")
    q2[120, 1, 0] = float("nan")
    expected = torch.zeros(189, 4, dtype=torch.bool)
    expected[:, :2] = mask[:, j].unsqueeze(-1)  # q heads 0, 1 read kv head 0
    expected[120, 1] = True
    _nan_rows_check(nb.masked_attention(q2, k2, v, meta), clean, expected, f"simt prefill {engine}")


@pytest.mark.parametrize("n_splits", [1, 3])
def test_decode_nan_reaches_exactly_the_rows_that_see_it(emulated, rng, n_splits):
    """A NaN in a cache key some rows see makes those rows NaN and no other, also through the merge of the
    four warps' states and of the splits (both turned a NaN softmax sum into weight 0: the rows came out finite
    and wrong); a NaN query makes its own row NaN."""
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=5, H=4, Hkv=2, S=200)
    clean = nb.decode_attention(q, k, v, dm, n_splits=n_splits)
    mask = dm.dense_mask()  # [B, Q, S]
    mixed = (mask[0].any(0) & ~mask[0].all(0)).nonzero()
    assert mixed.numel(), "the case needs a slot some rows see and others do not"
    j = int(mixed[len(mixed) // 2])
    q2, k2 = q.clone(), k.clone()
    k2[0, j, 0, 5] = float("nan")
    q2[1, 2, 3, 0] = float("nan")
    expected = torch.zeros(2, 5, 4, dtype=torch.bool)
    expected[0, :, :2] = mask[0, :, j].unsqueeze(-1)
    expected[1, 2, 3] = bool(mask[1, 2].any())
    _nan_rows_check(nb.decode_attention(q2, k2, v, dm, n_splits=n_splits), clean, expected,
                    f"simt decode, {n_splits} splits")


# --------------------------------------------------------------------------- strides and output bounds
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_range_kernels_read_rows_at_their_stride(emulated, rng, dtype):
    """Hidden states sliced from a wider buffer (the last position of [B, L, H] is one) and an lm_head view whose
    rows are padded: both kernels step rows by the given strides, not the hidden size. The padding is NaN, so
    a row read at the wrong offset shows; results equal the call on contiguous copies bit for bit."""
    H = 96
    hidden = torch.randn(7, H, generator=rng).to(dtype)  # 4 hidden rows per pass + a tail of 3
    weight = (torch.randn(400, H, generator=rng) * 0.1).to(dtype)
    hidden_s, weight_s = nan_padded(hidden, 32), nan_padded(weight, 16)
    assert hidden_s.stride(0) == H + 32 and weight_s.stride(0) == H + 16
    for lo, hi in ((3, 400), (100, 131)):
        ids = nb.range_argmax_op(hidden_s, weight_s, lo, hi)
        assert torch.equal(ids, nb.range_argmax_op(hidden, weight, lo, hi)), (lo, hi)
        assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"strided {dtype}")
        logits = nb.range_logits_op(hidden_s, weight_s, lo, hi)
        assert logits.isfinite().all()
        assert torch.equal(logits, nb.range_logits_op(hidden, weight, lo, hi)), (lo, hi)


def test_kernels_write_nothing_past_their_outputs(emulated, rng):
    """Row tiles, code tiles and vocabulary groups past the last row are partial here: their threads compute but
    must not store. Each launcher writes into a buffer followed by a guard of sentinels, which must stay."""
    N, C, K = 150, 44, 300  # 128-row tiles: the second holds 22 rows
    guard = 130
    for dtype in (torch.float32, torch.bfloat16):  # bound + certify passes; the direct pass
        z = torch.randn(N, C, generator=rng).to(dtype)
        cb = torch.randn(K, C, generator=rng).to(dtype)
        out = torch.full((N + guard,), -7, dtype=torch.int64)
        emulated.vq_quantize(0, 0, nb._DTYPE_CODE[dtype], z.data_ptr(), C, cb.data_ptr(), C, N, K, C,
                             out.data_ptr(), 128)
        assert (out[N:] == -7).all(), f"vq_quantize {dtype} wrote past its {N} rows"
        assert torch.equal(out[:N], nb.vq_quantize(z, cb, code_splits=1)), dtype

    hidden = torch.randn(7, 96, generator=rng).to(torch.bfloat16)  # a tail of 3 hidden rows
    weight = (torch.randn(400, 96, generator=rng) * 0.1).to(torch.bfloat16)
    code = nb._DTYPE_CODE[torch.bfloat16]
    lo, hi = 17, 250  # 233 rows: the last warp's group of 4 holds 1
    # The workspace takes atomicMax of (logit, index) keys, every one above 1: a sentinel they would raise.
    ws = torch.full((7 + 8,), 1, dtype=torch.int64)
    ids = torch.full((7 + 8,), -7, dtype=torch.int64)
    emulated.range_argmax(0, 0, code, hidden.data_ptr(), 96, weight.data_ptr(), 96, 7, 96, lo, hi, ws.data_ptr(),
                          ids.data_ptr())
    assert (ws[7:] == 1).all() and (ids[7:] == -7).all(), "range_argmax wrote past its 7 rows"
    assert torch.equal(ids[:7], nb.range_argmax_op(hidden, weight, lo, hi))
    R = hi - lo
    logits = torch.full((7 * R + 4 * R,), float("nan"))  # a pass of 4 hidden rows could overrun by 3 rows
    emulated.range_logits(0, 0, code, hidden.data_ptr(), 96, weight.data_ptr(), 96, 7, 96, lo, hi, logits.data_ptr())
    assert logits[7 * R:].isnan().all(), "range_logits wrote past its [7, 233] logits"
    assert torch.equal(logits[:7 * R].view(7, R), nb.range_logits_op(hidden, weight, lo, hi))


# --------------------------------------------------------------------------- rows past the filled cache
def test_decode_rows_past_the_filled_cache(emulated, rng):
    """Rows whose position lies at or past kv_len see the slots below kv_len only (DecodeMeta's rule). kv_len ends
    inside a 64-key tile: the tile's slots past it are zero-filled, not read, and must not count as keys of score 0."""
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=5, H=4, Hkv=2, S=200)
    dm.kv_len[1] = 100
    dm.q_pos[1] = torch.tensor([120, 150, 199, 100, 99], dtype=torch.int32)
    k[1, 100:], v[1, 100:] = float("nan"), float("nan")
    out = nb.decode_attention(q, k, v, dm, n_splits=2)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, finite(k), finite(v), dm, upcast=False), "simt past kv_len")


def test_decode_positions_past_the_cache_read_only_the_cache(emulated, rng):
    """kv_len and q_pos past the cache's S slots (neither is checked on the host) mean the whole cache: the kernel
    clamps kv_len to S and reads no slot past it, here NaN rows of the larger buffer the caches are views of."""
    S = 130
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=3, H=2, Hkv=1, S=S)
    big = [torch.full((2, S + 70, 1, 64), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    big[0][:, :S], big[1][:, :S] = torch.nan_to_num(k, nan=0.0), torch.nan_to_num(v, nan=0.0)
    kc, vc = big[0][:, :S], big[1][:, :S]
    inside = DecodeMeta(torch.full((2, 3), S - 1, dtype=torch.int32), dm.q_limit, dm.kv_block,
                        torch.full((2,), S, dtype=torch.int32))
    past = DecodeMeta(torch.full((2, 3), S + 40, dtype=torch.int32), dm.q_limit, dm.kv_block,
                      torch.full((2,), S + 60, dtype=torch.int32))
    want = nb.decode_attention(q, kc, vc, inside, n_splits=2)
    assert want.isfinite().all()
    assert torch.equal(nb.decode_attention(q, kc, vc, past, n_splits=2), want)


@pytest.mark.parametrize("shift", [1024.0, -1024.0])
def test_decode_scores_far_from_zero(emulated, rng, shift):
    """Every score of a row moved by the same amount (channel 0: 1 in every key, `shift` in the query), some 185
    log2 units above or below 0: the output is the unmoved one. The splits' log-sum-exps are then far from 0, and
    the merge must weigh them relative to the largest (2^lse itself overflows or underflows float32)."""
    q, k, v, dm = _decode_case(rng, torch.bfloat16, 64, B=2, Q=5, H=4, Hkv=2, S=200)
    k[..., 0] = 1.0  # also in the NaN slots past kv_len, which are never read
    q[..., 0] = 0.0
    far = q.clone()
    far[..., 0] = shift
    out = nb.decode_attention(far, k, v, dm, n_splits=3)
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    same = decode_attention_ref(q, finite(k), finite(v), dm, upcast=False)
    assert_close_rule(out, ref, same, f"simt decode, scores moved by {shift}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vq_quantize_odd_width_reads_only_the_row(emulated, rng, dtype):
    """16-bit rows of an odd width take the one-value-per-load staging, whose last pair of a row holds one channel:
    the value after it (NaN here, the rows being views of wider ones) must not be read."""
    z, cb = torch.randn(150, 45, generator=rng).to(dtype), torch.randn(300, 45, generator=rng).to(dtype)
    idx = nb.vq_quantize(nan_padded(z, 3), nan_padded(cb, 3), code_splits=2)
    assert torch.equal(idx, nb.vq_quantize(z, cb, code_splits=2))
    assert_nearest(idx, z, cb, vq_quantize_ref(z, cb), f"simt odd width {dtype}")


# --------------------------------------------------------------------------- reads past the inputs
_GUARDED_CALLS = """
import ctypes, importlib.util, mmap, sys

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
maps = []


def guarded(path):
    # the file's bytes, placed so that the last lies just before a page that faults on any access (PROT_NONE)
    data, page = open(path, "rb").read(), mmap.PAGESIZE
    size = -(-len(data) // page) * page + page
    maps.append(mmap.mmap(-1, size))
    start = ctypes.addressof(ctypes.c_char.from_buffer(maps[-1]))
    assert libc.mprotect(start + size - page, page, 0) == 0, ctypes.get_errno()
    maps[-1][size - page - len(data):size - page] = data
    return start + size - page - len(data)


args = sys.argv[2:]
for k in range(0, len(args), 8):
    code, N, H, lo, hi = map(int, args[k:k + 5])
    hidden, weight = guarded(args[k + 5]), guarded(args[k + 6])
    ws, ids, logits = (ctypes.c_uint64 * N)(), (ctypes.c_int64 * N)(), (ctypes.c_float * (N * (hi - lo)))()
    C.range_argmax(0, 0, code, hidden, H, weight, H, N, H, lo, hi, ctypes.addressof(ws), ctypes.addressof(ids))
    C.range_logits(0, 0, code, hidden, H, weight, H, N, H, lo, hi, ctypes.addressof(logits))
    open(args[k + 7], "wb").write(bytes(ids) + bytes(logits))
"""


def test_range_kernels_read_no_row_past_the_inputs(emulated, rng, tmp_path):
    """The last warp's group of 4 vocabulary rows and the last pass of 4 hidden rows are partial here (233 range rows
    ending at the weight's last row, 7 hidden rows): the kernel clamps the rows it reads to the last real ones. The
    emulator does not check bounds, so each input's last row is put against a page that faults on any access, in a
    child process, so that a read past the end fails this test instead of killing the run."""
    import signal
    import subprocess

    N, H, lo, hi = 7, 96, 17, 250
    cases, args = [], []
    for dtype in (torch.bfloat16, torch.float32):
        hidden = torch.randn(N, H, generator=rng).to(dtype)
        weight = (torch.randn(hi, H, generator=rng) * 0.1).to(dtype)
        files = [tmp_path / f"{name}_{str(dtype)[6:]}" for name in ("hidden", "weight", "out")]
        for f, t in zip(files, (hidden, weight)):
            f.write_bytes(t.view(torch.uint8).numpy().tobytes())
        cases.append((hidden, weight, files[2]))
        args += [nb._DTYPE_CODE[dtype], N, H, lo, hi, *files]
    run = subprocess.run([sys.executable, "-c", _GUARDED_CALLS, emulated.__file__, *map(str, args)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    died = f"signal {signal.Signals(-run.returncode).name}" if run.returncode < 0 else f"exit {run.returncode}"
    assert run.returncode == 0, (f"the calls on guarded inputs failed ({died}; SIGSEGV is a read past an input)",
                                 run.stderr[-2000:])
    for hidden, weight, out in cases:
        raw = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.uint8)
        ids, logits = raw[:N * 8].view(torch.int64), raw[N * 8:].view(torch.float32).view(N, hi - lo)
        assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"{hidden.dtype}")
        ref = hidden.double() @ weight[lo:].double().t()
        same = (hidden @ weight[lo:].t()).float()
        err, base = (logits.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
        assert err <= 2 * base, (hidden.dtype, err, base)
