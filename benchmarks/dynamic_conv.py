"""Dynamic short conv speed table (see dcablate/bench.py); also `dcablate bench conv`."""

from dcablate.bench.kernels import main

if __name__ == "__main__":
    main()
