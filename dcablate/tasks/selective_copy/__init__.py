"""Selective copying (docs/tasks.md): copy the tokens scattered among blanks, in order, after a copy token."""
