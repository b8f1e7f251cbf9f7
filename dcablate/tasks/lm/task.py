"""Language modelling on real text: next-token loss, perplexity and bits per byte.

Bits per byte = total nats over the evaluated targets / (ln 2 * UTF-8 bytes those targets stand for):
a separator token stands for 0 bytes, a byte token for 1, a BPE token for the length of its bytes. It
does not depend on the tokenizer, so byte-level and BPE runs compare.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcablate.errors import UserError
from dcablate.tasks import Task
from dcablate.tasks.lm import inputs as lm_inputs
from dcablate.tasks.lm.data import (BPETokenizer, Corpus, Text, build_tokenizer, load_corpus, load_text,
                                    packed_batches, read_tokenizer_file, tokenizer_vocab_size, windows)
from dcablate.tasks.lm.spec import absolute_source
from dcablate.training.batches import to_device
from dcablate.training.packing import by_turns, wait_for_stream

KEPT_TOKENIZER = "tokenizer.json"  # a BPE run's tokenizer, kept in its run directory


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")


class LMTask(Task):
    """Next-token prediction on a text corpus: `loss`, `perplexity` and `bpb` (bits per byte) on the
    validation split, or on all of `data` (`dcablate eval --data`: every document in order, not split, so one
    document is enough; messages about it name `--data`).

    For training the text is read when the task is built; otherwise (`train=False`) the text and the
    tokenizer are read on first use, so sampling a byte-level run, or a BPE run that kept its tokenizer
    (`use_run`), needs neither the text nor the cache."""

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        self.cfg = cfg
        self.data = absolute_source(data) if data is not None else None  # `dcablate eval --data`
        self.where = "task.lm.data"  # how messages name the setting of the text
        self._tokenizer = None
        self._corpus: Corpus | None = None
        self._text: Text | None = None
        self._scored: dict[str, int] = {}  # targets and bytes the last evaluation scored
        self._capped: tuple[int, int] | None = None  # (windows scored, windows there are) under eval_sequences
        if train:  # a bad data source stops a run before it starts
            self.corpus

    # ------------------------------------------------------------------------ a run's own files

    def use_run(self, run_dir: Path) -> None:
        """Evaluate or sample the run in `run_dir` with the tokenizer it kept (runs made before runs kept one
        rebuild it from the recipe, which needs the text); messages about the text name the run's recipe."""
        run_dir = Path(run_dir)
        self.where = f"task.lm.data (in {run_dir / 'recipe.toml'})"
        kept = run_dir / KEPT_TOKENIZER
        if self.cfg.tokenizer == "bpe" and kept.is_file():
            self._tokenizer = read_tokenizer_file(kept, f"{run_dir}: the run's tokenizer")

    def keep(self, run_dir: Path) -> None:
        """Write a BPE tokenizer into the run directory as `tokenizer.json` (the byte tokenizer is no file),
        so that the run evaluates and samples without the cache or a tokenizer_file kept elsewhere. A kept
        tokenizer that differs from the recipe's is refused, never replaced, once the run has a checkpoint; before
        that (an attempt that stopped before its first step, its text fixed since) no weights were trained with it."""
        tok = self.tokenizer
        if not isinstance(tok, BPETokenizer):
            return
        path = Path(run_dir) / KEPT_TOKENIZER
        if path.is_file() and any((Path(run_dir) / "checkpoints").glob("*.pt")):
            if read_tokenizer_file(path, f"{run_dir}: the run's tokenizer").spec() != tok.spec():
                raise UserError(f"{path}: this run was trained with another tokenizer than task.lm gives now (its "
                                f"text or tokenizer_file changed?); --force-new starts a fresh run directory")
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # written whole, then renamed into place
        tok.tok.save(str(tmp))
        os.replace(tmp, path)

    # ------------------------------------------------------------------------ text and tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.cfg.tokenizer == "byte" or self.cfg.tokenizer_file:
                self._tokenizer = build_tokenizer(self.cfg)  # needs no text
            elif self.data is None:
                self._tokenizer = self.corpus.tokenizer
            else:  # the BPE trained on the run's own text, to read the other text with
                self._tokenizer = load_corpus(self.cfg, where=self.where).tokenizer
        return self._tokenizer

    @property
    def corpus(self) -> Corpus:
        """The tokenized train and validation streams of the run's own text (`task.lm.data`)."""
        if self._corpus is None:
            try:
                self._corpus = load_corpus(self.cfg, self._tokenizer, self.where)
            except UserError as e:
                gone = not any(c in self.cfg.data for c in "*?[") and not Path(self.cfg.data).expanduser().exists()
                if self.where == "task.lm.data" or self.data is not None or not gone:
                    raise
                # evaluating a run whose text is gone: other text still serves
                raise UserError(f"{e}; `dcablate eval --data PATH` evaluates the run on other text") from None
            self._tokenizer = self._corpus.tokenizer
        return self._corpus

    @property
    def text(self) -> Text:
        """All of `data` (`eval --data`) as one token stream, read with the run's tokenizer."""
        if self._text is None:
            self._text = load_text(dataclasses.replace(self.cfg, data=self.data), self.tokenizer, "--data")
        return self._text

    @property
    def token_bytes(self) -> torch.Tensor:
        """`[vocab]` UTF-8 bytes each token stands for."""
        return torch.from_numpy(self.tokenizer.token_bytes)

    @property
    def eval_stream(self) -> np.ndarray:
        """The evaluated token stream: the validation split, or all of `data` (`eval --data`)."""
        return self.corpus.val if self.data is None else self.text.tokens

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def train_seq_len(self) -> int:
        return self.cfg.seq_len

    @classmethod
    def shape(cls, options) -> tuple[int, int]:
        return options.seq_len, tokenizer_vocab_size(options)

    @classmethod
    def inputs(cls, options) -> dict[str, str]:
        return lm_inputs.inputs(options)

    @classmethod
    def check_input(cls, key: str, value: str, where: str) -> None:
        lm_inputs.check_input(key, value, where)

    @classmethod
    def for_benchmark(cls, options) -> "RandomTokens":
        return RandomTokens(options)

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        for w in packed_batches(self.corpus.train, self.cfg.seq_len, batch_size, seed, start):
            t = torch.from_numpy(w.astype(np.int64))
            yield t[:, :-1], t[:, 1:]

    def val_windows(self) -> np.ndarray:
        w = windows(self.eval_stream, self.cfg.seq_len)
        if self.cfg.eval_sequences and len(w) > self.cfg.eval_sequences:
            self._capped = (self.cfg.eval_sequences, len(w))
            w = w[: self.cfg.eval_sequences]
        return w

    def eval_batches(self, batch_size: int):
        """`[b, T + 1]` token arrays to score: batches of `val_windows`, T = seq_len. A stream shorter than one
        window is one shorter sequence; with `data` (all of a text) the tokens after the last full window are
        one more, so every token but the first is a target once."""
        stream, w = self.eval_stream, self.val_windows()
        if w.shape[0] == 0:
            yield np.asarray(stream)[None, :]
            return
        for i in range(0, w.shape[0], batch_size):
            yield w[i:i + batch_size]
        rest = stream[w.shape[0] * self.cfg.seq_len:]  # starts at the last window's last target
        if self.data is not None and w.shape[0] == windows(stream, self.cfg.seq_len).shape[0] and rest.size > 1:
            yield np.asarray(rest)[None, :]

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        token_bytes = self.tokenizer.token_bytes  # [V] int64
        # the loss sum stays on the device until the end and the bytes are counted on each batch's CPU copy (in
        # NumPy: batches.scored_per_row says why), so no batch waits for the GPU (float64 sums of the float32 batch
        # losses, as adding them on the host did)
        nats_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_tokens, n_bytes = 0, 0
        for batch in by_turns(self.eval_batches(batch_size)):
            tokens = batch.astype(np.int64)
            n_bytes += int(token_bytes[tokens[:, 1:]].sum())
            t, = to_device(device, torch.from_numpy(tokens))
            x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
            with autocast():
                logits = model(x)
            nats_sum += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            n_tokens += y.numel()
        model.train(was_training)
        wait_for_stream(device)  # the read-back below waits for the GPU: other runs of the worker go on meanwhile
        nats = nats_sum.item()
        self._scored = {"tokens": n_tokens, "bytes": n_bytes}
        loss = nats / max(n_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(nats, n_bytes)}

    def data_record(self) -> dict:
        """The text trained on and the sha256 of its bytes (and of the field read, for jsonl/parquet), the
        training split's tokens (`train_tokens`: the report's passes over the text divide by it), and
        `unigram_bpb` (`unigram_bpb`): the bits per byte that ignoring context scores on the evaluated text."""
        return {"text": self.cfg.data, "text_sha256": self.corpus.source_hash,
                "train_tokens": int(len(self.corpus.train)), "unigram_bpb": round(self.unigram_bpb(), 4)}

    def unigram_bpb(self) -> float:
        """Bits per byte, on the targets an evaluation scores, of the training split's token frequencies (counts
        plus one): a model that ignores context scores this, so a run at or above it has not yet learned to use
        the context (the report says so of the runs a compute fit rests on)."""
        token_bytes = self.tokenizer.token_bytes
        counts = np.bincount(np.asarray(self.corpus.train), minlength=len(token_bytes)).astype(np.float64) + 1.0
        log2p = np.log2(counts / counts.sum())
        bits, n_bytes = 0.0, 0
        for batch in self.eval_batches(1024):
            targets = np.asarray(batch)[:, 1:]
            bits -= float(log2p[targets].sum())
            n_bytes += int(token_bytes[targets].sum())
        return bits / n_bytes if n_bytes else float("nan")

    def eval_record(self) -> dict:
        """The text evaluated and, after `evaluate`, the targets and UTF-8 bytes it scored."""
        return {"data": self.data or self.cfg.data, **({"scored": self._scored} if self._scored else {})}

    def describe(self, metrics: dict[str, float]) -> str:
        line = f"loss {metrics['loss']:.4f}   perplexity {metrics['perplexity']:.3f}   bits/byte {metrics['bpb']:.4f}"
        if getattr(self, "_capped", None) is not None:  # the first windows only: say so where the numbers are read
            line += f"   (the first {self._capped[0]:,} of {self._capped[1]:,} windows: task.lm.eval_sequences)"
        return line


class RandomTokens(LMTask):
    """An LM task's batch shape without its corpus: uniform random tokens over the tokenizer's vocabulary
    (`dcablate bench train` times steps, not learning)."""

    benchmark_note = ("LM variants step on random tokens of the task's shape (batch_size x seq_len); the corpus "
                      "is not read")

    def __init__(self, cfg):
        self.cfg, self._vocab_size = cfg, tokenizer_vocab_size(cfg)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        g = torch.Generator().manual_seed(seed)
        while True:
            t = torch.randint(0, self.vocab_size, (batch_size, self.cfg.seq_len + 1), generator=g)
            yield t[:, :-1], t[:, 1:]
