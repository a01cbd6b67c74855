"""
GPU check for model.py (report §2.4.1): bf16 and FP8 training steps of a ~1.15B-parameter config on one GPU.
Prints tokens/s, MFU against the H100's dense peak (989 TFLOP/s bf16) and the FP8/bf16 step-time ratio,
measured side by side in one process. Not collected by pytest (needs CUDA); run as

    python tests/gpu_check.py [--steps 10] [--batch-size 4] [--seq-len 2048]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Config, Transformer  # noqa: E402

H100_BF16_PEAK = 989e12

# d 2048, 24 layers, 16 heads / 4 KV, SwiGLU 5632, vocab 32768: 1.15B parameters
CONFIG = Config(vocab_size=32768, dim=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_dim=5632,
                window=1024, max_seq_len=2048)


def measure(fp8: bool, args) -> float:
    """Median seconds per optimizer step (forward, backward, AdamW) under bf16 autocast."""
    torch.manual_seed(0)
    model = Transformer(CONFIG).cuda()
    model.set_fp8(fp8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = torch.randint(CONFIG.vocab_size, (args.batch_size, args.seq_len + 1), device="cuda")
    times = []
    for step in range(args.steps + 2):  # two warm-up steps
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    tokens = args.batch_size * args.seq_len
    flops_per_step = CONFIG.flops_per_token(args.seq_len) * tokens
    print(f"{torch.cuda.get_device_name()}: {CONFIG.num_params() / 1e9:.2f}B params, batch {args.batch_size} "
          f"x {args.seq_len}, {CONFIG.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token")
    seconds = {fp8: measure(fp8, args) for fp8 in (False, True)}
    for fp8, s in seconds.items():
        print(f"{'fp8 ' if fp8 else 'bf16'}  {s * 1e3:8.1f} ms/step  {tokens / s:10.0f} tok/s  "
              f"MFU {flops_per_step / s / H100_BF16_PEAK:6.1%} (of bf16 peak)")
    print(f"fp8/bf16 step time: {seconds[True] / seconds[False]:.2f}")


if __name__ == "__main__":
    main()
