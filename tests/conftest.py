"""Shared pytest hooks."""

import os
import sys


def pytest_runtest_logreport(report):
    """With DCABLATE_INSTAFAIL=1, print a failure's traceback as soon as it happens: GPU runs go through a
    time limit that can kill pytest before its summary."""
    if report.failed and os.environ.get("DCABLATE_INSTAFAIL"):
        sys.stdout.write(f"\n---- {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")
        sys.stdout.flush()


def pytest_sessionstart(session):
    """Python's own SIGINT handler, whatever the shell gave: a job started in the background by a
    non-interactive shell inherits SIGINT ignored, and the tests of stop signals check that a command hands
    back the handler it found (Python's, for anyone who runs dcablate from a terminal)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    _autotune_first()


def _autotune_first():
    """`DCABLATE_TEST_AUTOTUNE=first`: autotuned kernels take their first working candidate
    (tests/autotune_first.py)."""
    from tests import autotune_first

    if not autotune_first.wanted():
        return
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:  # no Triton: nothing autotunes
        return
    autotune_first.install(Autotuner)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _signal_mask_kept():
    """Every test hands back the signal mask it found: a test that leaves SIGINT/SIGTERM blocked (calling a worker's
    `train_point` outside `signals_blocked`) makes every command a later test starts inherit the block and ignore
    the signals it is sent, so the stop tests fail far from the cause. The leak is undone and the test that made it
    fails."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    after = signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert after == before, f"the test left signals {sorted(s.name for s in after - before)} blocked"
