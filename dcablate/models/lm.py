"""The language model shell: embedding -> pre-norm blocks -> norm -> LM head (tied by default)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcablate.config.schema import conv_streams
from dcablate.kernels.rms_norm import rms_norm
from dcablate.models.channel import build_channel_mixer
from dcablate.models.channel.base import ChannelMixer
from dcablate.models.conv import check_streams
from dcablate.models.mixers import build_mixer

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")  # scaled at init by 1/sqrt(2 n_layers), as GPT-2
FUSED_CE_MIN_VOCAB = 4096  # below this the logits are small and F.cross_entropy is as fast


def scored(h: torch.Tensor, targets: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states `[N, D]` and targets `[N]` of the scored positions (target != -100), in order.

    A boolean mask makes the host wait for the GPU to count them; given their `count` (read on the batch's
    CPU copy) the positions are gathered without that wait, so the step can also be a CUDA graph."""
    mask = targets != -100
    if count is None:
        return h[mask], targets[mask]
    flat = mask.flatten()
    slot = torch.where(flat, flat.cumsum(0) - 1, count)  # the k-th scored position to slot k, the rest to a spare
    order = torch.arange(flat.numel(), device=flat.device)
    index = torch.zeros(count + 1, dtype=torch.long, device=flat.device).scatter_(0, slot, order)[:count]
    return h.flatten(0, -2)[index], targets.flatten()[index]


@contextlib.contextmanager
def tf32_under_autocast(device_type: str):
    """TF32 for fp32 matmuls inside, only under (bf16/fp16) autocast. fla's fused linear cross-entropy
    accumulates the head's weight gradient with fp32 `addmm(..., out=)`, which autocast does not touch: on
    CUDA cores that took 32 ms of a 167 ms step of the 125M GDN LM (measured on an H100). A plain head under
    autocast would run that GEMM on 16-bit operands, so TF32 is no less precise than the unfused path;
    fp32 training (no autocast) keeps full fp32. The loss computes every gradient in its forward, so
    scoping the call covers them."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def as_matmul_input(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The normalised input `h` for `module`, cast once to the autocast dtype when the module uses `h` only
    as a matmul input (`matmul_input_only`), which autocast would cast anyway, once per consumer. The
    forward values are the same. In the backward the consumers' gradients then meet in the 16-bit dtype
    and are cast to fp32 once; otherwise each of them is cast to fp32 before they are summed. In the
    ~125M GDN LM's step (measured on an H100) those casts and fp32 sums took 23 of 142 ms."""
    if module.matmul_input_only and torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (its parameter, init and checkpoints) that runs fla's kernel on CUDA under model.backend "auto"
    or "fla" (`kernels.rms_norm`)."""

    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)


def _named(layer: nn.Module) -> str:
    """`Class`, or `module.Class` for a class outside the package (a plugin's, so its file can be found)."""
    cls = type(layer)
    return cls.__name__ if cls.__module__.startswith("dcablate.") else f"{cls.__module__}.{cls.__name__}"


def same_shape(y: torch.Tensor, x: torch.Tensor, key: str, layer: nn.Module) -> torch.Tensor:
    """`y` when it has `x`'s shape `[B, T, D]`; else a UserError naming the layer (a plugin's forward that returns
    another shape would fail later without its name, or broadcast over the residual without a word)."""
    if not isinstance(y, torch.Tensor):
        from dcablate.errors import UserError

        raise UserError(f"{key}: {_named(layer)}.forward returned {type(y).__name__}, not a tensor; a block's "
                        f"mixers map [B, T, D] to one [B, T, D] tensor (fla's layers return a tuple: take its first)")
    if y.shape != x.shape:
        from dcablate.errors import UserError

        raise UserError(f"{key}: {_named(layer)}.forward returned shape {tuple(y.shape)} for an input of "
                        f"{tuple(x.shape)}; a block's mixers map [B, T, D] to [B, T, D]")
    return y


class Block(nn.Module):
    def __init__(self, m, layer_idx: int):
        super().__init__()
        self.mixer_norm = RMSNorm(m.d_model, m.norm_eps, m.backend)
        self.mixer = build_mixer(m, layer_idx)
        self.ffn = build_channel_mixer(m)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps, m.backend) if self.ffn is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + same_shape(self.mixer(self._mixer_input(x)), x, "model.mixer", self.mixer)
        if self.ffn is not None:
            x = x + same_shape(self.ffn(self._ffn_input(x)), x, "model.ffn", self.ffn)
        return x

    def _mixer_input(self, x: torch.Tensor) -> torch.Tensor:
        return as_matmul_input(self.mixer, self.mixer_norm(x))

    def _ffn_input(self, x: torch.Tensor) -> torch.Tensor:
        return as_matmul_input(self.ffn, self.ffn_norm(x))

    def prefill(self, x: torch.Tensor, window: int | None = None):
        """`forward` over a prompt, also returning this block's decode cache `(mixer, ffn)`."""
        y, mixer_cache = self.mixer.prefill(self._mixer_input(x), window)
        x = x + y
        ffn_cache = None
        if self.ffn is not None:
            y, ffn_cache = self.ffn.prefill(self._ffn_input(x))
            x = x + y
        return x, (mixer_cache, ffn_cache)

    def step(self, x_t: torch.Tensor, cache):
        """One token `x_t [B, D]` -> (output, new cache)."""
        mixer_cache, ffn_cache = cache
        y, mixer_cache = self.mixer.step(self._mixer_input(x_t), mixer_cache)
        x_t = x_t + y
        if self.ffn is not None:
            y, ffn_cache = self.ffn.step(self._ffn_input(x_t), ffn_cache)
            x_t = x_t + y
        return x_t, (mixer_cache, ffn_cache)

    def supports_cache(self) -> bool:
        return all(m.supports_cache for m in (self.mixer, self.ffn) if m is not None)


