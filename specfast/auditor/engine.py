"""The audit: plan every tensor, stream groups of same-shape matrices through the grouped ops
within a memory budget, write each group's rows as soon as it is done, resume from them."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import heads as heads_mod
from . import lora as lora_mod
from . import metrics as metrics_mod
from .roles import HeadConfig, TensorPlan, plan_tensor
from .sources import CheckpointError, Source, TensorRecord, open_source

ALL_METRICS = ("sigma", "frobenius", "stable_rank", "entropy", "condition", "alpha", "heads", "nonfinite")
DEFAULT_METRICS = ("sigma", "frobenius", "stable_rank", "entropy", "heads", "nonfinite")
_ROW_FILE, _HEAD_FILE, _META_FILE = "rows.jsonl", "heads.jsonl", "audit_meta.json"


def parse_memory(value) -> int:
    """'4GB', '512MiB', '2e9' or an int -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    s = str(value).strip().lower().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9,
             "mb": 10**6, "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "b": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"audit: max_memory must be a size such as '4GB' or '512MiB'; got {value!r}") from None


@dataclass
class AuditOptions:
    metrics: tuple = DEFAULT_METRICS
    topk: int = 5
    tol: float = 1e-4
    spectrum: str = "krylov"           # "krylov" or "full" (all eigenvalues; needed for alpha)
    max_memory: int = 4 * 2**30
    device: str = "cpu"
    seed: int = 0
    # 8 probes x 12 steps: same passes over W as 4 x 24, but the estimate's error is dominated by
    # the number of probes (Hutchinson variance), not the steps (measured: 12 and 24 steps agree)
    entropy_probes: int = 8
    entropy_steps: int = 12
    exact_max_dim: int = 512
    outlier_z: float = 3.5

    def validate(self):
        bad = sorted(set(self.metrics) - set(ALL_METRICS))
        if bad:
            raise ValueError(f"audit: unknown metric(s) {bad}; choose from {list(ALL_METRICS)}")
        if "alpha" in self.metrics and self.spectrum != "full":
            self.spectrum = "full"  # the power-law fit needs the eigenvalue distribution
        if self.spectrum not in ("krylov", "full"):
            raise ValueError(f"audit: spectrum must be 'krylov' or 'full'; got {self.spectrum!r}")
        if not (isinstance(self.topk, int) and self.topk >= 1):
            raise ValueError(f"audit: topk must be a positive integer; got {self.topk!r}")
        if not (0 < self.tol < 1):
            raise ValueError(f"audit: tol must be in (0, 1); got {self.tol!r}")
        if self.max_memory < 2**20:
            raise ValueError(f"audit: max_memory must be at least 1 MiB; got {self.max_memory} bytes")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"audit: device must be 'cpu' or 'cuda'; got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"audit: device={self.device!r} but torch.cuda.is_available() is False")
        return self


