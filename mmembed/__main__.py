"""`python -m mmembed ...` (what `torchrun -m mmembed ...` runs in each process): the CLI."""

import sys

from mmembed.cli import main

sys.exit(main())
