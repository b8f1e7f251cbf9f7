"""A recipe's one-line description for `dcablate recipes`: the first sentence of its opening comment.

A recipe file opens with `#` comment lines; the first sentence may wrap over several of them. A line is
continued while its sentence is plainly unfinished: a bracket or backtick still open, a line ending in a
connecting word or mark (`vs`, `and`, `:`, ...), or a next line that starts in lower case or with a
bracket. The description stops at the end of that sentence (a `.` followed by a space; a question runs on into its answer), or where the
comment's first paragraph ends.
"""

from __future__ import annotations

import re

CONNECTORS = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "into", "of", "on", "or", "the", "to", "vs",
              "with", "x", "than", "per", "its", "their"}
SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z`(])")  # a question may lead into its answer: "?" is no end


def opening_comment(text: str) -> list[str]:
    """The comment lines at the top of a recipe, `#` stripped, up to the first empty comment line or code."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if not body:
            break
        lines.append(body)
    return lines


def _unfinished(text: str, following: str) -> bool:
    opened = text.count("(") - text.count(")") + text.count("[") - text.count("]")
    if opened > 0 or text.count("`") % 2:
        return True
    words = text.split()
    if text.endswith((",", ":", ";", "-", "/", "+", "&")) or (words and words[-1].lower() in CONNECTORS):
        return True
    return bool(following) and (following[0].islower() or following[0] in "([`~/@")


def first_sentence(text: str) -> str:
    """The recipe's description: its opening comment's first sentence, on one line ("" without a comment)."""
    lines = opening_comment(text)
    if not lines:
        return ""
    joined = lines[0]
    for following in lines[1:]:
        if SENTENCE_END.search(joined) or not _unfinished(joined, following):
            break
        joined += " " + following
    return SENTENCE_END.split(joined, maxsplit=1)[0].strip()
