import os

import torch

# Triton kernels run in the interpreter on a machine without a GPU. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
