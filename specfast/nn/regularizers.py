"""Spectral regularisers for training: differentiable scalars to add to the loss (times your λ).

* ``WeightSpectralPenalty``  Σ_l σ₁(W_l)², warm-started block power iteration with Rayleigh–Ritz
  (one fused Gram product per matrix per call, plus one W v with autograd).
* ``SpectralEntropyPenalty`` Σ_l (1 − H(W_l)/log r_l), exact, through differentiable singular values.
* ``jacobian_spectral_penalty``  mean_i ‖J_f(x_i)‖₂², matrix-free power steps (jvp/vjp).
* ``jacobian_frobenius_penalty`` mean_i ‖J_f(x_i)‖_F², unbiased random projections.

Formulas, estimators (bias and variance), costs and usage: docs/regularizers.md.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from .._native import has_native_cpu
from .parametrizations import _GRAM_MIN_ELEMS, _HALF, _acc_dtype, _gram, _matvec, _mv_full

__all__ = ["WeightSpectralPenalty", "SpectralEntropyPenalty", "jacobian_spectral_penalty",
           "jacobian_frobenius_penalty"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PARAM_RE = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original\d*$")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------ selecting matrices
@dataclass
class _Entry:
    name: str
    # "matrix" [m, n] | "conv" [out, in, k...] | "conv_transpose" [in, out, k...] | "stack" [..., m, n]
    kind: str
    tensor: Tensor | None   # held for plain parameter lists; None: looked up in the module at each call


def _matrix_view(p: Tensor, kind: str) -> Tensor:
    """The matrix (or [..., m, n] stack) whose spectrum is penalised."""
    if kind == "conv":
        return p.flatten(1)                       # [out, in·k…]: the reshaped kernel (Miyato et al.)
    if kind == "conv_transpose":
        return p.transpose(0, 1).flatten(1)       # [out, in·k…]: torch's dim=1 rule for ConvTranspose
    return p


def _kind_from_ndim(ndim: int) -> str:
    return "matrix" if ndim == 2 else ("stack" if ndim == 3 else "conv")


def _owner(module: nn.Module, name: str):
    """(owning module, attribute name) of a parameter name, seeing through parametrizations."""
    m = _PARAM_RE.match(name)
    if m:
        prefix, leaf = m.group(1), m.group(2)
        return (module.get_submodule(prefix) if prefix else module), leaf
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _collect(fn: str, module_or_params, include) -> tuple[nn.Module | None, list[_Entry]]:
    """The matrices a regulariser works on: (module or None, entries)."""
    if isinstance(module_or_params, nn.Module):
        module = module_or_params
        named = list(module.named_parameters())
        candidates = []
        for name, p in named:
            owner, leaf = _owner(module, name)
            if leaf == "weight" and isinstance(owner, _CONVT) and p.ndim >= 3:
                kind = "conv_transpose"
            elif leaf == "weight" and isinstance(owner, _CONV) and p.ndim >= 3:
                kind = "conv"
            else:
                kind = "matrix" if p.ndim == 2 else "stack"
            candidates.append((name, p, kind))
        hold = False
    else:
        module = None
        if isinstance(module_or_params, Tensor):
            raise TypeError(f"{fn}: module_or_params must be an nn.Module, an iterable of parameters, "
                            f"of (name, parameter) pairs, or a dict; got a single tensor (wrap it in a list)")
        if isinstance(module_or_params, dict):
            items = list(module_or_params.items())
        else:
            try:
                items = list(module_or_params)
            except TypeError:
                raise TypeError(f"{fn}: module_or_params must be an nn.Module, an iterable of parameters, "
                                f"of (name, parameter) pairs, or a dict; "
                                f"got {type(module_or_params).__name__}") from None
        candidates = []
        for i, it in enumerate(items):
            if isinstance(it, Tensor):
                name, p = str(i), it
            elif isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], Tensor):
                name, p = str(it[0]), it[1]
            else:
                raise TypeError(f"{fn}: module_or_params[{i}] must be a tensor or a (name, tensor) pair; "
                                f"got {type(it).__name__}")
            candidates.append((name, p, _kind_from_ndim(p.ndim)))
        hold = True
    for name, p, _ in candidates:
        if p.dtype not in _FLOAT:
            raise TypeError(f"{fn}: parameter '{name}' must have dtype float16, bfloat16, float32 or float64; "
                            f"got {p.dtype}")
    known = {name for name, _, _ in candidates}
    if include is None:
        chosen = [c for c in candidates if c[1].ndim >= 2 and c[1].requires_grad]
    elif callable(include):
        chosen = [c for c in candidates if c[1].ndim >= 2 and include(c[0], c[1])]
    elif isinstance(include, (list, tuple, set)):
        if all(isinstance(x, str) for x in include):
            missing = [x for x in include if x not in known]
            if missing:
                listed = ", ".join(sorted(known)[:10]) + (", …" if len(known) > 10 else "")
                raise ValueError(f"{fn}: include names {missing[:5]}, which are not parameters here "
                                 f"(parameters: {listed})")
            wanted = set(include)
            chosen = [c for c in candidates if c[0] in wanted]
        elif all(isinstance(x, Tensor) for x in include):
            ids = {id(x) for x in include}
            chosen = [c for c in candidates if id(c[1]) in ids]
            if len(chosen) != len(ids):
                raise ValueError(f"{fn}: include lists {len(ids) - len(chosen)} tensor(s) that are not "
                                 f"parameters of module_or_params")
        else:
            raise TypeError(f"{fn}: include must be None, a callable (name, param) -> bool, or a list of "
                            f"parameter names or of parameters; got a list of "
                            f"{sorted({type(x).__name__ for x in include})}")
        for name, p, _ in chosen:
            if p.ndim < 2:
                raise ValueError(f"{fn}: include names '{name}' with shape {tuple(p.shape)}; every selected "
                                 f"parameter must have at least 2 dimensions")
    else:
        raise TypeError(f"{fn}: include must be None, a callable (name, param) -> bool, or a list of "
                        f"parameter names or of parameters; got {type(include).__name__}")
    if not chosen:
        raise ValueError(f"{fn}: no weight matrices selected (need parameters with at least 2 dimensions"
                         f"{' that require grad' if include is None else ''}; "
                         f"got {len(candidates)} parameter(s))")
    return module, [_Entry(name, kind, p if hold else None) for name, p, kind in chosen]


class _Selection:
    """Resolves the selected parameters at each call (so a parameter replaced on the module is seen)."""

    def __init__(self, fn: str, module_or_params, include):
        self.fn = fn
        self.module, self.entries = _collect(fn, module_or_params, include)

    def tensors(self) -> list[tuple[_Entry, Tensor]]:
        if self.module is None:
            return [(e, e.tensor) for e in self.entries]
        params = dict(self.module.named_parameters())
        out = []
        for e in self.entries:
            p = params.get(e.name)
            if p is None:
                raise ValueError(f"{self.fn}: parameter '{e.name}' is no longer in the module (it was "
                                 f"removed or renamed since the regulariser was built); build a new one")
            out.append((e, p))
        return out

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


# ------------------------------------------------------------------------------ autograd helpers
class _MatvecAcc(torch.autograd.Function):
    """y = W v for a half-precision W with float32 accumulation (W widened a block at a time); v is a
    constant. Linear in W, so the backward ``outer(g, v)`` is exact to every order."""

    @staticmethod
    def forward(W, v):
        return _matvec(W, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        W, v = inputs
        ctx.wdtype = W.dtype
        ctx.save_for_backward(v)
        ctx.save_for_forward(v)

    @staticmethod
    def backward(ctx, gy):
        (v,) = ctx.saved_tensors
        return gy.to(ctx.wdtype).unsqueeze(-1) * v.to(ctx.wdtype).unsqueeze(-2), None

    @staticmethod
    def jvp(ctx, dW, dv):
        (v,) = ctx.saved_tensors
        return torch.matmul(dW.to(v.dtype), v.unsqueeze(-1)).squeeze(-1)


_MatvecAcc.forward.__signature__ = inspect.signature(_MatvecAcc.forward)   # see parametrizations.py


def _wv(W: Tensor, v: Tensor) -> Tensor:
    """W v with autograd through W (v constant), accumulated in float32 or wider."""
    if W.dtype in _HALF:
        return _MatvecAcc.apply(W, v)
    return _mv_full(W, v.to(W.dtype))


# ------------------------------------------------------------------------------ weight spectral norm
def _total(terms: list[Tensor]) -> Tensor:
    """The sum of per-matrix scalar terms, in float64 if any term is, else float32."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(terms[0].device, dtype) for t in terms]).sum()


