"""Triton VQ nearest-code search and codebook gather against float64 / exact references."""
import pytest
import torch

triton = pytest.importorskip("triton")

from worldvla.ops import vq_gather, vq_gather_ref, vq_quantize, vq_quantize_ref  # noqa: E402

from worldvla.kernels import vq as K  # noqa: E402

from test_native_vq import assert_nan_rule, duplicate_last_code, nan_cases  # noqa: E402  (cases every backend meets)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def distances64(z, codebook):
    z, e = z.double(), codebook.double()
    return (e * e).sum(1)[None, :] - 2.0 * z @ e.t()


def gap(idx, d64):
    """How much farther the chosen code is than the nearest one, in exact arithmetic."""
    return (d64.gather(1, idx.view(-1, 1)).squeeze(1) - d64.min(1).values).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_near_codes_exact(rng, dtype):
    """Latents close to codebook entries: every index must be exactly the reference's."""
    K_codes, C, N = 300, 40, 203
    codebook = torch.randn(K_codes, C, generator=rng)
    truth = torch.randint(0, K_codes, (N,), generator=rng)
    z = codebook[truth] + 0.01 * torch.randn(N, C, generator=rng)
    z, codebook = z.to(DEV, dtype), codebook.to(DEV, dtype)
    got = K.vq_quantize(z, codebook)
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert torch.equal(got.cpu(), vq_quantize_ref(z, codebook).cpu())
    assert torch.equal(got.cpu(), distances64(z, codebook).argmin(1).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_random_latents(rng, dtype, poison_empty):
    """Random latents (near-ties possible): the chosen code is as near as fp32 arithmetic can tell.

    Tolerance: the chosen code's exact distance exceeds the nearest one's by at most twice what
    torch's fp32 reference gives up, plus 4 fp32 ulps of the distances' scale."""
    K_codes, C, N = 1000, 256, 131
    codebook = torch.randn(K_codes, C, generator=rng).to(DEV, dtype)
    z = torch.randn(N, C, generator=rng).to(DEV, dtype)
    got = vq_quantize(z, codebook, backend="triton")
    d64 = distances64(z, codebook)
    floor = 4 * torch.finfo(torch.float32).eps * d64.abs().max().item()
    assert gap(got, d64) <= 2 * gap(vq_quantize_ref(z, codebook), d64) + floor
    assert (got == d64.argmin(1)).float().mean().item() > 0.97


@pytest.mark.parametrize("n_splits", [1, 3])
def test_quantize_ties_pick_lowest_index(rng, n_splits):
    codebook = torch.randn(260, 32, generator=rng)
    codebook[250] = codebook[3]  # duplicate in another code tile (and, with 3 splits, another program)
    codebook[5] = codebook[131]
    z = torch.stack([codebook[3], codebook[131], codebook[250]]) + 1e-3 * torch.randn(3, 32, generator=rng)
    got = K.vq_quantize(z.to(DEV), codebook.to(DEV), n_splits=n_splits).cpu()
    assert got.tolist() == [3, 5, 3]


@pytest.mark.parametrize("n_codes, C", [(3, 4), (3, 257), (5, 64), (129, 20), (1025, 96)])
def test_quantize_duplicate_of_the_last_code_ties_to_the_first(rng, n_codes, C):
    """Bit-identical duplicate codes (the last repeats code 0): the first wins, as in the native kernels."""
    z, cb = duplicate_last_code(rng, n_codes, C)
    assert K.vq_quantize(z.to(DEV), cb.to(DEV)).cpu().tolist() == [0] * 200


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_splits", [1, 3])
def test_quantize_takes_the_first_nan(rng, dtype, n_splits):
    """A NaN distance is below every number, -inf included, and the first NaN wins whatever its sign
    and payload, in whichever code tile and program, as torch.argmin (tl.min had skipped NaN): the
    cases of test_native_vq.nan_cases."""
    for name, z, cb, expected in nan_cases(rng, 70, 300, 32, dtype):
        got = K.vq_quantize(z.to(DEV), cb.to(DEV), n_splits=n_splits).cpu()
        assert_nan_rule(got, z, cb, expected, name)


def test_quantize_codebook_split_over_programs(rng):
    """Row tiles x codebook splits: every split count gives the reference's codes (latents near
    their codes, so no near-ties), including a last split shorter than one code tile."""
    codebook = torch.randn(300, 24, generator=rng)
    truth = torch.randint(0, 300, (70,), generator=rng)
    z = (codebook[truth] + 0.01 * torch.randn(70, 24, generator=rng)).to(DEV)
    codebook = codebook.to(DEV)
    splits, split = K.code_splits(70, 300, 64, 128, z.device)
    assert split % 128 == 0 and splits * split >= 300
    for n in (1, 2, 3):
        assert torch.equal(K.vq_quantize(z, codebook, n_splits=n).cpu(), truth)


def test_quantize_mixed_dtypes_and_strides(rng):
    codebook = torch.randn(100, 48, generator=rng).to(DEV)  # fp32 codebook, bf16 latents: fp32 distances
    z_full = torch.randn(77, 96, generator=rng).to(DEV, torch.bfloat16)
    z = z_full[:, ::2]  # non-contiguous
    got = K.vq_quantize(z, codebook)
    assert torch.equal(got.cpu(), vq_quantize_ref(z, codebook).cpu())


def test_quantize_and_gather_read_rows_at_their_stride(rng):
    """Latents and codebooks that are column slices of wider buffers (rows farther apart than their C channels,
    last dim contiguous, so no copy is made): each row is read from its own stride, not from C apart."""
    cb_buf = torch.randn(300, 40, generator=rng)
    codebook = cb_buf[:, 3:27]  # [300, 24], row stride 40
    truth = torch.randint(0, 300, (70,), generator=rng)
    z_buf = torch.randn(70, 37, generator=rng)
    z_buf[:, 5:29] = codebook[truth] + 0.01 * torch.randn(70, 24, generator=rng)
    z = z_buf[:, 5:29]  # [70, 24], row stride 37
    assert z.stride() == (37, 1) and codebook.stride() == (40, 1)
    z, codebook = z.to(DEV), codebook.to(DEV)
    for n_splits in (1, 3):
        assert torch.equal(K.vq_quantize(z, codebook, n_splits=n_splits).cpu(), truth)
    idx = torch.randint(0, 300, (2, 5, 7), generator=rng).to(DEV)
    assert torch.equal(K.vq_gather(idx, codebook), vq_gather_ref(idx, codebook.contiguous()))


def test_quantize_and_gather_take_transposed_codebooks_and_codes(rng):
    """A codebook stored channel-first ([C, K] storage seen as [K, C], channels not contiguous) and codes of a
    transposed frame ([B, w, h] storage seen as [B, h, w]): the same codes and embeddings as contiguous copies."""
    codebook = torch.randn(24, 300, generator=rng).t()
    assert codebook.stride() == (1, 300)
    truth = torch.randint(0, 300, (70,), generator=rng)
    z = codebook[truth] + 0.01 * torch.randn(70, 24, generator=rng)
    z, codebook = z.to(DEV), codebook.to(DEV)
    assert torch.equal(K.vq_quantize(z, codebook).cpu(), truth)
    idx = torch.randint(0, 300, (2, 7, 5), generator=rng).to(DEV).transpose(1, 2)
    assert not idx.is_contiguous()
    want = vq_gather_ref(idx.contiguous(), codebook.contiguous())
    assert torch.equal(K.vq_gather(idx, codebook), want)
    assert torch.equal(vq_gather(idx, codebook, backend="triton"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_exact(rng, dtype, poison_empty):
    codebook = torch.randn(300, 40, generator=rng).to(DEV, dtype)
    idx = torch.randint(0, 300, (2, 5, 7), generator=rng).to(DEV)
    got = vq_gather(idx, codebook, backend="triton")
    assert got.shape == (2, 40, 5, 7) and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, vq_gather_ref(idx, codebook))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64])
