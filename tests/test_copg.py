"""copg.copg_loss: a hand-worked value, its identities with RLOO and IPO, and its optimum on a tabular problem."""

import itertools

import pytest
import torch

from copg import copg_loss
from prefopt import preference_loss


def test_copg_loss_on_hand_worked_numbers():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logps = torch.tensor([[-1.0, -1.0, -1.0]])
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    # beta 0.5: R~ = [1 - 0, 0 + 0.5, 0.5 + 1] = [1, 0.5, 1.5]; pairs: 0.25 + 0.25 + 1 = 1.5, over k - 1 = 2
    assert copg_loss(logps, ref_logps, rewards, beta=0.5).item() == pytest.approx(0.75)


def test_copg_loss_is_a_brute_force_sum_over_ordered_pairs():
    g = torch.Generator().manual_seed(0)
    logps, ref_logps, rewards = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    beta = 0.3
    expected = 0.0
    for n in range(5):
        regularised = rewards[n] - beta * (logps[n] - ref_logps[n])
        expected += sum((regularised[i] - regularised[j]) ** 2 for i, j in itertools.permutations(range(4), 2)
                        if i > j) / 3
    assert copg_loss(logps, ref_logps, rewards, beta).item() == pytest.approx(expected.item() / 5)


def test_on_policy_copg_gradient_is_2_beta_k_times_rloo():
    """Samples from π with π = π_ref at the current parameters: CoPG's gradient with respect to each
    completion's log-prob equals 2βk times that of RLOO's surrogate −1/k Σ_i (R_i − mean_{j≠i} R_j) log π(y_i)."""
    g = torch.Generator().manual_seed(1)
    beta, k = 0.1, 4
    ref_logps = -5 * torch.rand(6, k, generator=g, dtype=torch.float64)
    rewards = torch.rand(6, k, generator=g, dtype=torch.float64)
    logps = ref_logps.clone().requires_grad_()
    (copg_grad,) = torch.autograd.grad(copg_loss(logps, ref_logps, rewards, beta), logps)
    leave_one_out = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    rloo = -((rewards - leave_one_out) * logps).sum(1).mean() / k
    (rloo_grad,) = torch.autograd.grad(rloo, logps)
    assert torch.allclose(copg_grad, 2 * beta * k * rloo_grad)


def test_copg_with_two_completions_and_reward_gap_half_is_beta_squared_times_ipo():
    """k = 2, R_w − R_l = ½: (½ − β z)² = β² (z − 1/(2β))², IPO on the same (summed) log-ratios."""
    g = torch.Generator().manual_seed(2)
    beta = 0.2
    chosen, rejected, ref_chosen, ref_rejected = (-10 * torch.rand(8, generator=g, dtype=torch.float64)
                                                  for _ in range(4))
    copg = torch.stack([copg_loss(torch.stack([chosen[i:i + 1], rejected[i:i + 1]], 1),
                                  torch.stack([ref_chosen[i:i + 1], ref_rejected[i:i + 1]], 1),
                                  torch.tensor([[0.5, 0.0]], dtype=torch.float64), beta) for i in range(8)])
    ipo = preference_loss(chosen, rejected, ref_chosen, ref_rejected, "ipo", beta)
    assert torch.allclose(copg, beta ** 2 * ipo)


def test_offline_copg_on_a_tabular_problem_reaches_the_kl_regularised_optimum():
    """One prompt, five answers, a fixed offline dataset: every pair of answers drawn from a behaviour policy
    unrelated to π. Minimising the expected CoPG loss gives π ∝ π_ref exp(R/β) (§3.2.2.2: CoPG estimates the
    KL-regularised optimal policy even offline)."""
    torch.manual_seed(0)
    beta, n = 0.5, 5
    rewards = torch.rand(n, dtype=torch.float64)
    log_ref = torch.log_softmax(torch.randn(n, dtype=torch.float64), 0)
    behaviour = torch.softmax(torch.randn(n, dtype=torch.float64), 0)
    pairs = torch.tensor(list(itertools.combinations(range(n), 2)))
    weights = behaviour[pairs[:, 0]] * behaviour[pairs[:, 1]]  # how often the dataset holds each pair
    logits = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(2000):
        log_pi = torch.log_softmax(logits, 0)
        per_pair = torch.stack([copg_loss(log_pi[pair][None], log_ref[pair][None], rewards[pair][None], beta)
                                for pair in pairs])
        loss = (weights * per_pair).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimum = torch.softmax(log_ref + rewards / beta, 0)
    assert torch.allclose(torch.softmax(logits, 0), optimum, atol=1e-5)


def test_copg_needs_at_least_two_completions_per_prompt():
    with pytest.raises(ValueError, match="k >= 2"):
        copg_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 0.1)
