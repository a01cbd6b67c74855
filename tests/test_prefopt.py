"""prefopt.preference_loss against hand-worked numbers, TRL's formulas re-derived, and SRPO's analytic optimum."""

import math

import pytest
import torch
import torch.nn.functional as F

from prefopt import preference_loss


def logps(*values):
    return torch.tensor(values, dtype=torch.float64)


# policy chosen / rejected, reference chosen / rejected: z = (-1 - -2) - (-1.5 - -1.5) = 1
HAND = dict(policy_chosen_logps=logps(-1.0), policy_rejected_logps=logps(-2.0),
            ref_chosen_logps=logps(-1.5), ref_rejected_logps=logps(-1.5))


def test_dpo_ipo_slic_on_hand_worked_numbers():
    assert preference_loss(**HAND, loss_type="dpo", beta=0.1).item() == pytest.approx(math.log(1 + math.exp(-0.1)))
    assert preference_loss(**HAND, loss_type="ipo", beta=0.1).item() == pytest.approx((1 - 5) ** 2)
    # relu(1 - (-1) + (-2)) = 0, plus 0.1 * 1.0 of chosen cross-entropy
    assert preference_loss(**HAND, loss_type="slic", beta=0.1, slic_delta=1.0, slic_lambda=0.1).item() \
        == pytest.approx(0.1)
    assert preference_loss(**HAND, loss_type="slic", beta=0.1, slic_delta=2.5, slic_lambda=0.0).item() \
        == pytest.approx(1.5)
    soft = preference_loss(**HAND, loss_type="dpo", beta=0.1, labels=logps(0.75)).item()
    assert soft == pytest.approx(0.75 * math.log(1 + math.exp(-0.1)) + 0.25 * math.log(1 + math.exp(0.1)))


def random_pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: -10 * torch.rand(n, generator=g, dtype=torch.float64) for name in
            ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}


def trl_logits(p):
    """TRL's DPOTrainer: logits = (π_c − π_r) − (ref_c − ref_r)."""
    return (p["policy_chosen_logps"] - p["policy_rejected_logps"]) - (p["ref_chosen_logps"] - p["ref_rejected_logps"])


def test_dpo_matches_trl_sigmoid_loss_with_label_smoothing():
    pairs, beta = random_pairs(), 0.2
    labels = torch.linspace(0.5, 1.0, 16, dtype=torch.float64)
    smoothing = 1 - labels  # TRL's label_smoothing (cDPO)
    trl = -F.logsigmoid(beta * trl_logits(pairs)) * (1 - smoothing) - F.logsigmoid(-beta * trl_logits(pairs)) * smoothing
    assert torch.allclose(preference_loss(**pairs, loss_type="dpo", beta=beta, labels=labels), trl)


def test_ipo_matches_trl_ipo_loss_on_per_token_averaged_log_probs():
    g = torch.Generator().manual_seed(1)
    beta, n, length = 0.03, 8, 12
    token_logps = -3 * torch.rand(4, n, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (4, n), generator=g)
    mask = torch.arange(length) < lengths[..., None]
    averaged = (token_logps * mask).sum(-1) / mask.sum(-1)  # what --length-average hands the loss
    pairs = dict(zip(("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
                     averaged))
    trl = (trl_logits(pairs) - 1 / (2 * beta)) ** 2  # TRL "ipo" on average log-probs
    assert torch.allclose(preference_loss(**pairs, loss_type="ipo", beta=beta), trl)


def test_slic_with_equal_reference_is_trl_hinge_scaled_by_beta():
    pairs, beta = random_pairs(seed=2), 0.5
    pairs["ref_rejected_logps"] = pairs["ref_chosen_logps"].clone()  # TRL's hinge uses the reference ratio
    trl_hinge = F.relu(1 - beta * trl_logits(pairs))
    ours = preference_loss(**pairs, loss_type="slic", beta=beta, slic_delta=1 / beta, slic_lambda=0.0)
    assert torch.allclose(beta * ours, trl_hinge)


def test_unknown_loss_type_and_missing_srpo_inputs_are_named():
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(**HAND, loss_type="kto", beta=0.1)
    with pytest.raises(ValueError, match="srpo needs"):
        preference_loss(**HAND, loss_type="srpo", beta=0.1)


def test_srpo_recovers_its_analytic_optimum_on_a_tabular_problem():
    """Three answers, a Bradley–Terry preference P(a ≻ b), tabular π and π†(·|y′). Minimising SRPO's loss over
    every pair must land on π†(a|b) ∝ π_ref(a|b) exp(P(a ≻ b)/β) and π(y) ∝ π_ref(y) / Z(y), where Z(y) is
    that normaliser: the solution of the min-max objective of §3.2.2.1."""
    torch.manual_seed(0)
    beta, n = 0.5, 3
    utility = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    prefer = torch.sigmoid(utility[:, None] - utility[None, :])  # prefer[a, b] = P(a ≻ b)
    log_ref = torch.log_softmax(torch.randn(n, dtype=torch.float64), 0)
    log_ref_revision = torch.log_softmax(torch.randn(n, n, dtype=torch.float64), 1)  # row b: π_ref(·|x, b)

    log_z = torch.logsumexp(log_ref_revision.t() + prefer / beta, dim=0)  # Z(b) = Σ_a π_ref(a|b) e^{P(a≻b)/β}
    optimal_revision = log_ref_revision.t() + prefer / beta - log_z  # [a, b]: log π†(a|b)
    optimal_policy = torch.log_softmax(log_ref - log_z, 0)

    pairs = [(w, l) for w in range(n) for l in range(n) if prefer[w, l] > 0.5]
    chosen, rejected = torch.tensor([w for w, _ in pairs]), torch.tensor([l for _, l in pairs])
    labels = prefer[chosen, rejected]
    policy_logits = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    revision_logits = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)  # [a, b]
    optimizer = torch.optim.Adam([policy_logits, revision_logits], lr=0.05)
    for _ in range(3000):
        log_pi = torch.log_softmax(policy_logits, 0)
        log_revision = torch.log_softmax(revision_logits, 0)  # normalised over a for each b
        revision = lambda a, b: log_revision[a, b]  # noqa: E731
        ref_revision = lambda a, b: log_ref_revision[b, a]  # noqa: E731
        loss = preference_loss(
            log_pi[chosen], log_pi[rejected], log_ref[chosen], log_ref[rejected], "srpo", beta, labels=labels,
            policy_revision_logps=torch.stack([revision(chosen, rejected), revision(rejected, rejected),
                                               revision(chosen, chosen), revision(rejected, chosen)], -1),
            ref_revision_logps=torch.stack([ref_revision(chosen, rejected), ref_revision(rejected, rejected),
                                            ref_revision(chosen, chosen), ref_revision(rejected, chosen)], -1),
        ).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-10
    assert torch.allclose(torch.log_softmax(policy_logits, 0), optimal_policy, atol=1e-4)
    # each π†(·|b) is pinned only through pairs that contain b: compare those columns' log-ratios
    log_revision = torch.log_softmax(revision_logits, 0).detach()
    for w, l in pairs:
        for b in (w, l):
            assert (log_revision[w, b] - log_revision[l, b]).item() == pytest.approx(
                (optimal_revision[w, b] - optimal_revision[l, b]).item(), abs=1e-4)
