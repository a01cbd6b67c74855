"""
Supervised fine-tuning (report §3.2.1): the instruct model, the capability experts (§3.3, §3.4.3.2), the
few low-LR steps on top of a merge (--capability all, §4.9.2) and best-of-N SFT (§3.5), with an evaluation of
the capability at the end.

    loss = CE(chatbot tokens only) + λ ‖θ − θ₀‖²          (θ₀ = the --init weights, λ = --l2-init)

How this differs from the report:
1. Appendix B's LRs × common.SFT_LR_SCALE (48) for the tiny preset; instruct and RAG, which Appendix B leaves
   out, take the reasoning recipe (B.4). Steps and batches give 2-3 epochs of the tiny world's data.
2. Experts see as many other-capability conversations as their own (--cross-domain 1.0): the report's "small
   amount" of cross-domain data (§3.4.3.2) was not enough to keep tiny experts mergeable. The instruct model,
   the experts' common init, gets half as many from the tool-use and long-context experts' data, for
   §3.4.3.2's two reasons: it trains the tool-call and thinking tokens the experts use (a merge then averages
   trained embeddings, never a trained one with an untrained one), and it makes the init long-context capable.
3. Best-of-N ranks N samples per prompt with the reward model and trains two epochs on the best (§3.5), at
   the LR of the SFT after a merge (§4.9.2; the report gives none). --verified ranks them by the verifier
   instead and keeps only samples that pass: code's stage 2 (§3.3.4.2), with stage 1's recipe (B.3.1: its
   LR, as many other capabilities' conversations, pretraining batches). On the capability's samples alone,
   the tiny code expert fell from 0.686 to 0.430 on instruct and from 0.292 to 0.021 on RAG (RESULTS.md).
4. Every 4th step is a pretraining batch (PRETRAIN_MIX, ours): it keeps the language model the experts share.

Under torchrun best-of-N's processes each sample and score a share of the prompts on the sharded model, and
every process trains on all their picks: the set one process would pick, from other random draws.

Reads --init, DATA/tokenizer.json, DATA/sft/CAP.jsonl (+ the other capabilities'), DATA/eval/CAP.jsonl,
DATA/corpus.bin; writes OUT/model.pt, config.json, metrics.jsonl and checkpoint.pt (a
restarted run resumes exactly).

    python sft.py --capability instruct       # runs/tiny/pretrain -> runs/tiny/instruct-sft
    python sft.py --capability code           # runs/tiny/instruct -> runs/tiny/sft-code
    python sft.py --capability all            # runs/tiny/sft-merge -> runs/tiny/sft-soup
    python sft.py --init runs/tiny/rl-soup --out runs/tiny/bon --best-of-n 4 --reward-model runs/tiny/reward
    python sft.py --capability code --init runs/tiny/sft-code-stage1 --best-of-n 4 --verified
    torchrun --nproc_per_node 8 sft.py --capability code --init runs/r7b/instruct --data data/real
    torchrun --nproc_per_node 8 sft.py --init runs/r7b/rl-soup --out runs/r7b/bon --best-of-n 4 \\
        --reward-model runs/r7b/reward --data data/real
"""

import math
import random
from pathlib import Path

import numpy as np
import torch

from common import (SFT_LR_SCALE, Logger, add_run_flags, argument_parser, build_model, drop_too_long,
                    generation_model, l2_to_init, load_checkpoint, lr_factor, make_optimizer, open_stage,
                    optimizer_step, save_checkpoint, save_model, set_lr, to_device)
from data import (END_OF_TURN, IGNORE, chat_stop_tokens, open_shard, pack, prompt_completion_sequence,
                  record_indices, render, render_prompt, shard_batch)
from records import read_jsonl
from distributed import (Runtime, all_gather_objects, all_reduce_sum, autocast, generate_sharded, rank_seed,
                         teardown)
from evaluate import EVAL_MAX_NEW_TOKENS, evaluate_capability, verifier_rewards
from judges import load_reward_model, reward_model_scores
from tasks import CAPABILITIES

