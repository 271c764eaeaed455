"""nanorlhf/cpu.py: with glibc keeping freed memory, a step's buffers are not page-faulted in again every step."""

import subprocess
import sys

import pytest

from nanorlhf import cpu

PROGRAM = """
import resource, sys, torch
from nanorlhf import cpu
kept = cpu.keep_freed_memory("cpu") if sys.argv[1] == "keep" else None
def step():  # a training step's large buffers: 64 MB and 12 MB, every page written, then freed
    x = torch.ones(16 << 20)
    y = x[:3 << 20] + 1
    del x, y
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
before = faults()
for _ in range(5):
    step()  # the same sizes again: reused memory, or fresh pages from the kernel
print(kept, (faults() - before) // 5)
"""


def faults_per_step(mode):
    r = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    kept, faults = r.stdout.split()
    return kept, int(faults)


def test_keep_freed_memory_reuses_a_freed_buffer():
    kept, faults = faults_per_step("keep")
    if kept == "False":
        pytest.skip("not glibc: keep_freed_memory() changes nothing here")
    assert kept == "True"
    _, default_faults = faults_per_step("default")
    pages = (64 << 20) // 4096
    assert default_faults >= pages * 3 // 4  # glibc's default: 64 MB mapped afresh each step (~17,600 faults)
    assert faults < pages // 4  # kept: reused (0 in most of our runs, 3,276 in some: the 12 MB buffer)


def test_keep_freed_memory_leaves_a_gpu_run_alone():
    assert cpu.keep_freed_memory("cuda") is False and cpu.keep_freed_memory("cuda:1") is False
