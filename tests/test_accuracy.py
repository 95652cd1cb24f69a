"""Accuracy of spectral_norm / svdvals against matrices with known spectra, and the certificates.

Truths: the designed spectrum s (W = U diag(s) Vᵀ built in float64), and, for certificates and
low-precision inputs, the float64 LAPACK spectrum of W exactly as stored (``rounded_truth``).
"""
from __future__ import annotations


import pytest
import torch

import specfast
from specfast import ops
from conftest import (LOWP, TOLERANCES, case_id, geometric_spectrum, known_spectrum, rel_err,
                      rounded_truth)

# ------------------------------------------------------------------------------------ spectra
SPECTRA = {
    # geometric decay, relative gaps 10%
    "geom": lambda p: geometric_spectrum(p, 1.0, 0.9),
    # slowly decaying power law, like trained weights: s_i = i^-0.5
    "powerlaw": lambda p: torch.arange(1, p + 1, dtype=torch.float64) ** -0.5,
    # flat bulk in [0.5, 1] with every relative gap around 1/(2p)
    "linear": lambda p: torch.linspace(1.0, 0.5, p, dtype=torch.float64),
    # a 1e-3 relative gap between each of the top 20, then a bulk well below
    "gap1e-3": lambda p: torch.cat([geometric_spectrum(min(p, 20), 3.0, 0.999),
                                    torch.linspace(1.0, 0.01, max(p - 20, 0), dtype=torch.float64)]),
    # sigma_2 / sigma_1 = 0.999 on top of a random-like bulk
    "ratio0.999": lambda p: torch.cat([torch.tensor([1.0, 0.999], dtype=torch.float64),
                                       torch.linspace(0.9, 0.0, max(p - 2, 0), dtype=torch.float64)]),
    # ill-conditioned: 12 decades
    "illcond": lambda p: torch.logspace(0, -12, p, dtype=torch.float64),
}

FP32_CASES = [
    ((64, 48), "geom"), ((48, 64), "powerlaw"), ((200, 300), "linear"), ((41, 401), "gap1e-3"),
    ((513, 130), "ratio0.999"), ((257, 257), "illcond"), ((3, 97, 61), "powerlaw"),
    ((2, 130, 67), "gap1e-3"), ((301, 33), "linear"), ((33, 301), "ratio0.999"),
]


def _spectrum(kind, p, batch=()):
    return SPECTRA[kind](p)


def _make(shape, kind, dtype, seed=0):
    *batch, m, n = shape
    return known_spectrum(m, n, _spectrum(kind, min(m, n)), dtype, batch=tuple(batch), seed=seed)


def assert_bound_holds(values, bound, truth, where="", allow_output_rounding=False):
    """|value - truth| <= bound + float64 reference rounding (1e-13 sigma_1), elementwise.

    ``allow_output_rounding``: also allow half an ulp of the value's own dtype (fp32 results of
    fp32/fp16/bf16 inputs). The acceptance tests ``test_*_error_bound_holds`` never pass it: there
    the certificate must cover the value handed back. Other tests pass it so that they check the
    certificate maths under hard conditions without repeating that one acceptance check.
    """
    vt = torch.as_tensor(values)
    half_ulp = 0.0
    if allow_output_rounding and vt.dtype != torch.float64:
        half_ulp = torch.finfo(vt.dtype).eps / 2 * vt.detach().to(torch.float64).abs().cpu()
    values = vt.detach().to(torch.float64).cpu()
    bound = torch.as_tensor(bound).to(torch.float64).cpu()
    truth = torch.as_tensor(truth).to(torch.float64).cpu()
    s1 = truth[..., :1] if truth.ndim and truth.shape[-1] else truth
    slack = TOLERANCES["ref_rounding"] * (s1 if truth.ndim else truth) + half_ulp
    err = (values - truth).abs()
    bad = ~(err <= bound + slack)
    assert not bool(bad.any()), (
        f"{where}: error bound violated: |value - truth| = {err[bad].tolist()} > bound "
        f"{bound.expand_as(err)[bad].tolist()} (values {values[bad].tolist()}, truth {truth[bad].tolist()})")


# ------------------------------------------------------------------------------------ fp32
@pytest.mark.parametrize("shape,kind", [pytest.param(s, k, id=case_id(dtype=torch.float32, shape=s, spectrum=k))
                                        for s, k in FP32_CASES])
