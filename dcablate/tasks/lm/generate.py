"""Sampling from a trained LM: `dcablate generate`.

The prompt is cut to its last `context` tokens (`task.lm.seq_len`, the length the model was trained on).
Models whose mixers and FFNs all have a decode path (every built-in one) run it once through
`LanguageModel.prefill` and then one `step` per token: recurrent mixers carry their state on without
limit, attention keeps a sliding window of the last `context` keys. Any other model recomputes the
last `context` tokens for every new token. Temperature 0 is greedy. `Speed` times the two phases.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Speed:
    """How fast `sample_ids` ran, timed inside it (what the caller does between tokens is not counted).

    The first token comes out of the prompt's prefill; every later token is one decode step. Each token is
    read back to the host when it is picked, so on a GPU the times include the device's work."""
    prompt_tokens: int = 0
    tokens: int = 0  # tokens sampled (a final document separator included)
    prefill_s: float = 0.0  # the prompt through the model, and the first token picked
    decode_s: float = 0.0  # the decode steps of the later tokens

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: tokens per second of decode steps (with no step: the first token over the prefill)."""
        if self.tokens > 1:
            return (self.tokens - 1) / self.decode_s if self.decode_s else float("inf")
        return self.tokens / self.prefill_s if self.prefill_s else float("nan")

    def describe(self) -> str:
        """One line, e.g. `200 tokens in 1.52 s, 131.9 tokens/s decoding (prompt of 12 tokens: first token after
        31.0 ms)`."""
        return (f"{self.tokens} tokens in {self.prefill_s + self.decode_s:.2f} s, {self.tokens_per_s:.1f} tokens/s "
                f"decoding (prompt of {self.prompt_tokens} token{'' if self.prompt_tokens == 1 else 's'}: first token "
                f"after {1e3 * self.prefill_s:.1f} ms)")


@torch.no_grad()
def sample_ids(model, prompt_ids: list[int], max_tokens: int, context: int, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None, device="cpu",
               stop_id: int | None = None, cached: bool | None = None, speed: Speed | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids following `prompt_ids`; stops before yielding
    `stop_id` (the document separator: the document ended). `cached` chooses the decode cache (True)
    or a full recompute per token (False); None picks the cache where the model supports it. `speed`, when
    given, is filled in as tokens are sampled."""
    model.eval()
    if cached is None:
        cached = model.supports_cache()
    speed = speed if speed is not None else Speed()
    ids = list(prompt_ids)
    speed.prompt_tokens = len(ids[-context:])
    cache = None
    for i in range(max_tokens):
        start = time.perf_counter()
        if not cached:
            logits = model(torch.tensor([ids[-context:]], dtype=torch.long, device=device))[:, -1]
        elif i == 0:
            logits, cache = model.prefill(torch.tensor([ids[-context:]], dtype=torch.long, device=device), context)
        else:
            logits, cache = model.step(torch.tensor([ids[-1]], dtype=torch.long, device=device), cache)
        nxt = pick(logits[0].float(), temperature, top_k, generator)  # reads the token back: waits for the device
        took = time.perf_counter() - start
        speed.tokens += 1
        if i == 0:
            speed.prefill_s = took
        else:
            speed.decode_s += took
        if nxt == stop_id:
            return
        ids.append(nxt)
        yield nxt


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """The next token from logits `[V]`: argmax at temperature 0, else a sample from the top-k softmax."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_text(tokenizer, prompt: str, ids: Iterator[int]) -> Iterator[str]:
    """Decode incrementally: yield the new text after each token (held back while a UTF-8 character is
    incomplete)."""
    out: list[int] = []
    shown = ""
    for i in ids:
        out.append(i)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):  # a multi-byte character not finished yet
            continue
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(out)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
