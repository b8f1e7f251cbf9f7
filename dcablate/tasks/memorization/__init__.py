"""Memorization (docs/tasks.md): a fixed key-value map learned across the training set."""
