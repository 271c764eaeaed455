"""Benchmark of kernels/logprobs.py: correctness first, then speed.

    python -m bench.logprobs [--tiny] [--parts validate,logits,fused,seam] [--n ...] [--v ...] [--d ...]
                             [--write [PATH]]

On a GPU (default parts validate,logits,fused): checks bf16 correctness against the fp32 spec and stops before timing
if that fails; measures the copy bandwidth and the bf16 matmul rate; then times forward, backward and both, for
  logits  from (N, V) bf16 logits: log-probs, + entropy, + the full KL, against eager (log_softmax + gather in fp32)
          and torch.compile of it; GB/s on the minimal bytes, peak memory
  fused   through the LM head from hidden (N, d) and W (V, d): against eager (hidden @ W.T, then the same) and
          torch.compile of it; useful TFLOP/s, peak memory

Without a GPU (default parts validate,seam): the same bf16 check on tiny shapes through Triton's interpreter
(correctness only: timing the interpreter would measure nothing), then
  seam    the paths of nanorlhf.ops.token_logprobs at a PPO minibatch's size (N = 512 tokens, d = 128,
          V = 50,257), forward with grad and backward, interleaved repetitions: `reference` (NANORLHF_KERNELS=
          reference: the spec), `naive` (hidden @ W.T, log_softmax, gather: model code without the seam), `torch`
          (the CPU path: chunked, its blocks kept for the backward while they fit keep_bytes), `torch-lean`
          (keep_bytes=0: one block at a time, the backward recomputes the logits: what calls beyond keep_bytes get)
`--parts logits,fused` on CPU times the interpreter: a check that the harness runs, not a measurement.
"""

import importlib.util
import statistics

import torch

try:
    from bench import _common as common
except ImportError:  # run as a file, `python bench/logprobs.py`: this folder is on sys.path
    import _common as common

from kernels import logprobs as L  # noqa: E402  (after _common: it sets TRITON_INTERPRET without a GPU)
from kernels._triton import HAVE_TRITON  # noqa: E402
from nanorlhf import ops  # noqa: E402

RESULTS = "results/logprobs.md"
OPS = ("logp", "logp+entropy", "full-KL")
SEAM_IMPLS = ("reference", "naive", "torch", "torch-lean", "triton", "compile")


# ----------------------------------------------------------------------------------------------------------------
# The contenders.

def eager_logits(op, temperature=1.0):
    """The PyTorch way, on logits: log_softmax in fp32, then gather (plus the entropy or the full KL)."""

    def f(z, y, zr=None):
        lsm = torch.log_softmax(z.float() / temperature, dim=-1)  # (N, V) fp32
        logp = lsm.gather(-1, y[:, None]).squeeze(-1)  # (N,)
        if op == "logp":
            return (logp,)
        if op == "logp+entropy":
            return logp, -(lsm.exp() * lsm).sum(-1)
        lsq = torch.log_softmax(zr.float() / temperature, dim=-1)  # (N, V) fp32
        return logp, (lsm.exp() * (lsm - lsq)).sum(-1)

    return f


def ours_logits(op):
    def f(z, y, zr=None):
        out = L.logprobs(z, y, with_entropy=op == "logp+entropy", ref_logits=zr if op == "full-KL" else None)
        return tuple(o for o in out if o is not None)

    return f


def eager_fused(h, w, y):
    return eager_logits("logp")(h @ w.t(), y)  # (N, V) logits in the inputs' dtype, then fp32


def ours_fused(h, w, y):
    return (L.fused_logprobs(h, w, y).logp,)


def liger_fused(h, w, y):
    """Liger-Kernel's fused linear cross-entropy, per token (reduction none): -log pi(y), so the same logp."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: PLC0415
    return (-LigerFusedLinearCrossEntropyLoss(reduction="none")(w, h, y),)


def cce_fused(h, w, y):
    """Apple's Cut Cross-Entropy (linear_cross_entropy, reduction none): -log pi(y)."""
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415
    return (-linear_cross_entropy(h, w, y, reduction="none"),)


