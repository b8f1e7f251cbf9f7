"""MQAR's recipe section `task.mqar`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.errors import RecipeError
from dcablate.tasks import TaskSpec, register_task

# all of a segment's examples are generated in memory, as int16 or int32 tokens
MAX_EXAMPLES = 10 ** 7
MAX_SEQ_LEN = 2 ** 20
MAX_VOCAB = 2 ** 24


@dataclass
class SegmentSpec:
    seq_len: int = option(64, "tokens per example (T); even", min=2, max=MAX_SEQ_LEN)
    num_kv_pairs: int = option(4, "key-value pairs per example; 4 * num_kv_pairs <= seq_len", min=1)
    num_examples: int = option(1000, "examples in this segment", min=1, max=MAX_EXAMPLES)


def _default_train_segments():
    return [SegmentSpec(64, 4, 20000)]


def _default_test_segments():
    return [SegmentSpec(64, 4, 1000)]


@dataclass
class MQARSection:
    vocab_size: int = option(8192, "vocabulary; keys from [1, V/2), values from [V/2, V); token 0 reserved", min=4,
                             max=MAX_VOCAB)
    power_a: float = option(0.01, "query slot i drawn with probability proportional to i^(power_a - 1)",
                            min=0.0, max=1.0, min_open=True)
    filler: str = option("random", "tokens between queries: uniform over the vocabulary, or 0",
                         choices=("random", "zero"))
    data_seed: int = option(0, "seed of the generated data, separate from run.seed so every model of a sweep "
                            "sees the same examples", min=0)
    train: list[SegmentSpec] = option(None, "training segments", factory=_default_train_segments)
    test: list[SegmentSpec] = option(None, "test segments; may be longer than any training segment",
                                     factory=_default_test_segments)


def segment_problem(seq_len: int, num_kv_pairs: int, vocab_size: int | None = None) -> tuple[str, str] | None:
    """(field, what is wrong) for a segment MQAR cannot generate, else None: an example is 2·kv context tokens
    then room for kv queries in an even length, with kv distinct keys from [1, V/2)."""
    if seq_len % 2:
        return "seq_len", f"must be even, got {seq_len}"
    if 4 * num_kv_pairs > seq_len:
        return "num_kv_pairs", f"4 * num_kv_pairs ({4 * num_kv_pairs}) must be <= seq_len ({seq_len})"
    if vocab_size is not None and num_kv_pairs >= vocab_size // 2:
        return "num_kv_pairs", f"needs fewer than vocab_size/2 = {vocab_size // 2} distinct keys"
    return None


def where(fail, key: str) -> str:
    """Where the user set `key`, as the recipe's checks name it: `fail` raises the RecipeError that says so."""
    try:
        fail(key, "")
    except RecipeError as e:
        return e.source
    return "the recipe"


def check(recipe, fail) -> None:
    q = recipe.task.mqar
    for split in ("train", "test"):
        for i, seg in enumerate(getattr(q, split)):
            problem = segment_problem(seg.seq_len, seg.num_kv_pairs, q.vocab_size)
            if problem is not None:
                fail(f"task.mqar.{split}[{i}].{problem[0]}", problem[1])
    batch = recipe.train.batch_size
    for i, seg in enumerate(q.train):  # a smaller segment would silently give smaller batches
        if seg.num_examples < batch:
            key = f"task.mqar.train[{i}].num_examples"
            fail("train.batch_size", f"{batch} is more than the {seg.num_examples} training examples of "
                 f"task.mqar.train[{i}] ({key} = {seg.num_examples}, set in {where(fail, key)}); lower "
                 f"train.batch_size or add examples")
    lengths = sorted({seg.seq_len for seg in q.train})
    if (recipe.train.tokens or recipe.train.tokens_per_param) and len(lengths) > 1:
        fail("train.tokens" if recipe.train.tokens else "train.tokens_per_param",
             f"a token budget needs one training length; task.mqar.train has {lengths}")
    if recipe.model.vocab_size and recipe.model.vocab_size < q.vocab_size:
        fail("model.vocab_size", f"{recipe.model.vocab_size} is smaller than task.mqar.vocab_size {q.vocab_size}")


register_task(TaskSpec("mqar", "dcablate.tasks.mqar.task:MQARTask", MQARSection, "MQAR options", check,
                       headline="overall", higher_is_better=True, headline_label="overall MQAR accuracy",
                       bounded=True, sparse_targets=True))
