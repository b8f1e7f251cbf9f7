"""Mixture-of-experts channel mixer (the MLP slot of a block): `[B, T, D] -> [B, T, D]`.

Routing (token choice, dropless)
    logits = router(x)                      router: nn.Linear(D, E, bias=False), computed in >= fp32
    s      = softmax(logits) | sigmoid(logits)
    top-k of s per token; the k weights are renormalised to sum to 1 (`renormalize=True`, the default)
    y_t    = sum_{j<k} w_tj * expert_{e_tj}(x_t)  [+ shared(x_t)]
Every routed (token, slot) pair is computed: there is no capacity factor and nothing is dropped.
Note: with `top_k = 1` and renormalisation the single weight is identically 1, so the language-model
loss sends no gradient to the router (only the auxiliary losses do); use `renormalize=False` for
Switch-style top-1 routing where the weight is the raw score.

Experts are SwiGLU, stored stacked: `w_gate [E, D, F]`, `w_up [E, D, F]`, `w_down [E, F, D]`;
expert e computes `(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`. Two implementations of the
same function:
    `_experts_grouped`  pairs sorted by expert, two grouped GEMMs (gate and up packed into one, then down;
                        `torch.nn.functional.grouped_mm`, or `torch._grouped_mm` on older torch);
                        used on CUDA in bf16 (autocast or bf16 input) when D and F keep 16-byte strides.
    `_experts_loop`     a loop over experts (gather, SwiGLU, weighted `index_add_`): the CPU path,
                        the `backend = "torch"` path and the test oracle.
The optional shared expert is the dense MLP's `SwiGLU` of width F without convs
(`shared_expert.{gate,up,down}_proj`, plain nn.Linear), applied to every token and added.

Auxiliary losses (computed in every forward, kept with their graph in `self.last_aux`):
    load_balance = E * sum_e f_e * P_e     (Switch Transformer): f_e = share of the N*k routed
                   (token, slot) assignments that went to e (no gradient), P_e = mean over tokens of
                   the router probability of e (softmax), or of the scores normalised over experts
                   (sigmoid). 1 for perfectly uniform routing, up to E when one expert takes all.
    z_loss       = mean_t logsumexp(logits_t)^2 (ST-MoE router z-loss).
`MoE.aux_loss(layers)` averages each over a model's MoE layers and weights the means by the layers'
`load_balance_coef` and `z_loss_coef` (the recipe's `model.moe` coefficients); `LanguageModel.aux_loss`
asks it, so training adds the result to the loss without knowing about MoE. Detached statistics of the
last forward: `last_load` ([E], share of assignments per expert, sums to 1), `load_entropy` (nats,
log E when uniform) and `max_load_ratio` (max / mean load, 1 when uniform); `MoE.load_stats(layers)`
gathers them for logging.

Short convolutions and `placement = "all_linear"`: experts get no convs of their own. A token's
neighbours are generally routed to other experts, so a causal conv on an expert's gate/up/down
stream would see a sequence with holes (or other experts' activations) and is ill-defined. Instead
one conv follows the whole MoE output: stream "down", width d_model, its filters generated from the
MoE's input (the block's normalised input), i.e. `y = conv(moe(x), x)` -- the same place as the
dense MLP's down conv. The shared expert has no convs either. With `placement = "qkv"` the MoE has
no conv at all (placements apply to the token mixer).

Initialisation: `reset_parameters` draws the router and the expert tensors from N(0, init_std)
(default 0.02) and `w_down` from N(0, down_std) (default: init_std). The LM's generic init only
touches nn.Linear / nn.Embedding (router, shared expert: it re-draws them with the same std and
scales `shared_expert.down_proj` like every `down_proj`); the stacked expert tensors keep this
module's init, so a caller wanting GPT-2's residual scaling passes `down_std`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcablate.kernels.moe_combine import moe_combine, sum_rows
from dcablate.kernels.moe_experts import expert_weights, swiglu_packed
from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_or_identity, conv_prefill, conv_step
from dcablate.models.channel.base import ChannelMixer
from dcablate.models.channel.mlp import SwiGLU
from dcablate.models.channel.specs import swiglu_hidden

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _GatherPairs(torch.autograd.Function):
    """Token rows for the (token, slot) pairs in expert order, in the GEMMs' `dtype`: `x[order // k]` for
    `x [N, D]`, where pair p = token * k + slot; cast in the same pass as the gather (`sum_rows` with one
    slot), so an fp32 x is not first cast whole. The gradient, in x's dtype, sums each token's k rows, found
    through the inverse permutation (`sum_rows`: one fp32-accumulating kernel on CUDA, a gather and a sum on
    CPU): no atomics, deterministic."""

    @staticmethod
    def forward(ctx, x, order, inverse, k, dtype=None):
        ctx.save_for_backward(inverse)
        ctx.k, ctx.dtype = k, x.dtype
        return sum_rows(x, torch.div(order, k, rounding_mode="floor").view(-1, 1), dtype or x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return sum_rows(grad, inverse.view(-1, ctx.k), ctx.dtype), None, None, None, None


def expert_counts(flat_experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert `[E]` (int64). Not `torch.bincount`: on CUDA it reads the maximum back to
    the host, a sync in every forward."""
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_experts.device)
    return counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))


