"""What makes runs one variant in `dcablate report`: their resolved recipes agree on every key that applies to
them, except the keys the comparison varies on purpose.

A run's recipe keys are those that shape it (`training.hparams.applicable`: no other component's section, no
conv options without a conv, nothing that cannot change results, not the run's name, place or device). The
report names a variant by (mixer, conv, placement, ffn) (`report.variant_name`); a recipe key that differs
between runs of one such name, and is not one of the comparison's free keys, joins the variant with its value
(`conv.rank=4`), so runs that differ in it are never pooled as if they were seeds; in report tables and ladders a
key outside the conv that differs among the runs of one task, mixer and channel mixer joins all their variants,
so that a conv variant and its baseline carry the same keys. What is free depends on the comparison:

- a report table or compute ladder (MQAR, LM): the seed, the learning rate, `model.d_model` (the size), and
  every key that follows the size, i.e. that takes one value per `d_model` among the runs of the name
  (`model.n_layers` or `train.steps` zipped with `d_model` in a sweep);
- the synthetic suite (`suite.py`): its settings, grid and seeds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

# already in the report's name of a variant (report.variant_name, report.conv_label)
NAMED = ("model.mixer", "model.conv.kind", "model.conv.placement", "model.conv.activation", "model.conv.residual",
         "model.ffn")
# where a run trained, not what: the same recipe on another device is the same run
PLACE = ("run.device",)
# the keys a report table or compute ladder varies on purpose (with every key that follows SIZE_KEY)
LADDER_FREE = ("run.seed", "train.lr")
SIZE_KEY = "model.d_model"


def recipe_keys(recipe) -> dict[str, object]:
    """The flat keys that shape a run (`{"model.conv.rank": 15, ...}`), with hashable values; from a built recipe."""
    from dcablate.training.hparams import applicable

    return {k: v for k, v in applicable(recipe).items() if k not in PLACE}


def extras(items: Sequence, name: Callable, keys: Callable, free: Callable[[str], bool],
           size: str | None = None, family: Callable | None = None,
           own: tuple[str, ...] = ("model.conv.",)) -> list[tuple[tuple[str, object], ...]]:
    """For each of `items`, the `(key, value)` pairs that set it apart within its name: the keys whose value
    differs among the items of one `name(item)` (`keys(item)` gives an item's flat recipe keys), less those in
    `NAMED`, those `free(key)` accepts and, with `size`, those that follow it (one value per value of `size`).
    With `family`, such a key found in any name of a `family(item)` (but the keys starting with `own`) sets apart
    every item of that family: the variants a comparison sets side by side (a conv variant and its conv-free
    baseline) then carry the same keys, also where runs of other settings share a name with some of them only (a
    folder holding several experiments). Sorted by key; () where nothing differs."""
    flats = [keys(item) for item in items]
    groups: dict[object, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[name(item)].append(i)
    chosen: list[set[str]] = [set() for _ in items]
    for members in groups.values():
        among = [flats[i] for i in members]
        varying = {key for key in set().union(*among)
                   if not (key in NAMED or key == size or free(key) or len({f.get(key) for f in among}) < 2
                           or (size is not None and _follows(among, key, size)))}
        for i in members:
            chosen[i] |= varying
    if family is not None:
        kin: dict[object, set[str]] = defaultdict(set)
        for i, item in enumerate(items):
            kin[family(item)] |= {key for key in chosen[i] if not key.startswith(own)}
        for i, item in enumerate(items):
            chosen[i] |= kin[family(item)]
    return [tuple((key, flat.get(key)) for key in sorted(picked)) for flat, picked in zip(flats, chosen)]


def _follows(flats: list[dict], key: str, size: str) -> bool:
    """Whether `key` takes a single value at each value of `size` (a key zipped with the size in a sweep)."""
    seen: dict[object, object] = {}
    for flat in flats:
        at = flat.get(size)
        if seen.setdefault(at, flat.get(key)) != flat.get(key):
            return False
    return True


def ladder_extras(items: Sequence, name: Callable, keys: Callable,
                  family: Callable | None = None) -> list[tuple[tuple[str, object], ...]]:
    """`extras` for report tables and compute ladders: free are the seed, the learning rate, the size
    (`model.d_model`) and the keys that follow it; `family`: the items a conv comparison sets side by side."""
    return extras(items, name, keys, lambda key: key in LADDER_FREE, size=SIZE_KEY, family=family)


def sort_key(variant: tuple) -> tuple:
    """A variant tuple in an order that never compares a number with a string (a key unset in one variant,
    `"unset"`, and a number in another): the name, then the pairs with numbers before strings."""
    return (*variant[:4], *((k, (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
                            for k, v in variant[4:]))


def label(pairs: tuple) -> str:
    """`conv.rank=4 train.steps=2000`: the pairs as the report writes them (`model.` dropped)."""
    def value(v):
        return "unset" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.removeprefix('model.')}={value(v)}" for k, v in pairs)
