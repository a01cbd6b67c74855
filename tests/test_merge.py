"""merge.py: linear merges (associative, identity on copies, equal to an in-memory merge), SLERP, streaming
reads, and refusal of incompatible inputs."""

import json
import os
import pickle
import zipfile

import pytest
import torch

from merge import LazyCheckpoint, main, merge, search_weights, slerp
from model import Config, Transformer

CONFIG = Config(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, window=8)


def save_model(directory, seed, config=CONFIG, tokenizer_text="tok-a"):
    directory.mkdir(parents=True)
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(tokenizer_text)
    torch.manual_seed(seed)
    torch.save(Transformer(config).state_dict(), directory / "model.pt")
    info = {"stage": "test", "preset": "test", "model": config.__dict__, "tokenizer": str(tokenizer)}
    (directory / "config.json").write_text(json.dumps(info))
    return directory


@pytest.fixture
def experts(tmp_path):
    return [save_model(tmp_path / f"expert{i}", seed=i) for i in range(3)]


def load(path):
    return torch.load(path / "model.pt", weights_only=True)


def test_lazy_checkpoint_reads_every_tensor_exactly(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(4, 6).t(),
             "d": torch.randn(10)[2:7], "e": torch.randn(3).bfloat16()}
    torch.save(state, tmp_path / "lazy.pt")
    checkpoint = LazyCheckpoint(tmp_path / "lazy.pt")
    for name, tensor in state.items():
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert checkpoint[name].dtype == tensor.dtype and torch.equal(checkpoint[name], tensor)


def test_lazy_checkpoint_refuses_a_pickle_that_would_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(entries)).split("/")[0]
    entries[f"{root}/data.pkl"] = pickle.dumps({"a": Exploit()})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        LazyCheckpoint(path)


def test_streaming_linear_merge_equals_an_in_memory_merge(experts):
    weights = [0.5, 0.3, 0.2]
    merged, _ = merge(experts, weights)
    states = [load(p) for p in experts]
    for name in states[0]:
        expected = sum(w * s[name] for w, s in zip(weights, states))
        assert torch.allclose(merged[name], expected, atol=1e-7)


def test_uniform_merge_of_identical_checkpoints_is_the_identity(tmp_path):
    copies = [save_model(tmp_path / f"copy{i}", seed=7) for i in range(3)]
    merged, _ = merge(copies)
    for name, tensor in load(copies[0]).items():
        assert torch.allclose(merged[name], tensor, atol=1e-7)


def test_linear_merges_are_associative(experts, tmp_path):
    main(["--out", str(tmp_path / "ab"), "--models", str(experts[0]), str(experts[1])])
    nested, _ = merge([tmp_path / "ab", experts[2]], [2 / 3, 1 / 3])
    flat, _ = merge(experts)
    for name in flat:
        assert torch.allclose(nested[name], flat[name], atol=1e-6)
    written = json.loads((tmp_path / "ab" / "config.json").read_text())
    assert written["stage"] == "merge" and written["parent"] == [str(experts[0]), str(experts[1])]


def test_task_arithmetic_adds_the_scaled_changes_to_the_parent(experts, tmp_path):
    parent, *children = experts
    main(["--out", str(tmp_path / "ta"), "--base", str(parent), "--models", *map(str, children),
          "--weights", "0.7", "0.6"])
    merged, states = load(tmp_path / "ta"), [load(p) for p in experts]
    for name, base in states[0].items():  # θ_parent + Σ λ_i (θ_i − θ_parent), the changes summed to 1.3
        expected = base + 0.7 * (states[1][name] - base) + 0.6 * (states[2][name] - base)
        assert torch.allclose(merged[name], expected, atol=1e-6)
    written = json.loads((tmp_path / "ta" / "config.json").read_text())
    assert written["args"]["weights"] == pytest.approx([-0.3, 0.7, 0.6])
    assert written["parent"] == [str(p) for p in experts]


def test_weights_must_sum_to_one_unless_normalized(experts):
    with pytest.raises(ValueError, match="sum to 1.5"):
        merge(experts, [0.5, 0.5, 0.5])
    normalized, _ = merge(experts, [1.0, 1.0, 1.0], normalize=True)
    uniform, _ = merge(experts)
    assert all(torch.allclose(normalized[n], uniform[n]) for n in uniform)


