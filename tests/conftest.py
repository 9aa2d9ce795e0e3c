import os
import sys

import torch

# On a machine without CUDA the Triton kernels can only run interpreted; the interpreter is
# chosen when triton.jit decorates a function, so it must be set before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests live in folders that mirror the package (tests/optim, tests/checkpoint, ...); the helpers
# they share (dist_utils, tolerances, launch_helpers, ...) stay here in tests/ and are imported by
# module name from any folder.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
