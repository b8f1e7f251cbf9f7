"""Checks before a sweep starts: a mistake that would fail every run it touches is found when `dcablate run` (or
`--dry-run`) starts, before a worker starts or a file is written, and ends the command with one line naming the
key, where it was set and, where it touches only some runs, the sweep point. Only the runs about to train are
checked: a finished run needs neither its data nor its budget again.

- `check_budgets`: an LM token budget gives at least the warmup's steps;
- `check_inputs`: what each task reads from outside the recipe (`Task.inputs`, `Task.check_input`: the LM
  task's text and tokenizer file), each distinct key and value once per sweep;
- `check_generated_data` (`--dry-run`): each distinct setting of a task that makes its data (`Task.check_data`:
  the suite's disjoint test sets) can make it;
- `check_sizes` (a real run only: it needs the devices): every model fits this machine.

`plan` is `train_stage`'s list of `(point name, recipe, run directory, state)`, `to_train` the indices of its
runs still to train.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from dcablate import config
from dcablate.errors import UserError
from dcablate.tasks import Task, task_class, task_options


def check_plan(recipe: str, overrides: list[str], plan, to_train: list[int]) -> dict:
    """The checks that need no device: the recipe's own numbers (token budgets), then the files outside it that the
    runs read. Returns the models' costs it counted (`recipe_costs`' cache), for the notes that count them again."""
    _, origins, path = config.load_raw(recipe, overrides)
    swept = tuple(config.load(recipe, overrides).sweep)
    cache: dict = {}
    check_budgets(plan, to_train, lambda key: set_where(key, origins, str(path), swept), cache)
    check_inputs(plan, to_train, origins, str(path), swept)
    check_out_dirs(plan, to_train, origins, str(path), swept)
    return cache


def check_out_dirs(plan, to_train: list[int], origins: dict, recipe_file: str, swept: tuple[str, ...] = ()) -> None:
    """Every run about to train has a `run.out_dir` that can be made (no file in its way), and no LM run writes
    into its own text folder (its metrics.jsonl would be read as text by the runs after it, and by its own
    evaluation); checked before training, not when a recipe loads, so that runs made that way before still read."""
    from dcablate.runs.directories import why_not_creatable
    from dcablate.tasks.lm.spec import runs_inside_text

    where = lambda key: set_where(key, origins, recipe_file, swept)  # noqa: E731
    for out_dir in dict.fromkeys(plan[i][1].run.out_dir for i in to_train):
        why = why_not_creatable(Path(out_dir))
        if why:  # what the real command finds when it makes the sweep's folder, found by a dry run too
            raise UserError(f"{where('run.out_dir')}: cannot create {out_dir}: {why}")
    for i in to_train:
        r = plan[i][1]
        if r.task.kind == "lm" and runs_inside_text(r.task.lm.data, r.run.out_dir):
            read = "its .txt/.jsonl/.parquet files are all read as text, the runs' own metrics.jsonl included"
            if _source_of(where, "task.lm.data") == "--set" != _source_of(where, "run.out_dir"):  # the user's edit
                raise UserError(f"{where('task.lm.data')}: {r.task.lm.data} holds the runs' folder run.out_dir "
                                f"({r.run.out_dir}), and {read}; give a folder of text alone")
            raise UserError(f"{where('run.out_dir')}: {r.run.out_dir} lies inside the text folder task.lm.data "
                            f"({r.task.lm.data}), whose {read.removeprefix('its ')}; write the runs elsewhere")


def set_where(key: str, origins: dict, recipe_file: str, swept: tuple[str, ...] = ()) -> str:
    """`SOURCE: KEY` for an error line: the file or `--set` that set `key` (or the closest table holding it); for
    a key a sweep sets (itself, or a table above it among the `swept` keys: `"task.lm" = [{...}, ...]`) the one
    that set that `[sweep]` list, as `SOURCE: sweep.SWEPT_KEY`; for a table whose keys came from several places,
    each of them (`FILE, --set, sweep.task.recall.seq_len (--set): task.recall`)."""
    path = key
    while path:
        if path in swept and f"sweep.{path}" in origins:
            return f"{origins['sweep.' + path]}: sweep.{path}"
        path = path.rpartition(".")[0]
    if f"sweep.{key}" in origins:
        return f"{origins['sweep.' + key]}: sweep.{key}"
    # a table (`task.recall`) whose keys came from several places names them all, the sweep's axes by name
    inner = [origins[k] for k in origins if isinstance(k, str) and k.startswith(f"{key}.")]
    inner += [f"sweep.{k} ({origins['sweep.' + k]})" for k in swept if k.startswith(f"{key}.") and f"sweep.{k}" in origins]
    places = list(dict.fromkeys(([origins[key]] if key in origins else []) + inner))
    if len(places) > 1:
        return f"{', '.join(places)}: {key}"
    path = key
    while path:
        if path in origins:
            return f"{origins[path]}: {key}"
        path = path.rpartition(".")[0]
    return f"{recipe_file}: {key}"


# the recipe's sections whose keys an error found at training time may lead with (`sweep` is never one)
LOCATED_SECTIONS = ("run", "model", "task", "train", "eval", "log", "checkpoint")


def located(error: UserError, recipe: str, overrides: list[str]) -> UserError:
    """`error` with where the recipe set its key in front, when its line starts with a bare recipe key and names no
    place (`task.lm.tokenizer_file: PATH: not a tokenizer.json`, from building a task outside `check_inputs`;
    `train.batch_size: 512 is more than the 113 training windows ...`, found once the text is tokenized), and
    after it, where the other recipe keys it names were set when that is elsewhere (`(task.lm.seq_len: --set)`);
    else `error` itself."""
    key, sep, rest = str(error).partition(": ")
    if not sep or " " in key or "." not in key or key.split(".", 1)[0] not in LOCATED_SECTIONS:
        return error
    _, origins, path = config.load_raw(recipe, overrides)
    resolved = config.load(recipe, overrides)
    swept, keys = tuple(resolved.sweep), config.flatten(resolved.to_dict())
    where = lambda k: set_where(k, origins, str(path), swept)  # noqa: E731
    # other keys the line names, set elsewhere than the one it leads with: the one the user changed may be among
    # them (a --set task.lm.seq_len that leaves too few windows for the file's train.batch_size)
    named = dict.fromkeys(re.findall(rf"\b(?:{'|'.join(LOCATED_SECTIONS)})\.[a-z_][a-z0-9_.]*[a-z0-9_]", rest))
    others = [f"{k}: {_source_of(where, k)}" for k in named
              if k != key and k in keys and _source_of(where, k) != _source_of(where, key)]
    return UserError(f"{where(key)}: {rest}" + (f" ({'; '.join(others)})" if others else ""))


def key_where(key: str, recipe: str, overrides: list[str]) -> str:
    """`SOURCE: KEY`: where the recipe (its file, `extends`, a `--set`, a sweep axis) set `key`."""
    _, origins, path = config.load_raw(recipe, overrides)
    return set_where(key, origins, str(path), tuple(config.load(recipe, overrides).sweep))


def device_checked(recipe: str, overrides: list[str], points) -> list:
    """`check_runtime` of every point's recipe (`points`: (name, recipe) pairs): the device each trains on. A
    device or backend this machine rules out is one line led by where the key was set (`--set: run.device =
    'cuda' but no CUDA device is visible; ...`)."""
    from dcablate.training.runtime import check_runtime

    try:
        return [check_runtime(r) for _, r in points]
    except UserError as e:
        key = str(e).split(" ", 1)[0]
        if key not in ("run.device", "model.backend"):
            raise
        _, origins, path = config.load_raw(recipe, overrides)
        swept = tuple(config.load(recipe, overrides).sweep)
        where = set_where(key, origins, str(path), swept)  # `SOURCE: KEY`, or `SOURCE: sweep.KEY` for a swept key
        source, _, named = where.rpartition(": ")
        raise UserError(f"{source}: {e}" if named == key else f"{where}: {e}") from None


def points_named(names: list[str], runs: int) -> str:
    """`sweep point NAME: ` (`... (and N more): `) for an error touching only the points `names` of `runs` runs to
    train; "" when it touches all of them (or the recipe has no sweep)."""
    if len(names) == runs or not names[0]:
        return ""
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"sweep point {names[0]}{more}: "


def check_inputs(plan, to_train: list[int], origins: dict, recipe_file: str, swept: tuple[str, ...] = ()) -> None:
    """Every file or folder the runs about to train read can be read (`Task.check_input`), each distinct
    (task, key, value) checked once however many points share it; a UserError otherwise."""
    users: dict[tuple[str, str, str], list[str]] = {}  # (task kind, key, value) -> the points reading it
    for i in to_train:
        name, r = plan[i][0], plan[i][1]
        for key, value in task_class(r.task.kind).inputs(task_options(r.task)).items():
            users.setdefault((r.task.kind, key, value), []).append(name)
    for (kind, key, value), names in users.items():
        try:
            task_class(kind).check_input(key, value, set_where(key, origins, recipe_file, swept))
        except UserError as e:
            raise UserError(f"{points_named(names, len(to_train))}{e}") from None


def check_generated_data(recipe: str, overrides: list[str], plan, to_train: list[int]) -> None:
    """`Task.check_data` once per distinct task setting of the runs about to train (`--dry-run`: the data each run
    makes in its data phase, made here and dropped); a UserError naming the points and where the setting was set."""
    from dcablate.tasks import build_task

    users: dict[str, tuple[object, list[str]]] = {}  # the task section as written -> (its recipe, the points)
    for i in to_train:
        name, r = plan[i][0], plan[i][1]
        key = repr((r.task.kind, getattr(r.task, r.task.kind, None)))
        users.setdefault(key, (r, []))[1].append(name)
    for r, names in users.values():
        if task_class(r.task.kind).check_data is Task.check_data:
            continue  # nothing to make: building the task could read (and cache) its inputs, as the LM's text
        try:
            build_task(r.task, train=True).check_data()
        except UserError as e:
            raise UserError(f"{points_named(names, len(to_train))}{located(e, recipe, overrides)}") from None


def check_budgets(plan, to_train: list[int], where=None, cache: dict | None = None) -> None:
    """Every run about to train with a token budget (`train.tokens`, `train.tokens_per_param`) gets at least
    its warmup's steps: the steps are counted as the run counts them (its non-embedding parameters, from the model
    built on the meta device, once per distinct model however many seeds or learning rates share it), and a
    UserError names the point otherwise, and (`where(key) -> "SOURCE: KEY"`) where the budget was set."""
    from dcablate.models.describe import recipe_costs
    from dcablate.training.optim import planned_steps

    cache = {} if cache is None else cache
    for i in to_train:
        name, r = plan[i][0], plan[i][1]
        t = r.train
        if not (t.tokens or t.tokens_per_param):
            continue
        try:
            c, _ = recipe_costs(r, cache)
        except UserError:  # a tokenizer file that cannot be read: `check_inputs` names it and where it was set
            continue
        try:
            planned_steps(t, t.batch_size * train_length(r), c.params["non_embedding"])
        except UserError as e:
            key = "train.tokens" if t.tokens else "train.tokens_per_param"
            text = str(e)
            if where is not None and text.startswith(f"{key}: "):
                text = f"{where(key)}: {text.removeprefix(f'{key}: ')}"
                warmup, budget = _source_of(where, "train.warmup_steps"), _source_of(where, key)
                if warmup != budget:  # the warm-up it falls short of was set elsewhere: say where
                    text = text.replace(f"train.warmup_steps {t.warmup_steps}",
                                        f"train.warmup_steps {t.warmup_steps} ({warmup})")
            raise UserError(f"sweep point {name}: {text}" if name else text) from None


def _source_of(where, key: str) -> str:
    """The place (file, `--set`, sweep) `where(key)` names, without the key after it."""
    return where(key).removesuffix(f": {key}")


def _budget(r, cache: dict) -> tuple[int, int] | None:
    """(steps, tokens per step) of a run with a token budget, counted as `check_budgets` counts them; None for a
    run whose recipe gives its steps."""
    from dcablate.models.describe import recipe_costs
    from dcablate.training.optim import planned_steps

    t = r.train
    if not (t.tokens or t.tokens_per_param):
        return None
    try:
        c, _ = recipe_costs(r, cache)
    except UserError:
        return None
    per_step = t.batch_size * train_length(r)
    return planned_steps(t, per_step, c.params["non_embedding"]), per_step


def train_length(r) -> int:
    """The length of run `r`'s training sequences, as its task will train on them (`Task.train_length`)."""
    return task_class(r.task.kind).train_length(task_options(r.task))


