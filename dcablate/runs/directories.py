"""Run directories: whether a recipe's directory is new, to resume or finished, and the library's lines.

A run directory holds `recipe.toml` from its first step and `summary.json` once finished; a different
recipe never trains into an existing one (see docs/design.md, "Run directory and exact resume").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tomllib
from pathlib import Path

import click

from dcablate import config
from dcablate.errors import UserError
from dcablate.training.checkpoint import DEVICE_KEY, describe_changes, keys_added_since, read_changes


def fresh_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it exists: --force-new never touches an old run. For an existing
    numbered copy `NAME-2` of a `NAME` beside it, the next free `NAME-n` (a copy of a copy is the next copy, not
    `NAME-2-2`)."""
    copy_of = re.fullmatch(r"(.+)-(\d+)", path.name)
    if copy_of and path.exists() and path.with_name(copy_of[1]).exists():
        path = path.with_name(copy_of[1])
    return _fresh(path, lambda n: path.with_name(f"{path.name}-{n}"))


def _numbered_file(path: Path):
    return lambda n: path.with_name(f"{path.stem}-{n}{path.suffix}")


def _fresh(path: Path, numbered) -> Path:
    if not path.exists():
        return path
    n = 2
    while numbered(n).exists():
        n += 1
    return numbered(n)


def save_new_file(path: Path, text: str) -> Path:
    """Write `text` to `path`, or to `name-2.json`, `name-3.json`, ... if it exists (a second evaluation never
    replaces the first), creating the folder; the path written. The name is claimed with an exclusive create,
    so two processes saving at once never write into one file. Raises OSError (a read-only or full disk) with
    no partial file left behind."""
    path.parent.mkdir(exist_ok=True)
    numbered, n = _numbered_file(path), 1
    while True:
        target = path if n == 1 else numbered(n)
        try:
            f = open(target, "x")
        except FileExistsError:
            n += 1
            continue
        try:
            with f:
                f.write(text)
        except OSError:
            target.unlink(missing_ok=True)  # ours, and incomplete
            raise
        return target


