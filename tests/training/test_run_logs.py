"""What a run shows and logs (issue 23): plain progress lines when its output is not a terminal, the bar on
a terminal labelled with the sweep point, TensorBoard hyperparameters in the run's own log from its start
(only the keys that apply), and the tokens, step-time and memory scalars."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2

from dcablate import config as recipes
from dcablate.training.hparams import applicable
from dcablate.training.progress import Progress, clock, si
from tests.tiny_recipes import run_cli, setup_dir, tiny_mqar

ROOT = Path(__file__).resolve().parents[2]


def hparams_of(tb: Path) -> dict:
    """The hyperparameters a TensorBoard log holds (its session start), by key."""
    acc = EventAccumulator(str(tb))
    acc.Reload()
    content = acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: v.string_value if v.HasField("string_value") else v.number_value for k, v in values.items()}


# ----------------------------------------------------------------------------------------- progress


def test_output_to_a_file_gets_plain_lines_labelled_with_the_sweep_point(tmp_path):
    """`dcablate run` with stdout and stderr in files: no carriage return anywhere, periodic step lines with
    loss, lr, tokens/s, elapsed and ETA, a line per evaluation, each labelled with its sweep point."""
    text = tiny_mqar(train={"steps": 60}, eval={"every": 20}, log={"every": 2, "progress": True},
                     sweep={"model.conv.kind": ["none", "static"]})
    cwd = setup_dir(tmp_path, text)
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        rc = subprocess.run([sys.executable, "-m", "dcablate.cli", "run", "r.toml"], cwd=cwd, stdout=out, stderr=err,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert rc == 0, stderr
    assert "\r" not in stdout and "\r" not in stderr and stderr == ""
    for point in ("conv.kind=none", "conv.kind=static"):
        steps = [int(m) for m in re.findall(rf"^{re.escape(point)}  step (\d+)/60 \(\d+%\)  loss \d\.\d{{4}}  "
                                            r"lr \S+  \S+ tok/s  elapsed \d:\d\d:\d\d  eta \d:\d\d:\d\d$",
                                            stdout, flags=re.M)]
        assert steps[0] == 2 and steps[-1] == 60 and steps == sorted(set(steps)) and 15 <= len(steps) <= 31, steps
        evals = re.findall(rf"^{re.escape(point)}  eval at step (\d+): overall \d\.\d{{4}}  T16_kv2 \S+  loss \S+$",
                           stdout, flags=re.M)
        assert evals == ["20", "40", "60"]
    assert len(stdout) < 8000


def test_lines_come_about_twenty_times_a_run():
    """Logged every step, a 1000-step run prints its first step, every 50th and the last: not 1000 lines."""
    lines = []
    progress = Progress("p", total=1000, terminal=False)
    progress.echo = lines.append
    for step in range(1, 1001):
        progress.train(step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 5e4})
    steps = [int(re.match(r"step (\d+)/", line).group(1)) for line in lines]
    assert steps == [1] + list(range(50, 1001, 50))


def test_a_terminal_gets_the_bar_labelled_with_the_run(capsys):
    progress = Progress("conv.kind=static,d_model=64", total=10, terminal=True)
    for _ in range(10):
        progress.advance()
    progress.train(10, {"loss": 1.5, "lr": 1e-3, "tokens_per_s": 1e3})
    progress.close()
    out, err = capsys.readouterr()
    assert out == "" and "conv.kind=static,d_model=64" in err and "\r" in err


def test_quiet_shows_nothing(capsys):
    progress = Progress("p", total=10, enabled=False, terminal=False)
    progress.train(10, {"loss": 1.5, "lr": 1e-3, "tokens_per_s": 1e3})
    progress.eval(10, {"overall": 0.5, "loss": 1.0}, "overall")
    assert capsys.readouterr() == ("", "")


def test_formats():
    assert clock(0) == "0:00:00" and clock(187.4) == "0:03:07" and clock(43200) == "12:00:00"
    assert si(950) == "950" and si(12345) == "12.3k" and si(4.56e6) == "4.56M"


# ----------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_hparams_are_in_the_runs_own_log_with_only_the_keys_that_apply(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path, tiny_mqar(log={"tensorboard": True}))
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0, err
    tb = cwd / "out/t/tb"
    assert [p.name for p in tb.iterdir() if p.is_dir()] == []  # no second run (tb/hparams) beside the run's own
    hp = hparams_of(tb)
    assert hp["model.mixer"] == "attention" and hp["model.d_model"] == 32 and hp["train.lr"] == 1e-3
    assert hp["model.conv.kind"] == "none" and hp["task.kind"] == "mqar" and "model.attention.rope_theta" in hp
    assert hp["model.tie_embeddings"] == "true" and hp["task.mqar.vocab_size"] == 64
    sections = {k.rsplit(".", 1)[0] for k in hp}
    assert sections == {"run", "model", "model.attention", "model.conv", "task", "task.mqar", "train", "eval"}
    assert not [k for k in hp if k.startswith(("model.moe", "model.gated_deltanet", "model.mamba2", "task.lm", "log.",
                                                "checkpoint.", "model.conv.rank"))]
    assert len(hp) < 50
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/tokens", "train/step_time_s", "train/host_mem_peak_gib"} <= tags
    tokens = [e.value for e in acc.Scalars("train/tokens")]
    assert tokens == [16 * 16 * step for step in range(2, 25, 2)]  # batch 16 x 16 tokens per step
    assert all(e.value > 0 for e in acc.Scalars("train/step_time_s"))
    assert metadata.SESSION_END_INFO_TAG in acc.summary_metadata  # finished


def test_a_run_stopped_early_has_its_hparams(tmp_path, monkeypatch, capsys):
    from tests.training.test_reliability import signal_at

    cwd = setup_dir(tmp_path, tiny_mqar(log={"tensorboard": True}))
    signal_at(monkeypatch, 3, signal.SIGINT)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 130 and "interrupted (SIGINT) at step 3" in err
    tb = cwd / "out/t/tb"
    assert hparams_of(tb)["model.d_model"] == 32
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert metadata.SESSION_END_INFO_TAG not in acc.summary_metadata


def test_applicable_keys_follow_the_components_in_use():
    r = recipes.build({"model": {"mixer": ["short_conv", "gated_deltanet"], "ffn": "moe",
                                 "conv": {"kind": "dynamic"}}, "task": {"kind": "lm", "lm": {"data": "x"}}})
    hp = applicable(r)
    assert hp["model.mixer"] == '["short_conv","gated_deltanet"]' and hp["model.conv.rank"] == 15
    assert any(k.startswith("model.moe.") for k in hp) and any(k.startswith("model.gated_deltanet.") for k in hp)
    assert any(k.startswith("task.lm.") for k in hp) and hp["model.conv.residual"] == "unset"
    assert not [k for k in hp if k.startswith(("model.attention.", "model.mamba2.", "task.mqar.", "sweep"))]
    assert not [k for k in hp if k in ("run.name", "run.out_dir", "train.micro_batch_size", "train.cuda_graph")]
    assert all(isinstance(v, (int, float, str, bool)) for v in hp.values())
    # nor the task keys its other settings leave unread: the BPE's vocabulary of a byte-level run, the token cache
    assert "task.lm.vocab_size" not in hp and "task.lm.cache_dir" not in hp and hp["task.lm.tokenizer"] == "byte"
    bpe = recipes.build({"task": {"kind": "lm", "lm": {"data": "x", "tokenizer": "bpe", "vocab_size": 1024}}})
    assert applicable(bpe)["task.lm.vocab_size"] == 1024
