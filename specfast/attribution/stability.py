"""Stability of gradient attributions under input perturbations, and its link to the input-Jacobian
spectra of ``specfast.stability.analyze`` (docs/attribution.md §2-§4).

Perturbations are drawn in a fixed order from one generator: the j-th perturbation of the batch is
``perturb(x, eps, kind, generator=generator)`` for j = 0, 1, …, so ``max_sensitivity`` and
``attribution_stability`` called with generators in the same state see the same perturbed inputs.
Every per-sample metric returns float64 [B]; their zero-norm and tie conventions are in the docs.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .methods import (METHODS, _check_fkw, _check_int, _check_nonneg, _check_output, _check_x, _normal,
                      _resolve_target)

__all__ = ["perturb", "relative_l2", "cosine_similarity", "topk_overlap", "spearman", "max_sensitivity",
           "attribution_stability", "spectral_link", "attribution_spectra", "PERTURBATIONS"]

PERTURBATIONS = ("gaussian", "linf", "l2")


# ------------------------------------------------------------------------------------ perturbations
def _check_generator(generator, fname: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fname}: generator must be a torch.Generator or None; got {type(generator).__name__}")


def _check_kind(kind, fname: str) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"{fname}: kind must be one of {list(PERTURBATIONS)}; got {kind!r}")


def perturb(x: Tensor, eps: float, kind: str = "linf", *, generator: torch.Generator | None = None) -> Tensor:
    """x + δ with δ drawn per sample:

    - ``"gaussian"``: δ ~ N(0, eps² I);
    - ``"linf"``: uniform in the L∞ ball of radius eps, each coordinate U[−eps, eps] independently
      (Captum's default perturbation for sensitivity_max);
    - ``"l2"``: uniform in the L2 ball of radius eps in R^d (d = elements per sample): direction
      g/‖g‖ with g ~ N(0, I), radius eps·U^{1/d}.

    Draws are made in x's dtype (fp32 for half precision), on the generator's device.
    """
    fname = "perturb"
    x = _check_x(x, fname)
    eps = _check_nonneg(eps, "eps", fname)
    _check_kind(kind, fname)
    _check_generator(generator, fname)
    dd = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    gdev = generator.device if generator is not None else x.device
    if kind == "gaussian":
        delta = eps * _normal(x.shape, dd, gdev, generator)
    elif kind == "linf":
        delta = (2 * torch.rand(x.shape, generator=generator, dtype=dd, device=gdev) - 1) * eps
    else:
        B = x.shape[0]
        d = x[0].numel() if B else 1
        g = _normal(x.shape, dd, gdev, generator).reshape(B, -1)
        u = torch.rand(B, generator=generator, dtype=torch.float64, device=gdev)
        radius = eps * u.pow(1.0 / max(d, 1))
        norm = torch.linalg.vector_norm(g.double(), dim=1)
        scale = torch.where(norm > 0, radius / norm.clamp_min(1e-300), torch.zeros_like(norm))
        delta = (g.double() * scale[:, None]).to(dd).reshape(x.shape)
    return x + delta.to(device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------------ metrics
def _pair(a, b, fname: str) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor):
        a = torch.as_tensor(a)
    if not isinstance(b, Tensor):
        b = torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"{fname}: a and b must have the same shape [B, ...]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1:
        raise ValueError(f"{fname}: a and b must have a batch dimension, shape [B, ...]; got shape {tuple(a.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{fname}: {name} must be real-valued; got dtype {t.dtype}")
    B = a.shape[0]
    return a.detach().reshape(B, -1).double(), b.detach().reshape(B, -1).to(a.device).double()


def relative_l2(a, b) -> Tensor:
    """‖b − a‖₂ / ‖a‖₂ per sample (flattened). ‖a‖ = 0: 0 if b == a, else inf."""
    A, Bm = _pair(a, b, "relative_l2")
    num = torch.linalg.vector_norm(Bm - A, dim=1)
    den = torch.linalg.vector_norm(A, dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300),
                       torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))


def cosine_similarity(a, b) -> Tensor:
    """⟨a, b⟩ / (‖a‖ ‖b‖) per sample, clamped to [−1, 1]. Both zero: 1; exactly one zero: 0."""
    A, Bm = _pair(a, b, "cosine_similarity")
    na, nb = torch.linalg.vector_norm(A, dim=1), torch.linalg.vector_norm(Bm, dim=1)
    # normalise first: no overflow or underflow of the product of norms
    c = ((A / na.clamp_min(1e-300)[:, None]) * (Bm / nb.clamp_min(1e-300)[:, None])).sum(1).clamp(-1, 1)
    both0, one0 = (na == 0) & (nb == 0), (na == 0) ^ (nb == 0)
    return torch.where(both0, torch.ones_like(c), torch.where(one0, torch.zeros_like(c), c))


def _topk_index(v: Tensor, k: int) -> Tensor:
    # stable descending sort: ties broken by the lower flattened index
    return torch.sort(v.abs(), dim=1, descending=True, stable=True).indices[:, :k]


def topk_overlap(a, b, k: int) -> Tensor:
    """|top_k(|a|) ∩ top_k(|b|)| / k per sample (flattened); ties in |·| are broken by the lower
    flattened index; k larger than the number of features d is clamped to d."""
    fname = "topk_overlap"
    k = _check_int(k, "k", fname)
    A, Bm = _pair(a, b, fname)
    B, d = A.shape
    if d == 0:
        return torch.ones(B, dtype=torch.float64, device=A.device)
    k = min(k, d)
    ia, ib = _topk_index(A, k), _topk_index(Bm, k)
    ma = torch.zeros(B, d, dtype=torch.bool, device=A.device).scatter_(1, ia, True)
    mb = torch.zeros(B, d, dtype=torch.bool, device=A.device).scatter_(1, ib, True)
    return (ma & mb).sum(1).double() / k


def _average_ranks(v: Tensor) -> Tensor:
    """1-based ranks along dim 1, tied values get the average of their ranks (float64)."""
    s, order = torch.sort(v, dim=1, stable=True)
    s = s.contiguous()
    lo = torch.searchsorted(s, s, right=False)
    hi = torch.searchsorted(s, s, right=True)
    avg = (lo + hi - 1).double() / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def _corr_rows(X: Tensor, Y: Tensor) -> Tensor:
    """Pearson correlation per row; both rows constant: 1; exactly one constant: 0."""
    xc, yc = X - X.mean(1, keepdim=True), Y - Y.mean(1, keepdim=True)
    sx, sy = torch.linalg.vector_norm(xc, dim=1), torch.linalg.vector_norm(yc, dim=1)
    r = ((xc / sx.clamp_min(1e-300)[:, None]) * (yc / sy.clamp_min(1e-300)[:, None])).sum(1).clamp(-1, 1)
    return torch.where((sx == 0) & (sy == 0), torch.ones_like(r), torch.where((sx == 0) | (sy == 0), torch.zeros_like(r), r))


def spearman(a, b) -> Tensor:
    """Spearman rank correlation of the flattened attributions per sample: the Pearson correlation of
    their ranks, tied values getting the average of their ranks (as scipy.stats.spearmanr). A
    constant sample (all ranks equal) correlates 1 with another constant sample, else 0."""
    A, Bm = _pair(a, b, "spearman")
    if A.shape[1] == 0:
        return torch.ones(A.shape[0], dtype=torch.float64, device=A.device)
    return _corr_rows(_average_ranks(A), _average_ranks(Bm))


# ------------------------------------------------------------------------------------ sensitivity
def _norm_rows(v: Tensor, norm) -> Tensor:
    if norm == "fro":
        return torch.linalg.vector_norm(v, ord=2, dim=1)
    return torch.linalg.vector_norm(v, ord=float(norm), dim=1)


def _check_norm(norm, fname: str) -> None:
    if norm == "fro":
        return
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or (isinstance(norm, float) and math.isnan(norm)):
        raise ValueError(f"{fname}: norm must be 'fro' or a real order p of the vector p-norm; got {norm!r}")


def _explain_checked(explain: Callable, z: Tensor, fname: str) -> Tensor:
    e = explain(z)
    if not isinstance(e, Tensor):
        raise TypeError(f"{fname}: explain(x) must return a tensor of attributions [B, ...]; got {type(e).__name__}")
    if e.dim() < 1 or e.shape[0] != z.shape[0]:
        raise ValueError(f"{fname}: explain(x) must return attributions with batch size {z.shape[0]}; "
                         f"got shape {tuple(e.shape)}")
    return e.detach().reshape(z.shape[0], -1).double()


def _sensitivity(a0: Tensor, a: Tensor, norm) -> Tensor:
    """Captum's per-draw sensitivity: ‖a0 − a‖ / ‖a0‖, with ‖a0‖ = 0 replaced by 1."""
    den = _norm_rows(a0, norm)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return _norm_rows(a0 - a, norm) / den


def max_sensitivity(explain: Callable[[Tensor], Tensor], x: Tensor, *, eps: float = 0.02, num_samples: int = 10,
                    kind: str = "linf", generator: torch.Generator | None = None, norm="fro") -> Tensor:
    """max_j ‖explain(x) − explain(x + δ_j)‖ / ‖explain(x)‖ per sample, j = 1..num_samples, with
    δ_j drawn by ``perturb(x, eps, kind, generator=generator)`` in order and the norm of the
    flattened explanation ("fro": L2; a number p: the vector p-norm). A zero original explanation is
    normalised by 1 instead (the absolute change). This is captum.metrics.sensitivity_max with
    perturb_radius=eps, n_perturb_samples=num_samples, norm_ord=norm; kind="linf" is its default
    perturbation. Returns float64 [B].
    """
    fname = "max_sensitivity"
    if not callable(explain):
        raise TypeError(f"{fname}: explain must be a callable x -> attributions; got {type(explain).__name__}")
    x = _check_x(x, fname)
    eps = _check_nonneg(eps, "eps", fname)
    n = _check_int(num_samples, "num_samples", fname)
    _check_kind(kind, fname)
    _check_generator(generator, fname)
    _check_norm(norm, fname)
    a0 = _explain_checked(explain, x, fname)
    best = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=a0.device)
    for _ in range(n):
        a = _explain_checked(explain, perturb(x, eps, kind, generator=generator), fname)
        if a.shape != a0.shape:
            raise ValueError(f"{fname}: explain(x) returned shape {tuple(a.shape)} for a perturbed input but "
                             f"{tuple(a0.shape)} for x")
        best = torch.maximum(best, _sensitivity(a0, a.to(a0.device), norm))
    return best


