"""Mamba-2's gated norm, `rmsnorm(x * silu(z))` over groups of channels times a weight: fla's fused kernel (the
CUDA path of `grouped_gated_rms_norm`) against the torch reference, output and the gradients of x, z and the
weight. On CPU through Triton's interpreter (fp32, against float64); on a GPU compiled, in fp32 and bf16."""

import pytest
import torch

from dcablate.kernels.gated_norm import grouped_gated_rms_norm, grouped_gated_rms_norm_reference
from tests.gpu_compare import rel
from tests.triton_interpreter import run_interpreted

# (B, T, D, group_size): one group, several groups, an odd width, T = 1, Mamba-2 at d_model 512 (d_inner 1024)
SHAPES = [(2, 7, 64, 64), (1, 5, 96, 32), (2, 3, 40, 40), (1, 1, 128, 64), (1, 4, 1024, 1024)]

SCRIPT = """
import torch
import fla.modules.norm.layernorm_gated as lg
lg.get_multiprocessor_count = lambda *a, **k: 8  # asks CUDA otherwise
import dcablate.kernels.gated_norm as gn
gn.use_fla = lambda *a: True  # dcablate's CUDA path, on CPU tensors: the interpreter runs fla's kernels
from tests.kernels.test_gated_norm import SHAPES

for i, (B, T, D, group) in enumerate(SHAPES):
    g = torch.Generator().manual_seed(i)
    x, z = (torch.randn(B, T, D, generator=g) for _ in range(2))
    w = 1 + 0.1 * torch.randn(D, generator=g)
    ins = [t.requires_grad_() for t in (x, z, w)]
    y = gn.grouped_gated_rms_norm(*ins[:2], ins[2], group, 1e-5)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * dy).sum(), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    y64 = gn.grouped_gated_rms_norm_reference(*ins64[:2], ins64[2], group, 1e-5)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum(), ins64)
    for a, b, what in zip((y, *grads), (y64, *grads64), ("y", "dx", "dz", "dw")):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, ((B, T, D, group), what, err)
print("ok")
"""


def test_fla_s_grouped_gated_norm_matches_the_reference_under_the_interpreter():
    pytest.importorskip("fla")
    run_interpreted(SCRIPT)


def test_the_reference_normalises_each_group_after_the_gate():
    """By hand: each group of x * silu(z) has unit root-mean-square before the weight."""
    torch.manual_seed(0)
    x, z = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    w = torch.linspace(0.5, 2, 12, dtype=torch.float64)
    y = grouped_gated_rms_norm_reference(x, z, w, group_size=4, eps=0.0)
    gated = (x * torch.nn.functional.silu(z)).view(3, 3, 4)
    torch.testing.assert_close((y / w).view(3, 3, 4), gated / gated.pow(2).mean(-1, keepdim=True).sqrt())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(128, 512, 1024, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_fla_s_grouped_gated_norm_on_cuda_matches_the_reference(dtype, shape):
    """Compiled, with z a slice of a wider projection as in the model (fla copies it contiguous first): within 1e-5
    of the float64 reference in fp32; in bf16 as close as the torch reference computed from the same bf16 inputs."""
    pytest.importorskip("fla")
    B, T, D, group = shape
    torch.manual_seed(D)
    proj = torch.randn(B, T, 2 * D + 3, device="cuda").to(dtype)
    x, z = proj[..., :D].contiguous().requires_grad_(), proj[..., D:2 * D].detach().requires_grad_()
    w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    dy = torch.randn(B, T, D, device="cuda")
    outs = {}
    for backend in ("fla", "torch"):
        y = grouped_gated_rms_norm(x, z, w, group, 1e-5, backend)
        outs[backend] = (y, *torch.autograd.grad((y.float() * dy).sum(), (x, z, w)))
    ins64 = [t.detach().double().requires_grad_() for t in (x, z, w)]
    y64 = grouped_gated_rms_norm_reference(*ins64[:2], ins64[2], group, 1e-5)
    exact = (y64, *torch.autograd.grad((y64 * dy.double()).sum(), ins64))
    assert outs["fla"][0].dtype == outs["torch"][0].dtype == dtype
    for i, what in enumerate(("y", "dx", "dz", "dw")):
        err, err_torch = rel(outs["fla"][i], exact[i]), rel(outs["torch"][i], exact[i])
        print(f"grouped gated norm {shape} {dtype} {what}: fla {err:.1e}, torch {err_torch:.1e}")
        assert err < (1e-5 if dtype == torch.float32 else max(2 * err_torch, 1e-2)), (what, err, err_torch)
