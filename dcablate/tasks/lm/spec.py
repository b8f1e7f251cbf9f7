"""Language modelling's recipe section `task.lm`, its checks and its registration (torch-free)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task

BYTE_VOCAB = 257  # 256 bytes and the document separator


def absolute_path(value: str) -> str:
    """A path (file, folder or glob; `~` expanded) made absolute against the working directory; empty stays
    empty. The recipe a run saves then finds its text and files from any directory."""
    return os.path.abspath(os.path.expanduser(value)) if value else value


def absolute_source(value: str) -> str:
    """`task.lm.data` in its absolute form: a path as `absolute_path`; `hf:NAME` only when NAME is a local
    file or folder (as `load_hf` reads it), since a hub id is no path."""
    if value.startswith("hf:"):
        name = value[3:]
        return "hf:" + absolute_path(name) if name and os.path.exists(os.path.expanduser(name)) else value
    return absolute_path(value)


def path_option(default: str, doc: str, resolve=absolute_path):
    """A recipe key holding a path, resolved when the recipe is loaded (`resolve` in the field's metadata)."""
    return field(default=default, metadata={**option(default, doc).metadata, "resolve": resolve})


@dataclass
class LMSection:
    data: str = path_option("", "the text: a .txt/.jsonl/.parquet file, a folder of them or a glob", absolute_source)
    text_field: str = option("text", "the text field of .jsonl lines and the text column of .parquet files")
    tokenizer: str = option("byte", "byte = UTF-8 bytes plus a document separator (vocabulary 257); bpe = byte-level "
                            "BPE through `tokenizers`, trained on the training split or loaded from tokenizer_file",
                            choices=("byte", "bpe"))
    vocab_size: int = option(4096, "vocabulary of a BPE tokenizer trained here (256 bytes + separator + merges)",
                             min=257)
    tokenizer_file: str = path_option("", "a tokenizer.json to load instead of training BPE (tokenizer = \"bpe\")")
    seq_len: int = option(256, "tokens per packed training and validation sequence", min=1)
    val_fraction: float = option(0.05, "share of documents held out for validation (at least one)",
                                 min=0.0, max=1.0, min_open=True)
    split_seed: int = option(0, "seed of the deterministic train/validation split by document", min=0)
    eval_sequences: int = option(0, "validation sequences evaluated; 0 = all", min=0)
    cache_dir: str = path_option("", "tokenized-shard cache; empty = $DCABLATE_CACHE or ~/.cache/dcablate")


def check(recipe, fail) -> None:
    lm, m = recipe.task.lm, recipe.model
    if not lm.data:  # blamed on where the task was chosen: task.lm.data was set nowhere
        fail("task.kind", "'lm' needs the text to train on: set task.lm.data (a .txt/.jsonl/.parquet file, a folder "
                          "of them, a glob, or a corpus from `dcablate data get NAME`)")
    if m.vocab_size and not lm.tokenizer_file:
        need = BYTE_VOCAB if lm.tokenizer == "byte" else lm.vocab_size
        if m.vocab_size < need:
            fail("model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer's vocabulary ({need})")


def runs_inside_text(data: str, out_dir: str) -> bool:
    """Whether runs written to `out_dir` would lie inside the text folder `data` (a `task.lm.data`), where every
    .txt/.jsonl/.parquet file is read as text, the runs' own metrics.jsonl included. A glob or a file is no
    folder to write into."""
    if not data or any(c in data for c in "*?["):
        return False
    text, out = Path(data).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if text.is_file() or (not text.exists() and text.suffix in (".txt", ".jsonl", ".parquet")):
        return False
    return out == text or text in out.parents


def unread(recipe) -> list[tuple[str, str]]:
    """The tokenizer keys the recipe's tokenizer does not read: BPE's on byte tokens, `vocab_size` of a BPE loaded
    from a file."""
    lm = recipe.task.lm
    if lm.tokenizer == "byte":
        return [("task.lm.vocab_size", "task.lm.tokenizer is 'byte' (257 symbols)"),
                ("task.lm.tokenizer_file", "task.lm.tokenizer is 'byte'")]
    if lm.tokenizer_file:
        return [("task.lm.vocab_size", "the BPE is loaded from task.lm.tokenizer_file, with its own vocabulary")]
    return []


register_task(TaskSpec("lm", "dcablate.tasks.lm.task:LMTask", LMSection, "language-modelling options", check,
                       headline="bpb", higher_is_better=False, headline_label="validation bits per byte",
                       unread=unread))
