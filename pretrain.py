"""
Pretraining (report §2.4-2.5): next-token prediction on packed token shards with document masking, µP, FP8,
and a cooldown that extends the context.

    loss = mean CE of every target token of the step (all micro-batches, all ranks)

How this differs from the report:
1. The cooldown's long-context stages (--context-schedule LENGTH:STEPS,...) make every fourth step a long
   batch from corpus_long.bin with as many tokens as a base batch; the report gives no ratio. run_tiny.sh's
   256:180,1024:120,2048:60 keeps the shape of §2.5's (8k for 30,000 of 50,000 steps, then 32k, 128k and 256k
   for 10,000, 5,000 and 5,000): half the cooldown at the base context, a third at 4x, a sixth at 8x, which
   is one row of a base batch's 8 x 256 tokens.
2. FP8 (--fp8-after N) covers the block matmuls from step N until the cooldown, which runs in bf16 (§2.4.1);
   on a CPU the FP8 arithmetic is emulated in fp32 (model.py).
3. µP (--mup --base-width W, Yang et al. 2021) transfers hyper-parameters tuned at width W; the report names
   µP without its details (model.Config.mup_base_dim, common.make_optimizer).

Reads DATA/tokenizer.json, corpus.bin, val.bin (and corpus_long.bin for the context schedule); writes
OUT/model.pt, config.json, metrics.jsonl (val loss, bits per byte, copy probe every --eval-every steps) and
checkpoint.pt: restarted on the same --out it resumes exactly, under any number of processes.

    python pretrain.py                                                   # tiny, CPU: -> runs/tiny/pretrain
    torchrun --nproc_per_node 8 pretrain.py --model r7b --replicate 2 ...     # FSDP2; HSDP over 2 x 4 GPUs
    python pretrain.py --model command-a --dry-run 8,64,256                   # memory plan, allocates nothing
"""

from dataclasses import replace
from pathlib import Path

import torch

from common import (Logger, add_run_flags, argument_parser, build_model, load_checkpoint, load_config,
                    lr_factor, make_optimizer, optimizer_step, print_settings, save_checkpoint, save_model,
                    set_lr, to_device, write_config)
from data import BOS, IGNORE, load_tokenizer, open_shard, shard_batch
from records import read_jsonl
from distributed import Runtime, all_reduce_sum, autocast, setup, teardown
from evaluate import validation_loss
from model import PRESETS, Config


def parse_args(argv=None):
    parser = argument_parser(__doc__)
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default="tiny", choices=PRESETS, help="model preset")
    what.add_argument("--dim", type=int, help="override the preset's width (ffn_dim scales with it)")
    what.add_argument("--n-layers", type=int, help="override the preset's depth")
    what.add_argument("--init", help="start from this model.pt (or its --out folder) instead of a fresh init")
    what.add_argument("--data", default="data/tiny", help="folder with tokenizer.json, corpus.bin, val.bin")
    what.add_argument("--out", default="runs/tiny/pretrain")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=1800, help="optimizer steps, cooldown included")
    optim.add_argument("--batch-size", type=int, default=8, help="rows per process and micro-batch")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--seq-len", type=int, default=256, help="row length (the base context)")
    optim.add_argument("--lr", type=float, default=3e-3, help="peak LR (of the vector-like groups under µP)")
    optim.add_argument("--min-lr", type=float, help="LR at the end of the cooldown (default: lr / 250, the "
                                                    "report's 2.5e-4 -> 1e-6)")
    optim.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    optim.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                       help="LR after warmup")
    optim.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    cooldown = parser.add_argument_group("cooldown and context extension (§2.5)")
    cooldown.add_argument("--cooldown-steps", type=int, help="final linear LR anneal, in bf16 (default: the "
                                                             "context schedule's steps, else 120)")
    cooldown.add_argument("--context-schedule",
                          help="cooldown stages LEN:STEPS,...; the first LEN is --seq-len; later stages "
                               "interleave LEN-token batches every 4th step")
    scale = parser.add_argument_group("precision and scale (§2.4)")
    scale.add_argument("--fp8-after", type=int, help="FP8 block matmuls from this step until the cooldown")
    scale.add_argument("--mup", action="store_true", help="µP parametrisation (needs --base-width)")
    scale.add_argument("--base-width", type=int,
                       help="µP base width: the width the hyper-parameters were tuned at")
    scale.add_argument("--recompute", action="store_true",
                       help="activation checkpointing: recompute each block in backward")
    scale.add_argument("--replicate", type=int, default=1,
                       help="HSDP: replicas of the sharded model (DP axis)")
    scale.add_argument("--dry-run", metavar="WORLD_SIZES",
                       help="print the per-GPU memory plan for these world sizes (e.g. 8,64,256) and exit")
    run = add_run_flags(parser, log_every=10, save_every=200, seed_help="initialisation and data order",
                        generation=False)
    run.add_argument("--eval-every", type=int, default=100, help="validation loss and bpb every N steps")
    run.add_argument("--eval-batches", type=int, default=8, help="validation batches")
    args = parser.parse_args(argv)
    if args.mup != (args.base_width is not None):
        parser.error("--mup and --base-width go together")
    args.min_lr = args.lr / 250 if args.min_lr is None else args.min_lr
    args.stages = parse_context_schedule(args.context_schedule, args.seq_len)
    schedule_steps = sum(n for _, n in args.stages)
    if args.cooldown_steps is None:
        args.cooldown_steps = schedule_steps if args.stages else 120
    if args.stages and args.cooldown_steps != schedule_steps:
        parser.error(f"--cooldown-steps {args.cooldown_steps} differs from the context schedule's "
                     f"{schedule_steps}")
    if args.cooldown_steps > args.steps:
        parser.error(f"the cooldown ({args.cooldown_steps} steps) is longer than --steps {args.steps}")
    for length, _ in args.stages[1:]:
        if (args.batch_size * args.seq_len) % length:
            parser.error(f"context length {length} must divide the batch's {args.batch_size} x "
                         f"{args.seq_len} tokens: long batches keep the tokens per step")
    return args


