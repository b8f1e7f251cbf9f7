"""Zipped sweep axes, and a tiny real sweep end to end on CPU: dry run, train, rerun skips, report."""

from __future__ import annotations

import csv
import tomllib

import pytest

from dcablate import config as R
from dcablate.cli import main
from dcablate.errors import RecipeError


def write(path, text):
    path.write_text(text)
    return path


ZIPPED = """
[sweep]
"model.conv.kind" = ["none", "static"]
"train.lr" = [1e-3, 3e-3, 1e-2]
"model.d_model" = [64, 128, 256]
"run.seed" = [0, 1]
zip = [["train.lr", "model.d_model"]]
"""


def test_zipped_axes_advance_together(tmp_path):
    base, points = R.expand(str(write(tmp_path / "z.toml", ZIPPED)))
    assert base.sweep["zip"] == [["train.lr", "model.d_model"]]
    assert len(points) == 2 * 3 * 2  # conv x (lr, d_model) x seed
    assert [n for n, _ in points[:3]] == ["conv.kind=none,lr=0.001,d_model=64,seed=0",
                                          "conv.kind=none,lr=0.001,d_model=64,seed=1",
                                          "conv.kind=none,lr=0.003,d_model=128,seed=0"]
    assert {(r.train.lr, r.model.d_model) for _, r in points} == {(1e-3, 64), (3e-3, 128), (1e-2, 256)}
    assert all(r.sweep == {} for _, r in points)
    assert R.build(tomllib.loads(base.to_toml())).sweep == base.sweep  # round trip keeps the zip


def test_points_that_would_train_the_same_run_train_once(tmp_path, caplog):
    """A mixer's option swept beside the mixers: the attention points do not read it, so they would train the
    same run once per value (and count as that many runs in the report); each trains once, under the first
    point's name, with a note. Likewise a conv key that one kind reads and another does not."""
    path = write(tmp_path / "m.toml", '[sweep]\n"model.mixer" = ["attention", "gated_deltanet"]\n'
                                      '"model.gated_deltanet.expand_v" = [1.0, 2.0]\n')
    with caplog.at_level("WARNING", logger="dcablate"):
        _, points = R.expand(str(path))
    assert [n for n, _ in points] == ["mixer=attention,gated_deltanet.expand_v=1.0",
                                      "mixer=gated_deltanet,gated_deltanet.expand_v=1.0",
                                      "mixer=gated_deltanet,gated_deltanet.expand_v=2.0"]
    assert "left out mixer=attention,gated_deltanet.expand_v=2.0 (as mixer=attention,gated_deltanet.expand_v=1.0)" \
        in caplog.text
    path = write(tmp_path / "c.toml", '[sweep]\n"model.conv.kind" = ["none", "static", "dynamic"]\n'
                                      '"model.conv.rank" = [4, 8]\n"run.seed" = [0, 1]\n')
    _, points = R.expand(str(path))
    kinds = [(r.model.conv.kind, r.model.conv.rank, r.run.seed) for _, r in points]
    assert kinds == [("none", 4, 0), ("none", 4, 1), ("static", 4, 0), ("static", 4, 1),
                     ("dynamic", 4, 0), ("dynamic", 4, 1), ("dynamic", 8, 0), ("dynamic", 8, 1)]  # seeds stay
    assert R.effective(points[0][1]) != R.effective(points[2][1])
    assert "gated_deltanet" not in R.effective(points[0][1])["model"]  # attention's run reads no such section


