"""
Experiment on the fused path's time (1.38-1.43x its matmul floor on an H200, against a 1.3x target): other chunk
schedules of fused_linear_kl's forward, timed beside ours in one run, each checked against ours.

    python bench/kl_fused.py            # GPU: T = 8192, V = 151,936, H = 2048, bf16
    python bench/kl_fused.py --small    # tiny shapes: on a CPU, the one-stream schedules against ours (torch KL)

A schedule (C, C_t, n_s, n_t, overlap) does what kernels/fused_linear_kl.py does, chunk by chunk, except that
  C      student rows per chunk: its logits, grad_h, and one grad_W accumulate of depth C (the accumulate reads and
         writes all of grad_W, 1.2 GB, once per chunk: larger chunks, fewer of them)
  C_t    teacher rows per sub-chunk: the teacher's logits and the KL kernel run per sub-chunk, so the teacher's
         buffer is C_t rows rather than C
  n_s, n_t  student and teacher buffers in rotation
  overlap   the KL kernel runs on a second stream: beside the next teacher matmul when n_t = 2; with n_s = 2 also
         beside the next chunk's student logits, and the previous chunk's grad_h and grad_W beside a chunk's first KL
Extra memory: (n_s C + n_t C_t) V b bytes of buffers, plus grad_W and grad_h (0.65 GB); the target is 1 GiB.
Ours is (512, 512, 1, 1, no overlap). The profile that motivates this is in bench/RESULTS.md (2026-11-26): the
grad_W accumulate ran at 59% of the matmul rate, and the KL kernel (4.6 ms) ran after the matmuls, not beside them.
"paired (C, C_t)" rows (paired_forward) keep two chunks' gradients in one buffer, for grad_W accumulates of depth 2C
under 1 GiB: (1024, 1024) chunks came closest to the target on 2026-11-27 (1.31x) but needed 1.19 GiB.
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

GPU_SCHEDULES = [  # (C, C_t, n_s, n_t, overlap); extra GiB at V = 151,936, bf16, T = 8192 in the comments
    (512, 512, 1, 1, False),    # 0.90: ours, as this script runs it
    (1024, 1024, 1, 1, False),  # 1.19: bench/kl.py's "ours C=1024", over the target
    (1024, 256, 1, 1, False),   # 0.97: grad_W accumulates of depth 1024 under 1 GiB
    (1024, 128, 1, 2, True),    # 0.97: and the KL beside the next teacher matmul
    (512, 256, 1, 2, True),     # 0.90
    (512, 256, 2, 1, True),     # 0.97: the KL beside the next chunk's student logits and the last chunk's grads
    (512, 128, 2, 2, True),     # 0.97: both
    (1024, 256, 1, 2, True),    # 1.05: over the target; how much overlap can give at depth 1024
]
PAIRED = [(448, 448),  # 0.99 GiB: two chunks' gradients in one [2C, V] buffer (paired_forward), under 1 GiB
          (512, 256),  # 0.97: ours' chunk, the teacher in half chunks
          (512, 512)]  # 1.04: over the target; what pairing alone gives
SMALL_PAIRED = [(16, 16), (16, 8), (24, 5)]
SMALL_SCHEDULES = [(16, 16, 1, 1, False), (32, 8, 1, 1, False), (16, 8, 1, 2, False), (16, 4, 2, 2, False),
                   (16, 4, 2, 2, True), (16, 4, 1, 2, True), (24, 5, 2, 1, True)]  # the overlapped ones on a GPU only


def schedule_forward(h_s, w_s, h_t, w_t, C, C_t, n_s, n_t, overlap, rows_fn, side=None):
    """(loss, grad_h, grad_W) of fused_linear_kl(h_s, w_s, h_t, w_t, None, TAU) in one schedule (see the docstring);
    h [T, H], w [V, H]. With overlap, `side` is the KL kernel's CUDA stream."""
    T, V = h_s.shape[0], w_s.shape[0]
    valid, count = flat_mask(None, (T,), h_s.device)
    grad_h, grad_w = torch.empty_like(h_s), torch.empty_like(w_s)
    loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
    S = [h_s.new_empty(C, V) for _ in range(n_s)]  # [C, V] student logits, then their gradient
    Tb = [h_t.new_empty(C_t, V) for _ in range(n_t)]  # [C_t, V] teacher logits
    main = torch.cuda.current_stream() if overlap else None
    t_free = [None] * n_t  # per teacher buffer: an event recorded when the KL kernel has read it
    k = 0  # the teacher buffer to fill next

    def grads(i, j, g, kl_done):  # grad_h and grad_W of rows i:j, once the KL kernel has written g
        if kl_done is not None:
            main.wait_event(kl_done)
        torch.mm(g, w_s, out=grad_h[i:j])
        if i == 0:
            torch.mm(g.t(), h_s[i:j], out=grad_w)
        else:
            grad_w.addmm_(g.t(), h_s[i:j])

    pending = None  # the previous chunk's grads; with two student buffers, issued beside this chunk's first KL
    for c, i in enumerate(range(0, T, C)):
        j = min(i + C, T)
        if pending and n_s == 1:  # the student logits overwrite the previous chunk's gradient
            pending()
            pending = None
        z_s = torch.mm(h_s[i:j], w_s.t(), out=S[c % n_s][:j - i])
        for a in range(i, j, C_t):
            b = min(a + C_t, j)
            if t_free[k] is not None:
                main.wait_event(t_free[k])
            z_t = torch.mm(h_t[a:b], w_t.t(), out=Tb[k][:b - a])
            part = z_s[a - i:b - i]  # the gradient overwrites it
            if overlap:
                side.wait_event(main.record_event())  # z_s and z_t are written (not: what main does after)
                with torch.cuda.stream(side):
                    loss += rows_fn(part, z_t, part, valid[a:b], count, TAU, True).sum()
                    t_free[k] = side.record_event()
            else:
                loss += rows_fn(part, z_t, part, valid[a:b], count, TAU, True).sum()
            k = (k + 1) % n_t
            if pending:
                pending()
                pending = None
        kl_done = side.record_event() if overlap else None
        pending = lambda i=i, j=j, g=z_s, e=kl_done: grads(i, j, g, e)  # noqa: E731
    if pending:  # (T = 0 has no chunk)
        pending()
    if overlap:
        main.wait_stream(side)
    return loss / count.clamp(min=1), grad_h, grad_w


