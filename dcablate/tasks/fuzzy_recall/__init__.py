"""Fuzzy in-context recall (docs/tasks.md): recall with keys and values of several tokens each."""
