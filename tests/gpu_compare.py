"""Helpers of the GPU checks that compare a CUDA path with its reference: relative error, and a layer's
output, input gradient and parameter gradients for a fixed random cotangent."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(module, x, out):
    """Output, input gradient and every parameter gradient for a fixed random cotangent."""
    cot = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(1), device=out.device)
    gx, *gp = torch.autograd.grad((out.float() * cot).sum(), [x, *module.parameters()])
    return {"out": out.detach(), "x": gx, **{n: g for (n, _), g in zip(module.named_parameters(), gp)}}


def run_layer(module, x, dtype):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = module(x)
    if isinstance(out, tuple):  # fla layers return (o, attn, cache)
        out = out[0]
    return grads_of(module, x, out)
