"""Plumbing shared by every stage: precision, optimizer and LR schedule, checkpoints, logging, and the
training helpers two or more stages need (packed log-probs, the reference log-prob cache, the SFT
regulariser). It builds on distributed.py: the process group and the FSDP2 sharding.

Report §2.4.1 (bf16/FP8 with fp32 master weights and optimizer state) and §2.5 (linear cooldown).

- Checkpoints are full (unsharded) state dicts gathered to rank 0 and written atomically (temporary file, then
  rename), so a checkpoint written at one world size loads at any other (per-rank state, such as online CoPG's
  replay buffers, only at the same). Simple and exact; past a few tens of billions of parameters rank 0's
  memory is the limit and torch.distributed.checkpoint's sharded format is the step up.
- Every stage writes to its --out: `model.pt` + `config.json` (what the next stage's --init reads),
  `checkpoint.pt` (model + optimizer + step + RNG, for exact resume) and `metrics.jsonl`.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from data import load_tokenizer, pack, record_indices, render
from distributed import PRECISIONS, Runtime, all_gather_objects, autocast, setup, shard_model
from records import read_sft_data
from model import Config, Transformer

H100_BF16_PEAK_FLOPS = 989e12  # dense, per GPU: the denominator of MFU

# Appendix B's learning rates are for the 111B model, pretrained at a peak of 2.5e-4; the tiny preset
# pretrains at 3e-3, 12x that. Preference training and CoPG scale Appendix B's LRs by that ratio. SFT and the
# reward model take 4x more again: at x12 instruct SFT ended at a training CE of 2.4 (prompt-level score
# 0.19), at x48 at 1.2 (0.88), and the reward model's held-out accuracy rose from 80-82 % to 86.5 %
# (RESULTS.md). Both keep Appendix B's ratios between capabilities.
PREF_LR_SCALE = 12
SFT_LR_SCALE = 48


# -----------------------------------------------------------------------------
# Model: build, shard, load


def build_model(config: Config, runtime: Runtime, init: str | None = None, seed: int = 0,
                recompute: bool = False) -> Transformer:
    """The model on `runtime.device`, sharded with FSDP2 when there are several processes, with weights from
    `init` (a model.pt or its folder) or freshly initialised from `seed`. With `recompute`, each block keeps
    only its input for backward and recomputes the rest (activation checkpointing: ~1/3 more compute for a
    fraction of the activation memory; `pretrain.py --dry-run` shows both).

    Built on the meta device first, so no process ever holds the full model. A fresh initialisation draws
    each rank's shard from its own generator: it depends on the world size. Runs that must match across
    world sizes start from the same --init."""
    with torch.device("meta"):
        model = Transformer(config)
    if recompute:  # state dict keys stay the same: torch.distributed.checkpoint strips the wrapper's prefix
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if runtime.mesh is not None:
        shard_model(model, runtime)
    model.to_empty(device=runtime.device)
    if init is None:
        torch.manual_seed(seed * 1000 + runtime.rank)
        model.init_weights()
    else:
        state_dict = torch.load(model_path(init), map_location="cpu", mmap=True, weights_only=True)
        set_state_dict(model, [], model_state_dict=state_dict, optim_state_dict={},
                       options=StateDictOptions(full_state_dict=True))
    return model


def model_path(path) -> Path:
    """`path` itself if it is a file, else `path`/model.pt."""
    path = Path(path)
    return path if path.is_file() else path / "model.pt"


def load_config(path) -> dict:
    """The config.json written next to a model.pt (path: the file or its folder)."""
    config_path = model_path(path).with_name("config.json")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file; "
                                "--init expects the --out folder of an earlier stage")
    return json.loads(config_path.read_text())


def load_model(path, device="cpu") -> tuple[Transformer, dict]:
    """A finished stage's model (unsharded, one process) and its config.json, e.g. for evaluation or
    merging."""
    info = load_config(path)
    with torch.device("meta"):
        model = Transformer(Config(**info["model"]))
    state_dict = torch.load(model_path(path), map_location=device, mmap=True, weights_only=True)
    model.load_state_dict(state_dict, assign=True)
    return model, info


def open_stage(stage: str, args) -> tuple[Runtime, object, dict, Config]:
    """How every post-training stage starts: the runtime, the tokenizer of --data, the --init model's
    config.json and Config (whose vocabulary must be the tokenizer's), and OUT/config.json written, refusing
    an --out that holds a run of a different model (checked on every rank, so that all of them stop)."""
    runtime = setup(args.device, precision=args.precision)
    data, out = Path(args.data), Path(args.out)
    enc = load_tokenizer(str(data / "tokenizer.json"))
    parent = load_config(args.init)
    config = Config(**parent["model"])
    if config.vocab_size != enc.n_vocab:
        raise ValueError(f"--init {args.init} has a vocabulary of {config.vocab_size}, the tokenizer "
                         f"{data / 'tokenizer.json'} {enc.n_vocab}")
    if (out / "config.json").is_file() and Config(**load_config(out)["model"]) != config:
        raise ValueError(f"{out} holds a run of a different model; pick another --out to start afresh")
    if runtime.is_main:
        write_config(out, stage, parent["preset"], config, args, str(data / "tokenizer.json"), args.init)
        print_settings(stage, args)
    return runtime, enc, parent, config


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A stage's parser: --help shows the first paragraph of its docstring, then its flags by group."""
    return argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])


