"""The MoE experts' packed gate/up weights (`expert_weights`) and packed SwiGLU (`swiglu_packed`): the torch
forms against the plain expressions; the Triton kernels and autograd functions against float64 through Triton's
CPU interpreter (fp32) and, with the `gpu` marker, on CUDA (fp32 and bf16, odd shapes, every gradient)."""

import pytest
import torch
import torch.nn.functional as F

from dcablate.kernels.moe_experts import (
    _ExpertWeights,
    _SwiGLUPacked,
    expert_weights_reference,
    swiglu_packed,
    swiglu_packed_reference,
)
from tests.triton_interpreter import run_interpreted

WEIGHT_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 16, 1030), (5, 3, 2049)]  # E, D, F
SWIGLU_SHAPES = [(0, 4), (1, 1), (7, 5), (33, 300), (3, 2049)]  # M, F


def check_expert_weights(E, D, f, dtype, device, seed):
    """Forward bit-equal to cat + cast; each weight's gradient is its slice of the packed gradient, cast back."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).to(device).requires_grad_() for s in ((E, D, f), (E, D, f), (E, f, D))]
    gu, down = _ExpertWeights.apply(*ws, dtype)
    ref_gu, ref_down = expert_weights_reference(*[w.detach() for w in ws], dtype)
    assert gu.dtype == down.dtype == dtype and gu.shape == (E, D, 2 * f)
    # the interpreter truncates fp32 -> bf16 where the GPU rounds: one unit in the last place apart there
    tol = 0 if dtype == torch.float32 or device == "cuda" else 2 ** -7
    torch.testing.assert_close(gu.float(), ref_gu.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(down.float(), ref_down.float(), rtol=tol, atol=tol)
    d_gu = torch.randn(gu.shape, generator=g).to(device=device, dtype=dtype)
    d_down = torch.randn(down.shape, generator=g).to(device=device, dtype=dtype)
    grads = torch.autograd.grad([gu, down], ws, [d_gu, d_down])
    for grad, expected in zip(grads, (d_gu[..., :f], d_gu[..., f:], d_down)):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected.float(), rtol=0, atol=0)


def check_swiglu(M, f, dtype, device, seed):
    """Output and gradient against a float64 run of the torch form."""
    g = torch.Generator().manual_seed(seed)
    gu = (2 * torch.randn(M, 2 * f, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    dh = torch.randn(M, f, generator=g).to(device=device, dtype=dtype)
    h = _SwiGLUPacked.apply(gu)
    (dgu,) = torch.autograd.grad(h, [gu], dh)
    assert h.dtype == dgu.dtype == dtype and h.shape == (M, f) and dgu.shape == gu.shape
    gu64 = gu.detach().double().requires_grad_()
    ref = swiglu_packed_reference(gu64)
    (ref_dgu,) = torch.autograd.grad(ref, [gu64], dh.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the result
    torch.testing.assert_close(h.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dgu.double(), ref_dgu, rtol=tol, atol=tol)


def test_torch_forms_are_cat_cast_and_silu_times_up():
    ws = [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3)]
    gu, down = expert_weights_reference(*ws, torch.bfloat16)
    assert torch.equal(gu[..., :4], ws[0].bfloat16()) and torch.equal(gu[..., 4:], ws[1].bfloat16())
    assert torch.equal(down, ws[2].bfloat16())
    x = torch.randn(5, 8)
    assert torch.equal(swiglu_packed(x), F.silu(x[:, :4]) * x[:, 4:])  # CPU: the torch form


INTERPRETED = """
import torch
from tests.kernels.test_moe_experts import SWIGLU_SHAPES, WEIGHT_SHAPES, check_expert_weights, check_swiglu
for i, shape in enumerate(WEIGHT_SHAPES):
    for dtype in (torch.float32, torch.bfloat16):
        check_expert_weights(*shape, dtype, "cpu", seed=i)
for i, shape in enumerate(SWIGLU_SHAPES):
    check_swiglu(*shape, torch.float32, "cpu", seed=i)
print("ok")
"""


def test_triton_kernels_in_the_interpreter():
    run_interpreted(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_kernels_match_torch_forms(dtype):
    seed = torch.randint(0, 2 ** 31, ()).item()  # fresh each run; printed so a failure can be replayed
    print(f"moe experts kernels: seed {seed}")
    for i, shape in enumerate(WEIGHT_SHAPES + [(8, 1024, 2736)]):
        check_expert_weights(*shape, dtype, "cuda", seed + i)
    for i, shape in enumerate(SWIGLU_SHAPES + [(32768, 2736)]):
        check_swiglu(*shape, dtype, "cuda", seed + i)
