"""The GPU benchmarks' CLI: without CUDA each ends with one clear line and exit 2."""

import pytest
import torch

from dcablate.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("args", [["bench", "conv", "--breakdown"], ["bench", "mixer"],
                                  ["bench", "moe", "--profile"]])
def test_gpu_benchmarks_need_cuda(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bench {args[1]} needs a CUDA device") and len(err.splitlines()) == 1
    assert "; on CPU, `bench " in err  # what works without one


def test_bench_moe_rejects_bad_top_k(capsys):
    assert main(["bench", "moe", "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err


def test_gpu_busy_line_says_who_sets_the_pace():
    from dcablate.bench.kernels import gpu_busy_line

    line = gpu_busy_line("static", 127.4, 194.34, "median of the timed steps")
    assert line == ("static: kernels 127.40 ms per step of 194.34 ms (median of the timed steps): GPU idle 34% "
                    "of the step, the host sets the pace")
    assert gpu_busy_line("none", 119.5, 121.88, "x").endswith("GPU idle 2% of the step, the GPU sets the pace")
    assert "GPU idle 0%" in gpu_busy_line("overlap", 130.0, 120.0, "x")  # overlapping kernels: no negative idle
