"""reward.py: the soft-label Bradley–Terry loss on hand-worked numbers, rewards unchanged by packing, score()
on every kind of completion, and a two-stage run end to end (then best-of-N SFT with it)."""

import json
import math

import pytest
import torch
import torch.nn as nn

import common
import judges
import reward
import sft
from data import pair_batch, prompt_completion_sequence, render_completion, render_prompt
from records import read_jsonl


def test_soft_label_loss_on_hand_worked_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    labels = torch.tensor([0.75, 1.0])
    # pair 1: margin 1, −0.75 log σ(1) − 0.25 log σ(−1); pair 2: margin 0, −log ½
    pair1 = -0.75 * math.log(1 / (1 + math.exp(-1))) - 0.25 * math.log(1 / (1 + math.exp(1)))
    assert judges.reward_loss(chosen, rejected, labels).item() == pytest.approx((pair1 + math.log(2)) / 2)
    # a label of ½ is indifferent to the order: the loss is symmetric in the margin
    half = torch.tensor([0.5])
    assert judges.reward_loss(torch.tensor([3.0]), torch.tensor([1.0]), half).item() == \
        pytest.approx(judges.reward_loss(torch.tensor([1.0]), torch.tensor([3.0]), half).item())


@pytest.fixture(scope="module")
def reward_model(parent):
    trunk = common.load_model(parent)[0]
    head = nn.Linear(trunk.config.dim, 1, bias=False)
    nn.init.normal_(head.weight, std=1.0)
    return judges.RewardModel(trunk, head).eval()


def test_packed_and_unpacked_pairs_get_the_same_rewards(world, enc, reward_model):
    records = read_jsonl(world / "pref" / "rm_stage2.jsonl", "pair")[:6]
    packed = pair_batch(enc, records, 512)
    assert packed["tokens"].shape[0] < 2 * len(records)  # several sequences share a row
    with torch.no_grad():
        rewards = reward_model(packed["tokens"], packed["doc_ids"], packed["positions"], packed["last"])
        alone = []
        for record in records:
            for side in ("chosen", "rejected"):
                ids, _ = prompt_completion_sequence(*render_completion(enc, record["messages"], record[side]))
                batch = pair_batch(enc, [record | {"chosen": record[side], "rejected": record[side]}],
                                   len(ids))
                alone.append(reward_model(batch["tokens"], batch["doc_ids"], batch["positions"],
                                          batch["last"])[0])
    assert torch.allclose(rewards, torch.stack(alone), atol=1e-5)
    assert rewards.std() > 0


def test_score_takes_text_messages_and_sampled_ids_alike(world, enc, reward_model):
    record = read_jsonl(world / "pref" / "rm_stage2.jsonl", "pair")[0]
    messages, text = record["messages"], "Velari is a language."
    prompt_ids, completion_ids = render_completion(enc, messages, text)
    assert render_prompt(enc, messages) == prompt_ids
    scores = judges.reward_model_scores(reward_model, enc, messages,
                                          [text, {"role": "chatbot", "content": text}, completion_ids,
                                           record["chosen"]], batch_size=3)
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and scores[0] == pytest.approx(scores[2], abs=1e-5)
    assert len(scores) == 4 and scores[3] != pytest.approx(scores[0])


def test_two_stage_run_saves_a_loadable_reward_model_then_best_of_n_sft(world, parent, tmp_path, capsys):
    out = tmp_path / "rm"
    reward.main(["--data", str(world), "--init", str(parent), "--out", str(out), "--batch-size", "16",
                 "--stage2-batch-size", "8", "--log-every", "1", "--warmup", "1", "--seq-len", "512"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n1 = math.ceil(len(read_jsonl(world / "pref" / "rm_stage1.jsonl", "pair")) / 16)  # one epoch each
    n2 = math.ceil(len(read_jsonl(world / "pref" / "rm_stage2.jsonl", "pair")) / 8)
    steps = [m for m in metrics if "loss" in m]
    assert [m["stage"] for m in steps] == [1] * n1 + [2] * n2
    assert max(m["lr"] for m in steps if m["stage"] == 2) < max(m["lr"] for m in steps if m["stage"] == 1)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head
    assert [m["stage"] for m in metrics if "eval_accuracy" in m] == [1, 2]
    assert "held-out pairwise accuracy" in capsys.readouterr().out

    loaded = judges.load_reward_model(out)
    assert torch.equal(loaded.head.weight, torch.load(out / "head.pt")["weight"])
    bon = tmp_path / "bon"
    sft.main(["--data", str(world), "--init", str(parent), "--out", str(bon), "--capability", "safety",
              "--best-of-n", "2", "--reward-model", str(out), "--steps", "2", "--batch-size", "4",
              "--seq-len", "512"])
    assert "best-of-2" in capsys.readouterr().out and (bon / "model.pt").is_file()