def test_mismatched_inputs_are_refused_naming_the_difference(experts, tmp_path):
    deeper = save_model(tmp_path / "deeper", seed=0, config=Config(**{**CONFIG.__dict__, "n_layers": 4}))
    with pytest.raises(ValueError, match="n_layers = 4"):
        merge([experts[0], deeper])
    other_tokenizer = save_model(tmp_path / "other_tok", seed=0, tokenizer_text="tok-b")
    with pytest.raises(ValueError, match="tokenizer"):
        merge([experts[0], other_tokenizer])
    (other_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"{other_tokenizer}: its tokenizer .* is not a file here"):
        merge([experts[0], other_tokenizer])
    reshaped = save_model(tmp_path / "reshaped", seed=0)
    state = load(reshaped)
    state["blocks.1.out_proj.weight"] = torch.zeros(32, 7)
    torch.save(state, reshaped / "model.pt")
    with pytest.raises(ValueError, match=r"blocks\.1\.out_proj\.weight has shape \(32, 7\)"):
        merge([experts[0], reshaped])


def test_slerp_follows_the_great_circle_and_keeps_the_norm():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b)
    middle = slerp(0.5, a, b)
    assert torch.allclose(middle, torch.tensor([2 ** 0.5, 2 ** 0.5]))  # norm 2, where lerp would give 1.41
    assert torch.allclose(slerp(0.3, a, 3 * a), 0.7 * a + 0.9 * a)  # parallel: plain interpolation


# --- weight search ------------------------------------------------------------------------------------------

NEEDS = {"a": 0.5, "b": 0.2, "c": 0.2}  # the weight each domain's expert needs in the merge to keep its score


def threshold_score(calls=None):
    """A stand-in for evaluate.py: domain d keeps its expert's score 1 once its expert's weight reaches
    NEEDS[d], and loses it linearly below."""
    def score(weights, names):
        if calls is not None:
            calls.append(list(weights))
        return {d: min(1.0, weights["abc".index(d)] / NEEDS[d]) for d in names}
    return score


def test_search_upweights_the_weakest_domain_until_every_expert_is_retained(tmp_path):
    with open(tmp_path / "search.jsonl", "w") as log:
        best, candidates = search_weights(["a", "b", "c"], threshold_score(), budget=20, log=log)
    uniform = candidates[0]
    assert uniform["kind"] == "start" and uniform["retention"]["a"] == pytest.approx((1 / 3) / 0.5)
    # a's share raised by 0.2 and the others implicitly lowered (all over 1.2), twice: every domain kept
    assert [c["kind"] for c in candidates[1:3]] == ["upweight a by 0.2"] * 2
    assert candidates[1]["weights"] == pytest.approx([(1 / 3 + 0.2) / 1.2, (1 / 3) / 1.2, (1 / 3) / 1.2])
    assert uniform["objective"] < candidates[1]["objective"] < candidates[2]["objective"] == 1.0
    # with no move left, the leave-one-out merges around the best, then perturbations
    assert [c["kind"] for c in candidates[3:7]] == ["leave out 0", "leave out 1", "leave out 2", "perturb"]
    assert candidates[3]["weights"] == pytest.approx([0, 0.5, 0.5])
    assert len(candidates) == 20 and best["objective"] == 1.0 and best["weights"][0] >= 0.5
    assert sum(best["weights"]) == pytest.approx(1.0)
    lines = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines[:3]] == ["expert 0 alone", "expert 1 alone", "expert 2 alone"]
    assert lines[3:] == json.loads(json.dumps(candidates))  # every candidate, as returned


def test_search_moves_on_from_a_domain_whose_upweights_all_lost():
    """Domain a shows only at a weight no merge gives it, and any more of expert a wipes out b and c (a
    collision, as the tiny long-context expert's); b gains with every upweight. After a's three upweights
    lose, the budget goes to b, not to a's three again from each new best."""
    def score(weights, names):
        wa, wb, wc = weights
        collided = wa > 0.34
        return {"a": 0.3 + 0.7 * (wa >= 0.9), "b": 0 if collided else min(1, wb / 0.8),
                "c": 0 if collided else min(1, wc / 0.2)}

    best, candidates = search_weights(["a", "b", "c"], score, budget=8)
    kinds = [c["kind"] for c in candidates]
    assert kinds[:4] == ["start", "upweight a by 0.2", "upweight a by 0.4", "upweight a by 0.8"]
    assert kinds[4:7] == ["upweight b by 0.2"] * 3   # each from the one before, each better
    assert best is candidates[6] and best["retention"]["b"] > candidates[4]["retention"]["b"]


