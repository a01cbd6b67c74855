"""Every post-training stage under torchrun (2 processes, gloo): sft.py, reward.py, prefopt.py and copg.py
(offline and online) match one process on the same global batch where the maths says they do, online CoPG
resumes exactly with its replay buffers, best-of-N gathers every rank's picks, and sampling on the sharded
model is sampling on the whole one. One torchrun launch runs every 2-process stage (tests/torchrun_stages.py);
`pytest -m torchrun` selects these tests and pretrain.py's."""

import json
import os
import subprocess
import sys

import pytest
import torch

import common
import copg
import distributed
import prefopt
import reward
import sft
from conftest import SMALL, save_parent, save_reward_model
from data import END_OF_TURN

pytestmark = pytest.mark.torchrun
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folders(world, enc, parent, tmp_path_factory):
    """The parent, a reward model, and a parent that ends its turn after a few tokens: a vector v added to
    every embedding row (so every hidden state leans along it) and 15 v more to end-of-turn's, which raises
    that logit on any input. Best-of-N then has candidates without a trained model."""
    root = tmp_path_factory.mktemp("distributed")
    ends_turns = root / "ends-turns"
    ends_turns.mkdir()
    save_parent(ends_turns, enc, world)
    weights = torch.load(ends_turns / "model.pt", weights_only=True)
    v = torch.randn(SMALL["dim"], generator=torch.Generator().manual_seed(0))
    v = 0.14 * (v - v.mean()) / (v - v.mean()).norm()
    weights["embed.weight"] += v
    weights["embed.weight"][enc.encode_single_token(END_OF_TURN)] += 15 * v
    torch.save(weights, ends_turns / "model.pt")
    return {"root": root, "parent": parent, "ends_turns": ends_turns,
            "reward": save_reward_model(root / "reward", parent)}


