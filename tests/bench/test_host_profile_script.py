"""`benchmarks/host_profile.py` on a hand-made py-spy raw profile: processes nested under their parents, threads,
self time, the innermost dcablate frame, and the GIL's busy share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_profile.py"

RAW = """\
process 10:"python -m dcablate run g";process 11:"python -m dcablate.runs.launchers.local g";thread (12): run-0;_loop (/x/dcablate/training/loop.py:340);__call__ (/x/dcablate/training/step.py:120);copy_ (/x/torch/_tensor.py:10) 30
process 10:"python -m dcablate run g";process 11:"python -m dcablate.runs.launchers.local g";thread (13): run-1;_loop (/x/dcablate/training/loop.py:337);__next__ (/x/dcablate/training/batches.py:80) 15
process 10:"python -m dcablate run g";process 11:"python -m dcablate.runs.launchers.local g";thread (13): run-1;wait (/usr/lib/python3.12/threading.py:355) 5
process 10:"python -m dcablate run g";thread (10): MainThread;main (/x/dcablate/cli.py:50) 10
"""


def load():
    spec = importlib.util.spec_from_file_location("host_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_counts_by_process_thread_and_frame(tmp_path, capsys):
    module = load()
    lines = module.parse(RAW)
    assert [(p.split(":")[0], t, len(f), n) for p, t, f, n in lines] == [
        ("process 11", "thread (12): run-0", 3, 30), ("process 11", "thread (13): run-1", 2, 15),
        ("process 11", "thread (13): run-1", 1, 5), ("process 10", "thread (10): MainThread", 1, 10)]
    (tmp_path / "p.txt").write_text(RAW)
    module.main([str(tmp_path / "p.txt"), "--seconds", "1", "--rate", "100"])
    out = capsys.readouterr().out
    worker = out[:out.index('## process 10:')]
    assert worker.startswith('## process 11:"python -m dcablate.runs.launchers.local g": 50 samples, GIL held 50% of 1 s')
    assert "| thread (12): run-0 | 30 | 60.0% |" in worker and "| thread (13): run-1 | 20 | 40.0% |" in worker
    assert "| copy_ (torch/_tensor.py) | 30 | 60.0% |" in worker  # self time
    assert "| TrainStep" not in worker and "| __call__ (dcablate/training/step.py) | 30 | 60.0% |" in worker
    assert "| __next__ (dcablate/training/batches.py) | 15 | 30.0% |" in worker
    assert "| (outside) | 5 | 10.0% |" in worker  # the threading wait has no dcablate frame
    assert '## process 10:"python -m dcablate run g": 10 samples, GIL held 10% of 1 s' in out
