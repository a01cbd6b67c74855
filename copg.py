"""
Contrastive Policy Gradient, CoPG (report §3.2.2.2, Flet-Berliac et al. 2024): the RL loss of every reward-
driven stage of the pipeline, offline on scored completions and online on fresh samples; with the hybrid SFT
loss (§3.3.4.2) and the L2-to-reference regulariser of polishing (§3.5). Appendix B for β and LRs.

For a prompt x and k ≥ 2 completions of any origin with rewards R(x, y_i), with the KL-regularised reward
R̃_i = R_i − β (log π(y_i|x) − log π_ref(y_i|x)) (log-probs summed over the completion's tokens):

    loss = 1/(k − 1) Σ_{i>j} (R̃_i − R̃_j)²

Gradients flow through both terms of each pair; there is no importance sampling, no clipping and no value
network. The loss is zero exactly when R̃ is the same for every completion, i.e. at π ∝ π_ref exp(R/β) on
the data's support: the KL-regularised optimum, offline too. On-policy its gradient is 2βk times the RLOO
estimator's (tests/test_copg.py checks both facts).

- Offline (`--mode offline`, DATA/copg/CAP.jsonl: {"messages", "completions": [k], "rewards": [k]}): reference
  log-probs computed once by the --init model and cached (prefopt.reference_logps: keyed by the sequences and
  the init weights), then CoPG steps over the groups.
- Online (`--mode online`, DATA/rl/CAP.jsonl: {"messages", "task", "check"}): each step samples k completions
  per prompt from the current policy with the KV-cache generator (model.generate, --temperature 1), scores
  them with `--reward verifier` (tasks.score: math answer, unit tests, instruction checks, ...) or
  `--reward rm:PATH` (reward.py's model), and takes one CoPG step on them. `--replay-size N` keeps the last N
  scored groups and adds --replay-batch of them to every step: off-policy data is fine for CoPG as it is.
  Reference log-probs of fresh samples come from a frozen copy of the --init weights held as a second
  Transformer (no gradients, no optimizer state: 4 bytes/parameter next to the policy's 16 in fp32 AdamW).
  It is the cheapest correct option: the L2 regulariser needs those weights anyway, and swapping them into
  the policy each step would cost two copies of the weights per step and a third copy's memory in between.
  Generation needs whole weights, so online mode runs in one process; offline mode runs under torchrun.
- Regularisers: `--l2-ref λ` adds λ‖θ − θ_ref‖² (§3.5); `--sft-weight w` adds w × CE on --sft-data (default
  DATA/sft/CAP.jsonl), the hybrid loss of §3.3.4.2 (code) and §3.5 (polishing).
- Logs: loss, mean reward of the step's fresh groups, `kl`: the mean of log π − log π_ref over the fresh
  samples before the step (online at temperature 1, an unbiased estimate of KL(π‖π_ref); offline, only the
  mean log-ratio on the data), generation samples/s and tokens/s, and the capability's eval metrics
  (sft.evaluate_capability) before (--eval-before) and after.

Appendix B, as in sft.py with every LR × LR_SCALE = 12 for the tiny preset; CoPG uses a constant LR:

| capability | report (App. B / §3.5)                                  | tiny defaults (steps x prompts 40 x 8)      |
|------------|---------------------------------------------------------|---------------------------------------------|
| code       | offline CoPG, β 0.06, LR 2e-6 constant (B.3)            | offline, k 4, β 0.06, LR 2.4e-5             |
| math       | CoPG, LR 2e-6 no decay (B.4); β not given               | online verifier, k 4, β 0.06 (ours), 2.4e-5 |
| others     | polishing: online CoPG, k 2, L2 + SFT (§3.5); β not given | online, k 2, β 0.1 (ours), LR 2.4e-5      |

Reads --init, DATA/tokenizer.json, the data file (and --sft-data, DATA/eval/CAP.jsonl, the reward model);
writes OUT/model.pt, config.json, metrics.jsonl, checkpoint.pt (a restarted run resumes exactly, except that
the replay buffer starts empty) and, offline, ref_logps.pt.

    python copg.py --capability math --init runs/tiny/sft-math --eval-before           # online, verifier
    python copg.py --capability code --init runs/tiny/sft-code --sft-weight 0.5        # offline + hybrid SFT
    python copg.py --capability instruct --reward rm:runs/tiny/reward --k 2 --l2-ref 1e-3 --sft-weight 0.1
    torchrun --nproc_per_node 8 copg.py --capability code --mode offline --init runs/r7b/soup ...
"""

