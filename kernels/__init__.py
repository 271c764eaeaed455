"""Triton kernels for nanorlhf's hot spots, one literate file per kernel family.

Each file reads top to bottom: the math (docstring) -> `reference`, a pure-PyTorch spec -> `@triton.jit` kernels ->
launchers that check shapes -> `torch.autograd.Function`s. They import nothing from `nanorlhf`: the model reaches
them only through the seams in `nanorlhf/ops.py`. Their benchmarks live in `bench/` (`python -m bench.attention`).
"""