def test_search_leaves_out_domains_with_nothing_to_retain_and_reports_collisions(capsys):
    def score(weights, names):  # expert 1's domain scores 0 even alone; expert 2 hurts domain a
        return {d: {"a": max(0.0, weights[0] - weights[2]), "b": 0.0, "c": weights[2]}[d] for d in names}

    best, candidates = search_weights(["a", "b", "c"], score, budget=12)   # 9 upweights, then 3 leave-outs
    assert set(best["retention"]) == {"a", "c"}
    printed = capsys.readouterr().out
    around = max(candidates[:9], key=lambda c: c["objective"])   # the best when the leave-outs began
    assert around["weights"] == pytest.approx([0.537, 0.231, 0.231], abs=1e-3)   # a upweighted twice
    assert ("left out: b" in printed
            and "collision: leaving out model 2 (c) raises a 0.306 -> 0.699" in printed)
    leave_out_2 = next(c for c in candidates if c["kind"] == "leave out 2")
    assert leave_out_2["scores"]["a"] > around["scores"]["a"]
    best, candidates = search_weights(["b", "b"], lambda weights, names: {d: 0.0 for d in names}, budget=3,
                                      start=[3.0, 1.0])
    assert "nothing to search for" in capsys.readouterr().out and best["weights"] == [0.75, 0.25]


def test_search_keeps_every_domain_rather_than_trading_one_away_for_a_higher_mean():
    """Each expert collides with the others: in the uniform merge every domain keeps 0.6 of its expert;
    leaving expert 2 out keeps the others whole and c at nothing. The mean prefers that (0.67 against 0.6);
    the objective, which counts the worst domain too, keeps the merge that holds every domain."""
    def score(weights, names):
        collided = all(w > 0 for w in weights)
        return {d: 0.6 if collided else float(weights["abc".index(d)] > 0) for d in names}

    best, candidates = search_weights(["a", "b", "c"], score, budget=13)   # 9 upweights (none better), 3 more
    leave_out_2 = next(c for c in candidates if c["kind"] == "leave out 2")
    assert sum(leave_out_2["retention"].values()) / 3 == pytest.approx(2 / 3)   # > 0.6, the start's mean
    assert best["kind"] == "start" and best["objective"] == pytest.approx(0.6)
    assert leave_out_2["objective"] == pytest.approx((2 / 3 + 0) / 2)


def test_task_arithmetic_search_scales_the_changes_past_what_an_average_can_hold():
    """Three experts that each need a scale of 0.5 on their change (1.5 in all, with a parent of no domain):
    no average of four models holds that; scaling every change 3x does."""
    def score(weights, names):   # weights: the parent's, then the experts' λ
        return {d: min(1.0, weights[1 + "abc".index(d)] / 0.5) for d in names}

    domains = [None, "a", "b", "c"]
    average, _ = search_weights(domains, score, budget=12)
    best, candidates = search_weights(domains, score, budget=12, base=True)
    assert [c["kind"] for c in candidates[:3]] == ["start", "experts x2", "experts x3"]
    assert candidates[0]["weights"] == pytest.approx([0.25] * 4)   # the start is the plain average
    assert candidates[2]["weights"] == pytest.approx([-1.25, 0.75, 0.75, 0.75])
    assert [c["kind"] for c in candidates[3:6]] == ["leave out 1", "leave out 2", "leave out 3"]
    assert best["objective"] == 1.0 > average["objective"]
    assert all(sum(c["weights"]) == pytest.approx(1.0) for c in candidates)


