"""The chunked scan and the one-token step against the naive sequential recurrence (float64)."""

import pytest
import torch
import torch.nn.functional as F

from matvlm.model.ssd import ssd_chunked_torch, ssd_scan, ssd_sequential_reference, ssd_step


def random_inputs(b, seqlen, h, g, p, n, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = r(b, seqlen, h, p)
    dt = F.softplus(r(b, seqlen, h))
    A = -torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.05
    B, C = r(b, seqlen, g, n), r(b, seqlen, g, n)
    D = r(h)
    return x, dt, A, B, C, D


@pytest.mark.parametrize(
    "b,seqlen,h,g,p,n,chunk",
    [(2, 37, 4, 4, 5, 3, 8), (1, 64, 2, 1, 4, 6, 16), (3, 5, 4, 2, 3, 2, 4), (1, 100, 3, 3, 8, 8, 32), (2, 1, 2, 2, 2, 2, 4)],
)
def test_chunked_scan_matches_sequential_recurrence(b, seqlen, h, g, p, n, chunk):
    x, dt, A, B, C, D = random_inputs(b, seqlen, h, g, p, n, seed=seqlen)
    state0 = torch.randn(b, h, p, n, dtype=torch.float64)
    y, final = ssd_chunked_torch(x, dt, A, B, C, chunk, D=D, initial_state=state0)
    y_ref, final_ref = ssd_sequential_reference(x, dt, A, B, C, D=D, initial_state=state0)
    assert y.shape == (b, seqlen, h, p) and final.shape == (b, h, p, n)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 64])
def test_chunk_size_does_not_change_result(chunk):
    x, dt, A, B, C, D = random_inputs(2, 45, 4, 2, 4, 4, seed=1)
    y_ref, s_ref = ssd_chunked_torch(x, dt, A, B, C, 45, D=D)
    y, s = ssd_chunked_torch(x, dt, A, B, C, chunk, D=D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_scan_with_initial_state_equals_scan_of_concatenation():
    x, dt, A, B, C, D = random_inputs(2, 50, 4, 4, 3, 5, seed=2)
    y_all, s_all = ssd_scan(x, dt, A, B, C, chunk_size=8, D=D)
    y1, s1 = ssd_scan(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], chunk_size=8, D=D)
    y2, s2 = ssd_scan(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], chunk_size=8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_all, rtol=1e-10, atol=1e-10)


def test_prefill_then_steps_equals_full_scan():
    x, dt, A, B, C, D = random_inputs(2, 30, 2, 1, 4, 3, seed=3)
    y_all, s_all = ssd_scan(x, dt, A, B, C, chunk_size=8, D=D)
    y, state = ssd_scan(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], chunk_size=8, D=D)
    ys = [y]
    for t in range(20, 30):
        yt, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(yt[:, None])
    torch.testing.assert_close(torch.cat(ys, dim=1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, s_all, rtol=1e-10, atol=1e-10)


def test_float32_and_bf16_inputs_stay_close_to_float64():
    x, dt, A, B, C, D = random_inputs(1, 70, 2, 2, 8, 8, seed=4)
    y_ref, _ = ssd_sequential_reference(x, dt, A, B, C, D=D)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        y, _ = ssd_scan(*(t.to(dtype) for t in (x, dt, A, B, C)), chunk_size=16, D=D.to(dtype))
        assert y.dtype == dtype
        rel = (y.double() - y_ref).norm() / y_ref.norm()
        assert rel < tol, (dtype, rel.item())


def test_gradients_match_sequential_recurrence():
    inputs = [t.requires_grad_() for t in random_inputs(1, 19, 2, 1, 3, 4, seed=5)]
    y, s = ssd_chunked_torch(*inputs[:5], 4, D=inputs[5])
    grads = torch.autograd.grad((y.sin().sum() + s.cos().sum()), inputs)
    y_ref, s_ref = ssd_sequential_reference(*inputs[:5], D=inputs[5])
    grads_ref = torch.autograd.grad((y_ref.sin().sum() + s_ref.cos().sum()), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_heads_must_be_multiple_of_groups():
    x, dt, A, B, C, D = random_inputs(1, 4, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_chunked_torch(x, dt, A, B, C, 4)


def test_backend_choice(monkeypatch):
    from matvlm.model import kernels

    assert kernels.scan_backend("cpu") == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "mamba_ssm")
    assert kernels.scan_backend("cpu") == "torch"  # CPU tensors never reach a GPU kernel
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton-magic")
    with pytest.raises(ValueError, match="choose auto, torch or mamba_ssm"):
        kernels.scan_backend("cuda")
