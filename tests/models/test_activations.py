"""SwiGLU's elementwise part (`dcablate.models.activations.swiglu`): fla's fused kernel on CUDA against the
float64 torch expression (GPU)."""

import pytest
import torch

from tests.gpu_compare import rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_swiglu_matches_torch(dtype):
    """fla's fused SwiGLU (our CUDA path) equals silu(gate) * up in fp64, output and both gradients, on an
    odd width and a strided (non-contiguous) gate."""
    from dcablate.models.activations import swiglu

    g = torch.Generator(device="cuda").manual_seed(7)
    both = torch.randn(3, 37, 2 * 333, device="cuda", generator=g).to(dtype)
    gate = both[..., :333].detach().requires_grad_()  # rows strided by 666
    up = torch.randn(3, 37, 333, device="cuda", generator=g).to(dtype).requires_grad_()
    assert not gate.is_contiguous()
    out = swiglu(gate, up)
    cot = torch.randn(out.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((out.float() * cot).sum(), [gate, up])
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = torch.nn.functional.silu(g64) * u64
    grads64 = torch.autograd.grad((ref * cot.double()).sum(), [g64, u64])
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    errs = {"out": rel(out, ref), "gate": rel(grads[0], grads64[0]), "up": rel(grads[1], grads64[1])}
    print(f"fused swiglu {dtype}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(e < bound for e in errs.values()), errs