class WeightSpectralPenalty:
    """Σ_l σ₁(W_l)² over the selected weight matrices (differentiable; add ``λ · penalty()`` to the loss).

    module_or_params: an ``nn.Module`` (Linear weights as they are, Conv weights reshaped to
        ``[out, in·k…]``, ConvTranspose weights to ``[out, in·k…]`` as well, other 3-D and higher
        parameters as stacks ``[..., m, n]`` with one σ per matrix, e.g. fused MoE experts), or an
        iterable of parameters / ``(name, parameter)`` pairs / a dict (2-D: a matrix; 3-D: a stack;
        4-D and more: a convolution kernel).
    include: None (every parameter with ≥ 2 dims that requires grad), a predicate
        ``(name, param) -> bool``, or a list of names or of parameters.
    n_power_iterations: Gram products per matrix and call (default 1).
    block_size: vectors tracked per matrix (default 4, at most min(m, n)). The top singular values
        of a penalised matrix are pushed together and cross; a block follows the top few directions,
        and Rayleigh–Ritz on it picks the largest, where a single vector would keep following a
        direction that is no longer the top one (docs/regularizers.md §2 has the measured errors).

    Each call, per matrix (no autograd): ``Z = WᵀW V`` through specfast's fused Gram product (one
    read of W for the whole block; every matrix of ≥ 2²⁰ elements in one grouped native call on the
    CPU; smaller ones through two torch products, cheaper than a native call's fixed cost), the Rayleigh–Ritz
    pair of ``VᵀZ`` gives ``v = V s``, and ``V ← orth(Z)`` is carried to the next call (warm start).
    Then, with autograd, ``σ̂² = ‖W v‖²`` (one mat-vec; gradient ``2 W v vᵀ = 2 σ̂ u vᵀ``). The first
    call starts from ``specfast.svd_lowrank`` (certified Lanczos), so the first value is already
    accurate. ``σ̂ ≤ σ₁`` always (a Rayleigh quotient).
    """

    _fn = "WeightSpectralPenalty"

    def __init__(self, module_or_params, *, n_power_iterations: int = 1, include=None, block_size: int = 4):
        for arg, val in (("n_power_iterations", n_power_iterations), ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{self._fn}: {arg} must be an integer >= 1; got {val!r}")
        self.n_power_iterations = n_power_iterations
        self.block_size = block_size
        self._sel = _Selection(self._fn, module_or_params, include)
        self._V: dict[str, Tensor] = {}
        self._shape: dict[str, tuple] = {}
        self._sigma: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        """Names of the penalised parameters."""
        return self._sel.names

    def reset(self, name: str | None = None) -> None:
        """Forget the warm-start vectors (of one parameter, or all): the next call re-initialises them."""
        if name is not None and name not in self._sel.names:
            raise ValueError(f"{self._fn}.reset: '{name}' is not one of the penalised parameters "
                             f"({', '.join(self._sel.names[:10])})")
        for k in ([name] if name is not None else list(self._V)):
            self._V.pop(k, None)
            self._shape.pop(k, None)
            self._sigma.pop(k, None)

    def _block(self, e: _Entry, W: Tensor) -> Tensor:
        """The warm-start block [*B, n, k] of one matrix (initialised from a converged SVD), on W's
        device in the accumulation dtype."""
        acc = _acc_dtype(W.dtype)
        shape = tuple(W.shape)
        old = self._shape.get(e.name)
        if old is not None and old != shape:
            raise ValueError(f"{self._fn}: parameter '{e.name}' changed shape from {old} to {shape} since the "
                             f"last call; call .reset('{e.name}') (or .reset()) to start its power iteration afresh")
        V = self._V.get(e.name)
        if V is None:
            V = self._init_block(W.detach(), min(self.block_size, *W.shape[-2:]), acc)
            self._shape[e.name] = shape
        elif V.device != W.device or V.dtype != acc:
            V = V.to(W.device, acc)          # the module moved (.to(device) / .double()): follow it
        return V

    @staticmethod
    def _init_block(W: Tensor, k: int, acc) -> Tensor:
        m, n = W.shape[-2:]
        if k == 0:
            return torch.zeros((*W.shape[:-2], n, 0), dtype=acc, device=W.device)
        from ..linalg import svd_lowrank
        # specfast's kernels run on the CPU: other devices start from a host copy (once)
        Wc = W if W.device.type == "cpu" else W.cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # an unconverged start is still a good start
            _, _, V = svd_lowrank(Wc, q=k, tol=1e-5)
        V = V.to(device=W.device, dtype=acc)
        if not bool(torch.isfinite(V).all()):
            V = torch.linalg.qr(torch.randn(V.shape, dtype=acc, device=W.device)).Q
        return V

    def _gram_blocks(self, mats: list[Tensor], Vs: list[Tensor]) -> list[Tensor]:
        """Z = WᵀW V for every matrix: on the CPU one grouped native call per block width (every
        matrix of a stack an item of it), elsewhere one batched call per matrix or stack."""
        native = has_native_cpu() and all(W.device.type == "cpu" and type(W) is Tensor for W in mats)
        if not native:
            return [_gram_block(W, V) for W, V in zip(mats, Vs)]
        Zs: list = [None] * len(mats)
        groups: dict = {}
        for i, (W, V) in enumerate(zip(mats, Vs)):
            if W.numel() == 0 or V.shape[-1] == 0:
                Zs[i] = torch.zeros_like(V)
            elif W.numel() < _GRAM_MIN_ELEMS:
                # small matrices: two torch products beat the fixed cost of a native call
                # (measured for the 784-256-256-10 MLP: ~60 us vs ~200 us per call)
                A = W.to(V.dtype)
                Zs[i] = A.mT @ (A @ V)
            else:
                groups.setdefault((V.shape[-1], V.dtype), []).append(i)
        for idx in groups.values():
            flat_W, flat_V, counts = [], [], []
            for i in idx:
                W, V = mats[i], Vs[i]
                W3, V3 = W.reshape(-1, *W.shape[-2:]), V.reshape(-1, *V.shape[-2:])
                flat_W.extend(W3.unbind(0))
                flat_V.extend(V3.unbind(0))
                counts.append(W3.shape[0])
            out = ops.call(ops.gram_matvec_grouped_op, flat_W, flat_V)
            k = 0
            for i, c in zip(idx, counts):
                Zs[i] = torch.stack(out[k:k + c]).reshape(Vs[i].shape).to(Vs[i].dtype)
                k += c
        return Zs

    def _iterate(self, mats: list[Tensor], Vs: list[Tensor]):
        """n_power_iterations block steps; returns (top Ritz vectors v [*B, n], next blocks)."""
        vs = None
        for it in range(self.n_power_iterations):
            Zs = self._gram_blocks(mats, Vs)
            if it == self.n_power_iterations - 1:
                vs = _top_ritz_many(Vs, Zs)
            Vs = [_orth(Z) for Z in Zs]
        return vs, Vs

    def penalty(self) -> Tensor:
        """Σ σ̂² (a differentiable scalar, float32, or float64 if any selected parameter is float64)."""
        pairs = self._sel.tensors()
        with torch.no_grad():
            mats = [_matrix_view(p.detach(), e.kind) for e, p in pairs]
            Vs = [self._block(e, W) for (e, _), W in zip(pairs, mats)]
            vs, Vs = self._iterate(mats, Vs)
        terms = []
        for (e, p), v, V in zip(pairs, vs, Vs):
            y = _wv(_matrix_view(p, e.kind), v)                 # [*B, m], autograd through W
            s2 = y.square().sum(-1)                             # σ̂² per matrix
            self._V[e.name] = V
            self._sigma[e.name] = s2.detach().sqrt()
            terms.append(s2.sum())
        return _total(terms)

    __call__ = penalty

    def sigmas(self) -> dict[str, Tensor]:
        """Detached σ̂ per penalised parameter from the last ``penalty()`` call (a 0-dim tensor per
        matrix, ``[E]`` for a stack); estimated now, without autograd and without advancing the
        iteration, for parameters not seen by a call yet."""
        if len(self._sigma) < len(self._sel.entries):
            with torch.no_grad():
                for e, p in self._sel.tensors():
                    if e.name not in self._sigma:
                        W = _matrix_view(p.detach(), e.kind)
                        V = self._block(e, W)
                        self._V[e.name] = V
                        v = _top_ritz(V, self._gram_blocks([W], [V])[0])
                        self._sigma[e.name] = torch.linalg.vector_norm(_matvec(W, v), dim=-1)
        return {n: self._sigma[n] for n in self._sel.names}


def _gram_block(W: Tensor, V: Tensor) -> Tensor:
    """WᵀW V for a block V [*B, n, k] (no autograd)."""
    if W.numel() == 0 or V.shape[-1] == 0:
        return torch.zeros_like(V)
    return torch.stack([_gram(W, V[..., j]) for j in range(V.shape[-1])], -1)


def _orth(Z: Tensor) -> Tensor:
    """An orthonormal basis of span(Z) (a normalised vector for one column)."""
    if Z.shape[-1] == 0:
        return Z
    if Z.shape[-1] == 1:
        n = torch.linalg.vector_norm(Z, dim=-2, keepdim=True)
        flat = torch.ones_like(Z) / math.sqrt(Z.shape[-2])
        return torch.where(n > 0, Z / n.clamp_min(torch.finfo(Z.dtype).tiny), flat)
    return torch.linalg.qr(Z).Q


def _top_ritz_many(Vs: list[Tensor], Zs: list[Tensor]) -> list[Tensor]:
    """_top_ritz for many matrices, with one batched k×k eigensolver call per (k, dtype, device)."""
    out: list = [None] * len(Vs)
    groups: dict = {}
    for i, (V, Z) in enumerate(zip(Vs, Zs)):
        k = V.shape[-1]
        if k <= 1:
            out[i] = _top_ritz(V, Z)
        else:
            groups.setdefault((k, V.dtype, V.device), []).append(i)
    for (k, _, _), idx in groups.items():
        Hs = [Vs[i].mT @ Zs[i] for i in idx]
        H = torch.cat([h.reshape(-1, k, k) for h in Hs])
        _, vecs = torch.linalg.eigh(0.5 * (H + H.mT))
        top = vecs[..., -1]                                   # [total, k]
        j = 0
        for i, h in zip(idx, Hs):
            c = h.numel() // (k * k)
            s = top[j:j + c].reshape(*h.shape[:-2], k, 1)
            out[i] = (Vs[i] @ s).squeeze(-1)
            j += c
    return out


def _top_ritz(V: Tensor, Z: Tensor) -> Tensor:
    """The top Ritz vector V s of WᵀW on span(V), from Z = WᵀW V (H = VᵀZ, k×k)."""
    if V.shape[-1] == 0:
        return V.sum(-1)
    if V.shape[-1] == 1:
        return V[..., 0]
    H = V.mT @ Z
    _, vecs = torch.linalg.eigh(0.5 * (H + H.mT))
    return (V @ vecs[..., -1:]).squeeze(-1)


# ------------------------------------------------------------------------------ spectral entropy
class SpectralEntropyPenalty:
    """Spectral concentration penalty Σ_l (1 − H(W_l)/log r_l), each term in [0, 1].

    H = −Σ pᵢ log pᵢ with pᵢ = σᵢ² / Σⱼ σⱼ² (the spectral entropy), r_l = min(m, n): a term is 0
    for a flat spectrum (all σᵢ equal) and 1 for a rank-1 matrix. Exact, through differentiable singular
    values (``torch.linalg.svdvals`` in float32, float64 for float64 weights): O(m n min(m, n)) per
    matrix and step — fine for MLP/CNN layers, expensive for large transformer matrices (a
    4096×4096 SVD takes seconds on a CPU). Matrices with r = 1 and all-zero matrices contribute 0.
    Same selection rules as :class:`WeightSpectralPenalty`.
    """

    _fn = "SpectralEntropyPenalty"

    def __init__(self, module_or_params, include=None):
        self._sel = _Selection(self._fn, module_or_params, include)
        self._terms: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return self._sel.names

    @staticmethod
    def concentration(W: Tensor) -> Tensor:
        """1 − H(W)/log r for a matrix or a stack ``[..., m, n]`` (differentiable; ``[...]``)."""
        m, n = W.shape[-2:]
        r = min(m, n)
        acc = _acc_dtype(W.dtype)
        if r < 2:
            return torch.zeros(W.shape[:-2], dtype=acc, device=W.device) + 0.0 * W.to(acc).sum((-2, -1))
        A = W.to(acc)
        s = torch.linalg.svdvals(A.mT if m < n else A)   # LAPACK is faster on the tall orientation
        s2 = s.square()
        F = s2.sum(-1, keepdim=True)
        p = s2 / F.clamp_min(torch.finfo(acc).tiny)
        H = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
        term = 1.0 - H / math.log(r)
        return torch.where(F[..., 0] > 0, term, torch.zeros_like(term))

    def penalty(self) -> Tensor:
        """Σ_l (1 − H_l / log r_l), summed over matrices (and over the matrices of each stack)."""
        terms = []
        for e, p in self._sel.tensors():
            t = self.concentration(_matrix_view(p, e.kind))
            self._terms[e.name] = t.detach()
            terms.append(t.sum())
        return _total(terms)

    __call__ = penalty

    def terms(self) -> dict[str, Tensor]:
        """Detached per-matrix terms from the last ``penalty()`` call (computed now if none yet)."""
        if len(self._terms) < len(self._sel.entries):
            with torch.no_grad():
                for e, p in self._sel.tensors():
                    if e.name not in self._terms:
                        self._terms[e.name] = self.concentration(_matrix_view(p.detach(), e.kind))
        return {n: self._terms[n] for n in self._sel.names}


# ------------------------------------------------------------------------------ input Jacobians
def _check_model_input(fn: str, model, x):
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable (an nn.Module or a function); got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating tensor (the Jacobian is taken with respect to it); "
                        f"got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{fn}: x must have a leading batch dimension of size >= 1; got shape {tuple(x.shape)}")
    if isinstance(model, nn.Module):
        for name, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                warnings.warn(f"{fn}: '{name}' is a {type(mod).__name__} in training mode: it couples the "
                              f"samples of the batch, so per-sample Jacobians are not defined (and its running "
                              f"statistics are updated at every model call); put normalisation layers in eval "
                              f"mode for the penalty", RuntimeWarning, stacklevel=3)
                break


