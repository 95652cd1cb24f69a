"""``specfast compare BASE TUNED``: the spectrum of ΔW = W_tuned − W_base for every matrix.

Both checkpoints are opened lazily; each group of same-shape matrices is loaded (zero-copy), its
differences formed in float32 (the only copy: a difference is a new matrix), audited with the
grouped ops, written, and released before the next group. Tensors present in only one checkpoint or
with different shapes get a row saying so.
"""
from __future__ import annotations

import time
from pathlib import Path

from .engine import AuditOptions, ResultWriter, _groups, parse_memory
from . import metrics as metrics_mod
from .roles import HeadConfig, plan_tensor
from .sources import open_source
from .. import linalg


def compare_checkpoints(base, tuned, *, out_dir=None, resume=False, overwrite=False, metrics=None,
                        topk: int = 5, tol: float = 1e-4, max_memory="4GiB", seed: int = 0,
                        allow_pickle: bool = False, progress: bool = False):
    from . import DEFAULT_METRICS, _finish

    t0 = time.perf_counter()
    mets = tuple(m for m in (metrics or DEFAULT_METRICS) if m not in ("heads", "alpha"))
    opts = AuditOptions(metrics=mets, topk=topk, tol=tol, max_memory=parse_memory(max_memory),
                        seed=seed).validate()
    src_b = open_source(base, allow_pickle=allow_pickle)
    src_t = open_source(tuned, allow_pickle=allow_pickle)
    try:
        meta = {"source": {"base": src_b.fingerprint(), "tuned": src_t.fingerprint()},
                "options": {"compare": True, **opts.__dict__}}
        writer = ResultWriter(Path(out_dir) if out_dir is not None else None, meta, resume, overwrite)
        hc = HeadConfig.from_config(src_t.config or src_b.config)
        brecs = {r.name: r for r in src_b.records}
        trecs = {r.name: r for r in src_t.records}
        pending = []
        for name in list(dict.fromkeys(list(brecs) + list(trecs))):
            b, t = brecs.get(name), trecs.get(name)
            row = dict(name=name, tensor=name, role=None, layer=None, expert=None, status="skipped", note="")
            if b is None or t is None:
                rec = b or t
                plan = plan_tensor(name, rec.shape, rec.dtype, hc)
                row.update(role=plan.role, layer=plan.layer, shape=list(rec.shape),
                           reason="only in the base checkpoint" if t is None else "only in the tuned checkpoint")
                if name not in writer.done:
                    writer.add([row])
                continue
            plan = plan_tensor(name, t.shape, t.dtype, hc)
            if tuple(b.shape) != tuple(t.shape):
                row.update(role=plan.role, layer=plan.layer, status="error", shape=list(t.shape),
                           reason=f"shape differs: base {tuple(b.shape)}, tuned {tuple(t.shape)}")
                if name not in writer.done:
                    writer.add([row])
                continue
            if not plan.matrices:
                row.update(role=plan.role, layer=plan.layer, shape=list(t.shape), reason=plan.skip_reason)
                if name not in writer.done:
                    writer.add([row])
                continue
            for spec in plan.matrices:
                if spec.matrix not in writer.done:
                    pending.append((t, plan, spec))
        for group in _groups(pending, opts.max_memory // 2):  # two inputs and a float32 difference in flight
            rows, diffs, bases = [], [], []
            for (t, plan, spec), shape in group:
                b = brecs[t.name]
                Wb = spec.take(b.load()).detach()
                Wt = spec.take(t.load()).detach()
                diffs.append(Wt.float() - Wb.float())
                bases.append(Wb)
                rows.append(dict(name=spec.matrix, tensor=t.name, role=spec.role, layer=plan.layer,
                                 expert=spec.expert, shape=list(t.shape), rows=shape[0], cols=shape[1],
                                 M=min(shape), N=max(shape),
                                 dtype=str(t.dtype).replace("torch.", ""), status="audited", reason="",
                                 note="spectrum of W_tuned − W_base"))
            k = min(opts.topk, *diffs[0].shape)
            res = metrics_mod.compute(diffs, topk=k, tol=opts.tol, spectrum="krylov", metrics=set(opts.metrics),
                                      entropy_probes=opts.entropy_probes, entropy_steps=opts.entropy_steps,
                                      exact_max_dim=opts.exact_max_dim, seed=opts.seed,
                                      names=[r["name"] for r in rows])
            sb = linalg.spectral_norm(bases, tol=opts.tol, seed=opts.seed, nonfinite="nan").double()
            fb = linalg.frobenius_norm_sq(bases, nonfinite="nan").double().sqrt()
            for j, (row, r) in enumerate(zip(rows, res)):
                row.update(r)
                row.update(base_sigma_1=float(sb[j]), base_frobenius_norm=float(fb[j]))
                if "sigma_1" in r:
                    row["relative_spectral_change"] = r["sigma_1"] / float(sb[j]) if sb[j] > 0 else float("inf")
                    row["relative_frobenius_change"] = (r["frobenius_norm"] / float(fb[j]) if fb[j] > 0
                                                        else float("inf"))
                if r.get("nan_count", 0) or r.get("inf_count", 0):
                    row.update(status="nonfinite", reason="non-finite entries in W_tuned − W_base")
            writer.add(rows)
            del diffs, bases
            for (t, _, _), _ in group:
                t.release()
                brecs[t.name].release()
        writer.close()
        src_t.kind = "compare"
        src_t.location = f"{src_b.location} -> {src_t.location}"
        return _finish(writer.rows, [], src_t, opts, time.perf_counter() - t0, out_dir)
    finally:
        src_b.close()
        src_t.close()
