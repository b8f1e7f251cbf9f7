"""What an LM run reads from outside its recipe, checked when `dcablate run` (or `--dry-run`) starts
(`LMTask.inputs`, `LMTask.check_input`): the text `task.lm.data` and a BPE `task.lm.tokenizer_file`.

The text is looked up as training would find it (`data.source_files`: the path exists, a folder holds text files,
a glob matches, the suffixes are known) and every file and folder it covers must be readable; no text is read.
A source that is one `.txt` file is one document, which training cannot split into train and validation: refused
here, where the message can say where the key was set (other sources' document counts need their text read).
An `hf:` source is loaded by `datasets`, from the hub or a local dataset, when the run starts: here only the
library is looked for, since a hub id cannot be checked without the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dcablate.errors import UserError
from dcablate.tasks.lm.data import NEEDS_TWO, read_tokenizer_file, source_files

DATA, TOKENIZER_FILE = "task.lm.data", "task.lm.tokenizer_file"
WHAT_TEXT = "a .txt/.jsonl/.parquet file, a folder of them or a glob"
GLOB = "*?["


def inputs(options) -> dict[str, str]:
    """`{recipe key: value}` of what a `task.lm` section reads: its text, and its tokenizer file when BPE loads
    one (a byte-level run ignores `tokenizer_file`)."""
    found = {DATA: options.data}
    if options.tokenizer == "bpe" and options.tokenizer_file:
        found[TOKENIZER_FILE] = options.tokenizer_file
    return found


def check_input(key: str, value: str, where: str) -> None:
    """UserError starting with `where` when the text or tokenizer file `value` of `key` cannot be read."""
    if key == DATA:
        check_text(value, where)
    elif key == TOKENIZER_FILE:
        read_tokenizer_file(Path(value), where)  # a small file: parsed whole, as the run will


def check_text(data: str, where: str) -> None:
    """The text `data` exists and is readable (see the module's docstring)."""
    if data.startswith("hf:"):
        if importlib.util.find_spec("datasets") is None:
            raise UserError(f"{where}: {data}: hf: sources need the datasets library (pip install -e \".[hf]\")")
        return
    from dcablate.tasks.lm.corpus import CORPORA

    path = Path(data).expanduser()
    if not any(c in data for c in GLOB) and not path.exists() and path.name not in CORPORA:
        raise UserError(f"{where}: {data}: no such file or folder; point it at {WHAT_TEXT}")
    if path.is_dir():  # first: an unreadable folder would otherwise read as one without text files
        _check_folders(path, where)
    files = source_files(data, where)  # a shipped corpus not yet fetched: names its `dcablate data get`
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"{where}: {f}: cannot read (permission denied); make the text readable by this user")
    if len(files) == 1 and files[0].suffix == ".txt":
        shown = data if str(files[0]) == data else f"{data} (only {files[0].name})"
        raise UserError(f"{where}: {shown}: one .txt file is one document; training {NEEDS_TWO}")


def _check_folders(root: Path, where: str) -> None:
    """Every folder below `root` can be listed: a folder that cannot would leave its documents out silently."""
    def fail(error: OSError) -> None:
        raise UserError(f"{where}: {error.filename}: cannot read the folder ({error.strerror}); make the text "
                        f"readable by this user")

    for _ in os.walk(root, onerror=fail):
        pass
