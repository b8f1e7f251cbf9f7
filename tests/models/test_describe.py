"""What `dcablate info` prints (`dcablate.models.describe`): a sweep's distinct models in one table, each
model's block once with `detail`, and a recipe without a sweep as it always printed."""

from __future__ import annotations

import pytest

import dcablate.models.describe as describe_module
from dcablate import config
from dcablate.errors import UserError
from dcablate.models.costs import Costs, build_model, costs
from dcablate.models.describe import DistinctModel, Point, describe, distinguishing_columns
from dcablate.tasks import task_class, task_options
from tests.tiny_recipes import tiny_mqar

MQAR = "paper/mqar_gated_deltanet"  # 5 conv variants x 4 widths x 4 learning rates
LRS = "train.lr = 0.0001 / 0.00046 / 0.0022 / 0.01"

# `dcablate info quickstart --set sweep={}` before sweeps got a table: a recipe without a sweep prints this still
QUICKSTART_BLOCK = """\
quickstart: attention, conv=none, d_model=64, n_layers=2
component      parameters
-------------  ----------
embedding          16,384
norms                 192
mixer              32,768
total              49,344
non_embedding      32,960
recurrent state per sequence at T=128: 32.77k floats (131.07kB in fp32, 65.54kB in bf16)
forward FLOPs per token: 98.56k (blocks) + 32.77k (LM head, per scored token); training ~3x
"""


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The sweep table's column names and its rows, split into cells (a cell holds no spaces here)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    end = next(i for i, line in enumerate(lines) if i > rule and line.startswith("state floats:"))
    return lines[rule - 1].split(), [line.split() for line in lines[rule + 1:end]]


@pytest.fixture(scope="module")
def mqar_table() -> str:
    return describe(MQAR)


def test_a_grid_prints_one_row_per_distinct_model(mqar_table):
    lines = mqar_table.splitlines()
    assert lines[0] == "mqar_gated_deltanet: 80 sweep points, 20 distinct models (train.lr varies within a model)"
    columns, rows = table(mqar_table)
    assert columns == ["conv.kind", "conv.placement", "d_model", "params", "non_embedding", "conv", "state", "floats",
                       "(T=512)", "FLOPs/token", "points"]
    assert len(rows) == 20 and all(row[-1] == "4" for row in rows)
    # a conv-free model reads no placement: "-", with the note that says so
    assert [tuple(row[:3]) for row in rows[:5]] == [("none", "-", "64"), ("none", "-", "128"),
                                                    ("none", "-", "256"), ("none", "-", "512"),
                                                    ("static", "qkv", "64")]
    assert all(row[5] == "0" for row in rows if row[0] == "none") and all(row[5] != "0" for row in rows[4:])
    assert "-: a key the model does not read" in lines[-2]
    assert "--detail" in lines[-1] and len(lines) < 30  # was 944 lines: a block per point


def test_a_rows_numbers_are_the_costs_of_its_points_model(mqar_table):
    _, points = config.expand(MQAR)
    r = dict(points)["conv.kind=dynamic,conv.placement=all_linear,d_model=128,lr=0.01"]
    seq_len, vocab = task_class(r.task.kind).shape(task_options(r.task))
    c = costs(build_model(r, vocab, device="meta"), seq_len)
    row = next(row for row in table(mqar_table)[1] if row[:3] == ["dynamic", "all_linear", "128"])
    assert row[3:-1] == [f"{n:,}" for n in (c.params["total"], c.params["non_embedding"], c.params["conv"],
                                            c.state_floats, c.flops_per_token)]


def test_detail_prints_each_distinct_model_once_with_its_points():
    text = describe(MQAR, detail=True)
    lines = text.splitlines()
    titles = [i for i, line in enumerate(lines) if line.startswith("mqar_gated_deltanet / ")]
    assert len(titles) == 20 and all(lines[i + 1] == f"4 points: {LRS}" for i in titles)
    assert sum(line.startswith("component ") for line in lines) == 20
    i = lines.index("mqar_gated_deltanet / conv.kind=dynamic,conv.placement=qkv,d_model=256: gated_deltanet, "
                    "conv=dynamic, d_model=256, n_layers=2")
    assert lines[i + 2].startswith("component") and "conv" in [line.split()[0] for line in lines[i + 4:i + 10]]
    assert table(text)[1] == table(describe(MQAR))[1]  # the same table first
    assert "--detail" not in text


def test_each_distinct_model_is_built_once(monkeypatch):
    built = []

    def counting(*args, **kwargs):
        built.append(args)
        return build_model(*args, **kwargs)

    monkeypatch.setattr(describe_module, "build_model", counting)
    describe(MQAR)
    assert len(built) == 20  # not 80: the learning rates share a model


@pytest.mark.parametrize("detail", [False, True])
def test_a_recipe_without_a_sweep_prints_its_block_as_before(detail):
    assert describe("quickstart", ["sweep={}"], detail=detail) == QUICKSTART_BLOCK


