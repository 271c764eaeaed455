"""Benchmark of kernels/attention.py: correctness first, then speed.

    python -m bench.attention [--tiny] [--parts validate,train,decode] [--providers ...] [--write [PATH]]

On a GPU: validates bf16, fp16 and fp32 against the fp32 `reference` (forward, backward and decode, a fully padded
row in every case) and stops before timing if anything is out of tolerance; measures the bf16 matmul rate and the
copy bandwidth; times causal attention at GPT-2's shapes (forward, backward, both) for eager math, torch.compile of
it, SDPA pinned to each backend, and ours; then one decode step against a KV cache (a view of a longer buffer).

Without a GPU: the same validation on tiny shapes through Triton's interpreter (correctness only: timing the
interpreter would measure nothing), then the paths the seam `nanorlhf.ops.attention` has on CPU, timed at the
pipeline's sizes (4 heads of 32): `reference` (NANORLHF_KERNELS=reference, the spec), `torch` (SDPA with the
left-padding mask), causal `sdpa` (the torch path when nothing is padded) and `eager` (masked softmax in model code).
Each row names its provider; the note above each table says which providers take the rows' left padding.
"""

import torch
import torch.nn.functional as F

try:
    from bench import _common as common
except ImportError:  # run as a file, `python bench/attention.py`: this folder is on sys.path
    import _common as common

from kernels import attention as attn  # noqa: E402  (after _common: it sets TRITON_INTERPRET without a GPU)
from kernels._triton import HAVE_TRITON  # noqa: E402
from nanorlhf import ops  # noqa: E402

RESULTS = "results/attention.md"
GPU_CASES = (("gpt2-small", 12, 64), ("gpt2-medium", 16, 64), ("hd128", 16, 128))  # (name, heads, head dim)
CPU_CASES = (("pipeline", 4, 32),)  # the built-in model: 4 heads of 32 (n_embd 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAIN_PROVIDERS = ("eager", "compile", "reference", "torch", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                   "ours", "ours-padded")
DECODE_PROVIDERS = ("eager", "reference", "torch", "sdpa", "ours", "ours-padded")
PADDED = ("reference", "torch", "ours-padded")  # the providers given the rows' left padding (`start`)


# ----------------------------------------------------------------------------------------------------------------
# Providers: name -> f(q, k, v, start). Those not in PADDED ignore `start` (causal attention over every key).

def eager_attention(q, k, v, start=None):
    """Attention as model code writes it, in the input dtype (softmax in fp32), causal: the baseline."""
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T) True = keep; tiny next to s
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v  # (B, H, T, D)


