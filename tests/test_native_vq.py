"""Native VQ nearest-code search and codebook gather against the references.

Nearest-code search is judged by distance, not index: the chosen code's float64
distance may exceed the true minimum by at most 2x what torch's argmin at the same
precision gives up (ties and near-ties may legitimately pick a different index).
"""
import pytest
import torch

_C = pytest.importorskip("worldvla._C")

from worldvla.ops import dispatch, vq_gather, vq_gather_ref, vq_quantize, vq_quantize_ref  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402

# Every output buffer the native wrappers allocate starts poisoned (NaN / an integer sentinel): an
# element a kernel never writes fails instead of passing on leftover bytes.
pytestmark = pytest.mark.usefixtures("poison_outputs")


def dist64(z, codebook):
    z, e = z.double().cpu(), codebook.double().cpu()
    return (z * z).sum(1, keepdim=True) + (e * e).sum(1) - 2.0 * z @ e.t()


def assert_nearest(idx, z, codebook, torch_idx, name=""):
    d = dist64(z, codebook)
    best = d.min(1).values
    rows = torch.arange(z.shape[0])
    gap = (d[rows, idx.cpu()] - best).max().item()
    torch_gap = (d[rows, torch_idx.cpu()] - best).max().item()
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],)
    assert gap <= 2 * torch_gap + 1e-9 * best.abs().max().item(), f"{name}: gap {gap:.3g} vs torch {torch_gap:.3g}"


def near_ties(rng, n: int, K: int, C: int):
    """z [n, C], codebook [K, C] and the nearest codes, with row r between a pair of codes 0.1
    apart (30% or 70% of the way from a to b): their squared distances differ by about 0.004,
    far above fp32's rounding (1e-5 here) and far below what bf16 factors resolve (about 0.03)."""
    cb = torch.randn(K, C, generator=rng)
    perm = torch.randperm(K, generator=rng)[: 2 * n].view(n, 2)
    a, b = perm[:, 0], perm[:, 1]
    delta = torch.randn(n, C, generator=rng)
    cb[b] = cb[a] + 0.1 * delta / delta.norm(dim=1, keepdim=True)
    near_b = torch.rand(n, generator=rng) < 0.5
    f = torch.where(near_b, 0.7, 0.3).unsqueeze(1)
    z = cb[a] + f * (cb[b] - cb[a])
    expected = torch.where(near_b, b, a)
    assert torch.equal(dist64(z, cb).argmin(1), expected) and torch.equal(vq_quantize_ref(z, cb), expected)
    return z, cb, expected


# Quiet NaNs by their bits: the largest positive payload, and the sign bit with the quiet bit only
# (what x86 makes of inf - inf). A cast would not keep them: torch makes every 16-bit NaN positive.
NAN_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF, 0xFFC00000),
            torch.bfloat16: (torch.int16, 0x7FFF, 0xFFC0),
            torch.float16: (torch.int16, 0x7FFF, 0xFE00)}


def signed_nan(dtype: torch.dtype, negative: bool = False) -> torch.Tensor:
    itype, positive, sign_set = NAN_BITS[dtype]
    return torch.tensor([sign_set if negative else positive]).to(itype).view(dtype)[0]


