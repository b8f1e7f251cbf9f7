"""Selective copying, compression and memorization generators, and compression's decoder head: an exact
example for a fixed seed (checked by hand against docs/tasks.md), the oracle of suite_checks.py over many
examples, and statistics of what is drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcablate.tasks.compression.data import compression_examples
from dcablate.tasks.compression.head import CompressionDecoder, sinusoids
from dcablate.tasks.compression.spec import compression_problems
from dcablate.tasks.memorization.data import memorization_examples, memory_map
from dcablate.tasks.memorization.spec import memorization_problems
from dcablate.tasks.selective_copy.data import selective_copy_examples
from dcablate.tasks.selective_copy.spec import selective_copy_problems
from tests.tasks.suite_checks import check_compression, check_memorization, check_selective_copy

X = -100


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ selective copying


def test_selective_copy_exact_example():
    # V = 6: content 0-3, blank 4, copy 5; T = 10 with 3 tokens: a 6-position data region, COPY, 3 answers
    x, y = selective_copy_examples(rng(7), 1, 10, 6, 3)
    assert x[0].tolist() == [4, 3, 2, 4, 2, 4, 5, 4, 4, 4]
    assert y[0].tolist() == [X, X, X, X, X, X, X, 3, 2, 2]


def test_selective_copy_oracle_and_statistics():
    vocab, n, seq_len = 8, 5, 30
    x, y = selective_copy_examples(rng(1), 6000, seq_len, vocab, n)
    region = seq_len - n - 1
    where = np.zeros(region)
    for xi, yi in zip(x, y):
        where[check_selective_copy(xi, yi, vocab, n)] += 1
    assert np.abs(where / len(x) - n / region).max() < 0.03  # every data position equally likely
    answers = y[:, -n:].ravel()
    assert np.abs(np.bincount(answers, minlength=6) / answers.size - 1 / 6).max() < 0.01


def test_selective_copy_without_spare_blanks():
    x, y = selective_copy_examples(rng(2), 50, 8, 5, 3)  # T = 2n + 2: a single blank in the data region
    for xi, yi in zip(x, y):
        check_selective_copy(xi, yi, 5, 3)


@pytest.mark.parametrize("args, key", [((10, 3, 2), "vocab_size"), ((9, 8, 4), "seq_len")])
def test_selective_copy_problems(args, key):
    assert selective_copy_problems(*args)[0][0] == key
    with pytest.raises(ValueError, match=key):
        selective_copy_examples(rng(0), 1, *args)


# ------------------------------------------------------------------------------------------ compression


def test_compression_exact_example():
    # V = 5: content 0-3, aggregation token 4; every content position is a target
    x, y = compression_examples(rng(7), 1, 6, 5)
    assert x[0].tolist() == [3, 2, 2, 3, 2, 4]
    assert y[0].tolist() == [3, 2, 2, 3, 2, X]


def test_compression_oracle_and_statistics():
    x, y = compression_examples(rng(1), 5000, 9, 8)
    for xi, yi in zip(x, y):
        check_compression(xi, yi, 8)
    assert np.abs(np.bincount(x[:, :-1].ravel(), minlength=7) / x[:, :-1].size - 1 / 7).max() < 0.01
    assert compression_problems(8, 2)[0][0] == "vocab_size"


def test_sinusoids_are_distinct_codes():
    p = sinusoids(64, 32)
    assert p.shape == (64, 32) and torch.allclose(p[0, 1::2], torch.ones(16))  # cos(0) = 1
    d = torch.cdist(p, p) + torch.eye(64) * 10
    assert d.min() > 0.1  # no two positions share a code
    assert sinusoids(5, 7).shape == (5, 7)


def test_compression_decoder_reads_only_the_last_position():
    torch.manual_seed(0)
    head = CompressionDecoder(16)
    h = torch.randn(3, 10, 16)
    out = head(h)
    assert out.shape == (3, 10, 16)
    changed = h.clone()
    changed[:, :-1] = torch.randn(3, 9, 16)  # everything but the aggregation token's state
    assert torch.equal(head(changed), out)
    h2 = h.clone()
    h2[:, -1] += 1.0
    assert not torch.allclose(head(h2), out)
    assert not torch.allclose(out[:, 0], out[:, 1])  # positions get different rows


# ------------------------------------------------------------------------------------------ memorization


def test_memorization_exact_example():
    # V = 9: keys 0-3, values 4-7, insert token 8; the map of data_seed 7
    values = memory_map(7, 9)
    assert values.tolist() == [7, 6, 5, 4]
    x, y = memorization_examples(rng(7), 1, 8, 9, values)
    assert x[0].tolist() == [3, 8, 2, 8, 2, 8, 3, 8]
    assert y[0].tolist() == [X, 4, X, 5, X, 5, X, 4]


def test_memory_map_is_a_fixed_injection():
    for vocab in (9, 10, 256, 8192):
        values = memory_map(0, vocab)
        n_keys = (vocab - 1) // 2
        assert len(values) == n_keys and len(set(values.tolist())) == n_keys
        assert values.min() >= n_keys and values.max() < vocab - 1
    assert np.array_equal(memory_map(3, 256), memory_map(3, 256))
    assert not np.array_equal(memory_map(3, 256), memory_map(4, 256))


def test_memorization_oracle_and_statistics():
    values = memory_map(1, 33)
    x, y = memorization_examples(rng(1), 4000, 12, 33, values)
    for xi, yi in zip(x, y):
        check_memorization(xi, yi, 33, values)
    assert np.abs(np.bincount(x[:, 0::2].ravel(), minlength=16) / x[:, 0::2].size - 1 / 16).max() < 0.01
    assert [p[0] for p in memorization_problems(7, 3)] == ["seq_len", "vocab_size"]
