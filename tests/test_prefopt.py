"""prefopt.py: preference_loss against hand-worked numbers, TRL's formulas re-derived, and SRPO's analytic
optimum; the revision prompt, the reference log-prob cache (fresh = cached, stale = recomputed),
self-refinement, and end-to-end runs of every loss on a small synthetic world."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import distributed
import evaluate
import prefopt
from conftest import save_parent
from data import END_OF_TURN, chat_stop_tokens, render_completion, render_prompt
from records import read_jsonl
from model import generate
from prefopt import preference_loss


def logps(*values):
    return torch.tensor(values, dtype=torch.float64)


# policy chosen / rejected, reference chosen / rejected: z = (-1 - -2) - (-1.5 - -1.5) = 1
HAND = dict(policy_chosen_logps=logps(-1.0), policy_rejected_logps=logps(-2.0),
            ref_chosen_logps=logps(-1.5), ref_rejected_logps=logps(-1.5))


def test_dpo_ipo_slic_on_hand_worked_numbers():
    assert preference_loss(**HAND, loss_type="dpo", beta=0.1).item() \
        == pytest.approx(math.log(1 + math.exp(-0.1)))
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
    return ((p["policy_chosen_logps"] - p["policy_rejected_logps"])
            - (p["ref_chosen_logps"] - p["ref_rejected_logps"]))


def test_dpo_matches_trl_sigmoid_loss_with_label_smoothing():
    pairs, beta = random_pairs(), 0.2
    labels = torch.linspace(0.5, 1.0, 16, dtype=torch.float64)
    smoothing = 1 - labels  # TRL's label_smoothing (cDPO)
    trl = (-F.logsigmoid(beta * trl_logits(pairs)) * (1 - smoothing)
           - F.logsigmoid(-beta * trl_logits(pairs)) * smoothing)
    assert torch.allclose(preference_loss(**pairs, loss_type="dpo", beta=beta, labels=labels), trl)


def test_ipo_matches_trl_ipo_loss_on_per_token_averaged_log_probs():
    g = torch.Generator().manual_seed(1)
    beta, n, length = 0.03, 8, 12
    token_logps = -3 * torch.rand(4, n, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (4, n), generator=g)
    mask = torch.arange(length) < lengths[..., None]
    averaged = (token_logps * mask).sum(-1) / mask.sum(-1)  # what --length-average hands the loss
    pairs = dict(zip(("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                      "ref_rejected_logps"), averaged))
    trl = (trl_logits(pairs) - 1 / (2 * beta)) ** 2  # TRL "ipo" on average log-probs
    assert torch.allclose(preference_loss(**pairs, loss_type="ipo", beta=beta), trl)


def test_slic_with_equal_reference_is_trl_hinge_scaled_by_beta():
    pairs, beta = random_pairs(seed=2), 0.5
    pairs["ref_rejected_logps"] = pairs["ref_chosen_logps"].clone()  # TRL's hinge uses the reference ratio
    trl_hinge = F.relu(1 - beta * trl_logits(pairs))
    ours = preference_loss(**pairs, loss_type="slic", beta=beta, slic_delta=1 / beta, slic_lambda=0.0)
    assert torch.allclose(beta * ours, trl_hinge)


def test_recipes_before_lr_scaling_are_appendix_b():
    appendix_b = {
        # B.2.1: DPO, 1.25e-5 decaying to 1.25e-6, β 0.2, SFT regularisation on the SFT stage's data mixture
        "multilingual": dict(loss="dpo", beta=0.2, lr=1.25e-5, min_lr=1.25e-6,
                             sft_data="sft/multilingual.jsonl"),
        # B.6.1: IPO, β 0.03, 1e-6 decayed to 1e-7, otherwise the safety SFT's hyper-parameters (wd 1e-3)
        "safety": dict(loss="ipo", beta=0.03, lr=1e-6, min_lr=1e-7, weight_decay=1e-3),
    }
    for capability, values in appendix_b.items():
        assert {name: prefopt.RECIPES[capability][name] for name in values} == values, capability
        args = prefopt.parse_args(["--capability", capability])
        assert (args.loss, args.beta) == (values["loss"], values["beta"])
        assert (args.lr, args.min_lr) == pytest.approx((values["lr"] * common.PREF_LR_SCALE,
                                                         values["min_lr"] * common.PREF_LR_SCALE))
    # IPO's log-ratios summed over the reply (Azar et al.), where β 0.03's target 1/(2β) is reachable;
    # SRPO's length-averaged (§3.5)
    assert not prefopt.parse_args(["--capability", "safety"]).length_average
    assert prefopt.parse_args(["--capability", "instruct"]).length_average


def test_safety_splits_its_data_ipo_on_helpfulness_pairs_and_sft_on_refusals(world, enc):
    """§3.3.7.2: the preference loss reinforces helpfulness (pairs whose chosen reply answers), the SFT loss
    safety (conversations whose reply refuses); without the split both kinds are in both."""
    decode = lambda sequence: enc.decode(sequence[0])
    refusal = "I can't"
    args = prefopt.parse_args(["--capability", "safety", "--data", str(world)])
    assert args.split_safety and not prefopt.parse_args(["--capability", "multilingual"]).split_safety
    records, sequences, sft_data = prefopt.training_data(enc, world, args)
    assert records and all(refusal not in r["chosen"] for r in records)
    assert all(refusal in decode(pair[1]).rsplit("<|CHATBOT_TOKEN|>", 1)[1] for pair in sequences)
    assert sft_data and all(refusal in decode(s).rsplit("<|CHATBOT_TOKEN|>", 1)[1] for s in sft_data)
    args = prefopt.parse_args(["--capability", "safety", "--data", str(world), "--no-split-safety"])
    all_records, _, all_sft = prefopt.training_data(enc, world, args)
    assert any(refusal in r["chosen"] for r in all_records) and len(all_records) > len(records)
    assert any(refusal not in decode(s).rsplit("<|CHATBOT_TOKEN|>", 1)[1] for s in all_sft)
    assert len(all_records) == len(read_jsonl(world / "pref" / "safety.jsonl", "pair"))


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

    pairs = [(w, loser) for w in range(n) for loser in range(n) if prefer[w, loser] > 0.5]
    chosen, rejected = torch.tensor([w for w, _ in pairs]), torch.tensor([loser for _, loser in pairs])
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
            ref_revision_logps=torch.stack(
                [ref_revision(chosen, rejected), ref_revision(rejected, rejected),
                 ref_revision(chosen, chosen), ref_revision(rejected, chosen)], -1),
        ).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-10
    assert torch.allclose(torch.log_softmax(policy_logits, 0), optimal_policy, atol=1e-4)
    # each π†(·|b) is pinned only through pairs that contain b: compare those columns' log-ratios
    log_revision = torch.log_softmax(revision_logits, 0).detach()
    for w, loser in pairs:
        for b in (w, loser):
            assert (log_revision[w, b] - log_revision[loser, b]).item() == pytest.approx(
                (optimal_revision[w, b] - optimal_revision[loser, b]).item(), abs=1e-4)


# -----------------------------------------------------------------------------
# The stage script: revision prompt, reference cache, self-refinement, end-to-end runs

def test_revision_prompt_is_the_conversation_with_the_draft_and_a_revision_request(enc):
    messages = [{"role": "user", "content": "Who leads Verun Metals?"}]
    expected = render_prompt(enc, messages + [{"role": "chatbot", "content": "Nobody."},
                                              {"role": "user", "content": evaluate.REVISION_REQUEST}])
    assert evaluate.revision_prompt(enc, messages, "Nobody.") == expected
    # a draft as generate returns it (END_OF_TURN kept)
    sampled = render_completion(enc, messages, "Nobody.")[1]
    assert evaluate.revision_prompt(enc, messages, sampled) == expected
    # a cut-off draft closes its turn
    assert evaluate.revision_prompt(enc, messages, sampled[:-1]) == expected
    assert sampled[-1] == enc.encode_single_token(END_OF_TURN)


def test_srpo_pair_sequences_follow_srpo_revisions_order(enc):
    record = {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Good.", "rejected": "Bad.",
              "label": 1.0}
    sequences = prefopt.pair_sequences(enc, record, srpo=True)
    assert len(sequences) == 2 + len(prefopt.SRPO_REVISIONS)
    for (ids, mask), names in zip(sequences[2:], prefopt.SRPO_REVISIONS):
        revised, shown = names.split("|")
        prompt = evaluate.revision_prompt(enc, record["messages"], record[shown])
        completion = render_completion(enc, record["messages"], record[revised])[1]
        assert ids == prompt + completion and mask == [0] * len(prompt) + [1] * len(completion)
    assert len(prefopt.pair_sequences(enc, record, srpo=False)) == 2


def one_at_a_time(model, enc, sequences, average):
    """Reference log-probs computed independently: one sequence per forward pass."""
    runtime = distributed.setup("cpu")
    values = []
    for sequence in sequences:
        sums, counts = common.packed_logps(model, enc, [sequence], 256, runtime)
        values.append((sums / counts if average else sums).item())
    return torch.tensor(values)


@pytest.mark.parametrize("average", [False, True])
def test_cached_reference_logps_equal_fresh_ones(world, enc, parent, tmp_path, average):
    model, runtime = common.load_model(parent)[0], distributed.setup("cpu")
    records = read_jsonl(world / "pref" / "instruct.jsonl", "pair")[:4]
    sequences = [s for r in records for s in prefopt.pair_sequences(enc, r, srpo=True)]
    cache = tmp_path / "ref_logps.pt"
    computed = common.reference_logps(model, enc, sequences, str(parent), average, cache, runtime, 256,
                                      batch_size=7)
    with torch.no_grad():
        assert torch.allclose(computed, one_at_a_time(model, enc, sequences, average), atol=1e-4)
    mtime = cache.stat().st_mtime_ns
    assert torch.equal(common.reference_logps(model, enc, sequences, str(parent), average, cache, runtime,
                                              256), computed)
    assert cache.stat().st_mtime_ns == mtime  # read back, not recomputed


def test_a_stale_reference_cache_is_recomputed_not_reused(world, enc, parent, tmp_path, capsys):
    model, runtime = common.load_model(parent)[0], distributed.setup("cpu")
    records = read_jsonl(world / "pref" / "instruct.jsonl", "pair")
    first = [s for r in records[:3] for s in prefopt.pair_sequences(enc, r, srpo=False)]
    other_data = [s for r in records[3:6] for s in prefopt.pair_sequences(enc, r, srpo=False)]
    cache = tmp_path / "ref_logps.pt"
    stale = common.reference_logps(model, enc, first, str(parent), False, cache, runtime, 256)
    with torch.no_grad():
        fresh = one_at_a_time(model, enc, other_data, False)
    # other data, same number of sequences: the cache's values must not come back
    assert torch.allclose(common.reference_logps(model, enc, other_data, str(parent), False, cache, runtime,
                                                 256), fresh, atol=1e-4)
    assert not torch.allclose(fresh, stale, atol=1e-4)
    assert "recomputing" in capsys.readouterr().out
    # other init weights: a different key, so recomputed by the (new) model
    (tmp_path / "other").mkdir()
    other_parent = save_parent(tmp_path / "other", enc, world, seed=1)
    other_model = common.load_model(other_parent)[0]
    with torch.no_grad():
        expected = one_at_a_time(other_model, enc, other_data, False)
    assert torch.allclose(common.reference_logps(other_model, enc, other_data, str(other_parent), False,
                                                 cache, runtime, 256), expected, atol=1e-4)
    assert "recomputing" in capsys.readouterr().out
    # the same data and init with another setting (per-token averaging): recomputed as well
    common.reference_logps(other_model, enc, other_data, str(other_parent), True, cache, runtime, 256)
    assert "recomputing" in capsys.readouterr().out


def test_refine_returns_the_draft_and_each_revision(world, enc, parent):
    model = common.load_model(parent)[0]
    conversations = [r["messages"] for r in read_jsonl(world / "eval" / "instruct.jsonl", "prompt")][:2]
    completions = evaluate.refine_batch(model, enc, conversations, n_revisions=2, max_new_tokens=6)
    assert [len(c) for c in completions] == [3, 3]
    assert all(1 <= len(ids) <= 6 for c in completions for ids in c)
    # greedy: the first draft is what plain generation writes, each revision what generation writes after
    # the revision prompt showing the previous draft, and one conversation alone gets the same
    drafts = generate(model, [render_prompt(enc, m) for m in conversations], 6, 0.0,
                      stop_tokens=chat_stop_tokens(enc))
    assert [c[0] for c in completions] == drafts
    revisions = generate(model, [evaluate.revision_prompt(enc, m, d) for m, d in zip(conversations, drafts)],
                         6, 0.0, stop_tokens=chat_stop_tokens(enc))
    assert [c[1] for c in completions] == revisions
    assert evaluate.refine(model, enc, conversations[0], 2, 6) == completions[0]


@pytest.mark.parametrize("loss,capability,extra", [
    ("dpo", "multilingual", []),                       # + SFT on sft/multilingual (the recipe)
    ("ipo", "safety", ["--length-average"]),           # + SFT on sft/safety (the recipe)
    ("slic", "code", ["--sft-weight", "0.5"]),         # + SFT on the chosen completions
    ("srpo", "instruct", ["--eval-revisions", "1"]),   # + evaluation after one self-refinement
])
def test_prefopt_runs_end_to_end(world, parent, tmp_path, loss, capability, extra):
    out = tmp_path / "run"
    prefopt.main(["--capability", capability, "--init", str(parent), "--data", str(world), "--out", str(out),
                  "--loss", loss, "--steps", "2", "--batch-size", "2", "--log-every", "1",
                  "--eval-batch-size", "4", "--device", "cpu", *extra])
    for name in ("model.pt", "config.json", "checkpoint.pt", "ref_logps.pt"):
        assert (out / name).is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in lines if "loss" in line)
    assert any("eval_reward" in line for line in lines)
    if loss == "srpo":
        assert any("eval_revisions_1_reward" in line for line in lines)
    assert json.loads((out / "config.json").read_text())["args"]["loss"] == loss


def test_a_restarted_run_resumes_exactly(world, parent, tmp_path):
    """Two steps, then a restart to four (a constant LR, so the first run's schedule is the second's), equals
    four steps straight."""
    common_args = ["--capability", "instruct", "--loss", "srpo", "--init", str(parent), "--data", str(world),
                   "--batch-size", "2", "--lr", "1e-3", "--min-lr", "1e-3", "--warmup", "0",
                   "--eval-batch-size", "4", "--device", "cpu"]
    prefopt.main([*common_args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    prefopt.main([*common_args, "--out", str(tmp_path / "resumed"), "--steps", "2"])
    prefopt.main([*common_args, "--out", str(tmp_path / "resumed"), "--steps", "4"])
    straight, resumed = (torch.load(tmp_path / run / "model.pt", weights_only=True)
                         for run in ("straight", "resumed"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
