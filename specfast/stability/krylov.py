"""Matrix-free spectral routines for symmetric operators given only as mat-vecs.

The operators of the stability framework (J^T J, the NTK, the loss Hessian) cost a forward and a
backward pass per product, so everything here is written to use few products and little memory:

- ``eigsh``: thick-restart Lanczos (the symmetric Krylov–Schur method) with full
  reorthogonalisation inside a basis of at most ``basis_size`` vectors. Memory is
  (basis_size + 1) vectors whatever the number of iterations: O(k·n), never every vector of a long
  run. Each Ritz value comes with its residual norm ‖A y − θ y‖, which certifies that an eigenvalue
  of A lies within that distance of θ.
- ``hutchpp``: the Hutch++ trace estimator (Meyer, Musco, Musco, Woodruff 2021) with a standard
  error from its Hutchinson part.
- ``slq``: stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017) with the plain three-term
  recurrence (three vectors of memory per probe), giving quadrature nodes and weights from which
  traces of matrix functions, spectral entropies and smoothed densities are read.

All routines are batched over independent operators: a mat-vec takes ``[B, n]`` and returns
``[B, n]`` (the B problems share nothing but the call), which is how per-sample Jacobians of a whole
batch are handled by a single forward/backward pass per product. Small projected problems are
solved in float64; the n-vectors are kept in ``dtype`` (float32 by default, float64 on request).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
_WHICH = ("LA", "SA", "LM")


def _check_int(fn: str, name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}; got {value!r}")


def _norm(x: Tensor) -> Tensor:
    """Row norms in float64: float32 squares overflow or underflow for entries beyond ~1e±19."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)


def _product(fn: str, matvec: MatVec, v: Tensor, count: int, dtype) -> Tensor:
    """matvec(v) checked: same shape as v, finite (a NaN would otherwise surface deep in eigh)."""
    w = matvec(v)
    if isinstance(w, Tensor) and w.data_ptr() == v.data_ptr():
        w = w.clone()          # the result is orthogonalised in place: never the basis vector itself
    if not isinstance(w, Tensor) or w.shape != v.shape:
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{fn}: matvec must return shape {tuple(v.shape)}; got {got}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: matvec returned NaN or Inf (product {count + 1})")
    return w.to(dtype)


def _rademacher(shape, dtype, device, generator) -> Tensor:
    r = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (r.to(dtype) * 2 - 1).to(device)


