import os
import tempfile

import torch

# Triton kernels run in the interpreter on a machine without a GPU. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny model and generated games go to a fresh cache, never the user's (subprocesses inherit it).
os.environ["OEL_CACHE"] = tempfile.mkdtemp(prefix="oel-test-cache-")

# The tests run tiny models: one thread is fastest and keeps parallel runs on a small machine from stalling.
torch.set_num_threads(1)