# ------------------------------------------------------------------------------------ stability table
def _explainer(model, target: Tensor, method: str, method_kwargs: dict, fname: str):
    """explain(z) = METHODS[method](model, z, target, **method_kwargs); SmoothGrad reuses the same
    noise for every call (common random numbers), so eps = 0 gives identical attributions."""
    fn = METHODS[method]
    kw = dict(method_kwargs)
    if method == "smoothgrad":
        g = kw.get("generator")
        if g is None:                     # fixed seed: the perturbation stream is left untouched
            g = torch.Generator().manual_seed(0)
        elif not isinstance(g, torch.Generator):
            raise TypeError(f"{fname}: method_kwargs['generator'] must be a torch.Generator; got {type(g).__name__}")
        state = g.get_state()

        def explain(z):
            g.set_state(state)
            return fn(model, z, target, **{**kw, "generator": g})
        return explain
    return lambda z: fn(model, z, target, **kw)


def attribution_stability(model: Callable, x: Tensor, target=None, *, method: str = "saliency", eps: float = 0.05,
                          kind: str = "gaussian", num_samples: int = 8, k: int = 10,
                          generator: torch.Generator | None = None, method_kwargs: dict | None = None):
    """Per-sample stability of the attribution ``method`` under ``num_samples`` perturbations
    x + δ_j (``perturb(x, eps, kind, generator=generator)`` in order), the target held fixed at the
    unperturbed one (arg-max of model(x) when None). Returns a pandas DataFrame, one row per sample:

    sample, target, prediction (arg-max of model(x)), attribution_norm ‖a(x)‖₂, the means over the
    draws of relative_l2, cosine, topk_overlap (top-``k``), spearman, the standard deviation
    relative_l2_std, max_sensitivity (max over the draws of ‖a(x+δ) − a(x)‖₂ / ‖a(x)‖₂, Captum's
    convention: ‖a(x)‖ = 0 normalised by 1) and prediction_flipped_share (share of the draws whose
    arg-max differs from the unperturbed prediction). The options are in ``df.attrs``.
    """
    import pandas as pd

    fname = "attribution_stability"
    x = _check_x(x, fname)
    if method not in METHODS:
        raise ValueError(f"{fname}: method must be one of {sorted(METHODS)}; got {method!r}")
    eps = _check_nonneg(eps, "eps", fname)
    _check_kind(kind, fname)
    n = _check_int(num_samples, "num_samples", fname)
    k = _check_int(k, "k", fname)
    _check_generator(generator, fname)
    if method_kwargs is None:
        method_kwargs = {}
    if not isinstance(method_kwargs, dict):
        raise TypeError(f"{fname}: method_kwargs must be a dict or None; got {type(method_kwargs).__name__}")
    bad = [key for key in ("target", "return_delta") if key in method_kwargs]
    if bad:
        raise ValueError(f"{fname}: method_kwargs must not contain {bad[0]!r} (the target is fixed, the "
                         f"attribution alone is compared); got keys {sorted(method_kwargs)}")
    B = x.shape[0]
    fkw = _check_fkw(method_kwargs.get("forward_kwargs"), fname)
    t = _resolve_target(model, x, target, fname, fkw)
    with torch.no_grad():
        pred0 = _check_output(model(x, **fkw), B, fname).argmax(1)
    explain = _explainer(model, t, method, method_kwargs, fname)
    a0 = explain(x)
    cols = {"relative_l2": [], "cosine": [], "topk_overlap": [], "spearman": [], "sensitivity": [], "flipped": []}
    for _ in range(n):
        xj = perturb(x, eps, kind, generator=generator)
        aj = explain(xj)
        cols["relative_l2"].append(relative_l2(a0, aj))
        cols["cosine"].append(cosine_similarity(a0, aj))
        cols["topk_overlap"].append(topk_overlap(a0, aj, k))
        cols["spearman"].append(spearman(a0, aj))
        cols["sensitivity"].append(_sensitivity(a0.reshape(B, -1).double(), aj.reshape(B, -1).double(), "fro"))
        with torch.no_grad():
            cols["flipped"].append((_check_output(model(xj, **fkw), B, fname).argmax(1) != pred0).double())
    st = {key: torch.stack(v, 1).cpu() for key, v in cols.items()}       # [B, n]
    rel = st["relative_l2"]
    df = pd.DataFrame({
        "sample": list(range(B)), "target": t.cpu().tolist(), "prediction": pred0.cpu().tolist(),
        "attribution_norm": torch.linalg.vector_norm(a0.reshape(B, -1).double(), dim=1).cpu().tolist(),
        "relative_l2": rel.mean(1).tolist(),
        "relative_l2_std": (rel.std(1) if n > 1 else torch.zeros(B, dtype=torch.float64)).tolist(),
        "cosine": st["cosine"].mean(1).tolist(), "topk_overlap": st["topk_overlap"].mean(1).tolist(),
        "spearman": st["spearman"].mean(1).tolist(), "max_sensitivity": st["sensitivity"].max(1).values.tolist(),
        "prediction_flipped_share": st["flipped"].mean(1).tolist()})
    df.attrs.update({"method": method, "eps": eps, "kind": kind, "num_samples": n, "k": k})
    return df


