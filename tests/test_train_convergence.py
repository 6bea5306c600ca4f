"""Liger-style convergence check: a short training run with the fused linear-cross-entropy backend
follows the same loss curve as the PyTorch reference (Triton runs in its interpreter on CPU)."""
import numpy as np
import pytest
import torch

from worldvla.ops import dispatch
from worldvla.train import trainer
from worldvla.train.checkpointing import latest_checkpoint

from test_train import make_store  # noqa: E402  (pytest puts tests/ on sys.path)


def _fused_backend_runs(backend, device):
    if backend not in dispatch.available("linear_cross_entropy"):
        return False
    h, w = torch.randn(5, 8, device=device), torch.randn(11, 8, device=device)
    y = torch.randint(0, 11, (5,), device=device)
    try:
        dispatch.resolve("linear_cross_entropy", backend, device, h, w, y, None, 1e-5, -100)
    except (ValueError, RuntimeError):
        return False
    return True


# Triton is the only fused linear_cross_entropy backend (there is no native one).
@pytest.mark.parametrize("backend,device", [("triton", "cpu"), pytest.param("triton", "cuda", marks=pytest.mark.gpu)])
def test_fused_loss_backend_follows_reference_curve(backend, device, tmp_path):
    if not _fused_backend_runs(backend, device):
        pytest.skip(f"no {backend} linear_cross_entropy for {device} tensors here")
    store = make_store(tmp_path, seed=4)
    runs = {}
    for be in ("torch", backend):
        a = trainer.build_parser().parse_args(
            ["--store", str(store), "--out", str(tmp_path / be), "--config", "tiny", "--steps", "5",
             "--batch-tokens", "600", "--micro-tokens", "300", "--lr", "3e-3", "--warmup", "1", "--no-progress",
             "--no-export", "--save-every", "0", "--loss-backend", be, "--device", device, "--precision", "fp32"])
        runs[be] = trainer.train(a)
    ref, fused = runs["torch"]["losses"], runs[backend]["losses"]
    assert ref[-1] < ref[0]
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    wr = torch.load(latest_checkpoint(tmp_path / "torch") / "model.pt", weights_only=True)
    wf = torch.load(latest_checkpoint(tmp_path / backend) / "model.pt", weights_only=True)
    for k in wr:
        torch.testing.assert_close(wf[k], wr[k], rtol=1e-4, atol=1e-4)  # Adam: ~3% of one lr step
