"""The paper's synthetic-suite recipes (`paper/suite_*`): each is a valid sweep over all six tasks, the four conv
variants and the lr x wd grid, with the run count and steps its header promises; the mixers match in parameters
(MoE: active parameters) and the recurrent ones in state, as the project's own counts (`dcablate info`) give them."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from dcablate import config as R
from dcablate.cli import main
from dcablate.runs.suite import SUITE_TASKS

SUITES = ["paper/suite_base", "paper/suite_attention", "paper/suite_gated_deltanet", "paper/suite_mamba2",
          "paper/suite_moe"]
REFERENCE = "paper/suite_attention"
PARAM_TOLERANCE = 0.005  # iso-parameter: within 0.5% of the reference's non-embedding parameters
VARIANTS = {("none", "qkv"), ("static", "qkv"), ("dynamic", "qkv"), ("dynamic", "all_linear")}


@pytest.mark.parametrize("name", SUITES)
def test_dry_run_lists_every_point(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of the checkout may hold some of these runs already
    assert main(["run", name, "--dry-run"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 400 and all("(recipe " in line for line in lines)
    # the cost: 36,450 steps per grid point and variant (suite_base.toml) x 4 grid points x 4 variants
    cost = r"400 runs: 400 new; to train: 583,200 steps, \d(\.\d)?e1[5-7] FLOPs"
    assert re.fullmatch(cost, captured.err.splitlines()[-1])
    assert max(len(Path(line.split()[0]).name) for line in lines) < 255  # a run directory's name must fit


@pytest.mark.parametrize("name", SUITES)
def test_a_suite_covers_six_tasks_four_variants_and_the_grid_its_header_promises(name):
    _, points = R.expand(name)
    settings = defaultdict(set)
    per_variant = Counter()
    steps = defaultdict(int)
    for _, r in points:
        variant = (r.model.conv.kind, r.model.conv.placement)
        per_variant[variant] += 1
        section = getattr(r.task, r.task.kind)
        settings[r.task.kind].add(tuple(sorted(vars(section).items())))
        steps[variant, r.train.lr, r.train.weight_decay] += r.train.steps
        assert r.train.batch_size == 128 and r.model.d_model == 128 and r.model.n_layers == 2
    assert set(settings) == set(SUITE_TASKS)
    assert {t: len(s) for t, s in settings.items()} == {"recall": 4, "fuzzy_recall": 4, "noisy_recall": 5,
                                                         "selective_copy": 5, "compression": 4, "memorization": 3}
    assert set(per_variant) == VARIANTS and set(per_variant.values()) == {100}
    assert {(lr, wd) for _, lr, wd in steps} == {(1e-3, 0.0), (1e-3, 0.1), (3e-3, 0.0), (3e-3, 0.1)}
    header = Path(R.find_recipe("paper/suite_base")).read_text()
    promised = int(re.search(r"# Time \(estimate, not measured\): ([\d,]+) steps per grid point", header)
                   .group(1).replace(",", ""))
    assert set(steps.values()) == {promised}


def test_every_baseline_is_the_task_sections_default():
    """`{}` in the sweep means MAD's baseline: the defaults of each task's section are its baseline setting."""
    from dcablate.tasks import TASKS

    baselines = {"recall": {"vocab_size": 16, "seq_len": 128, "num_train_examples": 12800},
                 "fuzzy_recall": {"vocab_size": 16, "seq_len": 128, "num_train_examples": 12800, "max_key_len": 3,
                                  "max_value_len": 3},
                 "noisy_recall": {"vocab_size": 32, "noise_vocab_size": 16, "noise_fraction": 0.2, "seq_len": 128,
                                  "num_train_examples": 12800},
                 "selective_copy": {"vocab_size": 16, "seq_len": 256, "num_tokens": 16, "num_train_examples": 12800},
                 "compression": {"vocab_size": 16, "seq_len": 32, "num_train_examples": 12800},
                 "memorization": {"vocab_size": 256, "seq_len": 32, "num_train_examples": 256}}
    for task, baseline in baselines.items():
        defaults = vars(TASKS.get(task).options())
        assert {k: defaults[k] for k in baseline} == baseline, task


def _counts(r) -> tuple[int, int]:
    """(non-embedding parameters, active ones for an MoE; recurrent state floats per sequence) as `dcablate info`
    counts them, at the task's sequence length."""
    from dcablate.models.costs import build_model, costs
    from dcablate.tasks import task_class, task_options

    seq_len, vocab = task_class(r.task.kind).shape(task_options(r.task))
    c = costs(build_model(r, vocab, device="meta"), seq_len)
    p = c.params
    embedding = p.get("embedding", 0) + p.get("lm_head", 0)
    return (p["active"] - embedding) if "active" in p else p["non_embedding"], c.state_floats


def _conv_free(name):
    _, points = R.expand(name)
    return [r for _, r in points if r.model.conv.kind == "none"]


@pytest.fixture(scope="module")
def counts():
    """Each suite's conv-free model's counts at each task's first setting: {name: {task: (params, state)}}."""
    out = {}
    for name in SUITES[1:]:
        first = {}
        for r in _conv_free(name):
            first.setdefault(r.task.kind, r)
        out[name] = {task: _counts(r) for task, r in first.items()}
    return out


def test_the_mixers_are_iso_parameter(counts):
    """Per task, since compression's decoder head (the same for every mixer) counts too."""
    reference = counts[REFERENCE]
    assert {p for task, (p, _) in reference.items() if task != "compression"} == {402_048}  # the headers' count
    for name, rows in counts.items():
        for task, (params, _) in rows.items():
            target = reference[task][0]
            assert abs(params - target) <= PARAM_TOLERANCE * target, (name, task, params, target)


def test_the_recurrent_mixers_are_iso_state(counts):
    for name in ("paper/suite_gated_deltanet", "paper/suite_mamba2", "paper/suite_moe"):
        assert {state for _, state in counts[name].values()} == {16_384}, name  # as the headers say
    attention = {state for _, state in counts[REFERENCE].values()}
    assert len(attention) > 1  # attention's KV cache grows with the sequence: the unbounded reference


@pytest.mark.parametrize("name", SUITES[1:])
def test_a_conv_variant_changes_only_the_conv(name):
    """Within a suite every conv variant keeps the conv-free model's MLP (or experts): the convs' parameters are
    on top, so that a difference between the variants is the conv's."""
    _, points = R.expand(name)
    shapes = {(r.model.mixer, r.model.d_model, r.model.n_heads, r.model.ffn, r.model.ffn_hidden,
               r.model.moe.d_expert, r.model.mamba2.state_size) for _, r in points}
    assert len(shapes) == 1, shapes


def test_a_suite_takes_more_seeds_at_its_best_learning_rates(tmp_path, monkeypatch, capsys):
    """`sweep.best_lr_seeds` on a suite: its second stage, checked before the grid trains from its first point
    alone, lists one value of every zipped task table; a table of another task there is no axis that changes
    nothing (it was refused as one)."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "paper/suite_attention", "--dry-run", "--set", "sweep.best_lr_seeds=[1]"]) == 0
    assert ("best_lr_seeds: then seed 1 at the best learning rate of each of 200 cells the grid has yet to finish: "
            "200 more runs") in capsys.readouterr().out
