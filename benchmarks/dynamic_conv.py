"""Dynamic short conv speed table (see dcablate/bench/kernels.py); the same as `dcablate bench conv ARGS`."""

import sys

from dcablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "conv", *sys.argv[1:]]))