def add_run_flags(parser: argparse.ArgumentParser, log_every: int, save_every: int, seed_help: str,
                  generation: bool = True) -> argparse._ArgumentGroup:
    """The flag group every stage shares (logging, checkpoints, seed, device), with the evaluation flags of
    the stages that generate; returns it, so that a stage can add its own."""
    run = parser.add_argument_group("evaluation and running")
    if generation:
        run.add_argument("--eval-before", action="store_true", help="also evaluate the --init model first")
        run.add_argument("--no-eval", action="store_true",
                         help="skip the evaluation at the end (run_tiny.sh evaluates all checkpoints once)")
        run.add_argument("--eval-batch-size", type=int, default=64,
                         help="prompts per generation batch at most (evaluate.py --batch-size)")
    run.add_argument("--log-every", type=int, default=log_every, help="log every N steps")
    run.add_argument("--save-every", type=int, default=save_every,
                     help="checkpoint every N steps (and at the end)")
    run.add_argument("--seed", type=int, default=0, help=seed_help)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="of the training matmuls: bf16 autocast with fp32 weights (§2.4.1) or fp32; auto "
                          "is bf16 on GPU, fp32 on CPU (run_tiny.sh picks bf16 on a CPU that multiplies bf16 "
                          "natively)")
    return run


def print_settings(stage: str, args):
    """The resolved settings, recipe defaults filled in, printed once at the start of a run."""
    settings = " ".join(f"{name}={value}" for name, value in vars(args).items())
    print(textwrap.fill(f"{stage}: {settings}", width=110, subsequent_indent="    "), flush=True)


def generation_model(model: Transformer, path, runtime: Runtime) -> Transformer:
    """The model itself in one process; under FSDP a whole copy loaded from `path`: for the evaluations that
    rank 0 runs alone (sampling inside a training step uses generate_sharded on every rank)."""
    return model if runtime.mesh is None else load_model(path, runtime.device)[0]