class MoE(ChannelMixer):
    supports_cache = True

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int, score: str = "softmax",
                 shared_expert: bool = False, conv_cfg=None, backend: str = "auto", *,
                 renormalize: bool = True, init_std: float = 0.02, down_std: float | None = None,
                 load_balance_coef: float = 0.01, z_loss_coef: float = 0.001):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be softmax or sigmoid, got {score!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.d_model, self.n_experts, self.top_k, self.d_expert = d_model, n_experts, top_k, d_expert
        self.score, self.renormalize, self.backend = score, renormalize, backend
        self.init_std, self.down_std = init_std, init_std if down_std is None else down_std
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef  # weights in `aux_loss`
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.shared_expert = SwiGLU(d_model, d_expert, None, backend) if shared_expert else None
        # all_linear: one conv after the MoE output (see the module docstring); None otherwise
        self.down_conv1d = make_conv(conv_cfg, "down", d_model, d_model, backend, placement="all_linear")
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_load: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std)
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.down_std)
        if self.shared_expert is not None:
            for lin in (self.shared_expert.gate_proj, self.shared_expert.up_proj):
                nn.init.normal_(lin.weight, std=self.init_std)
            nn.init.normal_(self.shared_expert.down_proj.weight, std=self.down_std)

    # ----------------------------------------------------------------------------------- routing

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens `x [N, D]`: router logits and scores `[N, E]`, top-k expert ids and weights `[N, k]`.
        Routing runs in at least fp32, outside autocast."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, scores, experts, weights

    def _aux(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> None:
        E = self.n_experts
        counts = counts.to(scores.dtype)
        n = max(scores.shape[0], 1)  # an empty batch gives zero losses, not 0/0
        f = counts / counts.sum().clamp_min(1)
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        P = probs.sum(0) / n
        self.last_aux = {"load_balance": E * (f * P).sum(),
                         "z_loss": torch.logsumexp(logits, dim=-1).square().sum() / n}
        self.last_load = f.detach()

    # ----------------------------------------------------------------------------------- experts

    def _experts_loop(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """`sum_j weights[t, j] * expert_{experts[t, j]}(x[t])` for `x [N, D]`, one expert at a time."""
        N, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = torch.arange(N, device=x.device).repeat_interleave(k)[order]
        w = weights.reshape(-1)[order]
        counts = counts.tolist()
        out = None
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            idx, we = token[start:start + c], w[start:start + c]
            start += c
            xe = x[idx]
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            ye = ye * we[:, None]
            if out is None:
                out = ye.new_zeros(N, self.d_model)
            out.index_add_(0, idx, ye.to(out.dtype))
        return out

    def _experts_grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                         dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same function as `_experts_loop` with two grouped GEMMs over the (token, slot) pairs sorted by
        expert (offsets = cumulative `counts`, int32; empty experts are empty groups): gate and up packed into
        one `[E, D, 2F]` weight (`expert_weights`), then down; matmuls in `dtype` (default: x's). Token rows are
        gathered once per pair (`_GatherPairs`, whose backward is a gathered sum, never an atomic scatter);
        SwiGLU is one fused kernel each way on CUDA (`swiglu_packed`); `moe_combine` weights
        the experts' D-wide outputs (not the F-wide hidden) and sums each token's k slots in one pass, fp32
        accumulation, output in `out_dtype` (default: the weights' dtype, >= fp32)."""
        N, k = experts.shape
        dtype = dtype or x.dtype
        order = torch.argsort(experts.reshape(-1), stable=True)          # pair p = token * k + slot
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = _GatherPairs.apply(x, order, inverse, k, dtype)
        w_gu, w_down = expert_weights(self.w_gate, self.w_up, self.w_down, dtype)
        gu = _grouped_mm(xs, w_gu, offs=offs)                            # [M, 2F] = [gate | up]
        ys = _grouped_mm(swiglu_packed(gu, self.backend), w_down, offs=offs)
        return moe_combine(ys, inverse.view(N, k), weights, out_dtype)

    def _grouped_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """bf16 when the grouped-GEMM path applies to `x`, else None (use the loop)."""
        if self.backend == "torch" or _grouped_mm is None or not x.is_cuda:
            return None
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        else:
            dtype = x.dtype
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return None
        align = 16 // dtype.itemsize  # row strides of x, the [.., F] activations and the weights
        if self.d_model % align or self.d_expert % align:
            return None
        return dtype

    # ----------------------------------------------------------------------------------- forward

    @classmethod
    def from_config(cls, m) -> "MoE":
        o = m.moe
        return cls(m.d_model, o.n_experts, o.top_k, o.d_expert or swiglu_hidden(m.d_model, m.ffn_hidden), o.score,
                   o.shared_expert, m.conv, m.backend, renormalize=o.renormalize, init_std=m.init_std,
                   down_std=m.init_std / math.sqrt(2 * m.n_layers), load_balance_coef=o.load_balance_coef,
                   z_loss_coef=o.z_loss_coef)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_or_identity(self.down_conv1d, self._mix(x), x)

    def prefill(self, x: torch.Tensor):
        """`forward` over a prompt, also returning the decode state: the output conv's (None without one;
        routing is per token)."""
        return conv_prefill(self.down_conv1d, self._mix(x), x)

    def step(self, x_t: torch.Tensor, state):
        """One token `x_t [B, D]` -> (y_t, new state)."""
        return conv_step(self.down_conv1d, self._mix(x_t), x_t, state)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Routed (and shared) experts over tokens `x [..., D]`, before the output conv."""
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        logits, scores, experts, weights = self.route(flat)
        counts = expert_counts(experts.reshape(-1), self.n_experts)
        self._aux(logits, scores, counts)
        dtype = self._grouped_dtype(flat)
        if dtype is not None:
            # the combine rounds once, straight to the dtype handed back; with a shared expert the two
            # terms are summed in the combine's fp32 first, as in the loop
            out_dtype = x.dtype if self.shared_expert is None else None
            out = self._experts_grouped(flat, experts, weights, counts, dtype, out_dtype)
        else:
            out = self._experts_loop(flat, experts, weights, counts)
        if out is None:  # no tokens
            out = flat.new_zeros(flat.shape)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        # hand back the residual stream's dtype
        return out.to(x.dtype).reshape(shape)

    # ----------------------------------------------------------------------------------- training hooks
    # What `LanguageModel.aux_loss / detach_aux / routing_state / load_stats` ask of a channel mixer. The
    # class methods summarise all MoE layers of a model at once: the losses and statistics are means over
    # layers.

    @classmethod
    def aux_loss(cls, layers: list[MoE]) -> torch.Tensor | None:
        """`load_balance_coef * mean_layers(load_balance) + z_loss_coef * mean_layers(z_loss)` (a scalar
        tensor with the forward's graph) from the layers' last forward, weighted by their own coefficients;
        None before a forward. The layers of one model share the coefficients (one recipe sets them)."""
        coefs = {(m.load_balance_coef, m.z_loss_coef) for m in layers}
        if len(coefs) > 1:
            raise ValueError(f"MoE layers with different auxiliary loss coefficients: {sorted(coefs)}")
        return weighted_aux_loss(layers, *coefs.pop()) if coefs else None

    def detach_aux(self) -> None:
        """Keep only the values of the auxiliary losses once the backward has used them: the autograd graph they
        hold would outlive the step, and a CUDA graph capture must not meet the previous step's graph (its
        gradient accumulators run on the stream of the step that made them)."""
        self.last_aux = {k: v.detach() for k, v in self.last_aux.items()}

    def routing_state(self) -> Callable[[], None]:
        """A function that puts back `last_load` and `last_aux` as they are now. A CUDA graph rewrites the
        tensors it captured at each replay, but an eager forward in between (an evaluation) rebinds the
        attributes to its own tensors; restoring them after each replay keeps logging and the aux loss
        pointed at the graph's."""
        load, aux = self.last_load, self.last_aux

        def restore() -> None:
            self.last_load, self.last_aux = load, aux
        return restore

    @classmethod
    def load_stats(cls, layers: list[MoE]) -> dict[str, float]:
        """Scalars for logging from the layers' last forward, keyed `moe/L{i}/...` (i counts the layers that
        ran): per-expert load `expert{e}`, `load_entropy`, `max_load_ratio`, `load_balance`, `z_loss`; plus
        means over layers under `moe/...`. Empty before a forward."""
        out: dict[str, float] = {}
        layers = [m for m in layers if m.last_load is not None]
        for i, m in enumerate(layers):
            for e, v in enumerate(m.last_load.float().tolist()):
                out[f"moe/L{i}/expert{e}"] = v
            out[f"moe/L{i}/load_entropy"] = m.load_entropy.item()
            out[f"moe/L{i}/max_load_ratio"] = m.max_load_ratio.item()
            for key, v in m.last_aux.items():
                out[f"moe/L{i}/{key}"] = v.detach().item()
        if layers:
            for key in ("load_entropy", "max_load_ratio", "load_balance", "z_loss"):
                vals = [out[f"moe/L{i}/{key}"] for i in range(len(layers))]
                out[f"moe/{key}"] = sum(vals) / len(vals)
        return out

    # ----------------------------------------------------------------------------------- stats

    @property
    def load_entropy(self) -> torch.Tensor:
        """Entropy (nats) of the last forward's expert load; log(E) when uniform."""
        p = self.last_load
        return -(p * p.clamp_min(1e-30).log()).sum()

    @property
    def max_load_ratio(self) -> torch.Tensor:
        """Max over mean expert load of the last forward (loads: shares of the N·top_k routed assignments); 1 when
        uniform, E / top_k at most (a token's top_k slots go to distinct experts)."""
        return self.last_load.max() * self.n_experts

    def active_params(self) -> int:
        """Parameters one token uses: router, top_k experts, the shared expert and the conv."""
        per_expert = self.w_gate[0].numel() + self.w_up[0].numel() + self.w_down[0].numel()
        n = self.router.weight.numel() + self.top_k * per_expert
        for mod in (self.shared_expert, self.down_conv1d):
            if mod is not None:
                n += sum(p.numel() for p in mod.parameters())
        return n

    def extra_flops_per_token(self) -> int:
        """Forward FLOPs of the routed experts' matmuls per token (`2 * top_k * 3 * D * F`). The router and
        the shared expert are nn.Linear (counted by a generic sum over Linear weights), the conv by its
        own `flops_per_token`."""
        return 2 * self.top_k * 3 * self.d_model * self.d_expert

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"d_expert={self.d_expert}, score={self.score}, renormalize={self.renormalize}")


# --------------------------------------------------------------------------------- model helpers


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def weighted_aux_loss(layers: list[MoE], load_balance_coef: float, z_loss_coef: float) -> torch.Tensor | None:
    """`coef_lb * mean_layers(load_balance) + coef_z * mean_layers(z_loss)` over the layers that have run a
    forward; None when none has."""
    layers = [m for m in layers if m.last_aux]
    if not layers:
        return None
    lb = torch.stack([m.last_aux["load_balance"] for m in layers]).mean()
    z = torch.stack([m.last_aux["z_loss"] for m in layers]).mean()
    return load_balance_coef * lb + z_loss_coef * z


def moe_aux_loss(model: nn.Module, load_balance_coef: float, z_loss_coef: float) -> torch.Tensor | None:
    """`weighted_aux_loss` over every MoE layer in `model`, with the given coefficients."""
    return weighted_aux_loss(moe_layers(model), load_balance_coef, z_loss_coef)


def moe_load_stats(model: nn.Module) -> dict[str, float]:
    """`MoE.load_stats` over every MoE layer in `model`; empty without MoE layers."""
    return MoE.load_stats(moe_layers(model))
