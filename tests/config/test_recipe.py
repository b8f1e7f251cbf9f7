"""Recipe schema, docs coverage, extends, --set, sweeps, TOML round trip and the shipped recipes."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import tomllib
import typing
from pathlib import Path

import pytest

from dcablate import config as R
from dcablate.config.toml_out import toml_value
from dcablate.errors import RecipeError, UserError

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


# ----------------------------------------------------------------------------------------- schema walk


def schema_keys(cls=R.Recipe, prefix: str = ""):
    """(dotted path, type, field) for every key of the schema, tables and list-of-table items included.

    Keys of a list of tables (`[[task.mqar.train]]`) are documented as `task.mqar.train.seq_len`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        yield path, tp, f
        if dataclasses.is_dataclass(tp):
            yield from schema_keys(tp, path + ".")
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            assert dataclasses.is_dataclass(item), f"{path}: only lists of tables are expected in the schema"
            yield from schema_keys(item, path + ".")


SCHEMA = {path: (tp, f) for path, tp, f in schema_keys()}
ALL_KEYS = sorted(SCHEMA) + ["extends"]
TYPE_WORDS = {int: "integer", float: "float", str: "string", bool: "boolean", dict: "table"}


def type_word(tp) -> str:
    if typing.get_origin(tp) is typing.Union:  # Optional[X]: unset means "auto"
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if dataclasses.is_dataclass(tp):
        return "table"
    if typing.get_origin(tp) is list:
        return "array of tables"
    return TYPE_WORDS[tp]


