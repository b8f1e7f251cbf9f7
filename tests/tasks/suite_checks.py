"""Plain-Python oracles of the synthetic suite's tasks: each reads one example token by token and asserts
what docs/tasks.md says it holds, independently of the vectorised generators they check."""

from __future__ import annotations

import numpy as np

IGNORE = -100


def check_recall(x, y, vocab_size: int, noise_vocab_size: int = 0) -> dict:
    """One (noisy) in-context recall example; returns what it saw: pairs, noise pairs, the query's rank."""
    x, y = [int(t) for t in x], [int(t) for t in y]
    content = vocab_size - noise_vocab_size
    n_keys = content // 2
    seen: dict[int, int] = {}
    order: list[int] = []  # distinct keys by first appearance
    noise = 0
    assert len(x) % 2 == 0
    for i in range(0, len(x), 2):
        k, v = x[i], x[i + 1]
        assert y[i + 1] == IGNORE
        last = i == len(x) - 2
        if k >= content:  # a noise pair: two noise tokens, never scored, never the query
            assert not last and content <= v < vocab_size and y[i] == IGNORE
            noise += 1
            continue
        assert 0 <= k < n_keys and n_keys <= v < content, (k, v)
        if k in seen:
            assert v == seen[k] and y[i] == v
        else:
            assert not last, "the query key was not in the context"
            assert y[i] == IGNORE
            seen[k] = v
            order.append(k)
    return {"noise": noise, "pairs": len(x) // 2 - 1, "query_rank": order.index(x[-2]), "distinct": len(order)}


def check_fuzzy(x, y, vocab_size: int, max_key_len: int, max_value_len: int, train: bool) -> dict:
    """One fuzzy-recall example: left padding, then alternating key runs and value runs (the ranges are
    disjoint), each key's value fixed by its first appearance, value tokens of repeated keys scored."""
    x, y = [int(t) for t in x], [int(t) for t in y]
    pad, n_keys = vocab_size - 1, (vocab_size - 1) // 2
    start = 0
    while x[start] == pad:
        assert y[start] == IGNORE
        start += 1
    pairs: list[tuple[tuple, tuple, int]] = []  # (key, value, position of the value's first token)
    i = start
    while i < len(x):
        j = i
        while j < len(x) and x[j] < n_keys:
            j += 1
        k = j
        while k < len(x) and n_keys <= x[k] < pad:
            k += 1
        assert i < j < k, f"not a key run then a value run at {i}"
        pairs.append((tuple(x[i:j]), tuple(x[j:k]), j))
        i = k
    seen: dict[tuple, tuple] = {}
    scored = set()
    for n, (key, value, at) in enumerate(pairs):
        assert len(set(key)) == len(key) and len(set(value)) == len(value)
        assert 1 <= len(key) <= max_key_len and 1 <= len(value) <= max_value_len
        if not train:
            assert len(key) == max_key_len
        if key in seen:
            assert value == seen[key]
            for d, t in enumerate(value):
                assert y[at + d - 1] == t
                scored.add(at + d - 1)
        else:
            assert n < len(pairs) - 1, "the query key was not in the context"
            seen[key] = value
    assert all(y[p] == IGNORE for p in range(len(y)) if p not in scored)
    context = sum(len(k) + len(v) for k, v, _ in pairs[:-1])
    assert context <= len(x) - max_key_len - max_value_len
    return {"pairs": pairs, "pad": start}


def check_selective_copy(x, y, vocab_size: int, num_tokens: int) -> list[int]:
    """One selective-copying example; returns the positions of the content tokens in the data region."""
    x, y = [int(t) for t in x], [int(t) for t in y]
    blank, copy, n = vocab_size - 2, vocab_size - 1, num_tokens
    region = len(x) - n - 1
    where = [p for p in range(region) if x[p] != blank]
    assert len(where) == n and all(0 <= x[p] < blank for p in where)
    assert x[region] == copy and x[region + 1:] == [blank] * n
    assert y[:region + 1] == [IGNORE] * (region + 1)
    assert y[region + 1:] == [x[p] for p in where]
    return where


def check_compression(x, y, vocab_size: int) -> None:
    x, y = [int(t) for t in x], [int(t) for t in y]
    assert x[-1] == vocab_size - 1 and all(0 <= t < vocab_size - 1 for t in x[:-1])
    assert y[:-1] == x[:-1] and y[-1] == IGNORE


def check_memorization(x, y, vocab_size: int, values: np.ndarray) -> None:
    x, y = [int(t) for t in x], [int(t) for t in y]
    n_keys = (vocab_size - 1) // 2
    for i in range(0, len(x), 2):
        assert 0 <= x[i] < n_keys and x[i + 1] == vocab_size - 1
        assert y[i] == IGNORE and y[i + 1] == values[x[i]]
