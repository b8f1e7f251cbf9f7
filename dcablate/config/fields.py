"""Schema fields of a recipe: a default, a one-line doc, and the allowed values.

Components that own a recipe section (a mixer's `model.<name>`, a task's `task.<name>`) declare it as a
dataclass of these fields; `docs/recipes.md` documents every one (a test keeps the two in step).
"""

from __future__ import annotations

import datetime
from dataclasses import field


def option(default, doc: str, *, choices=None, min=None, max=None, min_open=False, factory=None, or_list=False):
    """A recipe key: `default`, one-line `doc`, allowed `choices` (any container, e.g. a registry's names)
    and range; `or_list` also takes a non-empty list of such values."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "min_open": min_open, "or_list": or_list}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, doc: str):
    """A sub-table of the recipe: the dataclass `cls` with its defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


def describe_value(value) -> str:
    """How an error message names a value it did not expect."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, (datetime.date, datetime.time)):  # an unquoted 2024-01-01 or 10:00:00 is a TOML date
        kind = "date-time" if isinstance(value, datetime.datetime) else \
            "date" if isinstance(value, datetime.date) else "time"
        return f"a TOML {kind} {value.isoformat()}"
    return f"{type(value).__name__} {value!r}"
