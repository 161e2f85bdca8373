"""Time per decode attention call of each ``scaled_dot_product_attention`` backend on a GPU, as the engine's
generic path calls it (the query heads of a KV head folded into the query axis, bf16, SmolLM2's 3 KV heads of
64), with a key length that grows by one every call as in decoding. The wall time of a call (host work,
launch and kernel, synchronized) is what a decode step pays per layer; backends that build a plan for every
new shape show it here. Why ``platforms.attention_backends`` leaves cuDNN out.

    python benchmarks/sdpa_backends.py [--batch-sizes 1,16,64] [--calls 64]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--start-len", type=int, default=100)
    args = p.parse_args()
    dev, dtype, kv_heads, group, dim = torch.device("cuda"), torch.bfloat16, 3, 3, 64
    choices = {
        "default": None,
        "no cuDNN": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "cuDNN": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }
    print(
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}; median µs per call (wall, synchronized)"
    )
    for n in (int(x) for x in args.batch_sizes.split(",")):
        row = []
        for name, backends in choices.items():
            q = torch.randn(n, kv_heads, group, dim, device=dev, dtype=dtype)
            # gathered K/V as the engine lays them out, [n, len, kv_heads, dim], seen as [n, kv_heads, len, dim]
            kv = torch.randn(2, n, args.start_len + args.calls, kv_heads, dim, device=dev, dtype=dtype)
            times = []
            try:
                for i in range(args.calls):
                    length = args.start_len + i
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    k, v = (kv[j, :, :length].transpose(1, 2) for j in (0, 1))
                    if backends is None:
                        F.scaled_dot_product_attention(q, k, v)
                    else:
                        with sdpa_kernel(backends):
                            F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row.append(f"{name} {1e6 * statistics.median(times[4:]):.0f}")
            except RuntimeError as e:  # a backend that cannot take the shape
                row.append(f"{name} n/a ({str(e).splitlines()[0][:60]})")
        print(f"batch {n:3d}: " + "; ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
