"""The four operators of the stability framework as matrix-free products, built on ``torch.func``.

For a model f and a batch X = (x_1, …, x_B) with outputs f(x_i) ∈ R^C (any output shape, flattened)
and inputs x_i ∈ R^d (any input shape, flattened), parameters θ ∈ R^p:

- input Jacobian  J_i = ∂f(x_i)/∂x_i ∈ R^{C×d}, one per sample. A forward-mode product (jvp) gives
  J_i v_i for every sample at once and a reverse-mode product (vjp, from one stored forward pass)
  gives J_iᵀ u_i; the batch is a block-diagonal operator, so per-sample spectra cost one batched
  call per product.
- parameter Jacobian  J_θ = ∂ vec f(X)/∂θ ∈ R^{BC×p}: jvp gives J_θ v, vjp gives J_θᵀ u.
- empirical NTK  K = J_θ J_θᵀ ∈ R^{BC×BC}: K u = J_θ(J_θᵀ u) (a vjp then a jvp).
- loss Hessian  H = ∇²_θ ℓ(θ): forward-over-reverse Hessian-vector products.

Nothing of size p×p, BC×p or d×d is formed: each product stores one activation graph and a few
vectors. Failures inside autograd are re-raised as ``StabilityError`` naming what was being
differentiated.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp


class StabilityError(ValueError):
    """Bad input to the stability analysis: names the argument, the expected and the actual value."""


def _wrap(what: str, fn: Callable):
    try:
        return fn()
    except StabilityError:
        raise
    except (RuntimeError, NotImplementedError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        hint = ""
        if "forward AD" in msg or "forward-mode" in msg or "jvp" in msg.lower():
            hint = ("; an operation has no forward-mode derivative in this torch build (e.g. fused or flash "
                    "attention kernels: use the math kernel, torch.nn.attention.sdpa_kernel(SDPBackend.MATH), "
                    "or attn_implementation='eager')")
        raise StabilityError(f"{what}: the model is not differentiable here ({type(e).__name__}: {msg}){hint}") from e


def _work(t: Tensor) -> Tensor:
    """Products come back in float32, or float64 for a float64 model (half types are widened)."""
    return t if t.dtype == torch.float64 else t.float()


def flatten(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class ModelFunction:
    """f(params, x) for a module with extra keyword arguments (e.g. an attention mask) held fixed.

    params: the named parameters that require grad (the θ of the parameter operators); every other
    parameter and buffer is taken from the module as it is.
    """

    def __init__(self, model: nn.Module, model_kwargs: dict | None = None,
                 output_fn: Callable | None = None, params: dict[str, Tensor] | None = None):
        self.model = model
        self.kwargs = dict(model_kwargs or {})
        self.output_fn = output_fn
        if params is None:
            params = {k: v for k, v in model.named_parameters() if v.requires_grad}
        known = dict(model.named_parameters())
        unknown = [k for k in params if k not in known]
        if unknown:
            raise StabilityError(f"analyze: params names {unknown[:5]}, which are not parameters of the model "
                                 f"(parameters: {', '.join(list(known)[:10])}{', …' if len(known) > 10 else ''})")
        self.params = {k: v.detach() for k, v in params.items()}
        self.names = list(self.params)
        self.shapes = [v.shape for v in self.params.values()]
        self.numels = [v.numel() for v in self.params.values()]
        self.p = sum(self.numels)

    def __call__(self, params: dict[str, Tensor] | None, x: Tensor) -> Tensor:
        if params is None:
            out = self.model(x, **self.kwargs)
        else:
            out = functional_call(self.model, params, (x,), self.kwargs)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor):
            raise StabilityError(f"analyze: the model returned {type(out).__name__}, expected a Tensor; "
                                 f"pass output_fn= to pick the output to analyse (e.g. lambda o: o.logits)")
        return out

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        parts = vec.split(self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def theta(self) -> Tensor:
        return flatten(self.params.values())


class InputJacobian:
    """The per-sample input Jacobians J_i of f at a batch x [B, ...] as a block-diagonal operator."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor):
        """fn: x [B, ...] -> outputs [B, ...], samples independent of each other."""
        self.fn = fn
        self.x = x = x.detach()
        self.B = x.shape[0]
        self.d = x[0].numel()
        out, self._vjp = _wrap("input Jacobian (vjp)", lambda: vjp(fn, x))
        self.out = out.detach()
        self.out_shape = out.shape
        self.C = out[0].numel() if out.dim() > 0 and out.shape[0] == self.B else -1
        if out.dim() == 0 or out.shape[0] != self.B:
            raise StabilityError(f"analyze: the model output must have the batch size {self.B} as its first "
                                 f"dimension; got shape {tuple(out.shape)}")
        self.dtype = out.dtype

    def jvp(self, v: Tensor) -> Tensor:
        """[B, d] -> [B, C]: J_i v_i for every sample."""
        t = v.reshape(self.x.shape).to(self.x.dtype)
        # not under no_grad: that switches modules such as nn.TransformerEncoderLayer to fused
        # fast paths without forward-mode AD; the result is detached so no graph outlives the call
        _, jv = _wrap("input Jacobian (jvp)", lambda: jvp(self.fn, (self.x,), (t,)))
        return _work(jv.detach().reshape(self.B, self.C))

    def vjp(self, u: Tensor) -> Tensor:
        """[B, C] -> [B, d]: J_iᵀ u_i for every sample."""
        (g,) = _wrap("input Jacobian (vjp)", lambda: self._vjp(u.reshape(self.out_shape).to(self.dtype)))
        return _work(g.detach().reshape(self.B, self.d))

    def gram(self):
        """(matvec, n) of the smaller Gram operator per sample: J Jᵀ on R^C or Jᵀ J on R^d."""
        if self.C <= self.d:
            return (lambda u: self.jvp(self.vjp(u))), self.C
        return (lambda v: self.vjp(self.jvp(v))), self.d

    def dense(self) -> Tensor:
        """[B, C, d] by C vjps (only for small C; used for exact spectra)."""
        rows = []
        for c in range(self.C):
            u = torch.zeros(self.B, self.C, dtype=self.dtype)
            u[:, c] = 1
            rows.append(self.vjp(u))
        return torch.stack(rows, 1)