def test_spectral_norm_fp32_default_tol(shape, kind):
    W, s = _make(shape, kind, torch.float32)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.dtype == torch.float32 and sig.shape == W.shape[:-2]
    # the oracle: rounding W to fp32 barely moves the designed spectrum
    truth = rounded_truth(W)
    assert rel_err(truth[..., 0], s[..., 0]) <= TOLERANCES["fp32_rounding_of_W"]
    assert rel_err(sig, s[..., 0]) <= TOLERANCES["sigma1_fp32"]
    assert rel_err(sig, truth[..., 0]) <= TOLERANCES["sigma1_fp32"]
    assert bool(torch.as_tensor(info.converged).all())
    assert bool((torch.as_tensor(info.status) == 0).all())
    assert info.method == "krylov"
    assert bool((torch.as_tensor(info.iterations) >= 1).all())


@pytest.mark.parametrize("shape,kind", [pytest.param(s, k, id=case_id(dtype=torch.float32, shape=s, spectrum=k))
                                        for s, k in FP32_CASES])
def test_spectral_norm_fp32_error_bound_holds(shape, kind):
    """The certificate bounds the error of the value handed back to the caller."""
    W, _ = _make(shape, kind, torch.float32)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert_bound_holds(sig, info.error_bound, rounded_truth(W)[..., 0], "spectral_norm")


@pytest.mark.parametrize("shape,kind", [pytest.param(s, k, id=case_id(dtype=torch.float32, shape=s, spectrum=k))
                                        for s, k in FP32_CASES])
@pytest.mark.parametrize("k", [1, 4], ids=lambda k: f"k={k}")
def test_krylov_certificate_holds_in_float64(shape, kind, k):
    """The solver's float64 estimate (before the result is cast to the output dtype) is within
    its certificate: separates the certificate maths from output rounding. Parameters as the
    public API picks them (block min(k, 4), basis 32, tol 1e-6)."""
    W, _ = _make(shape, kind, torch.float32)
    k = min(k, *W.shape[-2:])
    block = 1 if k == 1 else min(k, 4)
    S, bound, iters, conv, status, _, _ = ops.krylov_svd_op(W, k, block, 32, 1000, 1e-6, True, False, 0)
    assert S.dtype == torch.float64
    assert_bound_holds(S, bound, rounded_truth(W)[..., :k], "krylov_svd_op")
    assert bool(conv.all())


def _topk_spectrum(p):
    # 17 values with relative gaps >= 1e-3, then a bulk below
    top = geometric_spectrum(min(p, 17), 2.0, 0.999)
    return torch.cat([top, torch.linspace(1.5, 0.05, p - top.numel(), dtype=torch.float64)])


TOPK_CASES = [(160, 120, "gap1e-3"), (300, 200, "geom"), (77, 260, "gap1e-3"), (200, 200, "powerlaw"),
              (2, 90, 70, "gap1e-3")]


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(dtype=torch.float32, shape=c[:-1], spectrum=c[-1]))
                                  for c in TOPK_CASES])
def test_svdvals_top16_fp32(case):
    *shape, kind = case
    *batch, m, n = shape
    s = _topk_spectrum(min(m, n)) if kind == "gap1e-3" else SPECTRA[kind](min(m, n))
    W, s_true = known_spectrum(m, n, s, torch.float32, batch=tuple(batch), seed=3)
    gaps = (s_true[..., :16] - s_true[..., 1:17]) / s_true[..., :16]
    assert bool((gaps >= 1e-3 - 1e-12).all()), "test setup: the spectrum must have relative gaps >= 1e-3"
    vals, info = specfast.svdvals(W, 16, return_info=True)
    assert vals.shape == (*batch, 16) and vals.dtype == torch.float32
    assert rel_err(vals, s_true[..., :16]) <= TOLERANCES["topk_fp32"]
    assert bool((vals[..., :-1] >= vals[..., 1:]).all()), "values must be sorted descending"
    assert bool(torch.as_tensor(info.converged).all())


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(dtype=torch.float32, shape=c[:-1], spectrum=c[-1]))
                                  for c in TOPK_CASES])
