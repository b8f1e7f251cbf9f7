"""The package's own channel mixers: none, the SwiGLU MLP and the mixture of experts (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.models.channel import ChannelSpec, register_channel_mixer


def swiglu_hidden(d_model: int, requested: int) -> int:
    """`requested`, or 8/3 d_model rounded up to a multiple of 16 (same parameters as a 4x GELU MLP)."""
    return requested or -(-(8 * d_model // 3) // 16) * 16


@dataclass
class MoESection:
    n_experts: int = option(8, "routed experts", min=1)
    top_k: int = option(2, "experts per token (token choice, dropless)", min=1)
    d_expert: int = option(0, "SwiGLU hidden width of each expert; 0 = the dense MLP's width (model.ffn_hidden "
                           "rule)", min=0)
    score: str = option("softmax", "router scores over experts", choices=("softmax", "sigmoid"))
    renormalize: bool = option(True, "rescale the top-k weights to sum to 1")
    shared_expert: bool = option(False, "add a dense SwiGLU expert of width d_expert applied to every token")
    load_balance_coef: float = option(0.01, "weight of the load-balancing loss (mean over MoE layers)", min=0.0)
    z_loss_coef: float = option(0.001, "weight of the router z-loss (mean over MoE layers)", min=0.0)


def mlp_streams(m) -> list[tuple[str, int]]:
    hidden = swiglu_hidden(m.d_model, m.ffn_hidden)
    return [("gate", hidden), ("up", hidden), ("down", m.d_model)]


def check_moe(r, fail) -> None:
    o = r.model.moe
    if o.top_k > o.n_experts:
        fail("model.moe.top_k", f"top_k {o.top_k} exceeds n_experts {o.n_experts}")


register_channel_mixer(ChannelSpec("none", None, model_keys=()))
register_channel_mixer(ChannelSpec("mlp", "dcablate.models.channel.mlp:SwiGLU", conv_streams=mlp_streams,
                                   model_keys=("ffn_hidden",)))
# one conv after the whole MoE output (experts see sequences with holes: see models/channel/moe.py)
register_channel_mixer(ChannelSpec("moe", "dcablate.models.channel.moe:MoE", MoESection,
                                   "mixture-of-experts options (model.ffn = \"moe\")", check_moe,
                                   conv_streams=lambda m: [("down", m.d_model)],
                                   model_keys=lambda m: ("ffn_hidden",) if m.moe.d_expert == 0 else ()))
