"""VQ nearest-code search and codebook gather: references and entry points."""
from __future__ import annotations

import torch

from . import dispatch


def vq_quantize_ref(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_c ||z_n - e_c||^2 for z [N, C], codebook [K, C] -> int64 [N].
    Computed as ||e||^2 - 2 z.e (||z||^2 is constant per row), in fp32 or wider. A NaN distance
    (NaN inputs, or inf - inf from inf ones) is taken as torch.argmin takes it: below every
    number, the first NaN winning. A corrupt code is then chosen and its NaN reaches the decoder,
    not hidden behind the nearest finite code; the fast paths do the same.
    Ties: among bit-identical distances the first code wins, as in torch.argmin. Duplicate codes do not
    always get bit-identical distances here: torch's matmul may round some columns of z @ e^T
    differently from others (on an AVX-512 CPU with MKL, a 5-code book at 64 channels picked the last of
    two duplicates for some rows). The native and Triton kernels compute every code's distance alike, so among duplicate
    codes they pick the lowest index.
    Finite inputs large enough that ||e||^2 overflows (|values| near 1e19 in fp32) give inf - inf = NaN distances,
    and then each backend's first NaN, which differ: outside this contract, as for attention's overflow."""
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    ef = codebook.to(zf.dtype)
    with dispatch.autocast_off(z.device.type):  # under autocast the product would run in bf16 and move the argmin
        d = (ef * ef).sum(1).unsqueeze(0) - 2.0 * zf @ ef.t()
    return d.argmin(dim=1)


def vq_gather_ref(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices [B, h, w] -> embeddings [B, C, h, w] (the decoder's input layout)."""
    return codebook[indices.long()].permute(0, 3, 1, 2).contiguous()


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_quantize wants z [N, C] and codebook [K, C]; got {tuple(z.shape)}, {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("vq_quantize: the codebook holds no code (shape [0, C]); pass the VQGAN's codebook")
    dispatch.check_floats("vq_quantize", same=False, z=z, codebook=codebook)  # the reference casts the codebook to z's
    dispatch.check_devices("vq_quantize", z=z, codebook=codebook)
    return dispatch.call("vq_quantize", backend, z.device.type, z, codebook)


def vq_gather(indices: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if indices.dim() != 3 or codebook.dim() != 2:
        raise ValueError(f"vq_gather wants indices [B, h, w] and codebook [K, C]; got {tuple(indices.shape)}, {tuple(codebook.shape)}")
    dispatch.require_integers(indices, "vq_gather: indices must hold integer codes")
    dispatch.check_devices("vq_gather", indices=indices, codebook=codebook)
    # The range check reads the codes on the host (one sync); a compiled graph, fake and meta tensors
    # (shape propagation: no values to read) skip it.
    if indices.numel() and dispatch.values_readable(indices):
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()
        if lo < 0 or hi >= codebook.shape[0]:
            raise ValueError(f"codes must lie in [0, {codebook.shape[0]}), got values in [{lo}, {hi}]")
    return dispatch.call("vq_gather", backend, indices.device.type, indices, codebook)


dispatch.register("vq_quantize", "torch", vq_quantize_ref)
dispatch.register("vq_gather", "torch", vq_gather_ref)
