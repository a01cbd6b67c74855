"""polish.py: §3.5's preference pairs from scored samples (every filter on hand-made scores), samples rendered
back as messages, and the ping-pong run end to end: phases in order, the per-phase table, the best SRPO phase
kept, and a restart that replays what was done."""

import collections
import json
import random
from pathlib import Path

import pytest
import torch

import polish
from conftest import SMALL, save_parent
from data import _reply, parse_reply


def message(text):
    return {"role": "chatbot", "content": text}


def test_pairs_are_the_reward_models_best_and_worst_then_the_verifiers_pass_and_fail():
    record = lambda task: {"messages": [{"role": "user", "content": task}], "task": task, "check": {}}  # noqa
    records = [record("rag"), record("safety"), record("math"), record("code"), record("rag")]
    texts = [[message(f"{n}-{i}") for i in range(4)] for n in range(4)] + [[message("same")] * 4]
    rm = [[1, 3, 2, 0],        # mean 1.5: the 25 % quantile of the five means, kept
          [0.1, 0.2, 0.1, 0.2],  # the lowest mean: dropped
          [2, 5, 4, 3],        # best by the RM fails the verifier where its worst passes: dropped
          [3, 4, 3.5, 5],
          [2, 3, 2, 2]]        # best and worst are the same reply: no pair
    verified = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 1, 0.4], [1, 1, 1, 1]]
    pairs = polish.polishing_pairs(records, texts, rm, verified, rule="reward-model")
    got = [(p["messages"][0]["content"], p["chosen"]["content"], p["rejected"]["content"], p["source"])
           for p in pairs]
    # math: the first passing sample (0, RM 2) scores below the first failing one (1, RM 5): dropped
    assert got == [("rag", "0-1", "0-3", "reward model"),
                   ("code", "3-3", "3-0", "reward model"),   # verifier 0.4 >= 0: consistent
                   ("code", "3-1", "3-0", "verifier")]        # first pass (RM 4) over first fail (RM 3)
    assert all(p["label"] == 1.0 for p in pairs)


def test_verified_pairs_are_the_verifiers_best_and_worst_ranked_by_the_reward_model_within_a_tie():
    record = lambda task: {"messages": [{"role": "user", "content": task}], "task": task, "check": {}}  # noqa
    records = [record("rag"), record("safety"), record("math"), record("code")]
    texts = [[message(f"{n}-{i}") for i in range(4)] for n in range(4)]
    rm = [[1, 3, 2, 0],          # the verifier ties every sample: no pair, whatever the reward model says
          [0.1, 0.2, 0.1, 0.2],  # a low mean reward does not drop a prompt the verifier separates
          [2, 5, 4, 3],          # the reward model prefers a failing sample: the verifier decides
          [3, 4, 3.5, 5]]
    verified = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0.4]]
    pairs = polish.polishing_pairs(records, texts, rm, verified)
    got = [(p["messages"][0]["content"], p["chosen"]["content"], p["rejected"]["content"], p["source"])
           for p in pairs]
    # chosen: the reward model's best of the samples the verifier rates highest; rejected: its worst of those
    # the verifier rates lowest
    assert got == [("safety", "1-1", "1-2", "verifier"),   # passing: RM 0.2 > 0.1; failing: 0.1 < 0.2
                   ("math", "2-2", "2-3", "verifier"),     # passing: RM 4 > 2; failing: RM 3 < 5
                   ("code", "3-1", "3-0", "verifier")]     # verifier 1 (RM 4 > 3.5) against verifier 0
    with pytest.raises(ValueError, match="unknown pair rule"):
        polish.polishing_pairs(records, texts, rm, verified, rule="best")