# ------------------------------------------------------------------------------------ spectral link
def _rank1(v: np.ndarray) -> np.ndarray:
    return _average_ranks(torch.as_tensor(v, dtype=torch.float64)[None])[0].numpy()


def _pearson1(u: np.ndarray, v: np.ndarray) -> float:
    if len(u) < 3:
        return math.nan
    uc, vc = u - u.mean(), v - v.mean()
    su, sv = np.linalg.norm(uc), np.linalg.norm(vc)
    if su == 0 or sv == 0:
        return math.nan
    return float(np.clip(np.dot(uc / su, vc / sv), -1, 1))


def _fisher_p(r: float, n: int, var: float = 1.0) -> float:
    """Two-sided p-value of r ≠ 0 from Fisher's z ≈ N(0, var/(n − 3)) (Spearman: var = 1.06)."""
    if not math.isfinite(r) or n < 4:
        return math.nan
    if abs(r) >= 1:
        return 0.0
    z = math.atanh(r) * math.sqrt((n - 3) / var)
    return math.erfc(abs(z) / math.sqrt(2))


def _spans_decades(v: np.ndarray) -> bool:
    v = v[np.isfinite(v)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() >= 100


def spectral_link(stability_df, per_sample_df, *, metric: str = "relative_l2",
                  against: Sequence[str] = ("jac_norm", "jac_entropy"), plot=None) -> dict:
    """Per-sample correlation between the attribution instability ``stability_df[metric]`` (from
    attribution_stability) and the input-Jacobian columns ``against`` of ``per_sample_df``
    (specfast.stability.analyze(...).per_sample on the same samples). Rows are matched on the
    ``sample`` column when both tables have one, else by position (equal lengths required).

    Returns {"metric": metric, "n": matched rows, "plot": path or None, column: {"pearson",
    "spearman", "n", "pearson_p", "spearman_p"} for each column}; rows with a non-finite value are
    left out of that column's correlations; fewer than 3 rows or a constant column give NaN. The
    p-values are Fisher-z approximations (two-sided). ``plot``: a path; writes a PNG scatter plot,
    one panel per column (log axes where the positive values span two decades or more).
    """
    import pandas as pd

    fname = "spectral_link"
    for name, df in (("stability_df", stability_df), ("per_sample_df", per_sample_df)):
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"{fname}: {name} must be a pandas DataFrame; got {type(df).__name__}")
    if isinstance(against, str):
        against = (against,)
    against = tuple(against)
    if not against:
        raise ValueError(f"{fname}: against must name at least one column of per_sample_df; got {against}")
    if metric not in stability_df.columns:
        raise ValueError(f"{fname}: metric must be a column of stability_df {list(stability_df.columns)}; got {metric!r}")
    missing = [c for c in against if c not in per_sample_df.columns]
    if missing:
        raise ValueError(f"{fname}: against must name columns of per_sample_df {list(per_sample_df.columns)}; "
                         f"got {missing[0]!r}")
    reserved = [c for c in against if c in ("metric", "n", "plot")]
    if reserved:
        raise ValueError(f"{fname}: against must not contain the reserved keys 'metric', 'n', 'plot'; got {reserved[0]!r}")
    if "sample" in stability_df.columns and "sample" in per_sample_df.columns:
        left = stability_df[["sample", metric]].rename(columns={metric: "__metric__"})
        merged = left.merge(per_sample_df[["sample", *dict.fromkeys(against)]], on="sample", how="inner")
        y = merged["__metric__"].to_numpy(dtype=float)
        X = {c: merged[c].to_numpy(dtype=float) for c in against}
    else:
        if len(stability_df) != len(per_sample_df):
            raise ValueError(f"{fname}: stability_df and per_sample_df must have one row per sample each (or a "
                             f"'sample' column to match on); got {len(stability_df)} and {len(per_sample_df)} rows")
        y = stability_df[metric].to_numpy(dtype=float)
        X = {c: per_sample_df[c].to_numpy(dtype=float) for c in against}
    out: dict = {"metric": metric, "n": int(len(y)), "plot": None}
    for c in against:
        ok = np.isfinite(X[c]) & np.isfinite(y)
        u, v = X[c][ok], y[ok]
        m = int(ok.sum())
        r = _pearson1(u, v)
        rho = _pearson1(_rank1(u), _rank1(v)) if m >= 3 else math.nan
        out[c] = {"pearson": r, "spearman": rho, "n": m, "pearson_p": _fisher_p(r, m),
                  "spearman_p": _fisher_p(rho, m, 1.06)}
    if plot is not None:
        out["plot"] = _scatter(plot, X, y, metric, out)
    return out


