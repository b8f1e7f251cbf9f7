"""`tuning.pick`, which chooses the dynamic conv's backward launches by timing them (faked here: no GPU)."""

import pytest
import torch


def test_pick_times_each_launch_once_and_skips_failures(monkeypatch):
    """`tuning.pick`: the fastest launch, timed once per problem; launches that raise are skipped; off CUDA the
    first launch, untimed; while a CUDA graph is being captured the first launch, and nothing is remembered."""
    triton = pytest.importorskip("triton")
    from dcablate.kernels.dynamic_conv import tuning

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_bench(fn, **kwargs):
        return fn()

    def run(launch):
        timed.append(launch)
        if launch == "bad":
            raise RuntimeError("out of shared memory")
        return times[launch]

    capturing = [False]
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(tuning, "_PICKED", {})
    cuda = torch.device("cuda", 0)
    assert tuning.pick("k", (1,), ["a", "bad", "b", "c", "b"], run, cuda) == "b"
    assert timed == ["a", "bad", "b", "c"]
    assert tuning.pick("k", (1,), ["a", "bad", "b", "c"], run, cuda) == "b" and len(timed) == 4
    assert tuning.pick("k", (2,), ["c", "a"], run, cuda) == "c" and len(timed) == 6
    assert tuning.pick("k", (3,), ["a", "b"], run, torch.device("cpu")) == "a" and len(timed) == 6
    capturing[0] = True
    assert tuning.pick("k", (5,), ["a", "b"], run, cuda) == "a" and len(timed) == 6
    capturing[0] = False
    assert tuning.pick("k", (5,), ["a", "b"], run, cuda) == "b" and len(timed) == 8
    assert set(tuning.picked()) == {("k", (1,), 0), ("k", (2,), 0), ("k", (5,), 0)}
    with pytest.raises(RuntimeError, match="shared memory"):
        tuning.pick("k", (4,), ["bad", "bad2"], lambda l: run("bad"), cuda)