def parse_context_schedule(spec: str | None, seq_len: int) -> list[tuple[int, int]]:
    """"256:600,1024:200" -> [(256, 600), (1024, 200)]; the first length must be the base --seq-len."""
    if not spec:
        return []
    stages = []
    for item in spec.split(","):
        length, _, steps = item.partition(":")
        if not (length.isdigit() and steps.isdigit() and int(length) > 0 and int(steps) > 0):
            raise ValueError(f"--context-schedule: {item!r} is not LENGTH:STEPS with positive integers")
        stages.append((int(length), int(steps)))
    if stages[0][0] != seq_len:
        raise ValueError(f"--context-schedule starts at length {stages[0][0]}, but --seq-len is {seq_len}: "
                         f"the first stage is the base length")
    return stages


def step_plan(step: int, steps: int, stages: list[tuple[int, int]], seq_len: int) -> tuple[bool, int, int]:
    """(long, length, data_step) for optimizer step `step`: whether it is a long-context batch (every fourth
    step of each cooldown stage after the first, §2.5), its sequence length, and its index among the batches
    drawn from its own shard so far (data order stays a pure function of the step)."""
    start = steps - sum(n for _, n in stages)
    long_before, stage_start = 0, start
    for i, (length, n) in enumerate(stages):
        if step < stage_start + n:
            t = step - stage_start
            if i > 0:
                long_before += t // 4  # steps 3, 7, 11, ... of the stage are long
                if t % 4 == 3:
                    return True, length, long_before
            return False, seq_len, step - long_before
        if i > 0:
            long_before += n // 4
        stage_start += n
    return False, seq_len, step - long_before


def fp8_on(step: int, fp8_after: int | None, cooldown_start: int) -> bool:
    """Whether step `step` runs the block matmuls in FP8: from --fp8-after until the cooldown, which is bf16
    (§2.5; §2.4.1: a run all in FP8 loses a little downstream)."""
    return fp8_after is not None and fp8_after <= step < cooldown_start


def open_data_shard(path: Path, enc, seq_len: int):
    """data.open_shard, plus a clear message for a shard too short for one row."""
    shard = open_shard(path, enc)
    if len(shard) <= seq_len:
        raise ValueError(f"{path} has {len(shard)} tokens: too few for one row of {seq_len} + 1")
    return shard


