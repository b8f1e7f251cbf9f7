"""Loading a recipe: TOML files, `extends`, `--set` overrides, typing against the schema, checks.

Loading resolves `extends` (deep merge, paths relative to the extending file, cycles rejected), applies
`--set key=value` overrides (parsed in `overrides.py`: values as TOML, a bare word read as a string),
checks every key against the schema (`schema.py`) and reports the first problem as one line naming the
file (or `--set`) and the dotted key path. Checks that span keys come from the core here and from each registered
component's spec. A field whose metadata has a `resolve` function gets its checked value through it
(the LM task makes its paths absolute, so a run's saved recipe works from any directory).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import itertools
import json
import logging
import math
import re
import tomllib
import typing
from importlib import resources
from pathlib import Path

from dcablate.config import schema
from dcablate.config.schema import conv_streams
from dcablate.config.sweep import (BEST_LR_SEEDS_KEY, MAX_POINTS, RESERVED, ZIP_KEY, check_best_lr_seeds, check_zip,
                                   check_zip_form, clashing_keys, diagonal, grid, grid_size, iter_grid, sweep_axes)
from dcablate.config.fields import describe_value
from dcablate.config.toml_out import toml_value
from dcablate.config.overrides import parse_override, quote_hint, typed_key
from dcablate.errors import RecipeError, UserError, did_you_mean
from dcablate.registry import Names, plugin_names, plugins_registering
from dcablate.models.channel import CHANNELS
from dcablate.models.mixers import MIXERS
from dcablate.tasks import TASKS


RECIPE_SUFFIX = ".toml"


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (path relative to the recipes folder, no suffix)."""
    try:
        root = Path(str(resources.files("dcablate.recipes")))
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH, not installed
        root = Path(__file__).resolve().parents[2] / "recipes"
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob(f"*{RECIPE_SUFFIX}"))}


def find_recipe(ref: str) -> Path:
    """A recipe by path, or by the name of a shipped recipe."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = ref.removesuffix(RECIPE_SUFFIX)
    if name in shipped:
        return shipped[name]
    if path.is_dir() and (path / "recipe.toml").is_file():  # `dcablate run DIR` resumes it (cli.run)
        return path / "recipe.toml"
    shown = ref.rstrip("/") or ref
    if path.is_dir():
        from dcablate.runs.directories import COMMANDS_LOG, POINTS_FILE, last_command

        if (path / COMMANDS_LOG).is_file() or (path / POINTS_FILE).is_file():
            last = last_command(path)
            raise UserError(f"{ref}: the run directory of a sweep, not a recipe; give the sweep's recipe"
                            f"{f' (last run as {last})' if last else ''} or one point's folder ({shown}/POINT), or "
                            f"see its results with `dcablate report {shown}`")
        runs = sum(1 for depth in range(1, 4) for _ in path.glob("*/" * depth + "recipe.toml"))  # not all of `~`
        if runs:
            raise UserError(f"{ref}: a folder holding {runs} run director{'ies' if runs > 1 else 'y'}, not a recipe; "
                            f"give a recipe (a .toml file or a shipped recipe's name, `dcablate recipes`), or one "
                            f"run's folder to resume it, or see their results with `dcablate report {shown}`")
        raise UserError(f"{ref}: a folder, not a recipe; give a recipe file (.toml) or a shipped recipe's name "
                        f"(`dcablate recipes` lists them)")
    if path.exists():
        raise UserError(f"{ref}: not a file")
    near = did_you_mean(name, shipped)
    tails = [n for n in shipped if n.rsplit("/", 1)[-1] == name]  # a shipped recipe named without its folder
    if not near and tails:
        near = f" (did you mean {' or '.join(repr(t) for t in sorted(tails))}?)"
    if not near and path.parent.is_dir():  # a mistyped file or run folder beside others (`my.tom` for my.toml)
        near = did_you_mean(path.name, [p.name for p in path.parent.iterdir()
                                        if p.suffix == RECIPE_SUFFIX or p.is_dir() or path.parent != Path(".")])
    raise UserError(f"{ref}: no such recipe file or shipped recipe{near}; `dcablate recipes` lists the shipped ones")


def _shipped_hint(ref: str, shipped: dict[str, Path]) -> str:
    """` (did you mean extends = "paper/mqar_base"?)` for an `extends` that names a shipped recipe by its file name
    only (a shipped recipe copied out of its folder) or misspells one; '' when nothing is close."""
    name = ref.removesuffix(RECIPE_SUFFIX)
    same_file = [n for n in shipped if Path(n).name == Path(name).name]
    if len(same_file) == 1:
        return f' (did you mean extends = "{same_file[0]}"?)'
    close = did_you_mean(name, shipped)
    return close.replace("(did you mean '", '(did you mean extends = "').replace("'?)", '"?)') if close else ""


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}{_bare_word_hint(path, str(e))}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None


_AT = re.compile(r"\(at line (\d+), column (\d+)\)")
_BARE = re.compile(r"[A-Za-z_][\w./:+-]*")


def _bare_word_hint(path: Path, message: str) -> str:
    """' (a string needs quotes: mixer = "attention")' when the TOML error points at an unquoted word as a
    value (`mixer = attention`), which `--set` takes as a string but a recipe file cannot; else ''."""
    at = _AT.search(message)
    if at is None or not message.startswith("Invalid value"):
        return ""
    try:
        line = path.read_text(encoding="utf-8").splitlines()[int(at.group(1)) - 1]
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
    key, eq, _ = line.partition("=")
    word = _BARE.match(line[int(at.group(2)) - 1:].rstrip())
    if not eq or word is None or word.group() in ("true", "false", "inf", "nan"):
        return ""
    return f' (a string needs quotes: {key.strip()} = "{word.group()}")'



def _merge(base: dict, over: dict, origins: dict, over_source: str, prefix: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`; tables merge, everything else replaces, and so does an empty
    `[sweep]` (a recipe's way to train one run of a sweeping recipe it extends)."""
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not (path == "sweep" and not value):
            out[key] = _merge(out[key], value, origins, over_source, path + ".")
        else:
            out[key] = value
            _mark(origins, path, value, over_source)
    return out


def _mark(origins: dict, path: str, value, source: str) -> None:
    """`path` (and each key of a table value) set by `source`; what was set below `path` before is gone with the
    value it replaces (`--set 'sweep={}'` leaves no `sweep.task.recall` behind to be blamed)."""
    if not path.startswith("sweep."):  # a sweep axis is a list: `sweep.task.recall.seq_len` is no key inside
        for stale in [k for k in origins if isinstance(k, str) and k.startswith(f"{path}.")]:  # `sweep.task.recall`
            del origins[stale]
    origins[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, f"{path}.{k}", v, source)


