"""One command for one GPU (an H100 or H200): everything this project measures, in one report, in under 8 minutes.

    python -m bench.gpu [--write [PATH]] [--parts env,tests,...] [--budget 470] [--wheels .whl] [--plan]
    make gpu                     # the same as python -m bench.gpu --write (results/gpu.md)

It needs the repository, torch with CUDA and triton. Anything else comes from the folder --wheels (default .whl,
git-ignored), installed with no index and no dependencies when missing: the wheels of Liger-Kernel and Apple's Cut
Cross-Entropy for the fused log-prob comparison, and of whatever the machine lacks (tiktoken, tqdm, ...), and
gpt2.tiktoken, GPT-2's BPE ranks, if ~/.cache/nanorlhf has none. Fill it where there is a network:
    pip download --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1 -d .whl
    cp ~/.cache/nanorlhf/gpt2.tiktoken .whl/
Nothing is downloaded during the run: the demo builds its own task.

The parts run one after another, each as a subprocess with its own time limit (its share of --budget, seconds). What
a part prints goes to the terminal as it comes and into the report line by line (rewritten after every line), so a
part cut short still leaves what it measured, and the next part runs:
  env        device, driver, CUDA, torch, triton, Python
  tests      the kernel tests on CUDA tensors, in fp32, fp16 and bf16 (tests/test_attention.py, test_logprobs.py,
             test_seams.py)
  logprobs   bench.logprobs: bf16 validation, then log-probs, + entropy, full KL from bf16 logits at N = 8,192 and
             16,384 tokens, V = 50,257 and 151,936 (forward, backward, both) against eager PyTorch and torch.compile:
             ms, GB/s against the measured copy bandwidth, peak memory; and fused with the LM head (hidden 768 and
             4,096) against eager, torch.compile, Liger-Kernel and Cut Cross-Entropy: ms, TFLOP/s against the
             measured bf16 matmul, peak memory
  attention  bench.attention: validation in bf16, fp16, fp32, then causal attention with left padding at head dims
             64 and 128, T = 512 to 4,096 (forward, backward, both) against SDPA with each backend, eager and
             torch.compile: TFLOP/s and % of the measured bf16 matmul; KV-cache decode: GB/s
  ppo        bench.ppo: PPO iterations of GPT-2 124M-shaped policy, reference, RM and value in bf16, with
             NANORLHF_KERNELS=triton and with =torch
  demo       `make demo`'s stages (tasks, train_sft.py, train_rm.py, train_ppo.py, evaluate) on the GPU, each timed
The shares of the budget are guesses until a first run: `--plan` prints the commands and their limits.
"""

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results/gpu.md"
BUDGET = 470  # seconds for all parts: one 10-minute command with room for start-up and the transfers
PY = sys.executable
PPO_SHAPE = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024", "--dtype", "bfloat16"]
WHEELS = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}  # module -> distribution