# Each capability's Appendix B LRs (before SFT_LR_SCALE) and weight decay; tiny steps, batch (conversations)
# and row length. RAG runs 400 steps: with half of each batch other capabilities' data, it fell to 0 on its
# metric at 200 (RESULTS.md).
RECIPES = {
    # B.4; with tool-use and long-context conversations (§3.4.3.2), which make the experts mergeable: the
    # math expert interpolated halfway back to an instruct model with a share of every capability kept 0.25
    # of its 0.52 accuracy, 0.02 of 0.42 from one without. Not code, multilingual or safety: from code the
    # instruct model learnt the tiny world's code as well as the code expert does (pass@1 1.0; RESULTS.md).
    "instruct": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=300, batch_size=32, seq_len=256,
                     cross_domain=0.5, cross_domain_from=("rag", "math", "longctx")),
    "rag": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=400, batch_size=16, seq_len=256),  # B.4
    # B.2
    "multilingual": dict(lr=2.5e-5, min_lr=1.25e-5, weight_decay=0.1, steps=200, batch_size=32, seq_len=256),
    "code": dict(lr=5e-5, min_lr=5e-6, weight_decay=0.1, steps=200, batch_size=32, seq_len=256),  # B.3
    # B.4; other capabilities' conversations a quarter as many as its own: a math expert trained on math alone
    # forgets every other format, and its change, at the weight math needs in a soup, took RAG and code to 0;
    # with the quarter it kept them (0.29 and 0.92 at math's λ = 1) and most of its own accuracy (0.58 of 0.62
    # on the weight search's prompts; with other data in half of each batch 0.33: RESULTS.md). Rows of 512
    # hold three ~160-token conversations where rows of 256 held one (39 % padding): fewer tokens per step.
    "math": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=300, batch_size=32, seq_len=512,
                 cross_domain=0.25),
    # B.5; rows of 2x the base context (1x prompts two to a row), and needles only: with other data in half
    # of each batch the needle recall of the tiny model fell from 0.33 to 0.13. 400 steps (B.5 gives none):
    # recall rose with them, 0.29 / 0.41 / 0.42 / 0.48 at 200 / 300 / 400 / 600 on world 0, 0.35 / 0.41 /
    # 0.48 at 200 / 300 / 400 on world 1; at 4x 0.11 and 0.28 at 200, 0.31 and 0.33 at 400 (RESULTS.md)
    "longctx": dict(lr=2.5e-5, min_lr=2.5e-6, weight_decay=0.01, steps=400, batch_size=16, seq_len=512,
                    cross_domain=0.0),
    # B.6
    "safety": dict(lr=1e-4, min_lr=1e-5, weight_decay=1e-3, steps=150, batch_size=32, seq_len=256),
    # §4.9.2: a few SFT steps on a merge, at an LR 10x below the main SFT's (B.4), on every capability's
    # conversations. They surface what the merge holds (SFT merge -> soup: RAG 0 -> 0.29, code 0.56 -> 0.92;
    # RESULTS.md), not what it lost.
    "all": dict(lr=2.5e-6, min_lr=2.5e-7, weight_decay=0.01, steps=100, batch_size=32, seq_len=256),
}
# Every SFT run but best-of-N spends this share of its steps on pretraining batches (ours). Without them the
# instruct SFT took val bpb from 0.28 to 0.50 and erased the copying the experts build on (a multilingual
# expert from it: 0.23 exact, 0.54 with the mix), and the experts drifted to bpb 0.43-0.97; with them every
# expert stays at 0.28 and learns more (multilingual 0.52 -> 0.85, RAG 0.40 -> 0.46, math 0.38 -> 0.42;
# RESULTS.md).
PRETRAIN_MIX = 0.25


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    what = parser.add_argument_group("what to train")
    what.add_argument("--capability", default="instruct", choices=CAPABILITIES + ("all",),
                      help="picks the data and recipe; all: every capability's data, at a low LR, for a "
                           "merged model (§4.9.2)")
    what.add_argument("--init", help="parent model folder (default: runs/tiny/pretrain for instruct, "
                                     "runs/tiny/instruct for the experts)")
    what.add_argument("--data", default="data/tiny",
                      help="folder with tokenizer.json, sft/, eval/ (corpus.bin)")
    what.add_argument("--out", help="default: runs/tiny/instruct-sft, or runs/tiny/sft-CAP for an expert")
    optim = parser.add_argument_group("optimisation (defaults: the capability's recipe)")
    optim.add_argument("--steps", type=int, help="optimizer steps")
    optim.add_argument("--batch-size", type=int, help="conversations per step and process")
    optim.add_argument("--seq-len", type=int, help="packed row length; longer conversations are left out")
    optim.add_argument("--lr", type=float, help="peak LR (default: the recipe's x SFT_LR_SCALE)")
    optim.add_argument("--min-lr", type=float,
                       help="final LR of the cosine (default: the recipe's x SFT_LR_SCALE)")
    optim.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay")
    optim.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    regular = parser.add_argument_group("regularisers (§3.2.1, §3.4.3.2)")
    regular.add_argument("--cross-domain", type=float,
                         help="other capabilities' conversations, as a share of this one's (default: "
                              "the recipe's, else 1.0)")
    regular.add_argument("--cross-domain-from", nargs="+", choices=CAPABILITIES, metavar="CAP",
                         help="the capabilities they come from (default: the recipe's, else every other; "
                              "every other with --best-of-n)")
    regular.add_argument("--l2-init", type=float, default=0.0,
                         help="λ of the penalty λ‖θ − θ₀‖² to the init weights")
    regular.add_argument("--pretrain-mix", type=float,
                         help=f"share of steps on pretraining batches, evenly spaced (default: "
                              f"{PRETRAIN_MIX}, 0 with --best-of-n)")
    bon = parser.add_argument_group("best-of-N SFT (§3.5)")
    bon.add_argument("--best-of-n", type=int, help="train on the best of N samples per prompt")
    bon.add_argument("--best-of-n-prompts", type=int, default=512,
                     help="sample for this many of the data's prompts (seeded choice)")
    bon.add_argument("--reward-model", help="reward.py --out folder that ranks the samples")
    bon.add_argument("--verified", action="store_true",
                     help="rank the samples by the capability's verifier instead, on the prompts of "
                          "DATA/rl/CAP.jsonl, and keep only those that pass every check: high-quality data "
                          "from the best expert (§3.3.4.2 stage 2)")
    bon.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    bon.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    add_run_flags(parser, log_every=10, save_every=100, seed_help="data order and sampling")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.capability]
    # two epochs of the samples: more overfits the model's own replies
    if args.best_of_n and args.steps is None:
        args.steps = math.ceil(2 * args.best_of_n_prompts / (args.batch_size or recipe["batch_size"]))
    for name in ("steps", "batch_size", "seq_len", "weight_decay"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    # polishing's best-of-N (§3.5) trains the RL soup, a merge: at the LR of the SFT after a merge (§4.9.2).
    # At the recipe's own LR it took the tiny RL soup's capability mean from 0.569 to 0.481, at this one to
    # 0.551 (RESULTS.md)
    lr_recipe = RECIPES["all"] if args.reward_model else recipe
    args.lr = lr_recipe["lr"] * SFT_LR_SCALE if args.lr is None else args.lr
    args.min_lr = lr_recipe["min_lr"] * SFT_LR_SCALE if args.min_lr is None else args.min_lr
    args.init = args.init or {"instruct": "runs/tiny/pretrain", "all": "runs/tiny/sft-merge"}.get(
        args.capability, "runs/tiny/instruct")
    args.out = args.out or {"instruct": "runs/tiny/instruct-sft", "all": "runs/tiny/sft-soup"}.get(
        args.capability, f"runs/tiny/sft-{args.capability}")
    if args.cross_domain is None:
        args.cross_domain = recipe.get("cross_domain", 0.0 if args.capability == "all" else 1.0)
    if args.cross_domain_from is None and not args.best_of_n:
        args.cross_domain_from = recipe.get("cross_domain_from")
    if (args.best_of_n is None) != (args.reward_model is None and not args.verified):
        parser.error("--best-of-n goes with one of --reward-model and --verified")
    if args.reward_model and args.verified:
        parser.error("--reward-model and --verified both rank the samples: give one")
    if args.pretrain_mix is None:
        args.pretrain_mix = 0.0 if args.best_of_n and not args.verified else PRETRAIN_MIX
    if not 0 <= args.pretrain_mix < 1:
        parser.error(f"--pretrain-mix must be in [0, 1), got {args.pretrain_mix}")
    return args


# -----------------------------------------------------------------------------
# Data and best-of-N


def training_conversations(data: Path, capability: str, cross_domain: float, seed: int,
                           sources=None, n_own: int | None = None) -> list[dict]:
    """DATA/sft/CAP.jsonl, plus round(cross_domain x its size) conversations drawn evenly (seeded) from the
    other capabilities' files that exist, or from those of `sources` (§3.4.3.2: a little cross-domain data
    keeps the experts compatible). capability "all": every capability's file. With `n_own`, the others only,
    as a share of n_own own conversations that come from elsewhere (verified best-of-N samples)."""
    if capability == "all":
        return [r for cap in CAPABILITIES if (data / "sft" / f"{cap}.jsonl").is_file()
                for r in read_jsonl(data / "sft" / f"{cap}.jsonl", "sft")]
    records = read_jsonl(data / "sft" / f"{capability}.jsonl", "sft") if n_own is None else []
    others = [cap for cap in sources or CAPABILITIES
              if cap != capability and (data / "sft" / f"{cap}.jsonl").is_file()]
    per_other = round(cross_domain * (len(records) if n_own is None else n_own) / max(1, len(others)))
    rng = random.Random(seed)
    for cap in others:
        pool = read_jsonl(data / "sft" / f"{cap}.jsonl", "sft")
        records += rng.sample(pool, min(len(pool), per_other))
    return records


def is_pretrain_step(step: int, share: float) -> bool:
    """Evenly spaced pretraining steps: a share `share` of all steps, the first at step ⌈1/share⌉ − 1."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def prompt_of(record: dict) -> list[dict]:
    """The messages before a conversation's last chatbot turn: the prompt that turn answers."""
    last = max(i for i, message in enumerate(record["messages"]) if message["role"] == "chatbot")
    return record["messages"][:last]


def best_of_n(model, enc, prompts: list[list[dict]], n: int, score_fn, max_new_tokens: int,
              temperature: float, top_p: float, generator: torch.Generator, runtime: Runtime,
              batch_size: int = 16, min_score: float | None = None) -> tuple[list, list[float]]:
    """Best-of-N (§3.5): n samples per prompt, ranked by score_fn(i, completions) -> list of floats, for
    prompts[i] (a completion is the token ids sampled after data.render_prompt). Returns the (ids, loss mask)
    training sequences of each prompt's highest-scored sample, and those scores, in prompt order. Only
    samples that end their turn are candidates (SFT on one cut at the length limit teaches the model not to
    stop); a prompt without one, or whose best scores below `min_score`, is left out.

    Under FSDP rank r samples and scores prompts r, r + P, r + 2P, ... (P processes) with its own generator,
    and every rank returns every rank's picks. The list is padded to a multiple of P with repeats, whose
    samples are dropped, so that all ranks generate as many batches (generate_sharded)."""
    end_of_turn, world = enc.encode_single_token(END_OF_TURN), runtime.world_size
    mine = range(runtime.rank, math.ceil(len(prompts) / world) * world, world)
    picks = []   # (prompt index, sequence, score)
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        prompt_ids = [render_prompt(enc, prompts[i % len(prompts)]) for i in indices]
        samples = generate_sharded(model, [ids for ids in prompt_ids for _ in range(n)], max_new_tokens,
                                   temperature, top_p, chat_stop_tokens(enc), generator, runtime)
        for row, (i, ids) in enumerate(zip(indices, prompt_ids)):
            candidates = [c for c in samples[row * n:(row + 1) * n] if c and c[-1] == end_of_turn]
            if i >= len(prompts) or not candidates:
                continue
            scores = score_fn(i, candidates)
            best = max(range(len(candidates)), key=lambda j: scores[j])
            if min_score is not None and scores[best] < min_score:
                continue
            picks.append((i, prompt_completion_sequence(ids, candidates[best]), float(scores[best])))
    picks = sorted((pick for rank_picks in all_gather_objects(picks, runtime) for pick in rank_picks),
                   key=lambda pick: pick[0])
    return [sequence for _, sequence, _ in picks], [score for _, _, score in picks]


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("sft", args)
    data, out = Path(args.data), Path(args.out)
    model = build_model(config, runtime, args.init, args.seed)
    init_params = [p.detach().clone() for p in model.parameters()] if args.l2_init else []

    # data: conversations, or for best-of-N each prompt's best sample: by the reward model, or (--verified)
    # one that passes the checks of an RL prompt; tokenized once
    if args.verified:
        records = read_jsonl(data / "rl" / f"{args.capability}.jsonl", "prompt")
    else:
        records = training_conversations(data, args.capability, args.cross_domain, args.seed,
                                         args.cross_domain_from)
    if args.best_of_n:
        chosen = random.Random(args.seed).sample(records, min(len(records), args.best_of_n_prompts))
        if args.verified:
            prompts, max_new_tokens = [r["messages"] for r in chosen], EVAL_MAX_NEW_TOKENS[args.capability]
            score_fn = lambda i, completions: verifier_rewards(  # noqa: E731
                enc, [chosen[i]] * len(completions), completions)
        else:   # prompts from every capability (--cross-domain)
            prompts, max_new_tokens = [prompt_of(r) for r in chosen], max(EVAL_MAX_NEW_TOKENS.values())
            reward_model = load_reward_model(args.reward_model, runtime.device)
            score_fn = lambda i, completions: reward_model_scores(  # noqa: E731
                reward_model, enc, prompts[i], completions)
        generator = torch.Generator(runtime.device).manual_seed(rank_seed(args.seed, runtime))
        sequences, best_scores = best_of_n(model, enc, prompts, args.best_of_n, score_fn, max_new_tokens,
                                           args.temperature, args.top_p, generator, runtime,
                                           min_score=1.0 if args.verified else None)
        if runtime.is_main:
            print(f"best-of-{args.best_of_n}: {len(sequences)} of {len(prompts)} prompts with a sample that "
                  f"ends its turn{' and passes' if args.verified else ''}, mean best reward "
                  f"{np.mean(best_scores) if best_scores else float('nan'):.3f}")
        if not sequences:   # nothing to imitate: the model goes on unchanged
            args.steps = 0
        elif args.verified:   # stage 1's mix: as many other capabilities' conversations (--cross-domain)
            sequences += [render(enc, record["messages"]) for record in training_conversations(
                data, args.capability, args.cross_domain, args.seed, args.cross_domain_from, len(sequences))]
        reward_model = score_fn = None   # the reward model's memory is the training's
    else:
        sequences = [render(enc, record["messages"]) for record in records]
    if sequences or not args.best_of_n:
        sequences = drop_too_long(sequences, [len(ids) for ids, _ in sequences], args.seq_len,
                                  f"{data / 'sft'} ({args.capability})")
    if args.pretrain_mix and args.steps:
        corpus = open_shard(data / "corpus.bin", enc)
        mean_tokens = np.mean([len(ids) for ids, _ in sequences])  # pretraining batches as long as SFT ones
        pretrain_rows = max(1, round(args.batch_size * mean_tokens / args.seq_len))

    evaluated = CAPABILITIES if args.capability == "all" else (args.capability,)
    if args.eval_before and runtime.is_main:
        generator = generation_model(model, args.init, runtime)
        for capability in evaluated:
            evaluate_capability(generator, enc, data, capability, args.eval_batch_size)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)
    logger = Logger(out, runtime, start, args.steps)
    tokens_seen = 0
    for step in range(start, args.steps):
        lr = lr_factor(step, steps=args.steps, warmup=args.warmup, cooldown=0,
                       min_ratio=args.min_lr / args.lr, cosine=True)
        set_lr(optimizer, lr)
        pretraining = args.pretrain_mix > 0 and is_pretrain_step(step, args.pretrain_mix)
        if pretraining:
            batch = shard_batch(enc, corpus, step, pretrain_rows, args.seq_len, args.seed, runtime.rank,
                                runtime.world_size)
        else:
            indices = record_indices(len(sequences), step, args.batch_size, args.seed, runtime.rank,
                                     runtime.world_size)
            batch = pack(enc, [sequences[i] for i in indices], args.seq_len)
        batch = to_device(batch, runtime.device)

        # mean CE over every scored token of the step on all ranks (FSDP averages gradients: hence world_size)
        n_local = (batch["targets"] != IGNORE).sum().item()
        n_targets = all_reduce_sum(n_local, runtime)
        with autocast(runtime):
            ce = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
        loss = ce * n_local * runtime.world_size / n_targets
        penalty = (l2_to_init(model.parameters(), init_params, args.l2_init) if args.l2_init
                   else torch.zeros(()))
        (loss + penalty).backward()
        ce = all_reduce_sum(ce.item() * n_local, runtime) / n_targets
        grad_norm = optimizer_step(model, optimizer, ce, step, out, args.grad_clip)

        done = step + 1
        tokens_seen += all_reduce_sum((batch["doc_ids"] >= 0).sum().item(), runtime)
        logger.advance()
        if done % args.log_every == 0 or done == args.steps:
            l2 = {"l2": all_reduce_sum(penalty.item(), runtime)} if args.l2_init else {}
            logger.log(done, tokens_seen, loss=ce, lr=lr * args.lr, grad_norm=grad_norm, pretrain=pretraining,
                       **l2)
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, model, optimizer, done, runtime)
    save_model(out, model, runtime)

    if runtime.is_main and not args.no_eval:
        generator, metrics = generation_model(model, out, runtime), {}
        for capability in evaluated:  # one capability's metrics are eval_NAME, "all"'s eval_CAP_NAME
            prefix = "eval_" if len(evaluated) == 1 else f"eval_{capability}_"
            results = evaluate_capability(generator, enc, data, capability, args.eval_batch_size)
            metrics |= {prefix + name: value for name, value in results.items()}
        logger.log(args.steps, tokens_seen, **metrics)
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
