#!/usr/bin/env python3
"""Times torch's scaled_dot_product_attention (causal, GQA) on one CUDA device: the dense baseline of `nsa bench`.

Builds q [B, Hq, T, Dk], k [B, H, T, Dk], v [B, H, T, Dv] with standard normal entries, runs warm-up iterations,
then times each iteration with CUDA events (forward, or forward + backward with --backward) and prints ONE JSON
line: {"median_ms": ..., "samples_ms": [...], "device": ..., "torch": ..., "flops": ..., "tflops": ...}.
FLOPs count the causal half: forward 2 * B * Hq * T * (T + 1) / 2 * (Dk + Dv), backward 2.5x the forward.
"""

import argparse
import json
import statistics
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, required=True, help="T: tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="B: sequences")
    p.add_argument("--heads", type=int, default=64, help="Hq: query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="H: key/value heads (divides Hq)")
    p.add_argument("--head-dim", type=int, default=128, help="Dk: query/key head dim")
    p.add_argument("--value-dim", type=int, default=128, help="Dv: value head dim")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    args = p.parse_args()
    if args.heads % args.kv_heads != 0:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if min(args.seqlen, args.batch, args.heads, args.kv_heads, args.head_dim, args.value_dim, args.iters) < 1:
        p.error("sizes and --iters must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 1
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_(args.backward)

    B, T = args.batch, args.seqlen
    q = randn(B, args.heads, T, args.head_dim)
    k = randn(B, args.kv_heads, T, args.head_dim)
    v = randn(B, args.kv_heads, T, args.value_dim)
    gqa = args.heads != args.kv_heads
    do = torch.randn(B, args.heads, T, args.value_dim, device=device, dtype=dtype, generator=gen) if args.backward else None

    def step() -> None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if do is not None:
            q.grad = k.grad = v.grad = None
            o.backward(do)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(args.iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))

    median = statistics.median(samples)
    flops = 2 * B * args.heads * T * (T + 1) / 2 * (args.head_dim + args.value_dim)
    if args.backward:
        flops *= 3.5
    print(
        json.dumps(
            {
                "median_ms": median,
                "samples_ms": samples,
                "device": torch.cuda.get_device_name(device),
                "torch": torch.__version__,
                "flops": flops,
                "tflops": flops / (median * 1e-3) / 1e12,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