def default_of(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    value = f.default_factory()
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


@functools.lru_cache(maxsize=1)
def doc_rows() -> dict[str, list[str]]:
    """Rows of the key tables (header `| Key | Type | ...`): dotted key -> the remaining cells."""
    rows, in_key_table = {}, False
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["Key", "Type"]:
            in_key_table = True
            continue
        if not in_key_table or set(cells[0]) <= {"-"}:
            continue
        m = re.fullmatch(r"`([A-Za-z0-9_.]+)`", cells[0])
        assert m, f"docs/recipes.md: first cell of a key row is not a `dotted.key`: {line}"
        assert m.group(1) not in rows, f"docs/recipes.md documents `{m.group(1)}` twice"
        assert len(cells) == 6, f"docs/recipes.md: row of `{m.group(1)}` has {len(cells)} cells, expected 6"
        rows[m.group(1)] = cells[1:]
    return rows


def test_schema_walk_sees_nested_tables_and_segments():
    assert {"run.name", "model.conv.kind", "model.gated_deltanet.expand_v", "task.mqar.vocab_size",
            "task.mqar.train.seq_len", "task.mqar.test.num_examples", "sweep"} <= set(SCHEMA)
    assert len(SCHEMA) > 50


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_key_is_documented(key):
    assert f"`{key}`" in DOC.read_text(), f"docs/recipes.md does not mention `{key}`"
    assert key in doc_rows(), f"docs/recipes.md has no table row for `{key}`"


def test_docs_document_no_stale_keys():
    stale = set(doc_rows()) - set(ALL_KEYS)
    assert not stale, f"docs/recipes.md documents keys the schema does not have: {sorted(stale)}"


def _unticked(cell: str) -> str:
    m = re.fullmatch(r"`(.*)`", cell)
    assert m, f"expected one `code` span, got {cell!r}"
    return m.group(1)


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_doc_row_matches_schema(key):
    """Type, default, choices and range bounds in the docs agree with the dataclass fields."""
    tp, f = SCHEMA[key]
    typ, default, allowed, meaning, example = doc_rows()[key]
    assert typ == type_word(tp), f"`{key}`: docs say type {typ!r}, schema has {type_word(tp)!r}"
    assert meaning, f"`{key}`: no description"
    if dataclasses.is_dataclass(tp):
        return
    if default_of(f) is None:
        assert default == "unset", f"`{key}`: an optional key's default should read 'unset'"
    else:
        assert tomllib.loads(f"v = {_unticked(default)}")["v"] == default_of(f), f"`{key}`: default differs"
    meta = f.metadata
    for choice in meta.get("choices") or ():
        assert f"`{choice}`" in allowed, f"`{key}`: choice {choice!r} missing from {allowed!r}"
    numbers = {float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?", allowed)}
    for bound in (meta.get("min"), meta.get("max")):
        if bound is not None:
            assert float(bound) in numbers, f"`{key}`: bound {bound} missing from {allowed!r}"
    if meta.get("min") is not None:
        op = ">" if meta.get("min_open") else ">="
        lo = f"{meta['min']:g}"
        assert f"{op} {lo}" in allowed or f"{lo} {'<' if meta.get('min_open') else '<='} x" in allowed, \
            f"`{key}`: lower bound should read '{op} {lo}' in {allowed!r}"


def _set_example(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        tp = SCHEMA[".".join(parts[: i + 1])][0]
        if typing.get_origin(tp) is list:  # a segment key: one segment table holding it
            node[part] = [{parts[-1]: value}]
            return
        node = node.setdefault(part, {})
    node[parts[-1]] = value


@pytest.mark.parametrize("key", [k for k in sorted(SCHEMA) if not dataclasses.is_dataclass(SCHEMA[k][0])
                                 and typing.get_origin(SCHEMA[k][0]) is not list and k != "sweep"])
def test_doc_example_is_a_valid_recipe_line(key):
    example = _unticked(doc_rows()[key][4])
    parsed = tomllib.loads(example)
    assert list(parsed) == [key.rsplit(".", 1)[-1]], f"`{key}`: example {example!r} sets another key"
    data: dict = {}
    _set_example(data, key, parsed[key.rsplit(".", 1)[-1]])
    R.build(data)  # the example value is valid on its own


# ----------------------------------------------------------------------------------------- extends


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_deep_merge_across_three_files(tmp_path, monkeypatch):
    write(tmp_path / "common" / "grand.toml", """
        [model]
        d_model = 256
        n_heads = 4
        [model.conv]
        kind = "static"
        width = 3
        [task.mqar]
        vocab_size = 512
        [[task.mqar.train]]
        seq_len = 64
        num_kv_pairs = 4
        [[task.mqar.train]]
        seq_len = 128
        num_kv_pairs = 8
        [train]
        lr = 0.002
        steps = 300
        [sweep]
        "model.n_layers" = [1, 2]
    """.replace("\n        ", "\n"))
    write(tmp_path / "exp" / "base" / "parent.toml", """
extends = "../../common/grand.toml"
[model]
n_layers = 3
[model.conv]
width = 2
[train]
lr = 0.003
""")
    child = write(tmp_path / "exp" / "child.toml", """
extends = "base/parent.toml"
[model.conv]
activation = "none"
[[task.mqar.train]]
seq_len = 32
num_kv_pairs = 2
[train]
steps = 200
[sweep]
"model.n_layers" = [4]
""")
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "x", "").parent)  # paths are relative to the file, not cwd
    r = R.load(str(child))
    assert (r.model.d_model, r.model.n_heads, r.model.n_layers) == (256, 4, 3)  # tables merge
    assert (r.model.conv.kind, r.model.conv.width, r.model.conv.activation) == ("static", 2, "none")
    assert r.task.mqar.vocab_size == 512
    assert [(s.seq_len, s.num_kv_pairs) for s in r.task.mqar.train] == [(32, 2)]  # lists replace
    assert (r.train.lr, r.train.steps) == (0.003, 200)
    assert r.sweep == {"model.n_layers": [4]}  # a sweep list replaces, too
    assert "extends" not in r.to_dict()


def test_extends_from_the_recipes_own_folder_by_relative_name(tmp_path, monkeypatch):
    write(tmp_path / "a" / "base.toml", "[model]\nd_model = 64\n")
    write(tmp_path / "a" / "child.toml", 'extends = "base.toml"\n[model]\nn_heads = 4\n')
    monkeypatch.chdir(tmp_path)
    r = R.load("a/child.toml")
    assert (r.model.d_model, r.model.n_heads) == (64, 4)


def test_an_empty_sweep_in_a_child_drops_the_parents_sweep(tmp_path):
    """Tables merge, but an empty `[sweep]` replaces the parent's: a child's way to train one run of it; a child
    sweeping its own keys still adds them to the parent's."""
    write(tmp_path / "base.toml", '[sweep]\n"train.lr" = [1e-3, 3e-3]\n')
    one = write(tmp_path / "one.toml", 'extends = "base.toml"\n[sweep]\n')
    more = write(tmp_path / "more.toml", 'extends = "base.toml"\n[sweep]\n"run.seed" = [0, 1]\n')
    assert R.load(str(one)).sweep == {}
    assert R.load(str(more)).sweep == {"train.lr": [1e-3, 3e-3], "run.seed": [0, 1]}


def test_extends_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    shipped = write(tmp_path / "pkg" / "fakebase.toml", "[model]\nd_model = 96\n")
    monkeypatch.setattr("dcablate.config.loading.shipped_recipes", lambda: {"fakebase": shipped})
    child = write(tmp_path / "child.toml", 'extends = "fakebase"\n[train]\nsteps = 7\nwarmup_steps = 0\n')
    r = R.load(str(child))
    assert (r.model.d_model, r.train.steps) == (96, 7)


def test_a_sweep_axis_in_both_forms(tmp_path):
    """`"model.conv.kind" = [..]` and `[sweep.model.conv] kind = [..]` are one axis: both in one file is an error
    naming it; a child's axis replaces its parent's whichever form each wrote it in."""
    both = write(tmp_path / "both.toml", '[sweep]\n"model.conv.kind" = ["none", "static"]\n'
                                         '[sweep.model.conv]\nkind = ["dynamic"]\n')
    with pytest.raises(RecipeError, match=r"both.toml: sweep.model.conv.kind: set twice in \[sweep\]"):
        R.expand(str(both))
    write(tmp_path / "parent.toml", '[sweep.model.conv]\nkind = ["none"]\n')
    child = write(tmp_path / "child.toml", 'extends = "parent.toml"\n[sweep]\n"model.conv.kind" = ["static"]\n')
    assert [r.model.conv.kind for _, r in R.expand(str(child))[1]] == ["static"]
    write(tmp_path / "parent2.toml", '[sweep]\n"model.conv.kind" = ["none"]\n')
    child = write(tmp_path / "child2.toml", 'extends = "parent2.toml"\n[sweep.model.conv]\nkind = ["dynamic"]\n')
    assert [r.model.conv.kind for _, r in R.expand(str(child))[1]] == ["dynamic"]


@pytest.mark.parametrize("files, start, names", [
    ({"a.toml": 'extends = "b.toml"', "b.toml": 'extends = "a.toml"'}, "a.toml", ["a.toml", "b.toml"]),
    ({"a.toml": 'extends = "a.toml"'}, "a.toml", ["a.toml"]),
    ({"a.toml": 'extends = "b.toml"', "b.toml": 'extends = "c.toml"', "c.toml": 'extends = "b.toml"'},
     "a.toml", ["b.toml", "c.toml"]),
], ids=["a-b-a", "self", "a-b-c-b"])
def test_extends_cycle_rejected(tmp_path, files, start, names):
    for name, text in files.items():
        write(tmp_path / name, text + "\n")
    with pytest.raises(RecipeError) as e:
        R.load(str(tmp_path / start))
    assert e.value.key == "extends"
    msg = str(e.value)
    assert "extends" in msg and "cycle" in msg
    for name in names:
        assert name in msg


def test_extends_missing_parent(tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "nope/base.toml"\n')
    with pytest.raises(RecipeError) as e:
        R.load(str(child))
    assert e.value.key == "extends"
    assert "child.toml" in str(e.value) and "nope" in str(e.value) and "\n" not in str(e.value)


def test_extends_must_be_a_string(tmp_path):
    child = write(tmp_path / "child.toml", "extends = 3\n")
    with pytest.raises(RecipeError, match="extends: must be a string"):
        R.load(str(child))


def test_error_in_a_parent_names_the_parent(tmp_path):
    write(tmp_path / "base.toml", "[model]\nn_layers = 0\n")
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[model]\nd_model = 64\n')
    with pytest.raises(RecipeError) as e:
        R.load(str(child))
    assert e.value.key == "model.n_layers" and e.value.source.endswith("base.toml")


# ----------------------------------------------------------------------------------------- --set


@pytest.mark.parametrize("text, key, value", [
    ("train.steps=10", "train.steps", 10),
    ("train.lr=3e-3", "train.lr", 3e-3),
    ("train.lr = 0.5", "train.lr", 0.5),
    ("train.beta2=1", "train.beta2", 1),
    ("log.progress=false", "log.progress", False),
    ("model.tie_embeddings=true", "model.tie_embeddings", True),
    ("model.mixer=attention", "model.mixer", "attention"),
    ("run.out_dir=runs/ablation-1", "run.out_dir", "runs/ablation-1"),
    ("run.name=my run", "run.name", "my run"),
    ('run.name="quoted = with equals"', "run.name", "quoted = with equals"),
    ("run.name='literal'", "run.name", "literal"),
    ("sweep.model.d_model=[64, 128]", "sweep.model.d_model", [64, 128]),
    ('sweep.model.mixer=["attention", "gated_deltanet"]', "sweep.model.mixer", ["attention", "gated_deltanet"]),
    ("task.mqar.test=[{seq_len=256, num_kv_pairs=16, num_examples=500}]", "task.mqar.test",
     [{"seq_len": 256, "num_kv_pairs": 16, "num_examples": 500}]),
    ("model={d_model=64, n_heads=4}", "model", {"d_model": 64, "n_heads": 4}),
])
def test_parse_override(text, key, value):
    k, v = R.parse_override(text)
    assert (k, v) == (key, value)
    assert type(v) is type(value)


@pytest.mark.parametrize("text", [
    "train.lr",                      # no '='
    "=3",                            # no key
    " =3",
    "train.lr=",                     # no value
    "model.mixer=[attention",        # unbalanced bracket
    'run.name="unterminated',        # unbalanced quote
    "task.mqar.test=[{seq_len=256,", # broken inline table
    "train.lr=1=2",                  # '=' in a bare value
    "sweep.model.mixer=[attention, gated_deltanet]",  # bare words inside a list are not TOML
])
def test_parse_override_rejects_bad_syntax(text):
    with pytest.raises(UserError) as e:
        R.parse_override(text)
    assert str(e.value).startswith("--set ") and "\n" not in str(e.value)


def test_overrides_apply_in_order_and_validate(tmp_path):
    path = write(tmp_path / "r.toml", "[model]\nd_model = 64\n[train]\nsteps = 10\nwarmup_steps = 0\n")
    r = R.load(str(path), ["train.lr=2e-3", "model.mixer=gated_deltanet", "train.lr=5e-3",
                           "task.mqar.test=[{seq_len=256, num_kv_pairs=16, num_examples=500}]"])
    assert (r.train.lr, r.model.mixer, r.model.d_model) == (5e-3, "gated_deltanet", 64)
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in r.task.mqar.test] == [(256, 16, 500)]
    with pytest.raises(RecipeError) as e:
        R.load(str(path), ["model.d_modle=3"])
    assert (e.value.source, e.value.key) == ("--set", "model.d_modle")
    assert "did you mean 'd_model'" in str(e.value)


# ----------------------------------------------------------------------------------------- sweeps


SWEEP_QUOTED = """
[train]
steps = 10
warmup_steps = 0
[sweep]
"model.mixer" = ["attention", "gated_deltanet"]
"model.conv.kind" = ["none", "static"]
"train.lr" = [1e-3, 2e-3, 3e-3]
"""

SWEEP_NESTED = """
[train]
steps = 10
warmup_steps = 0
[sweep.model]
mixer = ["attention", "gated_deltanet"]
conv.kind = ["none", "static"]
[sweep.train]
lr = [1e-3, 2e-3, 3e-3]
"""


@pytest.mark.parametrize("text", [SWEEP_QUOTED, SWEEP_NESTED], ids=["quoted", "nested"])
def test_sweep_expansion(tmp_path, text):
    base, points = R.expand(str(write(tmp_path / "s.toml", text)))
    assert base.sweep == {"model.mixer": ["attention", "gated_deltanet"], "model.conv.kind": ["none", "static"],
                          "train.lr": [1e-3, 2e-3, 3e-3]}
    assert len(points) == 2 * 2 * 3
    expected = [f"mixer={m},conv.kind={c},lr={lr}" for m, c, lr in
                itertools.product(["attention", "gated_deltanet"], ["none", "static"], [0.001, 0.002, 0.003])]
    assert [name for name, _ in points] == expected
    for (name, r), (m, c, lr) in zip(points, itertools.product(["attention", "gated_deltanet"], ["none", "static"],
                                                                 [1e-3, 2e-3, 3e-3])):
        assert (r.model.mixer, r.model.conv.kind, r.train.lr, r.sweep) == (m, c, lr, {})
        assert r.train.steps == 10
    assert len({r.digest() for _, r in points}) == len(points)


def test_sweep_forms_are_equivalent(tmp_path):
    _, a = R.expand(str(write(tmp_path / "a.toml", SWEEP_QUOTED)))
    _, b = R.expand(str(write(tmp_path / "b.toml", SWEEP_NESTED)))
    assert [(n, r.to_dict()) for n, r in a] == [(n, r.to_dict()) for n, r in b]


def test_no_sweep_is_one_unnamed_point(tmp_path):
    base, points = R.expand(str(write(tmp_path / "r.toml", "[model]\nd_model = 64\n")))
    assert len(points) == 1 and points[0][0] == "" and points[0][1].to_dict() == base.to_dict()


def test_sweep_names_keep_other_sections_and_write_booleans_lowercase(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep]\n"log.every" = [5]\n"model.tie_embeddings" = [true, false]\n'
                                      '"task.mqar.vocab_size" = [64]\n')
    _, points = R.expand(str(path))
    assert [n for n, _ in points] == ["log.every=5,tie_embeddings=true,mqar.vocab_size=64",
                                      "log.every=5,tie_embeddings=false,mqar.vocab_size=64"]