def l2_to_init(params, init_params, weight: float) -> torch.Tensor:
    """λ‖θ − θ₀‖² (§3.2.1, and §3.5's L2 to the reference policy), summed over every parameter. Under FSDP
    each process sums its own shards (the penalty is the sum over processes) and gets exactly its shards'
    gradient 2λ(θ − θ₀)."""
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    return weight * sum(((local(p) - local(p0)) ** 2).sum() for p, p0 in zip(params, init_params))


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model: Transformer, lr: float, weight_decay: float,
                   betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) with two parameter groups, built from parameter names (after sharding).

    - block matrices (in_proj, out_proj): weight decay; under µP their LR is lr * base_width / width, the
      µP rule for hidden ("matrix-like") weights under Adam (Yang et al. 2021, Table 8).
    - the tied embedding and the LayerNorm weights: no weight decay, the LR unscaled ("vector-like" under µP).
      Decay would pull the embedding rows of tokens absent from a batch toward zero with nothing pulling back,
      and a norm's gain has no scale to regularise. The report names no decay groups; this is common practice.
    Each group keeps its peak LR as "base_lr"; `set_lr` scales it by the schedule."""
    width_mult = model.config.width_mult
    matrices = [p for name, p in model.named_parameters() if name.endswith("proj.weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("proj.weight")]
    groups = [dict(params=matrices, weight_decay=weight_decay, base_lr=lr / width_mult),
              dict(params=others, weight_decay=0.0, base_lr=lr)]
    return torch.optim.AdamW([g | {"lr": g["base_lr"]} for g in groups], lr=lr, betas=betas)


def lr_factor(step: int, steps: int, warmup: int, cooldown: int, min_ratio: float, cosine: bool) -> float:
    """The LR at `step` (0-based, of `steps`) as a fraction of the peak: linear warmup over `warmup` steps,
    then constant (or cosine down to min_ratio at the end), and over the last `cooldown` steps a linear anneal
    from wherever the main schedule is to min_ratio, reached on the last step (§2.5: 2.5e-4 -> 1e-6)."""
    def main(s):
        if s < warmup:
            return (s + 1) / warmup
        if not cosine:
            return 1.0
        progress = (s - warmup) / max(steps - 1 - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    start = steps - cooldown
    if step < start:
        return main(step)
    return main(start) + (min_ratio - main(start)) * (step - start) / max(cooldown - 1, 1)


def set_lr(optimizer: torch.optim.Optimizer, factor: float):
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards) to max_norm; return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def optimizer_step(model, optimizer, loss: float, step: int, out, max_norm: float) -> float:
    """Clip the gradients to max_norm and step, then clear them; return the norm before clipping. A loss that
    is not finite stops the run here, before the update, with one message: the last checkpoint in `out` is
    then still the last good state."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step + 1}; stopped before the update. The last "
                                 f"good checkpoint, {Path(out) / 'checkpoint.pt'}, is intact (lower --lr, or "
                                 "check the data)")
    grad_norm = clip_grad_norm(model, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# -----------------------------------------------------------------------------
# Checkpoints and artifacts


def atomic_save(obj, path: Path):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the previous file intact."""
    partial = path.with_name(path.name + ".tmp")
    torch.save(obj, partial)
    os.replace(partial, path)


def write_json(obj, path: Path):
    """JSON to a temporary file, then rename (as atomic_save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(partial, path)


def write_config(out, stage: str, preset: str, config: Config, args, tokenizer: str, parent: str | None):
    """config.json: what the next stage needs to rebuild the model and to trace where it came from."""
    info = {"stage": stage, "preset": preset, "model": asdict(config), "args": vars(args),
            "tokenizer": tokenizer, "parent": parent}
    write_json(info, Path(out) / "config.json")


def save_checkpoint(out, model, optimizer, step: int, runtime: Runtime, rank_state=None):
    """checkpoint.pt: full model and optimizer state (gathered to rank 0), the number of steps done, and
    rank 0's RNG state. Data order is a pure function of the step (data.shard_batch), so the step is the
    data position. Per-rank randomness, where a stage needs it, should be derived from (seed, step, rank)
    (rank_seed). `rank_state`, if given, is state each rank keeps across steps (online CoPG's replay buffer:
    tensors and lists); every rank's is gathered into the same file, so that it is written atomically with
    the weights it goes with, and load_rank_state gives each rank its own back."""
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True))
    rank_states = all_gather_objects(rank_state, runtime) if rank_state is not None else None
    if runtime.is_main:
        rng = {"cpu": torch.get_rng_state()}
        if runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
        checkpoint = {"model": model_state, "optimizer": optim_state, "step": step, "rng": rng}
        if rank_states is not None:
            checkpoint["rank_states"] = rank_states
        atomic_save(checkpoint, Path(out) / "checkpoint.pt")
    if runtime.mesh is not None:
        dist.barrier()  # nobody goes on (and possibly crashes) before the checkpoint is complete


