"""LoRA updates ΔW = s·B A (s = α/r, or α/√r with rsLoRA), audited from the factors.

With thin QRs B = Q_B R_B ([out, r]) and Aᵀ = Q_A R_A ([in, r]), ΔW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ, so
the singular values of ΔW are s times those of the r×r matrix R_B R_Aᵀ: every σ exactly, at
O((in + out)·r²) cost, and ΔW (out×in) is never formed.
"""
from __future__ import annotations

import math
import re

import torch

from .. import linalg
from .sources import open_source

_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B|embedding_A|embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def lora_singular_values(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """All r singular values of scale·B@A (A [r, in], B [out, r]), descending, float64."""
    _, RB = torch.linalg.qr(B.double())
    _, RA = torch.linalg.qr(A.double().mT)
    return scale * torch.linalg.svdvals(RB @ RA.mT)


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: keys match a suffix (or regex) of the module name."""
    for key, val in (pattern or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return val
    return default


def _base_name(module: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj.weight'."""
    for prefix in ("base_model.model.",):
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module + ".weight"


def audit_adapter(source, writer, options, base=None):
    from .roles import layer_of, plan_tensor, HeadConfig

    cfg = source.adapter or {}
    r_default = cfg.get("r", 8)
    alpha_default = cfg.get("lora_alpha", r_default)
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict] = {}
    for rec in source.records:
        m = _PAIR.match(rec.name)
        if m is None:
            if rec.name not in writer.done:
                reason = ("DoRA magnitude vector (1-D)" if "lora_magnitude_vector" in rec.name
                          else "not a LoRA factor (e.g. a fully trained module saved with the adapter)")
                writer.add([dict(name=rec.name, tensor=rec.name, role="other", layer=layer_of(rec.name),
                                 expert=None, shape=list(rec.shape), dtype=str(rec.dtype).replace("torch.", ""),
                                 origin=rec.origin, status="skipped", reason=reason, note="")])
            continue
        pairs.setdefault(m.group("module"), {})[m.group("which")] = rec
    base_src = open_source(base) if base is not None else None
    base_recs = {r.name: r for r in base_src.records} if base_src else {}
    hc = HeadConfig.from_config(base_src.config if base_src else {})
    try:
        for module, fac in pairs.items():
            name = module + ".lora"
            if name in writer.done:
                continue
            bname = _base_name(module)
            plan = plan_tensor(bname, (2, 2), torch.float32, hc)
            row = dict(name=name, tensor=module, role=plan.role, layer=layer_of(module), expert=None,
                       dtype=None, origin=source.location, status="audited", reason="", note="",
                       base_tensor=bname)
            a = fac.get("A", fac.get("embedding_A"))
            b = fac.get("B", fac.get("embedding_B"))
            if a is None or b is None:
                row.update(status="error", reason=f"{module}: lora_{'A' if a is None else 'B'} is missing")
                writer.add([row])
                continue
            A, B = a.load(), b.load()
            if "embedding_A" in fac:  # peft stores embedding factors transposed: ΔW = (B A)ᵀ
                A, B = B.mT, A.mT
            r = A.shape[0]
            if B.shape[1] != r:
                row.update(status="error", reason=f"{module}: lora_A {tuple(A.shape)} and lora_B "
                           f"{tuple(B.shape)} do not chain (rank {r} vs {B.shape[1]})")
                writer.add([row])
                continue
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default)
            r_cfg = _pattern_value(cfg.get("rank_pattern"), module, r_default)
            scale = alpha / math.sqrt(r_cfg) if rslora else alpha / r_cfg
            row.update(shape=[B.shape[0], A.shape[1]], rows=B.shape[0], cols=A.shape[1], M=min(B.shape[0], A.shape[1]), N=max(B.shape[0], A.shape[1]),
                       dtype=str(A.dtype).replace("torch.", ""), lora_rank=r, lora_scale=scale,
                       note=f"ΔW = {scale:g}·B A from the factors (rank {r}), never formed")
            bad = int((~torch.isfinite(A)).sum() + (~torch.isfinite(B)).sum())
            row.update(nan_count=int(torch.isnan(A).sum() + torch.isnan(B).sum()),
                       inf_count=int(torch.isinf(A).sum() + torch.isinf(B).sum()))
            if bad:
                row.update(status="nonfinite", reason=f"{bad} non-finite entries in the factors")
                writer.add([row])
                continue
            s = lora_singular_values(A, B, scale)
            f2 = float((s ** 2).sum())
            s1 = float(s[0]) if s.numel() else 0.0
            k = min(options.topk, s.numel())
            pr = (s ** 2 / f2) if f2 > 0 else s
            H = float(-(pr[pr > 0] * pr[pr > 0].log()).sum()) if f2 > 0 else 0.0
            row.update(sigma_1=s1, sigma_1_error=0.0, top_sigmas=[float(x) for x in s[:k]], converged=True,
                       iterations=0, spectrum_method="lora_factors", frobenius_norm=math.sqrt(f2),
                       stable_rank=f2 / s1 ** 2 if s1 > 0 else 0.0, spectral_entropy=H,
                       effective_rank=math.exp(H) if f2 > 0 else 0.0)
            brec = base_recs.get(bname)
            if base_src is not None and brec is None:
                row["reason"] = f"base model has no tensor {bname!r}: no relative change"
            elif brec is not None:
                W = brec.load()
                s_base = float(linalg.spectral_norm(W, tol=options.tol, seed=options.seed))
                f_base = math.sqrt(float(linalg.frobenius_norm_sq(W)))
                row.update(base_sigma_1=s_base, base_frobenius_norm=f_base,
                           relative_spectral_change=s1 / s_base if s_base > 0 else float("inf"),
                           relative_frobenius_change=math.sqrt(f2) / f_base if f_base > 0 else float("inf"))
                brec.release()
            writer.add([row])
    finally:
        if base_src is not None:
            base_src.close()
