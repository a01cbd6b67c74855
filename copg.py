"""
Contrastive Policy Gradient, CoPG (report §3.2.2.2, Flet-Berliac et al. 2024): the RL loss of every reward-
driven stage of the pipeline, offline on scored completions and online on fresh samples.

For a prompt x and k ≥ 2 completions of any origin with rewards R(x, y_i), with the KL-regularised reward
R̃_i = R_i − β (log π(y_i|x) − log π_ref(y_i|x)):

    loss = 1/(k − 1) Σ_{i>j} (R̃_i − R̃_j)²

Gradients flow through both terms of each pair; there is no importance sampling, no clipping and no value
network. The loss is zero exactly when R̃ is the same for every completion, i.e. at π ∝ π_ref exp(R/β) on
the data's support: the KL-regularised optimum, offline too. On-policy its gradient is 2βk times the RLOO
estimator's (tests/test_copg.py checks both facts).

Status: the loss is implemented and tested; the offline/online training loops with verifier or reward-model
rewards, the replay buffer and the regularisers are issue 6.
"""

import torch


def copg_loss(logps, ref_logps, rewards, beta):
    """Mean CoPG loss over prompts, for tensors [n_prompts, k] of completion log-probs (summed over tokens)
    under the policy and the reference, and their rewards."""
    if logps.dim() != 2 or logps.shape[1] < 2:
        raise ValueError(f"copg_loss needs [n_prompts, k >= 2] log-probs, got shape {tuple(logps.shape)}")
    k = logps.shape[1]
    regularised = rewards - beta * (logps - ref_logps)  # R̃, [n, k]
    differences = regularised[:, :, None] - regularised[:, None, :]  # R̃_i − R̃_j for every (i, j)
    pairs = torch.triu(torch.ones(k, k, dtype=torch.bool, device=logps.device), diagonal=1)  # each pair once
    return (differences[:, pairs] ** 2).sum(dim=1).mean() / (k - 1)