def test_swept_tables_name_the_keys_they_set_and_empty_ones_nothing(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep]\n"task.mqar" = [{}, {vocab_size = 64, filler = "zero"}]\n')
    _, points = R.expand(str(path))
    assert [n for n, _ in points] == ["defaults", "mqar.vocab_size=64,mqar.filler=zero"]


def test_two_points_with_one_name_are_refused(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep]\n"model.d_model" = [64, 64]\n')
    with pytest.raises(RecipeError, match=r"sweep: points 1 and 2 both get the name 'd_model=64'"):
        R.expand(str(path))


def test_a_point_name_too_long_for_a_folder_keeps_its_start_and_a_digest_of_the_whole(tmp_path):
    """File systems take folder names of 255 bytes: a long name (a swept task table written out) is cut to 200
    bytes with a digest of the whole, so the points keep distinct names that are the same on every run."""
    rows = ", ".join(f'{{vocab_size = {v}, seq_len = 512, num_train_examples = 1600, num_test_examples = 1000, '
                     f'max_key_len = 3, max_value_len = 4, data_seed = 12345}}' for v in (64, 128))
    path = write(tmp_path / "r.toml", f'[sweep]\n"task.kind" = ["fuzzy_recall"]\n"task.fuzzy_recall" = [{rows}]\n')
    _, points = R.expand(str(path))
    names = [n for n, _ in points]
    assert len(set(names)) == 2 and all(len(n.encode()) == 200 and re.search(r"~[0-9a-f]{12}$", n) for n in names)
    assert names[0].startswith("kind=fuzzy_recall,fuzzy_recall.vocab_size=64,") and names == [n for n, _ in
                                                                                           R.expand(str(path))[1]]


