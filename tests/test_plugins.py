"""Adding a token mixer, a conv kind and a task is one file plus one registry entry each.

This module is that file: it defines a toy mixer (a causal running mean of a value stream, with a conv
on that stream), a toy conv kind (a one-token shift mixed in by a learned gate) and a toy task (predict
the previous token), registers them, and trains and evaluates them through a recipe with the real
`dcablate run` and `dcablate eval`, touching no other file. The same module also works as a plugin of
a separate process through `DCABLATE_PLUGINS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcablate.config.fields import option
from dcablate.models.conv import ConvKindSpec, make_conv, register_conv
from dcablate.models.conv.streams import conv_or_identity
from dcablate.models.mixers import MixerSpec, register_mixer
from dcablate.models.mixers.base import TokenMixer
from dcablate.tasks import Task, TaskSpec, register_task

# ------------------------------------------------------------------------------------------ a token mixer


@dataclass
class RunningMeanOptions:
    decay: float = option(1.0, "weight of the past: 1 = a plain running mean", min=0.0, max=1.0)


class RunningMean(TokenMixer):
    """`y_t = o(mean_{s<=t} conv(v(h))_s)`: causal, one value stream `v` with a conv on it (any attribute name:
    the counts find the modules `make_conv` made), and under `all_linear` a conv after the output projection too
    (the stream `o`, which the spec's default `output_conv=True` declares)."""

    def __init__(self, d_model: int, conv_cfg, backend: str):
        super().__init__()
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.value_filter = make_conv(conv_cfg, "v", d_model, d_model, backend)
        self.output_filter = make_conv(conv_cfg, "o", d_model, d_model, backend, placement="all_linear")

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "RunningMean":
        return cls(m.d_model, m.conv, m.backend)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        v = conv_or_identity(self.value_filter, self.v_proj(h), h)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=v.dtype)[None, :, None]
        return conv_or_identity(self.output_filter, self.o_proj(v.cumsum(1) / steps), h)


# ------------------------------------------------------------------------------------------ a conv kind


@dataclass
class GatedShiftOptions:
    init_gate: float = option(0.5, "the gate's initial value", min=0.0)


class GatedShift(nn.Module):
    """`y_t = x_t + g * x_{t-1}` with a learned per-channel gate `g` (a conv of width 2, h unused)."""

    def __init__(self, dim: int, init_gate: float = 0.5):
        super().__init__()
        self.dim, self.width = dim, 2
        self.gate = nn.Parameter(torch.full((dim,), init_gate))

    @classmethod
    def from_config(cls, conv_cfg, dim, gen_dim, activation, residual, backend, bias=False) -> "GatedShift":
        return cls(dim, conv_cfg.gated_shift.init_gate)  # its own section, [model.conv.gated_shift]

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.gate * F.pad(x, (0, 0, 1, 0))[:, :-1]

    def step(self, x_t: torch.Tensor, h_t: torch.Tensor, state: torch.Tensor | None):
        """Decoding: `x_t [B, D]`, the state `[B, D, W-1]` (the previous token), oldest first."""
        previous = state[..., -1] if state is not None else torch.zeros_like(x_t)
        return x_t + self.gate * previous, x_t.unsqueeze(-1)

    def flops_per_token(self) -> int:
        return 2 * self.dim


# ------------------------------------------------------------------------------------------ a task


@dataclass
class PreviousTokenOptions:
    vocab_size: int = option(16, "token ids", min=2)
    seq_len: int = option(12, "tokens per example", min=2)
    num_examples: int = option(64, "test examples", min=1)


class PreviousToken(Task):
    """Random tokens; the target at position t is the token at t - 1 (position 0 is not scored)."""

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        self.cfg = cfg

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.seq_len

    train_seq_len = max_seq_len

    @classmethod
    def shape(cls, options) -> tuple[int, int]:
        return options.seq_len, options.vocab_size

    def _batch(self, n: int, g: torch.Generator):
        x = torch.randint(0, self.cfg.vocab_size, (n, self.cfg.seq_len), generator=g)
        y = torch.cat([torch.full((n, 1), -100), x[:, :-1]], dim=1)
        return x, y

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _ in range(start):
            self._batch(batch_size, g)
        while True:
            yield self._batch(batch_size, g)

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        x, y = self._batch(self.cfg.num_examples, torch.Generator().manual_seed(1234))
        with autocast():
            logits = model(x.to(device)).float()
        scored = y != -100
        loss = F.cross_entropy(logits[scored], y[scored].to(device)).item()
        return {"accuracy": (logits.argmax(-1).cpu()[scored] == y[scored]).float().mean().item(), "loss": loss}


# ------------------------------------------------------------------------------------------ the entries


SPECS = [
    (register_mixer, MixerSpec("running_mean", RunningMean, RunningMeanOptions, "running-mean mixer options",
                               conv_streams=lambda m: [("v", m.d_model)])),
    (register_conv, ConvKindSpec("gated_shift", GatedShift, GatedShiftOptions, "gated shift options")),
    (register_task, TaskSpec("previous_token", PreviousToken, PreviousTokenOptions, "previous-token task options",
                             headline="accuracy", higher_is_better=True, headline_label="previous-token accuracy",
                             bounded=True)),
]


def register_all():
    for register, spec in SPECS:
        register(spec)


RECIPE = """
[run]
name = "toy"
out_dir = "runs"
device = "cpu"
[model]
mixer = "running_mean"
d_model = 32
n_layers = 2
ffn = "mlp"
[model.conv]
kind = "gated_shift"
[model.conv.gated_shift]
init_gate = 0.5
[model.running_mean]
decay = 1.0
[task]
kind = "previous_token"
[task.previous_token]
vocab_size = 8
seq_len = 12
[train]
steps = 60
warmup_steps = 5
batch_size = 32
lr = 0.01
[eval]
every = 30
batch_size = 64
early_stop = 0.0
[checkpoint]
every = 30
[log]
every = 10
progress = false
tensorboard = false
"""


