"""`dcablate bench conv --against DIR` on CPU: it loads a reference `lowrank.py` from a folder, maps our
arguments onto its API so both agree with float64, marks a reference that fails or is wrong in its cells
without stopping, and ends a bad folder or shape with one line. The fixtures under fixtures/ stand in for the
paper's kernel: `lowrank_torch` computes its formula in torch, `lowrank_wrong` misplaces the taps at D > 16."""

from pathlib import Path

import pytest
import torch

from dcablate.bench.against import (Inputs, load_reference, ours_call, reference_call, relative_error,
                                    wrong_above)
from dcablate.bench.conv_shapes import ConvShape, default_shapes, parse_shape
from dcablate.cli import main
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

FIXTURES = Path(__file__).parent / "fixtures"
RIGHT, WRONG = FIXTURES / "lowrank_torch", FIXTURES / "lowrank_wrong"
SHAPES = ["B2 T37 D24 W4 R15+S", "B1 T9 D8 W4 R16", "B3 T20 D12 W3 R7+S", "B1 T5 D8 W4 R8+S"]

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (errors-only) table")


def bench(capsys, folder, *extra, shapes=SHAPES):
    args = ["bench", "conv", "--against", str(folder), *extra]
    for s in shapes:
        args += ["--shape", s]
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def row(out: str, dims: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(dims + " "))


@pytest.mark.parametrize("shape", ["B2 T37 D24 W4 R15+S", "B1 T9 D8 W4 R16", "B3 T20 D12 W3 R7+S"])
def test_argument_mapping_agrees_with_ours_in_float64(shape):
    """Our (x, z, U [R, W, D], S) through `reference_call` gives the reference our y and gradients to fp32
    rounding (the stand-in, like the paper's torch reference, computes in fp32): the U layout, lag order,
    static filter and residual all line up."""
    s = parse_shape(shape)
    reference = load_reference(RIGHT)
    g = torch.Generator().manual_seed(1)
    x, z, U = (torch.randn(*dims, dtype=torch.float64, generator=g)
               for dims in ((s.B, s.T, s.D), (s.B, s.T, s.R), (s.R, s.W, s.D)))
    S = torch.randn(s.W, s.D, dtype=torch.float64, generator=g) if s.has_S else None
    args = [t.requires_grad_() if t is not None else None for t in (x, z, U, S)]
    ours = dynamic_conv_lowrank_reference(*args, None, True)
    theirs = reference_call(reference, *args)
    assert relative_error(theirs, ours.detach()) < 1e-6
    dy = torch.randn_like(ours)
    leaves = [a for a in args if a is not None]
    for a, b in zip(torch.autograd.grad(ours, leaves, dy), torch.autograd.grad(theirs, leaves, dy)):
        assert relative_error(b, a) < 1e-6
    # a layout mix-up (lags read in reverse) would not pass: the check above can fail
    flipped = reference_call(reference, x, z, U.flip(1), S.flip(0) if S is not None else None)
    assert relative_error(flipped, ours.detach()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_sides_agree_with_float64_on_cpu(dtype):
    shape = parse_shape("B2 T37 D24 W4 R15+S")
    inputs = Inputs.make(shape, dtype, "cpu")
    y_ref, grads_ref = inputs.oracle()
    reference = load_reference(RIGHT)
    for y in (ours_call(*inputs.ours), reference_call(reference, *inputs.theirs)):
        assert relative_error(y, y_ref) < wrong_above(dtype) / 8


@cpu_only
def test_against_prints_the_table_with_failed_and_wrong_cells(capsys):
    code, out, err = bench(capsys, RIGHT, "--dtype", "float32")
    assert code == 0, err
    assert "no CUDA: errors only, times n/a" in out
    header = next(line for line in out.splitlines() if line.startswith("shape "))
    for column in ("ours graphed µs", "theirs graphed µs", "ours/theirs", "ours eager µs", "theirs eager µs",
                   "ours fwd µs", "theirs fwd µs", "fwd ours/theirs", "ours y err", "theirs y err", "ours grad err",
                   "theirs grad err"):
        assert column in header
    good = row(out, "B2 T37 D24 W4 R15+S").split()
    assert good.count("n/a") == 8 and "failed" not in good and "WRONG" not in good
    errors = [float(c) for c in good if "e-" in c]
    assert len(errors) == 4 and max(errors) < 1e-5  # y and gradients of both sides, fp32 against float64
    # R = 8 with S: 9 ranks, not a power of two; the reference refuses, the bench goes on and says why
    refused = row(out, "B1 T5 D8 W4 R8+S")
    assert refused.count("theirs failed") == 2 and refused.split().count("failed") == 7  # 5 cells, 2 ratios
    assert "e-" in refused  # our own errors are still measured
    assert "theirs at B1 T5 D8 W4 R8+S: AssertionError: rank R must be a power of 2" in out


@cpu_only
def test_against_marks_a_wrong_reference(capsys):
    code, out, err = bench(capsys, WRONG, shapes=["B2 T37 D24 W4 R15+S", "B1 T9 D8 W4 R16"])
    assert code == 0, err
    wrong = row(out, "B2 T37 D24 W4 R15+S")
    assert wrong.count("WRONG") == 2 and wrong.count("theirs wrong") == 2
    assert "WRONG" not in row(out, "B1 T9 D8 W4 R16")  # right at D <= 16: only the bad shape is marked


@cpu_only
def test_a_reference_that_fails_at_every_shape_is_no_result(tmp_path, capsys):
    """A GPU-only reference (it asserts x.is_cuda) on CPU: the table says failed in every cell of theirs, and
    the command ends with one line saying nothing was compared, exit 2."""
    (tmp_path / "lowrank.py").write_text("def lowrank_dynamic_convolution(x, z, U, static_w=None, residual=False):\n"
                                         "    assert x.is_cuda and x.is_contiguous()\n")
    code, out, err = bench(capsys, tmp_path, shapes=["B1 T9 D8 W4 R16", "B2 T37 D24 W4 R15+S"])
    assert code == 2 and row(out, "B1 T9 D8 W4 R16").count("theirs failed") == 2
    assert err == (f"error: --against {tmp_path}: the reference failed at every shape (above), so nothing was "
                   f"compared; without CUDA, a reference written for the GPU only (one that asserts x.is_cuda) "
                   f"cannot run: compare on a GPU\n")


@cpu_only
def test_against_on_cpu_needs_shapes(capsys):
    code, out, err = bench(capsys, RIGHT, shapes=[])
    assert code == 2 and err.startswith("error: bench conv --against without CUDA") and "--shape" in err
    assert len(err.splitlines()) == 1 and out == ""


def folder_with(text: str):
    def make(d: Path) -> Path:
        (d / "lowrank.py").write_text(text)
        return d
    return make


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such folder"),
    (lambda d: d, "no lowrank.py in it"),
    (folder_with("def other(): pass\n"), "has no function lowrank_dynamic_convolution"),
    (folder_with("lowrank_dynamic_convolution = 3\n"), "has no function lowrank_dynamic_convolution"),
    (folder_with("import not_a_module_here\n"), "failed: ModuleNotFoundError: No module named 'not_a_module_here'"),
    (folder_with("1 +\n"), "failed: SyntaxError"),
])
def test_a_bad_folder_is_one_line(tmp_path, capsys, make, message):
    folder = make(tmp_path)
    code, out, err = bench(capsys, folder, shapes=["B1 T9 D8 W4 R16"])
    assert code == 2 and err.startswith(f"error: --against {folder}") and message in err
    assert len(err.splitlines()) == 1 and out == ""


