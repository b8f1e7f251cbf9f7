"""`benchmarks/stream_packing.py` end to end on CPU (no graphs or streams here: the rows step the models in turn)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "stream_packing.py"


def test_the_table_has_a_row_per_model_count(capsys):
    spec = importlib.util.spec_from_file_location("stream_packing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["quickstart", "--set", "model.d_model=16", "--models", "1,2", "--steps", "2",
                        "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "quickstart: attention d_model 16, 2 layers, conv none@qkv, batch 64; 2 timed rounds" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r[0] for r in rows] == ["| 1", "| 2"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[5] == "0" for r in rows)  # no graphs on CPU
    assert all(r[-1] == "0 / 0 / 0 |" for r in rows)  # non-finite steps in warm-up / one stream / a stream each
    assert rows[0][4] == "1.00x"
