"""evaluate.py: the capability suite end to end on a small world, bits per byte against an independent count,
and the pipeline table."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import judges
import tasks
from evaluate import token_bytes
from data import BOS, load_tokenizer, open_shard, save_tokenizer, train_bpe, write_shard
from records import read_jsonl
from model import Config, Transformer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world with its tokenizer and val shard, and a random tiny model saved as a stage."""
    folder = tmp_path_factory.mktemp("world")
    tasks.build(folder, seed=0, scale=0.1)
    texts = [r["text"] for r in read_jsonl(folder / "corpus.jsonl", "text")]
    save_tokenizer(folder / "tokenizer.json", train_bpe(texts, vocab_size=600))
    enc = load_tokenizer(str(folder / "tokenizer.json"))
    write_shard(enc, [r["text"] for r in read_jsonl(folder / "val.jsonl", "text")], folder / "val.bin")
    config = Config(vocab_size=enc.n_vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                    window=64)
    model_dir = folder / "model"
    model_dir.mkdir()
    torch.manual_seed(0)
    torch.save(Transformer(config).state_dict(), model_dir / "model.pt")
    (model_dir / "config.json").write_text(json.dumps({"stage": "test", "model": config.__dict__,
                                                       "tokenizer": str(folder / "tokenizer.json")}))
    return folder, enc, config


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_per_byte(world):
    folder, enc, config = world
    model = Transformer(config)
    torch.nn.init.zeros_(model.embed.weight)  # every logit 0: each target costs ln(vocab) nats
    seq_len = 64
    val = np.asarray(open_shard(folder / "val.bin", enc))
    bytes_of, bos = token_bytes(enc), enc.encode_single_token(BOS)
    n_tokens = n_bytes = 0
    for window in range((len(val) - 1) // seq_len):  # every target of every full window, BOS excluded
        for token in val[window * seq_len + 1:(window + 1) * seq_len + 1]:
            if token != bos:
                n_tokens += 1
                n_bytes += bytes_of[token].item()
    expected = math.log2(config.vocab_size) * n_tokens / n_bytes
    assert evaluate.bits_per_byte(model, enc, folder, seq_len) == pytest.approx(expected, rel=1e-5)


def test_suite_writes_json_and_markdown_and_the_report_table(world, tmp_path):
    folder, _, _ = world
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(folder / "model"), "--data", str(folder),
                   "--capabilities", "math", "safety", "--limit", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["capabilities"]) == {"math", "safety"}
    for metrics in result["capabilities"].values():
        assert 0.0 <= metrics["format"] <= 1.0 and metrics["tokens_per_s"] > 0
    assert 0.0 <= result["capabilities"]["math"]["accuracy"] <= 1.0 and result["bpb"] > 0
    assert result["filler"] == result["chat"]["filler"] and 0.0 <= result["chat"]["correct"] <= 1.0
    assert ("| checkpoint | math (accuracy) | safety (reward) | format | filler | bpb |"
            in out.with_suffix(".md").read_text())
    second = tmp_path / "second.json"
    second.write_text(json.dumps(result | {"model": "other"}))
    report = tmp_path / "report.md"
    evaluate.main(["--report", str(out), str(second), "--out", str(report)])
    rows = report.read_text().splitlines()
    assert len(rows) == 4 and rows[3].startswith("| other |")


