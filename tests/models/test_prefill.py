"""Prefill of the recurrent mixers runs the chunked op of their forward (the pure-torch chunked form on CPU,
fla's chunk kernels with `output_final_state=True` on CUDA) and hands back the same outputs, final recurrent
state and conv states as stepping the prompt token by token; a short conv's state holds its last W-1 inputs."""

import pytest
import torch

import dcablate.kernels.gated_delta_rule as gdr
import dcablate.kernels.simple_gla as sgla
from dcablate.kernels.gated_delta_rule import delta_rule_chunked, delta_rule_recurrence, l2_normalize
from dcablate.kernels.simple_gla import simple_gla_chunked, simple_gla_recurrence
from tests.gpu_compare import rel
from tests.models.test_decode import tiny


# ----------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("T,chunk", [(1, 8), (13, 4), (64, 64), (70, 16)])
def test_chunked_final_states_equal_the_recurrences(T, chunk):
    """Both chunked references return the recurrence's final state, also when T is no multiple of the chunk."""
    g = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 5, 4
    q, k = (l2_normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    logdecay = -torch.rand(B, T, H, generator=g, dtype=torch.float64) * 2
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)

    o, S = delta_rule_chunked(q, k, v, logdecay, beta, 0.5, chunk_size=chunk, return_state=True)
    o_ref, S_ref = delta_rule_recurrence(q, k, v, logdecay, beta, 0.5, return_state=True)
    assert S.shape == (B, H, K, V)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)

    o, S = simple_gla_chunked(q, k, v, logdecay, 0.7, chunk_size=chunk, return_state=True)
    o_ref, S_ref = simple_gla_recurrence(q, k, v, logdecay, 0.7, return_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------- mixers


def zeros_like_state(state):
    """The decode state before any token: every tensor of `state` zeroed (conv states hold zeros before t = 0)."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(zeros_like_state(v) for v in state)
    return state


def assert_states_close(a, b):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_states_close(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_states_close(x, y)
    else:
        assert a is None and b is None


class Calls:
    """Counts the calls of the kernel functions `prefill` may use, and which of them asked for a final state."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        for module, name in [(gdr, "delta_rule_chunked"), (gdr, "delta_rule_recurrence"),
                             (sgla, "simple_gla_chunked"), (sgla, "simple_gla_recurrence")]:
            monkeypatch.setattr(module, name, self.spy(name, getattr(module, name)))

    def spy(self, name, fn):
        def wrapped(*args, **kwargs):
            self.names.append(name + (" with state" if kwargs.get("return_state") else ""))
            return fn(*args, **kwargs)
        return wrapped


@pytest.mark.parametrize("T", [1, 3, 70])
@pytest.mark.parametrize("mixer, conv", [("gated_deltanet", "none"), ("gated_deltanet", "static_all"),
                                         ("gated_deltanet", "lowrank_all"), ("mamba2", "static"),
                                         ("mamba2", "headwise_all")])
def test_prefill_runs_the_chunked_op_and_equals_stepping_token_by_token(mixer, conv, T, monkeypatch):
    """fp64: prefill over T tokens (T = 70 spans two 64-token chunks) gives the outputs that stepping from an
    empty state gives token by token, and the same recurrent and conv states after the last token."""
    layer = tiny(mixer, conv).blocks[0].mixer
    h = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    calls = Calls(monkeypatch)
    with torch.no_grad():
        y, state = layer.prefill(h)
        chunked = "delta_rule_chunked" if mixer == "gated_deltanet" else "simple_gla_chunked"
        assert calls.names == [chunked + " with state"]  # one chunked call, no token-by-token scan
        assert state["S"].dtype == torch.float64
        stepped = zeros_like_state(state)
        ys = []
        for t in range(T):
            y_t, stepped = layer.step(h[:, t], stepped)
            ys.append(y_t)
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-9, atol=1e-11)
    assert_states_close(state, stepped)
    torch.testing.assert_close(y, layer(h), rtol=0, atol=0)  # prefill's output is the forward's


