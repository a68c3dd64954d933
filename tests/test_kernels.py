"""kernels/: the Triton path (interpreted on CPU) and the torch path against float64 autograd."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.kl
from kernels.fused_linear_kl import default_chunk_size
from kernels import (fused_linear_kl, fused_linear_kl_reference, fused_linear_kl_triton, kl_div, kl_div_reference,
                     kl_div_triton)

# the interpreter evaluates both sides of tl.where with numpy, e.g. -inf - -inf on a row's padded tail
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton path runs interpreted on CPU tensors
IMPLS = ["torch"] + (["triton"] if kernels.kl.triton is not None else [])


def on_device(fn):
    """fn with its tensor arguments moved to DEV (differentiably) and its loss moved back to the CPU."""
    return lambda *args, **kw: fn(*(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args), **kw).cpu()


KL = {"torch": kl_div_reference, "triton": on_device(kl_div_triton)}
FUSED = {"torch": fused_linear_kl_reference, "triton": on_device(fused_linear_kl_triton)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def kl64(s, t, mask=None, temperature=1.0, reverse=True):
    """Independent float64 loss: log_softmax, the KL sum, the masked mean; autograd gives the gradient."""
    logp, logq = torch.log_softmax(s.double() / temperature, -1), torch.log_softmax(t.double() / temperature, -1)
    if not reverse:
        logp, logq = logq, logp
    kl = (logp.exp() * torch.where(logp == float("-inf"), 0.0, logp - logq)).sum(-1)  # 0 log 0 = 0
    mask = torch.ones(kl.shape, dtype=torch.bool) if mask is None else mask
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp(min=1)


def loss_and_grad(fn, s, t, *args, upstream=1.0, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, *args, **kw)
    (loss * upstream).backward()
    return loss.detach().double(), s.grad.double()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def logits(T, V, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, V, generator=g) * scale).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_matches_float64(impl, dtype, reverse):
    """Loss and student gradient equal float64 autograd (irregular T, V; tau 0.7; masked rows; upstream 2.5). The
    loss is fp32 math on the same inputs in either dtype (1e-5); only a bf16 gradient is stored in bf16 (1e-2)."""
    s, t = logits(13, 5003, dtype)  # V spans two 4096 blocks with a ragged tail
    mask = torch.rand(13, generator=torch.Generator().manual_seed(1)) > 0.3
    loss, grad = loss_and_grad(KL[impl], s, t, mask, 0.7, reverse, upstream=2.5)
    loss64, grad64 = loss_and_grad(kl64, s, t, mask, 0.7, reverse, upstream=2.5)
    assert abs(loss - loss64) / loss64 < 1e-5
    assert grad.dtype == torch.float64 and rel(grad, grad64) < TOL[dtype]
    assert grad[~mask].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_realistic_vocab(impl):
    """At Qwen3's V = 151,936 in bf16 (several blocks, tau 0.7) loss and gradient match float64."""
    s, t = logits(4, 151936, torch.bfloat16, scale=3.0)
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7)
    loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7)
    assert abs(loss - loss64) / loss64 < 1e-5  # fp32 math on bf16 inputs
    assert rel(grad, grad64) < 1e-2  # the gradient is stored in bf16


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_strided_inputs(impl):
    """Views of padded logits (rows strided differently for student and teacher, as slicing a padded vocabulary gives)
    and a column-strided student give the float64 loss and gradient; the padding gets no gradient."""
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(5, 316, generator=g) * 4)[:, :300]  # row stride 316
    padded = (torch.randn(5, 308, generator=g) * 4).requires_grad_()
    loss = KL[impl](padded[:, :300], t, None, 0.7)  # row stride 308
    loss.backward()
    loss64, grad64 = loss_and_grad(kl64, padded.detach()[:, :300], t, None, 0.7)
    assert abs(loss.item() - loss64) / loss64 < 1e-5 and rel(padded.grad[:, :300], grad64) < 1e-5
    assert not padded.grad[:, 300:].any()
    s = logits(300, 5, torch.float32)[0].t()  # [5, 300], strides (1, 5)
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7)
    loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7)
    assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5