def steps_of(r, cache: dict) -> int:
    """Run `r`'s planned optimizer steps: its token budget's (`_budget`), else `train.steps` (early stops aside)."""
    budget = _budget(r, cache)
    return budget[0] if budget is not None else r.train.steps


def plan_totals(plan, to_train: list[int]) -> tuple[int, float | None]:
    """(planned optimizer steps, training FLOPs) of the points `to_train` of `plan`: each run's steps left (a
    resumed run's since its newest checkpoint; early stops aside) and 3x the forward FLOPs of those steps
    (`dcablate info`'s count: blocks and LM head), None where a model's FLOPs cannot be counted. What `--dry-run`
    says a sweep will cost, so that a grid sized for a GPU is seen as such before it starts on a CPU."""
    cache: dict = {}
    steps, flops = 0, 0.0
    for i in to_train:
        r = plan[i][1]
        left = max(1, steps_of(r, cache) - resumes_from(plan[i]))
        steps += left
        per_step = step_flops(r, cache) if flops is not None else None
        flops = None if per_step is None else flops + 3 * left * per_step
    return steps, flops


def step_flops(r, cache: dict) -> float | None:
    """The forward FLOPs of one optimizer step of run `r` (`dcablate info`'s count per token, blocks and LM head,
    times the tokens of a batch); None where its model's FLOPs cannot be counted."""
    from dcablate.models.describe import recipe_costs

    try:
        c, _ = recipe_costs(r, cache)
    except UserError:
        return None
    return (c.flops_per_token + c.head_flops_per_token) * r.train.batch_size * c.seq_len


