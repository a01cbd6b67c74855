"""sft.py: loss only on chatbot tokens, packing changes nothing, the L2-to-init term, best-of-N's pick, the
data order, and end-to-end runs (resume, regularisers, evaluation) on a small synthetic world."""

import json

import pytest
import torch
import torch.nn.functional as F

import common
import distributed
import sft
from data import (END_OF_TURN, IGNORE, SPECIAL_TOKENS, record_indices, render, render_completion,
                  render_prompt, save_tokenizer, sft_batch, train_bpe)
from records import read_jsonl
from model import Config, Transformer


@pytest.fixture(scope="module")
def model(parent):
    return common.load_model(parent)[0]


def conversations(world, n=6):
    return (read_jsonl(world / "sft" / "instruct.jsonl", "sft")[:n]
            + read_jsonl(world / "sft" / "rag.jsonl", "sft")[:2])


def test_only_chatbot_tokens_carry_loss(world, enc, model):
    record = {"messages": [{"role": "system", "content": "Answer in upper case."},
                           {"role": "user", "content": "Who leads Verun Metals?"},
                           {"role": "chatbot", "content": "NESKAFEN TELLU."}]}
    ids, mask = render(enc, record["messages"])
    batch = sft_batch(enc, [record], 64)
    scored = (batch["targets"][0] != IGNORE).nonzero().squeeze(1).tolist()
    # position t predicts token t + 1: exactly the tokens the chatbot writes (its reply through END_OF_TURN)
    assert [t + 1 for t in scored] == [i for i, m in enumerate(mask) if m]
    assert enc.decode([ids[t + 1] for t in scored]).count("NESKAFEN TELLU.") == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
        by_hand = -torch.stack([F.log_softmax(logits[t], -1)[ids[t + 1]] for t in scored]).mean()
        loss = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_packed_and_unpacked_batches_give_the_same_sft_loss(world, enc, model):
    records = conversations(world)
    packed = sft_batch(enc, records, 512)
    assert packed["tokens"].shape[0] < len(records)  # several conversations share a row
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            alone = sft_batch(enc, [record], len(render(enc, record["messages"])[0]))
            n = (alone["targets"] != IGNORE).sum().item()
            total += model.loss(alone["tokens"], alone["targets"], alone["doc_ids"],
                                alone["positions"]).item() * n
            count += n
        loss = model.loss(packed["tokens"], packed["targets"], packed["doc_ids"], packed["positions"]).item()
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_l2_to_init_and_its_gradient_on_hand_worked_numbers():
    params = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    init = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    penalty = common.l2_to_init(params, init, 0.5)
    assert penalty.item() == pytest.approx(0.5 * (1 + 4 + 4))
    penalty.backward()
    assert params[0].grad.tolist() == [1.0, 2.0] and params[1].grad.tolist() == [[2.0]]  # 2λ(θ − θ₀)


