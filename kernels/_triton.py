"""Import Triton if it is installed; otherwise stand-ins that let a kernel file be imported for its `reference`.

Triton has wheels for Linux only. On macOS the pure-PyTorch references (and so the whole pipeline on CPU) must still
work, so a kernel file does `from kernels._triton import triton, tl, HAVE_TRITON` instead of `import triton`:
`@triton.jit` then wraps the kernel in a function that raises a clear error if anything tries to launch it.
"""

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # no Triton wheel for this platform
    HAVE_TRITON = False

    class _NoTriton:
        """Just enough of `triton` / `triton.language` for kernel definitions to be evaluated at import."""

        constexpr = int  # used only in annotations (`BLOCK: tl.constexpr`)

        @staticmethod
        def jit(fn=None, **kwargs):
            def wrap(f):
                def missing(*args, **kw):
                    raise RuntimeError(f"Triton is not installed, so the kernel {f.__name__} cannot run; "
                                       "use NANORLHF_KERNELS=torch (the PyTorch path)")
                return missing
            return wrap(fn) if fn is not None else wrap

        @staticmethod
        def cdiv(a, b):
            return (a + b - 1) // b

        @staticmethod
        def next_power_of_2(n):
            return 1 << (max(int(n), 1) - 1).bit_length()

    triton = tl = _NoTriton()
