"""`python -m mmembed ...` (what `torchrun -m mmembed ...` runs in each process): the CLI."""

import logging
import os
import sys

from mmembed.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A process of a torchrun job leaves without the interpreter's teardown: gloo's threads
    # outlive destroy_process_group, and the teardown now and then destroyed them still joinable
    # ("terminate called without an active exception", SIGABRT) after a run that had finished
    # and saved everything. Its output is flushed first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
