"""run_tiny.sh: its stages come in the report's order (§3.1, §3.5), and end to end with a few steps per stage
(QUICK=1) on another world (SEED=1) the chain of stages never breaks."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tiny_stages():
    """(script, --init, --out, command) of each `stage python ...` or `lane python ...` line of run_tiny.sh,
    in order, read as text (a loop's body once, as written); folders without their "$RUNS/"."""
    with open(os.path.join(ROOT, "run_tiny.sh")) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    stages = []
    for words in (line.split() for line in lines):
        if words[:2] in (["stage", "python"], ["lane", "python"]):
            folder = {flag: words[words.index(flag) + 1].strip('"').removeprefix("$RUNS/")
                      for flag in ("--init", "--out") if flag in words}
            stages.append((words[2], folder.get("--init"), folder.get("--out"), " ".join(words)))
    return stages


def test_run_tiny_runs_the_stages_in_the_order_of_sections_3_1_and_3_5():
    stages = run_tiny_stages()
    assert [script for script, *_ in stages[:3]] == ["tasks.py", "data.py", "data.py"]
    assert [(script, init, out) for script, init, out, _ in stages[3:]] == [
        ("pretrain.py", None, "pretrain"),
        # §3.1: the instruct model (SFT on the base model; then the reward model and preference training)
        ("sft.py", "pretrain", "instruct-sft"), ("reward.py", "instruct-sft", "reward"),
        ("prefopt.py", "instruct-sft", "instruct"),
        # SFT experts on the instruct model (code and multilingual over two seeds, merged), then the SFT soup
        ("sft.py", "instruct", "sft-$cap"), ("sft.py", "instruct", "sft-$cap-seed$seed"),
        ("merge.py", None, "sft-multilingual"), ("merge.py", None, "sft-code-stage1"),
        # code stage 2 (§3.3.4.2): verified samples of the stage-1 merge, two seeds, merged again
        ("sft.py", "sft-code-stage1", "sft-code-stage2-seed$seed"), ("merge.py", None, "sft-code"),
        ("merge.py", None, "sft-merge"), ("sft.py", "sft-merge", "sft-soup"),
        # RL experts on the SFT soup, then the RL soup
        ("copg.py", "sft-soup", "rl-math"), ("sft.py", "sft-soup", "rl-longctx"),
        ("prefopt.py", "sft-soup", "rl-instruct"), ("copg.py", "sft-soup", "rl-rag"),
        ("copg.py", "sft-soup", "rl-code-copg"), ("prefopt.py", "sft-soup", "rl-safety"),
        ("prefopt.py", "sft-soup", "rl-multilingual"), ("merge.py", None, "rl-code"),
        ("merge.py", None, "rl-merge"), ("sft.py", "rl-merge", "rl-soup"),
        # §3.5 polishing: best-of-N SFT, then offline preference tuning <-> online RL (polish.py)
        ("sft.py", "rl-soup", "polish-bon"), ("polish.py", "polish-bon", "polished"),
        ("evaluate.py", None, None), ("evaluate.py", None, "report.md"),
    ]
    command = {out: command for _, _, out, command in stages}
    assert all("--search" in command[merge] for merge in ("sft-merge", "rl-merge"))  # the weight search
    assert all("--capability all" in command[soup] for soup in ("sft-soup", "rl-soup"))  # low-LR SFT, §4.9.2
    assert "--best-of-n" in command["polish-bon"]
    assert "--verified" in command["sft-code-stage2-seed$seed"]


def test_the_whole_pipeline_runs_and_writes_the_report(tmp_path):
    env = {**os.environ, "QUICK": "1", "SEED": "1", "DATA": str(tmp_path / "data"),
           "RUNS": str(tmp_path / "runs")}
    result = subprocess.run(["bash", os.path.join(ROOT, "run_tiny.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("pretrain", "instruct", "sft-code", "sft-merge", "sft-soup", "rl-code", "rl-merge",
                  "rl-soup", "polish-bon", "polished"):
        assert (tmp_path / "runs" / stage / "model.pt").is_file(), stage
    assert json.loads((tmp_path / "data" / "world.json").read_text())["seed"] == 1  # SEED picks the world
    rows = (tmp_path / "runs" / "report.md").read_text().splitlines()
    assert len(rows) == 2 + 5 and rows[-1].startswith(f"| {tmp_path / 'runs' / 'polished'} |")
