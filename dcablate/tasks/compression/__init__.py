"""Compression (docs/tasks.md): a sequence squeezed into its last token, decoded from there."""
