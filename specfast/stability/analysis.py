"""``specfast.stability.analyze``: the spectra of the four operators, the bounds they give and the GMSI.

Every definition and derivation is in docs/stability.md; the comments here only say what is computed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from .krylov import eigsh, hutchpp, slq
from .layers import (activation_lipschitz, is_affine, is_piecewise_linear_gate, linear_region_radius,
                     local_norms, operator_norm, resolve_stages)
from .operators import InputJacobian, LossHessian, ModelFunction, ParameterJacobian, StabilityError, _wrap


@dataclass
class StabilityReport:
    """Result of ``analyze``.

    gmsi: the Global Matrix Stability Index, Σ_k log10 max(c_k, 1) over the components.
    components: c_k by name (forward, parameter, ntk, curvature); None where not computed.
    per_sample: one row per input (input-Jacobian spectrum, entropy, bounds, attribution terms).
    batch: batch-level quantities (NTK, parameter Jacobian, Hessian, linearised-training limits).
    layers: per-stage Jacobian norms and the layer-product bound (None with layers_note if unknown).
    certificates: the evidence behind each estimate (method, products used, residuals, errors).
    bounds: each stated bound with its constant.
    """

    gmsi: float
    components: dict
    scales: dict
    per_sample: "object"
    batch: dict
    layers: "object | None"
    layers_note: str
    certificates: dict
    bounds: list
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"gmsi": self.gmsi, "components": self.components, "scales": self.scales,
                "batch": self.batch, "layers_note": self.layers_note, "certificates": self.certificates,
                "bounds": self.bounds, "timings": self.timings, "options": self.options}

    def save(self, out) -> list[Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "stability.json", out / "per_sample.csv"]
        paths[0].write_text(json.dumps(_jsonable(self.to_dict()), indent=2))
        self.per_sample.to_csv(paths[1], index=False)
        if self.layers is not None:
            paths.append(out / "layers.csv")
            self.layers.to_csv(paths[-1], index=False)
        return paths

    def summary(self) -> str:
        c = self.components
        lines = [f"GMSI = {self.gmsi:.3f}  (Σ log10 max(c, 1) over the components below)"]
        for k, v in c.items():
            lines.append(f"  {k:<10} {'not computed' if v is None else f'{v:.4g}'}")
        ps = self.per_sample
        lines.append(f"input Jacobian over {len(ps)} samples: ‖J‖₂ median {ps['jac_norm'].median():.4g}, "
                     f"max {ps['jac_norm'].max():.4g}; entropy median {ps['jac_entropy'].median():.3f} nats "
                     f"(effective rank {ps['jac_effective_rank'].median():.3g} of {int(ps['jac_rank_bound'].iloc[0])}); "
                     f"typical/worst gain median {ps['typical_over_worst'].median():.3g}")
        b = self.batch
        if "ntk_eig_max" in b:
            lines.append(f"NTK ({b['ntk_dim']}×{b['ntk_dim']}): λ_max {b['ntk_eig_max'][0]:.4g}, λ_min "
                         f"{b['ntk_eig_min'][0]:.4g}{'' if b['ntk_eig_min_converged'] else ' (unconverged: upper bound)'}"
                         f", condition {b['ntk_condition']:.4g}, entropy {b['ntk_entropy']:.3f} ± {b['ntk_entropy_se']:.2g}")
        if "hessian_eig_max" in b:
            lines.append(f"Hessian ({b['num_params']} params): top {b['hessian_eig_max'][0]:.4g}, most negative "
                         f"{b['hessian_eig_min'][0]:.4g}, trace {b['hessian_trace']:.4g} ± {b['hessian_trace_se']:.2g}; "
                         f"GD stable for lr < {b['hessian_max_stable_lr']:.3g}")
        if self.layers is not None:
            lines.append(f"layer-product bound / ‖J‖₂: median {ps['product_tightness'].median():.3g}")
        else:
            lines.append(f"layers: {self.layers_note}")
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Tensor):
        return _jsonable(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy (mean) for integer class targets [B]; ½·mean_i ‖f(x_i) − y_i‖² for float
    targets shaped like the outputs."""
    if not targets.is_floating_point():
        return nn.functional.cross_entropy(outputs.reshape(outputs.shape[0], -1), targets)
    return 0.5 * (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1).mean()


