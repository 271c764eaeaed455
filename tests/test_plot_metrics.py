import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanorlhf.checkpoint import Staged
from nanorlhf.config import UserError
from nanorlhf.metrics import MetricsLog, read_metrics
from nanorlhf.plot import group_of, main, plot_run

ROOT = Path(__file__).resolve().parents[1]


def test_log_appends_flushed_records_and_reads_them_back(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.log(0, loss=torch.tensor(2.5), lr=1e-3)
    # flushed at once: another reader sees the line before close()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 0, "loss": 2.5, "lr": 1e-3}
    log.log(10, loss=1.5, val_loss=float("nan"), rm_score=None)
    log.close()
    with MetricsLog(tmp_path / "run") as again:  # a resumed run appends
        again.log(20, loss=1.0)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[1]["loss"] == 1.5 and math.isnan(records[1]["val_loss"]) and records[1]["rm_score"] is None
    with pytest.raises(TypeError, match="'note' must be a number"):
        MetricsLog(tmp_path / "run").log(30, note="hi")


def test_read_metrics_skips_a_cut_off_last_line_but_not_a_bad_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo')
    assert read_metrics(tmp_path) == [{"step": 0, "loss": 1}]
    path.write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2: not valid JSON"):
        read_metrics(path)
    with pytest.raises(UserError, match="no such file"):
        read_metrics(tmp_path / "nowhere")


def test_keys_fall_into_groups():
    assert [group_of(k) for k in ["loss", "val_loss", "rm_accuracy", "acc_gold", "reward", "score_mean", "kl",
                                  "kl_coef", "beta", "gold", "lr", "time_s", "klass", "approx_kl", "t_score"]] == [
        "loss", "loss", "accuracy", "accuracy", "reward", "reward", "kl", "beta", "beta", "gold", "other", "other",
        "other", "other", "other"]


def write_run(run_dir):
    with MetricsLog(run_dir) as log:
        for step in range(0, 200, 10):
            figures = dict(iter=step, loss=3 * math.exp(-step / 50), reward=math.log1p(step), kl=step / 1e3,
                           beta=0.1, lr=1e-3 * (1 - step / 200), rm_score=None if step < 30 else step / 100)
            if step % 50 == 0:
                figures.update(val_loss=3.2 * math.exp(-step / 60), gold=step / 200, gold_se=0.05)
            log.log(step, **figures)


def test_plot_writes_one_png_per_group(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is not installed (optional)")
    write_run(tmp_path / "run")
    written = plot_run(tmp_path / "run")
    names = sorted(p.name for p in written)
    assert names == ["beta.png", "gold.png", "kl.png", "loss.png", "other.png", "reward.png"]  # no gold_se curve
    assert plt.get_fignums() == []  # every figure was closed (a long run would otherwise pile them up)
    for p in written:
        assert p.parent == tmp_path / "run" and p.stat().st_size > 5000
        image = plt.imread(p)  # (H, W, 4) floats
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_cli_writes_the_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (optional)")
    with MetricsLog(tmp_path / "run") as log:  # one group only: each PNG costs time
        for step in range(5):
            log.log(step, loss=1 / (step + 1))
    run = subprocess.run([sys.executable, "-m", "nanorlhf.plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["wrote", str(tmp_path / "png" / "loss.png")]


def test_missing_metrics_is_one_line_and_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (optional)")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "metrics.jsonl: no such file" in err
    assert err.count("\n") == 1


def test_without_matplotlib_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "run")])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install matplotlib\n"


def test_a_bad_metrics_file_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 0}\n{"step": 1, "x": "\xff"}\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        read_metrics(tmp_path)
    (tmp_path / "d" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(UserError, match="is a directory"):
        read_metrics(tmp_path / "d")


def test_a_fresh_run_replaces_the_old_metrics_only_when_it_commits(tmp_path):
    with MetricsLog(tmp_path / "run") as old:
        old.log(1, loss=9.0)
    previous = (tmp_path / "run" / "metrics.jsonl").read_bytes()

    with Staged() as staged:  # a run that fails before its first checkpoint
        log = MetricsLog(tmp_path / "run", fresh=True, staged=staged)
        log.log(1, loss=1.0)
        assert (tmp_path / "run" / "metrics.jsonl.new").exists()  # beside the old file, flushed: it can be watched
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == previous
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]

    with Staged() as staged:  # a run that commits (its first checkpoint), then goes on logging
        log = MetricsLog(tmp_path / "run", fresh=True, staged=staged)
        log.log(1, loss=1.0)
        staged.commit()
        log.log(2, loss=0.5)
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [1.0, 0.5]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]

    with Staged() as staged:  # a new folder made for a run that never commits is removed with its file
        MetricsLog(tmp_path / "new" / "run", fresh=True, staged=staged).log(1, loss=1.0)
    assert not (tmp_path / "new").exists()
