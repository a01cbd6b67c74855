"""
Benchmarks (figures in RESULTS.md):

    python bench.py model [--preset small ...]   training and generation tokens/s of model.py against
                                                 transformers' Cohere2ForCausalLM on the same weights, and
                                                 KV-cache bytes (--bf16: ours in fp32 against bf16 autocast)
    python bench.py merge [--models 7 --preset small]   peak memory of merge.py's streaming merge of N
                                                        checkpoints
    python bench.py import [--preset small --shards 5]  peak memory of `hf.py --from-hf` on a random
                                                        sharded bf16 Cohere2 checkpoint
    python bench.py rows [--scored 0.3]   a training step, a prompt's prefill and RoPE on packed rows of
                                          256 to 2,048 tokens: model.py against its plain form (one SDPA
                                          call over the dense mask, every position projected to logits,
                                          RoPE's pairs split and interleaved again)

Each prints ratios against a baseline measured in the same run (`model` alternates ours, theirs, ours, ...,
so that both see the same machine load).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import model as model_module
from data import SPECIAL_TOKENS
from hf import build_pair, to_cohere2_config
from model import PRESETS, ChunkedCrossEntropy, Transformer, apply_rope, generate, rope_rotations


def bench_model(args):
    """Ours against transformers on the same weights and inputs, timed alternately (ours, theirs, ours, ...)
    so that both see the same machine load; figures are medians over `repeats` rounds."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = PRESETS[args.preset]
    hf, ours = build_pair(config)
    torch.manual_seed(0)
    data = torch.randint(config.vocab_size, (args.batch_size, args.seq_len + 1))
    idx, targets = data[:, :-1], data[:, 1:]
    lengths = torch.randint(args.seq_len // 8, args.seq_len // 4, (args.gen_batch,)).tolist()
    prompts = [torch.randint(config.vocab_size, (n,)).tolist() for n in lengths]
    hf_inputs = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    hf_mask = torch.zeros_like(hf_inputs)
    for row, prompt in enumerate(prompts):  # transformers generates from left-padded prompts too
        hf_inputs[row, -len(prompt):] = torch.tensor(prompt)
        hf_mask[row, -len(prompt):] = 1

    tasks = {  # name -> (ours, theirs, tokens per call)
        "train (fwd+bwd of the LM loss)": (lambda: ours.loss(idx, targets).backward(),
                                           lambda: hf(input_ids=idx, labels=idx).loss.backward(),
                                           idx.numel()),
        "generate (greedy, KV cache)": (
            lambda: generate(ours, prompts, args.gen_tokens, temperature=0),
            lambda: hf.generate(input_ids=hf_inputs, attention_mask=hf_mask, max_new_tokens=args.gen_tokens,
                                min_new_tokens=args.gen_tokens, do_sample=False),
            len(prompts) * args.gen_tokens),
    }
    print(f"preset {args.preset}: {config.num_params() / 1e6:.2f}M params, fp32 on "
          f"{torch.get_num_threads()} CPU threads; train batch {args.batch_size} x {args.seq_len}; generate "
          f"{args.gen_batch} prompts of {min(lengths)}-{max(lengths)} tokens + {args.gen_tokens} new")
    print(f"{'':32}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}")
    for name, (ours_fn, hf_fn, tokens) in tasks.items():
        ours_rate, hf_rate = (tokens / s for s in median_seconds((ours_fn, hf_fn), args.repeats))
        print(f"{name:32}{ours_rate:12.0f}{hf_rate:14.0f}{ours_rate / hf_rate:7.2f}x")
    if args.bf16:
        bench_bf16({name: (ours_fn, tokens) for name, (ours_fn, _, tokens) in tasks.items()}, args.repeats)

    length = 8 * config.window
    _, cache = generate(ours, [[1] * (length - 1)], 1, temperature=0, return_cache=True)
    # k and v of every layer, fp32
    full = config.n_layers * length * 2 * config.n_kv_heads * config.head_dim * 4
    print(f"KV cache at {length} tokens (8x window): {cache.nbytes() / 2**20:.2f} MiB with rolling "
          f"sliding-window buffers vs {full / 2**20:.2f} MiB for a full cache = {cache.nbytes() / full:.1%}")


def bench_rows(args):
    """What model.py does on long packed rows against its plain form, alternately in one process: attention
    in query blocks (model.attend) against one SDPA call over the dense [T, T] mask, and a loss that projects
    only the scored positions to logits against one that projects them all, RoPE as one complex multiply
    against its pairs split and interleaved again. Rows hold documents of 64 to T / 2 tokens; a share
    --scored of the targets is scored (an SFT batch: the replies)."""
    config = PRESETS[args.preset]
    torch.manual_seed(0)
    model = Transformer(config)

    def plain(fn):
        def run():
            block, model_module.QUERY_BLOCK = model_module.QUERY_BLOCK, 10**9
            try:
                fn()
            finally:
                model_module.QUERY_BLOCK = block
        return run

    print(f"preset {args.preset}, fp32 on {torch.get_num_threads()} CPU threads, {args.tokens} tokens per "
          f"batch, {args.scored:.0%} of the targets scored")
    print(f"{'':31}{'plain tok/s':>12}{'model.py':>10}{'ratio':>8}")
    for seq_len in (256, 512, 1024, 2048):
        rows = max(1, args.tokens // seq_len)
        idx = torch.randint(config.vocab_size, (rows, seq_len))
        lengths = torch.randint(64, seq_len // 2 + 1, (rows, seq_len // 64))
        doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(n)), n)[:seq_len] for n in lengths])
        targets = torch.where(torch.rand(rows, seq_len) < args.scored, idx.roll(-1, 1), -100)

        def step_all():
            hidden = model.hidden_states(idx, doc_ids).flatten(0, 1)
            ChunkedCrossEntropy.apply(hidden, model.embed.weight, targets.flatten(),
                                      config.output_scale).backward()

        def prefill():
            generate(model, idx[:, :seq_len - 1].tolist(), 1, temperature=0)

        q = torch.randn(rows, config.n_heads, seq_len, config.head_dim, requires_grad=True)
        rotations = rope_rotations(torch.arange(seq_len)[None].expand(rows, -1), config.head_dim,
                                   config.rope_theta)

        tasks = {"train step": (plain(step_all), lambda: model.loss(idx, targets, doc_ids).backward()),
                 "prefill (1 new token)": (plain(prefill), prefill),
                 "RoPE on q, fwd + bwd": (lambda: rope_pairs_apart(q, rotations).sum().backward(),
                                          lambda: apply_rope(q, rotations).sum().backward())}
        for name, fns in tasks.items():
            plain_rate, ours_rate = (idx.numel() / s for s in median_seconds(fns, args.repeats))
            label = f"{name} @ {seq_len}"
            print(f"{label:31}{plain_rate:12.0f}{ours_rate:10.0f}{ours_rate / plain_rate:7.2f}x")


