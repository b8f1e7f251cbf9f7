"""Faults in a packed worker (`--runs-per-worker`, threads.py, packing.py) that must not hang it: a run whose job
raises past `run_job`, a thread that leaves the line for the turn, a stop signal while a run waits for its turn."""

import io
import json
import signal
import threading
import time

import pytest

from dcablate.runs.launchers import threads
from dcablate.training import signals as run_signals
from dcablate.training.packing import Turns, one_at_a_time
from tests.training.test_train import tiny


@pytest.fixture
def handlers_kept():
    """`serve` installs the process's SIGINT/SIGTERM handlers: put them back after the test."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in before.items():
        signal.signal(s, h)


def test_a_job_that_raises_past_run_job_still_answers_and_frees_its_thread(monkeypatch, handlers_kept, capsys):
    def run_job(recipe, overrides, request, where, output, signals):
        if request["index"] == 0:
            raise RuntimeError("CUDA error: device-side assert triggered")  # e.g. from releasing memory
        return 0

    monkeypatch.setattr(threads, "run_job", run_job)
    jobs = io.StringIO("".join(json.dumps({"index": i, "where": "cpu"}) + "\n" for i in range(3)))
    results = io.StringIO()

    def hung(signum, frame):
        raise TimeoutError("the worker hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert threads.serve("r.toml", [], jobs, results, 2, "RESULT ") == 0  # signal handlers: the main thread
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    answers = sorted((json.loads(line.removeprefix("RESULT ")) for line in results.getvalue().splitlines()),
                     key=lambda a: a["index"])
    assert answers == [{"index": 0, "code": 1}, {"index": 1, "code": 0}, {"index": 2, "code": 0}]
    assert "device-side assert" in capsys.readouterr().err


def test_a_thread_that_leaves_the_line_does_not_block_those_behind_it():
    turns, got = Turns(), threading.Event()
    real_waker = turns._waker

    class Leaving:  # the waiting thread's condition, whose wait ends in an exception
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    def waker(me):
        return Leaving() if threading.current_thread().name == "leaves" else real_waker(me)

    turns._waker = waker
    turns.acquire()
    leaver = threading.Thread(target=lambda: pytest.raises(KeyboardInterrupt, turns.acquire), name="leaves")
    leaver.start()
    leaver.join(5)
    later = threading.Thread(target=lambda: (turns.acquire(), got.set(), turns.release()), daemon=True)
    later.start()
    time.sleep(0.05)
    turns.release()
    assert got.wait(5) and turns.waiting() == 0


def test_a_thread_woken_for_its_turn_that_leaves_wakes_the_next_in_line():
    """A free turn wakes only the first thread in line; if that thread leaves the line instead of taking the turn
    (an exception as it wakes), it wakes the next one, which would otherwise sleep with the turn free."""
    turns, got = Turns(), threading.Event()
    real_waker = turns._waker

    class LeavingOnWake:  # waits for real, then leaves as it wakes
        def __init__(self, real):
            self.real = real

        def wait(self, timeout=None):
            self.real.wait(timeout)
            raise KeyboardInterrupt

        def notify(self):
            self.real.notify()

    def waker(me):
        real = real_waker(me)
        return LeavingOnWake(real) if threading.current_thread().name == "leaves" else real

    turns._waker = waker
    turns.acquire()
    leaver = threading.Thread(target=lambda: pytest.raises(KeyboardInterrupt, turns.acquire), name="leaves")
    leaver.start()
    while turns.waiting() < 1:
        time.sleep(0.001)
    later = threading.Thread(target=lambda: (turns.acquire(), got.set(), turns.release()), daemon=True)
    later.start()
    while turns.waiting() < 2:
        time.sleep(0.001)
    turns.release()  # wakes the leaver only; it leaves and must wake `later`
    leaver.join(5)
    assert got.wait(5) and turns.waiting() == 0


def test_an_error_while_waiting_to_get_the_turn_back_is_the_error_raised():
    """A wait to take the turn back after handing it on (`handed_back`) that raises leaves the thread without the
    turn; the enclosing `with turns` lets that error go on instead of replacing it with a release error."""
    turns = Turns()
    real_waker = turns._waker

    class Interrupted:
        def wait(self, timeout=None):
            raise KeyboardInterrupt

    def run():
        with turns:
            other = threading.Thread(target=lambda: (turns.acquire(), time.sleep(0.05), turns.release()))
            other.start()
            while turns.waiting() < 1:
                time.sleep(0.001)
            turns._waker = lambda me: Interrupted() if me == threading.get_ident() else real_waker(me)
            with turns.handed_back():
                time.sleep(0.01)  # the other thread takes the turn; this one's wait to get it back raises
        other.join(5)

    with pytest.raises(KeyboardInterrupt):
        run()
    assert not turns.held() and turns.waiting() == 0


def test_a_stop_signal_reaches_a_run_still_waiting_for_its_turn_to_start(tmp_path):
    """A packed run that waits for the turn (another run holds it) is already listening for stop signals: one
    delivered meanwhile stops it at the start, and it trains no step."""
    from dcablate.training.loop import train
    from dcablate.training.runtime import Stop

    recipe, outcome = tiny(tmp_path), {}

    def run():
        try:
            outcome["summary"] = train(recipe, tmp_path / "t", quiet=True)
        except Stop as e:
            outcome["stop"] = e

    with one_at_a_time():  # another run holds the turn
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not run_signals._in_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert run_signals.deliver(signal.SIGTERM) == 1  # the waiting run got it
    thread.join(60)
    assert "summary" not in outcome and outcome["stop"].code == 128 + signal.SIGTERM
