"""What tests/test_distributed.py runs under torchrun: stage scripts one after another in the same processes,

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_stages.py PLAN.json

PLAN.json lists [script, argv] pairs, e.g. ["sft", ["--data", ...]]; each script's main(argv) runs in turn
and joins and leaves the process group itself. One launch pays the import of torch, most of a short run's
time, once. The script "generate" is this file's check of distributed.generate_sharded."""

import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import distributed  # noqa: E402
import copg, prefopt, reward, sft  # noqa: E401, E402
from model import Config, generate  # noqa: E402


def check_generation(argv):
    """generate_sharded on the sharded --init model against model.generate on a whole copy, each rank with its
    own prompts (as many as its rank + 2, of different lengths) and generator; the rows stop at any token
    below 300, so the ranks finish at different steps. Then one training step on the sharded model, which
    reuses the buffers generation gathered weights into. Writes OUT/generate-rank{r}.json."""
    init, out = argv
    runtime = distributed.setup("cpu")
    sharded = common.build_model(Config(**common.load_config(init)["model"]), runtime, init)
    whole = common.load_model(init)[0]
    prompts = [[5 + runtime.rank, 6, 7] * (i + 1) for i in range(runtime.rank + 2)]
    stop_tokens = range(300)
    completions = {name: fn(prompts, torch.Generator().manual_seed(runtime.rank)) for name, fn in (
        ("sharded", lambda p, g: distributed.generate_sharded(sharded, p, 12, 1.0, 1.0, stop_tokens, g,
                                                              runtime)),
        ("whole", lambda p, g: generate(whole, p, 12, 1.0, 1.0, stop_tokens, g)))}
    optimizer = common.make_optimizer(sharded, 1e-3, 0.0)
    tokens = torch.tensor(prompts[-1:])
    sharded.loss(tokens, tokens).backward()
    optimizer.step()
    common.write_json(completions, Path(out) / f"generate-rank{runtime.rank}.json")
    distributed.teardown(runtime)


SCRIPTS = {"sft": sft.main, "reward": reward.main, "prefopt": prefopt.main, "copg": copg.main,
           "generate": check_generation}

if __name__ == "__main__":
    # Each stage joins a process group of its own under its own prefix in torchrun's store: destroying a
    # group restarts the count that names groups, so a second group would find the first one's keys there
    # (the other rank's stale address) and hang
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    init_process_group = dist.init_process_group
    for i, (script, argv) in enumerate(json.loads(Path(sys.argv[1]).read_text())):
        dist.init_process_group = functools.partial(
            init_process_group, store=dist.PrefixStore(f"stage{i}", store), rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]))
        SCRIPTS[script](argv)
