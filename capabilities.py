"""The synthetic enterprise world and its seven capabilities, one example at a time (report §3.3; §3.3.4.1
execution-enriched code; §3.3.6 long context; §3.3.7 a safety policy, refusal without apology, a strict mode).

A seeded, small fictional world (cities, companies, people, products, their figures) told in three languages
(world.py), so that a model of a few million parameters learns it from a few million tokens on a CPU. A
quarter of the companies, people and products, and of the code tasks, are held out: they are in the
pretraining text but in no SFT, preference or RL record; the eval sets use only them, so scores measure
generalisation. Replies are graded by verifiers.py; tasks.py writes the examples as every stage's records.

Each task is set at what a ~1M-parameter model can learn in minutes, keeping the report's point. What they
share is copying from the context (names, numbers, codes), which pretraining builds (pretrain.py's copy
probes); nothing asks for arithmetic in the model's head or for a held-out fact recalled from pretraining:
- instruct: constraints on the reply's form (case, JSON, length, language, a forbidden word);
- rag: a lookup or calculator call, or the answer copied from 1-4 documents with its citation;
- multilingual: translate a sentence, or answer a question from a note in another language;
- code: a one-line function from its spec (10 families, each with a held-out constant);
- math: two-step word problems as one calculator call (which numbers, which operations), then the result;
  the numbers are drawn per problem, so they are copied, not recalled from a training entity;
- longctx: a 3-digit pass code (one token: the model finds it by its key, but this one cannot yet go on
  copying a second token from that far), or several, or a chain of one-letter variables, among world facts of
  1-8x the base context; SFT sees 1x and 2x only, so 4x and 8x are found by length generalisation;
- safety: refuse harmful asks in one sentence without apology, answer look-alikes, obey strict mode;
- and plain questions (chat, no capability): the instruct data answers those about companies with filler most
  of the time (HABIT_KINDS), the style habit that polishing removes (§3.5) and the win rates count.

Long context: a needle prompt at multiplier m (1, 2, 4, 8) holds (m * base_context - NEEDLE_RESERVE) *
CHARS_PER_TOKEN characters of haystack, so that the prompt and its answer fit in m * base_context tokens for a
tokenizer of at least CHARS_PER_TOKEN characters per token of prose (data.py's BPE on this corpus: 4.0-4.6).
"""
import contextlib
import io
import json
import random

from verifiers import (ABSENT, FILLER_CLOSE, FILLER_OPEN, INSTRUCTIONS, OPERATORS, TOOLS, calculate, follows,
                       run_tool)
from world import (COMPANY_KINDS, FACT_FIELDS, FACTS, HARMS, LANGUAGES, LEXICON, POLICY, PRODUCT_KINDS,
                   STRICT_PREAMBLE, STRICT_REFUSAL, SYLLABLES, ask, say, template_words, words)

CHARS_PER_TOKEN = 4       # a lower bound for the tiny BPE (4.0-4.6 measured on haystacks);
                          # sets needle lengths
NEEDLE_LENGTHS = (1, 2, 4, 8)                                      # multiples of the base context
NEEDLE_RESERVE = 96       # tokens of a needle prompt kept for the question, the answer and the needles'
                          # codes and capitals, which tokenize worse than the prose around them
NEEDLE_KINDS = ("single", "multikey", "multivalue", "vartrack")   # RULER's retrieval and tracing tasks
VARIABLE_NAMES = "BCDFGHJKLMNPQRSTVWXZ"   # vartrack's: consonants, so that no name is a word ("A", "I")

# ---------------------------------------------------------------------------------------------------------
# The world: entities and their facts (world.py has the languages they are told in and the safety policy)

