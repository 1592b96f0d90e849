"""Exercise 8 · The reward model's loss (06_reward_model.py `reward_loss`; Llama 3 §4.1.2: "we use
the same training objective as Llama 2, except that we remove the margin term in the loss").

The reward model gives each response one number. For a pair where one response is better, the
Bradley-Terry loss is -log σ(r_better - r_worse): near 0 when the better response scores much
higher, log 2 when the two tie, large when the order is wrong. Sum it over the pairs.

It must stay finite for any margin: with r_better - r_worse = -100 the loss is 100, not inf
(torch.sigmoid(torch.tensor(-100.)) returns 0 in float32, and log 0 is -inf; look for a function that
computes log σ directly).

    pytest tutorials/exercises -k reward
"""
import torch
import torch.nn.functional as F


def reward_loss(better_rewards, worse_rewards):
    """Two (N,) tensors of rewards, pair i = (better_rewards[i], worse_rewards[i]). -> a scalar tensor."""
    # >>> your code
    raise NotImplementedError("not filled in yet")
    # <<< your code
