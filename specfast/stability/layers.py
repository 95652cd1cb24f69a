"""Layer-wise view of a network: stages, the explicit product form J_f(x) = W_L D_{L-1}(x) ⋯ D_1(x) W_1,
per-stage Jacobian norms, the layer-product bound and the linear-region radius of piecewise-linear nets.

A network is given as a list of *stages* whose composition is f (an ``nn.Sequential``'s children,
or what a module's ``stability_stages()`` returns). Stages are classified as

- affine: ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.AvgPool1d/2d/3d``, ``nn.Flatten``,
  ``nn.Identity``, ``nn.Dropout`` (eval). Their Jacobian is the same linear map at every input.
- elementwise activations with a known global Lipschitz constant sup|φ'| (ReLU and LeakyReLU are
  also piecewise linear, with gates D(x) = diag(φ'(z))).
- anything else (attention blocks, norms, …): only its local Jacobian at the data is measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp

from .krylov import eigsh
from .operators import InputJacobian, StabilityError

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


def activation_lipschitz(stage) -> float | None:
    """sup_z |φ'(z)| for the elementwise activations we know, else None."""
    if isinstance(stage, (nn.ReLU, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Softsign)):
        return 1.0
    if isinstance(stage, nn.LeakyReLU):
        return max(1.0, abs(stage.negative_slope))
    if isinstance(stage, nn.ELU):
        return max(1.0, float(stage.alpha))
    if isinstance(stage, nn.Sigmoid):
        return 0.25
    if isinstance(stage, nn.GELU):
        return 1.128905  # sup of Φ(z) + zφ(z), at z = √2, rounded up
    if isinstance(stage, nn.SiLU):
        return 1.099840  # sup of σ(z)(1 + z(1 − σ(z))), at z ≈ 2.3994, rounded up
    return None


def is_affine(stage) -> bool:
    return isinstance(stage, _AFFINE)


def is_piecewise_linear_gate(stage) -> bool:
    return isinstance(stage, (nn.ReLU, nn.LeakyReLU))


def stage_name(stage, i: int) -> str:
    name = type(stage).__name__ if isinstance(stage, nn.Module) else getattr(stage, "__name__", type(stage).__name__)
    return f"{i}:{name}"


def resolve_stages(model: nn.Module, stages):
    """(names, callables) of the stages: given, or an nn.Sequential's children, or
    model.stability_stages(); (None, None) if unknown. Stages may be given as callables or as
    (name, callable) pairs."""
    if stages is None:
        if isinstance(model, nn.Sequential):
            stages = list(model.named_children())
        elif hasattr(model, "stability_stages"):
            stages = list(model.stability_stages())
        else:
            return None, None
    try:
        stages = list(stages)
    except TypeError:
        raise StabilityError("analyze: stages must be a list of callables (or (name, callable) pairs) whose "
                             f"composition is the model; got {stages!r}") from None
    pairs = [s if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) else (None, s) for s in stages]
    if not pairs or not all(callable(f) for _, f in pairs):
        raise StabilityError("analyze: stages must be a non-empty list of callables (or (name, callable) pairs) "
                             f"whose composition is the model; got {stages!r}")
    names = [f"{i}:{n}" if n is not None else stage_name(f, i) for i, (n, f) in enumerate(pairs)]
    return names, [f for _, f in pairs]


