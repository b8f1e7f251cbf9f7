"""`dcablate run` as a user meets it: `--dry-run` says what the real command would do (refusals included) and
writes nothing; refusals say why; the results table says what its numbers are."""

import pytest
import torch

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.runs.directories import fresh_dir
from tests.training.test_train import tiny


def sweep_recipe(tmp_path):
    path = tmp_path / "s.toml"
    data = tiny(tmp_path).to_dict()
    data["sweep"] = {"model.conv.kind": ["none", "static"]}
    path.write_text(recipes.dumps_toml(data))
    return path


def test_a_changed_recipe_is_listed_as_refused_and_the_dry_run_fails(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--set", "train.steps=8"]) == 2
    captured = capsys.readouterr()
    for name in ("conv.kind=none", "conv.kind=static"):
        assert (f"{tmp_path / 't' / name}  (recipe " in captured.out and "refused: recipe changed since this run "
                "started (train.steps: 6 -> 8); a run is not trained on past" in captured.out)
    assert "2 runs: 2 refused\n" in captured.err
    assert captured.err.strip().splitlines()[-1] == \
        "error: 2 of 2 runs would be refused (listed above); nothing was written"
    assert main(["run", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("  finished") == 2 and captured.err == "2 runs: 2 finished\n"


def test_force_new_in_a_dry_run_says_where_it_would_write_and_writes_nothing(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    (tmp_path / "t").mkdir()
    assert main(["run", str(path), "--dry-run", "--force-new"]) == 0
    assert f"{tmp_path / 't'} exists; would write to {tmp_path / 't-2'}" in capsys.readouterr().out
    assert not (tmp_path / "t-2").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_and_the_dry_run_still_lists_the_plan(tmp_path, capsys):
    """Led by where the key was set: --set, the recipe file, or the sweep that sets it. The run stops before
    anything is read or written; a dry run (planning a GPU sweep on a laptop) lists the plan first and then
    refuses, exit 2, naming what the plan is."""
    path = sweep_recipe(tmp_path)
    line = "run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'"
    dry_tail = " (on this machine; the plan above is what one with that device would train)\n"
    assert main(["run", str(path), "--set", "run.device=cuda"]) == 2
    assert capsys.readouterr().err == f"error: --set: {line}\n"
    assert main(["run", str(path), "--dry-run", "--set", "run.device=cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count(f"{tmp_path / 't'}/conv.kind=") == 2
    assert captured.err.splitlines()[-1] == f"error: --set: {line}{dry_tail.rstrip()}"
    assert main(["run", str(path), "--dry-run", "--nproc", "2", "--set", "run.device=cuda"]) == 2  # torchrun's too
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --set: {line}{dry_tail.rstrip()}"
    assert main(["run", str(path), "--dry-run", "--set", 'sweep.run.device=["cpu", "cuda"]']) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --set: sweep.run.device: {line}{dry_tail.rstrip()}"
    data = tiny(tmp_path, run={"device": "cuda"}).to_dict()
    (tmp_path / "c.toml").write_text(recipes.dumps_toml(data))
    assert main(["run", str(tmp_path / "c.toml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'c.toml'}: {line}\n"
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_dry_run_missing_the_device_still_says_which_runs_would_be_refused(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--set", "train.steps=8", "--set", "run.device=cuda"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "(on this machine; the plan above is what one with that device would train); and 2 of 2 runs would be "
        "refused there too (listed above)")


def test_the_sweep_folder_refusal_says_how_to_resume_one_point(tmp_path, capsys):
    """A sweep's folder is not a single run's: the refusal (one line, also in a dry run) says how to resume the
    sweep, or one point of it."""
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    single = tmp_path / "single.toml"
    single.write_text(recipes.dumps_toml(tiny(tmp_path).to_dict()))  # run.name "t": the sweep's folder
    for dry in ([], ["--dry-run"]):
        assert main(["run", str(single), *dry]) == 2
        assert capsys.readouterr().err == f"error: {tmp_path / 't'}: holds the runs of a sweep, not a single run; to " \
            f"resume or extend that sweep run its recipe again (`dcablate run {tmp_path / 't'}/POINT` resumes one " \
            "point), or set another run.name or use --force-new for a fresh directory\n"


def test_force_new_on_a_point_trains_its_recipe_afresh_beside_the_sweep(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "t" / "conv.kind=none"), "--force-new", "--dry-run"]) == 0
    assert f"{tmp_path / 't'} exists; would write to {tmp_path / 't-2'}" in capsys.readouterr().out


def test_force_new_on_a_copy_writes_the_next_copy_not_a_copy_of_the_copy(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(tmp_path / "t" / "conv.kind=none"), "--force-new", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "t-2"), "--force-new", "--dry-run"]) == 0
    assert f"{tmp_path / 't-2'} exists; would write to {tmp_path / 't-3'}" in capsys.readouterr().out
    (tmp_path / "u-2").mkdir()  # numbered by its owner, with no `u` beside it: not a copy
    assert fresh_dir(tmp_path / "u-2") == tmp_path / "u-2-2"


def test_force_new_on_a_point_another_grid_left_out_still_writes_beside_the_sweep(tmp_path, capsys):
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet", "--set", 'sweep={"model.conv.kind"=["none", "dynamic"]}']) == 0
    assert (tmp_path / "t" / "points.txt").read_text() == "conv.kind=none\nconv.kind=dynamic\n"  # another grid
    capsys.readouterr()
    assert main(["run", str(tmp_path / "t" / "conv.kind=static"), "--force-new", "--dry-run"]) == 0
    assert f"{tmp_path / 't'} exists; would write to {tmp_path / 't-2'}" in capsys.readouterr().out


def test_a_rerun_that_names_a_point_otherwise_finds_the_run_its_folder_holds(tmp_path, capsys):
    """A narrower sweep that leaves out a zipped key names its points with fewer keys: each is still the run an
    earlier command trained (the same recipe), taken from that folder rather than trained again as a new one."""
    path = tmp_path / "s.toml"
    data = tiny(tmp_path).to_dict()
    data["sweep"] = {"model.conv.kind": ["none", "static"], "model.conv.placement": ["qkv", "qkv"],
                     "zip": [["model.conv.kind", "model.conv.placement"]]}
    path.write_text(recipes.dumps_toml(data))
    assert main(["run", str(path), "--quiet"]) == 0
    root = tmp_path / "t"
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/**/*") if p.is_file()}  # the runs' files
    capsys.readouterr()
    narrower = ["run", str(path), "--set", 'sweep={"model.conv.kind"=["none", "static"]}']
    assert main([*narrower, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "conv.kind=none: the same run as conv.kind=none,conv.placement=qkv (the same recipe)" in out
    assert "conv.kind=static: the same run as conv.kind=static,conv.placement=qkv" in out and "new" not in out
    assert main([*narrower, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, not retrained") == 2 and not (root / "conv.kind=none").exists()
    assert (root / "points.txt").read_text() == "conv.kind=none,conv.placement=qkv\nconv.kind=static,conv.placement=qkv\n"
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*/**/*") if p.is_file()}
    # keys a resume may change (checkpoints, logging) do not make it another run either
    capsys.readouterr()
    assert main([*narrower, "--dry-run", "--set", "checkpoint.every=3", "--set", "log.every=3"]) == 0
    assert "conv.kind=none: the same run as conv.kind=none,conv.placement=qkv" in capsys.readouterr().out


def test_best_lr_seeds_reads_the_cells_of_points_named_otherwise_and_a_rerun_is_no_narrower_one(tmp_path, capsys):
    """The second stage scores each cell from the folders its points' runs are in (a narrower sweep's points are
    runs that folders named otherwise hold); rerunning the same command is not a narrower rerun, though the
    second stage's points were added to points.txt."""
    path = tmp_path / "s.toml"
    data = tiny(tmp_path).to_dict()
    data["sweep"] = {"model.conv.kind": ["none", "static"], "model.conv.placement": ["qkv", "qkv"],
                     "train.lr": [1e-3, 3e-3], "best_lr_seeds": [7],
                     "zip": [["model.conv.kind", "model.conv.placement"]]}
    path.write_text(recipes.dumps_toml(data))
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet"]) == 0
    assert not (tmp_path / "t" / "commands.log").read_text().splitlines()[-1].endswith("points.txt kept)")
    capsys.readouterr()
    narrower = 'sweep={"model.conv.kind"=["none", "static"], "train.lr"=[1e-3, 3e-3], best_lr_seeds=[7]}'
    assert main(["run", str(path), "--quiet", "--set", narrower]) == 0
    out = capsys.readouterr().out
    assert "not decided yet" not in out and "2 cells" in out, out


def test_more_steps_for_a_trained_run_is_refused_and_the_refusal_says_why(tmp_path, capsys):
    """Training on past the planned steps would not be the run a longer recipe trains (its schedule is laid out
    over the steps): refused with the reason; another change is refused without it."""
    path = tmp_path / "r.toml"
    path.write_text(recipes.dumps_toml(tiny(tmp_path).to_dict()))
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--set", "train.steps=12"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 't'}: recipe changed since this run started (train.steps: 6 -> 12); a run is not "
        "trained on past its planned steps, since its learning-rate schedule is laid out over them; use "
        "--force-new to train it in a fresh directory\n")
    assert main(["run", str(path), "--set", "train.steps=3"]) == 2  # shorter: another schedule, not "past" it
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 't'}: recipe changed since this run started (train.steps: 6 -> 3); a run's "
        "learning-rate schedule is laid out over its planned steps and warm-up, so it is not trained on under "
        "another; use --force-new to train it in a fresh directory\n")
    assert main(["run", str(path), "--set", "train.lr=0.002"]) == 2
    assert "schedule" not in capsys.readouterr().err


def test_the_results_table_says_its_numbers_are_the_final_evaluation(tmp_path, capsys):
    assert main(["run", str(sweep_recipe(tmp_path)), "--quiet"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("run "):out.index("run directory:")]
    assert "conv.kind=none" in table and "conv.kind=static" in table
    assert table.rstrip().endswith("(each run's final evaluation; `dcablate report` scores each run by its best "
                                   "evaluation, summary.json `best`)")


def test_a_sweep_folder_keeps_the_commands_that_trained_into_it(tmp_path, capsys, monkeypatch):
    """Its points' recipes hold every resolved key, not the recipe and --sets that made the grid: commands.log
    keeps each command line (not a dry run's, nor one that failed before any run wrote a file), and running the
    folder says how it was last run."""
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--dry-run"]) == 0
    assert not (tmp_path / "t").exists()
    assert main(["run", str(path), "--quiet", "--set", "train.lr=0.002"]) == 0
    assert main(["run", str(path), "--quiet", "--set", "train.lr=0.002"]) == 0  # finished: a line all the same
    lines = (tmp_path / "t" / "commands.log").read_text().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1:] == [str(tmp_path), f"dcablate run {path} --quiet --set "
                                                             f"train.lr=0.002"] for line in lines)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "t")]) == 2
    assert (f"the run directory of a sweep, not a recipe; give the sweep's recipe (last run as `dcablate run "
            f"{path} --quiet --set train.lr=0.002` (in {tmp_path})) or one point's folder") in \
        capsys.readouterr().err


def test_a_report_of_an_interrupted_sweep_names_the_points_not_started(tmp_path, capsys, monkeypatch):
    """The sweep folder's points.txt holds the points its last command planned; a point with no run yet (the
    sweep was stopped before it started) is counted in the report's first line and listed with the command that
    trains it."""
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    root = tmp_path / "t"
    assert (root / "points.txt").read_text() == "conv.kind=none\nconv.kind=static\n"
    import shutil

    shutil.rmtree(root / "conv.kind=static")  # as if the sweep had stopped before this point started
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert "1 finished run, 0 unfinished, 1 not started (of the grid's points, `points.txt`)." in md
    assert "The sweep has not finished" in md
    not_started = md.split("## Not started")[1]
    assert f"- `{root}`: 1 point (`conv.kind=static`); `dcablate run {path} --quiet` (in {tmp_path}) trains them" \
        in not_started
    # a narrower rerun (one point) keeps the grid's points, and the report still names the command of the grid
    narrower = ["run", str(path), "--quiet", "--set", 'sweep={"model.conv.kind"=["none"]}']
    assert main(narrower) == 0 and main(["report", str(root)]) == 0
    assert (root / "points.txt").read_text() == "conv.kind=none\nconv.kind=static\n"
    assert (root / "commands.log").read_text().splitlines()[-1].endswith(
        "\t(some of the grid's points: points.txt kept)")
    md = (root / "report.md").read_text()
    assert "1 not started" in md and f"`dcablate run {path} --quiet` (in {tmp_path}) trains them" in md
    assert main(["run", str(path), "--quiet"]) == 0 and main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert "not started" not in md and "## Not started" not in md


def test_a_changed_recipe_that_a_force_new_copy_holds_is_pointed_there_and_goes_on_under_its_name(tmp_path, capsys):
    """After `--force-new` trained a changed sweep into `t-2`, the same command without it names `t-2` and the
    run.name that goes on there (the copy's recipes keep run.name "t", which only says where a run lives)."""
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet", "--set", "train.lr=2e-3", "--force-new"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--quiet", "--set", "train.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 't-2' / 'conv.kind=none'} holds this recipe already (an earlier --force-new): add --set " \
           "run.name='t-2' to go on there, or use --force-new" in err, err
    assert main(["run", str(path), "--quiet", "--set", "train.lr=2e-3", "--set", "run.name=t-2"]) == 0
    assert capsys.readouterr().out.count("finished earlier, not retrained") == 2
    assert not (tmp_path / "t-3").exists()


def test_a_missing_data_path_is_the_error_not_the_recipe_change_it_causes(tmp_path, capsys, monkeypatch):
    """A --set pointing the runs of a trained sweep at text that does not exist: the path is what to fix (a fresh
    directory would fail on it too), so it is the error, with or without --dry-run, rather than a refusal
    suggesting --force-new."""
    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    for dry in (["--dry-run"], []):
        assert main(["run", str(path), *dry, "--set", "task.kind=lm", "--set", "task.lm.data=nowhere.txt"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1] == (
            f"error: --set: task.lm.data: {tmp_path / 'nowhere.txt'}: no such file or folder; point it at a "
            f".txt/.jsonl/.parquet file, a folder of them or a glob")
        assert "refused" not in err and "--force-new" not in err


def test_a_run_another_process_is_training_is_refused_at_planning_and_no_command_is_logged(tmp_path, capsys,
                                                                                           monkeypatch):
    """A point left to resume whose run directory another process holds (`.lock`): the dry run lists it as
    refused, as the real command refuses it before anything trains; refused commands (that one, a changed
    recipe) leave no line in commands.log; once the lock is free the sweep resumes and logs its command."""
    import fcntl

    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    point = tmp_path / "t" / "conv.kind=static"
    (point / "summary.json").unlink()  # unfinished now: to resume
    log = tmp_path / "t" / "commands.log"
    logged = log.read_text()
    capsys.readouterr()
    with open(point / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert main(["run", str(path), "--dry-run"]) == 2
        out = capsys.readouterr().out
        assert f"{point}  (recipe " in out and "refused: another dcablate process (pid 4242) is writing to this run " \
                                               "directory" in out
        assert main(["run", str(path), "--quiet"]) == 2
        assert capsys.readouterr().err == f"error: {point}: another dcablate process (pid 4242) is writing to " \
                                          f"this run directory\n"
    assert main(["run", str(path), "--quiet", "--set", "train.steps=8"]) == 2  # recipe changed: refused
    assert log.read_text() == logged
    assert main(["run", str(path), "--quiet"]) == 0
    assert (point / "summary.json").is_file() and len(log.read_text().splitlines()) == len(logged.splitlines()) + 1


def test_a_change_no_run_reads_neither_refuses_nor_retrains(tmp_path, capsys, monkeypatch):
    """A changed key that the run does not read (the section of a mixer it does not use) trains the same run: the
    finished sweep stays finished, and a run stopped at a step checkpoint resumes from it; a key it reads is still a
    changed recipe."""
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", "--set", "model.gated_deltanet.expand_v=2.0"]) == 0
    assert capsys.readouterr().out.count("  finished") == 2
    assert main(["run", str(path), "--dry-run", "--set", "train.lr=0.005"]) == 2
    assert "recipe changed since this run started (train.lr" in capsys.readouterr().out
    from dcablate.training.checkpoint import read_changes

    r = recipes.load(str(path))
    unused = recipes.load(str(path), ["model.gated_deltanet.expand_v=2.0"])
    assert read_changes(r.to_dict(), unused) == []  # a checkpoint's recipe, as a dict
    assert read_changes(r.to_dict(), recipes.load(str(path), ["train.lr=0.005"])) == ["train.lr: 0.001 -> 0.005"]


def test_where_a_finished_run_trained_is_no_change(tmp_path, capsys, monkeypatch):
    """A sweep trained with `run.device = "cuda"` is finished under "auto" or "cpu" too (the report counts such runs
    as one run: `variants.PLACE`), so a second stage can be planned on another machine; an unfinished run's
    device is still a change, even "auto" on a machine with a GPU: a cluster launcher plans on one machine and
    trains on another, where "auto" may name another device."""
    from dcablate.training import checkpoint

    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    for point in (tmp_path / "t").glob("conv.kind=*"):  # as if trained on a GPU machine
        recipe = point / "recipe.toml"
        recipe.write_text(recipe.read_text().replace('device = "auto"', 'device = "cuda"'))
        assert 'device = "cuda"' in recipe.read_text()
    capsys.readouterr()
    for device in ("auto", "cpu"):
        assert main(["run", str(path), "--dry-run", "--set", f"run.device={device}"]) == 0
        assert capsys.readouterr().out.count("  finished") == 2
    r = recipes.load(str(path))
    on_cuda = recipes.load(str(path), ["run.device=cpu"]).to_dict()
    on_cuda["run"]["device"] = "cuda"
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        assert checkpoint.read_changes(on_cuda, r) == ['run.device: "cuda" -> "auto"']


@pytest.mark.parametrize("tensorboard", [True, False])
def test_the_tensorboard_command_is_offered_only_for_runs_that_logged_there(tmp_path, capsys, tensorboard):
    """`log.tensorboard = false` writes no tb/ folder: neither the run's last line nor the report offers
    `tensorboard --logdir` then."""
    path = tmp_path / "s.toml"
    path.write_text(recipes.dumps_toml(tiny(tmp_path, log={"tensorboard": tensorboard}).to_dict()))
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path / 't'}" in out and ("tensorboard --logdir" in out) == tensorboard
    assert main(["report", str(tmp_path / "t")]) == 0
    assert ("tensorboard --logdir" in (tmp_path / "t" / "report.md").read_text()) == tensorboard


def test_the_dry_run_says_from_which_step_each_run_resumes(tmp_path, capsys, monkeypatch):
    """A run left with a step checkpoint resumes from its newest intact one, one without a checkpoint starts over:
    the dry run says which, as the worker's stop line does."""
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    keep = ("--set", "checkpoint.every=2", "--set", "checkpoint.keep=3")
    assert main(["run", str(path), "--quiet", *keep]) == 0
    root = tmp_path / "t"
    kept, bare = root / "conv.kind=none", root / "conv.kind=static"
    for point in (kept, bare):
        (point / "summary.json").unlink()  # unfinished now: to resume
    saved = sorted((kept / "checkpoints").glob("step-*.pt"))
    assert len(saved) >= 3
    saved[-1].unlink()
    saved[-2].write_bytes(saved[-2].read_bytes()[:100])  # torn: its checksum fails, so the run takes the one before
    newest_left = int(saved[-3].stem.removeprefix("step-"))
    for file in (bare / "checkpoints").glob("step-*.pt"):
        file.unlink()
    capsys.readouterr()
    assert main(["run", str(path), "--dry-run", *keep]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[-1] for line in lines] == [f"resume from step {newest_left}",
                                                         "resume (no checkpoint yet: starts over)"]


def test_force_new_on_a_points_folder_from_another_folder_writes_beside_the_sweep(tmp_path, capsys, monkeypatch):
    """`dcablate run POINT_DIR --force-new` from another folder trains the fresh copy where it does from the sweep's
    own folder (`t-2` beside the sweep `t`), not under the working folder; the results row names that folder."""
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    point = tmp_path / "t" / "conv.kind=static"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["run", str(point), "--force-new", "--quiet"]) == 0
    out = capsys.readouterr().out
    copy = tmp_path / "t-2"
    assert f"{tmp_path / 't'} exists; writing to {copy}" in out and (copy / "summary.json").is_file()
    assert list(elsewhere.iterdir()) == []
    assert any(line.startswith("t-2 ") for line in out.splitlines()), out
    for cwd, given in ((tmp_path / "t", "conv.kind=none"), (tmp_path / "t" / "conv.kind=static", "../conv.kind=none")):
        monkeypatch.chdir(cwd)  # the point named from inside the sweep's folder, or from a sibling point
        assert main(["run", given, "--force-new", "--dry-run"]) == 0
        assert f"{tmp_path / 't'} exists; would write to {tmp_path / 't-3'}" in capsys.readouterr().out


def test_the_results_table_is_in_sweep_order_though_resumed_runs_train_first(tmp_path, capsys, monkeypatch):
    path = sweep_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--quiet", "--set", "checkpoint.every=2"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "t" / "conv.kind=none")  # new now
    (tmp_path / "t" / "conv.kind=static" / "summary.json").unlink()  # to resume: it trains first
    capsys.readouterr()
    assert main(["run", str(path), "--set", "checkpoint.every=2"]) == 0
    out = capsys.readouterr().out
    assert out.index("[1/2] conv.kind=static") < out.index("[2/2] conv.kind=none")
    table = out[out.index("\nrun "):]
    assert table.index("\nconv.kind=none ") < table.index("\nconv.kind=static ")


def test_a_sweeps_points_are_taken_in_the_order_of_its_points_file(tmp_path):
    """`dcablate eval SWEEP_DIR` goes through the points as the grid lists them (points.txt), not by name; points the
    file does not list come after, by name."""
    from dcablate.cli import in_sweep_order

    (tmp_path / "points.txt").write_text("conv.kind=static\nconv.kind=none\n")
    points = [tmp_path / n for n in ("conv.kind=none", "conv.kind=static", "extra")]
    assert [p.name for p in in_sweep_order(tmp_path, points)] == ["conv.kind=static", "conv.kind=none", "extra"]
    (tmp_path / "points.txt").unlink()
    assert [p.name for p in in_sweep_order(tmp_path, points)] == ["conv.kind=none", "conv.kind=static", "extra"]


def test_a_run_that_stopped_before_its_first_step_takes_the_fixed_recipe(tmp_path, capsys):
    """An attempt that failed before any step (failed.json at step 0, no checkpoint: a data file too small for the
    recipe, say) trained nothing, so the recipe its error asks for starts the run over in its folder; once a
    checkpoint exists, a changed recipe is refused as before."""
    import json

    path = tmp_path / "r.toml"
    path.write_text(recipes.dumps_toml(tiny(tmp_path).to_dict()))
    run = tmp_path / "t"
    run.mkdir()
    (run / "recipe.toml").write_text(recipes.dumps_toml(tiny(tmp_path, train={"steps": 4}).to_dict()))
    (run / "failed.json").write_text(json.dumps({"error": "task.lm: too little text", "step": 0, "diverged": False}))
    assert main(["run", str(path), "--quiet", "--dry-run"]) == 0  # said as what would happen; nothing written
    assert "stopped before its first step; it would start over with this recipe" in capsys.readouterr().err
    assert (run / "failed.json").is_file() and recipes.load(str(run / "recipe.toml")).train.steps == 4
    assert main(["run", str(path), "--quiet"]) == 0
    assert "its last attempt stopped before its first step; starting it over with this recipe (train.steps: 4 -> 6)" \
        in capsys.readouterr().err
    assert (run / "summary.json").is_file() and not (run / "failed.json").exists()
    assert recipes.load(str(run / "recipe.toml")).train.steps == 6
    (run / "summary.json").unlink()
    (run / "failed.json").write_text(json.dumps({"error": "later", "step": 0, "diverged": False}))
    assert main(["run", str(path), "--quiet", "--set", "train.steps=8"]) == 2  # it has checkpoints: refused
    assert "recipe changed since this run started" in capsys.readouterr().err


def test_a_force_new_copy_is_resumed_by_the_command_its_advice_names(tmp_path, capsys, monkeypatch):
    """After --force-new made `t-2`, "the same command" would make `t-3`: the sweep's commands.log (which a report's
    advice and a folder's error quote) and the resume advice name the command that goes on in `t-2` instead; run
    again, it finds every point finished there."""
    from dcablate.runs.directories import last_command, same_command

    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet", "--force-new", "--set", "train.steps=6"]) == 0
    want = f"dcablate run {path} --quiet --set train.steps=6 --set 'run.name=\"t-2\"'"
    assert same_command() == f"`{want}`"
    assert last_command(tmp_path / "t-2").startswith(f"`{want}` (in ")
    capsys.readouterr()
    argv = ["run", str(path), "--quiet", "--set", "train.steps=6", "--set", 'run.name="t-2"']
    assert main(argv) == 0
    assert not (tmp_path / "t-3").exists() and same_command() == "the same command"
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "2 runs: 2 finished" in capsys.readouterr().err

    # a single run's copy goes on as its own directory, which holds its recipe and --set values
    single = tmp_path / "one.toml"
    single.write_text(recipes.dumps_toml(tiny(tmp_path, run={"name": "one"}).to_dict()))
    assert main(["run", str(single), "--quiet"]) == 0
    assert main(["run", str(single), "--quiet", "--force-new", "--set", "train.steps=6"]) == 0
    assert same_command() == f"`dcablate run {tmp_path / 'one-2'} --quiet`"


def test_force_new_on_a_name_not_taken_names_that_folder_in_its_advice(tmp_path):
    """--force-new where nothing exists yet trains into the name itself; run again, it would make a copy, so the
    advice names the command that goes on in the folder it trains now."""
    from dcablate.runs.directories import same_command

    path = sweep_recipe(tmp_path)
    assert main(["run", str(path), "--quiet", "--force-new"]) == 0
    assert same_command() == f"`dcablate run {path} --quiet --set 'run.name=\"t\"'`"
    assert not (tmp_path / "t-2").exists()
