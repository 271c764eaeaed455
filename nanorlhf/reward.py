"""The reward model's math: the K-way ranking loss of InstructGPT, scoring, and pairwise accuracy.

InstructGPT §3.5 (eq. 1): a labeler ranks K responses to a prompt, giving C(K, 2) comparisons. With r(x, y) the
RM's scalar for prompt x and response y, and y_w the preferred response of a pair,

    loss(r) = -1/C(K,2) * E_{(x, y_w, y_l)} [ log sigmoid( r(x, y_w) - r(x, y_l) ) ]

All C(K, 2) pairs of a prompt stay together in one batch element: each completion is run through the RM once and
then used in every pair it belongs to (InstructGPT's reason: training on the pairs as separate, shuffled examples
made the RM overfit after one epoch, and it costs K forward passes instead of K(K-1)).
"""

import itertools

import torch
import torch.nn.functional as F

from nanorlhf import tasks
from nanorlhf.model import left_pad
from nanorlhf.tokenizer import encode, encode_response


def ranking_loss(scores: torch.Tensor, k: int, center_coef: float = 0.0, ids=None) -> torch.Tensor:
    """scores (G*K,) for G groups of K responses each, each group ordered best first -> the mean over groups of
    each group's mean over its pairs of -log sigmoid(r_better - r_worse), plus center_coef * the mean over groups of
    (the group's mean score)^2.

    ids (G*K,): equal for identical responses (group_scores gives them). A pair of two copies of one response is
    left out: its term is the constant log 2 with no gradient, and the order its label gave it is noise, so
    counting it would only shrink its group's gradient by the group's share of such ties. A group whose responses
    are all one response has no pair, and does not count in the mean.

    The pairwise term sees only differences within a prompt, so it leaves each prompt's level free; trained alone,
    our RM put ~3/4 of its score variance into such per-prompt offsets, which carry no preference, and which PPO's
    value function must learn before its advantages carry signal. The centering term pins every prompt's mean near
    0 at a small cost in fit, so the score's spread is mostly the within-prompt one that ranks responses."""
    s = scores.view(-1, k)  # (G, K)
    i, j = torch.triu_indices(k, k, offset=1, device=scores.device)  # all pairs i < j: i is ranked above j
    terms = -F.logsigmoid(s[:, i] - s[:, j])  # (G, C(K,2))
    if ids is None:
        loss = terms.mean()
    else:
        same = ids.view(-1, k)  # (G, K)
        valid = (same[:, i] != same[:, j]).to(terms.dtype)  # (G, C(K,2)): 0 for a pair of copies
        n = valid.sum(1)  # (G,)
        per_group = (terms * valid).sum(1) / n.clamp(min=1)  # (G,)
        loss = per_group.sum() / (n > 0).sum().clamp(min=1)
    if center_coef:
        loss = loss + center_coef * s.mean(1).pow(2).mean()  # (G,) group means -> scalar
    return loss


def choice_loss(scores: torch.Tensor, k: int, center_coef: float = 0.0, ids=None) -> torch.Tensor:
    """Ziegler et al. 2019, eq. 1: a labeler picked the best of K responses, stored first in each group. The loss is
    the softmax cross-entropy of that pick under the scores,

        loss(r) = -E log( exp r(x, y_best) / sum_j exp r(x, y_j) )

    scores (G*K,) group-major -> the mean over groups, plus center_coef * the mean of (the group's mean score)^2 as
    in ranking_loss. ids (G*K,): copies of one response (equal ids) are one option, so a copy of the best counts
    as the best: -log( sum_{j = best} exp r_j / sum_j exp r_j )."""
    s = scores.view(-1, k)  # (G, K)
    if ids is None:
        loss = (torch.logsumexp(s, 1) - s[:, 0]).mean()
    else:
        best = ids.view(-1, k) == ids.view(-1, k)[:, :1]  # (G, K): the best response and its copies
        loss = (torch.logsumexp(s, 1) - torch.logsumexp(s.masked_fill(~best, float("-inf")), 1)).mean()
    if center_coef:
        loss = loss + center_coef * s.mean(1).pow(2).mean()
    return loss


def encode_pair(prompt: str, response: str, block_size: int) -> list[int]:
    """Tokens of prompt + response; too long for block_size: the prompt loses tokens from the left."""
    p, r = encode(prompt), encode_response(response)
    r = r[-(block_size - 1):]  # a response longer than the context keeps its end (where the score is read)
    return p[-(block_size - len(r)):] + r


