"""`python -m dcablate`: the command line, as torchrun launches it (`torchrun ... -m dcablate run RECIPE`)."""

import sys

from dcablate.cli import main

sys.exit(main())
