"""Run in every process that tests/test_distributed.py starts (with torchrun, or alone), and save what it compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py DUMP train_sft --max_iters 2
    python tests/dist_worker.py DUMP train_sft --max_iters 2 --batch_size 8         # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py DUMP whiten train_ppo ...

A script name runs that script's main() with the flags that follow and saves DUMP/rank{RANK}.pt: the state dicts of
the models main() returns (and, under NAME_grad, their gradients of the last backward pass), and its other figures
(PPO's beta). A model sharded with --fsdp is saved whole: its state as the script left it (gathered, dist.unshard),
its gradients gathered from the shards, before the process group is left; NAME_held counts the parameters the
process holds itself (all of them without FSDP). `whiten` first (it saves the time of another launch)
adds "whiten": each process's data and its whitening with the statistics of all processes (nanorlhf.ppo.whiten
with dist.all_reduce_sum).
"""

import importlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanorlhf import dist, ppo  # noqa: E402
from nanorlhf.config import parse_args  # noqa: E402


def whiten_check():
    """Rows 3r..3r+2 of one fixed (6, 5) batch with ragged lengths on rank r of 2, whitened together."""
    dist.setup()  # the script's main() finds the process group set up, and takes it down at its end
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]).float()
    mine, my_mask = dist.shard(x), dist.shard(mask)
    out = dict(x=mine, mask=my_mask, whitened=ppo.whiten(mine, my_mask, reduce=dist.all_reduce_sum),
               kept=ppo.whiten(mine, my_mask, shift_mean=False, reduce=dist.all_reduce_sum),
               mean=dist.mean(mine[my_mask.bool()]), floats=dist.mean_floats([float(dist.rank()), 1.0]))
    return out


def main():
    dump, what, *argv = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    checks = {}
    if what == "whiten":
        checks["whiten"] = whiten_check()
        what, *argv = argv
    script = importlib.import_module(what)
    cleanup, dist.cleanup = dist.cleanup, lambda: dist.barrier()  # left below, after the shards are gathered
    result = {**script.main(parse_args(script.Config, argv)), **checks}
    models = {k: v for k, v in result.items() if isinstance(v, torch.nn.Module)}
    saved = {k: {n: t.detach().clone() for n, t in dist.state_dict(v).items()} if k in models else v
             for k, v in result.items()}
    for k, v in models.items():  # and each model's gradients of the last backward pass (after DDP averaged them)
        dist.reshard(v)  # FSDP: back to the shards, which hold the gradients
        saved[f"{k}_grad"] = {n: whole(p.grad) for n, p in v.named_parameters() if p.grad is not None}
        saved[f"{k}_held"] = sum(getattr(p, "_local_tensor", p).numel() for p in v.parameters())  # this process's
    cleanup()
    Path(dump).mkdir(parents=True, exist_ok=True)
    torch.save(saved, Path(dump) / f"rank{rank}.pt")


def whole(t):
    """A tensor, whole: FSDP's DTensor shards gathered (a collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    main()
