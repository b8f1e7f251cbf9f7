"""MQAR data shared on disk (tasks/mqar/cache.py): the same arrays as generated in memory, one file per
segment and data settings, made once even when processes race, and never trusted when it is not the data."""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dcablate import config
from dcablate.tasks.mqar import cache
from dcablate.tasks.mqar.data import _CHUNK, MQARData, Segment
from dcablate.training.loop import shared_data_dir, train

TRAIN = [Segment(16, 2, _CHUNK + 300), Segment(32, 4, 200)]  # the first crosses a chunk boundary
TEST = [Segment(16, 2, 50)]


def data(folder: Path | None = None, **kw) -> MQARData:
    args = {"vocab_size": 64, "power_a": 0.01, "filler": "random", "data_seed": 0, **kw}
    return MQARData(TRAIN, TEST, cache_dir=folder, **args)


def assert_same_arrays(a: MQARData, b: MQARData) -> None:
    for (xa, ya), (xb, yb) in zip(a.train_data + a.test_data, b.train_data + b.test_data, strict=True):
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def npy_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".npy" and not p.name.startswith("."))


@pytest.mark.parametrize("kw", [{}, {"filler": "zero", "vocab_size": 40000, "power_a": 0.3, "data_seed": 5}])
def test_cached_data_is_the_generated_data_bit_for_bit(tmp_path, kw):
    fresh = data(**kw)
    written = data(tmp_path, **kw)  # generated and written
    read = data(tmp_path, **kw)  # read back, memory-mapped
    assert_same_arrays(fresh, written)
    assert_same_arrays(fresh, read)
    assert len(npy_files(tmp_path)) == len(TRAIN) + len(TEST)
    x, _ = read.train_data[0]
    assert isinstance(x.base, np.memmap) or isinstance(x, np.memmap)
    assert not x.flags.writeable
    # the batches a run draws are the same too
    for (j, xa, ya), (k, xb, yb) in zip(fresh.train_batches(32, seed=3), read.train_batches(32, seed=3)):
        assert j == k and (xa == xb).all() and (ya == yb).all()
        break


def test_equal_settings_share_files_other_settings_get_their_own(tmp_path, monkeypatch):
    data(tmp_path)
    made = []
    original = cache._write
    monkeypatch.setattr(cache, "_write", lambda folder, entry: made.append(entry.name) or original(folder, entry))
    data(tmp_path)
    assert made == []  # everything read, nothing generated again
    before = set(npy_files(tmp_path))
    for kw in ({"data_seed": 1}, {"power_a": 0.02}, {"filler": "zero"}, {"vocab_size": 66}):
        made.clear()
        data(tmp_path, **kw)
        assert len(made) == 3, kw
    assert len(set(npy_files(tmp_path)) - before) == 4 * 3
    # a segment list that only adds test examples reuses the training segments' files
    made.clear()
    MQARData(TRAIN, [Segment(16, 2, 60)], vocab_size=64, cache_dir=tmp_path)
    assert [name.split("-")[1] for name in made] == ["test0"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other data", "other shape"])
def test_a_damaged_or_foreign_file_is_made_again(tmp_path, damage, monkeypatch):
    want = data()
    data(tmp_path)
    path, = tmp_path.glob("mqar-train0-*.npy")  # the first training segment's, which has two chunks
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not an npy file")
    elif damage == "other data":  # e.g. written by a version whose generator drew other numbers
        arr = np.load(path)
        arr[0, 0, 0] += 1
        np.save(path, arr)
    else:
        np.save(path, np.zeros((2, 3, 16), dtype=np.int16))
    (tmp_path / f".{path.name}.999.tmp").write_bytes(b"left by a killed writer")
    assert_same_arrays(want, data(tmp_path))
    assert np.array_equal(np.load(path)[0], want.train_data[0][0])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_that_cannot_be_used_warns_and_generates_in_memory(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="dcablate"):
        got = data(blocked / "data")
    assert_same_arrays(data(), got)
    assert [r.getMessage() for r in caplog.records if "cannot share the generated MQAR data" in r.getMessage()]


def test_a_busy_segment_is_left_for_later(tmp_path):
    """A process whose first segment is locked by another makes its other segments meanwhile."""
    entries = [data().cache_entry(0, j, seg) for j, seg in enumerate(TRAIN)]
    lock = tmp_path / f".{entries[0].name}.lock"
    tmp_path.mkdir(exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done: list = []
        worker = threading.Thread(target=lambda: done.append(cache.load_shared(tmp_path, entries)))
        worker.start()
        deadline = time.time() + 20
        while not (tmp_path / entries[1].name).exists() and time.time() < deadline:
            time.sleep(0.01)
        assert (tmp_path / entries[1].name).exists() and not (tmp_path / entries[0].name).exists()
        assert worker.is_alive()  # waiting for the segment we hold
    worker.join(20)
    assert done and np.array_equal(done[0][0][0], data().train_data[0][0])


def _race(folder: str, log: str, barrier) -> None:
    original = cache._write

    def write(f, entry):
        with open(log, "a") as out:
            out.write(entry.name + "\n")
        return original(f, entry)
    cache._write = write
    barrier.wait()
    got = data(Path(folder))
    with open(log, "a") as out:
        out.write("digest " + str(hash(b"".join(np.ascontiguousarray(x).tobytes() for x, _ in got.train_data))) + "\n")


def test_racing_processes_make_each_segment_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    log = tmp_path / "log"
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "d"), str(log), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    written = [line for line in lines if not line.startswith("digest")]
    assert sorted(written) == sorted(set(written)) and len(written) == len(TRAIN) + len(TEST)
    assert len({line for line in lines if line.startswith("digest")}) == 1  # all three got the same data


def test_runs_under_one_out_dir_share_the_data(tmp_path):
    """Two runs of different models with equal task.mqar settings: one set of files under
    `<run.out_dir>/.data`; the data a run trains on is unchanged by it."""
    def recipe(name: str, d_model: int, **mqar):
        return config.build({
            "run": {"name": name, "out_dir": str(tmp_path / "out")},
            "model": {"d_model": d_model},
            "task": {"mqar": {"vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}],
                              "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 16}], **mqar}},
            "train": {"steps": 2, "batch_size": 16, "warmup_steps": 1},
            "eval": {"every": 2},
            "log": {"progress": False, "tensorboard": False},
        })
    a, b = recipe("a", 16), recipe("b", 32)
    folder = tmp_path / "out" / ".data"
    assert shared_data_dir(a, tmp_path / "out" / "a") == folder.resolve()
    assert shared_data_dir(a, tmp_path / "out" / "sweep" / "point") == folder.resolve()
    assert shared_data_dir(a, tmp_path / "elsewhere" / "a") == (tmp_path / "elsewhere" / ".data").resolve()
    train(a, tmp_path / "out" / "a", quiet=True)
    files = npy_files(folder)
    assert len(files) == 2
    mtimes = {f: (folder / f).stat().st_mtime_ns for f in files}
    train(b, tmp_path / "out" / "b", quiet=True)
    assert {f: (folder / f).stat().st_mtime_ns for f in npy_files(folder)} == mtimes  # read, not rewritten
    train(recipe("c", 16, data_seed=1), tmp_path / "out" / "c", quiet=True)
    assert len(npy_files(folder)) == 4
    # the cache leaves the runs as they were: a run without it gets the same summary
    summary = json.loads((tmp_path / "out" / "a" / "summary.json").read_text())
    again = train(recipe("a", 16), tmp_path / "elsewhere" / "a", quiet=True)
    assert again["final"] == summary["final"]