class LanguageModel(nn.Module):
    """`input_ids [B, T]` -> logits `[B, T, V]`, or the loss against `targets [B, T]` (see `forward`).

    Training asks the model, not its layers, for what the channel mixers' last forward left behind: the
    hooks of `dcablate.models.channel.base.ChannelMixer` (auxiliary losses, routing state, log scalars),
    which MoE implements and a plain MLP leaves at their defaults.

    `task_head`: a task's own module between the final hidden states and the LM head (`Task.head`), e.g.
    compression's decoder, which reads one position and writes every position. It maps `[B, T, D]` to
    `[B, T', D]`, one row per target position (`targets [B, T']`); it is part of the weights (trained,
    checkpointed, counted) and applies to `forward`, not to cached decoding."""

    def __init__(self, m, vocab_size: int, task_head: nn.Module | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.gather_scored = True  # the loss gathers scored positions first; build_model turns it off for LM
        self.embed = nn.Embedding(vocab_size, m.d_model)
        self.blocks = nn.ModuleList(Block(m, i) for i in range(m.n_layers))
        declared = [conv_streams(m, i) for i in range(m.cycle)]
        for i, block in enumerate(self.blocks[: m.cycle]):  # the other blocks repeat these
            check_streams(block, declared[i], {"mixer": f"model.mixer = {m.mixer_at(i)!r}",
                                               "ffn": f"model.ffn = {m.ffn!r}"}, conv_on=m.conv.kind != "none")
        if m.conv.kind != "none" and not any(declared):
            from dcablate.errors import UserError

            mixers = ", ".join(dict.fromkeys(repr(m.mixer_at(i)) for i in range(m.cycle)))
            raise UserError(f"model.conv.kind = {m.conv.kind!r}: model.mixer = {mixers} with model.ffn = {m.ffn!r} "
                            f"declares no stream for a conv at model.conv.placement = {m.conv.placement!r} (the "
                            f"specs' conv_streams), so the conv would do nothing while its runs are named as if it "
                            f"had one; set model.conv.kind = \"none\" for this model, or declare the streams its "
                            f"layers pass to make_conv")
        self.norm = RMSNorm(m.d_model, m.norm_eps, m.backend)
        self.task_head = task_head  # set before the init below, which then covers its linear layers too
        self.lm_head = nn.Linear(m.d_model, vocab_size, bias=False)
        self._init_weights(m.init_std, m.n_layers)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, std: float, n_layers: int) -> None:
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_keep_init", False):
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(RESIDUAL_OUTPUTS) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states `[B, T, D]` (project only where a loss is needed)."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the LM head reads `[B, T', D]`: the final hidden states, through the task head if there is one."""
        h = self.hidden(input_ids)
        return h if self.task_head is None else self.task_head(h)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", scored_count: int | None = None) -> torch.Tensor:
        """Logits `[B, T, V]`, or with `targets` the cross-entropy over the scored positions
        (target != -100), `mean` or `sum`, in fp32. The loss goes through `forward` so that wrappers
        such as DDP see the call that produces the gradients. `scored_count`: how many targets are scored,
        when the caller knows it on the host (see `scored`)."""
        if targets is None:
            return self.lm_head(self.features(input_ids))
        h = self.features(input_ids)
        if self.gather_scored:  # MQAR: a handful of scored positions, gathered before the vocabulary-wide head
            h, targets = scored(h, targets, scored_count)
        else:  # LM: nearly every position counts; ignore_index skips the rest without the gather's host sync
            h, targets = h.flatten(0, -2), targets.flatten()
        if self.use_fused_ce(h):
            from fla.modules import FusedLinearCrossEntropyLoss

            with tf32_under_autocast(h.device.type):
                return FusedLinearCrossEntropyLoss(ignore_index=-100, reduction=reduction)(
                    h, targets, self.lm_head.weight).float()
        return F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=-100, reduction=reduction)

    def use_fused_ce(self, h: torch.Tensor) -> bool:
        """fla's fused linear cross-entropy never materialises the `[N, V]` logits: worth it on CUDA
        once the vocabulary is large (LM runs with BPE), not for MQAR's few scored positions."""
        return h.is_cuda and self.vocab_size >= FUSED_CE_MIN_VOCAB and h.shape[0] > 0

    def scored_logits(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at scored positions only (target != -100): MQAR scores a handful of
        positions, and the vocabulary-wide head is most of a small model's work."""
        h, targets = scored(self.features(input_ids), targets)
        return self.lm_head(h), targets

    # ---------------------------------------------------------------------------------- channel-mixer hooks

    def _channel_mixers(self) -> dict[type, list[ChannelMixer]]:
        """The blocks' channel mixers, grouped by class, in block order."""
        kinds: dict[type, list[ChannelMixer]] = {}
        for block in self.blocks:
            if block.ffn is not None:
                kinds.setdefault(type(block.ffn), []).append(block.ffn)
        return kinds

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss of the last forward (MoE: weighted load-balancing and router z-losses, means
        over layers), a scalar tensor that still carries the forward's graph, to be added to the training
        objective; None when no channel mixer has one."""
        total = None
        for kind, layers in self._channel_mixers().items():
            loss = kind.aux_loss(layers)
            if loss is not None:
                total = loss if total is None else total + loss
        return total

    def detach_aux(self) -> None:
        """Drop the autograd graph the auxiliary losses hold, once the backward has used it (the values
        stay for logging)."""
        for layers in self._channel_mixers().values():
            for layer in layers:
                layer.detach_aux()

    def routing_state(self) -> Callable[[], None]:
        """A function that puts back the state the channel mixers' last forward left (MoE: routing
        statistics and auxiliary losses) as it is now; CUDA graphs call it after each replay, so that
        state points at the graph's tensors again after an eager forward in between."""
        restores = [layer.routing_state() for layers in self._channel_mixers().values()
                    for layer in layers]

        def restore() -> None:
            for r in restores:
                r()
        return restore

    def load_stats(self) -> dict[str, float]:
        """Scalars for logging from the channel mixers' last forward (MoE: `moe/...` expert loads, load
        entropy, aux losses); empty when none reports any."""
        out: dict[str, float] = {}
        for kind, layers in self._channel_mixers().items():
            out.update(kind.load_stats(layers))
        return out

    # ---------------------------------------------------------------------------------- decoding
    # Cached decoding for `generate`: `prefill` runs the prompt once (in parallel) and returns every
    # block's cache (attention: keys and values; Gated DeltaNet / Mamba-2: the recurrent state; every
    # short conv: its last W-1 inputs); `step` then costs one token per call instead of a forward over
    # the whole context. The logits equal `forward`'s at every position (tests/models/test_decode.py).

    def supports_cache(self) -> bool:
        """Whether every mixer and FFN implements `prefill`/`step`; otherwise decode by full recompute."""
        return all(block.supports_cache() for block in self.blocks)

    def prefill(self, input_ids: torch.Tensor, window: int | None = None):
        """Prompt `input_ids [B, T]` -> (logits of the next token `[B, V]`, cache). `window` bounds the keys
        an attention layer keeps for later steps (a sliding window; None keeps all); recurrent mixers
        have fixed-size states and ignore it."""
        x = self.embed(input_ids)
        cache = []
        for block in self.blocks:
            x, c = block.prefill(x, window)
            cache.append(c)
        return self.lm_head(self.norm(x[:, -1])), cache

    def step(self, token_ids: torch.Tensor, cache: list):
        """The next tokens `token_ids [B]` -> (logits of the token after them `[B, V]`, new cache)."""
        x = self.embed(token_ids)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.step(x, c)
            new.append(c)
        return self.lm_head(self.norm(x)), new