def model_config(args, n_vocab: int | None) -> Config:
    """The preset with the command line's overrides; the vocabulary is the tokenizer's."""
    preset = PRESETS[args.model]
    overrides = {"mup_base_dim": args.base_width}
    if args.dim:
        overrides |= {"dim": args.dim, "ffn_dim": preset.ffn_dim * args.dim // preset.dim}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    if n_vocab:
        overrides["vocab_size"] = n_vocab
    return replace(preset, **overrides)


def activation_bytes(config: Config, tokens: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """Estimated bytes of the tensors autograd keeps for backward, for `tokens` tokens per GPU: (without
    recomputation, with per-block activation checkpointing). Per block and token, in the matmul dtype unless
    noted: the block input and its LayerNorm output (+ the fp32 upcast), the fused projection's output, RoPE'd
    q and k (fp32), SDPA's q, k, v and output (flash attention keeps no T x T scores), silu(gate) and its
    product with up, and out_proj's input. Plus the loss: fp32 gradients of the hidden states and the full
    embedding (ChunkedCrossEntropy computes them in the forward pass)."""
    attn, kv, ffn, dim = (config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim,
                          config.ffn_dim, config.dim)
    per_token = (dtype_bytes * (2 * dim + attn + 2 * kv + 2 * ffn + attn + 2 * kv + attn
                                + 2 * ffn + attn + ffn)
                 + 4 * (dim + attn + kv))
    loss = 4 * tokens * dim + 4 * config.vocab_size * dim
    full = config.n_layers * per_token * tokens + loss
    recompute = config.n_layers * dtype_bytes * dim * tokens + per_token * tokens + loss
    return full, recompute


def dry_run(args):
    """The per-GPU memory plan of a preset for each world size: fp32 parameters, gradients and AdamW state are
    sharded over the FSDP axis (world / --replicate); the bf16 copies of two gathered blocks (one running,
    one prefetched) and of the gathered embedding are not; activations are per GPU."""
    config = model_config(args, None)
    n_params, gib = config.num_params(), 2**30
    block_params = (n_params - config.vocab_size * config.dim - config.dim) // config.n_layers
    tokens = args.batch_size * args.seq_len * args.grad_accum
    act_full, act_recompute = activation_bytes(config, args.batch_size * args.seq_len)
    print(f"{args.model}: {n_params / 1e9:.2f}B parameters, {config.flops_per_token(args.seq_len) / 1e9:.1f} "
          f"GFLOP/token (training, seq {args.seq_len}); per GPU: micro-batch {args.batch_size} x "
          f"{args.seq_len}, {tokens} tokens per step; HSDP replicate {args.replicate}")
    print(f"{'GPUs':>6}{'shard':>7}{'params':>9}{'grads':>9}{'AdamW':>9}{'gathered':>10}{'activ.':>9}"
          f"{'total':>9}{'activ. --recompute':>20}{'total':>9}   (GiB)")
    for world_size in (int(w) for w in args.dry_run.split(",")):
        shard = world_size // args.replicate
        params, grads, adam = 4 * n_params / shard, 4 * n_params / shard, 8 * n_params / shard
        gathered = 2 * (2 * block_params + config.vocab_size * config.dim)
        fixed = params + grads + adam + gathered
        print(f"{world_size:6d}{shard:7d}{params / gib:9.1f}{grads / gib:9.1f}{adam / gib:9.1f}"
              f"{gathered / gib:10.1f}{act_full / gib:9.1f}{(fixed + act_full) / gib:9.1f}"
              f"{act_recompute / gib:20.1f}{(fixed + act_recompute) / gib:9.1f}")


@torch.no_grad()
def copy_accuracy(model, enc, probes: list[dict], runtime: Runtime) -> dict:
    """The copy probes (tasks.copy_probes): the share of the answers' tokens that the model predicts, each
    greedily given the text and the answer's tokens before it (teacher forcing), by probe name:
    {"copy_math": ..., "copy_needle@1x": ...}. Per token rather than per answer, so that the learning curve
    shows the skill forming. Every rank scores every probe (the model may be sharded)."""
    was_training = model.training
    model.eval()
    bos, correct = enc.encode_single_token(BOS), {}
    for probe in probes:
        prompt = [bos] + enc.encode_ordinary(probe["text"])
        ids = [bos] + enc.encode_ordinary(probe["text"] + probe["answer"])
        if ids[:len(prompt)] != prompt:
            raise ValueError(f"copy probe answer {probe['answer']!r} merges with the text before it")
        with autocast(runtime):
            logits = model(torch.tensor([ids[:-1]], device=runtime.device))
        predicted = logits[0, len(prompt) - 1:].argmax(-1).tolist()
        correct.setdefault(probe["name"], []).extend(p == t for p, t in zip(predicted, ids[len(prompt):]))
    model.train(was_training)
    return {f"copy_{name}": sum(hits) / len(hits) for name, hits in correct.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    runtime = setup(args.device, args.replicate, args.precision)

    # data: the shards must exist and match the tokenizer (open_shard checks dtype, tokenizer and size)
    data = Path(args.data)
    enc = load_tokenizer(str(data / "tokenizer.json"))
    names = ["corpus", "val"] + (["corpus_long"] if args.stages else [])
    shards = {name: open_data_shard(data / f"{name}.bin", enc, args.seq_len) for name in names}
    probe_file = data / "eval" / "copy.jsonl"  # the copy probe's learning curve, where tasks.py wrote one
    probes = read_jsonl(probe_file, "text") if probe_file.is_file() else []

    # model and optimizer; config.json records what the next stage needs
    if args.init:
        config = Config(**load_config(args.init)["model"])
        if config.vocab_size != enc.n_vocab:
            raise ValueError(f"--init {args.init} has a vocabulary of {config.vocab_size}, the tokenizer "
                             f"{data / 'tokenizer.json'} {enc.n_vocab}")
    else:
        config = model_config(args, enc.n_vocab)
    out = Path(args.out)
    if (out / "config.json").is_file() and Config(**load_config(out)["model"]) != config:  # every rank stops
        raise ValueError(f"{out} holds a run of a different model; pick another --out to start afresh")
    if runtime.is_main:
        write_config(out, "pretrain", args.model, config, args, str(data / "tokenizer.json"), args.init)
        print_settings("pretrain", args)
    model = build_model(config, runtime, args.init, args.seed, args.recompute)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start = load_checkpoint(out, model, optimizer, runtime)

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * runtime.world_size
    cooldown_start = args.steps - args.cooldown_steps
    logger = Logger(out, runtime, start, args.steps, start * tokens_per_step,
                    config.flops_per_token(args.seq_len))
    for step in range(start, args.steps):
        model.set_fp8(fp8_on(step, args.fp8_after, cooldown_start))
        lr = lr_factor(step, steps=args.steps, warmup=args.warmup, cooldown=args.cooldown_steps,
                       min_ratio=args.min_lr / args.lr, cosine=args.schedule == "cosine")
        set_lr(optimizer, lr)
        long, length, data_step = step_plan(step, args.steps, args.stages, args.seq_len)
        shard, rows = shards["corpus_long" if long else "corpus"], args.batch_size * args.seq_len // length
        batches = [shard_batch(enc, shard, data_step * args.grad_accum + micro, rows, length, args.seed,
                               runtime.rank, runtime.world_size) for micro in range(args.grad_accum)]

        # the loss is the mean over every target token of the step (all micro-batches, all ranks); FSDP
        # averages gradients over ranks, hence the factor world_size
        n_targets = all_reduce_sum(sum((b["targets"] != IGNORE).sum().item() for b in batches), runtime)
        loss_sum = 0.0
        for batch in batches:
            batch = to_device(batch, runtime.device)
            n_local = (batch["targets"] != IGNORE).sum().item()
            with autocast(runtime):
                loss = model.loss(batch["tokens"], batch["targets"], batch["doc_ids"], batch["positions"])
            (loss * n_local * runtime.world_size / n_targets).backward()
            loss_sum += loss.item() * n_local
        loss = all_reduce_sum(loss_sum, runtime) / n_targets
        grad_norm = optimizer_step(model, optimizer, loss, step, out, args.grad_clip)

        done = step + 1
        logger.advance()
        metrics = {}
        if done % args.eval_every == 0 or done == args.steps:
            metrics |= copy_accuracy(model, enc, probes, runtime) if probes else {}
            metrics["val_loss"], metrics["val_bpb"] = validation_loss(model, enc, shards["val"],
                                                                      args.eval_batches, args.batch_size,
                                                                      args.seq_len, runtime)
        if done % args.log_every == 0 or done == args.steps or metrics:
            logger.log(done, done * tokens_per_step, loss=loss, lr=lr * args.lr, grad_norm=grad_norm,
                       seq_len=length, **metrics)
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, model, optimizer, done, runtime)
    save_model(out, model, runtime)
    logger.close()
    teardown(runtime)


if __name__ == "__main__":
    main()
