"""Backend equivalence on a CUDA device at realistic sizes (skipped where there is no GPU or no mamba-ssm)."""
import pytest
import torch

from nnunet_mamba.ops import selective_scan
from nnunet_mamba.ops.selective_scan import cuda_backend_status

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_backend_status()[0], reason="needs CUDA and mamba-ssm")]

# (batch, channels, length, groups): Mamba at U-Mamba's bottleneck, SS2D stages of Swin-UMamba (4 directions),
# a ViM block (2 directions), a long 3D sequence
SHAPES = [(2, 1024, 100, None), (12, 4 * 192, 6400, 4), (12, 4 * 384, 1600, 4), (4, 2 * 384, 1024, 2),
          (2, 64, 65536, None)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("batch,dim,length,groups", SHAPES)
def test_torch_backend_equals_mamba_ssm(batch, dim, length, groups):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 16
    bc_shape = (batch, n, length) if groups is None else (batch, groups, n, length)
    make = lambda *s, scale=1.0: (scale * torch.randn(*s, device="cuda", generator=g)).requires_grad_()  # noqa: E731
    inputs = dict(u=make(batch, dim, length), delta=make(batch, dim, length, scale=0.5),
                  A=(-torch.arange(1, n + 1, device="cuda").float().repeat(dim, 1)).requires_grad_(),
                  B=make(*bc_shape), C=make(*bc_shape), D=make(dim), z=make(batch, dim, length),
                  delta_bias=make(dim, scale=0.1))
    results = {}
    for backend in ("cuda", "torch"):
        for t in inputs.values():
            t.grad = None
        out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        weight = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        (out * weight).sum().backward()
        results[backend] = (out.detach(), last.detach(), {k: t.grad.clone() for k, t in inputs.items()})
    (out_c, last_c, grads_c), (out_t, last_t, grads_t) = results["cuda"], results["torch"]
    assert relative_error(out_t, out_c) < 1e-4
    assert relative_error(last_t, last_c) < 1e-4
    for name in inputs:
        assert relative_error(grads_t[name], grads_c[name]) < 1e-3, name