FUSED_IMPLS = {"eager": eager_fused, "compile": None, "ours": ours_fused, "liger": liger_fused, "cce": cce_fused}


def naive_head(h, w, y, with_entropy):
    """Model code without the seam: the whole (N, V) logits, log_softmax, gather."""
    lsm = torch.log_softmax((h @ w.t()).float(), dim=-1)  # (N, V)
    logp = lsm.gather(-1, y[:, None]).squeeze(-1)  # (N,)
    return logp, (-(lsm.exp() * lsm).sum(-1) if with_entropy else None)


def seam_impls(names):
    """name -> f(h, w, y, with_entropy) -> (logp, entropy or None)."""
    def through(mode):
        fn = common.seam(ops.token_logprobs, mode)

        def f(h, w, y, with_entropy):
            out = fn(h, w, y, 1.0, with_entropy)
            return out if with_entropy else (out, None)
        return f

    def lean(h, w, y, with_entropy):
        return L.fused_logprobs(h, w, y, with_entropy=with_entropy, backend="torch", keep_bytes=0)[:2]

    makers = {"reference": lambda: through("reference"), "naive": lambda: naive_head, "torch": lambda: through("torch"),
              "torch-lean": lambda: lean, "triton": lambda: through("triton"),
              "compile": lambda: torch.compile(naive_head)}
    return {n: makers[n]() for n in names}


# ----------------------------------------------------------------------------------------------------------------
# Correctness, before any timing.