def test_kl_torch_path_spans_its_row_chunks():
    """The torch path works through ~8M elements at a time: 16 rows of V = 10^6 take two chunks of 8, both right,
    each with its own rows of the mask."""
    s, t = logits(16, 1_000_000, torch.float32, scale=1.0)
    mask = torch.arange(16) % 3 != 0  # the two chunks' masks differ
    loss, grad = loss_and_grad(KL["torch"], s, t, mask, 0.7)
    loss64, grad64 = loss_and_grad(kl64, s, t, mask, 0.7)
    assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5


@pytest.mark.parametrize("reverse", [True, False])
def test_kl_torch_path_keeps_float64_in_float64(reverse):
    """float64 logits are worked on in float64 by the torch path: the gradient (float64, like the logits) is float64
    autograd's to 1e-12, far below float32 math's ~1e-7; the loss is returned in float32."""
    s, t = logits(5, 700, torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    loss, grad = loss_and_grad(KL["torch"], s, t, mask, 0.7, reverse)
    loss64, grad64 = loss_and_grad(kl64, s, t, mask, 0.7, reverse)
    assert abs(loss - loss64) / loss64 < 1e-6 and rel(grad, grad64) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_identical_inputs_zero(impl):
    """KL(p || p) is zero with zero gradient, both directions."""
    s, _ = logits(5, 1000, torch.float32)
    for reverse in (True, False):
        loss, grad = loss_and_grad(KL[impl], s, s.clone(), None, 0.7, reverse)
        assert abs(loss) < 1e-6 and grad.abs().max() < 1e-9


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_all_masked_and_garbage_rows(impl):
    """Masked rows, even all -inf, give zero loss and gradient; all rows masked gives loss 0, not NaN."""
    s, t = logits(6, 700, torch.float32)
    s[2], t[4] = float("-inf"), float("-inf")
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    loss, grad = loss_and_grad(KL[impl], s, t, mask)
    loss64, grad64 = loss_and_grad(kl64, s[mask], t[mask])
    assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad[mask], grad64) < 1e-5
    assert grad[~mask].abs().max() == 0
    loss, grad = loss_and_grad(KL[impl], s, t, torch.zeros(6, dtype=torch.bool))
    assert loss == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_extreme_logits(impl, reverse):
    """-inf at the same vocab entries in both (masked vocab) and +-1e4 logits give finite, correct results."""
    s, t = logits(6, 5000, torch.float32)
    banned = torch.rand(5000, generator=torch.Generator().manual_seed(2)) < 0.2
    banned[:4096], banned[[4100, 4200, 4300, 4400]] = True, False  # the whole first 4096-wide block is -inf
    s[:, banned], t[:, banned] = float("-inf"), float("-inf")
    s[0, 4100], t[1, 4200], s[2, 4300], t[2, 4300], s[3, 4400] = 1e4, 1e4, -1e4, 1e4, -1e4
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7, reverse)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[:, banned].abs().max() == 0
    loss64, grad64 = loss_and_grad(kl64, s[:, ~banned], t[:, ~banned], None, 0.7, reverse)
    assert abs(loss - loss64) / loss64 < 1e-5
    assert (grad[:, ~banned] - grad64).abs().max() < 1e-5 * grad64.abs().max()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_is_inf_where_one_side_rules_out_the_others_top_token(impl, reverse):
    """-inf in the teacher where the student's max is (forward KL: the other way round): the KL is +inf, as in
    float64, not NaN; the row beside it keeps float64's loss."""
    s, t = logits(2, 40, torch.float32)
    big, ruled_out = (s, t) if reverse else (t, s)
    big[0, 5], ruled_out[0, 5] = 10.0, float("-inf")
    rows = [KL[impl](s[i:i + 1], t[i:i + 1], None, 0.7, reverse).item() for i in range(2)]
    assert kl64(s[:1], t[:1], None, 0.7, reverse).item() == rows[0] == math.inf
    assert abs(rows[1] - kl64(s[1:], t[1:], None, 0.7, reverse).item()) < 1e-5 * rows[1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_accuracy_does_not_depend_on_the_logits_offsets(impl, reverse):
    """Adding 30 or 1e4 to every logit of both rows, or 30, 100 or +-1e4 to the teacher's alone (the KL is the same),
    leaves loss and gradient as accurate as no offset: exponents are formed from each row's max, and each side of
    s - t is measured from a logit of its own row (formed as s - t, the loss was 18% off at a teacher offset of 1e4)."""
    base, noise = logits(4, 3000, torch.float32, scale=3.0)
    for both, teacher in ((0.0, 0.0), (30.0, 0.0), (1e4, 0.0), (0.0, 30.0), (0.0, 100.0), (0.0, 1e4), (0.0, -1e4)):
        s = base + both
        t = s + teacher + 0.1 * noise
        loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7, reverse)
        loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7, reverse)
        assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5, (both, teacher, loss, loss64)