def why_not_creatable(path: Path) -> str | None:
    """Why the folder `path` could not be made, found without making it: a file in its place or on its way; None
    otherwise (a folder that cannot be written is named by the command that writes it, with the system's word)."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    return None if existing.is_dir() else f"{existing} is a file, not a folder"


@contextlib.contextmanager
def made_here(path: Path, where=lambda: "run.out_dir"):
    """Create the folder `path` (and missing parents) for the block; if the block fails, remove again those of
    them that this call created and that are still empty, so a command that never started a run leaves no
    empty folders behind. A folder that cannot be created is a UserError led by `where()` (where run.out_dir
    was set)."""
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{where()}: cannot create {path}: {e.strerror}") from None
    try:
        yield
    except BaseException:
        for p in created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
        raise


COMMANDS_LOG = "commands.log"  # in a sweep's folder: a line per `dcablate run` of it that passed its checks
NARROWER = "\t(some of the grid's points: points.txt kept)"  # ends the line of a command that planned no new point


POINTS_FILE = "points.txt"  # in a sweep's folder: the grid's points, one per line (`record_command`)


_GOES_ON: list[str] | None = None  # `dcablate run` arguments that go on in a copy --force-new made (`went_to`)


def went_to(copy: Path | None, argv: list[str], recipe: str, sweep: bool) -> None:
    """After `dcablate run ... --force-new` made the fresh copy `copy`: the command's arguments that go on training
    there (`argv` again would make yet another copy). A sweep's: without --force-new, with `--set run.name` naming
    the copy; a single run's: the copy's own directory, which resumes where it is. Resume advice quotes them
    (`same_command`), and a sweep's commands.log records them. `copy` None: no copy (the command's own advice)."""
    global _GOES_ON
    if copy is None:
        _GOES_ON = None
        return
    rest, skip, named = [], False, False
    for i, arg in enumerate(argv):
        if skip or arg == "--force-new":
            skip = False
            continue
        if not sweep and arg == "--set":  # the copy's recipe.toml holds them
            skip = True
            continue
        if not sweep and arg.startswith("--set="):
            continue
        if not sweep and not named and i > 0 and arg == recipe:  # the recipe argument: the copy's directory instead
            named = True
            arg = str(copy)
        rest.append(arg)
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and "--nproc" not in rest:  # a torchrun rank's own arguments lack the count its launch had
        rest += ["--nproc", world]
    _GOES_ON = [*rest, "--set", f"run.name={json.dumps(copy.name)}"] if sweep else rest


def goes_on() -> list[str] | None:
    """The arguments `went_to` gave, None when no copy was made."""
    return _GOES_ON


def same_command() -> str:
    """What resume advice tells to run: "the same command", or after --force-new made a copy the command that goes
    on in it."""
    import shlex

    return "the same command" if _GOES_ON is None else f"`{shlex.join(['dcablate', *_GOES_ON])}`"


def record_command(root: Path, argv: list[str], points: list[str] = (), when: float | None = None,
                   keep_on_subset: bool = True) -> None:
    """Append to `root/commands.log` the time (`when`, default now), the working directory and the `dcablate`
    command line that trained into the sweep folder `root`: its points' recipes hold every resolved key, but not
    the recipe and `--set`s that made the grid. With `points` (the grid's point names), `root/points.txt` holds
    them, so that a report can tell the points of an interrupted sweep that never started; a command that planned
    only points the file lists already (a narrower rerun) leaves it as it is, unless `keep_on_subset` is False (a
    command that adds more points to the file after, whose grid alone is no narrower rerun). Best effort: a
    folder that cannot take it changes nothing else."""
    import shlex
    import time

    from dcablate.registry import PLUGINS_ENV, plugin_names

    plugins = [f"{PLUGINS_ENV}={','.join(plugin_names())}"] if plugin_names() else []  # replayable as written
    # a narrower rerun (only points the folder lists already) keeps the list: the grid's other points are still to
    # train, and a report must go on counting them (and name the command that plans them, not this one)
    narrower = keep_on_subset and bool(points) and set(points) < set(planned_points(root))
    line = (f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(when))}\t{Path.cwd()}\t"
            f"{shlex.join([*plugins, 'dcablate', *argv])}{NARROWER if narrower else ''}\n")
    try:
        with open(root / COMMANDS_LOG, "a", encoding="utf-8") as f:
            f.write(line)
        if points and not narrower:
            tmp = root / f"{POINTS_FILE}.tmp"
            tmp.write_text("".join(f"{name}\n" for name in points), encoding="utf-8")
            tmp.replace(root / POINTS_FILE)
    except OSError:
        pass


def add_points(root: Path, points: list[str]) -> None:
    """Add `points` to `root/points.txt` after those there (a sweep's second stage, `sweep.best_lr_seeds`, whose
    points the grid's command planned too). Best effort, as `record_command`."""
    try:
        listing = root / POINTS_FILE
        known = listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []
        names = list(dict.fromkeys([n for n in known if n] + list(points)))
        tmp = root / f"{POINTS_FILE}.tmp"
        tmp.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        tmp.replace(listing)
    except OSError:
        pass


def planned_points(folder: Path) -> list[str]:
    """The points of a sweep folder's grid, in grid order (its `points.txt`: those of the last command that planned
    any point the file did not list); [] where it has none."""
    try:
        return [n for n in (folder / POINTS_FILE).read_text(encoding="utf-8").splitlines() if n]
    except OSError:
        return []


def points_not_started(root: Path) -> dict[Path, list[str]]:
    """Sweep folder -> the points of its grid (`points.txt`) that hold no run yet (no recipe.toml),
    for every sweep folder at or below `root`."""
    out = {}
    for listing in sorted(root.rglob(POINTS_FILE)):
        names = planned_points(listing.parent)
        missing = [n for n in names if not (listing.parent / n / "recipe.toml").is_file()]
        if missing:
            out[listing.parent] = missing
    return out


def run_directory_line(root: Path) -> str:
    """The last line after a run or sweep: where its runs are, and the TensorBoard command when they logged there
    (`log.tensorboard`, a `tb/` folder in the run or below)."""
    logged = (root / "tb").is_dir() or any(root.glob("*/tb"))
    return f"\nrun directory: {root}" + (f"   (tensorboard --logdir {root})" if logged else "")


PLUGINS_COMMENT = "# trained with "  # recipe.toml's first line when plugins were loaded: "# trained with NAME=a,b"


def plugins_line() -> str:
    """The comment a run's recipe.toml starts with when plugin modules are loaded, naming them, so that a run that
    has no summary.json yet (stopped, failed) still says what reading it needs; '' without plugins."""
    from dcablate.registry import PLUGINS_ENV, plugin_names

    names = plugin_names()
    return f"{PLUGINS_COMMENT}{PLUGINS_ENV}={','.join(names)}\n" if names else ""


def trained_with(run_dir: Path) -> str:
    """'DCABLATE_PLUGINS=a,b' as the run's summary.json records it (or, before it has one, its recipe.toml's first
    line), when some of them are not loaded now; else ''."""
    from dcablate.registry import PLUGINS_ENV, plugin_names

    try:
        plugins = json.loads((run_dir / "summary.json").read_text())["versions"]["plugins"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            with open(run_dir / "recipe.toml", encoding="utf-8") as f:
                first = f.readline()
        except OSError:
            return ""
        prefix = f"{PLUGINS_COMMENT}{PLUGINS_ENV}="
        plugins = first.strip()[len(prefix):].split(",") if first.startswith(prefix) else []
    return f"{PLUGINS_ENV}={','.join(plugins)}" if plugins and not set(plugins) <= set(plugin_names()) else ""


def last_command(root: Path) -> str | None:
    """`COMMAND` (in `CWD`) of the newest line of `root/commands.log` that planned the grid of its `points.txt` (a
    narrower rerun's line, which ends in `NARROWER`, is passed over), or None. For a sweep folder moved since
    (unpacked elsewhere, `dcablate pack`), CWD is where the command trains into it now (`command_folder`)."""
    try:
        lines = (root / COMMANDS_LOG).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        parts = line.split("\t")
        if len(parts) == 3:
            return f"`{parts[2]}` (in {command_folder(root, parts[1])})"
    return None


def command_folder(root: Path, recorded: str) -> str:
    """The folder a sweep's command must run in to train into `root`: `recorded` (where it ran) while the runs'
    relative `run.out_dir`/`run.name` (read from a point's recipe.toml) lead from there to `root`; else `root`
    less that path, when it ends so (the folder was moved); else `recorded`."""
    try:
        recipe = next(root.glob("*/recipe.toml"))
        run = tomllib.loads(recipe.read_text(encoding="utf-8")).get("run", {})
        tail = Path(run["out_dir"]) / run["name"]
    except (StopIteration, OSError, KeyError, TypeError, ValueError):
        return recorded
    here = root.resolve()
    if tail.is_absolute() or (Path(recorded) / tail).resolve() == here:
        return recorded
    if here.parts[-len(tail.parts):] != tail.parts:
        return recorded
    return str(Path(*here.parts[:-len(tail.parts)]))


RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json")  # a folder with recipe.toml and one of these is a run


def run_dir_named(ref: str) -> Path | None:
    """The run directory that `dcablate run REF` names, to be resumed where it is: REF is a run directory (a
    folder holding its resolved `recipe.toml` and what training wrote beside it) or that directory's
    `recipe.toml`; None for any other recipe. A sweep point's recipe names the sweep's folder in `run.out_dir`
    and `run.name`, not the point's, so it is run in its own folder rather than where those keys point."""
    path = Path(ref)
    folder = path if path.is_dir() else path.parent if path.name == "recipe.toml" and path.is_file() else None
    if folder is None or not (folder / "recipe.toml").is_file():
        return None
    return folder if any((folder / name).exists() for name in RUN_FILES) else None


SCHEDULE_KEYS = ("train.steps:", "train.tokens:", "train.tokens_per_param:", "train.warmup_steps:")


def _grows(change: str) -> bool:
    """Whether a `key: old -> new` change of a length (steps, a token budget) asks for more than before."""
    try:
        old, new = (float(v) for v in change.split(": ", 1)[1].split(" -> "))
    except ValueError:
        return False
    return new > old


def run_identity(r) -> str:
    """What a recipe's run is, as a string: what it reads (`config.effective`, as one sweep's repeated points are
    found) less the keys a resume may change (`checkpoint.RESUME_FREE`: logging, checkpoints, where it is)."""
    from dcablate.config.loading import effective, flatten
    from dcablate.training.checkpoint import RESUME_FREE

    flat = flatten(effective(r))
    return json.dumps({k: v for k, v in flat.items() if not k.startswith(RESUME_FREE)}, sort_keys=True, default=repr)


def same_run_folders(sweep_root: Path) -> dict[str, Path]:
    """The runs in a sweep folder's point folders by `run_identity`: a point that a command names otherwise
    (fewer swept keys, so a shorter name) is the run one of them holds. A folder whose recipe.toml does not load
    is left out."""
    found = {}
    folders = sorted(p for p in sweep_root.iterdir() if (p / "recipe.toml").is_file()) if sweep_root.is_dir() else []
    for folder in folders:
        try:
            found.setdefault(run_identity(config.load(str(folder / "recipe.toml"))), folder)
        except UserError:
            continue
    return found


class TwinFolders:
    """Where a sweep's points' runs are held under other names (`same_run_folders`, read once, when first asked)."""

    def __init__(self, sweep_root: Path):
        self.root, self.found = sweep_root, None

    def of(self, name: str, r) -> Path | None:
        """The folder holding point `name`'s run `r` under another name; None when its own folder exists or no
        folder holds it."""
        if (self.root / name).exists():
            return None
        if self.found is None:
            self.found = same_run_folders(self.root)
        return self.found.get(run_identity(r))


def run_state(run_dir: Path, r, sweep_root: Path | None = None, dry_run: bool = False) -> str:
    """`new`, `resume` or `finished` for training `r` into `run_dir`; UserError when that would mix two runs. Its
    notes are said once (rank 0 under torchrun), in a dry run as what would happen."""
    if sweep_root is not None and (sweep_root / "recipe.toml").is_file():
        raise UserError(f"{sweep_root}: holds a single run, not this sweep; use --force-new for a fresh directory")
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a directory; pick another run.name or run.out_dir")
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.is_file():
        leftovers = {p.name for p in run_dir.iterdir() if not p.name.endswith(".tmp")} - {".lock", "checkpoints",
                                                                                              "worker.log"}
        if not leftovers and not any((run_dir / "checkpoints").glob("step-*.pt")):
            return "new"  # a run killed before it wrote anything
        if any((d / "recipe.toml").is_file() for d in run_dir.iterdir() if d.is_dir()):
            raise UserError(f"{run_dir}: holds the runs of a sweep, not a single run; to resume or extend that "
                            f"sweep run its recipe again (`dcablate run {run_dir}/POINT` resumes one point), or "
                            f"set another run.name or use --force-new for a fresh directory")
        raise UserError(f"{run_dir}: exists but is not a run directory (no recipe.toml); use --force-new for a "
                        f"fresh directory")
    old = config.load(str(recipe_file))
    changes = read_changes(old, r)
    if (run_dir / "summary.json").is_file():  # where a finished run trained does not change what it is
        changes = [c for c in changes if not c.startswith(f"{DEVICE_KEY}:")]
    if changes and stopped_before_training(run_dir):
        # an attempt that ended before its first step (a data file too small for the recipe, say) trained nothing:
        # the fixed recipe starts the run over there, as the error's advice says, rather than in a copy
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"{run_dir}: its last attempt stopped before its first step; "
                       f"{'it would start' if dry_run else 'starting it'} over with this recipe "
                       f"({describe_changes(changes)})", err=True)
        return "new"
    if changes:
        # a longer run is another run: the learning-rate schedule (warm-up, decay) is laid out over the planned steps
        schedule = all(c.startswith(SCHEDULE_KEYS) for c in changes)
        lengths = [c for c in changes if not c.startswith("train.warmup_steps:")]
        longer = schedule and bool(lengths) and all(_grows(c) for c in lengths)
        copy = _copy_with(run_dir, r, sweep_root)
        # an LM run from before early stopping's default followed the task (0.99 then read as a bpb target)
        was_default = changes == ["eval.early_stop: 0.99 -> 0.0"] and r.task.kind == "lm"
        raise UserError(f"{run_dir}: recipe changed since this run started ({describe_changes(changes)}); "
                        + ("a run is not trained on past its planned steps, since its learning-rate schedule is "
                           "laid out over them; " if longer else
                           "a run's learning-rate schedule is laid out over its planned steps and warm-up, so it is "
                           "not trained on under another; " if schedule else "")
                        + ("LM runs now leave early stopping off unless the recipe sets it: --set "
                           "eval.early_stop=0.99 goes on as the run began, or " if was_default else "")
                        + (f"{copy[0]} holds this recipe already (an earlier --force-new): add --set run.name="
                           f"'{copy[1]}' to go on there, or " if copy else "")
                        + "use --force-new to train it in a fresh directory")
    if (run_dir / "summary.json").is_file():
        return "finished"
    added = keys_added_since(tomllib.loads(recipe_file.read_text()), r.to_dict())  # parsed fine just above
    if added and os.environ.get("RANK", "0") == "0":  # loading the old recipe filled them with today's defaults:
        # say so rather than resume silently
        click.echo(f"warning: {recipe_file} predates recipe keys now set to their defaults: "
                   f"{describe_changes(added)}; {'it would resume' if dry_run else 'resuming'} with these values",
                   err=True)
    return "resume"


def stopped_before_training(run_dir: Path) -> bool:
    """Whether the run in `run_dir` ended its last attempt on an error before its first step and has trained
    nothing: `failed.json` at step 0, no checkpoint, no summary."""
    from dcablate.training import failure

    failed = failure.read(run_dir)
    return (failed is not None and failed.get("step") == 0 and not (run_dir / "summary.json").exists()
            and not any((run_dir / "checkpoints").glob("*.pt")))


def _copy_with(run_dir: Path, r, sweep_root: Path | None) -> tuple[Path, str] | None:
    """A numbered copy (`NAME-2`, `NAME-3`, ... beside the run's or the sweep's folder, as --force-new makes them)
    whose run directory holds recipe `r` unchanged: (that run directory, the run.name that trains there)."""
    top = sweep_root if sweep_root is not None else run_dir
    below = run_dir.relative_to(sweep_root) if sweep_root is not None else Path()
    for other in sorted(top.parent.glob(f"{top.name}-*")):
        if not other.name.removeprefix(f"{top.name}-").isdigit():
            continue
        recipe_file = other / below / "recipe.toml"
        try:
            if recipe_file.is_file() and not read_changes(config.load(str(recipe_file)), r):
                return other / below, other.name
        except UserError:  # a copy whose recipe no longer loads is no match
            continue
    return None


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); move it away to finish the run again") from None


def echo_library_logs() -> None:
    """Print the library's lines (logger "dcablate": notes such as "resuming ..." on stdout, warnings on
    stderr) as they come; once per process, however often the CLI's `main` or a sweep worker calls it."""

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(self.format(record), err=record.levelno >= logging.WARNING)

    library = logging.getLogger("dcablate")
    if not any(h.get_name() == "dcablate-cli" for h in library.handlers):
        echo = Echo()
        echo.set_name("dcablate-cli")
        library.addHandler(echo)
    library.setLevel(logging.INFO)
