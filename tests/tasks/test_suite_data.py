"""What the synthetic suite's tasks share: the sampling helpers, the fixed training set and the disjoint test
set, the training batches (epochs, resume), and the recipe checks of every suite task."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from dcablate import config as R
from dcablate.errors import RecipeError, UserError
from dcablate.tasks import build_task
from dcablate.tasks.synthetic.data import (SuiteData, distinct_tuples, first_occurrence, generate, pick_uniform,
                                           row_hashes)

SUITE = ("recall", "fuzzy_recall", "noisy_recall", "selective_copy", "compression", "memorization")
SMALL = {  # small settings of every suite task (each section's other keys at their defaults)
    "recall": {"vocab_size": 16, "seq_len": 32},
    "fuzzy_recall": {"vocab_size": 16, "seq_len": 32, "max_key_len": 2, "max_value_len": 2},
    "noisy_recall": {"vocab_size": 24, "noise_vocab_size": 8, "seq_len": 32},
    "selective_copy": {"vocab_size": 8, "seq_len": 24, "num_tokens": 4},
    "compression": {"vocab_size": 8, "seq_len": 8},
    "memorization": {"vocab_size": 32, "seq_len": 16},
}


def suite_recipe(kind: str, train: dict | None = None, **options):
    section = {**SMALL[kind], "num_train_examples": 512, "num_test_examples": 300, **options}
    return R.build({"task": {"kind": kind, kind: section}, "train": {"batch_size": 32, **(train or {})}})


# ------------------------------------------------------------------------------------------ sampling helpers


def test_first_occurrence_matches_a_loop():
    ids = np.random.default_rng(0).integers(0, 6, size=(200, 15))
    got = first_occurrence(ids)
    for row, out in zip(ids, got):
        assert out.tolist() == [row.tolist().index(v) for v in row]


def test_pick_uniform_is_uniform_over_true_slots():
    g = np.random.default_rng(1)
    mask = np.array([[True, False, True, True, False]] * 30000)
    counts = np.bincount(pick_uniform(g, mask), minlength=5) / 30000
    assert counts[1] == counts[4] == 0 and np.abs(counts[[0, 2, 3]] - 1 / 3).max() < 0.01
    single = np.eye(7, dtype=bool)
    assert pick_uniform(g, single).tolist() == list(range(7))


def test_distinct_tuples_are_uniform_over_ordered_tuples():
    t = distinct_tuples(np.random.default_rng(2), (24000,), 2, 4)
    assert (t[:, 0] != t[:, 1]).all() and t.min() >= 0 and t.max() < 4
    freq = Counter(map(tuple, t.tolist()))
    assert len(freq) == 12 and max(abs(c / 24000 - 1 / 12) for c in freq.values()) < 0.01
    full = distinct_tuples(np.random.default_rng(3), (500, 3), 5, 5)  # k = m: permutations
    assert (np.sort(full, axis=-1) == np.arange(5)).all()


def test_row_hashes_and_excluded_rows():
    a = np.random.default_rng(0).integers(0, 5, size=(300, 6))
    h = row_hashes(a)
    same = (a[:, None, :] == a[None, :, :]).all(-1)
    assert np.array_equal(h[:, None] == h[None, :], same)

    def make(g, rows, train):
        x = g.integers(0, 3, size=(rows, 4))
        return x, x.copy()

    first, _ = generate(make, 40, np.random.SeedSequence(5), True, np.dtype(np.int16), chunk=64)
    more, _ = generate(make, 100, np.random.SeedSequence(5), True, np.dtype(np.int16), chunk=64)
    assert np.array_equal(more[:40], first)  # the first rows do not depend on how many are asked for
    kept, _ = generate(make, 100, np.random.SeedSequence(6), True, np.dtype(np.int16), exclude=row_hashes(first),
                       chunk=64)
    assert not np.isin(row_hashes(kept), row_hashes(first)).any()


# ------------------------------------------------------------------------------------------ the splits


@pytest.mark.parametrize("kind", SUITE)
def test_splits_are_disjoint_seeded_and_well_formed(kind):
    r = suite_recipe(kind)
    task = build_task(r.task)
    (xt, yt), (xs, ys) = task.data.train, task.data.test
    assert xt.shape == (512, task.max_seq_len) and xs.shape == (300, task.max_seq_len)
    assert xt.max() < task.vocab_size and xs.max() < task.vocab_size and xt.min() >= 0
    assert (yt != -100).any(axis=1).all() and (ys != -100).any(axis=1).all()  # every example is scored
    train_rows = {row.tobytes() for row in xt}
    assert not any(row.tobytes() in train_rows for row in xs)  # no test example was trained on
    again = build_task(suite_recipe(kind).task).data
    assert np.array_equal(again.train[0], xt) and np.array_equal(again.test[1], ys)  # a seed's data is fixed
    other = build_task(suite_recipe(kind, data_seed=1).task).data
    assert not np.array_equal(other.train[0], xt)
    record = task.eval_record()
    assert record["setting"]["seq_len"] == task.max_seq_len and record["test_examples"] == 300
    assert record["scored_positions"] == int((ys != -100).sum())


def test_a_test_set_that_cannot_be_disjoint_is_a_user_error():
    # 2 content tokens at 2 positions: 4 possible examples, all of them in 512 training examples
    task = build_task(suite_recipe("compression", vocab_size=3, seq_len=3).task)
    with pytest.raises(UserError, match=r"task.compression: only \d+ of \d+ test examples could be drawn unlike"):
        task.data


def test_train_batches_are_epochs_and_resume_exactly():
    # rows of 4 tokens from 30000: all 100 training rows differ
    data = SuiteData(lambda g, rows, train: (g.integers(0, 30000, (rows, 4)),) * 2, 100, 10, 0, 30000, chunk=64)
    assert len(np.unique(data.train[0], axis=0)) == 100
    stream = list(itertools.islice(data.train_batches(32, seed=3), 9))
    assert all(x.shape == (32, 4) and x.dtype == torch.int64 for x, _ in stream)
    rows = {tuple(r) for r in data.train[0].tolist()}
    for e in range(3):  # 3 whole batches an epoch: 96 different training examples
        epoch = {tuple(r) for x, _ in stream[3 * e:3 * e + 3] for r in x.tolist()}
        assert len(epoch) == 96 and epoch <= rows
    for start in (1, 3, 4, 7):
        resumed = list(itertools.islice(data.train_batches(32, seed=3, start=start), 9 - start))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, stream[start:]))
    with pytest.raises(ValueError, match="batch_size"):
        next(data.train_batches(101, seed=0))
    assert [len(x) for x, _ in data.test_batches(4)] == [4, 4, 2]


# ------------------------------------------------------------------------------------------ recipe checks


@pytest.mark.parametrize("kind, options, key, message", [
    ("recall", {"seq_len": 31}, "task.recall.seq_len", "must be even"),
    ("noisy_recall", {"vocab_size": 10, "noise_vocab_size": 8}, "task.noisy_recall.vocab_size", "fewer than 4"),
    ("noisy_recall", {"noise_vocab_size": 0}, "task.noisy_recall.noise_vocab_size", "noise_fraction"),
    ("fuzzy_recall", {"max_key_len": 8}, "task.fuzzy_recall.max_key_len", "key tokens"),
    ("fuzzy_recall", {"seq_len": 7}, "task.fuzzy_recall.seq_len", "2 * (max_key_len + max_value_len)"),
    ("selective_copy", {"seq_len": 9}, "task.selective_copy.seq_len", "2 * num_tokens + 2"),
    ("memorization", {"seq_len": 15}, "task.memorization.seq_len", "must be even"),
])
def test_bad_settings_name_their_key(kind, options, key, message):
    with pytest.raises(RecipeError, match=re.escape(message)) as e:
        suite_recipe(kind, **options)
    assert e.value.key == key


@pytest.mark.parametrize("kind", SUITE)
def test_a_batch_larger_than_the_training_set_is_refused(kind):
    with pytest.raises(RecipeError, match=rf"64 is more than the 48 training examples \(task.{kind}"
                                          rf".num_train_examples = 48") as e:
        suite_recipe(kind, train={"batch_size": 64}, num_train_examples=48)
    assert e.value.key == "train.batch_size"
    with pytest.raises(RecipeError, match=f"smaller than task.{kind}.vocab_size"):
        R.build({"model": {"vocab_size": 2}, "task": {"kind": kind, kind: SMALL[kind]}})


def test_checking_a_suite_recipe_leaves_torch_unloaded():
    code = ("import sys\nfrom dcablate import config as R\n"
            f"for kind in {SUITE!r}:\n"
            "    R.build({'task': {'kind': kind}})\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_test_set_of_a_few_examples_repeated_is_a_user_error():
    """Recall at V = 4, T = 6 with 64 training examples: test rows unlike every training row survive often enough,
    but they are a handful of examples repeated over the 1280 test rows, which measures those few."""
    task = build_task(suite_recipe("recall", vocab_size=4, seq_len=6, num_train_examples=64,
                                   num_test_examples=1280).task)
    with pytest.raises(UserError, match=r"task.recall: the 1280 test examples drawn unlike every training example "
                                        r"are only \d+ distinct ones, repeated: .*lower num_train_examples or "
                                        r"num_test_examples"):
        task.data
    ok = build_task(suite_recipe("recall", vocab_size=16, seq_len=32, num_train_examples=64).task).data
    assert len(np.unique(ok.test[0], axis=0)) == len(ok.test[0])


def test_a_test_set_unlike_another_training_set_does_not_make_its_own():
    """Evaluating a run at another setting excludes the run's training rows: the new setting's own training set is
    never read, so it is not made (at long sequences it takes a while)."""
    make = lambda g, rows, train: (g.integers(0, 30000, (rows, 4)),) * 2  # noqa: E731
    data = SuiteData(make, 100, 10, 0, 30000, chunk=64, exclude=np.array([], dtype=np.uint64))
    assert data._train is None and len(data.test[0]) == 10
    assert len(data.train[0]) == 100 and data._train is not None
