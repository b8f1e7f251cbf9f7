"""The pure-torch references: chunked GDN == recurrence == fla's own torch reference; static conv (and, on
a GPU, fla's static conv kernel against it)."""

import pytest
import torch
import torch.nn.functional as F

from dcablate.kernels.gated_delta_rule import (delta_rule_chunked, delta_rule_recurrence, gated_delta_rule,
                                               gated_delta_rule_reference, l2_normalize)
from dcablate.kernels.short_conv import short_conv_reference
from tests.gpu_compare import rel


def random_gdn_inputs(B, T, H, K, V, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = l2_normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    logdecay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 3
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return q, k, v, logdecay, beta


@pytest.mark.parametrize("T,chunk", [(1, 16), (7, 4), (64, 64), (100, 32), (130, 64)])
def test_chunked_equals_recurrence(T, chunk):
    q, k, v, g, beta = random_gdn_inputs(2, T, 3, 8, 5, seed=T)
    o_rec = delta_rule_recurrence(q, k, v, g, beta, scale=0.35)
    o_chk = delta_rule_chunked(q, k, v, g, beta, scale=0.35, chunk_size=chunk)
    assert o_chk.dtype == torch.float64
    torch.testing.assert_close(o_chk, o_rec, rtol=1e-9, atol=1e-10)


def test_recurrence_matches_fla_naive():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, g, beta = random_gdn_inputs(2, 37, 2, 16, 8, seed=3, dtype=torch.float32)
    ours = delta_rule_recurrence(q, k, v, g, beta, scale=16 ** -0.5)
    theirs, _ = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=16 ** -0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_chunked_gradients_match_recurrence():
    q, k, v, g, beta = (t.float().requires_grad_() for t in random_gdn_inputs(1, 45, 2, 8, 4, seed=11))
    outs = []
    for core in (delta_rule_recurrence, lambda *a, **kw: delta_rule_chunked(*a, **kw, chunk_size=16)):
        o = core(q, k, v, g, beta, scale=0.3)
        grads = torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum(), (q, k, v, g, beta))
        outs.append((o, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_reference_gradcheck_float64():
    """The full reference op (chunked, from raw inputs) passes autograd's gradcheck in float64."""
    gen = torch.Generator().manual_seed(7)
    B, T, H, K, V = 1, 6, 2, 3, 2
    args = [torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
            torch.randn(B, T, H, V, generator=gen), torch.randn(B, T, H, generator=gen),
            torch.randn(B, T, H, generator=gen), torch.randn(H, generator=gen) * 0.5, torch.randn(H, generator=gen)]
    args = [a.double().requires_grad_() for a in args]
    fn = lambda *a: delta_rule_chunked_from_raw(*a)
    assert torch.autograd.gradcheck(fn, args)


def delta_rule_chunked_from_raw(q, k, v, a, b, A_log, dt_bias):
    from dcablate.kernels.gated_delta_rule import delta_rule_chunked as core, gdn_gates
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    return core(l2_normalize(q), l2_normalize(k), v, g, beta, scale=0.5, chunk_size=4)


def test_reference_gates_and_normalisation():
    """The full op from raw inputs equals the recurrence fed by hand-computed gates."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, a, b = torch.randn(B, T, H, V, generator=gen), torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    A_log, dt_bias = torch.randn(H, generator=gen), torch.randn(H, generator=gen)
    o = gated_delta_rule(q, k, v, a, b, A_log, dt_bias, backend="torch")
    g = -A_log.exp() * F.softplus(a + dt_bias)
    expected = delta_rule_recurrence(F.normalize(q, dim=-1, eps=0), F.normalize(k, dim=-1, eps=0), v, g,
                                     b.sigmoid(), scale=K ** -0.5)
    torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5)
    o2 = gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias, allow_neg_eigval=True, chunked=False)
    expected2 = delta_rule_recurrence(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, 2 * b.sigmoid(),
                                      scale=K ** -0.5)
    torch.testing.assert_close(o2, expected2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("W", [2, 4, 8])
def test_static_conv_reference_by_hand(W):
    gen = torch.Generator().manual_seed(W)
    B, T, D = 2, 11, 5
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    w = torch.randn(D, 1, W, generator=gen, dtype=torch.float64)
    y = short_conv_reference(x, w, activation=None)
    expected = torch.zeros_like(x)
    for t in range(T):
        for lag in range(W):  # tap W-1 is the current token
            if t - lag >= 0:
                expected[:, t] += w[:, 0, W - 1 - lag] * x[:, t - lag]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(short_conv_reference(x, w, "silu"), F.silu(expected))


def test_backend_fla_on_cpu_is_a_user_error():
    from dcablate.errors import UserError
    x = torch.randn(1, 4, 2)
    from dcablate.kernels.short_conv import short_conv
    with pytest.raises(UserError, match="needs a CUDA device"):
        short_conv(x, torch.randn(2, 1, 4), None, backend="fla")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width,activation", [(3, "silu"), (4, "silu"), (4, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_static_conv_matches_reference(width, dtype, activation):
    from dcablate.kernels.short_conv import short_conv

    torch.manual_seed(width)
    x = torch.randn(3, 77, 96, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.rand(96, 1, width, device="cuda") - 0.5).requires_grad_()
    outs = {}
    for backend in ("fla", "torch"):
        xin = x if backend == "fla" else x.detach().float().requires_grad_()
        y = short_conv(xin, w, activation, backend=backend)
        gx, gw = torch.autograd.grad((y.float() * torch.cos(torch.arange(y.numel(), device="cuda")).view_as(y)).sum(),
                                     (xin, w))
        outs[backend] = (y, gx, gw)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b, what in zip(outs["fla"], outs["torch"], ("y", "dx", "dw")):
        print(f"static conv W={width} {activation} {dtype} {what}: {rel(a, b):.1e}")
        assert rel(a, b) < bound, f"{what}: {rel(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4, 100, 64), (2, 77, 768), (3, 5, 40)], ids=["d64", "d768", "odd"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_rms_norm_on_fla_matches_torch(shape, autocast):
    """The model's norms on fla's kernel (CUDA) against torch's: output, input gradient and weight gradient."""
    from dcablate.kernels.rms_norm import rms_norm

    torch.manual_seed(shape[-1])
    x = torch.randn(*shape, device="cuda", requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).requires_grad_()
    cot = torch.randn(shape, device="cuda")
    outs = {}
    for backend in ("fla", "torch"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = rms_norm(x, w, 1e-5, backend)
        outs[backend] = (y, *torch.autograd.grad((y.float() * cot).sum(), (x, w)))
    assert outs["fla"][0].dtype == outs["torch"][0].dtype
    for a, b, what in zip(outs["fla"], outs["torch"], ("y", "dx", "dw")):
        print(f"rms norm {shape} autocast={autocast} {what}: {rel(a, b):.1e}")
        assert rel(a, b) < 1e-5, f"{what}: {rel(a, b):.2e}"