def test_model_keys_a_mixer_does_not_read_make_no_new_run(tmp_path, caplog):
    """Mamba-2 sizes its heads in its own section, so `model.n_heads` swept beside the mixers makes new runs of
    attention only; a hybrid with attention reads it. A channel mixer `none` reads no `model.ffn_hidden`."""
    path = write(tmp_path / "m.toml", '[sweep]\n"model.mixer" = ["mamba2", "attention"]\n"model.n_heads" = [2, 4]\n')
    with caplog.at_level("WARNING", logger="dcablate"):
        _, points = R.expand(str(path))
    assert [n for n, _ in points] == ["mixer=mamba2,n_heads=2", "mixer=attention,n_heads=2",
                                      "mixer=attention,n_heads=4"]
    assert "left out mixer=mamba2,n_heads=4 (as mixer=mamba2,n_heads=2)" in caplog.text
    path = write(tmp_path / "h.toml", '[model]\nmixer = ["mamba2", "attention"]\n[sweep]\n"model.n_heads" = [2, 4]\n')
    assert len(R.expand(str(path))[1]) == 2
    path = write(tmp_path / "f.toml", '[sweep]\n"model.ffn" = ["none", "mlp"]\n"model.ffn_hidden" = [64, 128]\n')
    assert [n for n, _ in R.expand(str(path))[1]] == ["ffn=none,ffn_hidden=64", "ffn=mlp,ffn_hidden=64",
                                                      "ffn=mlp,ffn_hidden=128"]
    mamba = R.build({"model": {"mixer": "mamba2", "d_model": 30, "n_heads": 4, "mamba2": {"head_dim": 10}}})
    assert "n_heads" not in R.effective(mamba)["model"]  # and d_model 30 with 4 heads is no contradiction for it


def test_a_mixer_that_is_a_conv_reads_the_conv_keys_without_a_conv_kind(tmp_path):
    """short_conv builds a static conv where model.conv.kind is none, so with it in the model the conv's width is
    read even at kind none: those points are different runs, neither left out as repeats nor refused as an axis
    that changes nothing."""
    path = write(tmp_path / "s.toml", '[model]\nmixer = ["short_conv", "gated_deltanet"]\n[sweep]\n'
                                      '"model.conv.kind" = ["none", "dynamic"]\n"model.conv.width" = [2, 4]\n')
    _, points = R.expand(str(path))
    assert [(r.model.conv.kind, r.model.conv.width) for _, r in points] == [
        ("none", 2), ("none", 4), ("dynamic", 2), ("dynamic", 4)]
    path = write(tmp_path / "w.toml", '[model]\nmixer = ["short_conv", "attention"]\n[sweep]\n'
                                      '"model.conv.width" = [2, 4]\n')
    assert len(R.expand(str(path))[1]) == 2
    # its own conv sits on its stream at any placement: at kind none, placement is read by nothing
    path = write(tmp_path / "p.toml", '[model]\nmixer = "short_conv"\n[sweep]\n'
                                      '"model.conv.kind" = ["none", "static"]\n'
                                      '"model.conv.placement" = ["qkv", "all_linear"]\n')
    assert [n for n, _ in R.expand(str(path))[1]] == [
        "conv.kind=none,conv.placement=qkv", "conv.kind=static,conv.placement=qkv",
        "conv.kind=static,conv.placement=all_linear"]


def test_point_names_of_tables_in_lists_and_of_paths_are_one_plain_folder(tmp_path):
    """A list of tables swept (`task.mqar.test`) names each table by its key-value pairs, not Python's repr with
    braces, quotes and spaces; a path's `/` would make nested folders, so it is written `_`."""
    from dcablate.config.sweep import name_parts

    tests = [{"seq_len": 64, "num_kv_pairs": 4}]
    assert name_parts("task.mqar.test", tests) == ["mqar.test=seq_len-64_num_kv_pairs-4"]
    assert name_parts("task.lm.data", "data/a") == ["lm.data=data_a"]
    path = write(tmp_path / "t.toml", '[sweep]\n"task.mqar.test" = [[{seq_len = 32, num_kv_pairs = 4}], '
                                      '[{seq_len = 64, num_kv_pairs = 4}]]\n')
    names = [n for n, _ in R.expand(str(path))[1]]
    assert names == ["mqar.test=seq_len-32_num_kv_pairs-4", "mqar.test=seq_len-64_num_kv_pairs-4"]
    assert not any(c in n for n in names for c in " '{}/")


def test_zip_from_set_and_as_nested_table(tmp_path):
    path = write(tmp_path / "r.toml", '[sweep.model]\nd_model = [64, 96]\nn_heads = [2, 3]\n')
    with pytest.raises(RecipeError):  # n_heads 3 alone does not divide the base d_model
        R.expand(str(path))
    _, points = R.expand(str(path), ['sweep.zip=[["model.d_model", "model.n_heads"]]'])
    assert [n for n, _ in points] == ["d_model=64,n_heads=2", "d_model=96,n_heads=3"]  # checked jointly


