"""
KL divergence straight from hidden states: the output projection fused with kernels/kl.py, chunked
over tokens so the [T, V] logits never exist whole.

Shapes: T tokens, H hidden (student and teacher may differ), V vocabulary, C tokens per chunk (bench/'s
letters: model.py's C, the hidden size, is H here).
Inputs: student hidden h_s [T, H], student output weight W_s [V, H], teacher h_t [T, H'], W_t [V, H']
(the same tensor as W_s when the two models share it). With z_s = h_s W_s^T, z_t = h_t W_t^T and
loss = (1 / n_valid) sum_valid KL(z_s, z_t) as in kernels/kl.py, g = dloss/dz_s [T, V] and

    dloss/dh_s = g W_s          [T, V] @ [V, H]
    dloss/dW_s = g^T h_s        [V, T] @ [T, H]   (summed chunk by chunk)

The teacher gets no gradient (W_t included, even when it is W_s: only the student use counts).
Everything is done in forward, chunk by chunk (rows c), in two reused [C, V] buffers:
  z_s = h_s[c] @ W_s^T, z_t = h_t[c] @ W_t^T  (torch matmul, the inputs' dtype)
  the kl kernel reads both and writes g in place over z_s  (the buffer is ours, so that is safe)
  grad_h[c] = g @ W_s,  grad_W += g^T @ h_s[c]  (the first chunk writes grad_W)
and backward only scales (grad_h, grad_W) in place by the upstream gradient (kernels/kl.py's scale_grad).

FLOPs it must do: 2 T H V for each of z_s, z_t, grad_h, grad_W = 8 T H V: 2.0e13 at T = 8192,
H = 2048, V = 151,936, i.e. 26.35 ms at the 8192^3 matmul rate an H200 measured (774 TFLOP/s; this path
took 37.6 ms, 1.43x, on 2026-11-26); plus 5 T V b bytes for the kl kernel (~3 ms).
Extra memory at T = 8192, H = 2048, V = 151,936 in bf16: the buffers, 2 C V b = 311 MB at the default C = 512,
plus the gradient outputs grad_W [V, H] (622 MB) and grad_h [T, H] (34 MB): 0.90 GiB. grad_W accumulates in the
weight's dtype (the matmul adds in fp32 and rounds once per chunk); an fp32 accumulator would cost 4 V H bytes
(1.2 GB). Each chunk reads and writes grad_W once (1.2 GB, ~0.3 ms at ~4 TB/s). Deeper products were faster but
did not fit 1 GiB: C = 1024 (1.19 GiB), or n chunks' gradients in one [n C, V] buffer (bench/RESULTS.md,
2026-11-27).
"""

import torch

from torch.autograd.function import once_differentiable

from kernels.kl import (check_call, check_dtypes, flat_mask, kl_rows_torch, kl_rows_triton, no_grad_detached, scale_grad,
                        triton)


