"""Sampling from a trained LM: `dcablate generate`.

Decoding recomputes the whole context every token (the mixers have no decode cache yet), over the last
`task.lm.seq_len` tokens, the length the model was trained on. Temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.no_grad()
def sample_ids(model, prompt_ids: list[int], max_tokens: int, context: int, temperature: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None, device="cpu",
               stop_id: int | None = None) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids following `prompt_ids` (full recompute per token);
    stops before yielding `stop_id` (the document separator: the document ended)."""
    model.eval()
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        x = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
        logits = model(x)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if nxt == stop_id:
            return
        ids.append(nxt)
        yield nxt


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
