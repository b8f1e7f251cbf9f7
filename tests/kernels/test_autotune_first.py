"""The GPU tests' autotune switch (tests/autotune_first.py), on a stand-in for Triton's autotuner."""

import inspect
import math

import pytest

from tests import autotune_first


class FakeAutotuner:
    """Triton's `Autotuner.run` in miniature: on a cache miss, `_bench` every candidate, keep the fastest."""

    def __init__(self, timings):
        self.timings, self.benched, self.cache, self.cache_results = timings, [], {}, True
        self.cached_while_benching = []

    def _bench(self, *args, config, **meta):
        self.benched.append(config)
        self.cached_while_benching.append(self.cache_results)
        return list(self.timings[config])

    def run(self, key):
        if key not in self.cache:
            results = {c: self._bench(config=c) for c in self.timings}
            self.cache[key] = min(results, key=results.get)
        return self.cache[key]


def fake_class():
    return type("Tuner", (FakeAutotuner,), {})


def test_first_working_candidate_is_chosen_and_the_rest_never_benched():
    cls = fake_class()
    autotune_first.install(cls)
    tuner = cls({"a": [math.inf] * 3, "b": [2.0] * 3, "c": [1.0] * 3})  # a fails to compile, c is fastest
    assert tuner.run("key") == "b"
    assert tuner.benched == ["a", "b"]
    assert tuner.run("key") == "b" and tuner.benched == ["a", "b"]  # a cache hit benches nothing
    tuner.run("other key")
    assert tuner.benched == ["a", "b", "a", "b"]  # each key starts over
    # Triton's disk cache of autotuning results stays off while choosing this way, and is as it was after
    assert tuner.cached_while_benching == [False] * 4 and tuner.cache_results is True


def test_install_twice_patches_once():
    cls = fake_class()
    autotune_first.install(cls)
    run = cls.run
    autotune_first.install(cls)
    assert cls.run is run


@pytest.mark.parametrize("value, on", [("", False), ("all", False), ("first", True), (" First ", True)])
def test_wanted(value, on):
    assert autotune_first.wanted({autotune_first.ENV: value}) is on


def test_wanted_refuses_other_values():
    with pytest.raises(ValueError, match="first"):
        autotune_first.wanted({autotune_first.ENV: "fastest"})


def test_triton_autotuner_has_what_the_patch_wraps():
    autotuner = pytest.importorskip("triton.runtime.autotuner")
    assert "config" in inspect.signature(autotuner.Autotuner._bench).parameters
    assert callable(autotuner.Autotuner.run)