def test_a_grid_of_more_than_ten_thousand_points_is_refused_before_it_is_built(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep]\n"train.lr" = [' + ", ".join(f"{i}e-4" for i in range(1, 101))
                 + ']\n"run.seed" = [' + ", ".join(str(i) for i in range(101)) + "]\n")
    with pytest.raises(RecipeError, match=r"r\.toml: sweep: 10,100 points \(100 x 101, the product of its axes\), "
                                          r"more than 10,000; zip the axes"):
        R.expand(str(path))


def test_sweep_from_set_overrides(tmp_path):
    path = write(tmp_path / "r.toml", SWEEP_QUOTED)
    _, points = R.expand(str(path), ["sweep.train.lr=[0.01]", "sweep.model.d_model=[64, 256]"])
    assert len(points) == 2 * 2 * 1 * 2
    assert points[0][0] == "mixer=attention,conv.kind=none,lr=0.01,d_model=64"


def _suite_recall(**row1) -> list:
    """The suite recipes' swept `task.recall` tables (`sweep."task.recall"`, 25 of them), row 1 replaced."""
    rows = tomllib.loads(R.shipped_recipes()["paper/suite_base"].read_text())["sweep"]["task.recall"]
    return [row1 if i == 1 else row for i, row in enumerate(rows)]


def test_a_set_inside_a_swept_table_is_refused_and_the_ways_it_names_work(tmp_path, monkeypatch):
    """The suite recipes sweep `task.recall` whole: a `--set task.recall.vocab_size` would be overridden at every
    point, so it is refused, naming the axis and its file; the error's ways of setting it work."""
    from dcablate.config import loading

    monkeypatch.setattr(loading, "_said", set())  # the note of the last way (an unused task) is said here, not later
    with pytest.raises(UserError) as e:
        R.expand("paper/suite_attention", ["task.recall.vocab_size=32"])
    line = str(e.value)
    assert line.startswith("--set task.recall.vocab_size=32: task.recall is swept as whole tables ([sweep] in ")
    assert "suite_base.toml" in line and "\n" not in line
    rows = _suite_recall(vocab_size=32)
    _, points = R.expand("paper/suite_attention", [f"sweep.task.recall={toml_value(rows)}"])
    assert {r.task.recall.vocab_size for n, r in points if "recall.vocab_size=32" in n} == {32}
    own = write(tmp_path / "mine.toml", f'extends = "paper/suite_attention"\n[sweep]\n"task.recall" = {toml_value(rows)}\n')
    assert any(r.task.recall.vocab_size == 32 for _, r in R.expand(str(own))[1])
    base, points = R.expand("paper/suite_attention", ["sweep={}", "task.recall.vocab_size=32"])
    assert base.task.recall.vocab_size == 32 and len(points) == 1