def test_svdvals_top16_fp32_error_bound_holds(case):
    *shape, kind = case
    *batch, m, n = shape
    s = _topk_spectrum(min(m, n)) if kind == "gap1e-3" else SPECTRA[kind](min(m, n))
    W, s_true = known_spectrum(m, n, s, torch.float32, batch=tuple(batch), seed=3)
    vals, info = specfast.svdvals(W, 16, return_info=True)
    assert_bound_holds(vals, info.error_bound, rounded_truth(W)[..., :16], "svdvals(k=16)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: case_id(dtype=d))
def test_svdvals_exact_path(dtype):
    W, s = known_spectrum(70, 50, SPECTRA["powerlaw"](50), dtype, seed=5)
    vals, info = specfast.svdvals(W, return_info=True)
    assert vals.shape == (50,)
    tol = TOLERANCES["fp32_rounding_of_W"] if dtype == torch.float32 else 1e-12
    assert rel_err(vals, s, scale=s[0]) <= tol
    assert info.method == "exact"
    if dtype == torch.float64:
        assert_bound_holds(vals, info.error_bound, rounded_truth(W), "svdvals(k=None)")


def test_fp64_default_tol():
    W, s = known_spectrum(150, 90, SPECTRA["linear"](90), torch.float64, seed=9)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.dtype == torch.float64
    assert rel_err(sig, s[0]) <= TOLERANCES["sigma_fp64"]
    assert_bound_holds(sig, info.error_bound, s[0], "spectral_norm fp64 vs designed")
    vals, info = specfast.svdvals(W, 5, tol=1e-10, return_info=True)
    assert rel_err(vals, s[:5]) <= 1e-10
    assert_bound_holds(vals, info.error_bound, s[:5], "svdvals fp64 tol=1e-10")


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9, 1e-12], ids=lambda t: f"tol={t:g}")
def test_tolerance_is_honoured_fp64(tol):
    W, s = known_spectrum(220, 180, SPECTRA["linear"](180), torch.float64, seed=11)
    sig, info = specfast.spectral_norm(W, tol=tol, return_info=True)
    assert bool(info.converged)
    assert float(info.error_bound) <= tol * float(sig) * 1.0000001 + 1e-13
    assert rel_err(sig, s[0]) <= tol
    assert_bound_holds(sig, info.error_bound, s[0], f"tol={tol}")


def test_unconverged_is_reported_not_hidden():
    W, s = known_spectrum(300, 260, SPECTRA["linear"](260), torch.float64, seed=12)
    with pytest.warns(RuntimeWarning, match="spectral_norm"):
        sig, info = specfast.spectral_norm(W, tol=1e-12, max_iter=2, return_info=True)
    assert not bool(info.converged)
    assert int(info.iterations) <= 2 + 1
    # even unconverged, the bound must hold
    assert_bound_holds(sig, info.error_bound, s[0], "unconverged")


# ------------------------------------------------------------------------------------ low precision
LOWP_CASES = [((96, 80), "geom"), ((41, 401), "powerlaw"), ((257, 129), "linear"), ((4, 33, 65), "gap1e-3"),
              ((130, 130), "ratio0.999")]


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape,kind", [pytest.param(s, k, id=case_id(shape=s, spectrum=k)) for s, k in LOWP_CASES])
def test_low_precision_matches_rounded_matrix(dtype, shape, kind):
    W, _ = _make(shape, kind, dtype, seed=2)
    truth = rounded_truth(W)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.dtype == torch.float32
    assert rel_err(sig, truth[..., 0]) <= TOLERANCES["lowp_vs_rounded"]
    assert bool(torch.as_tensor(info.converged).all())
    k = 6
    vals, info = specfast.svdvals(W, k, return_info=True)
    assert vals.dtype == torch.float32
    assert rel_err(vals, truth[..., :k], scale=truth[..., :1]) <= TOLERANCES["lowp_vs_rounded"]


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape,kind", [pytest.param(s, k, id=case_id(shape=s, spectrum=k)) for s, k in LOWP_CASES])
def test_low_precision_error_bound_holds(dtype, shape, kind):
    W, _ = _make(shape, kind, dtype, seed=2)
    truth = rounded_truth(W)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert_bound_holds(sig, info.error_bound, truth[..., 0], f"spectral_norm {dtype}")
    vals, info = specfast.svdvals(W, 6, return_info=True)
    assert_bound_holds(vals, info.error_bound, truth[..., :6], f"svdvals {dtype}")


