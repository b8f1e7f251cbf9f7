"""Training batches on their way to the step: copied to the device ahead of time, with each row's count of
scored targets read on the host."""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import numpy as np
import torch

from dcablate.training.packing import in_worker_thread, thread_stream

IGNORE_INDEX = -100  # a target that is not scored (the tasks' data and the models' losses share it)


def scored_per_row(targets: torch.Tensor) -> np.ndarray:
    """Each row's count of scored targets (!= -100) of a CPU tensor `[B, T]`, as int64 `[B]`.

    Counted in NumPy, single-threaded: these host tensors are small, and torch's reductions spread them over
    its intra-op threads, whose start-up and spinning cost milliseconds per batch where the worker's threads
    and processes already keep every core busy (a packed sweep's loops spent 2 ms a step on this count)."""
    return np.count_nonzero(targets.numpy() != IGNORE_INDEX, axis=-1)


def checked_batches(source: Iterable, kind: str, batch_size: int, same_length: bool,
                    vocab_size: int | None = None) -> Iterator:
    """`source`'s batches, the first checked to be what the step takes: `(inputs, targets)`, both int64 tensors
    `[batch_size, T]` on the host, of one length when `same_length` (no task head that maps the length), their
    token ids below the model's `vocab_size` (targets may be -100, unscored); else a UserError naming the task,
    where a plugin task's bad batch would fail deep inside the model (an embedding's index error on the CPU, a
    device-side assert on CUDA)."""
    from dcablate.errors import UserError

    def described(t) -> str:
        return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}" if isinstance(t, torch.Tensor) \
            else type(t).__name__

    it = iter(source)
    for batch in it:  # the first batch only: the rest go through as they come, on the training loop's path
        pair = isinstance(batch, (tuple, list)) and len(batch) == 2
        x, y = batch if pair else (batch, None)
        ok = pair and all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 2
                          and t.shape[0] == batch_size and t.device.type == "cpu" for t in (x, y))
        if not ok or (same_length and x.shape != y.shape):
            got = f"({described(x)}, {described(y)})" if pair else described(batch)
            raise UserError(f"task '{kind}': train_batches yielded {got}; a task's batches are (inputs, "
                            f"targets), int64 CPU tensors [batch_size = {batch_size}, T]"
                            + (", of the same shape" if same_length else ""))
        if vocab_size is not None:
            _check_token_ids(kind, x, y, vocab_size)
        yield batch
        break
    yield from it


def _check_token_ids(kind: str, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """A UserError when a batch holds a token id the model has no row for: below 0 or at least `vocab_size` (the
    task's), -100 allowed among the targets."""
    from dcablate.errors import UserError

    scored = targets[targets != IGNORE_INDEX]
    for name, ids in (("inputs", inputs), ("targets", scored)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise UserError(f"task '{kind}': train_batches yielded {name} holding token id {bad}, outside the "
                            f"vocabulary of {vocab_size} (ids 0 to {vocab_size - 1}) that its vocab_size gives the "
                            f"model" + ("; unscored targets are -100" if name == "targets" else ""))


_END = object()  # a drawn-ahead "batch" that says the iterator is exhausted


class Prefetcher:
    """The batches of an iterator; on CUDA each is copied to the device (pinned memory, a side stream)
    while the previous step runs, so the step never waits on a host-to-device copy. On CPU a pass-through.

    `draw_ahead()` draws the next batch from the iterator on the host only (no CUDA call), to be copied when
    its turn comes: a run of a packed worker does it while the other runs hold the process's turn (packing.py),
    so the part of a batch that needs no GPU is off the turn that every run's GPU work waits for."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = iter(batches), device
        self.drawn = None  # a batch drawn ahead on the host (or _END), not yet handed on
        self.stream = None
        if device.type == "cuda":  # a packed worker's thread keeps its own (packing.py), others draw one
            self.stream = thread_stream(device, "prefetch") if in_worker_thread() else torch.cuda.Stream(device)
        self.next = self._load() if self.stream is not None else None

    def draw_ahead(self) -> None:
        """Draw the iterator's next batch now, on the host, unless one is drawn already."""
        if self.drawn is None:
            self.drawn = next(self.batches, _END)

    def _draw(self):
        """The next batch of the iterator (the one drawn ahead, if any); _END when there is none."""
        batch = self.drawn if self.drawn is not None else next(self.batches, _END)
        self.drawn = None
        return batch

    def _load(self):
        batch = self._draw()
        if batch is _END:
            return None
        # through contiguous pinned copies (LM batches are overlapping views of one window), each one asynchronous
        # transfer on the side stream
        with torch.cuda.stream(self.stream):
            return to_device(self.device, *batch)

    def __iter__(self):
        return self

    def __next__(self):
        if self.stream is None:
            batch = self._draw()
            if batch is _END:
                raise StopIteration
            return batch
        if self.next is None:
            raise StopIteration
        batch, current = self.next, torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in batch:  # allocated on the side stream, used on this one
            t.record_stream(current)
        self.next = self._load()
        return batch


def to_device(device: torch.device | str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CPU `tensors` on `device`, without making the host wait: on CUDA each is copied through pinned memory,
    asynchronously on the current stream (a copy from pageable memory first waits for the stream's earlier work,
    a host sync per evaluation batch); elsewhere `.to(device)`."""
    if torch.device(device).type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(_pinned_copy(t).to(device, non_blocking=True) for t in tensors)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor `t` in pinned memory, made by NumPy, single-threaded (`scored_per_row` says
    why)."""
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    np.copyto(pinned.numpy(), t.numpy())
    return pinned


class ScoredCounts:
    """Each batch's scored targets per row (target != -100), counted on its CPU copy as it is drawn and
    handed out in the same order. MQAR's loss gathers the scored positions; knowing how many there are on
    the host spares a GPU->host sync per step and lets the step be captured as a CUDA graph."""

    def __init__(self):
        self.queue: collections.deque[tuple[int, ...]] = collections.deque()

    def wrap(self, batches):
        for x, y in batches:
            self.queue.append(tuple(scored_per_row(y).tolist()))
            yield x, y

    def pop(self) -> tuple[int, ...]:
        return self.queue.popleft()


class DeviceBatches:
    """`(x [B, T], y [B, T], row_scored)` for each batch `(x, y)` of `source`, prefetched to `device`;
    `row_scored` (the third argument of `TrainStep`) is each row's count of scored targets when `count_scored`
    (the model's loss gathers them: `LanguageModel.gather_scored`), else None. `draw_ahead()`: the next batch's
    host part (drawing it, counting its scored targets) now, as `Prefetcher.draw_ahead`."""

    def __init__(self, source: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, count_scored: bool):
        self.source, self.device = source, device
        self.counts = ScoredCounts() if count_scored else None
        self._prefetcher: Prefetcher | None = None  # made on first use: nothing is drawn or copied before

    @property
    def prefetcher(self) -> Prefetcher:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self.counts.wrap(self.source) if self.counts else self.source, self.device)
        return self._prefetcher

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
        x, y = next(self.prefetcher)
        return x, y, self.counts.pop() if self.counts else None

    def draw_ahead(self) -> None:
        """The next batch's host part now (a CUDA run's first use still copies under the caller's turn: only a
        prefetcher already made draws ahead)."""
        if self._prefetcher is not None:
            self._prefetcher.draw_ahead()


def device_batches(source: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   count_scored: bool) -> DeviceBatches:
    """`DeviceBatches` of `source` on `device`."""
    return DeviceBatches(source, device, count_scored)
