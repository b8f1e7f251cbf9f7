"""Dynamic short conv speed table (see dcablate/bench/kernels.py); also `dcablate bench conv`."""

from dcablate.bench.kernels import main

if __name__ == "__main__":
    main()
