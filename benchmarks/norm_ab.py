"""The model's RMSNorms on fla's kernel against torch's, in one process on one card: `dcablate bench train ARGS`
twice, first with torch's norms (as before fla's), then with fla's (what ships), each printing its table.

    python benchmarks/norm_ab.py paper/mqar_gated_deltanet --set 'sweep={}' --set run.device=cuda \\
        --set model.d_model=64 --warmup 20 --steps 40                                   # .ci/gpu norm-ab
"""

import sys

from dcablate.cli import main
from dcablate.kernels import rms_norm


def run(argv: list[str]) -> int:
    shipped = rms_norm._fla_installed
    rc = 0
    for label, installed in (("torch's RMSNorm", lambda: False), ("fla's RMSNorm", shipped)):
        print(f"\n## {label}", flush=True)
        rms_norm._fla_installed = installed  # "auto" keeps torch's kernel when fla looks absent
        try:
            rc = max(rc, main(["bench", "train", *argv]))
        finally:
            rms_norm._fla_installed = shipped
    return rc


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
