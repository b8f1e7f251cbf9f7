"""In-context recall (docs/tasks.md): key-value pairs whose keys repeat; recall the value a key had earlier."""
