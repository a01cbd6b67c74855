"""
Offline preference training (report §3.2.2.1; Appendix B for β): SLiC, DPO, IPO and SRPO behind one switch.

Notation (DESIGN §9): h(y) = log π(y|x) − log π_ref(y|x), summed over the completion's tokens, or averaged per
token (`--length-average`, §3.5, following Grinsztajn et al. 2024: the caller passes averaged log-probs);
z = h(y_w) − h(y_l); p = the soft label P(y_w ≻ y_l) in [0.5, 1] that every pair carries (1 = a hard label).

Status: the losses below are implemented and tested against independent computations (tests/test_prefopt.py);
the training loop, the reference log-prob cache and SRPO self-refinement at inference are issue 6.
"""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "slic", "srpo")
# SRPO scores both completions under the revision prompt that shows each of them: h†(a|b), the log-ratio of
# completion a given the prompt x followed by "revise b". Columns of the revision log-prob tensors, in order:
SRPO_REVISIONS = ("chosen|rejected", "rejected|rejected", "chosen|chosen", "rejected|chosen")


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    loss_type, beta, labels=None, slic_delta=1.0, slic_lambda=0.1,
                    policy_revision_logps=None, ref_revision_logps=None, srpo_alpha=0.5):
    """Per-pair loss [n_pairs] for log-probs of shape [n_pairs] (revision log-probs: [n_pairs, 4]).

    dpo   (Rafailov et al. 2023), with soft labels as conservative DPO:
              −p log σ(βz) − (1 − p) log σ(−βz)
    ipo   (Azar et al. 2024): (z − (p − ½)/β)², i.e. (z − 1/(2β))² for a hard label. The IPO population
          loss regresses z on β⁻¹(P(y_w ≻ y_l) − ½); sampled hard labels give that target in expectation,
          so a soft label enters the target directly. Used on per-token-averaged log-ratios, as in TRL.
    slic  SLiC-HF (Zhao et al. 2023): max(0, δ − log π(y_w|x) + log π(y_l|x)) + λ · (−log π(y_w|x)); the
          calibration is on policy log-probs alone (no reference model), the regulariser is the
          cross-entropy of the chosen completion, the reference completion here.
    srpo  (Choi et al. 2025): with the self-improvement policy π†(y|x, y′) played by the same network under a
          revision prompt, α L_self + (1 − α) L_gen where
              L_self = ((p − ½) − β[h†(y_w|y_l) − h†(y_l|y_l)])² + ((p − ½) − β[h†(y_w|y_w) − h†(y_l|y_w)])²
              L_gen  = (β[h†(y_w|y_l) + h(y_w) − h†(y_l|y_w) − h(y_l)] − (2p − 1))²
    Derivation of SRPO's targets, from min_π max_π† E[P(y2 ≻ y1) − β KL(π†‖π_ref) + β KL(π‖π_ref)]: the
    inner max is π†(y|y′) ∝ π_ref(y|y′) exp(P(y ≻ y′)/β), so β[h†(a|y′) − h†(b|y′)] = P(a ≻ y′) − P(b ≻ y′),
    which is p − ½ for (a, b, y′) = (y_w, y_l, y_l) and for (y_w, y_l, y_w). The outer optimum then has
    β h(y′) = β h†(y|y′) − P(y ≻ y′) + const for any y; writing it for y′ = y_w, y = y_l and for y′ = y_l,
    y = y_w and subtracting gives L_gen's target 2p − 1. With p = 1 these are DESIGN §9's ½, ½ and 1.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    p = torch.ones_like(policy_chosen_logps) if labels is None else labels
    h_chosen = policy_chosen_logps - ref_chosen_logps
    h_rejected = policy_rejected_logps - ref_rejected_logps
    z = h_chosen - h_rejected
    if loss_type == "dpo":
        return -p * F.logsigmoid(beta * z) - (1 - p) * F.logsigmoid(-beta * z)
    if loss_type == "ipo":
        return (z - (p - 0.5) / beta) ** 2
    if loss_type == "slic":
        return F.relu(slic_delta - policy_chosen_logps + policy_rejected_logps) - slic_lambda * policy_chosen_logps
    if policy_revision_logps is None or ref_revision_logps is None:
        raise ValueError("srpo needs policy_revision_logps and ref_revision_logps, columns " + str(SRPO_REVISIONS))
    h_w_given_l, h_l_given_l, h_w_given_w, h_l_given_w = (policy_revision_logps - ref_revision_logps).unbind(-1)
    loss_self = ((p - 0.5) - beta * (h_w_given_l - h_l_given_l)) ** 2 + ((p - 0.5) - beta * (h_w_given_w - h_l_given_w)) ** 2
    loss_gen = (beta * (h_w_given_l + h_chosen - h_l_given_w - h_rejected) - (2 * p - 1)) ** 2
    return srpo_alpha * loss_self + (1 - srpo_alpha) * loss_gen
