"""run_tiny.sh end to end with a few steps per stage (QUICK=1) on another world (SEED=1): the chain of
stages never breaks."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_whole_pipeline_runs_and_writes_the_report(tmp_path):
    env = {**os.environ, "QUICK": "1", "SEED": "1", "DATA": str(tmp_path / "data"),
           "RUNS": str(tmp_path / "runs")}
    result = subprocess.run(["bash", os.path.join(ROOT, "run_tiny.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("pretrain", "instruct", "sft-code", "sft-soup", "rl-code", "rl-soup", "polish-bon",
                  "polished"):
        assert (tmp_path / "runs" / stage / "model.pt").is_file(), stage
    assert json.loads((tmp_path / "data" / "world.json").read_text())["seed"] == 1  # SEED picks the world
    rows = (tmp_path / "runs" / "report.md").read_text().splitlines()
    assert len(rows) == 2 + 4 and rows[-1].startswith(f"| {tmp_path / 'runs' / 'polished'} |")