def test_plain_questions_pair_the_reward_models_best_and_worst_where_the_verifier_ties():
    """Style is the reward model's call: on a chat prompt (the filler habit) it pairs its best sample with its
    worst when the verifier rates them alike; on a capability's prompt it does not."""
    records = [{"messages": [{"role": "user", "content": task}], "task": task, "check": {}}
               for task in ("chat", "rag", "chat")]
    texts = [[message(f"{n}-{i}") for i in range(3)] for n in range(3)]
    rm, verified = [[1, 3, 0], [1, 3, 0], [2, 2, 2]], [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    pairs = polish.polishing_pairs(records, texts, rm, verified)
    assert [(p["chosen"]["content"], p["rejected"]["content"], p["source"]) for p in pairs] == [
        ("0-1", "0-2", "reward model")]   # the RAG prompt and the chat prompt the RM ties give none


def test_an_srpo_phase_draws_its_share_of_plain_questions_and_the_rest_evenly():
    prompts = [{"capability": name, "messages": [{"role": "user", "content": f"{name} {i}"}]}
               for name in polish.SETS for i in range(30)]
    counts = lambda chosen: collections.Counter(r["capability"] for r in chosen)  # noqa: E731
    chosen = polish.phase_prompts(prompts, 140, 0.5, random.Random(0))
    assert counts(chosen) == {"chat": 30} | {c: 10 for c in polish.CAPABILITIES}   # chat's pool runs out
    assert counts(polish.phase_prompts(prompts, 28, 0.25, random.Random(0))) == \
        {"chat": 7} | {c: 3 for c in polish.CAPABILITIES}
    assert len({json.dumps(r, sort_keys=True) for r in chosen}) == len(chosen)   # no prompt twice
    with pytest.raises(SystemExit):
        polish.parse_args(["--chat-share", "1.5"])


def test_a_sample_becomes_the_message_that_renders_it_and_broken_ones_are_left_out(enc):
    call = {"role": "chatbot", "content": "", "thinking": "I will use the calculator.",
            "tool_calls": [{"tool_name": "calculator", "parameters": {"expression": "2 + 3"}}]}
    for original in (call, message("It is 5.")):
        ids = _reply(enc, original)
        assert polish.reply_message(parse_reply(enc, ids)) == original
        assert polish.reply_message(parse_reply(enc, ids[:-1])) is None   # no END_OF_TURN: never ended
    broken = parse_reply(enc, _reply(enc, call))
    assert polish.reply_message(broken | {"action": "[{not json"}) is None


def test_ping_pong_runs_srpo_copg_srpo_keeps_the_best_srpo_phase_and_resumes(world, enc, parent, tmp_path,
                                                                              monkeypatch):
    """A random model never ends its turn: its samples for the SRPO pairs are scripted (the phases, the
    measurements and the CoPG samples are the model's own)."""
    monkeypatch.setattr(polish, "MEASURE_PROMPTS", 4)
    replies = [_reply(enc, message(text)) for text in ("It is 5.", "Sure! It is 5.", "No.")]
    monkeypatch.setattr(polish, "generate", lambda model, prompts, *args: [
        replies[i % len(replies)] for i in range(len(prompts))])
    reward = tmp_path / "reward"   # a random reward model
    reward.mkdir()
    save_parent(reward, enc, world, seed=1)
    torch.manual_seed(2)
    torch.save(torch.nn.Linear(SMALL["dim"], 1, bias=False).state_dict(), reward / "head.pt")
    out = tmp_path / "polished"
    argv = ["--init", str(parent), "--data", str(world), "--out", str(out), "--reward-model", str(reward),
            "--reference", str(parent), "--rounds", "2", "--prompts", "14", "--samples", "2",
            "--srpo-steps", "1", "--copg-steps", "1", "--pairs", "reward-model"]   # the verifier ties these
    polish.main(argv)
    measured = {json.dumps(r["messages"], sort_keys=True) for r in polish.measured_records(world)}
    trained = [json.loads(line)["messages"] for path in (out / "copg_prompts.jsonl", out / "phase-1-srpo" /
               "pairs.jsonl") for line in path.read_text().splitlines()]
    assert len(measured) > 7 and trained   # a phase is never measured on a prompt it trained on
    assert not measured & {json.dumps(messages, sort_keys=True) for messages in trained}
    rows = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines()]
    phases = ["phase-1-srpo", "phase-2-copg", "phase-3-srpo"]
    assert [row["phase"] for row in rows][1:] == phases[:len(rows) - 1]
    assert len(rows) >= 2 and rows[0]["gold_win_rate"] == rows[0]["win_rate"] == 0.5   # the reference itself
    candidates = [row for row in rows if not row["phase"].endswith("copg")]   # the start and SRPO phases
    kept = json.loads((out / "polish.json").read_text())["kept"]
    best = max(candidates, key=lambda row: row["gold_win_rate"])
    assert kept == best["phase"]
    assert (out / "model.pt").read_bytes() == (Path(best["dir"]) / "model.pt").read_bytes()
    assert (out / "phases.md").read_text().count("\n") == 2 + len(rows)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("model.pt")}
    polish.main(argv)   # a restart: every phase replayed from phases.jsonl, none trained again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.pt") if p.parent != out} == \
        {p: t for p, t in before.items() if p.parent != out}
    assert [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines()] == rows


def test_polishing_stops_with_the_init_model_when_no_sample_ends_its_turn(world, enc, parent, tmp_path,
                                                                          capsys, monkeypatch):
    """A model that never ends its turn gives no pair: polishing stops before its first phase and OUT holds
    the --init model."""
    monkeypatch.setattr(polish, "MEASURE_PROMPTS", 4)
    reward = tmp_path / "reward"
    reward.mkdir()
    save_parent(reward, enc, world, seed=1)
    torch.save(torch.nn.Linear(SMALL["dim"], 1, bias=False).state_dict(), reward / "head.pt")
    out = tmp_path / "polished"
    polish.main(["--init", str(parent), "--data", str(world), "--out", str(out), "--reward-model",
                 str(reward), "--reference", str(parent), "--prompts", "7", "--samples", "2"])
    assert "no preference pair" in capsys.readouterr().out
    assert (out / "model.pt").read_bytes() == (parent / "model.pt").read_bytes()
    assert len((out / "phases.jsonl").read_text().splitlines()) == 1
