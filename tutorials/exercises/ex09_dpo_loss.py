"""Exercise 9 · The DPO loss, with Llama 3's NLL term (08_dpo.py `dpo_loss`; Llama 3 §4.1.4).

Direct Preference Optimization trains the policy π on (chosen, rejected) responses against a
frozen reference model. Each argument is one summed log-probability of a whole response, (B,):

    margin = (log π(chosen) - log ref(chosen)) - (log π(rejected) - log ref(rejected))
    loss   = -log σ(β · margin)

Llama 3 adds a negative log-likelihood term on the chosen response, weighted 0.2 (§4.1.4: it keeps
the log-probability of the chosen response from falling): when `chosen_nll` (B,) is given,
loss + nll_weight · chosen_nll. Return the loss per pair, (B,), finite for any margin.

    pytest tutorials/exercises -k dpo
"""
import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, chosen_nll=None, nll_weight=0.2):
    """Four (B,) tensors of summed log-probabilities (and optionally the chosen response's NLL, (B,)) -> (B,)."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