def test_a_set_of_a_table_is_refused_only_where_it_names_a_swept_key(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep]\n"model.conv.kind" = ["none", "static"]\n')
    with pytest.raises(UserError, match=r"^--set model.conv=\{kind=\"none\"\}: sets model.conv.kind, which is swept"):
        R.expand(str(path), ['model.conv={kind="none"}'])
    with pytest.raises(UserError, match=r"^--set model=\{conv=\{kind=\"none\"\}\}: sets model.conv.kind"):
        R.expand(str(path), ['model={conv={kind="none"}}'])
    _, points = R.expand(str(path), ["model.conv={width=3}"])  # the sweep still sets kind; width is taken
    assert [(r.model.conv.kind, r.model.conv.width) for _, r in points] == [("none", 3), ("static", 3)]
    with pytest.raises(UserError, match=r"^--set model.d_model=48: model.d_model is swept \(by --set: \[32, 64\]\)"):
        R.expand(str(path), ["sweep.model.d_model=[32, 64]", "model.d_model=48"])


ZIP_BASE = '[sweep]\n"model.d_model" = [64, 128]\n"train.lr" = [1e-3, 3e-3]\nzip = [["model.d_model", "train.lr"]]\n'


@pytest.mark.parametrize("child, overrides, source, key, fragment", [
    ('"train.lr" = [1e-3]\n', [], "r.toml", "sweep.train.lr",
     "1 value, but sweep.zip ({base}) zips it with model.d_model (2 values); zipped keys need lists of equal length"),
    ("", ["sweep.train.lr=[1e-3, 3e-3, 1e-2]"], "--set", "sweep.train.lr",
     "3 values, but sweep.zip ({base}) zips it with model.d_model (2 values)"),
    ('"train.lr" = [1e-3, -1]\n', [], "r.toml", "sweep.train.lr[1]", "must be > 0.0, got -1.0 (zipped with "
     "model.d_model=128)"),
    ("", ["sweep.model.d_model=[64, 96.5]"], "--set", "sweep.model.d_model[1]", "must be an integer, got float 96.5 "
     "(zipped with train.lr=0.003)"),
    ('"train.lr" = [1e-3]\n"model.d_model" = [64, 128, 256]\n', [], "r.toml", "sweep.model.d_model",
     "3 values, but sweep.zip ({base}) zips it with train.lr (1 value)"),
    ("", ["sweep.model.d_model=[64]", "sweep.train.lr=[1e-3, 3e-3, 1e-2]"], "--set", "sweep.model.d_model", "1 value"),
], ids=["child-length", "set-length", "child-value", "set-value", "child-sets-both", "set-sets-both"])
def test_zip_errors_blame_the_list_where_it_was_set(tmp_path, child, overrides, source, key, fragment):
    """A zipped list of another length, or a zipped value no recipe takes, set elsewhere than the zip (in a recipe
    that extends the zip's, or by --set) is blamed there under its own key, not on the zip's file."""
    base = write(tmp_path / "base.toml", ZIP_BASE)
    path = write(tmp_path / "r.toml", 'extends = "base.toml"\n' + (f"[sweep]\n{child}" if child else ""))
    with pytest.raises(RecipeError) as e:
        R.expand(str(path), overrides)
    where = str(path) if source == "r.toml" else source
    assert (e.value.source, e.value.key) == (where, key) and fragment.format(base=base) in str(e.value)


@pytest.mark.parametrize("zip_value, overrides", [("1", []), ("[1]", []), ('"train.lr"', []),
                                                   (None, ["sweep.zip=1"])], ids=["int", "list-of-int", "str", "set"])
def test_a_zip_that_is_no_list_of_lists_is_one_error_where_it_was_set(tmp_path, zip_value, overrides):
    """The zip's form is checked before any grid point is made from it (an int zip was a TypeError traceback)."""
    text = ZIP_BASE.replace('zip = [["model.d_model", "train.lr"]]\n', "" if zip_value is None else
                            f"zip = {zip_value}\n")
    path = write(tmp_path / "r.toml", text)
    with pytest.raises(RecipeError) as e:
        R.expand(str(path), overrides)
    assert (e.value.source, e.value.key) == ("--set" if overrides else str(path), "sweep.zip")
    assert "must be a list of lists of swept keys" in str(e.value)


def test_zip_errors_of_lists_the_zips_file_set_name_the_zip(tmp_path):
    """Where one file set the zip and all its lists, the group is blamed at `sweep.zip`, with every length or value."""
    base = write(tmp_path / "base.toml", ZIP_BASE.replace("3e-3]", "]"))
    with pytest.raises(RecipeError) as e:
        R.expand(str(write(tmp_path / "r.toml", 'extends = "base.toml"\n[model]\nn_layers = 3\n')))
    assert (e.value.source, e.value.key) == (str(base), "sweep.zip")
    assert "zipped keys need lists of equal length, got model.d_model: 2, train.lr: 1" in str(e.value)


def test_a_zip_list_left_as_the_zips_file_had_it_is_blamed_where_the_others_were_set(tmp_path):
    """A recipe that re-lists most of an inherited zip group with new lengths but leaves one list out is told to set
    that list too, at its own file (it was blamed at `sweep.zip` in the parent's file, which reads as a broken
    shipped recipe)."""
    base = write(tmp_path / "base.toml", ZIP_BASE.replace('zip = [["model.d_model", "train.lr"]]',
                 '"model.n_layers" = [2, 3]\nzip = [["model.d_model", "train.lr", "model.n_layers"]]'))
    path = write(tmp_path / "r.toml", 'extends = "base.toml"\n[sweep]\n"model.d_model" = [64, 96, 128]\n'
                 '"train.lr" = [1e-3, 2e-3, 3e-3]\n')
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert (e.value.source, e.value.key) == (str(path), "sweep.model.n_layers")
    assert (f"keeps the 2 values of {base}, but sweep.zip zips it with model.d_model, train.lr (3 values each, set "
            "here); set sweep.model.n_layers here too, with 3 values") in str(e.value)
    with pytest.raises(RecipeError) as e:
        R.expand(str(tmp_path / "base.toml"), ["sweep.train.lr=[1e-3]", "sweep.model.d_model=[64]"])
    assert (e.value.source, e.value.key) == ("--set", "sweep.model.n_layers")


