"""Models of one architecture stepped together: one batched forward and backward for all of them.

The runs of a grid cell differ only in their optimizer settings (the learning rates of a cell): the same model,
the same initial weights (the same seed) and the same batches. Stepped one by one, each step of a small model is
hundreds of short kernels that leave most of a GPU idle (docs/benchmarks.md). Stepped together, every kernel
runs once for all of them: `torch.func.vmap` over the members' stacked weights runs the model's forward as one
batched model (torch's operators batched by vmap, fla's and our kernels through their rules in
`kernels/members.py`), and one backward fills each member's own gradients. Each member then takes its own
optimizer step (its own learning rate and weight decay, clipping and non-finite check), so each trains as it
would alone, up to float rounding.

`Lockstep(nets).losses(x, y)` -> `[E]`: the members' losses on one batch; `.backward()` of their sum gives each
member's parameters the gradient of its own loss (the members' weights and gradients live in stacked tensors, of
which each member's parameters are views). `LockstepStep` is the training step of such a group (CUDA
graphs on a GPU), with the deferred non-finite check of `step.TrainStep`.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, vmap

from dcablate.training.graphs import GraphedSteps
from dcablate.training.step import NonFiniteStep, graphs_allowed
from dcablate.training.optim import make_optimizer, make_scheduler
from dcablate.training.runtime import autocast_for


class Lockstep:
    """`nets`: E models of one architecture (the same parameter names and shapes), on their device for good.

    Each parameter of the members lives in one stacked tensor `[E, ...]` from here on: a member's parameter is a
    view of its slice, and so is its gradient (`.grad`, kept allocated: zero it with `zero_grad`, never set it to
    None). The batched forward reads the stacked tensors as they are, so no step copies weights in or gradients
    out, while each member stays a model of its own (its optimizer steps its views, an evaluation reads them,
    `load_state_dict` copies into them). What breaks the link: moving or casting a member (`.to`), and setting its
    gradients to None (`zero_grad(set_to_none=True)`). A checkpoint of a member must clone its tensors: `torch.save`
    of a view writes the whole stacked storage, every member's weights."""

    def __init__(self, nets: list[torch.nn.Module]):
        if not nets:
            raise ValueError("Lockstep needs at least one model")
        self.nets = list(nets)
        named = [dict(net.named_parameters()) for net in nets]
        self.names = list(named[0])
        for i, params in enumerate(named[1:], 1):
            if {n: p.shape for n, p in params.items()} != {n: p.shape for n, p in named[0].items()}:
                raise ValueError(f"Lockstep: model {i} differs from model 0 in its parameters")
        from dcablate.models.channel.base import ChannelMixer

        kinds = getattr(nets[0], "_channel_mixers", dict)()
        if any(kind.aux_loss.__func__ is not ChannelMixer.aux_loss.__func__ for kind in kinds):
            # their forward leaves routing state and auxiliary losses on the layers, which vmap cannot hand out
            raise ValueError("Lockstep: channel mixers with an auxiliary loss (MoE) are not supported")
        self.params: dict[str, torch.Tensor] = {}
        for name in self.names:
            members = [params[name] for params in named]
            stacked = torch.stack([p.detach() for p in members]).requires_grad_(members[0].requires_grad)
            stacked.grad = torch.zeros_like(stacked)
            for e, p in enumerate(members):
                p.data = stacked.data[e]
                p.grad = stacked.grad[e]
            self.params[name] = stacked
        self.buffer_names = [name for name, _ in nets[0].named_buffers()]

    def zero_grad(self) -> None:
        """Zero every member's gradient in place (one kernel per stacked parameter)."""
        for stacked in self.params.values():
            stacked.grad.zero_()

    def buffers(self) -> dict:
        """The members' buffers stacked along a new first dimension (copies: models here have few, if any)."""
        buffers = [dict(net.named_buffers()) for net in self.nets]
        return {name: torch.stack([b[name] for b in buffers]) for name in self.buffer_names}

    def losses(self, x: torch.Tensor, y: torch.Tensor, scored_count: int | None = None) -> torch.Tensor:
        """`x, y [B, T]` (one batch for all members) -> `[E]`, member e's mean loss (as `LanguageModel.forward`).
        The backward of their sum adds each member's gradient to its `.grad`."""
        template = self.nets[0]

        def one(p, b):
            return functional_call(template, (p, b), (x, y), {"scored_count": scored_count})

        return vmap(one, randomness="error")(self.params, self.buffers())


class LockstepStep:
    """`step(x, y, row_scored=None)` -> `[E, 3]` device tensor (skipped, loss, gradient norm per member): one
    optimizer step of each member on one batch; `flush()` acts on the non-finite ones. `trains[e]` is member e's
    `[train]` section (its learning rate, weight decay, schedule, clipping); micro-batches, data parallelism and OOM
    retries are not part of it.
    On CUDA with `graphs` the step is captured and replayed as `TrainStep`'s is (graphs.py)."""

    def __init__(self, nets: list[torch.nn.Module], trains: list, device: torch.device, graphs: bool = True):
        self.lock = Lockstep(nets)
        self.trains, self.device = trains, device
        self.autocast = autocast_for(device, trains[0].precision)
        self.optimizers = [make_optimizer(net, t, device) for net, t in zip(nets, trains)]
        self.schedulers = [make_scheduler(o, t) for o, t in zip(self.optimizers, trains)]
        self.deferred = all(o.defaults.get("fused") for o in self.optimizers)
        self.graphs = None
        choice = trains[0].cuda_graph if graphs else "off"
        if graphs_allowed(choice, device, self.deferred):
            self.graphs = GraphedSteps(self.body, self.optimizers, lambda: (lambda: None), strict=True,
                                       warn=lambda line: None)
        self.taken = 0
        self.skipped = [0] * len(nets)
        self.pending: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None) -> torch.Tensor:
        extra = None if row_scored is None else tuple(row_scored)
        out = self.graphs(x, y, extra) if self.graphs is not None else self.body(x, y, extra)
        for scheduler in self.schedulers:
            scheduler.step()
        self.taken += 1
        self.pending.append((self.taken, out))
        return out

    def flush(self) -> None:
        """Act on the non-finite steps since the last call (one host sync), member by member as `TrainStep.flush`
        does for one model: count a skipped step under its `train.nonfinite = "skip"`, else raise
        `NonFiniteStep` (its `member` attribute says whose); the other members' steps were not affected."""
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        rows = torch.stack([out for _, out in self.pending]).tolist()  # [steps, E, 3]
        self.pending = []
        for step, members in zip(steps, rows):
            for e, (bad, loss, grad_norm) in enumerate(members):
                if not bad:
                    continue
                if self.trains[e].nonfinite == "skip":
                    self.skipped[e] += 1
                    continue
                error = NonFiniteStep(step, loss, grad_norm)
                error.member = e
                raise error

    def body(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None) -> torch.Tensor:
        self.lock.zero_grad()
        count = None if row_scored is None else int(sum(row_scored))
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            losses = self.lock.losses(x, y, count)
        losses.sum().backward()
        rows = []
        for e, (net, optimizer, train) in enumerate(zip(self.lock.nets, self.optimizers, self.trains)):
            clip = train.grad_clip if train.grad_clip > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            loss = losses[e].detach()
            bad = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            if self.deferred:
                optimizer.found_inf = bad
                optimizer.step()
            elif not bad:
                optimizer.step()
            rows.append(torch.stack([bad, loss.float(), norm.float()]))
        return torch.stack(rows)
