"""Launch sweep of the logits KL kernel (BLOCK_V x warps, loss + gradient, bf16, V = 151,936) at several row
counts, then the fused path at T = 8192 with the best settings for its chunks, on a GPU.

    python bench/kl_sweep.py [T ...]     # default: 512 (a fused chunk) and 8192

fma contraction stays off: with it on the kernel fails two accuracy tests on an H200 for a ~1% gain (RESULTS.md).
"""
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels.kl  # noqa: E402
from kernels import fused_linear_kl  # noqa: E402

V, H, CHUNK = 151936, 2048, 512
g = torch.Generator("cuda").manual_seed(0)
x, y = torch.empty(2**32, dtype=torch.uint8, device="cuda"), torch.empty(2**32, dtype=torch.uint8, device="cuda")
bw = 2 * 2**32 / (do_bench(lambda: y.copy_(x), return_mode="median") / 1e3)
del x, y
print(f"copy {bw / 1e9:.0f} GB/s")
best = {}
for T in [int(a) for a in sys.argv[1:]] or [CHUNK, 8192]:
    s, t = ((torch.randn(T, V, device="cuda", generator=g) * 4).to(torch.bfloat16) for _ in range(2))
    grad, loss = torch.empty_like(s), torch.empty(T, dtype=torch.float32, device="cuda")
    valid = torch.ones(T, dtype=torch.int8, device="cuda")
    count = valid.sum(dtype=torch.int32)
    floor = 5 * T * V * 2 / bw * 1e3
    rows = []  # (ms, BLOCK_V, warps)
    for block in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            fn = lambda: kernels.kl._kl_kernel[(T,)](s, t, grad, valid, count, loss, s.stride(0), t.stride(0),
                                                     grad.stride(0), V, 1 / 0.7, REVERSE=True, WRITE_GRAD=True,
                                                     BLOCK_V=block, num_warps=warps, enable_fp_fusion=False)
            rows.append((do_bench(fn, return_mode="median"), block, warps))
    print(f"T = {T}: floor {floor:.3f} ms; launched with {(kernels.kl.BLOCK_V, kernels.kl.NUM_WARPS)}")
    for ms, block, warps in sorted(rows):
        print(f"  BLOCK_V {block:5d} warps {warps:2d} {ms:.3f} ms {ms / floor:.2f}x floor")
    best[T] = [r[1:] for r in sorted(rows)[:3]]
    del s, t, grad

# the fused path at T = 8192 (C = 512 chunks), its chunks launched with each of the best settings at T = CHUNK
T = 8192
h_s, h_t = (torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
w_s, w_t = ((torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 4).to(torch.bfloat16) for _ in range(2))
h_s.requires_grad_(), w_s.requires_grad_()


def step():
    h_s.grad = w_s.grad = None
    fused_linear_kl(h_s, w_s, h_t, w_t, None, 0.7, chunk_size=CHUNK).backward()


as_coded = kernels.kl.BLOCK_V, kernels.kl.NUM_WARPS
for config in [as_coded] + best.get(CHUNK, []):
    kernels.kl.BLOCK_V, kernels.kl.NUM_WARPS = config
    print(f"fused T = {T}, C = {CHUNK}, chunks launched with (BLOCK_V, warps) = {config}"
          f"{' (as coded)' if config == as_coded else ''}: {do_bench(step, return_mode='median'):.2f} ms")