def _check_output(fn: str, out, B: int):
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}: model(x) must return a tensor; got {type(out).__name__}")
    if out.ndim < 1 or out.shape[0] != B:
        raise ValueError(f"{fn}: model(x) must return a tensor with the batch dimension first (size {B}); "
                         f"got shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"{fn}: model(x) must return a floating tensor; got dtype {out.dtype}")


def _check_generator(fn: str, generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None; got {type(generator).__name__}")


def _draw(shape, generator, device, dtype, distribution="gaussian") -> Tensor:
    """Random probes, drawn on the generator's device (the global RNG of `device` without one)."""
    gdev = generator.device if generator is not None else device
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    if distribution == "gaussian":
        t = torch.randn(shape, generator=generator, device=gdev, dtype=wd)
    else:  # rademacher
        t = torch.randint(0, 2, shape, generator=generator, device=gdev).to(wd).mul_(2).sub_(1)
    return t.to(device=device, dtype=dtype)


class _SameRandomness:
    """Replays the RNG state captured at construction before every model call, so that stochastic
    layers (dropout) draw the same masks in every product of one penalty evaluation: the power
    iteration then works on one operator. Afterwards the RNG is where one forward pass leaves it."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda" and torch.cuda.is_available():
            self.idx = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.idx)

    def __call__(self, model, x):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.idx)
        return model(x)


def _per_sample_unit(t: Tensor) -> Tensor:
    flat = t.reshape(t.shape[0], -1)
    n = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    return (flat / n.clamp_min(torch.finfo(flat.dtype).tiny)).reshape(t.shape)


def jacobian_spectral_penalty(model: Callable, x: Tensor, *, n_power_iterations: int = 2,
                              generator: torch.Generator | None = None) -> Tensor:
    """mean_i ‖J_i‖₂², J_i = ∂f(x_i)/∂x_i, by matrix-free power iteration (differentiable in θ).

    Per sample, from a Gaussian start v (drawn from ``generator``): ``n_power_iterations`` steps
    ``u ← J v/‖J v‖`` (forward mode, ``torch.func.jvp``) and ``v ← Jᵀu/‖Jᵀu‖`` (reverse mode), all
    samples at once; the last ``Jᵀu`` is taken with ``create_graph=True`` and the estimate is
    ``σ̂ᵢ² = ‖Jᵢᵀ uᵢ‖²``, so ``.backward()`` differentiates it w.r.t. the parameters (double backward).
    ``σ̂ᵢ ≤ σ₁(Jᵢ)`` (a lower bound that increases with ``n_power_iterations``); no C×d Jacobian is
    formed. Cost: one forward pass with graph, ``n`` jvps, ``n − 1`` backward passes without graph and
    one with. Samples must be processed independently (BatchNorm in eval mode); dropout draws the
    same masks in every product of one call.
    """
    fn = "jacobian_spectral_penalty"
    _check_model_input(fn, model, x)
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
        raise ValueError(f"{fn}: n_power_iterations must be an integer >= 1; got {n_power_iterations!r}")
    _check_generator(fn, generator)
    B = x.shape[0]
    xd = x.detach()
    v = _per_sample_unit(_draw(x.shape, generator, x.device, x.dtype))
    call = _SameRandomness(x.device)
    xg = xd.clone().requires_grad_(True)
    with torch.enable_grad():
        out = call(model, xg)
    _check_output(fn, out, B)
    if not out.requires_grad:
        raise ValueError(f"{fn}: model(x) does not depend on x (its output has no gradient w.r.t. the input)")

    def jvp(vec):
        try:
            with torch.no_grad():
                return torch.func.jvp(lambda inp: call(model, inp), (xd,), (vec,))[1]
        except (RuntimeError, NotImplementedError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RuntimeError(f"{fn}: the model cannot run inside torch.func.jvp (forward-mode products J v): "
                               f"{msg}. Typical causes: BatchNorm in training mode (in-place running-"
                               f"statistics updates; use eval mode), or an operation without a forward-mode "
                               f"derivative") from e

    u = None
    for k in range(n_power_iterations):
        u = _per_sample_unit(jvp(v)).to(out.dtype)
        if k < n_power_iterations - 1:
            (g,) = torch.autograd.grad(out, xg, grad_outputs=u, retain_graph=True)
            v = _per_sample_unit(g)
    with torch.enable_grad():
        (w,) = torch.autograd.grad(out, xg, grad_outputs=u, create_graph=True)
    return w.reshape(B, -1).square().sum(1).mean()


def jacobian_frobenius_penalty(model: Callable, x: Tensor, *, num_projections: int = 1,
                               generator: torch.Generator | None = None,
                               distribution: str = "gaussian") -> Tensor:
    """Unbiased estimate of mean_i ‖J_i‖_F² (differentiable in θ).

    ``‖J‖_F² = E_u ‖Jᵀ u‖²`` for any probe with ``E[u uᵀ] = I``: Gaussian (default) or Rademacher
    (``distribution="rademacher"``, lower variance). Averages ``num_projections`` independent probes
    per sample, each one reverse-mode product with ``create_graph=True`` on a single forward pass.
    Variance per sample and probe: ``2‖J Jᵀ‖_F²`` (Gaussian), ``2(‖J Jᵀ‖_F² − Σ_k (J Jᵀ)_kk²)``
    (Rademacher). Samples must be processed independently.
    """
    fn = "jacobian_frobenius_penalty"
    _check_model_input(fn, model, x)
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"{fn}: num_projections must be an integer >= 1; got {num_projections!r}")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"{fn}: distribution must be 'gaussian' or 'rademacher'; got {distribution!r}")
    _check_generator(fn, generator)
    B = x.shape[0]
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
    _check_output(fn, out, B)
    if not out.requires_grad:
        raise ValueError(f"{fn}: model(x) does not depend on x (its output has no gradient w.r.t. the input)")
    total = None
    for k in range(num_projections):
        u = _draw(out.shape, generator, out.device, out.dtype, distribution)
        with torch.enable_grad():
            (w,) = torch.autograd.grad(out, xg, grad_outputs=u, create_graph=True)
        term = w.reshape(B, -1).square().sum(1).mean()
        total = term if total is None else total + term
    return total / num_projections
