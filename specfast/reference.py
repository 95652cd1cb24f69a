"""Pure-torch reference implementations of every native op.

They are the test oracle and the fallback on devices without a native kernel (the fallback always
warns, see ``specfast._native.fallback``). They favour clarity and exactness over speed: dense
float64 SVDs where the native code iterates, and the same stochastic Lanczos quadrature algorithm
as the native code (with torch's own random probes) for the SLQ op.

Shapes follow the op schemas in ``specfast.ops``:
    W: [*batch, m, n]      X: [*batch, n, c]      k singular values per matrix.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_EPS64 = torch.finfo(torch.float64).eps


def gram_matvec(W: Tensor, X: Tensor) -> Tensor:
    """Y = Wᵀ (W X), computed in float64, returned in X's dtype.  W [*b, m, n], X [*b, n, c]."""
    Wd = W.to(torch.float64)
    Xd = X.to(torch.float64)
    return (Wd.mT @ (Wd @ Xd)).to(X.dtype)


def krylov_svd(W: Tensor, k: int, largest: bool, want_vectors: bool):
    """Exact top-k (largest) or bottom-k (smallest) singular triplets from a float64 SVD.

    Returns (S [*b,k], bound [*b,k], iters [*b], converged [*b], status [*b], U [*b,m,k'], V [*b,n,k'])
    with k' = k if want_vectors else 0. Entries beyond min(m, n) are NaN (bound inf).
    """
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    p = min(m, n)
    kk = min(k, p)
    Wd = W.to(torch.float64)
    fin = torch.isfinite(Wd).flatten(-2).all(-1)
    Wd = torch.where(fin[..., None, None], Wd, torch.zeros_like(Wd))  # LAPACK must not see NaN
    if want_vectors:
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
    else:
        S = torch.linalg.svdvals(Wd)
        U = S.new_zeros((*batch, m, p))
        Vh = S.new_zeros((*batch, p, n))
    if largest:
        sel = slice(0, kk)
    else:
        sel = slice(p - kk, p)
    s = S[..., sel]
    u = U[..., :, sel]
    v = Vh[..., sel, :].mT
    if not largest:
        s, u, v = s.flip(-1), u.flip(-1), v.flip(-1)
    smax = S[..., :1] if p > 0 else torch.zeros(*batch, 1, dtype=torch.float64, device=W.device)
    bound = (4 * _EPS64 * math.sqrt(max(m, n, 1)) * smax).expand_as(s).clone()
    S_out = torch.full((*batch, k), float("nan"), dtype=torch.float64, device=W.device)
    B_out = torch.full((*batch, k), float("inf"), dtype=torch.float64, device=W.device)
    S_out[..., :kk] = s
    B_out[..., :kk] = bound
    S_out = torch.where(fin[..., None], S_out, torch.full_like(S_out, float("nan")))
    B_out = torch.where(fin[..., None], B_out, torch.full_like(B_out, float("inf")))
    kv = k if want_vectors else 0
    U_out = torch.zeros((*batch, m, kv), dtype=torch.float64, device=W.device)
    V_out = torch.zeros((*batch, n, kv), dtype=torch.float64, device=W.device)
    if want_vectors:
        U_out[..., :kk] = u
        V_out[..., :kk] = v
    iters = torch.zeros(batch, dtype=torch.int64, device=W.device)
    converged = fin & (kk == k)
    status = torch.where(fin, 0, 1).to(torch.int32)
    return S_out, B_out, iters, converged, status, U_out, V_out


def frobenius_scan(W: Tensor):
    """(‖W‖_F² over finite entries in float64, count of non-finite entries) per matrix."""
    Wd = W.to(torch.float64)
    fin = torch.isfinite(Wd)
    fro = torch.where(fin, Wd, torch.zeros_like(Wd)).square().sum((-2, -1))
    bad = (~fin).sum((-2, -1)).to(torch.int64)
    return fro, bad


def gram_dim(m: int, n: int) -> int:
    """Dimension of the Gram operator the native SLQ iterates on (it picks the cheaper side)."""
    from ._native import _C

    if _C is not None:
        return n if _C.choose_side(m, n, 0, True) == 0 else m
    return n


def slq_gram(W: Tensor, nprobe: int, steps: int, seed: int):
    """Stochastic Lanczos quadrature on A = WᵀW (or WWᵀ, matching the native side choice).

    Returns nodes, weights [*b, nprobe, steps] (zero-padded) such that for each probe z,
    zᵀ f(A) z / ‖z‖² ≈ Σ_j weights_j f(nodes_j); dims [*b]; status [*b].
    """
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    Wf = W.to(torch.float64).reshape(-1, m, n)
    B = Wf.shape[0]
    dim = gram_dim(m, n)
    right = dim == n
    L = min(steps, dim)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
    nodes = torch.zeros(B, nprobe, steps, dtype=torch.float64)
    weights = torch.zeros(B, nprobe, steps, dtype=torch.float64)
    status = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        Wb = Wf[b].cpu()
        if not torch.isfinite(Wb).all():
            status[b] = 1
            continue
        apply = (lambda x: Wb.T @ (Wb @ x)) if right else (lambda x: Wb @ (Wb.T @ x))
        for pr in range(nprobe):
            z = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
            Q = [z / math.sqrt(dim)]
            alpha, beta = [], []
            for j in range(L):
                y = apply(Q[j])
                Qm = torch.stack(Q)
                for _ in range(2):
                    h = Qm @ y
                    y = y - Qm.T @ h
                    if _ == 0:
                        a = h[j].item()
                    else:
                        a += h[j].item()
                alpha.append(a)
                bn = torch.linalg.vector_norm(y).item()
                scale = abs(a) + (beta[-1] if beta else 0.0)
                if j + 1 >= L or bn <= 1e-12 * max(scale, 1e-300):
                    break
                beta.append(bn)
                Q.append(y / bn)
            l = len(alpha)
            T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
            if l > 1:
                bt = torch.tensor(beta[: l - 1], dtype=torch.float64)
                T += torch.diag(bt, 1) + torch.diag(bt, -1)
            ev, V = torch.linalg.eigh(T)
            nodes[b, pr, :l] = ev.flip(0)
            weights[b, pr, :l] = (V[0] ** 2).flip(0)
    dims = torch.full((B,), dim, dtype=torch.int64)
    dev = W.device
    return (nodes.reshape(*batch, nprobe, steps).to(dev), weights.reshape(*batch, nprobe, steps).to(dev),
            dims.reshape(batch).to(dev), status.reshape(batch).to(dev))
