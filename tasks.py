"""The data of every stage, written to files: pretraining text and each capability's SFT, preference, RL and
held-out eval records (report §3.3), from capabilities.py's world and examples.

    python tasks.py --out data/tiny --seed 0     # [--scale 4]: a bigger world and sets; [--base-context 256]

The same seed and scale give byte-identical files under --out (record kinds: records.read_jsonl):

    world.json          entities, facts (train / eval), language templates, safety policy, tools, code tasks
    corpus.jsonl        {"text"}: encyclopedia pages and FAQs in 3 languages, parallel text, arithmetic,
                        word problems with their calculator expressions, Python functions followed by their
                        execution output, the safety policy
    corpus_long.jsonl   {"text"}: depot logs and needle documents of 1-8x the base context
                        (long-context cooldown)
    val.jsonl           {"text"}: held-out pretraining text (perplexity)
    sft/{cap}.jsonl     {"messages", "capability"}
    pref/{cap}.jsonl    {"messages", "chosen", "rejected", "label", "capability"}; label = P(chosen is better)
    pref/style.jsonl    the style preference: one answer, concise (chosen) or wrapped in filler (rejected)
    pref/rm_stage{1,2}.jsonl  reward-model stages (§3.2.3): many pairs with noisy labels,
                        then fewer clean ones
    rl/{cap}.jsonl      {"messages", "task", "check", "capability"}: prompts for online RL
    eval/{cap}.jsonl    the same on held-out entities and code tasks; eval/rm_pairs.jsonl: held-out pairs;
                        rl/chat.jsonl, eval/chat.jsonl: plain questions (the win rates', polishing's);
                        eval/copy.jsonl: {"text", "answer", "name"}, pretraining's copy probes
    copg/code.jsonl     {"messages", "completions", "rewards"}: offline CoPG groups scored by the code reward
    copg/rag.jsonl      the same for RAG, scored by the gold judge (verifiers.gold_reward)
    manifest.json       seed, scale, base context, records and bytes of every file

with cap in CAPABILITIES. An RL or eval record's "task" names its verifier and "check" holds what the verifier
compares with: instructions {"instructions": [{"kind", ...}], "answer"}, rag {"answer", "doc"}, tool_call
{"tool_name", "parameters"}, multilingual {"reference", "language"}, math {"answer"}, niah {"expected",
"length", "kind"}, safety {"should_refuse", "mode"}, code {"tests"}, chat {"answer", "kind"}. Real data in
these formats plugs into every stage; a new kind of task needs one verifier and one branch in verifiers.grade.
"""
import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from capabilities import (CHARS_PER_TOKEN, HABIT_KINDS, HABIT_SHARE, NEEDLE_KINDS, NEEDLE_LENGTHS, chatbot,
                          code_task, habit_reply, make_chat, make_code, make_instruct, make_longctx,
                          make_math, make_multilingual, make_rag, make_safety, make_world, run_trusted)
from verifiers import FILLER_OPEN, OPERATORS, code_reward, gold_reward
from world import LANGUAGES, POLICY, ask, say

CAPABILITIES = ("instruct", "rag", "multilingual", "code", "math", "longctx", "safety")
SFT_NEEDLE_LENGTHS = (1, 1, 1, 2)   # long-context SFT interleaves two lengths 3:1 (report B.5)
# Records per file at --scale 1, sized for the tiny pipeline (~1-7M parameters, a few million tokens in all).
SFT_SIZES = {"instruct": 1500, "rag": 1200, "multilingual": 1200, "code": 800, "math": 1000, "longctx": 3000,
             "safety": 800}
PREF_SIZE, RL_SIZE, EVAL_SIZE, STYLE_SIZE = 400, 200, 48, 600
RM_STAGE1_SIZE, RM_STAGE2_SIZE, RM_EVAL_SIZE, COPG_GROUPS, LONG_DOCS = 3000, 600, 96, 32, 150
COPY_PROBES = 16          # held-out records per kind of pretraining's copy probes

# ---------------------------------------------------------------------------------------------------------
# Pretraining text

def encyclopedia(world, rng, entity: str, lang: str) -> str:
    facts = [f for split in ("train", "eval") for f in world["facts"][split] if entity in (f[1], f[2])]
    sentences = [say(f, rng=rng) if lang == "en" else say(f, lang) for f in facts]
    rng.shuffle(sentences)
    return f"{entity}\n" + " ".join(sentences)


