"""A signal stops a run promptly wherever it lands (issue 23): inside an evaluation, inside a step's forward
and backward passes, or while the run is being built; each time the checkpoint saved (or the one before)
resumes to exactly the uninterrupted run. A repeat of the same signal within a second counts once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dcablate.tasks.mqar.task import MQARTask
from dcablate.training import checkpoint
from dcablate.training.signals import REPEAT_S, Interrupted, signals_caught
from dcablate.training.step import TrainStep
from tests.tiny_recipes import run_cli, run_in, setup_dir
from tests.training.test_reliability import assert_same, outcome, signal_at


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    cwd = setup_dir(tmp_path_factory.mktemp("reference"))
    run_in(cwd)
    return outcome(cwd / "out" / "t")


def kill_on_call(monkeypatch, cls, name: str, nth: int, sig=signal.SIGINT) -> None:
    """Send `sig` to this process at the start of the `nth` call of `cls.name` (then run it)."""
    original, calls = getattr(cls, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)
    monkeypatch.setattr(cls, name, wrapper)


def resume_equals_reference(monkeypatch, capsys, cwd: Path, reference: dict, step: int) -> None:
    monkeypatch.undo()
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and err == "" and f"resuming out/t from step {step}" in out
    assert_same(outcome(cwd / "out/t"), reference)


def test_a_signal_ends_an_evaluation_at_once_and_the_resumed_run_makes_it(tmp_path, monkeypatch, capsys, reference):
    cwd = setup_dir(tmp_path)
    kill_on_call(monkeypatch, MQARTask, "evaluate", 2)  # the evaluation at step 10 (eval.every = 5)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 130 and err.startswith("interrupted (SIGINT) at step 10; checkpoint saved to ")
    saved = checkpoint.load(cwd / "out/t/checkpoints/step-000010.pt")
    assert [h["step"] for h in saved["history"]] == [5]  # the cut evaluation is not in it
    resume_equals_reference(monkeypatch, capsys, cwd, reference, 10)


def test_a_signal_ends_a_steps_passes_and_stops_at_the_step_before(tmp_path, monkeypatch, capsys, reference):
    cwd = setup_dir(tmp_path)
    kill_on_call(monkeypatch, TrainStep, "accumulate", 7)  # inside step 7's forward/backward
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 130 and err.startswith("interrupted (SIGINT) at step 6; checkpoint saved to ")
    assert checkpoint.load(cwd / "out/t/checkpoints/step-000006.pt")["step"] == 6
    resume_equals_reference(monkeypatch, capsys, cwd, reference, 6)


def test_a_signal_while_the_run_is_built_stops_before_any_step(tmp_path, monkeypatch, capsys):
    from dcablate.training import loop

    cwd = setup_dir(tmp_path)
    kill_on_call(monkeypatch, loop, "build_model", 1, signal.SIGTERM)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 143
    assert err == "interrupted (SIGTERM) while starting, before any step of this attempt; run the same command to " \
                  "start it\n"
    assert not checkpoint.step_files(cwd / "out/t/checkpoints")


def test_the_same_signal_twice_at_once_still_saves(tmp_path, monkeypatch, capsys, reference):
    """`timeout` sends its signal to the process and again to its process group: the copy must not cut the
    checkpoint the first one asked for."""
    cwd = setup_dir(tmp_path)
    original = MQARTask.train_batches

    def batches(self, batch_size, seed, start=0):
        for i, item in enumerate(original(self, batch_size, seed, start), start + 1):
            if i == 7:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            yield item
    monkeypatch.setattr(MQARTask, "train_batches", batches)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 130 and err.startswith("interrupted (SIGINT) at step 7; checkpoint saved to ")
    resume_equals_reference(monkeypatch, capsys, cwd, reference, 7)


def test_signals_caught_counts_a_quick_repeat_once_and_a_later_one_acts_at_once():
    with signals_caught() as caught:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert caught == [signal.SIGINT]
        with pytest.raises(Interrupted):
            with caught.interruptible(pending=True):
                pass  # a stop is pending: the phase is skipped
        with caught.interruptible():
            pass  # an ordinary phase runs
        caught.last -= REPEAT_S  # a second later: the user means it
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_handed_to_a_thread_ends_its_evaluation_between_batches():
    """A run in a thread of a packed worker gets its signals through `deliver`, which cannot raise in it: its
    evaluation (`by_turns`) stops at the next batch. An interruptible block without `pending` is not cut by a
    signal caught before it began, only by a later one; outside any block nothing is raised."""
    import threading

    from dcablate.training.packing import by_turns
    from dcablate.training.signals import deliver, interrupt_point

    outcome: dict = {}
    ready, go = threading.Event(), threading.Event()

    def run():
        seen = []
        with signals_caught() as caught:  # in a thread: registered for `deliver`
            try:
                with caught.interruptible(pending=True):
                    for batch in by_turns(range(6)):
                        seen.append(batch)
                        if batch == 1:
                            ready.set()
                            go.wait(10)
            except Interrupted as e:
                outcome["interrupted"] = e.signum
            interrupt_point()  # outside a block: nothing
            with caught.interruptible():  # the signal came before this block: it goes on
                interrupt_point()
                caught.append(signal.SIGINT)
                try:
                    interrupt_point()
                except Interrupted as e:
                    outcome["later"] = e.signum
        outcome["seen"] = seen

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(10)
    assert deliver(signal.SIGTERM) >= 1
    go.set()
    thread.join(10)
    assert outcome == {"interrupted": signal.SIGTERM, "later": signal.SIGINT, "seen": [0, 1]}
