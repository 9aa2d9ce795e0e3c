import os

import torch

# On a machine without CUDA the Triton kernels can only run interpreted; the interpreter is
# chosen when triton.jit decorates a function, so it must be set before any kernel import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