def nan_cases(rng, n: int, K: int, C: int, dtype: torch.dtype):
    """(name, z, codebook, {row: code}) with NaN and inf inputs (K >= 260). The reference reads their
    distances with torch.argmin's rule: a NaN distance is below every number, -inf included, and the
    first NaN wins whatever its sign and payload. In every case row 1 is all NaN (code 0), row 2 has
    +inf in channel 2 (-inf distances at the codes positive there), row 3 +inf and -inf (inf - inf:
    NaN at the codes whose two channels share a sign); channel 0 is positive in every row."""
    z = torch.randn(n, C, generator=rng)
    z[:, 0] = z[:, 0].abs() + 0.5
    z[1] = float("nan")
    z[2, 2] = float("inf")
    z[3, 4], z[3, 5] = float("inf"), float("-inf")
    base = torch.randn(K, C, generator=rng)
    z, base = z.to(dtype), base.to(dtype)
    first_neg_inf = int((base[:, 2] > 0).nonzero()[0])

    cb = base.clone()
    cb[140, 3], cb[250, 3] = signed_nan(dtype), signed_nan(dtype, negative=True)
    yield "a NaN code, then one with the sign bit set", z, cb, {0: 140, 1: 0, 2: 140}
    cb = base.clone()
    cb[250, 3] = signed_nan(dtype, negative=True)
    yield "a NaN code with the sign bit set after -inf", z, cb, {0: 250, 1: 0, 2: 250}
    for first, second in ((False, True), (True, False)):  # two NaN codes two code tiles apart
        cb = base.clone()
        cb[20, 3], cb[K - 10, 3] = signed_nan(dtype, negative=first), signed_nan(dtype, negative=second)
        yield f"NaN codes 20 and {K - 10} of signs {first}, {second}", z, cb, {0: 20, 1: 0, 2: 20}
    cb = base.clone()
    cb[7, 0] = float("inf")  # |e|^2 - 2 z.e = inf - inf for every row
    yield "inf in a code", z, cb, {0: 7, 1: 0, 2: 7}
    yield "NaN and inf latents only", z, base, {1: 0, 2: first_neg_inf}


def assert_nan_rule(got, z, cb, expected, name):
    ref = vq_quantize_ref(z, cb)
    assert {r: int(ref[r]) for r in expected} == expected, f"{name}: the reference changed"
    assert torch.equal(got, ref), f"{name}: {got.tolist()} vs {ref.tolist()}"


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_quantize_takes_the_first_nan_cpu(rng, dtype):
    """NaN and inf inputs give the reference's codes (the kernel had skipped NaN distances): 301 codes
    over three code tiles and a tail, 70 rows (row blocks of 32 and 4 with leftovers)."""
    for name, z, cb, expected in nan_cases(rng, 70, 301, 20, dtype):
        assert_nan_rule(nb.vq_quantize_op(z, cb), z, cb, expected, name)


@pytest.mark.usefixtures("cpu_width")
def test_vq_quantize_near_ties_cpu(rng):
    z, cb, expected = near_ties(rng, 64, 301, 48)
    assert torch.equal(nb.vq_quantize_op(z, cb), expected)


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vq_quantize_cpu(rng, dtype):
    z = torch.randn(203, 24, generator=rng).to(dtype)
    cb = torch.randn(113, 24, generator=rng).to(dtype)
    idx = nb.vq_quantize_op(z, cb)
    assert_nearest(idx, z, cb, vq_quantize_ref(z, cb), f"cpu {dtype}")


def test_vq_quantize_exact_codes_and_ties_cpu(rng):
    """Rows equal to codebook entries pick them; duplicated entries resolve to the first, as torch.argmin."""
    cb = torch.randn(37, 16, generator=rng)
    cb[20] = cb[3]
    pick = torch.randint(0, 37, (113,), generator=rng)
    idx = nb.vq_quantize_op(cb[pick].contiguous(), cb)
    expected = torch.where(pick == 20, torch.full_like(pick, 3), pick)
    assert torch.equal(idx, expected)
    assert torch.equal(idx, vq_quantize_ref(cb[pick], cb))