@pytest.mark.parametrize("reverse", [True, False])
def test_kl_maxima_moving_across_many_blocks(monkeypatch, reverse):
    """With 16-wide blocks (7 to a row), rows whose maxima move block after block (a ramp; jumps of 60 and 1e4; the
    student's and the teacher's in different blocks; leading blocks all -inf in both rows) give float64's
    loss and gradient on both paths: every rescale and shift of the online pass is exercised."""
    monkeypatch.setattr(kernels.kl, "BLOCK_V", 16)
    V, g = 100, torch.Generator().manual_seed(3)
    s, t = torch.randn(6, V, generator=g) * 2, torch.randn(6, V, generator=g) * 2
    s[0] += torch.linspace(0, 30, V)  # a ramp: the student's max moves in every block
    t[0] -= torch.linspace(0, 30, V)  # the teacher's stays in the first
    s[1, 40], t[1, 90] = 60.0, 1e4  # jumps, in different blocks
    s[2, :48] = t[2, :48] = float("-inf")  # leading blocks all -inf (a vocabulary masked in both)
    s[3, :70] = t[3, :70] = float("-inf")
    t[4] += 1e4 + torch.linspace(0, 5, V)
    s[5, 99] = 40.0
    for impl in IMPLS:
        loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7, reverse)
        loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7, reverse)
        assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5, (impl, loss, loss64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_rows_below_minus_1e30(impl, reverse):
    """Rows of -2e30 (say, a padding value left unmasked) give float64's loss and gradient, not NaN or -inf: a
    student row, a teacher row, or both (uniform against uniform: 0)."""
    s, t = logits(2, 5000, torch.float32)
    for student, teacher in ((True, False), (False, True), (True, True)):
        s2, t2 = s.clone(), t.clone()
        s2[0] = -2e30 if student else s2[0]
        t2[0] = -2e30 if teacher else t2[0]
        loss, grad = loss_and_grad(KL[impl], s2, t2, None, 1.0, reverse)
        loss64, grad64 = loss_and_grad(kl64, s2, t2, None, 1.0, reverse)
        assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5, (student, teacher, loss, loss64)
        if student and teacher:
            assert grad[0].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [True, False])
def test_kl_nan_logit_poisons_its_row(impl, reverse):
    """A NaN student logit gives a NaN loss and a NaN gradient row (it used to give an all-zero gradient row),
    and leaves the other rows alone."""
    s, t = logits(3, 600, torch.float32)
    s[1, 7] = float("nan")
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7, reverse)
    assert loss.isnan() and grad[1].isnan().any() and torch.isfinite(grad[[0, 2]]).all()


def test_kl_teacher_gets_no_gradient_and_no_grad_mode():
    """The teacher's .grad stays None; under no_grad the loss is unchanged; [B, T, V] with a [B, T] mask works."""
    s, t = logits(6, 900, torch.float32)
    s, t, mask = s.view(2, 3, 900).requires_grad_(), t.view(2, 3, 900).requires_grad_(), torch.rand(2, 3) > 0.3
    for impl in IMPLS:
        loss = KL[impl](s, t, mask, 0.7)
        loss.backward()
        assert t.grad is None and s.grad.shape == s.shape
        with torch.no_grad():
            assert torch.allclose(KL[impl](s, t, mask, 0.7), loss, rtol=1e-6)
    assert torch.allclose(kl_div(s, t, mask, 0.7), kl_div_reference(s, t, mask, 0.7))  # CPU dispatches to torch


