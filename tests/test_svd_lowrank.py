"""svd_lowrank: torch.svd_lowrank's signature and return convention, accuracy on known spectra."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import specfast
from conftest import TOLERANCES, case_id, geometric_spectrum, known_spectrum, rel_err, rounded_truth

METHODS = ["krylov", "randomized"]


def test_signature_matches_torch():
    ours = list(inspect.signature(specfast.svd_lowrank).parameters.values())
    theirs = list(inspect.signature(torch.svd_lowrank).parameters.values())
    assert [p.name for p in ours[:4]] == [p.name for p in theirs[:4]] == ["A", "q", "niter", "M"]
    for a, b in zip(ours[:4], theirs[:4]):
        assert a.default == b.default, (a.name, a.default, b.default)
        assert a.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)


def _orth_err(Q):
    Qd = Q.double()
    I = torch.eye(Q.shape[-1], dtype=torch.float64)
    return float((Qd.mT @ Qd - I).abs().max()) if Q.numel() else 0.0


def _recon(U, S, V):
    return (U.double() * S.double().unsqueeze(-2)) @ V.double().mT


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape,q", [((60, 40), 6), ((40, 60), 5), ((3, 50, 31), 4), ((2, 2, 20, 25), 3), ((9, 9), 9),
                                     ((1, 30), 1), ((30, 1), 1)],
                         ids=lambda v: case_id(shape=v) if isinstance(v, tuple) else f"q={v}")
def test_exact_low_rank(shape, q, dtype, method):
    """A of rank exactly q: both methods recover U diag(S) Vᵀ = A and S = the designed values."""
    *batch, m, n = shape
    s = geometric_spectrum(q, 3.0, 0.7)
    A, s_true = known_spectrum(m, n, s, dtype, batch=tuple(batch), seed=m * n + q)
    U, S, V = specfast.svd_lowrank(A, q, method=method)
    assert U.shape == (*batch, m, q) and S.shape == (*batch, q) and V.shape == (*batch, n, q)
    assert U.dtype == S.dtype == V.dtype == dtype
    fp32 = dtype == torch.float32
    assert rel_err(S, s_true[..., :q]) <= (TOLERANCES["topk_fp32"] if fp32 else 1e-10)
    assert _orth_err(U) <= TOLERANCES["orthonormal_fp32" if fp32 else "orthonormal_fp64"]
    assert _orth_err(V) <= TOLERANCES["orthonormal_fp32" if fp32 else "orthonormal_fp64"]
    err = float((_recon(U, S, V) - A.double()).abs().max() / s_true.max())
    assert err <= (TOLERANCES["reconstruct_fp32"] if fp32 else 1e-10)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"method={m}")
def test_default_q_and_niter_like_torch(method):
    A, s = known_spectrum(50, 40, geometric_spectrum(40, 1.0, 0.5), torch.float64, seed=1)
    U, S, V = specfast.svd_lowrank(A, method=method)
    Ut, St, Vt = torch.svd_lowrank(A)
    assert U.shape == Ut.shape and S.shape == St.shape and V.shape == Vt.shape
    U, S, V = specfast.svd_lowrank(A[:4, :3], q=None, method=method)
    assert S.shape == (3,)


def test_krylov_top_q_of_full_rank_matrix():
    """Truncation of a full-rank matrix: S = top-q values, ||A - U S Vᵀ||_2 = sigma_{q+1}."""
    A, s = known_spectrum(120, 90, geometric_spectrum(90, 2.0, 0.85), torch.float32, seed=2)
    q = 8
    (U, S, V), info = specfast.svd_lowrank(A, q, return_info=True)
    truth = rounded_truth(A)
    assert rel_err(S, truth[:q]) <= TOLERANCES["topk_fp32"]
    assert bool(torch.as_tensor(info.converged).all())
    resid = torch.linalg.matrix_norm(A.double() - _recon(U, S, V), ord=2)
    assert rel_err(resid, truth[q]) <= 1e-4
    # singular vectors: A v_i = s_i u_i
    AV = A.double() @ V.double()
    assert float((AV - U.double() * S.double()).norm(dim=0).max() / truth[0]) <= 1e-4


def test_randomized_interlacing_and_accuracy():
    """Rayleigh-Ritz from any subspace gives values <= the true ones (interlacing); with fast decay
    and niter=2 they are also close."""
    A, s = known_spectrum(200, 150, geometric_spectrum(150, 1.0, 0.6), torch.float64, seed=3)
    for niter in [0, 1, 2, 4]:
        U, S, V = specfast.svd_lowrank(A, 5, niter=niter, method="randomized", seed=niter)
        assert bool((S <= s[:5] * (1 + 1e-12)).all()), (niter, S, s[:5])
        assert _orth_err(U) <= TOLERANCES["orthonormal_fp64"]
        assert _orth_err(V) <= TOLERANCES["orthonormal_fp64"]
    U, S, V = specfast.svd_lowrank(A, 5, niter=4, oversample=5, method="randomized")
    assert rel_err(S, s[:5]) <= 1e-8


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"method={m}")
@pytest.mark.parametrize("mshape", [(70, 50), (1, 50), (70, 1)], ids=lambda s: "M=" + "x".join(map(str, s)))
def test_M_is_subtracted(method, mshape):
    B, s = known_spectrum(70, 50, geometric_spectrum(4, 2.0, 0.5), torch.float64, seed=4)
    M = torch.randn(mshape, dtype=torch.float64) * 3
    A = B + M
    U, S, V = specfast.svd_lowrank(A, 4, M=M, method=method)
    assert rel_err(S, s[:4]) <= 1e-9
    assert float((_recon(U, S, V) - B).abs().max()) <= 1e-9 * float(s[0])
    # torch agrees on the meaning of M
    Ut, St, Vt = torch.svd_lowrank(A, 4, niter=6, M=M)
    assert rel_err(S, St) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: case_id(dtype=d))
def test_low_precision_input(dtype):
    A, _ = known_spectrum(64, 48, geometric_spectrum(48, 1.0, 0.7), dtype, batch=(2,), seed=5)
    truth = rounded_truth(A)
    U, S, V = specfast.svd_lowrank(A, 4)
    assert S.dtype == torch.float32
    assert rel_err(S, truth[..., :4]) <= TOLERANCES["lowp_vs_rounded"]
    assert _orth_err(U) <= TOLERANCES["orthonormal_fp32"]


def test_numpy_and_strided():
    A, s = known_spectrum(40, 30, geometric_spectrum(3, 1.0, 0.5), torch.float64, seed=6)
    U, S, V = specfast.svd_lowrank(A.numpy(), 3)
    assert all(isinstance(x, np.ndarray) for x in (U, S, V))
    np.testing.assert_allclose(S, s[:3].numpy(), rtol=1e-9)
    E = torch.stack([A, 2 * A, 3 * A])
    U, S, V = specfast.svd_lowrank(E[::2].mT, 3)
    assert rel_err(S, torch.stack([s[:3], 3 * s[:3]])) <= 1e-9
    assert V.shape == (2, 40, 3) and U.shape == (2, 30, 3)


def test_bad_arguments():
    A = torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"svd_lowrank.*\bq\b"):
        specfast.svd_lowrank(A, 7)
    with pytest.raises(ValueError, match=r"svd_lowrank.*\bq\b"):
        specfast.svd_lowrank(A, 0)
    with pytest.raises(ValueError, match=r"svd_lowrank.*method"):
        specfast.svd_lowrank(A, 2, method="lanczos")
    with pytest.raises(ValueError, match=r"svd_lowrank.*niter"):
        specfast.svd_lowrank(A, 2, niter=-1, method="randomized")
    with pytest.raises(ValueError, match=r"svd_lowrank.*\bM\b"):
        specfast.svd_lowrank(A, 2, M=torch.randn(3, 6))
    with pytest.raises(TypeError, match=r"svd_lowrank.*\bA\b"):
        specfast.svd_lowrank([A, A], 2)
    with pytest.raises(TypeError, match=r"svd_lowrank"):
        specfast.svd_lowrank(A.to(torch.int32), 2)
