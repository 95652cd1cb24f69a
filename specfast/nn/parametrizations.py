"""``specfast.nn.spectral_norm``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

Same signature, semantics, buffers and ``state_dict`` keys as torch's version (a state saved with one
loads into the other), with three differences, all derived in docs/regularizers.md §1:

* **Fewer passes over W.** torch's training step reads W three times in the forward (``W v``,
  ``Wᵀ u``, then ``uᵀ W v`` with autograd) and builds its backward from several full-size
  temporaries. Here the forward reads W twice (``y = W v``, ``z = Wᵀ y``) and gets σ in closed form,
  ``σ = uᵀ W v' = ‖Wᵀu‖``, without a third product; a custom autograd function then computes
  ``∂(W/σ)/∂W`` in two fused passes. Extra power iterations (``n_power_iterations > 1`` and the 15
  initial ones) go through specfast's fused Gram mat-vec ``Wᵀ(W v)``, one read of W each.
  The numbers are torch's, step for step (up to float rounding): the update is the same, only the
  order of the arithmetic differs.
* **Stacks of matrices** (``batch_dims``): an ``[E, m, n]`` expert stack gets one σ per expert
  (buffers ``_u [E, m]``, ``_v [E, n]``); torch would normalise the whole stack by one σ.
* **Low precision.** For bf16/fp16 weights ``u``, ``v`` are float32 buffers and every product
  accumulates in float32 (W is widened a block of rows at a time, never copied whole); the returned
  weight has W's dtype and is the correctly rounded ``W / σ``.
"""
from __future__ import annotations

import inspect
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import ops
from .._native import has_native_cpu

__all__ = ["spectral_norm"]

_HALF = (torch.float16, torch.bfloat16)
# Half-precision products widen W to float32 this many elements at a time (8 MiB, in a reused
# per-thread buffer: measured on the development VM, 4096x4096 bf16 widened in blocks costs ~2 ms
# per product vs 17 ms for W.float() @ v, whose fresh 64 MiB buffer is dominated by page faults;
# few large blocks keep the number of parallel regions low, which matters on an oversubscribed
# machine). Matrices up to this size are widened whole.
_CHUNK_ELEMS = 1 << 21
_WS = threading.local()
# Below this many elements a fused Gram call costs more in fixed overhead (~35 us) than it saves;
# torch.mv + torch.mv (two reads) is used instead. Measured: 256x784 fp32 36 us (Gram) vs 15 us
# (two mv); 1024x1024 equal; 4096x4096 2.3 ms vs 2.6 ms.
_GRAM_MIN_ELEMS = 1 << 20
# A loop of torch.mv beats one torch.matmul (bmm with one column) for a few large matrices:
# 8x1024x4096 fp32: 3.4 ms (loop) vs 8.0 ms (bmm).
_LOOP_MAX_MATRICES = 64
_LOOP_MIN_ELEMS = 1 << 14


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/vector dtype: float64 for float64 weights, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ products
# W is a matrix or a stack [*B, h, w] (any strides, any float dtype); vectors are [*B, w] or [*B, h]
# in _acc_dtype(W.dtype). Results come back in that dtype. None of these record autograd history.
def _mv_full(A: Tensor, x: Tensor) -> Tensor:
    """A x for A [*B, r, c] in a float32/float64 dtype, x [*B, c]."""
    if A.ndim == 2:
        return torch.mv(A, x)
    lead = A.shape[:-2]
    count = math.prod(lead)
    if 0 < count <= _LOOP_MAX_MATRICES and A.shape[-1] * A.shape[-2] >= _LOOP_MIN_ELEMS:
        A3 = A.reshape(count, *A.shape[-2:])
        x2 = x.reshape(count, -1)
        return torch.stack([torch.mv(A3[i], x2[i]) for i in range(count)]).reshape(*lead, A.shape[-2])
    return torch.matmul(A, x.unsqueeze(-1)).squeeze(-1)


def _workspace(n: int, dtype: torch.dtype, device: torch.device, slot: int) -> Tensor:
    """A reusable float scratch vector for widening half-precision blocks. On the CPU it is kept per
    thread (at most 2 slots x _CHUNK_ELEMS elements, 16 MiB): a fresh buffer of that size costs page
    faults on every call (measured ~12 ms per 16 MiB on the development VM), more than the product."""
    if device.type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    b = bufs.get((slot, dtype))
    if b is None or b.numel() < n:
        b = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return b[:n]