def record_rows_fn(monkeypatch, module):
    """Wrap module.kl_rows_torch so a test sees whether the gradient was asked for (grad is not None)."""
    calls, real = [], module.kl_rows_torch
    monkeypatch.setattr(module, "kl_rows_torch", lambda s, t, grad, *a: calls.append(grad is not None) or real(s, t, grad, *a))
    return calls


def test_no_grad_mode_skips_the_gradient(monkeypatch):
    """Under no_grad neither path computes a gradient (nor, fused, the gradient matmuls); with grad mode they do."""
    fused_module = sys.modules["kernels.fused_linear_kl"]  # the package's attribute is the function
    s, t = logits(4, 300, torch.float32)
    h_s, w_s, h_t, w_t = linear_inputs(4, 16, 300, torch.float32, tied=False)
    for module, call in ((kernels.kl, lambda: kl_div_reference(s.requires_grad_(), t)),
                         (fused_module, lambda: fused_linear_kl_reference(h_s, w_s, h_t, w_t))):
        calls = record_rows_fn(monkeypatch, module)
        with torch.no_grad():
            call()
        call()
        assert calls[0] is False and calls[-1] is True


def test_impl_picks_the_path_and_chunks_are_as_asked(monkeypatch):
    """impl='triton' runs the Triton kernel, 'torch' the torch rows, None on CPU tensors the torch rows; the fused
    path makes one KL call per chunk of chunk_size tokens; its torch backward needs no Triton kernel."""
    fused_module = sys.modules["kernels.fused_linear_kl"]
    s, t = logits(3, 40, torch.float32)
    h_s, w_s, h_t, w_t = linear_inputs(11, 8, 40, torch.float32, tied=False)
    for module, fn, args in ((kernels.kl, kl_div, (s, t)), (fused_module, fused_linear_kl, (h_s, w_s, h_t, w_t))):
        calls = record_rows_fn(monkeypatch, module)
        on_device(fn)(*args, impl="triton")  # Triton on DEV (interpreted on a CPU)
        assert calls == []
        fn(*args, impl="torch")
        fn(*args, impl=None)  # CPU tensors
        assert len(calls) == 2
    calls = record_rows_fn(monkeypatch, fused_module)
    fused_linear_kl(h_s, w_s, h_t, w_t, impl="torch", chunk_size=4)
    assert len(calls) == 3  # 4 + 4 + 3 tokens
    monkeypatch.setattr(kernels.kl, "_scale_kernel", None)
    (fused_linear_kl_reference(h_s, w_s, h_t, w_t, None, 0.7, chunk_size=4) * 2.5).backward()
    assert h_s.grad is not None


