"""What a run shows while it trains: a progress bar on a terminal, plain periodic lines anywhere else.

tqdm's bar redraws itself in place with carriage returns several times a second; written to a file or a
pipe (a batch job's log, `| tee`, a sweep worker's `worker.log`) that is thousands of updates on one
line. So the bar is drawn only when stdout and stderr are both terminals. Otherwise the run prints plain
lines to stdout, as torchtitan and nanoGPT do: one about every twentieth of the run (and at least once a
minute while steps are logged), each with the step, loss, learning rate, tokens/s, elapsed time, ETA and,
on a GPU, the peak memory; and one per evaluation. Both carry the run's label: its run directory's name,
which for a sweep is the point (`conv.kind=static,d_model=64`).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LINES_PER_RUN = 20
LINE_INTERVAL_S = 60.0  # a line at least this often while steps are logged, however long the run


def on_terminal() -> bool:
    """Whether a redrawn bar is readable here: stdout and stderr (where tqdm draws) are both terminals."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def clock(seconds: float) -> str:
    """`0:03:07`, `12:00:00`: hours, minutes, seconds."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def si(value: float) -> str:
    """`950`, `12.3k`, `4.56M`: a rate at a glance."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


class Progress:
    """The progress of one run from step `initial` to `total` (the planned steps; early stopping may end it
    sooner). `enabled=False` shows nothing; `terminal` (default: `on_terminal()`) picks the bar over lines."""

    def __init__(self, label: str, total: int, initial: int = 0, enabled: bool = True, terminal: bool | None = None):
        self.label, self.total, self.initial = label, total, initial
        terminal = on_terminal() if terminal is None else terminal
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, leave=False, desc=label) \
            if enabled and terminal else None
        self.lines = enabled and not terminal
        self.every = max(1, total // LINES_PER_RUN)
        self.started = time.time()
        self.last_step, self.last_line = initial, None  # the step and time of the last line printed
        self.postfix: dict[str, str] = {}

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, record: dict, memory_gib: float | None = None) -> None:
        """A logged step: `record` holds loss, lr and (unless every step since the last record compiled)
        tokens_per_s; `memory_gib` the GPU's peak, if any."""
        if self.bar is not None:
            self.postfix["loss"] = f"{record['loss']:.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        if not self.lines:
            return
        now = time.time()
        due = (self.last_line is None or step >= self.total or step // self.every > self.last_step // self.every
               or now - self.last_line >= LINE_INTERVAL_S)
        if not due:
            return
        self.last_step, self.last_line = step, now
        elapsed = now - self.started
        rate = (step - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - step) / rate) if rate > 0 else "?"
        mem = f"  mem {memory_gib:.2f} GiB" if memory_gib is not None else ""
        # no rate when every step since the last record compiled (a resumed run's first record)
        rate_text = f"{si(record['tokens_per_s'])} tok/s  " if "tokens_per_s" in record else ""
        self.echo(f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%)  loss {record['loss']:.4f}  "
                  f"lr {record['lr']:.2e}  {rate_text}elapsed {clock(elapsed)}  eta {eta}{mem}")

    def eval(self, step: int, metrics: dict[str, float], headline: str) -> None:
        """An evaluation: its headline metric first, then the others."""
        if self.bar is not None:
            self.postfix[headline] = f"{metrics[headline]:.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        if self.lines:
            rest = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != headline)
            self.echo(f"eval at step {step}: {headline} {metrics[headline]:.4f}  {rest}".rstrip())

    def echo(self, line: str) -> None:
        print(f"{self.label}  {line}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
