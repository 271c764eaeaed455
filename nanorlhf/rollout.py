"""Sampling and rollouts: drawing tokens, KV-cache generation for left-padded batches, and the per-token
log-probs and values of sampled responses that the RM and PPO stages need.

`generate` returns the tokens (prompt + response, left-padded), where responses start (P), their lengths and
the log-prob of each sampled token; `response_logprobs` / `response_values` recompute those quantities with a
model in training, on the same layout: column P - 1 + t holds the state that predicts response token t.
"""

import torch
import torch.nn.functional as F

from nanorlhf import ops
from nanorlhf.dist import unwrap
from nanorlhf.model import left_pad
from nanorlhf.tokenizer import EOT, PAD, decode, encode


def draw(probs, generator=None, block=256):
    """One index per row of probs (B, V), drawn with probability probs[b, i] / sum_i probs[b, i].

    Inverse-CDF sampling: a single uniform u per row, located in the running sum of the weights. torch.multinomial
    draws one exponential per vocabulary entry (V = 50,257 of them per row), which was 75 % of our CPU generation
    time; a running sum over all of V is still a slow serial pass, so the sum runs in two levels: find the block of
    `block` entries that holds u * total from the blocks' sums, then the entry inside that block.
    """
    B, V = probs.shape
    p = probs.float()
    u = torch.rand(B, 1, device=p.device, generator=generator)  # (B, 1)
    if V <= block:
        return locate(p.cumsum(-1), u)
    nb = V // block
    sums = p[:, :nb * block].view(B, nb, block).sum(-1)  # (B, nb): each full block's weight
    if V > nb * block:
        sums = torch.cat([sums, p[:, nb * block:].sum(-1, keepdim=True)], dim=1)  # (B, n_blocks): the short tail
    cdf = sums.cumsum(-1)  # (B, n_blocks)
    k = locate(cdf, u)[:, None]  # (B, 1): the block holding u * total
    frac = ((u * cdf[:, -1:] - (cdf - sums).gather(1, k)) / sums.gather(1, k)).clamp(0, 1)  # (B, 1): u inside it
    cols = k * block + torch.arange(block, device=p.device)  # (B, block): the block's vocabulary entries
    w = p.gather(1, cols.clamp(max=V - 1)) * (cols < V)  # (B, block): past V (the tail block) weighs 0
    return k.squeeze(1) * block + locate(w.cumsum(-1), frac)


