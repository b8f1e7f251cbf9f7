"""`dcablate recipes`: the table of shipped recipes (name, and the first sentence of each one's opening comment,
`summary.first_sentence`) and one recipe's whole file.

On a terminal the `what` column is wrapped to its width, continuation lines indented under the column; in a pipe
or file each recipe stays on one line, for grep. `COLUMNS` sets the width in either case.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

from dcablate.config.loading import RECIPE_SUFFIX, shipped_recipes
from dcablate.config.summary import first_sentence
from dcablate.errors import UserError, did_you_mean

FALLBACK_WIDTH = 100  # columns when the terminal does not say
MIN_WHAT = 30  # a narrower `what` column goes below its name instead


def output_width(stream) -> int | None:
    """The columns to wrap to when `stream` is a terminal or `COLUMNS` is set, else None (no wrapping)."""
    if "COLUMNS" in os.environ or stream.isatty():
        return shutil.get_terminal_size((FALLBACK_WIDTH, 24)).columns
    return None


def recipes_table(rows: list[tuple[str, str]], width: int | None) -> str:
    """`name  what` for each (name, description) row, under a header; `what` wrapped to fit `width` columns
    (None: one line per row). Below `MIN_WHAT` columns left for it, each description goes under its name."""
    name_w = max(len("name"), *(len(n) for n, _ in rows))
    what_w = max(len("what"), *(len(w) for _, w in rows))
    if width is not None and width - name_w - 2 < MIN_WHAT:  # too narrow for two columns: each under its name
        wrap = lambda text: textwrap.wrap(text, max(width - 4, MIN_WHAT), break_on_hyphens=False)
        return "\n".join("\n".join([name, *("    " + line for line in wrap(what))]) for name, what in rows)
    # unwrapped (a pipe) the rule under `what` stops where a terminal's line would: the longest row sets no width
    rule_w = min(what_w, (width or FALLBACK_WIDTH) - name_w - 2)
    if width is not None:
        what_w = rule_w
    lines = [f"{'name'.ljust(name_w)}  what", f"{'-' * name_w}  {'-' * max(rule_w, len('what'))}"]
    for name, what in rows:
        parts = textwrap.wrap(what, what_w, break_on_hyphens=False) if width is not None else [what]
        parts = parts or [""]
        lines.append(f"{name.ljust(name_w)}  {parts[0]}".rstrip())
        lines += [f"{' ' * name_w}  {part}" for part in parts[1:]]
    return "\n".join(lines)


def shipped_rows() -> list[tuple[str, str]]:
    """(name, first sentence of its opening comment) of every shipped recipe, by name."""
    return [(name, first_sentence(path.read_text())) for name, path in shipped_recipes().items()]


def shipped_recipe(name: str) -> Path:
    """The file of the shipped recipe `name` (`.toml` optional); a UserError naming the closest names otherwise."""
    shipped = shipped_recipes()
    key = name.removesuffix(RECIPE_SUFFIX)
    if key not in shipped:
        raise UserError(f"recipes {name}: no shipped recipe of that name{did_you_mean(key, shipped)}; "
                        f"`dcablate recipes` lists them")
    return shipped[key]
