"""Derived metrics on known spectra: frobenius_norm_sq, stable_rank, spectral_entropy, effective_rank,
condition_number (definitions: GUIDE §4 / docs/metrics.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import specfast
from conftest import TOLERANCES, case_id, geometric_spectrum, known_spectrum, rel_err, rounded_truth


def np_entropy(s) -> float:
    s = np.asarray(s, dtype=np.float64)
    lam = s**2
    if lam.sum() == 0:
        return 0.0
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


SPECTRA = {
    "flat": lambda p: torch.ones(p, dtype=torch.float64),
    "geom": lambda p: geometric_spectrum(p, 2.0, 0.8),
    "powerlaw": lambda p: torch.arange(1, p + 1, dtype=torch.float64) ** -0.7,
    "rank3": lambda p: torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
    "rank1": lambda p: torch.tensor([5.0], dtype=torch.float64),
    "spiked": lambda p: torch.cat([torch.tensor([50.0]), torch.linspace(1, 0.5, p - 1)]).double(),
}


# ------------------------------------------------------------------------------------ frobenius
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_frobenius_norm_sq(dtype):
    W, s = known_spectrum(70, 45, SPECTRA["powerlaw"](45), dtype, batch=(3,), seed=1)
    fro = specfast.frobenius_norm_sq(W)
    assert fro.dtype == torch.float64 and fro.shape == (3,)
    assert rel_err(fro, W.double().square().sum((-2, -1))) <= 1e-13
    if dtype == torch.float64:
        assert rel_err(fro, s.square().sum(-1)) <= 1e-13


def test_frobenius_list_of_mixed_dtypes():
    """Exact small values: ones matrices of different dtypes in one list."""
    mats = [torch.ones(3, 4), torch.ones(2, 2, dtype=torch.float64), torch.ones(5, 1, dtype=torch.bfloat16),
            torch.full((2, 3), 2.0, dtype=torch.float16)]
    expected = torch.tensor([12.0, 4.0, 5.0, 24.0], dtype=torch.float64)
    got = specfast.frobenius_norm_sq(mats)
    assert torch.equal(torch.as_tensor(got), expected), f"got {got.tolist()}, expected {expected.tolist()}"
    sr = specfast.stable_rank(mats)
    assert rel_err(sr, torch.ones(4)) <= 1e-6, f"stable ranks of rank-1 matrices: got {sr.tolist()}"


def test_frobenius_no_overflow_fp32_and_fp64_list():
    W = torch.full((100, 100), 3e30, dtype=torch.float32)   # squares overflow fp32, not fp64
    assert rel_err(specfast.frobenius_norm_sq(W), torch.tensor(1e4 * 9e60, dtype=torch.float64)) <= 1e-6


# ------------------------------------------------------------------------------------ stable rank
@pytest.mark.parametrize("kind", list(SPECTRA), ids=lambda k: f"spectrum={k}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: case_id(dtype=d))
def test_stable_rank(kind, dtype):
    W, s = known_spectrum(80, 60, SPECTRA[kind](60), dtype, seed=2)
    sr = specfast.stable_rank(W)
    sr_true = s.square().sum() / s[0] ** 2
    assert rel_err(sr, sr_true) <= 3 * TOLERANCES["sigma1_fp32"]
    sr2, info = specfast.stable_rank(W, return_info=True)
    assert float(info.error_bound) >= 0
    truth = rounded_truth(W)
    sr_stored = truth.square().sum() / truth[0] ** 2
    assert abs(float(sr2) - float(sr_stored)) <= float(info.error_bound) + float(sr_stored) * (
        torch.finfo(sr2.dtype).eps if sr2.dtype != torch.float64 else 1e-13)


# ------------------------------------------------------------------------------------ entropy
@pytest.mark.parametrize("kind", list(SPECTRA), ids=lambda k: f"spectrum={k}")
@pytest.mark.parametrize("shape", [(80, 60), (60, 80), (2, 40, 33)], ids=lambda s: case_id(shape=s))
def test_entropy_exact_vs_numpy(kind, shape):
    *batch, m, n = shape
    W, s = known_spectrum(m, n, SPECTRA[kind](min(m, n)), torch.float64, batch=tuple(batch), seed=3)
    H, info = specfast.spectral_entropy(W, method="exact", return_info=True)
    assert info.method == "exact"
    Ht = torch.tensor(np.vectorize(lambda i: np_entropy(s.reshape(-1, s.shape[-1])[i].numpy()))(
        np.arange(int(np.prod(batch)) if batch else 1))).reshape(tuple(batch))
    assert H.shape == tuple(batch)
    assert rel_err(H, Ht, scale=torch.clamp(Ht.abs(), min=1.0)) <= TOLERANCES["exact_metric"]
    # auto takes the exact path for small matrices
    assert rel_err(specfast.spectral_entropy(W), H) <= 1e-14
    eff = specfast.effective_rank(W, method="exact")
    assert rel_err(eff, torch.exp(Ht)) <= TOLERANCES["exact_metric"]


@pytest.mark.parametrize("kind", list(SPECTRA), ids=lambda k: f"spectrum={k}")
def test_rank_inequalities(kind):
    """stable_rank <= effective_rank <= rank, with rank the number of nonzero designed values."""
    W, s = known_spectrum(90, 70, SPECTRA[kind](70), torch.float64, seed=4)
    rank = int((s > 0).sum())
    sr = float(specfast.stable_rank(W))
    er = float(specfast.effective_rank(W))
    H = float(specfast.spectral_entropy(W))
    assert er == pytest.approx(math.exp(H), rel=1e-14)
    assert sr <= er * (1 + 1e-9), (sr, er)
    assert er <= rank * (1 + 1e-9), (er, rank)
    if kind == "flat":  # all equal: every notion of rank agrees
        assert sr == pytest.approx(70, rel=1e-6) and er == pytest.approx(70, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: case_id(dtype=d))
def test_zero_matrix_metrics(dtype):
    W = torch.zeros(2, 30, 20, dtype=dtype)
    for fn in (specfast.stable_rank, specfast.spectral_entropy, specfast.effective_rank):
        out = fn(W)
        assert torch.equal(torch.as_tensor(out), torch.zeros(2, dtype=out.dtype)), (fn.__name__, out)
    H = specfast.spectral_entropy(W, method="slq")
    assert torch.equal(H, torch.zeros(2, dtype=H.dtype)), H
    assert torch.equal(specfast.effective_rank(W, method="slq"), torch.zeros(2, dtype=H.dtype))
    for lst in ([W[0], W[1]], [W[0], torch.ones(3, 3)]):
        assert float(torch.as_tensor(specfast.spectral_entropy(lst))[0]) == 0.0
        assert float(torch.as_tensor(specfast.effective_rank(lst))[0]) == 0.0
        assert float(torch.as_tensor(specfast.stable_rank(lst))[0]) == 0.0


def _slq_matrix(kind):
    p = 1200
    if kind == "linear":
        s = torch.linspace(1.0, 0.1, p, dtype=torch.float64)
    elif kind == "with-zeros":
        s = torch.cat([torch.linspace(1.0, 0.1, 900, dtype=torch.float64), torch.zeros(300, dtype=torch.float64)])
    else:
        s = torch.arange(1, p + 1, dtype=torch.float64) ** -0.6
    W, s = known_spectrum(1500, 1200, s, torch.float32, seed=7)
    return W, np_entropy(s.numpy())


@pytest.mark.parametrize("kind", ["linear", "with-zeros", "powerlaw"], ids=lambda k: f"spectrum={k}")
def test_entropy_slq_within_reported_stderr(kind):
    """1500×1200 (above the exact cut-off): SLQ within a few reported standard errors of the truth."""
    W, H_true = _slq_matrix(kind)
    k = TOLERANCES["slq_stderrs"]
    for seed in range(2):
        H, info = specfast.spectral_entropy(W, method="slq", seed=seed, return_info=True)
        assert info.method == "slq"
        se = float(info.stderr)
        # an informative error bar, not a vacuous one (a power law has an inherently large
        # Hutchinson variance: a few eigenvalues dominate tr(A log A))
        assert 0 < se < (0.25 if kind == "powerlaw" else 0.01) * H_true, se
        assert abs(float(H) - H_true) <= k * se, (float(H), H_true, se, (float(H) - H_true) / se)
    # auto picks SLQ above exact_max_dim and the same seed reproduces it
    H_auto = specfast.spectral_entropy(W, seed=0)
    H0, info0 = specfast.spectral_entropy(W, method="slq", seed=0, return_info=True)
    assert float(H_auto) == float(H0)
    eff, einfo = specfast.effective_rank(W, method="slq", seed=0, return_info=True)
    assert float(eff) == pytest.approx(math.exp(float(H0)), rel=1e-6)
    assert float(einfo.stderr) == pytest.approx(float(eff) * float(info0.stderr), rel=1e-6)


def test_entropy_slq_small_matrix_close_to_exact():
    """Small matrix where the Krylov space is the whole space: SLQ quadrature is exact per probe,
    only the Hutchinson error remains, reported by the stderr."""
    W, s = known_spectrum(60, 40, geometric_spectrum(40, 1.0, 0.93), torch.float64, seed=8)
    H_true = np_entropy(s.numpy())
    H, info = specfast.spectral_entropy(W, method="slq", num_probes=64, lanczos_steps=40, return_info=True)
    assert abs(float(H) - H_true) <= TOLERANCES["slq_stderrs"] * float(info.stderr) + 1e-12


# ------------------------------------------------------------------------------------ condition number
COND_CASES = [((60, 40), 10.0), ((40, 60), 100.0), ((150, 150), 1e3), ((600, 530), 50.0), ((3, 30, 20), 20.0)]


@pytest.mark.parametrize("method", ["exact", "krylov", "auto"], ids=lambda m: f"method={m}")
@pytest.mark.parametrize("shape,cond", COND_CASES, ids=lambda v: case_id(shape=v) if isinstance(v, tuple) else f"cond={v:g}")
def test_condition_number_well_conditioned(shape, cond, method):
    *batch, m, n = shape
    p = min(m, n)
    s = torch.logspace(0, -math.log10(cond), p, dtype=torch.float64) * 2.0
    W, s_true = known_spectrum(m, n, s, torch.float64, batch=tuple(batch), seed=9)
    c, info = specfast.condition_number(W, method=method, return_info=True)
    truth = s_true[..., 0] / s_true[..., -1]
    tol = TOLERANCES["exact_metric"] if info.method == "exact" else TOLERANCES["cond_krylov"]
    assert rel_err(c, truth) <= tol
    lo, hi = torch.as_tensor(info.lower), torch.as_tensor(info.upper)
    assert bool((lo <= truth * (1 + 1e-13)).all()), (lo, truth)
    assert bool((truth <= hi * (1 + 1e-13)).all()), (truth, hi)
    assert bool(torch.as_tensor(info.converged).all())
    if method != "auto":
        assert info.method == method


def test_condition_number_fp32_krylov():
    s = torch.linspace(3.0, 0.3, 80, dtype=torch.float64)
    W, s_true = known_spectrum(100, 80, s, torch.float32, seed=10)
    truth = rounded_truth(W)
    c, info = specfast.condition_number(W, method="krylov", return_info=True)
    assert c.dtype == torch.float32
    assert rel_err(c, truth[0] / truth[-1]) <= TOLERANCES["cond_krylov"]
    assert float(info.lower) <= float(truth[0] / truth[-1]) <= float(info.upper)


@pytest.mark.parametrize("method", ["exact", "krylov"], ids=lambda m: f"method={m}")
@pytest.mark.parametrize("shape,rank", [((40, 30), 20), ((30, 40), 29), ((25, 25), 1)], ids=lambda v: case_id(shape=v) if isinstance(v, tuple) else f"rank={v}")
def test_condition_number_rank_deficient_is_inf(shape, rank, method):
    m, n = shape
    s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    W, _ = known_spectrum(m, n, s, torch.float64, seed=11)
    c, info = specfast.condition_number(W, method=method, return_info=True)
    assert float(info.upper) == math.inf, info   # truth (inf) <= upper
    assert float(c) == math.inf, f"condition number of a rank-{rank} {m}x{n} matrix: got {float(c):.4g}, expected inf ({info})"


def test_condition_number_exactly_singular_structure():
    """A zero column makes the matrix exactly singular."""
    W = torch.randn(20, 10, dtype=torch.float64)
    W[:, 3] = 0
    c = specfast.condition_number(W, method="exact")
    assert float(c) == math.inf, float(c)


def test_condition_number_list_and_batch():
    mats = [known_spectrum(30, 20, torch.linspace(4, 1, 20).double(), torch.float64, seed=i)[0] for i in range(3)]
    c = specfast.condition_number(mats)
    assert c.shape == (3,)
    assert rel_err(c, torch.full((3,), 4.0, dtype=torch.float64)) <= 1e-10
    c2 = specfast.condition_number(torch.stack(mats))
    assert rel_err(c2, c) <= 1e-12
