"""Where a sweep's host time goes: a summary of a py-spy profile of `dcablate run` (its workers included).

    py-spy record --gil --threads --subprocesses -r 250 -f raw -o profile.txt -- dcablate run RECIPE ...
    python benchmarks/host_profile.py profile.txt [--rate 250] [--seconds S] [--top 25]    # .ci/gpu host-profile

Runs packed in one worker (`--runs-per-worker K`) share one Python interpreter: only the thread holding the GIL
runs Python, so when the card waits for the host, what holds the GIL is what to make faster. With `--gil`, py-spy
samples only that thread, so per process the samples over `rate x seconds` are the share of the time the GIL was
held (`--seconds`: how long the profile ran; without it the share is not printed). The tables, per process with
the most samples first:

- by thread: its samples (a worker's run threads each train one run at a time);
- self time: the innermost frame of each sample (`function (file)`): where the interpreter actually was;
- dcablate time: the innermost dcablate frame of each sample (`function (dcablate/...py)`): what our code spent,
  the calls into torch, fla and Python below it included; samples with no dcablate frame count as `(outside)`.

py-spy's raw format is one line per distinct stack: `frame;frame;...;frame COUNT`, outermost first; with
`--subprocesses` the first frames name the process and its parents (`process 1234:"python ..."`, the parent
first), with `--threads` the next names the thread (`thread (1234): run-0`). A frame reads `function (file:line)`, or `function (file)` without lines.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def parse(text: str) -> list[tuple[str, str, list[str], int]]:
    """(process, thread, frames outermost first, samples) per line of a py-spy raw profile; a process or thread
    that the profile does not name reads "-"."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        process = "-"
        while frames and frames[0].startswith("process "):  # a worker's stack comes under its parent's process
            process = frames.pop(0)
        thread = frames.pop(0) if frames and frames[0].startswith("thread ") else "-"
        out.append((process, thread, frames, int(count)))
    return out


def short(frame: str) -> str:
    """`function (file)`, the file cut to its part from a package folder on (`dcablate/...`, `torch/...`)."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for package in ("dcablate/", "torch/", "fla/", "triton/", "threading.py", "python3"):
        at = path.find(package)
        if at >= 0:
            path = path[at:]
            break
    return f"{m['function']} ({path})"


def is_ours(frame: str) -> bool:
    m = _FRAME.match(frame)
    return bool(m) and "dcablate/" in m["file"] and "/benchmarks/" not in m["file"]


def summarize(lines: list[tuple[str, str, list[str], int]], top: int = 25, rate: float = 250.0,
              seconds: float | None = None) -> str:
    """The markdown tables described in the module's doc."""
    by_process: dict[str, list] = defaultdict(list)
    for process, thread, frames, n in lines:
        by_process[process].append((thread, frames, n))
    out = []
    for process, rows in sorted(by_process.items(), key=lambda kv: -sum(n for _, _, n in kv[1])):
        total = sum(n for _, _, n in rows)
        head = f"## {process[:120]}: {total} samples"
        if seconds:
            head += f", GIL held {100 * total / (rate * seconds):.0f}% of {seconds:.0f} s (at {rate:g} Hz)"
        out += [head, ""]
        threads: Counter = Counter()
        own: Counter = Counter()
        ours: Counter = Counter()
        for thread, frames, n in rows:
            threads[thread] += n
            if frames:
                own[short(frames[-1])] += n
            inner = next((f for f in reversed(frames) if is_ours(f)), None)
            ours[short(inner) if inner else "(outside)"] += n
        for title, counts in (("thread", threads), ("self time", own), ("dcablate time", ours)):
            out += [f"| {title} | samples | share |", "| --- | --- | --- |"]
            out += [f"| {name} | {n} | {100 * n / total:.1f}% |" for name, n in counts.most_common(top)]
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy's raw output (-f raw)")
    parser.add_argument("--rate", type=float, default=250.0, help="py-spy's sampling rate (-r), Hz")
    parser.add_argument("--seconds", type=float, default=None, help="how long the profile ran (for the GIL share)")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    print(summarize(parse(args.profile.read_text()), args.top, args.rate, args.seconds))


if __name__ == "__main__":
    main()