def _gaussian(shape, dtype, device, generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


@dataclass
class EigResult:
    """Ritz pairs of a batch of symmetric operators (one row per operator).

    values: [B, k] float64, descending for which="LA"/"LM", ascending for which="SA".
    residuals: [B, k] ‖A y − θ y‖ for the unit Ritz vector y: an eigenvalue of A lies in
        [θ − r, θ + r] (Weyl/Bauer–Fike for symmetric A).
    converged: [B, k] bool, residual <= tol · (largest |Ritz value| seen).
    vectors: [B, k, n] Ritz vectors when asked for, else None.
    matvecs: operator products used (each one a call on the whole batch).
    verified: the deflation check ran and found no further eigenvalue among the wanted k (copies of
        a repeated eigenvalue that single-vector Lanczos misses); False when it was skipped
        (verify=False, unconverged pairs, or no budget left) or stopped by the budget.
    """

    values: Tensor
    residuals: Tensor
    converged: Tensor
    matvecs: int
    restarts: int
    basis_size: int
    vectors: Tensor | None = None
    verified: bool = False
    scale: Tensor | None = None     # [B] largest |Ritz value| seen: the unit of tol


def _orthogonalize(V: Tensor, w: Tensor) -> Tensor:
    """Two classical Gram–Schmidt passes of w [B, n] against the rows of V [B, j, n]; returns the
    coefficients (float64) and leaves w orthogonal to V."""
    h = torch.einsum("bjn,bn->bj", V, w)
    w -= torch.einsum("bjn,bj->bn", V, h)
    h2 = torch.einsum("bjn,bn->bj", V, w)
    w -= torch.einsum("bjn,bj->bn", V, h2)
    return (h + h2).to(torch.float64)


def _fresh_direction(V: Tensor, rows: Tensor, generator, dtype) -> Tensor:
    """A random unit vector orthogonal to V (for the rows that broke down)."""
    B, j, n = V.shape
    w = _gaussian((B, n), dtype, V.device, generator)
    _orthogonalize(V, w)
    w /= _norm(w).clamp_min(1e-300).to(dtype)[:, None]
    return w


def eigsh(matvec: MatVec, n: int, k: int, *, batch: int = 1, which: str = "LA", tol: float = 1e-4,
          max_matvecs: int = 300, basis_size: int | None = None, dtype: torch.dtype = torch.float32,
          device=None, generator: torch.Generator | None = None, return_vectors: bool = False,
          verify: bool = True, relative_to: str = "spectrum") -> EigResult:
    """k extreme eigenpairs of B symmetric n×n operators by thick-restart Lanczos.

    which: "LA" largest algebraic, "SA" smallest algebraic (e.g. the most negative Hessian
    eigenvalues, or λ_min of a PSD operator), "LM" largest magnitude.
    tol: relative residual target, ‖A y − θ y‖ <= tol · max|θ| (relative_to="spectrum"), or
        <= tol · |θ| for each pair (relative_to="value": small eigenvalues to relative accuracy,
        e.g. λ_min of a PSD operator for its condition number; slower).
    max_matvecs: budget of operator products (all rounds together); unconverged pairs are
        returned flagged.
    basis_size: Krylov basis kept in memory (default max(2k + 6, 16), at most n).
    verify: single-vector Lanczos finds one copy of a repeated eigenvalue (the Krylov space holds
        one vector of each eigenspace, up to rounding), so once all k pairs have converged the
        top eigenvalue of the operator deflated by the k Ritz vectors is computed from a fresh
        random start and merged in when it beats the k-th; rounds repeat until one finds nothing
        new (one round per missing copy, plus one).
    """
    fn = "eigsh"
    _check_int(fn, "n", n, 1)
    _check_int(fn, "k", k, 1)
    _check_int(fn, "batch", batch, 1)
    _check_int(fn, "max_matvecs", max_matvecs, 1)
    if k > n:
        raise ValueError(f"{fn}: k must be <= n = {n}; got k={k}")
    if which not in _WHICH:
        raise ValueError(f"{fn}: which must be one of {_WHICH}; got {which!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"{fn}: tol must be in (0, 1); got {tol!r}")
    if relative_to not in ("spectrum", "value"):
        raise ValueError(f"{fn}: relative_to must be 'spectrum' or 'value'; got {relative_to!r}")
    m = basis_size if basis_size is not None else max(2 * k + 6, 16)
    _check_int(fn, "basis_size", m, k + 1 if n > k else k)
    m = min(m, n, max(max_matvecs, k + 1))   # the first basis never exceeds the budget
    device = torch.device(device) if device is not None else torch.device("cpu")
    want = verify or return_vectors
    r = _lanczos(fn, matvec, n, k, batch, which, tol, max_matvecs, m, dtype, device, generator, want, relative_to)
    if not verify or m == n:           # m == n: the basis spans everything, copies included
        r.verified = m == n
    else:
        for _ in range(k):
            if not bool(r.converged.all()) or r.matvecs + m > max_matvecs:
                break
            r2, new, conclusive = _deflated_round(fn, matvec, r, n, k, batch, which, tol, max_matvecs - r.matvecs, m,
                                                  dtype, device, generator, relative_to)
            r = _merge(r, r2, k, which)
            if not new:
                r.verified = conclusive and bool(r.converged.all())
                break
    if not return_vectors:
        r.vectors = None
    return r


def _deflated_round(fn, matvec, r: EigResult, n, k, B, which, tol, budget, m, dtype, device, generator, relative_to):
    """Lanczos on A restricted to the complement of the found vectors Y: (I−P)A(I−P) + σP with
    P = YYᵀ and σ beyond the wanted end, so the found directions can never be wanted again."""
    Y = r.vectors
    kth = r.values[:, -1]
    # σ a whole spectrum width beyond the wanted end (1 for the zero operator)
    scale = torch.maximum(r.scale, r.values.abs().amax(1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    sigma = {"LA": kth - scale, "SA": kth + scale, "LM": torch.zeros_like(kth)}[which]
    sigma = sigma.to(dtype=dtype, device=device)[:, None]

    def deflated(v):
        c = torch.einsum("bkn,bn->bk", Y, v)
        v_perp = v - torch.einsum("bkn,bk->bn", Y, c)
        w = matvec(v_perp).to(dtype)
        w = w - torch.einsum("bkn,bk->bn", Y, torch.einsum("bkn,bn->bk", Y, w))
        return w + sigma * torch.einsum("bkn,bk->bn", Y, c)

    # only the best eigenvalue of the deflated operator matters: is it better than the k-th found?
    r2 = _lanczos(fn, deflated, n, 1, B, which, tol, budget - 1, m, dtype, device, generator, True, relative_to,
                  unit_scale=scale)
    # The certificate is for A itself: take the new vector exactly orthogonal to the found ones (its
    # eigenvector is) and measure its residual on A, which the deflated residual omits.
    y = r2.vectors[:, 0]
    y = y - torch.einsum("bkn,bk->bn", Y, torch.einsum("bkn,bn->bk", Y, y))
    y = y / _norm(y).clamp_min(1e-300).to(dtype)[:, None]
    w = _product(fn, matvec, y.contiguous(), r.matvecs + r2.matvecs, dtype)
    theta = (y.double() * w.double()).sum(1).cpu()
    r2.values = theta[:, None]
    r2.vectors = y[:, None]
    r2.residuals = _norm(w - theta.to(dtype=dtype, device=w.device)[:, None] * y).cpu()[:, None]
    r2.matvecs += 1
    unit = r2.values.abs() if relative_to == "value" else scale[:, None]
    r2.converged = r2.residuals <= tol * unit + 1e-300
    margin = tol * scale
    best = r2.values[:, 0]
    if which == "LA":
        new = best > kth + margin
    elif which == "SA":
        new = best < kth - margin
    else:
        new = best.abs() > kth.abs() + margin
    new = new & r2.converged[:, 0]
    # operators with nothing new keep their pairs untouched: the round's value can never enter
    never = {"LA": float("-inf"), "SA": float("inf"), "LM": 0.0}[which]
    r2.values = torch.where(new[:, None], r2.values, torch.full_like(r2.values, never))
    return r2, bool(new.any()), bool(r2.converged.all())


def _merge(r: EigResult, r2: EigResult, k: int, which: str) -> EigResult:
    values = torch.cat([r.values, r2.values], 1)
    order = _order(values, which)[:, :k]
    take = lambda t: t.gather(1, order)  # noqa: E731
    vectors = torch.cat([r.vectors, r2.vectors], 1)
    vectors = vectors.gather(1, order.to(vectors.device)[:, :, None].expand(-1, -1, vectors.shape[2]))
    return EigResult(take(values), take(torch.cat([r.residuals, r2.residuals], 1)),
                     take(torch.cat([r.converged, r2.converged], 1)), r.matvecs + r2.matvecs,
                     r.restarts + r2.restarts, r.basis_size, vectors, scale=torch.maximum(r.scale, r2.scale))


def _lanczos(fn, matvec, n, k, B, which, tol, max_matvecs, m, dtype, device, generator, return_vectors,
             relative_to, unit_scale: Tensor | None = None) -> EigResult:
    """unit_scale: the tolerance's unit when given (a deflated operator's own Ritz values include
    its shift, which is not part of the original spectrum)."""
    V = torch.empty(B, m + 1, n, dtype=dtype, device=device)
    v0 = _gaussian((B, n), dtype, device, generator)
    V[:, 0] = v0 / _norm(v0).to(dtype)[:, None]
    T = torch.zeros(B, m, m, dtype=torch.float64)
    kept, matvecs, restarts = 0, 0, 0
    scale = torch.zeros(B, dtype=torch.float64)   # largest |Ritz value| seen: the tolerance's unit
    norm_est = torch.zeros(B, dtype=torch.float64)  # ‖T‖_∞ so far: the unit of the breakdown test
    tiny = torch.finfo(dtype).eps
    while True:
        beta = torch.zeros(B, dtype=torch.float64)
        for i in range(kept, m):
            w = _product(fn, matvec, V[:, i], matvecs, dtype)
            matvecs += 1
            h = _orthogonalize(V[:, : i + 1], w).cpu()
            T[:, : i + 1, i] = h
            T[:, i, : i + 1] = h
            beta = _norm(w).cpu()
            norm_est = torch.maximum(norm_est, T[:, : i + 1, : i + 1].abs().sum(-1).amax(-1))
            # Breakdown (an invariant subspace was found, e.g. a rank-deficient operator): continue
            # with a fresh direction orthogonal to the basis; its coupling to the basis is zero.
            broke = beta <= 10 * tiny * norm_est.clamp_min(1e-300)
            if i + 1 <= m:
                V[:, i + 1] = w / beta.clamp_min(1e-300).to(dtype=dtype, device=device)[:, None]
                if bool(broke.any()) and i + 1 < n:
                    idx = broke.nonzero().flatten().to(device)
                    V[idx, i + 1] = _fresh_direction(V[idx, : i + 1], idx, generator, dtype)
                beta = torch.where(broke, torch.zeros_like(beta), beta)
            # Converged before the basis is full? A V_j = V_j T_j + β_j v_{j+1} e_jᵀ holds at every
            # step past the kept block, so the Ritz residuals are known without extra products; a
            # few steps beyond k guard against declaring a not-yet-extreme Ritz value converged.
            j = i + 1
            if j < m and j >= min(k + _EARLY_MIN_EXTRA, m):
                early = _ritz(T[:, :j, :j], beta, which, k, tol, relative_to, scale, unit_scale)
                if bool(early[3].all()):
                    return _finish(early, V, j, m, k, matvecs, restarts, return_vectors, dtype, device)
        theta, S, order, conv, vals, res, idx, scale = _ritz(T, beta, which, k, tol, relative_to, scale, unit_scale)
        keep = min(m - 1, k + (m - k) // 2) if m > k else k
        done = bool(conv.all()) or matvecs + (m - keep) > max_matvecs or m == n
        if done:
            return _finish((theta, S, order, conv, vals, res, idx, scale), V, m, m, k, matvecs, restarts,
                           return_vectors, dtype, device)
        # Thick restart: keep the `keep` best Ritz vectors and the residual direction; the projected
        # matrix becomes diag(θ) bordered by the residual couplings β·S[m-1, j].
        sel = order[:, :keep]
        Ssel = S.gather(2, sel[:, None, :].expand(B, m, keep))
        _rotate_rows(V, Ssel.to(dtype=dtype, device=device), m, keep)
        V[:, keep] = V[:, m]
        T.zero_()
        ar = torch.arange(keep)
        T[:, ar, ar] = theta.gather(1, sel)
        b = beta[:, None] * Ssel[:, m - 1, :]
        T[:, keep, :keep] = b
        T[:, :keep, keep] = b
        kept = keep
        restarts += 1


_EARLY_MIN_EXTRA = 3   # steps beyond k before a converged-early exit is allowed


def _ritz(T: Tensor, beta: Tensor, which: str, k: int, tol: float, relative_to: str, scale: Tensor,
          unit_scale: Tensor | None):
    """Ritz values of the projected matrix T [B, j, j], the wanted k, their residuals β|S[j-1, ·]|
    and convergence against the tolerance's unit."""
    j = T.shape[-1]
    theta, S = torch.linalg.eigh(T)
    res_all = (beta[:, None] * S[:, j - 1, :]).abs()
    order = _order(theta, which)
    idx = order[:, :k]
    vals = theta.gather(1, idx)
    res = res_all.gather(1, idx)
    scale = torch.maximum(scale, theta.abs().amax(1))
    unit = vals.abs() if relative_to == "value" else (scale if unit_scale is None else unit_scale)[:, None]
    conv = res <= tol * unit + 1e-300
    return theta, S, order, conv, vals, res, idx, scale


def _finish(ritz, V: Tensor, j: int, m: int, k: int, matvecs: int, restarts: int, return_vectors: bool, dtype,
            device) -> EigResult:
    """The result from the first j basis vectors (m: the basis size held in memory)."""
    theta, S, order, conv, vals, res, idx, scale = ritz
    B = V.shape[0]
    vectors = None
    if return_vectors:
        Sk = S.gather(2, idx[:, None, :].expand(B, j, k)).to(dtype=dtype, device=device)
        vectors = torch.einsum("bmk,bmn->bkn", Sk, V[:, :j])
    return EigResult(vals, res, conv, matvecs, restarts, m, vectors, scale=scale)


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return theta.argsort(dim=1, descending=True)
    if which == "SA":
        return theta.argsort(dim=1)
    return theta.abs().argsort(dim=1, descending=True)


def _rotate_rows(V: Tensor, S: Tensor, m: int, keep: int, chunk: int = 1 << 20):
    """V[:, :keep] <- S^T V[:, :m] in place, a column chunk at a time so the extra memory is one
    chunk rather than `keep` more n-vectors."""
    n = V.shape[2]
    for c0 in range(0, n, chunk):
        blk = V[:, :m, c0: c0 + chunk].clone()
        V[:, :keep, c0: c0 + chunk] = torch.einsum("bmk,bmn->bkn", S, blk)


@dataclass
class TraceEstimate:
    """value: [B] estimate of tr(A); stderr: [B] standard error of its random part (0 when the
    sketch captured the operator exactly); matvecs: products used."""

    value: Tensor
    stderr: Tensor
    matvecs: int


def hutchpp(matvec: MatVec, n: int, *, batch: int = 1, num_matvecs: int = 30,
            dtype: torch.dtype = torch.float32, device=None,
            generator: torch.Generator | None = None) -> TraceEstimate:
    """tr(A) by Hutch++: a rank-s sketch Q = orth(A S) takes the top of the spectrum exactly and
    Hutchinson with s Rademacher probes estimates the trace of the deflated rest,
    tr(A) ≈ tr(QᵀAQ) + (1/s) Σ gᵢᵀ(I−QQᵀ)A(I−QQᵀ)gᵢ, with s = num_matvecs / 3.
    When n <= num_matvecs the trace is computed exactly from the n unit vectors."""
    fn = "hutchpp"
    _check_int(fn, "n", n, 1)
    _check_int(fn, "num_matvecs", num_matvecs, 3)
    _check_int(fn, "batch", batch, 1)
    device = torch.device(device) if device is not None else torch.device("cpu")
    B = batch
    if n <= num_matvecs:
        total = torch.zeros(B, dtype=torch.float64)
        for j in range(n):
            e = torch.zeros(B, n, dtype=dtype, device=device)
            e[:, j] = 1
            total += _product(fn, matvec, e, j, dtype)[:, j].to(torch.float64).cpu()
        return TraceEstimate(total, torch.zeros(B, dtype=torch.float64), n)
    s = num_matvecs // 3
    # Sketch Q = orth(A S), built in place: memory s·n numbers (plus one product in flight).
    Q = torch.empty(B, s, n, dtype=dtype, device=device)
    for j in range(s):
        Q[:, j] = _product(fn, matvec, _rademacher((B, n), dtype, device, generator), j, dtype)
    for j in range(s):
        q = Q[:, j]
        scale = _norm(q)
        _orthogonalize(Q[:, :j], q)
        norm = _norm(q)
        # a direction the earlier ones already span (A of low rank) contributes nothing
        inv = torch.where(norm > 1e3 * torch.finfo(dtype).eps * scale.clamp_min(1e-300),
                          1 / norm.clamp_min(1e-300), torch.zeros_like(norm))
        q.mul_(inv.to(dtype=dtype, device=q.device)[:, None])
    top = torch.zeros(B, dtype=torch.float64)
    for j in range(s):
        top += (Q[:, j].double() * _product(fn, matvec, Q[:, j], s + j, dtype).double()).sum(1).cpu()
    samples = torch.empty(B, s, dtype=torch.float64)
    for j in range(s):
        g = _rademacher((B, n), dtype, device, generator)
        _orthogonalize(Q, g)
        samples[:, j] = (g.double() * _product(fn, matvec, g, 2 * s + j, dtype).double()).sum(1).cpu()
    value = top + samples.mean(1)
    stderr = samples.std(1) / math.sqrt(s) if s > 1 else torch.full((B,), float("inf"), dtype=torch.float64)
    return TraceEstimate(value, stderr, 3 * s)


@dataclass
class Quadrature:
    """Gauss quadrature of the spectral measure of A seen from each probe (SLQ).

    nodes, weights: [B, P, s] float64 (P probes, s Lanczos steps); weights sum to 1 per probe.
    n: operator dimension. tr f(A) ≈ n · mean_p Σ_j w_pj f(θ_pj).
    """

    nodes: Tensor
    weights: Tensor
    n: int
    matvecs: int

    def trace(self, f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """(estimate, standard error over probes) of tr f(A), each [B]."""
        per_probe = self.n * (self.weights * f(self.nodes)).sum(-1)
        P = per_probe.shape[1]
        se = per_probe.std(1) / math.sqrt(P) if P > 1 else torch.full_like(per_probe[:, 0], float("inf"))
        return per_probe.mean(1), se

    def entropy(self) -> tuple[Tensor, Tensor]:
        """Spectral entropy of a PSD operator, H = log T − tr(A log A)/T with T = tr A, i.e.
        −Σ pᵢ log pᵢ for pᵢ = λᵢ/Σλⱼ; with the delta-method standard error of the ratio."""
        lam = self.nodes.clamp_min(0)
        t = self.n * (self.weights * lam).sum(-1)                       # [B, P]
        e = self.n * (self.weights * _xlogx(lam)).sum(-1)
        P = t.shape[1]
        tm, em = t.mean(1), e.mean(1)
        H = torch.where(tm > 0, torch.log(tm.clamp_min(1e-300)) - em / tm.clamp_min(1e-300), torch.zeros_like(tm))
        if P < 2:
            return H, torch.full_like(H, float("inf"))
        # H(t, e) = log t − e/t: gradient (1/t + e/t², −1/t)
        gt = 1 / tm + em / tm**2
        ge = -1 / tm
        ct, ce = t - tm[:, None], e - em[:, None]
        var = (gt[:, None] * ct + ge[:, None] * ce).pow(2).sum(1) / (P - 1) / P
        se = torch.where(tm > 0, var.sqrt(), torch.zeros_like(tm))
        return H, se

    def density(self, grid: Tensor, bandwidth: float) -> Tensor:
        """Gaussian-smoothed spectral density on `grid` [G], normalised to integrate to n: [B, G]."""
        g = grid.to(torch.float64)
        k = torch.exp(-0.5 * ((g[None, None, None, :] - self.nodes[..., None]) / bandwidth) ** 2)
        k = k / (bandwidth * math.sqrt(2 * math.pi))
        return self.n * (self.weights[..., None] * k).sum(2).mean(1)


def _xlogx(x: Tensor) -> Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp_min(1e-300)), torch.zeros_like(x))


def slq(matvec: MatVec, n: int, *, batch: int = 1, num_probes: int = 8, steps: int = 20,
        dtype: torch.dtype = torch.float32, device=None,
        generator: torch.Generator | None = None) -> Quadrature:
    """Stochastic Lanczos quadrature with Rademacher probes and the plain three-term recurrence
    (no reorthogonalisation: three n-vectors per probe; lost orthogonality duplicates Ritz values
    but the Gauss rule still integrates polynomials of degree < 2·steps exactly in exact arithmetic
    and stays accurate in floating point, Knizhnerman 1996). When the recurrence breaks down (the
    probe lies in an invariant subspace) the remaining coefficients are zero and contribute nodes of
    zero weight. Probes run one after another; each step is one call on the whole batch."""
    fn = "slq"
    _check_int(fn, "n", n, 1)
    _check_int(fn, "num_probes", num_probes, 1)
    _check_int(fn, "steps", steps, 1)
    _check_int(fn, "batch", batch, 1)
    device = torch.device(device) if device is not None else torch.device("cpu")
    B = batch
    s = min(steps, n)
    nodes = torch.empty(B, num_probes, s, dtype=torch.float64)
    weights = torch.empty(B, num_probes, s, dtype=torch.float64)
    tiny = torch.finfo(dtype).eps
    matvecs = 0
    for p in range(num_probes):
        v = _rademacher((B, n), dtype, device, generator) / math.sqrt(n)
        v_prev = torch.zeros_like(v)
        alpha = torch.zeros(B, s, dtype=torch.float64)
        beta = torch.zeros(B, s, dtype=torch.float64)
        b_prev = torch.zeros(B, dtype=dtype, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        scale = torch.zeros(B, dtype=torch.float64, device=device)
        for j in range(s):
            w = _product(fn, matvec, v, matvecs, dtype)
            matvecs += 1
            a = (w * v).sum(1)
            w = w - a[:, None] * v - b_prev[:, None] * v_prev
            b = _norm(w)
            a64 = torch.where(alive, a.double(), torch.zeros_like(a.double()))
            scale = torch.maximum(scale, a64.abs() + b)
            alive = alive & (b > 10 * tiny * scale)
            b = torch.where(alive, b, torch.zeros_like(b))
            alpha[:, j] = a64.cpu()
            beta[:, j] = b.cpu()
            inv = torch.where(alive, 1 / b.clamp_min(1e-300), torch.zeros_like(b)).to(dtype)
            v_prev, v = v, w * inv[:, None]
            b_prev = b.to(dtype)
        T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[:, p] = theta
        weights[:, p] = S[:, 0, :] ** 2
    return Quadrature(nodes, weights, n, matvecs)
