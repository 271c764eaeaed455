"""Many processes, one model: PyTorch's DistributedDataParallel (DDP) as the three scripts use it, and bf16 autocast.

    torchrun --standalone --nproc_per_node=4 train_sft.py       # 4 processes (one per GPU), same flags as 1 process

The model of DDP: torchrun starts N copies of the script and tells each its RANK (0..N-1), WORLD_SIZE (N) and
LOCAL_RANK (its GPU on this machine). Every copy builds the same model from the same seed, reads the same data and
draws the same random numbers for the data order, then takes only its own slice of each global batch (`shard`).
Wrapped in DDP (`wrap`), the backward pass averages the gradients over the processes (an all-reduce), so every
optimizer step is the same on all of them and the copies stay identical. A figure that depends on every process's
data (a mean, a variance) is summed over processes the same way (`all_reduce_sum`, `mean`). One process alone
(no torchrun: WORLD_SIZE unset or 1) sets up nothing, and every function here is then the identity or close to it.

`batch_size` is per process: the global batch is world_size x batch_size. Only rank 0 prints, logs and saves.

Micro-batches: a step may run its batch through the model in parts (`micro_batches`), one forward and backward
each, the gradients adding up before the optimizer's step; each part's mean loss is weighed by its share of the
global batch's items (`shares`); under DDP the gradient is averaged over processes only in the last part's
backward (`accumulate`: no_sync around the others).

Sharding (`wrap(..., fsdp=True)`): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) splits each transformer
block's parameters, and so their gradients and AdamW's moments, over the processes; a forward or backward pass
gathers one block's whole parameters at a time. Generation, evaluation and checkpoints run the plain module on the
whole parameters: `unshard` gathers them in every process (a collective), `reshard` frees them again.
"""

import contextlib
import datetime
import os
import warnings

import torch
import torch.distributed as tdist

from nanorlhf.config import UserError


TIMEOUT_MINUTES = 120.0  # NANORLHF_DIST_TIMEOUT's default


