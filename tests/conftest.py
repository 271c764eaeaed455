"""Shared test set-up. Runs before any test module imports a kernel file."""

import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors (slow: tests keep shapes small).
# It must be set before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
