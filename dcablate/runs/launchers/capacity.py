"""How many runs of a sweep to train at once when no flag says: from the GPUs' memory against the largest run's
estimated need and from the CPU cores (each worker needs a core to feed its GPU), or on CPU from the cores at
`CPU_THREADS_PER_RUN` threads per run. Only parallelism follows from this; what each run computes does not.

The estimate is deliberately rough and high (a run that does not fit fails with an out-of-memory line in its
log and is reported; `--per-gpu N` then chooses for you): the weights with their gradients and AdamW's two
moments, the activations the backward keeps per token, the logits of the LM head, and a CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30
MAX_PER_GPU = 8  # beyond this, small runs gain little more (docs/benchmarks.md: 1.82x at 8 per H100)
CPU_THREADS_PER_RUN = 4  # a CPU run keeps this many threads: fewer would slow each run more than workers gain
GPU_USABLE = 0.9  # of a card's memory, the share runs may plan on (allocator fragmentation, other tenants)
HOST_USABLE = 0.8  # of the host's free memory
CUDA_CONTEXT_BYTES = GIB  # a process's CUDA context, cuBLAS workspace and Triton's kernels
STATE_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments
ACTIVATION_BYTES = 96  # kept for the backward, per token, unit of width and layer (fp32, with margin)
HEAD_TRAIN_BYTES = 12  # per token and vocabulary entry: logits, their gradient, a low-precision copy
HEAD_EVAL_BYTES = 4  # per token and vocabulary entry at evaluation: the logits


@dataclass
class RunShape:
    """What a run's memory depends on."""

    params: int
    d_model: int
    n_layers: int
    micro_batch: int  # examples per forward/backward pass
    eval_batch: int
    seq_len: int
    vocab: int


def estimate_bytes(shape: RunShape, cuda: bool) -> int:
    """Peak memory of one training run of `shape`, generously estimated (see the module's docstring)."""
    s = shape
    tokens = s.micro_batch * s.seq_len
    return (STATE_BYTES_PER_PARAM * s.params + ACTIVATION_BYTES * tokens * s.d_model * s.n_layers
            + HEAD_TRAIN_BYTES * tokens * s.vocab + HEAD_EVAL_BYTES * s.eval_batch * s.seq_len * s.vocab
            + (CUDA_CONTEXT_BYTES if cuda else 0))


def run_shape(r) -> RunShape:
    """A resolved recipe's `RunShape` (its model built on the meta device: nothing is allocated; each distinct
    model once per process, as a sweep's learning rates, seeds and task settings share a few models)."""
    import torch

    from dcablate.models.channel import CHANNELS
    from dcablate.models.costs import build_model
    from dcablate.models.mixers import MIXERS
    from dcablate.tasks import task_class, task_head, task_options

    seq_len, vocab = task_class(r.task.kind).shape(task_options(r.task))
    with torch.device("meta"):
        head = task_head(r.task, r.model.d_model)  # a task's head (compression's) is part of the model
    # a module's repr leaves out the shapes of parameters it holds itself; the specs' identities tell a component
    # re-registered under its name (a plugin reloaded) from the one counted before
    head_shapes = () if head is None else tuple((n, tuple(p.shape)) for n, p in head.named_parameters())
    specs = tuple(id(MIXERS.get(m)) for m in r.model.mixers if m in MIXERS.names())
    key = (repr(r.model), vocab, repr(head), head_shapes, specs,
           id(CHANNELS.get(r.model.ffn)) if r.model.ffn in CHANNELS.names() else None)
    if key not in _params_and_vocab:
        model = build_model(r, vocab, device="meta")
        _params_and_vocab[key] = sum(p.numel() for p in model.parameters()), model.vocab_size
    params, embeddings = _params_and_vocab[key]
    t = r.train
    return RunShape(params, r.model.d_model, r.model.n_layers, t.micro_batch_size or t.batch_size,
                    r.eval.batch_size, seq_len, embeddings)


_params_and_vocab: dict[tuple, tuple[int, int]] = {}  # (model section, task vocabulary, head) -> run_shape's counts


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def default_count(uses_cuda: bool, run_bytes: int, cores: int | None, gpus: int = 0, gpu_bytes: int | None = None,
                  host_bytes: int | None = None) -> tuple[int, str]:
    """(runs per GPU on CUDA, CPU workers otherwise; at least 1) for runs needing `run_bytes` each, and the
    line that says why. `gpu_bytes`: the smallest chosen card's memory; `host_bytes`: free host memory;
    `cores` None on CUDA: the cores are someone else's to count (Ray gives each GPU worker a CPU)."""
    if uses_cuda:
        fit = int(GPU_USABLE * gpu_bytes // max(run_bytes, 1)) if gpu_bytes else MAX_PER_GPU
        feed = cores // max(gpus, 1) if cores is not None else MAX_PER_GPU
        n = max(1, min(MAX_PER_GPU, fit, feed))
        line = (f"{n} run{'s' if n != 1 else ''} per GPU on {gpus} GPU{'s' if gpus != 1 else ''}: a run needs about "
                f"{gib(run_bytes)}" + (f" of the {gib(gpu_bytes)} per GPU (room for {fit})" if gpu_bytes else "")
                + (f", {cores} CPU cores feed {'them' if gpus != 1 else 'it'}" if cores is not None else "")
                + f", at most {MAX_PER_GPU} per GPU (--per-gpu N to choose)")
        return n, line
    by_cores = cores // CPU_THREADS_PER_RUN
    by_memory = int(HOST_USABLE * host_bytes // max(run_bytes, 1)) if host_bytes else by_cores
    n = max(1, min(by_cores, by_memory))
    memory = f", host memory for {by_memory} runs of about {gib(run_bytes)}" if by_memory < by_cores else ""
    if n == 1:
        return 1, (f"one run at a time in this process, on all {cores} CPU core{'s' if cores != 1 else ''} (workers "
                   f"pay off from {CPU_THREADS_PER_RUN} cores per run{memory}; --workers N to train several at once)")
    return n, (f"{n} CPU workers: {cores} cores at {CPU_THREADS_PER_RUN} threads per run{memory} "
               f"(--workers N to choose)")