def test_axes_whose_values_fit_each_other_but_not_the_base_recipe_make_a_grid(tmp_path):
    """`d_model = [48, 96]` x `n_heads = [3, 6]`: 3 heads do not divide the base recipe's d_model, but every point
    of the grid is valid, so the sweep expands (each axis's values were checked against the base recipe alone)."""
    path = write(tmp_path / "r.toml", 'extends = "quickstart"\n[sweep]\n"model.d_model" = [48, 96]\n'
                 '"model.n_heads" = [3, 6]\n')
    _, points = R.expand(str(path))
    assert {(r.model.d_model, r.model.n_heads) for _, r in points} == {(48, 3), (48, 6), (96, 3), (96, 6)}


def test_a_fixed_setting_that_fits_every_swept_value_but_not_the_base_makes_a_grid(tmp_path):
    """`n_heads = 3` with `d_model` swept over [48, 96, 144]: the default d_model 128 is no point's, so it does not
    refuse the recipe (it did, pointing at a width the user never chose); a width that does not fit is named."""
    path = write(tmp_path / "r.toml", 'extends = "quickstart"\n[model]\nn_heads = 3\n[sweep]\n'
                 '"model.d_model" = [48, 96, 144]\n')
    _, points = R.expand(str(path))
    assert {(r.model.d_model, r.model.n_heads) for _, r in points} == {(48, 3), (96, 3), (144, 3)}
    with pytest.raises(RecipeError) as e:
        R.expand(str(path), ["sweep.model.d_model=[48, 100]"])
    assert (e.value.source, e.value.key) == ("--set", "sweep.model.d_model")
    assert "d_model 100 is not divisible by n_heads 3" in str(e.value)


def test_a_fixed_setting_that_fits_no_swept_value_names_the_first_point_not_the_base(tmp_path):
    path = write(tmp_path / "r.toml", 'extends = "quickstart"\n[model]\nn_heads = 5\n[sweep]\n'
                 '"model.d_model" = [48, 96]\n')
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert (e.value.source, e.value.key) == (str(path), "model.n_heads")
    assert "d_model 48 is not divisible by n_heads 5" in e.value.message and "128" not in e.value.message
    assert "first point" in e.value.message and "d_model=48;" in e.value.message


BASE_THREE_HEADS = 'extends = "quickstart"\n[model]\nn_heads = 3\n[sweep]\n'  # quickstart's d_model 64: no 3 heads


@pytest.mark.parametrize("axes, key, says", [
    ('zip = [["model.d_model", "train.nope"]]\n"model.d_model" = [48, 96]\n', "sweep.zip",
     "'train.nope' is not a key of [sweep]"),
    ('"model.d_model" = [48, 96]\n"train.micro_batch_size" = [8, 99999]\n', "sweep.train.micro_batch_size",
     "99999 is more than train.batch_size 64"),
    ('"model.d_modl" = [48, 96]\n', "sweep.model.d_modl", "did you mean 'model.d_model'"),
    ('"sweep.x" = [1]\n"model.d_model" = [48]\n', "sweep.sweep.x", "a sweep cannot sweep itself"),
    ('"model.d_model" = 48\n', "sweep.model.d_model", "must be a non-empty list of values"),
])
def test_a_base_contradiction_the_sweep_resolves_leaves_each_axis_its_own_error(tmp_path, axes, key, says):
    """Under a base that no point shares (3 heads of quickstart's d_model 64), a fault of the sweep itself or of
    another axis's value is named as it would be under a consistent base, not as the base's width."""
    path = write(tmp_path / "r.toml", BASE_THREE_HEADS + axes)
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert e.value.key == key and says in e.value.message and "d_model 64" not in e.value.message


def test_a_resolving_width_late_in_a_large_grid_is_found(tmp_path):
    """d_model 96 fits 3 heads, 50 does not; with 80 points of d_model 50 before the first of 96 in grid order,
    the width 50 is still named as the axis's bad value (not 'no point fits'), and quickly."""
    axes = ('"model.d_model" = [50, 96]\n"train.lr" = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3]\n'
            '"run.seed" = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n')
    with pytest.raises(RecipeError) as e:
        R.expand(str(write(tmp_path / "r.toml", BASE_THREE_HEADS + axes)))
    assert "d_model 50 is not divisible by n_heads 3" in e.value.message and "no other point" not in e.value.message
    assert "sweep.model.d_model" in str(e.value)  # the axis is named (as the key, or beside the clashing one)


def test_a_steps_axis_shorter_than_the_files_warmup_clamps_it_as_a_plain_set_does(caplog):
    """`--set 'sweep.train.steps=[5, 1000]'` on a recipe warming up over 50 steps: the point of 5 steps comes from
    the sweep, not from the file, so its warm-up is clamped with a note (it was refused after the note)."""
    with caplog.at_level("WARNING", logger="dcablate"):
        _, points = R.expand("quickstart", ["sweep.train.steps=[5, 1000]"])
    assert {(r.train.steps, r.train.warmup_steps) for _, r in points} == {(5, 5), (1000, 50)}
    assert "warming up over 5 steps" in caplog.text


def test_a_default_warmup_longer_than_a_short_recipe_is_clamped_with_a_note(tmp_path, caplog):
    """A recipe of 40 steps that leaves `train.warmup_steps` out: nobody asked for the default 100, so it is
    clamped with a note naming it as the default (it was refused as if the file had set it)."""
    path = tmp_path / "short.toml"
    path.write_text("[train]\nsteps = 7\n")
    with caplog.at_level("WARNING", logger="dcablate"):
        r = R.load(str(path), [])
    assert (r.train.steps, r.train.warmup_steps) == (7, 7)
    assert "train.warmup_steps 100 (the default) is more than train.steps 7" in caplog.text


