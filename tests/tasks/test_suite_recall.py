"""The recall family of the synthetic suite: in-context recall, noisy recall and fuzzy recall generators.

Each has an exact example for a fixed seed (checked by hand against docs/tasks.md), the plain-Python
oracle of suite_checks.py over many examples, and statistics of what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from dcablate.tasks.fuzzy_recall.data import fuzzy_recall_examples
from dcablate.tasks.fuzzy_recall.spec import fuzzy_problems
from dcablate.tasks.recall.data import recall_examples
from dcablate.tasks.recall.spec import recall_problems
from tests.tasks.suite_checks import check_fuzzy, check_recall

X = -100


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ recall


def test_recall_exact_example():
    # V = 8: keys 0-3, values 4-7; T = 12: five context pairs, then the query pair
    x, y = recall_examples(rng(4), 1, 12, 8)
    assert x[0].tolist() == [2, 4, 3, 5, 3, 5, 2, 4, 3, 5, 2, 4]
    #                        key 3 again ^     ^ key 2 again   ^ query: key 2
    assert y[0].tolist() == [X, X, X, X, 5, X, 4, X, 5, X, 4, X]


def test_noisy_recall_exact_example():
    # V = 10 with 2 noise tokens (8, 9): keys 0-3, values 4-7
    x, y = recall_examples(rng(4), 1, 12, 10, noise_vocab_size=2, noise_fraction=0.4)
    assert x[0].tolist() == [8, 9, 3, 5, 9, 8, 2, 4, 3, 5, 3, 5]
    assert y[0].tolist() == [X, X, X, X, X, X, X, X, 5, X, 5, X]  # noise pairs are never scored


@pytest.mark.parametrize("vocab, noise, frac", [(16, 0, 0.0), (64, 0, 0.0), (24, 8, 0.3), (12, 2, 0.9)])
def test_recall_oracle_over_many_examples(vocab, noise, frac):
    x, y = recall_examples(rng(1), 600, 32, vocab, noise, frac)
    assert x.shape == y.shape == (600, 32) and x.dtype == y.dtype == np.int64
    for xi, yi in zip(x, y):
        check_recall(xi, yi, vocab, noise)


def test_recall_statistics():
    vocab, n = 16, 20000
    x, y = recall_examples(rng(2), n, 32, vocab)
    keys = x[:, 0:30:2]
    freq = np.bincount(keys.ravel(), minlength=8) / keys.size
    assert np.abs(freq - 1 / 8).max() < 0.01  # keys uniform over [0, V/2)
    value_freq = np.bincount(x[:, 1::2].ravel() - 8, minlength=8) / (n * 16)
    assert np.abs(value_freq - 1 / 8).max() < 0.01  # a key's value uniform over [V/2, V)
    # the query is uniform over the distinct keys of the context: its rank by first appearance is
    rel = []
    for xi, yi in zip(x[:4000], y[:4000]):
        seen = check_recall(xi, yi, vocab)
        rel.append((seen["query_rank"] + 0.5) / seen["distinct"])
    assert abs(np.mean(rel) - 0.5) < 0.02


def test_noise_fraction_and_one_real_pair():
    frac, pairs = 0.3, 15
    x, y = recall_examples(rng(3), 20000, 32, 24, 8, frac)
    noise = x[:, 0:30:2] >= 16  # [N, C]
    assert noise.all(axis=1).sum() == 0  # every example keeps a real pair
    assert abs(noise.mean() - frac * (pairs - 1) / pairs) < 0.005  # one pair is never noise
    tokens = x[:, 0:30][np.repeat(noise, 2, axis=1)]
    assert set(np.unique(tokens)) == set(range(16, 24))  # noise from its own vocabulary only
    # almost everything noise still makes valid examples
    for xi, yi in zip(*recall_examples(rng(4), 300, 16, 24, 8, 1.0)):
        assert check_recall(xi, yi, 24, 8)["noise"] == 6


def test_recall_is_deterministic_per_seed():
    a, b, c = (recall_examples(rng(s), 50, 32, 16) for s in (5, 5, 6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("args, key", [((13, 16), "seq_len"), ((2, 16), "seq_len"), ((16, 3), "vocab_size"),
                                       ((16, 10, 7, 0.2), "vocab_size"), ((16, 16, 0, 0.2), "noise_vocab_size")])
def test_recall_problems(args, key):
    assert recall_problems(*args)[0][0] == key
    with pytest.raises(ValueError, match=key):
        recall_examples(rng(0), 1, *args)


# ------------------------------------------------------------------------------------------ fuzzy recall


def test_fuzzy_recall_exact_examples():
    # V = 9: padding 8, key tokens 0-3, value tokens 4-7; keys and values of 1-2 tokens
    x, y = fuzzy_recall_examples(rng(25), 1, 16, 9, 2, 2, train=True)
    # pad | (1 0)->(5 7) | (3)->(5) | (2 0)->(4) | (3)->(5) again | query (1 0)->(5 7)
    assert x[0].tolist() == [8, 1, 0, 5, 7, 3, 5, 2, 0, 4, 3, 5, 1, 0, 5, 7]
    assert y[0].tolist() == [X, X, X, X, X, X, X, X, X, X, 5, X, X, 5, 7, X]
    # the test split: every key has the most tokens
    x, y = fuzzy_recall_examples(rng(7), 1, 16, 9, 2, 2, train=False)
    assert x[0].tolist() == [3, 2, 4, 7, 0, 1, 5, 4, 0, 2, 7, 6, 0, 1, 5, 4]
    assert y[0].tolist() == [X, X, X, X, X, X, X, X, X, X, X, X, X, 5, 4, X]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("vocab, kmax, vmax, seq_len", [(16, 3, 3, 64), (9, 2, 2, 16), (40, 1, 1, 24), (32, 4, 2, 33)])
def test_fuzzy_oracle_over_many_examples(train, vocab, kmax, vmax, seq_len):
    x, y = fuzzy_recall_examples(rng(1), 300, seq_len, vocab, kmax, vmax, train)
    assert x.shape == y.shape == (300, seq_len)
    for xi, yi in zip(x, y):
        check_fuzzy(xi, yi, vocab, kmax, vmax, train)


def test_fuzzy_statistics():
    vocab, kmax, vmax = 16, 3, 3
    train = [check_fuzzy(xi, yi, vocab, kmax, vmax, True)
             for xi, yi in zip(*fuzzy_recall_examples(rng(2), 2000, 64, vocab, kmax, vmax, True))]
    key_lens, value_lens, first_tokens = [], [], []
    for ex in train:
        seen = set()
        for key, value, _ in ex["pairs"][:-1]:
            if key not in seen:  # a key's first appearance: its value was freshly drawn
                seen.add(key)
                value_lens.append(len(value))
            key_lens.append(len(key))
            first_tokens.append(key[0])
    # packing prefers short pairs a little (a long last pair may not fit), so allow a few percent
    assert np.abs(np.bincount(key_lens, minlength=4)[1:] / len(key_lens) - 1 / 3).max() < 0.03
    assert np.abs(np.bincount(value_lens, minlength=4)[1:] / len(value_lens) - 1 / 3).max() < 0.03
    assert np.abs(np.bincount(first_tokens, minlength=7) / len(first_tokens) - 1 / 7).max() < 0.01
    assert np.mean([ex["pad"] for ex in train]) < kmax + vmax  # the budget is filled up to the longest pair
    assert sum(len(ex["pairs"]) - 1 - len({k for k, _, _ in ex["pairs"][:-1]}) for ex in train) > 0  # keys repeat
    test = [check_fuzzy(xi, yi, vocab, kmax, vmax, False)
            for xi, yi in zip(*fuzzy_recall_examples(rng(3), 500, 64, vocab, kmax, vmax, False))]
    assert {len(k) for ex in test for k, _, _ in ex["pairs"]} == {kmax}


@pytest.mark.parametrize("args, key", [((16, 9, 5, 1), "max_key_len"), ((16, 9, 1, 5), "max_value_len"),
                                       ((7, 9, 2, 2), "seq_len")])
def test_fuzzy_problems(args, key):
    assert fuzzy_problems(*args)[0][0] == key
    with pytest.raises(ValueError, match=key):
        fuzzy_recall_examples(rng(0), 1, *args, train=True)
