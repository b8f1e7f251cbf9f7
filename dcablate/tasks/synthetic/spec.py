"""The recipe checks all suite tasks share, and the bounds of their keys (torch-free).

Every suite task's section has `vocab_size`, `seq_len`, `num_train_examples`, `num_test_examples` and
`data_seed`; its spec's check calls `check_common` and then names its own geometry problems through
`check_problems`.
"""

from __future__ import annotations

from typing import Callable, Iterable

from dcablate.errors import RecipeError

# a split is generated in memory, as int16 or int32 tokens
MAX_EXAMPLES = 10 ** 7
MAX_SEQ_LEN = 2 ** 20
MAX_VOCAB = 2 ** 24

# (the section's key at fault, what is wrong), or with a third item (another key, what is wrong said of it) where
# two keys conflict: the one the user set by --set is blamed (`check_problems`)
Problem = tuple


def where(fail, key: str) -> str:
    """Where the user set `key` (the file, or "default"), as the recipe's checks name it: `fail` raises the
    RecipeError that says so."""
    try:
        fail(key, "")
    except RecipeError as e:
        return e.source
    return "the recipe"


def check_common(recipe, fail, name: str) -> None:
    """What every suite task `name` needs of the rest of the recipe: a batch no larger than the training
    set (a smaller batch would silently change the run), and room for the task's tokens in
    `model.vocab_size`."""
    options = getattr(recipe.task, name)
    batch, n = recipe.train.batch_size, options.num_train_examples
    if n < batch:
        key = f"task.{name}.num_train_examples"
        fail("train.batch_size", f"{batch} is more than the {n} training examples ({key} = {n}, set in "
             f"{where(fail, key)}); lower train.batch_size or add examples")
    if recipe.model.vocab_size and recipe.model.vocab_size < options.vocab_size:
        fail("model.vocab_size", f"{recipe.model.vocab_size} is smaller than task.{name}.vocab_size "
             f"{options.vocab_size}")


def check_problems(fail, name: str, problems: Iterable[Problem]) -> None:
    """Fail on the first of a task's geometry `problems` (from its `problems(options)` function). A problem of two
    keys names the other key when only that one comes from `--set` (`run --set`, `eval --set`): the value the user
    just changed is the one to fix or to blame, not the recipe's."""
    for key, message, *other in problems:
        if other:
            other_key, other_message = other[0]
            if where(fail, f"task.{name}.{other_key}") == "--set" != where(fail, f"task.{name}.{key}"):
                key, message = other_key, other_message
        fail(f"task.{name}.{key}", message)


def spec_check(name: str, problems: Callable[[object], list[Problem]]):
    """The `TaskSpec.check` of suite task `name`: its geometry `problems(options)`, then `check_common`."""

    def check(recipe, fail) -> None:
        check_problems(fail, name, problems(getattr(recipe.task, name)))
        check_common(recipe, fail, name)

    return check


def value_chance(vocab_size: int, reserved: int = 0) -> float:
    """A uniform guess among the value tokens: the upper half `[K, V - reserved)`, `K = (V - reserved) // 2`, of
    the tokens left when `reserved` of them (noise, padding, an insert token) are set aside. The recall tasks'
    and memorization's `TaskSpec.chance`."""
    content = vocab_size - reserved
    return 1 / (content - content // 2)
