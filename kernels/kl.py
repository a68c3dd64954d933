"""
KL divergence between two next-token distributions, over the whole vocabulary, on logits.

Shapes: T tokens (rows), V vocabulary. s = z_s / tau, t = z_t / tau, p = softmax(s) (student),
q = softmax(t) (teacher), A = logsumexp(s), B = logsumexp(t), so log p = s - A, log q = t - B.

    reverse (default)  KL(p || q) = sum_i p_i (log p_i - log q_i) = E_p[s - t] - (A - B)
                       dKL/ds_i   = p_i ((log p_i - log q_i) - KL) = p_i ((s_i - t_i) - E_p[s - t])
    forward            KL(q || p) = sum_i q_i (log q_i - log p_i) = E_q[t - s] - (B - A)
                       dKL/ds_i   = p_i - q_i
    dKL/dz_s = dKL/ds / tau.   loss = sum over valid rows of KL / n_valid.   0 * log 0 = 0.

The teacher gets no gradient. Masked rows give zero loss and zero gradient; all rows masked gives 0.

One program per row, two passes over the row (the Triton fused-softmax tutorial, made online):
  pass 1 streams z_s and z_t once, keeping running maxima M_s, M_t of the raw logits, sums
         d_s = sum e^((z_s - M_s) / tau), d_t likewise, and w = sum e^((z_s - M_s) / tau) c with
         c = ((z_s - M_s) - (z_t - r)) / tau = (s - t) - (M_s - r) / tau, r the teacher's logit where the
         student's max is (forward: the teacher's weights, c = ((z_t - M_t) - (z_s - r)) / tau, r the student's
         logit at the teacher's max), all rescaled and shifted whenever a max moves; then, as M_s cancels,
         KL = w / d_s + (M_t - r) / tau - log(d_s / d_t) (forward: w / d_t + (M_s - r) / tau + log(d_s / d_t));
  pass 2 streams them again and writes the gradient (already divided by tau and n_valid), with
         p = e^((z_s - M_s) / tau) / d_s and c - E_p[c] = (log p - log q) - KL.
Every exponent is (z - M) / tau, exact near the max, and each side of c is measured from a logit of its own row
where the weights are largest: nothing of the size of the logits, of their offsets or of an outlier far from
the rest (~1e4 at worst) is subtracted where it could cancel. Loss and gradient keep their accuracy whatever the
two rows' offsets, also when they differ by 1e4; rows below -1e30, or -inf in places, work too.
A NaN logit gives a NaN loss and gradient for its row (terms with p = 0 are skipped by `p == 0`, which a
NaN fails).
Launch: one program per row, BLOCK_V = 4096, 4 warps: the best of 9 settings in H200 sweeps at T = 640 (a
candidate fused chunk), and within 1% of the best at T = 8192 (bench/kl_sweep.py). No fma contraction:
with it the kernel failed two accuracy tests on an H200 (zero gradient for identical inputs; the gradient
at logits of 1e4) for a gain of about 1%.
The backward is an in-place scale of the gradient stored in forward (the kernel returns at once when the upstream
gradient is 1), with no host sync.

Bytes it must move: 2 reads of each input + 1 write of the gradient = 5 T V b bytes
(b = 2 in bf16): 12.4 GB at T = 8192, V = 151,936, i.e. ~4 ms at ~3 TB/s on an H100 (2.9 ms on an H200, where
kl_div forward + backward took 3.35 and 3.49 ms in two calls on 2026-11-26).
The gradient goes to a fresh tensor in the student's dtype, never over the student logits: those
belong to the caller and may still be needed (the fused-linear path, which owns its logits
buffer, does write the gradient in place over it).
"""

import math

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, Windows): the torch path below is used
    triton = None

