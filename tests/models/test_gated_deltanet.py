"""The Gated DeltaNet mixer (GPU): our layer on fla's kernels and on the torch reference equals
fla.layers.GatedDeltaNet with the same weights. The pure-torch gated delta rule it falls back to is checked on
CPU in tests/kernels/test_kernels_reference.py."""

import pytest
import torch

from tests.gpu_compare import rel, run_layer


# Every new (head dims, dtype) costs minutes of fla autotuning on a fresh machine: keep shapes few.
# T=100 is not a multiple of fla's 64-token chunk.
GDN_SHAPES = [  # B, T, D, heads, head_dim, expand_v
    (2, 100, 128, 4, 32, 1.0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", GDN_SHAPES, ids=lambda s: "B{}_T{}_D{}_H{}_K{}_ev{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_deltanet_matches_fla_layer(shape, dtype):
    """Our layer (fla path and torch reference) equals fla.layers.GatedDeltaNet with the same weights."""
    from fla.layers import GatedDeltaNet as FlaGDN

    from dcablate.models.mixers.gated_deltanet import GatedDeltaNet
    from dcablate.config.schema import ConvSection

    B, T, D, H, K, ev = shape
    torch.manual_seed(T)
    fla_layer = FlaGDN(hidden_size=D, expand_v=ev, head_dim=K, num_heads=H, use_short_conv=True, conv_size=4).cuda()
    for p in fla_layer.parameters():  # fla's Linear init is tiny; widen so errors are measured on real signal
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=D ** -0.5)
    ours = {backend: GatedDeltaNet(D, H, K, ev, conv_cfg=ConvSection(kind="static"), backend=backend).cuda()
            for backend in ("fla", "torch")}
    for layer in ours.values():
        layer.load_state_dict(fla_layer.state_dict(), strict=True)
    x = torch.randn(B, T, D, device="cuda")
    ref = run_layer(fla_layer, x, dtype)
    ours_fla = run_layer(ours["fla"], x, dtype)
    ours_ref = run_layer(ours["torch"], x, torch.float32)  # the reference in fp32 is the oracle
    bound = 2e-2 if dtype == torch.bfloat16 else 5e-3
    errors = {name: (rel(ours_fla[name], ref[name]), rel(ref[name], ours_ref[name])) for name in ref}
    for name, (same, err) in errors.items():  # printed as measured: run with -s to see them
        print(f"GDN {dtype} {name:16s} ours(fla) vs fla layer {same:.1e}   fla layer vs torch reference {err:.1e}")
    for name, (same, err) in errors.items():
        # fla's layer convolves q, k, v in one fused call: in bf16 the input gradient rounds differently
        assert same < (5e-3 if dtype == torch.bfloat16 else 1e-5), f"{name}: our fla path vs fla's layer {same:.1e}"
        assert err < bound, f"{name}: fla layer vs torch reference relative error {err:.2e} >= {bound}"