def _scatter(path, X: dict, y: np.ndarray, metric: str, link: dict) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    cols = list(X)
    fig = Figure(figsize=(4.2 * len(cols), 3.8))
    FigureCanvasAgg(fig)
    for i, c in enumerate(cols):
        ax = fig.add_subplot(1, len(cols), i + 1)
        ok = np.isfinite(X[c]) & np.isfinite(y)
        ax.scatter(X[c][ok], y[ok], s=14, alpha=0.75)
        if _spans_decades(X[c][ok]):
            ax.set_xscale("log")
        if _spans_decades(y[ok]):
            ax.set_yscale("log")
        ax.set_xlabel(c)
        ax.set_ylabel(metric)
        ln = link[c]
        ax.set_title(f"Pearson {ln['pearson']:.2f}, Spearman {ln['spearman']:.2f}, n={ln['n']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def attribution_spectra(model, x: Tensor, target=None, *, method: str = "saliency", eps: float = 0.05,
                        kind: str = "gaussian", num_samples: int = 8, k: int = 10,
                        generator: torch.Generator | None = None, method_kwargs: dict | None = None,
                        metric: str = "relative_l2", against: Sequence[str] = ("jac_norm", "jac_entropy"),
                        plot=None, **analyze_kwargs):
    """attribution_stability on (model, x, target), specfast.stability.analyze on (model, x) with
    ntk=False, hessian=False, attribution=False unless ``analyze_kwargs`` says otherwise (only the
    input-Jacobian spectra are needed), and spectral_link between them.
    Returns (stability_df, per_sample_df, link)."""
    from ..stability import analyze

    stab = attribution_stability(model, x, target, method=method, eps=eps, kind=kind, num_samples=num_samples,
                                 k=k, generator=generator, method_kwargs=method_kwargs)
    kw = {"ntk": False, "hessian": False, "attribution": False, **analyze_kwargs}
    per_sample = analyze(model, x, **kw).per_sample
    link = spectral_link(stab, per_sample, metric=metric, against=against, plot=plot)
    return stab, per_sample, link