if triton is not None:

    @triton.jit
    def _kl_kernel(s_ptr, t_ptr, g_ptr, valid_ptr, count_ptr, loss_ptr,
                   s_stride, t_stride, g_stride, V, inv_temp,
                   REVERSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_ptr += row * s_stride
        t_ptr += row * t_stride
        g_ptr += row * g_stride
        cols = tl.arange(0, BLOCK_V)
        if tl.load(valid_ptr + row) == 0:  # masked row: zero loss, zero gradient
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    zero = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
                    tl.store(g_ptr + start + cols, zero, mask=start + cols < V)
        else:
            # pass 1: online max / sum-exp for both rows, and w, the p-weighted (forward: q-weighted) difference
            # c = ((z_s - M_s) - (z_t - r)) / tau (forward: ((z_t - M_t) - (z_s - r)) / tau), where r is the
            # teacher's logit at the student's max (forward: the student's at the teacher's max). Each side is
            # measured from a logit of its own row where p (q) is largest, so c is exact in fp32 whatever the
            # rows' offsets or outliers; when a max moves, w's terms shift by delta. The maxima start at -inf (any
            # finite start fails rows below it); b_s, b_t are the finite bases of the exponents (0 for a row all
            # -inf so far, whose terms are all 0).
            m_s = float("-inf")
            m_t = float("-inf")
            b_s = 0.0
            b_t = 0.0
            r = 0.0
            d_s = 0.0
            d_t = 0.0
            w = 0.0
            for start in range(0, V, BLOCK_V):
                inb = start + cols < V
                zs = tl.load(s_ptr + start + cols, mask=inb, other=float("-inf")).to(tl.float32)
                zt = tl.load(t_ptr + start + cols, mask=inb, other=float("-inf")).to(tl.float32)
                top_s = tl.max(zs, axis=0)
                top_t = tl.max(zt, axis=0)
                max_s = tl.maximum(m_s, top_s)
                max_t = tl.maximum(m_t, top_t)
                new_s = tl.where(max_s == float("-inf"), 0.0, max_s)
                new_t = tl.where(max_t == float("-inf"), 0.0, max_t)
                if REVERSE:  # the teacher's logit where this block's student max is (its base if that is -inf)
                    at = tl.max(tl.where(zs == top_s, zt, float("-inf")), axis=0)
                    new_r = tl.where(top_s > m_s, tl.where(at == float("-inf"), new_t, at), r)
                    delta = ((new_s - b_s) - (new_r - r)) * inv_temp
                    c = ((zs - new_s) - (zt - new_r)) * inv_temp
                else:
                    at = tl.max(tl.where(zt == top_t, zs, float("-inf")), axis=0)
                    new_r = tl.where(top_t > m_t, tl.where(at == float("-inf"), new_s, at), r)
                    delta = ((new_t - b_t) - (new_r - r)) * inv_temp
                    c = ((zt - new_t) - (zs - new_r)) * inv_temp
                es = tl.exp((zs - new_s) * inv_temp)
                et = tl.exp((zt - new_t) * inv_temp)
                a_s = tl.where(m_s == float("-inf"), 0.0, tl.exp((b_s - new_s) * inv_temp))  # the old terms' rescale
                a_t = tl.where(m_t == float("-inf"), 0.0, tl.exp((b_t - new_t) * inv_temp))  # (none while all -inf)
                # where the weight underflows to 0 its term is 0 (avoids 0 * inf; a NaN still propagates)
                if REVERSE:
                    w = tl.where(a_s == 0, 0.0, (w - delta * d_s) * a_s) + tl.sum(tl.where(es == 0, 0.0, es * c), axis=0)
                else:
                    w = tl.where(a_t == 0, 0.0, (w - delta * d_t) * a_t) + tl.sum(tl.where(et == 0, 0.0, et * c), axis=0)
                d_s = d_s * a_s + tl.sum(es, axis=0)
                d_t = d_t * a_t + tl.sum(et, axis=0)
                m_s = max_s
                m_t = max_t
                b_s = new_s
                b_t = new_t
                r = new_r
            # A - B = (M_s - M_t) / tau + log(d_s / d_t); E_p[s - t] = E_p[c] + (M_s - r) / tau: M_s cancels
            log_ratio = tl.log(d_s / d_t)
            if REVERSE:
                kl = w / d_s + (b_t - r) * inv_temp - log_ratio  # E_p[s - t] - (A - B)
            else:
                kl = w / d_t + (b_s - r) * inv_temp + log_ratio  # E_q[t - s] + (A - B)
            tl.store(loss_ptr + row, kl)
            if WRITE_GRAD:
                # pass 2: the gradient w.r.t. z_s, scaled by 1 / (tau * n_valid)
                scale = inv_temp / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
                mean_c = w / d_s  # reverse: log p - log q - KL = c - E_p[c]
                inv_ds = 1.0 / d_s
                inv_dt = 1.0 / d_t
                for start in range(0, V, BLOCK_V):
                    inb = start + cols < V
                    zs = tl.load(s_ptr + start + cols, mask=inb, other=float("-inf")).to(tl.float32)
                    zt = tl.load(t_ptr + start + cols, mask=inb, other=float("-inf")).to(tl.float32)
                    p = tl.exp((zs - b_s) * inv_temp) * inv_ds  # not exp(s - A): A is rounded at the logits' size
                    if REVERSE:
                        g = tl.where(p == 0, 0.0, p * (((zs - b_s) - (zt - r)) * inv_temp - mean_c))
                    else:
                        g = p - tl.exp((zt - b_t) * inv_temp) * inv_dt
                    tl.store(g_ptr + start + cols, (g * scale).to(g_ptr.dtype.element_ty), mask=inb)


BLOCK_V, NUM_WARPS = 4096, 4  # the launch (see the docstring); bench/kl_sweep.py patches them


def kl_rows_triton(s, t, grad, valid, count, temperature, reverse):
    """Per-row KL [T] (fp32, 0 on masked rows); writes dloss/dz_s (already divided by tau * n_valid) into `grad`
    (which may alias s) unless it is None."""
    T, V = s.shape
    loss = torch.empty(T, dtype=torch.float32, device=s.device)
    g = s if grad is None else grad  # a pointer the kernel needs: with WRITE_GRAD False nothing is stored through it
    if T > 0:
        _kl_kernel[(T,)](s, t, g, valid, count, loss, s.stride(0), t.stride(0), g.stride(0), V, 1.0 / temperature,
                         REVERSE=reverse, WRITE_GRAD=grad is not None, BLOCK_V=min(triton.next_power_of_2(V), BLOCK_V),
                         num_warps=NUM_WARPS, enable_fp_fusion=False)  # no fma: pass 2 rounds exactly as pass 1
    return loss


def softmax_stats(z, temperature):
    """softmax(z / tau), max(z) and sum(exp((z - max) / tau)) over the last dim, as the kernel forms them (more
    accurate in fp32 than exp(log_softmax) or exp(z / tau - logsumexp))."""
    m = z.amax(-1, keepdim=True)
    e = ((z - m) / temperature).exp()
    den = e.sum(-1, keepdim=True)
    return e / den, m, den


def kl_rows_torch(s, t, grad, valid, count, temperature, reverse):
    """Torch twin of kl_rows_triton (same contract), fp32 math (fp64 for fp64 inputs) on row chunks of ~8M
    elements."""
    T, V = s.shape
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    loss = torch.empty(T, dtype=torch.float32, device=s.device)
    scale = 1.0 / (temperature * count.clamp(min=1).to(dt))
    rows = max(1, 2**23 // V)
    for i in range(0, T, rows):
        sl, v = slice(i, i + rows), valid[i:i + rows, None].bool()
        zs, zt = s[sl].to(dt), t[sl].to(dt)
        (p, m_s, d_s), (q, m_t, d_t) = softmax_stats(zs, temperature), softmax_stats(zt, temperature)
        log_ratio = (d_s / d_t).log()  # A - B = (M_s - M_t) / tau + log_ratio, as in the kernel
        if reverse:  # c = ((z_s - M_s) - (z_t - r)) / tau, r the teacher's logit at the student's max
            r = torch.where(zs == m_s, zt, float("-inf")).amax(-1, keepdim=True)  # (the largest, if several)
            r = torch.where(r == float("-inf"), m_t, r)
            c = torch.where(p == 0, 0.0, ((zs - m_s) - (zt - r)) / temperature)  # 0 * log 0 = 0 (a NaN passes)
            mean_c = (p * c).sum(-1, keepdim=True)  # E_p[c]
            kl = mean_c + (m_t - r) / temperature - log_ratio
            g = torch.where(p == 0, 0.0, p * (c - mean_c))
        else:  # c = ((z_t - M_t) - (z_s - r)) / tau, r the student's logit at the teacher's max
            r = torch.where(zt == m_t, zs, float("-inf")).amax(-1, keepdim=True)
            r = torch.where(r == float("-inf"), m_s, r)
            c = ((zt - m_t) - (zs - r)) / temperature
            kl = torch.where(q == 0, 0.0, q * c).sum(-1, keepdim=True) + (m_s - r) / temperature + log_ratio
            g = p - q
        loss[sl] = torch.where(v, kl, 0.0).squeeze(-1).float()
        if grad is not None:
            grad[sl] = torch.where(v, g * scale, 0.0).to(grad.dtype)
    return loss


def check_call(impl, temperature) -> float:
    """The arguments kl_div and fused_linear_kl share; returns the temperature as a Python float."""
    if impl not in (None, "triton", "torch"):
        raise ValueError(f"impl must be None, 'triton' or 'torch', got {impl!r}")
    temperature = float(temperature)  # also a 0-dim tensor
    if not (0 < temperature < math.inf and 1 / temperature < torch.finfo(torch.float32).max):
        raise ValueError(f"temperature must be > 0 and finite, with 1 / temperature finite in float32; got {temperature}")
    return temperature


def check_dtypes(students, teachers):
    """Floating-point inputs only; float16 is refused for the student's (the tensors with a gradient): its gradient,
    stored in forward already divided by tau * n_valid, would underflow before a loss scaler's factor reaches it."""
    if bad := [x.dtype for x in (*students, *teachers) if not x.is_floating_point()]:
        raise TypeError(f"inputs must be floating point, got {bad[0]}")
    if any(x.dtype == torch.float16 for x in students):
        raise TypeError("float16 student inputs are not supported (the stored gradient underflows); use bfloat16 or "
                        "float32")


def flat_mask(mask, shape, device):
    """(valid [T] int8, n_valid int32 scalar tensor) from an optional mask of the given shape (the inputs' leading
    dims; nonzero = valid); no host sync."""
    T = math.prod(shape)
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; the inputs' leading dims are {tuple(shape)}")
    valid = torch.ones(T, dtype=torch.int8, device=device) if mask is None else (mask.reshape(T).to(device) != 0).to(torch.int8)
    return valid.contiguous(), valid.sum(dtype=torch.int32)


if triton is not None:

    @triton.jit
    def _scale_kernel(g_ptr, scale_ptr, n, n_blocks, BLOCK: tl.constexpr):
        """g *= scale in fp32, in place, grid-stride over BLOCKs; every program returns at once when the scale is 1.
        n_blocks comes from the host: cdiv(n, BLOCK) in the kernel would overflow an int32 n near 2^31."""
        scale = tl.load(scale_ptr).to(tl.float32)
        if scale != 1.0:
            for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
                offs = tl.cast(i, tl.int64) * BLOCK + tl.arange(0, BLOCK)
                g = tl.load(g_ptr + offs, mask=offs < n).to(tl.float32)
                tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=offs < n)


SCALE_PROGRAMS = 2048  # the scale kernel's grid at most: little to launch when the scale is 1


def scale_grad(ctx, grad_output):
    """Backward of a loss whose gradients were saved in forward: scale them in place by the upstream gradient,
    in fp32 (a bf16 tensor times a 0-dim tensor would round the factor to 8 bits), and only once (a second
    backward raises). The Triton path reads the factor on the device, so backward never waits for the GPU; the
    torch path reads it as a Python float (a host sync) and skips the multiply when it is 1."""
    if ctx.scaled:
        raise RuntimeError("backward already ran (or failed) through this KL loss: its saved gradient is scaled in "
                           "place, once")
    ctx.scaled = True
    grads = ctx.saved_tensors
    for g in grads:
        if g is None or g.numel() == 0:
            continue
        if ctx.triton:
            BLOCK = 8192
            n_blocks = triton.cdiv(g.numel(), BLOCK)
            _scale_kernel[(min(n_blocks, SCALE_PROGRAMS),)](g, grad_output.float(), g.numel(), n_blocks, BLOCK=BLOCK)
        elif (scale := grad_output.item()) != 1.0:
            g.mul_(scale)  # a Python float: torch multiplies in fp32, whatever g's dtype
    return grads


def no_grad_detached(*xs):
    """Detach when grad mode is off, so forward skips the gradients (needs_input_grad ignores grad mode)."""
    return xs if torch.is_grad_enabled() else [x.detach() for x in xs]


class KLDiv(torch.autograd.Function):
    """Loss and gradient in forward (via `rows_fn`, Triton or torch); backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, mask, temperature, reverse, rows_fn):
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in shape")
        check_dtypes([student_logits], [teacher_logits])
        shape, V = student_logits.shape, student_logits.shape[-1] if student_logits.dim() else 0
        if V == 0:
            raise ValueError(f"logits must have a vocabulary dim of size >= 1, got shape {tuple(shape)}")
        s = student_logits.reshape(-1, V)  # [T, V]; leading dims (B, T) are flattened
        t = teacher_logits.reshape(-1, V)
        s = s if s.stride(-1) == 1 else s.contiguous()
        t = t if t.stride(-1) == 1 else t.contiguous()
        valid, count = flat_mask(mask, shape[:-1], s.device)
        grad = torch.empty_like(s, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        loss = rows_fn(s, t, grad, valid, count, temperature, reverse).sum() / count.clamp(min=1)
        ctx.save_for_backward(None if grad is None else grad.view(shape))
        ctx.triton, ctx.scaled = rows_fn is kl_rows_triton, False
        return loss

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second-order gradients (an error, not a silent 0)
    def backward(ctx, grad_output):
        return scale_grad(ctx, grad_output) + (None,) * 5


def kl_div_reference(student_logits, teacher_logits, mask=None, temperature=1.0, reverse=True):
    """The torch path: closed-form loss and gradient in fp32, chunked over tokens; runs anywhere."""
    (student_logits,) = no_grad_detached(student_logits)
    return KLDiv.apply(student_logits, teacher_logits, mask, temperature, reverse, kl_rows_torch)


def kl_div_triton(student_logits, teacher_logits, mask=None, temperature=1.0, reverse=True):
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    assert triton is not None, "triton is not installed"
    (student_logits,) = no_grad_detached(student_logits)
    return KLDiv.apply(student_logits, teacher_logits, mask, temperature, reverse, kl_rows_triton)


def kl_div(student_logits, teacher_logits, mask=None, temperature=1.0, reverse=True, impl=None):
    """Mean over valid tokens of KL(p_s || p_t) (reverse) or KL(p_t || p_s) (forward), p = softmax(z / tau).

    student_logits, teacher_logits: [T, V] (or [B, T, V]), bf16 or fp32; mask: [T] (or [B, T]) bool.
    Returns an fp32 scalar; only student_logits gets a gradient. impl: None (Triton for CUDA tensors when
    Triton is installed, torch otherwise), 'triton' or 'torch'.
    """
    temperature = check_call(impl, temperature)
    if impl is None:
        impl = "triton" if student_logits.is_cuda and triton is not None else "torch"
    fn = kl_div_triton if impl == "triton" else kl_div_reference
    return fn(student_logits, teacher_logits, mask, temperature, reverse)
