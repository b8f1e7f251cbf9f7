"""Dynamic short conv: the pure-torch reference, the modules and the placements (CPU); the compiled Triton
kernels against the float64 reference and the module on CUDA against its CPU path (GPU)."""

import itertools

import pytest
import torch

from dcablate import config as recipes
from dcablate.kernels.dynamic_conv.naive import (dynamic_conv_headwise_reference, dynamic_conv_lowrank_reference,
                                                     dynamic_conv_step, filter_at_token)
from dcablate.models.conv.dynamic import DynamicShortConv
from dcablate.models.conv.static import StaticShortConv
from tests.gpu_compare import rel


def explicit(x, K, activation=None, residual=True):
    """y_t[d] = act(sum_k K[b,t,k,d] x[b,t-k,d]) (+ x), by plain loops in float64 — the oracle's oracle."""
    B, T, D = x.shape
    y = torch.zeros(B, T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K.shape[2]):
            if t - k >= 0:
                y[:, t] += K[:, t, k].double() * x[:, t - k].double()
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    return y + x.double() if residual else y


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


CASES = [  # B, T, D, R, W
    (2, 1, 5, 3, 4), (1, 7, 6, 1, 2), (2, 33, 300, 7, 8), (3, 20, 16, 15, 4), (1, 5, 8, 16, 3),
]


@pytest.mark.parametrize("B,T,D,R,W", CASES)
@pytest.mark.parametrize("with_S,residual,activation", [(True, True, None), (False, False, None),
                                                        (True, False, "silu")])
