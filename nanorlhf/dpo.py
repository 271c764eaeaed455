"""Direct preference optimisation (Rafailov et al. 2023): the policy trained on preference pairs directly, with the
reference model (SFT) in place of a separate reward model.

For a preferred response y_w and a dispreferred y_l to one prompt x (DPO eq. 7):

    L_DPO = -E log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

where log pi(y|x) is the sum of the response's token log-probs. The implicit reward of a response is
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (up to a function of x): DPO fits the Bradley-Terry model of the
RM's ranking loss (nanorlhf/reward.py) with that reward. A ranking of K responses gives its C(K, 2) pairs; a best-of-K
choice (Ziegler et al.: only the best is known) its K - 1 pairs (best, other).
"""

import itertools

import torch
import torch.nn.functional as F

from nanorlhf import dist, ops
from nanorlhf.sft import encode_example, make_batch


def implicit_reward(logp, ref_logp, beta):
    """beta * (log pi(y|x) - log pi_ref(y|x)) per response: logp, ref_logp (B,) sequence log-probs -> (B,)."""
    return beta * (logp - ref_logp)


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """DPO's loss over a batch of pairs, and the fraction of pairs whose implicit rewards are in the labelled
    order. logp_* / ref_*: (B,) sequence log-probs of the preferred (w) and dispreferred (l) responses."""
    margin = implicit_reward(logp_w, ref_w, beta) - implicit_reward(logp_l, ref_l, beta)  # (B,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def ranking_pairs(responses, choice=False):
    """(i, j) index pairs of a ranking stored best first, i ranked above j, leaving out identical responses (there
    is no right order between two copies of one response, and their pair would only add a constant log 2).
    choice: a best-of-K choice, best first and the others in no order: only the pairs (0, j) are known."""
    return [(i, j) for i, j in itertools.combinations(range(len(responses)), 2)
            if responses[i] != responses[j] and (i == 0 or not choice)]


def pair_examples(groups, block_size, choice=False):
    """Every known pair of each group (ranking_pairs), as token examples for sequence_logprobs: (examples, pairs)
    with examples the distinct (prompt, response) encodings and pairs (chosen, rejected) indices into them (a
    response shared by several pairs is encoded, and scored, once). choice: the groups are best-of-K choices."""
    examples, slot, pairs = [], {}, []
    for prompt, responses in groups:
        for i, j in ranking_pairs(responses, choice):
            ids = []
            for r in (responses[i], responses[j]):
                if (prompt, r) not in slot:
                    ex = encode_example(prompt, r, block_size)
                    if ex is None:
                        raise ValueError(f"a response is longer than the context ({block_size} tokens)")
                    slot[prompt, r] = len(examples)
                    examples.append(ex)
                ids.append(slot[prompt, r])
            pairs.append(tuple(ids))
    return examples, pairs


def sequence_logprobs(model, examples, device):
    """log pi(y|x) of each (tokens, number of response tokens) example (B,): the sum of its response tokens'
    log-probs, through the log-prob seam on the response tokens only."""
    idx, start, mask = make_batch(examples, device)  # (B, T), (B,), (B, T - 1)
    hidden = model(idx, start)  # (B, T, C)
    logp = ops.token_logprobs(hidden[:, :-1][mask], dist.unwrap(model).lm_head.weight, idx[:, 1:][mask])  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,): the example each response token belongs to
    return torch.zeros(len(examples), device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)  # (B,)
