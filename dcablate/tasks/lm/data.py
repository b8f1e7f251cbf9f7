"""Text for language modelling: sources -> documents -> train/validation split -> cached token shards.

Sources (`task.lm.data`): a `.txt` file (one document), a `.jsonl` file (one document per line, the
text under `text_field`), a `.parquet` file (one document per row of column `text_field`; needs
pyarrow), a folder (every such file below it, sorted) or a glob.

Documents are split into train and validation by document: the `round(val_fraction * n)` documents
with the smallest hash of (split_seed, document text) go to validation, the rest to training, so the
split does not depend on file order and is the same on every machine.

Each split is tokenized once into a flat token stream (a separator token before every document) and
stored as a `.bin` file of uint16 (uint32 for vocabularies over 65535) under
`cache_dir/lm/<key>/`, where `key` hashes the source files' contents, the tokenizer and the split
settings. A second run with the same key memory-maps the files instead of tokenizing again; a changed
file changes the key. Training sequences are windows of `seq_len + 1` tokens at stride `seq_len`.

Text that is only scored (`dcablate eval --data`) is not split: `load_text` tokenizes all its documents, in
source order, into one stream `all.bin`, cached the same way under a key without the split settings.

Every message about the text starts with `where`, the setting that named it (`task.lm.data`, or `--data`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob as globlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcablate.errors import UserError

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("DCABLATE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dcablate"


def unwritable_cache(configured: str, folder: Path, reason: str) -> UserError:
    """The error for a cache folder that cannot be written, led by what chose the folder: the recipe's
    `task.lm.cache_dir` (where it was set is added later), else the environment variable or the default."""
    if configured:
        return UserError(f"task.lm.cache_dir: cannot write {folder}: {reason}")
    if os.environ.get("DCABLATE_CACHE"):
        chosen = "$DCABLATE_CACHE (task.lm.cache_dir unset)"
    elif os.environ.get("XDG_CACHE_HOME"):
        chosen = "$XDG_CACHE_HOME (task.lm.cache_dir and $DCABLATE_CACHE unset)"
    else:
        chosen = "the default cache ~/.cache/dcablate (task.lm.cache_dir and $DCABLATE_CACHE unset)"
    return UserError(f"{chosen}: cannot write {folder}: {reason}; set task.lm.cache_dir or $DCABLATE_CACHE to a "
                     f"writable folder")


# ----------------------------------------------------------------------------------------- sources


def source_files(data: str, where: str = "task.lm.data") -> list[Path]:
    """The files a `task.lm.data` value names, sorted; UserError when there are none. `where` names the
    setting in messages (the key and the file that set it, or a flag)."""
    if not data:
        raise UserError(f"{where}: no data given (a .txt/.jsonl/.parquet file, a folder or a glob)")
    path = Path(data).expanduser()
    if any(c in data for c in "*?["):
        files = [Path(p) for p in sorted(globlib.glob(str(path), recursive=True)) if Path(p).is_file()]
        what = "matches no files"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        what = f"holds no {'/'.join(SUFFIXES)} files"
    elif path.is_file():
        files = [path]
        what = ""
    else:
        from dcablate.tasks.lm.corpus import CORPORA

        here = path.resolve() == (Path("data") / path.name).resolve()
        fetch = "" if path.name not in CORPORA else \
            f"; `dcablate data get {path.name}{'' if here else f' --dir {data}'}` downloads it there"
        raise UserError(f"{where}: {data}: no such file or folder{fetch}")
    if not files:
        raise UserError(f"{where}: {data}: {what}")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise UserError(f"{where}: {f}: unknown text format '{f.suffix}' (expected one of {', '.join(SUFFIXES)})")
    return files


def read_documents(files: list[Path], text_field: str = "text", where: str = "task.lm.data",
                   given: str = "") -> list[str]:
    """The non-empty documents of `files`, in order; UserError starting with `where` (and the folder or glob
    `given` that named the files) when there are none."""
    docs: list[str] = []
    for f in files:
        try:
            docs.extend(_read_file(f, text_field))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    docs = [d for d in docs if d]
    if not docs:
        named = files[0] if len(files) == 1 else f"{given} ({len(files)} files)" if given else f"{len(files)} files"
        raise UserError(f"{where}: {named}: empty corpus (no text)")
    return docs


def _read_file(f: Path, text_field: str) -> list[str]:
    try:
        if f.suffix == ".txt":
            return [f.read_text(encoding="utf-8", errors="replace")]
        if f.suffix == ".jsonl":
            out = []
            with open(f, encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{f}:{i}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise UserError(f"{f}:{i}: no '{text_field}' field (set task.lm.text_field)")
                    if not isinstance(row[text_field], str):
                        raise UserError(f"{f}:{i}: field '{text_field}' is not a string")
                    out.append(row[text_field])
            return out
        return _read_parquet(f, text_field)
    except OSError as e:
        raise UserError(f"{f}: cannot read: {e.strerror}") from None


def _read_parquet(f: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{f}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        schema = pq.read_schema(f)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise UserError(f"{f}: not a parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in schema.names:
        raise UserError(f"{f}: no column '{text_field}' (columns: {', '.join(schema.names)}; "
                        f"set task.lm.text_field)")
    column = pq.read_table(f, columns=[text_field]).column(text_field).to_pylist()
    return [x for x in column if isinstance(x, str)]


def load_hf(spec: str, text_field: str, cache_dir: Path | None = None, where: str = "task.lm.data"):
    """`hf:NAME[/CONFIG]` through `datasets`: NAME is a hub id (`owner/name`) or a local dataset folder or
    file; a third path part of a hub id is its config. Reads the dataset's `train` split."""
    try:
        return _load_hf(spec, text_field, cache_dir)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _load_hf(spec: str, text_field: str, cache_dir: Path | None):
    try:
        import datasets
    except ImportError:
        raise UserError(f"hf:{spec}: hf: sources need the datasets library (pip install -e \".[hf]\")") from None
    local = Path(spec).expanduser()
    name, config, files = spec, None, None
    if local.is_file():  # one local file: the matching builder
        builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
        if local.suffix not in builders:
            raise UserError(f"hf:{spec}: unknown file type '{local.suffix}'")
        name, files = builders[local.suffix], str(local)
    elif local.is_dir():
        name = str(local)
    elif spec.count("/") >= 2:
        name, _, config = spec.rpartition("/")
    try:
        ds = datasets.load_dataset(name, config, data_files=files, split="train",
                                   cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as e:  # datasets raises many kinds (hub unreachable, no such dataset, bad files)
        raise UserError(f"hf:{spec}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    if text_field not in ds.column_names:
        raise UserError(f"hf:{spec}: no column '{text_field}' (columns: {', '.join(ds.column_names)}; "
                        f"set task.lm.text_field)")
    return ds


def fingerprint(files: list[Path], text_field: str, where: str = "task.lm.data") -> str:
    """Content hash of the source: every file's bytes, in order, plus the field read."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{text_field}".encode())
    for f in files:
        h.update(b"\0file\0")
        try:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise UserError(f"{where}: {f}: cannot read: {e.strerror}") from None
    return h.hexdigest()


NEEDS_TWO = ("needs at least 2 documents to split into train and validation (split the text into several files, "
             "or use .jsonl with one document per line)")


def split_documents(docs: list[str], val_fraction: float, split_seed: int,
                    where: str = "task.lm.data") -> tuple[list[str], list[str]]:
    """Deterministic split by document: the documents with the smallest keyed hashes go to validation.
    UserError starting with `where` (the setting that named the text) for fewer than 2 documents."""
    if len(docs) < 2:
        raise UserError(f"{where}: {NEEDS_TWO}")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    keys = [hashlib.blake2b(d.encode("utf-8", "replace"), digest_size=8, key=str(split_seed).encode()).digest()
            for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (keys[i], i))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# ----------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one separator token (256) that starts every document."""

    name = "byte"

    def __init__(self):
        self.vocab_size = 257
        self.sep = 256
        self.token_bytes = np.ones(self.vocab_size, dtype=np.int64)
        self.token_bytes[self.sep] = 0

    def spec(self) -> str:
        return "byte"

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        blob = bytearray()
        starts = []
        for d in docs:
            starts.append(len(blob) + len(starts))
            blob += d.encode("utf-8", "replace")
        out = np.empty(len(blob) + len(docs), dtype=np.uint16)
        mask = np.zeros(len(out), dtype=bool)
        mask[starts] = True
        out[mask] = self.sep
        out[~mask] = np.frombuffer(bytes(blob), dtype=np.uint8)
        return out

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")


SEPARATORS = ("<|sep|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")


class BPETokenizer:
    """A `tokenizers` tokenizer (byte-level BPE when trained here) with a separator special token.

    `token_bytes[i]` is the number of UTF-8 bytes token i stands for: with the byte-level
    pre-tokenizer every character of a token is one byte; otherwise the length of its decoded text."""

    name = "bpe"

    def __init__(self, tok, source: str):
        self.tok, self.path = tok, source  # the tokenizer.json it came from
        self.vocab_size = tok.get_vocab_size()
        vocab = tok.get_vocab()
        sep = next((s for s in SEPARATORS if s in vocab), None)
        if sep is None:
            raise UserError(f"{source}: the tokenizer has none of the separator tokens {', '.join(SEPARATORS)}")
        self.sep = vocab[sep]
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("pre_tokenizer"))
        self.token_bytes = np.zeros(self.vocab_size, dtype=np.int64)
        for text, i in vocab.items():
            if text in specials or i >= self.vocab_size:
                continue
            self.token_bytes[i] = len(text) if byte_level else len(tok.decode([i]).encode("utf-8"))
        self._spec = "bpe:" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:24]

    def spec(self) -> str:
        return self._spec

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        parts = []
        sep = np.array([self.sep], dtype=np.uint32)
        for i in range(0, len(docs), 1024):
            for enc in self.tok.encode_batch(docs[i:i + 1024], add_special_tokens=False):
                parts += [sep, np.asarray(enc.ids, dtype=np.uint32)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def train_bpe(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|sep|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def read_tokenizer_file(path: Path, where: str = "task.lm.tokenizer_file") -> BPETokenizer:
    """A `tokenizer.json` as a `BPETokenizer`; UserError naming `where` when it is missing or no tokenizer."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: {path}: no such file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
        raise UserError(f"{where}: {path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
    return BPETokenizer(tok, str(path.resolve()))


def build_tokenizer(cfg, cache_root: Path | None = None, source_hash: str = "", train_docs=None):
    """The recipe's tokenizer. A BPE tokenizer trained here is cached under `cache_root/tokenizers` by
    (source, split, vocabulary size); `train_docs` is a callable giving the training documents."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer_file:
        return read_tokenizer_file(cfg.tokenizer_file)
    from tokenizers import Tokenizer

    key = hashlib.sha256(json.dumps({"v": FORMAT_VERSION, "source": source_hash, "vocab": cfg.vocab_size,
                                     "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root / "tokenizers" / f"bpe-{key}.json" if cache_root is not None else None
    if path is not None and path.is_file():
        return BPETokenizer(Tokenizer.from_file(str(path)), str(path))
    tok = train_bpe(train_docs(), cfg.vocab_size)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tok.save(str(tmp))
            os.replace(tmp, path)
        except OSError as e:
            raise unwritable_cache(cfg.cache_dir, path.parent, e.strerror) from None
    return BPETokenizer(tok, str(path) if path is not None else "trained BPE")


def tokenizer_vocab_size(cfg) -> int:
    """The vocabulary a recipe's tokenizer will have (at most, for BPE trained here), without the data."""
    if cfg.tokenizer == "byte":
        return 257
    if cfg.tokenizer_file:
        return build_tokenizer(cfg).vocab_size
    return cfg.vocab_size


# ----------------------------------------------------------------------------------------- cache


@dataclass
class Corpus:
    train: np.ndarray  # flat token streams (memory-mapped)
    val: np.ndarray
    tokenizer: object
    directory: Path
    reused: bool
    source_hash: str = ""  # sha256 of the source's bytes (`fingerprint`): which text this is, whatever its path


@dataclass
class Text:
    """All of a text's documents, in source order and not split (`load_text`)."""

    tokens: np.ndarray  # one flat token stream (memory-mapped), a separator before every document
    tokenizer: object
    directory: Path
    reused: bool
    documents: int
    bytes: int  # UTF-8 bytes of the documents: what the tokens stand for


def cache_key(source_hash: str, tokenizer_spec: str, cfg) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "source": source_hash, "tokenizer": tokenizer_spec,
                       "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def text_key(source_hash: str, tokenizer_spec: str) -> str:
    """The cache key of a text read whole: no split settings, so it differs from every `cache_key`."""
    blob = json.dumps({"v": FORMAT_VERSION, "source": source_hash, "tokenizer": tokenizer_spec, "split": "none"},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _dtype(vocab_size: int):
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _source(cfg, where: str):
    """`(content hash, read)` of `cfg.data`; `read()` gives its non-empty documents in order."""
    if cfg.data.startswith("hf:"):
        ds = load_hf(cfg.data[3:], cfg.text_field, default_cache_dir(cfg.cache_dir) / "hf", where)
        source_hash = hashlib.sha256(f"hf|{ds._fingerprint}|{cfg.text_field}".encode()).hexdigest()

        def read():
            docs = [x for x in ds[cfg.text_field] if isinstance(x, str) and x]
            if not docs:
                raise UserError(f"{where}: {cfg.data}: empty corpus (no text)")
            return docs
        return source_hash, read
    files = source_files(cfg.data, where)
    return fingerprint(files, cfg.text_field, where), lambda: read_documents(files, cfg.text_field, where, cfg.data)


def load_corpus(cfg, tokenizer=None, where: str = "task.lm.data") -> Corpus:
    """Tokenized train and validation streams of `cfg` (a task.lm section), from the cache or built.
    `tokenizer`: use this one (a run's kept tokenizer) instead of the recipe's; `where` names the data's
    setting in messages."""
    source_hash, read = _source(cfg, where)
    root = default_cache_dir(cfg.cache_dir) / "lm"
    split_cache: list = []

    def splits():  # read and split the documents at most once, and only when something needs them
        if not split_cache:
            split_cache.extend(split_documents(read(), cfg.val_fraction, cfg.split_seed, where))
        return split_cache

    with building(root, source_hash):  # processes (and a worker's threads) needing the same entry build it once
        tok = tokenizer if tokenizer is not None else build_tokenizer(cfg, root, source_hash, lambda: splits()[0])
        d = root / cache_key(source_hash, tok.spec(), cfg)
        reused = _store(d, tok, cfg.data, lambda: dict(zip(("train", "val"), splits())), cfg.cache_dir)
    dtype = np.dtype(json.loads((d / "meta.json").read_text())["dtype"])
    return Corpus(np.memmap(d / "train.bin", dtype=dtype, mode="r"), np.memmap(d / "val.bin", dtype=dtype, mode="r"),
                  tok, d, reused, source_hash)


def load_text(cfg, tokenizer, where: str = "--data") -> Text:
    """All the documents of `cfg.data` (a task.lm section's source settings), in source order and not split, as
    one token stream read with `tokenizer` (a run's): what `dcablate eval --data` scores, so a single document
    is enough. Cached like the splits; `where` names the text's setting in messages."""
    source_hash, read = _source(cfg, where)
    root = default_cache_dir(cfg.cache_dir) / "lm"
    with building(root, source_hash):
        d = root / text_key(source_hash, tokenizer.spec())
        reused = _store(d, tokenizer, cfg.data, lambda: {"all": read()}, cfg.cache_dir)
    meta = json.loads((d / "meta.json").read_text())
    tokens = np.memmap(d / "all.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    return Text(tokens, tokenizer, d, reused, meta["documents"]["all"], meta["all_bytes"])


@contextlib.contextmanager
def building(root: Path, source_hash: str):
    """Inside the block, no other process or thread builds the cache entries of this source under `root`: the
    runs of a sweep that start together (and the kernel warm-up's processes) wait for the first to train the BPE
    and tokenize the text, then read its entry, instead of each doing it again. Without a writable cache folder,
    no lock (nothing would be written anyway)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / f".build-{source_hash[:24]}.lock", "a+")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store(d: Path, tok, source: str, parts, configured_cache: str = "") -> bool:
    """Cache entry `d`: a `<name>.bin` token stream per `{name: documents}` of `parts()` (called only when the
    entry is not there yet) and `meta.json`, written in a temporary folder and renamed into place. Whether the
    entry was there already. `configured_cache`: the recipe's task.lm.cache_dir, for the error when none can be
    written."""
    if (d / "meta.json").is_file():
        return True
    named = parts()
    root = d.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    except OSError as e:
        raise unwritable_cache(configured_cache, root, e.strerror) from None
    try:
        meta = {"format": FORMAT_VERSION, "tokenizer": tok.spec(), "vocab_size": tok.vocab_size,
                "dtype": _dtype(tok.vocab_size).name, "source": source,
                "documents": {name: len(docs) for name, docs in named.items()}}
        for name, docs in named.items():
            ids = tok.encode_documents(docs).astype(_dtype(tok.vocab_size), copy=False)
            ids.tofile(tmp / f"{name}.bin")
            meta[f"{name}_tokens"] = int(ids.size)
            meta[f"{name}_bytes"] = sum(len(x.encode("utf-8", "replace")) for x in docs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, d)
        except OSError:  # another process built the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return False


# ----------------------------------------------------------------------------------------- packing


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """A read-only [n, seq_len + 1] strided view of `stream`: window i starts at token i * seq_len."""
    n = (stream.size - 1) // seq_len
    if n < 1:
        return np.empty((0, seq_len + 1), dtype=stream.dtype)
    s = stream.strides[0]
    return np.lib.stride_tricks.as_strided(stream, shape=(n, seq_len + 1), strides=(seq_len * s, s), writeable=False)


def packed_batches(stream: np.ndarray, seq_len: int, batch_size: int, seed: int, start: int = 0):
    """Endless numpy batches [b, seq_len + 1] of windows, shuffled per epoch by `seed`; `start` skips
    that many batches (resume). An epoch is every full batch of a permutation of the windows."""
    w = windows(stream, seq_len)
    n = w.shape[0]
    if n == 0:
        raise UserError(f"task.lm.seq_len: {seq_len} needs {seq_len + 1} tokens of training text, and the text of "
                        f"task.lm.data has {stream.size}; lower task.lm.seq_len or add text")
    if batch_size > n:  # a smaller batch than asked would change the run silently
        raise UserError(f"train.batch_size: {batch_size} is more than the {n} training windows of task.lm.seq_len "
                        f"{seq_len} in task.lm.data ({stream.size:,} tokens); lower train.batch_size or "
                        f"task.lm.seq_len, or add text")
    per_epoch = max(1, n // batch_size)
    rng = np.random.default_rng(seed)
    epoch, skip = 0, start
    while True:
        perm = rng.permutation(n)
        if skip >= per_epoch:
            skip -= per_epoch
            continue
        for b in range(skip, per_epoch):
            idx = np.sort(perm[b * batch_size:(b + 1) * batch_size])
            yield w[idx]
        skip = 0
        epoch += 1