def test_data_without_plain_questions_is_evaluated_on_its_capabilities_alone(world, tmp_path):
    folder, _, _ = world
    data = tmp_path / "data"
    shutil.copytree(folder, data, ignore=lambda directory, names: ["chat.jsonl"] if directory.endswith("eval")
                    else [])
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(folder / "model"), "--data", str(data), "--capabilities", "safety",
                   "--limit", "2", "--reference", str(folder / "model"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert "chat" not in result and "filler" not in result and result["gold_win_rate"] == 0.5


def test_evaluate_capability_grades_each_reply_with_the_tasks_verifier(world, monkeypatch):
    folder, enc, config = world
    records = read_jsonl(folder / "eval" / "math.jsonl", "prompt")[:4]
    replies = [{"thinking": None, "action": None, "response": f"Answer: {r['check']['answer']}",
                "ended": True} for r in records[:2]] + [{"thinking": None, "action": None,
                                                         "response": "Answer: -1", "ended": False}
                                                        for _ in records[2:]]
    monkeypatch.setattr(evaluate, "generate_replies", lambda *args, **kwargs: (replies, 100.0))
    kept = []
    metrics = evaluate.evaluate_capability(None, enc, folder, "math", limit=4, replies=kept)
    assert kept == replies
    assert metrics["accuracy"] == 0.5 and metrics["format"] == 0.5 and metrics["tokens_per_s"] == 100.0


def test_math_replies_that_call_the_calculator_get_its_result_and_go_on(world, monkeypatch):
    """The calculator runs between two generations: the second prompt holds the call and the tool's result,
    and the graded reply is the call followed by what the model wrote after it."""
    folder, enc, _ = world
    records = read_jsonl(folder / "eval" / "math.jsonl", "prompt")[:3]
    answers = [r["check"]["answer"] for r in records]
    expressions = [f"{answers[0]} * 1", f"{answers[1]} + 1", None]   # right, wrong, no call at all
    seen = []

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        outputs = []
        for ids in prompts:
            text = enc.decode(ids)
            seen.append(text)
            if "<|START_TOOL_RESULT|>" in text:   # copy the tool's result into the answer line
                result = text.split("<|START_TOOL_RESULT|>[doc 0] ")[-1].split("<")[0]
                message = {"role": "chatbot", "content": f"Answer: {result}"}
            else:
                i = next(i for i, r in enumerate(records) if r["messages"][-1]["content"] in text)
                message = ({"role": "chatbot", "content": "", "tool_calls": [
                    {"tool_name": "calculator", "parameters": {"expression": expressions[i]}}]}
                    if expressions[i] else {"role": "chatbot", "content": "Answer: 0"})
            outputs.append(evaluate.render_completion(enc, [], message)[1])
        return outputs

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)
    replies, _ = evaluate.generate_replies(model, enc, records, 16)
    assert len(seen) == 5   # three first turns, then two turns after a tool result
    results = sorted(text.split("[doc 0] ")[-1].split("<")[0] for text in seen[3:])
    assert results == sorted([str(answers[0]), str(answers[1] + 1)])   # each call's own result
    assert replies[0]["response"] == f"Answer: {answers[0]}" and "calculator" in replies[0]["action"]
    metrics = evaluate.grade_replies(records, replies)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["used_calculator"] == pytest.approx(2 / 3)


def test_length_batches_cover_every_prompt_once_within_both_bounds():
    lengths = [5, 300, 40, 41, 7, 300, 2000, 90, 6, 12]
    batches = evaluate.length_batches(lengths, batch_size=3, max_tokens=700)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 3 and (len(batch) * longest <= 700 or len(batch) == 1)
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    assert [lengths[i] for i in batches[0]] == [5, 6, 7]   # the shortest together, then the next
    assert [[lengths[i] for i in batch] for batch in batches[2:]] == [[90, 300], [300], [2000]]


