"""The package's own token mixers: their recipe sections, checks and conv streams (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.models.mixers import MixerSpec, register_mixer


def qkv_streams(m, value_dim: int | None = None) -> list[tuple[str, int]]:
    key_dim = m.n_heads * m.head_size
    return [("q", key_dim), ("k", key_dim), ("v", key_dim if value_dim is None else value_dim)]


# ------------------------------------------------------------------------------------------ attention


@dataclass
class AttentionSection:
    rope_theta: float = option(10000.0, "RoPE base frequency", min=1.0)


def check_attention(r, fail) -> None:
    m = r.model
    if m.head_size % 2:  # blame the key that made the head dim: head_dim, or d_model / n_heads
        fail("model.head_dim" if m.head_dim else "model.d_model",
             f"RoPE needs an even head dim, got {m.head_size}" + ("" if m.head_dim else f" = d_model / n_heads"))


register_mixer(MixerSpec("attention", "dcablate.models.mixers.attention:Attention", AttentionSection,
                         "attention options", check_attention, conv_streams=qkv_streams,
                         model_keys=("n_heads", "head_dim")))


# ------------------------------------------------------------------------------------------ Gated DeltaNet


@dataclass
class GatedDeltaNetSection:
    expand_v: float = option(1.0, "value head dim = head_dim * expand_v (fla's default is 2)", min=0.0, min_open=True)
    use_gate: bool = option(True, "gated RMSNorm on the output with g_proj (fla's `use_gate`)")
    allow_neg_eigval: bool = option(False, "beta in [0, 2) instead of [0, 1) (fla's `allow_neg_eigval`)")


def gdn_value_head_dim(m) -> float:
    return m.head_size * m.gated_deltanet.expand_v


def gdn_streams(m) -> list[tuple[str, int]]:
    return qkv_streams(m, m.n_heads * int(round(gdn_value_head_dim(m))))


def check_gdn(r, fail) -> None:
    m = r.model
    hv = gdn_value_head_dim(m)
    if abs(hv - round(hv)) >= 1e-6:
        fail("model.gated_deltanet.expand_v",
             f"head_dim {m.head_size} * expand_v {m.gated_deltanet.expand_v} is not an integer")


register_mixer(MixerSpec("gated_deltanet", "dcablate.models.mixers.gated_deltanet:GatedDeltaNet",
                         GatedDeltaNetSection, "Gated DeltaNet options", check_gdn, conv_streams=gdn_streams,
                         model_keys=("n_heads", "head_dim")))


# ------------------------------------------------------------------------------------------ Mamba-2


@dataclass
class Mamba2Section:
    head_dim: int = option(64, "channels per SSM head; heads = expand * d_model / head_dim", min=1)
    state_size: int = option(64, "SSM state size N per head (B and C width per group)", min=1)
    expand: int = option(2, "inner width = expand * d_model", min=1)
    n_groups: int = option(1, "groups of B/C shared by heads; head h reads group h // (heads / n_groups)", min=1)
    ssd_precision: str = option("fp32", "dtype of the SSD's q/k/v on CUDA: fp32 (TF32 dots) or the input's (faster; "
                                "fla's bf16 backward gives dt_bias/A_log gradients with errors larger than "
                                "themselves)", choices=("fp32", "input"))


def mamba2_streams(m) -> list[tuple[str, int]]:
    """One conv on the concatenated x, B, C stream (x ~ v, B ~ k, C ~ q)."""
    c = m.mamba2
    return [("xbc", c.expand * m.d_model + 2 * c.n_groups * c.state_size)]


def check_mamba2(r, fail) -> None:
    m, c = r.model, r.model.mamba2
    inner = c.expand * m.d_model
    if inner % c.head_dim:
        fail("model.mamba2.head_dim", f"expand * d_model = {inner} is not divisible by head_dim {c.head_dim}")
    elif (inner // c.head_dim) % c.n_groups:
        fail("model.mamba2.n_groups", f"{c.n_groups} groups do not divide the {inner // c.head_dim} heads")


register_mixer(MixerSpec("mamba2", "dcablate.models.mixers.mamba2:Mamba2", Mamba2Section, "Mamba-2 options",
                         check_mamba2, conv_streams=mamba2_streams, model_keys=()))  # heads: model.mamba2.head_dim


# ------------------------------------------------------------------------------------------ conv only


register_mixer(MixerSpec("short_conv", "dcablate.models.mixers.short_conv:ShortConvMixer",
                         conv_streams=lambda m: [("x", m.d_model)], output_conv=False, conv_when_none="static",
                         model_keys=()))
