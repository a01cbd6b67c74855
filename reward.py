"""
Bradley–Terry reward model with soft labels (report §3.2.3), trained in two stages on packed preference pairs.

A scalar head, Linear(dim, 1) without bias, reads the final (normed) hidden state of each sequence's last
token (the END_OF_TURN that closes the reply): r = head(h_last). For a pair with soft label p = P(y_w ≻ y_l),

    loss = −p log σ(r_w − r_l) − (1 − p) log σ(r_l − r_w)        (cross-entropy with soft labels, §3.2.3)

- Two stages, because reward models memorise and collapse on a second epoch (§3.2.3): stage 1, one epoch of
  a large, noisier set (DATA/pref/rm_stage1.jsonl: labels shrunk toward 0.5, 15 % flipped) with a cosine LR;
  stage 2, a small clean set (rm_stage2.jsonl) with a smaller batch and a lower peak LR. The report: batch
  1024 at 4e-5, then 16 at 3e-6; here 32 pairs at 1.92e-3, then 8 at 1.44e-4 (the report's LRs x 48,
  sft.LR_SCALE; both ratios kept; at x 12 the held-out accuracy was 80-82 %, at x 48 86.5 %).
- Packing: several pairs share a row (data.pair_batch: sequence 2i = prompt + chosen, 2i + 1 = prompt +
  rejected), with document masking, so no sequence attends to another, and positions restart at 0 for each.
  The report left-pads pairs to align their <EOS_TOKEN> and fills rows to ~75 % with as uniform a number of
  samples per row as possible, "ensuring an equal loss contribution". We need neither: (1) the reward is
  gathered at each sequence's own last token (batch["last"]), wherever it sits in the row, and a sequence's
  hidden states do not depend on its place in the row (document masks; RoPE sees only position differences
  and positions restart per document), which tests/test_reward.py checks; (2) the loss is the mean over all
  pairs of the batch, not a mean per row, so every pair weighs the same however rows are filled. First-fit
  packing of ~110-token pairs into 256-token rows fills them to ~90 %.
- Held-out pairwise accuracy (r_w > r_l) on DATA/eval/rm_pairs.jsonl after each stage.
- `load_reward_model(path)` and `score(reward_model, enc, messages, completions)` serve best-of-N (sft.py),
  CoPG with RM rewards and evaluation.

Reads --init (model.pt + config.json: usually the instruct model), DATA/tokenizer.json and the pair files;
writes OUT/model.pt (the trunk: loadable as a Transformer), OUT/head.pt, config.json, metrics.jsonl and
checkpoint.pt (a restarted run resumes exactly).

    python reward.py                                   # tiny, CPU, from runs/tiny/instruct -> runs/tiny/reward
    torchrun --nproc_per_node 8 reward.py --init runs/r7b/instruct --data data/real --batch-size 128 ...
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from common import (Logger, atomic_save, autocast, build_model, load_checkpoint, load_model, lr_factor,
                    make_optimizer, model_path, open_stage, optimizer_step, save_checkpoint, save_model, set_lr,
                    teardown)
from data import (pack, pair_batch, prompt_completion_sequence, read_jsonl, record_indices, render_completion,
                  render_prompt)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/tiny/instruct", help="the model the reward model starts from")
    parser.add_argument("--data", default="data/tiny", help="folder with tokenizer.json and the pair files")
    parser.add_argument("--stage1", default="pref/rm_stage1.jsonl", help="stage 1 pairs (large, noisier), in DATA")
    parser.add_argument("--stage2", default="pref/rm_stage2.jsonl", help="stage 2 pairs (small, clean), in DATA")
    parser.add_argument("--eval-pairs", default="eval/rm_pairs.jsonl", help="held-out pairs, in DATA")
    parser.add_argument("--out", default="runs/tiny/reward")
    parser.add_argument("--batch-size", type=int, default=32, help="stage 1 pairs per step and process")
    parser.add_argument("--lr", type=float, default=1.92e-3, help="stage 1 peak LR (cosine to --min-lr-ratio x)")
    parser.add_argument("--stage1-epochs", type=float, default=1.0)
    parser.add_argument("--stage2-batch-size", type=int, default=8)
    parser.add_argument("--stage2-lr", type=float, default=1.44e-4)
    parser.add_argument("--stage2-epochs", type=float, default=1.0)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="end of each stage's cosine / its peak")
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps of each stage")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=256, help="packed row length")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# The model, its loss, scoring


class RewardModel(nn.Module):
    """A transformer trunk and a scalar head on the final hidden state of each sequence's last token."""

    def __init__(self, trunk, head: nn.Linear):
        super().__init__()
        self.trunk, self.head, self.config = trunk, head, trunk.config

    def forward(self, tokens, doc_ids, positions, last) -> torch.Tensor:
        """Rewards [n_sequences] of a packed batch; last[i] = flat index of sequence i's last token."""
        hidden = self.trunk.hidden_states(tokens, doc_ids, positions).flatten(0, 1)
        return self.head(hidden[last]).squeeze(-1).float()


