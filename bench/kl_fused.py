"""
Experiment on the fused path's time (1.38-1.43x its matmul floor on an H200, against a 1.3x target):
fused_linear_kl's chunk schedules, timed in one run, each checked against the default one.

    python bench/kl_fused.py            # GPU: T = 8192, V = 151,936, H = 2048, bf16
    python bench/kl_fused.py --small    # tiny shapes: on a CPU, the schedules against the default (torch KL)

A schedule (C, n) is fused_linear_kl's chunk_size and group: C student and teacher rows per logits product and KL
call, and n chunks whose gradients share one [n C, V] buffer, for one grad_h product and one grad_W accumulate of
depth n C. The accumulate reads and writes all of grad_W (1.2 GB) once per group, and ran at 59% of the matmul rate at
depth 512 (the profile in bench/RESULTS.md, 2026-11-26). Extra memory: (n + 1) C V b bytes of buffers, plus grad_W
and grad_h (0.61 GiB); the target is 1 GiB, which leaves 1,375 rows of buffers at V = 151,936 in bf16. The default is
(512, 1). Depth 1024 as (1024, 1) came closest to the target on 2026-11-27 (1.31x) but needed 1.19 GiB; a teacher
product of 256 rows beside a 1,024-row student one was slower than the default (1.42x), and running the KL kernel on
a second stream beside the matmuls was slower in every schedule tried (this script at 5f5be74 has them).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kl import TAU, matmul_rate, peak_extra, timed  # noqa: E402  (bench/kl.py)
from kernels import fused_linear_kl  # noqa: E402
from kernels.kl import triton  # noqa: E402

GPU_SCHEDULES = [  # (C, n); extra GiB at T = 8192, V = 151,936, bf16
    (512, 1),   # 0.90: the default
    (1024, 1),  # 1.19: depth 1024, over the target
    (512, 2),   # 1.04: depth 1024, over the target; what grouping alone gives
    (448, 2),   # 0.99: depth 896
    (384, 2),   # 0.94: depth 768
    (336, 3),   # 0.99: depth 1008
    (256, 4),   # 0.97: depth 1024 from 256-row products
]
SMALL_SCHEDULES = [(16, 1), (32, 1), (16, 2), (24, 2), (8, 3)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=8192, help="tokens per call")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per schedule")
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    T, V, H, schedules = args.T, 151936, 2048, GPU_SCHEDULES
    if args.small or not cuda:
        T, V, H, schedules, args.reps = 64, 5000, 64, SMALL_SCHEDULES, 3
    impl = "triton" if cuda and triton is not None else "torch"
    g = torch.Generator(device).manual_seed(0)
    h_s, h_t = (torch.randn(T, H, device=device, generator=g).to(dtype) for _ in range(2))
    w_s, w_t = ((torch.randn(V, H, device=device, generator=g) / H**0.5 * 4).to(dtype) for _ in range(2))
    rate = matmul_rate(device, dtype, cuda, 8192 if cuda else 512)
    floor = 8 * T * H * V / rate * 1e3
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}: {str(dtype)[6:]} matmul {rate / 1e12:.1f} TFLOP/s; T {T}, V {V}, H {H}: floor {floor:.2f} ms")

    hs, ws = h_s.detach().requires_grad_(), w_s.detach().requires_grad_()

    def run(C=None, n=1):  # (loss, grad_h, grad_W), held by no one else (so peak_extra counts them as a schedule's)
        loss = fused_linear_kl(hs, ws, h_t, w_t, None, TAU, impl=impl, chunk_size=C, group=n)
        loss.backward()
        out = loss.detach(), hs.grad, ws.grad
        hs.grad = ws.grad = None
        return out

    rows = [("default", run)] + [(str(sc), lambda sc=sc: run(*sc)) for sc in schedules]

    def error(out, ref):  # max |x - ref| / max |ref| of (loss, grad_h, grad_W)
        return [((x.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
                for x, r in zip(out, ref)]

    print(f"\n{name}, T {T}, {str(dtype)[6:]}, median of {args.reps}; err = max |x - default| / max |default|")
    print(f"{'(C, n)':<16} {'ms':>8} {'x floor':>8} {'extra GiB':>10} {'loss err':>9} {'grad_h err':>10} "
          f"{'grad_W err':>10}")
    ref = run()
    for label, fn in rows:
        errs = error(fn(), ref)  # the first of three warm-ups (Triton compilation, cuBLAS heuristics)
        fn(), fn()
        ms, extra = timed(fn, args.reps, cuda), peak_extra(fn, cuda)
        mem = "-" if extra is None else f"{extra:.2f}"
        print(f"{label:<16} {ms:>8.2f} {ms / floor:>8.2f} {mem:>10} {errs[0]:>9.1e} {errs[1]:>10.1e} {errs[2]:>10.1e}",
              flush=True)


if __name__ == "__main__":
    main()
