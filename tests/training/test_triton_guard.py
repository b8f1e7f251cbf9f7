"""The Triton version guard: fla's Gated DeltaNet and Mamba-2 backward passes are silently wrong on Hopper below
Triton 3.7.1, so such a run is refused with one line before it trains."""

from __future__ import annotations

import pytest

from dcablate import config as R
from dcablate.training.runtime import mixers_triton_problem, triton_problem


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2"])
@pytest.mark.parametrize("version", ["3.6.0", "3.7.0", "3.7.0rc1"])
def test_hopper_with_an_old_triton_is_refused(mixer, version):
    line = triton_problem(mixer, (9, 0), version)
    assert line and f"model.mixer = '{mixer}'" in line and f"Triton {version}" in line
    assert "triton>=3.7.1" in line and "fla issue #640" in line and "\n" not in line


@pytest.mark.parametrize("mixer, capability, version", [
    ("gated_deltanet", (9, 0), "3.7.1"),
    ("gated_deltanet", (9, 0), "3.9.0"),
    ("mamba2", (9, 0), "3.7.1+git1234"),
    ("gated_deltanet", (8, 0), "3.6.0"),  # not Hopper
    ("attention", (9, 0), "3.6.0"),  # neither kernel family
    ("gated_deltanet", (9, 0), None),  # no Triton: fla cannot run at all, another error says so
])
def test_everything_else_passes(mixer, capability, version):
    assert triton_problem(mixer, capability, version) is None


def test_a_list_of_mixers_is_refused_when_any_of_them_is():
    hybrid = R.build({"model": {"mixer": ["attention", "mamba2"]}})
    assert "model.mixer = 'mamba2'" in mixers_triton_problem(hybrid, (9, 0), "3.6.0")
    assert mixers_triton_problem(hybrid, (9, 0), "3.7.1") is None
    assert mixers_triton_problem(R.build({"model": {"mixer": ["attention"]}}), (9, 0), "3.6.0") is None
