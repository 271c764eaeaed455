"""Stage 1's math: supervised fine-tuning on demonstrations, the loss on the response tokens only.

InstructGPT §3.5: the ordinary next-token loss on labeler-written (prompt, response) pairs, with the prompt as
context only:

    L_SFT = - 1/|R| sum_{t in response} log pi(y_t | prompt, y_<t)

With several processes the mean runs over every process's response tokens (dist.global_mean_loss).
"""

import torch

from nanorlhf import dist, ops
from nanorlhf.model import left_pad
from nanorlhf.tokenizer import encode, encode_response


def encode_example(prompt, response, block_size):
    """(tokens, number of response tokens). Too long for block_size: prompt tokens go first, from the left."""
    p, r = encode(prompt), encode_response(response)
    if len(r) >= block_size:
        return None  # the response alone does not fit: the caller reports it
    keep = block_size - len(r)
    return p[-keep:] + r, len(r)


def make_batch(examples, device):
    """Left-padded batch: idx (B, T), start (B,), and the mask of target columns (B, T - 1) for the response."""
    idx, start = left_pad([toks for toks, _ in examples], device=device)  # (B, T), (B,)
    T = idx.shape[1]
    n_resp = torch.tensor([n for _, n in examples], device=device)  # (B,)
    # Left padding puts every response at the right end: column c is a response token iff c >= T - n_resp.
    # The hidden state at column c - 1 predicts the token at column c.
    target_cols = torch.arange(1, T, device=device)  # (T - 1,)
    mask = target_cols[None, :] >= (T - n_resp)[:, None]  # (B, T - 1)
    return idx, start, mask


def sft_loss(model, idx, start, mask):
    """Mean -log pi(y_t) over the response tokens of the batch (the LM head only runs on them)."""
    hidden = model(idx, start)  # (B, T, C)
    h = hidden[:, :-1][mask]  # (N, C): states that predict a response token
    y = idx[:, 1:][mask]  # (N,): the tokens they predict
    logp = ops.token_logprobs(h, dist.unwrap(model).lm_head.weight, y)  # (N,); model may be a DDP wrapper
    return -logp.mean(), y.numel()


@torch.no_grad()
def val_loss(model, examples, batch_size, device):
    """The SFT loss over held-out examples: the mean over all their response tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = sft_loss(model, *make_batch(examples[i:i + batch_size], device))
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count
