"""The StabilityReport: saving, summary, and resuming an interrupted analyze() from its checkpoint."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from specfast.stability import StabilityError, analyze


class Interrupt(Exception):
    pass


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    x = torch.randn(10, 12, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    return model, x, y


OPTS = dict(exact_max_dim=0, topk=3)   # the Lanczos/SLQ/Hutch++ paths, which use random numbers


def test_resume_after_interruption_gives_identical_report(problem, tmp_path):
    model, x, y = problem
    full = analyze(model, x, y, **OPTS)
    ck = tmp_path / "ck.pt"

    def stop_at_ntk(msg):
        if msg.startswith("NTK"):
            raise Interrupt

    with pytest.raises(Interrupt):
        analyze(model, x, y, checkpoint=ck, log=stop_at_ntk, **OPTS)
    assert ck.exists()
    seen = []
    resumed = analyze(model, x, y, checkpoint=ck, log=seen.append, **OPTS)
    assert any("resuming" in m and "input_jacobian, attribution, layers" in m for m in seen), seen
    assert not any(m.startswith("input Jacobian") for m in seen)          # not recomputed
    assert resumed.gmsi == full.gmsi and resumed.components == full.components
    pd.testing.assert_frame_equal(resumed.per_sample, full.per_sample)
    pd.testing.assert_frame_equal(resumed.layers, full.layers)
    for k in ("ntk_eig_max", "hessian_eig_min"):
        assert torch.equal(resumed.batch[k], full.batch[k])


def test_checkpoint_for_other_inputs_is_refused(problem, tmp_path):
    model, x, y = problem
    ck = tmp_path / "ck.pt"
    analyze(model, x, y, checkpoint=ck, hessian=False, **OPTS)
    with pytest.raises(StabilityError, match=r"checkpoint .*ck\.pt was written for other"):
        analyze(model, x * 2, y, checkpoint=ck, hessian=False, **OPTS)
    with pytest.raises(StabilityError, match=r"checkpoint .*ck\.pt was written for other"):
        analyze(model, x, y, checkpoint=ck, hessian=False, **{**OPTS, "topk": 2})
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(StabilityError, match=r"checkpoint .*ck\.pt cannot be read"):
        analyze(model, x, y, checkpoint=ck, hessian=False, **OPTS)


def test_save_and_summary(problem, tmp_path):
    model, x, y = problem
    rep = analyze(model, x, y, **OPTS)
    paths = rep.save(tmp_path / "out")
    assert sorted(p.name for p in paths) == ["layers.csv", "per_sample.csv", "stability.json"]
    data = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert data["gmsi"] == pytest.approx(rep.gmsi)
    assert set(data["components"]) == {"forward", "parameter", "ntk", "curvature"}
    assert {b["name"] for b in data["bounds"]} >= {"forward_local", "typical_case", "layer_product", "label_noise",
                                                    "ntk_step_size", "hessian_step_size", "gmsi"}
    ps = pd.read_csv(tmp_path / "out" / "per_sample.csv")
    assert len(ps) == 10 and ps["jac_norm"].tolist() == pytest.approx(rep.per_sample["jac_norm"].tolist())
    text = rep.summary()
    assert f"GMSI = {rep.gmsi:.3f}" in text and "NTK (40×40)" in text and "Hessian (" in text
    # the GMSI is the sum of log10 max(c, 1) over the computed components
    assert rep.gmsi == pytest.approx(sum(math.log10(max(c, 1.0)) for c in rep.components.values()))
