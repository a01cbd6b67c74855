"""
Supervised fine-tuning (report §3.2.1): the instruct model, the seven capability experts (§3.3, §3.4.3.2) and
best-of-N SFT (§3.5), with an evaluation of the capability at the end.

    loss = CE(chatbot tokens only) + λ ‖θ − θ₀‖²          (§3.2.1; θ₀ = the --init weights, λ = --l2-init)

- Prompt masking: conversations are rendered by data.render, whose loss mask covers only what the chatbot
  writes; several conversations are packed per row with document masking (data.pack), so none sees another.
- Regularisers (§3.2.1): `--l2-init λ` pulls the weights toward the initial ones; `--pretrain-mix p` makes a
  share p of the steps pretraining batches from DATA/corpus.bin (evenly spaced: steps where ⌊(s+1)p⌋ > ⌊sp⌋).
- AdamW with decoupled weight decay, β = (0.9, 0.95), gradient clipping at 1, linear warmup then cosine decay.
- `--capability CAP` picks RECIPES[CAP] (Appendix B) and DATA/sft/CAP.jsonl. Experts (every capability but
  instruct) start from the instruct model and also see --cross-domain (by default 1.0: as many again)
  conversations drawn evenly from the other capabilities' data: the regulariser §3.4.3.2 uses to keep experts
  mergeable. The report calls it a small amount; at tiny scale a tenth is not enough. With experts from one
  instruct model, the best of 40 weights `merge.py --search` tried for the 7-way soup kept 43 % of the
  instruct score and 50 % of safety at 0.1, and 90-95 % of instruct and all of code and safety at 0.5 and 1.0;
  at 1.0 the experts also keep most of the instruct skill on their own (README, Merging).
- Best-of-N (§3.5): `--best-of-n N --reward-model PATH` first samples N replies (temperature 0.7) to up to
  --best-of-n-prompts (512) prompts of the data from the --init model, keeps the one the reward model
  (reward.py) scores highest, and trains on those, for two epochs unless --steps says otherwise. Polishing the
  RL soup of run_tiny.sh with the instruct recipe's 300 steps (19 epochs of its own samples) at temperature
  1.0 took it to instruct prompt-level 0.54, code pass@1 0 and val bpb 1.67; 32 steps at 0.7, with
  --cross-domain 1.0 for prompts from every capability, to 0.83, 0.75 and 1.20 (24 eval records each).
- At the end (and, with --eval-before, on the --init model first): greedy replies to DATA/eval/CAP.jsonl graded
  by tasks.grade; prints the capability's headline metric and chat-format compliance (replies that end their
  turn), with evaluate.py's evaluate_capability.

Appendix B's learning rates are for a 111B model pretrained at 2.5e-4. Scaled by the ratio of pretraining LRs
(3e-3 / 2.5e-4 = 12) the tiny runs underfit: instruct SFT at 3e-4 ended at a training CE of 2.4 and a
prompt-level score of 0.19. The tiny model takes 4x more: every LR here is the report's x LR_SCALE = 48, which
keeps Appendix B's ratios between capabilities (instruct then trains to CE 1.2 and a prompt-level score of
0.88). Where Appendix B gives nothing (instruct, RAG) we use the reasoning recipe (B.4). Steps and batch sizes
(in conversations) are chosen for 2-3 epochs of the tiny world's data; seq_len fits its longest conversations.
RAG gets 400 steps: with the default cross-domain share half of each batch is other data, and at 200 steps the
RAG expert fell from 0.21 to 0 on its metric (400: 0.19).

| capability   | report peak → final LR, weight decay (App. B) | tiny: peak LR, steps x batch, seq_len |
|--------------|-----------------------------------------------|---------------------------------------|
| instruct     | (B.4) 2.5e-5 → 2.5e-6, wd 0.01                | 1.2e-3, 300 x 32, 256                 |
| rag          | (B.4) 2.5e-5 → 2.5e-6, wd 0.01                | 1.2e-3, 400 x 16, 256                 |
| multilingual | B.2   2.5e-5 → 1.25e-5, wd 0.1                | 1.2e-3, 200 x 32, 256                 |
| code         | B.3   5e-5 → 5e-6, wd 0.1                     | 2.4e-3, 200 x 32, 256                 |
| math         | B.4   2.5e-5 → 2.5e-6, wd 0.01                | 1.2e-3, 200 x 32, 256                 |
| longctx      | B.5   2.5e-5 → 2.5e-6, wd 0.01                | 1.2e-3, 100 x 8, 2048                 |
| safety       | B.6   1e-4 → 1e-5, wd 1e-3                    | 4.8e-3, 150 x 32, 256                 |

Reads --init (model.pt + config.json), DATA/tokenizer.json, DATA/sft/CAP.jsonl (+ the other capabilities'),
DATA/eval/CAP.jsonl, DATA/corpus.bin with --pretrain-mix; writes OUT/model.pt, config.json, metrics.jsonl,
checkpoint.pt (a restarted run resumes exactly).

    python sft.py --capability instruct                        # pretrained -> instruct model, CPU, ~2 min
    python sft.py --capability code                            # instruct -> code expert (runs/tiny/sft-code)
    python sft.py --capability instruct --best-of-n 4 --reward-model runs/tiny/reward --init runs/tiny/instruct \
        --out runs/tiny/bon                                    # best-of-N SFT (§3.5)
    torchrun --nproc_per_node 8 sft.py --capability code --init runs/r7b/instruct --data data/real ...   # FSDP2
"""