def eager_decode(q, k, v, start=None):
    """One new query per row against the whole cache, in the input dtype: no mask needed."""
    return torch.softmax(((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).float(), -1).to(q.dtype) @ v


def _pinned(backend):
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    def f(q, k, v, start=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f


def _compiled(fn):
    import torch._dynamo.config as dynamo_config  # noqa: PLC0415  one static compile per shape: raise the limit
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 256)
    return torch.compile(fn, dynamic=False)


def train_providers(names):
    """name -> f(q, k, v, start) for the training-shape table; None where this torch lacks the backend."""
    from torch.nn.attention import SDPBackend  # noqa: PLC0415
    makers = {
        "eager": lambda: eager_attention,
        "compile": lambda: _compiled(eager_attention),
        "reference": lambda: common.seam(ops.attention, "reference"),
        "torch": lambda: common.seam(ops.attention, "torch"),
        "sdpa": lambda: lambda q, k, v, start: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa-flash": lambda: _pinned(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": lambda: _pinned(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": lambda: _pinned(SDPBackend.CUDNN_ATTENTION) if hasattr(SDPBackend, "CUDNN_ATTENTION") else None,
        "ours": lambda: lambda q, k, v, start: attn.attention(q, k, v),
        "ours-padded": lambda: attn.attention,
    }
    return {n: makers[n]() for n in names}


def decode_providers(names):
    """name -> f(q, k, v, start) for the decode table (q: one new token per row; k, v: the cache)."""
    makers = {
        "eager": eager_decode,
        "reference": common.seam(ops.attention, "reference"),
        "torch": common.seam(ops.attention, "torch"),
        "sdpa": lambda q, k, v, start: F.scaled_dot_product_attention(q, k, v),
        "ours": lambda q, k, v, start: attn.attention(q, k, v),
        "ours-padded": attn.attention,
    }
    return {n: makers[n] for n in names}


def padded_note(names):
    """Which of these providers take the left padding, for a table's caption."""
    return ", ".join(p for p in names if p in PADDED) or "no provider here"


def left_padding(B, T, device, seed=0):
    """start (B,): row 0 unpadded, the others padded by up to a quarter of T, as a batch of prompts is."""
    start = torch.randint(0, max(1, T // 4), (B,), generator=torch.Generator().manual_seed(seed))
    start[0] = 0
    return start.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Correctness against the fp32 reference, before any timing.

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def validation_shapes(dev, tiny):
    """(dtypes, training shapes, decode shapes), shapes as (B, H, Tq, Tk, D)."""
    if tiny:  # a smoke test (the interpreter: seconds per launch)
        return (torch.float32,), [(3, 2, 17, 17, 32)], [(3, 2, 1, 40, 64)]
    if dev.type == "cuda":
        return ((torch.bfloat16, torch.float16, torch.float32),
                [(3, 3, 1, 1, 64), (3, 3, 17, 17, 32), (3, 3, 100, 100, 64), (3, 2, 129, 129, 128),
                 (3, 4, 1000, 1000, 64), (3, 2, 300, 300, 80)],
                [(3, 4, 1, 1000, 64), (3, 4, 4, 2048, 128), (64, 12, 1, 512, 64)])
    return ((torch.bfloat16, torch.float16, torch.float32),
            [(3, 2, 17, 17, 32), (3, 1, 40, 40, 64), (3, 1, 33, 33, 24)],
            [(3, 2, 1, 40, 64), (3, 1, 3, 70, 32)])


def validate(dev, report, tiny=False):
    """Forward, backward and decode against the fp32 reference; True if every error is within tolerance."""
    dtypes, train, decode = validation_shapes(dev, tiny)
    torch_path = common.seam(ops.attention, "torch")
    ok = True
    report.header("case (B, H, Tq, Tk, D)", "dtype", "path", "O", "dQ", "dK", "dV", "torch O", "ok")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in dtypes:
        for kind, shapes in (("train", train), ("decode", decode)):
            for B, H, Tq, Tk, D in shapes:
                q = torch.randn(B, H, Tq, D, generator=gen).to(dev, dtype)
                k = torch.randn(B, H, Tk, D, generator=gen).to(dev, dtype)
                v = torch.randn(B, H, Tk, D, generator=gen).to(dev, dtype)
                # row 0 unpadded, row 1 a third padding, row 2 all padding, the rest random
                start = torch.randint(0, Tk, (B,), generator=gen)
                start[0], start[1], start[2] = 0, Tk // 3, Tk
                start = start.to(dev)
                qf, kf, vf = (x.detach().float().requires_grad_(kind == "train") for x in (q, k, v))
                ref = attn.reference(qf, kf, vf, start)  # (B, H, Tq, D) fp32
                if kind == "train":
                    do = torch.randn(B, H, Tq, D, generator=gen).to(dev, dtype)
                    ref.backward(do.float())
                    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
                    o = attn.attention(qg, kg, vg, start)
                    o.backward(do)
                    errs = [common.max_rel_err(o, ref)] + [common.max_rel_err(a.grad, b.grad)
                                                           for a, b in ((qg, qf), (kg, kf), (vg, vf))]
                    path = "flash fwd+bwd"
                else:
                    with torch.no_grad():
                        o = attn.attention(q, k, v, start)  # Tq < Tk and no grad: the split-KV decode path
                    errs = [common.max_rel_err(o, ref)]
                    bn = attn.decode_config(D, dtype)["BLOCK_N"]
                    n = attn._split_plan(Tk, attn.decode_num_splits(B * H, Tk, bn, dev), bn)[1]
                    path = f"decode, {n} chunk{'s' if n > 1 else ''}"
                finite = bool(torch.isfinite(o).all()) and bool((o[2].float() == 0).all())  # padded row -> zeros
                with torch.no_grad():
                    torch_err = common.max_rel_err(torch_path(q, k, v, start), ref)
                good = finite and all(e <= TOL[dtype] for e in errs)
                ok &= good
                cells = [f"{e:.1e}" for e in errs] + ["-"] * (4 - len(errs))
                report.row(f"{kind} {(B, H, Tq, Tk, D)}", str(dtype)[6:], path, *cells, f"{torch_err:.1e}",
                           "yes" if good else "**NO**")
    tols = ", ".join(f"{str(dt)[6:]} {t:g}" for dt, t in TOL.items())
    report(f"\nErrors: max|ours - ref| / max|ref| against the fp32 reference (tolerances: {tols}); `torch O` is the "
           "same measure for the seam's PyTorch path (SDPA with a mask) in the same dtype. Row 2 of every case is all "
           "padding and must come out as exact zeros.")
    if dev.type == "cpu" and torch.bfloat16 in dtypes:
        report("Under the interpreter bf16 loads are upcast to fp32 and fp32 -> bf16 stores truncate instead of "
               "rounding to nearest, so bf16 errors here read about 2x what a GPU gives.")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Timing.

def _time_modes(fn, q, k, v, start, do, dev, reps):
    """Median ms of fwd (no grad), bwd (backward of a kept forward) and fwd+bwd of one provider."""
    def fwd():
        with torch.no_grad():
            return fn(q, k, v, start)
    o = fn(q, k, v, start)
    return {"fwd": common.median_ms(fwd, dev, reps),
            "bwd": common.median_ms(lambda: o.backward(do, retain_graph=True), dev, reps, grad_to_none=[q, k, v]),
            "fwd+bwd": common.median_ms(lambda: fn(q, k, v, start).backward(do), dev, reps, grad_to_none=[q, k, v])}


def time_training(dev, dtype, peak_tflops, providers, cases, seqlens, tokens, reps, report):
    """Causal attention at batch = tokens // T: ms, TFLOP/s, fraction of the matmul rate, speed vs the first
    provider."""
    base = providers[0]
    report.header("case", "T", "B", "pass", "provider", "ms", "TFLOP/s", "of matmul peak", f"x {base}")
    fns = train_providers(providers)
    for case, H, D in cases:
        for T in seqlens:
            B = max(1, tokens // T)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(B, H, T, D, device=dev, dtype=dtype)  # (B, H, T, D)
            start = left_padding(B, T, dev)  # (B,)
            fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            times = {}
            for name in providers:
                try:
                    if fns[name] is None:
                        raise RuntimeError("not in this torch")
                    times[name] = _time_modes(fns[name], q, k, v, start, do, dev, reps)
                except Exception as e:  # an unsupported backend, out of memory, ...: report it and go on
                    times[name] = common.first_line(e)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            for mode, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
                for name in providers:
                    ms = times[name]
                    if isinstance(ms, str):
                        report.row(f"{case} ({H}x{D})", T, B, mode, name, f"n/a: {ms}", "", "", "")
                        continue
                    ms = ms[mode]
                    tf = mult * fwd_flops / ms / 1e9
                    vs = times[base][mode] / ms if isinstance(times[base], dict) else float("nan")
                    report.row(f"{case} ({H}x{D})", T, B, mode, name, f"{ms:.3f}", f"{tf:.3g}",
                               f"{100 * tf / peak_tflops:.0f}%", f"{vs:.2f}")
            del q, k, v, do
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def time_decode(dev, dtype, peak_gbs, providers, case, batches, cache_lens, reps, report):
    """One new token per row against a KV cache of length L (a view of a longer buffer, as the model keeps it)."""
    report.header("case", "batch", "cache L", "provider", "ms", "KV GB/s", "of bandwidth", "splits")
    _, H, D = case
    fns = decode_providers(providers)
    for B in batches:
        for L in cache_lens:
            cache_k = torch.randn(B, H, L + 128, D, device=dev, dtype=dtype)  # preallocated (Tmax = L + 128)
            cache_v = torch.randn(B, H, L + 128, D, device=dev, dtype=dtype)
            k, v = cache_k[:, :, :L], cache_v[:, :, :L]  # the model's view of the filled part, (B, H, L, D)
            q = torch.randn(B, H, 1, D, device=dev, dtype=dtype)  # (B, H, 1, D)
            start = left_padding(B, L, dev)
            kv_bytes = 2 * B * H * L * D * q.element_size()
            bn = attn.decode_config(D, dtype)["BLOCK_N"]
            splits = attn._split_plan(L, attn.decode_num_splits(B * H, L, bn, dev), bn)[1]
            for name in providers:
                with torch.no_grad():
                    ms = common.median_ms(lambda: fns[name](q, k, v, start), dev, reps)
                gbs = kv_bytes / ms / 1e6
                report.row(f"{case[0]} ({H}x{D})", B, L, name, f"{ms:.4f}", f"{gbs:.3g}",
                           f"{100 * gbs / peak_gbs:.0f}%", splits if name.startswith("ours") else "-")


# ----------------------------------------------------------------------------------------------------------------

def defaults(dev, tiny):
    """Sizes and providers: GPT-2's shapes on a GPU, the pipeline's on CPU, a few rows with --tiny (either device)."""
    on_cpu = "reference,torch,sdpa,eager"
    if tiny:
        return dict(providers=on_cpu, decode_providers=on_cpu, seqlens="32", tokens=128, batches="4", cache_lens="32",
                    reps=2)
    if dev.type == "cuda":
        return dict(providers="sdpa-flash,eager,compile,sdpa-efficient,sdpa-cudnn,ours",
                    decode_providers="ours,ours-padded,sdpa,eager", seqlens="512,1024,2048,4096", tokens=16384,
                    batches="16,64,256", cache_lens="512,2048", reps=10)
    return dict(providers=on_cpu, decode_providers=on_cpu, seqlens="64,256", tokens=2048, batches="16,64",
                cache_lens="64,256", reps=20)


def main(argv=None):
    ap = common.parser("Validate, then benchmark, the attention kernels (kernels/attention.py).", RESULTS)
    ap.add_argument("--parts", default="validate,train,decode", help="comma list of validate, train, decode")
    ap.add_argument("--providers", help=f"training table, the first is the baseline; of {','.join(TRAIN_PROVIDERS)}")
    ap.add_argument("--decode-providers", help=f"decode table; of {','.join(DECODE_PROVIDERS)}")
    ap.add_argument("--seqlens", help="training sequence lengths T")
    ap.add_argument("--tokens", type=int, help="batch = tokens // T for the training shapes")
    ap.add_argument("--batches", help="decode batch sizes")
    ap.add_argument("--cache-lens", help="decode cache lengths")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="of the timed tensors (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--cases", help="GPU: comma list of the timed shapes, of "
                    + ",".join(c[0] for c in GPU_CASES) + " (default all)")
    args = ap.parse_args(argv)
    dev = common.prepare(args)
    for key, value in defaults(dev, args.tiny).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    parts = set(args.parts.split(","))
    providers, dec_providers = args.providers.split(","), args.decode_providers.split(",")
    if parts - {"validate", "train", "decode"}:
        ap.error("--parts takes validate, train, decode")
    if set(providers) - set(TRAIN_PROVIDERS) or set(dec_providers) - set(DECODE_PROVIDERS):
        ap.error(f"--providers takes {','.join(TRAIN_PROVIDERS)}; --decode-providers {','.join(DECODE_PROVIDERS)}")
    on_gpu = dev.type == "cuda"
    dtype = DTYPES[args.dtype]
    report = common.Report(args.write)
    report.start("Attention kernels: " + ("validation and benchmark" if on_gpu else "CPU run"), dev,
                 "bench.attention", argv)

    if "validate" in parts:
        report("\n## Correctness against the fp32 reference" + ("" if on_gpu else " (Triton's interpreter)") + "\n")
        if not HAVE_TRITON:
            report("Triton is not installed: the kernels cannot run here.")
        elif not validate(dev, report, tiny=args.tiny):
            report("\n**Validation failed: not timing.**")
            report.done()
            return 1
    if parts & {"train", "decode"}:
        peak_tflops, peak_gbs = common.device_rates(dev)
        report("\n## Reference rates\n")
        for line in common.rate_lines(dev, peak_tflops, peak_gbs):
            report(line)
    cases = GPU_CASES if on_gpu and not args.tiny else CPU_CASES
    if args.cases and on_gpu and not args.tiny:
        wanted = args.cases.split(",")
        if set(wanted) - {c[0] for c in GPU_CASES}:
            ap.error("--cases takes " + ",".join(c[0] for c in GPU_CASES))
        cases = tuple(c for c in GPU_CASES if c[0] in wanted)
    if "train" in parts:
        report(f"\n## Training shapes (causal, {args.dtype})\n")
        report(f"FLOPs: 4 B H T^2 D / 2 forward (causal), x2.5 backward, x3.5 both. ms: "
               f"{common.timing_note(dev, args.reps)}. "
               f"`x {providers[0]}` = its ms / this ms (> 1: faster). Rows 1.. of each batch are left-padded by up to "
               f"T/4; only {padded_note(providers)} take that padding (`start`), the others attend causally "
               "over every key. `reference` and `torch` are the seam nanorlhf.ops.attention under "
               "NANORLHF_KERNELS=reference and =torch; `sdpa` is what the torch path runs when nothing is padded.\n")
        time_training(dev, dtype, peak_tflops, providers, cases, common.ints(args.seqlens), args.tokens, args.reps,
                      report)
    if "decode" in parts:
        report(f"\n## Decode (one new token per row against a {args.dtype} KV cache, a view of a longer buffer)\n")
        report(f"Bytes: K and V read once, 2 x B H L D x {torch.finfo(dtype).bits // 8} bytes. Left padding of up to "
               f"L/4 per row, taken by {padded_note(dec_providers)}."
               + ("" if on_gpu else " A cache this small sits in the processor's caches, so reads can beat the copy "
                  "bandwidth (measured on 64 MiB).") + "\n")
        time_decode(dev, dtype, peak_gbs, dec_providers, cases[0], common.ints(args.batches),
                    common.ints(args.cache_lens), args.reps * (1 if on_gpu else 5), report)
    if not on_gpu:
        report("\nThe Triton kernels are timed on a GPU only: `python -m bench.attention --write` on a CUDA machine.")
    report.done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
