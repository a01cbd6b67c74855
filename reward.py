"""
Bradley–Terry reward model with soft labels (report §3.2.3), trained in two stages on packed preference pairs.
A scalar head reads the final hidden state of each reply's last token: r = head(h_last), judges.RewardModel.

    loss = −p log σ(r_w − r_l) − (1 − p) log σ(r_l − r_w)        (p = P(y_w ≻ y_l), a soft label)

How this differs from the report:
1. Batch 32 at 1.92e-3, then 8 at 1.44e-4: the report's 1024 at 4e-5, then 16 at 3e-6, LRs × SFT_LR_SCALE.
2. No left-padding to align the pairs' last tokens and no per-row balancing: the reward is read at each
   sequence's own last token wherever it sits in a row (document masks make it independent of its place), and
   the loss is the mean over pairs, so every pair weighs the same however rows are filled.

Stage 1: one epoch of a large, noisier set (labels shrunk toward ½, 15 % flipped); stage 2: one of a small
clean set (reward models memorise and collapse on a second epoch, §3.2.3). Held-out accuracy after each.

Reads --init, DATA/tokenizer.json, DATA/pref/rm_stage{1,2}.jsonl; writes OUT/model.pt (the trunk, loadable as
a Transformer), OUT/head.pt, config.json, metrics.jsonl and checkpoint.pt (a restarted run resumes exactly).

    python reward.py                                   # runs/tiny/instruct-sft -> runs/tiny/reward
    torchrun --nproc_per_node 8 reward.py --init runs/r7b/instruct --data data/real --batch-size 128
"""

import math
from pathlib import Path

import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from common import (Logger, add_run_flags, argument_parser, atomic_save, build_model, load_checkpoint,
                    lr_factor, make_optimizer, open_stage, optimizer_step, save_checkpoint, save_model,
                    set_lr, to_device)
from data import pair_batch, record_indices
from records import read_jsonl
from distributed import autocast, teardown
from judges import RewardModel, pairwise_accuracy, reward_loss


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    what = parser.add_argument_group("what to train")
    what.add_argument("--init", default="runs/tiny/instruct-sft",
                      help="the model the reward model starts from")
    what.add_argument("--data", default="data/tiny", help="folder with tokenizer.json and the pair files")
    what.add_argument("--stage1", default="pref/rm_stage1.jsonl",
                      help="stage 1 pairs (large, noisier), in DATA")
    what.add_argument("--stage2", default="pref/rm_stage2.jsonl",
                      help="stage 2 pairs (small, clean), in DATA")
    what.add_argument("--eval-pairs", default="eval/rm_pairs.jsonl", help="held-out pairs, in DATA")
    what.add_argument("--out", default="runs/tiny/reward")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=32, help="stage 1 pairs per step and process")
    optim.add_argument("--lr", type=float, default=1.92e-3,
                       help="stage 1 peak LR (cosine to --min-lr-ratio x)")
    optim.add_argument("--stage1-epochs", type=float, default=1.0, help="passes over the stage 1 pairs")
    optim.add_argument("--stage2-batch-size", type=int, default=8, help="stage 2 pairs per step and process")
    optim.add_argument("--stage2-lr", type=float, default=1.44e-4, help="stage 2 peak LR")
    optim.add_argument("--stage2-epochs", type=float, default=1.0, help="passes over the stage 2 pairs")
    optim.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="end of each stage's cosine / its peak")
    optim.add_argument("--warmup", type=int, default=10, help="warmup steps of each stage")
    optim.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    optim.add_argument("--seq-len", type=int, default=256, help="packed row length")
    add_run_flags(parser, log_every=10, save_every=100, seed_help="data order", generation=False)
    return parser.parse_args(argv)