def corpus(world, rng, size: float) -> list[dict]:
    """Pretraining documents about the whole world (held-out entities included) and the training code
    tasks."""
    count = lambda base: max(1, round(base * size))
    all_facts = world["facts"]["train"] + world["facts"]["eval"]
    names = [e["name"] for group in ("cities", "companies", "people", "products") for e in world[group]]
    docs = [encyclopedia(world, rng, rng.choice(names), "en") for _ in range(count(8 * len(names)))]
    docs += [encyclopedia(world, rng, rng.choice(names), rng.choice(("vel", "dun")))
             for _ in range(count(4 * len(names)))]
    for _ in range(count(400)):
        lang = rng.choice(list(LANGUAGES))
        docs.append("\n".join(f"Q: {ask(f, lang)}\nA: {say(f, lang)}" for f in rng.sample(all_facts, 6)))
    docs += ["\n".join(" | ".join(f"{LANGUAGES[lang]}: {say(f, lang)}" for lang in LANGUAGES)
                       for f in rng.sample(all_facts, 5)) for _ in range(count(400))]
    for _ in range(count(300)):
        sums = [(rng.randint(2, 999), rng.choice("+-*"), rng.randint(2, 99)) for _ in range(10)]
        docs.append("\n".join(f"{a} {op} {b} = {OPERATORS[op](a, b)}" for a, op, b in sums))
    for _ in range(count(800)):
        problem = make_math(world, rng, "train")
        docs.append(f"Problem: {problem['messages'][-1]['content']}\nSolution: {problem['expression']} = "
                    f"{problem['check']['answer']}\nAnswer: {problem['check']['answer']}")
    # execution-enriched code (§3.3.4.1): a function, calls, and what they printed
    for _ in range(count(800)):
        name, _, spec, source, _, calls = code_task(rng, *rng.choice(world["code_tasks"]["train"]), 3)
        program = f"# {name} {spec}.\n{source}\n" + "".join(f"print({call})\n" for call in calls)
        docs.append(program + "# Output:\n"
                    + "".join(f"# {line}\n" for line in run_trusted(program).splitlines()))
    docs += [POLICY] * count(20)
    rng.shuffle(docs)
    return [{"text": doc} for doc in docs]


def copy_probes(world, rng, base_context: int, count: int) -> list[dict]:
    """The copy probes that pretrain.py logs, on held-out entities, written as the pretraining text writes
    them and cut where the model must copy from its context: `count` math problems ("math": the calculator
    expression, its numbers all stated in the problem; of those that start with a number, as "(" would merge
    with the space before it) and `count` single-needle documents at each needle length ("needle@Nx": a
    3-digit pass code stated once, N x base_context tokens of haystack before the question). Copying is the
    skill the math, multilingual and long-context tasks build on. {"text", "answer", "name"}"""
    probes = []
    while len(probes) < count:
        problem = make_math(world, rng, "eval")
        if not problem["expression"][0].isdigit():   # "(" would merge with the space before it
            continue
        probes.append({"text": f"Problem: {problem['messages'][-1]['content']}\nSolution: ",
                       "answer": problem["expression"], "name": "math"})
    for length in NEEDLE_LENGTHS:
        for _ in range(count):
            task = make_longctx(world, rng, "eval", base_context, length, "single")
            probes.append({"text": f"{task['messages'][0]['content']}\nAnswer: ",
                           "answer": task["reply"]["content"], "name": f"needle@{length}x"})
    return probes