def score_sequences(rm, seqs: list[list[int]], batch_size=64) -> torch.Tensor:
    """RM score of each token sequence at its last token (B,), without gradient."""
    device = next(rm.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            idx, start = left_pad(seqs[i:i + batch_size], device=device)  # (b, T): every row ends at column T-1
            last = torch.full_like(start, idx.shape[1] - 1)
            out.append(rm.score(idx, start, last))
    return torch.cat(out)


def score_texts(rm, prompts: list[str], responses: list[str], batch_size=64) -> torch.Tensor:
    """RM score of (prompt, response) pairs (B,)."""
    block_size = rm.config.block_size
    return score_sequences(rm, [encode_pair(p, r, block_size) for p, r in zip(prompts, responses)], batch_size)


def batches(groups, batch_size, rng):
    """Shuffled batches of groups with the same K (rankings of different K cannot share a (G, K) view)."""
    by_k = {}
    for g in groups:
        by_k.setdefault(len(g[1]), []).append(g)
    out = []
    for same_k in by_k.values():
        rng.shuffle(same_k)
        out += [same_k[i:i + batch_size] for i in range(0, len(same_k), batch_size)]
    rng.shuffle(out)
    return out


def group_scores(rm, batch, block_size, device):
    """RM scores for a batch of (prompt, responses) groups with the same K: (G * K,), group-major, and the id of
    each response (G * K,), equal for copies of one (prompt, response).

    Each distinct (prompt, response) goes through the RM once and its score is reused for every copy: sampled
    responses repeat (39 % of the built-in task's K = 8 SFT samples repeat one of their group's), and a copy's
    score and gradient are exactly those of the original, so the loss and its gradient are unchanged."""
    seqs, where, slot = [], [], {}
    for prompt, responses in batch:
        for resp in responses:
            if (prompt, resp) not in slot:
                slot[prompt, resp] = len(seqs)
                seqs.append(encode_pair(prompt, resp, block_size))
            where.append(slot[prompt, resp])
    idx, start = left_pad(seqs, device=device)  # (U, T): left-padded, so every sequence ends at column T-1
    unique = rm(idx, start)[:, -1]  # (U,): the score at the last token (rm(...), not rm.score: rm may be in DDP)
    ids = torch.tensor(where, device=device)  # (G*K,)
    return unique[ids], ids  # (G*K,): each response's score, copies included


@torch.no_grad()
def normalise_head(rm, mean, scale):
    """r -> (r - mean) * scale, folded into the scalar head: w' = w * scale, b' = (b - mean) * scale."""
    rm.head.weight.mul_(scale)
    rm.head.bias.sub_(mean).mul_(scale)


@torch.no_grad()
def accuracy(rm, groups, choice=False):
    """Held-out accuracy of the RM against the rankings, and (built-in task) against the gold score. choice: the
    groups are best-of-K choices (best first, the rest unordered), and only the pairs (best, other) are known."""
    rm.eval()
    flat = score_texts(rm, [p for p, rs in groups for _ in rs], [r for _, rs in groups for r in rs]).tolist()
    starts = list(itertools.accumulate((len(rs) for _, rs in groups), initial=0))
    scores = [flat[a:b] for a, b in zip(starts, starts[1:])]  # back into one list per group
    rm.train()
    in_order = [list(range(len(rs))) for _, rs in groups]  # rankings are stored best first
    same = [[hash(r) for r in rs] for _, rs in groups]  # identical responses have no right order
    label_scores = [[-i for i in range(len(rs))] for _, rs in groups]  # best first = highest
    if choice:  # only "the first beats each other" is known: the others are tied for the labels
        label_scores = [[0] + [-1] * (len(rs) - 1) for _, rs in groups]
        same = [[(j > 0, r) for j, r in enumerate(rs)] for _, rs in groups]
        result = dict(acc_labels=pairwise_accuracy(scores, in_order, same,
                                                   skip=lambda u, v: u[0] == v[0] or u[1] == v[1]))
    else:
        result = dict(acc_labels=pairwise_accuracy(scores, in_order, same))
    if all(tasks.is_task_prompt(p) for p, _ in groups):
        gold = [[tasks.gold_score(p, r) for r in rs] for p, rs in groups]
        by_gold = [sorted(range(len(g)), key=lambda i: -g[i]) for g in gold]
        result["acc_gold"] = pairwise_accuracy(scores, by_gold, gold)
        # The ceiling: how often the (noisy) labels themselves agree with the gold score, on the pairs they order.
        known = [[(g, x) for g, x in zip(gs, ls)] for gs, ls in zip(gold, label_scores)]
        result["acc_labels_vs_gold"] = pairwise_accuracy(label_scores, by_gold, known,
                                                         skip=lambda u, v: u[0] == v[0] or u[1] == v[1])
    return result


def pairwise_accuracy(scores: list[list[float]], orders: list[list[int]], values=None, skip=None):
    """Fraction of pairs the scores put in the same order as `orders` (each a ranking of a group, best first).

    values: optional per-response values; pairs whose values are equal (e.g. identical responses, or equal gold
    scores) are left out, since there is no right order for them; skip(value_a, value_b) replaces "equal" where a
    pair has no right order for another reason. Returns (accuracy, number of pairs).
    """
    skip = skip or (lambda u, v: u == v)
    right = total = 0
    for s, order, v in zip(scores, orders, values if values is not None else [None] * len(scores)):
        for a, b in itertools.combinations(order, 2):  # a is ranked above b
            if v is not None and skip(v[a], v[b]):
                continue
            total += 1
            right += s[a] > s[b]
    return (right / total if total else float("nan")), total
