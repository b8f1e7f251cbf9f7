"""Sweeps: a recipe's `[sweep]` table expanded into its grid points, each a resolved recipe.

`[sweep] model.d_model = [64, 128]` gives one axis; `zip = [["train.lr", "model.d_model"]]` makes keys
advance together as one axis. The grid is the product of the axes, the last varying fastest; a point's
name (`d_model=64,lr=0.001`) is its run directory below the sweep's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from dcablate.config.fields import describe_value
from dcablate.config.toml_out import toml_value
from dcablate.errors import RecipeError, did_you_mean

ZIP_KEY = "zip"  # [sweep] zip = [["train.lr", "model.d_model"]]: those keys advance together
BEST_LR_SEEDS_KEY = "best_lr_seeds"  # [sweep] best_lr_seeds = [1, 2]: more seeds at each cell's best lr
RESERVED = (ZIP_KEY, BEST_LR_SEEDS_KEY)  # [sweep] keys that are options of the sweep, not axes
MAX_POINTS = 10_000  # a grid larger than this is refused before its points are built (an axis left unzipped)
# a point's name is its folder's: file systems take 255 bytes; a longer name keeps its start and a digest of all
NAME_MAX_BYTES = 200
NAME_DIGEST_CHARS = 12
LR_KEY, SEED_KEY = "train.lr", "run.seed"


def sweep_axes(sweep: dict) -> list[tuple[list[str], list[tuple]]]:
    """The grid's axes in key order as (keys, value tuples): one key alone, or a zip group (at the
    position of its first key) whose keys take their i-th values together."""
    group_of = {k: g for g in sweep.get(ZIP_KEY, []) for k in g}
    axes, seen = [], set()
    for key in sweep:
        if key in RESERVED or key in seen:
            continue
        keys = group_of.get(key, [key])
        seen.update(keys)
        axes.append((keys, list(zip(*(sweep[k] for k in keys)))))
    return axes


def short_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    return rest if dot and head in ("model", "train", "run", "task", "eval") else key


def value_name(value) -> str:
    """A swept value as a point's name shows it: a list's items joined by `+`, a table inside a list as its
    `key-value` pairs joined by `_` (`seq_len-64_num_kv_pairs-4` for `{seq_len = 64, num_kv_pairs = 4}`)."""
    if isinstance(value, list):
        return "+".join(value_name(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}-{value_name(v)}" for k, v in value.items()) or "defaults"
    return str(value).lower() if isinstance(value, bool) else str(value)


def name_parts(key: str, value) -> list[str]:
    """The `key=value` parts of a point's name for one swept key. A swept table (a whole section, e.g.
    `task.recall = [{}, {seq_len = 512}]`) names the keys it sets (`recall.seq_len=512`) and an empty one
    nothing, so names stay readable and free of braces, quotes and spaces; a path's `/` becomes `_`, so that a
    point is one folder (`lm.data=data_a` for `data/a`)."""
    if isinstance(value, dict):
        return [part for sub, v in value.items() for part in name_parts(f"{key}.{sub}", v)]
    return [f"{short_key(key)}={value_name(value).replace('/', '_')}"]


def check_zip_form(sweep: dict, where: str) -> list:
    """`sweep.zip`'s groups, once it is a list of lists (anything else a RecipeError set at `where`): what must hold
    before a grid point can be made at all."""
    groups = sweep.get(ZIP_KEY, [])
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise RecipeError(where, f"sweep.{ZIP_KEY}", f'must be a list of lists of swept keys, e.g. [["train.lr", '
                          f'"model.d_model"]], got {describe_value(groups)}')
    return groups


def check_zip(sweep: dict, where: str, sources: dict[str, str] | None = None) -> None:
    """`sweep.zip`: a list of groups, each a list of >= 2 swept keys with lists of equal length. `where` set the
    zip; `sources` maps a swept key to where its list was set: a list of another length set elsewhere than the zip
    (by --set, or in a recipe that extends the zip's) is blamed there, under its own key."""
    groups = check_zip_form(sweep, where)
    path = f"sweep.{ZIP_KEY}"
    seen: set = set()
    for g in groups:
        if len(g) < 2 or not all(isinstance(k, str) for k in g):
            raise RecipeError(where, path, f"each group must list at least two keys (strings), got {g!r}")
        for k in g:
            if k not in sweep or k in RESERVED:
                axes = [key for key in sweep if key not in RESERVED]
                raise RecipeError(where, path, f"'{k}' is not a key of [sweep]{did_you_mean(k, axes)}")
            if k in seen:
                raise RecipeError(where, path, f"'{k}' is in two zip groups")
            seen.add(k)
        lengths = {k: len(sweep[k]) for k in g}
        if len(set(lengths.values())) == 1:
            continue
        counts = {n: list(lengths.values()).count(n) for n in lengths.values()}
        most = [n for n, c in counts.items() if c == max(counts.values())]
        odd = [k for k in g if lengths[k] != most[0]] if len(most) == 1 else g
        blamed = zip_blame(odd, sources or {}, where)
        if blamed is None and len(odd) < len(g):
            _blame_the_kept_list(g, odd, lengths, sources or {}, where)
        if blamed is None:
            raise RecipeError(where, path, "zipped keys need lists of equal length, got " +
                              ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        by_length: dict[int, list[str]] = {}
        for k in g:
            if k != blamed:
                by_length.setdefault(lengths[k], []).append(k)
        partners = "; ".join(f"{', '.join(ks)} ({n} value{'s' if n != 1 else ''}{' each' if len(ks) > 1 else ''})"
                             for n, ks in by_length.items())
        n = lengths[blamed]
        raise RecipeError(sources[blamed], f"sweep.{blamed}", f"{n} value{'s' if n != 1 else ''}, but sweep.zip "
                          f"({where}) zips it with {partners}; zipped keys need lists of equal length")


def _blame_the_kept_list(group: list[str], odd: list[str], lengths: dict[str, int], sources: dict[str, str],
                         zip_source: str) -> None:
    """A recipe (or --set) that re-lists most of a zip group but leaves one list as the zip's file had it: blamed
    where the other lists were set, under the key it left out, with the length it needs there."""
    elsewhere = [k for k in group if sources.get(k, zip_source) != zip_source]
    if not elsewhere:
        return
    source = next((sources[k] for k in elsewhere if sources[k] == "--set"), sources[elsewhere[0]])
    here = [k for k in elsewhere if sources[k] == source]
    n = lengths[here[0]]
    kept = odd[0]
    raise RecipeError(source, f"sweep.{kept}", f"keeps the {lengths[kept]} value{'s' if lengths[kept] != 1 else ''} "
                      f"of {zip_source}, but sweep.zip zips it with {', '.join(here)} ({n} value{'s' if n != 1 else ''}"
                      f"{' each' if len(here) > 1 else ''}, set here); set sweep.{kept} here too, with {n} "
                      f"value{'s' if n != 1 else ''}")


def zip_blame(keys: list[str], sources: dict[str, str], zip_source: str) -> str | None:
    """The key among `keys` (of one zip group) whose list was set elsewhere than the zip, by --set first; None when
    the zip's source set them all (the group is then blamed as a whole, at `sweep.zip`)."""
    elsewhere = [k for k in keys if sources.get(k, zip_source) != zip_source]
    return next((k for k in elsewhere if sources[k] == "--set"), elsewhere[0] if elsewhere else None)


def check_best_lr_seeds(sweep: dict, base_seed: int, where: str) -> None:
    """`sweep.best_lr_seeds`: distinct seeds (integers >= 0), none of them a seed of the grid itself, in a sweep
    of `train.lr` (whose best value per cell they are trained at)."""
    if BEST_LR_SEEDS_KEY not in sweep:
        return
    seeds = sweep[BEST_LR_SEEDS_KEY]
    path = f"sweep.{BEST_LR_SEEDS_KEY}"
    wanted = "must be a non-empty list of seeds (integers >= 0), e.g. [1, 2]"
    if not isinstance(seeds, list) or not seeds:
        raise RecipeError(where, path, f"{wanted}, got {describe_value(seeds)}")
    for i, x in enumerate(seeds):
        if not (isinstance(x, int) and not isinstance(x, bool) and x >= 0):
            raise RecipeError(where, path, f"{wanted}; element {i} is {_describe_seed(x)}")
    if len(set(seeds)) != len(seeds):
        raise RecipeError(where, path, f"lists a seed twice: {seeds}")
    if LR_KEY not in sweep:
        raise RecipeError(where, path, f"trains more seeds at each cell's best learning rate, so the sweep must "
                          f"sweep {LR_KEY}; it sweeps {', '.join(k for k in sweep if k not in RESERVED) or 'nothing'}")
    grid_seeds = sweep.get(SEED_KEY, [base_seed])
    clash = sorted(set(seeds) & set(grid_seeds) if isinstance(grid_seeds, list) else ())
    if clash:
        raise RecipeError(where, path, f"seed {clash[0]} is already a seed of the grid ({SEED_KEY} = "
                          f"{grid_seeds if SEED_KEY in sweep else base_seed}); list only new seeds")


def _describe_seed(x) -> str:
    """What a bad element of `sweep.best_lr_seeds` is, with the fix when it is a number in quotes."""
    if isinstance(x, str):
        fix = f" (write {x.strip()}, without quotes)" if x.strip().isdigit() else ""
        return f"the string {toml_value(x)}{fix}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x}, below 0"
    return describe_value(x)


def clashing_keys(sweep: dict) -> list[str]:
    """The swept keys of every axis with two values that name a point alike (`[64, 64]`, `[1, "1"]`): the
    axes to blame when two grid points get one name."""
    keys_out = []
    for keys, values in sweep_axes(sweep):
        names = [tuple(part for k, v in zip(keys, vals) for part in name_parts(k, v)) for vals in values]
        if len(set(names)) < len(names):
            keys_out += keys
    return keys_out


def grid_size(sweep: dict) -> int:
    """How many points the grid has (the product of its axes' lengths), without making them."""
    size = 1
    for _, values in sweep_axes(sweep):
        size *= len(values)
    return size


def grid(sweep: dict) -> list[tuple[str, list[tuple[str, object]]]]:
    """Every grid point as (name, [(key, value), ...]): the product of the axes, the last varying fastest."""
    return list(iter_grid(sweep))


def iter_grid(sweep: dict) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """`grid`'s points one at a time, each made when asked for (a check that needs a few of a large grid)."""
    axes = sweep_axes(sweep)
    for combo in itertools.product(*(values for _, values in axes)):
        yield point_named([(k, v) for (keys, _), values in zip(axes, combo) for k, v in zip(keys, values)])


def point_named(pairs: list[tuple[str, object]]) -> tuple[str, list[tuple[str, object]]]:
    """(name, pairs) of a grid point; a point whose every swept value is an empty table has no parts: it is the
    sweep's defaults. A name over `NAME_MAX_BYTES` (UTF-8) keeps as much of its start as fits with `~` and the
    first `NAME_DIGEST_CHARS` hex digits of the whole name's sha256: a folder name every file system takes, as
    distinct as the names were, and the same on every machine."""
    name = ",".join(part for k, v in pairs for part in name_parts(k, v)) or "defaults"
    if len(name.encode()) > NAME_MAX_BYTES:
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:NAME_DIGEST_CHARS]
        start = name.encode()[:NAME_MAX_BYTES - NAME_DIGEST_CHARS - 1].decode(errors="ignore")
        name = f"{start}~{digest}"
    return name, pairs


def diagonal(sweep: dict) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """Grid points in which every axis moves at once (point i takes value i mod n of each axis of n values):
    every value of every axis in as many points as the longest axis has values, where the grid's own order
    would try an axis's later values only after all combinations of the axes after it."""
    axes = sweep_axes(sweep)
    for i in range(max((len(values) for _, values in axes), default=0)):
        yield point_named([(k, v) for keys, values in axes for k, v in zip(keys, values[i % len(values)])])