def parts(tiny=False):
    """[(name, share of the budget, [(title, command, extra environment)])]: what each part runs. --tiny: the
    smallest sizes of each (a check of the harness on any machine, CPU included)."""
    small = ["--tiny"] if tiny else []
    logprobs = small or ["--n", "8192,16384", "--v", "50257,151936", "--d", "768,4096", "--fused-impls",
                         "eager,compile,ours,liger,cce"]
    attention = small or ["--seqlens", "512,1024,2048,4096", "--cases", "gpt2-small,hd128"]
    ppo = (["--iters", "2", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
            "--prompt_len", "4", "--max_new_tokens", "4", "--batch_size", "8", "--minibatch_size", "4",
            "--ppo_epochs", "1"] if tiny else ["--iters", "3", *PPO_SHAPE])
    tests = ["tests/test_attention.py"] if tiny else ["tests/test_attention.py", "tests/test_logprobs.py",
                                                     "tests/test_seams.py"]
    demo_sizes = ((["--max_iters", "2", "--eval_n", "8"], ["--epochs", "1", "--n_prompts", "16", "--n_eval", "8"],
                   ["--iters", "1", "--batch_size", "8", "--minibatch_size", "4"], ["--n", "8"]) if tiny
                  else ([], [], [], []))
    interpret = {"TRITON_INTERPRET": "1"} if tiny and not _has_gpu() else {}  # the Triton path on CPU tensors
    return [
        ("env", 0.03, [("environment", [PY, "-m", "bench.gpu", "--env"], {})]),
        ("tests", 0.17, [("kernel tests on CUDA", [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                                   *tests], {})]),
        ("logprobs", 0.2, [("log-prob kernels", [PY, "-m", "bench.logprobs", *logprobs], {})]),
        ("attention", 0.2, [("attention kernels", [PY, "-m", "bench.attention", *attention], {})]),
        ("ppo", 0.16, [(f"PPO iteration, NANORLHF_KERNELS={k}", [PY, "-m", "bench.ppo", *ppo],
                        {"NANORLHF_KERNELS": k, **interpret}) for k in ("triton", "torch")]),
        ("demo", 0.24, [("make demo: data", [PY, "-m", "nanorlhf.tasks", "--out", "data"], {}),
                        ("make demo: SFT", [PY, str(ROOT / "train_sft.py"), *demo_sizes[0]], {}),
                        ("make demo: RM", [PY, str(ROOT / "train_rm.py"), *demo_sizes[1]], {}),
                        ("make demo: PPO", [PY, str(ROOT / "train_ppo.py"), *demo_sizes[2]], {}),
                        ("make demo: evaluation", [PY, "-m", "nanorlhf.evaluate", *demo_sizes[3]], {})]),
    ]


def _has_gpu():
    import torch  # noqa: PLC0415
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------

def environment_lines():
    """Device, driver, versions (run as its own part: `python -m bench.gpu --env`)."""
    import torch  # noqa: PLC0415

    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"triton {_version('triton')}, liger-kernel {_version('liger-kernel')}, cut-cross-entropy "
             f"{_version('cut-cross-entropy')}"]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} "
                     f"SMs, {props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            lines.append(f"- driver, power limit, max SM clock: {smi.strip().splitlines()[0]}")
        except (OSError, subprocess.SubprocessError, IndexError):
            lines.append("- nvidia-smi: not available")
    else:
        lines.append(f"- device: no GPU ({platform.machine()}, {os.cpu_count()} cores): a check of the harness only")
    return lines


