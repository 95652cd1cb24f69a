"""Property fuzzing with hypothesis: random shapes (1 and odd sizes included), batch dims, strides
(slices, transposes), dtypes, values (zeros, rank 1, huge/tiny scales, NaN/Inf). Every entry point
must either return finite, correct results (checked against float64 LAPACK on the same stored
matrix) or, for non-finite input, raise ValueError; nothing else is acceptable.

Deterministic (derandomize=True): the same examples every run, so a failure is reproducible."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specfast

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "row-slice", "col-slice", "batch-slice", "offset"]
KINDS = ["gauss", "zeros", "rank1", "sparse", "const", "orthogonal", "integers"]

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def matrices(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw(st.sampled_from([(), (), (1,), (2,), (3,), (0,), (2, 2)]))
    # mostly small (the Krylov basis then spans the space), sometimes beyond the 32-vector basis cap
    # so that restarts and early stopping are exercised too
    size = st.one_of(st.integers(1, 23), st.integers(1, 23), st.integers(24, 90))
    m = draw(size)
    n = draw(size)
    layout = draw(st.sampled_from(LAYOUTS))
    kind = draw(st.sampled_from(KINDS))
    exp = draw(st.integers(-30, 30))
    bad = draw(st.sampled_from([None] * 6 + ["nan", "inf", "-inf"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # the stored tensor is larger than the view for the strided layouts
    M, N, B = m, n, batch
    if layout == "row-slice":
        M = 2 * m
    elif layout == "col-slice":
        N = 3 * n
    elif layout == "transposed":
        M, N = n, m
    elif layout == "batch-slice" and batch:
        B = (2 * batch[0], *batch[1:])
    elif layout == "offset":
        M, N = m + 2, n + 3
    shape = (*B, M, N)
    if kind == "gauss":
        X = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "zeros":
        X = torch.zeros(shape, dtype=torch.float64)
    elif kind == "rank1":
        X = torch.randn((*B, M, 1), generator=g, dtype=torch.float64) * torch.randn((*B, 1, N), generator=g, dtype=torch.float64)
    elif kind == "sparse":
        X = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.1)
    elif kind == "const":
        X = torch.full(shape, 0.7, dtype=torch.float64)
    elif kind == "orthogonal":  # all singular values equal: maximal multiplicity
        Q = torch.linalg.qr(torch.randn((*B, max(M, N), min(M, N)), generator=g, dtype=torch.float64)).Q
        X = Q if M >= N else Q.mT
    else:
        X = torch.randint(-3, 4, shape, generator=g).to(torch.float64)
    X = (X * 10.0**exp).to(dtype)
    if layout == "row-slice":
        W = X[..., ::2, :]
    elif layout == "col-slice":
        W = X[..., :, ::3]
    elif layout == "transposed":
        W = X.mT
    elif layout == "batch-slice" and batch:
        W = X[::2]
    elif layout == "offset":
        W = X[..., 1:m + 1, 2:n + 2]
    else:
        W = X
    assert W.shape == (*batch, m, n), (W.shape, batch, m, n, layout)
    if bad is not None and W.numel():
        idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in W.shape)
        W[idx] = float(bad)  # writes through the view into the stored tensor
    return W, dict(dtype=str(dtype), batch=batch, m=m, n=n, layout=layout, kind=kind, exp=exp, bad=bad, seed=seed)


def _truth(W):
    return torch.linalg.svdvals(W.detach().to(torch.float64))


def _finite(W):
    return bool(torch.isfinite(W).all())


def _call(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged warnings: results checked below
        return fn(*args, **kw)


def _expect_raise_or_check(W, desc, run, check):
    if not _finite(W):
        with pytest.raises(ValueError, match=r"NaN|Inf"):
            run()
        return
    out = run()
    check(out)


def _rel(a, b, scale):
    a = torch.as_tensor(a).to(torch.float64)
    b = torch.as_tensor(b).to(torch.float64)
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / scale).max())


@settings(FUZZ, max_examples=120)
@given(matrices())
def test_fuzz_spectral_norm(case):
    W, desc = case
    s = _truth(W) if _finite(W) else None

    def check(sig):
        assert sig.shape == W.shape[:-2], desc
        assert bool(torch.isfinite(sig).all()), (desc, sig)
        s1 = s[..., 0]
        # the float64 matrix_norm of the same stored matrix is the oracle
        ref = torch.linalg.matrix_norm(W.to(torch.float64), ord=2)
        assert torch.allclose(ref, s1, rtol=1e-12, atol=0)
        scale = s1.clamp_min(1e-300)
        assert _rel(sig, s1, scale) <= 1e-6 or bool(((sig == 0) & (s1 == 0)).all()), (desc, sig, s1)

    _expect_raise_or_check(W, desc, lambda: _call(specfast.spectral_norm, W), check)


@settings(FUZZ, max_examples=100)
@given(matrices(), st.integers(1, 8))
def test_fuzz_svdvals_topk(case, k):
    W, desc = case
    m, n = W.shape[-2:]
    k = min(k, m, n)
    s = _truth(W) if _finite(W) else None

    def check(vals):
        assert vals.shape == (*W.shape[:-2], k), desc
        assert bool(torch.isfinite(vals).all()), (desc, vals)
        scale = s[..., :1].clamp_min(1e-300)
        assert _rel(vals, s[..., :k], scale) <= 1e-5, (desc, vals, s[..., :k])

    _expect_raise_or_check(W, desc, lambda: _call(specfast.svdvals, W, k), check)


@settings(FUZZ, max_examples=80)
@given(matrices())
def test_fuzz_exact_and_metrics(case):
    W, desc = case
    s = _truth(W) if _finite(W) else None

    def run():
        return (_call(specfast.svdvals, W), _call(specfast.frobenius_norm_sq, W), _call(specfast.stable_rank, W),
                _call(specfast.spectral_entropy, W))

    def check(out):
        vals, fro, sr, H = out
        scale = s[..., :1].clamp_min(1e-300)
        assert _rel(vals, s, scale) <= 1e-6, desc
        fro_t = W.to(torch.float64).square().sum((-2, -1))
        assert _rel(fro, fro_t, fro_t.clamp_min(1e-300)) <= 1e-12, desc
        sr_t = torch.where(s[..., 0] > 0, fro_t / s[..., 0].clamp_min(1e-300) ** 2, torch.zeros_like(fro_t))
        assert bool(torch.isfinite(sr).all()), desc
        assert _rel(sr, sr_t, sr_t.clamp_min(1e-300)) <= 1e-5 or bool(((sr == 0) & (sr_t == 0)).all()), (desc, sr, sr_t)
        lam = s.square()
        tot = lam.sum(-1, keepdim=True)
        p = torch.where(tot > 0, lam / tot.clamp_min(1e-300), torch.zeros_like(lam))
        H_t = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(-1)
        assert _rel(H, H_t, 1.0) <= 1e-6, (desc, H, H_t)
        rank = min(W.shape[-2:])
        assert bool((torch.as_tensor(H) <= math.log(max(rank, 1)) + 1e-6).all()), desc

    _expect_raise_or_check(W, desc, run, check)


@settings(FUZZ, max_examples=80)
@given(matrices(), st.integers(1, 3), st.booleans())
def test_fuzz_gram_matvec(case, c, vector):
    W, desc = case
    g = torch.Generator().manual_seed(desc["seed"])
    n = W.shape[-1]
    v = torch.randn(*W.shape[:-2], n, *(() if vector else (c,)), generator=g, dtype=torch.float64)
    Y = _call(specfast.gram_matvec, W, v)
    assert Y.shape == v.shape and Y.dtype == torch.float64, desc
    if not _finite(W):
        return  # NaN propagation is checked in test_gram_matvec.py
    Wd = W.to(torch.float64)
    X = v.unsqueeze(-1) if vector else v
    T = Wd.mT @ (Wd @ X)
    T = T.squeeze(-1) if vector else T
    scale = (Wd.square().sum((-2, -1)).max() * v.norm()).clamp_min(1e-300) if Y.numel() else 1.0
    assert _rel(Y, T, scale) <= 1e-12, desc


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(["spectral_norm", "svdvals", "stable_rank", "frobenius_norm_sq", "spectral_entropy",
                        "condition_number"]),
       st.sampled_from([torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
                        torch.uint8]),
       st.sampled_from([(3, 4), (1, 1), (2, 5, 3), (0, 2, 2)]))
def test_fuzz_bad_dtypes_raise_type_error(fn, dtype, shape):
    W = torch.zeros(shape, dtype=dtype)
    with pytest.raises(TypeError, match=rf"^{fn}:"):
        getattr(specfast, fn)(W)