def test_a_zipped_table_whose_section_is_chosen_by_an_axis_of_its_own_may_hold_values_everywhere(tmp_path):
    """`model.gated_deltanet` zipped with `model.d_model` (a setting per width) while `model.mixer` is an axis of
    its own: every value meets the attention points too, and cannot avoid them, so it is not refused there (only
    a table zipped with the key that chooses its section can write `{}` where that key chooses another)."""
    path = write(tmp_path / "r.toml", 'extends = "quickstart"\n[sweep]\n"model.mixer" = ["attention", '
                 '"gated_deltanet"]\n"model.d_model" = [64, 128]\n"model.gated_deltanet" = [{expand_v = 1.0}, '
                 '{expand_v = 2.0}]\nzip = [["model.d_model", "model.gated_deltanet"]]\n')
    _, points = R.expand(str(path))
    gdn = [r for _, r in points if r.model.mixer == "gated_deltanet"]
    assert {(r.model.d_model, r.model.gated_deltanet.expand_v) for r in gdn} == {(64, 1.0), (128, 2.0)}


def test_an_axis_inside_a_zipped_table_leaves_the_sweeps_tables_as_written():
    """`sweep.task.recall.seq_len` beside the suite's zipped `task.recall` tables: each point gets its own copy of
    its table to set seq_len in, so the sweep's `{}` at a fuzzy-recall point stays `{}` (it was filled in, and that
    point then refused as if the file had set seq_len there) and every recall point trains seq_len 256."""
    base, points = R.expand("paper/suite_attention", ["sweep.task.recall.seq_len=[256]"])
    assert base.sweep["task.recall"][4] == {} and base.sweep["task.recall"][2] == {"seq_len": 512}
    assert {r.task.recall.seq_len for _, r in points if r.task.kind == "recall"} == {256}


RECALL_BASE = ('[run]\nname = "b"\ndevice = "cpu"\n[model]\nd_model = 32\nn_heads = 2\nn_layers = 2\n'
               '[task]\nkind = "recall"\n')


def test_an_axis_of_a_key_listed_before_its_tables_axis_is_set_after_the_table(tmp_path):
    """`task.recall.seq_len` swept in a parent, `task.recall` tables swept in its child: the table is set first at
    every point, so the key's value is validated and trained (the table replaced it: -3 passed, 128 trained)."""
    write(tmp_path / "par.toml", RECALL_BASE + '[sweep]\n"task.recall.seq_len" = [64]\n')
    path = write(tmp_path / "ch.toml", 'extends = "par.toml"\n[sweep]\n"task.recall" = [{num_train_examples = 1000}]\n')
    _, points = R.expand(str(path))
    assert [(r.task.recall.seq_len, r.task.recall.num_train_examples) for _, r in points] == [(64, 1000)]
    write(tmp_path / "par.toml", RECALL_BASE + '[sweep]\n"task.recall.seq_len" = [-3]\n')
    with pytest.raises(RecipeError, match="must be >= 4, got -3"):
        R.expand(str(path))


def test_a_set_sweep_axis_keeps_the_origin_of_an_axis_of_a_key_inside_it(tmp_path):
    """Sweep axes are flat: `--set sweep.task.recall=[...]` is no parent of the file's `task.recall.seq_len` axis, so
    a child's `[task.recall] seq_len` under that parent axis is still refused as swept (it was let through)."""
    write(tmp_path / "par.toml", RECALL_BASE + '[sweep]\n"task.recall.seq_len" = [32, 64]\n')
    path = write(tmp_path / "ch.toml", 'extends = "par.toml"\n[task.recall]\nseq_len = 48\n')
    with pytest.raises(RecipeError, match="is swept: .*par.toml sweeps task.recall.seq_len"):
        R.expand(str(path), ["sweep.task.recall=[{num_train_examples=1000}]"])


def test_a_table_set_whole_forgets_where_its_old_keys_came_from():
    """`--set 'sweep={}'` replaces the file's sweep: no `sweep.task.recall` origin stays behind to be blamed for a
    value the user set with `--set` (an error named the shipped file)."""
    _, origins, _ = R.load_raw("paper/suite_attention", ["sweep={}", "task.recall={vocab_size=4}"])
    assert not [k for k in origins if isinstance(k, str) and k.startswith("sweep.")]
    assert origins["task.recall"] == origins["task.recall.vocab_size"] == "--set"


@pytest.mark.parametrize("child, key, fragment", [
    ('[model]\nd_model = 32\n', "model.d_model",
     "is swept: {base} sweeps model.d_model ([64, 128]), setting it at every point over this value; set the axis "
     "in this file's [sweep] instead (\"model.d_model\" = [...], 2 values: it is zipped)"),
    ('[train]\nlr = 1e-2\n', "train.lr", "is swept: {base} sweeps train.lr"),
], ids=["swept-key", "other-swept-key"])
def test_a_key_a_child_recipe_sets_under_its_parents_sweep_is_refused(tmp_path, child, key, fragment):
    """The parent's sweep would set it at every point: the child's value would silently do nothing."""
    base = write(tmp_path / "base.toml", ZIP_BASE)
    path = write(tmp_path / "r.toml", 'extends = "base.toml"\n' + child)
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert (e.value.source, e.value.key) == (str(path.resolve()), key)
    assert fragment.format(base=base.resolve()) in str(e.value)


def test_a_key_the_same_file_sets_and_sweeps_is_its_base_value(tmp_path):
    """A file's own key under its own sweep, and a parent's key under a child's sweep, are fine."""
    path = write(tmp_path / "base.toml", '[model]\nd_model = 32\n' + ZIP_BASE)
    assert len(R.expand(str(path))[1]) == 2
    child = write(tmp_path / "r.toml", 'extends = "base.toml"\n[sweep]\n"model.d_model" = [64]\n"train.lr" = [1e-3]\n')
    assert len(R.expand(str(child))[1]) == 1