def timeout() -> datetime.timedelta:
    """How long a process waits at a collective before the run is stopped as hung: NANORLHF_DIST_TIMEOUT minutes,
    by default 120. It must cover what rank 0 does alone while the others wait at their next collective (the
    evaluation, the RM's normalisation and held-out accuracy, saving a checkpoint): nccl's own default, 10 minutes,
    can be shorter than that on a large held-out set."""
    text = os.environ.get("NANORLHF_DIST_TIMEOUT", str(TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < float("inf"):
        raise UserError(f"NANORLHF_DIST_TIMEOUT must be a number of minutes > 0, got {text!r}")
    return datetime.timedelta(minutes=minutes)


def setup() -> str:
    """Join the process group torchrun describes in the environment and return this process's device.

    Backend nccl with one GPU per LOCAL_RANK on CUDA, gloo on CPU, both with timeout() for their collectives. Without
    torchrun (no WORLD_SIZE, or 1) nothing is set up and the device is "cuda" if there is a GPU, else "cpu", as for
    any 1-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            tdist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout())
        else:
            tdist.init_process_group("gloo", timeout=timeout())
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}" if tdist.is_initialized() else "cuda"


def cleanup() -> None:
    """Wait for every process (rank 0 may still be evaluating or saving), then leave the process group."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that prints, logs metrics, evaluates and writes files."""
    return rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def require_global_batch(n_items, needed, what, path, batch):
    """Refuse data too small for one global batch under torchrun, in one line naming the file: shards of unequal
    size give the processes different numbers of steps (DDP hangs), and one left empty crashes. batch: the flags
    that make the global batch, as the message shows them ("--batch_size 8")."""
    if world_size() > 1 and n_items < needed:
        raise UserError(f"{path}: {n_items} {what}, fewer than one global batch ({world_size()} processes x "
                        f"{batch}): lower --batch_size")


def shard(items):
    """This process's contiguous slice of a global batch (a list or a tensor's first dimension): with world size W
    and W * B items, rank r gets items r * B .. (r + 1) * B - 1, what a 1-process run with the whole batch sees at
    those positions."""
    n, w, r = len(items), world_size(), rank()
    return items[r * n // w:(r + 1) * n // w]


def _reduce_device():
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of x over all processes (a new tensor; x itself with one process)."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    tdist.all_reduce(y)
    return y


def sum_floats(values):
    """[sum over processes of each number] for a list of Python numbers (float64 on the way)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)
    return t.tolist()


def mean_floats(values):
    """[mean over processes of each number]: for per-process figures that weigh the same on every process."""
    if world_size() == 1:
        return list(values)
    return [v / world_size() for v in sum_floats(values)]


def mean(x: torch.Tensor):
    """The mean of all the elements of x on all processes, a Python float; None if there are none anywhere."""
    if world_size() == 1:
        return x.float().mean().item() if x.numel() else None
    total, n = sum_floats([x.float().sum().item(), x.numel()])
    return total / n if n else None


def global_mean_loss(loss: torch.Tensor, n: int):
    """For a loss that is a mean over this process's n items (tokens, rankings): (the loss to backpropagate, the
    mean over every process's items, detached). DDP averages gradients over processes, which would weigh each
    process's mean the same however many items it had; scaling by world_size * n / n_total makes the step that of
    the mean over all the items, as one process with the whole global batch would take. One process: (loss, loss)."""
    if world_size() == 1:
        return loss, loss.detach()
    t = all_reduce_sum(torch.stack([loss.detach().float() * n, torch.tensor(float(n), device=loss.device)]))
    return loss * (world_size() * n / t[1].clamp(min=1)), t[0] / t[1].clamp(min=1)


def micro_batches(n: int, size: int) -> list[slice]:
    """The parts a step's n items are run in: slices of `size` items, the last one shorter (size 0 or >= n: one slice
    of all n, the plain step)."""
    if not size or size >= n:
        return [slice(0, n)]
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def in_parts(fn, n: int, size: int):
    """fn(rows) for the row slices of n rows in micro-batches of size, concatenated along the first dimension: a
    pass without gradient run a part at a time (size 0: one call with all rows)."""
    outs = [fn(rows) for rows in micro_batches(n, size)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def split(n: int, parts: int) -> list[slice]:
    """n items in `parts` consecutive slices whose sizes differ by one at most."""
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def shares(*counts) -> list[list[float]]:
    """For losses that are means over items (tokens, rankings), run in micro-batches that hold counts[j][i] items
    of loss j on this process: the factor for each micro-batch's own mean, world_size * count / (the count summed
    over every micro-batch of every process). The weighted means add up to the mean over all the global batch's
    items, and DDP's average over processes (a division by world_size) makes their gradient that of the whole
    batch. One collective for all the losses; one process with one micro-batch: [[1.0]]."""
    totals = sum_floats([sum(c) for c in counts])
    return [[world_size() * c / max(total, 1) for c in cs] for cs, total in zip(counts, totals)]


def accumulate(parts, *models):
    """(i, part) for each of a step's micro-batches, its forward and backward run in the loop's body. Under DDP only
    the last one's backward averages the gradients over the processes, the earlier ones add to them locally
    (no_sync). Under FSDP every backward reduce-scatters its gradients into the shards, where they add up: FSDP's
    no-sync would keep a whole unsharded gradient between micro-batches, the memory sharding is there to save.
    models: the modules trained through (wrap's)."""
    for i, part in enumerate(parts):
        with contextlib.ExitStack() as stack:
            for m in models:
                m = getattr(m, "_orig_mod", m)  # inside torch.compile's wrapper
                if isinstance(m, torch.nn.parallel.DistributedDataParallel) and i < len(parts) - 1:
                    stack.enter_context(m.no_sync())
            yield i, part


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank src's obj on every process (picklable)."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(model, device, compile=False, fsdp=False):
    """The module to train with: DistributedDataParallel(model) with more than one process, then torch.compile if
    asked. Keep `model` itself for everything else (generation, evaluation, checkpoints, attributes such as
    lm_head: `unwrap` gets back to it). Every parameter must get a gradient in every backward pass (DDP's default,
    find_unused_parameters=False); a second forward of the same model before backward (PPO-ptx) goes through
    `model`, not the wrapper: its gradients land on the same parameters before DDP's hooks average them.

    fsdp (with more than one process): shard `model` itself instead, in place, with FSDP2's fully_shard: each
    transformer block (each module of a ModuleList) is a unit, the rest (embeddings, final LayerNorm, heads) the
    root's. Make the optimizer after this: its parameters are the sharded ones. Between `unshard` and `reshard` the
    module runs as a plain one (generation, evaluation, saving)."""
    wrapped = model
    if world_size() > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                fully_shard(block)
        fully_shard(model)
        # ScalarModel's output is a view (squeeze), which FSDP warns about in case it is changed in place: never.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    elif world_size() > 1:
        dev = torch.device(device)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def fsdp_units(model) -> list:
    """The FSDP2 modules inside model (none if it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard(*models, when=True) -> None:
    """Every process gathers the whole parameters of each sharded model (a collective; nothing for a plain model),
    and keeps them until reshard(): forward passes then run as a plain module's, without collectives, so rank 0 may
    generate, evaluate or save alone (dist.state_dict)."""
    for unit in [u for m in models for u in fsdp_units(m)] if when else []:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)


def reshard(*models) -> None:
    """Back to the sharded parameters after unshard() (what a forward changed in the gathered ones is dropped).
    The blocks reshard after each forward again; the root (embeddings, final LayerNorm, heads) keeps FSDP's own
    choice for it, not to: its weights are needed again at once (the LM head) and for the backward pass."""
    for m in models:
        for unit in fsdp_units(m):
            unit.set_reshard_after_forward(unit is not m, recurse=False)
            unit.reshard()


def state_dict(model) -> dict:
    """model.state_dict(); for a sharded model, between unshard() and reshard(), its whole tensors (every process
    holds them, so rank 0 may save alone)."""
    if not fsdp_units(model):
        return model.state_dict()
    # Not model.state_dict(): FSDP's hook for it puts the shards back. Our models have no buffers.
    return {k: p.detach() for k, p in model.named_parameters(remove_duplicate=False)}


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers (itself if it is not wrapped)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ------------------------------------------------------------------------------------------------------------------
# Precision: autocast for forward passes

def autocast_dtype(name: str, device) -> torch.dtype | None:
    """The autocast dtype for a --dtype value: "auto" is bfloat16 on a GPU that supports it, else float32 (no
    autocast, None); "bfloat16" works on CPU too (slowly, without bf16 matmul hardware); "float32" is None."""
    dev = torch.device(device)
    if name == "auto":
        name = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    raise UserError(f"--dtype must be auto, bfloat16 or float32, not {name!r}")


def autocast(device, name: str):
    """A function that returns a fresh context for forward passes: torch.autocast in the dtype of --dtype `name`
    (weights, gradients and optimizer state stay fp32; log-probs and the scalar heads are computed in fp32), or a
    no-op for float32. Backward passes run outside it."""
    dtype = autocast_dtype(name, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=dtype)