def test_generate_replies_batches_by_length_and_answers_in_the_records_order(world, monkeypatch):
    """Each reply is the one to its own prompt, whatever batch its prompt went to; a batch holds prompts of
    neighbouring lengths."""
    folder, enc, _ = world
    records = [{"messages": [{"role": "user", "content": "word " * n}]} for n in (9, 1, 30, 2, 8, 31)]
    batches = []

    def fake_generate(model, prompts, max_new_tokens, **kwargs):   # replies with its prompt's length
        batches.append(sorted(len(ids) for ids in prompts))
        return [evaluate.render_completion(enc, [], {"role": "chatbot", "content": str(len(ids))})[1]
                for ids in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    replies, _ = evaluate.generate_replies(torch.nn.Linear(1, 1), enc, records, 16, batch_size=2)
    lengths = [len(evaluate.render_prompt(enc, r["messages"])) for r in records]
    assert [reply["response"] for reply in replies] == [str(n) for n in lengths]
    assert batches == [sorted(lengths)[i:i + 2] for i in (0, 2, 4)]


def test_several_models_in_one_process_give_what_each_gives_alone(world, tmp_path):
    """One process shares the reward model's accuracy and the reference's replies; the win rates reuse the
    capability evaluation's replies. None of that may change a figure."""
    folder, _, config = world
    reward = tmp_path / "reward"
    reward.mkdir()
    for name in ("model.pt", "config.json"):
        (reward / name).write_bytes((folder / "model" / name).read_bytes())
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(config.dim, 1, bias=False).state_dict(), reward / "head.pt")
    models = []
    for seed in (2, 3):
        models.append(tmp_path / f"m{seed}")
        models[-1].mkdir()
        torch.manual_seed(seed)
        torch.save(Transformer(config).state_dict(), models[-1] / "model.pt")
        (models[-1] / "config.json").write_bytes((folder / "model" / "config.json").read_bytes())
    flags = ["--data", str(folder), "--capabilities", "instruct", "safety", "--limit", "4",
             "--reward-model", str(reward), "--reference", str(folder / "model")]
    alone = []
    for model in models:
        evaluate.main(["--model", str(model), *flags])
        alone.append(json.loads((model / "eval.json").read_text()))
    evaluate.main(["--model", *map(str, models), *flags])
    together = [json.loads((model / "eval.json").read_text()) for model in models]
    drop_speed = lambda r: {**r, "tokens_per_s": None, "chat": {**r["chat"], "tokens_per_s": None},
                            "capabilities": {c: {**m, "tokens_per_s": None}
                                             for c, m in r["capabilities"].items()}}
    assert [drop_speed(r) for r in together] == [drop_speed(r) for r in alone]
    assert all({"win_rate", "gold_win_rate", "rm_accuracy"} <= set(r) for r in together)
    # the reference against itself: every reply the same, every prompt a tie
    evaluate.main(["--model", str(folder / "model"), *flags])
    itself = json.loads((folder / "model" / "eval.json").read_text())
    assert itself["win_rate"] == itself["gold_win_rate"] == 0.5


def test_instruction_following_is_ifevals_mean_of_prompt_and_pooled_instruction_level():
    """B.7: prompt-level accuracy, instruction-level accuracy over all instructions (not the mean of each
    prompt's share), and their mean. Prompt 1: 1 of 2 followed; prompt 2: 1 of 1."""
    upper, short = {"kind": "upper"}, {"kind": "max_words", "n": 2}
    records = [{"task": "instructions", "check": {"instructions": [upper, short]}},
               {"task": "instructions", "check": {"instructions": [upper]}}]
    replies = [{"thinking": None, "action": None, "response": "IT IS IN VARNHOLT.", "ended": True},
               {"thinking": None, "action": None, "response": "VARNHOLT.", "ended": True}]
    metrics = evaluate.grade_replies(records, replies)
    assert metrics["prompt_level"] == 0.5 and metrics["instruction_level"] == pytest.approx(2 / 3)
    assert metrics["reward"] == 0.75   # the RL reward stays each prompt's share
    assert metrics["if_score"] == pytest.approx((0.5 + 2 / 3) / 2) == metrics[evaluate.HEADLINE["instruct"]]


def test_gold_win_rate_counts_wins_and_half_ties_by_the_gold_judge():
    rag = {"task": "rag", "check": {"answer": "42", "doc": 0}}
    safety = {"task": "safety", "check": {"should_refuse": True, "mode": "contextual"}}
    reply = lambda text, ended=True: {"thinking": None, "action": None, "response": text, "ended": ended}
    right, refusal = "It is 42 [doc 0].", "I can't help with that: it is forbidden."
    ours = [reply(right), reply(right), reply(refusal), reply(right)]
    theirs = [reply("It is 41 [doc 0]."), reply("Sure! " + right), reply("Sorry, I can't help with that."),
              reply(right, ended=False)]
    records = [rag, rag, safety, rag]
    assert judges.gold_win_rate(records, ours, theirs) == 1.0
    assert judges.gold_win_rate(records, theirs, ours) == 0.0
    assert judges.gold_win_rate(records[:2], [ours[0], theirs[1]], [ours[0], ours[1]]) == 0.25  # tie, loss