def test_two_points_named_alike_through_a_set_axis_blame_the_set():
    """Zipped axes from a file and a --set that make two points one name: the --set is named, not the recipe."""
    with pytest.raises(RecipeError, match=r"^--set: sweep: points 1 and 17 both get the name"):
        R.expand("paper/suite_attention", ["sweep.task.recall=[" + ", ".join(["{}"] * 25) + "]"])


@pytest.mark.parametrize("text, key, fragment", [
    ('[sweep]\n"model.mixer" = ["attention", "atention"]\n', "sweep.model.mixer", "did you mean 'attention'"),
    ("[sweep.model]\nd_model = [64, 65]\n", "sweep.model.d_model", "not divisible by n_heads"),
    ('[sweep]\n"model.d_modle" = [64]\n', "sweep.model.d_modle", "not a recipe key (did you mean 'model.d_model'?)"),
    ('[sweep]\n"train.steps" = [1000, 0]\n', "sweep.train.steps", "must be >= 1"),
    ('[sweep]\n"model.d_model" = 64\n', "sweep.model.d_model", "non-empty list"),
    ('[sweep]\n"model.d_model" = []\n', "sweep.model.d_model", "non-empty list"),
], ids=["bad-choice", "cross-key", "unknown-key", "out-of-range", "not-a-list", "empty-list"])
def test_sweep_rejects_invalid_values(tmp_path, text, key, fragment):
    path = write(tmp_path / "r.toml", text)
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert e.value.key == key and fragment in str(e.value) and "r.toml" in str(e.value)


# ----------------------------------------------------------------------------------------- TOML out


def _rich_recipe() -> R.Recipe:
    return R.build({
        "run": {"name": 'tricky "name" \\ with\ttab and é', "seed": 3, "out_dir": "runs/x y", "device": "cpu"},
        "model": {"mixer": "gated_deltanet", "d_model": 96, "n_heads": 3, "head_dim": 32, "ffn": "mlp",
                  "tie_embeddings": False, "norm_eps": 1e-6, "conv": {"kind": "static", "width": 3},
                  "gated_deltanet": {"expand_v": 2, "allow_neg_eigval": True}},
        "task": {"mqar": {"vocab_size": 300, "power_a": 0.5, "filler": "zero",
                          "train": [{"seq_len": 32, "num_kv_pairs": 2, "num_examples": 10},
                                    {"seq_len": 64, "num_kv_pairs": 8}],
                          "test": [{"seq_len": 128, "num_kv_pairs": 16, "num_examples": 7}]}},
        "train": {"steps": 20, "warmup_steps": 5, "batch_size": 8, "lr": 1, "schedule": "constant"},
        "eval": {"early_stop": 0},
        "sweep": {"model.conv.kind": ["none", "static"], "train.lr": [1e-3, 0.5],
                  "model.tie_embeddings": [True, False],
                  "task.mqar.test": [[{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 5}]]},
    })


@pytest.mark.parametrize("make", [R.Recipe, lambda: R.build({}), _rich_recipe], ids=["default", "empty", "rich"])
def test_to_toml_round_trip(make):
    r = make()
    text = r.to_toml()
    again = R.build(tomllib.loads(text))
    assert again.to_dict() == r.to_dict()
    assert again.digest() == r.digest()
    assert again.to_toml() == text


def test_digest_is_stable_and_sensitive():
    a, b = _rich_recipe(), _rich_recipe()
    assert a.digest() == b.digest() and re.fullmatch(r"[0-9a-f]{16}", a.digest())
    assert R.Recipe().digest() == R.Recipe().digest() == R.build({}).digest()
    assert R.build({"train": {"lr": 0.002}}).digest() != R.Recipe().digest()
    assert R.build({"train": {"lr": 1}}).digest() == R.build({"train": {"lr": 1.0}}).digest()


def test_loaded_recipe_round_trips_through_a_file(tmp_path):
    path = write(tmp_path / "r.toml", SWEEP_NESTED)
    r = R.load(str(path))
    out = write(tmp_path / "resolved.toml", r.to_toml())
    assert R.load(str(out)).to_dict() == r.to_dict()


def test_to_toml_round_trip_non_bmp_string():
    r = R.build({"run": {"name": "run-\U0001F600"}})
    assert tomllib.loads(r.to_toml())["run"]["name"] == r.run.name


# ----------------------------------------------------------------------------------------- shipped recipes


SHIPPED = R.shipped_recipes()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_loads_and_validates(name):
    path = SHIPPED[name]
    assert path.suffix == ".toml" and path.is_file()
    assert R.find_recipe(name) == path
    base, points = R.expand(name)
    assert points, name
    for _, r in points:
        assert R.build(tomllib.loads(r.to_toml())).to_dict() == r.to_dict()
    first = path.read_text().splitlines()[:1]
    assert first and first[0].startswith("#"), f"{name}: first line should be a `# description` comment " \
                                                "(`dcablate recipes` shows it)"


def test_shipped_recipe_names_match_their_paths():
    for name, path in SHIPPED.items():
        assert path.suffix == ".toml" and not name.endswith(".toml")
        assert path.with_suffix("").as_posix().endswith("/" + name), (name, path)


@pytest.mark.parametrize("axis", ["run.out_dir", "run.name"])
def test_where_the_points_go_cannot_be_swept(tmp_path, axis):
    """Swept, run.out_dir or run.name trained identical runs into the sweep's one folder, their recipes saying
    otherwise; refused where the axis was set."""
    path = write(tmp_path / "r.toml", f'[sweep]\n"{axis}" = ["x", "y"]\n')
    with pytest.raises(RecipeError) as e:
        R.expand(str(path))
    assert (e.value.source, e.value.key) == (str(path), f"sweep.{axis}")
    assert "where they go cannot be swept" in str(e.value)
