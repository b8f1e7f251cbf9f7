"""What `dcablate info` prints: a recipe's model, or a sweep's distinct models, with their costs.

A recipe without a sweep gets one block: parameters per component, recurrent state and forward FLOPs per
token. A sweep's points are grouped by the model they build (points that differ only in keys such as
`train.lr` or `run.seed` build the same model) and get one table row per distinct model, the swept keys
that tell the models apart in the first columns; `detail` adds the block of each distinct model, with the
points that share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dcablate import config
from dcablate.config.sweep import grid, short_key, value_name
from dcablate.models.costs import Costs, build_model, costs, human
from dcablate.runs.tables import format_table
from dcablate.tasks import task_class, task_options

# model keys that pick kernels for the same weights, so they do not tell two models apart
NOT_MODEL_KEYS = ("backend",)
MAX_NAMED = 4  # keys the header line names as varying within a model; the rest are counted
UNSET = "default"  # shown for a sub-key a point's swept table leaves out (a swept table replaces the section)
NOT_READ = "-"  # shown for a key the model does not read (conv.placement of a model without a conv)


@dataclass
class Point:
    """One sweep point: its name and its swept values as {dotted key: shown value, or None where the point's
    swept table does not set that key}."""
    name: str
    values: dict[str, str | None]


@dataclass
class DistinctModel:
    """The model a group of sweep points builds: the first point's recipe, its costs, its embedding rows
    (the task's vocabulary unless `model.vocab_size` is set) and every point that builds it."""
    recipe: object
    costs: Costs
    vocab: int
    points: list[Point] = field(default_factory=list)

    def values(self, key: str) -> list[str | None]:
        """`key`'s distinct values over this model's points, in grid order."""
        return list(dict.fromkeys(p.values[key] for p in self.points))

    def shown(self, key: str) -> str:
        """`key`'s values over this model's points as one cell: `64`, or `0.0001 / 0.01`."""
        return " / ".join(UNSET if v is None else v for v in self.values(key))


def describe(recipe: str, overrides: list[str] = (), detail: bool = False) -> str:
    """What `dcablate info RECIPE [--set ...] [--detail]` prints, without the final newline: the block of a
    recipe without a sweep (`detail` changes nothing there); for a sweep, a table with a row per distinct
    model and, with `detail`, the block of each distinct model naming its points. Models are built on the
    meta device, once per distinct model and task section."""
    base, points = config.expand(recipe, list(overrides))
    if not base.sweep:
        name, r = points[0]
        c = recipe_costs(r, {})[0]
        return model_block(r, name, c) + unreported_note([c])
    models = group_points(base, points)
    keys, with_vocab = distinguishing_columns(models)
    text = sweep_table(base.run.name, models, len(points), keys, with_vocab, detail)
    if detail:
        derived = {"vocab": with_vocab, "T": len({m.costs.seq_len for m in models}) > 1}
        text += "\n\n" + "\n".join(detail_block(m, keys, derived) for m in models).rstrip("\n")
    return text + unreported_note([m.costs for m in models])


def unreported_note(costs_list: list[Costs]) -> str:
    """A line under the output for mixers that do not count their own recurrence (`Costs.unreported`)."""
    names = list(dict.fromkeys(n for c in costs_list for n in c.unreported))
    if not names:
        return ""
    return (f"\nnote: {', '.join(names)} keep{'s' if len(names) == 1 else ''} TokenMixer's state_size or "
            f"flops_per_token, which count 0: the state floats and FLOPs/token above leave out "
            f"{'its' if len(names) == 1 else 'their'} own recurrence (implement them to count it)")


def recipe_costs(r, cache: dict) -> tuple[Costs, int]:
    """`costs()` of recipe `r`'s model at its task's sequence length, and its embedding rows. `cache` keeps
    them per model and task section, so a sweep builds each model once however many learning rates or seeds
    it tries."""
    key = (repr(r.model), repr(r.task))
    if key not in cache:
        seq_len, vocab = task_class(r.task.kind).shape(task_options(r.task))
        vocab = r.model.vocab_size or vocab
        cache[key] = costs(build_model(r, vocab, device="meta"), seq_len), vocab
    return cache[key]


def model_identity(r, c: Costs) -> tuple:
    """What makes two points the same model: the model section (less the kernel choice) and its costs
    (parameters per component, state and FLOPs at the task's sequence length)."""
    model = {k: v for k, v in dataclasses.asdict(r.model).items() if k not in NOT_MODEL_KEYS}
    return (repr(model), tuple(sorted(c.params.items())), c.state_floats, c.seq_len, c.flops_per_token,
            c.head_flops_per_token)


def swept_values(pairs: list[tuple[str, object]]) -> dict[str, str]:
    """A point's swept (key, value) pairs as {dotted key: shown value}; a swept table (`task.recall =
    [{}, {seq_len = 512}]`) gives a key per sub-key it sets."""
    out: dict[str, str] = {}

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                add(f"{key}.{sub}", v)
        else:
            out[key] = value_name(value)

    for key, value in pairs:
        add(key, value)
    return out


def group_points(base, points: list[tuple[str, object]]) -> list[DistinctModel]:
    """The sweep's points (`config.expand`'s (name, recipe) pairs) grouped by the model they build, in the
    order each model first appears in the grid."""
    pairs_of = dict(grid(base.sweep))
    named = [(name, r, swept_values(pairs_of[name])) for name, r in points]
    keys = list(dict.fromkeys(k for _, _, values in named for k in values))
    cache: dict = {}
    models: dict[tuple, DistinctModel] = {}
    for name, r, values in named:
        c, vocab = recipe_costs(r, cache)
        point = Point(name, {k: values.get(k) for k in keys})
        models.setdefault(model_identity(r, c), DistinctModel(r, c, vocab)).points.append(point)
    return list(models.values())


def distinguishing_columns(models: list[DistinctModel]) -> tuple[list[str], bool]:
    """The swept keys whose columns tell the models apart, and whether a `vocab` column (embedding rows) is
    needed for it; `T` has a column whenever it varies.

    Tried in turn, the first that tells every model apart wins: the model keys with one value per model
    (e.g. `model.d_model`); all keys that every point sets with one value per model (task keys such as
    `task.recall.seq_len`, keys zipped with model keys); the model keys with `vocab`, `T` and the costs
    (a sweep over tasks, whose vocabularies and lengths the models take); failing all, every key whose values
    differ from model to model (a cell then lists the model's values)."""
    keys = list(models[0].points[0].values)
    single = [k for k in keys if all(len(m.values(k)) == 1 for m in models)
              and len({m.values(k)[0] for m in models}) > 1]
    model_keys = [k for k in single if k.startswith("model.")]
    everywhere = [k for k in single if all(m.values(k)[0] is not None for m in models)]

    def apart(columns: list[str], vocab: bool = False, with_costs: bool = False) -> bool:
        rows = {(tuple(m.shown(k) for k in columns), m.costs.seq_len, vocab and m.vocab,
                 with_costs and shown_costs(m.costs)) for m in models}
        return len(rows) == len(models)

    vocab = len({m.vocab for m in models}) > 1
    if apart(model_keys):
        return model_keys, False
    if apart(everywhere):
        return everywhere, False
    if apart(model_keys, vocab, with_costs=True):
        return model_keys, vocab
    differing = [k for k in keys if len({frozenset(m.values(k)) for m in models}) > 1]
    return [k for k in keys if k in single or k in differing], vocab


def shown_costs(c: Costs) -> tuple:
    """The numbers a model's table row shows."""
    return (c.params["total"], c.params["non_embedding"], c.params.get("active"), c.params.get("conv"),
            c.state_floats, c.flops_per_token)


def varying_within(models: list[DistinctModel]) -> list[str]:
    """The swept keys that take several values among the points of one model (e.g. `train.lr`)."""
    return [k for k in models[0].points[0].values if any(len(m.values(k)) > 1 for m in models)]


def sweep_table(run_name: str, models: list[DistinctModel], n_points: int, keys: list[str], with_vocab: bool,
                detail: bool) -> str:
    """The sweep's header line, a row per distinct model (its values of `keys`, its parameters, state, FLOPs
    and points) and the notes under the table."""
    seq_lens = {m.costs.seq_len for m in models}
    state = f"state floats (T={next(iter(seq_lens))})" if len(seq_lens) == 1 else "state floats"
    with_conv = any(m.costs.params.get("conv") for m in models)
    with_active = any("active" in m.costs.params for m in models)
    # a sweep over tasks: which tasks each model serves (their vocabularies and lengths alone do not say)
    with_tasks = "task.kind" in models[0].points[0].values and "task.kind" not in keys
    rows = []
    for m in models:
        c = m.costs
        read = config.effective(m.recipe)
        row = {short_key(k): m.shown(k) if config.reads_key(read, k) else NOT_READ for k in keys}
        if with_tasks:
            row["tasks"] = "/".join(UNSET if v is None else v for v in m.values("task.kind"))
        if with_vocab:
            row["vocab"] = m.vocab
        row["params"] = c.params["total"]
        row["non_embedding"] = c.params["non_embedding"]
        if with_active:  # MoE: what one token touches
            row["active"] = c.params.get("active", c.params["total"])
        if with_conv:
            row["conv"] = c.params.get("conv", 0)
        if len(seq_lens) > 1:
            row["T"] = c.seq_len
        row[state] = c.state_floats
        row["FLOPs/token"] = c.flops_per_token
        row["points"] = len(m.points)
        rows.append(row)
    header = f"{run_name}: {n_points} sweep points, {len(models)} distinct model{'s' if len(models) > 1 else ''}"
    varying = varying_within(models)
    if varying:
        more = f" and {len(varying) - MAX_NAMED} more keys" if len(varying) > MAX_NAMED else ""
        header += f" ({', '.join(varying[:MAX_NAMED])}{more} {'vary' if len(varying) > 1 else 'varies'} " \
                  f"within a model)"
    notes = ["state floats: recurrent state per sequence at T (attention: its KV cache); FLOPs/token: forward FLOPs "
             "per token of the blocks, without the LM head (training ~3x)"]
    if with_active:
        notes.append("active: the parameters one token uses (the routed top-k experts of each MoE layer), embedding "
                     "and LM head included as in params; less the embedding it compares with non_embedding")
    if any(NOT_READ in row.values() for row in rows):
        notes.append(f"{NOT_READ}: a key the model does not read (the sweep sets it, but it changes nothing there)")
    if not detail:
        notes.append("--detail: each model's parameters per component, LM head FLOPs and the points that build it")
    return "\n".join([header, format_table(rows), *notes])


def detail_block(m: DistinctModel, keys: list[str], derived: dict[str, bool]) -> str:
    """One distinct model's block, titled by its values of `keys` (and of `vocab` and `T` where `derived` says
    the table shows them), with the points that build it under the title; ends with an empty line."""
    parts = [f"{short_key(k)}={m.shown(k)}" for k in keys]
    parts += [f"{what}={value}" for what, value in (("vocab", m.vocab), ("T", m.costs.seq_len)) if derived[what]]
    name = ",".join(parts) or m.points[0].name
    title, rest = model_block(m.recipe, name, m.costs).split("\n", 1)
    return f"{title}\n{points_line(m)}\n{rest}"


def points_line(m: DistinctModel) -> str:
    """`1 point: NAME`, or `4 points: train.lr = 0.0001 / 0.00046 / 0.0022 / 0.01` (the keys that vary)."""
    if len(m.points) == 1:
        return f"1 point: {m.points[0].name}"
    varying = [k for k in m.points[0].values if len(m.values(k)) > 1]
    return f"{len(m.points)} points: " + "; ".join(f"{k} = {m.shown(k)}" for k in varying)


def model_block(r, name: str, c: Costs) -> str:
    """The parameters per component, recurrent state and FLOPs of recipe `r`'s model, titled with the run's
    name and `name` (a sweep point's or a distinct model's, if any); ends with an empty line."""
    title = f"{r.run.name}{' / ' + name if name else ''}: {r.model.mixer}, conv={r.model.conv.kind}, " \
            f"d_model={r.model.d_model}, n_layers={r.model.n_layers}"
    return "\n".join([
        title,
        format_table([{"component": k, "parameters": f"{v:,}"} for k, v in c.params.items()]),
        f"recurrent state per sequence at T={c.seq_len}: {human(c.state_floats)} floats "
        f"({human(4 * c.state_floats)}B in fp32, {human(2 * c.state_floats)}B in bf16)",
        f"forward FLOPs per token: {human(c.flops_per_token)} (blocks) + "
        f"{human(c.head_flops_per_token)} (LM head, per scored token); training ~3x",
        *([f"active: the parameters one token uses, counted as total is (embedding and LM head included); "
           f"{c.params['active'] - (c.params['total'] - c.params['non_embedding']):,} without the embedding, to "
           f"compare with non_embedding"] if "active" in c.params else []),
        "",
    ])