def _load_raw(path: Path, origins: dict, chain: tuple[Path, ...] = (), order: list[str] | None = None) -> dict:
    """The recipe at `path` with what it extends merged below it; `order` gets the files, the root ancestor first."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError(str(chain[-1]), "extends", f"cycle: {cycle}")
    data = _read_toml(path)
    if isinstance(data.get("sweep"), dict):  # one form per file, so a child's axis replaces its parent's in either
        data["sweep"] = _flat_sweep(data["sweep"], str(path))
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        base = {}
    else:
        if not isinstance(parent_ref, str):
            raise RecipeError(str(path), "extends", f"must be a string path, got {type(parent_ref).__name__}")
        parent = (path.parent / parent_ref)
        if not parent.is_file():
            shipped = shipped_recipes()
            if parent_ref.removesuffix(RECIPE_SUFFIX) not in shipped:
                raise RecipeError(str(path), "extends", f"no such file: {parent}, nor a shipped recipe of that name"
                                  f"{_shipped_hint(parent_ref, shipped)}")
            parent = shipped[parent_ref.removesuffix(RECIPE_SUFFIX)]
        base = _load_raw(parent, origins, (*chain, path), order)
    if order is not None:
        order.append(str(path))
    return _merge(base, data, origins, str(path))


def _set_path(data: dict, dotted: str, value, origins: dict, source: str) -> None:
    node = data
    parts = dotted.split(".")
    if parts[0] == "sweep" and len(parts) > 1:
        parts = ["sweep", ".".join(parts[1:])]  # sweep keys are themselves dotted recipe paths
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            origins[".".join(parts[: i + 1])] = source
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            at = ".".join(parts[: i + 1])
            whole = (f"; a list is set whole: --set '{at}=[{{...}}, ...]'" if isinstance(nxt, list)
                     and source == "--set" else "")
            raise RecipeError(source, at, f"is a {'list' if isinstance(nxt, list) else 'value'}, not a table{whole}")
        node = nxt
    node[parts[-1]] = value
    _mark(origins, dotted, value, source)


def load_raw(ref: str, overrides: list[str] = ()) -> tuple[dict, dict, Path]:
    """Resolve extends and --set; returns (raw dict, key origins, recipe path)."""
    path = find_recipe(ref)
    origins: dict[str, str] = {}
    order: list[str] = []
    data = _load_raw(path, origins, order=order)
    set_keys = []
    for text in overrides:
        key, value = parse_override(text)
        _note_table_replaced(data, key, value, origins)
        _set_path(data, key, value, origins, "--set")
        for old in [k for k in origins if isinstance(k, tuple) and (k[1] == key or k[1].startswith(f"{key}."))]:
            del origins[old]  # a later --set of the key or a table above it replaced what was typed for it
        origins[typed_key(key)] = text.partition("=")[2].strip()
        set_keys.append((key, text, value))
    if isinstance(data.get("sweep"), dict):
        data["sweep"] = flatten(data["sweep"])
        _check_not_swept(data["sweep"], set_keys, origins, ref, path)
        _check_files_not_swept(data["sweep"], origins, order)
    return data, origins, path


def _note_table_replaced(data: dict, key: str, value, origins: dict) -> None:
    """A note when `--set KEY={...}` replaces a table whose other keys the recipe set: those go back to their
    defaults, which a user who meant to change one key does not expect (`--set 'model.moe={n_experts=2}'` on a
    recipe with `d_expert = 32`). `--set 'sweep={}'` drops the sweep on purpose, and says nothing."""
    if not isinstance(value, dict) or key.split(".")[0] == "sweep":
        return
    old = data
    for part in key.split("."):
        old = old.get(part) if isinstance(old, dict) else None
    if not isinstance(old, dict):
        return
    lost = [f"{key}.{k}" for k in flatten(old) if not _names(value, k)]
    if lost:
        where = ", ".join(dict.fromkeys(str(origins.get(k, "the recipe")) for k in lost))
        shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        back = "goes back to its default" if len(lost) == 1 else "go back to their defaults"
        _say_once(f"--set {key}={{...}} replaces the whole table: {shown} (set in {where}) {back}; to change one "
                  f"key and keep the rest, --set {key}.NAME=VALUE")


def _check_files_not_swept(sweep: dict, origins: dict, order: list[str]) -> None:
    """A key that a recipe sets while a recipe it extends sweeps it (the key itself, or a key inside a table the
    sweep sets whole) is a RecipeError naming both: the sweep would override it at every point.
    The same file setting a key and sweeping it gives the key a base value, as a parent's key under a child's
    sweep does; those are fine."""
    rank = {f: i for i, f in enumerate(order)}
    for axis, values in sweep.items():
        swept_in = origins.get(f"sweep.{axis}")
        if axis in RESERVED or swept_in not in rank:  # set by --set: the user's latest word
            continue
        for key, where in origins.items():
            if not isinstance(key, str) or key.startswith("sweep") or rank.get(where, -1) <= rank[swept_in]:
                continue
            if key == axis or key.startswith(f"{axis}."):  # (a table above the axis has the axis among its keys)
                what = "is swept" if key == axis else f"is inside {axis}, which is swept"
                size = _zipped(sweep, axis) or "a list of one value for one"
                raise RecipeError(where, key, f"{what}: {swept_in} sweeps {axis} ({_shown(values)}), setting it at "
                                  f"every point over this value; set the axis in this file's [sweep] instead "
                                  f"(\"{axis}\" = [...], {size})")


def _shown(values) -> str:
    """A swept list as an error line quotes it: cut at 60 characters."""
    return str(values) if len(str(values)) <= 60 else str(values)[:57] + "..."


def _zipped(sweep: dict, axis: str) -> str:
    """`N values: it is zipped` for an axis in one of the sweep's zip groups, else ""."""
    groups, values = sweep.get(ZIP_KEY), sweep[axis]
    zipped = isinstance(groups, list) and any(isinstance(g, list) and axis in g for g in groups)
    if not zipped or not isinstance(values, list):
        return ""
    return f"{len(values)} value{'s' if len(values) != 1 else ''}: it is zipped"


def _check_not_swept(sweep: dict, set_keys: list[tuple[str, str, object]], origins: dict, ref: str,
                     path: Path) -> None:
    """A `--set` that the sweep would override at every point is a UserError naming the axis and where it was set:
    one of a swept key, of a key inside a swept table (`task.recall.vocab_size` where the sweep sets `task.recall`
    whole), or of a table whose value names a swept key (`model.conv={kind="none"}` where `model.conv.kind` is
    swept)."""
    for key, text, value in set_keys:
        if key == "sweep" or key.startswith("sweep."):
            continue
        for axis, values in sweep.items():
            if axis in RESERVED:
                continue
            inside = key.startswith(f"{axis}.")
            above = axis.startswith(f"{key}.") and _names(value, axis[len(key) + 1:])
            if key != axis and not inside and not above:
                continue
            choices = _choices(key) if key == axis else None
            if choices is not None and isinstance(value, str) and value not in choices:  # a typo first, not "swept"
                raise UserError(f"--set {text}: {value!r} is not one of {'|'.join(choices)}"
                                f"{not_one_of(value, choices)}")
            where = origins.get(f"sweep.{axis}", str(path))
            shown = _shown(values)
            swept_in = "by --set" if where == "--set" else f"[sweep] in {where}"
            count = f", {_zipped(sweep, axis)}" if _zipped(sweep, axis) else ""
            # without its sweep the recipe is one run, which its sweep's folder cannot hold: another run.name
            drop = "or drop the sweep (--set 'sweep={}' --set run.name=NAME)"
            if "task.kind" in sweep:  # without its sweep, such a recipe trains its own task.kind (MQAR by default)
                task = axis.split(".")[1] if axis.startswith("task.") and axis != "task.kind" else None
                drop = (f"or drop the sweep (--set 'sweep={{}}' --set 'task.kind=\"{task or 'KIND'}\"' --set "
                        f"run.name=NAME: its sweep chooses the task)")
            if inside and isinstance(values, list) and any(isinstance(v, dict) for v in values):
                sub = key[len(axis) + 1:]
                fields = _section_fields(axis)
                if fields is not None and sub.split(".")[0] not in fields:  # a misspelt key: say so, not "sweep it"
                    raise UserError(f"--set {text}: unknown key {sub.split('.')[0]!r} in [{axis}]"
                                    f"{_unknown_key_hint(f'{axis}.', sub.split('.')[0], fields)}; allowed there: "
                                    f"{', '.join(fields)}")
                recipe = ref if Path(ref).is_file() else ref.removesuffix(RECIPE_SUFFIX)  # a file, or a shipped name
                raise UserError(f"--set {text}: {axis} is swept as whole tables ({swept_in}: {shown}), and each "
                                f"point's table replaces {axis}, so the sweep would override this --set; set {sub} "
                                f"in the sweep's tables instead, in a recipe of your own (extends = \"{recipe}\", "
                                f"[sweep] \"{axis}\" = [...]) or with --set 'sweep.{axis}=[...]'{count}; {drop}")
            what = (f"{key} is swept" if key == axis else f"sets {axis}, which is swept" if above else
                    f"{key} is inside {axis}, which is swept")
            raise UserError(f"--set {text}: {what} ({swept_in}: {shown}), and the sweep sets it at every point; "
                            f"set the axis instead (--set 'sweep.{axis}=[...]'{count}), {drop}")


def _section_class(parts: list[str]):
    """The dataclass of the recipe section at `parts` (`["task", "recall"]`), None where that is no section."""
    cls = schema.Recipe
    for part in parts:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls if dataclasses.is_dataclass(cls) else None


def _choices(path: str):
    """The allowed values of the recipe key at dotted `path` (`task.kind`: the registered tasks), None where the key
    lists none."""
    *section, name = path.split(".")
    cls = _section_class(section)
    found = [f for f in dataclasses.fields(cls) if f.name == name] if cls is not None else []
    return found[0].metadata.get("choices") if found else None


def _section_fields(path: str) -> list[str] | None:
    """The keys of the recipe section at dotted `path` (`task.recall`), None where it is no section."""
    cls = _section_class(path.split("."))
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else None