def _mv_half(W: Tensor, x: Tensor, transpose: bool) -> Tensor:
    """W x (or Wᵀ x) for half-precision W with float32 accumulation, widening W in row blocks."""
    acc = x.dtype
    if W.numel() <= _CHUNK_ELEMS:
        Wf = W.to(acc)
        return _mv_full(Wf.mT if transpose else Wf, x)
    h, w = W.shape[-2:]
    lead = W.shape[:-2]
    count = math.prod(lead)
    W3 = W.reshape(count, h, w)
    x2 = x.reshape(count, -1)
    rows = max(1, _CHUNK_ELEMS // max(w, 1))
    try:
        buf = _workspace(min(rows, h) * w, acc, W.device, 0)
        widen = lambda blk, r0, r1: buf[:(r1 - r0) * w].view(r1 - r0, w).copy_(blk)  # noqa: E731
        return _mv_half_blocks(W3, x2, lead, rows, transpose, widen)
    except RuntimeError:
        # inside a torch.func transform a scratch buffer created outside it may not be written:
        # widen each block into a fresh tensor instead
        return _mv_half_blocks(W3, x2, lead, rows, transpose, lambda blk, r0, r1: blk.to(acc))


def _mv_half_blocks(W3, x2, lead, rows, transpose, widen):
    count, h, w = W3.shape
    outs = []
    for i in range(count):
        parts = []
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            blk = widen(W3[i, r0:r1], r0, r1)
            parts.append(torch.mv(blk.t(), x2[i, r0:r1]) if transpose else torch.mv(blk, x2[i]))
        outs.append(torch.stack(parts).sum(0) if transpose else torch.cat(parts))
    out = torch.stack(outs)
    return out.reshape(*lead, out.shape[-1])


def _inner(G: Tensor, W: Tensor, batch_dims: int, acc: torch.dtype) -> Tensor:
    """<G, W> per matrix ([*B]) in acc precision, without full-size temporaries (half precision
    is widened a block at a time)."""
    with torch.no_grad():
        if W.dtype not in _HALF:
            if batch_dims == 0:
                return torch.dot(G.reshape(-1), W.reshape(-1)).to(acc)
            return torch.linalg.vecdot(G.flatten(batch_dims), W.flatten(batch_dims)).to(acc)
        lead = W.shape[:batch_dims]
        count = math.prod(lead)
        G2, W2 = G.reshape(count, -1), W.reshape(count, -1)
        N = G2.shape[-1]
        step = min(N, _CHUNK_ELEMS)
        if count * N <= _CHUNK_ELEMS:
            return torch.linalg.vecdot(G2.to(acc), W2.to(acc)).reshape(lead)
        try:
            bg, bw = _workspace(step, acc, W.device, 0), _workspace(step, acc, W.device, 1)
            widen = lambda a, b: (bg[:a.numel()].copy_(a), bw[:b.numel()].copy_(b))  # noqa: E731
            return _inner_blocks(G2, W2, step, widen).reshape(lead)
        except RuntimeError:
            # under torch.func transforms (e.g. vmap over per-sample gradients): fresh blocks
            return _inner_blocks(G2, W2, step, lambda a, b: (a.to(acc), b.to(acc))).reshape(lead)


def _inner_blocks(G2, W2, step, widen):
    count, N = G2.shape
    out = []
    for i in range(count):
        parts = []
        for k0 in range(0, N, step):
            a, b = widen(G2[i, k0:k0 + step], W2[i, k0:k0 + step])
            parts.append(torch.dot(a, b))
        out.append(torch.stack(parts).sum())
    return torch.stack(out)


def _matvec(W: Tensor, x: Tensor, transpose: bool = False) -> Tensor:
    """``W x`` (``Wᵀ x`` with transpose=True) with float32 (float64) accumulation, no autograd."""
    with torch.no_grad():
        if W.dtype in _HALF:
            return _mv_half(W, x, transpose)
        return _mv_full(W.mT if transpose else W, x.to(W.dtype))


def _use_gram(W: Tensor) -> bool:
    return (has_native_cpu() and W.device.type == "cpu" and type(W) in (Tensor, nn.Parameter)
            and (W.dtype in _HALF or W.numel() >= _GRAM_MIN_ELEMS))


def _gram(W: Tensor, v: Tensor) -> Tensor:
    """``Wᵀ(W v)``: specfast's fused Gram mat-vec (one read of W, float64 accumulation) on the CPU,
    two products elsewhere. No autograd."""
    with torch.no_grad():
        if _use_gram(W):
            try:
                return ops.call(ops.gram_matvec_op, W.detach(), v.unsqueeze(-1))[..., 0].to(v.dtype)
            except RuntimeError as e:
                # Inside a torch.func transform (e.g. the jvp of a model that holds this layer) W is
                # a functorch wrapper without storage, which the native kernel cannot read: the two
                # products below compute the same thing through the dispatcher.
                if "data pointer" not in str(e):
                    raise
        return _matvec(W, _matvec(W, v), transpose=True)


def _norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def _fused_power_step(W: Tensor, v: Tensor, eps: float) -> Tensor:
    """One step of torch's iteration (u ← normalize(W v), v ← normalize(Wᵀ u)) returning only v,
    from one fused Gram product: with z = WᵀW v, ‖W v‖ = sqrt(vᵀ z) and Wᵀ u = z / max(‖W v‖, eps)."""
    z = _gram(W, v)
    ny = (v * z).sum(-1).clamp_min(0).sqrt()
    wt = z / ny.clamp_min(eps).unsqueeze(-1)
    return wt / _norm(wt).clamp_min(eps).unsqueeze(-1)


def _exact_power_step(W: Tensor, v: Tensor, eps: float):
    """torch's step u ← normalize(W v), v' ← normalize(Wᵀ u), and its σ = uᵀ W v' = (Wᵀu)ᵀ v',
    from two products (y = W v, z = Wᵀ y) and no third one. Returns (u, v', σ)."""
    y = _matvec(W, v)
    ny = _norm(y).clamp_min(eps).unsqueeze(-1)
    u = y / ny
    # For half precision the fused Gram product avoids widening W a second time.
    z = _gram(W, v) if (W.dtype in _HALF and _use_gram(W)) else _matvec(W, y, transpose=True)
    wt = z / ny                                       # = Wᵀ u
    v_new = wt / _norm(wt).clamp_min(eps).unsqueeze(-1)
    sigma = (wt * v_new).sum(-1)
    return u, v_new, sigma


def _iterate(W: Tensor, v: Tensor, n: int, eps: float):
    """n of torch's power iterations from v: the first n-1 fused (one read of W each), the last
    one explicit so that u and σ are exactly torch's. Returns (u, v, σ)."""
    for _ in range(n - 1):
        v = _fused_power_step(W, v, eps)
    return _exact_power_step(W, v, eps)


# ------------------------------------------------------------------------------ layout helpers
def _to_matrix(weight: Tensor, dim: int, batch_dims: int) -> Tensor:
    """[*B, d_0, ..., d_k] -> [*B, d_dim, rest] (dim moved to the front of the matrix dims, as torch)."""
    if dim != batch_dims:
        weight = weight.movedim(dim, batch_dims)
    return weight.flatten(batch_dims + 1)


def _from_matrix(mat: Tensor, shape, dim: int, batch_dims: int) -> Tensor:
    """Inverse of _to_matrix for a tensor laid out like the matrix."""
    moved = list(shape)
    moved.insert(batch_dims, moved.pop(dim))
    out = mat.reshape(moved)
    return out.movedim(batch_dims, dim) if dim != batch_dims else out


def _bcast(s: Tensor, ndim: int) -> Tensor:
    """σ [*B] -> [*B, 1, ..., 1] broadcastable against a weight with ndim dims (a 0-dim σ stays
    0-dim: it then does not take part in type promotion, so half / float32 stays half)."""
    if s.ndim == 0:
        return s
    return s.reshape(*s.shape, *([1] * (ndim - s.ndim)))


# ------------------------------------------------------------------------------ autograd
class _SpectralNormalize(torch.autograd.Function):
    """``weight / σ`` where σ came from the power iteration with u, v held constant, so
    ``∂σ/∂W = u vᵀ`` (torch's gradient: its σ = uᵀ W v with u, v detached buffers).

    Backward, fused: ``∂L/∂W = (G − ⟨G, W⟩/σ · u vᵀ) / σ`` — one inner product and one scaled rank-1
    update instead of autograd's chain of full-size temporaries. When a graph of the gradient is
    requested (``create_graph=True``: gradient penalties), the same formula is built from
    differentiable ops with σ re-expressed as a function of W (value σ, derivative u vᵀ), so double
    backward equals torch's.
    """

    generate_vmap_rule = True   # per-sample gradients: vmap(grad(...)) over functional_call

    @staticmethod
    def forward(weight, sigma, u, v, dim, batch_dims):
        if sigma.dtype == weight.dtype or sigma.ndim == 0:
            # a 0-dim float32 σ with a half-precision W: computed in float32, rounded once
            return weight / _bcast(sigma, weight.ndim)
        # half-precision stack: one 0-dim division per matrix (no float32 copy of the stack)
        W3 = weight.reshape(-1, *weight.shape[batch_dims:])
        return torch.stack([w / s for w, s in zip(W3.unbind(0), sigma.reshape(-1).unbind(0))]).reshape(weight.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, sigma, u, v, dim, batch_dims = inputs
        ctx.dim, ctx.batch_dims = dim, batch_dims
        ctx.save_for_backward(weight, sigma, u, v)
        ctx.save_for_forward(weight, sigma, u, v)

    @staticmethod
    def backward(ctx, G):
        weight, sigma, u, v = ctx.saved_tensors
        dim, bd = ctx.dim, ctx.batch_dims
        if G is None:
            return None, None, None, None, None, None
        acc = sigma.dtype
        if torch.is_grad_enabled():  # create_graph=True: keep everything differentiable
            Wm = _to_matrix(weight, dim, bd).to(acc)
            a = (u * torch.matmul(Wm, v.unsqueeze(-1)).squeeze(-1)).sum(-1)   # uᵀ W v
            s = sigma + (a - a.detach())                                     # value σ, dσ/dW = u vᵀ
            c = (G.to(acc) * weight.to(acc)).flatten(bd).sum(-1)
            Gm = _to_matrix(G, dim, bd).to(acc)
            gm = Gm / s[..., None, None] - (c / s.square())[..., None, None] * (u.unsqueeze(-1) * v.unsqueeze(-2))
            return _from_matrix(gm, weight.shape, dim, bd).to(weight.dtype), None, None, None, None, None
        # fast path: c = <G, W> per matrix (float32 or wider accumulation), then
        # (G - c/σ · u vᵀ)/σ written once: no full-size temporaries besides the result
        c = _inner(G, weight, bd, acc)
        inv = 1.0 / sigma
        coef = -(c * inv * inv)                                 # -<G, W> / σ²
        Gm = _to_matrix(G, dim, bd)
        h, w = Gm.shape[-2:]
        us = (coef.unsqueeze(-1) * u).to(weight.dtype)
        vs = v.to(weight.dtype)
        if bd == 0 and weight.device.type == "cpu":
            # one pass: addr(G, u', v, beta=1/σ) (the .item() is free on the CPU)
            out = torch.addr(Gm, us, vs, beta=float(inv))
        elif bd == 0:
            out = (Gm / sigma).addr_(us, vs)              # no host sync on accelerators
        else:
            out = _SpectralNormalize.forward(Gm, sigma, u, v, bd, bd)     # G/σ per matrix, W's dtype
            out = out.reshape(-1, h, w).baddbmm_(us.reshape(-1, h, 1), vs.reshape(-1, 1, w))
        return _from_matrix(out, weight.shape, dim, bd), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dW, dsigma, du, dv, ddim, dbd):
        weight, sigma, u, v = ctx.saved_tensors
        dim, bd = ctx.dim, ctx.batch_dims
        s = _bcast(sigma, weight.ndim)
        if dW is None:
            return torch.zeros_like(weight)
        acc = sigma.dtype
        dWm = _to_matrix(dW, dim, bd).to(acc)
        t = (u * torch.matmul(dWm, v.unsqueeze(-1)).squeeze(-1)).sum(-1)    # uᵀ dW v = dσ
        out = dW.to(acc) / s - weight.to(acc) * _bcast(t, weight.ndim) / s.square()
        return out.to(weight.dtype)


# autograd.Function.apply binds its arguments with inspect.signature(forward) on every call when
# setup_context is defined (~15 us); a precomputed signature is returned by inspect at once.
_SpectralNormalize.forward.__signature__ = inspect.signature(_SpectralNormalize.forward)


# ------------------------------------------------------------------------------ the module
class _SpectralNorm(nn.Module):
    """The parametrization registered under ``module.parametrizations.<name>[0]`` (buffers ``_u``,
    ``_v``, same names and, for ``batch_dims=0``, same shapes as torch's ``_SpectralNorm``)."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 batch_dims: int = 0) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError("Dimension out of range (expected to be in range of "
                             f"[-{ndim}, {ndim - 1}] but got {dim})")
        if n_power_iterations <= 0:
            raise ValueError("Expected n_power_iterations to be positive, but "
                             f"got n_power_iterations={n_power_iterations}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.batch_dims = batch_dims
        if ndim - batch_dims > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._reshape_weight_to_matrix(weight)
            *batch, h, w = weight_mat.shape
            # The same draws as torch (u first, then v, in W's dtype): the same seed gives the same
            # start vectors. Kept in float32 (float64 for float64 weights).
            acc = _acc_dtype(weight.dtype)
            u = weight_mat.new_empty((*batch, h)).normal_(0, 1).to(acc)
            v = weight_mat.new_empty((*batch, w)).normal_(0, 1).to(acc)
            self.register_buffer("_u", F.normalize(u, dim=-1, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=-1, eps=self.eps))
            # as torch: 15 power iterations to start from reasonable vectors
            self._power_method(weight_mat, 15)

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        if weight.ndim - self.batch_dims <= 1:
            raise AssertionError(f"Expected weight to have more than {self.batch_dims + 1} dimension(s), "
                                 f"got {weight.ndim}")
        return _to_matrix(weight, self.dim, self.batch_dims)

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int):
        """torch's iteration, in place on the buffers (DataParallel relies on it). Returns fresh
        (u, v, σ) for the forward (never the buffers themselves, so a later in-place update cannot
        change what a pending backward uses)."""
        acc = _acc_dtype(weight_mat.dtype)
        W = weight_mat.detach()
        u, v, sigma = _iterate(W, self._v.to(acc), n_power_iterations, self.eps)
        # out= rather than copy_: like torch's version, this keeps the module usable inside
        # torch.func transforms (jvp/vjp of the model), which refuse in-place copies into captured
        # tensors but accept out= writes
        torch.mul(u, 1, out=self._u)
        torch.mul(v, 1, out=self._v)
        return u, v, sigma

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim - self.batch_dims == 1:
            # exact: no power iteration for vectors
            return F.normalize(weight, dim=-1, eps=self.eps)
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training:
            u, v, sigma = self._power_method(weight_mat, self.n_power_iterations)
        else:
            acc = _acc_dtype(weight.dtype)
            u = self._u.to(acc, copy=True)
            v = self._v.to(acc, copy=True)
            with torch.no_grad():
                sigma = (u * _matvec(weight_mat.detach(), v)).sum(-1)
        return _SpectralNormalize.apply(weight, sigma, u, v, self.dim, self.batch_dims)

    def right_inverse(self, value: Tensor) -> Tensor:
        # as torch: the stored tensor is the value itself (no constraint is enforced)
        return value

    def extra_repr(self) -> str:
        return f"batch_dims={self.batch_dims}" if self.batch_dims else ""


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, batch_dims: int = 0) -> nn.Module:
    """Spectral normalisation ``W / σ(W)``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

    Same arguments, semantics and ``state_dict`` keys (``parametrizations.<name>.original``,
    ``parametrizations.<name>.0._u`` / ``._v``): σ is estimated by ``n_power_iterations`` steps of
    the power method each time the weight is accessed in training mode (15 when registered), from
    stored vectors in eval mode; 1-D weights are normalised exactly; ``dim`` defaults to 0 (1 for
    ``ConvTranspose{1,2,3}d``). The values match torch's step for step; see the module docstring for
    what is faster, and docs/regularizers.md §1 for the derivation.

    batch_dims (keyword-only): the number of leading dimensions that index independent matrices,
    e.g. 1 for an ``[E, m, n]`` expert stack: one σ per expert, buffers ``_u [E, m]``, ``_v [E, n]``.
    ``dim`` then counts in the full tensor and must be ``>= batch_dims`` (default ``batch_dims``).
    """
    fn = "spectral_norm"
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(f"{fn}: batch_dims must be an integer >= 0; got {batch_dims!r}")
    if batch_dims >= weight.ndim:
        raise ValueError(f"{fn}: batch_dims must be smaller than the number of dimensions of "
                         f"{name!r} ({weight.ndim}, shape {tuple(weight.shape)}); got batch_dims={batch_dims}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{fn}: {name!r} must have dtype float16, bfloat16, float32 or float64; "
                        f"got {weight.dtype}")
    if dim is None:
        transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        dim = batch_dims + (1 if transposed else 0)
    elif batch_dims and -weight.ndim <= dim < weight.ndim and (dim % weight.ndim) < batch_dims:
        raise ValueError(f"{fn}: with batch_dims={batch_dims}, dim must index a matrix dimension "
                         f"(>= {batch_dims}) of {name!r} with shape {tuple(weight.shape)}; got dim={dim}")
    parametrize.register_parametrization(module, name,
                                         _SpectralNorm(weight, n_power_iterations, dim, eps, batch_dims))
    return module