import argparse
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import (Logger, all_reduce_sum, build_model, l2_to_init, load_checkpoint, lr_factor, make_optimizer,
                    open_stage, optimizer_step, save_checkpoint, save_model, set_lr, teardown, whole_model)
from data import (chat_stop_tokens, parse_reply, prompt_completion_sequence, read_jsonl, record_indices,
                  render_completion, render_prompt)
from model import generate
from prefopt import LR_SCALE, fitting_records, packed_logps, reference_logps, sft_sequences, sft_step_loss
from reward import load_reward_model
from reward import score as reward_model_score
from evaluate import EVAL_MAX_NEW_TOKENS, evaluate_capability, reply_text
from tasks import CAPABILITIES
from tasks import score as verifier_score

RECIPES = {  # report LRs before LR_SCALE; see the table above
    "code": dict(mode="offline", k=4, beta=0.06, lr=2e-6),
    "math": dict(mode="online", k=4, beta=0.06, lr=2e-6),
}
DEFAULT_RECIPE = dict(mode="online", k=2, beta=0.1, lr=2e-6)


def copg_loss(logps, ref_logps, rewards, beta):
    """Mean CoPG loss over prompts, for tensors [n_prompts, k] of completion log-probs (summed over tokens)
    under the policy and the reference, and their rewards."""
    if logps.dim() != 2 or logps.shape[1] < 2:
        raise ValueError(f"copg_loss needs [n_prompts, k >= 2] log-probs, got shape {tuple(logps.shape)}")
    k = logps.shape[1]
    regularised = rewards - beta * (logps - ref_logps)  # R̃, [n, k]
    differences = regularised[:, :, None] - regularised[:, None, :]  # R̃_i − R̃_j for every (i, j)
    pairs = torch.triu(torch.ones(k, k, dtype=torch.bool, device=logps.device), diagonal=1)  # each pair once
    return (differences[:, pairs] ** 2).sum(dim=1).mean() / (k - 1)


# -----------------------------------------------------------------------------
# Online sampling and rewards


