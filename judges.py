"""The two judges of a reply: the reward model (the proxy, report §3.2.3) and the world's gold judge
(verifiers.gold_reward, the stand-in for the report's human raters).

- The reward model: a transformer trunk and a scalar head, trained by reward.py with a Bradley–Terry loss on
  soft labels; best-of-N, CoPG with RM rewards, polishing and evaluation score replies with it.
- Win rates (§4): the share of prompts on which a judge prefers this model's reply to a reference model's
  (ties count half). evaluate.py --reference reports both; where they part, the policy is exploiting its
  proxy reward.
"""

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import load_model, model_path, to_device
from data import pack, pair_batch, prompt_completion_sequence, render_completion, render_prompt
from verifiers import gold_reward


def reply_text(reply: dict) -> str:
    """What the verifiers read of a parsed reply: its tool calls (action) then its response, as
    verifiers.completion_text writes a chatbot message; the thinking is not graded."""
    return " ".join(part for part in (reply["action"], reply["response"]) if part)


# -----------------------------------------------------------------------------
# The reward model (§3.2.3): trained by reward.py, used by best-of-N, CoPG with RM rewards and evaluation


class RewardModel(nn.Module):
    """A transformer trunk and a scalar head, Linear(dim, 1) without bias, on the final (normed) hidden state
    of each sequence's last token (the END_OF_TURN that closes the reply)."""

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
def reward_model_scores(reward_model: RewardModel, enc, messages: list[dict], completions: list,
                        batch_size: int = 64) -> list[float]:
    """Rewards of completions to one prompt. A completion is the response text, a chatbot message, or the
    token ids a model sampled after data.render_prompt (what model.generate returns). Packed, batch_size at a
    time."""
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
        batch = to_device(pack(enc, chunk, max(reward_model.config.max_seq_len,
                                               max(len(ids) for ids, _ in chunk))), device)
        rewards += reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"]).tolist()
    return rewards


@torch.no_grad()
def pairwise_accuracy(reward_model: RewardModel, enc, records: list[dict], seq_len: int,
                      batch_size: int = 32) -> tuple[float, float]:
    """(share of pairs with r_chosen > r_rejected, mean reward_loss) over preference records."""
    correct, loss = 0.0, 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = to_device(pair_batch(enc, chunk, seq_len), reward_model.head.weight.device)
        rewards = reward_model(batch["tokens"], batch["doc_ids"], batch["positions"], batch["last"])
        correct += (rewards[0::2] > rewards[1::2]).sum().item()
        loss += reward_loss(rewards[0::2], rewards[1::2], batch["labels"]).item() * len(chunk)
    return correct / len(records), loss / len(records)


# -----------------------------------------------------------------------------
# Win rates against a reference model's replies, by either judge


def win_rate(reward_model, enc, records: list[dict], replies: list[dict],
             reference_replies: list[dict]) -> float:
    """Share of prompts on which the reward model scores our reply above the reference's (ties count half)."""
    wins = 0.0
    for record, ours, theirs in zip(records, replies, reference_replies):
        if reply_text(ours) == reply_text(theirs):  # a tie, whatever rounding the packed scoring adds
            wins += 0.5
            continue
        ours_reward, theirs_reward = reward_model_scores(reward_model, enc, record["messages"],
                                                         [reply_text(ours), reply_text(theirs)])
        wins += 1.0 if ours_reward > theirs_reward else 0.5 if ours_reward == theirs_reward else 0.0
    return wins / len(records)


def gold_win_rate(records: list[dict], replies: list[dict], reference_replies: list[dict]) -> float:
    """Share of prompts on which the gold judge scores our reply above the reference's (ties count half)."""
    score = lambda record, reply: gold_reward(record, reply_text(reply), reply["ended"])
    with ThreadPoolExecutor() as pool:   # code replies run in sandboxes
        ours = list(pool.map(score, records, replies))
        theirs = list(pool.map(score, records, reference_replies))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(records)
