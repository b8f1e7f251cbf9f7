"""TOML recipe -> typed, validated `Recipe`.

The recipe is the single source of truth for a run: everything that changes results lives here.
Loading resolves `extends` (deep merge, paths relative to the extending file, cycles rejected),
applies `--set key=value` overrides (values parsed as TOML, a bare word read as a string), checks
every key against the schema below and reports the first problem as one line naming the file and
the dotted key path.  `docs/recipes.md` documents each key; `tests/test_recipe.py` keeps the two
in step.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dcablate.errors import RecipeError, UserError, did_you_mean


def _f(default, doc: str, *, choices=None, min=None, max=None, min_open=False, factory=None, or_list=False):
    """A schema field: default, one-line doc, allowed choices and range; `or_list` also takes a
    non-empty list of such values."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "min_open": min_open, "or_list": or_list}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- schema


@dataclass
class RunSection:
    name: str = _f("run", "run name: the run directory is `out_dir/name`")
    seed: int = _f(0, "seed for model initialisation and dropout-free training randomness", min=0)
    out_dir: str = _f("runs", "parent folder of run directories (relative to the working directory)")
    device: str = _f("auto", "where to train: `auto` picks cuda when available", choices=("auto", "cpu", "cuda"))


@dataclass
class ConvSection:
    kind: str = _f("none", "short convolution on the mixer's streams: none, static (fla's ShortConvolution) or "
                   "dynamic (input-dependent filters, Sieberling et al. 2026)", choices=("none", "static", "dynamic"))
    placement: str = _f("qkv", "which streams get a conv: `qkv` = the mixer's q, k, v projections; `all_linear` = "
                        "after every linear layer of the block (q, k, v, o, MLP gate/up/down)",
                        choices=("qkv", "all_linear"))
    width: int = _f(4, "filter width W (taps, the current token included)", min=2, max=8)
    rank: int = _f(15, "dynamic low-rank filters: ranks R of the generator z = W_in h (paper: 15, plus the static S)",
                   min=1)
    heads: int = _f(0, "dynamic head-wise filters: one generated filter per group of D/heads channels "
                    "(heads = D is per channel); 0 = the low-rank parameterisation", min=0)
    static_filter: bool = _f(True, "dynamic convs add a learned static filter S to the generated one")
    activation: str = _f("auto", "activation after the conv; `auto` = silu for static (as fla does), none for dynamic",
                         choices=("auto", "silu", "none"))
    residual: typing.Optional[bool] = _f(None, "add the conv's input back (y = x + conv(x)); unset = true for "
                                         "dynamic (the paper's form), false for static (fla's)")


@dataclass
class AttentionSection:
    rope_theta: float = _f(10000.0, "RoPE base frequency", min=1.0)


@dataclass
class GatedDeltaNetSection:
    expand_v: float = _f(1.0, "value head dim = head_dim * expand_v (fla's default is 2)", min=0.0, min_open=True)
    use_gate: bool = _f(True, "gated RMSNorm on the output with g_proj (fla's `use_gate`)")
    allow_neg_eigval: bool = _f(False, "beta in [0, 2) instead of [0, 1) (fla's `allow_neg_eigval`)")


@dataclass
class Mamba2Section:
    head_dim: int = _f(64, "channels per SSM head; heads = expand * d_model / head_dim", min=1)
    state_size: int = _f(64, "SSM state size N per head (B and C width per group)", min=1)
    expand: int = _f(2, "inner width = expand * d_model", min=1)
    n_groups: int = _f(1, "groups of B/C shared by heads; head h reads group h // (heads / n_groups)", min=1)
    ssd_precision: str = _f("fp32", "dtype of the SSD's q/k/v on CUDA: fp32 (TF32 dots) or the input's (faster; "
                            "fla's bf16 backward gives dt_bias/A_log gradients with errors larger than themselves)",
                            choices=("fp32", "input"))


@dataclass
class MoESection:
    n_experts: int = _f(8, "routed experts", min=1)
    top_k: int = _f(2, "experts per token (token choice, dropless)", min=1)
    d_expert: int = _f(0, "SwiGLU hidden width of each expert; 0 = the dense MLP's width (model.ffn_hidden rule)",
                       min=0)
    score: str = _f("softmax", "router scores over experts", choices=("softmax", "sigmoid"))
    renormalize: bool = _f(True, "rescale the top-k weights to sum to 1")
    shared_expert: bool = _f(False, "add a dense SwiGLU expert of width d_expert applied to every token")
    load_balance_coef: float = _f(0.01, "weight of the load-balancing loss (mean over MoE layers)", min=0.0)
    z_loss_coef: float = _f(0.001, "weight of the router z-loss (mean over MoE layers)", min=0.0)


