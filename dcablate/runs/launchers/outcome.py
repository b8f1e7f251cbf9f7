"""What every launcher reports, in the same words: a line per run as it ends (with the sweep's progress), then
the results table, the failures and the exit status (`report`)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from dcablate.runs.directories import read_summary, run_directory_line, same_command
from dcablate.runs.launchers.point import LOG_NAME, OUT_OF_MEMORY
from dcablate.runs.preflight import resumes_from
from dcablate.runs.progress import SweepProgress
from dcablate.runs.tables import format_table, headline_result
from dcablate.training.checkpoint import newest_intact_step

STOPPED_CODES = (130, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)


@dataclass
class Job:
    """A run to train: its point in the expanded sweep, where it goes and the recipe digest it must have."""

    index: int  # the point's position in the expanded sweep
    name: str
    run_dir: Path
    digest: str
    task_kind: str = "mqar"  # picks the headline metric of its result line
    label: str = ""  # where it is training ("cpu", "gpu 1", "ray 0.25 GPU", "slurm 1234_0")
    started: float = 0.0
    title: str = ""  # the name its lines show: the point's, or a single run's folder name (its `name` is "")
    steps: float = 0  # its planned work (steps, or FLOPs on CPU: `preflight.longest_first`; 0: not counted), for the ETA
    resumes_from: int = 0  # the step checkpoint it goes on from (0: a new run, or one that starts over)
    oom_retries: int = 0  # times it ran out of device memory beside other runs and went back in line
    # a point of another expansion than the command's (a second stage's, `sweep.best_lr_seeds`, trained beside the
    # grid's runs): (its index there, the overrides beyond the command's that make it); `index` stays its place in
    # the command's plan, which the launchers key their bookkeeping by
    origin: tuple[int, tuple[str, ...]] | None = None

    def __post_init__(self):
        self.title = self.title or self.name or self.run_dir.name

    def request(self) -> dict:
        """What the process that trains it needs (`point.run_job`); plain data, so any launcher can send it."""
        out = {"index": self.index, "name": self.name, "digest": self.digest, "run_dir": str(self.run_dir)}
        if self.origin is not None:
            out["point"] = {"index": self.origin[0], "overrides": list(self.origin[1])}
        return out


def jobs_for(plan, to_train: list[int], steps: dict | None = None, origins: dict | None = None) -> list[Job]:
    """The `Job`s of the planned points (name, recipe, run_dir, state) still to train, in the order of `to_train`;
    `steps`: each point's planned steps, where counted; `origins`: plan index -> `Job.origin` of the points that
    come from another expansion than the command's."""
    return [Job(i, plan[i][0], plan[i][2], plan[i][1].digest(), plan[i][1].task.kind,
                title=plan[i][0] or plan[i][2].name, steps=(steps or {}).get(i, 0),
                resumes_from=resumes_from(plan[i]), origin=(origins or {}).get(i)) for i in to_train]


@dataclass
class Outcome:
    summaries: dict = field(default_factory=dict)  # index -> summary of runs finished now
    failed: list = field(default_factory=list)  # (job, exit code, last log line)
    interrupted: list = field(default_factory=list)  # jobs stopped by a stop signal
    not_started: int = 0
    signal: int | None = None  # the first SIGINT/SIGTERM the command caught

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


