"""Every CPU kernel path (portable, AVX2+FMA+F16C, AVX-512) gives the same answers.

The extension dispatches to the widest instruction set the CPU has; SPECFAST_CPU_ISA caps it, so
each path can be run on this machine in a subprocess (the choice is made once per process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import specfast

SCRIPT = r"""
import json, torch, specfast
torch.manual_seed(0)
out = {"isa": specfast.build_info()["cpu_isa"], "gram": {}, "sigma": {}}
m, n = 67, 203                                    # not multiples of the vector width
U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64))
s = torch.linspace(3.0, 0.1, m, dtype=torch.float64)
W64 = (U * s) @ V.T
v = torch.randn(n, dtype=torch.float64)
for name, dt in [("f32", torch.float32), ("f64", torch.float64), ("bf16", torch.bfloat16), ("f16", torch.float16)]:
    W = W64.to(dt)
    Wd = W.to(torch.float64)
    ref = Wd.T @ (Wd @ v)
    got = specfast.gram_matvec(W, v.to(torch.float64))
    out["gram"][name] = float((got - ref).abs().max() / ref.abs().max())
    truth = torch.linalg.svdvals(Wd)[:4]
    vals = specfast.svdvals(W, 4).to(torch.float64)
    out["sigma"][name] = float(((vals - truth).abs() / truth).max())
fro = specfast.frobenius_norm_sq(W64.to(torch.bfloat16))
out["fro"] = float(abs(fro - W64.to(torch.bfloat16).to(torch.float64).square().sum()) / fro)
print(json.dumps(out))
"""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _supported(isa: str) -> bool:
    flags = _cpu_flags().split()
    if isa == "portable":
        return True
    if isa == "avx2":
        return all(f in flags for f in ("avx2", "fma", "f16c"))
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"], ids=lambda i: f"isa={i}")
def test_every_isa_path_is_correct(isa, tmp_path):
    if not _supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, SPECFAST_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["isa"] == {"portable": "portable", "avx2": "avx2+fma+f16c", "avx512": "avx512"}[isa]
    for name, err in out["gram"].items():
        assert err <= 1e-12, f"{isa} gram_matvec {name}: relative error {err}"
    for name, err in out["sigma"].items():
        assert err <= 1e-6, f"{isa} svdvals {name}: relative error {err}"
    assert out["fro"] <= 1e-12


def test_build_info_names_the_dispatched_isa():
    assert specfast.build_info()["cpu_isa"] in ("portable", "avx2+fma+f16c", "avx512")