def validate(dev, report, tiny=False):
    """bf16 through the Triton path: ours against the fp32 spec, and no worse than eager bf16."""
    N, V, d = (16, 300, 16) if tiny else (1024, 50257, 768) if dev.type == "cuda" else (48, 1271, 64)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randn(N, V, generator=gen) * 3).to(dev, torch.bfloat16)  # (N, V)
    zr = (z.float() + torch.randn(N, V, generator=gen).to(dev)).to(torch.bfloat16)  # (N, V)
    y = torch.randint(0, V, (N,), generator=gen).to(dev)
    mask = (torch.rand(N, generator=gen) > 0.2).to(dev)
    g = [torch.randn(N, generator=gen).to(dev) for _ in range(3)]  # output gradients != 1
    ok = True
    for kw in (dict(with_entropy=True), dict(ref_logits=zr, mask=mask)):
        zz = z.clone().requires_grad_()
        out = L.logprobs(zz, y, 0.9, backend="triton", **kw)
        zf = z.float().requires_grad_()
        ref = L.reference_logprobs(zf, y, 0.9, mask=kw.get("mask"), ref_logits=kw.get("ref_logits"))
        pairs = [(out.logp, ref.logp)] + ([(out.entropy, ref.entropy)] if out.entropy is not None else []) + (
            [(out.kl, ref.kl)] if out.kl is not None else [])
        sum((o * gi).sum() for (o, _), gi in zip(pairs, g)).backward()
        sum((r * gi).sum() for (_, r), gi in zip(pairs, g)).backward()
        err_out = max((o - r).abs().max().item() for o, r in pairs)
        err_grad = common.norm_rel_err(zz.grad, zf.grad)
        good = err_out < 2e-3 and err_grad < 1e-2
        ok &= good
        report(f"- from logits, bf16 N={N} V={V} {sorted(kw)}: max |out - ref| = {err_out:.1e}, "
               f"grad rel. error = {err_grad:.1e} -> {'ok' if good else 'FAIL'}")
    h = torch.randn(N, d, generator=gen).to(dev, torch.bfloat16)  # (N, d)
    w = (torch.randn(V, d, generator=gen) * d**-0.5 * 2).to(dev, torch.bfloat16)  # (V, d)
    got = {}
    for name in ("ours", "eager"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if name == "ours":
            out = L.fused_logprobs(hh, ww, y, mask=mask, with_entropy=True, backend="triton")
            lp, ent = out.logp, out.entropy
        else:
            lp, ent = L.reference(hh @ ww.t(), y)  # bf16 logits, fp32 maths
            lp, ent = torch.where(mask, lp, 0), torch.where(mask, ent, 0)
        ((lp * g[0]).sum() + (ent * g[1]).sum()).backward()
        got[name] = (lp, ent, hh.grad, ww.grad)
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    ref = L.reference_lm_head(h32, w32, y, mask=mask)
    ((ref.logp * g[0]).sum() + (ref.entropy * g[1]).sum()).backward()
    exact = (ref.logp, ref.entropy, h32.grad, w32.grad)
    e_ours = [common.norm_rel_err(a, b) for a, b in zip(got["ours"], exact)]
    e_eager = [common.norm_rel_err(a, b) for a, b in zip(got["eager"], exact)]
    good = all(eo <= 2 * ee + 1e-3 for eo, ee in zip(e_ours, e_eager))
    ok &= good
    report(f"- fused, bf16 N={N} V={V} d={d} (rel. errors vs fp32 maths of logp, entropy, dh, dW): ours "
           f"{', '.join(f'{e:.1e}' for e in e_ours)}; eager bf16 {', '.join(f'{e:.1e}' for e in e_eager)} -> "
           f"{'ok' if good else 'FAIL'} (ours must be within 2x of eager bf16 + 1e-3)")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Timing: the GPU tables (logits, fused).

def measure(fn, inputs, grads_of, dev, reps):
    """Median ms of forward, backward (of a retained graph) and both, and the peak memory of both; None if it
    failed (out of memory, a torch.compile that does not build here)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        outs = fn(*inputs)
        g = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]  # output gradients != 1

        def both():
            torch.autograd.grad(fn(*inputs), grads_of, g)

        res = {"fwd": common.median_ms(lambda: fn(*inputs), dev, reps),
               "bwd": common.median_ms(lambda: torch.autograd.grad(outs, grads_of, g, retain_graph=True), dev, reps),
               "both": common.median_ms(both, dev, reps)}
        res["peak"] = common.peak_mb(both, dev)
        return res
    except torch.cuda.OutOfMemoryError:
        return None
    except Exception as e:  # torch.compile can fail on some set-ups: report, don't stop
        print(f"    ({type(e).__name__}: {common.first_line(e, 120)})")
        return None
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _num(x, fmt="{:.2f}"):
    return "n/a" if x is None or x != x else fmt.format(x)  # NaN: not measured (peak memory on CPU)


def _speedups(res, name, r):
    """`x eager`, `x compile`: their fwd+bwd ms / ours."""
    return ["" if res.get(k) is None or name == k else f"{res[k]['both'] / r['both']:.2f}"
            for k in ("eager", "compile")]


def time_logits(dev, ops_, Ns, Vs, compiled, reps, bw, report):
    report.header("op", "N", "V", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd GB/s (% bw)", "bwd GB/s (% bw)",
                  "fwd+bwd GB/s (% bw)", "peak MB", "x eager", "x compile")
    for op in ops_:
        for V in Vs:
            for N in Ns:
                gen = torch.Generator().manual_seed(1)
                z = (torch.randn(N, V, generator=gen) * 2).to(dev, torch.bfloat16).requires_grad_()  # (N, V)
                y = torch.randint(0, V, (N,), generator=gen).to(dev)
                zr = (torch.randn(N, V, generator=gen) * 2).to(dev, torch.bfloat16) if op == "full-KL" else None
                impls = [("eager", eager_logits(op))]
                if compiled:
                    impls.append(("compile", torch.compile(eager_logits(op))))
                impls.append(("ours", ours_logits(op)))
                res = {name: measure(fn, (z, y, zr), [z], dev, reps) for name, fn in impls}
                nv = N * V * z.element_size()  # bytes of one (N, V) bf16 tensor
                reads = (2 if op == "full-KL" else 1) * nv  # the logits (and the reference's), read once
                minimal = {"fwd": reads, "bwd": reads + nv, "both": reads + nv}  # + the gradient, written once

                def rate(r, k):
                    if dev.type != "cuda":
                        return "n/a"
                    gbs = minimal[k] / (r[k] * 1e-3) / 1e9
                    return f"{gbs:.0f} ({100 * gbs / bw:.0f}%)"

                for name, r in res.items():
                    if r is None:
                        report.row(op, N, V, name, "OOM/err", *[""] * 8)
                        continue
                    report.row(op, N, V, name, _num(r["fwd"]), _num(r["bwd"]), _num(r["both"]), rate(r, "fwd"),
                               rate(r, "bwd"), rate(r, "both"), _num(r["peak"], "{:.0f}"), *_speedups(res, name, r))
                del z, zr


def time_fused(dev, Ns, Vs, Ds, compiled, reps, mm_rate, report, names=("eager", "compile", "ours")):
    report.header("N", "V", "d", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s (% mm)",
                  "bwd TFLOP/s (% mm)", "fwd+bwd TFLOP/s (% mm)", "peak MB", "peak / eager", "x eager", "x compile")
    missing = [n for n, mod in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy"))
               if n in names and importlib.util.find_spec(mod) is None]
    for V in Vs:
        for d in Ds:
            for N in Ns:
                gen = torch.Generator().manual_seed(2)
                h = torch.randn(N, d, generator=gen).to(dev, torch.bfloat16).requires_grad_()  # (N, d)
                w = (torch.randn(V, d, generator=gen) * d**-0.5).to(dev, torch.bfloat16).requires_grad_()  # (V, d)
                y = torch.randint(0, V, (N,), generator=gen).to(dev)
                impls = [(n, torch.compile(eager_fused) if n == "compile" else FUSED_IMPLS[n]) for n in names
                         if (n != "compile" or compiled) and n not in missing]
                res = {name: measure(fn, (h, w, y), [h, w], dev, reps) for name, fn in impls}
                flops = {"fwd": 2 * N * V * d, "bwd": 4 * N * V * d, "both": 6 * N * V * d}  # useful flops

                def tflops(r, k):
                    if dev.type != "cuda":
                        return "n/a"
                    tf = flops[k] / (r[k] * 1e-3) / 1e12
                    return f"{tf:.0f} ({100 * tf / mm_rate:.0f}%)"

                for name, r in res.items():
                    if r is None:
                        report.row(N, V, d, name, "OOM/err", *[""] * 9)
                        continue
                    e = res.get("eager")
                    rel_peak = "" if e is None or dev.type != "cuda" else f"{r['peak'] / e['peak']:.2f}"
                    report.row(N, V, d, name, _num(r["fwd"]), _num(r["bwd"]), _num(r["both"]), tflops(r, "fwd"),
                               tflops(r, "bwd"), tflops(r, "both"), _num(r["peak"], "{:.0f}"), rel_peak,
                               *_speedups(res, name, r))
                del h, w


# ----------------------------------------------------------------------------------------------------------------
# Timing: the seam's paths (the CPU table; on a GPU with --parts seam).

def time_seam(dev, impls, Ns, V, d, reps, report):
    """Forward (grad enabled) and backward of sum(g1 logp) [+ sum(g2 entropy)] through each path, interleaved
    repetitions (each round runs every path once: a slow spell of the machine hits them alike); median ms."""
    base = impls[0]
    report.header("N", "V", "d", "outputs", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", f"x {base}",
                  f"max abs grad diff vs {base}")
    fns = seam_impls(impls)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for N in Ns:
        gen = torch.Generator().manual_seed(N)
        h = torch.randn(N, d, generator=gen).to(dev, dtype).requires_grad_()  # (N, d)
        w = (torch.randn(V, d, generator=gen) * 0.05).to(dev, dtype).requires_grad_()  # (V, d)
        y = torch.randint(0, V, (N,), generator=gen).to(dev)
        g1, g2 = torch.randn(N, generator=gen).to(dev), torch.randn(N, generator=gen).to(dev)
        for with_entropy in (False, True):
            times = {n: [] for n in impls}
            grads = {}
            for rep in range(reps + 1):  # round 0 is a warm-up
                for name in impls:
                    h.grad = w.grad = None
                    t0 = common.clock(dev)
                    logp, ent = fns[name](h, w, y, with_entropy)
                    loss = (logp * g1).sum() + ((ent * g2).sum() if with_entropy else 0)
                    t1 = common.clock(dev)
                    loss.backward()
                    t2 = common.clock(dev)
                    if rep:
                        times[name].append((1e3 * (t1 - t0), 1e3 * (t2 - t1)))
                    grads[name] = (h.grad.clone(), w.grad.clone())
            total = {n: statistics.median(f + b for f, b in t) for n, t in times.items()}
            for name, t in times.items():
                diff = max((a - b).abs().max().item() for a, b in zip(grads[name], grads[base]))
                report.row(N, V, d, "logp, entropy" if with_entropy else "logp", name,
                           f"{statistics.median(f for f, _ in t):.1f}", f"{statistics.median(b for _, b in t):.1f}",
                           f"{total[name]:.1f}", f"{total[base] / total[name]:.2f}", f"{diff:.1e}")
        del h, w


# ----------------------------------------------------------------------------------------------------------------

def defaults(dev, tiny):
    """Parts, sizes and seam paths: GPT-2's sizes on a GPU, a PPO minibatch on CPU, tiny with --tiny (either device)."""
    on_cpu = "reference,naive,torch,torch-lean"
    if tiny:
        return dict(parts="validate,seam", n="64", v="5003", d="32", impls=on_cpu, reps=1)
    if dev.type == "cuda":
        return dict(parts="validate,logits,fused", n="4096,16384,32768", v="50257,128256", d="768,1600",
                    impls="reference,naive,torch,triton", reps=10)
    return dict(parts="validate,seam", n="512", v="50257", d="128", impls=on_cpu, reps=3)


def main(argv=None):
    ap = common.parser("Validate, then benchmark, the log-prob kernels (kernels/logprobs.py).", RESULTS)
    ap.add_argument("--parts", help="comma list of validate, logits, fused, seam")
    ap.add_argument("--n", help="comma list of token counts N")
    ap.add_argument("--v", help="comma list of vocabulary sizes V (the seam table takes the first)")
    ap.add_argument("--d", help="comma list of widths d (fused; the seam table takes the first)")
    ap.add_argument("--ops", default=",".join(OPS), help="from-logits ops to time")
    ap.add_argument("--impls", help=f"seam table, the first is the baseline; of {','.join(SEAM_IMPLS)}")
    ap.add_argument("--fused-impls", default="eager,compile,ours",
                    help="fused table's contenders, of " + ",".join(FUSED_IMPLS) + " (liger, cce: when installed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (GPU)")
    ap.add_argument("--compile", action="store_true", help="CPU: include torch.compile in logits / fused (slow)")
    args = ap.parse_args(argv)
    dev = common.prepare(args)
    for key, value in defaults(dev, args.tiny).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts, impls, ops_ = args.parts.split(","), args.impls.split(","), args.ops.split(",")
    if set(parts) - {"validate", "logits", "fused", "seam"}:
        ap.error("--parts takes validate, logits, fused, seam")
    if set(impls) - set(SEAM_IMPLS) or set(ops_) - set(OPS):
        ap.error(f"--impls takes {','.join(SEAM_IMPLS)}; --ops {','.join(OPS)}")
    on_gpu = dev.type == "cuda"
    Ns, Vs, Ds = common.ints(args.n), common.ints(args.v), common.ints(args.d)
    report = common.Report(args.write)
    report.start("Log-prob kernels: " + ("validation and benchmark" if on_gpu else "CPU run"), dev, "bench.logprobs",
                 argv)

    if "validate" in parts:
        report("\n## bf16 correctness" + (" (before any timing)" if on_gpu else " (Triton's interpreter)") + "\n")
        if not HAVE_TRITON:
            report("Triton is not installed: the kernels cannot run here.")
        elif not validate(dev, report, tiny=args.tiny):
            report("\nbf16 validation FAILED: no timings.")
            report.done()
            return 1
    mm_rate = bw = float("nan")
    if set(parts) & {"logits", "fused"}:
        mm_rate, bw = common.device_rates(dev)
        report("\n## Reference rates\n")
        for line in common.rate_lines(dev, mm_rate, bw):
            report(line)
        if not on_gpu:
            report("\n**The tables below time Triton's interpreter (and numpy), not the kernels: they check that the "
                   "harness runs; they are not performance figures. GB/s, TFLOP/s and peak memory are GPU-only.**")
    compiled = not args.no_compile and (on_gpu or args.compile)
    if compiled:
        import torch._dynamo.config as dynamo_config  # noqa: PLC0415
        dynamo_config.cache_size_limit = 256  # one compiled graph per shape
    timing = common.timing_note(dev, args.reps)
    if "logits" in parts:
        report(f"\n## From logits (bf16 logits, fp32 maths), ms: {timing}\n")
        report("GB/s counts the minimal bytes: fwd reads the logits (and reference logits) once; bwd and fwd+bwd also "
               "write the gradient once. Ours reads the logits twice in fwd+bwd (forward, then backward), so its "
               "fwd+bwd GB/s cannot exceed 2/3 of the copy bandwidth on this count. % bw = fraction of the measured "
               "copy bandwidth. Peak = memory allocated by one fwd+bwd beyond its inputs. `x eager`, `x compile` = "
               "their fwd+bwd ms / this one's.\n")
        time_logits(dev, ops_, Ns, Vs, compiled, args.reps, bw, report)
        if on_gpu:
            report("\nTargets (H100/H200): ours fwd+bwd >= 85 % of copy bandwidth, >= 3x eager, >= 1.3x compile.")
    if "fused" in parts:
        report(f"\n## Fused with the LM head (bf16 hidden and weight), ms: {timing}\n")
        report("TFLOP/s counts the useful flops 2NVd (fwd), 4NVd (bwd), 6NVd (fwd+bwd); ours does 8NVd in fwd+bwd "
               "(the backward recomputes the logits). % mm = fraction of the measured bf16 matmul rate. Peak = memory "
               "allocated by one fwd+bwd beyond its inputs.\n")
        fused = args.fused_impls.split(",")
        if set(fused) - set(FUSED_IMPLS):
            ap.error("--fused-impls takes " + ",".join(FUSED_IMPLS))
        time_fused(dev, Ns, Vs, Ds, compiled, args.reps, mm_rate, report, fused)
        gone = [n for n, mod in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy"))
                if n in fused and importlib.util.find_spec(mod) is None]
        if gone:
            report(f"\n{', '.join(gone)}: not installed here, so not in the table (bench/gpu.py installs them from "
                   "wheels).")
        if on_gpu:
            report("\nTargets (H100/H200): ours peak <= 10 % of eager's, >= 60 % of the measured matmul rate.")
    if "seam" in parts:
        dtype = "bf16" if on_gpu else "fp32"
        report(f"\n## The seam nanorlhf.ops.token_logprobs, path by path ({dtype})\n")
        report(f"ms: median of {args.reps} interleaved rounds after a warm-up round (each round runs every path "
               "once). fwd = forward with grad enabled; bwd = backward of sum(g1 logp) [+ sum(g2 entropy)]. "
               "`reference`, `torch`, `triton`: the seam under NANORLHF_KERNELS=reference, torch, triton. `naive`: "
               "hidden @ W.T, log_softmax, gather (model code without the seam). `torch` keeps its n x V blocks for "
               "the backward while they fit keep_bytes (on CPU 512 MiB: N up to 2,670 at V = 50,257; on GPU never); "
               "`torch-lean` is keep_bytes=0, one 64 MiB block at a time and the logits recomputed in the backward: "
               "what larger calls get.\n")
        time_seam(dev, impls, Ns, Vs[0], Ds[0], args.reps, report)
    if not on_gpu:
        report("\nThe Triton kernels are timed on a GPU only: `python -m bench.logprobs --write` on a CUDA machine.")
    report.done()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