class ParameterJacobian:
    """J_θ = ∂ vec f(X)/∂θ ∈ R^{BC×p} and the empirical NTK K = J_θ J_θᵀ."""

    def __init__(self, f: ModelFunction, x: Tensor):
        self.f, self.x = f, x.detach()
        params = f.params
        out, self._vjp = _wrap("parameter Jacobian (vjp)", lambda: vjp(lambda P: f(P, self.x), params))
        self.out_shape = out.shape
        self.n = out.numel()
        self.p = f.p
        self.dtype = out.dtype

    def jvp(self, v: Tensor) -> Tensor:
        """[p] -> [BC]"""
        t = {k: a.to(self.f.params[k].dtype) for k, a in self.f.unflatten(v).items()}
        _, jv = _wrap("parameter Jacobian (jvp)", lambda: jvp(lambda P: self.f(P, self.x), (self.f.params,), (t,)))
        return _work(jv.detach().reshape(-1))

    def vjp(self, u: Tensor) -> Tensor:
        """[BC] -> [p]"""
        (g,) = _wrap("parameter Jacobian (vjp)", lambda: self._vjp(u.reshape(self.out_shape).to(self.dtype)))
        return _work(flatten(g[k] for k in self.f.names).detach())

    def ntk_matvec(self, u: Tensor) -> Tensor:
        """[1, BC] -> [1, BC]: K u (batched form for the Krylov routines)."""
        return self.jvp(self.vjp(u[0]))[None]


class LossHessian:
    """H = ∇²_θ ℓ(f(X; θ), Y) by forward-over-reverse Hessian-vector products."""

    def __init__(self, f: ModelFunction, x: Tensor, targets, loss_fn: Callable):
        self.f, self.x, self.targets, self.loss_fn = f, x.detach(), targets, loss_fn
        self.p = f.p

        def loss(P):
            value = loss_fn(f(P, self.x), targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise StabilityError(f"analyze: loss_fn must return a scalar tensor; got "
                                     f"{type(value).__name__}{'' if not isinstance(value, Tensor) else tuple(value.shape)}")
            return value.reshape(())

        self._loss = loss
        self._grad = grad(loss)
        with torch.no_grad():
            self.value = float(_wrap("loss", lambda: loss(f.params)))
        g = _wrap("loss gradient", lambda: self._grad(f.params))
        self.gradient_norm = float(flatten(g[k] for k in f.names).double().norm())

    def matvec(self, v: Tensor) -> Tensor:
        """[1, p] -> [1, p]"""
        t = {k: a.to(self.f.params[k].dtype) for k, a in self.f.unflatten(v[0]).items()}
        _, hv = _wrap("loss Hessian (Hessian-vector product)",
                      lambda: jvp(self._grad, (self.f.params,), (t,)))
        return _work(flatten(hv[k] for k in self.f.names).detach())[None]
