"""Training batches on their way to the step: copied to the device ahead of time, with each row's count of
scored targets read on the host."""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import torch

from dcablate.training.packing import in_worker_thread, thread_stream


class Prefetcher:
    """The batches of an iterator; on CUDA each is copied to the device (pinned memory, a side stream)
    while the previous step runs, so the step never waits on a host-to-device copy. On CPU a pass-through."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = iter(batches), device
        self.stream = None
        if device.type == "cuda":  # a packed worker's thread keeps its own (packing.py), others draw one
            self.stream = thread_stream(device, "prefetch") if in_worker_thread() else torch.cuda.Stream(device)
        self.next = self._load() if self.stream is not None else None

    def _load(self):
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        # a contiguous pinned copy (LM batches are overlapping views of one window): the copy to the device
        # is then one asynchronous transfer
        pinned = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in batch)
        with torch.cuda.stream(self.stream):
            return tuple(t.to(self.device, non_blocking=True) for t in pinned)

    def __iter__(self):
        return self

    def __next__(self):
        if self.stream is None:
            return next(self.batches)
        if self.next is None:
            raise StopIteration
        batch, current = self.next, torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in batch:  # allocated on the side stream, used on this one
            t.record_stream(current)
        self.next = self._load()
        return batch


class ScoredCounts:
    """Each batch's scored targets per row (target != -100), counted on its CPU copy as it is drawn and
    handed out in the same order. MQAR's loss gathers the scored positions; knowing how many there are on
    the host spares a GPU->host sync per step and lets the step be captured as a CUDA graph."""

    def __init__(self):
        self.queue: collections.deque[tuple[int, ...]] = collections.deque()

    def wrap(self, batches):
        for x, y in batches:
            self.queue.append(tuple((y != -100).sum(-1).tolist()))
            yield x, y

    def pop(self) -> tuple[int, ...]:
        return self.queue.popleft()


def device_batches(source: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, count_scored: bool
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]]:
    """`(x [B, T], y [B, T], row_scored)` for each batch `(x, y)` of `source`, prefetched to `device`;
    `row_scored` (the third argument of `TrainStep`) is each row's count of scored targets when `count_scored`
    (the model's loss gathers them: `LanguageModel.gather_scored`), else None."""
    counts = ScoredCounts() if count_scored else None
    for x, y in Prefetcher(counts.wrap(source) if counts else source, device):
        yield x, y, counts.pop() if counts else None