@pytest.mark.parametrize("zip_value, fragment", [
    ('[["train.lr", "model.d_model"]]', "equal length"),
    ('[["train.lr"]]', "at least two keys"),
    ('[["train.lr", "model.d_modle"]]', "is not a key of [sweep] (did you mean 'model.d_model'?)"),
    ('[["model.d_model", "run.seed"], ["run.seed", "model.d_model"]]', "in two zip groups"),
    ('["train.lr", "model.d_model"]', "must be a list of lists"),
], ids=["lengths", "one-key", "unknown", "twice", "flat"])
def test_zip_errors_are_one_line(tmp_path, zip_value, fragment):
    text = f'[sweep]\n"train.lr" = [1e-3, 3e-3]\n"model.d_model" = [64]\n"run.seed" = [0]\nzip = {zip_value}\n'
    with pytest.raises(RecipeError) as e:
        R.expand(str(write(tmp_path / "r.toml", text)))
    assert e.value.key == "sweep.zip" and fragment in str(e.value) and "\n" not in str(e.value)


def test_zipped_point_error_names_both_values(tmp_path):
    text = '[sweep]\n"model.d_model" = [64, 65]\n"train.lr" = [1e-3, 2e-3]\nzip = [["model.d_model", "train.lr"]]\n'
    with pytest.raises(RecipeError) as e:
        R.expand(str(write(tmp_path / "r.toml", text)))
    assert e.value.key == "sweep.zip" and "model.d_model=65, train.lr=0.002" in str(e.value)


def hparams_session(run_dir) -> dict:
    """The hparams a run logged for TensorBoard's HPARAMS tab (its session_start_info)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    for path in (run_dir / "tb").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    raise AssertionError(f"{run_dir}: no hparams session")


TINY = """\
[run]
name = "s"
out_dir = "out"
device = "cpu"
[model]
mixer = "attention"
n_heads = 2
[task.mqar]
vocab_size = 64
train = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 128 }]
test = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 16 }, { seq_len = 32, num_kv_pairs = 4, num_examples = 8 }]
[train]
steps = 4
batch_size = 8
warmup_steps = 1
[eval]
every = 2
[log]
progress = false
[sweep]
"model.conv.kind" = ["none", "static"]
"model.d_model" = [16, 32]
"train.lr" = [1e-3, 3e-3]
zip = [["model.d_model", "train.lr"]]
"""


def test_tiny_sweep_end_to_end_then_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "s.toml", TINY)
    assert main(["run", "s.toml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("out/s/conv.kind=none,d_model=16,lr=0.001  (recipe ")

    assert main(["run", "s.toml", "--quiet"]) == 0
    root = tmp_path / "out" / "s"
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())  # the points (not commands.log, points.txt)
    assert runs == ["conv.kind=none,d_model=16,lr=0.001", "conv.kind=none,d_model=32,lr=0.003",
                    "conv.kind=static,d_model=16,lr=0.001", "conv.kind=static,d_model=32,lr=0.003"]
    capsys.readouterr()
    # a rerun trains nothing; --dry-run says every point is finished
    assert main(["run", "s.toml", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("finished") == 4
    assert main(["run", "s.toml", "--quiet"]) == 0
    assert capsys.readouterr().out.count("finished earlier, not retrained") == 4

    # TensorBoard's hparams view: every run wrote an hparams session with its grid values
    for run in (p for p in root.iterdir() if p.is_dir()):
        assert hparams_session(run)["model.conv.kind"] == run.name.split(",")[0].split("=")[1]

    assert main(["report", str(root)]) == 0
    with open(root / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"attention conv=none", "attention conv=static@qkv"}
    assert all(r["best_lr"] == "True" and r["seeds"] == "1" for r in rows)  # one lr per width (zipped)
    assert {"T16_kv2_mean", "T32_kv4_mean"} <= set(rows[0])
    for name in ("report.md", "accuracy_vs_d_model.png", "accuracy_vs_state.png", "validation_curves.png"):
        assert (root / name).is_file()
    # the report's files do not confuse a later run of the sweep
    assert main(["run", "s.toml", "--dry-run"]) == 0