import argparse
import math
import random
from pathlib import Path

import numpy as np
import torch

from common import (Logger, all_reduce_sum, autocast, build_model, l2_to_init, load_checkpoint, lr_factor,
                    make_optimizer, open_stage, optimizer_step, save_checkpoint, save_model, set_lr, teardown,
                    whole_model)
from data import (IGNORE, chat_stop_tokens, open_shard, pack, prompt_completion_sequence, read_jsonl, record_indices,
                  render, render_prompt, shard_batch)
from evaluate import EVAL_MAX_NEW_TOKENS, evaluate_capability
from model import generate
from reward import load_reward_model, score
from tasks import CAPABILITIES

LR_SCALE = 48  # Appendix B's LRs scaled to the tiny preset (see the docstring for why 48)
RECIPES = {  # report LRs (scaled by LR_SCALE below), weight decay; tiny steps, batch (conversations), seq_len
    "instruct": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=300, batch_size=32, seq_len=256),
    "rag": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=400, batch_size=16, seq_len=256),
    "multilingual": dict(lr=2.5e-5, min_lr=1.25e-5, weight_decay=0.1, steps=200, batch_size=32, seq_len=256),
    "code": dict(lr=5e-5, min_lr=5e-6, weight_decay=0.1, steps=200, batch_size=32, seq_len=256),
    "math": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=200, batch_size=32, seq_len=256),
    "longctx": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=100, batch_size=8, seq_len=2048),
    "safety": dict(lr=1e-4, min_lr=1e-5, weight_decay=1e-3, steps=150, batch_size=32, seq_len=256),
}

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", default="instruct", choices=CAPABILITIES)
    parser.add_argument("--init", help="parent model folder (default: runs/tiny/pretrain for instruct, "
                                       "runs/tiny/instruct for the experts)")
    parser.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, sft/, eval/ (corpus.bin)")
    parser.add_argument("--out", help="default: runs/tiny/instruct, or runs/tiny/sft-CAP for an expert")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the capability's recipe)")
    parser.add_argument("--batch-size", type=int, help="conversations per step and process (default: recipe)")
    parser.add_argument("--seq-len", type=int, help="packed row length (default: recipe)")
    parser.add_argument("--lr", type=float, help="peak LR (default: the recipe's x LR_SCALE)")
    parser.add_argument("--min-lr", type=float, help="final LR of the cosine (default: the recipe's x LR_SCALE)")
    parser.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (default: recipe)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--cross-domain", type=float, help="other capabilities' conversations, as a share of this "
                                                           "one's (§3.4.3.2; default 1.0 for experts, 0 instruct)")
    parser.add_argument("--l2-init", type=float, default=0.0, help="λ of the penalty λ‖θ − θ₀‖² to the init weights")
    parser.add_argument("--pretrain-mix", type=float, default=0.0, help="share of steps on pretraining batches")
    parser.add_argument("--best-of-n", type=int, help="train on the best of N samples per prompt (§3.5)")
    parser.add_argument("--best-of-n-prompts", type=int, default=512, help="best-of-N: sample for this many of "
                                                                           "the data's prompts (seeded choice)")
    parser.add_argument("--reward-model", help="reward.py --out folder that ranks the best-of-N samples")
    parser.add_argument("--temperature", type=float, default=0.7, help="best-of-N sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="best-of-N nucleus sampling")
    parser.add_argument("--eval-before", action="store_true", help="also evaluate the --init model first")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.capability]
    if args.best_of_n and args.steps is None:  # two epochs of the samples: more overfits the model's own replies
        args.steps = math.ceil(2 * args.best_of_n_prompts / (args.batch_size or recipe["batch_size"]))
    for name in ("steps", "batch_size", "seq_len", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.lr = recipe["lr"] * LR_SCALE if args.lr is None else args.lr
    args.min_lr = recipe["min_lr"] * LR_SCALE if args.min_lr is None else args.min_lr
    expert = args.capability != "instruct"
    args.init = args.init or ("runs/tiny/instruct" if expert else "runs/tiny/pretrain")
    args.out = args.out or (f"runs/tiny/sft-{args.capability}" if expert else "runs/tiny/instruct")
    args.cross_domain = (1.0 if expert else 0.0) if args.cross_domain is None else args.cross_domain
    if (args.best_of_n is None) != (args.reward_model is None):
        parser.error("--best-of-n and --reward-model go together")
    if not 0 <= args.pretrain_mix < 1:
        parser.error(f"--pretrain-mix must be in [0, 1), got {args.pretrain_mix}")
    return args


# -----------------------------------------------------------------------------
# Data


def training_conversations(data: Path, capability: str, cross_domain: float, seed: int) -> list[dict]:
    """DATA/sft/CAP.jsonl, plus round(cross_domain x its size) conversations drawn evenly (seeded) from the other
    capabilities' files that exist (§3.4.3.2: a little cross-domain data keeps the experts compatible)."""
    records = read_jsonl(data / "sft" / f"{capability}.jsonl", "sft")
    others = [cap for cap in CAPABILITIES if cap != capability and (data / "sft" / f"{cap}.jsonl").is_file()]
    per_other = round(cross_domain * len(records) / max(1, len(others)))
    rng = random.Random(seed)
    for cap in others:
        pool = read_jsonl(data / "sft" / f"{cap}.jsonl", "sft")
        records += rng.sample(pool, min(len(pool), per_other))
    return records


def fitting(sequences: list, seq_len: int, what: str) -> list:
    """The (ids, mask) sequences that fit a row of seq_len; says how many were left out."""
    kept = [s for s in sequences if len(s[0]) <= seq_len]
    if len(kept) < len(sequences):
        print(f"{what}: left out {len(sequences) - len(kept)} of {len(sequences)} conversations longer than "
              f"--seq-len {seq_len}")
    if not kept:
        raise ValueError(f"{what}: no conversation fits --seq-len {seq_len}")
    return kept


def is_pretrain_step(step: int, share: float) -> bool:
    """Evenly spaced pretraining steps: a share `share` of all steps, the first at step ⌈1/share⌉ − 1."""
    return math.floor((step + 1) * share) > math.floor(step * share)


# -----------------------------------------------------------------------------
# Loss, best-of-N and evaluation


def prompt_of(record: dict) -> list[dict]:
    """The messages before a conversation's last chatbot turn: the prompt that turn answers."""
    last = max(i for i, message in enumerate(record["messages"]) if message["role"] == "chatbot")
    return record["messages"][:last]


def best_of_n(model, enc, prompts: list[list[dict]], n: int, score_fn, max_new_tokens: int, temperature: float,
              top_p: float, generator: torch.Generator, batch_size: int = 16) -> tuple[list, list[float]]:
    """Best-of-N (§3.5): n samples per prompt, ranked by score_fn(messages, completions) -> list of floats (a
    completion is the token ids sampled after data.render_prompt). Returns the (ids, loss mask) training
    sequences of each prompt's highest-scored sample, and those scores."""
    sequences, best_scores = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        prompt_ids = [render_prompt(enc, messages) for messages in chunk]
        samples = generate(model, [ids for ids in prompt_ids for _ in range(n)], max_new_tokens, temperature,
                           top_p, chat_stop_tokens(enc), generator)
        for i, messages in enumerate(chunk):
            candidates = samples[i * n:(i + 1) * n]
            scores = score_fn(messages, candidates)
            best = max(range(n), key=lambda j: scores[j])
            sequences.append(prompt_completion_sequence(prompt_ids[i], candidates[best]))
            best_scores.append(float(scores[best]))
    return sequences, best_scores


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("sft", args)
    data, out = Path(args.data), Path(args.out)
    model = build_model(config, runtime, args.init, args.seed)
    init_params = [p.detach().clone() for p in model.parameters()] if args.l2_init else []

    # data: conversations (or, for best-of-N, the reward model's pick of N samples), tokenized once
    records = training_conversations(data, args.capability, args.cross_domain, args.seed)
    if args.best_of_n:
        reward_model = load_reward_model(args.reward_model, runtime.device)
        generator = torch.Generator(runtime.device).manual_seed(args.seed)  # every rank samples the same set
        sequences, best_scores = best_of_n(
            whole_model(model, args.init, runtime), enc,
            [prompt_of(r) for r in random.Random(args.seed).sample(records, min(len(records), args.best_of_n_prompts))],
            args.best_of_n,
            lambda messages, completions: score(reward_model, enc, messages, completions),
            max(EVAL_MAX_NEW_TOKENS.values()), args.temperature, args.top_p, generator)
        print(f"best-of-{args.best_of_n}: {len(sequences)} prompts, mean best reward {np.mean(best_scores):.3f}")
        del reward_model
    else:
        sequences = [render(enc, record["messages"]) for record in records]
    sequences = fitting(sequences, args.seq_len, f"{data / 'sft'} ({args.capability})")
    if args.pretrain_mix:
        corpus = open_shard(data / "corpus.bin", enc)
        mean_tokens = np.mean([len(ids) for ids, _ in sequences])  # pretraining batches as long as SFT ones
        pretrain_rows = max(1, round(args.batch_size * mean_tokens / args.seq_len))

    if args.eval_before and runtime.is_main:
        evaluate_capability(whole_model(model, args.init, runtime), enc, data, args.capability, args.eval_batch_size)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)
    logger = Logger(out, runtime, start, args.steps)
    tokens_seen = 0
    for step in range(start, args.steps):
        lr = lr_factor(step, args.steps, args.warmup, 0, args.min_lr / args.lr, cosine=True)
        set_lr(optimizer, lr)
        pretraining = args.pretrain_mix > 0 and is_pretrain_step(step, args.pretrain_mix)
        if pretraining:
            batch = shard_batch(enc, corpus, step, pretrain_rows, args.seq_len, args.seed, runtime.rank,
                                runtime.world_size)
        else:
            indices = record_indices(len(sequences), step, args.batch_size, args.seed, runtime.rank, runtime.world_size)
            batch = pack(enc, [sequences[i] for i in indices], args.seq_len)
        batch = {k: v.to(runtime.device) for k, v in batch.items()}

        # mean CE over every scored token of the step on all ranks (FSDP averages gradients: hence world_size)
        n_local = (batch["targets"] != IGNORE).sum().item()
        n_targets = all_reduce_sum(n_local, runtime)
        with autocast(runtime):
            ce = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
        loss = ce * n_local * runtime.world_size / n_targets
        penalty = l2_to_init(model.parameters(), init_params, args.l2_init) if args.l2_init else torch.zeros(())
        (loss + penalty).backward()
        ce = all_reduce_sum(ce.item() * n_local, runtime) / n_targets
        grad_norm = optimizer_step(model, optimizer, ce, step, out, args.grad_clip)

        done = step + 1
        tokens_seen += all_reduce_sum((batch["doc_ids"] >= 0).sum().item(), runtime)
        logger.advance()
        if done % args.log_every == 0 or done == args.steps:
            l2 = {"l2": all_reduce_sum(penalty.item(), runtime)} if args.l2_init else {}
            logger.log(done, tokens_seen, loss=ce, lr=lr * args.lr, grad_norm=grad_norm, pretrain=pretraining, **l2)
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, model, optimizer, done, runtime)
    save_model(out, model, runtime)

    if runtime.is_main:
        metrics = evaluate_capability(whole_model(model, out, runtime), enc, data, args.capability,
                                      args.eval_batch_size)
        logger.log(args.steps, tokens_seen, **{f"eval_{name}": value for name, value in metrics.items()})
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