def test_a_restarted_search_replays_its_log_without_evaluating_again():
    first_calls, second_calls, cache = [], [], {}
    first, _ = search_weights(["a", "b", "c"], threshold_score(first_calls), budget=10, cache=cache)
    second, _ = search_weights(["a", "b", "c"], threshold_score(second_calls), budget=10, cache=dict(cache))
    assert len(first_calls) == 13 and second_calls == [] and second["weights"] == first["weights"]


def test_merge_search_end_to_end_writes_the_best_merge_and_its_log(world, enc, tmp_path):
    """Two dim-64 models scored on the safety eval (a fresh model refuses some and answers others)."""
    import argparse

    import common
    from conftest import SMALL

    paths = []
    for seed in (0, 1):
        folder = tmp_path / f"safety{seed}"
        folder.mkdir()
        config = Config(vocab_size=enc.n_vocab, **SMALL)
        torch.manual_seed(seed)
        torch.save(Transformer(config).state_dict(), folder / "model.pt")
        common.write_config(folder, "sft", "tiny", config, argparse.Namespace(capability="safety"),
                            str(world / "tokenizer.json"), None)
        paths.append(str(folder))
    out = tmp_path / "soup"
    main(["--search", "--out", str(out), "--models", *paths, "--data", str(world), "--budget", "3",
          "--limit", "4"])
    lines = [json.loads(line) for line in (out / "search.jsonl").read_text().splitlines()]
    assert "header" in lines[0] and len(lines) == 1 + 2 + 3  # header, the experts alone, 3 candidates
    best = max(lines[3:], key=lambda c: c["objective"])
    written = json.loads((out / "config.json").read_text())
    assert written["args"]["weights"] == best["weights"] and written["args"]["capability"] == "safety"
    expected, _ = merge(paths, best["weights"])
    assert all(torch.allclose(load(out)[name], expected[name]) for name in expected)


def test_task_arithmetic_search_counts_each_experts_gain_over_the_parent(tmp_path):
    """With a parent, a domain's retention is the share of its expert's gain over the parent that the merge
    keeps (§3.4: what merging must not lose is what the expert added); where an expert adds nothing, what the
    parent scores is what to keep; the parent's own domain is kept against the parent's score."""
    def score(weights, names):   # weights: the parent's (1 − Σλ), then λ_a, λ_b
        la = weights[1]
        return {d: {"p": weights[0], "a": 0.4 + 0.4 * min(1.0, la / 0.5), "b": 0.5 - 0.3 * la}[d]
                for d in names}

    with open(tmp_path / "search.jsonl", "w") as log:
        best, candidates = search_weights(["p", "a", "b"], score, budget=1, base=True, log=log)
    lines = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert lines[3] == {"kind": "parent alone", "weights": [1.0, 0.0, 0.0], "scores": {"a": 0.4, "b": 0.5}}
    start = candidates[0]   # λ = 1/3: a 0.667 of a gain 0.4 -> 0.8, b 0.4 of the parent's 0.5, p 1/3 of 1
    assert start["scores"]["a"] == pytest.approx(0.4 + 0.4 * 2 / 3)
    assert start["retention"] == pytest.approx({"p": 1 / 3, "a": 2 / 3, "b": 0.8})


def test_upweighting_lowers_the_other_experts_implicitly_and_keeps_the_total_scale():
    from merge import upweighted
    assert upweighted([0.5, 0.25, 0.25], ["a", "b", "b"], "b", 0.4) == pytest.approx(
        [0.5 / 1.4, 0.45 / 1.4, 0.45 / 1.4])
    # task arithmetic: the same on the experts' λ (here 2x the average, Σλ = 1.5), the parent's weight a
    # placeholder (1 − Σλ is set when a candidate is tried); the parent's own domain shrinks every λ
    scales = upweighted([-0.5, 0.5, 0.5, 0.5], ["p", "a", "b", "c"], "a", 0.8, base=True)
    assert scales[1:] == pytest.approx([1.5 * (1 / 3 + 0.8) / 1.8, 1.5 * (1 / 3) / 1.8, 1.5 * (1 / 3) / 1.8])
    assert sum(scales[1:]) == pytest.approx(1.5)
    assert upweighted([-0.5, 0.5, 0.5, 0.5], ["p", "a", "b", "c"], "p", 0.25, base=True)[1:] == pytest.approx(
        [0.4, 0.4, 0.4])