def _check_inputs(model, inputs, targets, loss_fn, topk):
    if not isinstance(model, nn.Module):
        raise StabilityError(f"analyze: model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(inputs, Tensor):
        raise StabilityError(f"analyze: inputs must be a Tensor [B, ...]; got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise StabilityError(f"analyze: inputs must be floating point (the differentiable input, e.g. token "
                             f"embeddings rather than token ids); got dtype {inputs.dtype}")
    if inputs.dim() < 2 or inputs.shape[0] < 1 or inputs[0].numel() < 1:
        raise StabilityError(f"analyze: inputs must have shape [B, ...] with B >= 1 and a non-empty sample; "
                             f"got shape {tuple(inputs.shape)}")
    if not bool(torch.isfinite(inputs).all()):
        bad = (~torch.isfinite(inputs)).reshape(inputs.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise StabilityError(f"analyze: inputs contain NaN or Inf at samples {bad[:10]}")
    if targets is not None:
        if not isinstance(targets, Tensor) or targets.dim() < 1 or targets.shape[0] != inputs.shape[0]:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise StabilityError(f"analyze: targets must be a Tensor with batch size {inputs.shape[0]}; got {got}")
    if loss_fn is not None and not callable(loss_fn):
        raise StabilityError(f"analyze: loss_fn must be callable (outputs, targets) -> scalar; got {loss_fn!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise StabilityError(f"analyze: topk must be an integer >= 1; got {topk!r}")
    if targets is not None and targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        bad = (~torch.isfinite(targets)).reshape(targets.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise StabilityError(f"analyze: targets contain NaN or Inf at samples {bad[:10]}")


def _check_options(model_kwargs, output_fn, params, options: dict, scales: dict):
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise StabilityError("analyze: model_kwargs must be a dict of keyword arguments for "
                             f"model(inputs, **model_kwargs); got {type(model_kwargs).__name__}")
    if output_fn is not None and not callable(output_fn):
        raise StabilityError(f"analyze: output_fn must be callable (model output) -> Tensor; got {output_fn!r}")
    if params is not None and not isinstance(params, dict):
        raise StabilityError(f"analyze: params must be a dict name -> parameter (e.g. dict(model.named_parameters()));"
                             f" got {type(params).__name__}")
    for name, (value, minimum) in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise StabilityError(f"analyze: {name} must be an integer >= {minimum}; got {value!r}")
    tol = scales.pop("tol")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise StabilityError(f"analyze: tol must be in (0, 1); got {tol!r}")
    for name, value in scales.items():
        if value is None:
            continue
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        if not ok:
            shown = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
            raise StabilityError(f"analyze: {name} must be a positive finite number; got {shown}")


def _check_independent(fn, x: Tensor):
    """One jvp with a tangent on sample 0 only: the other samples' outputs must not move
    (BatchNorm in training mode, for instance, couples the samples)."""
    if x.shape[0] < 2:
        return
    t = torch.zeros_like(x)
    t[0] = torch.randn_like(x[0])
    _, jv = _wrap("input Jacobian (jvp)", lambda: jvp(fn, (x,), (t,)))
    jv = jv.detach()
    leak = jv[1:].abs().max()
    if float(leak) > 1e-6 * max(float(jv[0].abs().max()), 1e-30):
        raise StabilityError("analyze: the samples of the batch interact (perturbing sample 0 changes the "
                             "outputs of others, e.g. BatchNorm in training mode); call model.eval() or analyse "
                             "samples that are processed independently")


def _sv_from_gram(values: Tensor, residuals: Tensor):
    lam = values.clamp_min(0)
    return lam.sqrt(), (values + residuals).clamp_min(0).sqrt()


def _flush_denormals(fn):
    """Run with subnormal floats flushed to zero, then restore torch's default (no getter exists;
    the default is off). Unit-norm Krylov vectors pushed through saturated activations (GELU's
    exp(−z²/2), softmax tails) produce subnormal tangents, and subnormal arithmetic made every
    product of MiniLM ~30× slower on x86; flushed values are below 1.2e-38 in absolute value."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        flushed = torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            if flushed:
                torch.set_flush_denormal(False)
    return wrapper


@_flush_denormals
def analyze(model: nn.Module, inputs: Tensor, targets: Tensor | None = None,
            loss_fn: Callable | None = None, *, model_kwargs: dict | None = None,
            output_fn: Callable | None = None, params: dict | None = None, stages=None, topk: int = 5,
            tol: float = 1e-3, max_matvecs: int = 200, entropy_probes: int = 8, entropy_steps: int = 20,
            trace_matvecs: int = 30, exact_max_dim: int = 64, ntk: bool = True, hessian: bool = True,
            attribution: bool = True, input_scale: float | None = None, output_scale: float | None = None,
            seed: int = 0, checkpoint=None, log: Callable[[str], None] | None = None) -> StabilityReport:
    """Spectral stability report of ``model`` at the batch ``inputs`` [B, ...].

    model(inputs, **model_kwargs) (then ``output_fn``) must return outputs [B, ...] with samples
    processed independently. ``params``: the named parameters θ of the parameter Jacobian, NTK and
    Hessian (default: every parameter with requires_grad). The Hessian needs ``loss_fn(outputs,
    targets)`` or targets (cross-entropy for class indices, ½·mean squared error otherwise).
    ``stages``: callables whose composition is the model, for the per-layer table (default: an
    nn.Sequential's children or ``model.stability_stages()``).

    Spectra: exact from dense Grams when the dimension is <= exact_max_dim; otherwise thick-restart
    Lanczos to relative residual ``tol`` within ``max_matvecs`` products, SLQ with
    ``entropy_probes`` × ``entropy_steps`` products for entropies, Hutch++ with ``trace_matvecs``
    products for the Hessian trace. Every estimate carries its certificate in ``report.certificates``.

    ``checkpoint``: a file path; each finished section (input Jacobian, attribution, layers, NTK,
    Hessian) is saved there, and a later call with the same model, data and options resumes after
    the last finished section (a checkpoint written for anything else is refused).
    """
    import pandas as pd

    _check_inputs(model, inputs, targets, loss_fn, topk)
    _check_options(model_kwargs, output_fn, params,
                   {"max_matvecs": (max_matvecs, 1), "entropy_probes": (entropy_probes, 1),
                    "entropy_steps": (entropy_steps, 1), "trace_matvecs": (trace_matvecs, 3),
                    "exact_max_dim": (exact_max_dim, 0), "seed": (seed, 0)},
                   {"tol": tol, "input_scale": input_scale, "output_scale": output_scale})
    coupled = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if coupled:
        raise StabilityError(f"analyze: the samples of the batch interact: {coupled[0] or type(model).__name__} is a "
                             "BatchNorm in training mode (it normalises with batch statistics and would update its "
                             "running statistics); call model.eval() first")
    say = log or (lambda s: None)
    timings, certs, bounds = {}, {}, []
    x = inputs.detach()
    B = x.shape[0]
    mf = ModelFunction(model, model_kwargs, output_fn, params)
    fx = lambda z: mf(None, z)  # noqa: E731
    with torch.no_grad():
        try:
            out = fx(x)
        except StabilityError:
            raise
        except Exception as e:
            raise StabilityError(f"analyze: model(inputs, **model_kwargs) failed for inputs of shape {tuple(x.shape)}, "
                                 f"dtype {x.dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not out.is_floating_point():
        raise StabilityError(f"analyze: the model output must be floating point; got dtype {out.dtype}")
    if out.dim() == 0 or out.shape[0] != B:
        raise StabilityError(f"analyze: the model output must have the batch size {B} as its first dimension; "
                             f"got shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).reshape(B, -1).any(1).nonzero().flatten().tolist()
        raise StabilityError(f"analyze: the model output has NaN or Inf at samples {bad[:10]}")
    C_out = out[0].numel()
    class_targets = targets is not None and not targets.is_floating_point() and targets.dim() == 1
    if class_targets and loss_fn is None and (int(targets.min()) < 0 or int(targets.max()) >= C_out):
        raise StabilityError(f"analyze: class targets must lie in [0, {C_out}); got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
    if loss_fn is None and targets is not None:
        if not targets.is_floating_point() and targets.dim() == 1:
            loss_fn = default_loss
        elif targets.is_floating_point() and targets.shape == out.shape:
            loss_fn = default_loss
        else:
            raise StabilityError(f"analyze: targets must be class indices [B] or floats shaped like the outputs "
                                 f"{tuple(out.shape)} when loss_fn is not given; got {targets.dtype} "
                                 f"{tuple(targets.shape)}")
    _check_independent(fx, x)
    out_flat = out.reshape(B, -1).double()
    wd = torch.float64 if out.dtype == torch.float64 else torch.float32   # Krylov working precision
    C, d = out_flat.shape[1], x[0].numel()

    # ---- scales (§8 of docs/stability.md)
    s_in = float(input_scale) if input_scale is not None else float(x.reshape(B, -1).double().pow(2).sum(1).mean().sqrt())
    if output_scale is not None:
        s_out = float(output_scale)
    elif targets is not None and targets.is_floating_point() and targets.shape == out.shape:
        s_out = float(targets.reshape(B, -1).double().pow(2).sum(1).mean().sqrt())
    else:
        s_out = 1.0
    for name, v, what in (("input_scale", s_in, "inputs"), ("output_scale", s_out, "targets")):
        if not (v > 0 and math.isfinite(v)):
            raise StabilityError(f"analyze: {name} (default: the RMS norm of the {what}) must be positive and finite; "
                                 f"got {v} (pass {name}=)")
    theta = mf.theta().double()
    theta_norm = float(theta.norm())
    components = {"forward": None, "parameter": None, "ntk": None, "curvature": None}
    batch: dict = {"batch_size": B, "output_dim": C, "input_dim": d, "num_params": mf.p, "theta_norm": theta_norm}
    rows: dict = {}
    layers_df, layers_note = None, ""
    options = {"topk": topk, "tol": tol, "max_matvecs": max_matvecs, "entropy_probes": entropy_probes,
               "entropy_steps": entropy_steps, "trace_matvecs": trace_matvecs, "exact_max_dim": exact_max_dim,
               "seed": seed, "ntk": ntk, "hessian": hessian, "attribution": attribution}
    # Each section draws from its own generator, so a resumed run gives the same numbers.
    section_gen = lambda name: torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))  # noqa: E731
    ck = _Checkpoint(checkpoint, _fingerprint(x, targets, theta, out, options)) if checkpoint is not None else None
    done: list = []
    if ck is not None and (saved := ck.load()) is not None:
        done, rows, certs, bounds, batch, components, timings = (saved[k] for k in (
            "done", "rows", "certs", "bounds", "batch", "components", "timings"))
        layers_df = pd.DataFrame(saved["layers"]) if saved["layers"] is not None else None
        layers_note = saved["layers_note"]
        say(f"resuming from {ck.path}: {', '.join(done)} already computed")

    def finish(section):
        done.append(section)
        if ck is not None:
            ck.save({"done": done, "rows": rows, "certs": certs, "bounds": bounds, "batch": batch,
                     "components": components, "timings": timings, "layers_note": layers_note,
                     "layers": layers_df.to_dict("records") if layers_df is not None else None})

    # ---- input Jacobian, per sample
    if "input_jacobian" not in done:
        gen_ij = section_gen("input_jacobian")
        t0 = time.perf_counter()
        say(f"input Jacobian: {B} samples, {C}×{d} each")
        J = InputJacobian(fx, x)
        rank_bound = min(C, d)
        k_in = min(topk, rank_bound)
        if rank_bound <= exact_max_dim:
            dense = J.dense() if C <= d else _dense_by_jvp(J)
            sv = torch.linalg.svdvals(dense.double())                       # [B, rank_bound]
            top, top_upper = sv[:, :k_in], sv[:, :k_in]
            frob2 = sv.pow(2).sum(1)
            frob2_se = torch.zeros(B, dtype=torch.float64)
            p = sv.pow(2) / frob2.clamp_min(1e-300)[:, None]
            H = torch.where(frob2 > 0, -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(1),
                            torch.zeros_like(frob2))
            H_se = torch.zeros(B, dtype=torch.float64)
            conv = torch.ones(B, dtype=torch.bool)
            certs["input_jacobian"] = {"method": "exact (dense Jacobian, float64 SVD)", "products": rank_bound}
        else:
            mv, n = J.gram()
            r = eigsh(mv, n, k_in, batch=B, tol=tol, max_matvecs=max_matvecs, generator=gen_ij, dtype=wd)
            top, top_upper = _sv_from_gram(r.values, r.residuals)
            conv = r.converged.all(1)
            q = slq(mv, n, batch=B, num_probes=entropy_probes, steps=entropy_steps, generator=gen_ij, dtype=wd)
            frob2, frob2_se = q.trace(lambda t: t)
            H, H_se = q.entropy()
            H = H.clamp(0, math.log(rank_bound))
            certs["input_jacobian"] = {
                "method": "thick-restart Lanczos on the smaller Gram (J Jᵀ or Jᵀ J), batched over samples; SLQ entropy",
                "products": r.matvecs + q.matvecs, "lanczos_products": r.matvecs, "slq_products": q.matvecs,
                "max_relative_residual": float((r.residuals / r.values.abs().clamp_min(1e-300)).max()),
                "all_converged": bool(conv.all()), "slq_probes": entropy_probes, "slq_steps": entropy_steps}
        s1, s1_upper = top[:, 0], top_upper[:, 0]
        srank = torch.where(s1 > 0, frob2 / s1.pow(2).clamp_min(1e-300), torch.zeros_like(s1))
        eff = H.exp()
        rows.update({"sample": list(range(B)), "jac_norm": s1, "jac_norm_upper": s1_upper, "jac_converged": conv})
        for j in range(k_in):
            rows[f"jac_sv_{j + 1}"] = top[:, j]
        rows.update({"jac_frobenius": frob2.clamp_min(0).sqrt(), "jac_frobenius_sq_se": frob2_se,
                     "jac_stable_rank": srank, "jac_entropy": H, "jac_entropy_se": H_se, "jac_effective_rank": eff,
                     "jac_rank_bound": [rank_bound] * B,
                     # E‖Jδ‖² / (ε²‖J‖₂²) = srank/d for δ uniform on the ε-sphere; entropy bounds it by e^H/d
                     "typical_over_worst": (srank / d).sqrt(), "entropy_typical_bound": (eff.clamp(max=rank_bound) / d).sqrt(),
                     "input_norm": x.reshape(B, -1).double().norm(dim=1), "output_norm": out_flat.norm(dim=1)})
        timings["input_jacobian"] = time.perf_counter() - t0
        components["forward"] = float(s1_upper.max()) * s_in / s_out
        bounds.append({"name": "forward_local", "statement": "‖J_f(x_i) δ‖ ≤ ‖J_f(x_i)‖₂ ‖δ‖ for every δ; "
                       "first-order ‖f(x_i+δ) − f(x_i)‖ ≤ ‖J_f(x_i)‖₂ ‖δ‖ + o(‖δ‖)",
                       "constant": float(s1_upper.max())})
        bounds.append({"name": "typical_case", "statement": "E_δ ‖J δ‖² = ε² ‖J‖_F² / d ≤ ε² ‖J‖₂² e^H / d for δ uniform on "
                       "the sphere of radius ε in R^d; worst case ε² ‖J‖₂²", "median_typical_over_worst":
                       float(rows["typical_over_worst"].median())})
        finish("input_jacobian")
    s1, s1_upper = torch.as_tensor(rows["jac_norm"]), torch.as_tensor(rows["jac_norm_upper"])

    # ---- attribution: curvature of the explained output (smooth nets)
    if attribution and "attribution" not in done:
        gen = section_gen("attribution")
        t0 = time.perf_counter()
        # the class target with the default cross-entropy loss (targets are classes of the outputs);
        # otherwise (custom losses, regression) the largest output
        cls = targets.long() if class_targets and loss_fn is default_loss else out_flat.argmax(1)
        say("attribution: input Hessian of the explained output")

        def explained(z):
            return mf(None, z).reshape(B, -1).gather(1, cls[:, None]).sum()

        g_explained = grad(explained)

        def hvp(v):
            t = v.reshape(x.shape).to(x.dtype)
            _, hv = _wrap("attribution (input Hessian-vector product)", lambda: jvp(g_explained, (x,), (t,)))
            return hv.detach().reshape(B, d).to(wd)

        ra = eigsh(hvp, d, 1, batch=B, which="LM", tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd)
        rows["explained_output"] = cls
        rows["attribution_curvature"] = ra.values[:, 0].abs()
        rows["attribution_curvature_upper"] = ra.values[:, 0].abs() + ra.residuals[:, 0]
        certs["attribution"] = {"method": "Lanczos (largest magnitude) on input Hessian-vector products of the "
                                "explained output", "products": ra.matvecs, "all_converged": bool(ra.converged.all())}
        bounds.append({"name": "attribution_first_order",
                       "statement": "‖∇_x f_c(x+δ) − ∇_x f_c(x)‖ ≤ ‖∇²_x f_c(x)‖₂ ‖δ‖ + o(‖δ‖)",
                       "constant": float(rows["attribution_curvature_upper"].max())})
        timings["attribution"] = time.perf_counter() - t0
        finish("attribution")

    # ---- layers: per-stage local norms, the product bound, global Lipschitz, linear regions
    stage_names, stage_list = resolve_stages(model, stages)
    if stage_list is None:
        layers_note = ("not computed: pass stages= (callables whose composition is the model) or use an "
                       "nn.Sequential / a module with stability_stages()")
    elif model_kwargs or output_fn is not None:
        layers_note = ("not computed: with model_kwargs or output_fn the stages must take the model's input "
                       "alone; put them inside the stages (see stability_stages() of the default model)")
        stage_list = None
    if stage_list is not None and "layers" not in done:
        gen = section_gen("layers")
        t0 = time.perf_counter()
        say(f"layers: {len(stage_list)} stages")
        layers_df, prod, lip_global, lip_note = _layer_table(stage_names, stage_list, x, out, tol, max_matvecs, gen, wd)
        rows["product_bound"] = prod
        rows["product_tightness"] = prod / s1.clamp_min(1e-300)
        bounds.append({"name": "layer_product", "statement": "‖J_f(x)‖₂ ≤ Π_l ‖J_l(h_{l-1}(x))‖₂ (chain rule, "
                       "submultiplicativity)", "median_tightness": float(rows["product_tightness"].median())})
        if lip_global is not None:
            bounds.append({"name": "global_lipschitz", "statement": "‖f(x+δ) − f(x)‖ ≤ L ‖δ‖ for all x, δ with "
                           "L = Π ‖W_l‖₂ · Π Lip(φ_l)", "constant": lip_global})
        else:
            layers_note = f"global Lipschitz bound not available: {lip_note}"
        if all(is_affine(s) or is_piecewise_linear_gate(s) for s in stage_list) and any(
                is_piecewise_linear_gate(s) for s in stage_list):
            rows["linear_region_radius"] = linear_region_radius(stage_list, x, tol=tol, max_matvecs=max_matvecs,
                                                                generator=gen, dtype=wd)
            statement = "for ‖δ‖ < r(x): f(x+δ) = f(x) + J_f(x) δ exactly and the gradient attribution is unchanged"
            if all(0.0 <= getattr(g, "negative_slope", 0.0) <= 1.0 for g in stage_list if is_piecewise_linear_gate(g)):
                # needs ‖D‖ ≤ 1 and ‖D' − D‖ ≤ 1, i.e. gate slopes in [0, 1]
                statement += ("; for any δ, ‖∇f_c(x+δ) − ∇f_c(x)‖ ≤ N_flip(δ) · Π‖W_l‖₂ (N_flip: gate layers with "
                              "a flipped gate)")
            bounds.append({"name": "linear_region", "statement": statement,
                           "median_radius": float(rows["linear_region_radius"].median())})
        timings["layers"] = time.perf_counter() - t0
        finish("layers")

    # ---- parameter Jacobian and NTK
    if ntk and mf.p > 0 and "ntk" not in done:
        gen = section_gen("ntk")
        t0 = time.perf_counter()
        n = B * C
        say(f"NTK: {n}×{n} over {mf.p} parameters")
        PJ = ParameterJacobian(mf, x)
        k_ntk = min(topk, n)
        if n <= exact_max_dim:
            K = torch.stack([PJ.ntk_matvec(e[None])[0] for e in torch.eye(n, dtype=wd)], 1).double()
            K = 0.5 * (K + K.T)
            ev = torch.linalg.eigvalsh(K)
            top_k, bot_k = ev.flip(0)[:k_ntk], ev[:k_ntk]
            top_conv = bot_conv = True
            lam = ev.clamp_min(0)
            tr, tr_se = float(lam.sum()), 0.0
            pk = lam / max(tr, 1e-300)
            Hk, Hk_se = float(-(torch.where(pk > 0, pk * pk.clamp_min(1e-300).log(), torch.zeros_like(pk))).sum()), 0.0
            certs["ntk"] = {"method": "exact (dense K from n products, float64 eigvalsh)", "products": n}
        else:
            rt = eigsh(PJ.ntk_matvec, n, k_ntk, which="LA", tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd)
            # λ_min to relative accuracy: it sets the condition number and the label-noise gain
            rb = eigsh(PJ.ntk_matvec, n, k_ntk, which="SA", tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd,
                       relative_to="value")
            q = slq(PJ.ntk_matvec, n, num_probes=entropy_probes, steps=entropy_steps, generator=gen, dtype=wd)
            top_k, bot_k = rt.values[0], rb.values[0]
            top_conv, bot_conv = bool(rt.converged[0, 0]), bool(rb.converged[0, 0])
            trv, trs = q.trace(lambda t: t)
            tr, tr_se = float(trv[0]), float(trs[0])
            He, Hs = q.entropy()
            Hk, Hk_se = float(He[0].clamp(0, math.log(n))), float(Hs[0])
            certs["ntk"] = {"method": "thick-restart Lanczos at both ends; SLQ trace and entropy",
                            "products": rt.matvecs + rb.matvecs + q.matvecs,
                            "top_residuals": rt.residuals[0], "bottom_residuals": rb.residuals[0],
                            "top_converged": rt.converged[0], "bottom_converged": rb.converged[0]}
        lmax, lmin = float(top_k[0]), float(bot_k[0])
        # certified ends: λ_max <= θ_max + r and λ_min >= θ_min − r (an eigenvalue lies within r of a
        # Ritz value; the extreme Ritz values never overshoot the extreme eigenvalues)
        lmax_up = lmax + (float(rt.residuals[0, 0]) if n > exact_max_dim else 0.0)
        lmin_low = lmin - (float(rb.residuals[0, 0]) if n > exact_max_dim else 0.0)
        # eigenvalues below the products' rounding level count as zero (K singular, e.g. BC > p)
        rank_tol = math.sqrt(n) * torch.finfo(wd).eps * max(lmax, 0.0)
        lmin_pos = lmin if lmin > rank_tol else 0.0
        lmin_low_pos = lmin_low if lmin_low > rank_tol else 0.0
        cond = lmax / lmin_pos if lmin_pos > 0 else (float("inf") if lmax > 0 else float("nan"))
        cond_up = lmax_up / lmin_low_pos if lmin_low_pos > 0 else (float("inf") if lmax > 0 else float("nan"))
        batch.update({"ntk_dim": n, "ntk_eig_max": top_k, "ntk_eig_max_upper": lmax_up, "ntk_eig_min": bot_k,
                      "ntk_eig_min_lower": max(lmin_low, 0.0), "ntk_eig_max_converged": top_conv,
                      "ntk_eig_min_converged": bot_conv, "ntk_condition": cond, "ntk_condition_upper": cond_up,
                      "ntk_trace": tr, "ntk_trace_se": tr_se,
                      "ntk_entropy": Hk, "ntk_entropy_se": Hk_se, "ntk_effective_rank": math.exp(Hk),
                      "param_jacobian_norm": math.sqrt(max(lmax, 0.0)), "param_jacobian_norm_upper": math.sqrt(max(lmax_up, 0.0)),
                      "ntk_max_stable_lr": 2.0 / lmax_up if lmax_up > 0 else float("inf"),
                      "label_noise_param_gain": 1.0 / math.sqrt(lmin_low_pos) if lmin_low_pos > 0 else float("inf"),
                      "label_noise_param_gain_estimate": 1.0 / math.sqrt(lmin_pos) if lmin_pos > 0 else float("inf"),
                      "label_noise_output_gain": math.sqrt(cond_up)})
        components["parameter"] = math.sqrt(max(lmax_up, 0.0)) / math.sqrt(B) * theta_norm / s_out
        if lmax > 0:
            components["ntk"] = cond
        else:
            batch["ntk_note"] = "K = 0: the outputs do not depend on the parameters; κ(K) is undefined"
        bounds.append({"name": "label_noise", "statement": "linearised training on ½‖f(X) − Y‖² from θ₀ (gradient flow, "
                       "or GD with η < 2/λ_max(K)) with K full rank: labels Y+ξ instead of Y move the limit θ by "
                       "‖Δθ‖ = √(ξᵀK⁻¹ξ) ≤ ‖ξ‖/√λ_min(K), the batch outputs by exactly ξ, and the output at any x "
                       "by at most ‖J_θ(x)‖₂ ‖ξ‖/√λ_min(K) (≤ √κ(K) ‖ξ‖ where ‖J_θ(x)‖₂ ≤ ‖J_θ(X)‖₂)",
                       "constants": {"param_gain": batch["label_noise_param_gain"],
                                     "output_gain": batch["label_noise_output_gain"]}})
        bounds.append({"name": "ntk_step_size", "statement": "gradient descent on the linearised model with the "
                       "summed loss ½‖f(X) − Y‖² converges iff η < 2/λ_max(K); the constant 2/λ_max^upper is safe",
                       "constant": batch["ntk_max_stable_lr"]})
        timings["ntk"] = time.perf_counter() - t0
        finish("ntk")

    # ---- loss Hessian
    if hessian and loss_fn is not None and mf.p > 0 and "hessian" not in done:
        gen = section_gen("hessian")
        t0 = time.perf_counter()
        say(f"Hessian: {mf.p} parameters")
        LH = LossHessian(mf, x, targets, loss_fn)
        if not (math.isfinite(LH.value) and math.isfinite(LH.gradient_norm)):
            raise StabilityError(f"analyze: loss_fn returned {LH.value} (gradient norm {LH.gradient_norm}) at the given "
                                 "outputs and targets; the loss and its gradient must be finite")
        k_h = min(topk, mf.p)
        rt = eigsh(LH.matvec, mf.p, k_h, which="LA", tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd)
        rb = eigsh(LH.matvec, mf.p, k_h, which="SA", tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd)
        tr = hutchpp(LH.matvec, mf.p, num_matvecs=trace_matvecs, generator=gen, dtype=wd)
        hmax, hmin = float(rt.values[0, 0]), float(rb.values[0, 0])
        hmax_up, hmin_low = hmax + float(rt.residuals[0, 0]), hmin - float(rb.residuals[0, 0])
        batch.update({"loss": LH.value, "grad_norm": LH.gradient_norm, "hessian_eig_max": rt.values[0],
                      "hessian_eig_max_upper": hmax_up, "hessian_eig_min": rb.values[0],
                      "hessian_eig_min_lower": hmin_low, "hessian_trace": float(tr.value[0]),
                      "hessian_trace_se": float(tr.stderr[0]), "hessian_sharpness": hmax,
                      "hessian_max_stable_lr": 2.0 / hmax_up if hmax_up > 0 else float("inf"),
                      "hessian_negative_ratio": (-hmin / hmax) if hmax > 0 and hmin < 0 else 0.0})
        certs["hessian"] = {"method": "thick-restart Lanczos on Hessian-vector products at both ends; Hutch++ trace",
                            "products": rt.matvecs + rb.matvecs + tr.matvecs, "top_residuals": rt.residuals[0],
                            "bottom_residuals": rb.residuals[0], "top_converged": rt.converged[0],
                            "bottom_converged": rb.converged[0], "trace_stderr": float(tr.stderr[0])}
        components["curvature"] = math.sqrt(max(hmax_up, -hmin_low, 0.0)) * theta_norm / s_out
        bounds.append({"name": "hessian_step_size", "statement": "gradient descent on the quadratic model of the loss "
                       "near θ is stable along every eigen-direction with λ > 0 iff η < 2/λ_max(H) (directions with "
                       "λ < 0 grow for every η); the constant 2/λ_max^upper is safe",
                       "constant": batch["hessian_max_stable_lr"]})
        timings["hessian"] = time.perf_counter() - t0
        finish("hessian")
    gmsi = sum(math.log10(max(v, 1.0)) for v in components.values() if v is not None)
    kappa_up = batch.get("ntk_condition_upper")
    bounds.append({"name": "gmsi", "statement": "every component c_k ≤ 10^GMSI, and the forward, parameter and "
                   "curvature components are certified upper bounds, hence: to first order at each analysed sample "
                   "‖f(x_i+δ) − f(x_i)‖/s_out ≤ 10^GMSI ‖δ‖/s_in; RMS over the batch ‖J_θ Δθ‖/(√B s_out) ≤ "
                   "10^GMSI ‖Δθ‖/‖θ‖ to first order; |Δθᵀ H Δθ| ≤ 10^(2 GMSI) s_out² (‖Δθ‖/‖θ‖)². The ntk component "
                   "is the estimate of κ(K) (exact on the dense path, otherwise a lower bound); κ(K) ≤ 10^GMSI "
                   "holds when kappa_certified", "constant": 10.0 ** gmsi,
                   "kappa_certified": bool(kappa_up is not None and kappa_up <= 10.0 ** gmsi)})
    per_sample = pd.DataFrame({k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in rows.items()})
    return StabilityReport(gmsi, components, {"input_scale": s_in, "output_scale": s_out, "theta_norm": theta_norm},
                           per_sample, batch, layers_df, layers_note, certs, bounds, timings, options)


def _dense_by_jvp(J: InputJacobian) -> Tensor:
    cols = []
    for j in range(J.d):
        e = torch.zeros(J.B, J.d, dtype=J.x.dtype)
        e[:, j] = 1
        cols.append(J.jvp(e))
    return torch.stack(cols, 2)


def _layer_table(stage_names, stage_list, x, out, tol, max_matvecs, gen, wd):
    import pandas as pd

    B = x.shape[0]
    h = x.detach()
    prod = torch.ones(B, dtype=torch.float64)
    lip, lip_note = 1.0, ""
    recs = []
    for i, stage in enumerate(stage_list):
        name = stage_names[i]
        try:
            rec, local, lip_i, other = _stage_row(stage, name, i, h, tol, max_matvecs, gen, wd)
            with torch.no_grad():
                h_next = stage(h)
        except StabilityError:
            raise
        except Exception as e:
            raise StabilityError(f"analyze: stage {name} failed on an input of shape {tuple(h.shape)}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; stages must "
                                 "compose to the model") from e
        if other and lip is not None:
            lip, lip_note = None, f"stage {name} has no known global Lipschitz constant"
        if lip is not None and lip_i is not None:
            lip *= lip_i
        prod = prod * local
        recs.append(rec)
        h = h_next
    if h.shape != out.shape:
        raise StabilityError(f"analyze: the composition of the stages gives shape {tuple(h.shape)}, the model output "
                             f"{tuple(out.shape)}; stages must compose to the model")
    if not torch.allclose(h.double(), out.double(), rtol=1e-4, atol=1e-5 * float(out.abs().max() + 1)):
        raise StabilityError("analyze: the composition of the stages does not reproduce the model output (max "
                             f"difference {float((h.double() - out.double()).abs().max()):.3g}); stages must compose "
                             "to the model")
    return pd.DataFrame(recs), prod, lip, lip_note


def _stage_row(stage, name, i, h, tol, max_matvecs, gen, wd):
    """(table row, per-sample local norm, global Lipschitz constant or None, is 'other' kind)."""
    B = h.shape[0]
    lip_i = activation_lipschitz(stage)
    if is_affine(stage):
        s, s_up = operator_norm(stage, h, generator=gen, dtype=wd)
        local = torch.full((B,), s_up, dtype=torch.float64)
        kind, lip_i = "affine", s_up
    elif lip_i is not None:
        with torch.no_grad():
            _, dgate = jvp(stage, (h,), (torch.ones_like(h),))
        local = dgate.reshape(B, -1).abs().amax(1).double()      # ‖D_l(x)‖₂ = max |φ'(z)|
        kind = "activation"
    else:
        _, local, _ = local_norms(stage, h, tol=tol, max_matvecs=max_matvecs, generator=gen, dtype=wd)
        kind = "other"
    rec = {"stage": i, "name": name, "kind": kind, "local_norm_median": float(local.median()),
           "local_norm_max": float(local.max()), "global_lipschitz": lip_i}
    return rec, local, lip_i, kind == "other"


def _fingerprint(x: Tensor, targets, theta: Tensor, out: Tensor, options: dict) -> str:
    """What a checkpoint is valid for: inputs, targets, parameters, outputs and options."""
    h = hashlib.sha256()
    for t in (x, targets, theta, out):
        if t is not None:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


class _Checkpoint:
    """The finished sections of one analyze() run, rewritten atomically after each section."""

    def __init__(self, path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self):
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, weights_only=True)
        except Exception as e:
            raise StabilityError(f"analyze: checkpoint {self.path} cannot be read ({type(e).__name__}: {e}); "
                                 "delete it to start over") from e
        if data.get("fingerprint") != self.fingerprint:
            raise StabilityError(f"analyze: checkpoint {self.path} was written for other inputs, parameters or "
                                 "options; delete it or pass another checkpoint path")
        return data["state"]

    def save(self, state: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"fingerprint": self.fingerprint, "state": state}, tmp)
        tmp.replace(self.path)