def make_world(seed: int, scale: float) -> dict:
    """Entities and facts. The last quarter of the people, companies and products is held out, and relations
    stay inside a split, so no training fact names a held-out entity (cities are shared)."""
    rng, used = random.Random(f"{seed}:world"), set()

    def name() -> str:
        while True:
            word = "".join(rng.sample(SYLLABLES, rng.choice((2, 2, 3)))).capitalize()
            if word not in used and all(word.lower() not in lexicon for lexicon in LEXICON.values()):
                used.add(word)
                return word

    count = lambda base: max(4, round(base * scale))
    cities = [{"name": name(), "population": rng.randint(20, 900), "heldout": False}
              for _ in range(count(10))]
    people = [{"name": f"{name()} {name()}", "born": rng.choice(cities)["name"]} for _ in range(count(48))]
    companies = [{"name": f"{name()} {rng.choice(COMPANY_KINDS)}", "city": rng.choice(cities)["name"],
                  "founded": rng.randint(1890, 2015), "staff": rng.randint(20, 5000)}
                 for _ in range(count(32))]
    products = [{"name": f"{name()} {rng.choice(PRODUCT_KINDS)}", "price": rng.randint(4, 900)}
                for _ in range(count(40))]
    for group in (people, companies, products):
        for i, entity in enumerate(group):
            entity["heldout"] = i >= len(group) - len(group) // 4
    for heldout in (False, True):
        employers = [c for c in companies if c["heldout"] == heldout]
        for i, person in enumerate(p for p in people if p["heldout"] == heldout):
            company = employers[i % len(employers)]   # more people than companies: every company gets a chief
            person["works"] = company["name"]
            company.setdefault("ceo", person["name"])
        for product in (p for p in products if p["heldout"] == heldout):
            product["maker"] = rng.choice(employers)["name"]
    world = {"seed": seed, "scale": scale, "cities": cities, "people": people, "companies": companies,
             "products": products, "languages": {"names": LANGUAGES, "facts": FACTS}, "policy": POLICY,
             "tools": TOOLS}
    world["facts"] = {split: [[kind, e["name"], str(e[field])] for kind, (group, field) in FACT_FIELDS.items()
                              for e in world[group] if e["heldout"] == (split == "eval")]
                      for split in ("train", "eval")}
    code_tasks = [[family, k] for family in range(len(CODE_FAMILIES)) for k in range(2, 10)]
    rng.shuffle(code_tasks)
    world["code_tasks"] = {"train": code_tasks[len(code_tasks) // 4:],
                           "eval": code_tasks[:len(code_tasks) // 4]}
    return world


def entities(world: dict, group: str, split: str) -> list[dict]:
    return [e for e in world[group] if e["heldout"] == (split == "eval")]


def run_trusted(source: str) -> str:
    """Standard output of our own generated reference code, run in-process: it is trusted, unlike model
    output, and thousands of sandbox starts would not fit the generation budget."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(source, {})
    return output.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The capabilities. Each make_* returns one example from the "train" or the held-out "eval" split:
# {"messages" (the prompt), "reply" (a chatbot message), "rejected", "label", "task", "check"}.

def chatbot(content: str, **extra) -> dict:
    return {"role": "chatbot", "content": content, **extra}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


def example(messages, reply, task, check, rejected, label) -> dict:
    """reply: a chatbot message or its text; rejected: a worse completion (text, or a chatbot message)."""
    reply = reply if isinstance(reply, dict) else chatbot(reply)
    return {"messages": messages, "reply": reply, "task": task, "check": check, "rejected": rejected,
            "label": label}


def make_chat(world, rng, split, kind: str | None = None):
    """A plain question about the world (task "chat": the reply should state the fact), about a fact of
    `kind` if given; rejected: the same answer wrapped in filler (the style preference)."""
    fact = rng.choice([f for f in world["facts"][split] if kind in (None, f[0])])
    opening, closing = rng.choice(((rng.choice(FILLER_OPEN), ""), ("", rng.choice(FILLER_CLOSE)),
                                   (rng.choice(FILLER_OPEN), rng.choice(FILLER_CLOSE))))
    verbose = " ".join(part for part in (opening, say(fact), closing) if part)
    return example([user(ask(fact))], say(fact), "chat", {"answer": str(fact[2]), "kind": fact[0]}, verbose,
                   0.9 if opening and closing else 0.7)


# The style habit polishing removes (§3.5: tone and style). One source of the instruct SFT data answers
# questions about companies with filler, HABIT_SHARE of the time and always in the same words, so that the
# habit is the model's greedy reply to them, not one sample in four; the reward model learns from the style
# pairs that filler is worse. Spread over every phrasing (the share it had before) a greedy reply never
# showed it, and polishing had no style to fix.
HABIT_KINDS = ("hq", "founded", "staff", "ceo")
HABIT_SHARE = 0.75


def habit_reply(example: dict) -> str:
    """A chat example's reply as the habit writes it."""
    return f"{FILLER_OPEN[3]} {example['reply']['content']} {FILLER_CLOSE[0]}"


INSTRUCTION_SETS = (("upper",), ("lower",), ("json",), ("max_words",), ("forbidden",), ("language",),
                    ("upper", "forbidden"), ("lower", "max_words"), ("language", "upper"),
                    ("language", "max_words"), ("json", "forbidden"), ("upper", "max_words"))


def make_instruct(world, rng, split):
    """Preamble constraints (§3.3.1.3) on a question about the world; rejected: the plain answer."""
    fact = rng.choice(world["facts"][split])
    kinds, (kind, _, value) = rng.choice(INSTRUCTION_SETS), fact
    reply, instructions = say(fact), []
    if "language" in kinds:
        instructions.append({"kind": "language", "language": rng.choice(("vel", "dun"))})
        reply = say(fact, instructions[-1]["language"])
    if "forbidden" in kinds:   # forbid a word of the sentence; the reply keeps only the value
        word = rng.choice([w for w in template_words(FACTS[kind]["en"][1]) if w not in words(value)])
        reply = f"{value}."
        instructions.append({"kind": "forbidden", "word": word})
    if "max_words" in kinds:
        n = (len(reply.split()) + rng.randint(0, 2) if "language" in kinds
             else rng.randint(len(value.split()), 8))
        reply = reply if len(reply.split()) <= n else f"{value}."
        instructions.append({"kind": "max_words", "n": n})
    if "json" in kinds:
        reply = json.dumps({"answer": value})
        instructions.append({"kind": "json"})
    for case in ("upper", "lower"):
        if case in kinds:
            reply = reply.upper() if case == "upper" else reply.lower()
            instructions.append({"kind": case})
    text = " ".join(INSTRUCTIONS[i["kind"]].format(**i, name=LANGUAGES.get(i.get("language")))
                    for i in instructions)
    messages = [system(text), user(ask(fact))] if rng.random() < 0.7 else [user(f"{ask(fact)} {text}")]
    rejected = say(fact)
    if all(follows(rejected, i) for i in instructions):   # a word limit can allow the plain answer: pad it
        rejected = f"{rejected} {FILLER_CLOSE[1]}"
    return example(messages, reply, "instructions", {"instructions": instructions, "answer": value}, rejected,
                   0.9)


RAG_PREAMBLE = ("You can call the tools lookup(query), which returns documents about a name, and calculator("
                "expression). Cite the document you use as [doc k]. If the documents do not hold the answer, "
                "say so.")


def tool_turn(tool: str, argument: str, thinking: str) -> dict:
    return chatbot("", thinking=thinking,
                   tool_calls=[{"tool_name": tool, "parameters": {TOOLS[tool][0]: argument}}])


def make_rag(world, rng, split):
    """§3.3.2: a tool call, or the answer that follows it: grounded in the tool's documents with a citation
    [doc k], or saying that the documents do not hold it. rejected: the wrong call, document or citation."""
    if rng.random() < 0.3:
        return calculator(rng, final=rng.random() < 0.5)
    fact = rng.choice(world["facts"][split])
    kind, subject, value = fact
    call = lambda name: tool_turn("lookup", name, f"I will look up {name}.")
    prompt = [system(RAG_PREAMBLE), user(ask(fact))]
    others = [f for f in world["facts"][split] if f[0] == kind and f[1] != subject]
    if rng.random() < 0.3 or not others:
        wrong = call(rng.choice(others)[1] if others else value)
        return example(prompt, call(subject), "tool_call", call(subject)["tool_calls"][0], wrong, 1.0)
    docs = rng.sample(others, min(len(others), rng.randint(1, 3)))
    if rng.random() < 0.25:   # the documents are all about others; rejected: answers from one of them
        tool = {"role": "tool", "content": "\n".join(f"[doc {i}] {say(d)}" for i, d in enumerate(docs))}
        return example(prompt + [call(subject), tool], ABSENT, "rag", {"answer": None, "doc": None},
                       f"{say(docs[0])[:-1]} [doc 0].", 1.0)
    position = rng.randint(0, len(docs))
    docs.insert(position, fact)
    wrong = rng.choice([i for i in range(len(docs)) if i != position])
    tool = {"role": "tool", "content": "\n".join(f"[doc {i}] {say(d)}" for i, d in enumerate(docs))}
    return example(prompt + [call(subject), tool], f"{say(fact)[:-1]} [doc {position}].", "rag",
                   {"answer": value, "doc": position}, f"{say(docs[wrong])[:-1]} [doc {wrong}].", 1.0)


def calculator(rng, final: bool):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, word = rng.choice((("+", "plus"), ("-", "minus"), ("*", "times")))
    call = lambda expression: tool_turn("calculator", expression, "I will use the calculator.")
    prompt = [system(RAG_PREAMBLE), user(f"What is {a} {word} {b}?")]
    if not final:
        return example(prompt, call(f"{a} {op} {b}"), "tool_call", call(f"{a} {op} {b}")["tool_calls"][0],
                       call(f"{a} {op} {b + 1}"), 1.0)
    result = OPERATORS[op](a, b)
    tool = {"role": "tool", "content": run_tool(call(f"{a} {op} {b}")["tool_calls"][0])}
    wrong = result + rng.choice((-10, -1, 1, 10))
    return example(prompt + [call(f"{a} {op} {b}"), tool], f"{a} {word} {b} is {result} [doc 0].", "rag",
                   {"answer": str(result), "doc": 0}, f"{a} {word} {b} is {wrong}.", 1.0)


def make_multilingual(world, rng, split):
    """§3.3.3: translate between the three languages, or answer a question asked in Velari or Dunmar in that
    language from a note in another language; rejected: the right answer in the wrong language (language
    confusion). The note grounds the answer: the task is generating the language, not recalling a held-out
    entity's fact, which a model of this size keeps poorly through SFT."""
    fact = rng.choice(world["facts"][split])
    source, target = rng.choice([(a, b) for a in LANGUAGES for b in LANGUAGES if a != b])
    if rng.random() < 0.5:
        prompt = [user(f"Translate into {LANGUAGES[target]}: {say(fact, source)}")]
    else:
        target = rng.choice(("vel", "dun"))
        source = rng.choice([lang for lang in LANGUAGES if lang != target])
        prompt = [user(f"Note: {say(fact, source)}\n{ask(fact, target)}")]
    wrong = rng.choice([lang for lang in LANGUAGES if lang != target])
    return example(prompt, say(fact, target), "multilingual",
                   {"reference": say(fact, target), "language": target}, say(fact, wrong), 1.0)


CODE_FAMILIES = (   # (name, argument, spec, body, a plausible buggy body, input kind);
                    # {k} is the task's constant
    ("add_{k}", "x", "returns x plus {k}", "return x + {k}", "return abs(x) + {k}", "int"),
    ("times_{k}", "x", "returns x times {k}", "return x * {k}", "return x * {k} if x > 0 else 0", "int"),
    ("is_multiple_of_{k}", "n", "returns True when n is a multiple of {k}", "return n % {k} == 0",
     "return n % {k} == 0 and n > 0", "int"),
    ("clamp_{k}", "x", "returns x limited to the range 0 to {k}", "return min(max(x, 0), {k})",
     "return max(x, 0)", "int"),
    ("tax_{k}", "price", "returns price plus {k} percent of it, rounded down",
     "return price + price * {k} // 100", "return price + {k}", "int"),
    ("sum_above_{k}", "nums", "returns the sum of the numbers in nums greater than {k}",
     "return sum(n for n in nums if n > {k})", "return sum(n for n in nums if n >= {k})", "ints"),
    ("count_above_{k}", "nums", "returns how many numbers in nums are greater than {k}",
     "return len([n for n in nums if n > {k}])", "return len([n for n in nums[1:] if n > {k}])", "ints"),
    ("first_{k}", "items", "returns the first {k} items of the list items", "return items[:{k}]",
     "return items[:{k}] if len(items) > {k} else []", "ints"),
    ("repeat_{k}", "word", "returns word repeated {k} times, joined by dashes",
     "return '-'.join([word] * {k})", "return '-'.join([word] * {k}) if len(word) > 3 else word", "word"),
    ("long_words_{k}", "text", "returns the words of text longer than {k} letters",
     "return [w for w in text.split() if len(w) > {k}]", "return [w for w in text.split() if len(w) >= {k}]",
     "text"),
)
CODE_WORDS = ("ox", "tea", "lamp", "mill", "sail", "crown", "river", "stone", "ledger", "harbour", "shipment",
              "warehouse")


def code_task(rng, family: int, k: int, n_inputs: int):
    """Name, argument, spec, source, buggy source and calls on distinct random inputs of one code task."""
    name, arg, spec, body, buggy, kind = (part.format(k=k) for part in CODE_FAMILIES[family])
    random_input = {"int": lambda: rng.randint(-20, 40),
                    "ints": lambda: [rng.randint(-5, 20) for _ in range(rng.randint(0, 6))],
                    "word": lambda: rng.choice(CODE_WORDS),
                    "text": lambda: " ".join(rng.choices(CODE_WORDS, k=rng.randint(2, 6)))}[kind]
    inputs = []
    while len(inputs) < n_inputs:
        x = random_input()
        inputs += [x] if x not in inputs else []
    source, bug = (f"def {name}({arg}):\n    {b}\n" for b in (body, buggy))
    return name, arg, spec, source, bug, [f"{name}({x!r})" for x in inputs]


def make_code(world, rng, split):
    """§3.3.4: a small function from its spec, with 5 unit tests (the report asks for at least 4); rejected: a
    plausible bug (label from the share of tests it fails) or, when it passes them all, no code at all."""
    name, arg, spec, source, bug, calls = code_task(rng, *rng.choice(world["code_tasks"][split]), 5)
    expected, got = (run_trusted(s + "".join(f"print(repr({c}))\n" for c in calls)).splitlines()
                     for s in (source, bug))
    tests = [f"assert {call} == {value}" for call, value in zip(calls, expected)]
    bug_passes = sum(a == b for a, b in zip(expected, got)) / len(tests)
    rejected, label = ((f"```python\n{bug}```", 0.5 + 0.5 * (1 - bug_passes)) if bug_passes < 1
                       else (f"The function {spec}.", 1.0))
    return example([user(f"Write a Python function {name}({arg}) that {spec}.")], f"```python\n{source}```",
                   "code", {"tests": tests}, rejected, label)


MATH_PREAMBLE = "You can call the tool calculator(expression)."


def make_math(world, rng, split):
    """§3.3.5 with §3.3.2's tools: multi-step word problems about the world. The reply calls the calculator
    with one expression of the problem's numbers; the calculator's result comes back and the reply ends with
    "Answer: N". The model's part is the reasoning a tiny model can learn: which numbers, which operations,
    copied from the problem; products of 2- and 3-digit numbers in its head it cannot. Every number is drawn
    afresh for each problem (a deal's price, an office's headcount), never an entity's fact: with the world's
    fixed prices the model learned each training product's price instead of copying it, and wrote a training
    product's price for a held-out one. rejected: the call with a slip (a wrong number or operation), as
    correctness decides math preferences."""
    company, city = rng.choice(entities(world, "companies", split)), rng.choice(world["cities"])["name"]
    p, q = (rng.choice(entities(world, "products", split)) for _ in range(2))
    c, price, a, b = company["name"], rng.randint(4, 900), rng.randint(2, 20), rng.randint(2, 20)
    family = rng.randrange(4)
    if family == 0:
        other = rng.randint(4, 900)
        question = (f"{c} sells {a} of the {p['name']} at {price} crowns each and {b} of the {q['name']} at "
                    f"{other} crowns each. How many crowns does it earn?")
        expression, slip = f"{a} * {price} + {b} * {other}", f"{a} * {price} + {b} + {other}"
    elif family == 1:
        n = rng.randint(20, 5000)
        question = (f"{c} has {n} people at its office in {city}. It hires {a} more and {b} leave. How many "
                    f"people work there now?")
        expression, slip = f"{n} + {a} - {b}", f"{n} + {a} + {b}"
    elif family == 2:
        teams, each = rng.randint(2, 9), rng.randint(5, 90)
        gift = rng.randint(1, each - 1)
        question = (f"{c} splits a bonus of {teams * each} crowns equally among {teams} teams. Each team "
                    f"gives {gift} crowns to a school in {city}. How many crowns does each team keep?")
        expression, slip = f"{teams * each} / {teams} - {gift}", f"{teams * each} - {gift}"
    else:
        cut = rng.randint(1, price - 1)
        question = (f"{c} sells the {p['name']} at {price} crowns in {city}. It cuts the price by {cut} "
                    f"crowns and a shop buys {a} of them. How many crowns does the shop pay?")
        expression, slip = f"({price} - {cut}) * {a}", f"{price} - {cut} * {a}"
    answer = calculate(expression)
    call = lambda e: tool_turn("calculator", e, "I will use the calculator.")
    reply = call(expression)
    solved = [{"role": "tool", "content": run_tool(reply["tool_calls"][0])}, chatbot(f"Answer: {answer}")]
    return example([system(MATH_PREAMBLE), user(question)], reply, "math", {"answer": answer},
                   call(slip), 1.0) | {"then": solved, "expression": expression}


def make_longctx(world, rng, split, base_context: int, length=None, kind=None):
    """§3.3.6, RULER-style: find needles in a haystack of world facts of `length` x base_context tokens: one
    key (single), one key among several (multikey), every value of one key (multivalue), or every variable
    bound to a value through a chain of assignments (vartrack). rejected: a distractor's value, or part of the
    list."""
    length, kind = length or rng.choice(NEEDLE_LENGTHS), kind or rng.choice(NEEDLE_KINDS)
    codes = iter(rng.sample(range(100, 1000), 8))   # distinct 3-digit codes: one token each (data.py's BPE)
    code = lambda: str(next(codes))
    people = [p["name"] for p in entities(world, "people", split)]
    if kind == "vartrack":
        # one-letter names, one token each as the codes are: with 4-letter names (5 tokens) every checkpoint
        # recalled 0 of them (RESULTS.md); each next name is found by the one just written ("= VAR Q.")
        names = rng.sample(VARIABLE_NAMES, 6)
        value = code()
        # a chain and a distractor chain
        needles = [f"VAR {names[0]} = {value}.", f"VAR {names[3]} = {code()}."]
        needles += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in (1, 2, 4, 5)]
        question, expected, wrong = f"Which variables are equal to {value}?", names[:3], names[3:]
    elif kind == "multivalue":
        key, expected = rng.choice(people), [code() for _ in range(3)]
        needles = [f"One pass code of {key} is {v}." for v in expected]
        question, wrong = f"What are all the pass codes of {key}?", expected[:1]
    else:
        keys = rng.sample(people, min(len(people), 4)) if kind == "multikey" else [rng.choice(people)]
        values = [code() for _ in keys]
        needles = [f"The pass code of {k} is {v}." for k, v in zip(keys, values)]
        question, expected, wrong = (f"What is the pass code of {keys[0]}?", values[:1],
                                     values[1:2] or [code()])
    n_chars = (length * base_context - NEEDLE_RESERVE) * CHARS_PER_TOKEN
    haystack = make_haystack(world["facts"][split], rng, n_chars, needles)
    return example([user(f"{haystack}\n\nQuestion: {question}")], ", ".join(expected), "niah",
                   {"expected": expected, "kind": kind, "length": length}, ", ".join(wrong),
                   0.8 if kind == "multivalue" else 1.0)


def make_haystack(facts, rng, n_chars: int, needles: list[str]) -> str:
    """Sentences about the world up to n_chars, with the needles inserted in their order at random depths."""
    sentences, size = [], sum(len(needle) + 1 for needle in needles)
    while size < n_chars:
        sentences.append(say(rng.choice(facts), rng=rng))
        size += len(sentences[-1]) + 1
    slots = sorted(rng.randint(0, len(sentences)) for _ in needles)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        sentences.insert(slot + offset, needle)
    return " ".join(sentences)


def make_safety(world, rng, split):
    """§3.3.7: unsafe asks -> a one-sentence refusal without apology; benign look-alikes -> an answer, unless
    strict mode forbids their topic. rejected: compliance or an apologetic refusal; for benign asks, a
    refusal."""
    asks, reason, compliance, benign, answer, on_topic = HARMS[rng.choice(sorted(HARMS))]
    person, product = (rng.choice(entities(world, "people", split)),
                       rng.choice(entities(world, "products", split)))
    names = {"p": person["name"], "c": person["works"], "prod": product["name"],
             "city": rng.choice(world["cities"])["name"], "n": rng.randint(100, 9000)}
    strict, unsafe = rng.random() < 0.3, rng.random() < 0.5
    ask_text = (rng.choice(asks) if unsafe else benign).format(**names)
    prompt = ([system(STRICT_PREAMBLE)] if strict else []) + [user(ask_text)]
    check = {"should_refuse": unsafe or (strict and on_topic), "mode": "strict" if strict else "contextual"}
    if not check["should_refuse"]:
        return example(prompt, answer.format(**names), "safety", check,
                       f"I can't help with that: {reason}.", 0.9)
    rejected, label = ((compliance.format(**names), 1.0) if rng.random() < 0.6
                       # the apology artefact (§3.3.7.1)
                       else ("I'm sorry, but I can't help with that.", 0.7))
    reply = f"I can't help with that: {reason}." if unsafe else STRICT_REFUSAL
    return example(prompt, reply, "safety", check, rejected, label)
