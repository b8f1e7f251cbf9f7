"""Training-step speed of recipes (see dcablate/bench/train.py); the same as `dcablate bench train ARGS`."""

import sys

from dcablate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