def test_lowrank_reference_matches_explicit(B, T, D, R, W, with_S, residual, activation):
    x, z, U = rand(B, T, D, seed=1), rand(B, T, R, seed=2), rand(R, W, D, seed=3)
    S = rand(W, D, seed=4) if with_S else None
    K = torch.einsum("btr,rwd->btwd", z, U) + (S if with_S else 0)
    y = dynamic_conv_lowrank_reference(x, z, U, S, activation, residual)
    torch.testing.assert_close(y, explicit(x, K, activation, residual), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,T,D,H,W", [(2, 9, 12, 3, 4), (1, 1, 8, 8, 2), (2, 17, 300, 1, 8)])
@pytest.mark.parametrize("with_S", [True, False])
def test_headwise_reference_matches_explicit(B, T, D, H, W, with_S):
    x, G = rand(B, T, D, seed=5), rand(B, T, H, W, seed=6)
    S = rand(W, D, seed=7) if with_S else None
    K = G.repeat_interleave(D // H, dim=2).transpose(2, 3) + (S if with_S else 0)  # [B, T, W, D]
    y = dynamic_conv_headwise_reference(x, G, S)
    torch.testing.assert_close(y, explicit(x, K), rtol=1e-12, atol=1e-12)


def test_references_pass_gradcheck():
    x, z, U, S = (t.requires_grad_() for t in (rand(2, 6, 5, seed=8), rand(2, 6, 3, seed=9), rand(3, 4, 5, seed=10),
                                               rand(4, 5, seed=11)))
    assert torch.autograd.gradcheck(lambda *a: dynamic_conv_lowrank_reference(*a, activation="silu"), (x, z, U, S))
    G = rand(2, 6, 5, 4, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: dynamic_conv_headwise_reference(*a), (x, G, S))


def test_varlen_equals_each_sequence_alone():
    lengths = [5, 1, 9, 3]
    D, R, W = 6, 4, 4
    xs = [rand(1, n, D, seed=20 + i) for i, n in enumerate(lengths)]
    zs = [rand(1, n, R, seed=40 + i) for i, n in enumerate(lengths)]
    U, S = rand(R, W, D, seed=60), rand(W, D, seed=61)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    packed = dynamic_conv_lowrank_reference(torch.cat(xs, 1), torch.cat(zs, 1), U, S, cu_seqlens=cu)
    alone = torch.cat([dynamic_conv_lowrank_reference(x, z, U, S) for x, z in zip(xs, zs)], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)
    Gs = [rand(1, n, 2, W, seed=80 + i) for i, n in enumerate(lengths)]
    packed = dynamic_conv_headwise_reference(torch.cat(xs, 1), torch.cat(Gs, 1), S, cu_seqlens=cu)
    alone = torch.cat([dynamic_conv_headwise_reference(x, G, S) for x, G in zip(xs, Gs)], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)


@pytest.mark.parametrize("headwise", [False, True])
def test_decode_step_reproduces_full_sequence(headwise):
    B, T, D, R, W, H = 2, 11, 8, 3, 4, 2
    x, S = rand(B, T, D, seed=90), rand(W, D, seed=91)
    if headwise:
        G = rand(B, T, H, W, seed=92)
        full = dynamic_conv_headwise_reference(x, G, S, activation="silu")
    else:
        z, U = rand(B, T, R, seed=93), rand(R, W, D, seed=94)
        full = dynamic_conv_lowrank_reference(x, z, U, S, activation="silu")
    state = torch.zeros(B, D, W - 1, dtype=x.dtype)
    for t in range(T):
        K = filter_at_token(G[:, t], None, S, D) if headwise else filter_at_token(z[:, t], U, S, D)
        y, state = dynamic_conv_step(x[:, t], K, state, activation="silu")
        torch.testing.assert_close(y, full[:, t], rtol=1e-12, atol=1e-12)


def test_bf16_inputs_accumulate_in_fp32():
    x, z, U = rand(2, 50, 64, seed=95), rand(2, 50, 15, seed=96), rand(15, 4, 64, seed=97) * 0.1
    y16 = dynamic_conv_lowrank_reference(x.bfloat16(), z.bfloat16(), U.bfloat16())
    y64 = dynamic_conv_lowrank_reference(x.bfloat16().double(), z.bfloat16().double(), U.bfloat16().double())
    assert y16.dtype == torch.bfloat16
    assert ((y16.double() - y64).norm() / y64.norm()).item() < 1e-2


@pytest.mark.parametrize("heads", [0, 4])
def test_module_at_init_is_static_conv_plus_identity(heads):
    """U = 0 (low-rank) / W_g = 0 (head-wise): the paper's init makes the layer 'static S + identity'."""
    torch.manual_seed(0)
    dyn = DynamicShortConv(dim=8, gen_dim=6, width=4, rank=5, heads=heads).double()
    static = StaticShortConv(8, 4, activation=None, residual=True).double()
    with torch.no_grad():
        static.weight.copy_(dyn.S.flip(0).t()[:, None, :])  # S[lag, d] -> weight[d, 0, W-1-lag]
    x, h = rand(2, 13, 8, seed=98), rand(2, 13, 6, seed=99)
    torch.testing.assert_close(dyn(x, h), static(x, h))
    assert dyn.S.abs().max() <= 4 ** -0.5
    # the generator does get gradient at init (through U = 0 only after U moves, so check U's grad)
    dyn(x, h).sum().backward()
    grad = dyn.generator.weight.grad if heads else dyn.U.grad
    assert grad is not None and grad.abs().sum() > 0


def test_lm_init_keeps_the_zero_generator():
    from dcablate.models.costs import build_model

    r = recipes.build({"model": {"mixer": "attention", "d_model": 32, "conv": {"kind": "dynamic", "heads": 4}}})
    model = build_model(r, 64)
    gens = [m.generator.weight for m in model.modules() if isinstance(m, DynamicShortConv)]
    assert len(gens) == 2 * 3 and all((g == 0).all() for g in gens)


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
@pytest.mark.parametrize("placement,heads", [("qkv", 0), ("all_linear", 0), ("all_linear", 4)])
def test_placements_build_count_and_train(tmp_path, mixer, placement, heads):
    from dcablate.models.costs import build_model, costs
    from dcablate.training.loop import train

    D, W, R, L = 32, 4, 5, 2
    data = {"run": {"name": "p", "out_dir": str(tmp_path)},
            "model": {"mixer": mixer, "d_model": D, "n_layers": L, "n_heads": 2, "ffn": "mlp", "ffn_hidden": 48,
                      "conv": {"kind": "dynamic", "placement": placement, "rank": R, "heads": heads}},
            "task": {"mqar": {"vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}],
                              "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 16}]}},
            "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1},
            "log": {"progress": False, "tensorboard": False}}
    r = recipes.build(data)
    model = build_model(r, 64)
    streams = [d for _, d in recipes.conv_streams(r.model)]
    per_conv = (lambda d: D * heads * W + W * d) if heads else (lambda d: D * R + R * W * d + W * d)
    assert costs(model, 16).params["conv"] == L * sum(per_conv(d) for d in streams)
    expected_streams = 3 if placement == "qkv" else 7
    assert len(streams) == expected_streams
    assert sum(isinstance(m, DynamicShortConv) for m in model.modules()) == L * expected_streams
    summary = train(r, tmp_path / "p", quiet=True)
    assert summary["steps"] == 3 and summary["params"]["conv"] > 0


def test_one_set_switches_conv_kind():
    """The issue's bar: one --set moves a shipped MQAR recipe between none/static/dynamic."""
    for kind in ("none", "static", "dynamic"):
        base, points = recipes.expand("quickstart", [f"sweep.model.conv.kind=[\"{kind}\"]"])
        assert {p.model.conv.kind for _, p in points} == {kind}
        assert recipes.load("quickstart", ["sweep={}", f"model.conv.kind={kind}"]).model.conv.kind == kind


@pytest.mark.parametrize("make", [
    lambda: StaticShortConv(6, 4, activation="silu"),
    lambda: StaticShortConv(6, 3, activation=None, residual=True, bias=True),
    lambda: DynamicShortConv(6, 5, width=4, rank=3),
    lambda: DynamicShortConv(6, 5, width=2, heads=3, activation="silu", residual=False),
], ids=["static_silu", "static_bias_residual", "dynamic_lowrank", "dynamic_headwise"])
def test_module_decode_step_reproduces_forward(make):
    torch.manual_seed(0)
    conv = make().double()
    for p in conv.parameters():  # move off the zero init so every term matters
        torch.nn.init.normal_(p, std=0.5)
    x, h = rand(2, 9, 6, seed=1), rand(2, 9, 5, seed=2)
    full = conv(x, h)
    state = None
    for t in range(9):
        y, state = conv.step(x[:, t], h[:, t], state)
        torch.testing.assert_close(y, full[:, t], rtol=1e-10, atol=1e-12)


def test_kernel_launch_falls_back_to_a_shallower_pipeline():
    """Tiles tuned on an H100 may ask for more shared memory than a smaller card has: the launcher retries
    with fewer pipeline stages (same results), and raises only when even one stage does not fit."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from dcablate.kernels.dynamic_conv.kernel import Launch, _launch

    def fake_kernel(fits_at: int, calls: list):
        class Kernel:
            def __getitem__(self, grid):
                def run(*args, num_warps, num_stages, **constexprs):
                    calls.append(num_stages)
                    if num_stages > fits_at:
                        raise OutOfResources(300_000, 232_448, "shared memory")
                    return args, constexprs
                return run
        return Kernel()

    x = torch.zeros(1)
    calls = []
    kernel = fake_kernel(1, calls)
    assert _launch(kernel, (1,), (x,), Launch(32, 64, stages=3), BT=32) == ((x,), {"BT": 32})
    assert calls == [3, 2, 1]
    _launch(kernel, (1,), (x,), Launch(32, 64, stages=3), BT=32)
    assert calls == [3, 2, 1, 1]  # the depth that fit is remembered
    calls = []
    with pytest.raises(OutOfResources):
        _launch(fake_kernel(0, calls), (1,), (x,), Launch(32, 64, stages=2))
    assert calls == [2, 1]
    for bad in (dict(BT=24, BD=64), dict(BT=32, BD=8), dict(BT=32, BD=64, stages=0)):
        with pytest.raises(ValueError, match="Launch"):
            Launch(**bad)


def test_host_tile_arithmetic_matches_triton():
    """The kernels' host-side cdiv/next_power_of_2 (plain Python: triton's are constexpr functions, slow to call
    from the host) give triton's values."""
    triton = pytest.importorskip("triton")
    from dcablate.kernels import cdiv, next_power_of_2

    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for b in (1, 3, 16, 64, 128, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b)


def test_the_cached_positions_placeholder_can_be_saved_for_backward():
    """The placeholder `pos` is cached per device and saved for backward: made under inference mode it would be
    an inference tensor, and every later training call on that device would fail to save it."""
    from dcablate.kernels.dynamic_conv.kernel import _no_positions

    _no_positions.cache_clear()
    with torch.inference_mode():
        pos = _no_positions(torch.device("cpu"))
    assert not pos.is_inference()
    _no_positions.cache_clear()


DYN_CASES = [  # B, T, D, R, W, with S, residual, varlen lengths
    (2, 1, 64, 15, 4, True, True, None), (1, 7, 300, 1, 2, False, False, None),
    (2, 1000, 300, 7, 8, True, True, None), (4, 256, 128, 15, 4, True, False, None),
    (1, 300, 96, 16, 3, True, True, [100, 1, 150, 49]),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", DYN_CASES, ids=lambda c: "B{}_T{}_D{}_R{}_W{}_S{}_res{}_varlen{}".format(
    *c[:7], c[7] is not None))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dynamic_conv_triton_matches_float64_reference(case, dtype):
    import itertools

    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference
    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_lowrank_triton

    B, T, D, R, W, with_S, residual, lengths = case
    g = torch.Generator(device="cuda").manual_seed(T * 7 + D)
    # x arrives non-contiguous (a transposed view), as a projection output sliced from a fused one would
    x = torch.randn(B, D, T, device="cuda", generator=g).transpose(1, 2).to(dtype)
    z = torch.randn(B, T, R, device="cuda", generator=g).to(dtype)
    U = torch.randn(R, W, D, device="cuda", generator=g) / R ** 0.5
    S = torch.randn(W, D, device="cuda", generator=g) if with_S else None
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda") if lengths else None
    ins = [t.requires_grad_() for t in (x, z, U, S) if t is not None]
    y = dynamic_conv_lowrank_triton(x, z, U, S, residual, cu)
    cot = torch.randn(y.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((y.float() * cot).sum(), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    y64 = dynamic_conv_lowrank_reference(*ins64[:3], ins64[3] if with_S else None, None, residual, cu)
    grads64 = torch.autograd.grad((y64 * cot.double()).sum(), ins64)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    errs = {"y": rel(y, y64), **{n: rel(a, b) for n, a, b in zip("xzUS", grads, grads64)}}
    print(f"dynamic conv {dtype} {case}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert y.dtype == dtype and all(e < bound for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dynamic_conv_module_on_cuda_matches_cpu_path():
    from dcablate.models.conv.dynamic import DynamicShortConv

    torch.manual_seed(0)
    conv = DynamicShortConv(dim=96, gen_dim=64, width=4, rank=15, activation="silu").cuda()
    torch.nn.init.normal_(conv.U, std=0.1)  # leave the zero init so the generator matters
    x, h = torch.randn(2, 50, 96, device="cuda"), torch.randn(2, 50, 64, device="cuda")
    y_gpu = conv(x, h)
    conv.backend = "torch"
    y_ref = conv(x, h)
    assert rel(y_gpu, y_ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(2, 1000, 300, 3, 8, True, True), (1, 7, 64, 64, 2, False, False),
                                  (4, 256, 128, 8, 4, True, True)], ids=lambda c: "B{}_T{}_D{}_H{}_W{}_S{}_res{}".format(*c))
def test_dynamic_conv_headwise_triton_matches_float64_reference(case, dtype):
    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_headwise_reference
    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_headwise_triton

    B, T, D, H, W, with_S, residual = case
    g = torch.Generator(device="cuda").manual_seed(T + D + H)
    x = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    G = torch.randn(B, T, H, W, device="cuda", generator=g).to(dtype)
    S = torch.randn(W, D, device="cuda", generator=g) if with_S else None
    ins = [t.requires_grad_() for t in (x, G, S) if t is not None]
    y = dynamic_conv_headwise_triton(x, G, S, residual)
    cot = torch.randn(y.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((y.float() * cot).sum(), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    y64 = dynamic_conv_headwise_reference(ins64[0], ins64[1], ins64[2] if with_S else None, None, residual)
    grads64 = torch.autograd.grad((y64 * cot.double()).sum(), ins64)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    errs = {"y": rel(y, y64), **{n: rel(a, b) for n, a, b in zip("xGS", grads, grads64)}}
    print(f"headwise conv {dtype} {case}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(e < bound for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_of_2_31_elements_equal_their_halves():
    """x [2, 2**19, 2048] in bf16 (2**31 elements, 4 GiB): int32 offsets would wrap in the second sequence. Each
    kernel on the whole (64-bit offsets) gives what it gives on each sequence alone (int32 offsets, checked
    against float64 by the tests above): y, dx and dz bit for bit, dU and dS up to the order of their fp32
    atomic sums."""
    from dcablate.kernels.dynamic_conv import kernel as K

    B, T, D, R, W = 2, 2**19, 2048, 15, 4
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    z = torch.randn(B, T, R, device="cuda", dtype=torch.bfloat16, generator=g)
    U = K.basis_for_dots(torch.randn(R, W, D, device="cuda", generator=g) / R ** 0.5, "bf16")
    S = torch.randn(W, D, device="cuda", generator=g)
    assert K.wide_offsets(x) and not K.wide_offsets(x[:1])
    pos, dudz = K.positions_arg(None, x), K.DUDZ_LAUNCHES[0]
    assert not dudz.programs  # dz summed on chip in one program per token tile: the same order whole or halved

    def run(kernel, b):
        if kernel == "y":
            return K.lowrank_fwd(x[b], z[b], U, S, pos, True, False, "bf16")
        if kernel == "dx":
            return K.lowrank_bwd_dx(z[b], U, S, dy[b], pos, True, False, "bf16", K.DX_LAUNCHES[0])
        return K.lowrank_bwd_dudz(x[b], z[b], U, dy[b], pos, True, False, "bf16", dudz)

    for kernel in ("y", "dx"):
        whole = run(kernel, slice(None))
        for b in range(B):
            assert torch.equal(whole[b], run(kernel, slice(b, b + 1))[0]), (kernel, b)
        del whole
    dz, dU, dS = run("dudz", slice(None))
    halves = [run("dudz", slice(b, b + 1)) for b in range(B)]
    for b in range(B):
        assert torch.equal(dz[b], halves[b][0][0]), ("dz", b)
    assert rel(dU, halves[0][1] + halves[1][1]) < 1e-5 and rel(dS, halves[0][2] + halves[1][2]) < 1e-5
    torch.cuda.synchronize()
