"""User-facing errors: anything a person can fix (recipe, flag, path, data) raises `UserError`.

The CLI turns a `UserError` into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake in the user's input; the message is the whole story, in one line."""


class RecipeError(UserError):
    """A bad recipe value: names the file and the dotted key path."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


# words people use for a choice that spelling alone does not lead to ('gpu' is closer to 'cpu' than to 'cuda')
ALIASES = {"gpu": "cuda", "gdn": "gated_deltanet", "gated_delta_net": "gated_deltanet", "mamba": "mamba2",
           "bfloat16": "bf16", "float32": "fp32", "none": "off"}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''. A known other name for a choice (`ALIASES`,
    any case) comes first, then the choice that differs only in case, the one choice that starts with `word`, a
    name cut short (`paper/mqar_gated` for `paper/mqar_gated_deltanet`), then spelling neighbours."""
    word, choices = str(word), [str(c) for c in choices]
    alias = ALIASES.get(word.lower())
    if alias in choices and alias != word:
        return f" (did you mean '{alias}'?)"
    other_case = [c for c in choices if c.lower() == word.lower() and c != word]
    if other_case:
        return f" (did you mean '{other_case[0]}'?)"
    started = [c for c in choices if c.startswith(word) and c != word] if len(word) >= 3 else []
    close = started if len(started) == 1 else difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


ON, OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def env_switch(environ, name: str, default: str, allowed: str, modes: tuple[str, ...] = ()) -> str:
    """The value of the environment switch `name` in `environ`: "on" or "off" (1/true/yes and 0/false/no alike,
    any case), one of the other `modes`, or `default` when it is unset or blank. Anything else is a UserError
    whose line says what is `allowed`."""
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    value = "on" if value in ON else "off" if value in OFF else value
    if value not in ("on", "off", *modes):
        raise UserError(f"{name}={raw!r} (environment): must be {allowed}")
    return value
