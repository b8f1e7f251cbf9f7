"""Writing a resolved recipe as TOML: `recipe.toml` of every run directory, read back by resume and eval."""

from __future__ import annotations


def dumps_toml(data: dict) -> str:
    """Write a resolved recipe as TOML (scalars, lists of scalars, tables, arrays of tables)."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def toml_value(v) -> str:
    """One TOML value (inline tables and arrays included), e.g. for a `--set KEY=VALUE` override."""
    return _value(v)


def _is_table_list(v) -> bool:
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def _emit_table(table: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items()
               if v is not None and not isinstance(v, dict) and not _is_table_list(v)}  # None = unset
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            sub = [*path, k]
            lines.append("")
            lines.append(f"[{'.'.join(_key(p) for p in sub)}]")
            _emit_table(v, sub, lines)
        elif _is_table_list(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(p) for p in [*path, k])}]]")
                _emit_table(item, [*path, k], lines)


def _key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _str(k)


def _str(s: str) -> str:
    """A TOML basic string, ASCII only: escapes for quotes, backslash, control and non-ASCII characters."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(f"\\U{o:08X}")
    return '"' + "".join(out) + '"'


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