def full_state(module: nn.Module) -> dict:
    """A module's state dict with FSDP shards gathered (a plain copy in one process)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu()
            for k, v in module.state_dict().items()}


def main(argv=None):
    args = parse_args(argv)
    runtime, enc, parent, config = open_stage("reward", args)
    data, out = Path(args.data), Path(args.out)
    stages = [read_jsonl(data / args.stage1, "pair"), read_jsonl(data / args.stage2, "pair")]
    eval_pairs = read_jsonl(data / args.eval_pairs, "pair")

    # model: the trunk from --init, a zero-initialised head (every pair starts at loss log 2); under FSDP the
    # head is its own (tiny) FSDP unit, so its gradient is averaged over ranks like the trunk's
    trunk = build_model(config, runtime, args.init, args.seed)
    head = nn.Linear(config.dim, 1, bias=False, device=runtime.device)
    nn.init.zeros_(head.weight)
    if runtime.mesh is not None:
        fully_shard(head, mesh=runtime.mesh)
    reward_model = RewardModel(trunk, head)
    optimizer = make_optimizer(reward_model, args.lr, args.weight_decay)  # the head: no decay, like the norms
    start = load_checkpoint(out, reward_model, optimizer, runtime)

    # the plan: (pairs, batch size, peak LR, steps) per stage; a global step s belongs to the stage it
    # falls in
    plan = []
    for pairs, batch_size, lr, epochs in ((stages[0], args.batch_size, args.lr, args.stage1_epochs),
                                          (stages[1], args.stage2_batch_size, args.stage2_lr,
                                           args.stage2_epochs)):
        plan.append((pairs, batch_size, lr,
                     max(1, math.ceil(epochs * len(pairs) / (batch_size * runtime.world_size)))))
    total_steps = sum(steps for *_, steps in plan)
    logger = Logger(out, runtime, start, total_steps)
    stage_start, tokens_seen = 0, 0
    for stage, (pairs, batch_size, peak_lr, steps) in enumerate(plan, 1):
        for step in range(max(start, stage_start), stage_start + steps):
            local_step = step - stage_start
            lr = peak_lr * lr_factor(local_step, steps=steps, warmup=args.warmup, cooldown=0,
                                     min_ratio=args.min_lr_ratio, cosine=True)
            set_lr(optimizer, lr / args.lr)  # base LRs are stage 1's peak
            indices = record_indices(len(pairs), local_step, batch_size, args.seed + stage, runtime.rank,
                                     runtime.world_size)
            batch = to_device(pair_batch(enc, [pairs[i] for i in indices], args.seq_len), runtime.device)
            with autocast(runtime):
                rewards = reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"])
            # same pairs per rank: mean of means
            loss = reward_loss(rewards[0::2], rewards[1::2], batch["labels"])
            loss.backward()
            grad_norm = optimizer_step(reward_model, optimizer, loss.item(), step, out, args.grad_clip)

            done = step + 1
            tokens_seen += (batch["doc_ids"] >= 0).sum().item() * runtime.world_size
            logger.advance()
            if done % args.log_every == 0 or done == stage_start + steps:
                accuracy = (rewards[0::2] > rewards[1::2]).float().mean().item()
                logger.log(done, tokens_seen, loss=loss.item(), accuracy=accuracy, lr=lr, grad_norm=grad_norm,
                           stage=stage)
            if done % args.save_every == 0 or done == total_steps:
                save_checkpoint(out, reward_model, optimizer, done, runtime)
        stage_start += steps
        if start < stage_start:  # held-out accuracy after each stage this run trained (every rank: FSDP)
            accuracy, eval_loss = pairwise_accuracy(reward_model, enc, eval_pairs, args.seq_len)
            if runtime.is_main:
                print(f"stage {stage} ({steps} steps of {batch_size} pairs): held-out pairwise accuracy "
                      f"{accuracy:.3f}, loss {eval_loss:.4f} on {len(eval_pairs)} pairs of "
                      f"{data / args.eval_pairs}")
            logger.log(stage_start, tokens_seen, eval_accuracy=accuracy, eval_loss=eval_loss, stage=stage)

    save_model(out, trunk, runtime)
    head_state = full_state(head)
    if runtime.is_main:
        atomic_save(head_state, out / "head.pt")
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
