"""benchmarks/conv_candidates.py on CPU, under Triton's interpreter (errors only, no times): the table and the
JSON per shape, a candidate that fails at one shape marked there while the run goes on, the reference's
WRONG cells (tests/bench/fixtures stands in for the paper's kernel), and bad flags ending in one line."""

import json
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import ROOT, run_interpreted

FIXTURES = Path(ROOT) / "tests" / "bench" / "fixtures"
SCRIPT = Path(ROOT) / "benchmarks" / "conv_candidates.py"


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("conv_candidates_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_and_json_with_a_failing_candidate_and_a_wrong_reference(tmp_path):
    out = tmp_path / "res" / "cc.json"
    stdout = run_interpreted(f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cc", {str(SCRIPT)!r})
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)
from dcablate.kernels.dynamic_conv import candidates as C
real = C.lowrank_bwd_dudz

def breaks_at_d8(x, *a, **k):  # a candidate kernel that does not compile at one shape
    if x.shape[-1] == 8:
        raise RuntimeError("simulated compile failure")
    return real(x, *a, **k)
C.lowrank_bwd_dudz = breaks_at_d8
code = cc.main(["--shape", "B2 T20 D24 W4 R15+S", "--shape", "B1 T9 D8 W3 R7+S", "--impl", "split",
                "--impl", "tile+dudz", "--impl", "narrow", "--dtype", "float32",
                "--against", {str(FIXTURES / "lowrank_wrong")!r}, "--out", {str(out)!r}])
print("exit", code)
alone = cc.main(["--shape", "B1 T9 D24 W4 R15+S", "--impl", "joint", "--dtype", "float32",
                 "--out", {str(out.with_name("alone.json"))!r}])  # no --against: no paper column
print("alone exit", alone)
print("ok")
""")
    assert "exit 0" in stdout and "alone exit 0" in stdout
    alone = json.loads(out.with_name("alone.json").read_text())
    assert list(alone["shapes"][0]["sides"]) == ["joint"] and alone["summary"]["joint"]["worst_err"] < 1e-5
    report = json.loads(out.read_text())
    assert report["impls"] == ["split", "tile+dudz", "narrow"]
    wide, narrow_d = report["shapes"]
    assert [s["dims"] for s in report["shapes"]] == ["B2 T20 D24 W4 R15+S", "B1 T9 D8 W3 R7+S"]
    for impl in ("split", "tile+dudz", "narrow"):
        cell = wide["sides"][impl]
        assert not cell["failed"] and not cell["wrong"] and max(cell["y_err"], cell["grad_err"]) < 1e-5, impl
        assert cell["graphed_us"] is None  # no times without CUDA
    assert wide["sides"]["paper"]["wrong"]  # the fixture misplaces its taps at D > 16
    assert "simulated compile failure" in narrow_d["sides"]["tile+dudz"]["failed"]
    assert not narrow_d["sides"]["split"]["failed"] and not narrow_d["sides"]["paper"]["wrong"]
    summary = report["summary"]
    assert summary["tile+dudz"]["failed_or_wrong_at"] == ["B1 T9 D8 W3 R7+S"]
    assert summary["split"]["failed_or_wrong_at"] == [] and summary["split"]["worst_err"] < 1e-5
    assert not summary["split"]["targets_met"]  # no times, so no ratio to the paper's kernel: not met
    table = stdout.splitlines()
    assert any(line.startswith("tile+dudz") and "failed" in line for line in table)
    assert any(line.startswith("paper") and "WRONG" in line for line in table)
    assert any("tile+dudz failed: RuntimeError: simulated compile failure" in line for line in table)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
@pytest.mark.parametrize("argv,message", [
    (["--impl", "tlie", "--shape", "B1 T4 D8 W2 R2"], "--impl 'tlie': unknown candidate 'tlie'"),
    (["--shape", "B1 T4 D8"], "--shape 'B1 T4 D8': expected"),
    (["--shape", "B1 T4 D8 W2 R2"], "needs a CUDA device (or TRITON_INTERPRET=1"),
    ([], "needs a CUDA device"),
])
def test_bad_flags_end_in_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert load_script().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
def test_interpreter_run_needs_small_shapes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert load_script().main(["--out", str(tmp_path / "x.json")]) == 2
    assert "give small --shape sizes" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