@dataclass
class ModelSection:
    mixer: str = _f("attention", "token mixer of every block, or a list of them applied cyclically over the layers",
                    choices=("attention", "gated_deltanet", "mamba2", "short_conv"), or_list=True)
    d_model: int = _f(128, "residual stream width", min=1)
    n_layers: int = _f(2, "number of blocks", min=1)
    n_heads: int = _f(2, "heads of the token mixer", min=1)
    head_dim: int = _f(0, "q/k head dim; 0 = d_model / n_heads", min=0)
    ffn: str = _f("none", "channel mixer after each token mixer", choices=("none", "mlp", "moe"))
    ffn_hidden: int = _f(0, "SwiGLU hidden width; 0 = 8/3 d_model rounded up to a multiple of 16", min=0)
    vocab_size: int = _f(0, "embedding rows; 0 = the task's vocabulary", min=0)
    tie_embeddings: bool = _f(True, "share the embedding matrix with the LM head")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", min=0.0, min_open=True)
    init_std: float = _f(0.02, "std of the normal init of linear and embedding weights", min=0.0, min_open=True)
    backend: str = _f("auto", "kernels: `auto` = fla/Triton on CUDA and pure torch on CPU; `torch` forces the "
                      "reference everywhere; `fla` requires CUDA", choices=("auto", "torch", "fla"))
    conv: ConvSection = field(default_factory=ConvSection, metadata={"doc": "short convolution"})
    attention: AttentionSection = field(default_factory=AttentionSection, metadata={"doc": "attention options"})
    gated_deltanet: GatedDeltaNetSection = field(default_factory=GatedDeltaNetSection,
                                                 metadata={"doc": "Gated DeltaNet options"})
    mamba2: Mamba2Section = field(default_factory=lambda: Mamba2Section(), metadata={"doc": "Mamba-2 options"})
    moe: MoESection = field(default_factory=lambda: MoESection(),
                            metadata={"doc": "mixture-of-experts options (model.ffn = \"moe\")"})

    def mixer_at(self, layer: int) -> str:
        """The token mixer of block `layer` (a list of mixers repeats over the layers)."""
        return self.mixer[layer % len(self.mixer)] if isinstance(self.mixer, list) else self.mixer

    @property
    def mixers(self) -> list[str]:
        """The distinct token mixers of the stack, in order of first use."""
        return list(dict.fromkeys(self.mixer if isinstance(self.mixer, list) else [self.mixer]))


@dataclass
class SegmentSpec:
    seq_len: int = _f(64, "tokens per example (T); even", min=2)
    num_kv_pairs: int = _f(4, "key-value pairs per example; 4 * num_kv_pairs <= seq_len", min=1)
    num_examples: int = _f(1000, "examples in this segment", min=1)


def _default_train_segments():
    return [SegmentSpec(64, 4, 20000)]


def _default_test_segments():
    return [SegmentSpec(64, 4, 1000)]


@dataclass
class MQARSection:
    vocab_size: int = _f(8192, "vocabulary; keys from [1, V/2), values from [V/2, V); token 0 reserved", min=4)
    power_a: float = _f(0.01, "query slot i drawn with probability proportional to i^(power_a - 1)",
                        min=0.0, max=1.0, min_open=True)
    filler: str = _f("random", "tokens between queries: uniform over the vocabulary, or 0", choices=("random", "zero"))
    data_seed: int = _f(0, "seed of the generated data, separate from run.seed so every model of a sweep "
                        "sees the same examples", min=0)
    train: list[SegmentSpec] = _f(None, "training segments", factory=_default_train_segments)
    test: list[SegmentSpec] = _f(None, "test segments; may be longer than any training segment",
                                 factory=_default_test_segments)


