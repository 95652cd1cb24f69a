"""Gradient attributions (docs/attribution.md §1): saliency, input × gradient, integrated gradients,
SmoothGrad, and per-token scores for transformers.

Every method takes ``model`` (a callable x[B, ...] -> outputs [B, C]), ``x`` [B, ...] floating point
and ``target`` (class indices [B], an int for all samples, or None for the arg-max of model(x)) and
returns attributions shaped like ``x``, detached, in x's dtype. Gradients are those of the sum over
the batch of the selected outputs, which are the per-sample gradients when samples are processed
independently (put the model in eval mode: BatchNorm in training mode couples the samples).
``forward_kwargs``: extra model arguments; tensors with first dimension B are per sample.
Multi-point methods (integrated gradients, SmoothGrad) evaluate at most ``chunk_size`` points
(sample, step) per forward/backward, so memory does not grow with ``steps`` or ``samples``.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "attribute",
           "token_attributions", "METHODS", "IG_METHODS"]

IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
_DEFAULT_MAX_ROWS = 512


# ------------------------------------------------------------------------------------ validation
def _check_x(x, fname: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fname}: x must be a torch.Tensor [B, ...]; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fname}: x must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{fname}: x must have a batch dimension, shape [B, ...]; got shape {tuple(x.shape)}")
    return x.detach()


def _check_target(target, B: int, device, fname: str) -> Tensor | None:
    if target is None:
        return None
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TypeError(f"{fname}: target must be integer class indices [B] or None; got a bool")
    if isinstance(target, numbers.Integral):
        return torch.full((B,), int(target), dtype=torch.long, device=device)
    t = target if isinstance(target, Tensor) else torch.as_tensor(target)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{fname}: target must be integer class indices [B] (LongTensor) or None; got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{fname}: target must have shape [B] = ({B},); got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long)


def _check_output(out, rows: int, fname: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{fname}: model must return a tensor of outputs [B, C]; got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != rows:
        raise ValueError(f"{fname}: model must return outputs of shape [B, C] with B = {rows}; "
                         f"got shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"{fname}: model outputs must be floating point; got dtype {out.dtype}")
    return out


def _check_target_range(t: Tensor, C: int, fname: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= C):
        raise ValueError(f"{fname}: target must lie in [0, {C}) (the model has {C} outputs); got range "
                         f"[{int(t.min())}, {int(t.max())}]")


def _check_int(value, name: str, fname: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fname}: {name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        word = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{fname}: {name} must be {word}; got {value}")
    return int(value)


def _check_nonneg(value, name: str, fname: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fname}: {name} must be a non-negative real number; got {value!r}")
    v = float(value)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{fname}: {name} must be non-negative and finite; got {value}")
    return v


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ core
def _check_fkw(forward_kwargs, fname: str) -> dict:
    if forward_kwargs is None:
        return {}
    if not isinstance(forward_kwargs, dict):
        raise TypeError(f"{fname}: forward_kwargs must be a dict or None; got {type(forward_kwargs).__name__}")
    return forward_kwargs


def _rows_kwargs(fkw: dict, b: Tensor | None, B: int) -> dict:
    """Per-sample keyword arguments for the rows ``b``: a tensor whose first dimension is B is indexed
    by the sample of each row (like Captum's additional_forward_args); anything else is passed as is."""
    if b is None:
        return fkw
    return {k: (v[b.to(v.device)] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
            for k, v in fkw.items()}


def _forward(model, x: Tensor, fname: str, fkw: dict | None = None, chunk: int | None = None) -> Tensor:
    """model(x) without gradients, in chunks of at most ``chunk`` rows."""
    B = x.shape[0]
    fkw = fkw or {}
    with torch.no_grad():
        if chunk is None or chunk >= B:
            return _check_output(model(x, **fkw), B, fname).detach()
        outs = []
        for idx in _chunks(B, chunk, x.device):
            outs.append(_check_output(model(x[idx], **_rows_kwargs(fkw, idx, B)), len(idx), fname).detach())
        return torch.cat(outs)


def _resolve_target(model, x: Tensor, target, fname: str, fkw: dict | None = None,
                    chunk: int | None = None) -> Tensor:
    """Validated target [B] (arg-max of model(x) for None), range-checked against the outputs."""
    t = _check_target(target, x.shape[0], x.device, fname)
    out = _forward(model, x, fname, fkw, chunk)
    if t is None:
        return out.argmax(1)
    _check_target_range(t, out.shape[1], fname)
    return t


def _grad_rows(model, rows: Tensor, tgt: Tensor | None, fname: str,
               fkw: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """∂(Σ_r f_{tgt_r}(rows_r))/∂rows, the outputs and the targets used (arg-max when tgt is None)."""
    rows = rows.detach().requires_grad_(True)
    with torch.enable_grad():
        out = _check_output(model(rows, **(fkw or {})), rows.shape[0], fname)
        if tgt is None:
            tgt = out.detach().argmax(1)
        else:
            _check_target_range(tgt, out.shape[1], fname)
        sel = out.gather(1, tgt[:, None]).sum()
        g = torch.autograd.grad(sel, rows, allow_unused=True)[0] if sel.requires_grad else None
    if g is None:                                   # the selected outputs do not depend on x
        g = torch.zeros_like(rows)
    return g.detach(), out.detach(), tgt


def _chunks(total: int, chunk: int, device) -> Iterator[Tensor]:
    for r0 in range(0, total, chunk):
        yield torch.arange(r0, min(r0 + chunk, total), device=device)


def _chunk_size(chunk_size, B: int, points: int, fname: str) -> int:
    if chunk_size is None:
        return max(1, min(B * points, _DEFAULT_MAX_ROWS))
    return _check_int(chunk_size, "chunk_size", fname)


def _normal(shape, dtype: torch.dtype, device, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws of ``shape`` (drawn in x's dtype for fp32/fp64, else fp32, on the
    generator's device), moved to ``device``."""
    dd = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dd, device=gdev).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ methods
def _input_gradient(fname: str, model: Callable, x, target, forward_kwargs) -> tuple[Tensor, Tensor]:
    """(x, ∂f_target(x)/∂x) after validating the arguments for ``fname``; an empty batch gives zeros."""
    x = _check_x(x, fname)
    t = _check_target(target, x.shape[0], x.device, fname)
    fkw = _check_fkw(forward_kwargs, fname)
    if x.shape[0] == 0:
        return x, torch.zeros_like(x)
    g, _, _ = _grad_rows(model, x, t, fname, fkw)
    return x, g


def saliency(model: Callable, x: Tensor, target=None, *, abs: bool = False,  # noqa: A002
             forward_kwargs: dict | None = None) -> Tensor:
    """Gradient ∂f_target(x)/∂x per sample; ``abs=True`` returns its absolute value (Captum's
    ``Saliency`` default). ``forward_kwargs``: extra keyword arguments of the model (e.g. an
    attention mask [B, T]); every method takes them, tensors with first dimension B per sample."""
    x, g = _input_gradient("saliency", model, x, target, forward_kwargs)
    return (g.abs() if abs else g).to(x.dtype)


def input_x_gradient(model: Callable, x: Tensor, target=None, *, forward_kwargs: dict | None = None) -> Tensor:
    """x ⊙ ∂f_target(x)/∂x (Captum's ``InputXGradient``)."""
    x, g = _input_gradient("input_x_gradient", model, x, target, forward_kwargs)
    return (x * g).to(x.dtype)


def _quadrature(method: str, steps: int, fname: str) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α_k in [0, 1] and weights w_k (Σ w_k = 1), float64, as Captum defines them."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    if steps < 2:
        raise ValueError(f"{fname}: steps must be >= 2 for method={method!r} (as in Captum); got {steps}")
    n = steps
    w = np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        w[0] /= 2
        w[-1] /= 2
        return np.linspace(0, 1, n), w
    if method == "riemann_left":
        return np.linspace(0, 1 - 1 / n, n), w
    if method == "riemann_right":
        return np.linspace(1 / n, 1, n), w
    return np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n), w      # riemann_middle


def integrated_gradients(model: Callable, x: Tensor, target=None, *, baseline=None, steps: int = 32,
                         method: str = "gausslegendre", chunk_size: int | None = None,
                         return_delta: bool = False, forward_kwargs: dict | None = None):
    """IG_i(x) = (x_i − x0_i) Σ_k w_k ∂f_t/∂x_i (x0 + α_k (x − x0)), the quadrature (α_k, w_k) of
    ``method`` with ``steps`` nodes on [0, 1] (identical to Captum's ``IntegratedGradients``).

    baseline x0: None (zeros), a scalar, or a tensor broadcastable to x. At most ``chunk_size``
    (sample, step) points per forward/backward (default min(B·steps, 512)). ``return_delta``: also
    the completeness gap Σ_i IG_i − (f_t(x) − f_t(x0)) per sample, float64 [B].
    """
    fname = "integrated_gradients"
    x = _check_x(x, fname)
    steps = _check_int(steps, "steps", fname)
    if method not in IG_METHODS:
        raise ValueError(f"{fname}: method must be one of {list(IG_METHODS)}; got {method!r}")
    alphas, weights = _quadrature(method, steps, fname)
    B = x.shape[0]
    chunk = _chunk_size(chunk_size, B, steps, fname)
    fkw = _check_fkw(forward_kwargs, fname)
    if baseline is None:
        x0 = torch.zeros_like(x)
    elif isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        x0 = torch.full_like(x, float(baseline))
    elif isinstance(baseline, Tensor):
        try:
            shape = torch.broadcast_shapes(baseline.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(f"{fname}: baseline must be broadcastable to x's shape {tuple(x.shape)}; "
                             f"got shape {tuple(baseline.shape)}")
        if not baseline.is_floating_point():
            raise TypeError(f"{fname}: baseline must be a floating-point tensor; got dtype {baseline.dtype}")
        x0 = baseline.detach().to(device=x.device, dtype=x.dtype).expand_as(x)
    else:
        raise TypeError(f"{fname}: baseline must be None, a real number or a tensor broadcastable to x; "
                        f"got {type(baseline).__name__}")
    if B == 0:
        z = torch.zeros_like(x)
        return (z, torch.zeros(0, dtype=torch.float64, device=x.device)) if return_delta else z
    t = _resolve_target(model, x, target, fname, fkw, chunk)
    acc = _acc_dtype(x.dtype)
    diff = x - x0
    a = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    w = torch.as_tensor(weights, dtype=acc, device=x.device)
    total = torch.zeros(x.shape, dtype=acc, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    for idx in _chunks(B * steps, chunk, x.device):     # point r = (step r // B, sample r % B)
        k, b = idx // B, idx % B
        rows = x0[b] + a[k].view(view) * diff[b]
        g, _, _ = _grad_rows(model, rows, t[b], fname, _rows_kwargs(fkw, b, B))
        total.index_add_(0, b, g.to(acc) * w[k].view(view))
    attr = (total * diff.to(acc)).to(x.dtype)
    if not return_delta:
        return attr
    fx = _forward(model, x, fname, fkw, chunk).gather(1, t[:, None])[:, 0].double()
    f0 = _forward(model, x0.contiguous(), fname, fkw, chunk).gather(1, t[:, None])[:, 0].double()
    delta = attr.reshape(B, -1).double().sum(1) - (fx - f0)
    return attr, delta


def smoothgrad(model: Callable, x: Tensor, target=None, *, noise_std: float = 0.1, samples: int = 16,
               generator: torch.Generator | None = None, base: str = "saliency", abs: bool = False,  # noqa: A002
               chunk_size: int | None = None, forward_kwargs: dict | None = None) -> Tensor:
    """SmoothGrad: (1/n) Σ_j A(x + ε_j), ε_j = noise_std · N(0, I) drawn as ``randn(x.shape,
    generator=generator)`` for j = 0, …, n−1 (n = ``samples``; noise_std absolute, like Captum's
    NoiseTunnel ``stdevs``), A the ``base`` attribution ("saliency", optionally ``abs``, or
    "input_x_gradient", which multiplies the *noisy* input). The target is fixed at the clean input
    (arg-max of model(x) when None). Chunked over (sample, draw) points like integrated_gradients.
    """
    fname = "smoothgrad"
    x = _check_x(x, fname)
    std = _check_nonneg(noise_std, "noise_std", fname)
    n = _check_int(samples, "samples", fname)
    if base not in ("saliency", "input_x_gradient"):
        raise ValueError(f"{fname}: base must be 'saliency' or 'input_x_gradient'; got {base!r}")
    if abs and base != "saliency":
        raise ValueError(f"{fname}: abs=True applies to base='saliency' only; got base={base!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fname}: generator must be a torch.Generator or None; got {type(generator).__name__}")
    B = x.shape[0]
    chunk = _chunk_size(chunk_size, B, n, fname)
    fkw = _check_fkw(forward_kwargs, fname)
    if B == 0:
        return torch.zeros_like(x)
    t = _resolve_target(model, x, target, fname, fkw, chunk)
    acc = _acc_dtype(x.dtype)
    total = torch.zeros(x.shape, dtype=acc, device=x.device)
    noise: dict[int, Tensor] = {}                            # draws in order j = 0, 1, ...; kept while needed
    for idx in _chunks(B * n, chunk, x.device):         # point r = (draw r // B, sample r % B)
        j, b = idx // B, idx % B
        j_lo, j_hi = int(j[0]), int(j[-1])
        for jj in [q for q in noise if q < j_lo]:
            del noise[jj]
        for jj in range(j_lo, j_hi + 1):
            if jj not in noise:
                noise[jj] = std * _normal(x.shape, x.dtype, x.device, generator)
        eps = torch.cat([noise[jj][b[j == jj]] for jj in range(j_lo, j_hi + 1)])
        rows = x[b] + eps
        g, _, _ = _grad_rows(model, rows, t[b], fname, _rows_kwargs(fkw, b, B))
        if base == "input_x_gradient":
            g = rows * g
        elif abs:
            g = g.abs()
        total.index_add_(0, b, g.to(acc))
    return (total / n).to(x.dtype)


METHODS = {"saliency": saliency, "input_x_gradient": input_x_gradient,
           "integrated_gradients": integrated_gradients, "smoothgrad": smoothgrad}


def attribute(model: Callable, x: Tensor, target=None, method: str = "saliency", **kwargs) -> Tensor:
    """Dispatch to one of ``METHODS`` with its keyword arguments. Integrated gradients' quadrature
    (its own ``method`` argument) is passed here as ``ig_method=``."""
    if method not in METHODS:
        raise ValueError(f"attribute: method must be one of {sorted(METHODS)}; got {method!r}")
    if "ig_method" in kwargs:
        if method != "integrated_gradients":
            raise ValueError(f"attribute: ig_method applies to method='integrated_gradients' only; got method={method!r}")
        kwargs["method"] = kwargs.pop("ig_method")
    return METHODS[method](model, x, target, **kwargs)


def token_attributions(attributions: Tensor, *, reduce: str = "sum", mask: Tensor | None = None) -> Tensor:
    """Per-token scores [B, T] from attributions on input embeddings [B, T, H]: the sum over H
    (``reduce="sum"``: signed; for input × gradient or IG this is the token's share of the output) or
    the L2 norm over H (``"l2"``). Positions with mask == 0 are set to 0."""
    fname = "token_attributions"
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{fname}: attributions must be a torch.Tensor [B, T, H]; got {type(attributions).__name__}")
    if attributions.dim() != 3:
        raise ValueError(f"{fname}: attributions must have shape [B, T, H]; got shape {tuple(attributions.shape)}")
    if reduce == "sum":
        s = attributions.sum(-1)
    elif reduce == "l2":
        s = torch.linalg.vector_norm(attributions, dim=-1)
    else:
        raise ValueError(f"{fname}: reduce must be 'sum' or 'l2'; got {reduce!r}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            mask = torch.as_tensor(mask)
        if mask.shape != s.shape:
            raise ValueError(f"{fname}: mask must have shape [B, T] = {tuple(s.shape)}; got shape {tuple(mask.shape)}")
        s = torch.where(mask.to(s.device) != 0, s, torch.zeros_like(s))
    return s.detach()
