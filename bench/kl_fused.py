"""
Experiment on the fused path's time (1.38-1.43x its matmul floor on an H200, against a 1.3x target): other chunk
schedules of fused_linear_kl's forward, timed beside ours in one run, each checked against ours.

    python bench/kl_fused.py            # GPU: T = 8192, V = 151,936, H = 2048, bf16
    python bench/kl_fused.py --small    # tiny shapes: on a CPU, the schedules against ours (torch KL)

A schedule (C, C_t, n) does what kernels/fused_linear_kl.py does, except that
  C    student rows per chunk: their logits in one product
  C_t  teacher rows per sub-chunk: the teacher's logits and the KL kernel go C_t rows at a time, so the teacher's
       buffer is C_t rows rather than C
  n    chunks whose gradients share one [n C, V] buffer: grad_h and one grad_W accumulate of depth n C per group.
       The accumulate reads and writes all of grad_W (1.2 GB) once per group, and ran at 59% of the matmul rate at
       depth 512 (the profile in bench/RESULTS.md, 2026-11-26)
Extra memory: (n C + C_t) V b bytes of buffers, plus grad_W and grad_h (0.61 GiB); the target is 1 GiB, which leaves
1,375 rows of buffers at V = 151,936 in bf16. Ours is (512, 512, 1). Depth 1024 (1024, 1024, 1) came closest to the
target on 2026-11-27 (1.31x) but needed 1.19 GiB. Running the KL kernel on a second stream beside the matmuls was
slower in every schedule tried that day (this script at 5f5be74 has them).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kl import TAU, matmul_rate, peak_extra, timed  # noqa: E402  (bench/kl.py)
from kernels import fused_linear_kl  # noqa: E402
from kernels.kl import flat_mask, kl_rows_torch, kl_rows_triton, triton  # noqa: E402

GPU_SCHEDULES = [  # (C, C_t, n); extra GiB at T = 8192, V = 151,936, bf16
    (512, 512, 1),    # 0.90: ours, as this script runs it
    (1024, 1024, 1),  # 1.19: depth 1024, over the target
    (1024, 256, 1),   # 0.97: depth 1024, the teacher in quarter chunks (1.42x on 2026-11-27)
    (512, 512, 2),    # 1.04: over the target; what grouping alone gives
    (512, 256, 2),    # 0.97: depth 1024, ours' student products
    (448, 448, 2),    # 0.99: depth 896
    (384, 384, 2),    # 0.94: depth 768
    (256, 256, 4),    # 0.97: depth 1024 from 256-row products
]
SMALL_SCHEDULES = [(16, 16, 1), (32, 8, 1), (16, 16, 2), (16, 8, 2), (24, 5, 2), (8, 8, 3)]


def grouped_forward(h_s, w_s, h_t, w_t, C, C_t, n, rows_fn):
    """(loss, grad_h, grad_W) of fused_linear_kl(h_s, w_s, h_t, w_t, None, TAU) in schedule (C, C_t, n), see the
    docstring; h [T, H], w [V, H]."""
    T, V = h_s.shape[0], w_s.shape[0]
    valid, count = flat_mask(None, (T,), h_s.device)
    grad_h, grad_w = torch.empty_like(h_s), torch.empty_like(w_s)
    loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
    G = h_s.new_empty(n * C, V)  # [nC, V] the group's student logits, then their gradients
    Z_t = h_t.new_empty(C_t, V)  # [C_t, V] teacher logits
    for p in range(0, T, n * C):
        q = min(p + n * C, T)
        for i in range(p, q, C):
            j = min(i + C, q)
            torch.mm(h_s[i:j], w_s.t(), out=G[i - p:j - p])
            for a in range(i, j, C_t):
                b = min(a + C_t, j)
                z_t = torch.mm(h_t[a:b], w_t.t(), out=Z_t[:b - a])
                part = G[a - p:b - p]  # the gradient overwrites it
                loss += rows_fn(part, z_t, part, valid[a:b], count, TAU, True).sum()
        g = G[:q - p]
        torch.mm(g, w_s, out=grad_h[p:q])
        if p == 0:
            torch.mm(g.t(), h_s[p:q], out=grad_w)
        else:
            grad_w.addmm_(g.t(), h_s[p:q])
    return loss / count.clamp(min=1), grad_h, grad_w


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
    rows_fn = kl_rows_triton if cuda and triton is not None else kl_rows_torch
    g = torch.Generator(device).manual_seed(0)
    h_s, h_t = (torch.randn(T, H, device=device, generator=g).to(dtype) for _ in range(2))
    w_s, w_t = ((torch.randn(V, H, device=device, generator=g) / H**0.5 * 4).to(dtype) for _ in range(2))
    rate = matmul_rate(device, dtype, cuda, 8192 if cuda else 512)
    floor = 8 * T * H * V / rate * 1e3
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}: {str(dtype)[6:]} matmul {rate / 1e12:.1f} TFLOP/s; T {T}, V {V}, H {H}: floor {floor:.2f} ms")

    hs, ws = h_s.detach().requires_grad_(), w_s.detach().requires_grad_()

    def ours():  # (loss, grad_h, grad_W), held by no one else (so peak_extra counts them as a schedule's)
        loss = fused_linear_kl(hs, ws, h_t, w_t, None, TAU, impl="triton" if rows_fn is kl_rows_triton else "torch")
        loss.backward()
        out = loss.detach(), hs.grad, ws.grad
        hs.grad = ws.grad = None
        return out

    rows = [("ours", ours)] + [(str(sc), lambda sc=sc: grouped_forward(h_s, w_s, h_t, w_t, *sc, rows_fn))
                               for sc in schedules]

    def error(out, ref):  # max |x - ref| / max |ref| of (loss, grad_h, grad_W)
        return [((x.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
                for x, r in zip(out, ref)]

    print(f"\n{name}, T {T}, {str(dtype)[6:]}, median of {args.reps}; err = max |x - ours| / max |ours|")
    print(f"{'(C, C_t, n)':<16} {'ms':>8} {'x floor':>8} {'extra GiB':>10} {'loss err':>9} {'grad_h err':>10} "
          f"{'grad_W err':>10}")
    ref = ours()
    for label, fn in rows:
        errs = error(fn(), ref)  # the first of three warm-ups (Triton compilation, cuBLAS heuristics)
        fn(), fn()
        ms, extra = timed(fn, args.reps, cuda), peak_extra(fn, cuda)
        mem = "-" if extra is None else f"{extra:.2f}"
        print(f"{label:<16} {ms:>8.2f} {ms / floor:>8.2f} {mem:>10} {errs[0]:>9.1e} {errs[1]:>10.1e} {errs[2]:>10.1e}",
              flush=True)


if __name__ == "__main__":
    main()
