"""Distribution: each process's device and place in the process group, the FSDP2 mesh and sharding, the
collectives the stages need, and sampling with the sharded model.

Report §2.4.1 (FSDP, bf16 with fp32 master weights and optimizer state). Stage scripts call these functions
(and common.py's, which build on them) and never touch process groups themselves.

`setup()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK). One process needs no process group;
several use gloo on CPU and NCCL on GPU, and the model is sharded with FSDP2: `fully_shard` per block, then
the root. `--replicate R` makes a 2-D (replicate x shard) mesh: HSDP, the report's DP and FSDP axes. On GPU,
FSDP2 gathers parameters in bf16 and reduces gradients in fp32; master weights and AdamW state stay fp32
everywhere.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from model import Transformer, generate


# -----------------------------------------------------------------------------
# Device and process group


@dataclass
class Runtime:
    """Where this process runs: its rank in the world, its device, and the FSDP mesh (None in one process)."""
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh | None
    bf16: bool = False   # training matmuls under bf16 autocast (see autocast)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


PRECISIONS = ("auto", "bf16", "fp32")


def setup(device: str = "auto", replicate: int = 1, precision: str = "auto") -> Runtime:
    """Pick the device and, under torchrun, join the process group and build the (replicate x shard) mesh.
    precision: of the training matmuls (autocast); auto is bf16 on GPU and fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    if world_size % replicate:
        raise ValueError(f"--replicate {replicate} must divide the world size {world_size}")
    mesh = None
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        shape, names = ((world_size,), ("shard",)) if replicate == 1 else \
            ((replicate, world_size // replicate), ("replicate", "shard"))
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return Runtime(rank, world_size, device, mesh, bf16)


def teardown(runtime: Runtime):
    """Leave the process group. The barrier matters: without it gloo sometimes aborts at exit."""
    if runtime.mesh is not None:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: float, runtime: Runtime) -> float:
    """The sum of `value` over all ranks (the value itself in one process)."""
    if runtime.mesh is None:
        return float(value)
    tensor = torch.tensor(float(value), dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.item()


def all_gather_objects(obj, runtime: Runtime) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] in one process): picklable Python objects."""
    if runtime.mesh is None:
        return [obj]
    gathered = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_seed(seed: int, runtime: Runtime) -> int:
    """A sampling seed for this rank: `seed` itself on rank 0 (and so in one process), `seed` + rank x 2^32
    on the others, so that ranks draw different samples, and a resumed run the same ones."""
    return seed + (runtime.rank << 32)


def autocast(runtime: Runtime):
    """bf16 autocast where the runtime trains in bf16 (matmuls in bf16; model.py keeps norms, softmax, the
    logits and, on a CPU, attention in fp32; the weights stay fp32), else nothing (fp32)."""
    if runtime.bf16:
        return torch.autocast(runtime.device.type, dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX or AVX-512 BF16, from
    /proc/cpuinfo's flags). Where it does, training under bf16 autocast is faster than fp32 (1.2-1.4x for the
    tiny preset's steps: RESULTS.md); where it does not, bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:   # not Linux: assume not
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# -----------------------------------------------------------------------------
# Sharding and sampling with the sharded model


def shard_model(model: Transformer, runtime: Runtime):
    """FSDP2: each block is one unit whose parameters are gathered just before it runs, then the root (the
    embedding and final norm). On GPU the gathered parameters are bf16 and gradients are reduced in fp32."""
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if runtime.device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=runtime.mesh, mp_policy=precision)
    fully_shard(model, mesh=runtime.mesh, mp_policy=precision)
    # FSDP hooks forward() only; stages call these directly (and they call hidden_states, then the output
    # projection, whose weight must stay gathered until they return)
    for method in ("loss", "sequence_logps", "hidden_states"):
        register_fsdp_forward_method(model, method)


def generate_sharded(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                     top_p: float, stop_tokens, generator: torch.Generator,
                     runtime: Runtime) -> list[list[int]]:
    """model.generate of this rank's prompts with the model being trained, sharded under FSDP: what online
    CoPG and best-of-N sample with, each rank its own prompts. Every rank must call it as many times.

    Under FSDP each block's forward gathers its weights from all ranks, as in training, so no rank ever holds
    more than one block beyond its shards: what a model too big for one device needs (gathering a whole copy
    per rank, the simple alternative, would not fit at full size). The gathers are collective, so every rank
    runs the same number of forwards: all of them decode until every rank's rows are done (an all-reduce of
    one flag per token). The root's weights (embedding, final norm) are gathered once for the whole call:
    generate computes logits outside any forward. The gathered weights are the same numbers, so a rank
    samples what one process would from the same prompts and generator (exactly on CPU; on GPU FSDP gathers
    bf16 weights)."""
    if runtime.mesh is None:
        return generate(model, prompts, max_new_tokens, temperature, top_p, stop_tokens, generator)
    model.unshard()
    completions = generate(model, prompts, max_new_tokens, temperature, top_p, stop_tokens, generator,
                           everyone_done=lambda done: all_reduce_sum(not done, runtime) == 0)
    model.reshard()   # frees the gathered root; model.parameters() are the shards again (the L2 penalty's)
    return completions
