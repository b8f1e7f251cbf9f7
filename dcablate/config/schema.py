"""The recipe schema: the core sections here, the component sections from the registries.

`model.mixer`, `model.ffn`, `model.conv.kind` and `task.kind` take the names registered in the token-mixer,
channel-mixer, conv-kind and task registries; each registered component that owns options adds its
section (`model.<mixer>`, `model.<channel mixer>`, `model.conv.<conv kind>`, `task.<task>`). The `Recipe` class
is assembled from the registries when first asked for and again after a registration, so a plugin's section is a
recipe section like any other. `Recipe`, `ModelSection`, `ConvSection` and `TaskSection` are read as attributes of
this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import typing
from dataclasses import dataclass, field

from dcablate.config.fields import option, section
from dcablate.registry import Names


def _mixers():
    from dcablate.models.mixers import MIXERS
    return MIXERS


def _channels():
    from dcablate.models.channel import CHANNELS
    return CHANNELS


def _convs():
    from dcablate.models.conv import CONV_KINDS
    return CONV_KINDS


def _tasks():
    from dcablate.tasks import TASKS
    return TASKS


# Upper bounds of counts, far beyond any real run, so that a typo (an extra zero, 2**70) is an error naming the
# allowed range instead of a run that never ends, a seed NumPy rejects, or an allocation that fails.
MAX_STEPS = 10 ** 9                # optimizer steps, and the step counts of warmup, logging, evaluation, saving
MAX_TOKENS = 10 ** 15              # a training budget in tokens
MAX_BATCH = 2 ** 20                # examples per step or per evaluation batch
MAX_SEED = 2 ** 32 - 1             # NumPy's legacy seed range
MAX_LAYERS = 1024


@dataclass
class RunSection:
    name: str = option("run", "run name: the run directory is `out_dir/name`")
    seed: int = option(0, "seed for model initialisation and dropout-free training randomness", min=0, max=MAX_SEED)
    out_dir: str = option("runs", "parent folder of run directories (relative to the working directory)")
    device: str = option("auto", "where to train: `auto` picks cuda when available", choices=("auto", "cpu", "cuda"))


@dataclass
class ConvCore:
    """The keys of `[model.conv]` every conv has; `ConvSection` adds the conv kinds' own sections after them."""
    kind: str = option("none", "short convolution on the mixer's streams: none, static (fla's ShortConvolution) or "
                       "dynamic (input-dependent filters, Sieberling et al. 2026)", choices=Names(_convs))
    placement: str = option("qkv", "which streams get a conv: `qkv` = the mixer's q, k, v projections; `all_linear` "
                            "= after every linear layer of the block (q, k, v, o, MLP gate/up/down)",
                            choices=("qkv", "all_linear"))
    width: int = option(4, "filter width W (taps, the current token included)", min=2, max=8)
    rank: int = option(15, "dynamic low-rank filters: ranks R of the generator z = W_in h (paper: 15, plus the "
                       "static S)", min=1)
    heads: int = option(0, "dynamic head-wise filters: one generated filter per group of D/heads channels "
                        "(heads = D is per channel); 0 = the low-rank parameterisation", min=0)
    static_filter: bool = option(True, "dynamic convs add a learned static filter S to the generated one")
    activation: str = option("auto", "activation after the conv; `auto` = silu for static (as fla does), none for "
                             "dynamic", choices=("auto", "silu", "none"))
    residual: typing.Optional[bool] = option(None, "add the conv's input back (y = x + conv(x)); unset = true for "
                                             "dynamic (the paper's form), false for static (fla's)")


