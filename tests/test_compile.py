"""The kernels compiled for GPUs that are not here (bench/compile.py): A100 (sm_80) and H100/H200 (sm_90), on the CPU.

The hot kernels (what a GPU run of the pipeline spends its time in) must compile, fit the target's shared memory and
not spill; the table must show the configs the config functions pick. A fresh clone compiles them (74 kernels, ~40 s
on 2 cores); later runs read their results from ~/.cache/nanorlhf/compile (~5 s)."""

import pytest
import torch

from bench import compile as bc
from conftest import run

pytest.importorskip("triton")


def table(text):
    """The report's one table: a dict per row, by column name."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and set(line) - set("|-")]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


@pytest.fixture(scope="module")
def hot(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "compile.md"
    r = run("bench.compile", "--set", "hot", "--check", "--write", out, cwd=out.parent)
    return r, (out.read_text() if out.exists() else "")


def test_the_hot_kernels_compile_fit_and_do_not_spill(hot):
    r, text = hot
    found = [line for line in r.stdout.splitlines() if "problem(s)" in line or line.startswith("- _")]
    assert r.returncode == 0, "\n".join(found) or r.stderr[-4000:]
    rows = table(text)
    kernels = {(row["kernel"], row["arch"]) for row in rows}
    names = ("attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "attn_decode", "attn_combine",
             "logprobs_fwd", "logprobs_bwd")
    assert kernels == {(n, a) for n in names for a in ("sm_80", "sm_90")}
    for row in rows:
        assert row["stack / spill st / ld (B)"] == "0 / 0 / 0", row
        assert int(row["blocks/SM"]) >= 1, row
        if row["kernel"] in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq") and "train" in row["case"]:
            assert row["mma"] == {"sm_80": "mma.sync", "sm_90": "wgmma"}[row["arch"]], row  # bf16 tensor cores


def test_the_table_shows_the_configs_the_launchers_pick(hot, monkeypatch):
    from kernels import attention as A  # noqa: PLC0415
    from kernels import logprobs as L  # noqa: PLC0415

    _, text = hot
    rows = table(text)
    monkeypatch.setattr(A, "INTERPRETED", False)  # the config functions answer as on a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for D in bc.HOT_HEAD_DIMS:
        f = A.fwd_config(D, torch.bfloat16)
        b = A.bwd_config(D, torch.bfloat16)
        want = {"attn_fwd": f"M{f['BLOCK_M']} N{f['BLOCK_N']} w{f['num_warps']} s{f['num_stages']}",
                "attn_bwd_dkdv": "M{BLOCK_M} N{BLOCK_N} w{num_warps} s{num_stages}".format(**b["dkdv"]),
                "attn_bwd_dq": "M{BLOCK_M} N{BLOCK_N} w{num_warps} s{num_stages}".format(**b["dq"])}
        for row in rows:
            if row["case"].startswith(f"bf16 D={D} train") and row["kernel"] in want:
                assert row["config"] == want.pop(row["kernel"]), row
        assert not want  # each was in the table (once per arch: popped at the first)
    block, warps = L.forward_config(bc.VOCAB)
    assert {r["config"] for r in rows if r["kernel"] == "logprobs_fwd"} == {f"V{block} w{warps} s3"}


def test_the_checks():
    spec = dict(arch=90, hot=True)
    clean = dict(regs=128, stack=0, spill_stores=0, spill_loads=0, shared=65536, mma="wgmma")
    assert bc.problems(spec, clean) == []
    assert bc.problems(spec, dict(error="ptxas failed")) == ["compile error: ptxas failed"]
    assert bc.problems(spec, dict(clean, shared=232449))[0].startswith("shared memory 232,449 B > 232,448 B")
    assert bc.problems(dict(spec, arch=80), dict(clean, shared=166913))  # A100's limit is lower
    assert bc.problems(spec, dict(clean, stack=8)) and bc.problems(spec, dict(clean, spill_stores=4))
    assert bc.problems(dict(spec, hot=False), dict(clean, stack=8)) == []  # only hot kernels must not spill


def test_occupancy_and_the_tool_outputs():
    h100, a100 = bc.TARGETS[90], bc.TARGETS[80]
    assert bc.occupancy(h100, 255, 0, 4) == 2  # 255 -> 256 registers x 128 threads: 2 blocks of 65,536
    assert bc.occupancy(h100, 128, 65536, 4) == 3  # 4 by registers, 3 by shared memory (228 KiB per SM)
    assert bc.occupancy(a100, 32, 0, 4) == 16  # warps: 64 per SM
    assert bc.occupancy(a100, 40, 0, 1) == 32  # blocks: at most 32 per SM
    log = "ptxas info    : Function properties for k\n    640 bytes stack frame, 632 bytes spill stores, 600 bytes " \
          "spill loads\nptxas info    : Used 255 registers"
    assert bc.spill_bytes(log) == (632, 600) and bc.spill_bytes("") == (None, None)
    assert bc.mma_kind("wgmma.mma_async.sync.aligned") == "wgmma" and bc.mma_kind("fma.rn.f32") == "none (FMA)"
