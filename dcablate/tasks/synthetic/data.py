"""The data every suite task shares: a fixed training set, a test set disjoint from it, the batches drawn
from them, and the vectorised sampling helpers the generators use.

A task's generator is a function `make(rng, rows, train) -> (inputs [rows, T], targets [rows, T])` (int64;
target -100 = not scored; `train` says which split the rows are for, where a task tests on other
examples than it trains on, such as fuzzy recall's longest keys). Both splits are drawn from disjoint
seed streams of `data_seed`: the training set from `SeedSequence([data_seed, 0])`, the test set from
`SeedSequence([data_seed, 1])`, and a test example whose inputs equal a training example's is dropped and
replaced by the next one, so no test example was trained on. Rows are generated in chunks of a fixed
size, so the first rows of a split do not depend on how many are asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from dcablate.training.batches import IGNORE_INDEX

SPLIT_TRAIN, SPLIT_TEST = 0, 1
CHUNK = 1024  # rows per generator call; fixed, since changing it changes the data of a seed

Make = Callable[[np.random.Generator, int, bool], tuple[np.ndarray, np.ndarray]]


class TooFewDistinct(ValueError):
    """The generator keeps repeating training examples: the task's space is too small for a disjoint test set."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Compact storage for tokens and -100 targets."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def row_hashes(inputs: np.ndarray) -> np.ndarray:
    """A 64-bit FNV-1a hash of each row of `inputs [N, T]` -> `[N]` uint64 (equal rows, equal hashes)."""
    h = np.full(inputs.shape[0], 14695981039346656037, dtype=np.uint64)
    prime = np.uint64(1099511628211)
    for t in range(inputs.shape[1]):
        h = (h ^ inputs[:, t].astype(np.uint64)) * prime  # wraps modulo 2^64, as intended
    return h


def generate(make: Make, n: int, seed: np.random.SeedSequence, train: bool, dtype: np.dtype,
             exclude: np.ndarray | None = None, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples `(inputs [n, T], targets [n, T])` in `dtype`, from whole chunks of `chunk` rows of one
    generator seeded by `seed`. `exclude`: row hashes (`row_hashes`) of inputs to leave out (the test split);
    raises TooFewDistinct when fewer than one generated row in ten survives that, or when fewer than one in ten of
    the `n` rows kept is distinct (a test set of a few examples repeated measures those few)."""
    rng = np.random.default_rng(seed)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    have = made = 0
    while have < n:
        x, y = make(rng, chunk, train)
        made += chunk
        if exclude is not None:
            keep = ~np.isin(row_hashes(x), exclude)
            x, y = x[keep], y[keep]
        parts.append((x.astype(dtype), y.astype(dtype)))
        have += len(x)
        if have < n and made >= 10 * (n + chunk) and have * 10 < made:
            raise TooFewDistinct(f"only {have} of {n} test examples could be drawn unlike every training example "
                                 f"({made} tried)")
    inputs = np.concatenate([p[0] for p in parts])[:n]
    targets = np.concatenate([p[1] for p in parts])[:n]
    if exclude is not None:
        distinct = len(np.unique(row_hashes(inputs)))
        if distinct * 10 < n:
            raise TooFewDistinct(f"the {n} test examples drawn unlike every training example are only {distinct} "
                                 f"distinct ones, repeated")
    return inputs, targets


def training_set(make: Make, num_train: int, data_seed: int, vocab_size: int,
                 chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The training set of a setting: `num_train` examples of its own generator stream."""
    return generate(make, num_train, np.random.SeedSequence([data_seed, SPLIT_TRAIN]), True,
                    token_dtype(vocab_size), chunk=chunk)


class SuiteData:
    """The training set (`num_train` examples) and the test set (`num_test`) of one task setting, each
    `(inputs [N, T], targets [N, T])` in the compact token dtype; batches come out as torch int64. The test set
    leaves out every input of the training set, or with `exclude` (row hashes, `row_hashes`) those: a run
    evaluated at another setting is tested on examples unlike those it trained on."""

    def __init__(self, make: Make, num_train: int, num_test: int, data_seed: int, vocab_size: int,
                 chunk: int = CHUNK, exclude: np.ndarray | None = None):
        dtype = token_dtype(vocab_size)
        self._train = None
        self._made = (make, num_train, data_seed, vocab_size, chunk)
        self.test = generate(make, num_test, np.random.SeedSequence([data_seed, SPLIT_TEST]), False, dtype,
                             exclude=row_hashes(self.train[0]) if exclude is None else exclude, chunk=chunk)

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """The training set, made on first use: a run evaluated at another setting (`exclude`) never reads this
        setting's own, which at long sequences takes a while to make."""
        if self._train is None:
            self._train = training_set(*self._made)
        return self._train

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless `(inputs, targets)` batches `[batch_size, T]`: epochs over the training set, each in the
        order of a fresh permutation drawn from `np.random.default_rng(seed)`, cut into whole batches (the
        few examples left over change from epoch to epoch); `start` skips that many batches."""
        n = len(self.train[0])
        per_epoch = n // batch_size
        if batch_size < 1 or per_epoch < 1:
            raise ValueError(f"batch_size must be in [1, {n}] (the training examples), got {batch_size}")
        rng = np.random.default_rng(seed)
        epochs, skip = divmod(start, per_epoch)
        for _ in range(epochs):
            rng.permutation(n)  # the permutations of the skipped epochs, so the stream continues exactly
        while True:
            order = rng.permutation(n)
            for b in range(skip, per_epoch):
                yield _to_batch(self.train, order[b * batch_size:(b + 1) * batch_size])
            skip = 0

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test set once, in order; the last batch may be smaller."""
        for start in range(0, len(self.test[0]), batch_size):
            yield _to_batch(self.test, slice(start, start + batch_size))


def _to_batch(split: tuple[np.ndarray, np.ndarray], idx) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.int64)) for a in split)


# ---------------------------------------------------------------------------------- sampling helpers


def first_occurrence(ids: np.ndarray) -> np.ndarray:
    """For `ids [R, C]`: the slot `[R, C]` of each entry's first occurrence in its row (itself when it is
    the first). One stable sort per row, no Python loop over rows."""
    rows, cols = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")  # equal ids keep their slot order
    ranked = np.take_along_axis(ids, order, axis=1)
    starts = np.ones((rows, cols), dtype=bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    start_rank = np.maximum.accumulate(np.where(starts, np.arange(cols), 0), axis=1)  # a group's first rank
    first_sorted = np.take_along_axis(order, start_rank, axis=1)
    out = np.empty_like(order)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


def pick_uniform(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """One slot per row of `mask [R, C]`, uniform among its True slots (each row needs one) -> `[R]`."""
    count = mask.sum(axis=1)
    r = np.minimum((rng.random(len(mask)) * count).astype(np.int64), count - 1)  # [R], in [0, count)
    hit = mask & (np.cumsum(mask, axis=1) - 1 == r[:, None])
    return hit.argmax(axis=1)


def distinct_tuples(rng: np.random.Generator, shape: tuple[int, ...], k: int, m: int) -> np.ndarray:
    """Tuples `[*shape, k]` of `k` distinct tokens from `range(m)`, uniform over the ordered tuples: the j-th
    token is uniform over the `m - j` tokens not yet taken (the r-th free token is r shifted past each taken
    one, in ascending order)."""
    out = np.empty((*shape, k), dtype=np.int64)
    for j in range(k):
        r = rng.integers(0, m - j, size=shape)
        taken = np.sort(out[..., :j], axis=-1)
        for i in range(j):
            r += r >= taken[..., i]
        out[..., j] = r
    return out