def cost_text(plan, to_train: list[int]) -> str:
    """`583,200 steps, 5.9e16 FLOPs`: `plan_totals` as the sweep's lines say it."""
    steps, flops = plan_totals(plan, to_train)
    return f"{steps:,} steps" + (f", {flops:.2g} FLOPs".replace("e+", "e") if flops else "")


def resumes_from(point) -> int:
    """The step a plan's point `(name, recipe, run_dir, state)` resumes from: its newest intact step checkpoint's
    (`checkpoint.newest_intact_step`); 0 for a new run, or one whose folder has no usable checkpoint (it starts
    over)."""
    from dcablate.training.checkpoint import newest_intact_step

    return newest_intact_step(point[2] / "checkpoints") if point[3] == "resume" else 0


def resumed_first(plan, to_train: list[int]) -> list[int]:
    """`to_train` with the runs that resume from a checkpoint first, each part in sweep order: the order of a sweep
    trained in this process (one run at a time, so the longest need not go first; `longest_first` for workers)."""
    return sorted(to_train, key=lambda i: not resumes_from(plan[i]))


def longest_first(plan, to_train: list[int], by_flops: bool = False) -> tuple[list[int], dict[int, float]]:
    """`to_train` in the order a sweep hands its runs to workers: runs that resume from a checkpoint first (a sweep
    stopped by a time limit, preemption or Ctrl-C finishes what it started before it starts anything new, so a
    sweep cut again leaves as few runs half-done as it can), then the most planned steps left first (a resumed
    run's since its newest checkpoint), ties in sweep order; and the work of each point, the unit of the sweep's ETA. A
    ladder's runs differ up to 15x in steps; started last, the longest would run alone on a card the others have
    left, so a sweep on K workers would take up to twice its steps over K. Steps, not FLOPs: the small models that
    share a card take about the same time per step whatever their width (a d_model 512 MQAR step, 64x the FLOPs of
    a d_model 64 one, took 1.8x its time, eight runs at once). On CPU (`by_flops`) a step takes time in proportion
    to its FLOPs, so there the work the ETA counts is steps x FLOPs per step (`dcablate info`'s count)."""
    cache: dict = {}
    steps = {i: steps_of(plan[i][1], cache) for i in to_train}
    started = set()  # runs with a step checkpoint to resume from (a folder without one starts over)
    for i in to_train:  # a run resumed from its newest checkpoint has its steps since then left
        saved = resumes_from(plan[i])
        if saved:
            steps[i] = max(1, steps[i] - saved)
            started.add(i)
    work: dict[int, float] = dict(steps)
    for i in to_train if by_flops else ():
        per_step = step_flops(plan[i][1], cache)
        if per_step is not None:  # else counted by its steps alone
            work[i] = steps[i] * per_step
    return sorted(to_train, key=lambda i: (i not in started, -steps[i])), work


