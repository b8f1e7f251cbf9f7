"""`tuning.pick`, which chooses the dynamic conv's backward launches by timing them (faked here: no GPU)."""

import json

import pytest
import torch


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No picks in memory, picks on disk under a fresh Triton cache, and a fake GPU model name."""
    from dcablate.kernels.dynamic_conv import tuning

    monkeypatch.setattr(tuning, "_PICKED", {})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    model = ["NVIDIA H200"]
    monkeypatch.setattr(tuning, "gpu_model", lambda device: model[0])
    return model


def test_pick_times_each_launch_once_and_skips_failures(monkeypatch, isolated):
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


@pytest.fixture
def fake_timing(monkeypatch):
    """(the launches timed so far, a `run` whose time is fixed per launch: a 2, b 1, c 0.5, a CUDA device) with
    Triton's timer and the capture check faked."""
    triton = pytest.importorskip("triton")
    timed = []
    times = {"a": 2.0, "b": 1.0, "c": 0.5}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return timed, lambda launch: timed.append(launch) or times[launch], torch.device("cuda", 0)


def test_a_pick_is_kept_on_disk_for_other_processes_of_the_same_gpu_model(monkeypatch, isolated, tmp_path,
                                                                           fake_timing):
    """Another process (memory cleared) sharing the Triton cache takes the pick without timing; another GPU
    model, or a launch list that no longer holds the pick, times again; an unwritable cache only costs time."""
    from dcablate.kernels.dynamic_conv import tuning

    timed, run, cuda = fake_timing
    assert tuning.pick("dx", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and timed == ["a", "b"]
    files = list((tmp_path / "triton" / tuning.FOLDER).glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["launch"] == repr("b")
    monkeypatch.setattr(tuning, "_PICKED", {})  # a new process
    assert tuning.pick("dx", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and len(timed) == 2
    assert tuning.pick("dx", (4, 64, "bf16"), ["a", "c"], run, torch.device("cuda", 1)) == "c"  # "b" is gone
    assert timed[2:] == ["a", "c"]
    monkeypatch.setattr(tuning, "_PICKED", {})
    isolated[0] = "NVIDIA H100 80GB HBM3"
    assert tuning.pick("dx", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and timed[4:] == ["a", "b"]
    monkeypatch.setattr(tuning, "_PICKED", {})
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "blocked"))
    assert tuning.pick("dx", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and timed[6:] == ["a", "b"]


def test_a_launch_added_to_the_list_is_timed_not_passed_over(monkeypatch, isolated, fake_timing):
    """A pick on disk made among fewer launches is not reused when the list grows: the new launch could be the
    fastest (the list is part of what a pick is kept under)."""
    from dcablate.kernels.dynamic_conv import tuning

    timed, run, cuda = fake_timing
    assert tuning.pick("dz/dU/dS", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and timed == ["a", "b"]
    monkeypatch.setattr(tuning, "_PICKED", {})  # a new process, with a launch added
    assert tuning.pick("dz/dU/dS", (4, 64, "bf16"), ["a", "b", "c"], run, cuda) == "c"
    assert timed[2:] == ["a", "b", "c"]
    monkeypatch.setattr(tuning, "_PICKED", {})  # the old list still finds its own pick
    assert tuning.pick("dz/dU/dS", (4, 64, "bf16"), ["a", "b"], run, cuda) == "b" and len(timed) == 5
