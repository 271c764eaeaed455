import pytest
import torch

from nanorlhf.model import GPT, GPTConfig, ScalarModel, left_pad
from nanorlhf.rollout import draw, generate, sample_token
from nanorlhf.tokenizer import EOT, PAD

TINY = GPTConfig(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = GPT(TINY).eval()
    with torch.no_grad():  # make the logits sharp enough that a wrong mask or position shows
        for p in m.parameters():
            p.mul_(5.0)
    return m


def test_shapes_and_tied_head(model):
    idx = torch.randint(0, TINY.vocab_size, (3, 11))
    hidden = model(idx)
    assert hidden.shape == (3, 11, TINY.n_embd)
    assert model.lm_logits(hidden).shape == (3, 11, TINY.vocab_size)
    assert model.lm_head.weight is model.transformer.wte.weight
    # GPT-2 names, so its weights load one to one
    names = dict(model.named_parameters())
    assert names["transformer.h.0.attn.c_attn.weight"].shape == (3 * 32, 32)
    assert names["transformer.wpe.weight"].shape == (48, 32)


def test_causal(model):
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_left_padding_leaves_real_token_logits_unchanged(model):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    idx, start = left_pad(seqs)
    assert start.tolist() == [0, 3, 5]
    batched = model.lm_logits(model(idx, start))  # (3, 6, V)
    for b, s in enumerate(seqs):
        alone = model.lm_logits(model(torch.tensor([s])))[0]  # (len, V)
        torch.testing.assert_close(batched[b, start[b]:], alone, atol=1e-5, rtol=1e-5)
    # whatever the pad id, real tokens see no padding
    idx2 = idx.clone()
    idx2[idx2 == PAD] = 42
    torch.testing.assert_close(model.lm_logits(model(idx2, start))[1, 3:], batched[1, 3:])


def test_kv_cache_decode_equals_full_forward(model):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15]]
    idx, start = left_pad(seqs)
    new = torch.randint(1, TINY.vocab_size, (3, 5))
    full = model.lm_logits(model(torch.cat([idx, new], 1), start))  # (3, 11, V)
    cache = model.new_kv_cache(3, idx.shape[1] + new.shape[1])
    h = model(idx, start, cache, pos0=0)
    steps = [model.lm_logits(h[:, -1])]
    for t in range(new.shape[1]):
        h = model(new[:, t:t + 1], start, cache, pos0=idx.shape[1] + t)
        steps.append(model.lm_logits(h[:, -1]))
    decoded = torch.stack(steps[:-1], 1)  # logits predicting new[:, t] for each t
    P = idx.shape[1]
    torch.testing.assert_close(decoded, full[:, P - 1:P - 1 + new.shape[1]], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[-1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_generate_records_logprobs_and_stops_each_row_at_eos(model):
    torch.manual_seed(1)
    prompts = [[1, 2, 3, 4], [5, 6], [7]]
    r = generate(model, prompts, max_new_tokens=12, temperature=1.0,
                 eos_id=3, generator=torch.Generator().manual_seed(0))
    toks, P, L = r["tokens"], r["prompt_len"], r["resp_len"]
    for b in range(3):
        resp = toks[b, P:].tolist()
        n = int(L[b])
        if r["ended"][b]:
            assert resp[n - 1] == 3 and 3 not in resp[:n - 1]
        else:
            assert n == 12 and 3 not in resp
        assert all(t == PAD for t in resp[n:])
    # the recorded log-probs are those of a full forward at the same temperature
    logits = model.lm_logits(model(toks, r["start"]))[:, P - 1:-1]  # (B, R, V)
    lp = torch.log_softmax(logits, -1).gather(-1, toks[:, P:, None]).squeeze(-1)
    mask = torch.arange(toks.shape[1] - P)[None] < L[:, None]
    torch.testing.assert_close(lp * mask, r["logprobs"], atol=1e-4, rtol=1e-4)


def test_generate_without_stopping_writes_exactly_max_new_tokens(model):
    r = generate(model, [[1, 2], [3]], max_new_tokens=7, eos_id=int(EOT) % TINY.vocab_size, stop_at_eos=False)
    assert r["tokens"].shape[1] == 2 + 7 and r["resp_len"].tolist() == [7, 7]


def test_generate_cuts_long_prompts_from_the_left(model):
    r = generate(model, [list(range(1, 60))], max_new_tokens=8, temperature=0)
    assert r["prompt_len"] == TINY.block_size - 8
    assert r["tokens"][0, :r["prompt_len"]].tolist() == list(range(1, 60))[-(TINY.block_size - 8):]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    tok, logp = sample_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {3, 4}
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
    probs = torch.softmax(logits[0], -1)  # [.012, .032, .086, .234, .636]
    tok, _ = sample_token(logits, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {3, 4} and probs[3:].sum() > 0.8 > probs[4]
    tok, _ = sample_token(logits, temperature=0)
    assert tok.tolist() == [4] * 2000
    tok, _ = sample_token(logits, temperature=0.01, generator=torch.Generator().manual_seed(0))
    assert tok.tolist() == [4] * 2000


def test_sampled_logprob_is_the_tempered_log_softmax():
    logits = torch.randn(64, 50257) * 3
    for temperature in (1.0, 0.7):
        tok, logp = sample_token(logits, temperature, generator=torch.Generator().manual_seed(0))
        want = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tok[:, None]).squeeze(-1)
        torch.testing.assert_close(logp.double(), want, atol=5e-6, rtol=0)  # fp32 log_softmax itself is off by 4e-6


def test_draw_follows_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7, 0.0]).repeat(40000, 1) * 3.0  # unnormalised weights are fine
    tok = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.2, 0.7, 0.0]), atol=0.01, rtol=0)  # 4 s.e. ~ 0.009
    assert freq[1] == 0 and freq[4] == 0  # zero-probability entries, the last one included, are never drawn
    # Past one block (draw's two-level search): mass in several blocks, the short tail block included.
    v, where = 1000, torch.tensor([3, 255, 256, 700, 999])  # 1000 = 3 blocks of 256 + a tail of 232
    want = torch.tensor([0.05, 0.15, 0.3, 0.1, 0.4])
    probs = torch.zeros(40000, v)
    probs[:, where] = want
    tok = draw(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(tok, minlength=v).float() / len(tok)
    torch.testing.assert_close(freq[where], want, atol=0.01, rtol=0)
    assert freq.sum() == freq[where].sum()  # nothing outside the five entries
    v = 50257  # GPT-2's vocabulary: one token with all the mass at the far end, the rest exactly 0
    probs = torch.zeros(8, v)
    probs[:, v - 1] = 1.0
    assert draw(probs, torch.Generator().manual_seed(0)).tolist() == [v - 1] * 8


def test_scalar_model_reads_the_last_real_token():
    torch.manual_seed(0)
    rm = ScalarModel(TINY).eval()
    idx, start = left_pad([[5, 6, 7, 8], [9, 10]])
    idx = torch.cat([idx, torch.tensor([[PAD, PAD], [11, PAD]])], 1)  # row 1 ends at column 4, then padding
    last = torch.tensor([3, 4])
    values = rm(idx, start)  # (2, 6)
    assert values.shape == (2, 6)
    torch.testing.assert_close(rm.score(idx, start, last), values[[0, 1], [3, 4]])
    alone = rm(torch.tensor([[9, 10, 11]]))[0, -1]
    torch.testing.assert_close(rm.score(idx, start, last)[1], alone, atol=1e-5, rtol=1e-5)


def test_positions_past_block_size_are_refused(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))
