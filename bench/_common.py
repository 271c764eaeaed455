"""What the benchmarks share: the device, timing, the device's reference rates, the seam switch, the report.

Importing this module before any kernel file matters: without a GPU it sets TRITON_INTERPRET=1, which must be set
before the @triton.jit functions are defined, so that the Triton paths can at least be checked on CPU tensors.
"""

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels._triton import HAVE_TRITON, triton  # noqa: E402  (after TRITON_INTERPRET)


# ----------------------------------------------------------------------------------------------------------------
# Command line.

def parser(description, results_file):
    """An ArgumentParser with the flags every benchmark takes; `results_file` is where --write writes by default."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes: a smoke test that runs in seconds")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions (on a GPU, triton's do_bench picks its own count)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    ap.add_argument("--write", nargs="?", const=results_file, default=None, metavar="PATH",
                    help=f"also write the report (markdown) to PATH (default {results_file})")
    return ap


def ints(text):
    """'512,1024' -> [512, 1024]."""
    return [int(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------------------------------------------
# Device and environment.

def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(args):
    """The device, set up as the training scripts set theirs up: --threads, and on CPU glibc keeping freed memory
    for reuse (nanorlhf.cpu), so that big buffers are not page-faulted in afresh at every call."""
    from nanorlhf import cpu  # noqa: PLC0415

    dev = device()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu.keep_freed_memory(dev.type)
    return dev


def device_name(dev):
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(dev, command):
    """The lines that say what produced a report: the command, date, device, versions, threads."""
    lines = [f"- command: `{command}`",
             f"- date: {datetime.date.today()}",
             f"- device: {device_name(dev)}",
             f"- torch {torch.__version__}, triton {triton.__version__ if HAVE_TRITON else 'not installed'}, "
             f"CUDA {torch.version.cuda or 'n/a'}, Python {platform.python_version()}"]
    if dev.type == "cpu":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines.append(f"- torch threads: {torch.get_num_threads()}; glibc keeps freed memory (nanorlhf.cpu, as in "
                     f"training); load average at the start: {load:.1f} (other processes slow every timing)")
        lines.append(f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}: the Triton kernels run in "
                     "Triton's CPU interpreter, which checks their correctness and measures nothing")
    return lines


@contextlib.contextmanager
def kernels_mode(mode):
    """Force the seams of nanorlhf/ops.py to one path (NANORLHF_KERNELS, read at every call) inside the block."""
    old = os.environ.get("NANORLHF_KERNELS")
    os.environ["NANORLHF_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["NANORLHF_KERNELS"]
        else:
            os.environ["NANORLHF_KERNELS"] = old


def seam(fn, mode):
    """fn (a seam of nanorlhf/ops.py) always run with NANORLHF_KERNELS=mode."""
    def call(*args, **kwargs):
        with kernels_mode(mode):
            return fn(*args, **kwargs)
    return call


# ----------------------------------------------------------------------------------------------------------------
# Timing.

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(dev):
    """Seconds, after the device has finished its queued work."""
    sync(dev)
    return time.perf_counter()


def median_ms(fn, dev, reps=10, grad_to_none=None):
    """Median milliseconds of fn(). On GPU triton's do_bench (warm-up, L2 flushed between calls, ~100 ms of
    repetitions); on CPU one warm-up call, then `reps` timed calls. grad_to_none: tensors whose .grad is cleared
    before every call (so a backward is not timed with its accumulation into an old gradient)."""
    if dev.type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415

        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for i in range(reps + 1):
        for x in grad_to_none or ():
            x.grad = None
        t0 = time.perf_counter()
        fn()
        if i:  # the first call is the warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timing_note(dev, reps):
    """How median_ms timed, for a table's caption."""
    if dev.type == "cuda":
        return "median of `triton.testing.do_bench`"
    return f"median of {reps} timed call{'s' if reps > 1 else ''} after a warm-up"


def peak_mb(fn, dev):
    """Memory fn() allocates beyond what is already allocated, at its peak (MiB); NaN on CPU (not measured)."""
    if dev.type != "cuda":
        return float("nan")
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def device_rates(dev, reps=3):
    """Measured matmul rate (TFLOP/s) and copy bandwidth (GB/s, bytes read + written) of this device: the yardsticks
    of the tables. GPU: bf16 8192^3, 1 GiB copied. CPU: fp32 1024^3 (what the CPU paths compute in), 64 MiB copied."""
    on_gpu = dev.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    tflops = 2 * n ** 3 / median_ms(lambda: a @ b, dev, reps) / 1e9
    x = torch.empty((2 ** 28) if on_gpu else (2 ** 24), device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    gbs = 2 * x.nbytes / median_ms(lambda: y.copy_(x), dev, reps) / 1e6
    return tflops, gbs


def rate_lines(dev, tflops, gbs):
    what = "bf16 matmul (8192^3)" if dev.type == "cuda" else "fp32 matmul (1024^3)"
    size = "1 GiB" if dev.type == "cuda" else "64 MiB"
    return [f"- {what}: {tflops:.3g} TFLOP/s", f"- copy bandwidth ({size} in, {size} out): {gbs:.0f} GB/s"]


# ----------------------------------------------------------------------------------------------------------------
# Errors.

def max_rel_err(x, ref):
    """max |x - ref| / max |ref| (the plain max |x - ref| when ref is all 0)."""
    scale = ref.detach().float().abs().max().item()
    err = (x.detach().float() - ref.detach().float()).abs().max().item()
    return err / scale if scale > 0 else err


def norm_rel_err(x, ref):
    """|x - ref| / |ref| in the 2-norm."""
    x, ref = x.detach().float(), ref.detach().float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------
# The report: printed line by line, and kept for --write.

class Report:
    """Print each line at once; with a path, rewrite the file after every line, so that a run cut short (a time
    limit, an out-of-memory crash) still leaves what it measured."""

    def __init__(self, path=None):
        self.path, self.lines = path, []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")

    def header(self, *columns):
        """Start a markdown table."""
        self("| " + " | ".join(columns) + " |")
        self("|" + "---|" * len(columns))

    def row(self, *cells):
        self("| " + " | ".join(str(c) for c in cells) + " |")

    def start(self, title, dev, module, argv):
        """The title and the environment lines every report begins with; module and argv make the command line."""
        self(f"# {title}")
        self()
        args = sys.argv[1:] if argv is None else argv
        for line in environment(dev, " ".join(["python -m", module, *map(str, args)])):
            self(line)

    def done(self):
        if self.path:
            print(f"\nwrote {self.path}")


def first_line(exc, width=60):
    """A one-line description of an exception, for a table cell."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:width]
