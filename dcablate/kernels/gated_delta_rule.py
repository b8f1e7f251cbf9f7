"""Gated delta rule: fla's chunked Triton kernel on CUDA, a pure-torch recurrence as reference.

Per head, with state `S [K, V]`, log-decay `g_t`, write strength `beta_t` and L2-normalised `q, k`:

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S_{t-1}'^T k_t))^T      (S' = exp(g_t) S_{t-1})
    o_t = S_t^T (scale * q_t)

The gate is the Gated DeltaNet parameterisation, `g = -exp(A_log) * softplus(a + dt_bias)` and
`beta = sigmoid(b)` (times 2 when negative eigenvalues are allowed), computed from raw `a, b`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcablate.kernels import require_fla, use_fla


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
              allow_neg_eigval: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw projections `a, b [B, T, H]` -> (log-decay g, beta), both at least fp32."""
    dt = torch.promote_types(a.dtype, torch.float32)
    g = -A_log.to(dt).exp() * F.softplus(a.to(dt) + dt_bias.to(dt))
    beta = b.to(dt).sigmoid()
    return g, (2 * beta if allow_neg_eigval else beta)


def delta_rule_step(S, q_t, k_t, v_t, g_t, beta_t, scale: float):
    """One token for every head: state `S [B, H, K, V]`, q_t, k_t `[B, H, K]` (normalised), v_t `[B, H, V]`,
    g_t, beta_t `[B, H]`, all in one dtype -> (o_t `[B, H, V]`, new S). The recurrence's update, also the
    decode step of the Gated DeltaNet mixer."""
    S = S * g_t.exp()[..., None, None]
    update = beta_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
    S = S + k_t[..., :, None] * update[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q_t * scale, S), S


def delta_rule_recurrence(q, k, v, g, beta, scale: float, return_state: bool = False):
    """Token-by-token recurrence in fp32; q, k [B, T, H, K] (already normalised), v [B, T, H, V],
    g, beta [B, T, H]. Returns o [B, T, H, V] in fp32 (fp64 for fp64 inputs), and with `return_state`
    also the final state [B, H, K, V]."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(dt) for t in (q, k, v, g, beta))
    B, T, H, K = k.shape
    S = k.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        o_t, S = delta_rule_step(S, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale)
        outs.append(o_t)
    o = torch.stack(outs, dim=1)
    return (o, S) if return_state else o


def delta_rule_chunked(q, k, v, g, beta, scale: float, chunk_size: int = 64, return_state: bool = False):
    """The same function as `delta_rule_recurrence`, computed chunk-parallel in fp32 (the CPU path): o
    `[B, T, H, V]`, and with `return_state` also the final state `[B, H, K, V]`.

    Within a chunk with cumulative log-decay `G` and chunk-start state `S0`, the state is
    `S_t = e^{G_t} S0 + sum_{i<=t} e^{G_t-G_i} k_i u_i^T` where the new values `u` solve the unit
    lower-triangular system `(I + A) u = beta (v - e^{G} K S0)`, `A_ti = beta_t e^{G_t-G_i} k_t.k_i`
    (i < t). Splitting `u = U - W S0` lets every chunk's solve run at once; only the cheap state
    hand-off between chunks is sequential.
    """
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(dt).transpose(1, 2) for t in (q, k, v, g, beta))  # [B, H, T, .]
    B, H, T, K = k.shape
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero keys/values and zero log-decay leave the state untouched
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)

    G = g.cumsum(-1)                                                   # [B, H, n, C]
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf"))
    decay = diff.exp()                                                 # e^{G_t - G_i}, i <= t, else 0
    eye = torch.eye(C, device=k.device, dtype=dt)
    A = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))) * (1 - eye)
    system = eye + A
    W = torch.linalg.solve_triangular(system, beta[..., None] * G.exp()[..., None] * k, upper=False,
                                      unitriangular=True)
    U = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay * scale                 # causal, decayed q.k
    q_decayed = q * (G.exp()[..., None] * scale)
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]                  # e^{G_C - G_i} k_i

    S = k.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for c in range(n):
        u = U[:, :, c] - W[:, :, c] @ S
        outs.append(q_decayed[:, :, c] @ S + scores[:, :, c] @ u)
        S = G[:, :, c, -1].exp()[..., None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, -1)[:, :, :T].transpose(1, 2)
    return (o, S) if return_state else o  # the padding left S as the last real token made it


def gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias, allow_neg_eigval: bool = False,
                               chunked: bool = True, output_final_state: bool = False):
    """Reference of the full op from raw inputs (q, k un-normalised, a, b raw); fp32 inside. o in v's dtype,
    and with `output_final_state` also the final state `[B, H, K, V]` in fp32 (fp64 for fp64 inputs)."""
    g, beta = gdn_gates(a, b, A_log, dt_bias, allow_neg_eigval)
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k = l2_normalize(q.to(dt)), l2_normalize(k.to(dt))
    core = delta_rule_chunked if chunked else delta_rule_recurrence
    o, S = core(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, return_state=True)
    return (o.to(v.dtype), S) if output_final_state else o.to(v.dtype)


def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, allow_neg_eigval: bool = False, backend: str = "auto",
                     output_final_state: bool = False):
    """q, k [B, T, H, K]; v [B, T, H, V]; a, b [B, T, H] raw; returns o [B, T, H, V], and with
    `output_final_state` (a decoder's prefill) also the state after the last token, `[B, H, K, V]` in fp32
    or wider: fla's chunk kernel hands it back on CUDA, the chunked reference elsewhere."""
    if use_fla(q, backend):
        require_fla()
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, S = chunk_gated_delta_rule(
            q=q, k=k, v=v, g=a, beta=b,
            use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=allow_neg_eigval,
            use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, output_final_state=output_final_state,
        )
        return (o, S) if output_final_state else o
    return gated_delta_rule_reference(q, k, v, a, b, A_log, dt_bias, allow_neg_eigval,
                                      output_final_state=output_final_state)