def test_bad_arguments_raise_and_masks_are_boolean():
    """An unknown impl, a temperature that is not positive and finite (nor 1 / it) and a chunk size below 1 raise; a
    0-dim tensor temperature works; a 0/1 mask of any dtype counts rows, not values; second-order gradients are
    refused rather than silently zero."""
    s, t = logits(3, 40, torch.float32)
    with pytest.raises(ValueError, match="impl must be"):
        kl_div(s, t, impl="Triton")
    h_s, w_s, h_t, w_t = linear_inputs(3, 8, 40, torch.float32, tied=False)
    with pytest.raises(ValueError, match="impl must be"):
        fused_linear_kl(h_s, w_s, h_t, w_t, impl="cuda")
    for temperature in (0.0, -1.0, float("inf"), float("nan"), 1e-40):  # inf: NaN on a ragged row; 1e-40: 1/tau = inf
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            kl_div(s, t, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            fused_linear_kl(h_s, w_s, h_t, w_t, temperature=temperature)
    assert kl_div(s, t, temperature=torch.tensor(0.7)) == kl_div(s, t, temperature=0.7)  # a 0-dim tensor is a float
    for chunk_size in (-1, 0):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            fused_linear_kl(h_s, w_s, h_t, w_t, chunk_size=chunk_size)
    boolean = kl_div(s, t, torch.tensor([True, False, True]))
    assert kl_div(s, t, torch.tensor([2, 0, 1])) == boolean == kl_div(s, t, torch.tensor([0.5, 0.0, 1.0]))
    s, w = s.requires_grad_(), torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(kl_div(s, t) * w, s, create_graph=True)  # g depends on w: a second order exists
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def linear_inputs(T, H, V, dtype, tied, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = (torch.randn(T, H, generator=g) for _ in range(2))
    w_s = torch.randn(V, H, generator=g) / H**0.5 * 4
    w_t = w_s if tied else torch.randn(V, H, generator=g) / H**0.5 * 4
    w_t = None if tied else w_t.to(dtype).requires_grad_()
    return [x.to(dtype).requires_grad_() for x in (h_s, w_s, h_t)] + [w_t]


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch resizing a too-long last chunk's out= tensor
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tied", [True, False])
def test_fused_linear_matches_logits_path(impl, tied):
    """fused_linear_kl over ragged chunks gives the logits path's loss and grads for h and W; the teacher gets none."""
    h_s, w_s, h_t, w_t = linear_inputs(11, 32, 1100, torch.float32, tied)
    w_t = w_s if tied else w_t
    mask = torch.rand(11, generator=torch.Generator().manual_seed(3)) > 0.3
    ref = kl_div_reference(h_s @ w_s.T, (h_t @ w_t.T).detach(), mask, 0.7)
    grads_ref = torch.autograd.grad(ref * 2.5, (h_s, w_s))
    loss = FUSED[impl](h_s, w_s, h_t, w_t, mask, 0.7, chunk_size=4)
    (loss * 2.5).backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    assert rel(h_s.grad, grads_ref[0]) < 1e-5 and rel(w_s.grad, grads_ref[1]) < 1e-5
    assert h_t.grad is None and (tied or w_t.grad is None)
    assert torch.allclose(fused_linear_kl(h_s, w_s, h_t, w_t, mask, 0.7), loss, rtol=1e-5)  # default chunk, CPU path
    for chunk_size in (3, 16):  # 3 + 3 + 3 + 2 rows; one chunk of all 11
        loss_g = FUSED[impl](h_s, w_s, h_t, w_t, mask, 0.7, chunk_size=chunk_size)
        grads = torch.autograd.grad(loss_g * 2.5, (h_s, w_s))
        assert abs(loss_g.item() - ref.item()) / ref.item() < 1e-5
        assert rel(grads[0], grads_ref[0]) < 1e-5 and rel(grads[1], grads_ref[1]) < 1e-5
    with torch.no_grad():  # loss only (test_no_grad_mode_skips_the_gradient: no gradient work)
        assert torch.allclose(FUSED[impl](h_s, w_s, h_t, w_t, mask, 0.7, chunk_size=4), loss, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need", ["h", "w"])
def test_fused_linear_scales_a_lone_gradient(impl, need):
    """With only h (or only W) needing a gradient and an upstream of 2.5, that gradient is right and scaled."""
    h_s, w_s, h_t, w_t = linear_inputs(6, 16, 300, torch.float32, tied=False)
    x, other = (h_s, w_s) if need == "h" else (w_s, h_s)
    other.requires_grad_(False)
    (g_ref,) = torch.autograd.grad(kl_div_reference(h_s @ w_s.T, (h_t @ w_t.T).detach(), None, 0.7) * 2.5, x)
    (FUSED[impl](h_s, w_s, h_t, w_t, None, 0.7, chunk_size=4) * 2.5).backward()
    assert rel(x.grad, g_ref) < 1e-5 and other.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_bf16_matches_float64(impl):
    """In bf16 the fused loss and h, W grads are within 1e-2 of float64 math on the same bf16 logits."""
    h_s, w_s, h_t, w_t = linear_inputs(12, 64, 3000, torch.bfloat16, tied=False)
    loss = FUSED[impl](h_s, w_s, h_t, w_t, None, 0.7, False, chunk_size=5)
    loss.backward()
    z_s = (h_s @ w_s.T).detach().double().requires_grad_()  # the bf16 logits; everything after in float64
    ref = kl64(z_s, (h_t @ w_t.T).detach(), None, 0.7, False)
    (g,) = torch.autograd.grad(ref, z_s)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    assert rel(h_s.grad, g @ w_s.double()) < 1e-2 and rel(w_s.grad, g.T @ h_s.double()) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_scale_is_applied_in_fp32_once(impl, monkeypatch):
    """An upstream gradient of 1/3 multiplies the stored bf16 gradient in fp32 with one rounding (to nearest on a
    GPU and in torch; the Triton interpreter truncates), not by bf16(1/3) = 0.33398; a second backward raises."""
    monkeypatch.setattr(kernels.kl, "SCALE_PROGRAMS", 1)  # one program strides over all the gradient's blocks
    s, t = logits(8, 3000, torch.bfloat16)
    _, g1 = loss_and_grad(KL[impl], s, t, None, 0.7)
    _, g3 = loss_and_grad(KL[impl], s, t, None, 0.7, upstream=torch.tensor(1 / 3))
    exact = g1.float() * (1 / 3)
    if impl == "triton" and DEV == "cpu":
        expected = (exact.view(torch.int32) & -65536).view(torch.float32)  # round toward zero
    else:
        expected = exact.to(torch.bfloat16).float()
    assert (g1 != 0).float().mean() > 0.9 and torch.equal(g3.float(), expected)
    loss = KL[impl](s.clone().requires_grad_(), t, None, 0.7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran"):
        loss.backward()
    loss = KL[impl](s.clone().requires_grad_(), t, None, 0.7) * 3.0  # upstream 3: the torch path has scaled in place
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran"):
        loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward_never_wait_for_the_gpu():
    """The Triton paths queue forward and backward without a host sync (none in scale_grad, flat_mask or the loss)."""
    s, t = (x.cuda() for x in logits(8, 3000, torch.bfloat16))
    h_s, w_s, h_t, w_t = (x.detach().cuda().requires_grad_() for x in linear_inputs(8, 16, 3000, torch.bfloat16, False))
    mask = torch.rand(8, device="cuda") > 0.3
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (kl_div(s.requires_grad_(), t, mask, 0.7) * 0.5).backward()
        (fused_linear_kl(h_s, w_s, h_t, w_t, mask, 0.7) * 0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.grad is not None and w_s.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens_give_zero_loss_and_zero_gradients(impl):
    """T = 0 (an empty batch) is a zero loss with zero gradients of the right shapes, on both paths."""
    s, t = (x[:0] for x in logits(1, 50, torch.float32))
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7, upstream=2.0)
    assert loss == 0 and grad.shape == (0, 50)
    h_s, w_s, h_t, w_t = linear_inputs(1, 16, 50, torch.float32, tied=False)
    h_s, h_t = h_s.detach()[:0].requires_grad_(), h_t.detach()[:0]
    w_s.data.fill_(float("nan"))  # grad_W must be written as zeros, not left as it was allocated
    loss = FUSED[impl](h_s, w_s, h_t, w_t, None, 0.7)
    (loss * 2.0).backward()
    assert loss == 0 and h_s.grad.shape == (0, 16) and torch.equal(w_s.grad, torch.zeros_like(w_s))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise(impl):
    """Mismatched shapes, a mask of another shape (even with as many elements), no vocabulary, inputs that are not
    floating point and a float16 student fail with a message instead of reading out of bounds; a float16 teacher,
    which gets no gradient, is fine."""
    s, t = logits(4, 50, torch.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        KL[impl](s, t[:3])
    with pytest.raises(ValueError, match=r"mask has shape \(3,\); the inputs' leading dims are \(4,\)"):
        KL[impl](s, t, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\); the inputs' leading dims are \(4,\)"):
        KL[impl](s, t, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="vocabulary dim of size >= 1"):
        KL[impl](s[:, :0], t[:, :0])
    with pytest.raises(ValueError, match="vocabulary dim of size >= 1"):
        KL[impl](s[0, 0], t[0, 0])
    with pytest.raises(TypeError, match="float16"):
        KL[impl](s.half(), t.half())
    for dtype in (torch.bool, torch.int64, torch.complex64):
        with pytest.raises(TypeError, match=f"inputs must be floating point, got {dtype}"):
            KL[impl](s.to(dtype), t)
    assert abs(KL[impl](s, t.half(), None, 0.7) - kl64(s, t.half().float(), None, 0.7)) < 1e-5
    h_s, w_s, h_t, w_t = linear_inputs(4, 16, 50, torch.float32, tied=False)
    with pytest.raises(ValueError, match="shapes do not match"):
        FUSED[impl](h_s, w_s, h_t, w_t[:48])
    with pytest.raises(ValueError, match="shapes do not match"):
        FUSED[impl](h_s, w_s, h_t[:3], w_t)
    with pytest.raises(ValueError, match="shapes do not match"):  # the hidden size, before torch.mm would fail
        FUSED[impl](h_s[:, :15], w_s, h_t, w_t)
    with pytest.raises(TypeError, match="float16"):
        FUSED[impl](h_s.half(), w_s.half(), h_t.half(), w_t.half())
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\)"):
        FUSED[impl](h_s, w_s, h_t, w_t, torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_column_strided_teacher(impl):
    """A column-strided teacher (a transposed view) gives float64's loss and gradient, like a column-strided student."""
    s = logits(5, 300, torch.float32)[0]
    t = logits(300, 5, torch.float32, seed=1)[0].t()  # [5, 300], strides (1, 5)
    loss, grad = loss_and_grad(KL[impl], s, t, None, 0.7)
    loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7)
    assert abs(loss - loss64) / loss64 < 1e-5 and rel(grad, grad64) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("upstream", [0.0, -2.5])
def test_zero_and_negative_upstream_gradients(impl, upstream):
    """An upstream gradient of 0 zeroes the stored gradients (a KL term weighted by 0) and a negative one flips their
    sign, on the logits path and the fused path."""
    s, t = logits(6, 3000, torch.float32)
    _, g1 = loss_and_grad(KL[impl], s, t, None, 0.7)
    _, g = loss_and_grad(KL[impl], s, t, None, 0.7, upstream=upstream)
    assert torch.allclose(g, g1 * upstream, rtol=1e-6, atol=0)
    grads = []
    for up in (1.0, upstream):
        h_s, w_s, h_t, w_t = linear_inputs(6, 16, 300, torch.float32, tied=False)
        (FUSED[impl](h_s, w_s, h_t, w_t, None, 0.7, chunk_size=4) * up).backward()
        grads.append((h_s.grad, w_s.grad))
    for a, b in zip(*grads):
        assert torch.allclose(b, a * upstream, rtol=1e-6, atol=0)


def test_kl_rows_triton_writes_only_its_rows_entries():
    """kl_rows_triton writes a gradient row's V entries and nothing beyond, masked rows included (a write one past a
    masked row lands on the next row's first entry: a race on a GPU)."""
    if kernels.kl.triton is None:
        pytest.skip("needs triton")
    s, t = (x.to(DEV) for x in logits(4, 50, torch.float32))
    big = torch.full((4, 51), 7.0, device=DEV)
    grad = big[:, :50]  # row stride 51: the 51st column must stay untouched
    valid, count = kernels.kl.flat_mask(torch.tensor([0, 1, 0, 1], device=DEV), (4,), DEV)
    kernels.kl.kl_rows_triton(s, t, grad, valid, count, 0.7, True)
    assert (big[:, 50] == 7.0).all() and (grad[[0, 2]] == 0).all()


def test_scale_kernel_stays_in_bounds():
    """The scale kernel scales its n elements and writes nothing after them."""
    if kernels.kl.triton is None:
        pytest.skip("needs triton")
    n = 8192 + 5
    big = torch.full((n + 3,), 2.0, device=DEV)
    kernels.kl._scale_kernel[(1,)](big[:n], torch.tensor(3.0, device=DEV), n, 2, BLOCK=8192)
    assert (big[:n] == 6.0).all() and (big[n:] == 2.0).all()


def test_dispatchers_pass_reverse_on():
    """kl_div and fused_linear_kl compute the forward KL when asked (reverse=False), not the default reverse KL."""
    s, t = logits(4, 300, torch.float32)
    assert abs(kl_div(s, t, None, 0.7, reverse=False) - kl64(s, t, None, 0.7, False)) < 1e-5 * kl64(s, t, None, 0.7, False)
    h_s, w_s, h_t, w_t = linear_inputs(5, 16, 300, torch.float32, tied=False)
    ref = fused_linear_kl_reference(h_s, w_s, h_t, w_t, None, 0.7, False)
    assert torch.allclose(fused_linear_kl(h_s, w_s, h_t, w_t, None, 0.7, reverse=False), ref, rtol=1e-6)
    assert not torch.allclose(fused_linear_kl(h_s, w_s, h_t, w_t, None, 0.7), ref, rtol=1e-3)


@pytest.mark.parametrize("reverse", [True, False])
def test_kl_torch_path_float64_with_full_mantissas(reverse):
    """float64 logits that float32 cannot hold keep float64 accuracy on both sides (the other float64 tests' logits are
    float32 values)."""
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(5, 700, dtype=torch.float64, generator=g) * 4 for _ in range(2))
    loss, grad = loss_and_grad(KL["torch"], s, t, None, 0.7, reverse)
    loss64, grad64 = loss_and_grad(kl64, s, t, None, 0.7, reverse)
    assert abs(loss - loss64) / loss64 < 1e-7 and rel(grad, grad64) < 1e-12  # the loss is returned in float32


def test_default_chunk_fits_1gib():
    """At Qwen3-1.7B's sizes (T = 8192, H = 2048, V = 151,936, bf16) the default chunk's two [C, V] buffers plus the
    returned grad_W and grad_h stay under 1 GiB, with chunks large enough for efficient matmuls."""
    T, H, V = 8192, 2048, 151936
    C = default_chunk_size(V, torch.bfloat16)
    assert C >= 256 and 2 * C * V * 2 + V * H * 2 + T * H * 2 < 2**30


COMPILE_FOR_H100 = r"""
import re
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.kl
from kernels.kl import _kl_kernel, _scale_kernel, flat_mask, kl_rows_triton
launch = {}  # the settings kl_rows_triton launches the kernel with, recorded instead of launched
kernels.kl._kl_kernel = type("Spy", (), {"__getitem__": lambda self, grid: lambda *a, **kw: launch.update(kw)})()
z = torch.zeros(2, 151936, dtype=torch.bfloat16)
kl_rows_triton(z, z, z.clone(), *flat_mask(None, (2,), "cpu"), 0.7, True)
assert launch.pop("REVERSE") is True and launch.pop("WRITE_GRAD") is True, launch
block = launch.pop("BLOCK_V")
sig = dict(s_ptr="*bf16", t_ptr="*bf16", g_ptr="*bf16", valid_ptr="*i8", count_ptr="*i32", loss_ptr="*fp32",
           s_stride="i32", t_stride="i32", g_stride="i32", V="i32", inv_temp="fp32",
           REVERSE="constexpr", WRITE_GRAD="constexpr", BLOCK_V="constexpr")
aligned = {(i,): [["tt.divisibility", 16]] for i in range(10)}  # what the launcher specialises at V = 151,936
for reverse in (True, False):
    for write_grad in (True, False):
        src = ASTSource(_kl_kernel, sig, dict(REVERSE=reverse, WRITE_GRAD=write_grad, BLOCK_V=block), aligned)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch).asm
        ptx, ttir = asm["ptx"], asm["ttir"]
        assert "ld.global.v4" in ptx, "no 16-byte vector loads"
        assert "fma.rn.f32" not in ptx, "fma contraction: pass 2 would round its exponents unlike pass 1"
        offsets = re.findall(r"arith.muli %row\S*, %(\w)_ptr\S* : i64", ttir)  # row x stride for s, t (and g)
        assert offsets == ["s", "t"] + ["g"] * write_grad, "row offsets in 32 bits overflow once T x V > 2^31"
src = ASTSource(_scale_kernel, dict(g_ptr="*bf16", scale_ptr="*fp32", n="i64", n_blocks="i32", BLOCK="constexpr"),
                dict(BLOCK=8192))
ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ttir"]
assert re.search(r"arith.muli .*: i64", ttir), "block offsets in 32 bits"
"""


def test_triton_kernel_compiles_for_h100():
    """The interpreter is lax: the kernel also compiles for sm_90 (every variant), as kl_rows_triton launches it, with
    16-byte vector loads, no fma contraction (on by default in Triton) and 64-bit row offsets, and so does the scale
    kernel, with 64-bit offsets."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
