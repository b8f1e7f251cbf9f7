"""Noisy in-context recall (docs/tasks.md): in-context recall with pairs of noise tokens between the pairs."""
