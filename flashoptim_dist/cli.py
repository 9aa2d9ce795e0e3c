"""The ``flashoptim-dist`` command: one entry point, three command groups.

    flashoptim-dist train   [--config FILE] [section.key=value ...]   # the main job
    flashoptim-dist compare [--config FILE] [section.key=value ...]   # Flash vs its torch baseline
    flashoptim-dist ckpt {inspect,export,convert} ...                 # checkpoint tools

Each group lives with its own code (:mod:`flashoptim_dist.train.cli`,
:mod:`flashoptim_dist.checkpoint.cli`); this module only dispatches, importing the group that
is asked for and nothing else.
"""

from __future__ import annotations

import sys
from typing import List, Optional

__all__ = ["main"]

_USAGE = __doc__.split("\n\n")[1]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage:\n" + _USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "compare"):
        import os

        from .train.cli import main as train_main

        code = int(train_main([command, *rest]) or 0)
        # Leave without interpreter shutdown: after a distributed run, tearing down torch's
        # and gloo's globals at exit occasionally aborts a finished job (seen on CPU, ~1 in 4).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if command == "ckpt":
        from .checkpoint.cli import main as ckpt_main

        return int(ckpt_main(rest) or 0)
    print(f"flashoptim-dist: unknown command {command!r}; expected train, compare or ckpt\nusage:\n{_USAGE}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