def long_document(world, rng, base_context: int) -> str:
    """A depot log, or a needle task written out with its answer, of 1-8x the base context."""
    if rng.random() < 0.5:
        task = make_longctx(world, rng, "train", base_context)
        return f"{task['messages'][0]['content']}\nAnswer: {task['reply']['content']}"
    lines = [f"Log of the depot in {rng.choice(world['cities'])['name']}."]
    n_chars = rng.choice(NEEDLE_LENGTHS) * base_context * CHARS_PER_TOKEN
    while sum(map(len, lines)) < n_chars:
        company, product, city = (rng.choice(world[g])["name"] for g in ("companies", "products", "cities"))
        lines.append(f"Day {len(lines)}: {company} sent {rng.randint(2, 400)} of the {product} to {city}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing it all

def sft_record(e, cap):
    """The conversation to the end: a tool call's reply goes on with the tool's result and the answer."""
    return {"messages": e["messages"] + [e["reply"]] + e.get("then", []), "capability": cap}


def pref_record(e, cap):
    chosen = e["reply"] if e["reply"].get("tool_calls") else e["reply"]["content"]
    return {"messages": e["messages"], "chosen": chosen, "rejected": e["rejected"], "label": e["label"],
            "capability": cap}


def task_record(e, cap):
    return {"messages": e["messages"], "task": e["task"], "check": e["check"], "capability": cap}


def reward_model_pairs(world, rng, makers, split, count, noisy):
    """Pairs from every maker; noisy (stage 1): labels shrunk toward 0.5 and 15% of pairs the wrong way
    round."""
    records = []
    for _ in range(count):
        cap = rng.choice(sorted(makers))
        record = pref_record(makers[cap](world, rng, split), cap)
        if noisy and rng.random() < 0.15:
            record.update(chosen=record["rejected"], rejected=record["chosen"],
                          label=round(rng.uniform(0.5, 0.7), 2))
        elif noisy:
            record["label"] = round(max(0.5, record["label"] - rng.uniform(0.0, 0.3)), 2)
        records.append(record)
    return records


def copg_groups(world, rng, count):
    """Offline CoPG groups for code (§3.3.4.2): the reference, its bug, an answer without code and a wordier
    reference, each scored by code_reward in the sandbox."""
    examples = [make_code(world, rng, "train") for _ in range(count)]
    groups = [[e["reply"]["content"], e["rejected"], "Write it with one return statement.",
               "Here is the function.\n" + e["reply"]["content"]] for e in examples]
    jobs = [(completion, e["check"]["tests"]) for e, group in zip(examples, groups) for completion in group]
    with ThreadPoolExecutor(4) as pool:
        rewards = list(pool.map(lambda job: code_reward(*job), jobs))
    return [{"messages": e["messages"], "completions": group, "rewards": rewards[4 * i:4 * i + 4],
             "capability": "code"} for i, (e, group) in enumerate(zip(examples, groups))]


def rag_groups(world, rng, count):
    """Offline CoPG groups for RAG (§3.3.2.2: preference judgments on several completions): the reference, its
    wrong call, document or citation, the reference after filler (for a tool call: the intent without the
    call) and a non-answer, each scored by the gold judge, the stand-in for the report's annotators."""
    groups = []
    for _ in range(count):
        e = make_rag(world, rng, "train")
        best = e["reply"] if e["reply"].get("tool_calls") else e["reply"]["content"]
        third = (chatbot(e["reply"]["thinking"]) if isinstance(best, dict)
                 else f"{rng.choice(FILLER_OPEN)} {best}")
        completions = [best, e["rejected"], third, "I don't know."]
        groups.append({"messages": e["messages"], "completions": completions, "capability": "rag",
                       "rewards": [gold_reward({"task": e["task"], "check": e["check"]}, c)
                                   for c in completions]})
    return groups


def build(out, seed: int = 0, scale: float = 1.0, base_context: int = 256) -> dict:
    """Write the world and every dataset under out; return the manifest."""
    out, world = Path(out), make_world(seed, scale)
    count = lambda base: max(1, round(base * scale))
    stream = lambda name: random.Random(f"{seed}:{name}")   # one stream per file: no file depends on another
    makers = {"instruct": make_instruct, "rag": make_rag, "multilingual": make_multilingual,
              "code": make_code, "math": make_math,
              "longctx": lambda w, r, s: make_longctx(w, r, s, base_context), "safety": make_safety}
    files = {"corpus.jsonl": corpus(world, stream("corpus"), scale),
             "val.jsonl": corpus(world, stream("val"), scale / 20),
             "corpus_long.jsonl": [{"text": long_document(world, stream(f"long{i}"), base_context)}
                                   for i in range(count(LONG_DOCS))]}
    for cap, make in makers.items():
        rng = stream(f"sft/{cap}")
        if cap == "longctx":   # two lengths interleaved 3:1 (B.5); longer needles are found zero-shot
            sft = [make_longctx(world, rng, "train", base_context, rng.choice(SFT_NEEDLE_LENGTHS))
                   for _ in range(count(SFT_SIZES[cap]))]
        else:
            sft = [make(world, rng, "train") for _ in range(count(SFT_SIZES[cap]))]
        if cap == "instruct":   # as many plain questions, those about companies mostly in the filler habit
            for e in [make_chat(world, rng, "train") for _ in sft]:
                habit = e["check"]["kind"] in HABIT_KINDS and rng.random() < HABIT_SHARE
                sft.append({**e, "reply": chatbot(habit_reply(e))} if habit else e)
            rng.shuffle(sft)
        files[f"sft/{cap}.jsonl"] = [sft_record(e, cap) for e in sft]
        rng = stream(f"pref/{cap}")
        files[f"pref/{cap}.jsonl"] = [pref_record(make(world, rng, "train"), cap)
                                      for _ in range(count(PREF_SIZE))]
        rng = stream(f"rl/{cap}")
        files[f"rl/{cap}.jsonl"] = [task_record(make(world, rng, "train"), cap)
                                    for _ in range(count(RL_SIZE))]
        rng = stream(f"eval/{cap}")
        if cap == "longctx":   # every needle kind at every length, for the accuracy-by-length table
            per_cell = max(1, count(EVAL_SIZE) // (len(NEEDLE_LENGTHS) * len(NEEDLE_KINDS)))
            held_out = [make_longctx(world, rng, "eval", base_context, length, kind)
                        for length in NEEDLE_LENGTHS for kind in NEEDLE_KINDS for _ in range(per_cell)]
        else:
            held_out = [make(world, rng, "eval") for _ in range(count(EVAL_SIZE))]
        files[f"eval/{cap}.jsonl"] = [task_record(e, cap) for e in held_out]
    for split, entities, size in (("rl", "train", RL_SIZE), ("eval", "eval", EVAL_SIZE)):   # plain questions
        rng = stream(f"{split}/chat")
        kinds = sorted({fact[0] for fact in world["facts"][entities]})   # every kind of fact in turn
        files[f"{split}/chat.jsonl"] = [task_record(make_chat(world, rng, entities, kinds[i % len(kinds)]),
                                                    "chat") for i in range(count(size))]
    rng = stream("pref/style")
    files["pref/style.jsonl"] = [pref_record(make_chat(world, rng, "train"), "style")
                                 for _ in range(count(STYLE_SIZE))]
    rm_makers = {**makers, "style": make_chat}
    del rm_makers["longctx"]   # its prompts are too long to pack several pairs in a reward-model row
    for name, split, size, noisy in (("pref/rm_stage1", "train", RM_STAGE1_SIZE, True),
                                     ("pref/rm_stage2", "train", RM_STAGE2_SIZE, False),
                                     ("eval/rm_pairs", "eval", RM_EVAL_SIZE, False)):
        files[f"{name}.jsonl"] = reward_model_pairs(world, stream(name), rm_makers, split, count(size), noisy)
    files["copg/code.jsonl"] = copg_groups(world, stream("copg"), count(COPG_GROUPS))
    files["copg/rag.jsonl"] = rag_groups(world, stream("copg/rag"), count(RL_SIZE))
    files["eval/copy.jsonl"] = copy_probes(world, stream("eval/copy"), base_context, count(COPY_PROBES))
    manifest = {"seed": seed, "scale": scale, "base_context": base_context,
                "chars_per_token": CHARS_PER_TOKEN, "files": {}}
    for name, records in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records),
                        "utf-8")
        manifest["files"][name] = {"records": len(records), "bytes": path.stat().st_size}
    (out / "world.json").write_text(json.dumps(world, sort_keys=True, ensure_ascii=False, indent=1) + "\n",
                                    "utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n", "utf-8")
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/tiny", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the world and every set")
    parser.add_argument("--base-context", type=int, default=256, help="tokens of a 1x needle prompt")
    args = parser.parse_args()
    start = time.time()
    manifest = build(args.out, args.seed, args.scale, args.base_context)
    for name, info in manifest["files"].items():
        print(f"{name:24s} {info['records']:6d} records {info['bytes'] / 1e6:7.2f} MB")
    total = sum(info["bytes"] for info in manifest["files"].values())
    print(f"wrote {len(manifest['files']) + 2} files ({total / 1e6:.1f} MB) to {args.out} "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
