"""Recipes: the TOML a researcher writes, resolved into a typed, checked `Recipe` (torch-free).

The recipe is the single source of truth for a run: everything that changes results lives in it.
`schema.py` holds the core sections and assembles the components' sections from the registries,
`loading.py` reads files, `extends` and `--set` overrides (parsed in `overrides.py`) and checks them,
`sweep.py` expands a `[sweep]` into its grid, `toml_out.py` writes a resolved recipe back.
`docs/recipes.md` documents each key; a test keeps the two in step.
"""

from __future__ import annotations

from dcablate.config.fields import option, section
from dcablate.config.loading import (build, check_sweep, completed, effective, expand, find_recipe, flatten, load,
                                  load_raw, notes_held, parse_override, reads_key, shipped_recipes)
from dcablate.config.overrides import spaced_set
from dcablate.config.schema import conv_streams
from dcablate.config.sweep import ZIP_KEY, sweep_axes
from dcablate.config.toml_out import dumps_toml


def __getattr__(name: str):
    if name in ("Recipe", "ModelSection", "TaskSection"):  # assembled from the registries when first asked for
        from dcablate.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Recipe", "ZIP_KEY", "build", "check_sweep", "completed", "conv_streams", "dumps_toml", "effective", "expand", "find_recipe", "flatten", "load",
           "load_raw", "notes_held", "option", "parse_override", "reads_key", "section", "shipped_recipes",
           "spaced_set", "sweep_axes"]