@dataclass
class LMSection:
    data: str = _f("", "the text: a .txt/.jsonl/.parquet file, a folder of them or a glob")
    text_field: str = _f("text", "the text field of .jsonl lines and the text column of .parquet files")
    tokenizer: str = _f("byte", "byte = UTF-8 bytes plus a document separator (vocabulary 257); bpe = byte-level "
                        "BPE through `tokenizers`, trained on the training split or loaded from tokenizer_file",
                        choices=("byte", "bpe"))
    vocab_size: int = _f(4096, "vocabulary of a BPE tokenizer trained here (256 bytes + separator + merges)",
                         min=257)
    tokenizer_file: str = _f("", "a tokenizer.json to load instead of training BPE (tokenizer = \"bpe\")")
    seq_len: int = _f(256, "tokens per packed training and validation sequence", min=1)
    val_fraction: float = _f(0.05, "share of documents held out for validation (at least one)",
                             min=0.0, max=1.0, min_open=True)
    split_seed: int = _f(0, "seed of the deterministic train/validation split by document", min=0)
    eval_sequences: int = _f(0, "validation sequences evaluated; 0 = all", min=0)
    cache_dir: str = _f("", "tokenized-shard cache; empty = $DCABLATE_CACHE or ~/.cache/dcablate")


@dataclass
class TaskSection:
    kind: str = _f("mqar", "the task", choices=("mqar", "lm"))
    mqar: MQARSection = field(default_factory=MQARSection, metadata={"doc": "MQAR options"})
    lm: LMSection = field(default_factory=LMSection, metadata={"doc": "language-modelling options"})


