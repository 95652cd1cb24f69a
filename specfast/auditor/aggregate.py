"""Aggregates over the per-matrix rows: per layer and role, MoE expert distributions with outliers,
and the model's Lipschitz upper bound with each matrix's share of it (docs/audit.md derives it)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

_MAD_FLOOR = 0.05
_SUMMARY_COLS = ("sigma_1", "frobenius_norm", "stable_rank", "spectral_entropy", "effective_rank", "alpha")


def layer_role_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean / max of the main metrics per (layer, role) over audited rows."""
    a = df[df.status == "audited"]
    if a.empty:
        return pd.DataFrame()
    cols = [c for c in _SUMMARY_COLS if c in a.columns]
    g = a.groupby([a.layer.fillna(-1).astype(int), "role"])[cols]
    out = g.agg(["mean", "max"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out.insert(0, "count", g.size())
    return out.reset_index().replace({"layer": {-1: None}})


def expert_outliers(df: pd.DataFrame, z: float = 3.5) -> pd.DataFrame:
    """Per (MoE layer, expert role): the distribution of σ₁ and stable rank across experts, and
    the experts whose robust z-score |x − median| / max(1.4826·MAD, 0.05) of log σ₁ or log stable
    rank exceeds ``z`` (Iglewicz–Hoaglin's 3.5 by default). The floor of 0.05 on the scale (5 % in
    log space) keeps a tight cluster of experts — few experts, MAD near 0 — from flagging a
    harmless few-percent deviation: an outlier must differ from the median by ≥ 19 % at z = 3.5.
    Adds ``expert_outlier`` to ``df``."""
    df["expert_outlier"] = False
    rows = []
    ex = df[(df.status == "audited") & df.role.str.startswith("expert_") & df.expert.notna()]
    for (layer, role), g in ex.groupby(["layer", "role"]):
        rec = dict(layer=int(layer), role=role, experts=len(g))
        flagged = set()
        for col in ("sigma_1", "stable_rank"):
            x = np.log(g[col].astype(float).clip(lower=1e-300))
            med = float(np.median(x))
            mad = float(np.median(np.abs(x - med)))
            rz = (x - med) / max(1.4826 * mad, _MAD_FLOOR)
            flagged |= set(g.index[np.abs(rz) > z])
            v = g[col].astype(float)
            rec.update({f"{col}_min": float(v.min()), f"{col}_median": float(v.median()),
                        f"{col}_max": float(v.max()), f"{col}_cv": float(v.std() / v.mean()) if v.mean() else 0.0})
        rec["outlier_experts"] = sorted(int(df.loc[i, "expert"]) for i in flagged)
        df.loc[list(flagged), "expert_outlier"] = True
        rows.append(rec)
    return pd.DataFrame(rows)


def _gelu_like(config: dict) -> float:
    """sup |φ'| of the MLP activation, rounded up: 1 for ReLU, 1.128905 for GELU (at x = √2),
    1.099840 for SiLU/Swish (at x ≈ 2.3994)."""
    act = str(config.get("hidden_act") or config.get("activation_function") or config.get("hidden_activation")
              or "").lower()
    if "relu" in act:
        return 1.0
    if "gelu" in act:
        return 1.128905
    if "silu" in act or "swish" in act:
        return 1.099840
    return 1.128905  # the largest of the common ones when unknown


def lipschitz(df: pd.DataFrame, heads: pd.DataFrame, config: dict) -> dict:
    """The frozen-gate Lipschitz bound of the whole model and every matrix's share of it.

    Transformers (attention roles present), per block l, in the per-token norm max_t ‖x_t‖₂:
        a_l = min(‖W_O‖₂ · sqrt(Σ_h ‖W_Vʰ‖₂²),  Σ_h ‖W_Oʰ‖₂‖W_Vʰ‖₂)        (attention, pattern frozen)
        m_l = c·‖W_down‖₂‖W_up‖₂ (dense; c = sup|φ'|, or 1 per unit gate for gated units),
              ρ·max_e m_l,e + m_l,shared (MoE, routing weights frozen with Σ_e g_e ≤ ρ)
        L   = ‖W_head‖₂ · Π_l (1 + a_l)(1 + m_l)
    Otherwise the plain product Π ‖W‖₂ over the audited matrices in order. A matrix's share is its
    elasticity ∂log L/∂log‖W‖ (a/(1+a) for the factors of a residual term, 1 for a plain factor)
    divided by the sum of all elasticities. Adds ``lipschitz_share`` to ``df``."""
    df["lipschitz_share"] = np.nan
    a = df[(df.status == "audited") & df.sigma_1.notna()] if "sigma_1" in df.columns else df.iloc[0:0]
    if a.empty:
        return {"bound": None, "kind": "none", "reason": "no audited matrices"}
    roles = set(a.role)
    elastic: dict = {}
    if not roles & {"attn_q", "attn_k", "attn_v", "attn_o", "attn_kv_b"}:
        mats = a[a.role != "embedding"]
        logL = float(np.log(mats.sigma_1.clip(lower=1e-300)).sum())
        for i in mats.index:
            elastic[i] = 1.0
        kind = "sequential product of every audited matrix (no residual structure detected)"
        factors = []
    else:
        c = _gelu_like(config)
        rho = float(config.get("routed_scaling_factor") or 1.0)
        logL, factors = 0.0, []
        head = a[a.role == "lm_head"]
        if len(head):
            logL += math.log(max(float(head.sigma_1.iloc[0]), 1e-300))
            elastic[head.index[0]] = 1.0
        for layer, g in a[a.layer.notna()].groupby("layer"):
            layer = int(layer)
            by = {r: g[g.role == r] for r in set(g.role)}
            # ---- attention
            o, v = by.get("attn_o"), by.get("attn_v")
            v_idx = [] if v is None else list(v.index)
            att = None
            if o is not None and len(o):
                hl = heads[heads.layer == layer] if len(heads) and "v_norm" in heads else None
                if hl is not None and len(hl) and "o_norm" in hl:
                    s_v = math.sqrt(float((hl.v_norm ** 2).sum()))
                    att = min(float(o.sigma_1.iloc[0]) * s_v, float((hl.o_norm * hl.v_norm).sum()))
                elif v is not None and len(v):
                    # Σ over query heads of ‖W_Vʰ‖² ≤ (n_h/n_kv)·‖W_V‖_F², the group size read off the
                    # q and v shapes (q has n_h·d outputs, v has n_kv·d)
                    q = by.get("attn_q")
                    group = (float(q.rows.iloc[0]) / float(v.rows.iloc[0])
                             if q is not None and len(q) and "rows" in q else 1.0)
                    att = float(o.sigma_1.iloc[0]) * math.sqrt(max(group, 1.0)) * float(v.frobenius_norm.iloc[0])
                elif "attn_kv_b" in by and "attn_kv_a" in by:  # MLA: values come out of kv_b after kv_a
                    att = (float(o.sigma_1.iloc[0]) * float(by["attn_kv_b"].frobenius_norm.iloc[0])
                           * float(by["attn_kv_a"].sigma_1.iloc[0]))
                    v_idx = list(by["attn_kv_b"].index) + list(by["attn_kv_a"].index)
            if att is not None:
                logL += math.log1p(att)
                for i in list(o.index) + v_idx:
                    elastic[i] = att / (1 + att)
                factors.append(dict(layer=layer, part="attention", term=att))
            # ---- MLP, dense or MoE
            mlp, idx = None, []
            # gated units (SwiGLU/GeGLU): the frozen gate diag(φ(W_G x)) is counted per unit of gate
            # activation (factor 1); plain units: the activation's slope bound c
            cg = 1.0 if ("mlp_gate" in by or "expert_gate" in by) else c
            if "mlp_down" in by and "mlp_up" in by:
                mlp = cg * float(by["mlp_down"].sigma_1.iloc[0]) * float(by["mlp_up"].sigma_1.iloc[0])
                idx = [by["mlp_down"].index[0], by["mlp_up"].index[0]]
            elif "expert_down" in by and "expert_up" in by:
                d = by["expert_down"].set_index("expert").sigma_1
                u = by["expert_up"].set_index("expert").sigma_1
                prod = (d * u).dropna()
                if len(prod):
                    e = prod.idxmax()
                    mlp = rho * cg * float(prod.max())
                    idx = [by["expert_down"].index[by["expert_down"].expert == e][0],
                           by["expert_up"].index[by["expert_up"].expert == e][0]]
                    if "shared_expert_down" in by and "shared_expert_up" in by:
                        sh = cg * float(by["shared_expert_down"].sigma_1.iloc[0]) * float(
                            by["shared_expert_up"].sigma_1.iloc[0])
                        mlp += sh
                        idx += [by["shared_expert_down"].index[0], by["shared_expert_up"].index[0]]
            if mlp is not None:
                logL += math.log1p(mlp)
                for i in idx:
                    elastic[i] = mlp / (1 + mlp)
                factors.append(dict(layer=layer, part="mlp", term=mlp))
        kind = ("residual transformer, frozen attention patterns and gates, normalisation layers as gates "
                f"(activation slope c={c:g} for ungated MLPs, 1 per unit gate for gated ones, routed scaling ρ={rho:g})")
    tot = sum(elastic.values())
    for i, e in elastic.items():
        df.loc[i, "lipschitz_share"] = e / tot if tot > 0 else np.nan
    return {"bound": math.exp(logL) if logL < 700 else float("inf"), "log10_bound": logL / math.log(10),
            "kind": kind, "factors": factors}
