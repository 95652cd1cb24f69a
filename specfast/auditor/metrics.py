"""Per-matrix metrics for a group of matrices (one grouped native call per metric).

Two spectrum modes:
  * ``"krylov"`` (default): top-k singular values by certified block Lanczos, ‖W‖_F exactly,
    entropy by exact SVD for small matrices and by stochastic Lanczos quadrature otherwise. Each
    matrix is read a few dozen times; nothing of size min(m, n)² is formed.
  * ``"full"``: every eigenvalue of the smaller Gram matrix (float64, accumulated over row chunks of
    W, then ``eigvalsh``). Needed for the WeightWatcher power-law fit (alpha) and for an exact
    entropy and condition number.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from .. import linalg, ops
from . import ww

_EPS64 = float(np.finfo(np.float64).eps)


def nonfinite_counts(W: torch.Tensor) -> tuple[int, int]:
    nan = int(torch.isnan(W).sum())
    inf = int(torch.isinf(W).sum())
    return nan, inf


def gram_eigenvalues(W: torch.Tensor, chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """All eigenvalues of the smaller Gram matrix (WᵀW or WWᵀ), descending, float64.

    The Gram matrix is accumulated in float64 over row blocks of W so the float64 working copy
    never exceeds ``chunk_bytes``; memory is min(m, n)² float64 plus one block."""
    m, n = W.shape
    A = W if m >= n else W.mT  # tall: Gram = AᵀA of size min(m, n)
    rows = max(1, chunk_bytes // (8 * A.shape[1]))
    G = torch.zeros(A.shape[1], A.shape[1], dtype=torch.float64, device=W.device)
    for s in range(0, A.shape[0], rows):
        blk = A[s:s + rows].to(torch.float64)
        G.addmm_(blk.mT, blk)
    lam = torch.linalg.eigvalsh(G)
    return lam.flip(0).clamp_min(0.0)


def matrix_seed(seed: int, name: str) -> int:
    """A per-matrix seed from the matrix's name: a row never depends on which group it ran in."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def compute(mats: list[torch.Tensor], *, topk: int, tol: float, spectrum: str, metrics: set,
            entropy_probes: int, entropy_steps: int, exact_max_dim: int, seed: int,
            names: list[str] | None = None) -> list[dict]:
    """Metrics for each matrix of ``mats`` (2-D tensors, any float dtype); returns one dict each.
    Random start vectors and probes are seeded per matrix from ``seed`` and its name."""
    names = names if names is not None else [str(i) for i in range(len(mats))]
    out = [dict() for _ in mats]
    if not mats:
        return out
    # one native pass per matrix gives ‖W‖_F² and the count of non-finite entries; only a matrix
    # that has some is scanned again to tell NaN from Inf
    fro_all, nbad = ops.call(ops.frobenius_scan_grouped_op, list(mats))
    for i, W in enumerate(mats):
        nan, inf = nonfinite_counts(W) if int(nbad[i]) else (0, 0)
        out[i].update(nan_count=nan, inf_count=inf)
    good = [i for i in range(len(mats)) if not int(nbad[i])]
    if not good:
        return out
    gm = [mats[i] for i in good]
    if spectrum == "full":
        for i, W in zip(good, gm):
            out[i].update(_full_metrics(W, topk, metrics))
        return out
    fro2 = fro_all[good]
    k = [min(topk, *W.shape) for W in gm]
    kmax = max(k)
    # Krylov needs k <= min(m, n): a group mixes shapes only when they share k, see the caller
    # One grouped Krylov call. Its start vectors depend on the position in the group, which moves
    # σ only within its certified error (the entropy's SLQ probes, below, are seeded by name).
    S, info = linalg.svdvals(gm, kmax if all(x == kmax for x in k) else min(k), tol=tol, seed=seed,
                             return_info=True, nonfinite="nan")
    for j, i in enumerate(good):
        s = S[j].double()
        b = info.error_bound[j].double()
        f2 = float(fro2[j])
        s1 = float(s[0]) if s.numel() else 0.0
        row = out[i]
        row.update(sigma_1=s1, sigma_1_error=float(b[0]) if b.numel() else 0.0,
                   top_sigmas=[float(x) for x in s], top_sigma_errors=[float(x) for x in b],
                   converged=bool(info.converged[j]), iterations=int(info.iterations[j]),
                   spectrum_method="krylov", frobenius_norm=math.sqrt(f2),
                   stable_rank=f2 / s1 ** 2 if s1 > 0 else 0.0)
        row.update(ww.cheap_columns(s1, f2))
    if "entropy" in metrics:
        for j, i in enumerate(good):
            W = gm[j]
            out[i].update(_entropy(W, float(fro2[j]), entropy_probes, entropy_steps, exact_max_dim,
                                   matrix_seed(seed, names[i])))
    if "condition" in metrics:
        for j, i in enumerate(good):
            c, cinfo = linalg.condition_number(gm[j], seed=matrix_seed(seed, names[i]), return_info=True,
                                               nonfinite="nan")
            out[i].update(condition=float(c), condition_lower=float(cinfo.lower),
                          condition_upper=float(cinfo.upper), condition_method=cinfo.method)
    return out