@dataclass
class TrainSection:
    steps: int = _f(1000, "optimizer steps (upper bound when early stopping)", min=1)
    batch_size: int = _f(64, "examples per step", min=1)
    lr: float = _f(1e-3, "peak learning rate", min=0.0, min_open=True)
    schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_steps: int = _f(100, "linear warmup from 0 to lr", min=0)
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of lr", min=0.0, max=1.0)
    weight_decay: float = _f(0.1, "AdamW weight decay (not on norms, biases, A_log, dt_bias)", min=0.0)
    beta1: float = _f(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = _f(0.98, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 turns clipping off", min=0.0)
    precision: str = _f("auto", "`auto` = bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    micro_batch_size: int = _f(0, "examples per forward/backward pass; gradients of batch_size / micro_batch_size "
                               "passes are accumulated into one step (0 = batch_size, no accumulation)", min=0)
    oom_retry: bool = _f(True, "on a CUDA out-of-memory error in a training step (one process), halve the micro-batch "
                         "and retry the step, down to 1 example (printed and logged as `micro_batch`)")
    nonfinite: str = _f("stop", "on a non-finite loss or gradient: stop the run (last good checkpoint kept) or skip "
                        "the update", choices=("stop", "skip"))
    parallel: str = _f("ddp", "several processes (torchrun or `dcablate run --nproc N`): `ddp` keeps a full model on "
                       "every rank, `fsdp` shards parameters, gradients and optimizer state (FSDP2)",
                       choices=("ddp", "fsdp"))
    cuda_graph: str = _f("auto", "replay the training step as a CUDA graph: `auto` = when the run allows it (CUDA, "
                         "one process, fused AdamW), `on` = required (an error otherwise), `off` = eager steps",
                         choices=("auto", "on", "off"))


@dataclass
class EvalSection:
    every: int = _f(200, "evaluate every N steps (and always at the end)", min=1)
    batch_size: int = _f(256, "examples per evaluation batch", min=1)
    early_stop: float = _f(0.99, "stop when overall test accuracy reaches this; 0 turns early stopping off",
                           min=0.0, max=1.0)


@dataclass
class LogSection:
    every: int = _f(10, "write train metrics every N steps", min=1)
    tensorboard: bool = _f(True, "write TensorBoard event files to the run's tb/ folder")
    progress: bool = _f(True, "show a progress bar with loss and ETA")


@dataclass
class CheckpointSection:
    every: int = _f(100, "save the full training state every N steps (and always at the end); 0 = only at the end "
                    "and on SIGINT/SIGTERM", min=0)
    keep: int = _f(2, "step checkpoints kept (the newest); older ones are deleted", min=1)


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection, metadata={"doc": "run identity and placement"})
    model: ModelSection = field(default_factory=ModelSection, metadata={"doc": "the model"})
    task: TaskSection = field(default_factory=TaskSection, metadata={"doc": "data and metrics"})
    train: TrainSection = field(default_factory=TrainSection, metadata={"doc": "optimisation"})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"doc": "evaluation cadence"})
    log: LogSection = field(default_factory=LogSection, metadata={"doc": "logging"})
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection,
                                          metadata={"doc": "checkpoints and resume"})
    sweep: dict = field(default_factory=dict, metadata={"doc": "grid: recipe path -> list of values; `zip` lists "
                                                        "groups of keys that advance together"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def digest(self) -> str:
        """Short hash of the resolved recipe: equal hashes mean equal runs."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- loading


RECIPE_SUFFIX = ".toml"


def shipped_recipes() -> dict[str, Path]:
    """Recipes that ship with the package, by name (path relative to the recipes folder, no suffix)."""
    try:
        root = Path(str(resources.files("dcablate.recipes")))
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH, not installed
        root = Path(__file__).resolve().parent.parent / "recipes"
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob(f"*{RECIPE_SUFFIX}"))}


def find_recipe(ref: str) -> Path:
    """A recipe by path, or by the name of a shipped recipe."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = ref.removesuffix(RECIPE_SUFFIX)
    if name in shipped:
        return shipped[name]
    if path.exists():
        raise UserError(f"{ref}: not a file")
    raise UserError(f"{ref}: no such recipe file or shipped recipe{did_you_mean(name, shipped)}; "
                    f"`dcablate recipes` lists the shipped ones")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None


def _merge(base: dict, over: dict, origins: dict, over_source: str, prefix: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`; tables merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, over_source, path + ".")
        else:
            out[key] = value
            _mark(origins, path, value, over_source)
    return out


def _mark(origins: dict, path: str, value, source: str) -> None:
    origins[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(origins, f"{path}.{k}", v, source)


def _load_raw(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError(str(chain[-1]), "extends", f"cycle: {cycle}")
    data = _read_toml(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        base = {}
    else:
        if not isinstance(parent_ref, str):
            raise RecipeError(str(path), "extends", f"must be a string path, got {type(parent_ref).__name__}")
        parent = (path.parent / parent_ref)
        if not parent.is_file():
            shipped = shipped_recipes()
            if parent_ref.removesuffix(RECIPE_SUFFIX) not in shipped:
                raise RecipeError(str(path), "extends", f"no such file: {parent}")
            parent = shipped[parent_ref.removesuffix(RECIPE_SUFFIX)]
        base = _load_raw(parent, origins, (*chain, path))
    return _merge(base, data, origins, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is TOML, a bare word is a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.lr=3e-3")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if any(ch in raw for ch in "[]{}\"'=") or not raw:
            raise UserError(f"--set {text}: value is not valid TOML") from None
        value = raw
    return key, value


def _set_path(data: dict, dotted: str, value, origins: dict, source: str) -> None:
    node = data
    parts = dotted.split(".")
    if parts[0] == "sweep" and len(parts) > 1:
        parts = ["sweep", ".".join(parts[1:])]  # sweep keys are themselves dotted recipe paths
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            origins[".".join(parts[: i + 1])] = source
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise RecipeError(source, ".".join(parts[: i + 1]), "is a value, not a table")
        node = nxt
    node[parts[-1]] = value
    _mark(origins, dotted, value, source)


def load_raw(ref: str, overrides: list[str] = ()) -> tuple[dict, dict, Path]:
    """Resolve extends and --set; returns (raw dict, key origins, recipe path)."""
    path = find_recipe(ref)
    origins: dict[str, str] = {}
    data = _load_raw(path, origins)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value, origins, "--set")
    if isinstance(data.get("sweep"), dict):
        data["sweep"] = _flatten(data["sweep"])
    return data, origins, path


def _flatten(table: dict, prefix: str = "") -> dict:
    """`[sweep] model.d_model = [..]` parses as nested tables; sweep keys are dotted paths."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(ref: str, overrides: list[str] = ()) -> Recipe:
    """Load, resolve and validate one recipe (its `[sweep]` table kept, not expanded)."""
    data, origins, path = load_raw(ref, overrides)
    return build(data, origins, str(path))


def build(data: dict, origins: dict | None = None, default_source: str = "<recipe>") -> Recipe:
    origins = origins or {}
    recipe = _build_dataclass(Recipe, data, "", origins, default_source)
    _check_sweep(recipe, data, origins, default_source)
    _check_consistency(recipe, origins, default_source)
    return recipe


# ----------------------------------------------------------------------------------------- validation


def _src(origins: dict, path: str, default: str) -> str:
    """The file that set `path` (or its closest set parent)."""
    while path:
        if path in origins:
            return origins[path]
        path = path[: path.rindex("[")] if path.endswith("]") else path.rpartition(".")[0]
    return default


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _build_dataclass(cls, data, prefix: str, origins: dict, default: str):
    if not isinstance(data, dict):
        raise RecipeError(_src(origins, prefix.rstrip("."), default), prefix.rstrip("."),
                          f"must be a table, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            path = f"{prefix}{key}"
            allowed = ", ".join(names)
            raise RecipeError(_src(origins, path, default), path,
                              f"unknown key{did_you_mean(key, names)}; allowed here: {allowed}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}{f.name}"
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f, path, origins, default)
    return cls(**kwargs)


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _coerce(tp, value, f, path: str, origins: dict, default: str):
    src = _src(origins, path, default)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path + ".", origins, default)
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]: None is the default ("auto"), a given value must be an X
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(tp, value, f, path, origins, default)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise RecipeError(src, path, f"must be a non-empty list of tables, got {_describe(value)}")
        return [_coerce(item_tp, v, f, f"{path}[{i}]", origins, default) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(src, path, f"must be a table, got {_describe(value)}")
        return value
    if f.metadata.get("or_list") and isinstance(value, list):  # one value, or a list of them
        if not value:
            raise RecipeError(src, path, "must be a value or a non-empty list of values, got an empty list")
        single = dataclasses.field(metadata={**f.metadata, "or_list": False})
        return [_coerce(tp, v, single, f"{path}[{i}]", origins, default) for i, v in enumerate(value)]
    ok = (isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise RecipeError(src, path, f"must be {_TYPE_NAMES[tp]}, got {_describe(value)}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(src, path, f"must be a finite number, got {value}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        allowed = "|".join(meta["choices"])
        raise RecipeError(src, path, f"'{value}' is not one of {allowed}{did_you_mean(value, meta['choices'])}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_open") and value == lo)):
        op = ">" if meta.get("min_open") else ">="
        raise RecipeError(src, path, f"must be {op} {lo}, got {value}")
    if hi is not None and value > hi:
        raise RecipeError(src, path, f"must be <= {hi}, got {value}")
    return value


def _check(cond: bool, origins: dict, default: str, path: str, message: str) -> None:
    if not cond:
        raise RecipeError(_src(origins, path, default), path, message)


def swiglu_hidden(d_model: int, requested: int) -> int:
    """`requested`, or 8/3 d_model rounded up to a multiple of 16 (same parameters as a 4x GELU MLP)."""
    return requested or -(-(8 * d_model // 3) // 16) * 16


def conv_streams(m: ModelSection, layer: int = 0) -> list[tuple[str, int]]:
    """(stream, channels) of every stream a conv placement covers, for block `layer`."""
    mixer = m.mixer_at(layer)
    if mixer == "mamba2":  # one conv on the concatenated x, B, C stream (x ~ v, B ~ k, C ~ q)
        c = m.mamba2
        streams = [("xbc", c.expand * m.d_model + 2 * c.n_groups * c.state_size)]
    elif mixer == "short_conv":  # the conv is the whole mixer
        streams = [("x", m.d_model)]
    else:
        head_dim = m.head_dim or m.d_model // m.n_heads
        key_dim = m.n_heads * head_dim
        value_dim = int(round(key_dim * m.gated_deltanet.expand_v)) if mixer == "gated_deltanet" else key_dim
        streams = [("q", key_dim), ("k", key_dim), ("v", value_dim)]
    if m.conv.placement == "all_linear":
        streams.append(("o", m.d_model))
        if m.ffn == "mlp":
            hidden = swiglu_hidden(m.d_model, m.ffn_hidden)
            streams += [("gate", hidden), ("up", hidden), ("down", m.d_model)]
        if m.ffn == "moe":  # one conv after the whole MoE output (see models/moe.py)
            streams.append(("down", m.d_model))
    return streams


def _check_consistency(r: Recipe, origins: dict, src: str) -> None:
    """Choices that are valid alone but not together."""
    m = r.model
    if m.head_dim == 0:
        _check(m.d_model % m.n_heads == 0, origins, src, "model.n_heads",
               f"d_model {m.d_model} is not divisible by n_heads {m.n_heads} (or set model.head_dim)")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if "attention" in m.mixers:
        _check(head_dim % 2 == 0, origins, src, "model.head_dim", f"RoPE needs an even head dim, got {head_dim}")
    if "gated_deltanet" in m.mixers:
        hv = head_dim * m.gated_deltanet.expand_v
        _check(abs(hv - round(hv)) < 1e-6, origins, src, "model.gated_deltanet.expand_v",
               f"head_dim {head_dim} * expand_v {m.gated_deltanet.expand_v} is not an integer")
    if "mamba2" in m.mixers:
        c = m.mamba2
        inner = c.expand * m.d_model
        _check(inner % c.head_dim == 0, origins, src, "model.mamba2.head_dim",
               f"expand * d_model = {inner} is not divisible by head_dim {c.head_dim}")
        _check((inner // c.head_dim) % c.n_groups == 0, origins, src, "model.mamba2.n_groups",
               f"{c.n_groups} groups do not divide the {inner // c.head_dim} heads")
    if m.ffn == "moe":
        _check(m.moe.top_k <= m.moe.n_experts, origins, src, "model.moe.top_k",
               f"top_k {m.moe.top_k} exceeds n_experts {m.moe.n_experts}")
    if m.conv.kind == "dynamic" and m.conv.heads:
        layers = len(m.mixer) if isinstance(m.mixer, list) else 1
        for stream, dim in (sd for layer in range(layers) for sd in conv_streams(m, layer)):
            _check(dim % m.conv.heads == 0, origins, src, "model.conv.heads",
                   f"{m.conv.heads} heads do not divide the {stream} stream's {dim} channels")
    if r.task.kind == "mqar":
        q = r.task.mqar
        for split in ("train", "test"):
            for i, seg in enumerate(getattr(q, split)):
                path = f"task.mqar.{split}[{i}]"
                _check(seg.seq_len % 2 == 0, origins, src, f"{path}.seq_len", f"must be even, got {seg.seq_len}")
                _check(4 * seg.num_kv_pairs <= seg.seq_len, origins, src, f"{path}.num_kv_pairs",
                       f"4 * num_kv_pairs ({4 * seg.num_kv_pairs}) must be <= seq_len ({seg.seq_len})")
                _check(seg.num_kv_pairs < q.vocab_size // 2, origins, src, f"{path}.num_kv_pairs",
                       f"needs fewer than vocab_size/2 = {q.vocab_size // 2} distinct keys")
        if m.vocab_size:
            _check(m.vocab_size >= q.vocab_size, origins, src, "model.vocab_size",
                   f"{m.vocab_size} is smaller than task.mqar.vocab_size {q.vocab_size}")
    if r.task.kind == "lm":
        _check(bool(r.task.lm.data), origins, src, "task.lm.data", "task.kind = 'lm' needs the text to train on")
        if m.vocab_size and not r.task.lm.tokenizer_file:
            need = 257 if r.task.lm.tokenizer == "byte" else r.task.lm.vocab_size
            _check(m.vocab_size >= need, origins, src, "model.vocab_size",
                   f"{m.vocab_size} is smaller than the tokenizer's vocabulary ({need})")
    _check(r.train.warmup_steps <= r.train.steps, origins, src, "train.warmup_steps",
           f"{r.train.warmup_steps} is more than train.steps {r.train.steps}")
    _check(r.train.micro_batch_size <= r.train.batch_size, origins, src, "train.micro_batch_size",
           f"{r.train.micro_batch_size} is more than train.batch_size {r.train.batch_size}")


def _check_sweep(r: Recipe, data: dict, origins: dict, src: str) -> None:
    for key, values in r.sweep.items():
        path = f"sweep.{key}"
        where = _src(origins, path, src)
        if key == ZIP_KEY:
            continue
        if not isinstance(values, list) or not values:
            raise RecipeError(where, path, f"must be a non-empty list of values, got {_describe(values)}")
        if key == "sweep" or key.startswith("sweep."):
            raise RecipeError(where, path, "a sweep cannot sweep itself")
    _check_zip(r.sweep, _src(origins, f"sweep.{ZIP_KEY}", src))
    for keys, points in sweep_axes(r.sweep):  # each point of each axis must itself be a valid recipe
        path = f"sweep.{keys[0]}" if len(keys) == 1 else f"sweep.{ZIP_KEY}"
        where = _src(origins, path, src)
        for values in points:
            trial = copy.deepcopy(data)
            trial.pop("sweep", None)
            for key, value in zip(keys, values):
                _set_path(trial, key, value, {}, where)
            try:
                build(trial, {}, where)
            except RecipeError as e:
                what = f"value {values[0]!r}" if len(keys) == 1 else \
                    "values " + ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
                raise RecipeError(where, path, f"{what}: {str(e).split(': ', 2)[-1]}") from None


def _check_zip(sweep: dict, where: str) -> None:
    """`sweep.zip`: a list of groups, each a list of >= 2 swept keys with lists of equal length."""
    groups = sweep.get(ZIP_KEY, [])
    path = f"sweep.{ZIP_KEY}"
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise RecipeError(where, path, f'must be a list of lists of swept keys, e.g. [["train.lr", '
                          f'"model.d_model"]], got {_describe(groups)}')
    seen: set = set()
    for g in groups:
        if len(g) < 2 or not all(isinstance(k, str) for k in g):
            raise RecipeError(where, path, f"each group must list at least two keys (strings), got {g!r}")
        for k in g:
            if k not in sweep or k == ZIP_KEY:
                raise RecipeError(where, path, f"'{k}' is not a key of [sweep]{did_you_mean(k, list(sweep))}")
            if k in seen:
                raise RecipeError(where, path, f"'{k}' is in two zip groups")
            seen.add(k)
        lengths = {k: len(sweep[k]) for k in g}
        if len(set(lengths.values())) > 1:
            raise RecipeError(where, path, "zipped keys need lists of equal length, got " +
                              ", ".join(f"{k}: {n}" for k, n in lengths.items()))


# ----------------------------------------------------------------------------------------- sweeps


ZIP_KEY = "zip"  # [sweep] zip = [["train.lr", "model.d_model"]]: those keys advance together


def sweep_axes(sweep: dict) -> list[tuple[list[str], list[tuple]]]:
    """The grid's axes in key order as (keys, value tuples): one key alone, or a zip group (at the
    position of its first key) whose keys take their i-th values together."""
    group_of = {k: g for g in sweep.get(ZIP_KEY, []) for k in g}
    axes, seen = [], set()
    for key in sweep:
        if key == ZIP_KEY or key in seen:
            continue
        keys = group_of.get(key, [key])
        seen.update(keys)
        axes.append((keys, list(zip(*(sweep[k] for k in keys)))))
    return axes


def expand(ref: str, overrides: list[str] = ()) -> tuple[Recipe, list[tuple[str, Recipe]]]:
    """The base recipe and its grid points as (point name, recipe); one point if there is no sweep.
    The grid is the product of the axes (see `sweep_axes`), the last axis varying fastest."""
    data, origins, path = load_raw(ref, overrides)
    base = build(data, origins, str(path))
    if not base.sweep:
        return base, [("", base)]
    axes = sweep_axes(base.sweep)
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = [(k, v) for (keys, _), values in zip(axes, combo) for k, v in zip(keys, values)]
        point = copy.deepcopy(data)
        point.pop("sweep")
        for key, value in pairs:
            _set_path(point, key, value, {}, str(path))
        name = ",".join(f"{_short(k)}={_fmt(v)}" for k, v in pairs)
        points.append((name, build(point, origins, str(path))))
    return base, points


def _short(key: str) -> str:
    return key.split(".", 1)[1] if key.split(".")[0] in ("model", "train", "run", "task", "eval") else key


def _fmt(value) -> str:
    if isinstance(value, list):
        return "+".join(_fmt(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------------------- TOML out


def dumps_toml(data: dict) -> str:
    """Write a resolved recipe as TOML (scalars, lists of scalars, tables, arrays of tables)."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _is_table_list(v) -> bool:
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def _emit_table(table: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items()
               if v is not None and not isinstance(v, dict) and not _is_table_list(v)}  # None = unset
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            sub = [*path, k]
            lines.append("")
            lines.append(f"[{'.'.join(_key(p) for p in sub)}]")
            _emit_table(v, sub, lines)
        elif _is_table_list(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(p) for p in [*path, k])}]]")
                _emit_table(item, [*path, k], lines)


def _key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _str(k)


def _str(s: str) -> str:
    """A TOML basic string, ASCII only: escapes for quotes, backslash, control and non-ASCII characters."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(f"\\U{o:08X}")
    return '"' + "".join(out) + '"'


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