def sample_groups(model, enc, records: list[dict], k: int, max_new_tokens: int, temperature: float, top_p: float,
                  generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """k completions per record's prompt from the current policy: (prompt ids per record, completions as token
    ids, record-major: completion j of record i is at i * k + j)."""
    prompts = [render_prompt(enc, record["messages"]) for record in records]
    completions = generate(model, [ids for ids in prompts for _ in range(k)], max_new_tokens, temperature, top_p,
                           chat_stop_tokens(enc), generator)
    return prompts, completions


def verifier_rewards(enc, records: list[dict], completions: list[list[int]], k: int) -> torch.Tensor:
    """tasks.score of each completion [n_records, k], graded on its parsed reply as evaluation grades it; the
    sandboxed code runs in parallel threads (tasks.run_python is thread-safe)."""
    jobs = [(records[i // k], reply_text(parse_reply(enc, ids))) for i, ids in enumerate(completions)]
    with ThreadPoolExecutor() as pool:
        rewards = list(pool.map(lambda job: verifier_score(*job), jobs))
    return torch.tensor(rewards, dtype=torch.float32).view(-1, k)


def reward_model_rewards(reward_model, enc, records: list[dict], completions: list[list[int]], k: int) -> torch.Tensor:
    """reward.score of each completion [n_records, k]."""
    return torch.tensor([reward_model_score(reward_model, enc, record["messages"], completions[i * k:(i + 1) * k])
                         for i, record in enumerate(records)], dtype=torch.float32)


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", default="math", choices=CAPABILITIES, help="picks the data, the recipe "
                                                                                   "and the eval set")
    parser.add_argument("--mode", choices=["offline", "online"], help="default: the recipe's")
    parser.add_argument("--init", help="parent model (default: runs/tiny/sft-CAP)")
    parser.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, copg/, rl/, sft/, eval/")
    parser.add_argument("--data-file", help="in DATA; default: copg/CAP.jsonl offline, rl/CAP.jsonl online")
    parser.add_argument("--out", help="default: runs/tiny/rl-CAP")
    parser.add_argument("--reward", default="verifier", help="online: 'verifier' (tasks.score) or rm:PATH "
                                                             "(a reward.py --out folder)")
    parser.add_argument("--k", type=int, help="online: completions per prompt (default: the recipe's)")
    parser.add_argument("--beta", type=float, help="KL regularisation β (default: the recipe's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="online sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="online nucleus sampling")
    parser.add_argument("--max-new-tokens", type=int, help="online: reply length limit (default: the eval's)")
    parser.add_argument("--replay-size", type=int, default=0, help="online: keep the last N scored groups")
    parser.add_argument("--replay-batch", type=int, help="online: replayed groups per step (default: --batch-size)")
    parser.add_argument("--l2-ref", type=float, default=0.0, help="λ of the penalty λ‖θ − θ_ref‖² (§3.5)")
    parser.add_argument("--sft-weight", type=float, default=0.0, help="weight of the hybrid SFT loss")
    parser.add_argument("--sft-data", help="SFT JSONL in DATA for it, or all: every sft/*.jsonl "
                                           "(default: sft/CAP.jsonl)")
    parser.add_argument("--sft-batch-size", type=int, default=8, help="conversations per step for the SFT loss")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts (groups) per step and process")
    parser.add_argument("--seq-len", type=int, default=256, help="packed row length")
    parser.add_argument("--lr", type=float, help="constant LR after warmup (default: the recipe's x LR_SCALE)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--eval-before", action="store_true", help="also evaluate the --init model first")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    recipe = RECIPES.get(args.capability, DEFAULT_RECIPE)
    args.mode, args.k, args.beta = args.mode or recipe["mode"], args.k or recipe["k"], \
        recipe["beta"] if args.beta is None else args.beta
    args.lr = recipe["lr"] * LR_SCALE if args.lr is None else args.lr
    args.init = args.init or f"runs/tiny/sft-{args.capability}"
    args.out = args.out or f"runs/tiny/rl-{args.capability}"
    args.data_file = args.data_file or f"{'copg' if args.mode == 'offline' else 'rl'}/{args.capability}.jsonl"
    args.sft_data = args.sft_data or f"sft/{args.capability}.jsonl"
    args.max_new_tokens = args.max_new_tokens or EVAL_MAX_NEW_TOKENS[args.capability]
    args.replay_batch = args.batch_size if args.replay_batch is None else args.replay_batch
    if args.reward != "verifier" and not args.reward.startswith("rm:"):
        parser.error(f"--reward must be 'verifier' or rm:PATH, got {args.reward!r}")
    if args.k < 2:
        parser.error("CoPG needs --k >= 2 completions per prompt")
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("copg", args)
    data, out = Path(args.data), Path(args.out)
    online = args.mode == "online"
    if online and runtime.mesh is not None:
        raise ValueError("online CoPG generates with whole weights: run it in one process (offline mode shards)")
    model = build_model(config, runtime, args.init, args.seed)

    # data: offline, scored groups with cached reference log-probs; online, prompts with a verifier or an RM
    path = data / args.data_file
    if online:
        records = read_jsonl(path, "prompt")
        fits = [r for r in records if len(render_prompt(enc, r["messages"])) + args.max_new_tokens <= args.seq_len]
        if len(fits) < len(records):
            print(f"{path}: left out {len(records) - len(fits)} of {len(records)} prompts too long for "
                  f"--max-new-tokens {args.max_new_tokens} in --seq-len {args.seq_len}")
        records = fits
        reference = build_model(config, runtime, args.init).requires_grad_(False)
        reward_model = load_reward_model(args.reward[3:], runtime.device) if args.reward.startswith("rm:") else None
    else:
        records = read_jsonl(path, "group")
        if len({len(r["completions"]) for r in records}) > 1:
            raise ValueError(f"{path}: groups of different sizes; offline CoPG batches need one k")
        groups = [[prompt_completion_sequence(*render_completion(enc, r["messages"], c)) for c in r["completions"]]
                  for r in records]
        records, groups = fitting_records(records, groups, args.seq_len, str(path))
        args.k = len(groups[0])
        ref_logps = reference_logps(model, enc, [s for group in groups for s in group], args.init, False,
                                    out / "ref_logps.pt", runtime, args.seq_len).view(-1, args.k)
        rewards_of = torch.tensor([r["rewards"] for r in records], dtype=torch.float32)
        reference = None
    ref_params = list(reference.parameters()) if reference is not None else \
        [p.detach().clone() for p in model.parameters()] if args.l2_ref else []
    if args.sft_weight:
        sft_data = sft_sequences(enc, data, args.sft_data, args.seq_len)
    if args.eval_before and runtime.is_main:
        print("before CoPG:")
        evaluate_capability(whole_model(model, args.init, runtime), enc, data, args.capability, args.eval_batch_size)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)
    logger = Logger(out, runtime, start, args.steps)
    replay = deque(maxlen=args.replay_size)  # (sequences [k], ref log-probs [k], rewards [k]) per group
    tokens_seen, generation_seconds, samples = 0, 0.0, 0
    for step in range(start, args.steps):
        lr = lr_factor(step, args.steps, args.warmup, 0, 1.0, cosine=False)
        set_lr(optimizer, lr)
        indices = record_indices(len(records), step, args.batch_size, args.seed, runtime.rank, runtime.world_size)
        batch_records = [records[i] for i in indices]
        metrics = {}
        if online:  # sample k per prompt (seeded by the step: exact resume), score, reference log-probs
            generator = torch.Generator(runtime.device).manual_seed(args.seed * 1_000_003 + step)
            started = time.perf_counter()
            prompts, completions = sample_groups(model, enc, batch_records, args.k, args.max_new_tokens,
                                                 args.temperature, args.top_p, generator)
            seconds = time.perf_counter() - started
            generation_seconds, samples = generation_seconds + seconds, samples + len(completions)
            metrics |= {"samples_per_s": len(completions) / seconds,
                        "gen_tokens_per_s": sum(map(len, completions)) / seconds,
                        "completion_tokens": sum(map(len, completions)) / len(completions)}
            rewards = (verifier_rewards(enc, batch_records, completions, args.k) if reward_model is None else
                       reward_model_rewards(reward_model, enc, batch_records, completions, args.k))
            sequences = [prompt_completion_sequence(prompts[i // args.k], ids) for i, ids in enumerate(completions)]
            with torch.no_grad():
                ref = packed_logps(reference, enc, sequences, args.seq_len, runtime)[0].view(-1, args.k).cpu()
            fresh = [(sequences[i * args.k:(i + 1) * args.k], ref[i], rewards[i]) for i in range(len(indices))]
            replayed = random.Random(args.seed * 1_000_003 + step).sample(list(replay), min(args.replay_batch,
                                                                                            len(replay)))
            replay.extend(fresh)
            train_groups = fresh + replayed
        else:
            train_groups = [(groups[i], ref_logps[i], rewards_of[i]) for i in indices]
        sequences = [s for group, _, _ in train_groups for s in group]
        ref = torch.stack([r for _, r, _ in train_groups]).to(runtime.device)
        rewards = torch.stack([r for _, _, r in train_groups]).to(runtime.device)

        logps = packed_logps(model, enc, sequences, args.seq_len, runtime)[0].view(-1, args.k)
        loss = copg_loss(logps, ref, rewards, args.beta)
        sft_loss = penalty = torch.zeros((), device=runtime.device)
        if args.sft_weight:  # the hybrid loss: CE on a batch of SFT conversations
            sft_loss = sft_step_loss(model, enc, sft_data, step, args, runtime)
        if args.l2_ref:
            penalty = l2_to_init(model.parameters(), ref_params, args.l2_ref)
        (loss + args.sft_weight * sft_loss + penalty).backward()
        n_fresh = len(indices)  # KL(π‖π_ref) estimate on this step's own samples (online: drawn from π)
        log_ratio = (logps[:n_fresh] - ref[:n_fresh]).detach()
        mean = lambda value: all_reduce_sum(value, runtime) / runtime.world_size  # noqa: E731
        loss, sft_loss = mean(loss.item()), mean(sft_loss.item())
        grad_norm = optimizer_step(model, optimizer, loss + sft_loss, step, out, args.grad_clip)

        done = step + 1
        tokens_seen += all_reduce_sum(sum(len(ids) for ids, _ in sequences), runtime)
        logger.advance()
        if done % args.log_every == 0 or done == args.steps:
            logger.log(done, tokens_seen, loss=loss, reward=mean(rewards[:n_fresh].mean().item()),
                       kl=mean(log_ratio.mean().item()), sft_loss=sft_loss, l2=mean(penalty.item()),
                       lr=lr * args.lr, grad_norm=grad_norm, replay=len(replay), **metrics)
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, model, optimizer, done, runtime)
    save_model(out, model, runtime)

    if runtime.is_main:
        if samples:
            print(f"generation: {samples} samples in {generation_seconds:.1f} s, {samples / generation_seconds:.1f} "
                  f"samples/s")
        print("after CoPG:")
        metrics = evaluate_capability(whole_model(model, out, runtime), enc, data, args.capability,
                                      args.eval_batch_size)
        logger.log(args.steps, tokens_seen, **{f"eval_{name}": value for name, value in metrics.items()})
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