def _entropy(W: torch.Tensor, f2: float, probes: int, steps: int, exact_max_dim: int, seed: int) -> dict:
    """Spectral entropy with ‖W‖_F² already known: every eigenvalue of the float64 Gram matrix when
    min(m, n) <= exact_max_dim (cheaper than an SVD), else SLQ (linalg's estimator and stderr)."""
    p = min(W.shape)
    if p <= exact_max_dim or W.dtype == torch.float64:
        if p > exact_max_dim:  # float64 storage: linalg rescales entries that would overflow
            H, info = linalg.spectral_entropy(W, num_probes=probes, lanczos_steps=steps, exact_max_dim=exact_max_dim,
                                              seed=seed, return_info=True, nonfinite="nan")
            H, se, how = float(H), float(info.stderr), info.method
        else:
            lam = gram_eigenvalues(W)
            tot = float(lam.sum())
            pr = lam[lam > 0] / tot if tot > 0 else lam[:0]
            H, se, how = float(-(pr * pr.log()).sum()) if tot > 0 else 0.0, 0.0, "exact"
    else:
        nodes, weights, dims, _ = ops.call(ops.slq_gram_op, W, probes, steps, seed)
        Ht, set_ = linalg._slq_entropy(nodes, weights, dims, torch.tensor(f2, dtype=torch.float64), p)
        H, se, how = float(Ht), float(set_), "slq"
    return dict(spectral_entropy=H, spectral_entropy_stderr=se, entropy_method=how,
                effective_rank=math.exp(H) if f2 > 0 else 0.0)


def _full_metrics(W: torch.Tensor, topk: int, metrics: set) -> dict:
    lam = gram_eigenvalues(W)
    p = lam.numel()
    sig = lam.sqrt()
    f2 = float(lam.sum())
    s1 = float(sig[0]) if p else 0.0
    # eigvalsh of a float64 Gram: |Δλ| <= c·p·eps·λ_max; in σ: Δσ <= Δλ / (2σ) for σ > 0, else sqrt(Δλ)
    dlam = 4 * p * _EPS64 * float(lam[0]) if p else 0.0
    errs = [(dlam / (2 * float(s)) if float(s) > 0 and dlam / (2 * float(s)) < float(s) else math.sqrt(dlam))
            for s in sig[:topk]]
    k = min(topk, p)
    row = dict(sigma_1=s1, sigma_1_error=errs[0] if errs else 0.0,
               top_sigmas=[float(x) for x in sig[:k]], top_sigma_errors=errs[:k], converged=True,
               iterations=0, spectrum_method="full", frobenius_norm=math.sqrt(f2),
               stable_rank=f2 / s1 ** 2 if s1 > 0 else 0.0)
    row.update(ww.cheap_columns(s1, f2))
    if f2 > 0:
        pr = lam / f2
        pr = pr[pr > 0]
        H = float(-(pr * pr.log()).sum())
    else:
        H = 0.0
    row.update(spectral_entropy=H, spectral_entropy_stderr=0.0, entropy_method="exact",
               effective_rank=math.exp(H) if f2 > 0 else 0.0)
    smin = float(sig[-1]) if p else 0.0
    row.update(condition=(s1 / smin if smin > math.sqrt(dlam) else float("inf")) if s1 > 0 else float("nan"),
               condition_method="full")
    row.update(ww.spectrum_columns(lam.cpu().numpy(), W.shape))
    return row