def test_gather_copies_codebooks_of_other_dtypes_exactly(rng, dtype):
    """The gather is a copy: float64 and integer codebooks (which its dispatch accepts) came back rounded through
    float32 under Triton's interpreter (int64 entries off by up to 3e7)."""
    if dtype.is_floating_point:
        codebook = torch.randn(300, 40, generator=rng, dtype=dtype).to(DEV)
    else:  # values float32 cannot hold exactly (above 2**24)
        codebook = torch.randint(-2**30, 2**30, (300, 40), generator=rng, dtype=dtype).to(DEV)
    idx = torch.randint(0, 300, (2, 5, 7), generator=rng).to(DEV)
    got = vq_gather(idx, codebook, backend="triton")
    assert got.dtype == dtype and torch.equal(got, vq_gather_ref(idx, codebook))


def test_gather_of_codes_out_of_range_reads_nothing(rng):
    """The kernel behind the checked entry point (torch.compile reaches it without the host's range check):
    codes outside [0, K) read outside the codebook (values of other memory); they give zeros, as the
    native gather does."""
    codebook = torch.randn(11, 40, generator=rng).to(DEV)
    idx = torch.tensor([[[3, 11, -1, 10, 2**40]]]).to(DEV)
    got = torch.ops.worldvla_triton.vq_gather(idx, codebook)
    assert torch.equal(got[0, :, 0, [0, 3]], codebook[[3, 10]].t())
    assert torch.equal(got[0, :, 0, [1, 2, 4]], torch.zeros(40, 3, device=DEV))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [-1, 11])
