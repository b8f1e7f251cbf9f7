"""The `Task` base class of the synthetic suite: a fixed training set, a disjoint test set (data.py), and
accuracy over the scored positions."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from dcablate.errors import UserError
from dcablate.models.lm import scored
from dcablate.tasks import Task
from dcablate.tasks.synthetic.data import CHUNK, IGNORE_INDEX, SuiteData, TooFewDistinct, row_hashes, training_set
from dcablate.training.batches import scored_per_row, to_device
from dcablate.training.packing import by_turns, wait_for_stream


class SuiteTask(Task):
    """A suite task: subclasses set `kind` (their `task.kind`, which names their recipe section) and
    implement `make(rng, rows, train) -> (inputs [rows, T], targets [rows, T])` int64, target -100 where
    a position is not scored. Every example has `cfg.seq_len` tokens from `[0, cfg.vocab_size)`.

    Metrics: `accuracy`, the fraction of all scored test positions whose most likely token is the target
    (every scored token counts once), and `loss`, the mean cross-entropy over them."""

    kind = ""
    chunk = CHUNK  # rows per generator call (data.py); a generator with large intermediates asks for fewer

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        if data is not None:
            raise UserError(f"--data evaluates on other text, which applies to language models (task.kind = 'lm') "
                            f"only; this run's task is '{self.kind}'")
        self.cfg = cfg
        self._data: SuiteData | None = None
        self.trained_cfg = None  # the options of the run evaluated (`use_run`), where they differ from `cfg`

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def data(self) -> SuiteData:
        """Both splits, generated on first use (the test set needs the training set to stay disjoint from it)."""
        if self._data is None:
            c, t = self.cfg, self.trained_cfg
            try:
                exclude = None
                if t is not None:  # evaluated at another setting: unlike what the run trained on, not this one's
                    trained = type(self)(t)
                    exclude = row_hashes(training_set(trained.make, t.num_train_examples, t.data_seed, t.vocab_size,
                                                      trained.chunk)[0])
                self._data = SuiteData(self.make, c.num_train_examples, c.num_test_examples, c.data_seed,
                                       c.vocab_size, chunk=self.chunk, exclude=exclude)
            except TooFewDistinct as e:
                # under eval (another setting than the run's) the vocabulary and the training set are the run's
                raise_ = "seq_len" if t is not None else "vocab_size or seq_len"
                fewer = "num_test_examples" if t is not None else "num_train_examples or num_test_examples"
                raise UserError(f"task.{self.kind}: {e}: the setting has too few distinct examples for a test "
                                f"set disjoint from training; raise task.{self.kind}.{raise_}, or lower "
                                f"{fewer}") from None
        return self._data

    def use_run(self, run_dir) -> None:
        """Evaluating a finished run: its own training options for this task (its recipe.toml), so that a test set
        at other settings (`dcablate eval --set task.<kind>.seq_len=...`) leaves out the examples the run trained
        on, not those another training set would hold."""
        from dcablate import config
        from dcablate.tasks import task_options

        try:
            trained = config.load(str(run_dir / "recipe.toml")).task
        except (OSError, UserError):
            return  # eval refuses such a run before it evaluates; nothing to change here
        options = task_options(trained) if trained.kind == self.kind else None
        if options is not None and options != self.cfg:
            self.trained_cfg = options

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def train_seq_len(self) -> int:
        return self.cfg.seq_len

    @classmethod
    def shape(cls, options) -> tuple[int, int]:
        return options.seq_len, options.vocab_size

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        return self.data.train_batches(batch_size, seed, start)

    def share_data(self, folder) -> None:
        """Generate both splits now, in the run's data phase and before the run writes anything: a setting with
        too few distinct examples then ends the run with nothing in its directory, and the time is counted as
        data, not training. (Each run makes its own; `folder` is not used.)"""
        self.data  # noqa: B018 - generated on first use

    def check_data(self) -> None:
        """Both splits generated (a second or so per setting): too few distinct examples is a UserError."""
        self.data  # noqa: B018 - generated on first use

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        """Accuracy and mean loss over every scored position of the test set. The sums stay on the device until
        the end; which positions are scored is read on each batch's CPU copy, so no batch waits for the GPU."""
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_scored = 0
        for x, y in by_turns(self.data.test_batches(batch_size)):
            count = int(scored_per_row(y).sum())  # in NumPy: batches.scored_per_row says why
            x, y = to_device(device, x, y)
            with autocast():
                h, targets = scored(model.features(x), y, count)  # [count, D], [count]
                logits = model.lm_head(h)  # [count, V]
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
            correct += (logits.argmax(-1) == targets).sum().double()
            n_scored += count
        model.train(was_training)
        wait_for_stream(device)  # the read-back below waits for the GPU: other runs of the worker go on meanwhile
        n = max(n_scored, 1)
        return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}

    def eval_record(self) -> dict:
        return {"setting": dataclasses.asdict(self.cfg), "test_examples": len(self.data.test[0]),
                "scored_positions": int((self.data.test[1] != IGNORE_INDEX).sum())}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"accuracy {metrics['accuracy']:.4f}   loss {metrics['loss']:.4f}"