def load_checkpoint(out, model, optimizer, runtime: Runtime) -> int:
    """Restore --out/checkpoint.pt if there is one, whatever world size wrote it; return the steps done (0 if
    none). Every rank reads the file (one machine, or a shared filesystem) and keeps its own shard."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"],
                   optim_state_dict=checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if "cuda" in checkpoint["rng"] and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], runtime.device)
    return checkpoint["step"]


def load_rank_state(out, runtime: Runtime):
    """This rank's `rank_state` in --out/checkpoint.pt (save_checkpoint), or None if there is none. It
    belongs to a rank of the world that wrote it: resuming at another world size is refused."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        return None
    rank_states = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("rank_states")
    if rank_states is None:
        return None
    if len(rank_states) != runtime.world_size:
        raise ValueError(f"{path} holds the state of {len(rank_states)} processes (e.g. replay buffers), "
                         f"this run has {runtime.world_size}: resume it with as many, or pick another --out")
    return rank_states[runtime.rank]


def save_model(out, model, runtime: Runtime):
    """model.pt: the consolidated fp32 weights that the next stage loads with --init (or load_model)."""
    model_state, _ = get_state_dict(model, [],
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.is_main:
        atomic_save(model_state, Path(out) / "model.pt")
    if runtime.mesh is not None:
        dist.barrier()


# -----------------------------------------------------------------------------
# Logging


class Logger:
    """Progress on rank 0: OUT/metrics.jsonl, one JSON line per log call, and one printed line per log call
    (step/total, the main metrics, tokens/s, ETA) that reads the same in a terminal and in a redirected log;
    the tqdm bar runs only when stderr is a terminal. On resume from step s, lines from steps after s (logged
    after the checkpoint) are dropped first, so a resumed run's file reads as if it had never stopped."""

    SHOWN = ("loss", "sft_loss", "reward", "accuracy", "val_loss", "val_bpb", "lr", "tokens_per_s", "mfu")

    def __init__(self, out, runtime: Runtime, start_step: int, steps: int, start_tokens: int = 0,
                 flops_per_token: float | None = None):
        self.runtime, self.flops_per_token, self.steps = runtime, flops_per_token, steps
        self.path = Path(out) / "metrics.jsonl"
        self.bar = None
        if runtime.is_main:
            kept = [line for line in self.path.read_text().splitlines()
                    if json.loads(line)["step"] <= start_step] \
                if self.path.is_file() else []
            self.path.write_text("".join(line + "\n" for line in kept))
            if sys.stderr.isatty():
                self.bar = tqdm(total=steps, initial=start_step, dynamic_ncols=True)
        self.start_time, self.start_step = time.perf_counter(), start_step
        self.last_time, self.last_tokens = self.start_time, start_tokens

    def log(self, step: int, tokens: int, **metrics):
        """Record metrics after `step` with `tokens` seen so far (all ranks); adds tokens/s and, on GPU,
        MFU."""
        now = time.perf_counter()
        record = {"step": step, "tokens": tokens, **metrics}
        if tokens > self.last_tokens:
            tokens_per_s = (tokens - self.last_tokens) / (now - self.last_time)
            record["tokens_per_s"] = round(tokens_per_s, 1)
            if self.runtime.device.type == "cuda" and self.flops_per_token:
                record["mfu"] = round(tokens_per_s * self.flops_per_token
                                      / (H100_BF16_PEAK_FLOPS * self.runtime.world_size), 4)
        self.last_time, self.last_tokens = now, tokens
        if not self.runtime.is_main:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in record.items() if k in self.SHOWN or k.startswith("copy_")]
        if shown:
            done = step - self.start_step
            eta = (now - self.start_time) / done * (self.steps - step) if done > 0 else 0.0
            line = (f"step {step}/{self.steps} | " + " | ".join(shown)
                    + f" | eta {int(eta) // 60}m{int(eta) % 60:02d}s")
            if self.bar is not None:
                tqdm.write(line)
            else:
                print(line, flush=True)

    def advance(self):
        if self.bar is not None:
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -----------------------------------------------------------------------------
# Training helpers shared by the stages


def to_device(batch: dict, device) -> dict:
    """A batch of data.py (a dict of tensors) on `device`."""
    return {name: tensor.to(device) for name, tensor in batch.items()}