def _affine_bias_free(stage):
    """The linear part of an affine stage (its Jacobian), as a function."""
    if isinstance(stage, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and stage.bias is not None:
        return lambda z: stage(z) - stage(torch.zeros_like(z))
    return stage


def operator_norm(stage, h: Tensor, *, tol: float = 1e-6, dense_max: int = 1 << 20,
                  generator=None, dtype=torch.float32) -> tuple[float, float]:
    """(σ₁, certified upper bound) of an affine stage's linear part on inputs shaped like h[0]."""
    x = h[:1].detach()
    lin = _affine_bias_free(stage)
    out_numel = lin(x).numel()
    if out_numel * x.numel() <= dense_max:
        M = jacrev(lin)(x).detach().reshape(out_numel, x.numel()).double()
        s = float(torch.linalg.matrix_norm(M, ord=2)) if M.numel() else 0.0
        return s, s * (1 + 1e-12)
    op = InputJacobian(lin, x)
    mv, n = op.gram()
    r = eigsh(mv, n, 1, tol=tol, max_matvecs=300, generator=generator, dtype=dtype)
    lam, res = float(r.values[0, 0]), float(r.residuals[0, 0])
    return math.sqrt(max(lam, 0.0)), math.sqrt(max(lam + res, 0.0))


def local_norms(fn, x: Tensor, *, tol: float, max_matvecs: int, generator=None,
                dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (σ₁, certified upper bound, converged) of the Jacobian of fn at each sample of x."""
    op = InputJacobian(fn, x)
    mv, n = op.gram()
    r = eigsh(mv, n, 1, batch=op.B, tol=tol, max_matvecs=max_matvecs, generator=generator, dtype=dtype)
    lam, res = r.values[:, 0], r.residuals[:, 0]
    return lam.clamp_min(0).sqrt(), (lam + res).clamp_min(0).sqrt(), r.converged[:, 0]


@dataclass
class ProductForm:
    """J_f(x_b) = W_L D_{L-1}(x_b) W_{L-1} ⋯ D_1(x_b) W_1 for a plain feed-forward network.

    weights: the L affine factors as dense matrices [out, in] (convolutions and pooling as the
        matrices of their linear maps on the actual input shape; consecutive affine stages merged).
    gates: L-1 tensors [B, width], the diagonals of D_l(x_b) = diag(φ'(z_l(x_b))).
    """

    weights: list[Tensor]
    gates: list[Tensor]
    batch: int

    def jacobian(self) -> Tensor:
        """[B, C, d] float64: the product, sample by sample."""
        J = self.weights[0].double().expand(self.batch, *self.weights[0].shape)
        for D, W in zip(self.gates, self.weights[1:]):
            J = W.double() @ (D.double()[:, :, None] * J)
        return J


def product_form(stages, x: Tensor, *, dense_max: int = 1 << 22) -> ProductForm:
    """The gates and factors of a feed-forward network made of affine stages and elementwise
    activations. Raises StabilityError naming the first stage that is neither."""
    weights, gates = [], []
    current = None           # the running affine factor (consecutive affine stages multiply)
    h = x.detach()
    for i, stage in enumerate(stages):
        if is_affine(stage):
            n_in = h[0].numel()
            lin = _affine_bias_free(stage)
            out = stage(h)
            if out[0].numel() * n_in > dense_max:
                raise StabilityError(f"product_form: stage {stage_name(stage, i)} maps {n_in} to "
                                     f"{out[0].numel()} values; its dense factor exceeds dense_max={dense_max}")
            M = jacrev(lin)(h[:1]).reshape(out[0].numel(), n_in).detach()
            current = M if current is None else M @ current
            h = out.detach()
        elif activation_lipschitz(stage) is not None:
            if current is None:
                current = torch.eye(h[0].numel(), dtype=h.dtype)
            weights.append(current)
            current = None
            z = h
            _, d = jvp(stage, (z,), (torch.ones_like(z),))
            gates.append(d.reshape(z.shape[0], -1).detach())
            h = stage(z).detach()
        else:
            raise StabilityError(f"product_form: stage {stage_name(stage, i)} is neither affine nor an "
                                 "elementwise activation; the explicit product form covers plain "
                                 "feed-forward networks only")
    weights.append(current if current is not None else torch.eye(h[0].numel(), dtype=h.dtype))
    return ProductForm(weights, gates, x.shape[0])


def linear_region_radius(stages, x: Tensor, *, tol: float = 1e-6, max_matvecs: int = 300, generator=None,
                         dtype=torch.float32) -> Tensor:
    """Per-sample certified radius r(x) of the linear region of a piecewise-linear network (affine
    stages and ReLU/LeakyReLU gates only): for ‖δ‖ < r(x) no gate changes, so f(x+δ) = f(x) + J(x)δ
    exactly and the gradient attribution is unchanged.

    r(x) = min_l min_j |z_{l,j}(x)| / ‖J_{z_l}(x)‖₂ with z_l the input of the l-th gate and J_{z_l} the
    Jacobian of the prefix network (certified upper bound of its norm); valid because inside the
    region every z_{l,j} is affine in x with gradient norm at most ‖J_{z_l}(x)‖₂."""
    B = x.shape[0]
    r = torch.full((B,), float("inf"), dtype=torch.float64)
    for l, stage in enumerate(stages):
        if not is_piecewise_linear_gate(stage):
            continue
        prefix = stages[:l]

        def pre(z, prefix=prefix):
            for s in prefix:
                z = s(z)
            return z

        with torch.no_grad():
            z = pre(x).reshape(B, -1).double()
        _, upper, _ = local_norms(pre, x, tol=tol, max_matvecs=max_matvecs, generator=generator, dtype=dtype)
        margin = z.abs().amin(1)
        r = torch.minimum(r, torch.where(upper > 0, margin / upper, torch.full_like(margin, float("inf"))))
    return r