def rope_pairs_apart(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """model.apply_rope written out: split the interleaved pairs, rotate them, interleave them again."""
    cos, sin = rotations.real, rotations.imag
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).to(x.dtype)


def median_seconds(fns, repeats: int) -> list[float]:
    """Each fn's median wall time over `repeats` rounds after a warm-up round; within a round the fns take
    turns, so that all of them see the same machine load."""
    seconds = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, times in zip(fns, seconds):
            start = time.perf_counter()
            fn()
            if rep > 0:
                times.append(time.perf_counter() - start)
    return [sorted(times)[len(times) // 2] for times in seconds]


def bench_bf16(tasks: dict, repeats: int):
    """Ours in fp32 against ours under bf16 autocast (§2.4.1's matmul precision; model.py keeps norms,
    softmax, the logits and, on a CPU, attention in fp32), on bench_model's tasks {name: (fn, tokens)}: what
    `--precision bf16` gains on this CPU (run_tiny.sh trains in bf16 where the CPU has bf16 instructions)."""
    def in_bf16(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        return run

    print(f"{'':32}{'fp32 tok/s':>12}{'bf16 autocast':>14}{'ratio':>8}")
    for name, (fn, tokens) in tasks.items():
        fp32, bf16 = (tokens / s for s in median_seconds((fn, in_bf16(fn)), repeats))
        print(f"{name:32}{fp32:12.0f}{bf16:14.0f}{bf16 / fp32:7.2f}x")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike getrusage's ru_maxrss)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def child_peak_rss_mib(code: str, *argv) -> float:
    output = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout
    return float(output.split()[-1])


def bench_merge(n_models: int, preset: str):
    """Peak memory of merging n_models checkpoints of a preset with merge.py, against one model's size."""
    config = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        tokenizer.write_text("{}")
        paths = []
        for i in range(n_models):
            torch.manual_seed(i)
            model_dir = Path(tmp) / f"expert{i}"
            model_dir.mkdir()
            torch.save(Transformer(config).state_dict(), model_dir / "model.pt")
            info = {"stage": "bench", "preset": preset, "model": config.__dict__, "tokenizer": str(tokenizer)}
            (model_dir / "config.json").write_text(json.dumps(info))
            paths.append(str(model_dir))
        model_mib = config.num_params() * 4 / 2**20
        # the baseline child imports what the merge imports (torch alone is a few hundred MiB) and stops
        baseline = child_peak_rss_mib("import merge, bench; print(bench.peak_rss_mib())")
        peak = child_peak_rss_mib("import sys, merge, bench; merge.main(sys.argv[1:]); "
                                  "print(bench.peak_rss_mib())",
                                  "--out", str(Path(tmp) / "soup"), "--models", *paths)
    print(f"merging {n_models} `{preset}` checkpoints of {model_mib:.0f} MiB each "
          f"({n_models * model_mib:.0f} MiB):")
    print(f"  peak RSS {peak:.0f} MiB, of which {baseline:.0f} MiB is the interpreter with torch imported")
    print(f"  merge memory {peak - baseline:.0f} MiB = {(peak - baseline) / model_mib:.2f}x one model "
          f"(the output model plus one input tensor at a time)")


def bench_import(preset: str, n_shards: int):
    """Peak memory of importing a random Cohere2 checkpoint of a preset, saved as on the Hub (bf16 safetensors
    in n_shards shards, and a tokenizer.json), with `python hf.py --from-hf`, against the size of the fp32
    model.pt it writes."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    transformers.logging.set_verbosity_error()
    config = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        torch.manual_seed(0)
        hf = transformers.Cohere2ForCausalLM(transformers.Cohere2Config(**to_cohere2_config(config)))
        shard_mb = config.num_params() * 2 / n_shards / 1e6
        hf.to(torch.bfloat16).save_pretrained(hf_dir, max_shard_size=f"{math.ceil(shard_mb)}MB")
        del hf
        tokenizer = Tokenizer(models.BPE())  # the folder needs one: a byte-level BPE with the chat tokens
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator([__doc__], trainer)
        tokenizer.save(str(hf_dir / "tokenizer.json"))
        shards = sorted(hf_dir.glob("*.safetensors"))
        checkpoint_mib = sum(shard.stat().st_size for shard in shards) / 2**20
        # the baseline child imports what the import does and builds a model on the meta device, as it does to
        # check the shapes (torch loads some 70 MiB at the first use of the meta device), and stops
        baseline = child_peak_rss_mib("import torch, hf, model, safetensors, bench\n"
                                      "with torch.device('meta'): model.Transformer(model.Config())\n"
                                      "print(bench.peak_rss_mib())")
        peak = child_peak_rss_mib("import sys, hf, bench; hf.main(sys.argv[1:]); "
                                  "print(bench.peak_rss_mib())",
                                  "--from-hf", str(hf_dir), "--out", str(Path(tmp) / "out"))
        model_mib = (Path(tmp) / "out" / "model.pt").stat().st_size / 2**20
    print(f"importing a `{preset}` Cohere2 checkpoint: {checkpoint_mib:.0f} MiB of bf16 in {len(shards)} "
          f"shards -> model.pt, {model_mib:.0f} MiB of fp32:")
    print(f"  peak RSS {peak:.0f} MiB, of which {baseline:.0f} MiB is the interpreter with the imports")
    print(f"  import memory {peak - baseline:.0f} MiB = {(peak - baseline) / model_mib:.2f}x the fp32 model")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="model.py against transformers' Cohere2ForCausalLM")
    model.add_argument("--preset", default="tiny", choices=PRESETS, help="model preset")
    model.add_argument("--batch-size", type=int, default=8, help="training rows")
    model.add_argument("--seq-len", type=int, default=256, help="training row length")
    model.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    model.add_argument("--gen-batch", type=int, default=8, help="prompts generated at once")
    model.add_argument("--gen-tokens", type=int, default=64, help="new tokens per prompt")
    model.add_argument("--bf16", action="store_true", help="also ours in fp32 against ours in bf16 autocast")
    merge = commands.add_parser("merge", help="peak memory of a streaming merge")
    merge.add_argument("--models", type=int, default=7, help="checkpoints to merge")
    merge.add_argument("--preset", default="small", choices=PRESETS, help="their preset")
    hf_import = commands.add_parser("import", help="peak memory of importing a Cohere2 checkpoint")
    hf_import.add_argument("--preset", default="small", choices=PRESETS, help="the checkpoint's preset")
    hf_import.add_argument("--shards", type=int, default=5, help="safetensors shards it is saved in")
    rows = commands.add_parser("rows", help="long packed rows: query blocks and scored-only logits")
    rows.add_argument("--preset", default="tiny", choices=PRESETS, help="model preset")
    rows.add_argument("--tokens", type=int, default=4096, help="tokens per batch (rows x length)")
    rows.add_argument("--scored", type=float, default=0.3, help="share of the targets that are scored")
    rows.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    args = parser.parse_args(argv)
    if args.command == "model":
        bench_model(args)
    elif args.command == "rows":
        bench_rows(args)
    elif args.command == "merge":
        bench_merge(args.models, args.preset)
    else:
        bench_import(args.preset, args.shards)


if __name__ == "__main__":
    main()