def locate(cdf, u):
    """(B,): for each row, the first i with cdf[i] > u * cdf[-1], u in [0, 1]: never an entry of weight 0 (where
    fp32 rounding makes u * total reach the total, the last entry with weight > 0)."""
    total = cdf[:, -1:].contiguous()  # (B, 1)
    i = torch.searchsorted(cdf, u * total, right=True)  # (B, 1)
    last = torch.searchsorted(cdf, total, right=False)  # (B, 1): where the running sum reaches the total
    return torch.minimum(i, last).squeeze(1)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next token (B,) and its log-prob (B,) under softmax(logits / temperature).

    top_k / top_p only narrow what can be drawn; the log-prob stays that of the full tempered distribution, the one
    PPO recomputes (so sample with top_k=0, top_p=1 for RL). temperature 0 means greedy (log-prob at temperature 1).
    """
    if temperature == 0:
        token = logits.argmax(-1)  # (B,)
        return token, torch.log_softmax(logits.float(), -1).gather(-1, token[:, None]).squeeze(-1)
    logits = logits.float()
    z = logits if temperature == 1 else logits / temperature  # (B, V)
    if not top_k and top_p >= 1.0:
        # The plain case (PPO's rollouts): softmax(z) needs no normalising before the draw, and the drawn token's
        # log-prob is z_y - logsumexp(z), with logsumexp = max + log(sum exp(z - max)): three passes over (B, V).
        zmax = z.amax(-1, keepdim=True)  # (B, 1)
        weights = (z - zmax).exp_()  # (B, V): softmax(z) up to its sum
        token = draw(weights, generator)  # (B,)
        lse = zmax.squeeze(-1) + weights.sum(-1).log()  # (B,)
        return token, z.gather(-1, token[:, None]).squeeze(-1) - lse
    logp = torch.log_softmax(z, dim=-1)  # (B, V)
    filtered = logp
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest log-prob
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logp, order = torch.sort(filtered, dim=-1, descending=True)  # (B, V)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # (B, V): probability of better tokens
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)  # back to vocabulary order
        filtered = filtered.masked_fill(drop, float("-inf"))
    token = draw(filtered.exp(), generator)  # (B,): exp of -inf is 0, so filtered-out tokens are never drawn
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=EOT, stop_at_eos=True,
             generator=None):
    """Sample responses for a batch of prompts (lists of token ids, any lengths) with a KV cache.

    A prompt longer than block_size - max_new_tokens is cut from the LEFT (its oldest tokens go first).
    Each row stops at its first eos_id (kept as the response's last token; then padding follows) when stop_at_eos.
    Returns a dict:
      tokens   (B, P + R) left-padded prompts followed by responses
      start    (B,) first real column;  prompt_len  P, the column where responses begin
      resp_len (B,) response tokens per row, the EOS included
      logprobs (B, R) log-prob of each sampled token under softmax(logits / temperature), 0 after the end
      ended    (B,) bool: the row produced eos_id
    """
    model = unwrap(model)  # generation runs the plain module (a DDP or torch.compile wrapper has no KV cache)
    keep = model.config.block_size - max_new_tokens
    if keep <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size "
                         f"{model.config.block_size}")
    prompts = [p[-keep:] for p in prompts]
    device = model.lm_head.weight.device
    idx, start = left_pad(prompts, device=device)  # (B, P), (B,)
    B, P = idx.shape
    cache = model.new_kv_cache(B, P + max_new_tokens)
    hidden = model(idx, start, cache, pos0=0)  # (B, P, C): the whole prompt in one pass fills the cache
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    resp_len = torch.zeros(B, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        live = ~ended  # rows still writing their response
        rows = live.nonzero().squeeze(1)  # (L,): only these go through the LM head (most of a step's cost)
        logits = model.lm_logits(hidden[rows, -1])  # (L, V): next-token logits
        token, logp = sample_token(logits, temperature, top_k, top_p, generator)  # (L,), (L,)
        out[rows, t] = token  # finished rows keep PAD
        logprobs[rows, t] = logp
        resp_len += live.long()
        if stop_at_eos:
            ended |= live & (out[:, t] == eos_id)
            if bool(ended.all()):
                break
        if t == max_new_tokens - 1:
            break
        hidden = model(out[:, t:t + 1], start, cache, pos0=P + t)  # (B, 1, C): one new token per row
    R = int(resp_len.max())
    ended_with_eos = (out.gather(1, (resp_len - 1).clamp(min=0)[:, None]).squeeze(1) == eos_id) & (resp_len > 0)
    return dict(tokens=torch.cat([idx, out[:, :R]], dim=1), start=start, prompt_len=P, resp_len=resp_len,
                logprobs=logprobs[:, :R], ended=ended_with_eos)


def merge_rollouts(parts):
    """generate()'s results for consecutive parts of a batch (micro-batches) as one batch's: the prompts left-padded
    to the longest, the responses right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    P = max(r["prompt_len"] for r in parts)
    R = max(r["tokens"].shape[1] - r["prompt_len"] for r in parts)
    pad = [(P - r["prompt_len"], R - r["tokens"].shape[1] + r["prompt_len"]) for r in parts]  # (left, right)
    tokens = [torch.cat([F.pad(r["tokens"][:, :r["prompt_len"]], (left, 0), value=PAD),
                         F.pad(r["tokens"][:, r["prompt_len"]:], (0, right), value=PAD)], 1)
              for r, (left, right) in zip(parts, pad)]
    return dict(tokens=torch.cat(tokens), start=torch.cat([r["start"] + left for r, (left, _) in zip(parts, pad)]),
                prompt_len=P, resp_len=torch.cat([r["resp_len"] for r in parts]),
                logprobs=torch.cat([F.pad(r["logprobs"], (0, right)) for r, (_, right) in zip(parts, pad)]),
                ended=torch.cat([r["ended"] for r in parts]))


def response_logprobs(model, tokens, start, P, mask, temperature, with_entropy=False):
    """log pi(y_t | x, y_<t) of each response token (B, R) (0 on padding), and the entropy if asked.

    Only the states that predict response tokens go through the LM head (the seam ops.token_logprobs).
    """
    hidden = model(tokens, start)  # (B, P + R, C)
    R = tokens.shape[1] - P
    h = hidden[:, P - 1:P - 1 + R][mask]  # (N, C): the state before each real response token
    y = tokens[:, P:][mask]  # (N,)
    res = ops.token_logprobs(h, unwrap(model).lm_head.weight, y, temperature, with_entropy=with_entropy)
    logp, entropy = res if with_entropy else (res, None)
    out = torch.zeros(mask.shape, device=tokens.device, dtype=logp.dtype).masked_scatter(mask, logp)  # (B, R)
    if not with_entropy:
        return out
    return out, torch.zeros_like(out).masked_scatter(mask, entropy)


def response_mask(resp_len, R):
    """(B, R) bool: True on each response's real tokens (the end token included), False on the padding after."""
    return torch.arange(R, device=resp_len.device)[None, :] < resp_len[:, None]


def response_values(value_model, tokens, start, P, mask):
    """V(x, y_<t) for each response token (B, R): the value head on the state before token t."""
    values = value_model(tokens, start)  # (B, P + R)
    R = tokens.shape[1] - P
    return values[:, P - 1:P - 1 + R] * mask  # (B, R)


def rollouts(model, prompts, max_new_tokens, temperature=1.0, batch_size=64, generator=None, ref=None):
    """One sampled response per prompt: [(text without <|endoftext|>, ended, sum log pi - log ref or None)]."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = [encode(p) for p in prompts[i:i + batch_size]]
        r = generate(model, batch, max_new_tokens, temperature=temperature, generator=generator)
        P, L = r["prompt_len"], r["resp_len"]
        kl = [None] * len(batch)
        if ref is not None:  # log-ratio of the whole response under model vs ref, at the same temperature
            with torch.no_grad():
                mask = response_mask(L, r["tokens"].shape[1] - P)
                ref_logp = response_logprobs(ref, r["tokens"], r["start"], P, mask, temperature)
                kl = ((r["logprobs"] - ref_logp) * mask).sum(1).tolist()
        for b in range(len(batch)):
            toks = r["tokens"][b, P:P + int(L[b])].tolist()
            ended = bool(r["ended"][b])
            out.append((decode(toks[:-1] if ended else toks), ended, kl[b]))
    model.train(was_training)
    return out


def as_response(text, ended):
    """A sampled text as a response the RM scores: with <|endoftext|> if the model produced it."""
    return text + "<|endoftext|>" if ended else text


def sample_responses(model, prompts, max_new_tokens, temperature=1.0, batch_size=64, generator=None):
    """One sampled response per prompt: [(text without <|endoftext|>, ended with it)]."""
    return [(t, e) for t, e, _ in rollouts(model, prompts, max_new_tokens, temperature, batch_size, generator)]
