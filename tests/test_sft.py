import subprocess
import sys
from pathlib import Path

import torch

from nanorlhf import tasks
from nanorlhf.model import GPT, GPTConfig
from nanorlhf.tokenizer import EOT
from nanorlhf.sft import encode_example, make_batch, sft_loss

ROOT = Path(__file__).resolve().parents[1]


def test_loss_mask_covers_exactly_the_response_tokens():
    examples = [([10, 11, 12, 20, 21, EOT], 3), ([13, 22, EOT], 2)]
    idx, start, mask = make_batch(examples, "cpu")
    assert idx.tolist() == [[10, 11, 12, 20, 21, EOT], [0, 0, 0, 13, 22, EOT]]
    targets = idx[:, 1:][mask]
    assert targets.tolist() == [20, 21, EOT, 22, EOT]  # response tokens only, the end token included
    assert start.tolist() == [0, 3]


def test_sft_loss_is_mean_response_nll():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    examples = [([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1)]
    idx, start, mask = make_batch(examples, "cpu")
    loss, n = sft_loss(model, idx, start, mask)
    manual = []
    for toks, n_resp in examples:
        logits = model.lm_logits(model(torch.tensor([toks])))[0]
        logp = torch.log_softmax(logits, -1)
        manual += [-logp[c - 1, toks[c]] for c in range(len(toks) - n_resp, len(toks))]
    assert n == 3
    torch.testing.assert_close(loss, torch.stack(manual).mean())


def test_too_long_examples_lose_prompt_tokens_from_the_left():
    toks, n = encode_example("Sort: 1 2 3 4 5 6 7 8 9\nAnswer:", " 1 2<|endoftext|>", block_size=6)
    assert n == 3 and len(toks) == 6 and toks[-3:] == [352, 362, EOT] and toks[:3] == [198, 33706, 25]  # '\n', 'Answer', ':'
    assert encode_example("Sort: 1\nAnswer:", " 1 2 3 4 5 6<|endoftext|>", block_size=6) is None


def test_tiny_end_to_end_run_lowers_the_loss(tmp_path):
    tasks.write_default_data(tasks.TaskConfig(out=str(tmp_path), n_sft=600, n_train_prompts=10, n_eval_prompts=16))
    out = tmp_path / "sft.pt"
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--data", str(tmp_path / "sft.jsonl"),
           "--eval_prompts", str(tmp_path / "prompts_eval.jsonl"), "--out", str(out), "--n_layer", "1",
           "--n_head", "2", "--n_embd", "32", "--batch_size", "32", "--max_iters", "40", "--warmup_iters", "5",
           "--eval_interval", "20", "--eval_n", "16", "--val_fraction", "0.1", "--lr", "3e-3"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "held-out gold score" in run.stderr + run.stdout
    ckpt = torch.load(out, weights_only=False)
    losses = [h["val_loss"] for h in ckpt["history"]]
    assert ckpt["kind"] == "sft" and len(losses) == 3
    assert losses[-1] < 0.6 * losses[0], losses  # from ~ln(50257) = 10.8 down
    assert 0.0 <= ckpt["history"][-1]["gold"] <= 1.0


def test_user_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    run = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--data", str(bad)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {bad}:2: missing field 'response'"
    run = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--init_from", "nope.pt"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "run `python train_sft.py` first" in run.stderr