def plural(n: int, noun: str) -> str:
    """`1 run`, `2 runs`."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def exit_code(code: int) -> str:
    """`1`, or `-9 (SIGKILL)` for a worker killed by a signal (e.g. by the kernel's out-of-memory killer)."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


class Reporter:
    """The line for each run as it ends, `total` runs in all (up to `at_once` side by side), into `out`; `stopping()`
    tells whether the command is stopping on a signal (a run that then ends with a signal's status was stopped, not
    failed)."""

    def __init__(self, total: int, out: Outcome, stopping, at_once: int = 1, steps: int | None = None,
                 running=lambda: None):
        self.progress, self.out, self.stopping = SweepProgress(total, at_once, steps), out, stopping
        self.total, self.running = total, running

    def status(self) -> str:
        """The sweep's progress line, the runs in flight (`running()`: their seconds so far and planned steps)
        credited with their part of the work."""
        return self.progress.status(self.running())

    def finish(self, job: Job, code: int, why: str | None = None) -> None:
        """`job` ended with exit status `code`; `why` replaces the log's last line in a failure's report."""
        code = 1 if code == OUT_OF_MEMORY else code  # a worker's word for it; to the user a failure as any other
        elapsed, prefix = time.time() - job.started, f"[{self.progress.done + 1}/{self.total}] {job.title}"
        if code == 0 and (job.run_dir / "summary.json").is_file():
            self.progress.finished(elapsed, steps=job.steps)
            summary = read_summary(job.run_dir)
            self.out.summaries[job.index] = summary
            # the headline's time is the run's, over every command that trained it; this is this command's
            here = f"{elapsed:.1f}s wall" + (f" here, resumed from step {job.resumes_from:,}"
                                               if job.resumes_from else "")
            click.echo(f"{prefix}  {headline_result(summary, job.task_kind)}  ({here}, {job.label})"
                       f"  [{self.status()}]")
        elif self.stopping() and code in STOPPED_CODES:
            self.progress.finished(elapsed, steps=job.steps)
            self.out.interrupted.append(job)
            if code >= 0:
                reason = last_line(job.run_dir / LOG_NAME)
            else:
                saved = newest_intact_step(job.run_dir / "checkpoints")  # the step a resume would take
                reason = f"ended by {exit_code(code)} before it saved a checkpoint; " + (
                    f"it resumes from its previous one (step {saved})" if saved else
                    "it had none yet, so it starts over")
            click.echo(f"{prefix}  stopped ({job.label}): {reason}")
        else:
            self.progress.finished(elapsed, failed=True, steps=job.steps)
            self.out.failed.append((job, exit_code(code), why or last_line(job.run_dir / LOG_NAME)))
            click.echo(f"{prefix}  FAILED with exit code {exit_code(code)} ({job.label}); "
                       f"see {job.run_dir / LOG_NAME}  [{self.status()}]")


def note(job: Job, line: str) -> None:
    """A line at the end of the run's worker.log, written by the command (so that a failure's report, which
    quotes the log's last line, says what happened to a worker that could not say it)."""
    try:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        with open(job.run_dir / LOG_NAME, "a") as log:
            log.write(line + "\n")
    except OSError:
        pass


def announce_finished(plan) -> None:
    for name, _, run_dir, state in plan:
        if state == "finished":
            click.echo(f"{name}: {run_dir} finished earlier, not retrained (--force-new trains it again)")


def result_row(name: str, summary: dict, task_kind: str) -> dict:
    """A run's line in the results table: size, steps, time, its final metrics, the task's headline last."""
    from dcablate.tasks import TASKS

    final, headline = summary["final"], TASKS.get(task_kind).headline
    row = {"run": name, "params": summary["params"]["total"], "steps": summary["steps"],
           "time_s": summary["wall_time_s"]}
    row.update({k: v for k, v in final.items() if k not in ("step", "loss", headline)})
    row[headline] = final.get(headline)
    return row


def results_table(rows: list[dict]) -> str:
    """The results table of finished runs (`result_row`s), with what its numbers are."""
    return (format_table(rows) + "\n(each run's final evaluation; `dcablate report` scores each run by its best "
            "evaluation, summary.json `best`)")


def report(plan, to_train: list[int], out: Outcome, root: Path) -> None:
    """The results table of every finished run, the failures, and a `Stop` (exit status) for a sweep that was
    stopped or had failures."""
    from dcablate.training.runtime import Stop

    rows = []
    for i, (name, r, run_dir, state) in enumerate(plan):
        summary = read_summary(run_dir) if state == "finished" else out.summaries.get(i)
        if summary is not None:
            rows.append(result_row(name or run_dir.name, summary, r.task.kind))
    click.echo("")
    if rows:
        click.echo(results_table(rows))
    if root.exists():  # a sweep stopped before any run wrote its folder has none to name
        click.echo(run_directory_line(root))
    for job, code, line in out.failed:
        click.echo(f"failed: {job.title} (exit code {code}): {line}   [{job.run_dir / LOG_NAME}]", err=True)
    if out.signal_name:
        raise Stop(f"interrupted ({out.signal_name}): {plural(len(out.interrupted), 'run')} stopped (checkpointed "
                   f"if training had begun), {out.not_started} not started, {len(out.failed)} failed; run "
                   f"{same_command()} to resume", 128 + out.signal)
    if out.failed:
        raise Stop(f"error: {len(out.failed)} of {len(to_train)} runs failed (listed above); the others "
                   f"finished; fix the cause and run {same_command()} to train the failed ones", 1)
