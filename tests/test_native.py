"""The native helpers exposed by specfast._C: the dense symmetric eigen-solver (used on every Ritz
step), side selection, build info."""
from __future__ import annotations

import pytest
import torch

import specfast
from specfast._native import _C  # None without the compiled module: the conftest guard then fails every test
from conftest import TOLERANCES, random_orthonormal


def sym_eig(A: torch.Tensor):
    """Call _C.sym_eig on a float64 n×n matrix: (ok, evals desc, evecs with columns = vectors)."""
    A = A.to(torch.float64).contiguous()
    n = A.shape[0]
    evals = torch.full((n,), float("nan"), dtype=torch.float64)
    evecs = torch.full((n, n), float("nan"), dtype=torch.float64)
    ok = _C.sym_eig(n, A.data_ptr(), evals.data_ptr(), evecs.data_ptr())
    return ok, evals, evecs


def check_eig(A, evals, evecs, tol=TOLERANCES["sym_eig"]):
    n = A.shape[0]
    ref = torch.linalg.eigvalsh(A).flip(0)
    scale = max(float(ref.abs().max()) if n else 0.0, 1e-300)
    assert bool((evals[:-1] >= evals[1:]).all()), "eigenvalues must be descending"
    assert float((evals - ref).abs().max()) <= tol * scale, (evals, ref)
    # eigenvectors: orthonormal and A V = V diag(evals) (holds for repeated eigenvalues too)
    I = torch.eye(n, dtype=torch.float64)
    assert float((evecs.T @ evecs - I).abs().max()) <= 1e-12 * max(n, 1)
    assert float((A @ evecs - evecs * evals).abs().max()) <= tol * scale * max(n, 1)


def _known(n, lam, seed):
    g = torch.Generator().manual_seed(seed)
    Q = random_orthonormal(n, n, g)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 129], ids=lambda n: f"n={n}")
def test_random_symmetric(n):
    g = torch.Generator().manual_seed(n)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = B + B.T
    ok, ev, V = sym_eig(A)
    assert ok
    check_eig(A, ev, V)


@pytest.mark.parametrize("lam", [
    [2.0, 2.0, 2.0, 1.0, 0.5],
    [1.0] * 8,
    [3.0, 3.0, -3.0, -3.0, 0.0, 0.0],
    [5.0, 1e-9, 1e-9, 0.0, -1e-9],
    [1.0, 1.0 + 1e-14, 1.0 - 1e-14, 7.0],
    [1e150, 1.0, -1e150],
    [1e-150, 2e-150, 3e-150],
], ids=["triple", "identity-like", "pm-pairs", "cluster-near-zero", "near-degenerate", "huge", "tiny"])
def test_known_eigenvalues_including_repeated(lam):
    A = _known(len(lam), lam, seed=len(lam))
    ok, ev, V = sym_eig(A)
    assert ok
    check_eig(A, ev, V)
    lam_sorted = torch.tensor(sorted(lam, reverse=True), dtype=torch.float64)
    assert float((ev - lam_sorted).abs().max()) <= 1e-12 * float(lam_sorted.abs().max())


@pytest.mark.parametrize("n", [1, 4, 30], ids=lambda n: f"n={n}")
def test_zero_matrix(n):
    A = torch.zeros(n, n, dtype=torch.float64)
    ok, ev, V = sym_eig(A)
    assert ok
    assert torch.equal(ev, torch.zeros(n, dtype=torch.float64))
    assert float((V.T @ V - torch.eye(n, dtype=torch.float64)).abs().max()) <= 1e-14


@pytest.mark.parametrize("x", [3.5, -2.0, 0.0, 1e-300, 1e300], ids=lambda x: f"x={x:g}")
def test_one_by_one(x):
    ok, ev, V = sym_eig(torch.tensor([[x]], dtype=torch.float64))
    assert ok and float(ev[0]) == x and abs(float(V[0, 0])) == 1.0


def test_diagonal_and_tridiagonal():
    d = torch.tensor([3.0, -1.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    ok, ev, V = sym_eig(torch.diag(d))
    assert ok
    assert torch.equal(ev, d.sort(descending=True).values)
    T = torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64)) + torch.diag(torch.full((6,), 0.5, dtype=torch.float64), 1)
    T = T + torch.diag(torch.full((6,), 0.5, dtype=torch.float64), -1)
    ok, ev, V = sym_eig(T)
    assert ok
    check_eig(T, ev, V)
    # Wilkinson matrix W21+: famous nearly-equal eigenvalue pairs
    n = 21
    W = torch.diag((torch.arange(n, dtype=torch.float64) - 10).abs()) + torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) \
        + torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    ok, ev, V = sym_eig(W)
    assert ok
    check_eig(W, ev, V)


def test_nonsymmetric_input_is_symmetrised():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ok, ev, V = sym_eig(B)
    assert ok
    check_eig(0.5 * (B + B.T), ev, V)


def test_rank_deficient_gram_like():
    """The Ritz problems the solver sees: PSD, low rank, with zeros."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    A = X @ X.T
    ok, ev, V = sym_eig(A)
    assert ok
    check_eig(A, ev, V)
    assert float(ev[3:].abs().max()) <= 1e-12 * float(ev[0])


def test_choose_side():
    # the smallest singular values must be sought on the smaller side (no structural zeros)
    assert _C.choose_side(10, 50, 0, False) == 1
    assert _C.choose_side(50, 10, 0, False) == 0
    for m, n in [(10, 50), (50, 10), (7, 7), (1, 1000), (1000, 1)]:
        for dt in range(4):
            assert _C.choose_side(m, n, dt, True) in (0, 1)
    with pytest.raises(ValueError):
        _C.choose_side(3, 3, 7, True)


def test_build_info():
    info = specfast.build_info()
    assert info["native"] is True
    for key in ("version", "compiler", "openmp", "cuda"):
        assert key in info, key
    assert info["version"] == specfast.__version__