def test_gather_entry_refuses_codes_outside_the_codebook(rng, backend, bad):
    """The checked entry point refuses a code below 0 as one past the end, on every backend: torch's indexing
    would read a negative code from the codebook's end (code -1 as code K - 1) without a word."""
    codebook = torch.randn(11, 40, generator=rng).to(DEV)
    idx = torch.tensor([[[3, bad, 10]]]).to(DEV)
    lo, hi = min(bad, 3), max(bad, 10)
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, 11\), got values in \[{lo}, {hi}\]"):
        vq_gather(idx, codebook, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_entry_refuses_an_empty_codebook_and_integer_latents(rng, backend):
    """Refused by name at the entry point on every backend: a codebook of no code (torch's argmin over an empty
    dimension fails without naming it) and integer latents or codes (torch's integer matmul would pick codes
    from truncated values)."""
    z = torch.randn(5, 8, generator=rng).to(DEV)
    codebook = torch.randn(10, 8, generator=rng).to(DEV)
    with pytest.raises(ValueError, match=r"the codebook holds no code \(shape \[0, C\]\)"):
        vq_quantize(z, codebook[:0], backend=backend)
    with pytest.raises(TypeError, match="vq_quantize: z must be a floating-point tensor, got torch.int64"):
        vq_quantize((z * 10).long(), codebook, backend=backend)
    with pytest.raises(TypeError, match="vq_quantize: codebook must be a floating-point tensor, got torch.int32"):
        vq_quantize(z, (codebook * 10).int(), backend=backend)


def test_gather_of_batches_beyond_the_grid_goes_to_another_backend():
    """The batch is the gather's grid z axis, at most 65535 programs: larger batches are declined with the
    reason (so "auto" takes another backend), and the kernel refuses them. Expanded (zero-stride) codes."""
    from worldvla.ops import dispatch
    from worldvla.ops import triton_backend as tb

    codebook = torch.zeros(4, 16, device=DEV)
    codes = torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV)
    assert tb._vq_gather_supports(codes.expand(65535, 2, 2), codebook) is True
    too_many = codes.expand(65536, 2, 2)
    why = tb._vq_gather_supports(too_many, codebook)
    assert not why and "batch = 65536 > 65535" in why.reason, why
    with pytest.raises(ValueError, match="'triton' backend of 'vq_gather' does not support.*65535"):
        dispatch.resolve("vq_gather", "triton", DEV, too_many, codebook)
    with pytest.raises(ValueError, match="batch = 65536 > 65535"):
        K.vq_gather(too_many, codebook)


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="vq_quantize wants"):
        K.vq_quantize(torch.randn(4, 8, device=DEV), torch.randn(10, 9, device=DEV))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        K.vq_quantize(torch.randn(4, 8, device=DEV).double(), torch.randn(10, 8, device=DEV).double())
    with pytest.raises(ValueError, match="does not support"):
        vq_quantize(torch.randn(4, 8, device=DEV).double(), torch.randn(10, 8, device=DEV).double(), backend="triton")
    for dtype in (torch.float32, torch.bool):  # the kernel's own check (bools were taken as codes 0 and 1)
        with pytest.raises(TypeError, match=f"indices must hold integer codes, got {dtype}"):
            K.vq_gather(torch.ones(1, 2, 3, dtype=dtype, device=DEV), torch.randn(10, 8, device=DEV))


@pytest.mark.gpu
def test_gpu_chameleon_sizes():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(8192, 256, generator=g).cuda()
    truth = torch.randint(0, 8192, (4 * 32 * 32,), generator=g)
    z = (codebook.cpu()[truth] + 0.01 * torch.randn(truth.numel(), 256, generator=g)).cuda()
    assert torch.equal(K.vq_quantize(z, codebook).cpu(), truth)
    assert torch.equal(K.vq_quantize(z.bfloat16(), codebook.bfloat16()), vq_quantize_ref(z.bfloat16(), codebook.bfloat16()))
    idx = truth.view(4, 32, 32).cuda()
    assert torch.equal(K.vq_gather(idx, codebook.bfloat16()), vq_gather_ref(idx, codebook.bfloat16()))


def test_quantize_takes_latents_of_the_codebooks_dtype_stored_channel_first(rng):
    """fp32 latents of an fp32 codebook stored channel-first ([C, N] storage seen as [N, C]: no dtype change
    makes the copy): the kernel reads channels one apart, so such latents are made contiguous first."""
    codebook = torch.randn(300, 24, generator=rng)
    truth = torch.randint(0, 300, (70,), generator=rng)
    z = (codebook[truth] + 0.01 * torch.randn(70, 24, generator=rng)).t().contiguous().t()
    assert z.stride() == (1, 70) and z.dtype == codebook.dtype
    z, codebook = z.to(DEV), codebook.to(DEV)
    for n_splits in (1, 3):
        assert torch.equal(K.vq_quantize(z, codebook, n_splits=n_splits).cpu(), truth)


def test_gather_refuses_complex_codes():
    """Complex codes are no integer codes: refused by name with the dtype, as float and bool codes are."""
    codes = torch.ones(1, 2, 3, dtype=torch.complex64, device=DEV)
    with pytest.raises(TypeError, match=r"indices must hold integer codes, got torch\.complex64"):
        K.vq_gather(codes, torch.randn(10, 8, device=DEV))