@pytest.mark.parametrize("T", [2, 3, 9])
def test_conv_states_after_prefill_hold_the_last_inputs(T):
    """Width 4: each conv's state is its stream's last 3 inputs, `[B, D, 3]` oldest first, zeros before t = 0."""
    gdn = tiny("gated_deltanet", "static").blocks[0].mixer
    mamba = tiny("mamba2", "lowrank").blocks[0].mixer
    h = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(T))

    def last_inputs(x):
        want = torch.zeros(x.shape[0], x.shape[-1], 3, dtype=x.dtype)
        n = min(3, x.shape[1])
        want[:, :, 3 - n:] = x[:, -n:].transpose(1, 2)
        return want

    with torch.no_grad():
        _, state = gdn.prefill(h)
        sq, sk, sv, so = state["conv"]
        torch.testing.assert_close(sq, last_inputs(gdn.q_proj(h)), rtol=0, atol=0)
        torch.testing.assert_close(sk, last_inputs(gdn.k_proj(h)), rtol=0, atol=0)
        torch.testing.assert_close(sv, last_inputs(gdn.v_proj(h)), rtol=0, atol=0)
        assert so is None  # qkv placement: no conv on o
        _, state = mamba.prefill(h)
        xbc = mamba.in_proj(h)[..., mamba.d_inner:mamba.d_inner + mamba.conv_dim]
        torch.testing.assert_close(state["conv"][0], last_inputs(xbc), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2"])
def test_gpu_prefill_on_fla_chunk_kernels_matches_the_step_reference(mixer, monkeypatch):
    """On CUDA, prefill calls fla's chunk kernel with output_final_state=True; its outputs, final state and
    the decode steps after it match the same layer on CPU in fp64 stepped token by token (fp32 on the GPU,
    whose kernels take dots as TF32). T = 100 is no multiple of fla's 64-token chunk."""
    import fla.ops.gated_delta_rule as fla_gdr
    import fla.ops.simple_gla as fla_sgla

    from dcablate.config.schema import ConvSection
    from dcablate.models.mixers.gated_deltanet import GatedDeltaNet
    from dcablate.models.mixers.mamba2 import Mamba2

    seen = []
    for module, name in [(fla_gdr, "chunk_gated_delta_rule"), (fla_sgla, "chunk_simple_gla")]:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **kw:
                            seen.append((_name, kw.get("output_final_state"))) or _fn(*a, **kw))
    torch.manual_seed(0)
    conv = ConvSection(kind="static")
    if mixer == "gated_deltanet":
        make = lambda backend: GatedDeltaNet(128, 4, 32, conv_cfg=conv, backend=backend)
    else:
        make = lambda backend: Mamba2(128, head_dim=32, state_size=16, expand=2, conv_cfg=conv, backend=backend)
    gpu, ref = make("fla").cuda(), make("torch").double()
    ref.load_state_dict(gpu.state_dict())
    B, T, steps = 2, 100, 5
    h = torch.randn(B, T + steps, 128, dtype=torch.float64)
    with torch.no_grad():
        y, state = gpu.prefill(h[:, :T].float().cuda())
        assert seen and all(final is True for _, final in seen), seen
        ys = [y]
        for t in range(T, T + steps):
            y_t, state = gpu.step(h[:, t].float().cuda(), state)
            ys.append(y_t[:, None])
        y_ref, ref_state = [], zeros_like_state(ref.prefill(h[:, :1])[1])
        for t in range(T + steps):
            y_t, ref_state = ref.step(h[:, t], ref_state)
            y_ref.append(y_t[:, None])
            if t == T - 1:
                S_at_prompt_end = ref_state["S"]
    errors = {"prefill y": rel(ys[0].cpu(), torch.cat(y_ref[:T], 1)),
              "steps y": rel(torch.cat(ys[1:], 1).cpu(), torch.cat(y_ref[T:], 1)),
              "final S": rel(state["S"].cpu(), ref_state["S"])}
    _, prompt_state = gpu.prefill(h[:, :T].float().cuda())
    errors["prefill S"] = rel(prompt_state["S"].cpu(), S_at_prompt_end)
    print(f"{mixer} GPU chunk prefill vs CPU fp64 steps: " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert prompt_state["S"].dtype == torch.float32
    assert all(e < 5e-3 for e in errors.values()), errors