@pytest.mark.usefixtures("cpu_width")
def test_vq_quantize_ties_across_code_tiles_cpu(rng):
    """A codebook longer than the kernel's code tile (128), an odd count and a width off its 8-float
    steps: duplicates in different tiles (7 and 250) and across a tile edge (127 and 128) still
    resolve to the first; rows left over from its 4- and 32-row blocks."""
    cb = torch.randn(301, 20, generator=rng)
    cb[250], cb[128] = cb[7], cb[127]
    pick = torch.randint(0, 301, (70,), generator=rng)
    pick[:4] = torch.tensor([250, 128, 300, 7])
    idx = nb.vq_quantize_op(cb[pick].contiguous(), cb)
    expected = torch.where(pick == 250, 7, torch.where(pick == 128, 127, pick))
    assert torch.equal(idx, expected)
    z = torch.randn(70, 20, generator=rng)
    assert_nearest(nb.vq_quantize_op(z, cb), z, cb, vq_quantize_ref(z, cb), "301 codes")


def duplicate_last_code(rng, K: int, C: int):
    """A codebook whose last code repeats code 0 and 200 rows nearest to that code: every row's two
    nearest codes are bit-identical duplicates, so its answer is 0 (the first), whatever the rounding."""
    cb = torch.randn(K, C, generator=rng)
    cb[K - 1] = cb[0]
    z = cb[0] + 0.05 * torch.randn(200, C, generator=rng)
    d = (z.double()[:, None] - cb.double()).pow(2).sum(-1)  # no matmul: the duplicates' columns are equal
    assert torch.equal(d[:, 0], d[:, -1]) and (d[:, 1:-1].min(1).values > d[:, 0]).all()
    return z, cb


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("K, C", [(3, 4), (3, 257), (5, 64), (129, 20), (1025, 96)])
def test_vq_quantize_duplicate_of_the_last_code_ties_to_the_first_cpu(rng, K, C):
    """An odd number of codes in the last code tile: its last code is scored like every other (the kernel
    had scored it with another dot product, whose rounding let the duplicate win by an ulp)."""
    z, cb = duplicate_last_code(rng, K, C)
    assert nb.vq_quantize_op(z, cb).tolist() == [0] * 200


@pytest.mark.usefixtures("cpu_width")
def test_vq_quantize_strided_rows_cpu(rng):
    big = torch.randn(50, 40, generator=rng)
    z = big[:, 5:21]  # row stride 40, last dim contiguous
    cb = torch.randn(29, 16, generator=rng)
    assert_nearest(nb.vq_quantize_op(z, cb), z, cb, vq_quantize_ref(z, cb), "strided")
    assert torch.equal(vq_quantize(z, cb, backend="native"), nb.vq_quantize_op(z, cb))


