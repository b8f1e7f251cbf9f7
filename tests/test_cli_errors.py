"""Every user mistake ends as one line on stderr naming the file (or --set) and the key, exit code 2, no traceback.

Table-driven: each case writes some files into a fresh working directory, calls the real entry point
`dcablate.cli.main(argv)` in-process, and checks the error line. A few cases also run end to end in a
subprocess.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dcablate.config as R
from dcablate.cli import main

# A valid recipe; runs (if any slipped through) would land in ./out, which every case checks is never created.
OK = """\
[run]
out_dir = "out"
[model]
d_model = 32
[train]
steps = 2
warmup_steps = 0
batch_size = 4
[eval]
batch_size = 32
[log]
tensorboard = false
progress = false
[task.mqar]
vocab_size = 64
[[task.mqar.train]]
seq_len = 16
num_kv_pairs = 2
num_examples = 32
[[task.mqar.test]]
seq_len = 16
num_kv_pairs = 2
num_examples = 32
"""

# the same, a byte-level language model (generate's cases); its text is never read before the errors they test
LM_OK = OK.split("[task.mqar]")[0] + '[task]\nkind = "lm"\n[task.lm]\ndata = "text.txt"\nseq_len = 16\n'
MEMORIZATION_OK = OK.split("[task.mqar]")[0] + '[task]\nkind = "memorization"\n[task.memorization]\ndata_seed = 3\n'

DRY = ["--dry-run"]


@functools.cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: tuple[str, ...]                 # substrings of the one error line: file or --set, key path, message
    files: dict[str, str | bytes] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    shipped: tuple[str, ...] = ()           # pretend these names are shipped recipes (valid ones)
    cpu_only: bool = False                  # the case relies on there being no CUDA device
    bug: str | None = None                  # xfail(strict=True) reason: a bug in dcablate/, see the report

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.bug)] if self.bug else []
        return pytest.param(self, id=self.id, marks=marks)


def bad(case_id: str, text: str | bytes, *expect: str, bug: str | None = None) -> Case:
    """A malformed recipe `r.toml` validated by `dcablate run r.toml --dry-run`."""
    return Case(case_id, ["run", "r.toml", *DRY], expect, files={"r.toml": text}, bug=bug)


def bad_set(case_id: str, overrides: list[str], *expect: str, cmd: str = "run", bug: str | None = None) -> Case:
    """A valid recipe with bad `--set` overrides."""
    argv = [cmd, "ok.toml", *(DRY if cmd == "run" else [])]
    for o in overrides:
        argv += ["--set", o]
    return Case(case_id, argv, expect, bug=bug)


TINY_RUN = ["run", "ok.toml", "--quiet"]

CASES = [
    # --- unknown keys, with did-you-mean
    bad("unknown-section", "[modle]\nd_model = 64\n", "r.toml: modle: unknown key", "did you mean 'model'"),
    bad("unknown-key", "[model]\nd_modle = 64\n", "r.toml: model.d_modle: unknown key",
        "did you mean 'd_model'", "allowed here: mixer, d_model"),
    bad("unknown-nested-key", "[model.conv]\nwidht = 3\n", "r.toml: model.conv.widht", "did you mean 'width'"),
    bad("task-key-of-the-chosen-kind", '[task]\nkind = "recall"\nseq_len = 64\n',
        "r.toml: task.seq_len: unknown key (did you mean 'task.recall.seq_len'?)"),
    bad("unknown-key-dotted-form", "model.conv.knid = 'static'\n", "r.toml: model.conv.knid", "did you mean 'kind'"),
    # --- wrong types
    bad("str-for-int", '[model]\nd_model = "64"\n', "r.toml: model.d_model", "must be an integer", "str '64'"),
    bad("float-for-int", "[train]\nsteps = 10.0\n", "r.toml: train.steps", "must be an integer", "float 10.0"),
    bad("int-for-bool", "[log]\ntensorboard = 1\n", "r.toml: log.tensorboard", "must be true or false", "int 1"),
    bad("bool-for-int", "[model]\nn_layers = true\n", "r.toml: model.n_layers", "must be an integer",
        "boolean true"),
    bad("bool-for-float", "[train]\nlr = false\n", "r.toml: train.lr", "must be a number", "boolean false"),
    bad("str-for-float", '[train]\nlr = "3e-3"\n', "r.toml: train.lr", "must be a number", "str '3e-3'"),
    bad("table-for-scalar", "[model]\nd_model = {value = 64}\n", "r.toml: model.d_model",
        "must be an integer, got a table"),
    bad("list-for-scalar", "[model]\nd_model = [64]\n", "r.toml: model.d_model", "must be an integer, got a list"),
    bad("scalar-for-table", '[model]\nconv = "static"\n', "r.toml: model.conv", "must be a table", "str 'static'"),
    bad("scalar-for-section", "model = 3\n", "r.toml: model", "must be a table", "int 3"),
    # --- out of range
    bad("negative-lr", "[train]\nlr = -0.001\n", "r.toml: train.lr", "must be > 0.0, got -0.001"),
    bad("zero-lr", "[train]\nlr = 0\n", "r.toml: train.lr", "must be > 0.0"),
    bad("zero-steps", "[train]\nsteps = 0\nwarmup_steps = 0\n", "r.toml: train.steps", "must be >= 1, got 0"),
    bad("conv-width-9", "[model.conv]\nwidth = 9\n", "r.toml: model.conv.width", "must be <= 8, got 9"),
    bad("early-stop-1.5", "[eval]\nearly_stop = 1.5\n", "r.toml: eval.early_stop",
        "must be <= 1.0 for task 'mqar' (its headline, overall, lies in 0..1), got 1.5"),
    bad("negative-seed", "[run]\nseed = -1\n", "r.toml: run.seed", "must be >= 0"),
    bad("nan-lr", "[train]\nlr = nan\n", "r.toml: train.lr", "finite"),
    # --- choices, with did-you-mean
    bad("bad-mixer", '[model]\nmixer = "atention"\n', "r.toml: model.mixer",
        "'atention' is not one of attention|gated_deltanet", "did you mean 'attention'"),
    bad("bad-device", '[run]\ndevice = "gpu"\n', "r.toml: run.device", "'gpu' is not one of auto|cpu|cuda"),
    bad("bad-conv-kind", '[model.conv]\nkind = "dynamc"\n', "r.toml: model.conv.kind", "not one of none|static"),
    # --- run directories stay inside run.out_dir
    bad("run-name-escapes", '[run]\nname = "../../escape"\n', "r.toml: run.name",
        "'../../escape' must name a folder inside run.out_dir"),
    bad("run-name-empty", '[run]\nname = ""\n', "r.toml: run.name", "must name a folder inside run.out_dir"),
    bad("run-name-absolute", '[run]\nname = "/tmp/x"\n', "r.toml: run.name", "must name a folder inside"),
    # --- cross-key checks
    bad("d-model-not-divisible", "[model]\nd_model = 65\n", "r.toml: model.n_heads",
        "d_model 65 is not divisible by n_heads 2"),
    bad("odd-head-dim", "[model]\nhead_dim = 7\n", "r.toml: model.head_dim", "RoPE needs an even head dim, got 7"),
    bad("odd-derived-head-dim", "[model]\nd_model = 6\nn_heads = 2\n", "r.toml: model.d_model", "even head dim, got 3 = d_model / n_heads"),
    bad("expand-v-fraction", '[model]\nmixer = "gated_deltanet"\nhead_dim = 3\nd_model = 64\n'
                             "[model.gated_deltanet]\nexpand_v = 0.5\n",
        "r.toml: model.gated_deltanet.expand_v", "is not an integer"),
    bad("odd-seq-len", "[[task.mqar.train]]\nseq_len = 63\nnum_kv_pairs = 4\n",
        "r.toml: task.mqar.train[0].seq_len", "must be even, got 63"),
    bad("4kv-over-T", "[[task.mqar.test]]\nseq_len = 64\n[[task.mqar.test]]\nseq_len = 64\nnum_kv_pairs = 20\n",
        "r.toml: task.mqar.test[1].num_kv_pairs", "4 * num_kv_pairs (80) must be <= seq_len (64)"),
    bad("kv-over-half-vocab", "[task.mqar]\nvocab_size = 8\n", "r.toml: task.mqar.train[0].num_kv_pairs",
        "fewer than vocab_size/2 = 4"),
    bad("warmup-over-steps", "[train]\nsteps = 10\nwarmup_steps = 20\n", "r.toml: train.warmup_steps",
        "20 is more than train.steps 10"),
    bad("model-vocab-too-small", "[model]\nvocab_size = 100\n", "r.toml: model.vocab_size",
        "100 is smaller than task.mqar.vocab_size 8192"),
    # --- segments
    bad("empty-segment-list", "[task.mqar]\ntrain = []\n", "r.toml: task.mqar.train", "must be a non-empty list"),
    bad("segment-unknown-key", "[[task.mqar.test]]\nseqlen = 64\n", "r.toml: task.mqar.test[0].seqlen",
        "did you mean 'seq_len'"),
    bad("segment-not-a-table", "[task.mqar]\ntest = [64]\n", "r.toml: task.mqar.test[0]", "must be a table"),
    bad("segments-not-a-list", "[task.mqar.train]\nseq_len = 64\n", "r.toml: task.mqar.train",
        "must be a non-empty list of tables, got a table"),
    # --- TOML syntax and files
    bad("invalid-toml", "[model]\nd_model = \n", "r.toml: not valid TOML", "line 2"),
    bad("duplicate-key", "[model]\nd_model = 64\nd_model = 32\n", "r.toml: not valid TOML"),
    bad("unquoted-string", "[model]\nmixer = attention\n", "r.toml: not valid TOML: Invalid value (at line 2, column 9)"
        ' (a string needs quotes: mixer = "attention")'),
    bad("not-utf8", b'[run]\nname = "\xff"\n', "r.toml", "UTF-8"),
    Case("missing-recipe", ["run", "nope.toml", *DRY], ("nope.toml: no such recipe file or shipped recipe",)),
    Case("missing-recipe-did-you-mean-local", ["run", "mine.tom", *DRY],
         ("mine.tom: no such recipe file or shipped recipe (did you mean 'mine.toml'?)",), files={"mine.toml": ""}),
    Case("missing-recipe-did-you-mean-shipped", ["run", "quickstrat", *DRY],
         ("quickstrat: no such recipe file", "did you mean 'quickstart'"), shipped=("quickstart",)),
    Case("recipe-is-a-directory", ["run", "somedir", *DRY], ("somedir: a folder, not a recipe; give a recipe file "
         "(.toml) or a shipped recipe's name",), dirs=("somedir",)),
    # --- extends
    bad("extends-missing", 'extends = "base.toml"\n', "r.toml: extends: no such file", "base.toml"),
    bad("extends-a-copied-shipped-recipe", 'extends = "mqar_base.toml"\n', "r.toml: extends: no such file",
        '(did you mean extends = "paper/mqar_base"?)'),
    bad("extends-misspelled-shipped", 'extends = "quickstartt"\n', '(did you mean extends = "quickstart"?)'),
    Case("extends-cycle", ["run", "a.toml", *DRY], ("b.toml: extends: cycle: a.toml -> b.toml -> a.toml",),
         files={"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\n'}),
    bad("extends-self", 'extends = "r.toml"\n', "r.toml: extends: cycle: r.toml -> r.toml"),
    bad("extends-not-a-string", "extends = 3\n", "r.toml: extends: must be a string"),
    bad("extends-in-a-table", '[model]\nextends = "base.toml"\n', "r.toml: model.extends: unknown key"),
    Case("error-in-parent-names-parent", ["run", "r.toml", *DRY], ("base.toml: model.n_layers", "must be >= 1"),
         files={"base.toml": "[model]\nn_layers = 0\n", "r.toml": 'extends = "base.toml"\n[model]\nd_model = 64\n'}),
    Case("child-segment-names-child", ["run", "r.toml", *DRY], ("r.toml: task.mqar.train[0].seq_len", "even"),
         files={"base.toml": "[task.mqar]\nvocab_size = 128\n",
                "r.toml": 'extends = "base.toml"\n[[task.mqar.train]]\nseq_len = 63\n'}),
    # --- --set
    bad_set("set-without-equals", ["train.lr"], "--set train.lr: expected KEY=VALUE"),
    bad_set("set-empty-key", ["=3"], "--set =3: expected KEY=VALUE"),
    bad_set("set-dot-key", [".=1"], "--set .=1: '.' is no recipe key (dotted names, e.g. --set train.lr=3e-3)"),
    bad_set("set-empty-part", ["train..lr=1"], "--set train..lr=1: 'train..lr' is no recipe key"),
    bad_set("set-unknown-key", ["model.d_modle=64"], "--set: model.d_modle: unknown key", "did you mean 'd_model'"),
    bad_set("set-unknown-section", ["modle.d_model=64"], "--set: modle: unknown key", "did you mean 'model'"),
    # a key put in the wrong section: its whole path, not a neighbour's spelling ('state_size' is not 'vocab_size')
    bad_set("set-key-of-a-component-section", ["model.state_size=16"],
            "--set: model.state_size: unknown key (did you mean 'model.mamba2.state_size'?)"),
    bad_set("set-key-without-its-section", ["steps=10"], "--set: steps: unknown key (did you mean 'train.steps'?)"),
    bad_set("set-key-by-another-tools-name", ["train.learning_rate=1e-3"],
            "--set: train.learning_rate: unknown key (did you mean 'lr'?)"),
    bad_set("set-key-spelled-close-to-one-here", ["model.heads=4"], "--set: model.heads: unknown key (did you mean "
            "'n_heads'?)"),  # a close spelling in its own section before a namesake elsewhere (model.conv.heads)
    bad_set("set-model-key-in-its-mixers-section", ["model.attention.heads=4"],
            "--set: model.attention.heads: unknown key (did you mean 'model.n_heads'?)"),
    bad_set("set-model-key-a-mixer-does-not-read", ["model.mamba2.n_heads=4"],
            "--set: model.mamba2.n_heads: unknown key; allowed here: head_dim"),  # Mamba-2 reads no model.n_heads
    bad_set("set-key-of-many-sections", ["model.seq_len=64"],
            "--set: model.seq_len: unknown key ('seq_len' is a key of", "sections, such as 'task."),
    bad_set("set-warmup-beyond-the-files-steps", ["train.warmup_steps=5"],
            "--set: train.warmup_steps: 5 is more than train.steps 2"),
    bad_set("set-a-list-where-a-sweep-was-meant", ["train.lr=[1e-3, 3e-3]"],
            "--set: train.lr: must be a number, got a list; to train one run per value, sweep it: "
            "--set 'sweep.train.lr=[...]'"),
    bad_set("set-bad-toml-value", ["model.mixer=[attention"], "--set model.mixer=[attention: value is not valid TOML"),
    bad_set("set-empty-value", ["train.lr="], "--set train.lr=: value is not valid TOML"),
    bad_set("set-bad-choice", ["model.mixer=atention"], "--set: model.mixer", "did you mean 'attention'"),
    bad_set("set-wrong-type", ["train.steps=ten"], "--set: train.steps", "must be an integer, got str 'ten'"),
    bad_set("set-float-for-int", ["model.d_model=1e3"], "--set: model.d_model", "must be an integer"),
    bad_set("set-into-a-value", ["model.d_model.x=1"], "--set: model.d_model: is a value, not a table"),
    Case("out-dir-under-a-file-names-the-set", ["run", "ok.toml", "--quiet", "--set", "run.out_dir=afile"],
         ("--set: run.out_dir: cannot create afile: afile is a file, not a folder",), files={"afile": "x"}),
    Case("export-tuning-gpu-name-cut-short", ["kernels", "export-tuning", "--gpu-name", "H200", "--triton-cache",
                                              "tc"],
         ("--gpu-name H200: runs read the configs of the name torch gives the GPU", "did you mean 'NVIDIA H200'?"),
         dirs=("tc",)),
    bad_set("set-lm-task-without-text", ["task.kind=lm"], "--set: task.kind: 'lm' needs the text to train on: set "
            "task.lm.data"),
    bad_set("set-into-a-list", ["task.mqar.test.0.seq_len=128"], "--set: task.mqar.test: is a list, not a table; a "
            "list is set whole: --set 'task.mqar.test=[{...}, ...]'"),
    bad_set("set-bad-segment", ["task.mqar.test=[{seq_len=64, nkv=3}]"], "--set: task.mqar.test[0].nkv",
            "unknown key"),
    bad_set("set-later-wins-but-still-validated", ["train.lr=1e-3", "train.lr=-1"], "--set: train.lr", "must be > 0"),
    # --- sweeps
    bad("sweep-not-a-list", '[sweep]\n"model.d_model" = 64\n', "r.toml: sweep.model.d_model",
        "must be a non-empty list of values"),
    bad("sweep-invalid-value", '[sweep.model]\nmixer = ["attention", "atention"]\n', "r.toml: sweep.model.mixer",
        "value 'atention'", "did you mean 'attention'"),
    bad("sweep-cross-key-value", "[sweep.model]\nd_model = [64, 65]\n", "r.toml: sweep.model.d_model", "value 65",
        "not divisible"),
    bad("sweep-unknown-key", '[sweep]\n"model.d_modle" = [64]\n', "r.toml: sweep.model.d_modle: not a recipe key",
        "did you mean 'model.d_model'"),
    bad("sweep-key-without-its-section", '[sweep]\nmixer = ["attention"]\n', "r.toml: sweep.mixer: not a recipe key "
        "(did you mean 'model.mixer'?)"),
    bad("sweep-key-of-the-recipes-task", '[sweep]\nvocab_size = [64]\n', "r.toml: sweep.vocab_size: not a recipe key "
        "(did you mean 'task.mqar.vocab_size'?)"),
    bad("sweep-key-through-a-value", '[sweep]\n"train.lr.x" = [1]\n', "r.toml: sweep.train.lr.x: not a recipe key "
        "(train.lr: is a value, not a table)"),
    bad("sweep-nested-key-without-its-section", '[sweep]\n"conv.kind" = ["static"]\n',
        "r.toml: sweep.conv.kind: not a recipe key (did you mean 'model.conv.kind'?)"),
    bad("sweep-axis-of-an-unused-mixer", '[sweep]\n"model.gated_deltanet.expand_v" = [1, 2]\n',
        "r.toml: sweep.model.gated_deltanet.expand_v: model.mixer is 'attention' at every point, so this axis "
        "changes nothing (each of its values would train the same run); drop it, or sweep model.mixer too"),
    bad("sweep-axis-of-an-unused-channel-mixer", '[sweep]\n"model.moe.top_k" = [1, 2]\n',
        "r.toml: sweep.model.moe.top_k: model.ffn is 'none' at every point, so this axis changes nothing"),
    bad("sweep-axis-of-a-conv-key-no-kind-reads", '[model.conv]\nkind = "static"\n[sweep]\n"model.conv.rank" = [4, 8]\n',
        "r.toml: sweep.model.conv.rank: model.conv.kind is 'static' at every point, which does not read "
        "model.conv.rank, so this axis changes nothing"),
    bad("sweep-axis-of-a-model-key-no-component-reads", '[model]\nmixer = "mamba2"\nffn = "none"\n[sweep]\n'
        '"model.n_heads" = [2, 4]\n', "r.toml: sweep.model.n_heads: model.mixer / model.ffn is 'mamba2 / none' at "
        "every point, none of which reads model.n_heads, so this axis changes nothing"),
    bad("sweep-axis-of-ffn-hidden-with-moe-experts-sized-apart", '[model]\nffn = "moe"\n[model.moe]\nd_expert = 32\n'
        '[sweep]\n"model.ffn_hidden" = [64, 128]\n', "r.toml: sweep.model.ffn_hidden: model.mixer / model.ffn is "
        "'attention / moe' at every point, none of which reads model.ffn_hidden, so this axis changes nothing"),
    bad("sweep-not-a-table", "sweep = 3\n", "r.toml: sweep: must be a table"),
    bad_set("set-sweep-not-a-list", ["sweep.train.lr=0.1"], "--set: sweep.train.lr", "non-empty list"),
    bad_set("set-sweep-itself", ["sweep.sweep=[1]"], "--set: sweep.sweep: a sweep cannot sweep itself"),
    bad_set("set-sweep-not-a-table", ["sweep=3"], "--set: sweep: must be a table"),
    Case("set-with-a-space", ["run", "r.toml", *DRY, "--set", "train.lr", "3e-3"],
         ("--set train.lr 3e-3: expected KEY=VALUE as one argument, without spaces: --set train.lr=3e-3",),
         files={"r.toml": OK}),
    Case("set-a-swept-key", ["run", "r.toml", *DRY, "--set", "model.d_model=48"],
         ("--set model.d_model=48: model.d_model is swept ([sweep] in ", "r.toml: [32, 64])",
          "--set 'sweep.model.d_model=[...]'"), files={"r.toml": OK + '[sweep]\n"model.d_model" = [32, 64]\n'}),
    Case("info-set-a-swept-key", ["info", "r.toml", "--set", "model.d_model=48"],
         ("--set model.d_model=48: model.d_model is swept",),
         files={"r.toml": OK + '[sweep.model]\nd_model = [32, 64]\n'}),
    Case("set-inside-a-swept-table", ["run", "paper/suite_attention", *DRY, "--set", "task.recall.vocab_size=32"],
         ("--set task.recall.vocab_size=32: task.recall is swept as whole tables ([sweep] in ", "suite_base.toml: [{}, ",
          "so the sweep would override this --set; set vocab_size in the sweep's tables instead, in a recipe of your "
          'own (extends = "paper/suite_attention", [sweep] "task.recall" = [...]) or with --set '
          "'sweep.task.recall=[...]', 25 values: it is zipped; or drop the sweep (--set 'sweep={}' --set "
          "'task.kind=\"recall\"' --set run.name=NAME: its sweep chooses the task)")),
    Case("set-a-misspelt-value-of-a-swept-key", ["run", "suite/tiny", *DRY, "--set", "task.kind=recal"],
         ("--set task.kind=recal: 'recal' is not one of mqar|lm|recall|", "(did you mean 'recall'?)")),
    Case("a-shipped-recipe-without-its-folder", ["run", "tiny", *DRY],
         ("tiny: no such recipe file or shipped recipe (did you mean 'suite/tiny'?)",)),
    Case("set-a-misspelt-key-inside-a-swept-table", ["run", "paper/suite_attention", *DRY, "--set",
                                                     "task.recall.vocab_sise=32"],
         ("--set task.recall.vocab_sise=32: unknown key 'vocab_sise' in [task.recall] (did you mean 'vocab_size'?); "
          "allowed there: vocab_size, seq_len, num_train_examples, num_test_examples, data_seed",)),
    Case("set-another-tasks-key-inside-a-swept-table", ["run", "paper/suite_attention", *DRY, "--set",
                                                        "task.recall.noise_fraction=0.2"],
         ("--set task.recall.noise_fraction=0.2: unknown key 'noise_fraction' in [task.recall] (did you mean "
          "'task.noisy_recall.noise_fraction'?); allowed there: vocab_size, seq_len,",)),
    Case("set-inside-a-swept-table-of-a-file", ["run", "r.toml", *DRY, "--set", "task.mqar.vocab_size=256"],
         ("--set task.mqar.vocab_size=256: task.mqar is swept as whole tables ([sweep] in ", "r.toml: [{'vocab_size'",
          'extends = "r.toml"', "--set 'sweep.task.mqar=[...]';"),
         files={"r.toml": OK + '[sweep]\n"task.mqar" = [{vocab_size = 64}, {vocab_size = 128}]\n'}),
    Case("set-a-table-naming-a-swept-key", ["run", "r.toml", *DRY, "--set", 'model.conv={kind="static", width=3}'],
         ('--set model.conv={kind="static", width=3}: sets model.conv.kind, which is swept ([sweep] in ',
          "r.toml: ['none', 'static']), and the sweep sets it at every point; set the axis instead (--set "
          "'sweep.model.conv.kind=[...]')"), files={"r.toml": OK + '[sweep]\n"model.conv.kind" = ["none", "static"]\n'}),
    Case("set-a-table-naming-a-swept-table", ["run", "paper/suite_attention", *DRY, "--set",
                                              "task={recall={seq_len=64}}"],
         ("--set task={recall={seq_len=64}}: sets task.recall, which is swept ([sweep] in ", "suite_base.toml",
          "(--set 'sweep.task.recall=[...]', 25 values: it is zipped)")),
    Case("set-a-zipped-list-of-another-length", ["run", "paper/suite_attention", *DRY, "--set",
                                                 'sweep.model.conv.kind=["none", "dynamic"]'],
         ("error: --set: sweep.model.conv.kind: 2 values, but sweep.zip (", "suite_base.toml) zips it with "
          "model.conv.placement (4 values); zipped keys need lists of equal length",)),
    Case("set-a-zipped-list-shorter-than-its-two-partners", ["run", "lm/scaling_tiny", *DRY, "--set",
                                                             'sweep.model.conv.kind=["none", "dynamic"]'],
         ("error: --set: sweep.model.conv.kind: 2 values, but sweep.zip (", "scaling_tiny.toml) zips it with "
          "model.conv.activation, model.conv.residual (4 values each)",)),
    Case("child-zipped-list-of-another-length", ["run", "r.toml", *DRY],
         ("r.toml: sweep.task.recall: 1 value, but sweep.zip (", "suite_base.toml) zips it with task.kind, "
          "task.fuzzy_recall, ", "train.steps (25 values each); zipped keys need lists of equal length"),
         files={"r.toml": 'extends = "paper/suite_attention"\n[sweep]\n"task.recall" = [{vocab_sise = 64}]\n'}),
    Case("child-zipped-value-names-the-child", ["run", "r.toml", *DRY],
         ("r.toml: sweep.task.recall[1].vocab_sise: unknown key (did you mean 'vocab_size'?); allowed here: ",
          "(zipped with task.kind='recall', train.steps=2000)"),
         files={"r.toml": 'extends = "paper/suite_attention"\n[sweep]\n"task.recall" = [{}, {vocab_sise = 64}'
                          + ", {}" * 23 + "]\n"}),
    Case("zipped-table-set-at-a-point-of-another-task", ["run", "r.toml", *DRY],
         ("r.toml: sweep.task.recall[4]: sets seq_len = 256 at a point whose task.kind is 'fuzzy_recall', which "
          "does not read [task.recall], so it would do nothing; write {} there",),
         files={"r.toml": 'extends = "paper/suite_attention"\n[sweep]\n"task.recall" = [{}, {vocab_size = 64}, '
                          '{seq_len = 512}, {num_train_examples = 1600}, '
                          '{seq_len = 256}' + ", {}" * 20 + "]\n"}),
    Case("zipped-task-kind-reordered-by-set-blames-the-set", ["run", "suite/tiny", *DRY, "--set",
         'sweep.task.kind=["fuzzy_recall", "recall", "noisy_recall", "selective_copy", "compression", "memorization"]'],
         ("error: --set: sweep.task.kind[0]: is 'fuzzy_recall', but sweep.task.recall[0] (zipped with it, set in ",
          "tiny.toml) sets seq_len = 64, ", "which a 'fuzzy_recall' point does not read; keep the zip's order, or set "
          "sweep.task.recall here too")),
    Case("zipped-task-kind-reordered-in-a-child-blames-the-child", ["run", "r.toml", *DRY],
         ("r.toml: sweep.task.kind[0]: is 'fuzzy_recall', but sweep.task.recall[0] (zipped with it, set in ",
          "tiny.toml) sets seq_len = 64, "),
         files={"r.toml": 'extends = "suite/tiny"\n[sweep]\n"task.kind" = ["fuzzy_recall", "recall", '
                          '"noisy_recall", "selective_copy", "compression", "memorization"]\n'}),
    Case("suite-setting-with-too-few-distinct-examples-at-dry-run", ["run", "paper/suite_attention", *DRY, "--set",
         "sweep.task.recall=[{}, {vocab_size = 4, seq_len = 4}, {seq_len = 512}, {num_train_examples = 1600}"
         + ", {}" * 21 + "]"],
         ("error: sweep point kind=recall,recall.vocab_size=4,recall.seq_len=4,steps=2000,lr=0.001,weight_decay=0.0,"
          "conv.kind=none,",
          "(and 15 more): --set: sweep.task.recall: only 0 of 1280 test examples could be drawn unlike every "
          "training example", "raise task.recall.vocab_size or seq_len")),
    Case("zipped-table-set-at-a-point-of-another-mixer", ["run", "r.toml", *DRY],
         ("r.toml: sweep.model.gated_deltanet[0]: sets expand_v = 1.0 at a point whose model.mixer is 'attention', "
          "which does not read [model.gated_deltanet], so it would do nothing; write {} there",),
         files={"r.toml": 'extends = "paper/mqar_gpu_check"\n[sweep]\n"model.mixer" = ["attention", '
                          '"gated_deltanet"]\n"model.gated_deltanet" = [{expand_v = 1.0}, {}]\n'
                          'zip = [["model.mixer", "model.gated_deltanet"]]\n'}),
    Case("sweep-combination-that-fails-names-the-point", ["run", "r.toml", *DRY],
         ("r.toml: sweep: point mixer=attention,conv.kind=none,d_model=64,n_heads=3: model.n_heads: d_model 64 is not "
          "divisible by n_heads 3 (or set model.head_dim)",),
         files={"r.toml": 'extends = "quickstart"\n[sweep]\n"model.d_model" = [48, 64]\n"model.n_heads" = [3, 6]\n'}),
    Case("misspelt-axis-beside-a-parents-zip", ["run", "r.toml", *DRY],
         ("r.toml: sweep.model.conv.knd: not a recipe key (did you mean 'model.conv.kind'?)",),
         files={"r.toml": 'extends = "quickstart"\n[sweep]\n"model.conv.knd" = ["none", "static", "dynamic"]\n'
                          '"model.d_model" = [32, 48, 64]\nzip = [["model.conv.knd", "model.d_model"]]\n'}),
    Case("misspelt-axis-the-zip-spells-right", ["run", "r.toml", *DRY],
         ("r.toml: sweep.model.conv.placment: not a recipe key (did you mean 'model.conv.placement'?)",),
         files={"r.toml": 'extends = "quickstart"\n[sweep]\n"model.conv.kind" = ["none", "static"]\n'
                          '"model.conv.placment" = ["qkv", "all_linear"]\n'
                          'zip = [["model.conv.kind", "model.conv.placement"]]\n'}),
    Case("one-value-axis-of-a-task-not-trained", ["run", "quickstart", *DRY, "--set", "sweep.task.recall.vocab_size=[64]"],
         ("error: --set: sweep.task.recall.vocab_size: task.kind is 'mqar' at every point, so this axis changes "
          "nothing",)),
    Case("set-zipped-value-names-the-set", ["run", "paper/suite_attention", *DRY, "--set",
                                            "sweep.task.recall=[{}, {vocab_size = 1}" + ", {}" * 23 + "]"],
         ("error: --set: sweep.task.recall[1].vocab_size: must be >= 4, got 1",
          "(zipped with task.kind='recall', train.steps=2000)")),
    Case("budget-shorter-than-warmup-at-dry-run", ["run", "lm/scaling_tiny", *DRY, "--set", "train.tokens_per_param=0.01"],
         ("sweep point conv.kind=none,conv.activation=auto,conv.residual=false,d_model=32: --set: "
          "train.tokens_per_param: a budget of 268 tokens is 1 step of 1,024 tokens, fewer than train.warmup_steps 20 (",
          "lm/scaling_tiny.toml); raise the budget or lower train.warmup_steps")),
    Case("budget-shorter-than-a-set-warmup-names-the-set", ["run", "lm/scaling_tiny", *DRY, "--set",
                                                             "train.warmup_steps=2000"],
         ("sweep point conv.kind=none,conv.activation=auto,conv.residual=false,d_model=32: ", "lm/scaling_tiny.toml: "
          "train.tokens_per_param: a budget of ", "fewer than train.warmup_steps 2000 (--set); raise the budget")),
    Case("mqar-budget-shorter-than-warmup-at-dry-run", ["run", "r.toml", *DRY, "--set", "train.tokens=100"],
         ("sweep point conv.kind=none: --set: train.tokens: a budget of 100 tokens is 4 steps of 32 tokens, "
          "fewer than train.warmup_steps 5 (", "r.toml); raise the budget or lower train.warmup_steps"),
         files={"r.toml": OK.replace("steps = 2\nwarmup_steps = 0", "warmup_steps = 5").replace("batch_size = 4",
                "batch_size = 2") + '[sweep]\n"model.conv.kind" = ["none", "static"]\n'}),
    Case("two-token-budgets-name-both-places", ["run", "lm/scaling_tiny", *DRY, "--set", "train.tokens=100000"],
         ("lm/scaling_tiny.toml: train.tokens_per_param: give one token budget: train.tokens = 100000 is set too "
          "(--set)",)),
    # --- eval
    Case("eval-missing-run-dir", ["eval", "--task", "mqar", "--run", "nope"], ("nope: no such run directory",)),
    Case("eval-without-a-run", ["eval", "--task", "mqar"], ("eval: which run? give its directory (or a sweep's "
                                                            "folder): `dcablate eval RUN` or `dcablate eval --run RUN`",)),
    Case("eval-two-runs", ["eval", "a", "--run", "b"], ("eval: RUN a and --run b name two folders; give one",)),
    Case("eval-missing-run-argument", ["eval", "nope"], ("error: nope: no such run directory",)),
    Case("eval-dir-without-recipe", ["eval", "--task", "mqar", "--run", "somedir"],
         ("somedir: not a run directory (no recipe.toml)",), dirs=("somedir",)),
    Case("eval-without-checkpoint", ["eval", "--task", "mqar", "--run", "rd"],
         ("rd: unfinished, no final checkpoint; finish it with `dcablate run rd`, then evaluate or sample it",),
         files={"rd/recipe.toml": OK}),
    Case("eval-unfinished-run", ["eval", "--run", "rd"],
         ("rd: unfinished (its newest checkpoint is step 4), no final checkpoint; finish it with `dcablate run rd`",),
         files={"rd/recipe.toml": OK, "rd/checkpoints/step-000004.pt": "x"}),
    Case("generate-unfinished-run", ["generate", "--run", "rd"],
         ("rd: unfinished, no final checkpoint; finish it with `dcablate run rd`",),
         files={"rd/recipe.toml": LM_OK}),
    Case("generate-temperature-nan", ["generate", "--run", "rd", "--temperature", "nan"],
         ("Invalid value for '--temperature': nan is not a number",), files={"rd/recipe.toml": LM_OK}),
    Case("eval-run-is-the-runs-recipe", ["eval", "--run", "rd/recipe.toml"],
         ("rd: unfinished, no final checkpoint",), files={"rd/recipe.toml": OK}),
    Case("eval-run-is-a-file-of-a-run", ["eval", "--run", "rd/checkpoints/step-000004.pt"],
         ("--run rd/checkpoints/step-000004.pt: is a file; --run takes a run directory (the run directory is 'rd')",),
         files={"rd/recipe.toml": OK, "rd/checkpoints/step-000004.pt": "x"}),
    Case("eval-set-task-kind", ["eval", "--run", "rd", "--set", "task.kind='recall'"],
         ("--set task.kind='recall': a run is measured on the task it was trained on (task.kind = 'mqar')",),
         files={"rd/recipe.toml": OK}),
    Case("eval-set-vocab-size", ["eval", "--run", "rd", "--set", "task.mqar.vocab_size=1024"],
         ("--set task.mqar.vocab_size=1024: decides the tokens the model was trained on; eval keeps the run's",),
         files={"rd/recipe.toml": OK}),
    Case("eval-set-training-segments", ["eval", "--run", "rd", "--set",
                                        "task.mqar.train=[{seq_len=64, num_kv_pairs=4, num_examples=64}]"],
         ("--set task.mqar.train=[{seq_len=64, num_kv_pairs=4, num_examples=64}]: sets the run's training data, "
          "which eval does not read (it measures the test set, drawn unlike the run's own training set); leave it "
          "out",), files={"rd/recipe.toml": OK}),
    Case("eval-set-the-lm-split", ["eval", "--run", "rd", "--set", "task.lm.split_seed=7"],
         ("--set task.lm.split_seed=7: decides which documents the run trained on and which it is tested on; another "
          "split would test it on text it trained on, so eval keeps the run's (task.lm.split_seed as in ",
          "; to test on other text: --data)"), files={"rd/recipe.toml": LM_OK}),
    Case("eval-set-another-lm-text", ["eval", "--run", "rd", "--set", "task.lm.data='other.txt'"],
         ("--set task.lm.data='other.txt': eval would split that text as the run split its own (",
          "and score only its validation share; to score all of another text give it as --data "),
         files={"rd/recipe.toml": LM_OK}),
    Case("eval-set-what-a-run-memorized", ["eval", "rd", "--set", "task.memorization.data_seed=7"],
         ("--set task.memorization.data_seed=7: decides what the run learned (task 'memorization': another value asks "
          "it what it was never taught), so eval keeps the run's (task.memorization.data_seed as in ",),
         files={"rd/recipe.toml": MEMORIZATION_OK}),
    Case("eval-whole-section-resets-what-a-run-memorized", ["eval", "rd", "--set", "task.memorization={seq_len=16}"],
         ("leaves task.memorization.data_seed at 0 where the run had 3",), files={"rd/recipe.toml": MEMORIZATION_OK}),
    Case("a-command-by-another-tools-word", ["list"], ("No such command 'list' (did you mean 'recipes'?).",)),
    Case("a-misspelt-command", ["evl", "rd"], ("No such command 'evl' (did you mean 'eval'?).",)),
    Case("a-misspelt-word-of-another-tool", ["lsit"], ("No such command 'lsit' (did you mean 'recipes'?).",)),
    Case("help-on-a-misspelt-command", ["help", "evl"], ("No such command 'evl' (did you mean 'eval'?).",)),
    Case("a-misspelt-help", ["halp"], ("No such command 'halp' (did you mean 'help'?).",)),
    Case("report-a-recipe-name", ["report", "lm/scaling_tiny"],
         ("lm/scaling_tiny: no such directory; a report reads run directories: recipe lm/scaling_tiny writes its runs "
          "into runs/lm_scaling_tiny, none yet (`dcablate run lm/scaling_tiny`)",)),
    Case("report-a-recipe-file-whose-runs-exist", ["report", "ok.toml"],
         ("ok.toml: not a directory; a report reads run directories: recipe ok.toml writes its runs into ",
          ": `dcablate report "), files={"ok.toml": OK.replace('out_dir = "out"', 'out_dir = "res"')}, dirs=("res/run",)),
    Case("report-a-folder-spelt-close", ["report", "runs/tiny_suit"],
         ("runs/tiny_suit: no such directory (did you mean 'runs/tiny_suite'?)",), dirs=("runs/tiny_suite",)),
    Case("eval-set-another-tasks-key", ["eval", "--run", "rd", "--set", "task.recall.vocab_size=64"],
         ("--set task.recall.vocab_size=64: this run's task is 'mqar', so [task.recall] does not apply to it (its "
          "settings: task.mqar.*)",), files={"rd/recipe.toml": OK}),
    Case("eval-folder-set-a-task-none-has", ["eval", "--run", "sw", "--set", "task.recall.vocab_size=64"],
         ("--set task.recall.vocab_size=64: no finished run below sw has task 'recall' (they have mqar), so "
          "[task.recall] applies to none of them",),
         files={"sw/p/recipe.toml": OK, "sw/p/checkpoints/final.pt": "x"}),
    Case("eval-set-another-tasks-section-whole", ["eval", "--run", "rd", "--set", "task.recall={vocab_size=64}"],
         ("--set task.recall={vocab_size=64}: this run's task is 'mqar', so [task.recall] does not apply to it",),
         files={"rd/recipe.toml": OK}),
    Case("eval-set-a-token-key-in-a-whole-section", ["eval", "--run", "rd", "--set", "task.mqar={vocab_size=1024}"],
         ("--set task.mqar={vocab_size=1024}: decides the tokens the model was trained on; eval keeps the run's "
          "(task.mqar.vocab_size as in",), files={"rd/recipe.toml": OK}),
    Case("eval-folder-set-a-whole-section-none-has", ["eval", "sw", "--set", "task.recall={vocab_size=64}"],
         ("--set task.recall={vocab_size=64}: no finished run below sw has task 'recall'",),
         files={"sw/p/recipe.toml": OK, "sw/p/checkpoints/final.pt": "x"}),
    Case("eval-a-gpu-run-without-its-weights", ["eval", "rd"],  # the weights first: no device would evaluate it
         ("rd: finished (summary.json), but its weights, checkpoints/final.pt, are not there",),
         files={"rd/recipe.toml": OK.replace('[run]\n', '[run]\ndevice = "cuda"\n'), "rd/summary.json": "{}"}),
    Case("eval-a-run-of-a-plugin-not-loaded", ["eval", "rd"],
         ("rd/recipe.toml: model.my_gla: unknown key", "; it was trained with DCABLATE_PLUGINS=my_gla: set it to "
          "read this run"),
         files={"rd/recipe.toml": OK + "[model.my_gla]\ndecay = 1.0\n", "rd/checkpoints/final.pt": "x",
                "rd/summary.json": '{"versions": {"plugins": ["my_gla"]}}'}),
    Case("eval-folder-bad-set", ["eval", "sw", "--set", "task.mqar.test=[{seq_len=63}]"],
         ("--set", "task.mqar.test", "seq_len", "must be even"),
         files={"sw/a/recipe.toml": OK, "sw/a/checkpoints/final.pt": "x", "sw/b/recipe.toml": OK,
                "sw/b/checkpoints/final.pt": "x"}),
    Case("eval-folder-task-none-of-its-runs-has", ["eval", "sw", "--task", "lm"],
         ("--task lm: no finished run below sw was trained on task 'lm' (they have mqar)",),
         files={"sw/a/recipe.toml": OK, "sw/a/checkpoints/final.pt": "x", "sw/b/recipe.toml": OK,
                "sw/b/checkpoints/final.pt": "x"}),
    Case("eval-folder-data-with-another-task", ["eval", "sw", "--task", "mqar", "--data", "t.txt"],
         ("--data is text for LM runs and --task mqar picks the mqar runs; drop one",),
         files={"sw/a/recipe.toml": OK, "sw/a/checkpoints/final.pt": "x", "sw/b/recipe.toml": LM_OK,
                "sw/b/checkpoints/final.pt": "x", "sw/b/text.txt": "hello"}),
    Case("eval-folder-set-of-a-task-filtered-out", ["eval", "sw", "--task", "mqar", "--set", "task.lm.eval_sequences=4"],
         ("--set task.lm.eval_sequences=4: --task mqar evaluates the mqar runs only, so [task.lm] applies to none of them",),
         files={"sw/a/recipe.toml": OK, "sw/a/checkpoints/final.pt": "x", "sw/b/recipe.toml": LM_OK,
                "sw/b/checkpoints/final.pt": "x", "sw/b/text.txt": "hello"}),
    Case("help-beyond-a-command", ["help", "run", "extra"],
         ("dcablate run takes no command; `dcablate help run` gives its help",)),
    Case("eval-bad-recipe-in-run-dir", ["eval", "--task", "mqar", "--run", "rd"],
         ("recipe.toml: model.d_modle", "did you mean 'd_model'"), files={"rd/recipe.toml": "[model]\nd_modle = 1\n"}),
    Case("eval-bad-set", ["eval", "--task", "mqar", "--run", "rd", "--set", "task.mqar.test=[{seq_len=63}]"],
         ("--set", "task.mqar.test", "seq_len", "must be even"), files={"rd/recipe.toml": OK}),
    Case("eval-bad-task", ["eval", "--task", "text", "--run", "rd"], ("Invalid value for '--task'", "'text'")),
    Case("eval-without-task-reads-the-runs", ["eval", "--run", "rd"], ("rd: unfinished",),
         files={"rd/recipe.toml": OK}),
    Case("eval-set-a-training-key", ["eval", "--run", "rd", "--set", "train.lr=1"],
         ("--set train.lr=1: eval re-measures a trained run", "it takes task.*, eval.batch_size, run.device"), files={"rd/recipe.toml": OK}),
    Case("eval-set-a-misspelled-key", ["eval", "--run", "rd", "--set", "eval.batchsize=1"],
         ("--set eval.batchsize=1: no such key (did you mean 'eval.batch_size'?)",), files={"rd/recipe.toml": OK}),
    Case("eval-set-a-whole-section", ["eval", "--run", "rd", "--set", "eval={batch_size=8}"],
         ("--set eval={batch_size=8}: eval takes the keys of [eval] one by one, not the whole table (did you mean "
          "'eval.batch_size'?)",), files={"rd/recipe.toml": OK}),
    Case("eval-a-misspelled-run-directory", ["eval", "sw/conv.kind=statc"],
         ("sw/conv.kind=statc: no such run directory (did you mean 'conv.kind=static'?)",),
         files={"sw/conv.kind=static/recipe.toml": OK, "sw/conv.kind=none/recipe.toml": OK}),
    Case("info-a-misspelled-run-folder", ["info", "sw/conv.kind=nne"],
         ("sw/conv.kind=nne: no such recipe file or shipped recipe (did you mean 'conv.kind=none'?)",),
         files={"sw/conv.kind=static/recipe.toml": OK, "sw/conv.kind=none/recipe.toml": OK}),
    Case("eval-a-folder-of-sweeps", ["eval", "runs"],  # every run below, as report reads them: none finished
         ("runs: none of its 2 runs has finished; finish them by running the sweep's recipe again",),
         files={"runs/a/p/recipe.toml": OK, "runs/b/q/recipe.toml": OK}),
    Case("eval-a-sweep-folder-none-finished", ["eval", "--run", "sw"], ("sw: none of its 1 runs has finished; finish "
         "them by running the sweep's recipe again (`dcablate run sw/POINT` finishes one), then evaluate",), files={"sw/p/recipe.toml": OK}),
    Case("generate-a-sweep-folder", ["generate", "--run", "sw"], ("sw: not a run directory (no recipe.toml); it holds "
         "1 run, e.g. --run 'sw/p'",), files={"sw/p/recipe.toml": OK}),
    Case("run-a-sweep-directory", ["run", "sw/"], ("sw/: the run directory of a sweep, not a recipe; give the "
         "sweep's recipe or one point's folder (sw/POINT), or see its results with `dcablate report sw`",),
         files={"sw/p/recipe.toml": OK, "sw/points.txt": "p\n"}),
    Case("info-a-sweep-directory", ["info", "sw"], ("sw: the run directory of a sweep, not a recipe; give the "
         "sweep's recipe or one point's folder",), files={"sw/p/recipe.toml": OK, "sw/points.txt": "p\n"}),
    Case("run-a-folder-of-runs", ["run", "runs"], ("runs: a folder holding 2 run directories, not a recipe; give a "
         "recipe (a .toml file or a shipped recipe's name, `dcablate recipes`), or one run's folder to resume it, or "
         "see their results with `dcablate report runs`",),
         files={"runs/a/recipe.toml": OK, "runs/sweep/p/recipe.toml": OK}),
    Case("eval-a-finished-run-without-its-weights", ["eval", "--run", "r"], ("r: finished (summary.json), but its "
         "weights, checkpoints/final.pt, are not there",), files={"r/recipe.toml": OK, "r/summary.json": "{}\n"}),
    Case("eval-another-task", ["eval", "--run", "r", "--task", "lm"],
         ("--task lm: this run was trained on task.kind = 'mqar' and is measured on that task only (--task mqar, or "
          "leave --task out)",), files={"r/recipe.toml": OK}),
    # --- info
    Case("info-bad-recipe", ["info", "r.toml"], ("r.toml: model.d_modle", "did you mean 'd_model'"),
         files={"r.toml": "[model]\nd_modle = 64\n"}),
    Case("info-bad-tokenizer-file-names-the-recipe", ["info", "r.toml"],
         ("r.toml: task.lm.tokenizer_file: ", "bad.json: not a tokenizer.json"),
         files={"r.toml": '[task]\nkind = "lm"\n[task.lm]\ndata = "x"\ntokenizer = "bpe"\n'
                          'tokenizer_file = "bad.json"\n', "bad.json": '{"bad": 1}'}),
    Case("info-missing-recipe", ["info", "nope"], ("nope: no such recipe file",)),
    bad_set("info-bad-set", ["model.n_heads=3"], "--set: model.n_heads", "not divisible", cmd="info"),
    # --- command line
    Case("unknown-option", ["run", "ok.toml", "--bogus"], ("No such option", "--bogus")),
    Case("unknown-option-did-you-mean", ["run", "ok.toml", "--dryrun"], ("No such option", "'--dry-run'")),
    Case("unknown-command", ["trian"], ("No such command 'trian'",)),
    Case("missing-argument", ["run"], ("Missing argument 'RECIPE'",)),
    Case("extra-argument", ["run", "ok.toml", "extra", *DRY], ("unexpected extra argument (extra)",)),
    # --- checks at the start of a real run (must fail before anything is written)
    Case("device-cuda-without-cuda", [*TINY_RUN, "--set", "run.device=cuda"], ("run.device", "no CUDA device"),
         cpu_only=True),
    Case("backend-fla-without-cuda-gdn", [*TINY_RUN, "--set", "model.mixer=gated_deltanet",
                                          "--set", "model.backend=fla"], ("model.backend", "CUDA"), cpu_only=True),
    Case("backend-fla-without-cuda-attention", [*TINY_RUN, "--set", "model.backend=fla"], ("model.backend", "CUDA"),
         cpu_only=True),
    Case("out-dir-is-a-file", [*TINY_RUN, "--set", "run.out_dir=ok.toml/sub", "--set", "run.device=cpu"],
         ("ok.toml",)),
]


# ----------------------------------------------------------------------------------------- reliability (issue 7)
# Run-directory cases train into ./prev (never ./out); checkpoint files are built here with torch.


def _resolved(**changes) -> dict:
    """The resolved recipe of `ok.toml --set run.out_dir=prev`, with dotted-key changes."""
    import tomllib

    data = tomllib.loads(OK)
    data["run"]["out_dir"] = "prev"
    for key, value in changes.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return R.build(data)


def _ckpt(payload) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _weights(**changes) -> dict:
    from dcablate.models.costs import build_model

    return build_model(_resolved(**changes), 64).state_dict()


PREV_RUN = ["run", "ok.toml", "--quiet", "--set", "run.out_dir=prev"]
PREV_TOML = _resolved().to_toml()
FINAL = _ckpt({"model": _weights(), "step": 2, "vocab_size": 64})

CASES += [
    # --- new recipe keys: [checkpoint], train.micro_batch_size, train.nonfinite
    bad("checkpoint-every-negative", "[checkpoint]\nevery = -1\n", "r.toml: checkpoint.every", "must be >= 0, got -1"),
    bad("checkpoint-keep-zero", "[checkpoint]\nkeep = 0\n", "r.toml: checkpoint.keep", "must be >= 1, got 0"),
    bad("checkpoint-unknown-key", "[checkpoint]\nevry = 10\n", "r.toml: checkpoint.evry: unknown key",
        "did you mean 'every'", "allowed here: every, keep"),
    bad("checkpoint-not-a-table", "checkpoint = 5\n", "r.toml: checkpoint", "must be a table, got int 5"),
    bad("checkpoint-every-float", "[checkpoint]\nevery = 1.5\n", "r.toml: checkpoint.every", "must be an integer"),
    bad("checkpoint-keep-bool", "[checkpoint]\nkeep = true\n", "r.toml: checkpoint.keep", "boolean true"),
    bad("micro-batch-over-batch", "[train]\nbatch_size = 4\nmicro_batch_size = 8\n", "r.toml: train.micro_batch_size",
        "8 is more than train.batch_size 4"),
    bad("micro-batch-negative", "[train]\nmicro_batch_size = -2\n", "r.toml: train.micro_batch_size", "must be >= 0"),
    bad("nonfinite-bad-choice", '[train]\nnonfinite = "skp"\n', "r.toml: train.nonfinite",
        "'skp' is not one of stop|skip", "did you mean 'skip'"),
    bad("sweep-micro-batch-over-batch", '[sweep]\n"train.micro_batch_size" = [2, 400]\n',
        "r.toml: sweep.train.micro_batch_size", "value 400", "more than train.batch_size"),
    bad_set("set-checkpoint-keep-string", ["checkpoint.keep=all"], "--set: checkpoint.keep",
            "must be an integer, got str 'all'"),
    bad_set("set-nonfinite-bad-choice", ["train.nonfinite=ignore"], "--set: train.nonfinite", "not one of stop|skip"),
    Case("force-new-takes-no-value", ["run", "ok.toml", "--force-new=yes"],
         ("Option '--force-new' does not take a value",)),
    # --- an existing run directory: resume, refuse, or say why not
    Case("resume-changed-recipe", PREV_RUN, ("prev/run: recipe changed since this run started (train.lr: 0.002 -> "
                                             "0.001); use --force-new",),
         files={"prev/run/recipe.toml": _resolved(train__lr=2e-3).to_toml()}),
    Case("resume-changed-recipe-many-keys", [*PREV_RUN, *DRY],  # past four changes, the rest by key: all named
         ("recipe changed", "model.d_model: 64 -> 32", "run.seed: 4 -> 0, and 2 more keys (train.batch_size, "
          "train.lr)"),
         files={"prev/run/recipe.toml": _resolved(train__lr=2e-3, model__d_model=64, model__n_layers=3,
                                                  run__seed=4, eval__every=7, train__batch_size=8).to_toml()}),
    Case("resume-run-dir-is-a-file", PREV_RUN, ("prev/run: exists and is not a directory",), files={"prev/run": "x"}),
    Case("resume-not-a-run-dir", PREV_RUN, ("prev/run: exists but is not a run directory (no recipe.toml)",),
         files={"prev/run/notes.txt": "mine"}),
    Case("sweep-into-a-single-run", [*PREV_RUN, "--set", "sweep.train.lr=[1e-3, 2e-3]"],
         ("prev/run: holds a single run, not this sweep",), files={"prev/run/recipe.toml": PREV_TOML}),
    Case("resume-bad-recipe-in-run-dir", PREV_RUN, ("prev/run/recipe.toml: model.d_modle", "unknown key"),
         files={"prev/run/recipe.toml": "[model]\nd_modle = 1\n"}),
    Case("finished-run-summary-unreadable", PREV_RUN, ("prev/run/summary.json: unreadable",),
         files={"prev/run/recipe.toml": PREV_TOML, "prev/run/summary.json": "{not json"}),
    Case("resume-checkpoint-of-another-recipe", PREV_RUN,
         ("step-000001.pt: written by another recipe (model.d_model: 16 -> 32)", "--force-new"),
         files={"prev/run/recipe.toml": PREV_TOML, "prev/run/checkpoints/step-000001.pt": _ckpt(
             {"model": _weights(model__d_model=16), "step": 1, "recipe": _resolved(model__d_model=16).to_dict()})}),
    Case("resume-checkpoint-of-another-shape", PREV_RUN,
         ("step-000001.pt: checkpoint does not fit the recipe's model", "size mismatch"),
         files={"prev/run/recipe.toml": PREV_TOML, "prev/run/checkpoints/step-000001.pt": _ckpt(
             {"model": _weights(model__d_model=16), "step": 1, "recipe": _resolved().to_dict()})}),
    Case("resume-from-a-weights-only-file", PREV_RUN, ("step-000001.pt: not a step checkpoint (no 'optimizer')",),
         files={"prev/run/recipe.toml": PREV_TOML, "prev/run/checkpoints/step-000001.pt": _ckpt(
             {"model": _weights(), "step": 1, "recipe": _resolved().to_dict()})}),
    # --- dcablate eval on damaged or foreign checkpoints, and on a machine without the recipe's GPU
    Case("eval-final-garbage", ["eval", "--task", "mqar", "--run", "rd"], ("final.pt: unreadable checkpoint",),
         files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": b"PK\x03\x04 not a zip"}),
    Case("eval-final-truncated", ["eval", "--task", "mqar", "--run", "rd"], ("final.pt: unreadable checkpoint",),
         files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": FINAL[: len(FINAL) // 2]}),
    Case("eval-final-checksum-mismatch", ["eval", "--task", "mqar", "--run", "rd"],
         ("rd/checkpoints/final.pt: checksum mismatch (truncated or corrupt file)",),
         files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": FINAL,
                "rd/checkpoints/final.pt.sha256": "0" * 64 + "  final.pt\n"}),
    Case("eval-final-not-a-checkpoint", ["eval", "--task", "mqar", "--run", "rd"],
         ("final.pt: not a dcablate checkpoint",), files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": _ckpt([1])}),
    Case("eval-final-of-another-shape", ["eval", "--task", "mqar", "--run", "rd"],
         ("rd: checkpoint does not fit the recipe's model", "size mismatch for embed.weight"),
         files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": _ckpt(
             {"model": _weights(model__d_model=16), "step": 2, "vocab_size": 64})}),
    Case("eval-device-cuda-without-cuda", ["eval", "--task", "mqar", "--run", "rd", "--set", "run.device=cuda"],
         ("run.device = 'cuda' but no CUDA device",), files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": FINAL},
         cpu_only=True),
    Case("eval-backend-fla-without-cuda", ["eval", "--task", "mqar", "--run", "rd", "--set", "model.backend=fla"],
         ("model.backend = 'fla' needs a CUDA device",), files={"rd/recipe.toml": OK, "rd/checkpoints/final.pt": FINAL},
         cpu_only=True),
    Case("eval-run-is-a-file", ["eval", "--task", "mqar", "--run", "f.txt"], ("--run f.txt: is a file; --run takes a "
                                                                           "run directory",),
         files={"f.txt": "x"}),
]


def _setup(case: Case, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.toml").write_text(OK)
    for name, text in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    for d in case.dirs:
        (tmp_path / d).mkdir(parents=True)
    if case.shipped:
        fake = {}
        for name in case.shipped:
            fake[name] = tmp_path / "shipped" / f"{name}.toml"
            fake[name].parent.mkdir(exist_ok=True)
            fake[name].write_text(OK)
        real = R.shipped_recipes()
        monkeypatch.setattr(R, "shipped_recipes", lambda: {**real, **fake})
    if case.cpu_only and cuda_available():
        pytest.skip("needs a machine without CUDA")


def _check(case: Case, rc: int, out: str, err: str, tmp_path: Path) -> None:
    assert "Traceback" not in err and "Traceback" not in out, err
    assert rc == 2, f"exit code {rc}, stderr: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line: {err!r}"
    line = lines[0]
    assert line.startswith("error: ") and line.strip() != "error:", line
    for fragment in case.expect:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (tmp_path / "out").exists(), "a run directory was written before the error"
    assert not (tmp_path / "rd" / "eval").exists(), "eval wrote results before the error"


def test_enough_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_cli_error(case: Case, tmp_path, monkeypatch, capsys):
    _setup(case, tmp_path, monkeypatch)
    rc = main(case.argv)
    out, err = capsys.readouterr()
    _check(case, rc, out, err, tmp_path)


def test_valid_recipe_passes_dry_run(tmp_path, monkeypatch, capsys):
    """The fixture recipe every case starts from is itself valid (so each case fails for its own reason)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.toml").write_text(OK)
    assert main(["run", "ok.toml", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(os.path.join("out", "run"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- end to end


def _script() -> list[str]:
    exe = Path(sys.executable).parent / "dcablate"
    found = str(exe) if exe.is_file() else shutil.which("dcablate")
    if not found:
        pytest.skip("the dcablate console script is not installed")
    return [found]


SUBPROCESS = {
    "unknown-key": "module",
    "invalid-toml": "script",
    "set-bad-choice": "module",
    "extends-cycle": "script",
    "missing-recipe": "module",
    "unknown-option": "script",
    "eval-missing-run-dir": "module",
    "device-cuda-without-cuda": "script",
    "resume-changed-recipe": "script",
    "eval-final-checksum-mismatch": "module",
}


@pytest.mark.parametrize("case_id, how", sorted(SUBPROCESS.items()))
def test_cli_error_end_to_end(case_id, how, tmp_path, monkeypatch):
    case = next(c for c in CASES if c.id == case_id)
    assert not case.bug
    _setup(case, tmp_path, monkeypatch)
    cmd = [sys.executable, "-m", "dcablate.cli"] if how == "module" else _script()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*cmd, *case.argv], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    _check(case, proc.returncode, proc.stdout, proc.stderr, tmp_path)


def test_a_short_run_clamps_the_files_warmup_and_says_so(tmp_path, monkeypatch, capsys):
    """`--set train.steps=N` below the recipe file's warmup: the run warms up over N steps, says so once, and
    its recipe.toml records it; the same contradiction inside one file stays an error (see the table)."""
    (tmp_path / "r.toml").write_text(OK.replace("steps = 2\nwarmup_steps = 0\n", "steps = 50\nwarmup_steps = 20\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--quiet", "--set", "train.steps=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("train.warmup_steps 20 (") == 1 and "is more than train.steps 3 (--set)" in err
    saved = list((tmp_path / "out").rglob("recipe.toml"))
    assert saved and all("warmup_steps = 3" in p.read_text() for p in saved)


def test_steps_set_to_the_files_warmup_say_the_run_never_decays(tmp_path, monkeypatch, capsys):
    """`--set train.steps=N` equal to the recipe file's warmup: the whole run warms up; one note says so (the
    learning rate would otherwise end at its peak with no word)."""
    (tmp_path / "r.toml").write_text(OK.replace("steps = 2\nwarmup_steps = 0\n", "steps = 50\nwarmup_steps = 3\n"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--quiet", "--dry-run", "--set", "train.steps=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: train.warmup_steps 3 (") == 1 and "equals train.steps 3 (--set): the whole run warms " \
        "up, so the learning rate never decays" in err, err
    assert main(["run", "r.toml", "--quiet", "--dry-run", "--set", "train.steps=4"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_model_settings_no_run_reads_are_said_once(tmp_path, monkeypatch, capsys):
    """A mixer's section beside another mixer, or a [model.conv] key that no point's conv kind reads, does
    nothing: one note each, naming where it was set. Read by some point (a swept mixer, a dynamic conv), or set
    only in a base recipe the named one extends (bench/mamba2_120m over gdn_125m's [model.gated_deltanet]), they
    are silent."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "--dry-run", "--set", "model.conv.rank=4", "--set",
                 "model.mamba2.state_size=32"]) == 0
    err = capsys.readouterr().err
    assert "note: model.conv.rank is set (--set) but no conv kind of these runs (none / static) reads it: it does " \
           "nothing for these runs" in err
    assert "note: model.mamba2 is set (--set) but model.mixer is 'attention / gated_deltanet': it does nothing " \
           "for these runs" in err
    assert main(["run", "quickstart", "--dry-run", "--set", "model.mixer=mamba2", "--set", "sweep={}",
                 "--set", "model.n_heads=4"]) == 0
    assert "note: model.n_heads is set (--set) but no component of these runs (ffn none / mamba2) reads it: it " \
           "does nothing for these runs" in capsys.readouterr().err
    assert main(["run", "quickstart", "--dry-run", "--set", "model.gated_deltanet.expand_v=2.0", "--set",
                 "sweep.model.conv.kind=[\"none\", \"dynamic\"]", "--set", "model.conv.rank=8"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["info", "bench/mamba2_120m"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_runs_own_recipe_is_silent_about_what_its_point_left_unread(tmp_path, monkeypatch, capsys):
    """A conv-free point of a zipped sweep writes `model.conv.residual = false` into its recipe.toml: resuming or
    inspecting that run says nothing of it (the sweep set it), though a --set of an unread key is still noted."""
    from dcablate.config import loading

    monkeypatch.setattr(loading, "_said", set())
    run_dir = tmp_path / "runs" / "point"
    run_dir.mkdir(parents=True)
    from dcablate import config

    r = config.build({"model": {"conv": {"kind": "none", "residual": False}}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    (run_dir / "metrics.jsonl").write_text("")  # a run's folder: its record beside its recipe
    assert main(["info", str(run_dir / "recipe.toml")]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["info", str(run_dir / "recipe.toml"), "--set", "model.conv.rank=4"]) == 0
    assert "note: model.conv.rank is set (--set)" in capsys.readouterr().err
    (run_dir / "metrics.jsonl").unlink()  # the same file anywhere else is a recipe someone wrote
    assert main(["info", str(run_dir / "recipe.toml")]) == 0
    assert "note: model.conv.residual is set" in capsys.readouterr().err


def test_core_and_task_keys_other_settings_leave_unread_are_said_once(tmp_path, monkeypatch, capsys):
    """`train.steps` beside a token budget, and a BPE's `vocab_size` with byte tokens, do nothing: a note each when
    set to other than the default; at the default (as a saved run's recipe.toml writes every key) nothing."""
    from dcablate.config import loading

    monkeypatch.setattr(loading, "_said", set())  # a note is said once per process: earlier tests may have said it
    (tmp_path / "text").mkdir()
    for i in range(4):
        (tmp_path / "text" / f"{i}.txt").write_text("some words of text to read\n" * 50)
    (tmp_path / "lm.toml").write_text('[run]\ndevice = "cpu"\n[task]\nkind = "lm"\n[task.lm]\ndata = "text"\n'
                                      'seq_len = 16\n[train]\ntokens_per_param = 1.0\nwarmup_steps = 0\n')
    monkeypatch.chdir(tmp_path)
    assert main(["run", "lm.toml", "--dry-run", "--set", "train.steps=100", "--set", "task.lm.vocab_size=4000"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: ") == 2
    assert "note: train.steps is set (--set) but the token budget (train.tokens_per_param) sets the steps: it does " \
           "nothing for these runs" in err
    assert "note: task.lm.vocab_size is set (--set) but task.lm.tokenizer is 'byte' (257 symbols)" in err
    assert main(["run", "lm.toml", "--dry-run", "--set", "train.steps=1000", "--set", "task.lm.vocab_size=4096"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_settings_of_a_task_no_run_trains_on_are_said_and_an_axis_over_them_refused(tmp_path, monkeypatch, capsys):
    """`task.recall.*` on an MQAR recipe does nothing: one note says so; a sweep axis over it would train the same
    run once per value, so it is refused, led by where it was set. A recipe that sweeps task.kind is silent."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "--dry-run", "--set", "task.recall.seq_len=33"]) == 0
    err = capsys.readouterr().err
    assert "note: task.recall is set (--set) but task.kind is 'mqar': its settings do nothing for these runs" in err
    assert main(["run", "quickstart", "--dry-run", "--set", "sweep.task.recall.seq_len=[32, 64]"]) == 2
    assert capsys.readouterr().err == ("error: --set: sweep.task.recall.seq_len: task.kind is 'mqar' at every point, "
                                       "so this axis changes nothing (each of its values would train the same run); "
                                       "drop it, or sweep task.kind too\n")
    assert main(["run", "paper/suite_attention", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err
    # a recipe extending a suite drops a task's axis by giving it the section's defaults, {}, at every point
    (tmp_path / "two.toml").write_text(
        'extends = "suite/tiny"\n[sweep]\n"model.conv.kind" = ["none", "dynamic"]\n'
        '"task.kind" = ["recall", "memorization"]\n"task.recall" = [{seq_len = 32}, {}]\n'
        + "".join(f'"task.{t}" = [{{}}, {{}}]\n' for t in ("fuzzy_recall", "noisy_recall", "selective_copy",
                                                           "compression"))
        + '"task.memorization" = [{}, {vocab_size = 64}]\n')
    assert main(["run", "two.toml", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("(recipe ") == 4  # two convs x two tasks
    (tmp_path / "two.toml").write_text((tmp_path / "two.toml").read_text().replace(
        '"task.compression" = [{}, {}]', '"task.compression" = [{}, {seq_len = 64}]'))
    assert main(["run", "two.toml", "--dry-run"]) == 2  # a setting for a task no point trains: still refused
    assert "compression" in capsys.readouterr().err


def test_a_sweep_point_error_names_the_key_the_user_set(tmp_path, monkeypatch, capsys):
    """A --set value that no sweep point can take is blamed on --set and its key, not on the sweep axis."""
    (tmp_path / "r.toml").write_text(OK + '[sweep]\n"model.conv.kind" = ["none", "static"]\n')
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--dry-run", "--set", "model.d_model=30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set: model.d_model: RoPE needs an even head dim, got 15")
    assert "(with " not in err  # every point fails alike: no point is named


def test_a_sweep_value_that_clashes_with_an_extended_recipe_is_blamed_on_the_axis(tmp_path, monkeypatch, capsys):
    """A swept value that clashes with a key of a recipe the user's file extends (or with the named recipe, when
    the axis comes from --set) is blamed where the user set the axis, naming the other key and its file."""
    from dcablate.config.loading import shipped_recipes

    (tmp_path / "s.toml").write_text('extends = "quickstart"\n[sweep]\n"task.mqar.vocab_size" = [256, 6]\n')
    monkeypatch.chdir(tmp_path)
    tail = (f"sweep.task.mqar.vocab_size: value 6: clashes with task.mqar.train[0].num_kv_pairs (from "
            f"{shipped_recipes()['quickstart']}): needs fewer than vocab_size/2 = 3 distinct keys\n")
    assert main(["run", "s.toml", "--dry-run"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 's.toml'}: {tail}"
    assert main(["run", "quickstart", "--dry-run", "--set", "sweep.task.mqar.vocab_size=[256, 6]"]) == 2
    assert capsys.readouterr().err == f"error: --set: {tail}"


def test_a_resume_under_an_edited_plugin_module_is_refused(tmp_path, monkeypatch, capsys):
    """A checkpoint keeps the digests of the DCABLATE_PLUGINS modules that wrote it: resumed under an edited one, the
    run would mix two versions of it under the new digest, so the resume is refused, naming the module."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.toml").write_text(OK)
    (tmp_path / "edited_plugin.py").write_text("# a plugin module, edited since the checkpoint\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DCABLATE_PLUGINS", "edited_plugin")
    (tmp_path / "prev/run/checkpoints").mkdir(parents=True)
    (tmp_path / "prev/run/recipe.toml").write_text(PREV_TOML)
    (tmp_path / "prev/run/checkpoints/step-000001.pt").write_bytes(_ckpt(
        {"model": _weights(), "step": 1, "recipe": _resolved().to_dict(),
         "plugin_digests": {"edited_plugin": "0123456789ab"}}))
    assert main(PREV_RUN) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-000001.pt: written with another version of a plugin module " \
        "(edited_plugin 0123456789ab -> " in err and "restore it to resume, or use --force-new" in err, err


def test_eval_of_a_run_being_trained_says_who_is_training_it(tmp_path, monkeypatch, capsys):
    """An unfinished run that another process holds (`.lock`) is being trained, not waiting to be finished."""
    import fcntl

    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rd" / "checkpoints").mkdir(parents=True)
    (tmp_path / "rd" / "recipe.toml").write_text(OK)
    (tmp_path / "rd" / "checkpoints" / "step-000004.pt").write_text("x")
    with open(tmp_path / "rd" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        assert main(["eval", "--run", "rd"]) == 2
    assert capsys.readouterr().err == ("error: rd: unfinished (its newest checkpoint is step 4), no final checkpoint: "
                                       "another dcablate process (pid 4242) is training it now; evaluate or sample it "
                                       "once it has finished\n")