def drop_too_long(items: list, lengths: list[int], limit: int, what: str) -> list:
    """The items whose length is at most `limit` tokens; says how many were left out, and refuses to keep
    none."""
    kept = [item for item, length in zip(items, lengths) if length <= limit]
    if len(kept) < len(items):
        print(f"{what}: left out {len(items) - len(kept)} of {len(items)} records longer than {limit} tokens")
    if not kept:
        raise ValueError(f"{what}: no record fits in {limit} tokens (raise --seq-len)")
    return kept


def packed_logps(model, enc, sequences: list, seq_len: int,
                 runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each (ids, loss mask) sequence's completion [n], differentiable; its number of
    tokens [n]), the sequences packed into rows of seq_len. Divide the two for per-token averages."""
    batch = to_device(pack(enc, sequences, seq_len), runtime.device)
    with autocast(runtime):
        sums = model.sequence_logps(batch["tokens"], batch["targets"], batch["doc_ids"], len(sequences),
                                    batch["positions"])
    counts = torch.tensor([sum(mask[1:]) for _, mask in sequences], dtype=torch.float32,
                          device=runtime.device)
    return sums.float(), counts


def reference_key(sequences: list, init: str, average: bool, device_type: str) -> str:
    """What reference log-probs depend on, hashed: the exact (ids, mask) sequences (hence the data, the
    tokenizer, the revision prompt and the records kept), the init weights' file, averaging, the device
    type."""
    key = hashlib.sha256()
    for ids, mask in sequences:
        key.update(np.asarray([len(ids), *ids, *mask], dtype=np.int64).tobytes())
    with open(model_path(init), "rb") as file:
        key.update(hashlib.file_digest(file, "sha256").digest())
    key.update(f"average={average} device={device_type}".encode())
    return key.hexdigest()


def reference_logps(model, enc, sequences: list, init: str, average: bool, cache: Path, runtime: Runtime,
                    seq_len: int, batch_size: int = 64) -> torch.Tensor:
    """log π_ref of every sequence [n] (summed, or per-token averaged with `average`), on the CPU, for the
    offline losses of prefopt.py and copg.py. `model` must hold the --init weights: call this before the first
    optimizer step, and no second model lives during training. Computed once and saved at `cache` with its
    reference_key; a cache with another key is recomputed (with a message), never reused. Under FSDP every
    rank scores every sequence (simple; a sliced pass would save world_size x on a pass that costs about a
    third of one training epoch) and rank 0 writes the file."""
    key = reference_key(sequences, init, average, runtime.device.type)
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            return saved["logps"]
        print(f"{cache} was computed for other data, init weights or settings: recomputing it")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            sums, counts = packed_logps(model, enc, sequences[start:start + batch_size], seq_len, runtime)
            chunks.append((sums / counts if average else sums).cpu())
    logps = torch.cat(chunks)
    if runtime.is_main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"key": key, "logps": logps}, cache)
    return logps


def sft_sequences(enc, data: Path, name: str, seq_len: int, keep=None) -> list:
    """The (ids, loss mask) conversations of an SFT set (a JSONL in DATA, or "all": records.read_sft_data)
    that fit seq_len, and if given, for which keep(record) is true: the data of the SFT regulariser that
    prefopt.py and copg.py add to their losses."""
    sequences = [render(enc, record["messages"]) for record in read_sft_data(data, name)
                 if keep is None or keep(record)]
    return drop_too_long(sequences, [len(ids) for ids, _ in sequences], seq_len, str(Path(data) / name))


def sft_step_loss(model, enc, sequences: list, step: int, batch_size: int, seq_len: int, seed: int,
                  runtime: Runtime) -> torch.Tensor:
    """Cross-entropy of this step's `batch_size` conversations of `sequences`, packed into rows of seq_len
    (each conversation once per epoch, disjoint across ranks; the order seeded by seed + 1, apart from the
    main data's)."""
    indices = record_indices(len(sequences), step, batch_size, seed + 1, runtime.rank, runtime.world_size)
    batch = to_device(pack(enc, [sequences[i] for i in indices], seq_len), runtime.device)
    with autocast(runtime):
        return model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
