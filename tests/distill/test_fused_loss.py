"""liger fused logit losses (matvlm.distill.fused_loss) against the chunked reference in losses.py.

CPU tests run in CI (error messages, the bias folding). The `gpu` tests need CUDA and liger-kernel:
    pip install --no-deps .gpu-wheels/liger_kernel-0.8.5-py3-none-any.whl  (triton comes with CUDA torch)
    pytest -m gpu tests/distill/test_fused_loss.py
"""

import sys

import pytest
import torch
from torch import nn

from matvlm.distill import fused_loss
from matvlm.distill.fused_loss import (
    fold_bias,
    fused_logit_losses,
    liger_available,
    missing_requirements,
)
from matvlm.distill.losses import logit_losses

N, HIDDEN, VOCAB = 300, 192, 2048


def make_case(bias: bool, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A head, student/teacher hidden states that disagree, a KL mask and targets with positions off."""
    torch.manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=bias)
    if bias:
        nn.init.normal_(head.bias, std=3.0)  # dropping it changes KL by ~20%, CE by ~40%
    head = head.to(device, dtype).requires_grad_(False)
    student = 3 * torch.randn(N, HIDDEN)
    teacher = 0.5 * student + 4.0 * torch.randn(N, HIDDEN)  # sharper: KL(t||s) and KL(s||t) differ
    kl_mask = torch.rand(N) < 0.8
    targets = torch.randint(0, VOCAB, (N,))
    targets[torch.rand(N) < 0.4] = -100
    targets[:5], kl_mask[:5] = -100, False  # some positions in neither loss
    return head, student.to(device, dtype), teacher.to(device, dtype), kl_mask.to(device), targets.to(device)


# ---------------------------------------------------------------- CPU


def test_error_names_cuda_for_cpu_tensors():
    head, s, t, m, y = make_case(bias=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        fused_logit_losses(head, s, t, m, y, 1.0)


def test_error_names_liger_when_it_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # makes any liger_kernel import fail
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    assert any("liger-kernel" in m for m in missing_requirements())
    assert not liger_available()
    head, s, t, m, y = make_case(bias=False)
    with pytest.raises(RuntimeError, match="liger-kernel"):
        fused_logit_losses(head, s, t, m, y, 1.0)


def test_not_available_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert not liger_available()
    assert any("CUDA" in m for m in missing_requirements())


def test_rejects_bad_temperature():
    head, s, t, m, y = make_case(bias=False)
    with pytest.raises(ValueError, match="temperature"):
        fused_logit_losses(head, s, t, m, y, 0.0)


def test_fold_bias_without_bias_is_identity():
    head, s, *_ = make_case(bias=False)
    h, w = fold_bias(s, head.weight, None)
    assert h is s and w is head.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_bias_gives_the_heads_logits_and_gradient(dtype):
    head, s, *_ = make_case(bias=True, dtype=dtype)
    s = s[:64].clone().requires_grad_(True)
    h, w = fold_bias(s, head.weight, head.bias)
    assert h.dtype == w.dtype == dtype
    assert h.shape[1] == w.shape[1] and h.shape[1] % 8 == 0 and h.shape[1] > HIDDEN
    folded = h.float() @ w.float().T
    reference = s.detach().float() @ head.weight.float().T + head.bias.float()
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-4)
    # The gradient reaches the original hidden states unchanged (the extra columns are constants).
    g = torch.randn(64, VOCAB, dtype=dtype)
    (grad_folded,) = torch.autograd.grad((h @ w.T * g).sum(), s)
    (grad_head,) = torch.autograd.grad((head(s) * g).sum(), s)
    torch.testing.assert_close(grad_folded, grad_head)


# ---------------------------------------------------------------- GPU (pytest -m gpu)


@pytest.fixture
def cuda_liger():
    if not liger_available():
        pytest.skip("needs " + " and ".join(missing_requirements()))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 GEMMs on both paths for the fp32 comparison
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def losses_and_grads(fn, head, s, t, m, y, temperature):
    """(KL sum, CE sum, dKL/ds, dCE/ds); each loss is backpropagated once."""
    s = s.clone().requires_grad_(True)
    kl, ce = fn(head, s, t, m, y, temperature)
    assert kl.dtype == ce.dtype == torch.float32 and kl.dim() == ce.dim() == 0
    (g_kl,) = torch.autograd.grad(kl, s, retain_graph=True)
    (g_ce,) = torch.autograd.grad(ce, s)
    return kl.detach(), ce.detach(), g_kl, g_ce


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# bf16: the chunked reference rounds logits to bf16, liger's JSD asks the GEMM for fp32 logits, and
# the input gradients are bf16 (2^-8 relative): ~1% on gradients, much less on the sums. Errors of
# meaning (KL direction, T^2, a dropped bias, mean vs sum) are 10% or more.
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-2, 5e-2)}  # (sums, gradients)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_chunked_reference(cuda_liger, dtype, bias, temperature):
    case = make_case(bias, device="cuda", dtype=dtype)
    ref = losses_and_grads(logit_losses, *case, temperature)
    got = losses_and_grads(fused_logit_losses, *case, temperature)
    tol_sum, tol_grad = TOLERANCES[dtype]
    for name, a, b, tol in zip(("kl", "ce", "grad kl", "grad ce"), got, ref, (tol_sum, tol_sum, tol_grad, tol_grad)):
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e} >= {tol}"
    # Positions in neither loss get no gradient.
    neither = ~case[3] & (case[4] == -100)
    assert not got[2][neither].any() and not got[3][neither].any()


@pytest.mark.gpu
def test_matches_reference_under_autocast(cuda_liger):
    """As in training: bf16 frozen head, fp32 student hidden states, bf16 autocast."""
    head, s, t, m, y = make_case(bias=True, device="cuda", dtype=torch.float32)
    head = head.to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = losses_and_grads(logit_losses, head, s, t.bfloat16(), m, y, 2.0)
        got = losses_and_grads(fused_logit_losses, head, s, t.bfloat16(), m, y, 2.0)
    assert got[2].dtype == torch.float32  # the gradient comes back in the student's dtype
    tol_sum, tol_grad = TOLERANCES[torch.bfloat16]
    for a, b, tol in zip(got, ref, (tol_sum, tol_sum, tol_grad, tol_grad)):
        assert rel_err(a, b) < tol


@pytest.mark.gpu
def test_empty_masks_give_zero(cuda_liger):
    head, s, t, m, y = make_case(bias=True, device="cuda")
    kl, ce = fused_logit_losses(head, s, t, torch.zeros_like(m), torch.full_like(y, -100), 1.0)
    assert kl.item() == 0.0 and ce.item() == 0.0
    kl, _ = fused_logit_losses(head, s, t, m, torch.full_like(y, -100), 1.0)
    ref_kl, _ = logit_losses(head, s, t, m, torch.full_like(y, -100), 1.0)
    assert rel_err(kl, ref_kl) < 2e-4


def test_module_docstring_names_the_liger_functions():
    doc = fused_loss.__doc__
    assert "liger_fused_linear_jsd" in doc and "liger_fused_linear_cross_entropy" in doc


# A pure-torch stand-in with the semantics read from liger 0.8.5's source (see fused_loss's docstring):
# JSD with beta=0 is KL(teacher || student) at temperature T on both, averaged over the rows, no T^2;
# CE takes a bias and reduction="sum". It checks our wrapping (row selection, mean -> sum, T^2, bias
# folding, masks) on CPU; the gpu tests above check it against liger itself.
def _stand_in_jsd(s, w, t, tw, shift_labels=None, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
    assert shift_labels is None and jsd_beta == 0.0
    s_logp = torch.log_softmax((s @ w.T).float() / temperature, dim=-1)
    t_logp = torch.log_softmax((t @ tw.T).float() / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum() / s.shape[0]


def _stand_in_ce(x, w, y, bias=None, reduction="mean"):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, bias).float(), y, reduction=reduction)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_wrapping_with_a_stand_in_for_liger(monkeypatch, bias, temperature):
    monkeypatch.setattr(fused_loss, "missing_requirements", lambda device=None: [])
    monkeypatch.setattr(fused_loss, "_import_liger", lambda: (_stand_in_jsd, _stand_in_ce))
    case = make_case(bias)
    ref = losses_and_grads(logit_losses, *case, temperature)
    got = losses_and_grads(fused_logit_losses, *case, temperature)
    for name, a, b in zip(("kl", "ce", "grad kl", "grad ce"), got, ref):
        assert rel_err(a, b) < 1e-5, name


def test_distill_refuses_liger_before_loading_anything_where_it_cannot_run(tmp_path):
    from matvlm.distill import DistillConfig, distill

    cfg = DistillConfig(teacher=str(tmp_path / "no-teacher"), out=str(tmp_path / "out"), data="none.json", logit_impl="liger")
    with pytest.raises(RuntimeError, match="logit_impl=liger needs CUDA"):
        distill(cfg)
    with pytest.raises(ValueError, match="logit_impl"):
        DistillConfig(teacher="t", out="o", data="d", logit_impl="fast").loss_settings().check()
