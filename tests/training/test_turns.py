"""`packing.Turns`: how runs trained in threads of one process take turns on the host (`--runs-per-worker`)."""

import threading
import time

import pytest

from dcablate.training.packing import Turns


def wait_until(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def start_in_line(turns: Turns, bodies) -> list[threading.Thread]:
    """Start a thread per body, each asking for the turn (held by the caller) only after the previous one
    waits, so they queue in the order given."""
    threads = []
    for body in bodies:
        threads.append(threading.Thread(target=body, daemon=True))
        threads[-1].start()
        wait_until(lambda n=len(threads): turns.waiting() == n)
    return threads


def records_its_turn(turns: Turns, order: list):
    """Another run's body: takes the turn once and appends "other" to `order`."""
    def other():
        with turns:
            order.append("other")
    return other


def test_steps_passed_on_go_round_robin_in_the_order_asked():
    turns, order = Turns(), []

    def run(name):
        def body():
            with turns:
                for _ in range(4):
                    order.append(name)
                    turns.pass_turn()
        return body

    turns.acquire()
    threads = start_in_line(turns, [run("a"), run("b"), run("c")])
    turns.release()
    for t in threads:
        t.join(10)
    assert order == list("abc" * 4)


def test_a_nested_hold_is_not_handed_back_while_waiting_or_passing():
    """Inside a block that must not be interleaved with other runs (a nested hold: building a run seeds the
    generators, then draws from them), a wait for the GPU keeps the turn."""
    turns, order = Turns(), []
    turns.acquire()
    start_in_line(turns, [records_its_turn(turns, order)])
    with turns:  # one_at_a_time() inside the run's own hold
        with turns.handed_back():
            time.sleep(0.05)
        turns.pass_turn()
        order.append("nested block done")
    with turns.handed_back():  # the run's own hold alone: handed on
        wait_until(lambda: "other" in order)
    turns.release()
    assert order == ["nested block done", "other"]


def test_the_turn_is_reentrant_and_another_thread_waits_for_the_last_release():
    turns, got = Turns(), threading.Event()

    def other():
        with turns:
            got.set()

    turns.acquire()
    turns.acquire()
    start_in_line(turns, [other])
    turns.release()
    time.sleep(0.05)
    assert not got.is_set() and turns.held()
    turns.pass_turn()  # held once now: handed on, and taken back
    assert got.is_set() and turns.held()
    turns.release()
    assert not turns.held()


def test_a_thread_waiting_for_its_gpu_work_lets_the_others_take_their_turns():
    turns, order = Turns(), []
    waiting = threading.Event()

    def waiter():
        with turns:
            order.append("w: before")
            with turns.handed_back():
                waiting.set()
                wait_until(lambda: "o" in order)
            order.append("w: after")

    def other():
        waiting.wait(10)
        with turns:
            order.append("o")

    threads = [threading.Thread(target=f, daemon=True) for f in (waiter, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["w: before", "o", "w: after"]


def test_passing_without_the_turn_or_without_anyone_waiting_changes_nothing():
    turns = Turns()
    turns.pass_turn()
    with turns.handed_back():
        pass
    assert not turns.held()
    with turns:
        turns.pass_turn()
        assert turns.held()


def test_only_the_holder_releases():
    turns = Turns()
    with pytest.raises(RuntimeError, match="does not hold the turn"):
        turns.release()


def test_host_work_inside_a_nested_hold_lets_the_others_go_on():
    """`released`: a task's data read or made inside the build (a nested hold) does not stall the other runs."""
    turns, order = Turns(), []
    turns.acquire()
    start_in_line(turns, [records_its_turn(turns, order)])
    with turns:
        with turns.released():
            wait_until(lambda: "other" in order)
            assert not turns.held()
        assert turns.held()
        order.append("build done")
    turns.release()
    assert order == ["other", "build done"] and not turns.held()


def test_an_evaluation_hands_the_turn_on_between_its_batches():
    """A packed run's evaluation (eager, bound by its host) lets the other runs step between its batches, as a
    run's training does between steps."""
    from dcablate.training import packing

    order = []

    def evaluating():
        with packing.own_turn():
            for batch in packing.by_turns(["e1", "e2", "e3"]):
                order.append(batch)

    def stepping():
        with packing.own_turn():
            for _ in range(3):
                order.append("step")
                packing.pass_turn()

    packing._TURNS.acquire()
    threads = start_in_line(packing._TURNS, [evaluating, stepping])
    packing._TURNS.release()
    for t in threads:
        t.join(10)
    assert order == ["e1", "step", "e2", "step", "e3", "step"]
    assert list(packing.by_turns(iter(range(3)))) == [0, 1, 2]  # outside a packed worker: the batches as they are