@pytest.mark.usefixtures("cpu_width")
def test_vq_strided_codebook_cpu(rng):
    """A codebook that is a column slice of a wider matrix (row stride 40, 16 columns): its codes are read
    at that stride by the norms, the nearest-code search (an odd number of codes: the last one scored
    alone) and the gather, giving the ids and values of a contiguous copy."""
    big = torch.randn(29, 40, generator=rng)
    cb = big[:, 3:19]
    z = torch.randn(70, 16, generator=rng)
    ids = nb.vq_quantize_op(z, cb)
    assert torch.equal(ids, nb.vq_quantize_op(z, cb.contiguous()))
    assert_nearest(ids, z, cb, vq_quantize_ref(z, cb), "strided codebook")
    near = cb[torch.arange(70) % 29] + 1e-3 * torch.randn(70, 16, generator=rng)  # each row beside a known code
    assert nb.vq_quantize_op(near, cb).tolist() == (torch.arange(70) % 29).tolist()
    idx = torch.randint(0, 29, (2, 3, 5), generator=rng)
    assert torch.equal(nb.vq_gather_op(idx, cb), vq_gather_ref(idx, cb.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_vq_gather_cpu(rng, dtype, index_dtype):
    cb = torch.randn(113, 12, generator=rng).to(dtype)
    idx = torch.randint(0, 113, (3, 5, 7), generator=rng).to(index_dtype)
    out = nb.vq_gather_op(idx, cb)
    assert out.shape == (3, 12, 5, 7) and out.dtype == dtype
    assert torch.equal(out, vq_gather_ref(idx, cb))
    assert torch.equal(vq_gather(idx, cb, backend="native"), out)


def test_vq_bad_arguments(rng):
    z, cb = torch.randn(8, 4, generator=rng), torch.randn(5, 4, generator=rng)
    with pytest.raises(ValueError, match=r"z \[N, C\]"):
        nb.vq_quantize_op(z, cb[:, :3])
    with pytest.raises(TypeError, match="share one dtype"):
        nb.vq_quantize_op(z, cb.double())
    with pytest.raises(TypeError, match="float32"):
        nb.vq_quantize_op(z.double(), cb.double())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        nb.vq_quantize_op(torch.randn(4, 8, generator=rng).t(), cb.repeat(1, 2).contiguous()[:, :4].contiguous())
    with pytest.raises(TypeError, match="int32 or int64"):
        nb.vq_gather_op(torch.zeros(1, 2, 2), cb)
    with pytest.raises(ValueError, match="contiguous"):
        nb.vq_gather_op(torch.zeros(1, 4, 4, dtype=torch.long).transpose(1, 2), cb)
    with pytest.raises(ValueError, match=r"indices \[B, h, w\]"):
        nb.vq_gather_op(torch.zeros(4, 4, dtype=torch.long), cb)
    assert "native" in dispatch.available("vq_quantize")


def test_vq_gather_shapes_fake_and_meta_tensors(rng):
    """The entry point's range check reads the codes on the host: fake tensors (FakeTensorMode, export)
    and meta tensors have none to read, so it is skipped for them and every backend that takes them
    gives the output's shape; real codes are still checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for backend in ("auto", "native", "torch"):
            out = vq_gather(torch.zeros(2, 3, 4, dtype=torch.long), torch.randn(30, 8), backend=backend)
            assert out.shape == (2, 8, 3, 4), backend
    for backend in ("auto", "torch"):
        out = vq_gather(torch.zeros(2, 3, 4, dtype=torch.long, device="meta"), torch.randn(30, 8, device="meta"),
                        backend=backend)
        assert out.shape == (2, 8, 3, 4) and out.device.type == "meta", backend
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 30\), got values in \[0, 30\]"):
        vq_gather(torch.tensor([[[0, 30]]]), torch.randn(30, 8, generator=rng))


def test_vq_gather_refuses_codes_that_are_not_integers(rng):
    """Float and bool codes are refused at the entry point on every backend (torch truncated floats to
    codes, Triton took bools as codes 0 and 1)."""
    cb = torch.randn(30, 8, generator=rng)
    for backend in ("auto", *dispatch.available("vq_gather")):
        for dtype in (torch.float32, torch.float16, torch.bool):
            with pytest.raises(TypeError, match=rf"vq_gather: indices must hold integer codes, got {dtype}"):
                vq_gather(torch.ones(1, 2, 3, dtype=dtype), cb, backend=backend)
        assert torch.equal(vq_gather(torch.ones(1, 2, 3, dtype=torch.int32), cb, backend=backend),
                           cb[1][None, :, None, None].expand(1, 8, 2, 3))



def test_vq_on_no_rows_takes_any_strides():
    """An empty input has nothing to load, so its strides are not checked: no rows of a strided view give no
    codes, as on every other backend."""
    z, cb = torch.empty(0, 16)[:, ::2], torch.randn(5, 8)
    assert z.stride(-1) == 2
    out = nb.vq_quantize(z, cb)
    assert out.shape == (0,) and out.dtype == torch.int64
    assert nb._vq_quantize_supports(z, cb)


def test_vq_code_split_counts_a_partial_row_tile_as_a_cta(monkeypatch):
    """vq_code_split gives every SM about two CTAs: 200 rows make two CTAs of up to 128 rows (the second one
    partial), so 4 SMs take four codebook splits, not the eight that one CTA would need."""
    monkeypatch.setattr(nb, "_sm_count", lambda device: 4)
    cb = torch.empty(1024, 8)
    assert nb.vq_code_split(torch.empty(128, 8), cb) == (8, 128)
    assert nb.vq_code_split(torch.empty(200, 8), cb) == (4, 256)
    assert nb.vq_code_split(torch.empty(257, 8), cb) == (3, 384)
    assert nb.vq_code_split(torch.empty(200, 8), cb, code_splits=2) == (2, 512)


def test_vq_gather_of_a_codebook_that_needs_gradients_keeps_them(rng):
    """The native gather is forward-only: a codebook that requires grad (a VQGAN in training) is declined by
    name on the explicit backend, and `auto` takes a path whose codebook gradient is the reference one."""
    cb = torch.randn(30, 8, generator=rng, requires_grad=True)
    idx = torch.randint(0, 30, (2, 3, 4), generator=rng)
    assert "forward-only" in nb._vq_gather_supports(idx, cb).reason
    with pytest.raises(ValueError, match="forward-only"):
        vq_gather(idx, cb, backend="native")
    w = torch.randn(2, 8, 3, 4, generator=rng)
    (vq_gather(idx, cb) * w).sum().backward()
    want = torch.zeros(30, 8).index_add_(0, idx.flatten(), w.permute(0, 2, 3, 1).reshape(-1, 8))
    torch.testing.assert_close(cb.grad, want)
    with torch.no_grad():
        assert nb._vq_gather_supports(idx, cb)

def test_vq_under_torch_compile_cpu(rng):
    torch._dynamo.reset()
    z, cb = torch.randn(31, 8, generator=rng), torch.randn(17, 8, generator=rng)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(z, cb):
        codes = nb.vq_quantize_op(z, cb)
        return nb.vq_gather_op(codes.view(1, 31, 1), cb)

    out = roundtrip(z, cb)
    assert torch.equal(out, vq_gather_ref(vq_quantize_ref(z, cb).view(1, 31, 1), cb))


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vq_quantize_cuda(rng, dtype):
    z = torch.randn(1037, 256, generator=rng).to("cuda", dtype)
    cb = torch.randn(8192, 256, generator=rng).to("cuda", dtype)
    idx = nb.vq_quantize_op(z, cb)
    assert_nearest(idx, z, cb, vq_quantize_ref(z, cb), f"cuda {dtype}")


@pytest.mark.gpu
def test_vq_quantize_odd_sizes_cuda(rng):
    z = torch.randn(113, 23, generator=rng).cuda()
    cb = torch.randn(203, 23, generator=rng).cuda()
    assert_nearest(nb.vq_quantize_op(z, cb), z, cb, vq_quantize_ref(z, cb), "cuda odd")
    cb[100] = cb[7]
    pick = torch.randint(0, 203, (113,), generator=rng).cuda()
    idx = nb.vq_quantize_op(cb[pick].contiguous(), cb)
    assert torch.equal(idx, torch.where(pick == 100, torch.full_like(pick, 7), pick))


@pytest.mark.gpu
def test_vq_quantize_near_ties_cuda(rng):
    """fp32 codes that bf16 tensor-core products cannot tell apart: the exact recomputation decides."""
    z, cb, expected = near_ties(rng, 1000, 8192, 256)
    assert torch.equal(nb.vq_quantize_op(z.cuda(), cb.cuda()).cpu(), expected)
    z[5] = float("nan")  # a row with no finite distance reads code 0, as torch.argmin gives
    assert nb.vq_quantize_op(z.cuda(), cb.cuda())[5].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_vq_gather_cuda(rng, dtype, index_dtype):
    cb = torch.randn(8192, 256, generator=rng).to("cuda", dtype)
    idx = torch.randint(0, 8192, (3, 16, 17), generator=rng).to("cuda", index_dtype)
    assert torch.equal(nb.vq_gather_op(idx, cb), vq_gather_ref(idx, cb))