def write(tmp_path, sweep: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(tiny_mqar() + "\n[sweep]\n" + sweep)
    return str(path)


def test_points_that_change_no_model_key_share_one_model(tmp_path):
    recipe = write(tmp_path, '"train.lr" = [1e-3, 3e-3]\n"run.seed" = [0, 1]\n"model.backend" = ["auto", "torch"]\n')
    text = describe(recipe, detail=True)
    assert text.splitlines()[0] == ("t: 8 sweep points, 1 distinct model (train.lr, run.seed, model.backend vary "
                                    "within a model)")
    columns, rows = table(text)
    assert columns[0] == "params" and len(rows) == 1 and rows[0][-1] == "8"
    assert "8 points: train.lr = 0.001 / 0.003; run.seed = 0 / 1; model.backend = auto / torch" in text


def test_a_model_key_with_equal_costs_still_makes_another_model(tmp_path):
    text = describe(write(tmp_path, '"model.init_std" = [0.02, 0.01]\n"train.lr" = [1e-3, 3e-3]\n'))
    columns, rows = table(text)
    assert columns[0] == "init_std" and [row[0] for row in rows] == ["0.02", "0.01"]
    assert rows[0][1:] == rows[1][1:]  # the same sizes, two models all the same


def test_a_task_sweep_is_told_apart_by_its_task_keys():
    columns, rows = table(describe("suite/recall"))
    assert columns[:2] == ["recall.vocab_size", "recall.seq_len"] and "T" in columns and "state" in columns
    assert len(rows) == 7 and sum(int(row[-1]) for row in rows) == 66
    assert rows[0][:2] == ["16", "128"] and rows[0][-1] == "30"  # 5 training-set sizes x 3 lr x 2 weight decays


def test_a_sweep_over_tasks_is_told_apart_by_vocabulary_and_length():
    # one conv variant of the suite: the six tasks' settings, whose vocabularies and lengths the model takes
    text = describe("paper/suite_gated_deltanet", ['sweep.model.conv.kind=["none"]',
                                                   'sweep.model.conv.placement=["qkv"]'], detail=True)
    assert text.splitlines()[0].startswith("suite_gated_deltanet: 100 sweep points, 15 distinct models (task.kind, ")
    columns, rows = table(text)
    assert columns[:2] == ["tasks", "vocab"] and "T" in columns and len(rows) == 15
    assert {row[0] for row in rows} >= {"recall/fuzzy_recall", "memorization"}  # which tasks each model serves
    assert "suite_gated_deltanet / vocab=64,T=128: gated_deltanet" in text
    assert "task.kind = recall / fuzzy_recall" in text


def fake_model(values: list[dict]) -> DistinctModel:
    c = Costs({"total": 10, "non_embedding": 5}, state_floats=1, seq_len=8, flops_per_token=2, head_flops_per_token=1)
    return DistinctModel(None, c, 16, [Point(f"p{i}", v) for i, v in enumerate(values)])


def test_models_alike_in_every_single_valued_key_get_the_keys_that_differ():
    # no key has one value per model, nothing else differs: the key whose set of values differs is shown
    a = fake_model([{"a": "1", "b": "x"}, {"a": "2", "b": "y"}])
    b = fake_model([{"a": "1", "b": "x"}, {"a": "3", "b": "y"}])
    assert distinguishing_columns([a, b]) == (["a"], False)
    assert a.shown("a") == "1 / 2"


def test_a_bad_recipe_is_a_user_error():
    with pytest.raises(UserError, match="nope: no such recipe file"):
        describe("nope")


def test_the_info_command_prints_the_table_and_with_detail_the_blocks(capsys):
    from dcablate.cli import main

    assert main(["info", MQAR]) == 0
    out = capsys.readouterr().out
    assert out == describe(MQAR) + "\n"
    assert main(["info", MQAR, "--detail"]) == 0
    assert capsys.readouterr().out.count(f"4 points: {LRS}") == 20
    assert main(["info", "quickstart", "--set", "sweep={}"]) == 0
    assert capsys.readouterr().out == QUICKSTART_BLOCK + "\n"


def test_the_active_column_is_explained_where_it_is_shown(capsys):
    """MoE grids get an `active` column, which counts the embedding as `params` does: the note under the table says
    so; grids without MoE neither show nor explain it."""
    from dcablate.cli import main

    assert main(["info", "paper/mqar_moe"]) == 0
    out = capsys.readouterr().out
    assert " active " in out.splitlines()[1] and "\nactive: the parameters one token uses" in out
    assert main(["info", MQAR]) == 0
    out = capsys.readouterr().out
    assert " active " not in out.splitlines()[1] and "active:" not in out


def test_one_moe_models_block_explains_its_active_row():
    """A single MoE model's table has an `active` row counted as `total` is; the line under it gives the count
    without the embedding, the one to set beside `non_embedding`."""
    text = describe("paper/mqar_moe", ["sweep={}"])
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in text.splitlines()
            if line.split() and line.split()[0] in ("total", "non_embedding", "active")}
    without = rows["active"] - (rows["total"] - rows["non_embedding"])
    assert 0 < without < rows["non_embedding"]
    assert "active: the parameters one token uses" in text and f"{without:,} without the embedding" in text
    assert "active:" not in describe("paper/mqar_gated_deltanet", ["sweep={}"])
