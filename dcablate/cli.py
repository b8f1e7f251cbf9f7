"""`dcablate` command line: run, eval, info, recipes.

Every user mistake ends as one line on stderr and exit code 2 (see `main`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from . import recipe as recipes
from .errors import UserError
from .tables import format_table

SET_HELP = "Override a recipe key, e.g. --set train.lr=3e-3 (value parsed as TOML; repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcablate")
def cli():
    """Architecture ablations on linear RNNs and MoE models with static and dynamic short convolutions."""


def fresh_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it exists: a new run never overwrites an old one."""
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Validate and list the runs without training.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(recipe, overrides, dry_run, quiet):
    """Train RECIPE (a path or the name of a shipped recipe); a [sweep] trains one run per grid point."""
    base, points = recipes.expand(recipe, list(overrides))
    root = Path(base.run.out_dir) / base.run.name
    if dry_run:
        for name, r in points:
            click.echo(f"{root / name if name else root}  (recipe {r.digest()})")
        return
    from .train import check_runtime, train  # torch import deferred so --help and validation stay fast

    for _, r in points:  # device and backend problems end the command before anything is written
        check_runtime(r)
    root = fresh_dir(root)
    try:
        root.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"run.out_dir: cannot create {root}: {e.strerror}") from None
    if root.name != base.run.name:
        click.echo(f"{root.parent / base.run.name} exists; writing to {root}")

    rows = []
    for i, (name, r) in enumerate(points):
        run_dir = root / name if name else root
        if len(points) > 1:
            click.echo(f"[{i + 1}/{len(points)}] {name}")
        summary = train(r, run_dir, quiet=quiet)
        rows.append(result_row(name or r.run.name, summary))
        click.echo(f"  -> {run_dir}  overall {summary['final'].get('overall', float('nan')):.3f} "
                   f"in {summary['wall_time_s']:.1f}s")
    click.echo("")
    click.echo(format_table(rows))
    click.echo(f"\nrun directory: {root}   (tensorboard --logdir {root})")


def result_row(name: str, summary: dict) -> dict:
    final = summary["final"]
    row = {"run": name, "params": summary["params"]["total"], "steps": summary["steps"],
           "time_s": summary["wall_time_s"]}
    row.update({k: v for k, v in final.items() if k not in ("step", "loss", "overall")})
    row["overall"] = final.get("overall")
    return row


@cli.command(name="eval")
@click.option("--task", "task_kind", type=click.Choice(["mqar"]), required=True, help="What to measure.")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path), help="A finished run directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help=SET_HELP + " E.g. --set 'task.mqar.test=[{seq_len=256, num_kv_pairs=16, num_examples=500}]'.")
def eval_(task_kind, run_dir, overrides):
    """Reload a run's final checkpoint and evaluate it; writes RUN/eval/<task>.json."""
    recipe_path = run_dir / "recipe.toml"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not recipe_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.toml)")
    r = recipes.load(str(recipe_path), list(overrides))
    if r.task.kind != task_kind:
        raise UserError(f"--task {task_kind}: this run was trained on task.kind = '{r.task.kind}'")

    from . import checkpoint
    from .info import build_model
    from .tasks import build_task
    from .train import autocast_for, resolve_device

    state = checkpoint.load(run_dir / "checkpoints" / "final.pt")
    device = resolve_device(r.run.device)
    task = build_task(r.task, train=False)
    model = build_model(r, state["vocab_size"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{run_dir}: checkpoint does not fit the recipe's model ({first})") from None
    model.to(device)
    metrics = task.evaluate(model, device, r.eval.batch_size, autocast_for(device, r.train.precision))
    out = run_dir / "eval" / f"{task_kind}.json"
    out.parent.mkdir(exist_ok=True)
    segments = [{"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs, "num_examples": s.num_examples}
                for s in task.test_segments]
    out.write_text(json.dumps({"task": task_kind, "step": state["step"], "segments": segments,
                               "overrides": list(overrides), "metrics": metrics}, indent=2) + "\n")
    click.echo(format_table([{"segment": k, "accuracy": v} for k, v in metrics.items() if k != "loss"]))
    click.echo(f"loss {metrics['loss']:.4f}   written to {out}")


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def info(recipe, overrides):
    """Parameters per component, recurrent-state size and FLOPs per token of RECIPE's model."""
    from .info import build_model, costs, human

    base, points = recipes.expand(recipe, list(overrides))
    for name, r in points:
        q = r.task.mqar
        seq_len = max(s.seq_len for s in q.train + q.test)
        model = build_model(r, q.vocab_size, device="meta")
        c = costs(model, seq_len)
        title = f"{r.run.name}{' / ' + name if name else ''}: {r.model.mixer}, conv={r.model.conv.kind}, " \
                f"d_model={r.model.d_model}, n_layers={r.model.n_layers}"
        click.echo(title)
        click.echo(format_table([{"component": k, "parameters": f"{v:,}"} for k, v in c.params.items()]))
        click.echo(f"recurrent state per sequence at T={seq_len}: {human(c.state_floats)} floats "
                   f"({human(2 * c.state_floats)}B in bf16)")
        click.echo(f"forward FLOPs per token: {human(c.flops_per_token)} (blocks) + "
                   f"{human(c.head_flops_per_token)} (LM head, per scored token); training ~3x\n")


@cli.command(name="recipes")
def list_recipes():
    """List the recipes shipped with dcablate (run one by name: dcablate run NAME)."""
    rows = []
    for name, path in recipes.shipped_recipes().items():
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        rows.append({"name": name, "what": first.lstrip("# ").strip()})
    click.echo(format_table(rows))


def main(argv=None) -> int:
    """Entry point: user errors become one line and exit 2."""
    try:
        cli.main(args=argv, prog_name="dcablate", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.NoArgsIsHelpError as e:  # plain `dcablate`: the help, not an error
        click.echo(e.ctx.get_help())
        return 0
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
