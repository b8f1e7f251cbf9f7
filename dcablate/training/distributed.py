"""Data-parallel training over several processes launched by torchrun (DDP or FSDP2), on CUDA or CPU.

One process per rank; torchrun sets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`/`MASTER_PORT`.
Every rank builds the same model from the same seed and draws the same global batch from the seeded task
generators, then trains on its slice (`local_rows`), so the data are those of a one-process run. Only
rank 0 writes the run directory; the others get what they must know (restored state, evaluation
metrics, stop decisions) from rank 0 or from a collective, so no decision can differ between ranks.

The process group uses NCCL for CUDA tensors and gloo for CPU tensors (`cpu:gloo,cuda:nccl` when CUDA
is visible), so a CPU run works on any machine and CI tests two processes on CPU.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import sys

import torch
import torch.distributed as dist

from dcablate.errors import UserError

STRATEGIES = ("ddp", "fsdp")


def launched() -> bool:
    """This process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup() -> bool:
    """Join the process group once per process if torchrun started several; True when distributed.

    Ranks other than 0 send their stdout to /dev/null (tables and progress come from rank 0 only);
    stderr stays, so an error on any rank is seen."""
    if active():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see docs/distributed.md)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    # evaluation runs on rank 0 while the others wait: allow it an hour, not NCCL's default 10 minutes
    timeout = datetime.timedelta(seconds=float(os.environ.get("DCABLATE_DIST_TIMEOUT", 3600)))
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(teardown)
    if dist.get_rank() != 0:
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return True


EXIT_BARRIER_S = 30  # how long a rank leaving waits for the others at exit before it goes anyway


def teardown() -> None:
    """At exit: wait (a while, not forever: a rank may have failed) until every rank is leaving too, then leave
    the process group. Without the wait, a rank that tears its connections down first can abort a neighbour
    still using them ("terminate called without an active exception" at exit)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
    except Exception:  # noqa: BLE001 - a rank that is gone or failed: nothing to wait for
        pass
    dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` on CUDA (one GPU per process), else unchanged."""
    if device.type == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------- agreement


def broadcast(obj, src: int = 0):
    """Rank `src`'s value of a picklable object on every rank (the object itself without ranks)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def sum_(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (a no-op without ranks)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(value: int) -> int:
    """The largest of the ranks' integers (a flag any rank raised, e.g. a caught signal)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------------------- batches


def local_rows(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rank `r`'s contiguous share of a global batch of `n` rows (sizes differ by at most one, earlier ranks
    larger; empty when n < world)."""
    r, w = rank() if r is None else r, world() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def micro_chunks(n: int, micro: int, w: int | None = None) -> int:
    """How many forward/backward passes every rank makes for a global batch of `n` rows: the same on all
    ranks (a rank with fewer rows pads with empty passes), so FSDP's collectives stay matched."""
    w = world() if w is None else w
    most = math.ceil(n / w)
    return max(1, math.ceil(most / (micro or most or 1)))


# ----------------------------------------------------------------------------------------- models


def _no_buffer_sync(ddp_class) -> dict:
    """DDP's switch for not broadcasting buffers before each forward (our models register none, so it would
    be a wasted collective): `forward_sync_buffers` in newer torch, which deprecates `broadcast_buffers`;
    the GPU image's torch 2.11 knows only the old name."""
    import inspect

    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class).parameters \
        else "broadcast_buffers"
    return {name: False}


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: `model` itself without ranks, DDP around it, or `model` sharded
    in place by FSDP2 (each block, then the root, which holds the embedding, final norm and tied head)."""
    if not active():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # gradients as views into DDP's communication buckets: no copy into and out of them each step
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **_no_buffer_sync(DDP))
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise UserError(f"train.parallel = {strategy!r}: must be one of {', '.join(STRATEGIES)}")


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The LanguageModel under a DDP wrapper (FSDP2 shards the module in place, so it is its own inner)."""
    return getattr(model, "module", model)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(model: torch.nn.Module, last: bool):
    """Gradient accumulation: reduce gradients over ranks only in the last micro-batch's backward."""
    import contextlib

    if not active():
        return contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else model.no_sync()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. FSDP's gradient norm) as a plain replicated tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------- full state

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names of the optimizer's parameters, group by group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def model_state(model: torch.nn.Module) -> dict | None:
    """The full, unsharded model state dict on rank 0 (CPU for FSDP); None on other ranks. Collective for
    FSDP: every rank must call it."""
    if active() and is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(model, options=_options(cpu_offload=True))
        return sd if is_main() else None
    return inner(model).state_dict() if is_main() else None


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The full optimizer state on rank 0 in `torch.optim` form (parameters numbered across groups), as a
    one-process run saves it, so a checkpoint resumes under any number of ranks. Collective for FSDP."""
    if active() and is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        if not is_main():
            return None
        index, groups = {}, []
        for g in sd["param_groups"]:
            ids = []
            for name in g["params"]:
                index[name] = len(index)
                ids.append(index[name])
            groups.append({**g, "params": ids})
        return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}
    return optimizer.state_dict() if is_main() else None


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full model state dict (every rank holds it); FSDP shards it."""
    if active() and is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_options())
        return
    inner(model).load_state_dict(state)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state saved by `optimizer_state` (or by a one-process run)."""
    if not (active() and is_fsdp(model)):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    groups = _param_names(model, optimizer)
    if len(groups) != len(state["param_groups"]) or any(
            len(a) != len(b["params"]) for a, b in zip(groups, state["param_groups"])):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")
    by_index, named_groups = {}, []
    for names, g in zip(groups, state["param_groups"]):
        by_index.update(zip(g["params"], names))
        named_groups.append({**g, "params": list(names)})
    named = {"state": {by_index[i]: s for i, s in state["state"].items()}, "param_groups": named_groups}
    set_optimizer_state_dict(model, optimizer, named, options=_options())


# ----------------------------------------------------------------------------------------- launching


def under_torchrun() -> bool:
    """Started by torchrun (even with one process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def relaunch(nproc: int, recipe: str, overrides: list[str], quiet: bool, force_new: bool,
             devices: list[torch.device], sweep_workers: bool) -> None:
    """`dcablate run --nproc N`: replace this process by `torchrun --standalone --nproc-per-node N -m dcablate
    run ...` (the same arguments without --nproc) with NVLink multicast off; returns only for N = 1."""
    if under_torchrun():
        raise UserError(f"--nproc {nproc}: this process was already started by torchrun "
                        f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}); drop --nproc")
    if sweep_workers:
        raise UserError(f"--nproc {nproc}: trains one model over several processes; --per-gpu, --gpus and "
                        f"--workers spread the runs of a sweep over workers; give one or the other")
    if nproc == 1:
        return
    if any(d.type == "cuda" for d in devices):
        count = torch.cuda.device_count()
        if nproc > count:
            raise UserError(f"--nproc {nproc}: one process per GPU, but {count} CUDA device"
                            f"{'s are' if count != 1 else ' is'} visible")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dcablate", "run", recipe]
    for o in overrides:
        argv += ["--set", o]
    argv += ["--quiet"] if quiet else []
    argv += ["--force-new"] if force_new else []
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
