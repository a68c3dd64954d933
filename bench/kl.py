"""
Benchmark the KL kernels, forward + backward, against torch eager, torch.compile and Liger-Kernel,
next to the hardware floors measured in the same run.

    python bench/kl.py                 # T = 4096, 8192; V = 151,936; H = 2048; bf16 (needs a GPU)
    python bench/kl.py --small         # tiny shapes, runs on a CPU (the torch path); a smoke test
    python bench/kl.py --methods ours --profile   # ours alone, then where its time goes (torch.profiler)

logits path: kl_div(student [T, V], teacher [T, V]) -> loss, grad to the student logits.
  floor = bytes it must move / copy bandwidth = (2 reads of each input + 1 gradient write) / bw.
fused path: fused_linear_kl(h_s [T, H], W_s [V, H], h_t [T, H], W_t [V, H]) (untied) -> grads to h_s, W_s.
  floor = 8 T H V FLOPs / bf16 matmul rate (z_s, z_t, grad_h, grad_W are 2 T H V each).
Liger: LigerJSD(beta=1) / LigerFusedLinearJSD(jsd_beta=1). Liger's convention is JSD_beta(P || Q) with P the
teacher (target) and Q the student (input), and beta = 1 is special-cased to KL(Q || P) = KL(student || teacher),
our reverse KL (beta = 0 is the forward KL). LigerJSD takes log-probabilities, so its timing includes the
two fp32 log_softmax calls it needs. Times are medians over --reps (CUDA events); "extra" is the peak
memory above what was allocated before the call (inputs), so it includes the gradients returned
(grad_h + grad_W = 0.65 GB for the fused path at T = 8192; 0.90 GiB in all is expected for ours).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import fused_linear_kl, kl_div  # noqa: E402

TAU = 0.7  # the paper's temperature


def kl_eager(s, t):
    """The obvious torch: fp32 log_softmax of both, reverse KL summed over V, mean over tokens."""
    logp, logq = torch.log_softmax(s.float() / TAU, -1), torch.log_softmax(t.float() / TAU, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def fused_eager(h_s, w_s, h_t, w_t):
    return kl_eager(h_s @ w_s.T, h_t @ w_t.T)


def methods(path):
    """name -> fn(*inputs) returning the loss, for one path; Liger only when installed."""
    compiled = torch.compile(kl_eager if path == "logits" else fused_eager)
    if path == "logits":
        out = {"ours": lambda s, t: kl_div(s, t, None, TAU), "torch eager": kl_eager, "torch.compile": compiled}
    else:
        out = {"ours": lambda *x: fused_linear_kl(*x, None, TAU),  # 512-token chunks at V = 151,936: < 1 GiB extra
               "ours C=1024": lambda *x: fused_linear_kl(*x, None, TAU, chunk_size=1024),  # half the grad_W traffic
               "torch eager": fused_eager, "torch.compile": compiled}
    try:
        if path == "logits":
            from liger_kernel.transformers import LigerJSD
            jsd = LigerJSD(beta=1.0)  # reverse KL(student || teacher), see the docstring
            def liger(s, t):  # LigerJSD takes log-probabilities
                return jsd(torch.log_softmax(s.float() / TAU, -1), torch.log_softmax(t.float() / TAU, -1))
            out["liger"] = liger
        else:
            from liger_kernel.transformers import LigerFusedLinearJSD
            fjsd = LigerFusedLinearJSD(jsd_beta=1.0, temperature=TAU)
            out["liger"] = lambda *x: fjsd(*x, None)
    except ImportError:
        print("liger-kernel not installed: skipping it")
    return out


def profile(fn, inputs, cuda):
    """Print the operations of three forward + backward calls of fn, by their own device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            for x in inputs:
                x.grad = None
            fn(*inputs).backward()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def timed(fn, reps, sync):
    """Median milliseconds of fn() over reps (CUDA events on a GPU, perf_counter on a CPU)."""
    times = []
    for _ in range(reps):
        if sync:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_method(fn, inputs, reps, cuda):
    """(median ms, peak extra GiB or None) for forward + backward of fn(*inputs)."""
    def step():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward()
    for _ in range(3):  # warm-up: Triton / inductor compilation, cuBLAS heuristics
        step()
    for x in inputs:
        x.grad = None  # not counted in the base
    extra = peak_extra(step, cuda) if cuda else None
    return timed(step, reps, cuda), extra


