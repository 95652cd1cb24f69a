"""Every op schema of specfast, registered with ``torch.library.custom_op``.

Each op has: a default implementation (the pure-torch reference, used on devices without a native
kernel, with a warning), a fake (meta) implementation for ``torch.compile``, a native CPU kernel
(``specfast._C``), and autograd where a gradient exists. The kernels see only data pointers,
shapes and strides (built here by ``_views``), never tensors.

Schemas (``*b`` = any batch dims, ``G`` = a list of matrices of different shapes):
  gram_matvec(W[*b,m,n], X[*b,n,c]) -> Y[*b,n,c]                        Y = Wᵀ(W X)
  gram_matvec_grouped(Ws[G], Xs[G]) -> Ys[G]
  krylov_svd(W[*b,m,n], k, block, max_basis, max_iter, tol, largest, want_vectors, seed)
      -> (S[*b,k], bound[*b,k], iters[*b], converged[*b], status[*b], U[*b,m,k|0], V[*b,n,k|0])
  krylov_svd_grouped(Ws[G], ...) -> (S[G,k], bound[G,k], iters[G], converged[G], status[G], Us[G], Vs[G])
  frobenius_scan(W[*b,m,n]) -> (frob_sq[*b], nonfinite[*b])   (+ _grouped)
  slq_gram(W[*b,m,n], nprobe, steps, seed) -> (nodes[*b,p,s], weights[*b,p,s], dims[*b], status[*b])
      (+ _grouped)
Float outputs of the Krylov/SLQ/scan ops are float64; gram_matvec returns X's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import reference
from ._native import _C, NATIVE_ERROR, fallback

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
STATUS_OK, STATUS_NONFINITE, STATUS_EIG_FAILED = 0, 1, 2


def num_threads() -> int:
    # Follow torch so specfast and torch never fight over cores.
    return max(1, torch.get_num_threads())


# ------------------------------------------------------------------------------------------ views
@dataclass
class Views:
    """What the kernels see: one (pointer, rows, cols, row_stride) per matrix, in storage order."""

    dtype_code: int
    ptrs: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    cols: list = field(default_factory=list)
    row_strides: list = field(default_factory=list)
    transposed: list = field(default_factory=list)  # True: the view is Wᵀ (column-major storage)
    keepalive: list = field(default_factory=list)   # tensors that own the memory


def _row_stride(rows: int, cols: int, s_row: int, s_col: int):
    """The row stride if a rows x cols matrix with these strides is row-major with contiguous rows
    (strides of size-1 dimensions do not matter), else None."""
    if cols > 1 and s_col != 1:
        return None
    if rows == 1:
        return max(cols, 1)
    return s_row if s_row >= cols else None


def _layout(W: Tensor):
    """(tensor to view, transposed?, row stride) for a [*b, m, n] tensor. A column-major matrix is
    viewed as its row-major transpose; only when neither the last nor the second-to-last dimension
    is contiguous (e.g. a column-strided slice) is a copy made."""
    m, n = W.shape[-2:]
    sm, sn = W.stride(-2), W.stride(-1)
    rs = _row_stride(m, n, sm, sn)
    if rs is not None:
        return W, False, rs
    rs = _row_stride(n, m, sn, sm)
    if rs is not None:
        return W, True, rs
    return W.contiguous(), False, max(n, 1)


def _add_stack(v: Views, W: Tensor) -> None:
    Wv, tr, rs = _layout(W)
    m, n = W.shape[-2:]
    batch = W.shape[:-2]
    esize = Wv.element_size()
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(batch, Wv.stride()[:-2]):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    base = Wv.data_ptr()
    offs = off.reshape(-1).tolist() if len(batch) else [0]
    count = len(offs)
    v.ptrs.extend(base + o * esize for o in offs)
    v.rows.extend([n if tr else m] * count)
    v.cols.extend([m if tr else n] * count)
    v.row_strides.extend([rs] * count)
    v.transposed.extend([tr] * count)
    v.keepalive.append(Wv)


def stack_views(W: Tensor) -> Views:
    v = Views(DTYPE_CODE[W.dtype])
    _add_stack(v, W)
    return v


def list_views(Ws: list[Tensor]) -> Views:
    """Views of a list of matrices of one dtype (see by_dtype for mixed lists)."""
    v = Views(DTYPE_CODE[Ws[0].dtype] if Ws else 0)
    for W in Ws:
        if W.dtype != Ws[0].dtype:
            raise ValueError(f"specfast: list_views needs one dtype, got {Ws[0].dtype} and {W.dtype}")
        _add_stack(v, W)
    return v


def by_dtype(Ws, run):
    """Apply `run(indices)` to each same-dtype group of Ws and put the results back in order.

    `run` returns a tuple whose items are tensors with a leading per-matrix dim or lists with one
    entry per matrix; the merged tuple has the same structure over all of Ws.
    """
    groups: dict = {}
    for i, W in enumerate(Ws):
        groups.setdefault(W.dtype, []).append(i)
    if len(groups) <= 1:
        return run(list(range(len(Ws))))
    parts = [(idx, run(idx)) for idx in groups.values()]
    first = parts[0][1]
    merged = []
    for j, item in enumerate(first):
        if isinstance(item, Tensor):
            out = item.new_empty((len(Ws), *item.shape[1:]))
            for idx, res in parts:
                out[torch.tensor(idx)] = res[j]
        else:
            out = [None] * len(Ws)
            for idx, res in parts:
                for i, x in zip(idx, res[j]):
                    out[i] = x
        merged.append(out)
    return tuple(merged)




def _batch_numel(shape) -> int:
    return int(math.prod(shape))


# -------------------------------------------------------------------------------- gram_matvec
def _gram_native(views: Views, Xs: list[Tensor], Ys_shape_n: list[int]) -> list[Tensor]:
    """Run Y_i = W_iᵀ(W_i X_i) for every view; X_i [n_i, c] float64 -> Y_i [n_i, c]."""
    c = Xs[0].shape[-1] if Xs else 0
    Xk = [x.mT.contiguous() for x in Xs]                       # [c, n] rows = vectors
    Yk = [torch.empty(c, n, dtype=torch.float64) for n in Ys_shape_n]
    # For a transposed view Wt = Wᵀ (rows n, cols m): WᵀW x = Wt Wtᵀ x, the Left Gram side.
    sides = [1 if t else 0 for t in views.transposed]
    _C.gram_apply(views.ptrs, views.dtype_code, views.rows, views.cols, views.row_strides, sides, c,
                  [x.data_ptr() for x in Xk], [x.shape[-1] for x in Xk],
                  [y.data_ptr() for y in Yk], [y.shape[-1] for y in Yk], num_threads())
    return [y.mT for y in Yk]


# ------------------------------------------------------------------------ eager CPU fast path
# A custom op call goes through the dispatcher, and its first call imports torch._dynamo (1.6 s on
# the development machine; then ~20-70 µs per call). Plain eager calls on CPU tensors that need no
# gradient call the registered native kernel directly instead: same function, same results. Any
# tensor subclass (FakeTensor, FunctionalTensor, ...), a gradient, or torch.compile tracing takes
# the dispatcher path, so compile, autograd and opcheck see the registered op as before.
_CPU_KERNELS: dict = {}


def _bind_cpu(op):
    def keep(fn):
        _CPU_KERNELS[op] = fn
        return fn
    return keep


def _plain_cpu(x) -> bool:
    if isinstance(x, (list, tuple)):
        return all(_plain_cpu(t) for t in x)
    if isinstance(x, Tensor):
        return (type(x) is Tensor or type(x) is torch.nn.Parameter) and x.device.type == "cpu" and not (
            x.requires_grad and torch.is_grad_enabled())
    return True


def call(op, *args):
    """``op(*args)``, through the native CPU kernel directly when that changes nothing."""
    fn = _CPU_KERNELS.get(op)
    if fn is not None and not torch.compiler.is_compiling() and all(_plain_cpu(a) for a in args):
        return fn(*args)
    return op(*args)


@torch.library.custom_op("specfast::gram_matvec", mutates_args=())
def gram_matvec_op(W: Tensor, X: Tensor) -> Tensor:
    fallback("gram_matvec", W.device.type, _reason(W))
    return reference.gram_matvec(W, X)


@gram_matvec_op.register_fake
def _(W, X):
    return X.new_empty(X.shape)


def _reason(W: Tensor) -> str:
    if W.device.type == "cpu":
        return "the native module failed to load: " + str(NATIVE_ERROR)
    return "CUDA kernels are not built into this version"


if _C is not None:

    @gram_matvec_op.register_kernel("cpu")
    @_bind_cpu(gram_matvec_op)
    def _(W, X):
        # One [B, c, n] buffer each for the inputs and outputs of the whole stack (kernel layout:
        # vectors contiguous), pointers by arithmetic: no per-matrix tensors.
        views = stack_views(W)
        n, c = W.shape[-1], X.shape[-1]
        B = _batch_numel(W.shape[:-2])
        if B == 0 or c == 0:
            return X.new_zeros(X.shape) if B else X.new_empty(X.shape)
        Xk = X.to(torch.float64).reshape(B, n, c).mT.contiguous()
        Yk = torch.empty(B, c, n, dtype=torch.float64)
        step = 8 * c * n
        sides = [1 if t else 0 for t in views.transposed]
        _C.gram_apply(views.ptrs, views.dtype_code, views.rows, views.cols, views.row_strides, sides, c,
                      [Xk.data_ptr() + i * step for i in range(B)], [n] * B,
                      [Yk.data_ptr() + i * step for i in range(B)], [n] * B, num_threads())
        return Yk.mT.reshape(X.shape).to(X.dtype).contiguous()


@torch.library.custom_op("specfast::gram_matvec_grouped", mutates_args=())
def gram_matvec_grouped_op(Ws: list[Tensor], Xs: list[Tensor]) -> list[Tensor]:
    if Ws:
        fallback("gram_matvec_grouped", Ws[0].device.type, _reason(Ws[0]))
    return [reference.gram_matvec(W, X) for W, X in zip(Ws, Xs)]


@gram_matvec_grouped_op.register_fake
def _(Ws, Xs):
    return [X.new_empty(X.shape) for X in Xs]


if _C is not None:

    @gram_matvec_grouped_op.register_kernel("cpu")
    @_bind_cpu(gram_matvec_grouped_op)
    def _(Ws, Xs):
        if not Ws:
            return []
        def run(idx):
            sub = [Ws[i] for i in idx]
            views = list_views(sub)
            xs = [Xs[i] for i in idx]
            Ys = _gram_native(views, [x.to(torch.float64) for x in xs], [W.shape[-1] for W in sub])
            return ([y.to(x.dtype).contiguous() for y, x in zip(Ys, xs)],)

        return by_dtype(list(Ws), run)[0]


# -------------------------------------------------------------------------------- krylov_svd
def _krylov_run(views: Views, k: int, block: int, max_basis: int, max_iter: int, tol: float,
                largest: bool, want_vectors: bool, seed: int, u_ptrs: list, v_ptrs: list):
    """Call the native solver; vectors go to the given buffers (kernel layout: k rows of length
    `rows` for U, `cols` for V, per view)."""
    G = len(views.ptrs)
    S = torch.empty(G, k, dtype=torch.float64)
    bound = torch.empty(G, k, dtype=torch.float64)
    iters = torch.zeros(G, dtype=torch.int64)
    conv = torch.zeros(G, dtype=torch.uint8)
    status = torch.zeros(G, dtype=torch.int32)
    if G:
        _C.krylov_svd(views.ptrs, views.dtype_code, views.rows, views.cols, views.row_strides,
                      k, block, max_basis, max_iter, float(tol), bool(largest), bool(want_vectors),
                      int(seed) % (2**64), S.data_ptr(), bound.data_ptr(), iters.data_ptr(),
                      conv.data_ptr(), status.data_ptr(), u_ptrs, v_ptrs, num_threads())
    return S, bound, iters, conv.to(torch.bool), status


def _krylov_native(views: Views, k: int, block: int, max_basis: int, max_iter: int, tol: float,
                   largest: bool, want_vectors: bool, seed: int):
    """Ragged list: one (U, V) pair of tensors per matrix."""
    kv = k if want_vectors else 0
    Uk = [torch.zeros(kv, r, dtype=torch.float64) for r in views.rows]
    Vk = [torch.zeros(kv, c, dtype=torch.float64) for c in views.cols]
    S, bound, iters, conv, status = _krylov_run(
        views, k, block, max_basis, max_iter, tol, largest, want_vectors, seed,
        [u.data_ptr() for u in Uk] if want_vectors else [], [v.data_ptr() for v in Vk] if want_vectors else [])
    Us, Vs = [], []
    for tr, u, v in zip(views.transposed, Uk, Vk):
        if tr:  # the kernel saw Wᵀ: its left vectors are our right ones
            u, v = v, u
        Us.append(u.mT.contiguous())
        Vs.append(v.mT.contiguous())
    return S, bound, iters, conv, status, Us, Vs


@torch.library.custom_op("specfast::krylov_svd", mutates_args=())
def krylov_svd_op(W: Tensor, k: int, block: int, max_basis: int, max_iter: int, tol: float,
                  largest: bool, want_vectors: bool, seed: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fallback("krylov_svd", W.device.type, _reason(W))
    return reference.krylov_svd(W, k, largest, want_vectors)


@krylov_svd_op.register_fake
def _(W, k, block, max_basis, max_iter, tol, largest, want_vectors, seed):
    batch = W.shape[:-2]
    m, n = W.shape[-2:]
    kv = k if want_vectors else 0
    f64 = dict(dtype=torch.float64, device=W.device)
    return (W.new_empty((*batch, k), **f64), W.new_empty((*batch, k), **f64),
            W.new_empty(batch, dtype=torch.int64), W.new_empty(batch, dtype=torch.bool),
            W.new_empty(batch, dtype=torch.int32), W.new_empty((*batch, m, kv), **f64),
            W.new_empty((*batch, n, kv), **f64))


if _C is not None:

    @krylov_svd_op.register_kernel("cpu")
    @_bind_cpu(krylov_svd_op)
    def _(W, k, block, max_basis, max_iter, tol, largest, want_vectors, seed):
        batch = W.shape[:-2]
        m, n = W.shape[-2:]
        views = stack_views(W)
        B = len(views.ptrs)
        kv = k if want_vectors else 0
        rows, cols = (n, m) if (B and views.transposed[0]) else (m, n)
        # one buffer per side for the whole stack (kernel layout [B, k, rows] / [B, k, cols])
        Ub = torch.zeros(B, kv, rows, dtype=torch.float64)
        Vb = torch.zeros(B, kv, cols, dtype=torch.float64)
        up = [Ub.data_ptr() + 8 * i * kv * rows for i in range(B)] if want_vectors else []
        vp = [Vb.data_ptr() + 8 * i * kv * cols for i in range(B)] if want_vectors else []
        S, bound, iters, conv, status = _krylov_run(views, k, block, max_basis, max_iter, tol, largest,
                                                    want_vectors, seed, up, vp)
        if B and views.transposed[0]:
            Ub, Vb = Vb, Ub
        return (S.reshape(*batch, k), bound.reshape(*batch, k), iters.reshape(batch),
                conv.reshape(batch), status.reshape(batch),
                Ub.mT.contiguous().reshape(*batch, m, kv), Vb.mT.contiguous().reshape(*batch, n, kv))


@torch.library.custom_op("specfast::krylov_svd_grouped", mutates_args=())
def krylov_svd_grouped_op(Ws: list[Tensor], k: int, block: int, max_basis: int, max_iter: int,
                          tol: float, largest: bool, want_vectors: bool, seed: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    if Ws:
        fallback("krylov_svd_grouped", Ws[0].device.type, _reason(Ws[0]))
    outs = [reference.krylov_svd(W, k, largest, want_vectors) for W in Ws]
    dev = Ws[0].device if Ws else torch.device("cpu")
    if not outs:
        e = torch.empty(0, k, dtype=torch.float64)
        return (e, e.clone(), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.bool),
                torch.empty(0, dtype=torch.int32), [], [])
    cat = [torch.stack([o[i] for o in outs]).to(dev) for i in range(5)]
    return (*cat, [o[5] for o in outs], [o[6] for o in outs])


@krylov_svd_grouped_op.register_fake
def _(Ws, k, block, max_basis, max_iter, tol, largest, want_vectors, seed):
    G = len(Ws)
    kv = k if want_vectors else 0
    dev = Ws[0].device if Ws else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=dev)
    return (torch.empty(G, k, **f64), torch.empty(G, k, **f64),
            torch.empty(G, dtype=torch.int64, device=dev), torch.empty(G, dtype=torch.bool, device=dev),
            torch.empty(G, dtype=torch.int32, device=dev),
            [W.new_empty((W.shape[-2], kv), **f64) for W in Ws],
            [W.new_empty((W.shape[-1], kv), **f64) for W in Ws])


if _C is not None:

    @krylov_svd_grouped_op.register_kernel("cpu")
    @_bind_cpu(krylov_svd_grouped_op)
    def _(Ws, k, block, max_basis, max_iter, tol, largest, want_vectors, seed):
        return by_dtype(list(Ws), lambda idx: _krylov_native(
            list_views([Ws[i] for i in idx]), k, block, max_basis, max_iter, tol, largest, want_vectors, seed))


# Autograd: dσ_i/dW = u_i v_iᵀ. Bounds, counters and singular vectors are not differentiable.
def _krylov_setup(ctx, inputs, output):
    S, bound, iters, conv, status, U, V = output
    ctx.want_vectors = inputs[7]
    ctx.k = inputs[1]
    ctx.save_for_backward(U, V)
    ctx.dtype = inputs[0].dtype


def _krylov_backward(ctx, gS, gbound, giters, gconv, gstatus, gU, gV):
    U, V = ctx.saved_tensors
    if ctx.k > 0 and U.shape[-1] == 0:
        raise RuntimeError("specfast.krylov_svd: backward needs the singular vectors; call the op "
                           "with want_vectors=True (the public API does this when W requires grad)")
    gS = torch.nan_to_num(gS, nan=0.0)
    Un = torch.nan_to_num(U)
    grad = (Un * gS.unsqueeze(-2)) @ torch.nan_to_num(V).mT
    return grad.to(ctx.dtype), None, None, None, None, None, None, None, None


krylov_svd_op.register_autograd(_krylov_backward, setup_context=_krylov_setup)


def _krylov_grouped_setup(ctx, inputs, output):
    S, bound, iters, conv, status, Us, Vs = output
    ctx.k = inputs[1]
    ctx.dtypes = [W.dtype for W in inputs[0]]
    ctx.save_for_backward(*Us, *Vs)
    ctx.G = len(Us)


def _krylov_grouped_backward(ctx, gS, gbound, giters, gconv, gstatus, gUs, gVs):
    saved = ctx.saved_tensors
    Us, Vs = saved[: ctx.G], saved[ctx.G:]
    grads = []
    for i in range(ctx.G):
        if ctx.k > 0 and Us[i].shape[-1] == 0:
            raise RuntimeError("specfast.krylov_svd_grouped: backward needs want_vectors=True")
        g = torch.nan_to_num(gS[i], nan=0.0)
        grads.append(((torch.nan_to_num(Us[i]) * g) @ torch.nan_to_num(Vs[i]).mT).to(ctx.dtypes[i]))
    return grads, None, None, None, None, None, None, None, None


krylov_svd_grouped_op.register_autograd(_krylov_grouped_backward, setup_context=_krylov_grouped_setup)


# ---------------------------------------------------------------------------- frobenius_scan
@torch.library.custom_op("specfast::frobenius_scan", mutates_args=())
def frobenius_scan_op(W: Tensor) -> tuple[Tensor, Tensor]:
    fallback("frobenius_scan", W.device.type, _reason(W))
    return reference.frobenius_scan(W)


@frobenius_scan_op.register_fake
def _(W):
    batch = W.shape[:-2]
    return W.new_empty(batch, dtype=torch.float64), W.new_empty(batch, dtype=torch.int64)


if _C is not None:

    @frobenius_scan_op.register_kernel("cpu")
    @_bind_cpu(frobenius_scan_op)
    def _(W):
        batch = W.shape[:-2]
        views = stack_views(W)
        G = len(views.ptrs)
        fro = torch.zeros(G, dtype=torch.float64)
        bad = torch.zeros(G, dtype=torch.int64)
        if G and W.numel():
            _C.frobenius_scan(views.ptrs, views.dtype_code, views.rows, views.cols,
                              views.row_strides, fro.data_ptr(), bad.data_ptr(), num_threads())
        return fro.reshape(batch), bad.reshape(batch)


@torch.library.custom_op("specfast::frobenius_scan_grouped", mutates_args=())
def frobenius_scan_grouped_op(Ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    if Ws:
        fallback("frobenius_scan_grouped", Ws[0].device.type, _reason(Ws[0]))
    outs = [reference.frobenius_scan(W) for W in Ws]
    dev = Ws[0].device if Ws else torch.device("cpu")
    fro = torch.stack([o[0] for o in outs]) if outs else torch.empty(0, dtype=torch.float64, device=dev)
    bad = torch.stack([o[1] for o in outs]) if outs else torch.empty(0, dtype=torch.int64, device=dev)
    return fro, bad


@frobenius_scan_grouped_op.register_fake
def _(Ws):
    dev = Ws[0].device if Ws else torch.device("cpu")
    return (torch.empty(len(Ws), dtype=torch.float64, device=dev),
            torch.empty(len(Ws), dtype=torch.int64, device=dev))


if _C is not None:

    @frobenius_scan_grouped_op.register_kernel("cpu")
    @_bind_cpu(frobenius_scan_grouped_op)
    def _(Ws):
        def run(ids):
            sub = [Ws[i] for i in ids]
            fro = torch.zeros(len(sub), dtype=torch.float64)
            bad = torch.zeros(len(sub), dtype=torch.int64)
            idx = [i for i, W in enumerate(sub) if W.numel()]
            if idx:
                views = list_views([sub[i] for i in idx])
                f2 = torch.zeros(len(idx), dtype=torch.float64)
                b2 = torch.zeros(len(idx), dtype=torch.int64)
                _C.frobenius_scan(views.ptrs, views.dtype_code, views.rows, views.cols,
                                  views.row_strides, f2.data_ptr(), b2.data_ptr(), num_threads())
                fro[idx] = f2
                bad[idx] = b2
            return fro, bad

        if not Ws:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        return by_dtype(list(Ws), run)


# ---------------------------------------------------------------------------------- slq_gram
@torch.library.custom_op("specfast::slq_gram", mutates_args=())
def slq_gram_op(W: Tensor, nprobe: int, steps: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fallback("slq_gram", W.device.type, _reason(W))
    return reference.slq_gram(W, nprobe, steps, seed)


@slq_gram_op.register_fake
def _(W, nprobe, steps, seed):
    batch = W.shape[:-2]
    return (W.new_empty((*batch, nprobe, steps), dtype=torch.float64),
            W.new_empty((*batch, nprobe, steps), dtype=torch.float64),
            W.new_empty(batch, dtype=torch.int64), W.new_empty(batch, dtype=torch.int32))


def _slq_native(views: Views, nprobe: int, steps: int, seed: int):
    G = len(views.ptrs)
    nodes = torch.zeros(G, nprobe, steps, dtype=torch.float64)
    weights = torch.zeros(G, nprobe, steps, dtype=torch.float64)
    dims = torch.zeros(G, dtype=torch.int64)
    status = torch.zeros(G, dtype=torch.int32)
    if G:
        _C.slq(views.ptrs, views.dtype_code, views.rows, views.cols, views.row_strides, nprobe,
               steps, int(seed) % (2**64), nodes.data_ptr(), weights.data_ptr(), dims.data_ptr(),
               status.data_ptr(), num_threads())
    return nodes, weights, dims, status


if _C is not None:

    @slq_gram_op.register_kernel("cpu")
    @_bind_cpu(slq_gram_op)
    def _(W, nprobe, steps, seed):
        batch = W.shape[:-2]
        nodes, weights, dims, status = _slq_native(stack_views(W), nprobe, steps, seed)
        return (nodes.reshape(*batch, nprobe, steps), weights.reshape(*batch, nprobe, steps),
                dims.reshape(batch), status.reshape(batch))


@torch.library.custom_op("specfast::slq_gram_grouped", mutates_args=())
def slq_gram_grouped_op(Ws: list[Tensor], nprobe: int, steps: int, seed: int
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if Ws:
        fallback("slq_gram_grouped", Ws[0].device.type, _reason(Ws[0]))
    outs = [reference.slq_gram(W, nprobe, steps, seed + i) for i, W in enumerate(Ws)]
    if not outs:
        return (torch.empty(0, nprobe, steps, dtype=torch.float64),
                torch.empty(0, nprobe, steps, dtype=torch.float64),
                torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32))
    return tuple(torch.stack([o[i] for o in outs]) for i in range(4))


@slq_gram_grouped_op.register_fake
def _(Ws, nprobe, steps, seed):
    G = len(Ws)
    dev = Ws[0].device if Ws else torch.device("cpu")
    return (torch.empty(G, nprobe, steps, dtype=torch.float64, device=dev),
            torch.empty(G, nprobe, steps, dtype=torch.float64, device=dev),
            torch.empty(G, dtype=torch.int64, device=dev), torch.empty(G, dtype=torch.int32, device=dev))


if _C is not None:

    @slq_gram_grouped_op.register_kernel("cpu")
    @_bind_cpu(slq_gram_grouped_op)
    def _(Ws, nprobe, steps, seed):
        return by_dtype(list(Ws), lambda idx: _slq_native(list_views([Ws[i] for i in idx]), nprobe,
                                                                   steps, seed))


ALL_OPS = {
    "gram_matvec": gram_matvec_op,
    "gram_matvec_grouped": gram_matvec_grouped_op,
    "krylov_svd": krylov_svd_op,
    "krylov_svd_grouped": krylov_svd_grouped_op,
    "frobenius_scan": frobenius_scan_op,
    "frobenius_scan_grouped": frobenius_scan_grouped_op,
    "slq_gram": slq_gram_op,
    "slq_gram_grouped": slq_gram_grouped_op,
}
