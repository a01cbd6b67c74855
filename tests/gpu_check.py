"""
GPU check for model.py (report §2.4.1), one process on one GPU, meant to finish within 5 minutes (much of it
compiling flex_attention's kernels):

1. bf16 and FP8 training steps of a ~1.15B-parameter config: tokens/s, MFU against the H100/H200 dense bf16
   peak (989 TFLOP/s) and the FP8/bf16 step-time ratio, measured side by side. Its sliding-window layers,
   longer than their window, attend through flex_attention.
2. One layer's attention, forward and backward, on 8k tokens of packed documents: flex_attention with a block
   mask against SDPA with the dense boolean mask, for a sliding-window layer and a full one, with the time to
   build each mask, peak memory and the largest difference between the two outputs.

Not collected by pytest (needs CUDA); run as

    python tests/gpu_check.py [--steps 10] [--batch-size 4] [--seq-len 2048] [--attention-len 8192]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import H100_BF16_PEAK_FLOPS  # noqa: E402
from model import Config, Transformer, attend, attention_masks  # noqa: E402

# d 2048, 24 layers, 16 heads / 4 KV, SwiGLU 5632, vocab 32768: 1.15B parameters
CONFIG = Config(vocab_size=32768, dim=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_dim=5632,
                window=1024, max_seq_len=2048)


def measure_step(fp8: bool, args) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) under bf16 autocast."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).cuda()
    model.set_fp8(fp8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(CONFIG.vocab_size, (args.batch_size, args.seq_len + 1), device="cuda")
    times = []
    for step in range(args.steps + 2):  # two warm-up steps (the first compiles flex_attention)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    print(f"  {'fp8' if fp8 else 'bf16'}: loss {loss.item():.3f}, peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return sorted(times)[len(times) // 2]


def median_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of fn() on the GPU, after two warm-up calls (which compile flex's kernels)."""
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def packed_doc_ids(seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """doc_ids [1, seq_len] of documents of 128 to 2048 tokens packed back to back (the last one cut)."""
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(128, 2049, (), generator=generator)))
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[:seq_len]
    return doc_ids[None].cuda()


def measure_attention(seq_len: int):
    """One layer's attention (CONFIG's heads, bf16) on seq_len tokens of packed documents, forward and
    backward, through model.attend with the dense mask (SDPA, in query blocks that each see only the keys
    they can attend to) and with the block mask (flex_attention), for a sliding-window layer and a full
    one."""
    generator = torch.Generator().manual_seed(0)
    doc_ids = packed_doc_ids(seq_len, generator)
    q = torch.randn(1, CONFIG.n_heads, seq_len, CONFIG.head_dim, generator=generator).cuda().bfloat16()
    k, v = (torch.randn(1, CONFIG.n_kv_heads, seq_len, CONFIG.head_dim, generator=generator).cuda().bfloat16()
            for _ in range(2))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    print(f"attention, forward + backward, on {seq_len} tokens of {int(doc_ids.max()) + 1} packed documents, "
          f"{CONFIG.n_heads} heads / {CONFIG.n_kv_heads} KV of {CONFIG.head_dim}, window {CONFIG.window}, "
          f"bf16:")
    results = {}
    for flex in (False, True):
        build = lambda: attention_masks(doc_ids, seq_len, CONFIG.window, doc_ids.device, flex)  # noqa: E731
        masks = dict(zip(("sliding", "full"), build()))
        print(f"  building both {'block' if flex else 'dense'} masks: {median_ms(build):.2f} ms")
        for layer, mask in masks.items():
            window = CONFIG.window if layer == "sliding" else None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = median_ms(lambda: torch.autograd.grad(attend(q, k, v, mask, None, window), inputs, grad))
            mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            # with grad, as timed: no inference-only recompile
            out = attend(q, k, v, mask, None, window).detach()
            results[layer, flex] = ms, mib, out, 100 - mask.sparsity() if flex else 100
    for layer in ("sliding", "full"):
        (sdpa_ms, sdpa_mib, sdpa_out, _), (flex_ms, flex_mib, flex_out, computed) = (
            results[layer, False], results[layer, True])
        print(f"  {layer} layer: sdpa {sdpa_ms:.2f} ms (+{sdpa_mib:,.0f} MiB), flex {flex_ms:.2f} ms "
              f"(+{flex_mib:,.0f} MiB): flex {sdpa_ms / flex_ms:.1f}x faster, {computed:.0f} % of blocks "
              f"computed; outputs differ by at most {(flex_out - sdpa_out).abs().max().item():.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--attention-len", type=int, default=8192, help="tokens of the attention comparison")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    tokens = args.batch_size * args.seq_len
    flops_per_step = CONFIG.flops_per_token(args.seq_len) * tokens
    print(f"{torch.cuda.get_device_name()}: {CONFIG.num_params() / 1e9:.2f}B params, batch {args.batch_size} "
          f"x {args.seq_len}, {CONFIG.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token")
    seconds = {fp8: measure_step(fp8, args) for fp8 in (False, True)}
    for fp8, s in seconds.items():
        print(f"{'fp8 ' if fp8 else 'bf16'}  {s * 1e3:8.1f} ms/step  {tokens / s:10.0f} tok/s  "
              f"MFU {flops_per_step / s / H100_BF16_PEAK_FLOPS:6.1%} (of bf16 peak)")
    print(f"fp8/bf16 step time: {seconds[True] / seconds[False]:.2f}")
    measure_attention(args.attention_len)


if __name__ == "__main__":
    main()
