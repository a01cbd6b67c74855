"""copg.py: copg_loss on a hand-worked value, its identities with RLOO and IPO, and its optimum on a tabular
problem; verifier rewards; end-to-end runs offline and online (verifier, replay, L2 and SFT regularisers)."""

import itertools
import json
import math

import pytest
import torch

import common
import copg
import distributed
import evaluate
from conftest import save_reward_model
from copg import copg_loss
from data import load_tokenizer, render_completion, render_prompt
from records import read_jsonl
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
    completion's log-prob equals 2βk times that of RLOO's surrogate
    −1/k Σ_i (R_i − mean_{j≠i} R_j) log π(y_i)."""
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


def test_recipes_before_lr_scaling_are_appendix_b():
    assert copg.RECIPES["code"]["beta"] == 0.06 and copg.RECIPES["code"]["lr"] == 2e-6  # B.3.1, stage 3
    assert copg.RECIPES["math"]["lr"] == 2e-6  # B.4, preference tuning (CoPG): no decay
    for capability in ("code", "math"):
        args = copg.parse_args(["--capability", capability])
        assert args.lr == pytest.approx(2e-6 * common.PREF_LR_SCALE) and args.grad_clip == 1.0
    # B.3.1 stage 3 "otherwise match[es] the hyperparameters used for SFT" (stage 1: weight decay 0.1)
    assert copg.parse_args(["--capability", "code"]).weight_decay == 0.1
    # §3.3.4.2's hybrid CE loss for code; RAG offline on its judged groups (§3.3.2.2) when asked
    assert copg.parse_args(["--capability", "code"]).sft_weight > 0
    assert copg.parse_args(["--capability", "code", "--sft-weight", "0"]).sft_weight == 0
    rag = copg.parse_args(["--capability", "rag", "--mode", "offline"])
    assert (rag.data_file, rag.sft_weight) == ("copg/rag.jsonl", 0.0)
    assert copg.parse_args(["--capability", "math"]).weight_decay == 0.0
    # RAG's prompts carry documents: rows of 512 hold every one of them with a reply, 256 a third
    seq_len = lambda *flags: copg.parse_args(["--capability", *flags]).seq_len  # noqa: E731
    assert (seq_len("rag"), seq_len("math"), seq_len("rag", "--seq-len", "1024")) == (512, 256, 1024)
    assert copg.parse_args(["--capability", "code", "--weight-decay", "0"]).weight_decay == 0.0


def test_copg_needs_at_least_two_completions_per_prompt():
    with pytest.raises(ValueError, match="k >= 2"):
        copg_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 0.1)


# -----------------------------------------------------------------------------
# The stage script


def test_verifier_rewards_grade_the_parsed_reply(world):
    enc = load_tokenizer(str(world / "tokenizer.json"))
    record = read_jsonl(world / "rl" / "math.jsonl", "prompt")[0]
    right, wrong = (render_completion(enc, record["messages"], f"Answer: {answer}")[1]
                    for answer in (record["check"]["answer"], record["check"]["answer"] + 1))
    assert evaluate.verifier_rewards(enc, [record] * 4, [right, wrong, wrong, right]) == [1.0, 0.0, 0.0, 1.0]


def run(world, parent, out, *extra):
    copg.main(["--data", str(world), "--init", str(parent), "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--log-every", "1", "--eval-batch-size", "4", "--device", "cpu", *extra])
    for name in ("model.pt", "config.json", "checkpoint.pt"):
        assert (out / name).is_file()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("capability,metric", [("code", "eval_pass@1"), ("rag", "eval_reward")])
def test_offline_copg_runs_end_to_end_on_scored_groups(world, parent, tmp_path, capability, metric):
    """Code's groups scored in the sandbox, RAG's by the gold judge; both with the hybrid SFT loss."""
    lines = run(world, parent, tmp_path / "run", "--capability", capability, "--mode", "offline",
                "--sft-weight", "0.5")
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert all(math.isfinite(line["loss"]) and line["sft_loss"] > 0 for line in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is the reference before its first step
    assert (tmp_path / "run" / "ref_logps.pt").is_file()
    assert any(metric in line for line in lines)


def test_online_copg_with_the_verifier_replay_and_regularisers_runs_end_to_end(world, parent, tmp_path):
    lines = run(world, parent, tmp_path / "run", "--capability", "math", "--mode", "online", "--k", "2",
                "--max-new-tokens", "8", "--replay-size", "4", "--replay-batch", "1", "--l2-ref", "1e-3",
                "--sft-weight", "0.5")
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # fresh samples, reference = policy at step 1
    assert steps[0]["l2"] == 0.0 and steps[1]["l2"] > 0.0  # the weights moved away from the reference
    assert [line["replay"] for line in steps] == [2, 4]
    assert all(line["samples_per_s"] > 0 and 0.0 <= line["reward"] <= 1.0 for line in steps)
    assert any("eval_accuracy" in line for line in lines)


def test_online_copg_never_samples_the_weight_searchs_selection_prompts(world, parent, tmp_path, monkeypatch):
    """The first prompts of every rl/CAP.jsonl choose between models (merge.py --search); online CoPG trains
    on the others only, a copy of a selection prompt later in a file included. (The test's world has 10
    prompts per capability: the first 5 are held out.)"""
    enc = load_tokenizer(str(world / "tokenizer.json"))
    math_prompts = read_jsonl(world / "rl" / "math.jsonl", "prompt")
    data_file = tmp_path / "prompts.jsonl"   # math's prompts, then a copy of its first: a second occurrence
    data_file.write_text("".join(json.dumps(r) + "\n" for r in math_prompts + math_prompts[:1]))
    assert len(evaluate.without_selection_prompts(math_prompts + math_prompts[:1], world)) == 5
    sampled, generate_sharded = [], copg.generate_sharded

    def recording(model, prompts, *args):
        sampled.extend(tuple(ids) for ids in prompts)
        return generate_sharded(model, prompts, *args)

    monkeypatch.setattr(copg, "generate_sharded", recording)
    run(world, parent, tmp_path / "run", "--capability", "math", "--mode", "online", "--k", "2",
        "--max-new-tokens", "4", "--steps", "4", "--batch-size", "3", "--no-eval", "--data-file",
        str(data_file))
    rendered = [tuple(render_prompt(enc, r["messages"])) for r in math_prompts]
    assert len(sampled) >= 12 and set(sampled) <= set(rendered[5:])


def test_a_restarted_online_run_resumes_exactly(world, parent, tmp_path):
    """Sampling is seeded by the step and the replay buffer is saved with the checkpoint, so two steps, then a
    restart to four, equal four steps straight (rewards from a reward model: every step moves the weights)."""
    common_args = ["--capability", "instruct", "--k", "2", "--max-new-tokens", "6", "--lr", "1e-3",
                   "--reward", f"rm:{save_reward_model(tmp_path / 'reward', parent)}", "--replay-size", "4",
                   "--replay-batch", "1", "--data", str(world), "--init", str(parent), "--batch-size", "2",
                   "--no-eval", "--device", "cpu"]
    copg.main([*common_args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    copg.main([*common_args, "--out", str(tmp_path / "resumed"), "--steps", "2"])
    runtime = distributed.setup("cpu")
    assert len(common.load_rank_state(tmp_path / "resumed", runtime)) == 4  # 2 steps x 2 groups
    copg.main([*common_args, "--out", str(tmp_path / "resumed"), "--steps", "4"])
    init, straight, resumed = (torch.load(path / "model.pt", weights_only=True)
                               for path in (parent, tmp_path / "straight", tmp_path / "resumed"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not all(torch.equal(straight[name], init[name]) for name in straight)


def test_online_copg_with_reward_model_rewards_runs(world, parent, tmp_path):
    """--reward rm:PATH scores samples with reward.py's model (here: the parent's trunk and a random head)."""
    reward_folder = save_reward_model(tmp_path / "reward", parent)
    lines = run(world, parent, tmp_path / "run", "--capability", "instruct", "--k", "2",
                "--max-new-tokens", "6", "--reward", f"rm:{reward_folder}")
    rewards = [line["reward"] for line in lines if "loss" in line]
    assert len(rewards) == 2 and all(math.isfinite(r) and r != 0.0 for r in rewards)
