"""Triton kernels for nanorlhf's hot spots, one literate file per kernel family.

Each file reads top to bottom: the math (docstring) -> `reference`, a pure-PyTorch spec -> `@triton.jit` kernels ->
launchers that check shapes -> a `torch.autograd.Function` -> a benchmark under `if __name__ == "__main__"`.
The model reaches them only through the seams in `nanorlhf/ops.py`.
"""
