"""MQARTask.evaluate keeps its sums on the device and reads them back once: the same numbers as scoring each
batch on the host, bit for bit."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dcablate import config
from dcablate.models.costs import build_model
from dcablate.tasks import build_task
from dcablate.tasks.mqar.data import AccuracyMeter


def host_evaluate(task, model, batch_size: int) -> dict:
    """The evaluation as it was: predictions and losses read back to the host batch by batch."""
    meter = AccuracyMeter(task.test_segments)
    loss_sum, n_scored = 0.0, 0
    with torch.no_grad():
        for j, x, y in task.data.test_batches(batch_size):
            logits, targets = model.scored_logits(x, y)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            n_scored += targets.numel()
            predictions = torch.full_like(y, -1)
            predictions[y != -100] = logits.argmax(-1)
            meter.update(j, predictions, y)
    return {**meter.result(), "loss": loss_sum / max(n_scored, 1)}


def tiny_task_and_model():
    r = config.build({
        "run": {"name": "e", "device": "cpu"},
        "model": {"mixer": "attention", "d_model": 16, "n_heads": 2, "n_layers": 1},
        # a small vocabulary, so that an untrained model answers some queries right; uneven last batches;
        # two segments of one name (merged in the result)
        "task": {"mqar": {"vocab_size": 12, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}],
                          "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 37},
                                   {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 20},
                                   {"seq_len": 16, "num_kv_pairs": 2, "num_examples": 9}]}},
    })
    task = build_task(r.task)
    torch.manual_seed(0)
    model = build_model(r, task.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _, (x, y) in zip(range(20), task.train_batches(16, seed=0)):  # a little training: some right answers
        optimizer.zero_grad()
        model(x, y).backward()
        optimizer.step()
    return task, model


def test_device_sums_equal_the_per_batch_host_evaluation():
    task, model = tiny_task_and_model()
    want = host_evaluate(task, model, 16)
    assert 0 < want["overall"] < 1 and set(want) == {"T16_kv2", "T32_kv4", "overall", "loss"}
    got = task.evaluate(model, torch.device("cpu"), 16, contextlib.nullcontext)
    assert got == want
    assert model.training  # put back as it was


def test_results_are_read_back_once_not_per_batch(monkeypatch):
    task, model = tiny_task_and_model()
    reads = []
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    task.evaluate(model, torch.device("cpu"), 4, contextlib.nullcontext)  # 10 + 5 + 3 batches
    assert sorted(reads) == ["item", "tolist"]  # the loss, and every segment's accuracy sum at once