WARMUP_SHARE = 0.1  # a warmup this share of the shortest run's steps, with the longest 3x as long: said in a note


def warmup_note(recipes, cache: dict) -> str | None:
    """For `--dry-run` of a ladder with token budgets: a fixed `train.warmup_steps` that is a large share of the
    shortest run and a small one of the longest, so the schedule's shape changes along the ladder; None otherwise."""
    steps = {s[0]: r.train.warmup_steps for r in recipes if (s := _budget(r, cache))}
    if len(steps) < 2 or not any(steps.values()):
        return None
    short, long = min(steps), max(steps)
    if steps[short] < WARMUP_SHARE * short or long < 3 * short:
        return None
    return (f"train.warmup_steps {steps[short]} is {steps[short] / short:.0%} of the shortest run's {short:,} steps and "
            f"{steps[long] / long:.0%} of the longest's {long:,}: the learning-rate schedule's shape changes along the "
            f"ladder, and with it the losses a scaling fit reads")


def ladder_note(recipes, cache: dict) -> str | None:
    """For a plan of LM runs on token budgets at several sizes (a compute ladder): that `dcablate report` will have
    no compute fit for a mixer (and channel mixer) whose conv-free runs, the fit's baseline, come at fewer than the
    sizes the fit needs; else None."""
    from dcablate.runs.scaling import MIN_BASELINE_SIZES

    sizes: dict[str, set] = defaultdict(set)  # a family's sizes; the report fits one ladder per mixer and ffn
    base: dict[str, set] = defaultdict(set)
    for r in recipes:
        if _budget(r, cache):
            m = r.model
            family = "+".join(m.mixers) + ("" if m.ffn == "none" else f" + {m.ffn}")
            size = (m.d_model, m.n_layers, m.n_heads)
            sizes[family].add(size)
            if m.conv.kind == "none":
                base[family].add(size)
    short = [f"{family} at {len(base[family])} size{'' if len(base[family]) == 1 else 's'}" for family in sorted(sizes)
             if len(sizes[family]) >= 2 and len(base[family]) < MIN_BASELINE_SIZES]  # one size: not a ladder
    if not short:
        return None
    return (f"`dcablate report` fits compute multipliers against the conv-free runs (model.conv.kind = \"none\") "
            f"at {MIN_BASELINE_SIZES} sizes or more, and this sweep has them {', '.join(short)}: it will report "
            f"{'that ladder' if len(short) == 1 else 'those ladders'} without a compute fit")