def stage_flags(world, folders, name: str, world_size: int) -> tuple[str, list[str]]:
    """(script, argv) of run `name` with the global batch split over world_size processes, into
    ROOT/name-WORLD_SIZE (name@2: the first 2 steps of name, into the same folder)."""
    batch = lambda size: str(size // world_size)  # noqa: E731
    base = ["--data", str(world), "--init", str(folders["parent"]), "--device", "cpu", "--log-every", "1"]
    online = ["--capability", "instruct", "--k", "2", "--max-new-tokens", "6", "--batch-size", batch(4),
              "--reward", f"rm:{folders['reward']}", "--replay-size", "4", "--replay-batch", "1",
              "--l2-ref", "1e-3", "--no-eval"]
    runs = {
        "sft": ("sft", ["--capability", "math", "--steps", "3", "--batch-size", batch(4),
                        "--pretrain-mix", "0", "--l2-init", "0.01", "--no-eval"]),
        "reward": ("reward", ["--batch-size", batch(4), "--stage1-epochs", "0.08", "--stage2-batch-size",
                              batch(2), "--stage2-epochs", "0.1", "--seq-len", "512"]),
        "prefopt": ("prefopt", ["--capability", "math", "--steps", "3", "--batch-size", batch(4),
                                "--no-eval"]),
        "copg-offline": ("copg", ["--capability", "code", "--mode", "offline", "--sft-weight", "0",
                                  "--steps", "2", "--batch-size", batch(2), "--no-eval"]),
        "copg-online": ("copg", [*online, "--steps", "4"]),
        "copg-resumed@2": ("copg", [*online, "--steps", "2"]),
        "copg-resumed": ("copg", [*online, "--steps", "4"]),
        "best-of-n": ("sft", ["--capability", "instruct", "--init", str(folders["ends_turns"]),
                              "--best-of-n", "2", "--reward-model", str(folders["reward"]),
                              "--best-of-n-prompts", "5", "--steps", "2", "--batch-size", batch(2),
                              "--no-eval"]),
        "verified": ("sft", ["--capability", "math", "--init", str(folders["ends_turns"]), "--best-of-n", "2",
                             "--verified", "--best-of-n-prompts", "3", "--no-eval"]),
    }
    script, flags = runs[name]
    out = folders["root"] / f"{name.split('@')[0]}-{world_size}"
    return script, [*base, *flags, "--out", str(out)]


RUNS = ["sft", "reward", "prefopt", "copg-offline", "copg-online", "copg-resumed@2", "copg-resumed",
        "best-of-n", "verified"]


@pytest.fixture(scope="module")
def two(world, folders):
    """Every run in 2 processes, in one torchrun launch; returns rank 0's printed output."""
    plan = [stage_flags(world, folders, name, 2) for name in RUNS]
    plan.append(("generate", [str(folders["parent"]), str(folders["root"])]))
    (folders["root"] / "plan.json").write_text(json.dumps(plan))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "tests", "torchrun_stages.py"), str(folders["root"] / "plan.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one(world, folders, name: str):
    """Run `name` in this process, with the whole global batch."""
    script, argv = stage_flags(world, folders, name, 1)
    {"sft": sft, "reward": reward, "prefopt": prefopt, "copg": copg}[script].main(argv)


def metrics(folders, name: str, world_size: int) -> list[dict]:
    path = folders["root"] / f"{name}-{world_size}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folders, name: str, world_size: int, file="model.pt") -> dict:
    return torch.load(folders["root"] / f"{name}-{world_size}" / file, weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.mark.parametrize("name", ["sft", "prefopt", "copg-offline"])
def test_two_processes_take_the_step_of_one_with_the_whole_batch(world, folders, two, name):
    """2 ranks x b records = 1 rank x 2b, the same records (data.record_indices): every step's loss (each
    rank's mean, averaged; SFT: the token mean over both ranks) and the final weights agree to fp32 rounding
    (sums add in another order; measured: losses within 1e-7 relative, weights within 3e-7). SFT adds its L2
    penalty, summed over the ranks' shards."""
    one(world, folders, name)
    losses = [[line["loss"] for line in metrics(folders, name, n) if "loss" in line] for n in (1, 2)]
    assert len(losses[0]) == len(losses[1]) >= 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert max_difference(weights(folders, name, 1), weights(folders, name, 2)) < 1e-6


def test_two_process_reward_model_matches_one(world, folders, two):
    """Both of reward.py's stages, trunk and head; each rank's loss is the mean over its pairs. The loss stays
    near ln 2 in 5 steps, so gradients are tiny and AdamW's normalised step carries their fp32 rounding into
    the weights: measured 1.1e-6 apart (head 5e-9), where the trunk moved 8e-4 from its init."""
    one(world, folders, "reward")
    assert [line["step"] for line in metrics(folders, "reward", 2) if "loss" in line] == [1, 2, 3, 4, 5]
    trunk = weights(folders, "reward", 1)
    assert max_difference(trunk, torch.load(folders["parent"] / "model.pt", weights_only=True)) > 1e-4
    for file in ("model.pt", "head.pt"):
        assert max_difference(weights(folders, "reward", 1, file), weights(folders, "reward", 2, file)) < 1e-5


def test_sampling_on_the_sharded_model_is_sampling_on_the_whole_one(folders, two):
    """Each rank's own prompts, its own generator, rows that stop at different steps on each rank: token for
    token what model.generate samples with whole weights (then a training step works)."""
    for rank in (0, 1):
        completions = json.loads((folders["root"] / f"generate-rank{rank}.json").read_text())
        assert completions["sharded"] == completions["whole"]
        assert len(completions["sharded"]) == rank + 2
    lengths = [len(c) for rank in (0, 1) for c in json.loads(
        (folders["root"] / f"generate-rank{rank}.json").read_text())["sharded"]]
    assert len(set(lengths)) > 1


def test_online_copg_in_two_processes_keeps_a_replay_buffer_per_rank_and_resumes_exactly(folders, two):
    """Each rank samples its own prompts and keeps its own replay buffer, saved with the checkpoint: two
    steps, then a restart to four, equal four steps straight, weights and logged lines."""
    lines = [line for line in metrics(folders, "copg-online", 2) if "loss" in line]
    assert [line["replay"] for line in lines] == [2, 4, 4, 4]
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4) and lines[-1]["l2"] > 0
    checkpoint = torch.load(folders["root"] / "copg-online-2" / "checkpoint.pt", weights_only=True)
    buffers = checkpoint["rank_states"]
    assert len(buffers) == 2 and all(len(buffer) == 4 for buffer in buffers)
    assert buffers[0][0][0] != buffers[1][0][0]  # the ranks' groups: other prompts, other samples
    straight, resumed = (weights(folders, name, 2) for name in ("copg-online", "copg-resumed"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    timing = ("tokens", "tokens_per_s", "samples_per_s", "gen_tokens_per_s")  # tokens: since the restart
    assert ([{k: v for k, v in line.items() if k not in timing} for line in lines]
            == [{k: v for k, v in line.items() if k not in timing}
                for line in metrics(folders, "copg-resumed", 2) if "loss" in line])
    with pytest.raises(ValueError, match="state of 2 processes"):  # the buffers belong to 2 ranks
        common.load_rank_state(folders["root"] / "copg-online-2", distributed.setup("cpu"))


def test_best_of_n_in_two_processes_trains_on_every_ranks_picks(world, folders, two, capsys):
    """Rank r samples prompts r, r + 2, ... (5 prompts: rank 1's list padded with a repeat); every rank
    trains on all 5 picks, as one process does, whose samples are other draws."""
    one(world, folders, "best-of-n")
    line = "best-of-2: 5 of 5 prompts with a sample that ends its turn"
    assert line in capsys.readouterr().out and line in two
    assert [m["step"] for m in metrics(folders, "best-of-n", 2) if "loss" in m] == [1, 2]
    init = torch.load(folders["ends_turns"] / "model.pt", weights_only=True)
    assert max_difference(weights(folders, "best-of-n", 2), init) > 0
    assert "best-of-2: 0 of 3 prompts with a sample that ends its turn and passes" in two  # --verified
    assert (folders["root"] / "verified-2" / "model.pt").is_file()