def _names(value, sub: str) -> bool:
    """Whether the table `value` (a `--set` of a table) sets the dotted key `sub` or a table above it."""
    for part in sub.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _flat_sweep(sweep: dict, source: str) -> dict:
    """A file's `[sweep]` table with dotted keys (`"model.conv.kind" = [..]` and `[sweep.model.conv] kind = [..]`
    are one axis); a RecipeError where the file writes one axis in both forms, which TOML lets through."""
    out: dict = {}
    for key, value in sweep.items():
        for dotted, axis in (flatten(value, f"{key}.") if isinstance(value, dict) else {key: value}).items():
            if dotted in out:
                raise RecipeError(source, f"sweep.{dotted}", "set twice in [sweep] (as a quoted dotted key and in a "
                                  "table); keep one")
            out[dotted] = axis
    return out


def flatten(table: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict:
    """Nested tables as one table of dotted keys (`{"model": {"d_model": 64}}` -> `{"model.d_model": 64}`); a
    table under a key in `whole` stays one value. `[sweep] model.d_model = [..]` parses as nested tables too."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict) and k not in whole:
            out.update(flatten(v, f"{prefix}{k}.", whole))
        else:
            out[f"{prefix}{k}"] = v
    return out


def expand(ref: str, overrides: list[str] = ()) -> tuple:
    """The base recipe and its grid points as (point name, recipe); one point, named "", without a sweep. Its
    notes are said once every point has loaded: a recipe that fails ends in its error line alone."""
    with notes_held():
        return _expand(ref, overrides)


def _expand(ref: str, overrides: list[str] = ()) -> tuple:
    data, origins, path = load_raw(ref, overrides)
    base = build(data, origins, str(path))
    if not base.sweep:
        _unused_tasks(base, data, origins, str(path.resolve()), {base.task.kind}, {})
        _unused_model_settings(data, origins, str(path.resolve()), [base], file_chose=not _run_wrote(path))
        return base, [("", base)]
    points, seen = [], {}
    blamed = clashing_keys(base.sweep) or [key for key in base.sweep if key not in RESERVED]
    sources = {_src(origins, f"sweep.{key}", str(path.resolve())) for key in blamed}
    # the file (or --set) of those axes; of axes from several, the user's latest word: --set, else the named recipe
    where = sources.pop() if len(sources) == 1 else "--set" if "--set" in sources else str(path.resolve())
    for name, pairs in grid(base.sweep):
        if name in seen:  # two points would share one run directory
            raise RecipeError(where, "sweep", f"points {seen[name] + 1} and {len(points) + 1} both get the name "
                              f"{name!r} (the same values: an axis lists a value twice); make each point's swept "
                              f"values differ")
        seen[name] = len(points)
        point, point_origins = _point_data(data, origins, base.sweep, pairs, str(path.resolve()))
        try:
            built = build(point, point_origins, str(path))
        except RecipeError as e:  # each axis's values passed alone (`check_sweep`): this combination of them fails
            raise RecipeError(where, "sweep", f"point {name}: {e.key}: {e.message}") from None
        points.append((name, built))
        _zipped_table_unread(origins, str(path.resolve()), base.sweep, pairs, points[-1][1])
    _unused_tasks(base, data, origins, str(path.resolve()), {r.task.kind for _, r in points}, base.sweep)
    _unused_model_axes(origins, str(path.resolve()), [r for _, r in points], base.sweep)
    _unused_model_settings(data, origins, str(path.resolve()), [r for _, r in points])
    return base, _without_repeats(points)


def conv_kinds_built(recipe) -> set[str]:
    """The conv kinds `recipe`'s model builds: `model.conv.kind`, and where that is none, the kind a mixer that is
    itself a conv builds instead (`MixerSpec.conv_when_none`: short_conv's static conv)."""
    kind = recipe.model.conv.kind
    if kind != "none":
        return {kind}
    return {"none"} | {MIXERS.get(m).conv_when_none for m in recipe.model.mixers if MIXERS.get(m).conv_when_none}


def conv_keys_read(kinds) -> set[str] | None:
    """The `[model.conv]` keys that the conv kinds `kinds` read between them (`ConvKindSpec.reads`); None when one
    of them may read any key (no `reads`, or a kind not registered)."""
    from dcablate.models.conv import CONV_KINDS

    read: set[str] = set()
    for kind in kinds:
        reads = CONV_KINDS.get(kind).reads if kind in CONV_KINDS.names() else None
        if reads is None:
            return None
        read.update(reads)
    return read


# `[model]` keys that only some mixers or channel mixers read (their specs' `model_keys` say which): attention and
# Gated DeltaNet's heads, the dense MLP's (and MoE experts') width; Mamba-2 sizes its heads in its own section
COMPONENT_MODEL_KEYS = ("n_heads", "head_dim", "ffn_hidden")


def model_keys_read(recipe) -> set[str] | None:
    """Which of `COMPONENT_MODEL_KEYS` the recipe's mixers and channel mixer read between them (`model_keys` of
    their specs); None when one of them may read any (a spec without `model_keys`, or one not registered)."""
    read: set[str] = set()
    specs = [MIXERS.get(m) if m in MIXERS.names() else None for m in recipe.model.mixers]
    specs.append(CHANNELS.get(recipe.model.ffn) if recipe.model.ffn in CHANNELS.names() else None)
    for spec in specs:
        keys = declared_model_keys(spec, recipe.model) if spec is not None else None
        if keys is None:
            return None
        read.update(keys)
    return read


def declared_model_keys(spec, model=None) -> tuple[str, ...] | None:
    """A spec's `model_keys` for the model section `model`; a function of the section (`ffn_hidden` only while
    `moe.d_expert` is 0) counts as reading any where no section is at hand (for hints)."""
    if callable(spec.model_keys):
        return spec.model_keys(model) if model is not None else None
    return spec.model_keys


def reads_key(read: dict, key: str) -> bool:
    """Whether a run reads the dotted `key` (`model.conv.placement`, `task.recall`), from `read`, its
    `effective` dict: that dict leaves out the sections and keys the run does not read."""
    node = read
    for part in key.split("."):
        if not isinstance(node, dict):
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def effective(recipe) -> dict:
    """What of `recipe` its run reads, as a dict: `recipe.to_dict()` without the sections of the mixers, channel
    mixers, conv kinds and tasks it does not use, nor the `[model.conv]` keys its conv kind does not read
    (`ConvKindSpec.reads`; of every kind the model builds, `conv_kinds_built`), nor the `[model]` keys its
    components do not read (`model_keys_read`: `n_heads` of a Mamba-2, `ffn_hidden` without a channel mixer), nor
    `train.steps` where a token budget sets the steps. Two recipes with equal effective dicts train the same run."""
    from dcablate.models.conv import CONV_KINDS

    d = recipe.to_dict()
    model, conv = d["model"], d["model"]["conv"]
    used = set(recipe.model.mixers) | {recipe.model.ffn}
    for name in [*MIXERS.names(), *CHANNELS.names()]:
        if name not in used:
            model.pop(name, None)
    built = conv_kinds_built(recipe)
    for name in CONV_KINDS.names():
        if name not in built:
            conv.pop(name, None)
    read = conv_keys_read(built)
    if read is not None and recipe.model.conv.kind == "none":
        read = read - {"placement"}  # a mixer's own conv (short_conv's) sits on its stream at any placement
    if read is not None:
        for key in schema.ConvCore.__dataclass_fields__:
            if key != "kind" and key not in read:
                conv.pop(key, None)
    if recipe.train.tokens or recipe.train.tokens_per_param:
        d["train"].pop("steps", None)
    used_keys = model_keys_read(recipe)
    if used_keys is not None:
        for key in COMPONENT_MODEL_KEYS:
            if key not in used_keys:
                model.pop(key, None)
    for name in TASKS.names():
        if name != recipe.task.kind:
            d["task"].pop(name, None)
    return d


def _without_repeats(points: list) -> list:
    """The sweep's points less those that would train the same run as an earlier point (`effective`): a sweep
    over a mixer's option beside a sweep over mixers (`model.gated_deltanet.expand_v` x `model.mixer`) gives the
    attention points each value of an option they do not read. Each such run trains once, under the first
    point's name, and a note says which points were left out; trained twice, it would also count twice in the
    report, as if it were two seeds."""
    kept, first, repeats = [], {}, []
    for name, recipe in points:
        key = json.dumps(effective(recipe), sort_keys=True, default=repr)
        if key in first:
            repeats.append((name, first[key]))
            continue
        first[key] = name
        kept.append((name, recipe))
    if repeats:
        shown = "; ".join(f"{name} (as {same})" for name, same in repeats[:3])
        more = f"; and {len(repeats) - 3} more" if len(repeats) > 3 else ""
        note = (f"{len(repeats)} of the sweep's {len(points)} points would train the same run as an earlier point "
                f"(they differ only in settings their mixer, channel mixer, conv kind or task does not read), so "
                f"each such run trains once: left out {shown}{more}")
        _say_once(note)
    return kept


def _unused_model_axes(origins: dict, src: str, recipes: list, sweep: dict) -> None:
    """A sweep axis over the section of a mixer, channel mixer or conv kind that no point uses
    (`model.gated_deltanet.expand_v` where every point's mixer is attention): refused, since each of its values
    would train the same run. A recipe that also sweeps the component uses the section in the points that have
    it."""
    from dcablate.models.conv import CONV_KINDS

    kinds = {k for r in recipes for k in conv_kinds_built(r)}
    for key, values in sweep.items():
        parts = key.split(".")
        if parts[0] != "model" or len(parts) < 2 or not isinstance(values, list) or \
                len({repr(v) for v in values}) < 2:  # one value: nothing would train twice
            continue
        if parts[:2] == ["model", "conv"] and len(parts) == 3 and parts[2] in schema.ConvCore.__dataclass_fields__ \
                and parts[2] != "kind":
            read = conv_keys_read(kinds)
            if read is not None and parts[2] not in read:
                _axis_changes_nothing(origins, src, key, "model.conv.kind", kinds, f", which does not read {key}")
            continue
        if len(parts) == 2 and parts[1] in COMPONENT_MODEL_KEYS:
            reads = [model_keys_read(r) for r in recipes]
            if all(read is not None and parts[1] not in read for read in reads):
                used = {m for r in recipes for m in r.model.mixers} | {r.model.ffn for r in recipes}
                _axis_changes_nothing(origins, src, key, "model.mixer / model.ffn", used,
                                      f", none of which reads {key}")
            continue
        if parts[1] == "conv" and len(parts) > 2 and parts[2] in CONV_KINDS.names():
            what, used, name = "model.conv.kind", kinds, parts[2]
        elif parts[1] in MIXERS.names():
            what, used, name = "model.mixer", {m for r in recipes for m in r.model.mixers}, parts[1]
        elif parts[1] in CHANNELS.names():
            what, used, name = "model.ffn", {r.model.ffn for r in recipes}, parts[1]
        else:
            continue
        if name not in used:
            _axis_changes_nothing(origins, src, key, what, used)


def _run_wrote(path: Path) -> bool:
    """Whether `path` is the `recipe.toml` a run wrote into its folder: every setting written out as its point
    resolved it (a conv-free point of a zipped sweep keeps `model.conv.residual = false`), so a setting it leaves
    unread is the sweep's doing, not a choice to point out when the run is resumed or inspected."""
    from dcablate.runs.directories import run_dir_named

    return path.name == "recipe.toml" and run_dir_named(str(path)) is not None


def _unused_model_settings(data: dict, origins: dict, src: str, recipes: list, file_chose: bool = True) -> None:
    """Model settings the recipe sets that no run reads, said once each in a note (as a task's, `_unused_tasks`):
    the section of a mixer, channel mixer or conv kind that no point builds (`[model.gated_deltanet]` beside
    `mixer = "attention"`), and a `[model.conv]` key that no point's conv kind reads (`rank` where every conv is
    static), where the named recipe (unless not `file_chose`: a run's own record) or a --set sets it to other
    than its default. Sweep axes over them are refused instead (`_unused_model_axes`)."""
    from dcablate.models.conv import CONV_KINDS

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    conv = model.get("conv") if isinstance(model.get("conv"), dict) else {}
    first = recipes[0].model  # a setting that is not swept is the same at every point
    # only what differs from its default does anything: a saved run's recipe.toml writes every key out
    changed = lambda value: value != type(value)()  # noqa: E731
    conv_defaults = type(first.conv)()
    kinds = {k for r in recipes for k in conv_kinds_built(r)}
    shown = " / ".join(sorted({r.model.conv.kind for r in recipes}))
    notes = []
    for name, what, used in (("mixer", "model.mixer", {m for r in recipes for m in r.model.mixers}),
                             ("ffn", "model.ffn", {r.model.ffn for r in recipes})):
        names = MIXERS.names() if name == "mixer" else CHANNELS.names()
        values = " / ".join(sorted(used))
        notes += [(f"model.{n}", f"{what} is {values!r}") for n in model
                  if n in names and n not in used and changed(getattr(first, n))]
    notes += [(f"model.conv.{n}", f"model.conv.kind is {shown!r}") for n in conv
              if n in CONV_KINDS.names() and n not in kinds and changed(getattr(first.conv, n))]
    read = conv_keys_read(kinds)
    if read is not None:
        notes += [(f"model.conv.{n}", f"no conv kind of these runs ({shown}) reads it") for n in conv
                  if n in schema.ConvCore.__dataclass_fields__ and n != "kind" and n not in read
                  and getattr(first.conv, n) != getattr(conv_defaults, n)]
    reads = [model_keys_read(r) for r in recipes]
    components = " / ".join(sorted({m for r in recipes for m in r.model.mixers} | {f"ffn {r.model.ffn}" for r in recipes}))
    notes += [(f"model.{n}", f"no component of these runs ({components}) reads it") for n in model
              if n in COMPONENT_MODEL_KEYS and all(read is not None and n not in read for read in reads)
              and _differs_from_default(recipes[0], f"model.{n}")]
    # a core or task key counts where the named recipe or a --set sets it to other than its default (a saved run's
    # recipe.toml writes every key out)
    notes += [(key, why) for key, why in _unread_keys(recipes)
              if key in origins and _differs_from_default(recipes[0], key)]
    for key, why in notes:
        where = _src(origins, key, src)
        if where not in ((src, "--set") if file_chose else ("--set",)):  # a base recipe (`extends`) may configure
            continue  # components its children do not use
        note = f"{key} is set ({where}) but {why}: it does nothing for these runs"
        _say_once(note)


def _differs_from_default(recipe, key: str) -> bool:
    """Whether the recipe's value of the dotted `key` differs from its section's default."""
    *sections, name = key.split(".")
    section = recipe
    for part in sections:
        section = getattr(section, part)
    return getattr(section, name) != getattr(type(section)(), name)


def _unread_keys(recipes: list) -> list[tuple[str, str]]:
    """(key, why) of the core and task keys that every point's other settings leave unread: `train.steps` beside
    a token budget, and what the task's spec says (`TaskSpec.unread`)."""
    if not recipes:
        return []
    out = []
    if all(r.train.tokens or r.train.tokens_per_param for r in recipes):
        budget = "train.tokens" if recipes[0].train.tokens else "train.tokens_per_param"
        out.append(("train.steps", f"the token budget ({budget}) sets the steps"))
    found = [dict(TASKS.get(r.task.kind).unread(r)) if r.task.kind in TASKS.names() else {} for r in recipes]
    out += [(key, why) for key, why in found[0].items() if all(key in f for f in found[1:])]
    return out


def _zipped_table_unread(origins: dict, src: str, sweep: dict, pairs: list, recipe) -> None:
    """A zip group's table (`task.recall = [{}, {seq_len = 512}, ...]` zipped with `task.kind`) that sets values
    at a point whose run does not read that section (its task.kind, mixer or conv kind is another): refused, since
    the values would do nothing there yet name the point, and a point renamed by such an edit would retrain a run
    already trained. Such a point takes `{}`. Only where the key that picks the section (task.kind, model.mixer,
    model.ffn, model.conv.kind) is zipped with the table: as an axis of its own, it meets every value of the
    table, which cannot avoid points that ignore it."""
    group_of = {k: group for group in sweep.get(ZIP_KEY, []) for k in group}
    swept, read = dict(pairs), effective(recipe)
    for key, value in pairs:
        if key not in group_of or not isinstance(value, dict) or not value:
            continue
        parts = key.split(".")
        chooser = ("task.kind", recipe.task.kind) if parts[0] == "task" else \
            ("model.conv.kind", recipe.model.conv.kind) if parts[1:2] == ["conv"] else \
            ("model.ffn", recipe.model.ffn) if parts[1:2] and parts[1] in CHANNELS.names() else \
            ("model.mixer", "+".join(recipe.model.mixers))
        if chooser[0] not in group_of[key] and not (chooser[0] == "model.mixer" and "model.mixers" in group_of[key]):
            continue  # the section's user is an axis of its own: the table cannot avoid points that ignore it
        if not reads_key(read, key):
            setting = ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items())
            group = group_of[key]
            position = next(i for i in range(len(sweep[key])) if all(sweep[k][i] == swept[k] for k in group))
            table_src = _src(origins, f"sweep.{key}", src)
            chooser_src = _src(origins, f"sweep.{chooser[0]}", src)
            newer = chooser_src == "--set" or (chooser_src == src and table_src not in ("--set", src))
            if newer and chooser[0] in group_of[key]:
                # the picking list was edited after the table (task.kind reordered by --set or in the recipe run,
                # the table left as a recipe it extends had it): blame the edit
                raise RecipeError(chooser_src, f"sweep.{chooser[0]}[{position}]",
                                  f"is {chooser[1]!r}, but sweep.{key}[{position}] (zipped with it, set in "
                                  f"{table_src}) sets {setting}, which a {chooser[1]!r} point does not read; keep "
                                  f"the zip's order, or set sweep.{key} here too")
            raise RecipeError(table_src, f"sweep.{key}[{position}]",
                              f"sets {setting} at a point whose {chooser[0]} is {chooser[1]!r}, which does not "
                              f"read [{key}], so it would do nothing; write {{}} there")


def _axis_changes_nothing(origins: dict, src: str, key: str, what: str, values: set[str], why: str = "") -> None:
    """Refuse the sweep axis `key`: `what` takes only `values` over the points, none of which uses it."""
    raise RecipeError(_src(origins, f"sweep.{key}", src), f"sweep.{key}",
                      f"{what} is {' / '.join(sorted(values))!r} at every point{why}, so this axis changes nothing "
                      f"(each of its values would train the same run); drop it, or sweep {what} too")


def _unused_tasks(base, data: dict, origins: dict, src: str, kinds: set[str], sweep: dict) -> None:
    """Settings of a task no run trains on (`task.recall.*` where every point's task.kind is mqar): a sweep axis
    over them is refused, since each of its values would train the same run; a section that differs from its
    defaults is said once, since it does nothing (a saved run's recipe.toml holds every section at its defaults).
    A recipe that sweeps task.kind uses each kind's section in the points of that kind."""
    named = [*(data.get("task") or {}), *(key.split(".")[1] for key in sweep if key.startswith("task."))]
    unused = [t for t in dict.fromkeys(named) if t != "kind" and t in TASKS.names() and t not in kinds]
    kind = " / ".join(sorted(kinds))
    for task in unused:
        for key in sweep:
            if key == f"task.{task}" and all(v == {} for v in sweep[key]):
                continue  # the section's defaults at every point: how a recipe extending a suite drops a task
            if key == f"task.{task}" or key.startswith(f"task.{task}."):
                _axis_changes_nothing(origins, src, key, "task.kind", kinds)
        section = getattr(base.task, task)
        if task not in (data.get("task") or {}) or section == type(section)():
            continue
        set_here = sorted({_src(origins, k, src) for k in origins if isinstance(k, str) and
                           (k == f"task.{task}" or k.startswith(f"task.{task}."))}) or [src]
        note = (f"task.{task} is set ({', '.join(set_here)}) but task.kind is {kind!r}: its settings do nothing "
                f"for these runs")
        _say_once(note)


def load(ref: str, overrides: list[str] = ()):
    """Load, resolve and validate one recipe (its `[sweep]` table kept, not expanded); its notes are said once it
    has loaded."""
    with notes_held():
        data, origins, path = load_raw(ref, overrides)
        return build(data, origins, str(path))


def build(data: dict, origins: dict | None = None, default_source: str = "<recipe>"):
    """A resolved, checked `Recipe` from a raw recipe dict; `origins` maps dotted keys to where they were set."""
    origins = origins or {}
    recipe = _build_dataclass(schema.Recipe, data, "", origins, default_source)
    _task_defaults(recipe, data)
    _fit_warmup(recipe, origins, default_source)
    # the recipe's own contradictions first: one that every sweep point shares is then named without a point
    try:
        _check_consistency(recipe, origins, default_source)
    except RecipeError as contradiction:
        if not any(key not in RESERVED for key in recipe.sweep):
            raise
        # the base's values of swept keys are no point's (`n_heads = 3` with `d_model` swept over [48, 96] and the
        # default d_model 128): a contradiction counts only if no point resolves it. The sweep's own form first (a
        # misspelt or empty axis is the fault then); each axis's values are then checked on a point that resolves
        # it, not on the base
        check_sweep_form(recipe, data, origins, default_source)
        resolving = _resolving_point(recipe.sweep, data, origins, default_source)
        if resolving is None:
            raise _at_first_point(recipe.sweep, data, origins, default_source, contradiction) from None
        check_sweep_axes(recipe, data, origins, default_source, resolving)
        return recipe
    check_sweep(recipe, data, origins, default_source)
    return recipe


RESOLVING_TRIES = 64  # grid points tried (after the diagonal) for one that resolves a base recipe's contradiction


def _resolving_point(sweep: dict, data: dict, origins: dict, src: str) -> list | None:
    """The pairs of a grid point that builds into a valid recipe, or None: the points where every axis moves at
    once first (`diagonal`: each axis's every value soon), then the grid's first `RESOLVING_TRIES`."""
    for _, pairs in itertools.chain(diagonal(sweep), itertools.islice(iter_grid(sweep), RESOLVING_TRIES)):
        try:
            build(*_point_data(data, origins, sweep, pairs, src), src)
            return pairs
        except RecipeError:
            continue
    return None


def _at_first_point(sweep: dict, data: dict, origins: dict, src: str, contradiction: RecipeError) -> RecipeError:
    """What to say of the base recipe's `contradiction` when no grid point tried resolves it: the same, when the
    sweep's first point fails alike; else that point's error, said as such (its values, not the base's, which no
    point has)."""
    name, pairs = next(iter_grid(sweep))
    try:
        build(*_point_data(data, origins, sweep, pairs, src), src)
    except RecipeError as e:
        if (e.key, e.message) == (contradiction.key, contradiction.message):
            return contradiction
        return RecipeError(e.source, e.key, f"{e.message} (at the sweep's first point, {name}; no other point tried "
                                            f"fits either)")
    return contradiction


# ----------------------------------------------------------------------------------------- validation


def _plugin_check(spec, key: str, r, fail) -> None:
    """`spec.check(r, fail)`; a plugin's check that raises something other than a UserError (a bug in it, e.g. an
    AttributeError) is one line naming the component, its module and the exception (dcablate's own raise as is)."""
    try:
        spec.check(r, fail)
    except UserError:
        raise
    except Exception as e:
        module = getattr(spec.check, "__module__", None) or ""
        if module.startswith("dcablate."):
            raise
        raise UserError(f"{key} = {spec.name!r}: the check of its plugin ({module}) raised {type(e).__name__}: "
                        f"{e}") from None


def _src(origins: dict, path: str, default: str) -> str:
    """The file that set `path` (or its closest set parent)."""
    while path:
        if path in origins:
            return origins[path]
        path = path[: path.rindex("[")] if path.endswith("]") else path.rpartition(".")[0]
    return default


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _build_dataclass(cls, data, prefix: str, origins: dict, default: str):
    if not isinstance(data, dict):
        raise RecipeError(_src(origins, prefix.rstrip("."), default), prefix.rstrip("."),
                          f"must be a table, got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            allowed = ", ".join(names)
            # a component's section whose component is not registered: most often a plugin not loaded
            component = {"model.": "mixer or channel mixer", "model.conv.": "conv kind", "task.": "task"}.get(prefix)
            plugin = _unregistered_hint(component, key) if component and isinstance(data[key], dict) else ""
            raise RecipeError(_src(origins, path, default), path,
                              f"unknown key{_unknown_key_hint(prefix, key, names, _chosen(prefix, data))}{plugin}; "
                              f"allowed here: {allowed}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}{f.name}"
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f, path, origins, default)
    return cls(**kwargs)


def _coerce(tp, value, f, path: str, origins: dict, default: str):
    src = _src(origins, path, default)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path + ".", origins, default)
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]: None is the default ("auto"), a given value must be an X
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(tp, value, f, path, origins, default)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise RecipeError(src, path, f"must be a non-empty list of tables, got {describe_value(value)}")
        return [_coerce(item_tp, v, f, f"{path}[{i}]", origins, default) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(src, path, f"must be a table, got {describe_value(value)}")
        return value
    if f.metadata.get("or_list") and isinstance(value, list):  # one value, or a list of them
        if not value:
            raise RecipeError(src, path, "must be a value or a non-empty list of values, got an empty list")
        single = dataclasses.field(metadata={**f.metadata, "or_list": False})
        return [_coerce(tp, v, single, f"{path}[{i}]", origins, default) for i, v in enumerate(value)]
    ok = (isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    sweep_hint = (f"; to train one run per value, sweep it: --set 'sweep.{path}=[...]' or [sweep] \"{path}\" = "
                  f"[...]" if isinstance(value, list) and "[" not in path else "")
    if not ok and tp is str and f.metadata.get("choices"):
        raise RecipeError(src, path, f"must be one of {'|'.join(f.metadata['choices'])}, got "
                                     f"{describe_value(value)}{sweep_hint}")
    if not ok:
        hint = sweep_hint
        if tp is str and not isinstance(value, (list, dict)):  # a name typed as a number, date or boolean
            hint = quote_hint(path, value, origins.get(typed_key(path)) if src == "--set" else None)
        raise RecipeError(src, path, f"must be {_TYPE_NAMES[tp]}, got {describe_value(value)}{hint}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(src, path, f"must be a finite number, got {value}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise RecipeError(src, path, f"'{value}' is not one of {'|'.join(meta['choices'])}"
                                     f"{not_one_of(value, meta['choices'])}")
    lo, hi = meta.get("min"), meta.get("max")
    low = None if lo is None else f"{'>' if meta.get('min_open') else '>='} {lo}"
    both = f" (allowed: {low} and <= {hi})" if lo is not None and hi is not None else ""
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        raise RecipeError(src, path, f"must be {low}, got {value}{both}")
    if hi is not None and value > hi:
        raise RecipeError(src, path, f"must be <= {hi}, got {value}{both}")
    if meta.get("resolve"):  # a component's normal form of the value, e.g. a relative path made absolute
        value = meta["resolve"](value)
    return value


def _unregistered_hint(component: str, key: str) -> str:
    """What follows an unknown recipe section named like a component (`[model.runmean]`): where a plugin would
    register one of that name; when plugin modules are loaded already, that none of them registered it (naming
    the module again would change nothing), and which of them registered nothing at all."""
    if not plugin_names():
        return (f"; no registered {component} is named {key!r}: if a plugin module provides it, name that module in "
                f"DCABLATE_PLUGINS")
    call = {"mixer or channel mixer": "register_mixer or register_channel_mixer", "conv kind": "register_conv",
            "task": "register_task"}[component]
    idle = sorted(set(plugin_names()) - plugins_registering())
    named = ", ".join(repr(n) for n in plugin_names())
    also = (f" ({', '.join(repr(n) for n in idle)} registered nothing at all)" if idle else "")
    return (f"; no registered {component} is named {key!r}, and the plugin modules of DCABLATE_PLUGINS ({named}) "
            f"registered none of that name{also}: does its module call {call} when imported?")


def not_one_of(value, choices) -> str:
    """What follows "'x' is not one of a|b|c": the close name, and for a registry's names (`Names`) where a plugin
    would come in: one not loaded, or one loaded that registered nothing."""
    close = did_you_mean(value, choices)
    if isinstance(choices, Names) and not close:  # a registry's names: most often a plugin not loaded
        close = "; if a plugin module provides it, name that module in DCABLATE_PLUGINS"
    elif isinstance(choices, Names) and not plugin_names():  # a plugin's kind is often named after a built-in one
        close += "; or, if a plugin module provides it, name that module in DCABLATE_PLUGINS"
    idle = sorted(set(plugin_names()) - plugins_registering()) if isinstance(choices, Names) else []
    if idle:  # a plugin loaded that registered nothing: most likely the one meant to provide this name
        close += (f"; plugin module{'s' if len(idle) > 1 else ''} {', '.join(repr(m) for m in idle)} registered "
                  f"nothing (a register_mixer, register_conv or register_task call at import)")
    return close


def _check(cond: bool, origins: dict, default: str, path: str, message: str) -> None:
    if not cond:
        raise RecipeError(_src(origins, path, default), path, message)


_said: set[str] = set()
_held: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("held_notes", default=None)  # per thread


def _say_once(note: str) -> None:
    """A `note:` line on the log, the first time this process meets it (recipes are loaded again per point and
    per worker)."""
    if note not in _said:
        _said.add(note)
        _say(note)


def _say(note: str) -> None:
    held = _held.get()
    if held is not None:
        held.append(note)
    else:
        logging.getLogger("dcablate").warning(f"note: {note}")


@contextlib.contextmanager
def notes_held():
    """The notes of recipes loaded inside the block (in this thread: a worker loads its runs' recipes in threads)
    are said when it ends without an error, and dropped with the error otherwise, so that a command's checks after
    loading end in one line."""
    held: list[str] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
    for note in held:
        _say(note)


def _fit_warmup(r, origins: dict, src: str) -> None:
    """A warmup longer than the run, from another place than the steps (`--set train.steps=30` on a recipe
    with 50 warmup steps: a short smoke run) or the default (a recipe of 40 steps that leaves it out), is clamped
    to the steps and said once; from the same place it
    is a contradiction and `_check_consistency` refuses it, as is a warmup asked for on the command line
    (`--set train.warmup_steps`) beyond the file's steps: what was asked is not changed silently. One as long
    as the run, from another place, is said once too (the learning rate would never decay)."""
    t = r.train
    where_w, where_s = _src(origins, "train.warmup_steps", src), _src(origins, "train.steps", src)
    if "train.warmup_steps" not in origins:  # nobody asked for it: the default adapts to a short run
        where_w = "the default"
    if t.tokens or t.tokens_per_param or t.warmup_steps < t.steps or where_w == where_s:
        return
    if t.warmup_steps > t.steps and where_w == "--set":
        return
    if t.warmup_steps == t.steps:
        note = (f"train.warmup_steps {t.warmup_steps} ({where_w}) equals train.steps {t.steps} ({where_s}): the whole "
                f"run warms up, so the learning rate never decays; set train.warmup_steps lower for a schedule")
    else:
        note = (f"train.warmup_steps {t.warmup_steps} ({where_w}) is more than train.steps {t.steps} ({where_s}): "
                f"warming up over {t.steps} step{'s' if t.steps != 1 else ''}, the whole run, so the learning rate "
                f"never decays; set train.warmup_steps lower for a schedule")
    if origins:  # without them, a recipe read back as it was resolved (a run's recipe.toml): nothing to say about it
        _say_once(note)
    t.warmup_steps = t.steps


def completed(saved: dict) -> dict:
    """A resolved recipe that an older version saved (in a checkpoint), with the keys added since at their
    defaults, so that comparing it with today's recipe shows only real changes. One that no longer builds
    is returned as it is: the comparison then names what differs."""
    def drop_unset(node):
        return {k: drop_unset(v) if isinstance(v, dict) else v for k, v in node.items() if v is not None}

    try:
        return build(drop_unset(saved)).to_dict()
    except UserError:
        return saved


def _task_defaults(r, data: dict) -> None:
    """Defaults that follow the task: `eval.early_stop`'s 0.99 is an accuracy (a headline higher is better); a task
    summarised by one lower is better (LM's bits per byte) trains all its steps unless the recipe names a target."""
    if "early_stop" not in (data.get("eval") or {}) and r.task.kind in TASKS.names() and \
            not TASKS.get(r.task.kind).higher_is_better:
        r.eval.early_stop = 0.0


def _check_consistency(r, origins: dict, src: str) -> None:
    """Choices that are valid alone but not together: the core's here, each component's in its spec."""
    name = Path(r.run.name)
    _check(bool(r.run.name.strip()) and not name.is_absolute() and ".." not in name.parts and name != Path("."),
           origins, src, "run.name", f"{r.run.name!r} must name a folder inside run.out_dir (not empty, absolute "
           f"or with '..')")
    m = r.model
    heads_read = model_keys_read(r)
    if m.head_dim == 0 and (heads_read is None or "n_heads" in heads_read):
        _check(m.d_model % m.n_heads == 0, origins, src, "model.n_heads",
               f"d_model {m.d_model} is not divisible by n_heads {m.n_heads} (or set model.head_dim)")

    def fail(key: str, message: str) -> None:
        raise RecipeError(_src(origins, key, src), key, message)

    for name in m.mixers:
        _plugin_check(MIXERS.get(name), "model.mixer", r, fail)
    _plugin_check(CHANNELS.get(m.ffn), "model.ffn", r, fail)
    if m.conv.kind == "dynamic" and m.conv.heads:
        for stream, dim in (sd for layer in range(m.cycle) for sd in conv_streams(m, layer)):
            _check(dim % m.conv.heads == 0, origins, src, "model.conv.heads",
                   f"{m.conv.heads} heads do not divide the {stream} stream's {dim} channels")
    _plugin_check(TASKS.get(r.task.kind), "task.kind", r, fail)
    _check(r.eval.early_stop <= 1.0 or not TASKS.get(r.task.kind).higher_is_better, origins, src, "eval.early_stop",
           f"must be <= 1.0 for task {r.task.kind!r} (its headline, {TASKS.get(r.task.kind).headline}, lies in "
           f"0..1), got {r.eval.early_stop:g}")
    t = r.train
    if t.tokens and t.tokens_per_param:
        other = _src(origins, "train.tokens", src)
        elsewhere = f" ({other})" if other != _src(origins, "train.tokens_per_param", src) else ""
        _check(False, origins, src, "train.tokens_per_param",
               f"give one token budget: train.tokens = {t.tokens} is set too{elsewhere}")
    if not (t.tokens or t.tokens_per_param):  # with a token budget the steps are known when the model is built
        _check(t.warmup_steps <= t.steps, origins, src, "train.warmup_steps",
               f"{t.warmup_steps} is more than train.steps {t.steps}")
    _check(r.train.micro_batch_size <= r.train.batch_size, origins, src, "train.micro_batch_size",
           f"{r.train.micro_batch_size} is more than train.batch_size {r.train.batch_size}")


def recipe_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key a recipe can set (`model.conv.kind`, ...), the registered components' sections included."""
    cls = cls or schema.Recipe
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += recipe_keys(kind, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


# names other tools give a recipe key (the last part of its path)
KEY_ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "seq_length": "seq_len", "max_seq_len": "seq_len",
               "max_steps": "steps", "num_steps": "steps", "num_layers": "n_layers", "n_layer": "n_layers",
               "num_heads": "n_heads", "n_head": "n_heads", "hidden_size": "d_model", "dim": "d_model",
               "batch": "batch_size", "bs": "batch_size", "mixer_type": "mixer"}


def _chosen(prefix: str, data: dict) -> tuple[str, ...]:
    """The sections of the components a `[task]` or `[model]` table chooses (`task.recall.` for kind "recall"):
    where a key of theirs left in the table belongs."""
    if prefix == "task." and isinstance(data.get("kind"), str):
        return (f"task.{data['kind']}.",)
    if prefix == "model.":
        mixers = data.get("mixer", [])
        chosen = [*(mixers if isinstance(mixers, list) else [mixers]), data.get("ffn")]
        return tuple(f"model.{c}." for c in chosen if isinstance(c, str))
    return ()


def _unknown_key_hint(prefix: str, key: str, names: list[str], chosen: tuple[str, ...] = ()) -> str:
    """' (did you mean ...?)' for `key`, not a key of the section at `prefix` (whose keys are `names`), first of:
    its other name here (`KEY_ALIASES`); a close spelling here (`heads` -> 'n_heads'); the recipe key or section
    of that name (or, at the top, of its other name) in another section, with its whole path (`model.state_size`
    -> 'model.mamba2.state_size', `steps` -> 'train.steps'), when at most three are and it is read where the
    user put it (not `model.n_heads` from inside `[model.mamba2]`, whose heads are its own), the sections of
    the components the table chooses (`chosen`) first; a looser spelling here."""
    alias = KEY_ALIASES.get(key.lower())
    if alias in names:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    if close:
        return f" (did you mean '{close[0]}'?)"
    keys = recipe_keys()
    paths = keys + sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})  # keys and sections
    leaf, here = (alias or key) if not prefix else key, prefix + key
    elsewhere = [k for k in paths if k.rsplit(".", 1)[-1] == leaf and k != here]
    component = prefix.split(".")[1] if prefix.startswith("model.") and prefix.count(".") == 2 else None
    spec = MIXERS.get(component) if component in MIXERS.names() else \
        CHANNELS.get(component) if component in CHANNELS.names() else None
    declared = declared_model_keys(spec) if spec is not None else None
    if spec is not None:  # a component's section: the `[model]` keys it reads (`model.attention.heads`) first
        own = declared if declared is not None else COMPONENT_MODEL_KEYS
        near = [k for k in own if k == KEY_ALIASES.get(key.lower())] or \
            difflib.get_close_matches(key, list(own), n=1, cutoff=0.8)
        if near:
            return f" (did you mean 'model.{near[0]}'?)"
    if declared is not None:  # and not the model keys it ignores
        elsewhere = [k for k in elsewhere if not (k.startswith("model.") and k.count(".") == 1
                                                  and k[6:] in COMPONENT_MODEL_KEYS and k[6:] not in declared)]
    own = [k for k in elsewhere if k.startswith(chosen)] if chosen else []
    if own:  # the section of the task or mixer this table chooses: `[task] kind = "recall"` + seq_len
        elsewhere = own
    if 1 <= len(elsewhere) <= 3:
        return f" (did you mean {' or '.join(repr(k) for k in elsewhere)}?)"
    close = did_you_mean(key, names)
    if close or not elsewhere:
        return close
    return f" ('{leaf}' is a key of {len(elsewhere)} sections, such as '{elsewhere[0]}')"


def _key_hint(key: str, r=None) -> str:
    """' (did you mean 'model.mixer'?)' for a dotted key that is not a recipe key: the recipe key ending in the same
    name (a section left out), else the closest spelling; keys of the recipe `r`'s own task and components first
    (`task.mqar.vocab_size` before `model.vocab_size`'s namesakes in other tasks' sections)."""
    keys = recipe_keys()
    keys = keys + sorted({k.rsplit(".", i)[0] for k in keys for i in range(1, k.count("."))} - set(keys))  # sections
    if r is not None:
        # a sweep that sets task.kind uses other tasks' sections (the suite recipes); one that sets the mixer, others'
        swept = set(getattr(r, "sweep", {}) or {})
        others = {f"task.{t}." for t in TASKS.names() if t != r.task.kind} if "task.kind" not in swept else set()
        if "model.mixer" not in swept and "model.ffn" not in swept:
            others |= {f"model.{c}." for c in (*MIXERS.names(), *CHANNELS.names())
                       if c not in (r.model.mixer, r.model.ffn)}
        keys = [k for k in keys if not any(f"{k}.".startswith(o) for o in others)]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.endswith(f".{key}")] or [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if r is not None and len(same_leaf) > 1:  # the task's own key before a general one of the same name
        own = [k for k in same_leaf if k.startswith(f"task.{r.task.kind}.")]
        same_leaf = own or same_leaf
    if len(same_leaf) == 1:
        return f" (did you mean '{same_leaf[0]}'?)"
    if same_leaf:
        return f" (did you mean one of {', '.join(repr(k) for k in same_leaf)}?)"
    section = key.rsplit(".", 1)[0] if "." in key else ""
    leaves = [k[len(section) + 1:] for k in keys if k.startswith(f"{section}.") and "." not in k[len(section) + 1:]]
    if leaves:  # a known section: its own keys by spelling (`train.foo` is no `train.lr`, however alike the paths)
        near = did_you_mean(leaf, leaves)
        return near.replace(" (did you mean '", f" (did you mean '{section}.", 1) if near else ""
    return did_you_mean(key, keys)


def _point_data(data: dict, origins: dict, sweep: dict, pairs: list, src: str) -> tuple[dict, dict]:
    """A grid point's raw recipe (`data` less its sweep, with the point's swept `pairs` set) and its origins, each
    swept key marked as its axis's (`FILE [sweep.KEY]`, `[sweep.zip]` for a zipped one), as `check_sweep` marks
    them: a swept `train.steps` then comes from another place than the file's warm-up, which `_fit_warmup`
    clamps with a note as for a plain `--set`."""
    zipped = {k for group in sweep.get(ZIP_KEY, []) for k in group}
    point, point_origins = copy.deepcopy(data), dict(origins)
    point.pop("sweep", None)
    # a whole table before the axes of keys inside it (`task.recall`, then `task.recall.seq_len`), whatever the
    # sweep's order, so that the table does not replace what those axes set
    for key, value in sorted(pairs, key=lambda kv: kv[0].count(".")):
        axis = f"sweep.{ZIP_KEY}" if key in zipped else f"sweep.{key}"
        # a copy: a later axis setting a key inside this table (`task.recall.seq_len`) must not change the sweep's own
        _set_path(point, key, copy.deepcopy(value), point_origins, f"{_src(origins, f'sweep.{key}', src)} [{axis}]")
    return point, point_origins


def _valid_with_other_axes(sweep: dict, data: dict, origins: dict, src: str, values: dict, tries: int = 64) -> bool:
    """Whether a grid point that takes an axis's `values` ({key: value}) makes a valid recipe: a value that clashes
    with the base recipe may suit the values of the other axes it meets (each point is built, and its errors
    named, when the sweep expands). The first `tries` such points are tried."""
    tried = 0
    for _, pairs in iter_grid(sweep):
        if any(dict(pairs).get(k) != v for k, v in values.items()) or len(pairs) == len(values):
            continue
        try:
            trial, trial_origins = _point_data(data, origins, sweep, pairs, src)
            build(trial, trial_origins, src)
            return True
        except RecipeError:
            tried += 1
            if tried >= tries:
                return False
    return False


def check_sweep(r, data: dict, origins: dict, src: str) -> None:
    """Every `[sweep]` key is a non-empty list and every value of every axis makes a valid recipe."""
    check_sweep_form(r, data, origins, src)
    check_sweep_axes(r, data, origins, src)


def check_sweep_form(r, data: dict, origins: dict, src: str) -> None:
    """The sweep's form: each axis a non-empty list of values under a recipe key, the zip and `best_lr_seeds`
    well made."""
    for key, values in r.sweep.items():
        path = f"sweep.{key}"
        where = _src(origins, path, src)
        if key in RESERVED:
            continue
        if not isinstance(values, list) or not values:
            raise RecipeError(where, path, f"must be a non-empty list of values, got {describe_value(values)}")
        if key == "sweep" or key.startswith("sweep."):
            raise RecipeError(where, path, "a sweep cannot sweep itself")
        if key in ("run.out_dir", "run.name", "run"):  # the points are folders of the one run.out_dir/run.name
            raise RecipeError(where, path, "the sweep's points are folders of one run directory (run.out_dir / "
                                           "run.name), so where they go cannot be swept; run the recipe once per "
                                           "folder with --set run.name=...")
    zip_src = _src(origins, f"sweep.{ZIP_KEY}", src)
    check_zip_form(r.sweep, zip_src)  # a point is made from the zip's groups below
    sources = {key: _src(origins, f"sweep.{key}", src) for key in r.sweep if key not in RESERVED}
    for key in sources:  # a misspelt axis first: the zip's checks would blame its partners or suggest the typo
        try:
            trial, _ = _point_data(data, origins, r.sweep, [(key, r.sweep[key][0])], src)
            _build_dataclass(schema.Recipe, trial, "", {}, src)
        except RecipeError as e:
            if e.message.startswith("unknown key") and (key == e.key or key.startswith(f"{e.key}.")):
                near = difflib.get_close_matches(key, RESERVED, n=1) if "." not in key else []  # the sweep's options
                hint = f" (did you mean 'sweep.{near[0]}'?)" if near else _key_hint(key, r)
                raise RecipeError(sources[key], f"sweep.{key}", f"not a recipe key{hint}") from None
            # any other error is the value's: the per-axis checks below name it
    check_zip(r.sweep, zip_src, sources)
    size = grid_size(r.sweep)
    if size > MAX_POINTS:  # before any check walks the points: a forgotten sweep.zip makes billions
        lengths = " x ".join(str(len(values)) for _, values in sweep_axes(r.sweep))
        # a zip that a --set emptied or changed is the likely cause; else the file (or --set) of the axes
        axes = {sources[k] for k in sources}
        where = origins.get(f"sweep.{ZIP_KEY}") or (axes.pop() if len(axes) == 1 else "--set" if "--set" in axes
                                                     else src)
        raise RecipeError(where, "sweep", f"{size:,} points ({lengths}, the product of its axes), more than "
                          f"{MAX_POINTS:,}; zip the axes that advance together (sweep.zip) or sweep fewer values")
    check_best_lr_seeds(r.sweep, r.run.seed, _src(origins, f"sweep.{BEST_LR_SEEDS_KEY}", src))


def check_sweep_axes(r, data: dict, origins: dict, src: str, resolving: list | None = None) -> None:
    """Every value of every axis makes a valid recipe with the rest of the recipe: the base's values of the other
    keys, or where the base itself is contradictory those of `resolving`, a grid point that is not (pairs)."""
    zip_src = _src(origins, f"sweep.{ZIP_KEY}", src)
    sources = {key: _src(origins, f"sweep.{key}", src) for key in r.sweep if key not in RESERVED}
    for keys, points in sweep_axes(r.sweep):  # each point of each axis must itself be a valid recipe
        path = f"sweep.{keys[0]}" if len(keys) == 1 else f"sweep.{ZIP_KEY}"
        where = sources[keys[0]] if len(keys) == 1 else zip_src
        # marks the keys this axis sets, to tell whose fault an error is: one mark per place that set them, so that
        # keys set in one place still compare as set in one place (`_fit_warmup`)
        mark_of = {k: f"{sources[k]} [{path}]" for k in keys}
        marks = {m: [k for k in keys if mark_of[k] == m] for m in mark_of.values()}
        others = [(k, v) for k, v in resolving or () if k not in keys]
        for i, values in enumerate(points):
            trial, trial_origins = _point_data(data, origins, r.sweep, others, src)
            for key, value in zip(keys, values):
                try:
                    _set_path(trial, key, value, trial_origins, mark_of[key])
                except RecipeError as e:  # a key that runs through a value (`train.lr.x`)
                    raise RecipeError(sources[key], f"sweep.{key}", f"not a recipe key ({e.key}: {e.message})") \
                        from None
            what = f"value {values[0]!r}" if len(keys) == 1 else \
                "values " + ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
            try:
                build(trial, trial_origins, src)
            except RecipeError as e:
                if _valid_with_other_axes(r.sweep, data, origins, src, dict(zip(keys, values))):
                    continue  # `d_model = [48, 96]` x `n_heads = [3, 6]`: 3 heads fit 48, not the base's 128
                unknown = [k for k in keys if k == e.key or k.startswith(f"{e.key}.")]
                if e.source in marks and e.message.startswith("unknown key") and unknown:
                    hint = _key_hint(unknown[0], r)
                    raise RecipeError(sources[unknown[0]], f"sweep.{unknown[0]}", f"not a recipe key{hint}") from None
                through = [k for k in keys if k.startswith(f"{e.key}.")]
                if e.source in marks and through and "got a table" in e.message:  # `train.lr.x`: lr is a value
                    raise RecipeError(sources[through[0]], f"sweep.{through[0]}", f"not a recipe key ({e.key}: is a "
                                      f"value, not a table)") from None
                if e.source in marks and len(keys) > 1 and sources[marks[e.source][0]] != zip_src:
                    # a zipped list set elsewhere than the zip (by --set, or in a recipe that extends the zip's):
                    # the error goes to that list's value, where it was set
                    key = next((k for k in marks[e.source] if e.key == k or e.key.startswith((f"{k}.", f"{k}["))),
                               marks[e.source][0])
                    inner = e.key[len(key):] if e.key.startswith((f"{key}.", f"{key}[")) else ""
                    partners = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values) if k != key and v != {})
                    raise RecipeError(sources[key], f"sweep.{key}[{i}]{inner}", e.message +
                                      (f" (zipped with {partners})" if partners else "")) from None
                if e.source in marks:  # the swept value itself is at fault
                    raise RecipeError(where, path, f"{what}: {e.message}") from None
                if e.source != "--set" and (e.source != src or where == "--set"):  # the clashing key comes from a
                    # recipe this one extends (which the user may never have opened), or the axis is the user's
                    # latest word (--set): the error goes where the axis was set
                    raise RecipeError(where, path, f"{what}: clashes with {e.key} (from {e.source}): "
                                      f"{e.message}") from None
                raise RecipeError(e.source, e.key, f"{e.message} (with {path} = {what.split(' ', 1)[1]})") from None