def test_best_of_n_trains_on_the_highest_scored_sample_that_ends_its_turn(world, enc, model, monkeypatch):
    """Samples are scripted: of each prompt's 4, samples 0 and 2 end their turn and 1 and 3 are cut at the
    length limit (those are never candidates); every sample of the last prompt is cut: it is left out."""
    prompts = [sft.prompt_of(record) for record in conversations(world, 3)]
    end = enc.encode_single_token(END_OF_TURN)
    sampled = []

    def fake_generate(model, rows, max_new_tokens, *args):   # rows: each prompt 4 times
        for _ in range(0, len(rows), 4):
            prompt = len(sampled)
            ends = lambda j: j % 2 == 0 and prompt < len(prompts) - 1  # noqa: E731
            sampled.append([[5 + prompt, 6 + j] + ([end] if ends(j) else []) for j in range(4)])
        return [ids for samples in sampled[-(len(rows) // 4):] for ids in samples]

    monkeypatch.setattr(sft, "generate_sharded", fake_generate)
    seen = []

    def score_fn(i, completions):
        assert i == len(seen)  # the prompt's index
        scores = torch.rand(len(completions), generator=torch.Generator().manual_seed(len(seen))).tolist()
        seen.append((completions, scores))
        return scores

    sequences, best_scores = sft.best_of_n(model, enc, prompts, 4, score_fn, 12, 1.0, 1.0,
                                           torch.Generator().manual_seed(0), distributed.setup("cpu"),
                                           batch_size=2)
    assert len(sequences) == len(seen) == len(prompts) - 1
    for (ids, mask), (completions, scores), best, samples in zip(sequences, seen, best_scores, sampled):
        assert completions == [samples[0], samples[2]]   # the ended samples only
        winner = max(range(2), key=lambda j: scores[j])
        assert best == scores[winner] == max(scores)
        assert ids[len(ids) - sum(mask):] == completions[winner]  # the loss is on the winner's tokens only


def test_verified_best_of_n_trains_only_on_samples_that_pass_the_verifier(world, enc, parent, tmp_path,
                                                                         monkeypatch, capsys):
    """§3.3.4.2 stage 2: prompts from DATA/rl/CAP.jsonl, samples ranked by the verifier, and a prompt whose
    best sample fails is left out. Scripted samples: every other prompt gets a right answer among its two."""
    records = {tuple(render_prompt(enc, r["messages"])): r
               for r in read_jsonl(world / "rl" / "math.jsonl", "prompt")}
    answered = []

    def fake_generate(model, rows, *args):   # rows: each prompt twice
        completions = []
        for i in range(0, len(rows), 2):
            record = records[tuple(rows[i])]
            right = len(answered) % 2 == 0
            answered.append(right)
            answers = [record["check"]["answer"] + 1, record["check"]["answer"] + (0 if right else 2)]
            completions += [render_completion(enc, record["messages"], f"Answer: {a}")[1] for a in answers]
        return completions

    monkeypatch.setattr(sft, "generate_sharded", fake_generate)
    out = tmp_path / "stage2"
    sft.main(["--data", str(world), "--init", str(parent), "--out", str(out), "--capability", "math",
              "--best-of-n", "2", "--verified", "--best-of-n-prompts", "6", "--steps", "1",
              "--batch-size", "2", "--seq-len", "512", "--no-eval"])
    assert answered == [True, False] * 3
    assert "best-of-2: 3 of 6 prompts with a sample that ends its turn and passes, mean best reward 1.000" \
        in capsys.readouterr().out
    assert (out / "model.pt").is_file()
    with pytest.raises(SystemExit):   # one ranking at a time
        sft.parse_args(["--best-of-n", "2", "--verified", "--reward-model", "rm"])
    # stage 1's mix around the samples: other capabilities' conversations, as a share of them, and pretraining
    others = sft.training_conversations(world, "math", 1.0, seed=0, n_own=12)
    assert len(others) == 12 and all(r["capability"] != "math" for r in others)
    assert len({r["capability"] for r in others}) == len(sft.CAPABILITIES) - 1
    assert sft.parse_args(["--capability", "code", "--best-of-n", "2", "--verified"]).pretrain_mix == 0.25


def test_each_record_once_per_epoch_ranks_disjoint_and_pretrain_steps_evenly_spaced():
    epoch = [i for step in range(5) for i in record_indices(20, step, 4, seed=1)]
    assert sorted(epoch) == list(range(20))
    ranks = [set(record_indices(20, 0, 4, 1, rank, 2)) for rank in range(2)]
    assert not ranks[0] & ranks[1]
    assert [s for s in range(12) if sft.is_pretrain_step(s, 0.25)] == [3, 7, 11]


def test_default_cross_domain_share_and_best_of_n_epochs():
    assert sft.parse_args(["--capability", "code"]).cross_domain == 1.0
    instruct = sft.parse_args(["--capability", "instruct"])   # §3.4.3.2: tool use and long context
    assert instruct.cross_domain == 0.5 and instruct.cross_domain_from == ("rag", "math", "longctx")
    polishing = sft.parse_args(["--best-of-n", "4", "--reward-model", "rm", "--cross-domain", "1"])
    assert polishing.cross_domain_from is None   # best-of-N prompts from every capability
    assert sft.parse_args(["--capability", "longctx"]).cross_domain == 0.0   # needles only (RECIPES says why)
    assert sft.parse_args(["--capability", "math"]).cross_domain == 0.25   # a quarter: mergeable (RECIPES)
    assert sft.parse_args(["--capability", "math", "--cross-domain", "0.5"]).cross_domain == 0.5
    best_of_n = sft.parse_args(["--best-of-n", "4", "--reward-model", "rm", "--best-of-n-prompts", "100"])
    assert best_of_n.steps == 7 and best_of_n.temperature == 0.7  # ceil(2 epochs x 100 prompts / batch 32)
    assert sft.parse_args(["--best-of-n", "4", "--reward-model", "rm", "--steps", "3"]).steps == 3
    after_merge = sft.parse_args(["--capability", "all"])   # polishing trains a merge: its LR
    assert (best_of_n.lr, best_of_n.min_lr) == (after_merge.lr, after_merge.min_lr)
    code = sft.parse_args(["--capability", "code"])   # code's stage 2 fine-tunes at stage 1's
    verified = sft.parse_args(["--capability", "code", "--best-of-n", "4", "--verified"])
    assert (verified.lr, verified.min_lr) == (code.lr, code.min_lr)


def test_expert_recipes_before_lr_scaling_are_appendix_b():
    appendix_b = {  # capability: (peak LR, final LR of the cosine, weight decay)
        "multilingual": (2.5e-5, 1.25e-5, 0.1),  # B.2.1
        "code": (5e-5, 5e-6, 0.1),  # B.3.1, stage 1
        "math": (2.5e-5, 2.5e-6, 0.01),  # B.4, reasoning
        "longctx": (2.5e-5, 2.5e-6, 0.01),  # B.5
        "safety": (1e-4, 1e-5, 1e-3),  # B.6.1
    }
    for capability, (lr, min_lr, weight_decay) in appendix_b.items():
        recipe, scale = sft.RECIPES[capability], common.SFT_LR_SCALE
        assert (recipe["lr"], recipe["min_lr"], recipe["weight_decay"]) == (lr, min_lr, weight_decay)
        args = sft.parse_args(["--capability", capability])
        assert (args.lr, args.min_lr) == pytest.approx((lr * scale, min_lr * scale))
        assert args.grad_clip == 1.0  # B.3.1, B.4, B.5, B.6.1
    optimizer = common.make_optimizer(Transformer(Config(n_layers=1)), lr=1.0, weight_decay=0.1)
    assert optimizer.defaults["betas"] == (0.9, 0.95)  # β1, β2 of every recipe in B.2-B.6


def test_every_sft_run_but_best_of_n_mixes_pretraining_batches():
    for capability in sft.CAPABILITIES + ("all",):
        assert sft.parse_args(["--capability", capability]).pretrain_mix == sft.PRETRAIN_MIX == 0.25
    assert sft.parse_args(["--best-of-n", "4", "--reward-model", "rm"]).pretrain_mix == 0.0
    assert sft.parse_args(["--pretrain-mix", "0"]).pretrain_mix == 0.0


def test_the_low_lr_sft_after_a_merge_trains_on_every_capability_at_a_tenth_of_the_lr(world):
    """§4.9.2: a few SFT steps on a merged checkpoint at an LR "roughly 10-20x lower" than the main SFT's."""
    after_merge = sft.parse_args(["--capability", "all"])
    assert (after_merge.init, after_merge.out) == ("runs/tiny/sft-merge", "runs/tiny/sft-soup")
    assert after_merge.cross_domain == 0.0
    main_sft = sft.parse_args(["--capability", "rag"])
    assert after_merge.lr == pytest.approx(main_sft.lr / 10) and after_merge.steps < main_sft.steps
    records = sft.training_conversations(world, "all", 0.0, seed=0)
    sizes = {cap: len(read_jsonl(world / "sft" / f"{cap}.jsonl", "sft")) for cap in sft.CAPABILITIES}
    assert len(records) == sum(sizes.values())
    assert {cap: sum(r["capability"] == cap for r in records) for cap in sft.CAPABILITIES} == sizes


def test_the_instruct_model_trains_every_chat_token_the_experts_use(world, enc):
    """§3.4.3.2: the experts' common init must have trained the special tokens they use (tool calls, thinking,
    tool results), or merging averages a trained embedding with an untrained one. The instruct SFT's
    conversations, with the recipe's share of the other capabilities, hold every such token."""
    specials = {enc.encode_single_token(name) for name in SPECIAL_TOKENS}
    used = lambda records: {t for r in records for t in render(enc, r["messages"])[0] if t in specials}
    args = sft.parse_args(["--capability", "instruct"])
    instruct = used(sft.training_conversations(world, "instruct", args.cross_domain, 0,
                                               args.cross_domain_from))
    experts = used(r for cap in sft.CAPABILITIES for r in read_jsonl(world / "sft" / f"{cap}.jsonl", "sft"))
    assert enc.encode_single_token("<|START_ACTION|>") in experts and experts <= instruct
    assert not experts <= used(sft.training_conversations(world, "instruct", 0.0, seed=0))


def test_experts_get_a_small_share_of_the_other_capabilities(world):
    records = sft.training_conversations(world, "code", 0.1, seed=0)
    own = len(read_jsonl(world / "sft" / "code.jsonl", "sft"))
    others = [r["capability"] for r in records[own:]]
    assert len(others) == 6 * round(0.1 * own / 6) and len(set(others)) == 6 and "code" not in others


def run(world, parent, out, *flags):
    sft.main(["--data", str(world), "--init", str(parent), "--out", str(out), "--batch-size", "4",
              "--seq-len", "256", "--warmup", "1", "--log-every", "1", "--save-every", "2", *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_sft_after_a_merge_evaluates_every_capability(world, parent, tmp_path):
    metrics = run(world, parent, tmp_path / "all", "--capability", "all", "--steps", "1")[-1]
    assert {f"eval_{capability}_format" for capability in sft.CAPABILITIES} <= set(metrics)
    assert "eval_math_accuracy" in metrics and "eval_code_pass@1" in metrics


def test_sft_runs_resumes_exactly_and_evaluates(world, parent, tmp_path, capsys):
    flags = ["--capability", "math", "--l2-init", "0.01", "--pretrain-mix", "0.25"]
    straight = run(world, parent, tmp_path / "a", "--steps", "4", *flags)
    run(world, parent, tmp_path / "b", "--steps", "2", *flags)
    (tmp_path / "b" / "model.pt").unlink()
    resumed = run(world, parent, tmp_path / "b", "--steps", "4", *flags)
    assert ([m["loss"] for m in straight if "loss" in m]
            == pytest.approx([m["loss"] for m in resumed if "loss" in m]))
    assert [m["pretrain"] for m in straight if "loss" in m] == [False, False, False, True]
    l2 = [m["l2"] for m in straight if "loss" in m]
    assert l2[0] == 0 and all(value > 0 for value in l2[1:])  # θ = θ₀ until the first update
    assert 0 <= straight[-1]["eval_format"] <= 1 and "eval_accuracy" in straight[-1]
    assert "eval math: accuracy" in capsys.readouterr().out
    info = json.loads((tmp_path / "a" / "config.json").read_text())
    assert info["stage"] == "sft" and info["parent"] == str(parent)
    common.load_model(tmp_path / "a")  # the next stage's --init


def test_mismatched_tokenizer_is_refused_naming_both(world, parent, tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    (other / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    save_tokenizer(other / "tokenizer.json", train_bpe(["a b c d e f"] * 3, vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary"):
        sft.main(["--data", str(other), "--init", str(parent), "--out", str(tmp_path / "out")])
