"""Gradients: ∂σ₁/∂W = u₁v₁ᵀ (and Σ gᵢ uᵢvᵢᵀ for svdvals), against torch's own dense SVD gradient
on matrices with a clear gap; gradcheck in float64; stacks and lists."""
from __future__ import annotations

import pytest
import torch

import specfast
from conftest import TOLERANCES, case_id, geometric_spectrum, known_spectrum

GAPPED = lambda p: torch.cat([torch.tensor([2.0, 1.0]), torch.linspace(0.9, 0.1, p - 2)]).double()  # noqa: E731


def _gerr(a, b) -> float:
    return float((a.double() - b.double()).norm())


def _torch_grad(W, fn):
    X = W.detach().clone().requires_grad_(True)
    fn(X).sum().backward()
    return X.grad


@pytest.mark.parametrize("tol,tolname", [(1e-6, "grad_default_tol"), (1e-12, "grad_tight")], ids=lambda v: f"tol={v:g}" if isinstance(v, float) else None)
@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (200, 150), (1, 8), (8, 1), (5, 5)], ids=lambda s: case_id(shape=s))
def test_spectral_norm_grad_is_u1_v1(shape, tol, tolname):
    m, n = shape
    p = min(m, n)
    s = GAPPED(p) if p >= 2 else torch.tensor([2.0], dtype=torch.float64)
    W, _ = known_spectrum(m, n, s, torch.float64, seed=1)
    X = W.clone().requires_grad_(True)
    sig = specfast.spectral_norm(X, tol=tol)
    assert sig.requires_grad
    sig.backward()
    expected = _torch_grad(W, lambda A: torch.linalg.matrix_norm(A, ord=2))
    assert X.grad.shape == W.shape and X.grad.dtype == W.dtype
    assert _gerr(X.grad, expected) <= TOLERANCES[tolname]
    # u1 v1ᵀ has unit Frobenius norm
    assert float(X.grad.norm()) == pytest.approx(1.0, abs=1e-9)


def test_spectral_norm_grad_fp32_dtype():
    W, _ = known_spectrum(40, 30, GAPPED(30), torch.float32, seed=2)
    X = W.clone().requires_grad_(True)
    specfast.spectral_norm(X).backward()
    assert X.grad.dtype == torch.float32
    expected = _torch_grad(W.double(), lambda A: torch.linalg.matrix_norm(A, ord=2))
    assert _gerr(X.grad, expected) <= TOLERANCES["grad_default_tol"]


def test_gradcheck_float64():
    W, _ = known_spectrum(6, 4, torch.tensor([3.0, 1.5, 1.0, 0.5]), torch.float64, seed=3)
    X = W.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: specfast.spectral_norm(A, tol=1e-12), (X,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda A: specfast.spectral_norm(A), (X,), eps=1e-6, atol=1e-5)


def test_gradcheck_svdvals_topk_float64():
    W, _ = known_spectrum(7, 5, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]), torch.float64, seed=4)
    X = W.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A: specfast.svdvals(A, 3, tol=1e-12), (X,), eps=1e-6, atol=1e-6)


def test_svdvals_grad_matches_torch():
    W, _ = known_spectrum(30, 25, geometric_spectrum(25, 3.0, 0.7), torch.float64, seed=5)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    X = W.clone().requires_grad_(True)
    (specfast.svdvals(X, 3, tol=1e-12) * g).sum().backward()
    expected = _torch_grad(W, lambda A: torch.linalg.svdvals(A)[:3] * g)
    assert _gerr(X.grad, expected) <= TOLERANCES["grad_tight"] * 3


def test_stack_grad():
    s = torch.stack([GAPPED(20) * (i + 1) for i in range(4)]).reshape(2, 2, 20)
    W, _ = known_spectrum(25, 20, s, torch.float64, batch=(2, 2), seed=6)
    X = W.clone().requires_grad_(True)
    sig = specfast.spectral_norm(X, tol=1e-12)
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    (sig * w).sum().backward()
    expected = _torch_grad(W, lambda A: torch.linalg.matrix_norm(A, ord=2) * w)
    assert _gerr(X.grad, expected) <= TOLERANCES["grad_tight"] * 4


def test_strided_stack_grad():
    W, _ = known_spectrum(25, 20, GAPPED(20), torch.float64, batch=(6,), seed=7)
    X = W.clone().requires_grad_(True)
    specfast.spectral_norm(X[::2].mT, tol=1e-12).sum().backward()
    expected = _torch_grad(W, lambda A: torch.linalg.matrix_norm(A[::2].mT, ord=2))
    assert _gerr(X.grad, expected) <= TOLERANCES["grad_tight"] * 3
    assert bool((X.grad[1::2] == 0).all())


def test_list_grad():
    mats = [known_spectrum(m, n, GAPPED(min(m, n)), torch.float64, seed=i)[0]
            for i, (m, n) in enumerate([(10, 8), (5, 12), (9, 9)])]
    Xs = [w.clone().requires_grad_(True) for w in mats]
    sig = specfast.spectral_norm(Xs, tol=1e-12)
    sig.sum().backward()
    for i, (X, W) in enumerate(zip(Xs, mats)):
        expected = _torch_grad(W, lambda A: torch.linalg.matrix_norm(A, ord=2))
        assert X.grad is not None, f"W[{i}] got no gradient"
        assert _gerr(X.grad, expected) <= TOLERANCES["grad_tight"], f"W[{i}]"


def test_list_grad_partial_requires_grad_and_mixed_dtypes():
    A = known_spectrum(10, 8, GAPPED(8), torch.float64, seed=1)[0]
    B = known_spectrum(6, 7, GAPPED(6), torch.float32, seed=2)[0]
    XA = A.clone().requires_grad_(True)
    sig = specfast.spectral_norm([XA, B])
    sig.sum().backward()
    expected = _torch_grad(A, lambda M: torch.linalg.matrix_norm(M, ord=2))
    assert _gerr(XA.grad, expected) <= TOLERANCES["grad_default_tol"]


def test_no_grad_when_not_required():
    W = torch.randn(10, 8)
    assert not specfast.spectral_norm(W).requires_grad
    with torch.no_grad():
        assert not specfast.spectral_norm(W.requires_grad_(True)).requires_grad