@dataclass
class ModelCore:
    """The keys of `[model]` every model has; `ModelSection` adds the components' sections after them."""
    mixer: str = option("attention", "token mixer of every block, or a list of them applied cyclically over the "
                        "layers", choices=Names(_mixers), or_list=True)
    d_model: int = option(128, "residual stream width", min=1)
    n_layers: int = option(2, "number of blocks", min=1, max=MAX_LAYERS)
    n_heads: int = option(2, "heads of the token mixer", min=1)
    head_dim: int = option(0, "q/k head dim; 0 = d_model / n_heads", min=0)
    ffn: str = option("none", "channel mixer after each token mixer", choices=Names(_channels))
    ffn_hidden: int = option(0, "SwiGLU hidden width; 0 = 8/3 d_model rounded up to a multiple of 16", min=0)
    vocab_size: int = option(0, "embedding rows; 0 = the task's vocabulary", min=0)
    tie_embeddings: bool = option(True, "share the embedding matrix with the LM head")
    norm_eps: float = option(1e-5, "RMSNorm epsilon", min=0.0, min_open=True)
    init_std: float = option(0.02, "std of the normal init of linear and embedding weights", min=0.0, min_open=True)
    backend: str = option("auto", "kernels: `auto` = fla/Triton on CUDA and pure torch on CPU; `torch` forces the "
                          "reference everywhere; `fla` requires CUDA", choices=("auto", "torch", "fla"))
    conv: ConvCore = section(ConvCore, "short convolution")  # ModelSection's is the assembled ConvSection

    def mixer_at(self, layer: int) -> str:
        """The token mixer of block `layer` (a list of mixers repeats over the layers)."""
        return self.mixer[layer % len(self.mixer)] if isinstance(self.mixer, list) else self.mixer

    @property
    def mixers(self) -> list[str]:
        """The distinct token mixers of the stack, in order of first use."""
        return list(dict.fromkeys(self.mixer if isinstance(self.mixer, list) else [self.mixer]))

    @property
    def cycle(self) -> int:
        """Blocks before the mixer pattern repeats."""
        return len(self.mixer) if isinstance(self.mixer, list) else 1

    @property
    def head_size(self) -> int:
        """The q/k head dim: `head_dim`, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class TaskCore:
    kind: str = option("mqar", "the task", choices=Names(_tasks))


@dataclass
class TrainSection:
    steps: int = option(1000, "optimizer steps (upper bound when early stopping); a token budget below replaces it",
                        min=1, max=MAX_STEPS)
    tokens: int = option(0, "training budget in tokens: steps = tokens / (batch_size x training sequence length), "
                         "rounded up; 0 = train.steps", min=0, max=MAX_TOKENS)
    tokens_per_param: float = option(0.0, "training budget in tokens per non-embedding parameter (20 is "
                                     "Chinchilla's): steps as for train.tokens; 0 = off", min=0.0, max=1e6)
    batch_size: int = option(64, "examples per step", min=1, max=MAX_BATCH)
    lr: float = option(1e-3, "peak learning rate", min=0.0, min_open=True)
    schedule: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_steps: int = option(100, "linear warmup from 0 to lr", min=0, max=MAX_STEPS)
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of lr", min=0.0, max=1.0)
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms, biases, A_log, dt_bias)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.98, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 turns clipping off", min=0.0)
    precision: str = option("auto", "`auto` = bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    micro_batch_size: int = option(0, "examples per forward/backward pass; gradients of batch_size / "
                                   "micro_batch_size passes are accumulated into one step (0 = batch_size, no "
                                   "accumulation)", min=0, max=MAX_BATCH)
    oom_retry: bool = option(True, "on a CUDA out-of-memory error in a training step (one process), halve the "
                             "micro-batch and retry the step, down to 1 example (printed and logged as "
                             "`micro_batch`)")
    nonfinite: str = option("stop", "on a non-finite loss or gradient: stop the run (last good checkpoint kept) or "
                            "skip the update", choices=("stop", "skip"))
    parallel: str = option("ddp", "several processes (torchrun or `dcablate run --nproc N`): `ddp` keeps a full model "
                           "on every rank, `fsdp` shards parameters, gradients and optimizer state (FSDP2)",
                           choices=("ddp", "fsdp"))
    cuda_graph: str = option("auto", "replay the training step as a CUDA graph: `auto` = when the run allows it "
                             "(CUDA, one process, fused AdamW), `on` = required (an error otherwise), `off` = eager "
                             "steps", choices=("auto", "on", "off"))


@dataclass
class EvalSection:
    every: int = option(200, "evaluate every N steps (and always at the end)", min=1, max=MAX_STEPS)
    batch_size: int = option(256, "examples per evaluation batch", min=1, max=MAX_BATCH)
    early_stop: float = option(0.99, "stop when the task's headline reaches this (accuracy: at or above it, at most "
                               "1; LM bits per byte: at or below it); 0 turns early stopping off, the default for "
                               "tasks whose headline is not an accuracy (LM)", min=0.0)


@dataclass
class LogSection:
    every: int = option(10, "write train metrics every N steps", min=1, max=MAX_STEPS)
    tensorboard: bool = option(True, "write TensorBoard event files to the run's tb/ folder")
    progress: bool = option(True, "show progress: a bar on a terminal, plain lines when the output is a file or pipe")


@dataclass
class CheckpointSection:
    every: int = option(100, "save the full training state every N steps (and always at the end); 0 = only at the "
                        "end and on SIGINT/SIGTERM", min=0, max=MAX_STEPS)
    keep: int = option(2, "step checkpoints kept (the newest); older ones are deleted", min=1)


class RecipeMethods:
    """What every assembled `Recipe` can do."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        from dcablate.config.toml_out import dumps_toml

        return dumps_toml(self.to_dict())

    def digest(self) -> str:
        """Short hash of the resolved recipe: equal hashes mean equal runs."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _component_sections(specs, core: type, where: str) -> list[tuple]:
    """The recipe sections of the components among `specs` that have options, as fields beside those of `core`
    (`where.<name>`); a component named as one of `core`'s own keys would replace it: a UserError."""
    from dcablate.errors import UserError

    taken = {f.name for f in dataclasses.fields(core)}
    for s in specs:
        if s.name in taken:
            raise UserError(f"{where}.{s.name}: a registered component is named {s.name!r}, as a key of "
                            f"[{where}] is; give it another name")
    return [(s.name, s.options, section(s.options, s.options_doc)) for s in specs if s.options is not None]