def paired_forward(h_s, w_s, h_t, w_t, C, C_t, rows_fn):
    """(loss, grad_h, grad_W) as schedule_forward gives them, with two chunks' gradients in one [2C, V] buffer: grad_h
    and grad_W once per pair of chunks, so grad_W's accumulate (depth 2C) reads and writes all of grad_W half as
    often and grad_h's product has 2C rows; the teacher's logits go C_t rows at a time to a third buffer.
    Extra memory: (2 C + C_t) V b bytes of buffers, plus grad_W and grad_h."""
    T, V = h_s.shape[0], w_s.shape[0]
    valid, count = flat_mask(None, (T,), h_s.device)
    grad_h, grad_w = torch.empty_like(h_s), torch.empty_like(w_s)
    loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
    G = h_s.new_empty(2 * C, V)  # [2C, V] two chunks' student logits, then their gradients
    Z_t = h_t.new_empty(C_t, V)  # [C_t, V] teacher logits
    for p in range(0, T, 2 * C):
        q = min(p + 2 * C, T)
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
    T, V, H, schedules, paired = args.T, 151936, 2048, GPU_SCHEDULES, PAIRED
    if args.small or not cuda:
        T, V, H, schedules, paired, args.reps = 64, 5000, 64, SMALL_SCHEDULES, SMALL_PAIRED, 3
    if not cuda:  # no second stream
        schedules = [sc for sc in schedules if not sc[4]]
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

    def run(sched, side=None):
        return lambda: schedule_forward(h_s, w_s, h_t, w_t, *sched, rows_fn, side)

    rows = [("ours", ours, None)]  # (label, fn, the same schedule on one stream: a race shows as a difference)
    rows += [(f"paired {pc}", lambda pc=pc: paired_forward(h_s, w_s, h_t, w_t, *pc, rows_fn), None) for pc in paired]
    for sched in schedules:
        if not sched[4]:
            rows.append((str(sched), run(sched), None))
        else:  # the KL's stream at default and at high priority (cuBLAS kernels may hold every SM until they end)
            serial = run(sched[:4] + (False,))
            rows.append((str(sched), run(sched, torch.cuda.Stream()), serial))
            rows.append((str(sched) + " hi", run(sched, torch.cuda.Stream(priority=-1)), serial))

    def error(out, ref):  # max |x - ref| / max |ref| of (loss, grad_h, grad_W)
        return [((x.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-30)).item()
                for x, r in zip(out, ref)]

    print(f"\n{name}, T {T}, {str(dtype)[6:]}, median of {args.reps}; err = max |x - ours| / max |ours|; race = "
          f"largest err of an overlapped call against the same schedule on one stream (0 expected)")
    print(f"{'(C, C_t, n_s, n_t, overlap)':<32} {'ms':>8} {'x floor':>8} {'extra GiB':>10} {'loss err':>9} "
          f"{'grad_h err':>10} {'grad_W err':>10} {'race':>8}")
    ref = ours()
    for label, fn, serial in rows:
        out = fn()  # the first of three warm-ups (Triton compilation, cuBLAS heuristics)
        errs = error(out, ref)
        race = serial and max(error(out, serial()))
        del out
        fn(), fn()
        ms, extra = timed(fn, args.reps, cuda), peak_extra(fn, cuda)
        if serial:  # and once more after the timed calls
            race = max(race, *error(fn(), serial()))
        mem = "-" if extra is None else f"{extra:.2f}"
        race = "-" if serial is None else f"{race:.1e}"
        print(f"{label:<32} {ms:>8.2f} {ms / floor:>8.2f} {mem:>10} {errs[0]:>9.1e} {errs[1]:>10.1e} {errs[2]:>10.1e} "
              f"{race:>8}", flush=True)


if __name__ == "__main__":
    main()