@pytest.fixture
def registered():
    from dcablate.models.conv import CONV_KINDS
    from dcablate.models.mixers import MIXERS
    from dcablate.tasks import TASKS

    register_all()
    yield
    for registry, name in ((MIXERS, "running_mean"), (CONV_KINDS, "gated_shift"), (TASKS, "previous_token")):
        registry.unregister(name)


def test_toy_components_train_and_evaluate_through_a_recipe(registered, tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["info", "toy.toml"]) == 0
    out = capsys.readouterr().out
    assert "running_mean, conv=gated_shift" in out
    assert out.rstrip().endswith("note: RunningMean keeps TokenMixer's state_size or flops_per_token, which count 0: "
                                 "the state floats and FLOPs/token above leave out its own recurrence (implement "
                                 "them to count it)")
    monkeypatch.setenv("DCABLATE_PLUGINS", "toy_plugin_module")  # recorded as given (registered here already)
    monkeypatch.setattr("dcablate.registry._plugins_loaded", {"toy_plugin_module"})
    assert main(["run", "toy.toml", "--quiet"]) == 0
    summary = json.loads(Path("runs/toy/summary.json").read_text())
    assert summary["versions"]["plugins"] == ["toy_plugin_module"]
    assert summary["steps"] == 60 and summary["params"]["conv"] == 2 * 32  # a gate per channel of each layer's v stream
    assert summary["state_floats"] == 2 * 32  # the conv's history: W - 1 = 1 input per channel, in 2 layers
    assert summary["final"]["accuracy"] > 0.5  # one token back: the conv alone solves it; chance is 1/8
    assert "accuracy" in capsys.readouterr().out  # the run's one-line result reads the task's headline
    assert main(["eval", "--task", "previous_token", "--run", "runs/toy"]) == 0
    record = json.loads(Path("runs/toy/eval/previous_token.json").read_text())
    assert record["metrics"] == {k: v for k, v in summary["final"].items() if k != "step"}
    assert main(["report", "runs"]) == 0
    assert "previous-token accuracy" in Path("runs/report.md").read_text()
    assert "; plugins toy_plugin_module: 1 run" in Path("runs/report.md").read_text()
    capsys.readouterr()
    # without the plugin, the report refuses the run it cannot read instead of rewriting itself without it
    from dcablate.models.conv import CONV_KINDS
    from dcablate.models.mixers import MIXERS
    from dcablate.tasks import TASKS

    before = {f: Path("runs", f).read_bytes() for f in ("report.md", "report.csv")}
    for registry, name in ((MIXERS, "running_mean"), (CONV_KINDS, "gated_shift"), (TASKS, "previous_token")):
        registry.unregister(name)
    monkeypatch.delenv("DCABLATE_PLUGINS")
    try:
        assert main(["report", "runs"]) == 2
    finally:
        register_all()
    err = capsys.readouterr().err
    assert err.startswith("error: runs/toy/recipe.toml: ") and err.count("\n") == 1, err
    assert "no registered mixer or channel mixer is named 'running_mean'" in err
    assert err.endswith("; it was trained with DCABLATE_PLUGINS=toy_plugin_module: set it to read this run (nothing "
                        "was written)\n")
    assert {f: Path("runs", f).read_bytes() for f in before} == before
    # a run with no summary.json yet (stopped, failed) says so too: its recipe.toml's first line names them
    assert Path("runs/toy/recipe.toml").read_text().startswith("# trained with DCABLATE_PLUGINS=toy_plugin_module\n")
    Path("runs/toy/summary.json").unlink()
    for registry, name in ((MIXERS, "running_mean"), (CONV_KINDS, "gated_shift"), (TASKS, "previous_token")):
        registry.unregister(name)
    try:
        assert main(["run", "runs/toy", "--quiet"]) == 2
    finally:
        register_all()
    err = capsys.readouterr().err
    assert err.endswith("; it was trained with DCABLATE_PLUGINS=toy_plugin_module: set it to read this run\n"), err


def test_a_mixers_convs_are_counted_whatever_their_attribute_names(registered):
    """The conv row, the state and the FLOPs per token take in every module `make_conv` made: the toy mixer's
    `value_filter` as the built-in mixers' `q_conv1d`."""
    import tomllib

    from dcablate import config
    from dcablate.models.costs import build_model, costs

    def counted(kind: str):
        data = tomllib.loads(RECIPE)
        data["model"]["conv"]["kind"] = kind
        recipe = config.build(data)
        return costs(build_model(recipe, 8), 12)

    bare, shifted = counted("none"), counted("gated_shift")
    assert bare.unreported == ("RunningMean",)  # it keeps TokenMixer's state_size and flops_per_token
    assert shifted.params["conv"] == 2 * 32 and "conv" not in bare.params
    assert shifted.state_floats - bare.state_floats == 2 * 32
    assert shifted.flops_per_token - bare.flops_per_token == 2 * (2 * 32)  # GatedShift: 2 FLOPs per channel


def test_a_conv_kind_without_what_the_counts_read_is_one_line(registered, tmp_path, monkeypatch, capsys):
    from dcablate.cli import main
    from dcablate.models.conv import CONV_KINDS

    class NoCounts(GatedShift):
        flops_per_token = property(lambda self: (_ for _ in ()).throw(AttributeError("flops_per_token")))

    CONV_KINDS.register(ConvKindSpec("gated_shift", NoCounts, GatedShiftOptions, "x"), replace=True)
    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["info", "toy.toml"]) == 2
    assert capsys.readouterr().err == (
        "error: model.conv.kind = 'gated_shift': its module (<class 'tests.test_plugins.test_a_conv_kind_without_what_"
        "the_counts_read_is_one_line.<locals>.NoCounts'>) lacks flops_per_token; a conv kind's module gives `dim`, "
        "`width` and `flops_per_token()`, which parameter, state and FLOP counts read\n")