_built: dict = {"generation": None}
_assembling = threading.RLock()  # the runs of a packed worker are threads of one process


def _assemble() -> dict:
    from dcablate import registry

    if _built["generation"] == registry.generation:
        return _built
    with _assembling:
        return _assemble_now(registry)


def _assemble_now(registry) -> dict:
    if _built["generation"] == registry.generation:  # another thread built it meanwhile
        return _built
    # every registry's built-ins registered before the generation is read
    mixer_specs, channel_specs, task_specs = _mixers().specs(), _channels().specs(), _tasks().specs()
    conv = dataclasses.make_dataclass("ConvSection", _component_sections(_convs().specs(), ConvCore, "model.conv"),
                                      bases=(ConvCore,))
    model = dataclasses.make_dataclass(
        "ModelSection", [("conv", conv, section(conv, "short convolution"))]
        + _component_sections(mixer_specs + channel_specs, ModelCore, "model"), bases=(ModelCore,))
    task = dataclasses.make_dataclass("TaskSection", _component_sections(task_specs, TaskCore, "task"),
                                      bases=(TaskCore,))
    recipe = dataclasses.make_dataclass("Recipe", [
        ("run", RunSection, section(RunSection, "run identity and placement")),
        ("model", model, section(model, "the model")),
        ("task", task, section(task, "data and metrics")),
        ("train", TrainSection, section(TrainSection, "optimisation")),
        ("eval", EvalSection, section(EvalSection, "evaluation cadence")),
        ("log", LogSection, section(LogSection, "logging")),
        ("checkpoint", CheckpointSection, section(CheckpointSection, "checkpoints and resume")),
        ("sweep", dict, field(default_factory=dict, metadata={"doc": "grid: recipe path -> list of values; `zip` "
                                                               "lists groups of keys that advance together"})),
    ], bases=(RecipeMethods,))
    for cls in (conv, model, task, recipe):  # picklable (torchrun ranks receive resolved recipes) as this module's names
        cls.__module__ = __name__
    # read the generation after the registries loaded their built-ins and plugins
    _built.update(generation=registry.generation, Recipe=recipe, ModelSection=model, ConvSection=conv,
                  TaskSection=task)
    return _built


def __getattr__(name: str):
    if name in ("Recipe", "ModelSection", "ConvSection", "TaskSection"):
        return _assemble()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def conv_streams(m, layer: int = 0) -> list[tuple[str, int]]:
    """(stream, channels) of every stream the conv placement covers in block `layer` of model section `m`:
    the token mixer's input streams, and with `all_linear` its output `o` (when it has one) and the channel
    mixer's streams."""
    mixer = _mixers().get(m.mixer_at(layer))
    streams = list(mixer.conv_streams(m))
    if m.conv.placement == "all_linear":
        streams += [("o", m.d_model)] if mixer.output_conv else []
        streams += _channels().get(m.ffn).conv_streams(m)
    return streams
