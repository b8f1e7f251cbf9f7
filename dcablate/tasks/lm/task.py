"""Language modelling on real text: next-token loss, perplexity and bits per byte.

Bits per byte = total nats over the evaluated targets / (ln 2 * UTF-8 bytes those targets stand for):
a separator token stands for 0 bytes, a byte token for 1, a BPE token for the length of its bytes. It
does not depend on the tokenizer, so byte-level and BPE runs compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dcablate.tasks import Task
from dcablate.tasks.lm.data import load_corpus, packed_batches, tokenizer_vocab_size, windows


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")


class LMTask(Task):
    """Next-token prediction on a text corpus: `loss`, `perplexity` and `bpb` (bits per byte) on the
    validation split (or on all of `data`)."""

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        self.cfg, self.data = cfg, data
        if data is not None:  # evaluate on other text (dcablate eval --data) with the run's tokenizer
            import dataclasses
            if cfg.tokenizer == "bpe" and not cfg.tokenizer_file:  # the BPE trained on the run's text
                cfg = dataclasses.replace(cfg, tokenizer_file=load_corpus(cfg).tokenizer.path)
            cfg = dataclasses.replace(cfg, data=data)
        self.corpus = load_corpus(cfg)
        self.tokenizer = self.corpus.tokenizer
        self.token_bytes = torch.from_numpy(self.tokenizer.token_bytes)
        # the evaluated stream: the validation split, or all of the given text for `eval --data`
        self.eval_stream = self.corpus.val if data is None else np.concatenate([self.corpus.train, self.corpus.val])

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
    def for_benchmark(cls, options) -> "RandomTokens":
        return RandomTokens(options)

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        for w in packed_batches(self.corpus.train, self.cfg.seq_len, batch_size, seed, start):
            t = torch.from_numpy(w.astype(np.int64))
            yield t[:, :-1], t[:, 1:]

    def val_windows(self) -> np.ndarray:
        w = windows(self.eval_stream, self.cfg.seq_len)
        if self.cfg.eval_sequences:
            w = w[: self.cfg.eval_sequences]
        return w

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        w = self.val_windows()
        if w.shape[0] == 0:  # validation shorter than one window: score it as one shorter sequence
            w = np.asarray(self.eval_stream)[None, :]
        nats, n_tokens, n_bytes = 0.0, 0, 0
        for i in range(0, w.shape[0], batch_size):
            t = torch.from_numpy(w[i:i + batch_size].astype(np.int64))
            x, y = t[:, :-1].to(device), t[:, 1:].to(device)
            with autocast():
                logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            n_tokens += y.numel()
            n_bytes += int(self.token_bytes[y.cpu()].sum())
        model.train(was_training)
        loss = nats / max(n_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(nats, n_bytes)}

    def eval_record(self) -> dict:
        return {"data": self.data or self.cfg.data}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f}   perplexity {metrics['perplexity']:.3f}   bits/byte {metrics['bpb']:.4f}"


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
