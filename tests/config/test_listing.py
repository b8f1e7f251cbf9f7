"""`dcablate recipes`: the `what` column wrapped to the terminal's width with continuation lines under the column
(one line per recipe in a pipe), and `dcablate recipes NAME` printing one recipe's whole file."""

from __future__ import annotations

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.config.listing import recipes_table
from dcablate.config.summary import first_sentence


def listing(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["recipes", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_the_table_fits_the_terminal(columns, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    rc, out, _ = listing(capsys)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["name", "what"]
    assert max(map(len, lines)) <= columns
    indent = lines[1].index("  ") + 2  # where the `what` column starts
    shipped = config.shipped_recipes()
    found: dict[str, list[str]] = {}
    for line in lines[2:]:  # a name starts a recipe's row, a continuation line is blank under the name column
        if line[:indent].strip():
            name = line[:indent].strip()
            found[name] = [line[indent:]]
        else:
            found[name].append(line[indent:])
    assert list(found) == list(shipped)
    for name, parts in found.items():
        assert " ".join(parts) == first_sentence(shipped[name].read_text()), name
    assert sum(len(p) > 1 for p in found.values()) > 10  # long descriptions did wrap


def test_a_pipe_gets_one_line_per_recipe(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    rc, out, _ = listing(capsys)
    assert rc == 0 and len(out.splitlines()) == 2 + len(config.shipped_recipes())
    assert max(map(len, out.splitlines())) > 200
    assert len(out.splitlines()[1]) <= 100  # the rule under the header stops at the fallback width


def test_a_narrow_terminal_puts_each_description_under_its_name():
    rows = [("lm/a_long_recipe_name_here", "A description of several words that wraps at forty columns."),
            ("b", "")]
    assert recipes_table(rows, 40) == ("lm/a_long_recipe_name_here\n    A description of several words that\n"
                                       "    wraps at forty columns.\nb")
    assert recipes_table(rows, None).splitlines()[2:] == [
        "lm/a_long_recipe_name_here  A description of several words that wraps at forty columns.", "b"]


def test_one_recipe_prints_its_whole_file(capsys):
    path = config.shipped_recipes()["lm/scaling_tiny"]
    for name in ("lm/scaling_tiny", "lm/scaling_tiny.toml"):
        rc, out, _ = listing(capsys, name)
        assert rc == 0 and out == f"# {path}\n{path.read_text()}"
    rc, out, err = listing(capsys, "lm/scaling_tin")
    assert rc == 2 and out == ""
    assert err == ("error: recipes lm/scaling_tin: no shipped recipe of that name (did you mean 'lm/scaling_tiny'?); "
                   "`dcablate recipes` lists them\n")