def default_chunk_size(V, dtype, budget=384 * 2**20):
    """Largest power-of-two token chunk whose two [C, V] logits buffers fit in `budget` bytes (512 at V = 151,936
    in bf16, so the extra memory with the gradients stays under 1 GiB; C = 640 fits too and was no faster on an
    H200)."""
    per_token = 2 * V * torch.finfo(dtype).bits // 8
    return 1 << max(0, (budget // per_token).bit_length() - 1)


class FusedLinearKL(torch.autograd.Function):
    """Loss, grad_h and grad_W in forward, chunk by chunk; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, student_hidden, w_s, teacher_hidden, w_t, mask, temperature, reverse, chunk_size, rows_fn):
        if student_hidden.dim() == 0 or teacher_hidden.dim() == 0 or w_s.dim() != 2 or w_t.dim() != 2 \
                or student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or w_s.shape[0] != w_t.shape[0] \
                or student_hidden.shape[-1] != w_s.shape[1] or teacher_hidden.shape[-1] != w_t.shape[1]:
            raise ValueError(f"shapes do not match: student hidden {tuple(student_hidden.shape)}, weight "
                             f"{tuple(w_s.shape)}; teacher hidden {tuple(teacher_hidden.shape)}, weight {tuple(w_t.shape)}")
        check_dtypes([student_hidden, w_s], [teacher_hidden, w_t])
        h_s = student_hidden.reshape(-1, student_hidden.shape[-1])  # [T, H]; leading dims (B, T) flattened
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # [T, H']
        T, V = h_s.shape[0], w_s.shape[0]
        valid, count = flat_mask(mask, student_hidden.shape[:-1], h_s.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = None
        if need_w:  # the first chunk writes it (no chunk when T = 0: zeros)
            grad_w = torch.zeros_like(w_s) if T == 0 else torch.empty_like(w_s)
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        C = max(1, min(T, chunk_size or default_chunk_size(V, h_s.dtype)))
        buf_s = h_s.new_empty(C, V)  # [C, V] student logits, then their gradient
        buf_t = h_t.new_empty(C, V)  # [C, V] teacher logits
        for i in range(0, T, C):
            j = min(i + C, T)
            z_s = torch.mm(h_s[i:j], w_s.t(), out=buf_s[:j - i])
            z_t = torch.mm(h_t[i:j], w_t.t(), out=buf_t[:j - i])
            g = z_s if need_h or need_w else None  # the gradient overwrites z_s
            loss += rows_fn(z_s, z_t, g, valid[i:j], count, temperature, reverse).sum()
            if need_h:
                torch.mm(g, w_s, out=grad_h[i:j])
            if need_w and i == 0:
                torch.mm(g.t(), h_s[i:j], out=grad_w)  # [V, C] @ [C, H]: no zero fill, no read of grad_W
            elif need_w:
                grad_w.addmm_(g.t(), h_s[i:j])
        ctx.save_for_backward(None if grad_h is None else grad_h.view(student_hidden.shape), grad_w)
        ctx.triton, ctx.scaled = rows_fn is kl_rows_triton, False
        return loss / count.clamp(min=1)

    @staticmethod
    @once_differentiable  # the saved gradients are constants: no second-order gradients
    def backward(ctx, grad_output):
        nones = (None,) * 7  # teacher_hidden, teacher_weight, mask, temperature, reverse, chunk_size, rows_fn
        return scale_grad(ctx, grad_output) + nones


def fused_linear_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                              temperature=1.0, reverse=True, chunk_size=None):
    """The torch path: torch matmuls and the torch KL (kl_rows_torch) on each chunk; runs anywhere."""
    student_hidden, student_weight = no_grad_detached(student_hidden, student_weight)
    return FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                               temperature, reverse, chunk_size, kl_rows_torch)


def fused_linear_kl_triton(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                           temperature=1.0, reverse=True, chunk_size=None):
    """The Triton path: torch matmuls and the Triton KL kernel on each chunk."""
    assert triton is not None, "triton is not installed"
    student_hidden, student_weight = no_grad_detached(student_hidden, student_weight)
    return FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                               temperature, reverse, chunk_size, kl_rows_triton)


def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                    temperature=1.0, reverse=True, impl=None, chunk_size=None):
    """kl_div(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, mask, ...) without the logits.

    student_hidden [T, H] (or [B, T, H]), student_weight [V, H], teacher_hidden [T, H'], teacher_weight [V, H'],
    mask [T] (or [B, T]) bool. Returns an fp32 scalar; gradients reach student_hidden and student_weight only.
    impl: None (Triton for CUDA tensors when Triton is installed, torch otherwise), 'triton' or 'torch'.
    chunk_size: tokens per chunk (default: default_chunk_size, 512 at V = 151,936 in bf16).
    """
    temperature = check_call(impl, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None: the default), got {chunk_size}")
    if impl is None:
        impl = "triton" if student_hidden.is_cuda and triton is not None else "torch"
    fn = fused_linear_kl_triton if impl == "triton" else fused_linear_kl_reference
    return fn(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature, reverse, chunk_size)
