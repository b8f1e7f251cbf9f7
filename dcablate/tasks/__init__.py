"""Tasks: data plus metrics behind one interface, and the registry of them.

A task is one `Task` subclass (torch is imported by its module only) plus one `register_task(TaskSpec(...))`
with its torch-free spec: its recipe section `task.<name>`, checks, and the headline metric that early
stopping, run tables and reports read. The package's own register in their folders' `spec.py`: `mqar`, `lm`
and the synthetic suite (`recall`, `fuzzy_recall`, `noisy_recall`, `selective_copy`, `compression`,
`memorization`; docs/tasks.md), whose shared parts are in `synthetic/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dcablate.registry import ComponentSpec, Registry, checked_impl, core_keys


@dataclass(frozen=True)
class TaskSpec(ComponentSpec):
    """A task (`task.kind`): `impl` is its `Task` subclass.

    headline          the metric a run is summarised, early-stopped and ranked by
    higher_is_better  the headline's direction (accuracy: True; bits per byte: False)
    headline_label    how reports name the headline
    bounded           the headline lies in [0, 1] (figures fix their axis)
    sparse_targets    only a few positions per sequence are scored: the loss gathers them before the
                      vocabulary-wide head (MQAR), instead of scoring every position (LM)
    chance            the headline a uniform guess among the tokens a scored position can hold scores, from the
                      task section's values ({key: value}); None where it has no such meaning (LM)
    unread            `(recipe) -> [(key, why), ...]`: keys of its section that the recipe's other settings leave
                      unread (LM's `vocab_size` with byte tokens); a setting of one gets a note
    learned           keys of its section that fix what a trained model knows beyond its vocabulary size: the
                      key-value map it memorized (memorization's `data_seed`) or the roles of its token ids (noisy
                      recall's `noise_vocab_size`, which moves the bounds between keys, values and noise);
                      `eval` keeps the run's values and refuses a `--set` of one"""
    headline: str = field(kw_only=True)
    higher_is_better: bool = field(kw_only=True)
    headline_label: str = field(default="", kw_only=True)
    bounded: bool = field(default=False, kw_only=True)
    sparse_targets: bool = field(default=False, kw_only=True)
    chance: Callable[[dict], float] | None = field(default=None, kw_only=True)
    unread: Callable = field(default=lambda recipe: [], kw_only=True)
    learned: tuple[str, ...] = field(default=(), kw_only=True)


class Task:
    """The interface a training run and `dcablate eval` use. `spec` is set by `build_task`.

    Subclasses implement `__init__(options, train=True, data=None)` (`options`: the recipe's `task.<name>`
    section; `train=False` skips building training data; `data`: other data to evaluate on, from
    `dcablate eval --data`, for tasks that read data), and the methods below."""

    spec: TaskSpec
    benchmark_note: str | None = None  # what `bench train` says of this task's batches, when they are stand-ins

    @property
    def headline(self) -> str:
        return self.spec.headline

    @property
    def higher_is_better(self) -> bool:
        return self.spec.higher_is_better

    @property
    def vocab_size(self) -> int:
        """Token ids run over [0, vocab_size)."""
        raise NotImplementedError

    @property
    def max_seq_len(self) -> int:
        """The longest sequence training or evaluation feeds the model."""
        raise NotImplementedError

    @property
    def train_seq_len(self) -> int:
        """The length of the training batches' sequences (the longest, when they vary)."""
        raise NotImplementedError

    @classmethod
    def shape(cls, options) -> tuple[int, int]:
        """(sequence length, vocabulary) of a recipe's task without building its data (`dcablate info`)."""
        raise NotImplementedError

    @classmethod
    def train_length(cls, options) -> int:
        """`train_seq_len` from a recipe's task options, without building the task (a token budget's steps are
        counted in it before a run starts): the shape's length unless a task trains on shorter sequences than it
        evaluates on."""
        return cls.shape(options)[0]

    @classmethod
    def inputs(cls, options) -> dict[str, str]:
        """What training reads from outside the recipe, by the recipe key that names it (the LM task:
        `{"task.lm.data": "/data/python-docs"}`). `dcablate run` and `--dry-run` pass each distinct key and value
        of the runs about to train to `check_input` once, before any run starts (`dcablate/runs/preflight.py`).
        Default: nothing."""
        return {}

    @classmethod
    def check_input(cls, key: str, value: str, where: str) -> None:
        """Raise a UserError whose line starts with `where` (the file, `--set` or sweep table that set `key`, and
        the key) and says how to fix it when `value` cannot be read: missing, unreadable, holding nothing the task
        reads. Checks only what needs no network and no reading of the whole input: it runs whenever a sweep
        starts. Default: nothing."""

    @classmethod
    def head(cls, options, d_model: int):
        """The task's own module between the model's final hidden states `[B, T, D]` and its LM head, or None
        (the default: the LM head reads every position). It becomes part of the model
        (`LanguageModel(task_head=...)`, through `task_head`): compression's decoder reads the hidden state
        at the aggregation token and writes one row per position to reconstruct, `[B, T, D]`."""
        return None

    @classmethod
    def for_benchmark(cls, options) -> "Task":
        """A task whose `train_batches` have this task's shapes, for `dcablate bench train` (default: itself)."""
        return cls(options)

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple]:
        """Endless `(inputs [B, T], targets [B, T])` int64 batches (target -100: not scored), the same for a
        given `seed`; `start` skips that many batches (resume)."""
        raise NotImplementedError

    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        """Metrics of `model` on the held-out data; holds the headline metric and `loss`."""
        raise NotImplementedError

    def eval_record(self) -> dict:
        """What `dcablate eval` writes beside the metrics to say what was evaluated (test segments, data)."""
        return {}

    def describe(self, metrics: dict[str, float]) -> str:
        """`dcablate eval`'s lines for `metrics`."""
        return "   ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def keep(self, run_dir: Path) -> None:
        """Write into a run directory what evaluating and sampling the run needs besides its recipe and
        checkpoints (the LM task: its BPE tokenizer), so that the run stands alone. The training loop calls
        it once the run has started or resumed. Default: nothing."""

    def use_run(self, run_dir: Path) -> None:
        """Read back what `keep` wrote; `build_task(..., run_dir=...)` calls it (`dcablate eval`, `generate`).
        Default: nothing."""

    def data_record(self) -> dict:
        """What the run's data was, for `summary.json` `data` (the LM task: its text and a digest of its bytes, so
        that a rerun on another version of a corpus shows); {} writes nothing. Default: {}."""
        return {}

    def share_data(self, folder: Path) -> None:
        """Generate the task's data once into `folder` (shared by every run under one `run.out_dir`) or read it
        from there; the training loop calls it once the model is on its device. Default: nothing (the task makes
        its data itself)."""

    def check_data(self) -> None:
        """Make the data a run of this setting would make, writing nothing, and raise a UserError (its line starting
        with the task's key, `task.<kind>: ...`) when the setting cannot give it; `dcablate run --dry-run` calls it
        once per distinct setting of the runs it plans, so a setting that would stop a sweep midway is named before
        any run starts. Default: nothing (a task whose data cannot fail so, or is read from files: `check_input`)."""


REQUIRED = ("vocab_size", "max_seq_len", "train_seq_len", "shape", "train_batches", "evaluate")  # Task's own raise


def interface_problem(cls) -> str | None:
    """What keeps `cls` from being a task (`Task`'s interface: a subclass defining every member in `REQUIRED`), or
    None."""
    import inspect

    name = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        return f"{name} is not a subclass of dcablate.tasks.Task"
    missing = [m for m in REQUIRED if inspect.getattr_static(cls, m, None) is inspect.getattr_static(Task, m)]
    if missing:
        return (f"{name} does not define {', '.join(missing)} (a Task defines the properties vocab_size, max_seq_len "
                f"and train_seq_len, the classmethod shape(options) and the methods train_batches and evaluate)")
    return None


TASKS: Registry[TaskSpec] = Registry("task", (
    "dcablate.tasks.mqar.spec", "dcablate.tasks.lm.spec",
    "dcablate.tasks.recall.spec", "dcablate.tasks.fuzzy_recall.spec", "dcablate.tasks.noisy_recall.spec",
    "dcablate.tasks.selective_copy.spec", "dcablate.tasks.compression.spec", "dcablate.tasks.memorization.spec"),
    impl_problem=lambda cls: interface_problem(cls), section_keys=core_keys("task", "TaskCore"))


def register_task(spec: TaskSpec, replace: bool = False) -> TaskSpec:
    return TASKS.register(spec, replace)


def task_class(kind: str) -> type:
    """The checked `Task` subclass of the registered task `kind`; a UserError naming `task.kind` when its `impl`
    cannot be imported or does not implement the interface (a class given itself was checked when registered)."""
    spec = TASKS.get(kind)
    return spec.impl if isinstance(spec.impl, type) else checked_impl(spec, "task.kind", interface_problem)


def task_options(task_cfg):
    """The recipe's options of its task (`task.<kind>`), or None for a task without a section."""
    return getattr(task_cfg, task_cfg.kind, None)


def task_head(task_cfg, d_model: int):
    """The module the recipe's task puts between the model's hidden states and its LM head (`Task.head`),
    or None; `build_model` passes it to the `LanguageModel`."""
    return task_class(task_cfg.kind).head(task_options(task_cfg), d_model)


def check_shape(task: Task, task_cfg) -> None:
    """A UserError when the built `task`'s `max_seq_len` and `vocab_size` are not what its class's `shape(options)`
    says without data: `dcablate info` and the planning of token budgets read `shape`, so a plugin task whose two
    disagree would be counted and planned as another model than the one its runs train."""
    expected = type(task).shape(task_options(task_cfg))
    built = (task.max_seq_len, task.vocab_size)
    if tuple(expected) != built:
        from dcablate.errors import UserError

        raise UserError(f"task '{task_cfg.kind}': shape(options) gives (sequence length, vocabulary) = "
                        f"{tuple(expected)}, but the built task has max_seq_len {built[0]} and vocab_size {built[1]}; "
                        f"`dcablate info` and token budgets read shape(), so it must give what the task builds")


def build_task(task_cfg, train: bool = True, data: str | None = None, benchmark: bool = False,
               run_dir: Path | None = None) -> Task:
    """The recipe's task (`task_cfg`: its `[task]` section); `data` replaces what the task evaluates on
    (`dcablate eval --data`); `benchmark`: the task's benchmark stand-in (`Task.for_benchmark`); `run_dir`:
    the finished run it evaluates or samples, whose kept files it reads (`Task.use_run`)."""
    spec = TASKS.get(task_cfg.kind)
    cls = task_class(task_cfg.kind)
    options = task_options(task_cfg)
    task = cls.for_benchmark(options) if benchmark else cls(options, train=train, data=data)
    task.spec = spec
    if run_dir is not None:
        task.use_run(Path(run_dir))
    return task
