"""
Polishing (report §3.5, Figure 13): after best-of-N SFT (sft.py --best-of-n), ping-pong between offline
preference training and online RL, ending on the offline phase, while the gold win rate rises.

- SRPO phase: pairs of the model's own samples, N samples for each of --prompts prompts: --chat-share of them
  plain questions (rl/chat.jsonl, where the instruct data's filler habit shows: capabilities.HABIT_KINDS), the
  rest drawn evenly from every capability's RL prompts. --pairs reward-model is §3.5's rule: chosen = the
  reward model's best, rejected = its worst; prompts whose mean reward is in the lowest quarter are dropped,
  and pairs the verifier contradicts. Plus verifiable pairs (instruction following, math, code): a sample the
  verifier passes against one it fails, dropped where the reward model scores them the other way. --pairs
  verified (the default) ranks the samples by the verifier, then by the reward model, and pairs the first with
  the last where the verifier prefers the first, or, on a plain question, where the reward model does (style
  is its call). Length-averaged SRPO (prefopt.py's instruct recipe) with an SFT loss on every capability's
  data.
- CoPG phase: online, the reward model's reward, 2 generations per prompt, the same prompt sets, an
  L2 penalty to the phase's init (the reference policy) and an SFT loss on every capability's data (copg.py).

Phases run SRPO, CoPG, SRPO, ... (--rounds SRPO phases at most). After each, the model is measured on the
first MEASURE_PROMPTS RL prompts of every capability and of chat (training entities: the eval sets stay held
out), which neither phase trains on (nor on the rest of the weight search's evaluate.SELECTION_PROMPTS): the
win rates against --reference by the gold judge (verifiers.gold_reward, the stand-in for the report's human
raters) and by the reward model, the mean of the capabilities' headline metrics and the share of chat replies
with filler. Polishing stops when an SRPO phase does not raise the gold win rate over the previous one; OUT
holds the best SRPO phase (or the --init model, if no phase beat it), OUT/phases.md the per-phase table
(Figure 13) and OUT/phase-K-KIND/ each phase's run.

How this differs from the report:
1. The SFT loss of the SRPO phase is ours (§3.5 names one for the online phase only), there to keep what the
   soup learnt while the phase trains on the model's own samples; --sft-weight 0 turns both off.
2. The stopping rule (the gold win rate stops rising) is ours; the report gives no number of rounds.
3. The default pairs are all verified: every capability of the tiny world has a verifier, and the pairs
   §3.5's rule leaves to the reward model (the verifier rates both samples alike) were noise to the gold
   judge: of the 62 pairs of a phase 1, 45 had equal gold rewards and 17 favoured the chosen sample, all 17
   by the verifier too. Training on them lowered the gold win rate more (phase 1: 0.741 -> 0.705 on world 0,
   0.737 -> 0.705 on world 1; verified pairs 0.714 and 0.728; RESULTS.md): on a capability's prompts the
   replies had no style to judge. The reward model still ranks the samples the verifier rates alike, pairs
   the plain questions' (the style preference §3.5 aligns) and is the CoPG phases' reward.
4. Half of an SRPO phase's prompts are plain questions (the report does not give its mixture): with one in
   eight (17 of 136) a phase had 5-8 style pairs and the filler habit came back in the next phases; with 70
   it had 20 and the habit went (RESULTS.md).

    python polish.py --init runs/tiny/polish-bon --out runs/tiny/polished --reward-model runs/tiny/reward \\
        --reference runs/tiny/instruct
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import copg
import prefopt
from common import argument_parser, load_model, write_json
from distributed import PRECISIONS
from data import chat_stop_tokens, load_tokenizer, parse_reply, render_prompt
from records import check_completion, read_jsonl
from evaluate import (EVAL_MAX_NEW_TOKENS, HEADLINE, chatbot_message, evaluate_capability, prompt_key,
                      without_selection_prompts)
from judges import gold_win_rate, load_reward_model, reward_model_scores, win_rate
from model import generate
from tasks import CAPABILITIES
from verifiers import parse_tool_calls, verifier_reward

VERIFIABLE = ("instructions", "math", "code")   # §3.5's domain-specific preference data
# The prompt sets a phase samples and is measured on: every capability's, and plain questions ("chat"), where
# the instruct data's filler habit shows (capabilities.HABIT_KINDS) and the reward model's style preference is
# the signal
SETS = (*CAPABILITIES, "chat")
PAIR_RULES = ("verified", "reward-model")
MEASURE_PROMPTS = 16   # per set (SETS), from the start of DATA/rl/NAME.jsonl
MAX_NEW_TOKENS = max(EVAL_MAX_NEW_TOKENS.values())   # of a sample in both phases
SEQ_LEN = 512   # both phases' rows: the prompts are those that fit one with a reply


# -----------------------------------------------------------------------------
# Pairs of the model's own samples


def reply_message(reply: dict) -> dict | None:
    """A parsed sample (data.parse_reply) as a chatbot message; None when it did not end its turn or its
    action is not a valid tool call (neither can be rendered back as what was sampled)."""
    calls = parse_tool_calls(reply["action"]) if reply["action"] else None
    if not reply["ended"] or (reply["action"] and calls is None):
        return None
    message = chatbot_message(reply, calls)
    try:
        check_completion(message, "sample")
    except ValueError:
        return None
    return message


def polishing_pairs(records: list[dict], candidates: list[list[dict]], rm_scores: list[list[float]],
                    verified: list[list[float]], rule: str = "verified",
                    low_share: float = 0.25) -> list[dict]:
    """Preference data from scored samples: per record, its candidate messages, their reward-model scores
    and verifier rewards. Rule "reward-model" (§3.5): the reward model's best against its worst, unless the
    prompt's mean reward is in the lowest `low_share` of prompts or the verifier rewards the worst higher;
    and, for VERIFIABLE tasks, the first passing sample against the first failing one, unless the reward
    model scores it lower. Rule "verified": the samples ordered by (verifier reward, reward-model score), the
    first against the last where the verifier rewards the first higher. Pair records as records.read_jsonl's
    "pair" kind, with "source": "reward model" or "verifier"."""
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {rule!r}: one of {PAIR_RULES}")
    if rule == "reward-model":
        means = [float(np.mean(scores)) for scores in rm_scores if scores]
        cutoff = float(np.quantile(means, low_share)) if means else 0.0
    pairs = []
    for record, samples, rm, ver in zip(records, candidates, rm_scores, verified):
        pair = lambda i, j, source: {  # noqa: E731
            "messages": record["messages"], "chosen": samples[i], "rejected": samples[j], "label": 1.0,
            "capability": record.get("capability", "instruct"), "source": source}
        if len(rm) < 2:
            continue
        if rule == "verified":
            ranked = sorted(range(len(rm)), key=lambda i: (ver[i], rm[i]))
            if ver[ranked[-1]] > ver[ranked[0]]:
                pairs.append(pair(ranked[-1], ranked[0], "verifier"))
            elif record["task"] == "chat" and rm[ranked[-1]] > rm[ranked[0]]:   # style: the reward model's
                pairs.append(pair(ranked[-1], ranked[0], "reward model"))
            continue
        best, worst = int(np.argmax(rm)), int(np.argmin(rm))
        if np.mean(rm) >= cutoff and samples[best] != samples[worst] and ver[best] >= ver[worst]:
            pairs.append(pair(best, worst, "reward model"))
        if record["task"] in VERIFIABLE:
            passing = [i for i, v in enumerate(ver) if v == 1.0]
            failing = [i for i, v in enumerate(ver) if v < 1.0]
            if passing and failing and rm[passing[0]] >= rm[failing[0]]:
                pairs.append(pair(passing[0], failing[0], "verifier"))
    return pairs


@torch.no_grad()
def sample_pairs(model, enc, records: list[dict], reward_model, n: int, temperature: float, seed: int,
                 batch_size: int = 16, rule: str = "verified") -> list[dict]:
    """n samples per record from the model, scored by the reward model and the verifier, as polishing_pairs.
    Samples that cannot be rendered back (reply_message) are left out."""
    generator = torch.Generator().manual_seed(seed)
    candidates, rm_scores, verified = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [render_prompt(enc, record["messages"]) for record in chunk]
        samples = generate(model, [ids for ids in prompts for _ in range(n)], MAX_NEW_TOKENS, temperature,
                           1.0, chat_stop_tokens(enc), generator)
        for i, record in enumerate(chunk):
            parsed = [reply_message(parse_reply(enc, ids)) for ids in samples[i * n:(i + 1) * n]]
            messages = [m for m in parsed if m is not None]
            candidates.append(messages)
            rm_scores.append(reward_model_scores(reward_model, enc, record["messages"], messages)
                             if messages else [])
            verified.append([verifier_reward(record, m) for m in messages])
    return polishing_pairs(records, candidates, rm_scores, verified, rule)


# -----------------------------------------------------------------------------
# Measuring a phase


def measure(model, enc, data: Path, reference_replies: list | None, reward_model, batch_size: int) -> dict:
    """Each capability's headline metric on its first MEASURE_PROMPTS RL prompts, their mean, the share of
    chat replies with filler, and the win rates of all these replies (chat's too) against the reference's
    (gold judge and reward model). With reference_replies None, returns the replies instead (the reference's
    own measurement)."""
    replies, result = [], {}
    for name in SETS:
        metrics = evaluate_capability(model, enc, data, name, batch_size, MEASURE_PROMPTS, split="rl",
                                      replies=replies)
        result[name] = metrics[HEADLINE[name]]
        if name == "chat":   # the style habit polishing should remove
            result["filler"] = metrics["filler"]
    if reference_replies is None:
        return {"replies": replies}
    result["capability_mean"] = float(np.mean([result[c] for c in CAPABILITIES]))
    records = measured_records(data)
    result["gold_win_rate"] = gold_win_rate(records, replies, reference_replies)
    result["win_rate"] = win_rate(reward_model, enc, records, replies, reference_replies)
    print(f"measured: gold win rate {result['gold_win_rate']:.3f}, reward model win rate "
          f"{result['win_rate']:.3f}, capability mean {result['capability_mean']:.3f}, chat filler "
          f"{result['filler']:.3f} (RL prompts)")
    return result


def measured_records(data: Path) -> list[dict]:
    """The prompts a phase is measured on: the first MEASURE_PROMPTS RL prompts of every set (SETS)."""
    return [record for name in SETS
            for record in read_jsonl(data / "rl" / f"{name}.jsonl", "prompt")[:MEASURE_PROMPTS]]


def training_prompts(data: Path, enc) -> list[dict]:
    """The phases' prompts: every capability's RL prompts that fit a row with a reply, but the selection
    prompts (evaluate.without_selection_prompts) and those the phases are measured on (among them in the
    tiny world): a phase trained on its own measuring prompts would look better than it is, and the stopping
    rule would keep it for that."""
    measured = {prompt_key(record) for record in measured_records(data)}
    prompts = [record | {"capability": name} for name in SETS
               for record in read_jsonl(data / "rl" / f"{name}.jsonl", "prompt")]
    return [record for record in without_selection_prompts(prompts, data)
            if len(render_prompt(enc, record["messages"])) + MAX_NEW_TOKENS <= SEQ_LEN
            and prompt_key(record) not in measured]


def phase_prompts(prompts: list[dict], n: int, chat_share: float, rng: random.Random) -> list[dict]:
    """An SRPO phase's prompts, drawn from training_prompts: round(n * chat_share) plain questions, the rest
    evenly from the capabilities (at least one each; fewer where a pool runs out)."""
    n_chat = round(n * chat_share)
    counts = {c: max(1, (n - n_chat) // len(CAPABILITIES)) for c in CAPABILITIES} | {"chat": n_chat}
    pools = {name: [p for p in prompts if p["capability"] == name] for name in SETS}
    return [record for name in SETS
            for record in rng.sample(pools[name], min(len(pools[name]), counts[name]))]


def phases_table(rows: list[dict]) -> str:
    """The per-phase table (Figure 13): one row per phase."""
    lines = ["| phase | gold win rate | RM win rate | capability mean | chat filler | "
             + " | ".join(CAPABILITIES) + " |", "|---" * (5 + len(CAPABILITIES)) + "|"]
    for row in rows:
        cells = [f"{row[k]:.3f}" for k in ("gold_win_rate", "win_rate", "capability_mean", "filler",
                                            *CAPABILITIES)]
        lines.append(f"| {row['phase']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--init", default="runs/tiny/polish-bon", help="the best-of-N SFT model")
    parser.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, rl/, sft/, eval/")
    parser.add_argument("--out", default="runs/tiny/polished",
                        help="the polished model; each phase's run in OUT/phase-K-KIND/")
    parser.add_argument("--reward-model", default="runs/tiny/reward", help="a reward.py --out folder")
    parser.add_argument("--reference", default="runs/tiny/instruct", help="the model win rates compare with")
    parser.add_argument("--rounds", type=int, default=2,
                        help="SRPO phases at most (a CoPG phase between two)")
    parser.add_argument("--prompts", type=int, default=140,
                        help="prompts sampled per SRPO phase: --chat-share plain questions, the rest "
                             "from all capabilities evenly")
    parser.add_argument("--chat-share", type=float, default=0.5,
                        help="of the SRPO phases' prompts: plain questions, the style preference's")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (N)")
    parser.add_argument("--temperature", type=float, default=0.7, help="of the SRPO phases' samples")
    parser.add_argument("--pairs", default="verified", choices=PAIR_RULES,
                        help="the SRPO phases' pairs: the verifier's best and worst sample (ranked by the "
                             "reward model where the verifier ties), or §3.5's reward-model rule")
    parser.add_argument("--srpo-steps", type=int, default=20, help="steps of each SRPO phase")
    parser.add_argument("--copg-steps", type=int, default=20, help="steps of each CoPG phase")
    parser.add_argument("--srpo-lr", type=float, help="SRPO phases' peak LR, falling to a tenth (default: "
                                                      "prefopt.py's instruct recipe)")
    parser.add_argument("--copg-lr", type=float, help="CoPG phases' LR (default: copg.py's recipe)")
    parser.add_argument("--l2-ref", type=float, default=0.01, help="CoPG phase: λ of λ‖θ − θ_ref‖²")
    parser.add_argument("--sft-weight", type=float, default=1.0, help="both phases: the SFT loss's weight")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch")
    parser.add_argument("--seed", type=int, default=0, help="prompts, samples and each phase's data order")
    parser.add_argument("--device", default="cpu",
                        help="of the phases' training (one process); sampling and measuring run on the CPU")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="of the phases' training matmuls (prefopt.py's and copg.py's --precision)")
    args = parser.parse_args(argv)
    if not 0 <= args.chat_share <= 1:
        parser.error(f"--chat-share must be in [0, 1], got {args.chat_share}")
    return args


def main(argv=None):
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = load_tokenizer(str(data / "tokenizer.json"))
    reward_model = load_reward_model(args.reward_model)
    reference = load_model(args.reference)[0]
    reference_replies = measure(reference, enc, data, None, None, args.batch_size)["replies"]
    prompts = training_prompts(data, enc)
    mixed = out / "copg_prompts.jsonl"   # the CoPG phases' prompts: every capability's
    mixed.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in prompts))
    run = ["--data", str(data), "--device", args.device, "--precision", args.precision, "--no-eval",
           "--seed", str(args.seed), "--sft-data", "all", "--sft-weight", str(args.sft_weight),
           "--seq-len", str(SEQ_LEN)]

    rows_file = out / "phases.jsonl"   # a restarted run replays the phases already measured
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    phase_names = [f"phase-{k}-{kind}" for k in range(1, 2 * args.rounds) for kind in
                   ["srpo" if k % 2 else "copg"]]
    init = args.init
    if not rows:
        rows.append({"phase": f"start ({args.init})", "dir": args.init}
                    | measure(load_model(args.init)[0], enc, data, reference_replies, reward_model,
                              args.batch_size))
        rows_file.write_text(json.dumps(rows[0]) + "\n")
    for k, name in enumerate(phase_names, 1):
        phase_out = out / name
        if k < len(rows):   # done before a restart
            init = str(phase_out)
        elif name.endswith("srpo"):
            pairs_file = phase_out / "pairs.jsonl"
            if not pairs_file.is_file():
                chosen = phase_prompts(prompts, args.prompts, args.chat_share,
                                       random.Random(f"{args.seed}:{name}"))
                pairs = sample_pairs(load_model(init)[0], enc, chosen, reward_model, args.samples,
                                     args.temperature, args.seed + k, args.batch_size, args.pairs)
                if not pairs:   # e.g. a model that never ends its turn: nothing to prefer
                    print(f"{name}: no preference pair from {len(chosen)} prompts x {args.samples} samples "
                          f"of {init} (samples that never end their turn are left out); polishing stops")
                    break
                phase_out.mkdir(parents=True, exist_ok=True)
                pairs_file.write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in pairs))
                print(f"{name}: {len(pairs)} pairs from {len(chosen)} prompts "
                      f"({sum(p['source'] == 'verifier' for p in pairs)} verifiable)")
            lr = ["--lr", str(args.srpo_lr), "--min-lr", str(args.srpo_lr / 10)] if args.srpo_lr else []
            prefopt.main(["--capability", "instruct", "--init", init, "--out", str(phase_out),
                          "--data-file", str(pairs_file.resolve()), "--steps", str(args.srpo_steps), *lr,
                          *run])
        else:
            copg.main(["--capability", "instruct", "--mode", "online", "--reward", f"rm:{args.reward_model}",
                       "--k", "2", "--l2-ref", str(args.l2_ref), "--data-file", str(mixed.resolve()),
                       "--max-new-tokens", str(MAX_NEW_TOKENS), "--init", init, "--out", str(phase_out),
                       "--steps", str(args.copg_steps), *run,
                       *(["--lr", str(args.copg_lr)] if args.copg_lr else [])])
        if k >= len(rows):
            init = str(phase_out)
            rows.append({"phase": name, "dir": init} | measure(
                load_model(init)[0], enc, data, reference_replies, reward_model, args.batch_size))
            with rows_file.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        srpo_rows = [row for row in rows[1:] if row["phase"].endswith("srpo")]
        if name.endswith("srpo") and len(srpo_rows) >= 2 and \
                srpo_rows[-1]["gold_win_rate"] <= srpo_rows[-2]["gold_win_rate"]:
            print(f"{name}: the gold win rate stopped rising; polishing stops")
            break
    best = max((row for row in rows if not row["phase"].endswith("copg")),   # the start or an SRPO phase
               key=lambda row: row["gold_win_rate"])
    for name in ("model.pt", "config.json"):
        shutil.copyfile(Path(best["dir"]) / name, out / f".{name}.tmp")
        (out / f".{name}.tmp").replace(out / name)
    write_json({"phases": rows, "kept": best["phase"]}, out / "polish.json")
    (out / "phases.md").write_text(phases_table(rows))
    print(phases_table(rows) + f"kept {best['phase']}")


if __name__ == "__main__":
    main()
