"""Sampling from a trained LM: `dcablate generate`.

The prompt is cut to its last `context` tokens (`task.lm.seq_len`, the length the model was trained on).
Models whose mixers and FFNs all have a decode path (every built-in one) run it once through
`LanguageModel.prefill` and then one `step` per token: recurrent mixers carry their state on without
limit, attention keeps a sliding window of the last `context` keys. Any other model recomputes the
last `context` tokens for every new token. Temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.no_grad()
def sample_ids(model, prompt_ids: list[int], max_tokens: int, context: int, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None, device="cpu",
               stop_id: int | None = None, cached: bool | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids following `prompt_ids`; stops before yielding
    `stop_id` (the document separator: the document ended). `cached` chooses the decode cache (True)
    or a full recompute per token (False); None picks the cache where the model supports it."""
    model.eval()
    if cached is None:
        cached = model.supports_cache()
    ids = list(prompt_ids)
    cache = None
    for i in range(max_tokens):
        if not cached:
            logits = model(torch.tensor([ids[-context:]], dtype=torch.long, device=device))[:, -1]
        elif i == 0:
            logits, cache = model.prefill(torch.tensor([ids[-context:]], dtype=torch.long, device=device), context)
        else:
            logits, cache = model.step(torch.tensor([ids[-1]], dtype=torch.long, device=device), cache)
        nxt = pick(logits[0].float(), temperature, top_k, generator)
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