def test_unregistered_names_are_refused_with_the_registered_ones(tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["run", "toy.toml", "--dry-run"]) == 2  # its section is not a recipe section without it
    assert ("toy.toml: model.running_mean: unknown key; no registered mixer or channel mixer is named "
            "'running_mean': if a plugin module provides it, name that module in DCABLATE_PLUGINS; allowed here:"
            in capsys.readouterr().err)
    Path("toy.toml").write_text(RECIPE.replace("[model.running_mean]\ndecay = 1.0\n", ""))
    assert main(["run", "toy.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.mixer: 'running_mean' is not one of attention|gated_deltanet|mamba2|short_conv" in err


def test_a_plugin_module_registers_in_another_process(tmp_path):
    """`DCABLATE_PLUGINS=module` makes the CLI import it first: here this very file, run as a plugin."""
    (tmp_path / "toy_plugin.py").write_text(Path(__file__).read_text() + "\n\nregister_all()\n")
    (tmp_path / "toy.toml").write_text(RECIPE.replace("steps = 60", "steps = 4").replace("warmup_steps = 5", "warmup_steps = 1").replace("every = 30", "every = 4"))
    env = {**os.environ, "DCABLATE_PLUGINS": "toy_plugin"}
    done = subprocess.run([sys.executable, "-m", "dcablate", "run", "toy.toml", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "runs/toy/summary.json").read_text())
    assert summary["steps"] == 4
    import hashlib  # which version of the plugin's file trained it

    digest = hashlib.sha256((tmp_path / "toy_plugin.py").read_bytes()).hexdigest()[:12]
    assert summary["versions"]["plugin_digests"] == {"toy_plugin": digest}


def test_a_plugin_s_runs_in_threads_of_one_packed_worker_all_train(tmp_path):
    """The runs of a packed worker are threads of one process: none may find the plugin half imported by another
    (its components missing from the registries, or torch partly initialised)."""
    (tmp_path / "toy_plugin.py").write_text(Path(__file__).read_text() + "\n\nregister_all()\n")
    short = RECIPE.replace("steps = 60", "steps = 4").replace("warmup_steps = 5", "warmup_steps = 1").replace(
        "every = 30", "every = 4")
    (tmp_path / "toy.toml").write_text(short + '\n[sweep]\n"run.seed" = [0, 1, 2, 3]\n')
    env = {**os.environ, "DCABLATE_PLUGINS": "toy_plugin"}
    done = subprocess.run([sys.executable, "-m", "dcablate", "run", "toy.toml", "--workers", "4", "--runs-per-worker",
                           "4", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summaries = sorted((tmp_path / "runs/toy").glob("*/summary.json"))
    assert len(summaries) == 4 and all(json.loads(p.read_text())["steps"] == 4 for p in summaries)
    # the logged command names the plugin modules, so it replays as written
    assert (tmp_path / "runs/toy/commands.log").read_text().split("\t")[2].startswith(
        "DCABLATE_PLUGINS=toy_plugin dcablate run toy.toml")


@pytest.mark.parametrize("source, fragment", [
    ('register_mixer(MixerSpec("attention", object, None, "x", conv_streams=lambda m: []))\n',
     "ValueError: a token mixer named 'attention' is already registered"),
    ('register_mixer(MixerSpec("mine", object, None, "x"))\n',
     "TypeError: MixerSpec.__init__() missing 1 required keyword-only argument: 'conv_streams'"),
    ("from dataclasses import dataclass\n@dataclass\nclass Options:\n    a: int = 1\n    b: int\n",
     "TypeError: non-default argument 'b' follows default argument"),  # raised in the standard library
], ids=["name-taken", "spec-without-a-field", "a-dataclass-the-standard-library-refuses"])
def test_a_plugin_that_fails_while_importing_is_one_line_at_its_own_line(tmp_path, monkeypatch, capsys, source,
                                                                          fragment):
    from dcablate.cli import main

    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("from dcablate.models.mixers import MixerSpec, register_mixer\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "broken_plugin")
    assert main(["info", "quickstart"]) == 2
    line = 2 if "dataclass" not in source else 3  # the plugin's own line: its call, or its decorated class
    assert capsys.readouterr().err == (f"error: DCABLATE_PLUGINS: plugin module 'broken_plugin' failed while "
                                       f"importing, at {plugin}:{line}: {fragment}\n")


def test_a_plugin_importing_a_missing_package_names_its_line(tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    plugin = tmp_path / "needs_a_package.py"
    plugin.write_text("import os\nimport not_a_package_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "needs_a_package")
    assert main(["info", "quickstart"]) == 2
    assert capsys.readouterr().err == ("error: DCABLATE_PLUGINS: cannot import plugin module 'needs_a_package' (No "
                                       f"module named 'not_a_package_anywhere'), at {plugin}:2\n")


@pytest.mark.parametrize("source, fragment", [
    ("from dcablate.models.conv import ConvKindSpec, register_conv\nregister_conv(ConvKindSpec('static', 'x:y'))\n",
     "a conv kind named 'static' is already registered"),
    ("from dcablate.models.channel import ChannelSpec, register_channel_mixer\n"
     "register_channel_mixer(ChannelSpec('mlp', 'x:y'))\n", "a channel mixer named 'mlp' is already registered"),
    ("from dcablate.tasks import TaskSpec, register_task\n"
     "register_task(TaskSpec('mqar', 'x:y', headline='overall', higher_is_better=True))\n",
     "a task named 'mqar' is already registered"),
], ids=["conv-kind", "channel-mixer", "task"])
def test_a_plugin_taking_a_built_in_name_of_any_registry_is_one_line(tmp_path, source, fragment):
    """In a fresh process, whichever registry is read first: a plugin that registers a name the package's own
    components of another registry hold gets the one line at its own line, not a traceback from the package's
    registration that then fails."""
    (tmp_path / "taken.py").write_text(source)
    env = {**os.environ, "DCABLATE_PLUGINS": "taken"}
    done = subprocess.run([sys.executable, "-m", "dcablate", "info", "quickstart"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: DCABLATE_PLUGINS: plugin module 'taken' failed while importing, at "
                                  f"{tmp_path / 'taken.py'}:2: ValueError: {fragment}")


BAD_MIXERS = """\
from dataclasses import dataclass
import torch.nn as nn
from dcablate.models.mixers import MixerSpec, register_mixer
from dcablate.models.mixers.base import TokenMixer

@dataclass
class Options:
    decay: float

class NotAMixer(nn.Module):
    pass

class NoForward(TokenMixer):
    @classmethod
    def from_config(cls, m, layer_idx):
        return cls()

class OneArgument(TokenMixer):
    @classmethod
    def from_config(cls, m):
        return cls()

    def forward(self, h):
        return h

"""


@pytest.mark.parametrize("call, fragment", [
    ('MixerSpec("my-ema", OneArgument, None, "x", conv_streams=lambda m: [])',
     "ValueError: a token mixer is named 'my-ema', which cannot name a recipe section: use letters, digits and "
     "underscores, not starting with a digit (e.g. 'my_ema')"),
    ('MixerSpec("ema", NoForward, Options, "x", conv_streams=lambda m: [])',
     "ValueError: token mixer 'ema': option decay of Options needs a default (a recipe without the section uses the "
     "defaults; `dcablate.config.fields.option(default, doc)`)"),
    ('MixerSpec("ema", NotAMixer, None, "x", conv_streams=lambda m: [])',
     "ValueError: token mixer 'ema': NotAMixer is not a subclass of dcablate.models.mixers.base.TokenMixer"),
    ('MixerSpec("ema", NoForward, None, "x", conv_streams=lambda m: [])',
     "ValueError: token mixer 'ema': NoForward does not define forward (a TokenMixer defines from_config(cls, m, "
     "layer_idx) and forward(self, h))"),
    ('MixerSpec("ema", OneArgument, None, "x", conv_streams=lambda m: [])',
     "ValueError: token mixer 'ema': OneArgument.from_config(m) cannot take (m, layer_idx): the [model] section "
     "and the block's index"),
], ids=["name-not-an-identifier", "option-without-default", "not-a-token-mixer", "no-forward", "from-config-args"])
def test_a_mixer_a_recipe_could_not_use_is_refused_where_the_plugin_registers_it(tmp_path, monkeypatch, capsys, call,
                                                                                 fragment):
    from dcablate.cli import main

    plugin = tmp_path / "bad_mixer_plugin.py"
    plugin.write_text(BAD_MIXERS + f"register_mixer({call})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "bad_mixer_plugin")
    assert main(["info", "quickstart"]) == 2
    line = BAD_MIXERS.count("\n") + 1
    assert capsys.readouterr().err == (f"error: DCABLATE_PLUGINS: plugin module 'bad_mixer_plugin' failed while "
                                       f"importing, at {plugin}:{line}: {fragment}\n")


BAD_TASK = """\
from dcablate.tasks import Task, TaskSpec, register_task


class NoShape(Task):
    vocab_size = max_seq_len = train_seq_len = 8

    def train_batches(self, batch_size, seed, start=0):
        yield from ()

    def evaluate(self, model, device, batch_size, autocast):
        return {"accuracy": 0.0}


register_task(TaskSpec("copy_back", NoShape, None, "x", headline="accuracy", higher_is_better=True))
"""


def test_a_task_missing_part_of_the_interface_is_refused_where_the_plugin_registers_it(tmp_path, monkeypatch, capsys):
    """A plugin task without `shape` (which `dcablate info` needs) is one line at registration, naming what a task
    defines (it was a NotImplementedError traceback at the first `info`)."""
    from dcablate.cli import main

    (tmp_path / "bad_task_plugin.py").write_text(BAD_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "bad_task_plugin")
    assert main(["info", "quickstart"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: task 'copy_back': NoShape does not define shape (a Task defines " in err


def test_a_plugin_check_that_raises_is_one_line_naming_it(registered, tmp_path, monkeypatch, capsys):
    """A bug in a plugin's `check` (an AttributeError on a renamed section) is one line naming the component, the
    plugin's module and the exception, not a traceback."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    def broken(recipe, fail):
        return recipe.model.running_meen.window

    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    MIXERS.register(MixerSpec("running_mean", RunningMean, RunningMeanOptions, "x", check=broken,
                              conv_streams=lambda m: [("v", m.d_model)]), replace=True)
    assert main(["info", "toy.toml"]) == 2
    assert capsys.readouterr().err == ("error: model.mixer = 'running_mean': the check of its plugin (tests.test_plugins)"
                                       " raised AttributeError: 'ModelSection' object has no attribute 'running_meen'\n")


def test_a_mixer_named_by_module_is_checked_when_a_model_is_built(registered, tmp_path, monkeypatch, capsys):
    """`impl = "module:Class"` is imported only when a model is built: then a missing class, or one that is no
    token mixer, is one line naming model.mixer; so is a forward that returns a tuple (as fla's layers do)."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    class TupleOut(RunningMean):
        def forward(self, h):
            return super().forward(h), None

    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    for impl, line in [
        ("tests.test_plugins:RunningMeen", "model.mixer = 'running_mean': its class 'tests.test_plugins:RunningMeen' "
                                           "cannot be imported: module 'tests.test_plugins' has no attribute "
                                           "'RunningMeen'"),
        ("tests.test_plugins:GatedShift", "model.mixer = 'running_mean': GatedShift is not a subclass of "
                                          "dcablate.models.mixers.base.TokenMixer"),
        (TupleOut, "model.mixer: tests.test_plugins.TupleOut.forward returned tuple, not a tensor; a block's "
                   "mixers map [B, T, D] to one [B, T, D] tensor (fla's layers return a tuple: take its first)"),
    ]:
        MIXERS.register(MixerSpec("running_mean", impl, RunningMeanOptions, "x",
                                  conv_streams=lambda m: [("v", m.d_model)]), replace=True)
        assert main(["info", "toy.toml"] if isinstance(impl, str) else ["run", "toy.toml", "--quiet"]) == 2
        where = "" if isinstance(impl, str) else f"{tmp_path / 'toy.toml'}: "  # a run's error names the recipe too
        assert capsys.readouterr().err == f"error: {where}{line}\n"


@pytest.mark.parametrize("register, registry, spec, section", [
    (register_mixer, "dcablate.models.mixers:MIXERS",
     MixerSpec("d_model", RunningMean, RunningMeanOptions, "x", conv_streams=lambda m: []), "model"),
    (register_conv, "dcablate.models.conv:CONV_KINDS", ConvKindSpec("rank", GatedShift, GatedShiftOptions, "x"),
     "model.conv"),
], ids=["mixer-named-d_model", "conv-kind-named-rank"])
def test_a_component_named_as_a_core_key_is_refused(register, registry, spec, section):
    """A mixer called `d_model` would replace the model's width key with its options section, a conv kind called
    `rank` the dynamic conv's rank: refused where it registers (a plugin's import: one line at its own line)."""
    import importlib

    module, name = registry.split(":")
    with pytest.raises(ValueError, match=rf"is named '{spec.name}', as a key of \[{section}\] is; give it another "
                                         rf"name"):
        register(spec)
    assert spec.name not in getattr(importlib.import_module(module), name).names()


def test_a_conv_kind_s_own_section_reaches_its_module_and_is_checked(registered, tmp_path, monkeypatch, capsys):
    """[model.conv.gated_shift] belongs to the toy conv kind: its keys reach `from_config`, `--set` sets them, a
    misspelt one is one line."""
    import tomllib

    from dcablate import config
    from dcablate.cli import main
    from dcablate.models.costs import build_model

    data = tomllib.loads(RECIPE)
    data["model"]["conv"]["gated_shift"]["init_gate"] = 0.25
    gates = [m.gate for m in build_model(config.build(data), 8).modules() if isinstance(m, GatedShift)]
    assert gates and all(torch.equal(g, torch.full_like(g, 0.25)) for g in gates)
    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE.replace("init_gate = 0.5", "init_gat = 0.5"))
    assert main(["info", "toy.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.conv.gated_shift.init_gat" in err and "init_gate" in err, err
    Path("toy.toml").write_text(RECIPE)
    assert main(["info", "toy.toml", "--set", "model.conv.gated_shift.init_gate=-1"]) == 2
    assert "model.conv.gated_shift.init_gate" in capsys.readouterr().err
    swept = RECIPE.replace('kind = "gated_shift"', 'kind = "none"') + '[sweep]\n"model.conv.gated_shift.init_gate" = [0.1, 0.2]\n'
    Path("toy.toml").write_text(swept)
    assert main(["info", "toy.toml"]) == 2  # no point has the kind: each value would train the same run
    assert "model.conv.kind is 'none' at every point, so this axis changes nothing" in capsys.readouterr().err
    Path("toy.toml").write_text(RECIPE.replace("[model.conv.gated_shift]", "[model.conv.gated_shifty]"))
    assert main(["info", "toy.toml"]) == 2  # a kind's section whose kind is not registered: a plugin not loaded?
    assert "no registered conv kind is named 'gated_shifty'" in capsys.readouterr().err


def test_a_conv_kind_returning_another_shape_is_named(registered, tmp_path, monkeypatch, capsys):
    """A conv that drops a token would fail later inside the mixer's kernel under the mixer's name: one line naming
    the conv's class instead."""
    from dcablate.cli import main
    from dcablate.models.conv import CONV_KINDS

    class DropsOne(GatedShift):
        def forward(self, x, h=None):
            return super().forward(x, h)[:, :-1]

    CONV_KINDS.register(ConvKindSpec("gated_shift", DropsOne, GatedShiftOptions, "x"), replace=True)
    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["run", "toy.toml", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'toy.toml'}: model.conv.kind: tests.test_plugins.test_a_conv_kind_returning_another_shape_is_named.<locals>."
        "DropsOne.forward returned shape (32, 11, 32) for a stream of (32, 12, 32); a conv maps its stream "
        "[B, T, D] to [B, T, D]\n")


def test_a_conv_kind_without_from_config_is_refused_where_it_registers_and_one_without_step_when_decoding():
    from dcablate.errors import UserError
    from dcablate.models.conv import CONV_KINDS
    from dcablate.models.conv.streams import conv_step

    class NoBuild(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"conv kind 'no_build': its module \(.*NoBuild'>\) has no "
                                         r"from_config\(conv_cfg, dim, gen_dim, activation, residual, backend, bias\)"):
        CONV_KINDS.register(ConvKindSpec("no_build", NoBuild))

    class NoStep(GatedShift):
        step = None

    with pytest.raises(UserError, match=r"NoStep has no step\(x_t, h_t, state\) -> \(y_t, state\), which decoding"):
        conv_step(NoStep(4), torch.zeros(2, 4), torch.zeros(2, 4), None)
    y, state = conv_step(GatedShift(4), torch.ones(2, 4), torch.zeros(2, 4), torch.full((2, 4, 1), 2.0))
    assert torch.equal(y, torch.full((2, 4), 2.0)) and torch.equal(state, torch.ones(2, 4, 1))


def test_a_mixer_returning_another_shape_is_named_and_its_run_listed_as_failed(registered, tmp_path, monkeypatch,
                                                                                 capsys):
    """[B, 1, D] would broadcast over the residual without a word; the run ends on one line naming the mixer,
    with failed.json, so the report lists it as failed rather than unfinished."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    class LastOnly(RunningMean):
        def forward(self, h):
            return super().forward(h)[:, -1:]

    MIXERS.register(MixerSpec("running_mean", LastOnly, RunningMeanOptions, "x",
                              conv_streams=lambda m: [("v", m.d_model)]), replace=True)
    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["run", "toy.toml", "--quiet"]) == 2
    line = "model.mixer: tests.test_plugins.LastOnly.forward returned shape (32, 1, 32) for an input of " \
           "(32, 12, 32); a block's mixers map [B, T, D] to [B, T, D]"
    assert capsys.readouterr().err == f"error: {tmp_path / 'toy.toml'}: {line}\n"  # led by where the key was set
    assert json.loads(Path("runs/toy/failed.json").read_text())["error"] == line
    assert main(["report", "runs"]) == 0
    assert f"- `toy` after 0 steps: {line}" in Path("runs/report.md").read_text()


@pytest.mark.parametrize("value, hint", [
    ("my_plugin.py", "; name a module, not a file: DCABLATE_PLUGINS=my_plugin"),
    ("sub/my_plugin.py", "; name a module, not a file: DCABLATE_PLUGINS=my_plugin, with {tmp}/sub on PYTHONPATH"),
    ("./my_plugin.py", "; name a module, not a file: DCABLATE_PLUGINS=my_plugin"),
    ("my_plugin other", "; separate modules with commas: DCABLATE_PLUGINS=my_plugin,other"),
    ("my_plugn", " (did you mean 'my_plugin'?)"),
    ("nothing_like_it", "; plugin modules are imported from the working directory ({tmp}) or PYTHONPATH"),
], ids=["file", "path", "dot-path", "spaces", "typo", "elsewhere"])
def test_a_plugin_module_not_found_says_what_to_write(tmp_path, monkeypatch, capsys, value, hint):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("my_plugin.py").write_text("")
    monkeypatch.setenv("DCABLATE_PLUGINS", value)
    assert main(["info", "quickstart"]) == 2
    err = capsys.readouterr().err
    found = "" if value.endswith(".py") else " (No module named "  # a file's path is not imported at all
    assert err.startswith(f"error: DCABLATE_PLUGINS: cannot import plugin module '{value}'{found}")
    assert err.endswith(hint.format(tmp=tmp_path) + "\n") and err.count("\n") == 1, err


def test_a_plugin_named_like_a_standard_library_module_or_with_a_syntax_error_is_one_line(tmp_path):
    """`dcablate` puts the working directory last on the path: a plugin file `code.py` would lose to Python's
    own `code` module without a word; a syntax error names the plugin's file and line."""
    (tmp_path / "code.py").write_text("")
    (tmp_path / "syn.py").write_text("x = 1\ndef f(:\n    pass\n")
    for name, expect in (("code", "error: DCABLATE_PLUGINS: plugin module 'code' is also the name of another module ("),
                         ("syn", f"error: DCABLATE_PLUGINS: plugin module 'syn' failed while importing, at "
                                 f"{tmp_path / 'syn.py'}:2: SyntaxError: ")):
        script = Path(sys.executable).parent / "dcablate"  # the console script, as users run it (not `python -m`)
        done = subprocess.run([str(script), "info", "quickstart"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "DCABLATE_PLUGINS": name}, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(expect), done.stderr[-2000:]
        assert done.stderr.count("\n") == 1


def test_a_conv_on_a_stream_the_spec_does_not_declare_is_one_line(registered, tmp_path, monkeypatch, capsys):
    """The recipe's checks (model.conv.heads must divide every stream) read the streams a spec declares; a mixer
    that builds its convs on other streams or widths is named when the model is built."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE.replace('kind = "gated_shift"', 'kind = "static"'))
    for streams, built in [(lambda m: [("v", 2 * m.d_model)], "'v' with 32 channels"),
                           (lambda m: [("x", m.d_model)], "'v' with 32 channels")]:
        MIXERS.register(MixerSpec("running_mean", RunningMean, RunningMeanOptions, "x", conv_streams=streams),
                        replace=True)
        assert main(["info", "toy.toml"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: model.mixer = 'running_mean': a conv was built on stream {built}, but the "
                              f"specs' conv_streams declare ") and err.count("\n") == 1, err


def test_a_mixer_may_share_a_stream_name_with_the_mlp_and_build_from_a_staticmethod(tmp_path, monkeypatch, capsys):
    """The checks compare (stream, width) pairs, so a mixer's `gate` beside the MLP's `gate` of another width
    passes; `from_config` as a staticmethod is a mixer's own too."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    class GatedMean(RunningMean):
        def __init__(self, d_model: int, conv_cfg, backend: str):
            super().__init__(d_model, conv_cfg, backend)
            self.value_filter = make_conv(conv_cfg, "gate", d_model, d_model, backend)

        @staticmethod
        def from_config(m, layer_idx):
            return GatedMean(m.d_model, m.conv, m.backend)

    register_mixer(MixerSpec("gated_mean", GatedMean, None, "x", conv_streams=lambda m: [("gate", m.d_model)]))
    try:
        monkeypatch.chdir(tmp_path)
        Path("g.toml").write_text('[model]\nmixer = "gated_mean"\nd_model = 32\nffn = "mlp"\n'
                                  '[model.conv]\nkind = "static"\nplacement = "all_linear"\n')
        assert main(["info", "g.toml"]) == 0, capsys.readouterr().err
    finally:
        MIXERS.unregister("gated_mean")


def test_a_run_keeps_the_digests_of_the_plugins_it_uses(tmp_path, monkeypatch):
    """A resume is refused under an edited plugin only where the run selects one of its components (or the plugin
    registered none, and may act otherwise): a sweep's static-conv baseline resumes while a plugin conv is edited."""
    from dcablate import config, registry
    from dcablate.models.conv import CONV_KINDS
    from dcablate.training.runtime import module_digest, plugin_digests

    (tmp_path / "shift_plugin.py").write_text(
        "from tests.test_plugins import GatedShift\nfrom dcablate.models.conv import ConvKindSpec, register_conv\n"
        "register_conv(ConvKindSpec('plugin_shift', GatedShift))\n")
    (tmp_path / "quiet_plugin.py").write_text("# registers nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "shift_plugin,quiet_plugin")
    try:
        registry.load_plugins()
        assert registry.plugin_of("conv kind", "plugin_shift") == "shift_plugin"
        base, mine = (config.build({"model": {"conv": {"kind": kind}}}) for kind in ("static", "plugin_shift"))
        assert plugin_digests(base) == {"quiet_plugin": module_digest("quiet_plugin")}
        assert set(plugin_digests(mine)) == {"shift_plugin", "quiet_plugin"} and set(plugin_digests()) == \
            {"shift_plugin", "quiet_plugin"}
    finally:
        CONV_KINDS.unregister("plugin_shift")
        registry._registered_by.pop(("conv kind", "plugin_shift"), None)
        registry._plugins_loaded.difference_update({"shift_plugin", "quiet_plugin"})


def test_a_declared_stream_without_a_conv_is_refused(tmp_path, monkeypatch, capsys):
    """A mixer that declares the output stream `o` (the spec's default `output_conv=True`) but builds no conv there
    would leave `placement = "all_linear"` without effect while its runs are named `@all_linear`: refused in one
    line; `output_conv=False` says it has none, and then all_linear covers its other streams only."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    class NoOutputConv(RunningMean):
        def __init__(self, d_model: int, conv_cfg, backend: str):
            super().__init__(d_model, conv_cfg, backend)
            self.output_filter = None

    monkeypatch.chdir(tmp_path)
    Path("n.toml").write_text('[model]\nmixer = "no_output_conv"\nd_model = 32\n'
                              '[model.conv]\nkind = "static"\nplacement = "all_linear"\n')
    try:
        for output_conv, rc in ((True, 2), (False, 0)):
            MIXERS.register(MixerSpec("no_output_conv", NoOutputConv, None, "x", output_conv=output_conv,
                                      conv_streams=lambda m: [("v", m.d_model)]), replace=True)
            capsys.readouterr()
            assert main(["info", "n.toml"]) == rc
            err = capsys.readouterr().err
            if rc:
                assert err.startswith("error: model.mixer = 'no_output_conv', model.ffn = 'none': no conv was built on "
                                      "the declared stream 'o' (32 channels)") and err.count("\n") == 1, err
    finally:
        MIXERS.unregister("no_output_conv")


class FloatInputs(PreviousToken):
    def _batch(self, n: int, g: torch.Generator):
        x, y = super()._batch(n, g)
        return x.float(), y


class ShortTargets(PreviousToken):
    def _batch(self, n: int, g: torch.Generator):
        x, y = super()._batch(n, g)
        return x, y[:, 1:]


class QueryTokenOutside(PreviousToken):  # an extra query token without the +1 in vocab_size
    def _batch(self, n: int, g: torch.Generator):
        x, y = super()._batch(n, g)
        x[:, 0] = self.cfg.vocab_size
        return x, y


class TargetsBelowZero(PreviousToken):
    def _batch(self, n: int, g: torch.Generator):
        x, y = super()._batch(n, g)
        y[:, 0] = -1
        return x, y


class ShapeSaysOther(PreviousToken):  # shape() forgot the extra token its vocab_size counts
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size + 1


class NoHeadline(PreviousToken):
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        metrics = super().evaluate(model, device, batch_size, autocast)
        return {"acc": metrics["accuracy"], "loss": metrics["loss"]}


@pytest.mark.parametrize("task,message", [
    (FloatInputs, "task 'previous_token': train_batches yielded (float32 [32, 12], int64 [32, 12]); a task's batches "
                  "are (inputs, targets), int64 CPU tensors [batch_size = 32, T], of the same shape"),
    (ShortTargets, "task 'previous_token': train_batches yielded (int64 [32, 12], int64 [32, 11]); a task's batches "
                   "are (inputs, targets), int64 CPU tensors [batch_size = 32, T], of the same shape"),
    (QueryTokenOutside, "task 'previous_token': train_batches yielded inputs holding token id 8, outside the "
                        "vocabulary of 8 (ids 0 to 7) that its vocab_size gives the model"),
    (TargetsBelowZero, "task 'previous_token': train_batches yielded targets holding token id -1, outside the "
                       "vocabulary of 8 (ids 0 to 7) that its vocab_size gives the model; unscored targets are -100"),
    (ShapeSaysOther, "task 'previous_token': shape(options) gives (sequence length, vocabulary) = (12, 8), but the "
                     "built task has max_seq_len 12 and vocab_size 9; `dcablate info` and token budgets read shape()"),
    (NoHeadline, "task 'previous_token': evaluate returned acc, loss, without its headline metric 'accuracy' "
                 "(TaskSpec.headline), which runs are summarised, early-stopped and ranked by"),
], ids=["float-inputs", "short-targets", "id-past-the-vocabulary", "negative-target", "shape-disagrees",
        "no-headline"])
def test_a_plugin_tasks_bad_batches_or_metrics_are_one_line(registered, tmp_path, monkeypatch, capsys, task, message):
    """What a task hands the training loop is checked where it first arrives, naming the task, instead of failing
    inside the model's embedding, its loss or the progress line."""
    from dcablate.cli import main
    from dcablate.tasks import TASKS

    TASKS.register(TaskSpec("previous_token", task, PreviousTokenOptions, "previous-token task options",
                            headline="accuracy", higher_is_better=True, bounded=True), replace=True)
    monkeypatch.chdir(tmp_path)
    Path("toy.toml").write_text(RECIPE)
    assert main(["run", "toy.toml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_plugin_that_registers_nothing_is_named_where_its_component_is_missing(tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    (tmp_path / "registers_nothing.py").write_text("from dcablate.models.mixers import MixerSpec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "registers_nothing")
    assert main(["info", "quickstart", "--set", "model.mixer=retention", "--set", "sweep={}"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("; plugin module 'registers_nothing' registered nothing (a register_mixer, register_conv or "
                        "register_task call at import)\n") and err.count("\n") == 1, err


def test_a_section_of_a_component_no_loaded_plugin_registered_says_so(tmp_path, monkeypatch, capsys):
    """`[model.runmean]` with its plugin module named in DCABLATE_PLUGINS but its register_mixer call forgotten: the
    line said to name the module there, which it was; it says that the named modules registered none of that name."""
    from dcablate.cli import main

    (tmp_path / "forgot.py").write_text("from dcablate.models.mixers import MixerSpec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text('extends = "quickstart"\n[model.runmean]\ndecay = 0.5\n')
    monkeypatch.setenv("DCABLATE_PLUGINS", "forgot")
    assert main(["info", "r.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("no registered mixer or channel mixer is named 'runmean', and the plugin modules "
                                     "of DCABLATE_PLUGINS ('forgot') registered none of that name ('forgot' "
                                     "registered nothing at all): does its module call register_mixer or "
                                     "register_channel_mixer when imported?") in err, err
    monkeypatch.delenv("DCABLATE_PLUGINS")
    assert main(["info", "r.toml"]) == 2
    assert "if a plugin module provides it, name that module in DCABLATE_PLUGINS" in capsys.readouterr().err


def test_a_dotted_plugin_whose_package_fails_is_one_line_at_the_packages_line(tmp_path, monkeypatch, capsys):
    """Naming the line must not import the package again (its __init__ would raise a second time, unhandled)."""
    from dcablate.cli import main

    (tmp_path / "failing_pkg").mkdir()
    (tmp_path / "failing_pkg" / "__init__.py").write_text("import os\nraise RuntimeError('boom in init')\n")
    (tmp_path / "failing_pkg" / "mod.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "failing_pkg.mod")
    assert main(["info", "quickstart"]) == 2
    assert capsys.readouterr().err == ("error: DCABLATE_PLUGINS: plugin module 'failing_pkg.mod' failed while "
                                       f"importing, at {tmp_path / 'failing_pkg' / '__init__.py'}:2: RuntimeError: "
                                       "boom in init\n")


def test_the_package_s_components_keep_their_order_whichever_module_was_imported_first():
    """Importing one task's module (as a test or a plugin may) before the registry is read does not move that task
    ahead of the others: choices and error lines list them in one order in every process."""
    code = ("import dcablate.tasks.memorization.task, dcablate.tasks.lm.spec\n"
            "from dcablate.tasks import TASKS\nprint(','.join(TASKS.names()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ("mqar,lm,recall,fuzzy_recall,noisy_recall,selective_copy,compression,"
                                   "memorization")


def test_a_conv_on_a_model_that_declares_no_stream_for_it_is_refused(registered, tmp_path, monkeypatch, capsys):
    """A mixer that convolves nothing, without a channel mixer: `model.conv.kind = "static"` built no conv, yet
    `info` and the runs' names said conv=static (a sweep over kinds trained one model twice). Refused; the same
    model without a conv builds."""
    from dcablate.cli import main
    from dcablate.models.mixers import MIXERS

    class PlainMean(TokenMixer):  # convolves nothing
        def __init__(self, d_model: int):
            super().__init__()
            self.o_proj = nn.Linear(d_model, d_model, bias=False)

        @classmethod
        def from_config(cls, m, layer_idx: int) -> "PlainMean":
            return cls(m.d_model)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
            return self.o_proj(h.cumsum(1) / steps)

    MIXERS.register(MixerSpec("no_streams", PlainMean, RunningMeanOptions, "x", conv_streams=lambda m: [],
                              output_conv=False))
    try:
        monkeypatch.chdir(tmp_path)
        Path("toy.toml").write_text(RECIPE.replace('mixer = "running_mean"', 'mixer = "no_streams"')
                                    .replace('ffn = "mlp"', 'ffn = "none"').replace("[model.running_mean]\n", "")
                                    .replace("decay = 1.0\n", ""))
        for placement in ("qkv", "all_linear"):
            assert main(["info", "toy.toml", "--set", f"model.conv.placement={placement!r}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: model.conv.kind = 'gated_shift': model.mixer = 'no_streams' with model.ffn "
                                  f"= 'none' declares no stream for a conv at model.conv.placement = '{placement}'"), err
        assert main(["info", "toy.toml", "--set", "model.conv.kind='none'"]) == 0
        # its runs keep no state the counts see (0 floats): the report draws no state axis for them, and no warning
        assert main(["run", "toy.toml", "--set", "model.conv.kind='none'", "--set", "train.steps=4", "--quiet"]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert main(["report", "runs"]) == 0
        assert Path("runs/report.md").is_file() and not list(Path("runs").glob("*_vs_state.png"))
    finally:
        MIXERS.unregister("no_streams")
