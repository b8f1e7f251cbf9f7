"""Sweeps: a recipe's `[sweep]` table expanded into its grid points, each a resolved recipe.

`[sweep] model.d_model = [64, 128]` gives one axis; `zip = [["train.lr", "model.d_model"]]` makes keys
advance together as one axis. The grid is the product of the axes, the last varying fastest; a point's
name (`d_model=64,lr=0.001`) is its run directory below the sweep's.
"""

from __future__ import annotations

import itertools

from dcablate.config.fields import describe_value
from dcablate.errors import RecipeError, did_you_mean

ZIP_KEY = "zip"  # [sweep] zip = [["train.lr", "model.d_model"]]: those keys advance together


def sweep_axes(sweep: dict) -> list[tuple[list[str], list[tuple]]]:
    """The grid's axes in key order as (keys, value tuples): one key alone, or a zip group (at the
    position of its first key) whose keys take their i-th values together."""
    group_of = {k: g for g in sweep.get(ZIP_KEY, []) for k in g}
    axes, seen = [], set()
    for key in sweep:
        if key == ZIP_KEY or key in seen:
            continue
        keys = group_of.get(key, [key])
        seen.update(keys)
        axes.append((keys, list(zip(*(sweep[k] for k in keys)))))
    return axes


def short_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    return rest if dot and head in ("model", "train", "run", "task", "eval") else key


def value_name(value) -> str:
    if isinstance(value, list):
        return "+".join(value_name(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def name_parts(key: str, value) -> list[str]:
    """The `key=value` parts of a point's name for one swept key. A swept table (a whole section, e.g.
    `task.recall = [{}, {seq_len = 512}]`) names the keys it sets (`recall.seq_len=512`) and an empty one
    nothing, so names stay readable and free of braces, quotes and spaces."""
    if isinstance(value, dict):
        return [part for sub, v in value.items() for part in name_parts(f"{key}.{sub}", v)]
    return [f"{short_key(key)}={value_name(value)}"]


def check_zip(sweep: dict, where: str) -> None:
    """`sweep.zip`: a list of groups, each a list of >= 2 swept keys with lists of equal length."""
    groups = sweep.get(ZIP_KEY, [])
    path = f"sweep.{ZIP_KEY}"
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise RecipeError(where, path, f'must be a list of lists of swept keys, e.g. [["train.lr", '
                          f'"model.d_model"]], got {describe_value(groups)}')
    seen: set = set()
    for g in groups:
        if len(g) < 2 or not all(isinstance(k, str) for k in g):
            raise RecipeError(where, path, f"each group must list at least two keys (strings), got {g!r}")
        for k in g:
            if k not in sweep or k == ZIP_KEY:
                raise RecipeError(where, path, f"'{k}' is not a key of [sweep]{did_you_mean(k, list(sweep))}")
            if k in seen:
                raise RecipeError(where, path, f"'{k}' is in two zip groups")
            seen.add(k)
        lengths = {k: len(sweep[k]) for k in g}
        if len(set(lengths.values())) > 1:
            raise RecipeError(where, path, "zipped keys need lists of equal length, got " +
                              ", ".join(f"{k}: {n}" for k, n in lengths.items()))


def grid(sweep: dict) -> list[tuple[str, list[tuple[str, object]]]]:
    """Every grid point as (name, [(key, value), ...]): the product of the axes, the last varying fastest."""
    axes = sweep_axes(sweep)
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = [(k, v) for (keys, _), values in zip(axes, combo) for k, v in zip(keys, values)]
        # a point whose every swept value is an empty table has no parts: it is the sweep's defaults
        points.append((",".join(part for k, v in pairs for part in name_parts(k, v)) or "defaults", pairs))
    return points