def _version(dist):
    from importlib import metadata  # noqa: PLC0415
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def install_wheels(folder, say):
    """Install the wheels of `folder` whose distributions are missing (no index, no dependencies: the machine may
    have no network), and point the tokenizer at folder/gpt2.tiktoken if its usual copy is missing."""
    from importlib import metadata  # noqa: PLC0415

    folder = Path(folder)
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    missing = []
    for w in wheels:
        try:
            metadata.version(w.name.split("-")[0].replace("_", "-"))
        except metadata.PackageNotFoundError:
            missing.append(w)
    if missing:
        r = subprocess.run([PY, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, missing)],
                           capture_output=True, text=True)
        say(f"- installed from {folder.name}/: {', '.join(w.name for w in missing)}" if r.returncode == 0 else
            f"- pip install from {folder.name}/ failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    absent = [dist for mod, dist in WHEELS.items() if importlib.util.find_spec(mod) is None]
    if absent:
        say(f"- {', '.join(absent)}: not installed and no wheel in {folder.name}/: their rows are skipped")
    ranks = Path(os.environ.get("NANORLHF_TIKTOKEN", Path.home() / ".cache" / "nanorlhf" / "gpt2.tiktoken"))
    if not ranks.exists() and (folder / "gpt2.tiktoken").exists():
        os.environ["NANORLHF_TIKTOKEN"] = str(folder / "gpt2.tiktoken")
        say(f"- GPT-2's BPE ranks from {folder.name}/gpt2.tiktoken")


def run_streaming(cmd, env, cwd, limit, say):
    """Run cmd, passing each line it prints to say() as it comes; stop its whole process group after `limit`
    seconds. Returns (exit code or None if cut, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=cwd,
                            env=env, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    cut = False
    while True:
        left = limit - (time.monotonic() - t0)
        if left <= 0:
            os.killpg(proc.pid, signal.SIGKILL)
            cut = True
            break
        if sel.select(timeout=min(left, 1.0)):
            line = proc.stdout.readline()
            if not line:
                break
            if "\r" in line:  # progress bars: keep their last state
                line = line.rsplit("\r", 1)[-1]
            say(line.rstrip("\n"))
    proc.wait()
    return (None if cut else proc.returncode), time.monotonic() - t0


class Report:
    """Lines printed at once and, with a path, the file rewritten after each."""

    def __init__(self, path):
        self.path, self.lines = path, []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [p[0] for p in parts()]
    ap.add_argument("--parts", default=",".join(names), help=f"comma list of {','.join(names)}")
    ap.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for all parts together (default {BUDGET})")
    ap.add_argument("--wheels", default=".whl", help="folder of the comparison libraries' wheels (default .whl)")
    ap.add_argument("--tiny", action="store_true", help="the smallest sizes: checks the harness, measures nothing")
    ap.add_argument("--plan", action="store_true", help="print each part's commands and time limit, run nothing")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env part itself
    ap.add_argument("--write", nargs="?", const=RESULTS, default=None, metavar="PATH",
                    help=f"also write the report to PATH (default {RESULTS})")
    args = ap.parse_args(argv)
    if args.env:
        for line in environment_lines():
            print(line)
        return 0
    chosen = [p for p in args.parts.split(",") if p]
    if set(chosen) - set(names):
        ap.error(f"--parts takes {','.join(names)}")
    plan = [(n, share * args.budget, steps) for n, share, steps in parts(args.tiny) if n in chosen]
    if args.plan:
        for name, limit, steps in plan:
            print(f"{name}: {limit:.0f} s")
            for title, cmd, env in steps:
                print(f"  {title}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}".replace("  ", " "))
        return 0
    report = Report(args.write)
    t_start = time.monotonic()
    report("# nanorlhf on one GPU: kernel tests, kernel benchmarks, a PPO iteration, the demo")
    report()
    report(f"- command: `python -m bench.gpu {' '.join(sys.argv[1:] if argv is None else argv)}`")
    install_wheels(ROOT / args.wheels, report)
    status = []

    def nested(line):  # a part's own report: its headings two levels down
        report("##" + line if line.startswith("#") else line)

    with tempfile.TemporaryDirectory() as demo_dir:
        env0 = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        for name, limit, steps in plan:
            report(f"\n## {name}\n")
            deadline = time.monotonic() + limit
            for title, cmd, extra in steps:
                left = deadline - time.monotonic()
                if left <= 1:
                    report(f"**{title}: not run (the part's {limit:.0f} s were used up)**")
                    status.append((title, "not run", 0.0))
                    continue
                if len(steps) > 1:
                    report(f"\n### {title}\n")
                cwd = demo_dir if name == "demo" else str(ROOT)
                code, secs = run_streaming(cmd, {**env0, **extra}, cwd, left, nested)
                how = "ok" if code == 0 else f"cut at {secs:.0f} s" if code is None else f"exit code {code}"
                if code != 0:
                    report(f"\n**{title}: {how}**")
                status.append((title, how, secs))
    report("\n## Summary\n")
    report("| step | result | seconds |")
    report("|---|---|---|")
    for title, how, secs in status:
        report(f"| {title} | {how} | {secs:.0f} |")
    report(f"\nTotal {time.monotonic() - t_start:.0f} s (budget {args.budget:.0f} s).")
    if args.write:
        print(f"\nwrote {args.write}")
    return 0 if all(how == "ok" for _, how, _ in status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