# ------------------------------------------------------------------------------------ writer
class ResultWriter:
    """Append-only JSON lines, flushed and fsynced per group: a killed audit loses at most the group
    in flight. ``done`` holds the matrix keys already written (for --resume)."""

    def __init__(self, out_dir: Path | None, meta: dict, resume: bool, overwrite: bool):
        self.out_dir = out_dir
        self.rows: list[dict] = []
        self.heads: list[dict] = []
        self.done: set[str] = set()
        self.done_heads: set[tuple] = set()
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        rows_path, meta_path = out_dir / _ROW_FILE, out_dir / _META_FILE
        if rows_path.exists() and not (resume or overwrite):
            raise FileExistsError(f"audit: {out_dir} already holds results ({_ROW_FILE}); pass resume=True "
                                  "(--resume) to continue that audit or overwrite=True (--overwrite) to start over")
        if rows_path.exists() and resume:
            old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            new = json.loads(json.dumps(meta, default=str))  # compare as stored (tuples become lists)
            for key in ("source", "options"):
                a, b = _resume_key(old.get(key)), _resume_key(new.get(key))
                if a != b:
                    raise ValueError(f"audit: cannot resume in {out_dir}: its {key} differ from this run's "
                                     f"(was {a}, now {b}); use another --out or --overwrite")
            self.rows = _read_jsonl(rows_path)
            self.done = {r["name"] for r in self.rows}
            hp = out_dir / _HEAD_FILE
            self.heads = _read_jsonl(hp) if hp.exists() else []
            self.done_heads = {(h["layer"], h["head"]) for h in self.heads}
            # rewrite both logs with the lines that parsed: a torn last line must not be appended to
            for path, recs in ((rows_path, self.rows), (hp, self.heads)):
                tmp = path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    for r in recs:
                        f.write(json.dumps(r, default=_json_default) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
        else:
            for p in (rows_path, out_dir / _HEAD_FILE):
                if p.exists():
                    p.unlink()
        meta_path.write_text(json.dumps(meta, indent=1, default=str))
        self._rows_f = open(rows_path, "a")
        self._heads_f = open(out_dir / _HEAD_FILE, "a")

    def add(self, rows: list[dict], heads: bool = False):
        (self.heads if heads else self.rows).extend(rows)
        if not heads:
            self.done.update(r["name"] for r in rows)
        if self.out_dir is None:
            return
        f = self._heads_f if heads else self._rows_f
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def close(self):
        if self.out_dir is not None:
            self._rows_f.close()
            self._heads_f.close()


# Options that change how an audit runs but not its numbers: a resume may change them (e.g. a
# smaller --max-memory after running out of memory).
_RUN_ONLY_OPTIONS = ("max_memory", "device")


def _resume_key(d):
    if isinstance(d, dict):
        return {k: v for k, v in d.items() if k not in _RUN_ONLY_OPTIONS}
    return d


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line being written when the previous run was killed: recompute it
    return out


# ------------------------------------------------------------------------------------ progress
class Progress:
    """A one-line progress bar with ETA on stderr (only when it is a terminal, or forced)."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.total = max(total_bytes, 1)
        self.done = 0
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def update(self, nbytes: int, label: str):
        self.done += nbytes
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        el = time.perf_counter() - self.t0
        eta = el / frac * (1 - frac) if frac > 0 else float("nan")
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {100 * frac:5.1f}%  {el:6.1f}s elapsed, ETA {eta:6.1f}s  {label[:50]:<50}")
        sys.stderr.flush()

    def finish(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------ the audit
def _base_row(rec: TensorRecord, plan: TensorPlan) -> dict:
    return dict(name=rec.name, tensor=rec.name, role=plan.role, layer=plan.layer, expert=None,
                shape=list(rec.shape), M=None, N=None, dtype=str(rec.dtype).replace("torch.", ""),
                origin=os.path.basename(rec.origin) if rec.origin != "<module>" else "<module>",
                status="skipped", reason=plan.skip_reason, note=plan.note)


def run_audit(model, *, options: AuditOptions, out_dir=None, resume=False, overwrite=False,
              allow_pickle=False, base=None, progress=False):
    """Audit ``model`` (path or nn.Module); returns (rows, heads, source). See specfast.audit."""
    options.validate()
    source = open_source(model, allow_pickle=allow_pickle)
    try:
        hc = HeadConfig.from_config(source.config)
        meta = {"source": source.fingerprint(), "options": asdict(options), "specfast_audit": 1}
        writer = ResultWriter(Path(out_dir) if out_dir is not None else None, meta, resume, overwrite)
        try:
            if source.kind == "peft":
                lora_mod.audit_adapter(source, writer, options, base=base)
            else:
                _audit_weights(source, hc, writer, options, progress)
                if "heads" in options.metrics:
                    heads_mod.audit_heads(source, hc, writer, options)
        finally:
            writer.close()
        return writer.rows, writer.heads, source
    finally:
        source.close()


def _audit_weights(source: Source, hc: HeadConfig, writer: ResultWriter, options: AuditOptions, progress):
    pending = []  # (record, plan, spec)
    total = 0
    for rec in source.records:
        plan = plan_tensor(rec.name, rec.shape, rec.dtype, hc)
        if rec.shares_with is not None:
            plan = TensorPlan(rec.name, plan.role, plan.layer, [], skip_reason=f"tied: shares storage with "
                              f"{rec.shares_with} (audited there)")
        if not plan.matrices:
            if rec.name not in writer.done:
                row = _base_row(rec, plan)
                if plan.role in ("norm", "bias", "vector", "scalar") and rec.dtype.is_floating_point:
                    t = rec.load()
                    row["nan_count"], row["inf_count"] = metrics_mod.nonfinite_counts(t)
                    if t.numel():
                        row["max_abs"] = float(t.detach().abs().max().float()) if not (
                            row["nan_count"] or row["inf_count"]) else float("nan")
                    rec.release()
                writer.add([row])
            continue
        for spec in plan.matrices:
            if spec.matrix in writer.done:
                continue
            pending.append((rec, plan, spec))
            total += rec.nbytes // max(len(plan.matrices), 1)
    bar = Progress(total, progress)
    groups = list(_groups(pending, options.max_memory))
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(_load_group, groups[0], options.device) if groups else None
        for i, group in enumerate(groups):
            loaded = nxt.result()
            nxt = pool.submit(_load_group, groups[i + 1], options.device) if i + 1 < len(groups) else None
            _run_group(group, loaded, writer, options, bar)
    bar.finish()


def _matrix_shape(rec: TensorRecord, spec) -> tuple:
    probe = torch.empty(rec.shape, dtype=torch.float32, device="meta")
    return tuple(spec.take(probe).shape)


def _groups(pending, budget: int):
    """Same (dtype, shape) matrices together, in chunks whose bytes stay within a third of the
    budget: one group is computed while the next is mapped, and the last third is the solvers'
    working memory."""
    buckets: dict = {}
    for item in pending:
        rec, _, spec = item
        shape = _matrix_shape(rec, spec)
        buckets.setdefault((str(rec.dtype), shape), []).append((item, shape))
    for (_, shape), items in buckets.items():
        chunk, used = [], 0
        for item, shp in items:
            nbytes = shp[0] * shp[1] * item[0].dtype.itemsize
            if chunk and used + nbytes > budget // 3:
                yield chunk
                chunk, used = [], 0
            chunk.append((item, shp))
            used += nbytes
        if chunk:
            yield chunk


def _load_group(group, device: str):
    """Load (map) every tensor of a group, cut its matrices and move them to the device. Runs one
    group ahead of the compute in a worker thread, so reading (and host-to-GPU copies) overlap the
    previous group's compute. Errors become rows naming the file and tensor."""
    loaded: dict[str, torch.Tensor] = {}
    mats, errors = {}, {}
    stream = torch.cuda.Stream() if device != "cpu" else None
    for (rec, _, spec), _shape in group:
        try:
            if rec.name not in loaded:
                t = _floatable(rec.load())
                if stream is not None:
                    with torch.cuda.stream(stream):
                        t = t.to(device, non_blocking=True)
                loaded[rec.name] = t
            mats[spec.matrix] = spec.take(loaded[rec.name]).detach()
        except CheckpointError as e:
            errors[spec.matrix] = str(e)
        except Exception as e:  # noqa: BLE001 - a row, never a traceback: name the file and tensor
            errors[spec.matrix] = f"{rec.origin}: tensor {rec.name!r}: cannot be read ({e})"
    if stream is not None:
        stream.synchronize()
    return mats, errors


def _run_group(group, loaded, writer: ResultWriter, options: AuditOptions, bar: Progress):
    mats_by_name, errors = loaded
    rows, mats = [], []
    for (rec, plan, spec), shape in group:
        row = dict(name=spec.matrix, tensor=rec.name, role=spec.role, layer=plan.layer, expert=spec.expert,
                   shape=list(rec.shape), rows=shape[0], cols=shape[1], M=min(shape), N=max(shape),
                   dtype=str(rec.dtype).replace("torch.", ""),
                   origin=os.path.basename(rec.origin) if rec.origin != "<module>" else "<module>",
                   status="audited", reason="", note=spec.note)
        if spec.matrix in errors:
            row.update(status="error", reason=errors[spec.matrix])
        else:
            mats.append(mats_by_name[spec.matrix])
        rows.append(row)
    ok_rows = [r for r in rows if r["status"] == "audited"]
    if mats:
        # svdvals(k) needs k <= min(m, n): all matrices of a group share one shape
        topk = min(options.topk, min(mats[0].shape))
        res = metrics_mod.compute(mats, topk=topk, tol=options.tol, spectrum=options.spectrum,
                                  metrics=set(options.metrics), entropy_probes=options.entropy_probes,
                                  entropy_steps=options.entropy_steps, exact_max_dim=options.exact_max_dim,
                                  seed=options.seed, names=[r["name"] for r in ok_rows])
        for row, r in zip(ok_rows, res):
            row.update(r)
            if r.get("nan_count", 0) or r.get("inf_count", 0):
                row.update(status="nonfinite", reason=f"{r['nan_count']} NaN and {r['inf_count']} Inf "
                           "entries: spectral metrics are undefined")
            elif "converged" in r and not r["converged"]:
                row["reason"] = f"Krylov did not reach tol={options.tol} (see sigma_1_error)"
    writer.add(rows)
    for (rec, _, _), _ in group:
        rec.release()
    bar.update(sum(rec.nbytes // max(len(plan.matrices), 1) for (rec, plan, _), _ in group),
               group[0][0][2].matrix)


def _floatable(t: torch.Tensor) -> torch.Tensor:
    """FP8 storage has no kernels: widen to bfloat16 (a copy, counted in the budget's other half)."""
    if t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        return t.to(torch.bfloat16)
    return t


def _to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    return t if device == "cpu" else t.to(device, non_blocking=True)
