"""`--set KEY=VALUE` overrides: parsing one, and the fix for the mistakes newcomers make with them.

The value is TOML; a bare word that is not valid TOML is read as a string. A value that looks like TOML
but is not (brackets, braces, quotes) is refused in one line that carries the parser's message and, for a
list or table of bare words, the same value with its words quoted. The text typed for each key is kept
(`typed_key`) so that a later type error can show the exact quoted form (`--set 'run.name="123"'`).
"""

from __future__ import annotations

import datetime
import re
import shlex
import tomllib
from typing import Any

from dcablate.config.toml_out import toml_value
from dcablate.errors import UserError

SET_PREFIX = "v = "  # a --set value is parsed as the value of this one-line TOML document
TOML_WORDS = ("true", "false", "inf", "nan")

# a quoted string (kept), a bare word perhaps followed by `=` (a table key, kept), or a number, date or
# signed word (kept); any other bare word gets quoted
_TOKEN = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'|(?P<word>[A-Za-z_][\w.\-]*)(?P<key>\s*=)?|[\w.+\-:]+""")


def typed_key(key: str) -> tuple[str, str]:
    """The entry of a recipe's origins that holds the text typed after `--set KEY=` (not a dotted path, so
    lookups of where a key was set never meet it)."""
    return ("--set text", key)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is TOML, a bare word is a string."""
    key, sep, raw = _split_key(text)
    if not sep or not key:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.lr=3e-3")
    if any(not part for part in key.split(".")):  # `.`, `a..b`, `train.`: no key to set
        raise UserError(f"--set {text}: '{key}' is no recipe key (dotted names, e.g. --set train.lr=3e-3)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"{SET_PREFIX}{raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if any(ch in raw for ch in "[]{}\"'=") or not raw:
            detail = f"{_parser_detail(e, raw)}{_quote_words_hint(key, raw)}"
            raise UserError(f"--set {text}: value is not valid TOML: {detail}") from None
        value = raw
    return key, value


# a TOML key path before `=`: parts quoted ("a.b", 'a.b') or bare (no spaces, so the spaces around a dot are
# matched in one way only), joined by dots
_KEY_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[^=."'\s]+)"""
_KEY_PATH = re.compile(rf"\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(text: str) -> tuple[str, str, str]:
    """`KEY=VALUE` -> (KEY as a dotted path, "=", VALUE). A key written with TOML's quotes, as a recipe's `[sweep]`
    table writes its axes (`sweep."model.conv.kind"=[...]`), is the same path unquoted (`sweep.model.conv.kind`):
    the quotes were read as part of the name, refused with a did-you-mean that looked like what was typed."""
    if text[:1] not in "\"'" and not re.match(r"[^=]*\.\s*[\"']", text):
        key, sep, raw = text.partition("=")
        return key.strip(), sep, raw
    match = _KEY_PATH.match(text)
    if match:
        try:
            table = tomllib.loads(f"{match.group(1)} = 0")
        except tomllib.TOMLDecodeError:
            table = None
        parts = []
        while isinstance(table, dict) and len(table) == 1:
            name, table = next(iter(table.items()))
            parts.append(name)
        if parts and table == 0:
            return ".".join(parts), "=", text[match.end():]
    key, sep, raw = text.partition("=")
    return key.strip(), sep, raw


def _parser_detail(error: tomllib.TOMLDecodeError, raw: str) -> str:
    """tomllib's message with its position counted in the value, not in the document `v = VALUE`."""
    message = str(error)
    if not raw:
        return 'empty (write a value after "=", or "" for an empty string)'
    where = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if where and where.group(1) == "1":
        char = int(where.group(2)) - len(SET_PREFIX)
        near = raw[char - 1:]
        near = near if len(near) <= 20 else near[:17] + "..."
        message = f"{message[:where.start()]} at character {char} ({near!r})"
    message = message.replace(" (at end of document)", " at the end of the value")
    return message[:1].lower() + message[1:]


def quote_words(raw: str) -> str:
    """`[attention, gated_deltanet]` -> `[attention, "gated_deltanet"]`-style text: every bare word that is
    not a table key, a number or true/false/inf/nan in double quotes; quoted strings are left alone."""
    def fix(m: re.Match) -> str:
        word = m.group("word")
        if word is None or m.group("key") or word in TOML_WORDS:
            return m.group(0)
        return f'"{word}"'

    return _TOKEN.sub(fix, raw)


def _quote_words_hint(key: str, raw: str) -> str:
    """'; quote the words: --set 'KEY=["a", "b"]'' when quoting the bare words of a list or inline table makes
    it valid TOML, or a bare text holding '=' (`run.name=lr=3e-3`) quoted; '' otherwise."""
    if not raw.startswith(("[", "{")):
        if "=" in raw and not any(ch in raw for ch in "\"'\n"):  # a folder name copied from a sweep (`lr=0.003`)
            return f"; a text with '=' in it needs quotes: --set {shlex.quote(f'{key}={toml_value(raw)}')}"
        return ""
    fixed = quote_words(raw)
    try:
        value = tomllib.loads(f"{SET_PREFIX}{fixed}")["v"]
    except tomllib.TOMLDecodeError:
        return ""
    return f"; words in a list or table need quotes: --set {shlex.quote(f'{key}={toml_value(value)}')}"


def toml_text(value) -> str:
    """A TOML scalar as it is written in a recipe (`2024-01-01`, `true`, `1.5`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return repr(value) if isinstance(value, float) else str(value)


def quote_hint(key: str, value, typed: str | None) -> str:
    """' (quote it: ...)' for a non-string scalar given to a string key: the `--set` to type when it came from
    one (its text `typed`), else the quoted value."""
    if typed is not None:
        quoted = f'{key}="{typed}"'
        return f" (quote it: --set {shlex.quote(quoted)})"
    return f' (quote it: "{toml_text(value)}")'


def spaced_set(argv: list[str]) -> UserError | None:
    """The error for a `--set` whose value was given apart from its key (`--set train.lr 3e-3`, `--set
    train.lr = 3e-3`, `--set train.lr= 3e-3`), which the command line reads as an extra argument; None when
    argv has no such `--set`."""
    for i, arg in enumerate(argv[:-1]):
        if arg != "--set":
            continue
        key, rest = argv[i + 1], argv[i + 2:]
        if key.endswith("=") and key.count("=") == 1 and rest and not rest[0].startswith("-"):
            typed, joined = [key, rest[0]], key + rest[0]
        elif "=" in key or not rest:
            continue
        elif rest[0] == "=" and len(rest) > 1:
            typed, joined = [key, "=", rest[1]], f"{key}={rest[1]}"
        elif rest[0].startswith("=") or not rest[0].startswith("-"):
            typed, joined = [key, rest[0]], f"{key}={rest[0].removeprefix('=')}"
        else:
            continue
        return UserError(f"--set {' '.join(typed)}: expected KEY=VALUE as one argument, without spaces: "
                         f"--set {shlex.quote(joined)}")
    return None