def peak_extra(fn, cuda):
    """Peak memory above what was allocated before fn(), in GiB (None on a CPU)."""
    if not cuda:
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth(device, cuda, nbytes):
    """Bytes per second of a large device-to-device copy (one read + one write per byte)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = timed(lambda: y.copy_(x), 20, cuda)
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device, dtype, cuda, n):
    """FLOPs per second of an n x n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    ms = timed(lambda: a @ b, 20, cuda)
    return 2 * n**3 / (ms / 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[4096, 8192], help="tokens per call")
    p.add_argument("--V", type=int, default=151936, help="vocabulary (Qwen3)")
    p.add_argument("--H", type=int, default=2048, help="hidden size (Qwen3-1.7B)")
    p.add_argument("--dtype", default="bfloat16", help="logits / hidden / weight dtype")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per method")
    p.add_argument("--paths", nargs="+", default=["logits", "fused"], help="which paths to time")
    p.add_argument("--methods", nargs="+", help="time only these (e.g. ours 'ours C=1024' liger); default all")
    p.add_argument("--profile", action="store_true", help="also print where ours spends its time, per path and T")
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.small:
        args.T, args.V, args.H, args.reps = [64], 5000, 64, 3
    dtype = getattr(torch, args.dtype)
    b = torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name() if cuda else "CPU"
    bw = copy_bandwidth(device, cuda, 2**32 if cuda and not args.small else 2**26)
    rate = matmul_rate(device, dtype, cuda, 8192 if cuda and not args.small else 512)
    print(f"{name}: copy {bw / 1e9:.0f} GB/s, {args.dtype} matmul {rate / 1e12:.1f} TFLOP/s")

    rows = []
    for T in args.T:
        for path in args.paths:
            g = torch.Generator(device).manual_seed(0)
            if path == "logits":
                inputs = [(torch.randn(T, args.V, device=device, generator=g) * 4).to(dtype) for _ in range(2)]
                inputs[0].requires_grad_()
                floor = 5 * T * args.V * b / bw * 1e3
            else:
                h_s, h_t = (torch.randn(T, args.H, device=device, generator=g).to(dtype) for _ in range(2))
                w_s, w_t = ((torch.randn(args.V, args.H, device=device, generator=g) / args.H**0.5 * 4).to(dtype)
                            for _ in range(2))
                inputs = [h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t]
                floor = 8 * T * args.H * args.V / rate * 1e3
            rows.append((path, T, "floor", floor, None))
            for mname, fn in methods(path).items():
                if args.methods and mname not in args.methods:
                    continue
                try:
                    ms, extra = run_method(fn, inputs, args.reps, cuda)
                except Exception as e:  # OOM, no compiler for inductor, ...
                    print(f"{path} T={T} {mname}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    ms, extra = float("nan"), None
                    if cuda:
                        torch.cuda.empty_cache()
                rows.append((path, T, mname, ms, extra))
                print(f"{path} T={T} {mname}: {ms:.2f} ms")
                if args.profile and mname == "ours":
                    profile(fn, inputs, cuda)
            del inputs

    print(f"\n{name}, V={args.V}, H={args.H}, {args.dtype}, forward+backward, median of {args.reps}")
    print(f"{'path':<7} {'T':>6} {'method':<14} {'ms':>9} {'x floor':>8} {'extra GiB':>10}")
    for path, T, mname, ms, extra in rows:
        floor = next(r[3] for r in rows if r[:3] == (path, T, "floor"))
        mem = "-" if extra is None else f"{extra:.2f}"
        print(f"{path:<7} {T:>6} {mname:<14} {ms:>9.2f} {ms / floor:>8.2f} {mem:>10}")


if __name__ == "__main__":
    main()