# ------------------------------------------------------------------------------------ hard cases
@pytest.mark.parametrize("mult", [2, 3], ids=lambda r: f"mult={r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: case_id(dtype=d))
def test_spectral_norm_multiple_top_value(mult, dtype):
    p = 60
    s = torch.cat([torch.full((mult,), 2.0), torch.linspace(1.9, 0.1, p - mult)]).double()
    W, s_true = known_spectrum(90, p, s, dtype, seed=13 + mult)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert rel_err(sig, 2.0) <= TOLERANCES["sigma1_fp32"]
    assert_bound_holds(sig, info.error_bound, rounded_truth(W)[0], f"multiplicity {mult}", allow_output_rounding=True)


@pytest.mark.parametrize("mult,k,block", [(2, 2, None), (3, 3, None), (3, 4, None), (4, 4, None), (4, 6, None),
                                          (2, 5, 2), (3, 3, 3)],
                         ids=lambda v: str(v))
def test_svdvals_resolves_multiplicity_up_to_block(mult, k, block):
    """Default block min(k, 4): a multiplicity up to the block size is fully resolved."""
    p = 70
    s = torch.cat([torch.full((mult,), 3.0), torch.linspace(2.5, 0.1, p - mult)]).double()
    W, s_true = known_spectrum(100, p, s, torch.float64, seed=17 + 10 * mult + k)
    vals, info = specfast.svdvals(W, k, block_size=block, return_info=True)
    assert rel_err(vals, s_true[:k], scale=s_true[0]) <= TOLERANCES["sigma_fp64"], (vals, s_true[:k])
    assert_bound_holds(vals, info.error_bound, s_true[:k], f"mult={mult} k={k}")
    assert bool(info.converged)


def test_ratio_0999_fp32():
    s = torch.cat([torch.tensor([1.0, 0.999]), torch.rand(198, generator=torch.Generator().manual_seed(1)) * 0.99]).double()
    W, s_true = known_spectrum(400, 200, s, torch.float32, seed=21)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert rel_err(sig, 1.0) <= TOLERANCES["sigma1_fp32"]
    assert_bound_holds(sig, info.error_bound, rounded_truth(W)[0], "ratio 0.999", allow_output_rounding=True)
    vals = specfast.svdvals(W, 2)
    assert rel_err(vals, s_true[:2]) <= TOLERANCES["sigma1_fp32"] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_rank_one(dtype):
    W, s_true = known_spectrum(50, 40, [5.0], dtype, seed=23)
    truth = rounded_truth(W)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert rel_err(sig, truth[0]) <= TOLERANCES["sigma1_fp32"]
    assert_bound_holds(sig, info.error_bound, truth[0], "rank one", allow_output_rounding=True)
    vals, info = specfast.svdvals(W, 3, return_info=True)
    assert torch.isfinite(vals).all()
    assert rel_err(vals, truth[:3], scale=truth[0]) <= TOLERANCES["sigma1_fp32"]
    assert_bound_holds(vals, info.error_bound, truth[:3], "rank one svdvals", allow_output_rounding=True)


@pytest.mark.parametrize("shape", [(1, 1), (5, 4), (4, 5), (1, 9), (9, 1), (3, 17, 5), (2, 1, 1)], ids=lambda s: case_id(shape=s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_all_zero(shape, dtype):
    W = torch.zeros(shape, dtype=dtype)
    batch = shape[:-2]
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.shape == batch and bool((sig == 0).all()), sig
    assert not bool(torch.isnan(torch.as_tensor(info.error_bound)).any())
    assert bool((torch.as_tensor(info.status) == 0).all())
    k = min(shape[-2:])
    vals = specfast.svdvals(W, k)
    assert vals.shape == (*batch, k) and bool((vals == 0).all()), vals
    assert bool((specfast.svdvals(W) == 0).all())
    assert bool((specfast.stable_rank(W) == 0).all())
    assert bool((specfast.spectral_entropy(W) == 0).all())
    assert bool((specfast.effective_rank(W) == 0).all())
    assert bool((specfast.frobenius_norm_sq(W) == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: case_id(dtype=d))
@pytest.mark.parametrize("shape", [(1, 1), (1, 257), (257, 1), (1, 2), (2, 1), (4, 1, 33), (4, 33, 1)], ids=lambda s: case_id(shape=s))
def test_vectors_and_scalars(shape, dtype):
    """1×n, n×1, 1×1: sigma_1 is the Euclidean norm of the only row / column."""
    W = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    truth = W.double().flatten(-2).norm(dim=-1)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.shape == shape[:-2]
    assert rel_err(sig, truth) <= TOLERANCES["sigma1_fp32"]
    assert_bound_holds(sig, info.error_bound, truth, "vector", allow_output_rounding=True)
    vals = specfast.svdvals(W, 1)
    assert vals.shape == (*shape[:-2], 1)
    assert rel_err(vals[..., 0], truth) <= TOLERANCES["sigma1_fp32"]
    assert rel_err(specfast.stable_rank(W), torch.ones_like(truth)) <= 1e-5
    assert rel_err(specfast.frobenius_norm_sq(W), truth**2) <= 1e-12


def test_one_by_one_values():
    for x in [3.0, -2.5, 0.0, 1e-30, 1e30]:
        W = torch.tensor([[x]], dtype=torch.float32)
        assert float(specfast.spectral_norm(W)) == pytest.approx(abs(float(W)), rel=1e-6, abs=0)


@pytest.mark.parametrize("shape", [(0, 5, 4), (0, 1, 1), (2, 0, 5, 4), (3, 0, 4), (3, 4, 0)], ids=lambda s: case_id(shape=s))
def test_empty(shape):
    W = torch.zeros(shape)
    batch = shape[:-2]
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert sig.shape == batch
    assert sig.dtype == torch.float32
    assert bool((sig == 0).all())  # an empty stack has no values; an empty matrix has norm 0
    k = 1
    if min(shape[-2:]) >= 1:
        vals = specfast.svdvals(W, k)
        assert vals.shape == (*batch, k)
    assert specfast.frobenius_norm_sq(W).shape == batch
    assert specfast.stable_rank(W).shape == batch


def test_batch_mixing_extreme_scales_fp32():
    """One stack, matrices scaled by 1e-30 ... 1e30 (fp32): each gets its own relative accuracy."""
    scales = [1e-30, 1e-20, 1.0, 1e20, 1e30, 1e-30]
    mats = []
    for i, c in enumerate(scales):
        W, s = known_spectrum(60, 45, SPECTRA["geom"](45) * c, torch.float64, seed=30 + i)
        mats.append(W)
    E = torch.stack(mats).to(torch.float32)
    truth = rounded_truth(E)
    sig, info = specfast.spectral_norm(E, return_info=True)
    assert rel_err(sig, truth[:, 0]) <= TOLERANCES["sigma1_fp32"], (sig, truth[:, 0])
    assert_bound_holds(sig, info.error_bound, truth[:, 0], "mixed scales", allow_output_rounding=True)
    vals = specfast.svdvals(E, 3)
    assert rel_err(vals, truth[:, :3]) <= TOLERANCES["topk_fp32"]
    sr = specfast.stable_rank(E)
    sr_true = truth.square().sum(-1) / truth[:, 0] ** 2
    assert rel_err(sr, sr_true) <= 1e-5


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-160, 1e-150, 1e150, 1e160, 1e200, 1e300],
                         ids=lambda c: f"scale={c:g}")
def test_fp64_extreme_scales(scale):
    """A finite float64 matrix at any scale has a finite sigma_1 (torch.linalg.matrix_norm gets it);
    the result must be correct (or at the very least not a wrong value reported as converged)."""
    W, s = known_spectrum(30, 20, SPECTRA["geom"](20), torch.float64, seed=41)
    Ws = W * scale
    assert torch.isfinite(Ws).all()
    sig, info = specfast.spectral_norm(Ws, return_info=True)
    assert rel_err(sig, s[0] * scale) <= TOLERANCES["sigma_fp64"], (
        f"sigma_1 of W*{scale:g}: got {float(sig):.6e}, expected {float(s[0] * scale):.6e}; "
        f"converged={bool(info.converged)} bound={float(info.error_bound):.3e} status={int(info.status)}")


@pytest.mark.parametrize("width", [2.5e-4, 1e-3], ids=lambda w: f"width={w:g}")
@pytest.mark.parametrize("shape", [(24, 25), (25, 24), (33, 34), (34, 33), (60, 40), (200, 150)],
                         ids=lambda s: case_id(dtype=torch.float64, shape=s))
def test_clustered_spectrum(shape, width):
    """All singular values within ±width of 1 (e.g. an orthogonal-like layer): sigma_1 to tol and a
    valid certificate. Neighbouring Ritz values are far from converged early on, so a gap taken from
    them overestimates the true gap."""
    m, n = shape
    s = 1 + torch.linspace(width, -width, min(m, n), dtype=torch.float64)
    W, s_true = known_spectrum(m, n, s, torch.float64, seed=0)
    sig, info = specfast.spectral_norm(W, return_info=True)
    assert_bound_holds(sig, info.error_bound, s_true[0], f"clustered {shape}")
    assert rel_err(sig, s_true[0]) <= TOLERANCES["sigma_fp64"], (float(sig), float(s_true[0]), info)
