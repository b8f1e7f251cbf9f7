"""The one-task suite recipes (`suite/<task>`): what their headers and recipes/README.md promise. The `--set` flags
a header gives for another mixer build the paper's matched model (`paper/suite_<mixer>`: the same parameters and
state, as `dcablate info` counts them) into a folder of its own, and the README's runs and training steps per
recipe are those of its dry run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dcablate import config as R
from dcablate.runs.suite import SUITE_TASKS
from tests.config.test_suite_recipes import _counts, _conv_free

MIXERS = {"Gated DeltaNet": "gated_deltanet", "Mamba-2": "mamba2"}
README = Path(R.find_recipe("suite/recall")).parents[1] / "README.md"


def advice(task: str) -> dict[str, list[str]]:
    """The `--set` values the header of suite/<task> gives per mixer: {mixer: [KEY=VALUE, ...]}."""
    header = []
    for line in Path(R.find_recipe(f"suite/{task}")).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    out = {}
    for name, mixer in MIXERS.items():
        words = shlex.split(text.split(f"{name}:", 1)[1])
        values = []
        while len(words) >= 2 and words[0] == "--set":
            values.append(words[1])
            words = words[2:]
        out[mixer] = values
    return out


@pytest.mark.parametrize("task", SUITE_TASKS)
def test_the_headers_mixer_flags_build_the_papers_matched_model_in_a_folder_of_its_own(task):
    """`--set 'model.mixer="gated_deltanet"'` alone, which the headers advised, kept 16 heads: 443,088 parameters and
    2,048 state floats where suite_gated_deltanet's model has 402,184 and 16,384, in the attention runs' folder."""
    own = R.load(R.find_recipe(f"suite/{task}")).run.name
    for mixer, values in advice(task).items():
        assert any(v.startswith("model.mixer=") for v in values) and any(v.startswith("run.name=") for v in values)
        _, points = R.expand(f"suite/{task}", values)
        assert {r.model.mixer for _, r in points} == {mixer}
        assert {r.run.name for _, r in points} == {f"suite_{task}_{mixer}"} and own != f"suite_{task}_{mixer}"
        paper = next(r for r in _conv_free(f"paper/suite_{mixer}") if r.task.kind == task)  # its baseline setting
        assert _counts(points[0][1]) == _counts(paper), (task, mixer)
        assert _counts(points[0][1])[1] == 16_384


def test_mixer_alone_is_not_the_papers_model():
    """What the advice must say more than: model.mixer alone gives Gated DeltaNet heads of width 8."""
    _, points = R.expand("suite/recall", ['model.mixer="gated_deltanet"'])
    assert _counts(points[0][1]) == (443_088, 2_048)


def test_the_readme_gives_each_recipes_runs_and_steps():
    """recipes/README.md's table of the suite/<task> recipes: runs and training steps summed over the dry run's
    points (it said `~1 h per task` for all six; memorization is 14,400 steps)."""
    text = README.read_text()
    rows = re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| (\d+) \| ([\d,]+) \|", text, re.M)
    promised = {name: (int(runs), int(steps.replace(",", "")))
                for names, runs, steps in rows for name in re.findall(r"`(\w+)`", names)}
    assert set(promised) == set(SUITE_TASKS)
    for task in SUITE_TASKS:
        _, points = R.expand(f"suite/{task}")
        assert promised[task] == (len(points), sum(r.train.steps for _, r in points)), task
