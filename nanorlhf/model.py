"""A GPT-2 in one file: the model, KV-cache generation for left-padded batches, and the scalar-head model.

Parameter names and shapes follow GPT-2 (Radford et al. 2019) as published, so its weights load one to one
(`transformer.h.0.attn.c_attn.weight`, ...; GPT-2's Conv1D weights are stored transposed, the loader flips them).

Padding convention used everywhere in nanorlhf: a batch of sequences of different lengths is LEFT-padded, so every
row ends at the same column and generation appends on the right. `start[b]` is the column of row b's first real
token. Position ids count from there (pos = column - start), and no query attends to a key before `start`.
Tokens after a row's <|endoftext|> are padding too; causal attention means real tokens never see them, and every
loss masks them out by length.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanorlhf import ops
from nanorlhf.dist import unwrap
from nanorlhf.tokenizer import EOT, PAD


@dataclass
class GPTConfig:
    block_size: int = 1024
    """context length: the most positions a sequence can use"""
    vocab_size: int = 50257
    """GPT-2's BPE vocabulary"""
    n_layer: int = 12
    """transformer blocks"""
    n_head: int = 12
    """attention heads per block"""
    n_embd: int = 768
    """width of the residual stream"""
    dropout: float = 0.0
    """dropout on embeddings, attention output and MLP output; keep 0 for RL (the log-probs must be exact)"""
    bias: bool = True
    """biases in Linear and LayerNorm layers, as GPT-2 has"""


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, start=None, cache=None, pos0=0):
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:  # decoding: store this step's keys/values, attend over everything so far
            k_cache, v_cache = cache  # (B, H, Tmax, D) each
            k_cache[:, :, pos0:pos0 + T] = k
            v_cache[:, :, pos0:pos0 + T] = v
            k, v = k_cache[:, :, :pos0 + T], v_cache[:, :, :pos0 + T]  # (B, H, pos0 + T, D)
        y = ops.attention(q, k, v, start)  # (B, H, T, D): softmax(q k^T / sqrt(D) + mask) v, the Triton seam
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's tanh GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, start=None, cache=None, pos0=0):
        x = x + self.attn(self.ln_1(x), start, cache, pos0)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),  # token embeddings, shared with the LM head
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),  # learned position embeddings
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """GPT-2 weights from a Hugging Face directory (config.json + safetensors/bin) or a hub name."""
        from nanorlhf.pretrained import load_gpt2  # imported here: pretrained.py imports this file

        return load_gpt2(name_or_path, dropout)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding is counted once

    def forward(self, idx, start=None, cache=None, pos0=0):
        """idx (B, T) token ids at columns pos0..pos0+T-1 -> final hidden states (B, T, n_embd).

        start (B,): first real column per row (None: no padding). cache: from new_kv_cache(), filled as we go.
        The LM head is applied separately (lm_logits, or ops.token_logprobs for just the tokens a loss needs).
        """
        B, T = idx.shape
        cols = torch.arange(pos0, pos0 + T, device=idx.device)  # (T,)
        pos = cols[None, :] - (start[:, None] if start is not None else 0)  # (B, T): 0 at the first real token
        pos = pos.clamp(min=0).expand(B, T)  # padding columns borrow position 0; nothing real attends to them
        if int(pos.max()) >= self.config.block_size:
            raise ValueError(f"a sequence reaches position {int(pos.max())}, past block_size {self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, start, cache[i] if cache is not None else None, pos0)
        return self.transformer.ln_f(x)  # (B, T, C)

    def lm_logits(self, hidden):
        return self.lm_head(hidden)  # (..., V)

    def new_kv_cache(self, batch_size, max_len, device=None, dtype=None):
        """One (keys, values) pair of (B, H, max_len, D) buffers per layer, written in place while decoding.

        dtype: that of the keys and values to be written, by default the weights' or, under autocast, autocast's
        (the new queries come out of c_attn in it, and the attention seam takes q, k, v of one dtype)."""
        cfg = self.config
        p = self.lm_head.weight
        device = torch.device(device or p.device)
        if dtype is None:
            on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if on else p.dtype
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        return [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                for _ in range(cfg.n_layer)]


class ScalarModel(nn.Module):
    """A GPT trunk with a scalar head Linear(n_embd, 1): the reward model and the value function.

    The reward model reads its score at each sequence's last real token (InstructGPT §3.5); the value function
    reads one value per position.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.gpt = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, start=None):
        """idx (B, T) -> one scalar per position (B, T), fp32 (under autocast too: rewards and values need it)."""
        hidden = self.gpt(idx, start)  # (B, T, C)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # (B, T)

    def score(self, idx, start, last):
        """Scalar at column last[b] of each row (B,): the sequence's last real token."""
        values = self(idx, start)  # (B, T)
        return values.gather(1, last[:, None]).squeeze(1)  # (B,)


# ------------------------------------------------------------------------------------------------------------------
# Batching and generation

def left_pad(seqs, pad_id=PAD, device=None):
    """Token lists of different lengths -> idx (B, T) left-padded and start (B,), the first real column of each row."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
    start = torch.tensor([T - len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), start.to(device)


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
