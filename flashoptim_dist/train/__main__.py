"""``python -m flashoptim_dist.train [train|compare] [--config FILE] [section.key=value ...]``."""

import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: destroying C++ communicator objects (gloo/NCCL threads)
    # in arbitrary order at exit occasionally aborts a finished run ("terminate called without
    # an active exception"). The process group was already ended cleanly by main().
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