def reward_loss(chosen_rewards, rejected_rewards, labels) -> torch.Tensor:
    """Mean over pairs of −p log σ(r_w − r_l) − (1 − p) log σ(r_l − r_w): Bradley–Terry with soft labels p."""
    margin = chosen_rewards - rejected_rewards
    return -(labels * F.logsigmoid(margin) + (1 - labels) * F.logsigmoid(-margin)).mean()


def load_reward_model(path, device="cpu") -> RewardModel:
    """A reward.py --out folder (model.pt + head.pt + config.json) as a RewardModel in eval mode."""
    trunk, info = load_model(path, device)
    head_path = model_path(path).with_name("head.pt")
    if not head_path.is_file():
        raise FileNotFoundError(f"{head_path}: no reward head; is {path} the --out of reward.py?")
    head = nn.Linear(trunk.config.dim, 1, bias=False, device=device)
    head.load_state_dict(torch.load(head_path, map_location=device, weights_only=True))
    return RewardModel(trunk, head).eval()


@torch.no_grad()
def score(reward_model: RewardModel, enc, messages: list[dict], completions: list, batch_size: int = 64) -> list[float]:
    """Rewards of completions to one prompt. A completion is the response text, a chatbot message, or the token
    ids a model sampled after data.render_prompt (what model.generate returns). Packed, batch_size at a time."""
    device = reward_model.head.weight.device
    sequences = []
    for completion in completions:
        if isinstance(completion, (str, dict)):
            sequences.append(prompt_completion_sequence(*render_completion(enc, messages, completion)))
        else:
            sequences.append(prompt_completion_sequence(render_prompt(enc, messages), list(completion)))
    rewards = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        batch = pack(enc, chunk, max(reward_model.config.max_seq_len, max(len(ids) for ids, _ in chunk)))
        batch = {k: v.to(device) for k, v in batch.items()}
        rewards += reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"]).tolist()
    return rewards


@torch.no_grad()
def pairwise_accuracy(reward_model: RewardModel, enc, records: list[dict], seq_len: int,
                      batch_size: int = 32) -> tuple[float, float]:
    """(share of pairs with r_chosen > r_rejected, mean reward_loss) over preference records."""
    correct, loss = 0.0, 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = {k: v.to(reward_model.head.weight.device) for k, v in pair_batch(enc, chunk, seq_len).items()}
        rewards = reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"])
        correct += (rewards[0::2] > rewards[1::2]).sum().item()
        loss += reward_loss(rewards[0::2], rewards[1::2], batch["labels"]).item() * len(chunk)
    return correct / len(records), loss / len(records)


def full_state(module: nn.Module) -> dict:
    """A module's state dict with FSDP shards gathered (a plain copy in one process)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in module.state_dict().items()}


# -----------------------------------------------------------------------------


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

    # the plan: (pairs, batch size, peak LR, steps) per stage; a global step s belongs to the stage it falls in
    plan = []
    for pairs, batch_size, lr, epochs in ((stages[0], args.batch_size, args.lr, args.stage1_epochs),
                                          (stages[1], args.stage2_batch_size, args.stage2_lr, args.stage2_epochs)):
        plan.append((pairs, batch_size, lr, max(1, math.ceil(epochs * len(pairs) / (batch_size * runtime.world_size)))))
    total_steps = sum(steps for *_, steps in plan)
    logger = Logger(out, runtime, start, total_steps)
    stage_start, tokens_seen = 0, 0
    for stage, (pairs, batch_size, peak_lr, steps) in enumerate(plan, 1):
        for step in range(max(start, stage_start), stage_start + steps):
            local_step = step - stage_start
            lr = peak_lr * lr_factor(local_step, steps, args.warmup, 0, args.min_lr_ratio, cosine=True)
            set_lr(optimizer, lr / args.lr)  # base LRs are stage 1's peak
            indices = record_indices(len(pairs), local_step, batch_size, args.seed + stage, runtime.rank,
                                   runtime.world_size)
            batch = pair_batch(enc, [pairs[i] for i in indices], args.seq_len)
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            with autocast(runtime):
                rewards = reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"])
            loss = reward_loss(rewards[0::2], rewards[1::2], batch["labels"])  # same pairs per rank: mean of means
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
                      f"{accuracy:.3f}, loss {eval_loss:.4f} on {len(eval_pairs)} pairs of {data / args.eval_pairs}")
            logger.log(stage_start, tokens_seen, eval_accuracy=accuracy, eval_loss=eval_loss, stage=stage)

    save_model(out, trunk, runtime)
    head_state = full_state(head)
    if runtime.is_main:
        atomic_save(head_state, out / "head.pt")
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
