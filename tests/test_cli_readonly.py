"""Run directories that cannot be written (issue 23, item 2): resuming one, or evaluating a finished one, ends
with one line and exit 2, never a traceback; `eval` prints its result before saying it could not save it.

A read-only directory is made with chmod where that binds (not as root), and otherwise simulated by making
the write itself fail with EROFS, as a read-only mount does.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

import dcablate.runs.directories as directories
from dcablate.cli import main
from dcablate.training import checkpoint
from tests.tiny_recipes import run_in, setup_dir, tiny_mqar

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cwd = setup_dir(tmp_path_factory.mktemp("finished"), tiny_mqar(train={"steps": 4}, eval={"every": 4}))
    run_in(cwd)
    return cwd


@pytest.fixture
def work(finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished run's folder, made the working directory."""
    cwd = tmp_path / "work"
    shutil.copytree(finished, cwd)
    monkeypatch.chdir(cwd)
    return cwd


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def read_only(monkeypatch, module, name: str = "open", when=lambda path, mode: True) -> None:
    """Make `module`'s `open` fail as on a read-only mount for writes."""
    def fail(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and when(Path(path), mode):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(module, name, fail, raising=False)


@pytest.fixture
def chmod_read_only():
    """Make folders read-only with chmod (undone afterwards); skips as root, where chmod does not bind."""
    if AS_ROOT:
        pytest.skip("running as root: chmod does not stop writes (the simulated test covers this)")
    made = []

    def lock(*folders: Path):
        for folder in folders:
            made.append((folder, folder.stat().st_mode))
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield lock
    for folder, mode in reversed(made):
        folder.chmod(mode)


def unfinish(work: Path) -> Path:
    run_dir = work / "out" / "t"
    (run_dir / "summary.json").unlink()  # `run` now resumes it
    assert not (run_dir / ".lock").exists()  # a finished run removed it
    return run_dir


def check_resume_refused(work: Path, run_dir: Path, before: dict, capsys) -> None:
    rc = main(["run", "r.toml", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2
    line = one_line(err)
    assert line.startswith(f"error: {Path('out/t')}: cannot write the run directory ("), line
    assert files(run_dir) == before  # untouched: no .lock, no recipe rewritten


def test_resume_on_a_read_only_filesystem(work, monkeypatch, capsys):
    run_dir = unfinish(work)
    before = files(run_dir)
    read_only(monkeypatch, checkpoint)
    check_resume_refused(work, run_dir, before, capsys)


def test_resume_in_a_read_only_directory(work, capsys, chmod_read_only):
    run_dir = unfinish(work)
    before = files(run_dir)
    chmod_read_only(run_dir)
    check_resume_refused(work, run_dir, before, capsys)


def check_eval_prints_then_refuses(run_dir: Path, before: dict, capsys) -> None:
    rc = main(["eval", "--task", "mqar", "--run", str(run_dir)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "overall" in out and "written to" not in out, out  # the result, computed and shown
    line = one_line(err)
    assert line.startswith(f"error: {run_dir / 'eval'}: cannot save this evaluation ("), line
    assert line.endswith("the result above was not written")
    assert files(run_dir) == before


def test_eval_on_a_read_only_filesystem(work, monkeypatch, capsys):
    run_dir = work / "out" / "t"
    (run_dir / "eval").mkdir()
    before = files(run_dir)
    read_only(monkeypatch, directories)
    check_eval_prints_then_refuses(run_dir, before, capsys)
    assert not any((run_dir / "eval").iterdir())  # no empty or partial file


def test_eval_in_a_read_only_directory(work, capsys, chmod_read_only):
    run_dir = work / "out" / "t"
    before = files(run_dir)
    chmod_read_only(run_dir)
    check_eval_prints_then_refuses(run_dir, before, capsys)


def test_eval_that_fails_midway_leaves_no_partial_file(work, monkeypatch, capsys):
    """A disk that fills while the record is written: the partial file is removed, the result printed."""
    run_dir = work / "out" / "t"

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(directories, "open", lambda path, mode="r": Full(open(path, mode)), raising=False)
    before = files(run_dir)
    check_eval_prints_then_refuses(run_dir, before, capsys)


def test_evaluations_are_numbered_never_replaced(work, capsys):
    run_dir = work / "out" / "t"
    for _ in range(2):
        assert main(["eval", "--task", "mqar", "--run", str(run_dir)]) == 0
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["mqar-2.json", "mqar.json"]
    assert "written to" in capsys.readouterr().out


def test_on_a_real_read_only_mount(work, tmp_path):
    """Both commands on a read-only bind mount (a private mount namespace: needs root and `unshare`; skipped
    elsewhere), through the installed `dcablate` in a subprocess."""
    import subprocess
    import sys

    if not AS_ROOT or shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs root and unshare/mount for a private read-only bind mount")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not allowed here: {probe.stderr.decode().strip()}")
    run_dir = unfinish(work)
    before = files(run_dir)
    cli = f"{sys.executable} -m dcablate"
    script = (f"mount --bind out out && mount -o remount,ro,bind out && "
              f"{cli} run r.toml --quiet; echo rc=$?; {cli} eval --task mqar --run out/t; echo rc=$?")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stdout.count("rc=2") == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert errors == [f"error: out/t: cannot write the run directory (Read-only file system); it must be writable "
                      f"to train or resume",
                      "error: out/t/eval: cannot save this evaluation (Read-only file system); the result above was "
                      "not written"], p.stderr
    assert "overall" in p.stdout  # eval printed its result first
    assert files(run_dir) == before


def test_help_as_a_command_gives_the_help(capsys):
    """`dcablate help` and `dcablate help COMMAND` print what --help prints, exit 0 (as git and pip take them)."""
    from dcablate.cli import main

    for argv, flag in ((["help"], ["--help"]), (["help", "run"], ["run", "--help"])):
        assert main(flag) == 0
        want = capsys.readouterr().out
        assert main(argv) == 0
        assert capsys.readouterr().out == want


def test_help_goes_down_the_command_path(capsys):
    """`dcablate help bench train` is `dcablate bench train --help`; `help help` is help's own help; `help` is listed."""
    from dcablate.cli import main

    assert main(["bench", "train", "--help"]) == 0
    want = capsys.readouterr().out
    assert main(["help", "bench", "train"]) == 0
    assert capsys.readouterr().out == want
    assert main(["help", "help"]) == 0
    assert capsys.readouterr().out.startswith("Usage: dcablate help [OPTIONS] [COMMAND]...")
    assert main(["help"]) == 0
    assert "\n  help " in capsys.readouterr().out


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "Abort"])
def test_ctrl_c_outside_a_runs_own_handler_is_one_line_and_130(monkeypatch, capsys, raised):
    """Ctrl-C while a command starts (before a run's handler saves a checkpoint; click turns it into Abort) said
    only "aborted"; it says it was interrupted, as a run's own line does, with the status of a SIGINT."""
    import click

    from dcablate import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt if raised == "KeyboardInterrupt" else click.exceptions.Abort()

    monkeypatch.setattr(cli.cli, "main", interrupted)
    assert cli.main(["recipes"]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT)\n"
