"""Compile every kernel the launchers launch for GPUs that are not here (A100 sm_80, H100/H200 sm_90), on the CPU.

    python -m bench.compile [--set hot|all] [--dtype bf16,...] [--only WORDS] [--check] [--write [PATH]]
    python -m bench.compile --sweep fwd|dkdv|dq|decode[-fp32] [--set all] [--dtype bf16]   (to pick a config)

Triton compiles for a target it is only told about: Python -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, the last
step by the `ptxas` inside the triton wheel, with no driver and no GPU (~1-3 s a kernel). What a CPU test cannot
see, this reads off the compiled kernel: registers per thread and the local-memory stack (`cuobjdump -res-usage` on
Triton's own cubin; a stack > 0 means spills), the spill bytes of the same compile's `ptxas -v` log, the shared
memory (Triton's metadata), the matrix instruction in the PTX (`mma.sync` on sm_80, `wgmma` on sm_90; none: the dots
run on the FMA units), and from registers and shared memory the occupancy (resident blocks per multiprocessor).

What is compiled cannot drift from the launchers: each case calls a real launcher (`attention_forward`,
`attention_backward`, `decode_attention`, `launch_forward`, `launch_backward`) on fake CUDA tensors (torch's
FakeTensorMode: no memory, no device), with every @triton.jit kernel of the module replaced by a recorder that binds
the launch's arguments with Triton's own binder, as JITFunction.run does at a launch (pointer dtypes, 16-byte
alignment, integers equal to 1 or divisible by 16, constexprs, num_warps, num_stages); the kernel is then compiled
from that, as the JIT would compile it on the GPU. The cases are the pipeline's: attention in fp32/fp16/bf16 at head
dims 32 (the built-in model), 64 (GPT-2), 80 (a padded tile), 128 and 256 (the largest), q, k, v laid out as the model
has them (views of one c_attn output), training lengths divisible by 16 and not, a KV cache that is a view of a
longer buffer, few rows (split-KV and combine) and many (one chunk: the forward kernel); log-probs from 50,257-wide
logits with each flag combination (mask, entropy, full KL; each output gradient). `--set hot`: what a GPU run of the
pipeline spends its time in (bf16; attention at head dims 32, 64, 128; the flags of the fused LM-head path).

Checks (`--check`, exit status 1): a compile error; shared memory above the target's per-block limit (sm_80:
166,912 B, sm_90: 232,448 B, opt-in); a spill (stack > 0, or spill stores) in a hot kernel. `--sweep` compiles a grid
of candidate configs for one attention kernel (its config function answers each in turn) and prints what `picks`,
the rule the config functions of kernels/attention.py follow, chooses per dtype and padded head dim. Results are
cached per compiled kernel in ~/.cache/nanorlhf/compile (NANORLHF_COMPILE_CACHE), keyed by a hash of the kernel's
source (with the functions it calls), the launch's signature, constexprs, alignment and options, the target and the
triton version: a fresh clone compiles everything (in a pool of --jobs processes), later runs only what changed.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

RESULTS = "results/compile.md"
CACHE = os.environ.get("NANORLHF_COMPILE_CACHE", os.path.expanduser("~/.cache/nanorlhf/compile"))


class Target:
    """What the occupancy and the checks need of a GPU: per block and per multiprocessor (SM) limits."""

    def __init__(self, arch, gpus, sms, smem_block, smem_sm):
        self.arch, self.gpus, self.sms = arch, gpus, sms
        self.smem_block = smem_block  # max shared memory per block (opt-in), bytes
        self.smem_sm = smem_sm  # shared memory per SM, bytes (1 KiB of it reserved per resident block)
        self.regs_sm, self.max_warps, self.max_blocks = 65536, 64, 32


TARGETS = {80: Target(80, "A100", 108, 166912, 167936), 90: Target(90, "H100/H200", 132, 232448, 233472)}


def occupancy(target, regs, shared, num_warps):
    """Resident blocks per SM from registers, shared memory and warps: registers are allocated per warp in units of
    256 (32 threads x regs rounded up to 8), shared memory in units of 128 B plus 1 KiB per block."""
    per_warp = -(-regs * 32 // 256) * 256 if regs else 256
    by_regs = (target.regs_sm // per_warp) // num_warps
    by_smem = target.smem_sm // (-(-shared // 128) * 128 + 1024)
    return max(0, min(by_regs, by_smem, target.max_warps // num_warps, target.max_blocks))


# ----------------------------------------------------------------------------------------------------------------
# The cases: real launcher calls on fake CUDA tensors. Each yields (label, hot) and launches as it goes.

ATTN_DTYPES = ("bf16", "fp16", "fp32")
ATTN_HEAD_DIMS = (32, 64, 80, 128, 256)
HOT_HEAD_DIMS = (32, 64, 128)  # the built-in model's, GPT-2's, and the common larger one
TRAIN_LENGTHS = (1024, 1000)
LOGPROB_DTYPES = ("bf16", "fp16", "fp32")
VOCAB = 50257  # GPT-2's


def _dtype(name):
    import torch  # noqa: PLC0415
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attention_cases(A, which, dtypes=ATTN_DTYPES):
    """Training (forward, then backward: delta, dK/dV, dQ) and decoding (few rows: split-KV + combine; many rows:
    one chunk, the forward kernel with 16-query blocks), with q, k, v and dO laid out as nanorlhf/model.py has them."""
    import torch  # noqa: PLC0415

    B, H = 4, 12
    for dname in dtypes:
        for D in ATTN_HEAD_DIMS:
            hot = dname == "bf16" and D in HOT_HEAD_DIMS
            if which == "hot" and not hot:
                continue
            dt, C = _dtype(dname), H * D
            start = torch.zeros(B, dtype=torch.long, device="cuda")
            for T in TRAIN_LENGTHS:  # Triton specializes sizes divisible by 16: both kinds of length
                qkv = torch.empty(B, T, 3 * C, dtype=dt, device="cuda")  # c_attn's output
                q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(C, dim=2))  # (B, H, T, D) views
                yield f"{dname} D={D} train T={T}", hot
                o, lse = A.attention_forward(q, k, v, start)
                do = torch.empty(B, T, C, dtype=dt, device="cuda").view(B, T, H, D).transpose(1, 2)  # grad of y
                A.attention_backward(do, q, k, v, o, lse, start)
            for rows in (4, 64):  # 4 x 12 heads: split-KV; 64 x 12 fill an H100 with one chunk each
                # (fake CUDA tensors take narrow() but not indexing)
                q1 = torch.empty(rows, 1, 3 * C, dtype=dt, device="cuda").narrow(2, 0, C)
                q1 = q1.view(rows, 1, H, D).transpose(1, 2)  # (rows, H, 1, D)
                cache = torch.empty(rows, H, 1024, D, dtype=dt, device="cuda")  # new_kv_cache's buffer
                kv = cache.narrow(2, 0, 1000)  # the filled part, (rows, H, 1000, D): 4 rows take >= 2 chunks
                yield f"{dname} D={D} decode {rows} rows", hot
                A.decode_attention(q1, kv, kv, torch.zeros(rows, dtype=torch.long, device="cuda"))


def logprob_cases(L, which, dtypes=LOGPROB_DTYPES):
    """The forward on whole rows of logits and the backward on a block of them, with every flag combination; hot:
    bf16 without a mask (the LM-head path drops masked rows), the flags the PPO and SFT losses use."""
    import torch  # noqa: PLC0415

    N = 64
    for dname in dtypes:
        dt = _dtype(dname)
        z = torch.empty(N, VOCAB, dtype=dt, device="cuda")
        zr = torch.empty(N, VOCAB, dtype=dt, device="cuda")
        y = torch.empty(N, dtype=torch.long, device="cuda")
        f32 = lambda: torch.empty(N, dtype=torch.float32, device="cuda")  # noqa: E731
        for masked in (False, True):
            mask = torch.empty(N, dtype=torch.bool, device="cuda") if masked else None
            for ent, kl in ((False, False), (True, False), (True, True)):
                hot = dname == "bf16" and not masked and not kl
                if which == "hot" and not hot:
                    continue
                flags = " ".join(f for f, on in (("mask", masked), ("entropy", ent), ("full KL", kl)) if on)
                yield f"{dname} fwd {flags or 'logp'}", hot
                L.launch_forward(z, y, mask=mask, ref_logits=zr if kl else None, with_entropy=ent)
            for g_lp in (True, False):
                for g_h in (True, False):
                    for g_kl in (False, True):
                        if not (g_lp or g_h or g_kl):
                            continue
                        hot = dname == "bf16" and not masked and g_lp and not g_kl
                        if which == "hot" and not hot:
                            continue
                        flags = " ".join(f for f, on in (("mask", masked), ("g_logp", g_lp), ("g_entropy", g_h),
                                                         ("g_KL", g_kl)) if on)
                        yield f"{dname} bwd {flags}", hot
                        L.launch_backward(z, y, f32(), mask=mask, grad_logp=f32() if g_lp else None,
                                          grad_entropy=f32() if g_h else None, entropy=f32(),
                                          grad_kl=f32() if g_kl else None, kl=f32(), ref_logits=zr, ref_lse=f32(),
                                          out=z)


# ----------------------------------------------------------------------------------------------------------------
# Recording: what Triton's JIT would compile for a launch, without launching.

class _Ptr:
    """A tensor argument as the binder sees it: its dtype and its address (CUDA's allocator hands out blocks aligned
    to 512 B, so a view's alignment is that of its offset)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._addr = 512 + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._addr

    @staticmethod
    def ptr_range():
        return 0


def _is_jit(obj):
    from triton.runtime.jit import JITFunction  # noqa: PLC0415
    return isinstance(obj, JITFunction)


class _Recording:
    """The case now running, read by the recorders (a launch belongs to the case that made it)."""
    case = ("", False)


@contextlib.contextmanager
def recording(module, arch, sink):
    """Within the block, `module`'s @triton.jit kernels record their launches into sink (a list of dicts) instead of
    running, and the module's device queries answer for the target (its SM count). Yields the _Recording whose
    `case` labels the launches."""
    import torch  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler.compiler import make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

    backend = make_backend(GPUTarget("cuda", arch, 32))
    now = _Recording()

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn
            self.binder = create_function_from_signature(fn.signature, fn.params, backend)

        def __getitem__(self, grid):
            return self.launch

        def launch(self, *args, **kwargs):
            args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: _Ptr(a) if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
            bound, spec, options = self.binder(*args, **kwargs)  # as JITFunction.run binds a launch
            names = list(bound)
            sink.append(dict(
                module=module.__name__, kernel=self.name, arch=arch, case=now.case[0], hot=now.case[1],
                signature={n: s[0] for n, s in zip(names, spec)},
                constexprs={n: bound[n] for n, s in zip(names, spec) if s[0] == "constexpr"},
                attrs={n: s[1] for n, s in zip(names, spec) if s[0] != "constexpr" and s[1]},
                options={k: v for k, v in options.items() if k in ("num_warps", "num_stages")}))

    saved = {n: f for n, f in vars(module).items() if _is_jit(f) and n.endswith("_kernel")}
    queries = {"_sm_count": lambda index: TARGETS[arch].sms}
    saved_queries = {n: getattr(module, n) for n in queries if hasattr(module, n)}
    try:
        for n, f in saved.items():
            setattr(module, n, Recorder(n, f))
        for n in saved_queries:
            setattr(module, n, queries[n])
        yield now
    finally:
        for n, f in {**saved, **saved_queries}.items():
            setattr(module, n, f)


def record(which="hot", archs=(80, 90), configs=None, dtypes=("bf16", "fp16", "fp32")):
    """Every distinct launch of the cases, one dict per (kernel, signature, constexprs, alignment, options, arch),
    labelled with the first case that made it (hot if any case that made it is hot). configs: {name: function} to
    stand in for kernels/attention.py's config functions (a sweep's candidates)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    from kernels import attention as A  # noqa: PLC0415
    from kernels import logprobs as L  # noqa: PLC0415

    if A.INTERPRETED or not _is_jit(A._attn_fwd_kernel):
        raise RuntimeError("bench.compile needs the compiled kernels: run it without TRITON_INTERPRET=1")
    launches = {}
    saved = {n: getattr(A, n) for n in configs or {}}
    try:
        for n, f in (configs or {}).items():
            setattr(A, n, f)
        for arch in archs:
            for module, cases in ((A, attention_cases), (L, logprob_cases)) if not configs else ((A, attention_cases),):
                sink = []
                with FakeTensorMode(), recording(module, arch, sink) as now:
                    for case in cases(module, which, dtypes):  # its launches run when the next case is asked for
                        now.case = case
                for spec in sink:
                    key = spec_key(spec)
                    if key in launches:
                        launches[key]["hot"] |= spec["hot"]
                    else:
                        launches[key] = spec
    finally:
        for n, f in saved.items():
            setattr(A, n, f)
    return list(launches.values())


def _grid(**axes):
    """Every combination of the axes' values, as dicts."""
    import itertools  # noqa: PLC0415
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# --sweep NAME: the config function of kernels/attention.py whose answer each candidate replaces (and the key of its
# answer, for bwd_config's two passes), the kernels and cases to keep, the block a program holds while it streams the
# other (the one `picks` wants large first), and the candidates. NAME-fp32: fp32's grid of smaller tiles (its dots
# run on the FMA units, from registers).
_TILES16 = dict(num_warps=(4, 8), num_stages=(2, 3))
_TILES32 = dict(num_warps=(8,), num_stages=(1, 2))  # 4 warps: spills, or fewer resident warps, in every fp32 forward
SWEEPS = {
    "fwd": ("fwd_config", None, ("_attn_fwd_kernel",), "train", "BLOCK_M",
            _grid(BLOCK_M=(32, 64, 128), BLOCK_N=(16, 32, 64), **_TILES16)),
    "fwd-fp32": ("fwd_config", None, ("_attn_fwd_kernel",), "train", "BLOCK_M",
                 _grid(BLOCK_M=(16, 32, 64), BLOCK_N=(16, 32), **_TILES32)),
    "dkdv": ("bwd_config", "dkdv", ("_attn_bwd_dkdv_kernel",), "train", "BLOCK_N",
             _grid(BLOCK_M=(16, 32, 64), BLOCK_N=(16, 32, 64, 128), **_TILES16)),
    "dkdv-fp32": ("bwd_config", "dkdv", ("_attn_bwd_dkdv_kernel",), "train", "BLOCK_N",
                  _grid(BLOCK_M=(16, 32), BLOCK_N=(16, 32, 64), **_TILES32)),
    "dq": ("bwd_config", "dq", ("_attn_bwd_dq_kernel",), "train", "BLOCK_M",
           _grid(BLOCK_M=(32, 64, 128), BLOCK_N=(16, 32, 64), **_TILES16)),
    "dq-fp32": ("bwd_config", "dq", ("_attn_bwd_dq_kernel",), "train", "BLOCK_M",
                _grid(BLOCK_M=(16, 32, 64), BLOCK_N=(16, 32), **_TILES32)),
    "decode": ("decode_config", None, ("_attn_decode_kernel", "_attn_fwd_kernel"), "decode", "BLOCK_N",
               _grid(BLOCK_N=(32, 64, 128), **_TILES16)),
    "decode-fp32": ("decode_config", None, ("_attn_decode_kernel", "_attn_fwd_kernel"), "decode", "BLOCK_N",
                    _grid(BLOCK_N=(16, 32, 64), **_TILES32)),
}


def sweep(name, which, archs, dtypes):
    """The launches of every candidate config of SWEEPS[name] (the config column tells them apart)."""
    fn_name, key, kernels, kind, _, candidates = SWEEPS[name]
    from kernels import attention as A  # noqa: PLC0415
    original = getattr(A, fn_name)
    specs = []
    for cand in candidates:
        def config(*args, cand=cand, **kwargs):
            return dict(original(*args, **kwargs), **{key: cand}) if key else dict(cand)
        for spec in record(which, archs, {fn_name: config}, dtypes):
            if spec["kernel"] in kernels and kind in spec["case"]:
                specs.append(spec)
    return specs


def spec_key(spec):
    """What decides the compiled code of a launch (not the case that made it), as a string."""
    return json.dumps({k: v for k, v in spec.items() if k not in ("case", "hot")}, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------
# Compiling (in worker processes) and reading the compiled kernel.

def _tool(name):
    import triton  # noqa: PLC0415
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def res_usage(cubin_path):
    """REG and STACK of the (one) kernel in a cubin, from `cuobjdump -res-usage`."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage: no REG/STACK in {out[:200]!r}")
    return int(m.group(1)), int(m.group(2))


def spill_bytes(ptxas_log):
    """(spill stores, spill loads) in bytes from a `ptxas -v` log, or (None, None) if it has none."""
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def mma_kind(ptx):
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none (FMA)"


def cache_key(spec):
    """The kernel's own cache key (its source and every function it calls), the launch, the triton version."""
    import importlib  # noqa: PLC0415

    import triton  # noqa: PLC0415
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    return hashlib.sha256(f"{triton.__version__}|{fn.cache_key}|{spec_key(spec)}".encode()).hexdigest()[:32]


def compile_one(spec):
    """Compile one recorded launch for its target (in a worker process) -> the measured fields of its table row."""
    import importlib  # noqa: PLC0415

    from triton import knobs  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415
    from triton.compiler import compile as triton_compile  # noqa: PLC0415
    from triton.compiler.compiler import make_backend  # noqa: PLC0415

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    target = GPUTarget("cuda", spec["arch"], 32)
    backend = make_backend(target)
    attrs = {(fn.arg_names.index(n),): backend.parse_attr(d) for n, d in spec["attrs"].items()}
    src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
    options = backend.parse_options(dict(spec["options"]))
    import warnings  # noqa: PLC0415
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # the JIT's default, as at a launch
    knobs.compilation.always_compile = True  # Triton's own cache would skip ptxas, and its -v log with it
    knobs.nvidia.dump_ptxas_log = True
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton_compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001  a compile error is a result: the table shows it, --check fails on it
        text = str(e).strip().splitlines()
        return dict(error=(text[0] if text else type(e).__name__)[:200], seconds=time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        regs, stack = res_usage(path)
    stores, loads = spill_bytes(log.getvalue())
    return dict(regs=regs, stack=stack, spill_stores=stores, spill_loads=loads, shared=k.metadata.shared,
                mma=mma_kind(k.asm["ptx"]), seconds=round(time.perf_counter() - t0, 2))


def _cached(key):
    path = os.path.join(CACHE, key + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _store(key, result):
    os.makedirs(CACHE, exist_ok=True)
    tmp = os.path.join(CACHE, f"{key}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(CACHE, key + ".json"))


def compile_all(specs, jobs=2, use_cache=True, progress=None):
    """Results of compile_one for every spec (in order), from the cache where it has them, else compiled in a
    pool of `jobs` processes (the biggest kernels first); progress(spec, result) is called as each one is known."""
    results = [None] * len(specs)
    keys = [cache_key(s) for s in specs]
    todo = []
    for i, key in enumerate(keys):
        hit = _cached(key) if use_cache else None
        if hit is not None:
            results[i] = dict(hit, cached=True)
            if progress:
                progress(specs[i], results[i])
        else:
            todo.append(i)
    todo.sort(key=lambda i: (specs[i]["module"] != "kernels.attention", -specs[i]["options"].get("num_warps", 4)))
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(compile_one, specs[i]): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = dict(fut.result(), cached=False)
                if "error" not in results[i]:
                    _store(keys[i], results[i])
                if progress:
                    progress(specs[i], results[i])
    return results


# ----------------------------------------------------------------------------------------------------------------
# The table and the checks.

def problems(spec, result):
    """What --check fails on for one compiled launch: a compile error, shared memory over the target's per-block
    limit, a spill in a hot kernel (a stack, or spill stores)."""
    if "error" in result:
        return [f"compile error: {result['error']}"]
    found = []
    limit = TARGETS[spec["arch"]].smem_block
    if result["shared"] > limit:
        found.append(f"shared memory {result['shared']:,} B > {limit:,} B")
    if spec["hot"] and (result["stack"] > 0 or (result["spill_stores"] or 0) > 0):
        found.append(f"spills ({result['stack']} B stack, {result['spill_stores']} B spill stores)")
    return found


def config_cell(spec):
    """BLOCK_* constexprs, warps and stages: the launch config the launcher picked."""
    blocks = " ".join(f"{n[6:]}{v}" for n, v in spec["constexprs"].items() if n.startswith("BLOCK_") and n != "BLOCK_D")
    o = spec["options"]
    return f"{blocks} w{o.get('num_warps', 4)} s{o.get('num_stages', 3)}".strip()


def row_cells(spec, result):
    name = spec["kernel"].removesuffix("_kernel").lstrip("_")
    arch = f"sm_{spec['arch']}"
    case = spec["case"] + (" (hot)" if spec["hot"] else "")
    if "error" in result:
        return [name, case, arch, config_cell(spec), "**error**", result["error"][:60], "", "", "", ""]
    spills = f"{result['stack']}"
    if result["spill_stores"] is not None:
        spills += f" / {result['spill_stores']} / {result['spill_loads']}"
    if result["stack"] or result["spill_stores"]:
        spills = f"**{spills}**"
    occ = occupancy(TARGETS[spec["arch"]], result["regs"], result["shared"], spec["options"].get("num_warps", 4))
    return [name, case, arch, config_cell(spec), result["regs"], spills, f"{result['shared']:,}", result["mma"],
            occ, occ * spec["options"].get("num_warps", 4)]


COLUMNS = ("kernel", "case", "arch", "config", "registers", "stack / spill st / ld (B)", "shared (B)", "mma",
           "blocks/SM", "warps/SM")


def report(specs, results, command):
    """The markdown report: environment, checks, then one row per compiled launch."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415

    lines = ["# Kernels compiled for GPUs that are not here", "",
             f"- command: `{command}`",
             f"- torch {torch.__version__}, triton {triton.__version__} (its ptxas and cuobjdump), Python "
             f"{platform.python_version()}, on {platform.machine()} with no GPU",
             "- targets: " + "; ".join(f"sm_{t.arch} ({t.gpus}, {t.sms} SMs): {t.smem_block:,} B shared per block, "
                                       f"{t.smem_sm:,} B per SM" for t in TARGETS.values()),
             "",
             "One row per distinct compiled kernel: the launches of the real launchers on the pipeline's cases "
             "(bench/compile.py says which), bound and compiled as Triton's JIT would on that GPU. `config`: the "
             "BLOCK_* sizes, warps (w) and pipeline stages (s) the config functions picked. Registers per thread and "
             "the stack from `cuobjdump -res-usage`; spill stores / loads from `ptxas -v` (bold: any spill); shared "
             "memory from Triton's metadata; `mma`: the matrix instruction in the PTX (none: the dots run on the FMA "
             "units, as fp32 in IEEE precision must). blocks/SM: resident blocks per multiprocessor allowed by "
             "registers (65,536 per SM), shared memory and warps (64 per SM); warps/SM = blocks x warps.",
             ""]
    found = [(s, p) for s, r in zip(specs, results) for p in problems(s, r)]
    if found:
        lines.append(f"**{len(found)} problem(s)**:")
        lines += [f"- {s['kernel']} {s['case']} sm_{s['arch']}: {p}" for s, p in found]
    else:
        lines.append(f"{len(specs)} kernels compiled: no compile error, no shared memory over a limit, no spill in "
                     "a hot kernel.")
    spilled = sum(1 for r in results if "error" not in r and (r["stack"] or r["spill_stores"]))
    lines += [f"Spilling kernels (hot or not): {spilled}.", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    order = sorted(range(len(specs)), key=lambda i: (specs[i]["module"], specs[i]["kernel"], specs[i]["case"],
                                                     specs[i]["arch"]))
    for i in order:
        lines.append("| " + " | ".join(str(c) for c in row_cells(specs[i], results[i])) + " |")
    return "\n".join(lines) + "\n", found


REG_BUDGET = 240  # the most registers per thread a picked config may use on a target: 15 under ptxas's cap (255),
# room for the code of another Triton version (the lent GPUs run 3.6) before a spill


def picks(specs, results, held="BLOCK_M"):
    """The rule the config functions of kernels/attention.py follow, applied to a sweep. Per dtype and padded head
    dim BLOCK_D (what a config function sees: head dims 80 and 128 share BLOCK_D = 128, and one config serves both),
    of the candidates that compile on every target and head dim without a spill, within REG_BUDGET registers and the
    shared memory limit: the one with the largest `held` block (the block a program keeps while it streams the
    other: each streamed tile is read once per held block), then the largest streamed block, then the most resident
    warps per SM on the worse target, then the most pipeline stages.
    Returns {"bf16 BLOCK_D=64": (config cell, registers (min, max), warps/SM) or None}."""
    groups = {}
    for spec, result in zip(specs, results):
        case = f"{spec['case'].split()[0]} BLOCK_D={spec['constexprs']['BLOCK_D']}"  # what the config functions see
        groups.setdefault(case, {}).setdefault(config_cell(spec), []).append((spec, result))
    chosen = {}
    for case, cands in groups.items():
        best = None
        for cell, runs in cands.items():
            if any(problems(dict(s, hot=True), r) or r["regs"] > REG_BUDGET for s, r in runs):
                continue
            warps = min(occupancy(TARGETS[s["arch"]], r["regs"], r["shared"], s["options"].get("num_warps", 4))
                        * s["options"].get("num_warps", 4) for s, r in runs)
            c, o = runs[0][0]["constexprs"], runs[0][0]["options"]
            streamed = "BLOCK_N" if held == "BLOCK_M" else "BLOCK_M"
            key = (c.get(held, 0), c.get(streamed, 0) if streamed in c else 0, warps, o.get("num_stages", 3))
            regs = [r["regs"] for _, r in runs]
            if best is None or key > best[0]:
                best = (key, (cell, (min(regs), max(regs)), warps))
        chosen[case] = best[1] if best else None
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", choices=("hot", "all"), default="all",
                    help="hot: the kernels a GPU run of the pipeline spends its time in (the test's); all: every case")
    ap.add_argument("--arch", default="80,90", help="compute capabilities to compile for (default 80,90)")
    ap.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a compile error, shared memory over a limit or a spill in a hot kernel")
    ap.add_argument("--only", default="", metavar="TEXT,...",
                    help="only the launches whose 'kernel case arch' holds every word of one of these "
                         "(e.g. 'attn_fwd sm_90,logprobs')")
    ap.add_argument("--dtype", default="bf16,fp16,fp32", help="the cases' dtypes (default bf16,fp16,fp32)")
    ap.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                    help="compile a grid of candidate configs for one attention kernel instead (to pick its config)")
    ap.add_argument("--no-cache", action="store_true", help=f"compile everything again (cache: {CACHE})")
    ap.add_argument("--write", nargs="?", const=RESULTS, default=None, metavar="PATH",
                    help=f"also write the report to PATH (default {RESULTS})")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in TARGETS:
            ap.error(f"--arch {a}: known targets are {', '.join(map(str, TARGETS))}")
    os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels (before kernels/ is imported)
    t0 = time.perf_counter()
    dtypes = [d for d in args.dtype.split(",") if d]
    if set(dtypes) - set(ATTN_DTYPES):
        ap.error(f"--dtype: one of {', '.join(ATTN_DTYPES)}")
    specs = sweep(args.sweep, args.set, archs, dtypes) if args.sweep else record(args.set, archs, None, dtypes)
    if args.only:
        label = lambda s: f"{s['kernel']} {s['case']} sm_{s['arch']}"  # noqa: E731
        specs = [s for s in specs if any(all(w in label(s) for w in alt.split()) for alt in args.only.split(","))]
    print(f"{len(specs)} distinct launches recorded in {time.perf_counter() - t0:.1f} s; compiling "
          f"(cache {CACHE})", flush=True)

    def progress(spec, result):
        cells = row_cells(spec, result)
        how = "cached" if result.get("cached") else f"{result.get('seconds', 0):.1f} s"
        print(f"  {cells[0]:<22} {cells[1]:<34} {cells[2]} {cells[3]:<16} regs {cells[4]} stack/spills {cells[5]} "
              f"shared {cells[6]} {cells[7]} [{how}]", flush=True)

    results = compile_all(specs, args.jobs, not args.no_cache, progress)
    command = " ".join(["python -m bench.compile", *(sys.argv[1:] if argv is None else argv)])
    text, found = report(specs, results, command)
    print(text)
    if args.sweep:
        for case, got in sorted(picks(specs, results, SWEEPS[args.sweep][4]).items()):
            print(f"pick for {case}: " + (f"{got[0]} ({got[1][0]}-{got[1][1]} registers, {got[2]} warps/SM)"
                                          if got else "none fits"))
    print(f"{len(specs)} kernels in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote {args.write}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
