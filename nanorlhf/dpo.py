"""Direct preference optimisation (Rafailov et al. 2023): the policy trained on preference pairs directly, with the
reference model (SFT) in place of a separate reward model.

For a preferred response y_w and a dispreferred y_l to one prompt x (DPO eq. 7):

    L_DPO = -E log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

where log pi(y|x) is the sum of the response's token log-probs. The implicit reward of a response is
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (up to a function of x): DPO fits the Bradley-Terry model of the
RM's ranking loss (nanorlhf/reward.py) with that reward. A ranking of K responses gives its C(K, 2) pairs.
"""

import itertools

import torch.nn.functional as F


def implicit_reward(logp, ref_logp, beta):
    """beta * (log pi(y|x) - log pi_ref(y|x)) per response: logp, ref_logp (B,) sequence log-probs -> (B,)."""
    return beta * (logp - ref_logp)


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """DPO's loss over a batch of pairs, and the fraction of pairs whose implicit rewards are in the labelled
    order. logp_* / ref_*: (B,) sequence log-probs of the preferred (w) and dispreferred (l) responses."""
    margin = implicit_reward(logp_w, ref_w, beta) - implicit_reward(logp_l, ref_l, beta)  # (B,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def ranking_pairs(responses):
    """(i, j) index pairs of a ranking stored best first, i ranked above j, leaving out identical responses (there
    is no right order between two copies of one response, and their pair would only add a constant log 2)."""
    return [(i, j) for i, j in itertools.combinations(range(len(responses)), 2) if responses[i] != responses[j]]


def sequence_logprobs(token_logp, mask):
    """Per-token log-probs (B, R) and the response mask (B, R) -> log pi(y|x) per response (B,)."""
    return (token_logp * mask).sum(1)