def test_a_folder_may_import_its_siblings(tmp_path):
    """The paper's files import each other by name: the folder is on sys.path while lowrank.py loads."""
    (tmp_path / "sibling_of_lowrank.py").write_text("def conv(x, z, U, static_w=None, residual=False):\n"
                                                     "    return x\n")
    (tmp_path / "lowrank.py").write_text("from sibling_of_lowrank import conv as lowrank_dynamic_convolution\n")
    import sys

    before = list(sys.path)
    assert load_reference(tmp_path).__name__ == "conv"
    assert sys.path == before


@pytest.mark.parametrize("text", ["B2 T64", "B2 T64 D32 W4 R15+X", "B0 T64 D32 W4 R15", "b2 t64 d32 w4 r15"])
def test_a_bad_shape_is_one_line(capsys, text):
    assert main(["bench", "conv", "--shape", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --shape {text!r}") and len(err.splitlines()) == 1


def test_default_shapes_cover_the_paper_and_the_bench_recipes():
    shapes = {s.dims: s for s in default_shapes()}
    assert {"B4 T4096 D2048 W4 R16", "B4 T4096 D2048 W4 R15+S"} <= set(shapes)
    # q/k (768) and v (1536) of the GDN recipes, their MLP's gate/up, Mamba-2's xBC, at B16 T2048
    widths = {s.D for s in shapes.values() if (s.B, s.T, s.W, s.R, s.has_S) == (16, 2048, 4, 15, True)}
    assert {768, 1536, 1792} <= widths and len(widths) >= 4
    assert "gdn q k" in shapes["B16 T2048 D768 W4 R15+S"].name and shapes["B16 T2048 D1536 W4 R15+S"].name == "gdn v"
    assert parse_shape(" B3 T1000 D300 W3 R7+S ") == ConvShape("B3 T1000 D300 W3 R7+S", 3, 1000, 300, 3, 7, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_against_on_cuda_times_both_sides(capsys):
    """On CUDA: the speed table, then ours against the stand-in with times in every cell but the refused shape's."""
    code, out, err = bench(capsys, RIGHT, "--skip-reference", shapes=["B2 T256 D64 W4 R15+S", "B1 T64 D32 W4 R8+S"])
    assert code == 0, err
    assert "dynamic (ours, split)" in out and "times: median µs" in out
    timed = row(out.split("ours against")[1], "B2 T256 D64 W4 R15+S").split()
    assert "n/a" not in timed and "failed" not in timed and "WRONG" not in timed
    assert "theirs failed" in row(out.split("ours against")[1], "B1 T64 D32 W4 R8+S")


def test_a_side_that_fails_only_while_timed_keeps_its_errors(monkeypatch):
    """A reference that computes right but cannot be timed (say, not capturable in a CUDA graph): its error
    cells keep their values, its time cells and the ratios say failed, and the line under the table says why."""
    import dcablate.bench.against as against

    def no_graphs(fn, args, dy, side):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(against, "_time", no_graphs)
    shape = parse_shape("B1 T9 D8 W4 R16")
    inputs = Inputs.make(shape, torch.float32, "cpu")
    side = against.measure(ours_call, inputs.ours, inputs, inputs.oracle(), torch.float32, timed=True)
    assert side.failed is None and side.y_err < 1e-5 and side.time_failed.startswith("RuntimeError: operation")
    cells = against.table_rows([(shape, side, side)], torch.float32)[0]
    assert cells["ours graphed µs"] == "failed" and cells["ours/theirs"] == "theirs failed"
    assert "failed" not in cells["ours y err"] + cells["ours grad err"]
    assert against.failure_lines([(shape, side, side)])[0] == (
        "ours at B1 T9 D8 W4 R16, while timed: RuntimeError: operation not permitted when stream is capturing")
