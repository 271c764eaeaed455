"""A GPT-2 in one file: the model (with the KV cache that generation fills), and the scalar-head model.

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
import torch.utils.checkpoint

from nanorlhf import ops
from nanorlhf.tokenizer import PAD


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
        self.checkpointing = False  # activation checkpointing: keep each block's input, recompute it in backward
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
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, start, use_reentrant=False)
            else:
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
# Batching

def left_pad(seqs, pad_id=PAD, device=None):
    """Token lists of different lengths -> idx (B, T) left-padded and start (B,), the first real column of each row."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
    start = torch.tensor([T - len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), start.to(device)
