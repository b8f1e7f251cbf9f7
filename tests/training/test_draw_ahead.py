"""A packed run draws its next batch on the host while the other runs of its worker hold the turn
(`packing.pass_turn(while_away=...)`, `DeviceBatches.draw_ahead`): the batches and their scored counts come out
in the same order as without drawing ahead, and the drawing happens off the turn, only where there is a turn to
hand on."""

from __future__ import annotations

import threading

import torch

from dcablate.training import packing
from dcablate.training.batches import DeviceBatches, Prefetcher
from dcablate.training.packing import Turns

CPU = torch.device("cpu")


def source(n=5):
    for i in range(n):
        y = torch.full((2, 8), -100)
        y[:, : i + 1] = i  # row counts of scored targets: i + 1
        yield torch.full((2, 8), i), y


def test_drawing_ahead_keeps_the_order_and_the_counts():
    plain = [(x[0, 0].item(), counts) for x, _, counts in DeviceBatches(source(), CPU, True)]
    batches, ahead = DeviceBatches(source(), CPU, True), []
    for i in range(5):
        if i % 2:
            batches.draw_ahead()
            batches.draw_ahead()  # a second call before the next batch draws nothing more
        x, _, counts = next(batches)
        ahead.append((x[0, 0].item(), counts))
    assert ahead == plain == [(i, (i + 1, i + 1)) for i in range(5)]
    batches.draw_ahead()  # past the end: the iterator still ends
    assert next(batches, None) is None


def counted(n: int, drawn: list):
    """`source(n)`, noting each batch drawn in `drawn`."""
    for item in source(n):
        drawn.append(1)
        yield item


def test_a_prefetcher_draws_ahead_only_when_asked():
    drawn = []
    p = Prefetcher(counted(3, drawn), CPU)
    assert drawn == []  # on CPU nothing is drawn before it is needed
    p.draw_ahead()
    assert len(drawn) == 1 and next(p)[0][0, 0].item() == 0 and len(drawn) == 1


def test_the_work_while_away_runs_off_the_turn_and_only_with_a_turn_to_hand_on(monkeypatch):
    turns = Turns()
    monkeypatch.setattr(packing, "_TURNS", turns)
    seen = []
    packing.pass_turn(while_away=lambda: seen.append("main"))  # no turn held: nothing to do meanwhile
    assert seen == []
    other_ran = threading.Event()

    def other():
        with turns:
            other_ran.set()

    def run():
        with turns:
            waiter = threading.Thread(target=other)
            waiter.start()
            while turns.waiting() < 1:
                pass

            def away():  # the other run takes its turn while this one is away
                seen.append(("held", turns.held()))
                assert other_ran.wait(5)

            packing.pass_turn(while_away=away)
            seen.append(("back", turns.held()))
            waiter.join(5)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert seen == [("held", False), ("back", True)] and other_ran.is_set()


def test_no_collection_while_away_and_the_collector_comes_back_as_it_was():
    """Off the turn the cyclic garbage collector is held off (a collection there could free another run's CUDA
    tensors during its graph capture); nested holds count, and a collector the user had turned off stays off."""
    import gc

    assert gc.isenabled()
    with packing.no_collection():
        with packing.no_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with packing.no_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    turns, states = Turns(), []

    def run():
        with turns:
            turns.pass_turn(while_away=lambda: states.append(gc.isenabled()))
        states.append(gc.isenabled())

    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    assert states == [False, True]


def test_a_device_batches_draws_nothing_before_it_is_used():
    drawn = []
    batches = DeviceBatches(counted(2, drawn), CPU, True)
    batches.draw_ahead()  # before the first batch: nothing to draw ahead of
    assert drawn == []
    assert next(batches)[2] == (1, 1) and len(drawn) == 1
