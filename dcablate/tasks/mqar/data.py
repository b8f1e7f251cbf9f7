"""Multi-query associative recall (MQAR) with Zoology semantics.

Each example of length ``T`` with ``kv`` pairs looks like::

    k1 v1 k2 v2 ... k_kv v_kv | query region (T - 2kv + 1 tokens, zeros where nothing is written)

Keys are distinct tokens from ``[1, V/2)``, values distinct tokens from ``[V/2, V)``. The query region
has ``n_slots = (T - 2kv) / 2`` slots; slot ``g`` (0-based) sits at sequence position ``2kv + 2g`` and
has sampling weight ``(g + 1) ** (power_a - 1)``. ``kv`` distinct slots are drawn by sequential weighted
sampling without replacement (done exactly and vectorised with an exponential race, the equivalent of
the Gumbel-top-k trick); the j-th key of the context is written at the j-th drawn slot. Inputs are the
first ``T`` tokens of the ``T + 1`` token sequence; targets are the sequence shifted by one, but only the
positions holding a query key are scored (target = that key's value); all other targets are ``-100``.

With ``filler="random"`` every 0 of the inputs is replaced by a token uniform over ``[0, V)`` (as in
Zoology; collisions with keys are intended), with ``filler="zero"`` zeros are kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcablate.tasks.mqar.cache import Entry, file_name, load_shared
from dcablate.tasks.mqar.spec import segment_problem
from dcablate.training.batches import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SPLIT_TRAIN",
    "SPLIT_TEST",
    "Segment",
    "generate_segment",
    "scored_mask",
    "MQARData",
    "AccuracyMeter",
]

SPLIT_TRAIN, SPLIT_TEST = 0, 1
FILLERS = ("random", "zero")

# Examples are generated in chunks of this many rows (bounded memory). Fixed so that results never
# depend on anything but the arguments; changing it changes the generated data.
_CHUNK = 1024
# Part of every cached segment's name (cache.py): raise it when a seed's data changes in a way that the
# other parts of the name and the check of a file's first rows would not notice.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Segment:
    """A block of ``num_examples`` MQAR examples of one sequence length and number of kv pairs."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    def __post_init__(self) -> None:
        for field in ("seq_len", "num_kv_pairs", "num_examples"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Segment.{field} must be an int, got {value!r}")
        if self.num_kv_pairs < 1:
            raise ValueError(f"Segment.num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        if self.num_examples < 1:
            raise ValueError(f"Segment.num_examples must be >= 1, got {self.num_examples}")
        _check_shape(self.seq_len, self.num_kv_pairs)

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_kv{self.num_kv_pairs}"


def _check_shape(seq_len: int, num_kv_pairs: int, vocab_size: int | None = None) -> None:
    if seq_len <= 0:
        raise ValueError(f"MQAR seq_len must be positive, got {seq_len}")
    if num_kv_pairs < 1:
        raise ValueError(f"MQAR num_kv_pairs must be >= 1, got {num_kv_pairs}")
    problem = segment_problem(seq_len, num_kv_pairs, vocab_size)  # the rules the recipe check applies
    if problem is not None:
        raise ValueError(f"MQAR {problem[0]} {problem[1]} (seq_len={seq_len}, num_kv_pairs={num_kv_pairs})")


def _check_args(segment: Segment, vocab_size: int, power_a: float, filler: str) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 4:
        raise ValueError(f"MQAR vocab_size must be an int >= 4, got {vocab_size!r}")
    _check_shape(segment.seq_len, segment.num_kv_pairs, vocab_size)
    if not (np.isfinite(power_a) and power_a > 0):
        raise ValueError(f"MQAR power_a must be a positive finite number, got {power_a!r}")
    if filler not in FILLERS:
        raise ValueError(f"MQAR filler must be one of {FILLERS}, got {filler!r}")


def token_dtype(vocab_size: int) -> np.dtype:
    """Compact storage dtype for tokens (and -100 targets)."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _sample_distinct(rng: np.random.Generator, rows: int, k: int, m: int) -> np.ndarray:
    """``rows`` independent uniform k-subsets of ``range(m)`` in uniformly random order, shape [rows, k]."""
    if 4 * k <= m:
        # Sparse case: draw with replacement and redraw duplicates until all distinct. The procedure is
        # invariant under relabelling of range(m), so the resulting set is a uniform k-subset.
        v = rng.integers(0, m, size=(rows, k), dtype=np.int64)
        while True:
            v.sort(axis=1)
            dup = v[:, 1:] == v[:, :-1]
            n = int(dup.sum())
            if n == 0:
                break
            tail = v[:, 1:]
            tail[dup] = rng.integers(0, m, size=n, dtype=np.int64)
    else:
        # Dense case: the k smallest of m iid uniforms (argpartition); cheap since m < 4k here.
        r = rng.random((rows, m))
        v = np.argpartition(r, k - 1, axis=1)[:, :k]
    # Uniformly random order inside each row.
    order = np.argsort(rng.random((rows, k)), axis=1)
    return np.take_along_axis(v, order, axis=1)


def _sample_slots(rng: np.random.Generator, rows: int, k: int, log_w: np.ndarray) -> np.ndarray:
    """Sequential weighted sampling without replacement of k slots per row, in draw order.

    Exponential race: slot i gets E_i / w_i with E_i ~ Exp(1); sorting ascending gives exactly the
    order of sequential sampling with probabilities proportional to w (equivalent to Gumbel-top-k)."""
    n = log_w.shape[0]
    e = rng.standard_exponential((rows, n))
    race = np.log(e + 1e-300) - log_w  # monotone in E/w, no overflow
    if k < n:
        top = np.argpartition(race, k - 1, axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(n), (rows, n)).copy()
    order = np.argsort(np.take_along_axis(race, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _generate_compact(
    segment: Segment, vocab_size: int, seed, power_a: float, filler: str,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like generate_segment but targets are stored in the compact token dtype too; `out`: the two [N, T]
    arrays to write into (a memory-mapped cache file) instead of new ones."""
    _check_args(segment, vocab_size, power_a, filler)
    T, kv, N = segment.seq_len, segment.num_kv_pairs, segment.num_examples
    half = vocab_size // 2
    n_slots = (T - 2 * kv) // 2
    dtype = token_dtype(vocab_size)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(ss)

    log_w = (power_a - 1.0) * np.log(np.arange(1, n_slots + 1, dtype=np.float64))
    inputs, targets = out if out is not None else (np.empty((N, T), dtype=dtype), np.empty((N, T), dtype=dtype))
    for start in range(0, N, _CHUNK):
        c = min(_CHUNK, N - start)
        keys = _sample_distinct(rng, c, kv, half - 1) + 1  # [1, V/2)
        values = _sample_distinct(rng, c, kv, vocab_size - half) + half  # [V/2, V)
        slots = _sample_slots(rng, c, kv, log_w)  # j-th key -> j-th drawn slot
        pos = 2 * kv + 2 * slots  # input position of each query key (< T)

        x = np.zeros((c, T), dtype=dtype)
        x[:, 0 : 2 * kv : 2] = keys
        x[:, 1 : 2 * kv : 2] = values
        np.put_along_axis(x, pos, keys.astype(dtype), axis=1)
        y = np.full((c, T), IGNORE_INDEX, dtype=dtype)
        np.put_along_axis(y, pos, values.astype(dtype), axis=1)
        if filler == "random":
            noise = rng.integers(0, vocab_size, size=(c, T), dtype=dtype)
            np.copyto(x, noise, where=(x == 0))
        inputs[start : start + c] = x
        targets[start : start + c] = y
    return inputs, targets


def generate_segment(
    segment: Segment,
    vocab_size: int,
    seed: int | tuple[int, ...] | np.random.SeedSequence,
    power_a: float = 0.01,
    filler: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one segment of MQAR examples.

    Returns inputs [N, T] (int16 if vocab_size <= 32767 else int32) and targets [N, T] int64 with -100
    at unscored positions. Deterministic in (segment, vocab_size, seed, power_a, filler)."""
    inputs, targets = _generate_compact(segment, vocab_size, seed, power_a, filler)
    return inputs, targets.astype(np.int64)


def scored_mask(targets):
    """Boolean mask of scored positions (targets != -100); works for numpy arrays and torch tensors."""
    return targets != IGNORE_INDEX


def _to_batch(inputs: np.ndarray, targets: np.ndarray, idx) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(inputs[idx], dtype=np.int64))
    y = torch.from_numpy(np.ascontiguousarray(targets[idx], dtype=np.int64))
    return x, y


class MQARData:
    """All train and test segments of one recipe, generated once.

    Train and test use disjoint seed streams: segment j of split s uses
    ``np.random.SeedSequence([data_seed, s, j])``, so train/test never share a seed and every model in a
    sweep with the same data_seed sees identical data. Tokens and targets are stored compactly and
    returned as torch int64 per batch.

    With ``cache_dir`` each segment is read memory-mapped from a file there, generated and written first
    by whichever run needs it first (cache.py); the arrays are the ones generated in memory, bit for bit."""

    def __init__(
        self,
        train: Sequence[Segment],
        test: Sequence[Segment],
        vocab_size: int = 8192,
        power_a: float = 0.01,
        filler: str = "random",
        data_seed: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        self.train = list(train)
        self.test = list(test)
        self.vocab_size = vocab_size
        self.power_a = power_a
        self.filler = filler
        self.data_seed = data_seed
        # Validate everything before spending time generating.
        for seg in self.train + self.test:
            _check_args(seg, vocab_size, power_a, filler)
        wanted = [(SPLIT_TRAIN, j, seg) for j, seg in enumerate(self.train)] + \
                 [(SPLIT_TEST, j, seg) for j, seg in enumerate(self.test)]
        made = None
        if cache_dir is not None:
            arrays = load_shared(Path(cache_dir), [self.cache_entry(*w) for w in wanted])
            made = None if arrays is None else [(a[0], a[1]) for a in arrays]
        if made is None:
            made = [self._make(*w) for w in wanted]
        self.train_data = made[: len(self.train)]  # (inputs [N, T], targets [N, T]) per segment
        self.test_data = made[len(self.train):]

    def _make(self, split: int, j: int, seg: Segment, out: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        ss = np.random.SeedSequence([self.data_seed, split, j])
        return _generate_compact(seg, self.vocab_size, ss, self.power_a, self.filler, out)

    def cache_entry(self, split: int, j: int, seg: Segment) -> Entry:
        """Segment j of `split` as a cache file `[2, N, T]` (inputs, targets), named by a digest of all that
        decides its tokens: the generator's arguments, its seed, and the chunking and format that fix
        how the seed is drawn from."""
        what = {"format": CACHE_FORMAT, "chunk": _CHUNK, "vocab_size": int(self.vocab_size),
                "power_a": float(self.power_a).hex(), "filler": self.filler,
                "seed": [int(self.data_seed), split, j], "seq_len": int(seg.seq_len),
                "num_kv_pairs": int(seg.num_kv_pairs), "num_examples": int(seg.num_examples)}
        part = "train" if split == SPLIT_TRAIN else "test"
        # the first chunk of a segment is drawn before the rest: a segment of that many examples equals it
        first = Segment(seg.seq_len, seg.num_kv_pairs, min(seg.num_examples, _CHUNK))
        return Entry(
            name=file_name(f"mqar-{part}{j}-{seg.name}-n{seg.num_examples}", what),
            shape=(2, seg.num_examples, seg.seq_len), dtype=token_dtype(self.vocab_size),
            fill=lambda a: self._make(split, j, seg, out=(a[0], a[1])),
            head=lambda: np.stack(self._make(split, j, first)))

    def _epoch_plan(self, batch_size: int, rng: np.random.Generator | None):
        plan: list[tuple[int, np.ndarray]] = []
        for j, seg in enumerate(self.train):
            n = seg.num_examples
            idx = rng.permutation(n) if rng is not None else np.arange(n)
            if n < batch_size:
                plan.append((j, idx))
            else:
                for b in range(n // batch_size):
                    plan.append((j, idx[b * batch_size : (b + 1) * batch_size]))
        return plan

    def steps_per_epoch(self, batch_size: int) -> int:
        _check_batch_size(batch_size)
        return sum(max(1, seg.num_examples // batch_size) for seg in self.train)

    def train_batches(
        self, batch_size: int, seed: int, start: int = 0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Endless stream of (segment_index, inputs int64 [b, T], targets int64 [b, T]).

        Each batch comes from one segment. Per epoch every segment's examples are shuffled and cut into
        batches of batch_size (the last partial batch dropped, unless the segment is smaller than
        batch_size, in which case it forms one smaller batch), and the batch order across segments is
        shuffled. Everything is driven by np.random.default_rng(seed). ``start`` skips that many batches
        without building them (a resumed run continues the exact stream)."""
        _check_batch_size(batch_size)
        if not self.train:
            raise ValueError("MQARData has no train segments")
        rng = np.random.default_rng(seed)
        skip = start
        while True:
            plan = self._epoch_plan(batch_size, rng)
            order = rng.permutation(len(plan))
            if skip >= len(order):
                skip -= len(order)
                continue
            order, skip = order[skip:], 0
            for p in order:
                j, idx = plan[p]
                x, y = _to_batch(*self.train_data[j], idx)
                yield j, x, y

    def test_batches(self, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """One pass over every test segment in order, no shuffle; the last batch of a segment may be smaller."""
        _check_batch_size(batch_size)
        for j, (inputs, targets) in enumerate(self.test_data):
            for start in range(0, inputs.shape[0], batch_size):
                sl = slice(start, start + batch_size)
                yield j, *_to_batch(inputs, targets, sl)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class AccuracyMeter:
    """Accumulates per-example accuracy.

    For each example: mean over its scored positions of (pred == target); segment accuracy = mean over
    its examples; overall = mean over all examples seen (example-weighted). Examples without any scored
    position are ignored. Segments that received no examples are omitted from result(); segments sharing
    a name are merged under that name. `update` takes a batch's predictions; `add` a sum already made on
    the device, which stays there until `result` reads all of them back at once."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = list(segments)
        self.reset()

    def reset(self) -> None:
        self._sum = [0.0] * len(self.segments)
        self._count = [0] * len(self.segments)

    def update(self, segment_index: int, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        if not 0 <= segment_index < len(self.segments):
            raise IndexError(f"segment_index {segment_index} out of range for {len(self.segments)} segments")
        predictions = torch.as_tensor(predictions).detach().cpu()
        targets = torch.as_tensor(targets).detach().cpu()
        if predictions.shape != targets.shape or targets.dim() != 2:
            raise ValueError(
                f"predictions and targets must both be [b, T]; got {tuple(predictions.shape)} and "
                f"{tuple(targets.shape)}"
            )
        mask = scored_mask(targets)
        n_scored = mask.sum(dim=1)
        correct = ((predictions.to(torch.int64) == targets.to(torch.int64)) & mask).sum(dim=1)
        keep = n_scored > 0
        if not bool(keep.any()):
            return
        acc = correct[keep].to(torch.float64) / n_scored[keep].to(torch.float64)
        self._sum[segment_index] += float(acc.sum())
        self._count[segment_index] += int(keep.sum())

    def add(self, segment_index: int, accuracy_sum: torch.Tensor, examples: int) -> None:
        """Add `examples` examples whose per-example accuracies sum to `accuracy_sum` (a float64 scalar tensor,
        on any device; not read until `result`)."""
        if not 0 <= segment_index < len(self.segments):
            raise IndexError(f"segment_index {segment_index} out of range for {len(self.segments)} segments")
        if examples:
            self._sum[segment_index] = self._sum[segment_index] + accuracy_sum
            self._count[segment_index] += examples

    def result(self) -> dict[str, float]:
        tensors = [s for s in self._sum if isinstance(s, torch.Tensor)]
        device_sums = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else [])
        host = [next(device_sums) if isinstance(s, torch.Tensor) else s for s in self._sum]  # one read-back
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for seg, s, c in zip(self.segments, host, self._count):
            if c == 0:
                continue
            sums[seg.name] = sums.get(seg.name, 0.0) + s
            counts[seg.name] = counts.get(seg.name, 0) + c
        out = {name: sums[name] / counts[name] for name in sums}
        total = sum(counts.values())
        if total:
            out["overall"] = sum(sums.values()) / total
        return out