def test_grading_in_parallel_threads_gives_each_record_its_own_grade():
    """grade_replies grades in threads (code runs in sandboxes): every record must still be graded on its
    own reply. Code replies that pass and fail, mixed with math ones whose metrics differ, against a serial
    loop."""
    code = {"task": "code", "check": {"tests": ["assert add_one(1) == 2", "assert add_one(-1) == 0"]}}
    math_record = {"task": "math", "check": {"answer": 7}}
    fences = ["```python\ndef add_one(x):\n    return x + 1\n```",
              "```python\ndef add_one(x):\n    return x\n```"]
    records = [code, math_record, code, math_record, code]
    texts = [fences[0], "Answer: 7", fences[1], "Answer: 8", fences[0]]
    replies = [{"thinking": None, "action": None, "response": text, "ended": True} for text in texts]
    metrics = evaluate.grade_replies(records, replies)
    assert metrics["pass@1"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(1 / 2)
    serial = [evaluate.grade(record, text) for record, text in zip(records, texts)]
    for name in ("pass@1", "has_code", "reward", "accuracy"):
        values = [grades[name] for grades in serial if name in grades]
        assert metrics[name] == pytest.approx(sum(values) / len(values))


# ---------------------------------------------------------------------------------------------------- chat

def scripted_generate(enc, replies: list[dict], prompts: list[str], printed: list[str], out: io.StringIO):
    """A stand-in for model.generate that writes the chatbot messages `replies` in turn, token by token
    through on_token, and records each prompt and what `out` held when the reply was complete."""
    def fake_generate(model, batch, max_new_tokens, temperature, top_p, stop_tokens, generator=None,
                      on_token=None):
        prompts.append(enc.decode(batch[0]))
        ids = evaluate.render_completion(enc, [], replies[len(prompts) - 1])[1]
        for token in ids:
            if on_token is not None:
                on_token(torch.tensor([token]))
        printed.append(out.getvalue())
        return [ids]
    return fake_generate


def test_chat_streams_replies_keeps_the_conversation_and_prints_tool_calls_as_json(world, monkeypatch):
    _, enc, _ = world
    call = {"tool_name": "calculator", "parameters": {"expression": "2 + 3"}}
    replies = [{"role": "chatbot", "content": "Hello thére.", "thinking": "Greet them back."},
               {"role": "chatbot", "content": "", "tool_calls": [call]}]
    prompts, printed, out = [], [], io.StringIO()
    monkeypatch.setattr(evaluate, "generate", scripted_generate(enc, replies, prompts, printed, out))
    messages = evaluate.chat(None, enc, ["Hi\n", "\n", "What is 2 + 3?\n"], out, system="Be brief.")
    assert printed[0] == "chatbot: Hello thére."  # written as it was generated, the é whole, no thinking
    assert out.getvalue() == f"chatbot: Hello thére.\nchatbot: \ntool calls: {json.dumps([call])}\n"
    assert len(prompts) == 2  # the blank line is no turn
    assert prompts[1] == enc.decode(evaluate.render_prompt(enc, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, replies[0],
        {"role": "user", "content": "What is 2 + 3?"}]))
    assert messages[-1] == replies[1]


def test_chat_with_refine_prints_the_last_revision(world, monkeypatch):
    _, enc, _ = world
    replies = [{"role": "chatbot", "content": "A first draft."}, {"role": "chatbot", "content": "Revised."}]
    prompts, printed, out = [], [], io.StringIO()
    monkeypatch.setattr(evaluate, "generate", scripted_generate(enc, replies, prompts, printed, out))
    evaluate.chat(None, enc, ["Hi"], out, refine_rounds=1)
    assert out.getvalue() == "chatbot: Revised.\n"
    assert evaluate.REVISION_REQUEST in prompts[1] and "A first draft." in prompts[1]


def test_chat_piped_on_stdin_answers_every_line_and_exits_0(world):
    folder, _, _ = world
    command = [sys.executable, str(ROOT / "evaluate.py"), "--chat", "--model", str(folder / "model"),
               "--data", str(folder), "--max-new-tokens", "8", "--temperature", "0.7"]
    result = subprocess.run(command, input="Hello!\nWhere is Varnholt?\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("chatbot: ") == 2


def test_a_bad_model_path_is_one_clear_error(world, tmp_path, capsys):
    folder, _, _ = world
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--chat", "--model", str(tmp_path / "missing"), "--data", str(folder)])
    assert exit.value.code == 2  # argparse's usage error: its usage line, then this one line
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(f"error: --model {tmp_path / 'missing'}: no model.pt and config.json there; "
                              f"give a stage's --out folder")
