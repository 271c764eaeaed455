"""Curves of a run's metrics: `python -m nanorlhf.plot RUN_DIR` reads RUN_DIR/metrics.jsonl, writes PNGs there.

One PNG per group of known figures found in the file, each figure a line against "step":

    loss.png      keys with the word "loss"          (loss, train_loss, val_loss, ...)
    accuracy.png  "accuracy" or "acc"                (the reward model's ranking accuracy)
    reward.png    "reward" or "score"                (PPO's mean reward)
    kl.png        "kl"                               (KL(policy || SFT))
    beta.png      "beta" or "coef"                   (the KL coefficient, when adaptive)
    gold.png      "gold"                             (the held-out gold score of the built-in task)
    other.png     every other numeric key, one panel each (learning rate, throughput, ...)

A word is a part of the key between "_", "/" or "."; the first group in the order beta, accuracy, gold, kl,
reward, loss that matches takes the key (so "kl_coef" is a beta, "acc_gold" an accuracy, "val_loss" a loss);
"approx_kl" (a PPO update diagnostic) and the phase timings "t_score", ... go to other. A key "X_se" next to a key
"X" is X's standard error and shades a band around it. "step" is the x axis ("iter" too is left out).
matplotlib is optional: `pip install matplotlib`.
"""

import argparse
import re
import sys
from pathlib import Path

from nanorlhf.config import UserError, check_writable
from nanorlhf.metrics import is_number, read_metrics

GROUPS = [  # (file name, words), in matching order
    ("other", {"approx", "t"}),  # approx_kl (old vs new policy in an update) is no KL to SFT; t_score is a time
    ("beta", {"beta", "coef"}),
    ("accuracy", {"accuracy", "acc"}),
    ("gold", {"gold"}),
    ("kl", {"kl"}),
    ("reward", {"reward", "rewards", "score"}),
    ("loss", {"loss"}),
]
X_KEYS = {"step", "iter"}  # the x axis, never a curve


def group_of(key: str) -> str:
    words = set(re.split(r"[_/.]", key.lower()))
    return next((name for name, group_words in GROUPS if words & group_words), "other")


def series(records, key):
    """(steps, values) of the records that hold a finite number for key."""
    points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def draw(ax, records, key):
    steps, values = series(records, key)
    (line,) = ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=key)
    if any(key + "_se" in r for r in records):  # a standard error: shade +- 1 SE
        se = {r["step"]: r[key + "_se"] for r in records if is_number(r.get(key + "_se"))}
        band = [(s, v) for s, v in zip(steps, values) if s in se]
        ax.fill_between([s for s, _ in band], [v - se[s] for s, v in band], [v + se[s] for s, v in band],
                        color=line.get_color(), alpha=0.2)


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write the PNGs for run_dir's metrics into out_dir (default: run_dir); returns their paths."""
    records = read_metrics(run_dir)  # a mistake in the input first, whether or not matplotlib is there
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed (servers, SSH)
    import matplotlib.pyplot as plt

    keys = {k for r in records for k, v in r.items() if k not in X_KEYS and is_number(v)}
    keys -= {k for k in keys if k.endswith("_se") and k[:-3] in keys}  # drawn as bands, not curves
    if not keys:
        raise UserError(f"{run_dir}: no numeric metrics to plot")
    out_dir = Path(out_dir or (Path(run_dir).parent if Path(run_dir).suffix == ".jsonl" else run_dir))
    check_writable(out_dir, "--out", directory=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot be created ({e.strerror or e})") from None
    groups = {}
    for key in sorted(keys):
        groups.setdefault(group_of(key), []).append(key)
    written = []
    for name, members in groups.items():
        if name == "other":  # unrelated scales: one panel per key
            cols = min(3, len(members))
            rows = (len(members) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
            for ax, key in zip(axes.flat, members):
                draw(ax, records, key)
                ax.set_title(key)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            for ax in list(axes.flat)[len(members):]:
                ax.axis("off")
        else:
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            for key in members:
                draw(ax, records, key)
            ax.set_title(f"{name} ({Path(run_dir).name})")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw PNG curves of RUN_DIR/metrics.jsonl.")
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (or the metrics file itself)")
    parser.add_argument("--out", default="", help="where the PNGs go (default: the run directory)")
    args = parser.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out or None):
            print(f"wrote {path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