def budget_steps(r, cache: dict) -> str:
    """For `--dry-run`: an LM run's steps from its token budget (`1,221 steps of 4,096 tokens, train.tokens_per_param
    20 = 5.0M tokens`), counted as `check_budgets` counts them; "" for a run whose recipe gives its steps."""
    budget = _budget(r, cache)
    if budget is None:
        return ""
    t = r.train
    steps, per_step = budget
    key = f"train.tokens {t.tokens:,}" if t.tokens else f"train.tokens_per_param {t.tokens_per_param:g}"
    total = steps * per_step
    amount = f"{total / 1e6:.1f}M" if total >= 1e5 else f"{total:,}"
    return f"{steps:,} steps of {per_step:,} tokens ({key}: {amount} tokens)"


def check_sizes(recipe: str, overrides: list[str], plan, to_train: list[int], devices) -> None:
    """Every model about to train fits this machine (its weights against the free memory; `devices[i]` is point
    i's device); a UserError naming the size keys and where they were set otherwise."""
    from dcablate.models.memory import check_fits

    origins = config.load_raw(recipe, overrides)[1]
    for i in to_train:
        name, r = plan[i][0], plan[i][1]
        vocab = task_class(r.task.kind).shape(task_options(r.task))[1]
        try:
            check_fits(r, vocab, devices[i], origins)
        except UserError as e:
            raise UserError(f"sweep point {name}: {e}" if name else str(e)) from None
