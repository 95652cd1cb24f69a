"""WeightWatcher-compatible columns, under WeightWatcher's names and conventions (0.7.x).

WeightWatcher works on the eigenvalues λᵢ = σᵢ² of WᵀW (no normalisation by default), so:
  spectral_norm      = λ_max = σ₁²                log_spectral_norm = log10(σ₁²)
  norm               = Σ λᵢ = ‖W‖_F²               log_norm          = log10(‖W‖_F²)
  stable_rank        = norm / spectral_norm       (same as specfast's ‖W‖_F²/σ₁²)
  alpha              = the power-law exponent of the eigenvalue tail, WeightWatcher's own fit
                       (``WWFit``: for every candidate xmin among the sorted eigenvalues > 1e-5,
                       α = 1 + n / Σ ln(λ/xmin) over the n eigenvalues ≥ xmin, and the KS distance
                       D = max |1 − (λ/xmin)^(1−α) − i/n|; the xmin with the smallest D wins)
  alpha_weighted     = alpha · log10(λ_max)       log_alpha_norm    = log10(Σ λᵢ^alpha)
  entropy            = −Σ pᵢ ln pᵢ / ln(rank),  pᵢ = λᵢ/Σλ + 1e-10, rank = #{σᵢ > σ₁·N·eps}
  xmin, xmax, D, sigma (the fit's standard error (α−1)/√n), num_pl_spikes (#λ ≥ xmin),
  num_evals, matrix_rank, rank_loss.
The fit needs every eigenvalue (its xmin search runs over all of them), so alpha comes only
from ``spectrum="full"``.
"""
from __future__ import annotations

import math

import numpy as np

EVALS_THRESH = 1e-5   # WeightWatcher's EVALS_THRESH: eigenvalues at or below are not fitted
EPSILON = 1e-10       # WeightWatcher's EPSILON in matrix_entropy


def cheap_columns(sigma_1: float, frob_sq: float) -> dict:
    """The columns that need only σ₁ and ‖W‖_F²."""
    sn = sigma_1 ** 2
    return dict(spectral_norm=sn, log_spectral_norm=math.log10(sn) if sn > 0 else float("-inf"),
                norm=frob_sq, log_norm=math.log10(frob_sq) if frob_sq > 0 else float("-inf"))


def powerlaw_fit(evals: np.ndarray) -> dict:
    """WeightWatcher's WWFit (pl_package='ww', distribution power_law, xmin and xmax unset),
    vectorised: O(n²) arithmetic in blocks, no Python loop over candidates."""
    data = np.sort(np.asarray(evals, dtype=np.float64))
    data = data[data > EVALS_THRESH]
    n_all = data.size
    if n_all < 2:
        return dict(alpha=-1.0, xmin=-1.0, xmax=-1.0, D=-1.0, sigma=-1.0, num_pl_spikes=-1, fit_status="failed")
    logd = np.log(data)
    suffix = np.cumsum(logd[::-1])[::-1]           # Σ_{j ≥ i} ln x_j
    cand = np.arange(n_all - 1)
    n = (n_all - cand).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + n / (suffix[cand] - n * logd[cand])
    Ds = np.ones(n_all - 1)
    ok = alphas > 1
    # D_i = max_{j ≥ i} |1 − (x_j/x_i)^(1−α_i) − (j − i)/n_i|, in row blocks to bound memory
    idx = np.arange(n_all)
    block = max(1, (1 << 22) // n_all)
    for s in range(0, n_all - 1, block):
        i = cand[s:s + block]
        i = i[ok[i]]
        if i.size == 0:
            continue
        a = alphas[i][:, None]
        below = idx[None, :] < i[:, None]               # x_j < xmin: not part of this candidate's tail
        ratio = np.where(below, 0.0, logd[None, :] - logd[i][:, None])   # ln(x_j / x_i) >= 0
        theo = 1 - np.exp((1 - a) * ratio)
        emp = (idx[None, :] - i[:, None]) / n[i][:, None]
        diff = np.where(below, 0.0, np.abs(theo - emp))
        Ds[i] = diff.max(1)
    best = int(np.argmin(Ds))
    alpha = float(alphas[best])
    xmin = float(data[best])
    return dict(alpha=alpha, xmin=xmin, xmax=float(data[-1]), D=float(Ds[best]),
                sigma=float((alpha - 1) / math.sqrt(n_all - best)),
                num_pl_spikes=int((np.asarray(evals) >= xmin).sum()), fit_status="success")


def spectrum_columns(evals: np.ndarray, shape) -> dict:
    """Every WeightWatcher column from the full eigenvalue list (λᵢ = σᵢ², any order)."""
    lam = np.sort(np.asarray(evals, dtype=np.float64))[::-1]
    N = max(shape)
    sv = np.sqrt(lam)
    tol = sv[0] * N * np.finfo(np.float64).eps if sv.size else 0.0
    rank = int((sv > tol).sum())
    out = dict(num_evals=int(lam.size), matrix_rank=rank, rank_loss=int(lam.size - rank))
    tot = lam.sum()
    if tot > 0 and rank > 0:
        p = lam / tot + EPSILON
        out["entropy"] = float(-(p * np.log(p)).sum() / np.log(rank + EPSILON))
    else:
        out["entropy"] = -1.0
    fit = powerlaw_fit(lam)
    out.update(fit)
    a = fit["alpha"]
    if fit["fit_status"] == "success" and lam[0] > 0:
        out["alpha_weighted"] = a * math.log10(lam[0])
        with np.errstate(over="ignore"):
            out["log_alpha_norm"] = float(np.log10(np.sum(lam[lam > 0] ** a)))
        out["alpha_evals_fitted"] = fit["num_pl_spikes"]
    out["alpha_evals_computed"] = int(lam.size)
    return out
